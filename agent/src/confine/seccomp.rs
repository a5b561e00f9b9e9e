//! The seccomp half of the fallback backend: refuse (EPERM) the syscalls
//! Landlock has no right for, and the few that reach past the confinement.
//! Default action: allow. Compiled in the parent with seccompiler; installed
//! in the child with one raw `seccomp(SECCOMP_SET_MODE_FILTER)` call.
use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
    #[error("compiling the seccomp filter: {0}")]
    Build(#[from] seccompiler::Error),
    #[error("seccomp filter: architecture {0} is not supported")]
    Arch(&'static str),
}

/// One line of the filter, for the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SeccompLine {
    pub syscalls: Vec<&'static str>,
    /// Argument condition, if any ("domain == AF_PACKET").
    pub when: Option<&'static str>,
    pub action: &'static str,
    pub reason: &'static str,
}

/// A syscall we refuse unconditionally: (name, number, reason).
type Plain = (&'static str, i64, &'static str);

/// Obsolete packet-socket type; not in libc for glibc targets.
const SOCK_PACKET: u64 = 10;

const WHY_MODE: &str = "Landlock has no right for mode/owner changes";
const WHY_XATTR: &str = "Landlock has no right for extended attributes";
const WHY_KERNEL: &str = "loads code or programs into the kernel";
const WHY_TRACE: &str = "observes or alters other processes or the kernel";
const WHY_NS: &str = "mount and namespace changes reach outside the confined view";
const WHY_URING: &str = "io_uring ops (socket, xattr) bypass seccomp argument checks";

#[cfg(target_arch = "x86_64")]
fn plain_syscalls() -> Vec<Plain> {
    vec![
        // chmod/chown families: closes what Landlock cannot express, for all
        // paths at once (kernel-facts: no Landlock right covers them).
        ("chmod", libc::SYS_chmod, WHY_MODE),
        ("fchmod", libc::SYS_fchmod, WHY_MODE),
        ("fchmodat", libc::SYS_fchmodat, WHY_MODE),
        ("fchmodat2", 452, WHY_MODE),
        ("chown", libc::SYS_chown, WHY_MODE),
        ("fchown", libc::SYS_fchown, WHY_MODE),
        ("lchown", libc::SYS_lchown, WHY_MODE),
        ("fchownat", libc::SYS_fchownat, WHY_MODE),
        // xattrs carry ACLs and security labels.
        ("setxattr", libc::SYS_setxattr, WHY_XATTR),
        ("lsetxattr", libc::SYS_lsetxattr, WHY_XATTR),
        ("fsetxattr", libc::SYS_fsetxattr, WHY_XATTR),
        ("removexattr", libc::SYS_removexattr, WHY_XATTR),
        ("lremovexattr", libc::SYS_lremovexattr, WHY_XATTR),
        ("fremovexattr", libc::SYS_fremovexattr, WHY_XATTR),
        // Linux 6.13: the *at xattr calls (463 setxattrat, 466 removexattrat).
        ("setxattrat", 463, WHY_XATTR),
        ("removexattrat", 466, WHY_XATTR),
        ("bpf", libc::SYS_bpf, WHY_KERNEL),
        ("perf_event_open", libc::SYS_perf_event_open, WHY_TRACE),
        // Landlock already stops tracing outside the domain; refusing ptrace
        // inside it too costs an MCP server nothing (none debugs itself).
        ("ptrace", libc::SYS_ptrace, WHY_TRACE),
        ("kexec_load", libc::SYS_kexec_load, WHY_KERNEL),
        ("kexec_file_load", libc::SYS_kexec_file_load, WHY_KERNEL),
        ("init_module", libc::SYS_init_module, WHY_KERNEL),
        ("finit_module", libc::SYS_finit_module, WHY_KERNEL),
        ("delete_module", libc::SYS_delete_module, WHY_KERNEL),
        ("mount", libc::SYS_mount, WHY_NS),
        ("umount2", libc::SYS_umount2, WHY_NS),
        ("pivot_root", libc::SYS_pivot_root, WHY_NS),
        ("setns", libc::SYS_setns, WHY_NS),
        // All of unshare: a new user namespace hands out capabilities in it.
        ("unshare", libc::SYS_unshare, WHY_NS),
        ("io_uring_setup", libc::SYS_io_uring_setup, WHY_URING),
        ("io_uring_enter", libc::SYS_io_uring_enter, WHY_URING),
        ("io_uring_register", libc::SYS_io_uring_register, WHY_URING),
    ]
}

