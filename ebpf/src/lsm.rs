//! BPF-LSM backend: files, exec and ptrace, decided in the kernel.
//!
//! Loaded only where the kernel accepts LSM programs (the agent probes with
//! `mw_lsm_probe` first). The hooks are global, so each first checks that
//! the current task is in a confined cgroup; everyone else is untouched.
//!
//! Paths come from `bpf_d_path` (absolute, in the task's mount namespace),
//! plus `/` and the dentry's name for the directory-entry hooks. The path
//! is looked up in `mw_files` (LPM over policy id + path, see
//! `FileRule::allows`). A path longer than the key is judged on its first
//! 252 bytes, where only a subtree rule can match. No struct offset is
//! compiled in: the agent reads them from the running kernel's BTF and
//! writes them into the globals below before loading.
//!
//! Fail closed: a confined task whose path cannot be built is refused.
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated},
    macros::{lsm, map},
    maps::{lpm_trie::Key, PerCpuArray},
    programs::LsmContext,
};
use mcp_warden_common::{
    access, decision, flags, kind, op, FileKey, InstanceState, FILE_KEY_FIXED_BITS, FILE_PATH_MAX,
};

use crate::{
    audit::REPORTED,
    event::emit,
    maps::{current_instance, FILE_RULES},
};

const EPERM: i32 = 1;
/// `fmode_t` bits.
const FMODE_READ: u32 = 1;
const FMODE_WRITE: u32 = 2;
const FMODE_EXEC: u32 = 0x20;

/// Offsets from the running kernel's BTF (agent/src/kernel/lsm.rs).
#[unsafe(no_mangle)]
static MW_OFF_FILE_F_PATH: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_FILE_F_MODE: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_FILE_F_FLAGS: u32 = 0;
/// dentry.d_name + qstr.name.
#[unsafe(no_mangle)]
static MW_OFF_DENTRY_NAME: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_BPRM_FILE: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_TASK_CGROUPS: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_TASK_TGID: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_CSS_SET_DFL_CGRP: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_KERNFS_NODE_ID: u32 = 0;

#[inline(always)]
fn global(g: &'static u32) -> u32 {
    // SAFETY: our own read-only global; volatile so the loader's value is
    // used rather than the compile-time 0.
    unsafe { core::ptr::read_volatile(g) }
}

/// Room for `bpf_d_path` (PATH_MAX) plus `/` and one name (NAME_MAX).
const BUF: usize = 4096 + 256 + 8;

#[repr(C)]
pub struct Scratch {
    key: Key<FileKey>,
    buf: [u8; BUF],
}

/// Per-CPU work space: the path and the lookup key do not fit the stack.
#[map(name = "mw_fscratch")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Build `dir` [+ `/` + `name`] in the scratch buffer; returns its length
/// without NUL, or None.
#[inline(always)]
fn build_path(s: &mut Scratch, dir: *const u8, name: *const u8) -> Option<usize> {
    let buf = s.buf.as_mut_ptr();
    // SAFETY: `dir` is a `struct path *` the verifier tracks by BTF; the
    // buffer is ours and at least 4096 bytes.
    let n = unsafe { generated::bpf_d_path(dir as *mut _, buf.cast(), 4096) };
    if n <= 0 {
        return None;
    }
    let mut len = (n as usize - 1) & 4095;
    if !name.is_null() {
        if len != 1 {
            s.buf[len & 4095] = b'/';
            len += 1;
        }
        let at = len & 4095;
        // SAFETY: checked kernel string read of at most 256 bytes into
        // buf[at..at + 256], inside the buffer.
        let m = unsafe {
            generated::bpf_probe_read_kernel_str(buf.wrapping_add(at).cast(), 256, name.cast())
        };
        if m <= 0 {
            return None;
        }
        len = at + ((m as usize - 1) & 255);
    }
    Some(len)
}

/// The dentry's name pointer.
#[inline(always)]
fn dentry_name(dentry: *const u8) -> *const u8 {
    let off = global(&MW_OFF_DENTRY_NAME);
    if off == 0 {
        return core::ptr::null();
    }
    // SAFETY: checked kernel read at a BTF offset.
    unsafe { bpf_probe_read_kernel(dentry.wrapping_add(off as usize) as *const u64) }
        .map(|p| p as *const u8)
        .unwrap_or(core::ptr::null())
}

