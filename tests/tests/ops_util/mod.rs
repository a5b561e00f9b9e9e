//! Helpers of the ops suites (tests/tests/ops_*.rs): the tools they need,
//! children that die with the test, the repository's packaging/ files.
#![allow(dead_code)] // each suite uses a part

pub mod deb;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    time::{Duration, Instant},
};

/// The repository root (tests/ is one level down).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn packaging(rel: &str) -> PathBuf {
    repo_root().join("packaging").join(rel)
}

/// The absolute path of `tool` in PATH. A missing tool fails the test with
/// what to install; it never skips.
pub fn require_tool(tool: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if let Ok(md) = std::fs::metadata(&p) {
            use std::os::unix::fs::PermissionsExt;
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return p;
            }
        }
    }
    panic!("`{tool}` is not installed (not in PATH): {install}; `cargo xtask setup` installs it");
}

/// Run a command to completion; panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process ended and reaped on drop: SIGTERM first (so
/// `mcp-warden run` tears its instance down and Prometheus closes its
/// database), SIGKILL after 5 s.
pub struct Reaped(pub Option<Child>, pub &'static str);

impl Reaped {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child still owned")
    }

    /// Wait up to `limit` for the child to exit by itself.
    pub fn wait_for_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child().try_wait().expect("try_wait") {
                self.0 = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?}",
                self.1
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let Some(mut c) = self.0.take() else { return };
        if let Ok(pid) = i32::try_from(c.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A plain HTTP/1.0 GET against a loopback test server: (status, body).
/// None when nothing answers (yet).
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> Option<(u16, String)> {
    assert!(addr.ip().is_loopback(), "tests talk to loopback only");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Percent-encode a query value (RFC 3986 unreserved kept).
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Poll `f` every 200 ms until it returns Some, for at most `limit`;
/// panics with `what` and the last state `f` reported otherwise.
pub fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut(&mut String) -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    loop {
        if let Some(v) = f(&mut last) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}; last seen: {last}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
