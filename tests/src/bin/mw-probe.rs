//! mw-probe: the confined process of the end-to-end tests. Each subcommand
//! performs one real operation and prints one line: `ok` or `errno=N`
//! (the raw errno the kernel returned). Nothing is mocked: the tests run this
//! under `mcp-warden run` and compare the line and the audit event.
use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn report(r: Result<(), i32>) -> String {
    match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("errno={e}"),
    }
}

/// sockaddr storage for v4/v6.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

fn family(addr: &SocketAddr) -> i32 {
    match addr.ip() {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    }
}

fn socket(domain: i32, ty: i32, proto: i32) -> Result<OwnedFd, i32> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a fresh, owned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect(ty: i32, addr: SocketAddr) -> Result<(), i32> {
    let s = socket(family(&addr), ty, 0)?;
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and sockaddr.
    let r = unsafe { libc::connect(s.as_raw_fd(), &ss as *const _ as *const libc::sockaddr, len) };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

fn sendto(addr: SocketAddr) -> Result<(), i32> {
    let s = socket(family(&addr), libc::SOCK_DGRAM, 0)?;
    let (ss, len) = sockaddr(addr);
    let msg = b"mw-probe";
    // SAFETY: valid fd, buffer and sockaddr.
    let r = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

fn bind(ty: i32, addr: SocketAddr) -> Result<(), i32> {
    let s = socket(family(&addr), ty, 0)?;
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid fd and sockaddr.
    let r = unsafe { libc::bind(s.as_raw_fd(), &ss as *const _ as *const libc::sockaddr, len) };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

fn uring_connect(addr: SocketAddr, sqpoll: bool) -> Result<(), i32> {
    let mut b = io_uring::IoUring::builder();
    if sqpoll {
        b.setup_sqpoll(1000);
    }
    let mut ring = b.build(8).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let s = socket(family(&addr), libc::SOCK_STREAM, 0)?;
    let (ss, len) = sockaddr(addr);
    let e = io_uring::opcode::Connect::new(
        io_uring::types::Fd(s.as_raw_fd()),
        &ss as *const _ as *const libc::sockaddr,
        len,
    )
    .build()
    .user_data(7);
    // SAFETY: ss and s outlive the submission (we wait for completion).
    unsafe { ring.submission().push(&e) }.map_err(|_| -1)?;
    ring.submit_and_wait(1)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let cqe: io_uring::cqueue::Entry = ring.completion().next().ok_or(-1)?;
    if cqe.result() < 0 {
        return Err(-cqe.result());
    }
    Ok(())
}

/// sockaddr_un for `path` (`@name`: abstract) and its length.
fn sockaddr_un(path: &str) -> Result<(libc::sockaddr_un, u32), i32> {
    // SAFETY: zeroed sockaddr_un is valid.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as u16;
    let (bytes, abstract_) = match path.strip_prefix('@') {
        Some(rest) => (rest.as_bytes(), true),
        None => (path.as_bytes(), false),
    };
    let off = usize::from(abstract_);
    // A pathname may fill all 108 bytes (no NUL); an abstract name 107.
    if bytes.len() + off > sun.sun_path.len() {
        return Err(libc::ENAMETOOLONG);
    }
    for (i, b) in bytes.iter().enumerate() {
        sun.sun_path[i + off] = *b as libc::c_char;
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = if abstract_ {
        base + 1 + bytes.len()
    } else {
        (base + bytes.len() + 1).min(std::mem::size_of::<libc::sockaddr_un>())
    };
    Ok((sun, len as u32))
}

fn unix_connect_type(ty: i32, path: &str) -> Result<(), i32> {
    let s = socket(libc::AF_UNIX, ty, 0)?;
    let (sun, len) = sockaddr_un(path)?;
    // SAFETY: valid fd and sockaddr.
    let r = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &sun as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

fn unix_connect(path: &str) -> Result<(), i32> {
    unix_connect_type(libc::SOCK_STREAM, path)
}

/// sendto on an unconnected unix dgram socket.
fn unix_sendto(path: &str) -> Result<(), i32> {
    let s = socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0)?;
    let (sun, len) = sockaddr_un(path)?;
    let msg = b"mw-probe";
    // SAFETY: valid fd, buffer and sockaddr.
    let r = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            &sun as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(())
}

fn uring_unix_connect(path: &str) -> Result<(), i32> {
    let mut ring = io_uring::IoUring::new(8).map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let s = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
    let (sun, len) = sockaddr_un(path)?;
    let e = io_uring::opcode::Connect::new(
        io_uring::types::Fd(s.as_raw_fd()),
        &sun as *const _ as *const libc::sockaddr,
        len,
    )
    .build()
    .user_data(7);
    // SAFETY: sun and s outlive the submission (we wait for completion).
    unsafe { ring.submission().push(&e) }.map_err(|_| -1)?;
    ring.submit_and_wait(1)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))?;
    let cqe: io_uring::cqueue::Entry = ring.completion().next().ok_or(-1)?;
    if cqe.result() < 0 {
        return Err(-cqe.result());
    }
    Ok(())
}

fn io(r: std::io::Result<()>) -> Result<(), i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn open_with(path: &str, write: bool, create: bool) -> Result<(), i32> {
    io(std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .create(create)
        .truncate(false)
        .open(path)
        .map(drop))
}

/// fork + exec `path` (argv[0] = path), report the exec's own errno, or
/// ok when the program ran (whatever its exit status).
fn exec_op(path: &str) -> Result<(), i32> {
    let c = std::ffi::CString::new(path).map_err(|_| libc::EINVAL)?;
    let mut fds = [0; 2];
    // SAFETY: plain syscalls; the child only execs or reports and _exits.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(errno());
        }
        match libc::fork() {
            -1 => Err(errno()),
            0 => {
                let argv = [c.as_ptr(), std::ptr::null()];
                let envp: [*const libc::c_char; 1] = [std::ptr::null()];
                libc::execve(c.as_ptr(), argv.as_ptr(), envp.as_ptr());
                let e = errno();
                libc::write(fds[1], (&e as *const i32).cast(), 4);
                libc::_exit(127);
            }
            pid => {
                libc::close(fds[1]);
                let mut e = 0i32;
                let n = libc::read(fds[0], (&mut e as *mut i32).cast(), 4);
                libc::close(fds[0]);
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
                if n == 4 {
                    Err(e)
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn run_op(args: &[String]) -> String {
    let a = |i: usize| args.get(i).cloned().unwrap_or_default();
    let addr = |i: usize| -> Result<SocketAddr, i32> { a(i).parse().map_err(|_| libc::EINVAL) };
    let r = match a(0).as_str() {
        "tcp-connect" => addr(1).and_then(|x| connect(libc::SOCK_STREAM, x)),
        "udp-connect" => addr(1).and_then(|x| connect(libc::SOCK_DGRAM, x)),
        "udp-sendto" => addr(1).and_then(sendto),
        "tcp-bind" => addr(1).and_then(|x| bind(libc::SOCK_STREAM, x)),
        "udp-bind" => addr(1).and_then(|x| bind(libc::SOCK_DGRAM, x)),
        "uring-connect" => addr(1).and_then(|x| uring_connect(x, false)),
        "uring-connect-sqpoll" => addr(1).and_then(|x| uring_connect(x, true)),
        "raw-socket" => socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP).map(drop),
        "raw6-socket" => socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6).map(drop),
        "packet-socket" => socket(libc::AF_PACKET, libc::SOCK_RAW, 0).map(drop),
        "unix-connect" => unix_connect(&a(1)),
        "unix-dgram-connect" => unix_connect_type(libc::SOCK_DGRAM, &a(1)),
        "unix-seqpacket-connect" => unix_connect_type(libc::SOCK_SEQPACKET, &a(1)),
        "unix-sendto" => unix_sendto(&a(1)),
        "uring-unix-connect" => uring_unix_connect(&a(1)),
        "fork" => return fork_op(&args[1..]),
        "wait-stdin" => {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
            Ok(())
        }
        "exit" => std::process::exit(a(1).parse().unwrap_or(1)),
        "read" => open_with(&a(1), false, false),
        "write" => open_with(&a(1), true, false),
        "create" => open_with(&a(1), true, true),
        "unlink" => io(std::fs::remove_file(a(1))),
        "mkdir" => io(std::fs::create_dir(a(1))),
        "rmdir" => io(std::fs::remove_dir(a(1))),
        "rename" => io(std::fs::rename(a(1), a(2))),
        "symlink" => io(std::os::unix::fs::symlink(a(1), a(2))),
        "hardlink" => io(std::fs::hard_link(a(1), a(2))),
        "truncate" => io(std::fs::OpenOptions::new()
            .write(true)
            .open(a(1))
            .and_then(|f| f.set_len(0))),
        "chmod" => io(std::fs::set_permissions(
            a(1),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )),
        "exec" => exec_op(&a(1)),
        "list" => io(std::fs::read_dir(a(1)).map(drop)),
        "daemonize" => return daemonize_op(&a(1), &args[2..]),
        other => return format!("unknown-op={other}"),
    };
    report(r)
}

/// Run `op` in a forked child and return its line.
fn fork_op(op: &[String]) -> String {
    let mut fds = [0; 2];
    // SAFETY: plain syscalls; the child only runs run_op and _exit.
    unsafe {
        if libc::pipe(fds.as_mut_ptr()) != 0 {
            return format!("errno={}", errno());
        }
        match libc::fork() {
            -1 => format!("errno={}", errno()),
            0 => {
                let line = run_op(op);
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

/// Double fork + setsid: the grandchild (a daemon, reparented away from
/// us) runs `op` and writes its line to `file`; we wait for the file.
fn daemonize_op(file: &str, op: &[String]) -> String {
    // SAFETY: plain syscalls in a single-threaded process.
    unsafe {
        match libc::fork() {
            -1 => return format!("errno={}", errno()),
            0 => {
                libc::setsid();
                if libc::fork() == 0 {
                    let line = format!(
                        "{} pid={} ppid={}",
                        run_op(op),
                        libc::getpid(),
                        libc::getppid()
                    );
                    let tmp = format!("{file}.tmp");
                    if std::fs::write(&tmp, line).is_ok() {
                        let _ = std::fs::rename(&tmp, file);
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(file) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    "timeout".to_string()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Several ops: `op1 args ; op2 args`, one line each, written as each
    // op finishes (a test can watch a long-running probe step by step).
    let mut stdout = std::io::stdout();
    for op in args.split(|a| a == ";") {
        let mut line = run_op(op);
        line.push('\n');
        let _ = stdout.write_all(line.as_bytes());
        let _ = stdout.flush();
    }
}
