//! Unix socket egress, enforced in the kernel by the cgroup unix connect and
//! sendmsg hooks (loaded by the agent's own loader, kernel/raw.rs): real
//! listeners made here, a real confined process (mw-probe), the real errno
//! and the real audit event.
use std::os::{
    linux::net::SocketAddrExt,
    unix::net::{SocketAddr, UnixDatagram, UnixListener},
};
use std::path::Path;

use mcp_warden_tests::{assert_no_leftover_cgroups, base_read_rules, Run, Scenario, TempDir};
use serde_json::{json, Value};

const PROBE: &str = env!("CARGO_BIN_EXE_mw-probe");
const EPERM: &str = "errno=1";

fn q(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A policy with server `unix` rules and, optionally, one tool's.
fn policy(unix: &[String], extra: &str) -> String {
    format!(
        "version = 1\nserver = \"unixtest\"\n{extra}\n[files]\n{}\n\n[network]\nunix = [{}]\n",
        base_read_rules(&[]),
        q(unix)
    )
}

fn probe(tag: &str, policy: &str, ops: &[&[&str]]) -> Run {
    let sc = Scenario::new(tag, policy);
    let mut args = vec![PROBE];
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            args.push(";");
        }
        args.extend_from_slice(op);
    }
    let run = sc.run(&args, b"");
    assert_eq!(run.status, 0, "probe failed: {run:?}");
    assert_no_leftover_cgroups(run.warden_pid);
    run
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

fn listen(p: &Path) -> UnixListener {
    UnixListener::bind(p).unwrap_or_else(|e| panic!("bind {}: {e}", p.display()))
}

/// An abstract stream listener `@name` (unique per test process).
fn listen_abstract(name: &str) -> UnixListener {
    let a = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract addr");
    UnixListener::bind_addr(&a).unwrap_or_else(|e| panic!("bind @{name}: {e}"))
}

fn deny_events<'a>(run: &'a Run, op: &str, path: &str) -> Vec<&'a Value> {
    run.events_where(&[
        ("kind", json!("net")),
        ("family", json!("unix")),
        ("op", json!(op)),
        ("decision", json!("deny")),
        ("path", json!(path)),
    ])
}

fn assert_deny_event(run: &Run, op: &str, path: &str) -> Value {
    let ev = deny_events(run, op, path);
    assert_eq!(
        ev.len(),
        1,
        "expected one deny event for {op} {path}, events: {:#?}",
        run.events
    );
    let e = ev[0].clone();
    assert_eq!(e["server"], "unixtest");
    assert_eq!(e["comm"], "mw-probe");
    assert_eq!(e["errno"], 1);
    assert!(e["pid"].as_u64().unwrap_or(0) > 0);
    assert_eq!(e["tool"], Value::Null, "no call in flight");
    e
}

/// The unix hooks are attached (the server's start record lists them).
fn assert_unix_hooks(run: &Run) {
    let started = run.events_where(&[("kind", json!("server")), ("event", json!("started"))]);
    let hooks = started
        .first()
        .and_then(|e| e["hooks"].as_array().cloned())
        .unwrap_or_default();
    for h in ["cgroup_unix_connect", "cgroup_unix_sendmsg"] {
        assert!(hooks.iter().any(|x| x == h), "{h} not attached: {hooks:?}");
    }
}

#[test]
fn stream_connect_allowed_path_only() {
    let d = TempDir::new("unix-path");
    let ok = d.path().join("ok.sock");
    let no = d.path().join("no.sock");
    let (_a, _b) = (listen(&ok), listen(&no));
    let run = probe(
        "unix-path",
        &policy(&[s(&ok)], ""),
        &[&["unix-connect", &s(&ok)], &["unix-connect", &s(&no)]],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM], "{run:?}");
    assert_unix_hooks(&run);
    let e = assert_deny_event(&run, "unix_connect", &s(&no));
    assert_eq!(e["sock_type"], "stream");
    assert!(
        run.stderr.contains("DENY net unix_connect"),
        "{}",
        run.stderr
    );
    // Allowed connects leave no event.
    assert!(
        run.events_where(&[("family", json!("unix")), ("path", json!(s(&ok)))])
            .is_empty(),
        "{:#?}",
        run.events
    );
}

