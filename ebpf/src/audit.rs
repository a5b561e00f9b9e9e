//! Audit of file and exec operations the fallback backend refused.
//!
//! On hosts without BPF-LSM, Landlock and seccomp refuse file, exec and
//! mode changes, but they tell nobody. This makes every such refusal of a
//! confined task an event: at syscall exit, if the call failed with
//! EACCES, EPERM or EXDEV, the syscall number (`orig_rax`) and its
//! arguments are read back from the task's saved user registers (they are
//! unchanged at exit on x86_64), the path is read (the kernel has faulted
//! it in by then) and a `deny` event is written. Nothing is stashed at
//! syscall entry. Reporting only: outcomes never change here. The path is
//! the one the process passed (it may be relative to a dirfd or the working
//! directory; the dirfd rides in the event's `family` field, AT_FDCWD when
//! none).
//!
//! Audit mode (`flags::AUDIT`, no Landlock ruleset applied), learn mode
//! (`flags::EMIT_ALLOWED`) and per-call file rules the kernel cannot
//! narrow (`flags::REPORT_FILES`): successful file operations are reported too,
//! with `decision = allow`; userspace judges them against the policy's file
//! rules and turns a would-be denial into `audit`. A successful exec is not
//! reported here (the old image's path pointer is gone by sys_exit):
//! sched_process_exec in proc.rs reports it.
//!
//! Cost for everyone else: sys_exit runs for every syscall of every
//! process. It first tests the return value; a success goes further only
//! while some instance asks for successes (`mw_config`, written by the
//! agent), and only then is the task's cgroup looked up. So for an
//! unconfined process sys_exit is a compare and an array load.
//!
//! Two raw tracepoints (sys_enter, sys_exit) serve every syscall: attaching
//! one tracepoint per syscall would cost a detach (an RCU grace period)
//! each at shutdown, and a hook each on the hot path.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::{Array, LruHashMap},
    programs::RawTracePointContext,
};
use mcp_warden_common::{config, decision, flags, kind, op, InstanceState, EVENT_PATH_LEN};

use crate::{event::emit, maps::current_instance_traced};

/// One watched syscall, as read back from the registers at exit.
#[derive(Clone, Copy)]
struct Pending {
    path: u64,
    op: u32,
    /// open flags (for the access mode), 0 otherwise.
    flags: u32,
    /// dirfd the path is relative to (AT_FDCWD when the call takes none).
    dirfd: u32,
}

/// AT_FDCWD (-100) as the u32 the event carries.
const AT_FDCWD: u32 = -100i32 as u32;

/// Agent-wide switches (index `config::*`), written by the agent.
#[map(name = "mw_config")]
static CONFIG: Array<u32> = Array::with_max_entries(config::COUNT, 0);

/// Refusals a BPF-LSM hook already reported: pid_tgid -> the syscall
/// number it happened in. Written only when a hook refuses (or, in audit
/// mode, would refuse); sys_exit takes the entry and does not report that
/// syscall again. The number makes a mark left by a syscall sys_exit does
/// not audit (io_uring_enter running an openat inline) harmless; LRU, so
/// marks of threads that died before their syscall's exit age out.
#[map(name = "mw_reported")]
pub(crate) static REPORTED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

const EACCES: i64 = 13;
const EPERM: i64 = 1;
const EXDEV: i64 = 18;

/// Which argument carries the path, and which the open flags (`NONE` when
/// there is none), per watched syscall (x86_64 numbers).
const NONE: u8 = 0xff;

