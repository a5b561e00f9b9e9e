//! Network egress, enforced in the kernel by the cgroup hooks: real
//! programs loaded by `mcp-warden run`, a real confined process (mw-probe),
//! the real errno and the real audit event. Loopback only.
use std::net::{TcpListener, UdpSocket};

use mcp_warden_tests::{assert_no_leftover_cgroups, base_read_rules, Run, Scenario};
use serde_json::{json, Value};

const PROBE: &str = env!("CARGO_BIN_EXE_mw-probe");
const EPERM: &str = "errno=1";

fn policy(connect: &[String], bind: &[String]) -> String {
    policy_w(connect, bind, &[])
}

/// `write`: trees the probe may write (e.g. a result file).
fn policy_w(connect: &[String], bind: &[String], write: &[String]) -> String {
    let q = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "version = 1\nserver = \"nettest\"\n\n[files]\n{}\nwrite = [{}]\n\n[network]\nconnect = [{}]\nbind = [{}]\n",
        base_read_rules(&[]),
        q(write),
        q(connect),
        q(bind)
    )
}

/// Run the probe with `ops` (joined by ";") under `policy`.
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

fn tcp_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind listener");
    let p = l.local_addr().expect("addr").port();
    (l, p)
}

fn tcp6_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("[::1]:0").expect("bind v6 listener");
    let p = l.local_addr().expect("addr").port();
    (l, p)
}

fn udp_port() -> (UdpSocket, u16) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let p = s.local_addr().expect("addr").port();
    (s, p)
}

fn assert_deny_event(run: &Run, op: &str, addr: &str, port: u16) -> Value {
    let ev = run.events_where(&[
        ("kind", json!("net")),
        ("op", json!(op)),
        ("decision", json!("deny")),
        ("addr", json!(addr)),
        ("port", json!(port)),
    ]);
    assert_eq!(
        ev.len(),
        1,
        "expected one deny event for {op} {addr}:{port}, events: {:#?}",
        run.events
    );
    let e = ev[0].clone();
    assert_eq!(e["server"], "nettest");
    assert_eq!(e["comm"], "mw-probe");
    assert!(e["pid"].as_u64().unwrap_or(0) > 0);
    assert_eq!(e["errno"], 1);
    assert_eq!(e["tool"], Value::Null, "no call in flight");
    assert_eq!(e["call_id"], Value::Null);
    for k in ["ts", "instance", "exe", "calls_in_flight", "family"] {
        assert!(e.get(k).is_some(), "event lacks {k}: {e}");
    }
    e
}

#[test]
fn tcp_connect_allowed_port_only() {
    let (_l1, ok) = tcp_listener();
    let (_l2, other) = tcp_listener();
    let run = probe(
        "tcp",
        &policy(&[format!("127.0.0.1:{ok}")], &[]),
        &[
            &["tcp-connect", &format!("127.0.0.1:{ok}")],
            &["tcp-connect", &format!("127.0.0.1:{other}")],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM], "{run:?}");
    assert_deny_event(&run, "connect", "127.0.0.1", other);
    assert!(run.stderr.contains("DENY net connect"), "{}", run.stderr);
}

#[test]
fn other_loopback_and_any_address_are_not_the_allowed_one() {
    let (_l, port) = tcp_listener();
    let run = probe(
        "lo",
        &policy(&[format!("127.0.0.1:{port}")], &[]),
        &[
            &["tcp-connect", &format!("127.0.0.2:{port}")],
            &["tcp-connect", &format!("0.0.0.0:{port}")],
        ],
    );
    assert_eq!(run.lines(), vec![EPERM, EPERM], "{run:?}");
    assert_deny_event(&run, "connect", "127.0.0.2", port);
    assert_deny_event(&run, "connect", "0.0.0.0", port);
}

#[test]
fn cidr_and_any_port() {
    let (_l, port) = tcp_listener();
    let run = probe(
        "cidr",
        &policy(&["127.0.0.0/8:*".to_string()], &[]),
        &[
            &["tcp-connect", &format!("127.0.0.1:{port}")],
            &["udp-connect", "127.9.9.9:53"],
            &["tcp-connect", "[::1]:9"],
        ],
    );
    assert_eq!(run.lines()[..2], ["ok", "ok"], "{run:?}");
    assert_eq!(run.lines()[2], EPERM, "{run:?}");
}