#[test]
fn subtree_rule() {
    let d = TempDir::new("unix-tree");
    let dir = d.path().join("dir");
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    let a = dir.join("a.sock");
    let b = dir.join("sub/b.sock");
    // Next to the tree, sharing its name as a prefix: not inside it.
    let beside = d.path().join("dirx.sock");
    let _l = [listen(&a), listen(&b), listen(&beside)];
    let run = probe(
        "unix-tree",
        &policy(&[format!("{}/**", s(&dir))], ""),
        &[
            &["unix-connect", &s(&a)],
            &["unix-connect", &s(&b)],
            &["unix-connect", &s(&beside)],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", "ok", EPERM], "{run:?}");
    assert_deny_event(&run, "unix_connect", &s(&beside));
}

/// An exact entry inside a subtree never shadows the subtree (exact entries
/// are keyed with their NUL), and an exact rule never matches a longer or
/// shorter name.
#[test]
fn exact_entries_do_not_shadow_subtrees() {
    let d = TempDir::new("unix-shadow");
    let x = d.path().join("x.sock");
    let x2 = d.path().join("x.sock2");
    let xs = d.path().join("x.soc");
    let _l = [listen(&x), listen(&x2), listen(&xs)];
    // Server: the whole directory; tool t: the exact socket.
    let tool = format!("\n[tools.t.network]\nunix = [{}]\n", q(&[s(&x)]));
    let pol = format!("{}{tool}", policy(&[format!("{}/**", s(d.path()))], ""));
    let run = probe(
        "unix-shadow",
        &pol,
        &[
            &["unix-connect", &s(&x)],
            &["unix-connect", &s(&x2)],
            &["unix-connect", &s(&xs)],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", "ok", "ok"], "{run:?}");
    // Exact only: neither a longer nor a shorter name.
    let run = probe(
        "unix-exact",
        &policy(&[s(&x)], ""),
        &[
            &["unix-connect", &s(&x)],
            &["unix-connect", &s(&x2)],
            &["unix-connect", &s(&xs)],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM, EPERM], "{run:?}");
    assert_deny_event(&run, "unix_connect", &s(&x2));
    assert_deny_event(&run, "unix_connect", &s(&xs));
}

#[test]
fn abstract_names() {
    let pid = std::process::id();
    let ok = format!("mw-e2e-abs-ok-{pid}");
    let no = format!("mw-e2e-abs-no-{pid}");
    let _a = listen_abstract(&ok);
    let _b = listen_abstract(&no);
    let ok_at = format!("@{ok}");
    let no_at = format!("@{no}");
    // The policy names an abstract socket, so the launcher leaves Landlock's
    // abstract-socket scope off: only the eBPF hook decides here.
    let run = probe(
        "unix-abs",
        &policy(std::slice::from_ref(&ok_at), ""),
        &[
            &["unix-connect", &ok_at],
            &["unix-connect", &no_at],
            // A longer name that starts with the allowed one.
            &["unix-connect", &format!("{ok_at}x")],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM, EPERM], "{run:?}");
    assert_deny_event(&run, "unix_connect", &no_at);
    assert_deny_event(&run, "unix_connect", &format!("{ok_at}x"));
}

/// With no abstract rule, Landlock's abstract_unix_socket scope is in force
/// too. The cgroup hook runs first (in unix_stream_connect, before the LSM
/// hook), so the refusal is the eBPF hook's, with its event.
#[test]
fn abstract_names_without_rules_still_leave_the_ebpf_event() {
    let name = format!("mw-e2e-abs-scope-{}", std::process::id());
    let _l = listen_abstract(&name);
    let at = format!("@{name}");
    let run = probe(
        "unix-abs-scope",
        &policy(&[], ""),
        &[&["unix-connect", &at]],
    );
    assert_eq!(run.lines(), vec![EPERM], "{run:?}");
    assert_deny_event(&run, "unix_connect", &at);
}

#[test]
fn dgram_sendto_and_connect() {
    let d = TempDir::new("unix-dgram");
    let ok = d.path().join("ok.dgram");
    let no = d.path().join("no.dgram");
    let _a = UnixDatagram::bind(&ok).expect("bind dgram");
    let _b = UnixDatagram::bind(&no).expect("bind dgram");
    let run = probe(
        "unix-dgram",
        &policy(&[s(&ok)], ""),
        &[
            &["unix-sendto", &s(&ok)],
            &["unix-sendto", &s(&no)],
            &["unix-dgram-connect", &s(&ok)],
            &["unix-dgram-connect", &s(&no)],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM, "ok", EPERM], "{run:?}");
    let e = assert_deny_event(&run, "sendmsg", &s(&no));
    assert_eq!(e["sock_type"], "dgram");
    assert_deny_event(&run, "unix_connect", &s(&no));
}

#[test]
fn seqpacket_connect() {
    let d = TempDir::new("unix-seq");
    let no = d.path().join("seq.sock");
    // SAFETY: plain socket/bind/listen on a path we own.
    let _fd = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
        assert!(fd >= 0);
        let mut sun: libc::sockaddr_un = std::mem::zeroed();
        sun.sun_family = libc::AF_UNIX as u16;
        for (i, b) in s(&no).bytes().enumerate() {
            sun.sun_path[i] = b as libc::c_char;
        }
        let r = libc::bind(
            fd,
            &sun as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        );
        assert_eq!(r, 0, "bind seqpacket");
        assert_eq!(libc::listen(fd, 4), 0);
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    let run = probe(
        "unix-seq",
        &policy(&[], ""),
        &[&["unix-seqpacket-connect", &s(&no)]],
    );
    assert_eq!(run.lines(), vec![EPERM], "{run:?}");
    let e = assert_deny_event(&run, "unix_connect", &s(&no));
    assert_eq!(e["sock_type"], "seqpacket");
}

/// Socket names that fill all 108 bytes of sun_path (no NUL): a subtree
/// over them allows them, an exact rule of their first 107 bytes does not.
#[test]
fn names_of_108_bytes() {
    let d = TempDir::new("unix-long");
    let base = s(d.path());
    // dir + "/" + file name = 108 bytes.
    let dir_len = 108 - 1 - 8;
    assert!(base.len() + 1 < dir_len, "temp dir path too long: {base}");
    let dir = format!("{base}/{}", "d".repeat(dir_len - base.len() - 1));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let long = format!("{dir}/{}", "s".repeat(8));
    assert_eq!(long.len(), 108);
    // SAFETY: plain socket/bind/listen; the name has no NUL (addrlen 110).
    let _fd = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut sun: libc::sockaddr_un = std::mem::zeroed();
        sun.sun_family = libc::AF_UNIX as u16;
        for (i, b) in long.bytes().enumerate() {
            sun.sun_path[i] = b as libc::c_char;
        }
        let r = libc::bind(
            fd,
            &sun as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        );
        assert_eq!(
            r,
            0,
            "bind 108-byte name: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::listen(fd, 4), 0);
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    let run = probe(
        "unix-long-tree",
        &policy(&[format!("{dir}/**")], ""),
        &[&["unix-connect", &long]],
    );
    assert_eq!(run.lines(), vec!["ok"], "{run:?}");
    let run = probe(
        "unix-long-exact",
        &policy(&[long[..107].to_string()], ""),
        &[&["unix-connect", &long]],
    );
    assert_eq!(run.lines(), vec![EPERM], "{run:?}");
    assert_deny_event(&run, "unix_connect", &long);
}

#[test]
fn audit_mode_reports_and_allows() {
    let d = TempDir::new("unix-audit");
    let no = d.path().join("no.sock");
    let _l = listen(&no);
    let run = probe(
        "unix-audit",
        &policy(&[], "mode = \"audit\"\n"),
        &[&["unix-connect", &s(&no)]],
    );
    assert_eq!(run.lines(), vec!["ok"], "{run:?}");
    let ev = run.events_where(&[
        ("family", json!("unix")),
        ("op", json!("unix_connect")),
        ("decision", json!("audit")),
        ("path", json!(s(&no))),
    ]);
    assert_eq!(ev.len(), 1, "{:#?}", run.events);
}

/// io_uring's IORING_OP_CONNECT: on this (fallback) backend the launcher's
/// seccomp filter refuses io_uring_setup itself, so that layer answers
/// first. The probe's errno is EPERM either way.
#[test]
fn io_uring_unix_connect_refused() {
    let d = TempDir::new("unix-uring");
    let no = d.path().join("no.sock");
    let _l = listen(&no);
    let run = probe(
        "unix-uring",
        &policy(&[], ""),
        &[&["uring-unix-connect", &s(&no)]],
    );
    assert_eq!(run.lines(), vec![EPERM], "{run:?}");
}

#[test]
fn processes_outside_the_cgroup_are_not_affected() {
    let d = TempDir::new("unix-outside");
    let no = d.path().join("no.sock");
    let _l = listen(&no);
    let sc = Scenario::new("unix-outside", &policy(&[], ""));
    let mut child = sc
        .command(&[PROBE, "wait-stdin", ";", "unix-connect", &s(&no)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !mcp_warden_tests::read_events(&sc.events)
        .iter()
        .any(|e| e["kind"] == "server")
    {
        assert!(std::time::Instant::now() < deadline, "server never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // This test process is outside the instance cgroup: not affected.
    std::os::unix::net::UnixStream::connect(&no).expect("unconfined connect works");
    {
        use std::io::Write;
        let mut sin = child.stdin.take().expect("stdin");
        sin.write_all(b"go\n").expect("write");
    }
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    let run = sc.collect(pid, out);
    assert_eq!(run.lines(), vec!["ok", EPERM], "{run:?}");
    assert_no_leftover_cgroups(pid);
}