const fn watched(nr: u64) -> Option<(u32, u8, u8)> {
    Some(match nr {
        2 => (op::OPEN, 0, 1),         // open(path, flags)
        85 => (op::OPEN, 0, NONE),     // creat(path, mode)
        257 => (op::OPEN, 1, 2),       // openat(dfd, path, flags)
        437 => (op::OPEN, 1, NONE),    // openat2(dfd, path, how)
        59 => (op::EXEC, 0, NONE),     // execve(path, ...)
        322 => (op::EXEC, 1, NONE),    // execveat(dfd, path, ...)
        87 => (op::UNLINK, 0, NONE),   // unlink(path)
        84 => (op::UNLINK, 0, NONE),   // rmdir(path)
        263 => (op::UNLINK, 1, NONE),  // unlinkat(dfd, path, flags)
        83 => (op::MKDIR, 0, NONE),    // mkdir(path, mode)
        258 => (op::MKDIR, 1, NONE),   // mkdirat(dfd, path, mode)
        82 => (op::RENAME, 0, NONE),   // rename(old, new)
        264 => (op::RENAME, 1, NONE),  // renameat(olddfd, old, ...)
        316 => (op::RENAME, 1, NONE),  // renameat2(olddfd, old, ...)
        86 => (op::LINK, 0, NONE),     // link(old, new)
        265 => (op::LINK, 1, NONE),    // linkat(olddfd, old, ...)
        88 => (op::SYMLINK, 1, NONE),  // symlink(target, linkpath)
        266 => (op::SYMLINK, 2, NONE), // symlinkat(target, dfd, linkpath)
        76 => (op::TRUNCATE, 0, NONE), // truncate(path, len)
        90 => (op::CHMOD, 0, NONE),    // chmod(path, mode)
        268 => (op::CHMOD, 1, NONE),   // fchmodat(dfd, path, mode)
        452 => (op::CHMOD, 1, NONE),   // fchmodat2(dfd, path, mode, flags)
        92 => (op::CHOWN, 0, NONE),    // chown(path, ...)
        94 => (op::CHOWN, 0, NONE),    // lchown(path, ...)
        260 => (op::CHOWN, 1, NONE),   // fchownat(dfd, path, ...)
        _ => return None,
    })
}

/// Every watched syscall number is below this.
const TABLE_LEN: usize = 512;
/// `flags` slot of creat(), which is open(O_CREAT | O_WRONLY | O_TRUNC).
const CREAT: u8 = 0xfe;

/// One table entry: op | path arg << 8 | flags arg << 16 | dirfd arg << 24
/// (`NONE` for no flags or no dirfd); 0 for a syscall not watched.
const fn entry(nr: u64) -> u32 {
    match watched(nr) {
        None => 0,
        Some((operation, path_arg, flags_arg)) => {
            let flags_arg = if nr == 85 { CREAT } else { flags_arg };
            // The *at calls take their dirfd in the argument just before
            // the path; symlink(target, linkpath) is the one plain call
            // with its path second.
            let dirfd_arg = if nr == 88 || path_arg == 0 {
                NONE
            } else {
                path_arg - 1
            };
            operation | (path_arg as u32) << 8 | (flags_arg as u32) << 16 | (dirfd_arg as u32) << 24
        }
    }
}

/// [`watched`] as a table, read with the syscall number as index: one
/// load instead of a branch per syscall, which keeps the verifier's state
/// count low (Linux 6.1 gave up on the branchy form in sys_exit).
static WATCHED: [u32; TABLE_LEN] = {
    let mut t = [0u32; TABLE_LEN];
    let mut i = 0;
    while i < TABLE_LEN {
        t[i] = entry(i as u64);
        i += 1;
    }
    t
};

/// The first three syscall arguments from the saved user registers.
#[inline(always)]
fn sys_args(regs: *const pt_regs) -> [u64; 3] {
    // SAFETY: `regs` is the tracepoint's pt_regs pointer; the checked
    // helper reads kernel memory and fails cleanly. rdx, rsi and rdi are
    // adjacent in pt_regs, in that order.
    let [rdx, rsi, rdi] = unsafe {
        bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rdx) as *const [u64; 3]).unwrap_or([0; 3])
    };
    [rdi, rsi, rdx]
}

