//! Operations of the adversarial suite (tests/tests/adversarial.rs): the
//! known ways around a confinement, each performed for real. Same output
//! convention as the rest of mw-probe: `ok` or `errno=N`, plus details.
use std::{
    ffi::CString,
    io::{BufRead, Write},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use super::{errno, family, report, run_op, sockaddr, socket};

fn cstr(s: &str) -> Result<CString, i32> {
    CString::new(s).map_err(|_| libc::EINVAL)
}

fn open(path: &str, flags: i32) -> Result<OwnedFd, i32> {
    let p = cstr(path)?;
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// io_uring openat (read-only) of `path`, inline or through the SQPOLL thread.
fn uring_open(path: &str, sqpoll: bool) -> Result<(), i32> {
    let mut b = io_uring::IoUring::builder();
    if sqpoll {
        b.setup_sqpoll(1000);
    }
    let mut ring = b.build(8).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let p = cstr(path)?;
    let e = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), p.as_ptr())
        .flags(libc::O_RDONLY | libc::O_CLOEXEC)
        .build()
        .user_data(1);
    // SAFETY: `p` outlives the submission (we wait for its completion).
    unsafe { ring.submission().push(&e) }.map_err(|_| -1)?;
    ring.submit_and_wait(1)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let cqe: io_uring::cqueue::Entry = ring.completion().next().ok_or(-1)?;
    if cqe.result() < 0 {
        return Err(-cqe.result());
    }
    // SAFETY: a successful openat CQE carries a new descriptor.
    drop(unsafe { OwnedFd::from_raw_fd(cqe.result()) });
    Ok(())
}

fn symlink(target: &str, link: &str) -> Result<(), i32> {
    std::os::unix::fs::symlink(target, link).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn hardlink(src: &str, dst: &str) -> Result<(), i32> {
    std::fs::hard_link(src, dst).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Send `fd` over a unix socket with SCM_RIGHTS.
fn send_fd(sock: i32, fd: i32) -> Result<(), i32> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE of a constant size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr with valid buffers; the cmsg macros stay within cbuf.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
        if libc::sendmsg(sock, &msg, 0) < 0 {
            return Err(errno());
        }
    }
    Ok(())
}

/// Receive one descriptor sent by [`send_fd`].
fn recv_fd(sock: i32) -> Result<i32, i32> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: as in send_fd.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr with valid buffers; the cmsg is checked before use.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        if libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) < 0 {
            return Err(errno());
        }
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() || (*c).cmsg_type != libc::SCM_RIGHTS {
            return Err(libc::EBADMSG);
        }
        Ok(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>()))
    }
}

/// Open `path` with `open_flags`, pass the descriptor over a socketpair to
/// a forked child, which re-opens it through /proc/self/fd/N with
/// `reopen_flags`. The child's result is ours.
fn fdpass_reopen(path: &str, open_flags: i32, reopen_flags: i32) -> Result<(), i32> {
    let fd = open(path, open_flags)?;
    let mut sv = [0; 2];
    // SAFETY: plain syscall with a valid array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) } != 0 {
        return Err(errno());
    }
    // SAFETY: single-threaded; the child only makes syscalls and _exits.
    unsafe {
        match libc::fork() {
            -1 => Err(errno()),
            0 => {
                libc::close(sv[0]);
                let code = match recv_fd(sv[1]) {
                    Ok(got) => match open(&format!("/proc/self/fd/{got}"), reopen_flags) {
                        Ok(_) => 0,
                        Err(e) => e,
                    },
                    Err(e) => e,
                };
                libc::_exit(code);
            }
            pid => {
                libc::close(sv[1]);
                let sent = send_fd(sv[0], fd.as_raw_fd());
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
                libc::close(sv[0]);
                sent?;
                match libc::WEXITSTATUS(st) {
                    0 => Ok(()),
                    e => Err(e),
                }
            }
        }
    }
}

/// Re-open our own descriptor of `path` (opened with `open_flags`) through
/// /proc/self/fd with `reopen_flags`.
fn reopen(path: &str, open_flags: i32, reopen_flags: i32) -> Result<(), i32> {
    let fd = open(path, open_flags)?;
    open(&format!("/proc/self/fd/{}", fd.as_raw_fd()), reopen_flags).map(drop)
}

