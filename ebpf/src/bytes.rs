//! Network payload bytes per instance and call epoch, both directions, from
//! cgroup_skb hooks on the instance cgroup. Counting only: every packet is
//! let through (1). Payload = IP length minus the IP and TCP/UDP headers, so
//! a tool call's figure is what its sockets carried, not framing overhead.
//! Ingress packets are also shown to dns.rs (DNS answers, audit/learn).
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_skb_cgroup_id,
    macros::{cgroup_skb, map},
    maps::PerCpuHashMap,
    programs::SkBuffContext,
};
use mcp_warden_common::{kind, BytesKey, InstanceState, DIR_EGRESS, DIR_INGRESS};

use crate::{event::count_lost, maps::INSTANCES};

/// Preallocated, as `mw_syscalls` (syscalls.rs) and for the same reason.
#[map(name = "mw_bytes")]
static BYTES: PerCpuHashMap<BytesKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Payload length of the IP packet in `ctx` (0 for anything unparsed).
#[inline(always)]
fn payload(ctx: &SkBuffContext) -> u64 {
    let len = ctx.len() as u64;
    let Ok(b0) = ctx.load::<u8>(0) else {
        return 0;
    };
    let (ip_hl, proto) = match b0 >> 4 {
        4 => {
            let ihl = ((b0 & 0x0f) as u64) * 4;
            let Ok(p) = ctx.load::<u8>(9) else { return 0 };
            (ihl, p)
        }
        6 => {
            let Ok(p) = ctx.load::<u8>(6) else { return 0 };
            (40, p)
        }
        _ => return 0,
    };
    let l4 = match proto {
        IPPROTO_TCP => match ctx.load::<u8>(ip_hl as usize + 12) {
            Ok(doff) => ((doff >> 4) as u64) * 4,
            Err(_) => return 0,
        },
        IPPROTO_UDP => 8,
        _ => 0,
    };
    len.saturating_sub(ip_hl + l4)
}

#[inline(always)]
fn count(ctx: &SkBuffContext, dir: u32) -> i32 {
    // SAFETY: the helper reads the cgroup of the skb's socket.
    let cg = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // SAFETY: copied out of the map.
    let st: InstanceState = match unsafe { INSTANCES.get(cg) } {
        Some(s) => *s,
        None => return 1,
    };
    if dir == DIR_INGRESS {
        crate::dns::observe(ctx, cg, &st);
    }
    let n = payload(ctx);
    if n == 0 {
        return 1;
    }
    let key = BytesKey {
        cgroup_id: cg,
        epoch: st.epoch,
        dir,
        _pad: 0,
    };
    match BYTES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(p) => unsafe { *p += n },
        None => {
            if BYTES.insert(key, n, BPF_NOEXIST as u64).is_err() {
                count_lost(kind::BYTES);
            }
        }
    }
    1
}

#[cgroup_skb(egress)]
pub fn mw_skb_egress(ctx: SkBuffContext) -> i32 {
    count(&ctx, DIR_EGRESS)
}

#[cgroup_skb(ingress)]
pub fn mw_skb_ingress(ctx: SkBuffContext) -> i32 {
    count(&ctx, DIR_INGRESS)
}