/// Argument `n` (0..=2) of `a`, without a branch per value.
#[inline(always)]
fn pick(a: &[u64; 3], n: u32) -> u64 {
    let m = |i: u32| (u64::from(n == i)).wrapping_neg();
    (a[0] & m(0)) | (a[1] & m(1)) | (a[2] & m(2))
}

#[inline(always)]
fn report(p: &Pending, ret: i64, cg: u64, st: &InstanceState) {
    let k = if p.op == op::EXEC {
        kind::EXEC
    } else {
        kind::FILE
    };
    let (dec, errno) = if ret < 0 {
        (decision::DENY, (-ret) as u32)
    } else {
        (decision::ALLOW, 0)
    };
    emit(k, p.op, dec, cg, st, |e| {
        e.errno = errno;
        // The open flags ride in `protocol` for file events, the dirfd in
        // `family` (both unused by file events otherwise).
        e.protocol = p.flags;
        e.family = p.dirfd;
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
}

/// Do successes matter to any instance (audit or learn mode)?
#[inline(always)]
fn any_wants_allowed() -> bool {
    CONFIG.get(config::WANTS_ALLOWED).is_some_and(|v| *v != 0)
}

/// The watched syscall `nr` with its arguments, read from `regs`.
#[inline(always)]
fn pending(regs: *const pt_regs, nr: u64) -> Option<Pending> {
    // SAFETY: our own read-only table; volatile so the load stays one load.
    let w = unsafe { core::ptr::read_volatile(WATCHED.get(nr as usize)?) };
    let operation = w & 0xff;
    if operation == 0 {
        return None;
    }
    let (path_arg, flags_arg, dirfd_arg) = ((w >> 8) & 0xff, (w >> 16) & 0xff, w >> 24);
    let a = sys_args(regs);
    let flags = match flags_arg {
        x if x == CREAT as u32 => 0o1101,
        x if x == NONE as u32 => 0,
        x => pick(&a, x),
    };
    let dirfd = if dirfd_arg == NONE as u32 {
        AT_FDCWD
    } else {
        pick(&a, dirfd_arg) as u32
    };
    Some(Pending {
        path: pick(&a, path_arg),
        op: operation,
        flags: flags as u32,
        dirfd,
    })
}

/// Did a BPF-LSM hook already report this syscall of this thread? Takes
/// the thread's mark either way.
#[inline(always)]
fn reported_by_lsm(nr: u64) -> bool {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(m) = (unsafe { REPORTED.get(id) }).copied() else {
        return false;
    };
    let _ = REPORTED.remove(id);
    m == nr
}

/// sys_exit(struct pt_regs *regs, long ret)
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn mw_sys_exit(ctx: RawTracePointContext) -> i32 {
    let ret: i64 = ctx.arg(1);
    let refused = ret == -EACCES || ret == -EPERM || ret == -EXDEV;
    if !refused && (ret < 0 || !any_wants_allowed()) {
        return 0;
    }
    let Some((cg, st)) = current_instance_traced() else {
        return 0;
    };
    // Successes only in audit or learn mode, and never a successful exec
    // (see the module comment).
    let wants_allowed = st.flags & (flags::AUDIT | flags::EMIT_ALLOWED | flags::REPORT_FILES) != 0;
    if !refused && !wants_allowed {
        return 0;
    }
    let regs: *const pt_regs = ctx.arg(0);
    // SAFETY: `regs` is the tracepoint's pt_regs pointer; checked read.
    let nr: u64 =
        unsafe { bpf_probe_read_kernel(core::ptr::addr_of!((*regs).orig_rax)) }.unwrap_or(u64::MAX);
    let Some(p) = pending(regs, nr) else {
        return 0;
    };
    // Take the thread's mark first, so a successful exec (not reported
    // here) does not leave it behind for a later execve.
    if reported_by_lsm(nr) || (!refused && p.op == op::EXEC) {
        return 0;
    }
    report(&p, ret, cg, &st);
    0
}
