//! Unix socket egress: connect (stream, seqpacket, dgram) and unconnected
//! dgram sendmsg to a unix socket path or abstract name, judged against the
//! instance's `network.unix` rules.
//!
//! These run at the kernel's BPF_CGROUP_UNIX_CONNECT / UNIX_SENDMSG attach
//! points. aya 0.14 cannot load programs for those attach types, so the
//! agent loads these two functions itself (agent/src/kernel/raw.rs) from
//! the same object; the sections below are only there so the object parses
//! (aya never loads them as inet programs).
//!
//! The destination is not in the user-visible `bpf_sock_addr` for unix
//! sockets (the kernel offers it through kfuncs aya cannot call). The
//! context register points to the kernel's `struct bpf_sock_addr_kern`; we
//! read its `uaddr` and `uaddrlen` with `bpf_probe_read_kernel`, at offsets
//! the agent read from the running kernel's BTF and wrote into the globals
//! below before loading. Passing the context pointer to that helper is
//! allowed for privileged loaders (CAP_PERFMON: pointer leaks allowed).
//!
//! Fail closed, like the inet hooks: a confined task whose instance state
//! or destination cannot be read is refused.
use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated},
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use mcp_warden_common::{
    decision, flags, kind, op, InstanceState, UnixKey, UNIX_KEY_FIXED_BITS, UNIX_PATH_MAX,
};