/// Look the first `len` bytes of the scratch path up for `acc`.
#[inline(always)]
fn allowed(s: &mut Scratch, st: &InstanceState, len: usize, acc: usize) -> bool {
    // Non-filesystem names (pipe:[..], socket:[..], anon_inode:..) are not
    // paths a policy speaks about.
    if s.buf[0] != b'/' {
        return true;
    }
    s.key.prefix_len = FILE_KEY_FIXED_BITS + 8 * FILE_PATH_MAX as u32;
    s.key.data.policy_id = st.policy_id.to_be_bytes();
    s.key.data.path = [0; FILE_PATH_MAX];
    let mut n = len as u32;
    if n > FILE_PATH_MAX as u32 {
        n = FILE_PATH_MAX as u32;
    }
    if n == 0 {
        return false;
    }
    // SAFETY: copy between two parts of our own map value; n <= 252.
    let r = unsafe {
        generated::bpf_probe_read_kernel(
            s.key.data.path.as_mut_ptr().cast(),
            n,
            s.buf.as_ptr().cast(),
        )
    };
    if r != 0 {
        return false;
    }
    match FILE_RULES.get(&s.key) {
        Some(rule) => rule.allows(acc, st.active_mask),
        None => false,
    }
}

/// What is being judged, for the event: kind, operation, open flags.
#[derive(Clone, Copy)]
struct What {
    k: u32,
    operation: u32,
    fl: u32,
}

/// Return value and event for a verdict on the scratch path.
#[inline(always)]
fn verdict(s: &Scratch, cg: u64, st: &InstanceState, ok: bool, w: What, len: usize) -> i32 {
    let What { k, operation, fl } = w;
    let audit = st.flags & flags::AUDIT != 0;
    let (ret, dec) = if ok {
        (0, decision::ALLOW)
    } else if audit {
        (0, decision::AUDIT)
    } else {
        (-EPERM, decision::DENY)
    };
    // Reported here whenever not ok, refused or (audit mode) not: the
    // syscall-exit audit, which in audit mode also reports successes for
    // userspace to judge, must not report it again.
    if !ok {
        mark_reported();
    }
    if !ok || st.flags & flags::EMIT_ALLOWED != 0 {
        emit(k, operation, dec, cg, st, |e| {
            e.errno = if ret != 0 { EPERM as u32 } else { 0 };
            e.protocol = fl;
            let mut n = len as u32;
            if n > 255 {
                n = 255;
            }
            if n > 0 {
                // SAFETY: copy from our map value into the event.
                unsafe {
                    generated::bpf_probe_read_kernel(
                        e.path.as_mut_ptr().cast(),
                        n,
                        s.buf.as_ptr().cast(),
                    );
                }
            }
        });
    }
    ret
}

/// This refusal is reported here: the syscall-exit audit (audit.rs) must
/// not report it again. Marks the thread with the number of the syscall
/// in progress (`orig_rax` of its saved user registers).
#[inline(always)]
fn mark_reported() {
    // SAFETY: helpers on the current task; the register read is checked.
    let nr = unsafe {
        let regs =
            generated::bpf_task_pt_regs(generated::bpf_get_current_task_btf()) as *const pt_regs;
        bpf_probe_read_kernel(core::ptr::addr_of!((*regs).orig_rax)).unwrap_or(u64::MAX)
    };
    let _ = REPORTED.insert(bpf_get_current_pid_tgid(), nr, 0);
}

/// Judge `dir` [/ `dentry`'s name] for `acc`.
#[inline(always)]
fn judge(dir: *const u8, dentry: *const u8, acc: usize, k: u32, operation: u32, fl: u32) -> i32 {
    let w = What { k, operation, fl };
    let Some((cg, st)) = current_instance() else {
        return 0;
    };
    let Some(p) = SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch, not shared while this program runs.
    let s = unsafe { &mut *p };
    let name = if dentry.is_null() {
        core::ptr::null()
    } else {
        let n = dentry_name(dentry);
        if n.is_null() {
            return verdict(s, cg, &st, false, w, 0);
        }
        n
    };
    let Some(len) = build_path(s, dir, name) else {
        return verdict(s, cg, &st, false, w, 0);
    };
    let ok = allowed(s, &st, len, acc);
    verdict(s, cg, &st, ok, w, len)
}