#[test]
fn udp_connect_and_unconnected_sendto() {
    let (_s1, ok) = udp_port();
    let (_s2, other) = udp_port();
    let run = probe(
        "udp",
        &policy(&[format!("127.0.0.1:{ok}")], &[]),
        &[
            &["udp-connect", &format!("127.0.0.1:{ok}")],
            &["udp-connect", &format!("127.0.0.1:{other}")],
            &["udp-sendto", &format!("127.0.0.1:{ok}")],
            &["udp-sendto", &format!("127.0.0.1:{other}")],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM, "ok", EPERM], "{run:?}");
    assert_deny_event(&run, "connect", "127.0.0.1", other);
    assert_deny_event(&run, "sendmsg", "127.0.0.1", other);
}

#[test]
fn ipv6_and_mapped_ipv4() {
    let (_l6, p6) = tcp6_listener();
    let (_l4, p4) = tcp_listener();
    let (_l4b, p4b) = tcp_listener();
    let run = probe(
        "v6",
        &policy(&[format!("[::1]:{p6}"), format!("127.0.0.1:{p4}")], &[]),
        &[
            &["tcp-connect", &format!("[::1]:{p6}")],
            &["tcp-connect", &format!("[::1]:{p4}")],
            // IPv4-mapped IPv6 is judged as IPv4.
            &["tcp-connect", &format!("[::ffff:127.0.0.1]:{p4}")],
            &["tcp-connect", &format!("[::ffff:127.0.0.1]:{p4b}")],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM, "ok", EPERM], "{run:?}");
    assert_deny_event(&run, "connect", "::1", p4);
    assert_deny_event(&run, "connect", "::ffff:127.0.0.1", p4b);
}