use crate::{
    event::emit,
    maps::{current_instance, UNIX_RULES},
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const AF_UNIX: u32 = 1;
const EPERM: u32 = 1;

/// Offset of `uaddr` (a `struct sockaddr *`) in `struct bpf_sock_addr_kern`,
/// from the running kernel's BTF. 0 = not set: refuse everything.
#[unsafe(no_mangle)]
static MW_SAK_UADDR: u32 = 0;
/// Offset of `uaddrlen` (u32) in `struct bpf_sock_addr_kern`.
#[unsafe(no_mangle)]
static MW_SAK_UADDRLEN: u32 = 0;

/// Largest offset accepted (the struct is 40 bytes on 6.7 .. 6.18).
const MAX_OFF: u32 = 256;

#[inline(always)]
fn read_global(g: &'static u32) -> u32 {
    // SAFETY: a read of our own global; volatile so the value the agent
    // wrote at load time is used, not the compile-time 0.
    unsafe { core::ptr::read_volatile(g) }
}

/// Read the destination into `key.path`: the path bytes up to the first NUL
/// (pathname sockets) or `@` and the name (abstract sockets), zero-padded.
/// Returns false when it cannot be read.
#[inline(always)]
fn destination(ctx: &SockAddrContext, key: &mut UnixKey) -> bool {
    let off_addr = read_global(&MW_SAK_UADDR);
    let off_len = read_global(&MW_SAK_UADDRLEN);
    if off_addr == 0 || off_len == 0 || off_addr > MAX_OFF || off_len > MAX_OFF {
        return false;
    }
    let base = ctx.sock_addr as *const u8;
    // SAFETY: checked kernel reads; the offsets come from this kernel's BTF.
    let uaddr = match unsafe {
        bpf_probe_read_kernel(base.wrapping_add(off_addr as usize) as *const u64)
    } {
        Ok(p) => p,
        Err(_) => return false,
    };
    // SAFETY: as above.
    let ulen =
        match unsafe { bpf_probe_read_kernel(base.wrapping_add(off_len as usize) as *const u32) } {
            Ok(n) => n as usize,
            Err(_) => return false,
        };
    if uaddr == 0 || ulen <= 2 {
        // An unnamed destination (autobind) or none: nothing to judge by.
        return false;
    }
    // Path bytes the caller gave (addrlen minus sun_family), at most 108.
    let mut n = ulen - 2;
    if n > UNIX_PATH_MAX {
        n = UNIX_PATH_MAX;
    }
    // The kernel copied the address into a sockaddr_storage (128 bytes):
    // every read below stays inside it. `key.path` starts all zero, and no
    // helper below writes past the bytes it copies, so the key stays
    // zero-padded.
    let path = (uaddr as *const u8).wrapping_add(2);
    // SAFETY: checked kernel read.
    let first = match unsafe { bpf_probe_read_kernel(path) } {
        Ok(b) => b,
        Err(_) => return false,
    };
    let dst = key.path.as_mut_ptr();
    if first == 0 {
        // Abstract: `@` and the name's exact bytes (it may hold NULs; its
        // length is addrlen, not a terminator).
        key.path[0] = b'@';
        let len = (n - 1) as u32;
        if len == 0 || len > (UNIX_PATH_MAX - 1) as u32 {
            return false;
        }
        // SAFETY: checked kernel read of `len` <= 107 bytes into path[1..].
        let r = unsafe {
            generated::bpf_probe_read_kernel(
                dst.wrapping_add(1).cast(),
                len,
                path.wrapping_add(1).cast(),
            )
        };
        return r == 0;
    }
    // Pathname: the bytes up to the first NUL or the addrlen, whichever
    // comes first (what the kernel itself will look up). The string read
    // stops at a NUL and writes one after what it copied, so read at most
    // n + 1 bytes including that NUL.
    let mut size = (n + 1) as u32;
    if size > UNIX_PATH_MAX as u32 {
        size = UNIX_PATH_MAX as u32;
    }
    // SAFETY: checked kernel string read of at most 108 bytes into path.
    let got = unsafe { generated::bpf_probe_read_kernel_str(dst.cast(), size, path.cast()) };
    if got <= 0 {
        return false;
    }
    if got as usize == UNIX_PATH_MAX && n == UNIX_PATH_MAX {
        // 107 bytes and the helper's NUL: the name may have a 108th byte,
        // which the key must hold, or an exact 107-byte rule would match a
        // longer name.
        // SAFETY: checked kernel read of one byte.
        match unsafe { bpf_probe_read_kernel(path.wrapping_add(UNIX_PATH_MAX - 1)) } {
            Ok(b) => key.path[UNIX_PATH_MAX - 1] = b,
            Err(_) => return false,
        }
    }
    true
}

#[inline(always)]
fn check(ctx: &SockAddrContext, operation: u32) -> i32 {
    let Some((cg, st)) = current_instance() else {
        return REFUSE;
    };
    let mut key = Key::new(
        UNIX_KEY_FIXED_BITS + 8 * UNIX_PATH_MAX as u32,
        UnixKey {
            policy_id: st.policy_id.to_be_bytes(),
            path: [0; UNIX_PATH_MAX],
        },
    );
    let readable = destination(ctx, &mut key.data);
    // Exact entries are keyed with their terminating NUL and the lookup key
    // is zero-padded, so an exact entry matches only its own path and any
    // match is a rule for this destination (agent/src/policy/compile.rs).
    let allowed = readable
        && match UNIX_RULES.get(&key) {
            Some(rule) => rule.mask & st.active_mask != 0,
            None => false,
        };
    verdict(ctx, operation, cg, &st, allowed, &key.data)
}

#[inline(always)]
fn verdict(
    ctx: &SockAddrContext,
    operation: u32,
    cg: u64,
    st: &InstanceState,
    allowed: bool,
    key: &UnixKey,
) -> i32 {
    let audit = st.flags & flags::AUDIT != 0;
    let (ret, dec) = if allowed {
        (ALLOW, decision::ALLOW)
    } else if audit {
        (ALLOW, decision::AUDIT)
    } else {
        (REFUSE, decision::DENY)
    };
    if !allowed || st.flags & flags::EMIT_ALLOWED != 0 {
        // SAFETY: ctx points to the kernel's bpf_sock_addr for this hook;
        // type and protocol are readable at every sock_addr attach point.
        let (ty, proto) = unsafe { ((*ctx.sock_addr).type_, (*ctx.sock_addr).protocol) };
        emit(kind::NET, operation, dec, cg, st, |e| {
            e.family = AF_UNIX;
            e.sock_type = ty;
            e.protocol = proto;
            e.errno = if ret == REFUSE { EPERM } else { 0 };
            e.path[..UNIX_PATH_MAX].copy_from_slice(&key.path);
        });
    }
    ret
}

/// Attached as BPF_CGROUP_UNIX_CONNECT by the agent's own loader.
#[cgroup_sock_addr(connect4)]
pub fn mw_unix_connect(ctx: SockAddrContext) -> i32 {
    check(&ctx, op::UNIX_CONNECT)
}

/// Attached as BPF_CGROUP_UNIX_SENDMSG: sendto/sendmsg with a destination
/// on an unconnected unix dgram socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn mw_unix_sendmsg(ctx: SockAddrContext) -> i32 {
    check(&ctx, op::SENDMSG)
}
