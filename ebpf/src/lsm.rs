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
    access, decision, flags, kind, op, FileKey, FileRule, InstanceState, FILE_KEY_FIXED_BITS,
    FILE_PATH_MAX,
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
/// dentry.d_name + qstr.len.
#[unsafe(no_mangle)]
static MW_OFF_DENTRY_NAME_LEN: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_DENTRY_PARENT: u32 = 0;
/// path.mnt and vfsmount.mnt_root (0 on every kernel seen, but read).
#[unsafe(no_mangle)]
static MW_OFF_PATH_MNT: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_PATH_DENTRY: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_VFSMOUNT_MNT_ROOT: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_TASK_FS: u32 = 0;
#[unsafe(no_mangle)]
static MW_OFF_FS_STRUCT_ROOT: u32 = 0;
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
    // A tool that declared `readOnlyHint: true` changes nothing on disk.
    if acc == access::WRITE && st.flags & flags::READ_ONLY != 0 && !pseudo_fs(s) {
        return false;
    }
    if !set_key(s, st, len) {
        return false;
    }
    match FILE_RULES.get(&s.key) {
        Some(rule) => rule.allows(acc, st.active_mask),
        None => false,
    }
}

/// /proc/... or /dev/... other than /dev/shm/...: device nodes and kernel
/// interfaces, not files a read-only tool could change (`/dev/null`,
/// `/dev/tty`, `/proc/self/...`).
#[inline(always)]
fn pseudo_fs(s: &Scratch) -> bool {
    let b = &s.buf;
    let proc = b[1] == b'p' && b[2] == b'r' && b[3] == b'o' && b[4] == b'c' && b[5] == b'/';
    let dev = b[1] == b'd' && b[2] == b'e' && b[3] == b'v' && b[4] == b'/';
    let shm = b[5] == b's' && b[6] == b'h' && b[7] == b'm' && b[8] == b'/';
    proc || (dev && !shm)
}