#[test]
fn bind_rules() {
    let run = probe(
        "bind",
        &policy(&[], &["127.0.0.1:*".to_string()]),
        &[
            &["tcp-bind", "127.0.0.1:0"],
            &["udp-bind", "127.0.0.1:0"],
            &["tcp-bind", "0.0.0.0:0"],
            &["tcp-bind", "[::1]:0"],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", "ok", EPERM, EPERM], "{run:?}");
    assert_deny_event(&run, "bind", "0.0.0.0", 0);
}

/// The backend in force, from the server's start record.
fn backend(run: &Run) -> String {
    run.events_where(&[("kind", json!("server")), ("event", json!("started"))])
        .first()
        .and_then(|e| e["backend"].as_str())
        .unwrap_or("")
        .to_string()
}

/// The confinement report says `syscall` is refused by seccomp.
fn seccomp_refuses(run: &Run, syscall: &str) -> bool {
    run.events_where(&[("kind", json!("server")), ("event", json!("started"))])
        .first()
        .and_then(|e| e["confinement"]["seccomp"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|l| {
            l["action"] == "EPERM"
                && l["syscalls"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|s| s == syscall))
        })
}

#[test]
fn io_uring_cannot_get_around_the_rules() {
    let (_l1, ok) = tcp_listener();
    let (_l2, other) = tcp_listener();
    let run = probe(
        "uring",
        &policy(&[format!("127.0.0.1:{ok}")], &[]),
        &[
            &["uring-connect", &format!("127.0.0.1:{ok}")],
            &["uring-connect", &format!("127.0.0.1:{other}")],
            &["uring-connect-sqpoll", &format!("127.0.0.1:{other}")],
        ],
    );
    let denied = run.events_where(&[
        ("op", json!("connect")),
        ("decision", json!("deny")),
        ("port", json!(other)),
    ]);
    if backend(&run) == "fallback" {
        // The fallback refuses io_uring itself (seccomp): its socket and
        // xattr operations would pass seccomp's argument checks.
        assert!(seccomp_refuses(&run, "io_uring_setup"), "{run:?}");
        assert_eq!(run.lines(), vec![EPERM, EPERM, EPERM], "{run:?}");
        assert!(denied.is_empty(), "no connect reached the kernel: {run:?}");
    } else {
        // io_uring is allowed: its connects meet the same cgroup hooks,
        // inline and from the SQPOLL thread (which carries our cgroup).
        assert_eq!(run.lines(), vec!["ok", EPERM, EPERM], "{run:?}");
        assert_eq!(denied.len(), 2, "{:#?}", run.events);
    }
}

#[test]
fn raw_and_packet_sockets_refused() {
    let run = probe(
        "raw",
        &policy(&[], &[]),
        &[&["raw-socket"], &["raw6-socket"], &["packet-socket"]],
    );
    assert_eq!(run.lines(), vec![EPERM, EPERM, EPERM], "{run:?}");
    // Refused in layers: the capability drop (the kernel checks CAP_NET_RAW
    // before any hook runs), seccomp on the fallback (AF_PACKET, SOCK_RAW),
    // and the cgroup sock_create hook for raw inet sockets, which only sees
    // the attempts that pass the first two (and then leaves an event).
    let started = run.events_where(&[("kind", json!("server")), ("event", json!("started"))]);
    assert_eq!(
        started[0]["confinement"]["capabilities"]
            .as_str()
            .map(|s| s.contains("effective cleared")),
        Some(true),
        "{run:?}"
    );
    if backend(&run) == "fallback" {
        assert!(seccomp_refuses(&run, "socket"), "{run:?}");
    }
}

#[test]
fn forked_child_and_daemonized_grandchild_stay_confined() {
    let (_l, port) = tcp_listener();
    let sc_dir = mcp_warden_tests::TempDir::new("daemon-out");
    let out = sc_dir.path().join("grandchild.txt");
    let target = format!("127.0.0.1:{port}");
    let out_tree = format!("{}/**", sc_dir.path().display());
    let run = probe(
        "tree",
        &policy_w(&[], &[], &[out_tree]),
        &[
            &["fork", "tcp-connect", &target],
            &[
                "daemonize",
                out.to_str().expect("utf8"),
                "tcp-connect",
                &target,
            ],
        ],
    );
    let lines = run.lines();
    assert_eq!(lines[0], EPERM, "{run:?}");
    assert!(lines[1].starts_with(EPERM), "grandchild: {run:?}");
    let ev = run.events_where(&[("op", json!("connect")), ("decision", json!("deny"))]);
    assert_eq!(ev.len(), 2, "{:#?}", run.events);
    let pids: std::collections::BTreeSet<u64> =
        ev.iter().filter_map(|e| e["pid"].as_u64()).collect();
    assert_eq!(
        pids.len(),
        2,
        "child and grandchild are different processes"
    );
}

#[test]
fn processes_outside_the_cgroup_are_not_affected() {
    let (_l, port) = tcp_listener();
    let sc = Scenario::new("outside", &policy(&[], &[]));
    let mut child = sc
        .command(&[
            PROBE,
            "wait-stdin",
            ";",
            "tcp-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the server runs confined.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !mcp_warden_tests::read_events(&sc.events)
        .iter()
        .any(|e| e["kind"] == "server")
    {
        assert!(std::time::Instant::now() < deadline, "server never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // This test process is outside the instance cgroup: not affected.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("unconfined connect works");
    {
        use std::io::Write;
        let mut sin = child.stdin.take().expect("stdin");
        sin.write_all(b"go\n").expect("write");
    }
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    let run = sc.collect(pid, out);
    assert_eq!(run.lines(), vec!["ok", EPERM], "{run:?}");
}

#[test]
fn dns_names_resolve_to_allowed_addresses() {
    let (_l, port) = tcp_listener();
    let run = probe(
        "dns",
        &policy(&[format!("localhost:{port}")], &[]),
        &[
            &["tcp-connect", &format!("127.0.0.1:{port}")],
            &["tcp-connect", &format!("127.0.0.2:{port}")],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM], "{run:?}");
}

#[test]
fn exit_status_is_the_servers() {
    let sc = Scenario::new("exit", &policy(&[], &[]));
    let run = sc.run(&[PROBE, "exit", "7"], b"");
    assert_eq!(run.status, 7, "{run:?}");
    assert_no_leftover_cgroups(run.warden_pid);
    let exited = run.events_where(&[("kind", json!("server"))]);
    assert!(
        exited
            .iter()
            .any(|e| e["event"] == "exited" && e["status"] == 7),
        "{:#?}",
        run.events
    );
}
