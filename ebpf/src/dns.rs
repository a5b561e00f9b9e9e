//! DNS answers a confined server receives, for learn and audit mode: the
//! ingress cgroup_skb hook (bytes.rs) hands every packet of a confined
//! socket here; a DNS response (source port 53, UDP or a whole message in
//! one TCP segment) is copied, up to `EVENT_PATH_LEN` bytes, into a net
//! event with `op::DNS`. The agent parses the message (question name,
//! A/AAAA answers) in userspace: the kernel side only finds where the
//! message starts and copies it, with no loop at all.
//!
//! Pure observation: nothing here changes or drops a packet, and it runs
//! only for instances in audit mode or with allowed events asked for.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    programs::SkBuffContext,
};
use mcp_warden_common::{decision, flags, kind, op, Event, InstanceState, EVENT_PATH_LEN};

use crate::{event::count_lost, maps::EVENTS};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const DNS_PORT: u16 = 53;
/// A DNS header is 12 bytes; a response also echoes its question.
const DNS_MIN: usize = 12;

/// Where the DNS message sits in the packet, and who sent it.
struct Found {
    family: u32,
    protocol: u32,
    addr: [u8; 16],
    off: usize,
    len: usize,
}

#[inline(always)]
fn be16(ctx: &SkBuffContext, off: usize) -> Option<u16> {
    ctx.load::<u16>(off).ok().map(u16::from_be)
}

/// Parse the IP and UDP/TCP headers (IPv6 without extension headers) and
/// find a DNS response in the payload.
#[inline(always)]
fn find(ctx: &SkBuffContext) -> Option<Found> {
    let b0 = ctx.load::<u8>(0).ok()?;
    let mut addr = [0u8; 16];
    let (family, ip_hl, proto) = match b0 >> 4 {
        4 => {
            let src = ctx.load::<[u8; 4]>(12).ok()?;
            addr[..4].copy_from_slice(&src);
            (AF_INET, ((b0 & 0x0f) as usize) * 4, ctx.load::<u8>(9).ok()?)
        }
        6 => {
            addr = ctx.load::<[u8; 16]>(8).ok()?;
            (AF_INET6, 40, ctx.load::<u8>(6).ok()?)
        }
        _ => return None,
    };
    if be16(ctx, ip_hl)? != DNS_PORT {
        return None;
    }
    let total = ctx.len() as usize;
    let (off, len) = match proto {
        IPPROTO_UDP => {
            let off = ip_hl + 8;
            (off, total.checked_sub(off)?)
        }
        IPPROTO_TCP => {
            // Only a message that starts and ends in this segment: a
            // 2-byte length prefix equal to the rest of the payload.
            let doff = ((ctx.load::<u8>(ip_hl + 12).ok()? >> 4) as usize) * 4;
            let start = ip_hl + doff;
            let payload = total.checked_sub(start)?;
            let n = be16(ctx, start)? as usize;
            if n + 2 != payload {
                return None;
            }
            (start + 2, n)
        }
        _ => return None,
    };
    if len < DNS_MIN {
        return None;
    }
    // QR bit: a response.
    if ctx.load::<u8>(off + 2).ok()? & 0x80 == 0 {
        return None;
    }
    Some(Found {
        family,
        protocol: proto as u32,
        addr,
        off,
        len,
    })
}

/// Report the DNS response in `ctx`, if it is one. Never fails the packet.
#[inline(always)]
pub fn observe(ctx: &SkBuffContext, cg: u64, st: &InstanceState) {
    if st.flags & (flags::AUDIT | flags::EMIT_ALLOWED) == 0 {
        return;
    }
    let Some(f) = find(ctx) else {
        return;
    };
    // The copy length, bounded for the verifier: 1..=EVENT_PATH_LEN.
    let n = if f.len > EVENT_PATH_LEN {
        EVENT_PATH_LEN
    } else {
        f.len
    };
    if n == 0 {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost(kind::NET);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to reserved, writable ring-buffer memory of
    // size_of::<Event>(); it is zeroed, then filled, then submitted. The
    // copy writes `n` <= EVENT_PATH_LEN bytes into `path`.
    let copied = unsafe {
        core::ptr::write_bytes(ev, 0, 1);
        let e = &mut *ev;
        e.kind = kind::NET;
        e.op = op::DNS;
        e.decision = decision::ALLOW;
        e.instance_id = st.instance_id;
        e.cgroup_id = cg;
        e.epoch = st.epoch;
        e.active_mask = st.active_mask;
        e.ktime_ns = bpf_ktime_get_ns();
        // No pid or comm: the packet arrives in softirq context, where the
        // current task is whoever happened to run (often the sender).
        e.family = f.family;
        e.protocol = f.protocol;
        e.port = DNS_PORT as u32;
        e.addr = f.addr;
        // The whole message's length (the copy may be cut).
        e.sock_type = f.len as u32;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            f.off as u32,
            e.path.as_mut_ptr().cast(),
            n as u32,
        )
    };
    if copied != 0 {
        entry.discard(0);
        count_lost(kind::NET);
        return;
    }
    entry.submit(0);
}
