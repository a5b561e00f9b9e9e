//! Process tree for the audit trail: exec and exit of confined tasks.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext, EbpfContext};
use mcp_warden_common::{decision, kind, op};

use crate::{event::emit, maps::current_instance};

/// sched_process_exec: a confined task replaced its image.
#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn mw_sched_exec(ctx: TracePointContext) -> u32 {
    let Some((cg, st)) = current_instance() else {
        return 0;
    };
    // The filename is a __data_loc field: low 16 bits offset, high 16 length.
    // SAFETY: offset 8 is `__data_loc char[] filename` in this tracepoint's
    // stable format (common fields take the first 8 bytes).
    let loc: u32 = unsafe { ctx.read_at::<u32>(8) }.unwrap_or(0);
    let off = (loc & 0xffff) as usize;
    emit(kind::PROC, op::EXEC, decision::ALLOW, cg, &st, |e| {
        if off != 0 {
            let base = ctx.as_ptr() as *const u8;
            // SAFETY: reading kernel memory of the tracepoint record with the
            // checked helper; a failure leaves the path empty.
            unsafe {
                let _ =
                    aya_ebpf::helpers::bpf_probe_read_kernel_str_bytes(base.add(off), &mut e.path);
            }
        }
    });
    0
}

/// sched_process_exit: a confined task ended.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn mw_sched_exit(_ctx: TracePointContext) -> u32 {
    let Some((cg, st)) = current_instance() else {
        return 0;
    };
    // Only the thread-group leader's exit ends the process.
    let pt = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    if (pt >> 32) as u32 != pt as u32 {
        return 0;
    }
    emit(kind::PROC, op::EXIT, decision::ALLOW, cg, &st, |_| {});
    0
}
