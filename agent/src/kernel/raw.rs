//! Programs aya 0.14 cannot load: cgroup sock_addr programs with the
//! expected attach types BPF_CGROUP_UNIX_CONNECT / BPF_CGROUP_UNIX_SENDMSG
//! (Linux 6.7+), which aya's `CgroupSockAddrAttachType` does not have.
//!
//! We parse the same embedded object with aya-obj (the parser aya uses),
//! point its map references at the maps aya already created (matched by
//! name, so both loaders share one set of maps), link the program's calls,
//! and load the final instructions with a raw `bpf(BPF_PROG_LOAD)`.
//! Attachment is a raw `bpf(BPF_LINK_CREATE)` on the instance's cgroup; the
//! link fd detaches when dropped, like aya's links.
use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("parsing the eBPF object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("relocating {name}: {source}")]
    Relocate {
        name: String,
        #[source]
        source: aya_obj::relocation::EbpfRelocationError,
    },
    #[error("program {0} missing from the eBPF object")]
    Missing(String),
    #[error("map {0} of the eBPF object was not created by the loader")]
    MissingMap(String),
    #[error("BPF_PROG_LOAD of {name}: {source}\nverifier log:\n{log}")]
    Load {
        name: String,
        #[source]
        source: std::io::Error,
        log: String,
    },
    #[error("BPF_LINK_CREATE of {name}: {source}")]
    Link {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// `BPF_CGROUP_UNIX_CONNECT` and `BPF_CGROUP_UNIX_SENDMSG` (uapi numbers,
/// from aya-obj's generated bindings).
pub const UNIX_CONNECT: u32 = bpf_attach_type::BPF_CGROUP_UNIX_CONNECT as u32;
pub const UNIX_SENDMSG: u32 = bpf_attach_type::BPF_CGROUP_UNIX_SENDMSG as u32;

/// The linked instructions of each named program of `object`, with every
/// map reference pointing at the fd the caller gives for that map name.
/// `maps` must hold every map the programs use.
pub fn link_programs(
    object: &[u8],
    names: &[&str],
    maps: &HashMap<String, RawFd>,
) -> Result<Vec<(String, Vec<bpf_insn>, CString)>, RawError> {
    let mut obj = aya_obj::Object::parse(object)?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    let objmaps: Vec<(String, aya_obj::Map)> = obj.maps.drain().collect();
    let mut with_fds = Vec::with_capacity(objmaps.len());
    for (name, m) in &objmaps {
        // Maps this loader has no fd for stay unrelocated; a program that
        // uses one fails relocation below, loudly.
        if let Some(fd) = maps.get(name) {
            with_fds.push((name.as_str(), *fd, m));
        }
    }
    let reloc = |source| RawError::Relocate {
        name: names.join(","),
        source,
    };
    obj.relocate_maps(with_fds.into_iter(), &text_sections)
        .map_err(reloc)?;
    obj.relocate_calls(&text_sections).map_err(reloc)?;
    let mut out = Vec::new();
    for name in names {
        let prog = obj
            .programs
            .get(*name)
            .ok_or_else(|| RawError::Missing(name.to_string()))?;
        let f = obj
            .functions
            .get(&prog.function_key())
            .ok_or_else(|| RawError::Missing(name.to_string()))?;
        out.push((
            name.to_string(),
            f.instructions.clone(),
            obj.license.clone(),
        ));
    }
    Ok(out)
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a valid, zero-initialised bpf_attr of the right size
    // for the command; the kernel reads (and for logs writes) only through
    // pointers we set to live buffers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_PROG_LOAD / BPF_LINK_CREATE returns a new fd
    // that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Load `insns` as a cgroup sock_addr program with `expected_attach_type`.
/// On failure the verifier log is in the error.
pub fn load_sock_addr(
    name: &str,
    insns: &[bpf_insn],
    license: &CString,
    expected_attach_type: u32,
) -> Result<OwnedFd, RawError> {
    let attempt = |log: Option<&mut Vec<u8>>| {
        // SAFETY: bpf_attr is plain data; all-zero is the kernel's default.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the BPF_PROG_LOAD member of the union.
        let u = unsafe { &mut attr.__bindgen_anon_3 };
        u.prog_type = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR as u32;
        u.expected_attach_type = expected_attach_type;
        u.insns = insns.as_ptr() as u64;
        u.insn_cnt = insns.len() as u32;
        u.license = license.as_ptr() as u64;
        for (d, s) in u.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s as libc::c_char;
        }
        if let Some(buf) = log {
            u.log_level = 1;
            u.log_buf = buf.as_mut_ptr() as u64;
            u.log_size = buf.len() as u32;
        }
        sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    match attempt(None) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            // Load again with the verifier log on, to say why.
            let mut buf = vec![0u8; 4 << 20];
            let log = match attempt(Some(&mut buf)) {
                Ok(_) => "(the retry with the log on succeeded)".to_string(),
                Err(_) => {
                    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
                    String::from_utf8_lossy(&buf[..end]).into_owned()
                }
            };
            Err(RawError::Load {
                name: name.to_string(),
                source: first,
                log,
            })
        }
    }
}

/// Can this kernel load an LSM program at all? Loads `r0 = 0; exit` for
/// the LSM hook whose `bpf_lsm_*` function has BTF id `attach_btf_id`, and
/// closes it at once. EPERM / EINVAL mean: no BPF-LSM here.
pub fn probe_lsm(attach_btf_id: u32) -> std::io::Result<()> {
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0; then BPF_JMP | BPF_EXIT.
    // SAFETY: bpf_insn is plain data; all-zero is `r0 = r0 + 0`-like noise
    // we overwrite with the opcodes (registers and immediates stay 0).
    let mut insns: [bpf_insn; 2] = unsafe { std::mem::zeroed() };
    insns[0].code = 0xb7;
    insns[1].code = 0x95;
    let license = c"GPL";
    // SAFETY: bpf_attr is plain data; all-zero is the kernel's default.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_PROG_LOAD member of the union.
    let u = unsafe { &mut attr.__bindgen_anon_3 };
    u.prog_type = bpf_prog_type::BPF_PROG_TYPE_LSM as u32;
    u.expected_attach_type = bpf_attach_type::BPF_LSM_MAC as u32;
    u.attach_btf_id = attach_btf_id;
    u.insns = insns.as_ptr() as u64;
    u.insn_cnt = insns.len() as u32;
    u.license = license.as_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).map(drop)
}

/// Attach `prog` to the cgroup `target` with a bpf_link. Dropping the
/// returned fd detaches it.
pub fn link_cgroup(
    name: &str,
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<OwnedFd, RawError> {
    // SAFETY: bpf_attr is plain data; all-zero is the kernel's default.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_LINK_CREATE member of the union.
    let l = unsafe { &mut attr.link_create };
    l.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    l.__bindgen_anon_2.target_fd = target.as_raw_fd() as u32;
    l.attach_type = attach_type;
    l.flags = 0;
    sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map_err(|source| RawError::Link {
        name: name.to_string(),
        source,
    })
}

/// A program loaded here, with the attach type it was loaded for.
#[derive(Debug)]
pub struct RawProgram {
    pub name: &'static str,
    pub attach_type: u32,
    pub fd: OwnedFd,
}

impl RawProgram {
    pub fn attach<F: AsFd>(&self, cgroup: &F) -> Result<OwnedFd, RawError> {
        link_cgroup(self.name, self.fd.as_fd(), cgroup.as_fd(), self.attach_type)
    }
}