/// The lookup key for the first `len` bytes of the scratch path (at most
/// [`FILE_PATH_MAX`] of them); false if it cannot be made.
#[inline(always)]
fn set_key(s: &mut Scratch, st: &InstanceState, len: usize) -> bool {
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
    r == 0
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

/// A hard link: the new name must be writable, and the link may give the
/// file no right its existing name lacks (read, write or exec; `deny`
/// counts for all three), as Landlock's `refer` rule: a file the server
/// may not read cannot get a readable or writable second name.
///
/// The existing file is named only by a dentry here (no mount), so
/// `bpf_d_path` cannot name it. Hard links never cross mounts: it lives on
/// `new_dir`'s mount. Its path is `new_dir`'s path up to the anchor both
/// share (the mount's root, or the task's root directory when that is on
/// this mount), then the old dentry's names from the anchor down, read by
/// walking `d_parent`. A walk deeper than [`LINK_DEPTH`], or ending on a
/// different anchor (a disconnected dentry), is refused: fail closed.
#[lsm(hook = "path_link")]
pub fn mw_path_link(ctx: LsmContext) -> i32 {
    // (struct dentry *old_dentry, const struct path *new_dir,
    // struct dentry *new_dentry)
    let (oe, nd, ne): (*const u8, *const u8, *const u8) = (ctx.arg(0), ctx.arg(1), ctx.arg(2));
    let Some((cg, st)) = current_instance() else {
        return 0;
    };
    let (Some(p), Some(wp)) = (SCRATCH.get_ptr_mut(0), WALK.get_ptr_mut(0)) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch, not shared while this program runs.
    let (s, w) = unsafe { (&mut *p, &mut *wp) };
    let what = What {
        k: kind::FILE,
        operation: op::LINK,
        fl: 0,
    };
    // The new name: `d_path(new_dir)/name`, which must be writable.
    let name = dentry_name(ne);
    if name.is_null() {
        return verdict(s, cg, &st, false, what, 0);
    }
    let Some(n) = build_path(s, nd, name) else {
        return verdict(s, cg, &st, false, what, 0);
    };
    let new_rights = if s.buf[0] == b'/' && set_key(s, &st, n) {
        rights(FILE_RULES.get(&s.key), st.active_mask)
    } else {
        0
    };
    let writable = new_rights & (1 << access::WRITE) != 0 && st.flags & flags::READ_ONLY == 0;
    // Refused (or, in audit mode, reported and judged further).
    if verdict(s, cg, &st, writable, what, n) != 0 {
        return -EPERM;
    }
    // Kept in memory, not in a register: the verifier would otherwise
    // carry each combination of bits through the walks below as its own
    // state (see [`Walk`]).
    // SAFETY: our own map value.
    unsafe { core::ptr::write_volatile(&mut w.new_rights, new_rights) };
    // The existing name, which must hold every right the new one has.
    let Some(len) = link_source_path(s, w, oe, nd) else {
        return verdict(s, cg, &st, false, what, 0);
    };
    let old_rights = if s.buf[0] == b'/' && set_key(s, &st, len) {
        rights(FILE_RULES.get(&s.key), st.active_mask)
    } else {
        0
    };
    // SAFETY: our own map value.
    let new_rights = unsafe { core::ptr::read_volatile(&w.new_rights) };
    if new_rights & !old_rights != 0 {
        return verdict(s, cg, &st, false, what, len);
    }
    0
}

/// The access kinds (bit per `access::*`) a rule grants under `mask`.
#[inline(always)]
fn rights(rule: Option<&FileRule>, mask: u64) -> u32 {
    let Some(r) = rule else {
        return 0;
    };
    let mut bits = 0;
    let mut acc = 0;
    while acc < access::COUNT {
        if r.allows(acc, mask) {
            bits |= 1 << acc;
        }
        acc += 1;
    }
    bits
}

/// How deep below its mount (or root) a hard link's source may be (a power
/// of two: indexes are masked with `LINK_DEPTH - 1`, which the verifier
/// can bound).
const LINK_DEPTH: usize = 64;

/// The names of a dentry's ancestors, for [`link_source_path`], and the
/// results of each loop. Those go through memory (volatile): a value the
/// verifier reads back from a map is an unknown scalar, so the states that
/// leave a bounded loop at different iterations become one; kept in
/// registers, each exit of one loop would be verified through every later
/// loop (tens of millions of instructions, over the verifier's limit).
#[repr(C)]
pub struct Walk {
    names: [u64; LINK_DEPTH],
    lens: [u32; LINK_DEPTH],
    anchor: u64,
    depth: u32,
    bytes: u32,
    len: u32,
    new_rights: u32,
}

#[map(name = "mw_fwalk")]
static WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// Read a pointer at `base + off`.
#[inline(always)]
fn read_ptr(base: *const u8, off: u32) -> Option<*const u8> {
    // SAFETY: checked kernel read.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const u64) }
        .ok()
        .map(|p| p as *const u8)
}

/// Where a walk up from a dentry stops: the mount's root, the task's root
/// directory (if on this mount), or a dentry that is its own parent.
struct Stops {
    mnt_root: *const u8,
    task_root: *const u8,
}

/// Walk from `d` up to its stop; the stop, the depth and the bytes of
/// `/name` per level go to `w.anchor`, `w.depth`, `w.bytes`, and the names
/// to `w.names`/`w.lens` when `record`. False when the walk fails or is
/// deeper than [`LINK_DEPTH`].
#[inline(always)]
fn walk_up(w: &mut Walk, stops: &Stops, mut d: *const u8, record: bool) -> bool {
    let (off_parent, off_name, off_len) = (
        global(&MW_OFF_DENTRY_PARENT),
        global(&MW_OFF_DENTRY_NAME),
        global(&MW_OFF_DENTRY_NAME_LEN),
    );
    let mut bytes = 0u32;
    let mut i = 0usize;
    while i < LINK_DEPTH + 1 {
        if d.is_null() {
            return false;
        }
        let Some(parent) = read_ptr(d, off_parent) else {
            return false;
        };
        if d == stops.mnt_root || d == stops.task_root || parent == d {
            // SAFETY: our own map value.
            unsafe {
                core::ptr::write_volatile(&mut w.anchor, d as u64);
                core::ptr::write_volatile(&mut w.depth, i as u32);
                core::ptr::write_volatile(&mut w.bytes, bytes);
            }
            return true;
        }
        if i >= LINK_DEPTH {
            // Too deep to name: the caller refuses.
            return false;
        }
        // SAFETY: checked kernel read of qstr.len.
        let Ok(n) =
            (unsafe { bpf_probe_read_kernel(d.wrapping_add(off_len as usize) as *const u32) })
        else {
            return false;
        };
        if n == 0 || n > 255 {
            return false;
        }
        if record {
            let Some(name) = read_ptr(d, off_name) else {
                return false;
            };
            let k = i & (LINK_DEPTH - 1);
            w.names[k] = name as u64;
            w.lens[k] = n;
        }
        bytes += 1 + n;
        d = parent;
        i += 1;
    }
    false
}

/// Build the path of a hard link's source `old` (a dentry on `new_dir`'s
/// mount) in the scratch buffer; its length, or None when it cannot be
/// named (the caller refuses). The buffer holds the first 256 bytes and
/// more; only the first 252 are looked up (the key), like every path.
#[inline(always)]
fn link_source_path(
    s: &mut Scratch,
    w: &mut Walk,
    old: *const u8,
    new_dir: *const u8,
) -> Option<usize> {
    let (off_mnt, off_dentry, off_mnt_root, off_fs, off_fs_root) = (
        global(&MW_OFF_PATH_MNT),
        global(&MW_OFF_PATH_DENTRY),
        global(&MW_OFF_VFSMOUNT_MNT_ROOT),
        global(&MW_OFF_TASK_FS),
        global(&MW_OFF_FS_STRUCT_ROOT),
    );
    if off_dentry == 0 || off_fs == 0 {
        return None;
    }
    let mnt = read_ptr(new_dir, off_mnt)?;
    let dir_dentry = read_ptr(new_dir, off_dentry)?;
    let mnt_root = read_ptr(mnt, off_mnt_root)?;
    // SAFETY: the current task, read through checked kernel reads.
    let task = unsafe { generated::bpf_get_current_task() } as *const u8;
    let fs = read_ptr(task, off_fs)?;
    let root = fs.wrapping_add(off_fs_root as usize);
    let root_mnt = read_ptr(root, off_mnt)?;
    let root_dentry = read_ptr(root, off_dentry)?;
    let stops = Stops {
        mnt_root,
        task_root: if root_mnt == mnt {
            root_dentry
        } else {
            core::ptr::null()
        },
    };
    if !walk_up(w, &stops, dir_dentry, false) {
        return None;
    }
    // SAFETY (all volatile reads here): our own map value.
    let (anchor_new, rel_new) = unsafe {
        (
            core::ptr::read_volatile(&w.anchor),
            core::ptr::read_volatile(&w.bytes) as usize,
        )
    };
    if !walk_up(w, &stops, old, true) {
        return None;
    }
    let (anchor_old, depth) = unsafe {
        (
            core::ptr::read_volatile(&w.anchor),
            core::ptr::read_volatile(&w.depth) as usize,
        )
    };
    if anchor_new != anchor_old || depth == 0 || depth > LINK_DEPTH {
        return None;
    }
    // new_dir's path minus its part below the anchor: the anchor's path.
    let buf = s.buf.as_mut_ptr();
    // SAFETY: `new_dir` is the hook's `struct path *`, tracked by BTF.
    let n = unsafe { generated::bpf_d_path(new_dir as *mut _, buf.cast(), 4096) };
    if n <= 0 {
        return None;
    }
    let dlen = (n as usize - 1) & 4095;
    if rel_new > dlen {
        return None;
    }
    let mut len = dlen - rel_new;
    if len == 1 && s.buf[0] == b'/' {
        len = 0;
    }
    // Then `/name` per level, from the anchor down, while the path is
    // shorter than the event's 255 bytes (the key holds 252).
    let mut j = 0usize;
    while j < LINK_DEPTH {
        if j >= depth || len >= 256 {
            break;
        }
        let i = (depth - 1 - j) & (LINK_DEPTH - 1);
        let at = len & 255;
        s.buf[at] = b'/';
        let m = (w.lens[i] & 255) as usize;
        // SAFETY: checked kernel read of at most 255 bytes into
        // buf[at + 1..at + 256], inside the buffer.
        let r = unsafe {
            generated::bpf_probe_read_kernel(
                buf.wrapping_add(at + 1).cast(),
                m as u32,
                w.names[i] as *const _,
            )
        };
        if r != 0 {
            return None;
        }
        len = at + 1 + m;
        j += 1;
    }
    // SAFETY: our own map value.
    unsafe { core::ptr::write_volatile(&mut w.len, len as u32) };
    let len = unsafe { core::ptr::read_volatile(&w.len) } as usize & 4095;
    if len == 0 {
        return None;
    }
    Some(len)
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