/// TCP Fast Open: sendto(MSG_FASTOPEN) on an unconnected TCP socket
/// connects and sends in one call.
fn tfo_sendto(addr: SocketAddr) -> Result<(), i32> {
    let s = socket(family(&addr), libc::SOCK_STREAM, 0)?;
    let (ss, len) = sockaddr(addr);
    let msg = b"mw-probe";
    // SAFETY: valid fd, buffer and sockaddr.
    let r = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_FASTOPEN,
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

/// Copy our own executable into a memfd and run it from there
/// (`mw-probe exit 42`) in a child. `ok` when it ran (exit 42).
fn memfd_exec() -> Result<(), i32> {
    let name = cstr("mw-probe-memfd")?;
    // SAFETY: valid C string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fresh descriptor we own.
    let mfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let image = std::fs::read("/proc/self/exe").map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let mut f = std::fs::File::from(mfd);
    f.write_all(&image)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let argv0 = cstr("mw-probe")?;
    let a1 = cstr("exit")?;
    let a2 = cstr("42")?;
    let argv = [argv0.as_ptr(), a1.as_ptr(), a2.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: single-threaded; the child only execs or _exits.
    unsafe {
        match libc::fork() {
            -1 => Err(errno()),
            0 => {
                libc::fexecve(f.as_raw_fd(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(100 + errno());
            }
            pid => {
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
                match libc::WEXITSTATUS(st) {
                    42 => Ok(()),
                    c if c > 100 => Err(c - 100),
                    c => Err(1000 + c),
                }
            }
        }
    }
}

/// `op` in a forked child, plus the child's pid: "<result> pid=N".
fn fork_with_pid(op: &[String]) -> String {
    let mut fds = [0; 2];
    // SAFETY: single-threaded; the child runs one op and _exits.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return format!("errno={}", errno());
        }
        match libc::fork() {
            -1 => format!("errno={}", errno()),
            0 => {
                let line = format!("{} pid={}", run_op(op), libc::getpid());
                libc::write(fds[1], line.as_ptr().cast(), line.len());
                libc::_exit(0);
            }
            pid => {
                libc::close(fds[1]);
                let mut f = std::fs::File::from_raw_fd(fds[0]);
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut f, &mut s);
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
                s
            }
        }
    }
}

/// PID reuse: for every line read on stdin, fork a child; the child whose
/// pid is `target` (or the pid the line names) runs `op` and reports `hit <result> pid=N`; the others
/// report `miss pid=N`. Each line is written (and flushed) as it happens,
/// so the test can steer the kernel's next pid between attempts. Stops at
/// the first hit or at end of input.
fn pid_reuse(target: i32, op: &[String]) -> String {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else {
            break;
        };
        // A line may name the target pid (so the test can warm us up first).
        let target = line.trim().parse().unwrap_or(target);
        let mut fds = [0; 2];
        // SAFETY: single-threaded here; the child runs one op and _exits.
        let reply = unsafe {
            if libc::pipe(fds.as_mut_ptr()) != 0 {
                return format!("errno={}", errno());
            }
            match libc::fork() {
                -1 => format!("errno={}", errno()),
                0 => {
                    let me = libc::getpid();
                    let line = if me == target {
                        format!("hit {} pid={me}", run_op(op))
                    } else {
                        format!("miss pid={me}")
                    };
                    libc::write(fds[1], line.as_ptr().cast(), line.len());
                    libc::_exit(0);
                }
                pid => {
                    libc::close(fds[1]);
                    let mut f = std::fs::File::from_raw_fd(fds[0]);
                    let mut s = String::new();
                    let _ = std::io::Read::read_to_string(&mut f, &mut s);
                    let mut st = 0;
                    libc::waitpid(pid, &mut st, 0);
                    s
                }
            }
        };
        let hit = reply.starts_with("hit");
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
        if hit {
            break;
        }
    }
    "done".to_string()
}

