//! Ring-buffer events. An event is reserved whole or counted as lost.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
};
use mcp_warden_common::{Event, InstanceState};

use crate::maps::{EVENTS, STATS};

/// Count one lost event of `kind`.
#[inline(always)]
pub fn count_lost(kind: u32) {
    if let Some(p) = STATS.get_ptr_mut(kind) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

/// Reserve an event and fill the common header; `fill` sets the rest.
#[inline(always)]
pub fn emit<F: FnOnce(&mut Event)>(
    kind: u32,
    op: u32,
    decision: u32,
    cg: u64,
    st: &InstanceState,
    fill: F,
) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost(kind);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to reserved, writable ring-buffer memory of
    // size_of::<Event>(); every field is written before submit.
    unsafe {
        core::ptr::write_bytes(ev, 0, 1);
        let e = &mut *ev;
        e.kind = kind;
        e.op = op;
        e.decision = decision;
        e.instance_id = st.instance_id;
        e.cgroup_id = cg;
        e.epoch = st.epoch;
        e.active_mask = st.active_mask;
        e.ktime_ns = bpf_ktime_get_ns();
        let pt = bpf_get_current_pid_tgid();
        e.pid = (pt >> 32) as u32;
        e.tid = pt as u32;
        e.uid = bpf_get_current_uid_gid() as u32;
        if let Ok(c) = bpf_get_current_comm() {
            e.comm = c;
        }
        fill(e);
    }
    entry.submit(0);
}
