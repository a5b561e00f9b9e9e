//! Audit of file and exec operations the fallback backend refused.
//!
//! On hosts without BPF-LSM, Landlock and seccomp refuse file, exec and
//! mode changes, but they tell nobody. These tracepoints make every such
//! refusal of a confined task an event: at syscall entry the path pointer is
//! stashed per thread; at exit, if the call failed with EACCES, EPERM or
//! EXDEV, the path is read (the kernel has faulted it in by then) and a
//! `deny` event is written. They never change an outcome: they only report.
//! The path is the one the process passed (it may be relative to a dirfd).
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::map, macros::tracepoint, maps::HashMap,
    programs::TracePointContext,
};
use mcp_warden_common::{decision, kind, op, EVENT_PATH_LEN};

use crate::{event::emit, maps::current_instance};

/// One syscall in flight on a confined thread.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Pending {
    path: u64,
    op: u32,
    /// open flags (for the access mode), 0 otherwise.
    flags: u32,
}

/// Keyed by pid_tgid (the thread). Entries live from enter to exit.
#[map(name = "mw_pending")]
static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(16384, 0);

const EACCES: i64 = 13;
const EPERM: i64 = 1;
const EXDEV: i64 = 18;

/// Offset of argument `n` in a sys_enter_* record (after the common header
/// and `__syscall_nr` with its padding).
const fn arg(n: usize) -> usize {
    16 + 8 * n
}

/// Offset of `ret` in a sys_exit_* record.
const RET: usize = 16;

#[inline(always)]
fn enter(ctx: &TracePointContext, op: u32, path_arg: usize, flags_arg: Option<usize>) -> u32 {
    if current_instance().is_none() {
        return 0;
    }
    // SAFETY: offsets follow the stable syscall tracepoint layout.
    let path: u64 = unsafe { ctx.read_at(arg(path_arg)) }.unwrap_or(0);
    let flags: u64 = match flags_arg {
        // SAFETY: as above.
        Some(n) => unsafe { ctx.read_at(arg(n)) }.unwrap_or(0),
        None => 0,
    };
    let p = Pending {
        path,
        op,
        flags: flags as u32,
    };
    let _ = PENDING.insert(bpf_get_current_pid_tgid(), p, 0);
    0
}

#[inline(always)]
fn exit(ctx: &TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out of the map before the entry is removed.
    let Some(p) = (unsafe { PENDING.get(id) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(id);
    // SAFETY: stable sys_exit layout.
    let ret: i64 = unsafe { ctx.read_at(RET) }.unwrap_or(0);
    if ret != -EACCES && ret != -EPERM && ret != -EXDEV {
        return 0;
    }
    let Some((cg, st)) = current_instance() else {
        return 0;
    };
    let k = if p.op == op::EXEC {
        kind::EXEC
    } else {
        kind::FILE
    };
    emit(k, p.op, decision::DENY, cg, &st, |e| {
        e.errno = (-ret) as u32;
        // The access mode rides in `protocol` for file events.
        e.protocol = p.flags;
        if p.path != 0 {
            let mut buf = [0u8; EVENT_PATH_LEN];
            // SAFETY: reading user memory with the checked helper; a
            // failure leaves the path empty.
            if unsafe {
                aya_ebpf::helpers::bpf_probe_read_user_str_bytes(p.path as *const u8, &mut buf)
            }
            .is_ok()
            {
                e.path = buf;
            }
        }
    });
    0
}

macro_rules! audited {
    ($enter:ident, $exit:ident, $tp_enter:literal, $tp_exit:literal, $op:expr, $path:expr, $flags:expr) => {
        #[tracepoint(category = "syscalls", name = $tp_enter)]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter(&ctx, $op, $path, $flags)
        }

        #[tracepoint(category = "syscalls", name = $tp_exit)]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit(&ctx)
        }
    };
}

audited!(
    mw_enter_openat,
    mw_exit_openat,
    "sys_enter_openat",
    "sys_exit_openat",
    op::OPEN,
    1,
    Some(2)
);
audited!(
    mw_enter_open,
    mw_exit_open,
    "sys_enter_open",
    "sys_exit_open",
    op::OPEN,
    0,
    Some(1)
);
audited!(
    mw_enter_openat2,
    mw_exit_openat2,
    "sys_enter_openat2",
    "sys_exit_openat2",
    op::OPEN,
    1,
    None
);
audited!(
    mw_enter_execve,
    mw_exit_execve,
    "sys_enter_execve",
    "sys_exit_execve",
    op::EXEC,
    0,
    None
);
audited!(
    mw_enter_execveat,
    mw_exit_execveat,
    "sys_enter_execveat",
    "sys_exit_execveat",
    op::EXEC,
    1,
    None
);
audited!(
    mw_enter_unlinkat,
    mw_exit_unlinkat,
    "sys_enter_unlinkat",
    "sys_exit_unlinkat",
    op::UNLINK,
    1,
    None
);
audited!(
    mw_enter_mkdirat,
    mw_exit_mkdirat,
    "sys_enter_mkdirat",
    "sys_exit_mkdirat",
    op::MKDIR,
    1,
    None
);
audited!(
    mw_enter_renameat2,
    mw_exit_renameat2,
    "sys_enter_renameat2",
    "sys_exit_renameat2",
    op::RENAME,
    1,
    None
);
audited!(
    mw_enter_linkat,
    mw_exit_linkat,
    "sys_enter_linkat",
    "sys_exit_linkat",
    op::LINK,
    1,
    None
);
audited!(
    mw_enter_symlinkat,
    mw_exit_symlinkat,
    "sys_enter_symlinkat",
    "sys_exit_symlinkat",
    op::SYMLINK,
    2,
    None
);
audited!(
    mw_enter_truncate,
    mw_exit_truncate,
    "sys_enter_truncate",
    "sys_exit_truncate",
    op::TRUNCATE,
    0,
    None
);
audited!(
    mw_enter_fchmodat,
    mw_exit_fchmodat,
    "sys_enter_fchmodat",
    "sys_exit_fchmodat",
    op::CHMOD,
    1,
    None
);
audited!(
    mw_enter_fchownat,
    mw_exit_fchownat,
    "sys_enter_fchownat",
    "sys_exit_fchownat",
    op::CHOWN,
    1,
    None
);
