//! Per-instance syscall counters, tagged with the call epoch in force, so
//! each finished tool call gets its exact syscall counts (shared when calls
//! overlapped). Counting only: never changes an outcome.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::{map, raw_tracepoint},
    maps::PerCpuHashMap,
    programs::RawTracePointContext,
};
use mcp_warden_common::{kind, SyscallKey};

use crate::{event::count_lost, maps::current_instance_traced};

/// Drained by userspace after each call ends; up to 16k entries of
/// (instance, epoch, syscall). Preallocated: every call starts new epochs,
/// so entries come and go all the time, and allocating them on use
/// (`BPF_F_NO_PREALLOC`) put the kernel's per-CPU allocator, its refill
/// irq_work and its RCU frees on every confined syscall of a new epoch
/// (measured: tools/call round trip 49 -> 14 us on one CPU). The price is
/// paid once at load: 16k x 8 bytes per possible CPU.
#[map(name = "mw_syscalls")]
static SYSCALLS: PerCpuHashMap<SyscallKey, u64> = PerCpuHashMap::with_max_entries(16384, 0);

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn mw_sys_enter(ctx: RawTracePointContext) -> i32 {
    let Some((cg, st)) = current_instance_traced() else {
        return 0;
    };
    // sys_enter(struct pt_regs *regs, long id)
    let nr: u64 = ctx.arg(1);
    let key = SyscallKey {
        cgroup_id: cg,
        epoch: st.epoch,
        nr: nr as u32,
        _pad: 0,
    };
    match SYSCALLS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(p) => unsafe { *p += 1 },
        None => {
            if SYSCALLS.insert(key, 1u64, BPF_NOEXIST as u64).is_err() {
                count_lost(kind::SYSCALL);
            }
        }
    }
    0
}