#[lsm(hook = "file_open")]
pub fn mw_file_open(ctx: LsmContext) -> i32 {
    if current_instance().is_none() {
        return 0;
    }
    // file_open(struct file *file).
    let file: *const u8 = ctx.arg(0);
    let (off_path, off_mode, off_flags) = (
        global(&MW_OFF_FILE_F_PATH),
        global(&MW_OFF_FILE_F_MODE),
        global(&MW_OFF_FILE_F_FLAGS),
    );
    if off_path == 0 || off_mode == 0 || off_flags == 0 {
        return -EPERM;
    }
    // SAFETY: checked kernel reads at BTF offsets.
    let mode = unsafe { bpf_probe_read_kernel(file.wrapping_add(off_mode as usize) as *const u32) }
        .unwrap_or(0);
    // SAFETY: as above.
    let fl = unsafe { bpf_probe_read_kernel(file.wrapping_add(off_flags as usize) as *const u32) }
        .unwrap_or(0);
    let path = file.wrapping_add(off_path as usize);
    // Exec opens (FMODE_EXEC: the binary and its ELF interpreter) need
    // `exec.allow` (the launched command and its interpreters always have
    // it); bprm_check_security judges the program run as well.
    if mode & FMODE_EXEC != 0 {
        return judge(
            path,
            core::ptr::null(),
            access::EXEC,
            kind::EXEC,
            op::EXEC,
            fl,
        );
    }
    if mode & FMODE_WRITE != 0 {
        let r = judge(
            path,
            core::ptr::null(),
            access::WRITE,
            kind::FILE,
            op::OPEN,
            fl,
        );
        if r != 0 {
            return r;
        }
    }
    if mode & FMODE_READ != 0 || mode & FMODE_WRITE == 0 {
        return judge(
            path,
            core::ptr::null(),
            access::READ,
            kind::FILE,
            op::OPEN,
            fl,
        );
    }
    0
}

macro_rules! dir_entry_hook {
    ($name:ident, $hook:literal, $op:expr) => {
        #[lsm(hook = $hook)]
        pub fn $name(ctx: LsmContext) -> i32 {
            // (const struct path *dir, struct dentry *dentry, ...)
            let (dir, dentry): (*const u8, *const u8) = (ctx.arg(0), ctx.arg(1));
            judge(dir, dentry, access::WRITE, kind::FILE, $op, 0)
        }
    };
}

dir_entry_hook!(mw_path_unlink, "path_unlink", op::UNLINK);
dir_entry_hook!(mw_path_rmdir, "path_rmdir", op::RMDIR);
dir_entry_hook!(mw_path_mkdir, "path_mkdir", op::MKDIR);
dir_entry_hook!(mw_path_symlink, "path_symlink", op::SYMLINK);

