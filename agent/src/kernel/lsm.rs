//! The BPF-LSM backend (ebpf/src/lsm.rs): probing, struct offsets from
//! BTF, loading and attaching the hooks.
//!
//! Chosen at start: a trivial LSM program is loaded first (raw, before the
//! object, so the object's globals can say which backend is in force); a kernel that
//! refuses it (EPERM on our development kernel, EINVAL where `bpf` is not in
//! the active LSM list) gets the fallback backend. Where it loads, every
//! hook must load and attach, or the backend is not claimed: a half-loaded
//! backend would claim more than it enforces.
use aya::{
    programs::{links::FdLink, Lsm},
    Ebpf, EbpfLoader,
};
use mcp_warden_common::programs;

use super::btf::{Btf, BtfError};

/// Names of the backends, as the Host, events and `status` show them.
pub const BACKEND_LSM: &str = "bpf-lsm";
pub const BACKEND_FALLBACK: &str = "fallback";
/// Hooks the backend cannot do without; the directory-entry and path
/// hooks are optional (Linux 6.1 refuses `bpf_d_path` in them: the
/// launcher's Landlock ruleset then keeps those rights, see host.rs).
const REQUIRED: [&str; 3] = ["file_open", "bprm_check_security", "ptrace_access_check"];

/// Offsets the LSM programs read, by global name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offsets(pub Vec<(&'static str, u32)>);

/// (global, struct, member path) of every offset; a member path with a
/// `.` sums the offsets of the nested members.
const WANTED: [(&str, &str, &str); 10] = [
    ("MW_OFF_FILE_F_PATH", "file", "f_path"),
    ("MW_OFF_FILE_F_MODE", "file", "f_mode"),
    ("MW_OFF_FILE_F_FLAGS", "file", "f_flags"),
    ("MW_OFF_DENTRY_NAME", "dentry", "d_name.qstr.name"),
    ("MW_OFF_BPRM_FILE", "linux_binprm", "file"),
    ("MW_OFF_TASK_CGROUPS", "task_struct", "cgroups"),
    ("MW_OFF_TASK_TGID", "task_struct", "tgid"),
    ("MW_OFF_CSS_SET_DFL_CGRP", "css_set", "dfl_cgrp"),
    ("MW_OFF_CGROUP_KN", "cgroup", "kn"),
    ("MW_OFF_KERNFS_NODE_ID", "kernfs_node", "id"),
];

/// Read every offset the LSM programs need from `btf`. A member path
/// `a.T.b` is member `a` of the struct, then member `b` of struct `T`.
pub fn offsets(btf: &Btf) -> Result<Offsets, BtfError> {
    let mut out = Vec::new();
    for (global, strukt, path) in WANTED {
        let parts: Vec<&str> = path.split('.').collect();
        let mut off = btf.member_offset(strukt, parts[0])?;
        for pair in parts[1..].chunks(2) {
            if let [inner, member] = pair {
                off += btf.member_offset(inner, member)?;
            }
        }
        out.push((global, off));
    }
    Ok(Offsets(out))
}

/// Set the offsets as globals of the object about to be loaded.
pub fn set_globals<'a>(loader: &mut EbpfLoader<'a>, offs: &'a Offsets) {
    for (name, v) in &offs.0 {
        loader.override_global(name, v, true);
    }
}

/// Does this kernel accept LSM programs? Err carries the reason for the log.
/// Uses the agent's own BTF table, so a host on the fallback backend never
/// has aya parse the kernel's BTF a second time.
pub fn probe(btf: &Btf) -> Result<(), String> {
    let id = btf
        .func_id("bpf_lsm_file_open")
        .ok_or("no bpf_lsm_file_open in the kernel's BTF")?;
    super::raw::probe_lsm(id).map_err(|e| format!("the kernel refused an LSM program: {e}"))
}

/// Load and attach the LSM hooks. The required ones must all attach (or
/// the error names the one that did not and nothing stays attached); an
/// optional one that the kernel refuses is logged and left out.
pub fn attach_all(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<Vec<(&'static str, FdLink)>, String> {
    let mut links = Vec::new();
    for (name, hook) in programs::LSM_HOOKS {
        let r = (|| -> Result<FdLink, String> {
            let p: &mut Lsm = ebpf
                .program_mut(name)
                .ok_or_else(|| format!("{name} missing from the object"))?
                .try_into()
                .map_err(|e| format!("{name}: {e}"))?;
            p.load(hook, btf)
                .map_err(|e| format!("{name} ({hook}): {}", chain(&e)))?;
            let id = p
                .attach()
                .map_err(|e| format!("{name} ({hook}): {}", chain(&e)))?;
            let link = p.take_link(id).map_err(|e| format!("{name}: {e}"))?;
            Ok(FdLink::from(link))
        })();
        match r {
            Ok(l) => links.push((hook, l)),
            Err(e) if REQUIRED.contains(&hook) => return Err(e),
            Err(e) => log::warn!(
                "BPF-LSM hook {hook} not available on this kernel (its rights stay with \
                 Landlock): {}",
                e.lines().next().unwrap_or("")
            ),
        }
    }
    Ok(links)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF has every struct member the programs need
    /// (this is the host kernel; the VM lane covers 6.1 and 6.12).
    #[test]
    fn offsets_from_running_kernel() {
        if !std::path::Path::new(super::super::btf::VMLINUX).exists() {
            return;
        }
        let b = Btf::from_sys_fs().unwrap();
        let o = offsets(&b).unwrap();
        eprintln!("offsets on this kernel: {:?}", o.0);
        assert_eq!(o.0.len(), WANTED.len());
        for (name, v) in &o.0 {
            assert!(*v > 0 || *name == "MW_OFF_KERNFS_NODE_ID", "{name} = {v}");
        }
    }
}