/// `n` short-lived processes (each one exit event) forked by two threads,
/// with `op` run once, halfway through, from the main thread. Prints
/// "<op result> forks=N".
fn flood(n: u32, op: &[String]) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let done = Arc::new(AtomicU32::new(0));
    let tried = Arc::new(AtomicU32::new(0));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let done = done.clone();
            let tried = tried.clone();
            let share = n / 2 + if w == 0 { n % 2 } else { 0 };
            std::thread::spawn(move || {
                for _ in 0..share {
                    tried.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: the child only calls _exit (async-signal-safe).
                    unsafe {
                        match libc::fork() {
                            0 => libc::_exit(0),
                            -1 => {}
                            pid => {
                                let mut st = 0;
                                libc::waitpid(pid, &mut st, 0);
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    while tried.load(Ordering::Relaxed) < n / 2 {
        std::thread::yield_now();
    }
    let line = run_op(op);
    for w in workers {
        let _ = w.join();
    }
    format!("{line} forks={}", done.load(Ordering::Relaxed))
}

/// Daemonize a grandchild that tries `tcp-connect addr` every 20 ms forever,
/// appending `<unix ms> <result>` lines to `file`; then generate denied UDP
/// connects to `flood_addr` in a loop, forever (until killed).
fn daemon_and_flood(file: &str, addr: &str, flood_addr: SocketAddr) -> String {
    // SAFETY: single-threaded; children run plain code and never return.
    unsafe {
        match libc::fork() {
            -1 => return format!("errno={}", errno()),
            0 => {
                libc::setsid();
                if libc::fork() == 0 {
                    let op = vec!["tcp-connect".to_string(), addr.to_string()];
                    loop {
                        let r = run_op(&op);
                        let ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis())
                            .unwrap_or(0);
                        if let Ok(mut f) = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(file)
                        {
                            let _ = writeln!(f, "{ms} {r}");
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
                libc::_exit(0);
            }
            pid => {
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
            }
        }
    }
    let _ = writeln!(std::io::stdout(), "flooding");
    let _ = std::io::stdout().flush();
    loop {
        let _ = report(super::connect(libc::SOCK_DGRAM, flood_addr));
    }
}

/// The child started by `spawn-child` (0: none).
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Fork a child that waits to be killed; "pid=N".
fn spawn_child() -> String {
    // SAFETY: the child only pauses until killed.
    match unsafe { libc::fork() } {
        -1 => format!("errno={}", errno()),
        0 => loop {
            // SAFETY: plain syscall.
            unsafe { libc::pause() };
        },
        pid => {
            CHILD.store(pid, std::sync::atomic::Ordering::Relaxed);
            format!("pid={pid}")
        }
    }
}

/// Read the child's /proc/PID/environ (a PTRACE_MODE_READ check).
fn child_environ() -> Result<(), i32> {
    let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(drop)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Open the child's /proc/PID/mem (a PTRACE_MODE_ATTACH check; ptrace(2)
/// itself is refused by the launcher's seccomp filter on both backends).
fn child_mem() -> Result<(), i32> {
    let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    open(&format!("/proc/{pid}/mem"), libc::O_RDONLY).map(drop)
}

/// The adversarial ops; `None` when `args[0]` is not one of them.
pub fn run(args: &[String]) -> Option<String> {
    let a = |i: usize| args.get(i).cloned().unwrap_or_default();
    let rest = |i: usize| args.get(i..).unwrap_or(&[]).to_vec();
    let r = match a(0).as_str() {
        "open-read" => open(&a(1), libc::O_RDONLY).map(drop),
        "open-write" => open(&a(1), libc::O_WRONLY).map(drop),
        "uring-open" => uring_open(&a(1), false),
        "uring-open-sqpoll" => uring_open(&a(1), true),
        "symlink" => symlink(&a(1), &a(2)),
        "hardlink" => hardlink(&a(1), &a(2)),
        "reopen-write" => reopen(&a(1), libc::O_RDONLY, libc::O_WRONLY),
        "opath-reopen-read" => reopen(&a(1), libc::O_PATH, libc::O_RDONLY),
        "fdpass-reopen-write" => fdpass_reopen(&a(1), libc::O_RDONLY, libc::O_WRONLY),
        "fdpass-opath-read" => fdpass_reopen(&a(1), libc::O_PATH, libc::O_RDONLY),
        "tfo-sendto" => match a(1).parse() {
            Ok(x) => tfo_sendto(x),
            Err(_) => Err(libc::EINVAL),
        },
        "memfd-exec" => memfd_exec(),
        "spawn-child" => return Some(spawn_child()),
        "child-environ" => child_environ(),
        "child-mem" => child_mem(),
        "fork-pid" => return Some(fork_with_pid(&rest(1))),
        "pid-reuse" => return Some(pid_reuse(a(1).parse().unwrap_or(-1), &rest(2))),
        "flood" => return Some(flood(a(1).parse().unwrap_or(0), &rest(2))),
        "daemon-and-flood" => match a(3).parse() {
            Ok(x) => return Some(daemon_and_flood(&a(1), &a(2), x)),
            Err(_) => Err(libc::EINVAL),
        },
        _ => return None,
    };
    Some(report(r))
}