/// Both ends of a rename must be writable.
#[lsm(hook = "path_rename")]
pub fn mw_path_rename(ctx: LsmContext) -> i32 {
    // (old_dir, old_dentry, new_dir, new_dentry, flags)
    let (od, oe, nd, ne): (*const u8, *const u8, *const u8, *const u8) =
        (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    let r = judge(od, oe, access::WRITE, kind::FILE, op::RENAME, 0);
    if r != 0 {
        return r;
    }
    judge(nd, ne, access::WRITE, kind::FILE, op::RENAME, 0)
}

/// The new name must be writable. (The source is named by a dentry with no
/// mount here, so it cannot be turned into a path: see docs.)
#[lsm(hook = "path_link")]
pub fn mw_path_link(ctx: LsmContext) -> i32 {
    // (struct dentry *old_dentry, const struct path *new_dir,
    // struct dentry *new_dentry)
    let (nd, ne): (*const u8, *const u8) = (ctx.arg(1), ctx.arg(2));
    judge(nd, ne, access::WRITE, kind::FILE, op::LINK, 0)
}

macro_rules! path_hook {
    ($name:ident, $hook:literal, $op:expr) => {
        #[lsm(hook = $hook)]
        pub fn $name(ctx: LsmContext) -> i32 {
            // (const struct path *path, ...)
            let p: *const u8 = ctx.arg(0);
            judge(p, core::ptr::null(), access::WRITE, kind::FILE, $op, 0)
        }
    };
}

path_hook!(mw_path_truncate, "path_truncate", op::TRUNCATE);
path_hook!(mw_path_chmod, "path_chmod", op::CHMOD);
path_hook!(mw_path_chown, "path_chown", op::CHOWN);

/// Running a program (and each interpreter of a script): `exec.allow`.
#[lsm(hook = "bprm_check_security")]
pub fn mw_bprm_check(ctx: LsmContext) -> i32 {
    if current_instance().is_none() {
        return 0;
    }
    let (off_file, off_path) = (global(&MW_OFF_BPRM_FILE), global(&MW_OFF_FILE_F_PATH));
    if off_file == 0 || off_path == 0 {
        return -EPERM;
    }
    // bprm_check_security(struct linux_binprm *bprm)
    let bprm: *const u8 = ctx.arg(0);
    // SAFETY: bprm->file, a load the verifier checks against BTF (a
    // trusted field of linux_binprm).
    let file: *const u8 = unsafe { *(bprm.wrapping_add(off_file as usize) as *const *const u8) };
    if file.is_null() {
        return -EPERM;
    }
    judge(
        file.wrapping_add(off_path as usize),
        core::ptr::null(),
        access::EXEC,
        kind::EXEC,
        op::EXEC,
        0,
    )
}

/// cgroup id of `task` (its default-hierarchy cgroup's kernfs id).
#[inline(always)]
fn task_cgroup_id(task: *const u8) -> Option<u64> {
    let offs = [
        global(&MW_OFF_TASK_CGROUPS),
        global(&MW_OFF_CSS_SET_DFL_CGRP),
        global(&MW_OFF_CGROUP_KN),
        global(&MW_OFF_KERNFS_NODE_ID),
    ];
    if offs[0] == 0 || offs[1] == 0 {
        return None;
    }
    // SAFETY: checked kernel reads along BTF offsets.
    unsafe {
        let css: u64 =
            bpf_probe_read_kernel(task.wrapping_add(offs[0] as usize) as *const u64).ok()?;
        let cgrp: u64 =
            bpf_probe_read_kernel((css as *const u8).wrapping_add(offs[1] as usize) as *const u64)
                .ok()?;
        let kn: u64 =
            bpf_probe_read_kernel((cgrp as *const u8).wrapping_add(offs[2] as usize) as *const u64)
                .ok()?;
        bpf_probe_read_kernel((kn as *const u8).wrapping_add(offs[3] as usize) as *const u64).ok()
    }
}

/// A confined task may not trace, or read /proc/PID/{mem,environ,...} of,
/// a process outside its own instance cgroup.
#[lsm(hook = "ptrace_access_check")]
pub fn mw_ptrace_check(ctx: LsmContext) -> i32 {
    let Some((cg, st)) = current_instance() else {
        return 0;
    };
    // ptrace_access_check(struct task_struct *child, unsigned int mode)
    let child: *const u8 = ctx.arg(0);
    let ok = task_cgroup_id(child) == Some(cg);
    if ok {
        return 0;
    }
    let audit = st.flags & flags::AUDIT != 0;
    let ret = if audit { 0 } else { -EPERM };
    // Reported here, refused or (audit mode) not.
    mark_reported();
    let off_tgid = global(&MW_OFF_TASK_TGID);
    // SAFETY: checked kernel read.
    let tgid =
        unsafe { bpf_probe_read_kernel(child.wrapping_add(off_tgid as usize) as *const u32) }
            .unwrap_or(0);
    let dec = if audit {
        decision::AUDIT
    } else {
        decision::DENY
    };
    emit(kind::PROC, op::PTRACE, dec, cg, &st, |e| {
        e.errno = if ret != 0 { EPERM as u32 } else { 0 };
        e.port = tgid;
    });
    ret
}