#[cfg(target_arch = "aarch64")]
fn plain_syscalls() -> Vec<Plain> {
    // aarch64 has only the *at forms of chmod/chown.
    vec![
        ("fchmod", libc::SYS_fchmod, WHY_MODE),
        ("fchmodat", libc::SYS_fchmodat, WHY_MODE),
        ("fchmodat2", 452, WHY_MODE),
        ("fchown", libc::SYS_fchown, WHY_MODE),
        ("fchownat", libc::SYS_fchownat, WHY_MODE),
        ("setxattr", libc::SYS_setxattr, WHY_XATTR),
        ("lsetxattr", libc::SYS_lsetxattr, WHY_XATTR),
        ("fsetxattr", libc::SYS_fsetxattr, WHY_XATTR),
        ("removexattr", libc::SYS_removexattr, WHY_XATTR),
        ("lremovexattr", libc::SYS_lremovexattr, WHY_XATTR),
        ("fremovexattr", libc::SYS_fremovexattr, WHY_XATTR),
        ("setxattrat", 463, WHY_XATTR),
        ("removexattrat", 466, WHY_XATTR),
        ("bpf", libc::SYS_bpf, WHY_KERNEL),
        ("perf_event_open", libc::SYS_perf_event_open, WHY_TRACE),
        ("ptrace", libc::SYS_ptrace, WHY_TRACE),
        ("kexec_load", libc::SYS_kexec_load, WHY_KERNEL),
        ("kexec_file_load", libc::SYS_kexec_file_load, WHY_KERNEL),
        ("init_module", libc::SYS_init_module, WHY_KERNEL),
        ("finit_module", libc::SYS_finit_module, WHY_KERNEL),
        ("delete_module", libc::SYS_delete_module, WHY_KERNEL),
        ("mount", libc::SYS_mount, WHY_NS),
        ("umount2", libc::SYS_umount2, WHY_NS),
        ("pivot_root", libc::SYS_pivot_root, WHY_NS),
        ("setns", libc::SYS_setns, WHY_NS),
        ("unshare", libc::SYS_unshare, WHY_NS),
        ("io_uring_setup", libc::SYS_io_uring_setup, WHY_URING),
        ("io_uring_enter", libc::SYS_io_uring_enter, WHY_URING),
        ("io_uring_register", libc::SYS_io_uring_register, WHY_URING),
    ]
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn plain_syscalls() -> Vec<Plain> {
    Vec::new()
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SeccompError::Arch(std::env::consts::ARCH))
    }
}

/// The compiled filter and its description.
#[derive(Debug)]
pub struct PreparedFilter {
    pub program: BpfProgram,
    pub lines: Vec<SeccompLine>,
}

/// Compile the filter for the running architecture.
pub fn prepare() -> Result<PreparedFilter, SeccompError> {
    prepare_for(false, false)
}

/// As [`prepare`], for the BPF-LSM backend: `lsm_opens` (its file_open,
/// exec and cgroup hooks see io_uring's operations too) leaves io_uring
/// allowed; `lsm_modes` (path_chmod / path_chown run) leaves chmod and
/// chown to those hooks.
pub fn prepare_for(lsm_opens: bool, lsm_modes: bool) -> Result<PreparedFilter, SeccompError> {
    let arch = target_arch()?;
    let plain: Vec<Plain> = plain_syscalls()
        .into_iter()
        .filter(|(_, _, why)| !(lsm_opens && *why == WHY_URING))
        .filter(|(_, _, why)| !(lsm_modes && *why == WHY_MODE))
        .collect();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut lines: Vec<SeccompLine> = Vec::new();
    for (name, nr, why) in &plain {
        rules.insert(*nr, Vec::new());
        match lines.iter_mut().find(|l| l.reason == *why) {
            Some(l) => l.syscalls.push(name),
            None => lines.push(SeccompLine {
                syscalls: vec![name],
                when: None,
                action: "EPERM",
                reason: why,
            }),
        }
    }

    // socket(): packet sockets (AF_PACKET = 17) and raw sockets of any family
    // (type & 0xf == SOCK_RAW = 3; the mask strips SOCK_NONBLOCK/CLOEXEC)
    // see and forge traffic past the eBPF cgroup hooks, which only see
    // AF_INET/AF_INET6 sockets (kernel-facts). Any of the rules matching
    // refuses the call.
    let socket_rules = vec![
        SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_PACKET as u64,
        )?])?,
        SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xf),
            libc::SOCK_RAW as u64,
        )?])?,
        // The obsolete SOCK_PACKET type (10) is a packet socket too.
        SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xf),
            SOCK_PACKET,
        )?])?,
    ];
    rules.insert(libc::SYS_socket, socket_rules);
    lines.push(SeccompLine {
        syscalls: vec!["socket"],
        when: Some("domain == AF_PACKET or type == SOCK_RAW or type == SOCK_PACKET"),
        action: "EPERM",
        reason: "packet and raw sockets bypass the eBPF cgroup socket hooks",
    });

    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let mut program: BpfProgram = filter.try_into()?;
    if matches!(arch, TargetArch::x86_64) {
        // seccompiler checks AUDIT_ARCH_X86_64 but not the x32 bit, which
        // shares that audit arch: a syscall number with bit 30 set would
        // reach the x32 table and miss every rule above. Refuse them all
        // (prepended; BPF jumps are relative, so the rest is unchanged).
        let mut guard = vec![
            // A = seccomp_data.nr
            sock_filter {
                code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                jt: 0,
                jf: 0,
                k: 0,
            },
            // if (A & 0x40000000) fall through to RET ERRNO, else skip it
            sock_filter {
                code: (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16,
                jt: 0,
                jf: 1,
                k: 0x4000_0000,
            },
            sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            },
        ];
        guard.append(&mut program);
        program = guard;
        lines.push(SeccompLine {
            syscalls: vec!["x32 ABI (nr | 0x40000000)"],
            when: None,
            action: "EPERM",
            reason: "the x32 syscall table would bypass the rules above",
        });
    }
    lines.push(SeccompLine {
        syscalls: vec!["any other architecture"],
        when: None,
        action: "kill process",
        reason: "i386 syscalls (int 0x80) use other numbers",
    });
    Ok(PreparedFilter { program, lines })
}

/// Install `program` on the calling thread. Async-signal-safe: no
/// allocation, one syscall. no_new_privs must already be set (or the
/// caller holds CAP_SYS_ADMIN).
///
/// # Safety
/// Meant for a `pre_exec` closure in a forked child.
pub unsafe fn install(program: &[sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        // seccompiler's sock_filter is #[repr(C)] with the kernel's layout.
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: the kernel copies the program; `prog` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0u32,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
