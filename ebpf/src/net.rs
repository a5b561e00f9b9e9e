//! Network egress: cgroup sock_addr hooks (connect, unconnected sendmsg,
//! bind) for IPv4 and IPv6, and the sock_create hook for raw sockets.
//!
//! These programs are attached to an instance's cgroup only, so every task
//! that reaches them is confined. They fail closed: if the instance state is
//! missing (a race with teardown, a sub-cgroup the agent does not know) the
//! operation is refused, because a confined server must never gain access
//! through an internal error.
use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockContext},
};
use mcp_warden_common::{
    decision, flags, kind, op, rule_kind, InstanceState, Net4Key, Net6Key, NET_KEY_FIXED_BITS,
};

use crate::{
    event::emit,
    maps::{current_instance, NET4_RULES, NET6_RULES},
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_RAW: u32 = 3;
const EPERM: u32 = 1;

#[inline(always)]
fn v4_allowed(policy_id: u32, kind: u32, addr: [u8; 4], port: u16, mask: u64) -> bool {
    let key = Key::new(
        NET_KEY_FIXED_BITS + 32,
        Net4Key {
            policy_id: policy_id.to_be_bytes(),
            kind: kind.to_be_bytes(),
            addr,
        },
    );
    match NET4_RULES.get(&key) {
        Some(rule) => rule.allows(port, mask),
        None => false,
    }
}

#[inline(always)]
fn v6_allowed(policy_id: u32, kind: u32, addr: [u8; 16], port: u16, mask: u64) -> bool {
    // An IPv4-mapped address (::ffff:a.b.c.d) is judged as IPv4.
    if addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff {
        return v4_allowed(
            policy_id,
            kind,
            [addr[12], addr[13], addr[14], addr[15]],
            port,
            mask,
        );
    }
    let key = Key::new(
        NET_KEY_FIXED_BITS + 128,
        Net6Key {
            policy_id: policy_id.to_be_bytes(),
            kind: kind.to_be_bytes(),
            addr,
        },
    );
    match NET6_RULES.get(&key) {
        Some(rule) => rule.allows(port, mask),
        None => false,
    }
}

/// Where an operation was headed.
struct Target {
    family: u32,
    addr: [u8; 16],
    port: u16,
}

/// Turn the rule verdict into the hook's return value and an event.
#[inline(always)]
fn verdict(
    ctx: &SockAddrContext,
    operation: u32,
    cg: u64,
    st: &InstanceState,
    allowed: bool,
    t: Target,
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
        // SAFETY: ctx points to the kernel's bpf_sock_addr for this hook.
        let (ty, proto) = unsafe { ((*ctx.sock_addr).type_, (*ctx.sock_addr).protocol) };
        emit(kind::NET, operation, dec, cg, st, |e| {
            e.family = t.family;
            e.sock_type = ty;
            e.protocol = proto;
            e.port = t.port as u32;
            e.addr = t.addr;
            e.errno = if ret == REFUSE { EPERM } else { 0 };
        });
    }
    ret
}

#[inline(always)]
fn check4(ctx: &SockAddrContext, operation: u32, kind: u32) -> i32 {
    let Some((cg, st)) = current_instance() else {
        return REFUSE;
    };
    // SAFETY: ctx points to the kernel's bpf_sock_addr for this hook.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // user_ip4 holds the address in network order; its in-memory bytes are
    // the address bytes. user_port is big-endian in the low 16 bits.
    let addr4 = ip.to_ne_bytes();
    let port = u16::from_be(port as u16);
    let allowed = v4_allowed(st.policy_id, kind, addr4, port, st.active_mask)
        && !(kind == rule_kind::CONNECT && st.flags & flags::CLOSED_WORLD != 0);
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&addr4);
    let t = Target {
        family: AF_INET,
        addr,
        port,
    };
    verdict(ctx, operation, cg, &st, allowed, t)
}

#[inline(always)]
fn check6(ctx: &SockAddrContext, operation: u32, kind: u32) -> i32 {
    let Some((cg, st)) = current_instance() else {
        return REFUSE;
    };
    // SAFETY: ctx points to the kernel's bpf_sock_addr; user_ip6 must be
    // read as four 32-bit loads.
    let (w, port) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
            sa.user_port,
        )
    };
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
    let port = u16::from_be(port as u16);
    let allowed = v6_allowed(st.policy_id, kind, addr, port, st.active_mask)
        && !(kind == rule_kind::CONNECT && st.flags & flags::CLOSED_WORLD != 0);
    let t = Target {
        family: AF_INET6,
        addr,
        port,
    };
    verdict(ctx, operation, cg, &st, allowed, t)
}

#[cgroup_sock_addr(connect4)]
pub fn mw_connect4(ctx: SockAddrContext) -> i32 {
    check4(&ctx, op::CONNECT, rule_kind::CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn mw_connect6(ctx: SockAddrContext) -> i32 {
    check6(&ctx, op::CONNECT, rule_kind::CONNECT)
}

/// Unconnected UDP sendto/sendmsg passes no connect hook: judge each
/// destination here against the same connect rules.
#[cgroup_sock_addr(sendmsg4)]
pub fn mw_sendmsg4(ctx: SockAddrContext) -> i32 {
    check4(&ctx, op::SENDMSG, rule_kind::CONNECT)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mw_sendmsg6(ctx: SockAddrContext) -> i32 {
    check6(&ctx, op::SENDMSG, rule_kind::CONNECT)
}

#[cgroup_sock_addr(bind4)]
pub fn mw_bind4(ctx: SockAddrContext) -> i32 {
    check4(&ctx, op::BIND, rule_kind::BIND)
}

#[cgroup_sock_addr(bind6)]
pub fn mw_bind6(ctx: SockAddrContext) -> i32 {
    check6(&ctx, op::BIND, rule_kind::BIND)
}

/// Raw inet sockets are never allowed to a confined server: they bypass the
/// address hooks above. (This hook only sees AF_INET/AF_INET6; packet and
/// other families are refused by the launcher's seccomp filter and by
/// dropping CAP_NET_RAW.)
#[cgroup_sock(sock_create)]
pub fn mw_sock_create(ctx: SockContext) -> i32 {
    let Some((cg, st)) = current_instance() else {
        return REFUSE;
    };
    // SAFETY: ctx points to the kernel's bpf_sock for this hook.
    let (family, ty, proto) = unsafe {
        let s = &*ctx.sock;
        (s.family, s.type_, s.protocol)
    };
    if ty != SOCK_RAW {
        return ALLOW;
    }
    let audit = st.flags & flags::AUDIT != 0;
    let (ret, dec) = if audit {
        (ALLOW, decision::AUDIT)
    } else {
        (REFUSE, decision::DENY)
    };
    emit(kind::NET, op::SOCK_CREATE, dec, cg, &st, |e| {
        e.family = family;
        e.sock_type = ty;
        e.protocol = proto;
        e.errno = if ret == REFUSE { EPERM } else { 0 };
    });
    ret
}
