//! The unix socket hooks (ebpf/src/unix.rs): the layout they read, and
//! their loading through [`super::raw`].
use std::{collections::HashMap, os::fd::AsFd, os::fd::AsRawFd, os::fd::RawFd};

use aya::{
    maps::{Map, MapData},
    Ebpf,
};
use mcp_warden_common::programs;

use super::{
    btf::Btf,
    raw::{self, RawError, RawProgram},
};

/// Hook names in `mcp_warden_enforcement_available{hook}` and `status`.
pub const HOOK_CONNECT: &str = "cgroup_unix_connect";
pub const HOOK_SENDMSG: &str = "cgroup_unix_sendmsg";

/// Names of the globals in ebpf/src/unix.rs.
pub const GLOBAL_UADDR: &str = "MW_SAK_UADDR";
pub const GLOBAL_UADDRLEN: &str = "MW_SAK_UADDRLEN";

/// Where `uaddr` and `uaddrlen` sit in the running kernel's
/// `struct bpf_sock_addr_kern` (the context of sock_addr programs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockAddrKernLayout {
    pub uaddr: u32,
    pub uaddrlen: u32,
    pub size: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{0}")]
    Btf(#[from] super::btf::BtfError),
    #[error("struct bpf_sock_addr_kern has an unexpected layout ({0:?})")]
    Unexpected(SockAddrKernLayout),
}

/// Read the layout from BTF and check it is one the program can use: a
/// pointer-aligned `uaddr` and a u32 `uaddrlen` inside the struct, neither
/// at offset 0 (where `sk` is; 0 also means "unset" to the program).
pub fn layout(btf: &Btf) -> Result<SockAddrKernLayout, LayoutError> {
    let l = SockAddrKernLayout {
        uaddr: btf.member_offset("bpf_sock_addr_kern", "uaddr")?,
        uaddrlen: btf.member_offset("bpf_sock_addr_kern", "uaddrlen")?,
        size: btf.struct_size("bpf_sock_addr_kern")?,
    };
    let ok = l.uaddr != 0
        && l.uaddrlen != 0
        && l.uaddr.is_multiple_of(8)
        && l.uaddrlen.is_multiple_of(4)
        && l.uaddr + 8 <= l.size
        && l.uaddrlen + 4 <= l.size
        && l.size <= 256;
    if !ok {
        return Err(LayoutError::Unexpected(l));
    }
    Ok(l)
}

fn map_data(m: &Map) -> Option<&MapData> {
    match m {
        Map::Array(d)
        | Map::CgroupArray(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::RingBuf(d) => Some(d),
        _ => None,
    }
}

/// Load both unix programs from `object`, sharing the maps of `ebpf`.
pub fn load(ebpf: &Ebpf, object: &[u8]) -> Result<Vec<RawProgram>, RawError> {
    let fds: HashMap<String, RawFd> = ebpf
        .maps()
        .filter_map(|(name, m)| map_data(m).map(|d| (name.to_string(), d.fd().as_fd().as_raw_fd())))
        .collect();
    let linked = raw::link_programs(
        object,
        &[programs::UNIX_CONNECT, programs::UNIX_SENDMSG],
        &fds,
    )?;
    let mut out = Vec::new();
    for (name, insns, license) in linked {
        let (name, hook, attach_type) = if name == programs::UNIX_CONNECT {
            (programs::UNIX_CONNECT, HOOK_CONNECT, raw::UNIX_CONNECT)
        } else {
            (programs::UNIX_SENDMSG, HOOK_SENDMSG, raw::UNIX_SENDMSG)
        };
        let fd = raw::load_sock_addr(name, &insns, &license, attach_type)?;
        out.push(RawProgram {
            name: hook,
            attach_type,
            fd,
        });
    }
    Ok(out)
}
