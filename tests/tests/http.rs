//! The HTTP relay (`mcp-warden run --listen ADDR --upstream URL`), end to
//! end: the official MCP Python SDK's HTTP server confined under
//! mcp-warden, and the SDK's HTTP client talking to it through the relay.
//! Tools work, an undeclared tool is refused, a per-tool network right holds
//! only during its call, and each kernel denial names its call; over a TCP
//! and a unix-socket listen address, in both protocol eras (2025-11-25 with
//! sessions, 2026-07-28 without), and on the deprecated HTTP+SSE transport.
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcp_warden_tests::{python_read_rules, repo_root, venv_python, Run, Scenario};
use serde_json::{json, Value};

/// A free loopback port (bound and released; the kernel won't hand it out
/// again at once).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("addr").port()
}

fn policy(upstream_port: u16, target_port: u16) -> String {
    format!(
        r#"version = 1
server = "toolbox-http"

[files]
{read}

[network]
connect = []
bind = ["127.0.0.1:{upstream_port}"]

[tools]
allow = ["fetch", "compute", "spawn_background", "background_result", "big", "slow"]

[tools.fetch.network]
connect = ["127.0.0.1:{target_port}"]

[tools.slow.network]
connect = ["127.0.0.1:{target_port}"]
"#,
        read = python_read_rules()
    )
}

fn fixture(name: &str) -> String {
    repo_root()
        .join("tests/fixtures/http")
        .join(name)
        .display()
        .to_string()
}

/// `mcp-warden run --listen` serving the SDK server, running in the
/// background. Dropped without `stop` (a failed assertion), it is ended.
struct Served {
    child: Option<Child>,
    sc: Scenario,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }
}

impl Served {
    fn start(sc: Scenario, listen: &str, upstream: &str, server_args: &[&str]) -> Self {
        let py = venv_python().display().to_string();
        let server = fixture("http_server.py");
        let mut cmd: Vec<&str> = vec![&py, &server];
        cmd.extend_from_slice(server_args);
        let mut c = Command::new(mcp_warden_tests::warden());
        c.arg("run")
            .arg("--policy")
            .arg(&sc.policy)
            .arg("--events")
            .arg(&sc.events)
            .arg("--listen")
            .arg(listen)
            .arg("--upstream")
            .arg(upstream)
            .arg("--")
            .args(&cmd)
            .env("MCP_WARDEN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().expect("spawn mcp-warden run --listen");
        Served {
            child: Some(child),
            sc,
        }
    }

    /// SIGTERM mcp-warden, wait, collect.
    fn stop(mut self) -> Run {
        let child = self.child.take().expect("running");
        let pid = child.id();
        // SAFETY: kill(2) on the pid of our own child (a no-op if it exited).
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        let out = child.wait_with_output().expect("wait mcp-warden");
        self.sc.collect(pid, out)
    }
}

/// Run the SDK client (tests/fixtures/http/drive_http.py) against `url`.
fn drive(url: &str, uds: Option<&Path>, mode: &str, steps: &Value) -> Vec<Value> {
    let mut c = Command::new(venv_python());
    c.arg(fixture("drive_http.py"))
        .arg(steps.to_string())
        .arg(url)
        .arg("--mode")
        .arg(mode);
    if let Some(p) = uds {
        c.arg("--uds").arg(p);
    }
    let out = c.stdin(Stdio::null()).output().expect("run drive_http.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        lines.first().is_some_and(|l| l["connected"] == true),
        "client did not connect: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines.remove(0);
    lines
}

/// Wait until `addr` accepts (the relay listens before the server is up).
fn wait_listening(listen: &Listen) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = match listen {
            Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            Listen::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
        };
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "relay never listened on {listen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Debug)]
enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

impl Listen {
    fn arg(&self) -> String {
        match self {
            Listen::Tcp(p) => format!("127.0.0.1:{p}"),
            Listen::Unix(p) => format!("unix:{}", p.display()),
        }
    }

    fn uds(&self) -> Option<&Path> {
        match self {
            Listen::Tcp(_) => None,
            Listen::Unix(p) => Some(p),
        }
    }

    /// The URL the client uses (over a unix socket the host part is only
    /// the Host header, which the SDK server checks against loopback).
    fn url(&self, path: &str) -> String {
        match self {
            Listen::Tcp(p) => format!("http://127.0.0.1:{p}{path}"),
            Listen::Unix(_) => format!("http://127.0.0.1:8000{path}"),
        }
    }
}

/// The relay logs what it still tracks when it stops: nothing may be left.
fn assert_nothing_tracked(run: &Run) {
    assert!(
        run.stderr
            .contains("still tracked: Tracked { calls: 0, pending: 0, owners: 0, detached: 0 }"),
        "in-flight state left behind:\n{}",
        run.stderr
    );
}

/// The per-tool scenario of tests/tests/per_tool.rs, through the HTTP relay.
fn per_tool_suite(tag: &str, listen: Listen, mode: &str, transport: &str, extra: &[&str]) {
    let target = TcpListener::bind("127.0.0.1:0").expect("target listener");
    let port = target.local_addr().expect("addr").port();
    let up = free_port();
    let sc = Scenario::new(tag, &policy(up, port));
    let up_s = up.to_string();
    let mut args = vec![transport, "--port", &up_s];
    args.extend_from_slice(extra);
    let served = Served::start(sc, &listen.arg(), &format!("http://127.0.0.1:{up}"), &args);
    wait_listening(&listen);
    let steps = json!([
        {"tool": "fetch", "args": {"port": port}},
        {"tool": "compute", "args": {"port": port}},
        {"tool": "secret_tool", "args": {}},
        {"tool": "spawn_background", "args": {"port": port, "delay_ms": 300}},
        {"sleep_ms": 1200},
        {"tool": "background_result", "args": {}},
        {"tool": "fetch", "args": {"port": port}},
    ]);
    let path = if transport == "sse" { "/sse" } else { "/mcp" };
    let client_mode = if transport == "sse" { "sse" } else { mode };
    let results = drive(&listen.url(path), listen.uds(), client_mode, &steps);
    let run = served.stop();
    assert_eq!(results.len(), 6, "results {results:#?}\nrun {run:#?}");
    assert_eq!(results[0]["text"], "ok", "fetch may connect: {results:#?}");
    assert_eq!(
        results[1]["text"], "errno=1",
        "compute may not: {results:#?}"
    );
    assert_eq!(results[2]["ok"], false, "{results:#?}");
    assert!(
        results[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not allowed by policy")),
        "{results:#?}"
    );
    assert_eq!(results[3]["text"], "started");
    assert_eq!(
        results[4]["text"], "errno=1",
        "idle background denied: {results:#?}"
    );
    assert_eq!(results[5]["text"], "ok", "{results:#?}");

    let denials = run.events_where(&[
        ("kind", json!("net")),
        ("decision", json!("deny")),
        ("port", json!(port)),
    ]);
    assert_eq!(denials.len(), 2, "{:#?}", run.events);
    let compute = denials
        .iter()
        .find(|e| e["tool"] == "compute")
        .unwrap_or_else(|| panic!("no denial attributed to compute: {denials:#?}"));
    assert!(!compute["call_id"].is_null(), "{compute}");
    assert!(
        denials
            .iter()
            .any(|e| e["tool"].is_null() && e["call_id"].is_null()),
        "no idle denial: {denials:#?}"
    );
    let calls = run.events_where(&[("kind", json!("tool_call"))]);
    let outcomes = |tool: &str| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c["tool"] == tool)
            .map(|c| c["outcome"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(outcomes("fetch"), vec!["ok", "ok"], "{calls:#?}");
    assert_eq!(outcomes("compute"), vec!["ok"], "{calls:#?}");
    assert_eq!(outcomes("secret_tool"), vec!["refused"], "{calls:#?}");
    let compute_call = calls
        .iter()
        .find(|c| c["tool"] == "compute")
        .expect("compute tool_call record");
    assert_eq!(compute_call["call_id"], compute["call_id"]);
    assert_nothing_tracked(&run);
}

#[test]
fn streamable_http_over_tcp_2025_11_25() {
    per_tool_suite(
        "http-tcp",
        Listen::Tcp(free_port()),
        "legacy",
        "streamable-http",
        &[],
    );
}

#[test]
fn streamable_http_over_unix_socket_2025_11_25() {
    let dir = mcp_warden_tests::TempDir::new("http-uds-sock");
    let sock = dir.path().join("relay.sock");
    per_tool_suite(
        "http-uds",
        Listen::Unix(sock),
        "legacy",
        "streamable-http",
        &[],
    );
}

#[test]
fn streamable_http_over_tcp_2026_07_28() {
    per_tool_suite(
        "http-modern",
        Listen::Tcp(free_port()),
        "2026-07-28",
        "streamable-http",
        &[],
    );
}

#[test]
fn streamable_http_over_unix_socket_2026_07_28() {
    let dir = mcp_warden_tests::TempDir::new("http-uds-modern-sock");
    let sock = dir.path().join("relay.sock");
    per_tool_suite(
        "http-uds-modern",
        Listen::Unix(sock),
        "2026-07-28",
        "streamable-http",
        &[],
    );
}

#[test]
fn streamable_http_json_responses() {
    per_tool_suite(
        "http-json",
        Listen::Tcp(free_port()),
        "legacy",
        "streamable-http",
        &["--json"],
    );
}

#[test]
fn deprecated_http_sse_transport_is_attributed() {
    per_tool_suite("http-sse", Listen::Tcp(free_port()), "legacy", "sse", &[]);
}

/// Send one raw HTTP/1.1 request, return (status, body).
fn raw(port: u16, head: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect relay");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let req = format!(
        "{head}\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

#[test]
fn origin_and_routing_headers_are_checked_before_forwarding() {
    let up = free_port();
    let listen = free_port();
    let sc = Scenario::new("http-headers", &policy(up, 9));
    let served = Served::start(
        sc,
        &format!("127.0.0.1:{listen}"),
        &format!("http://127.0.0.1:{up}"),
        &["streamable-http", "--port", &up.to_string()],
    );
    wait_listening(&Listen::Tcp(listen));
    let call = |name: &str| {
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
            "name": name, "arguments": {"port": 9},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                      "io.modelcontextprotocol/clientCapabilities": {}}}})
        .to_string()
    };
    let modern = "POST /mcp HTTP/1.1\r\nContent-Type: application/json\r\n\
                  Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2026-07-28";
    // A cross-origin browser request never reaches the server.
    let (status, _) = raw(
        listen,
        &format!("{modern}\r\nOrigin: http://evil.example\r\nMcp-Method: tools/call\r\nMcp-Name: compute"),
        &call("compute"),
    );
    assert_eq!(status, 403);
    // Headers that name another tool than the body: 400, not forwarded.
    let (status, body) = raw(
        listen,
        &format!("{modern}\r\nMcp-Method: tools/call\r\nMcp-Name: compute"),
        &call("secret_tool"),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("-32020"), "{body}");
    let (status, _) = raw(
        listen,
        &format!("{modern}\r\nMcp-Method: tools/list\r\nMcp-Name: compute"),
        &call("compute"),
    );
    assert_eq!(status, 400);
    // Matching headers, a localhost origin (base64 form of the name too):
    // forwarded, and the server runs the tool.
    let (status, body) = raw(
        listen,
        &format!(
            "{modern}\r\nOrigin: http://localhost:3000\r\nMcp-Method: tools/call\r\nMcp-Name: =?base64?Y29tcHV0ZQ==?="
        ),
        &call("compute"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("errno="), "{body}");
    let run = served.stop();
    let calls = run.events_where(&[("kind", json!("tool_call"))]);
    assert_eq!(calls.len(), 1, "only the matching call ran: {calls:#?}");
    assert_eq!(calls[0]["tool"], "compute");
    assert_nothing_tracked(&run);
}

#[test]
fn fifty_mib_result_passes_intact() {
    let up = free_port();
    let listen = free_port();
    let sc = Scenario::new("http-big", &policy(up, 9));
    let served = Served::start(
        sc,
        &format!("127.0.0.1:{listen}"),
        &format!("http://127.0.0.1:{up}"),
        &["streamable-http", "--port", &up.to_string()],
    );
    wait_listening(&Listen::Tcp(listen));
    let started = Instant::now();
    let results = drive(
        &format!("http://127.0.0.1:{listen}/mcp"),
        None,
        "legacy",
        &json!([{"tool": "big", "args": {"mib": 50}}]),
    );
    let took = started.elapsed();
    let run = served.stop();
    let expect = Command::new(venv_python())
        .arg("-c")
        .arg(format!(
            "import hashlib,sys; sys.path.insert(0, {:?}); import http_server; \
             t = http_server.blob(50); print(hashlib.sha256(t.encode()).hexdigest(), len(t))",
            repo_root()
                .join("tests/fixtures/http")
                .display()
                .to_string()
        ))
        .output()
        .expect("hash the expected blob");
    let expect = String::from_utf8_lossy(&expect.stdout);
    let mut it = expect.split_whitespace();
    let (sha, len) = (it.next().unwrap_or(""), it.next().unwrap_or(""));
    assert_eq!(results.len(), 1, "{results:#?} {run:#?}");
    assert_eq!(results[0]["sha256"], sha, "{results:#?}");
    assert_eq!(results[0]["len"].to_string(), len);
    eprintln!("50 MiB tool result through the relay (SSE, SDK both ends) in {took:?}");
    let calls = run.events_where(&[("kind", json!("tool_call")), ("tool", json!("big"))]);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["outcome"], "ok");
    assert_nothing_tracked(&run);
}

#[test]
fn client_leaving_mid_call_withdraws_the_tools_rights() {
    let target = TcpListener::bind("127.0.0.1:0").expect("target listener");
    let port = target.local_addr().expect("addr").port();
    let up = free_port();
    let listen = free_port();
    let sc = Scenario::new("http-leave", &policy(up, port));
    let served = Served::start(
        sc,
        &format!("127.0.0.1:{listen}"),
        &format!("http://127.0.0.1:{up}"),
        &["streamable-http", "--port", &up.to_string()],
    );
    wait_listening(&Listen::Tcp(listen));
    // slow may connect to the target, but only while its call is in flight:
    // the client process dies 300 ms into the call (no cancellation sent,
    // its connections just close); the tool goes on and connects at 1.5 s.
    let results = drive(
        &format!("http://127.0.0.1:{listen}/mcp"),
        None,
        "legacy",
        &json!([{"tool": "slow", "args": {"seconds": 1.5, "port": port}, "exit_after_ms": 300}]),
    );
    std::thread::sleep(Duration::from_millis(2500));
    let run = served.stop();
    assert_eq!(results[0]["exited"], true, "{results:#?}");
    let calls = run.events_where(&[("kind", json!("tool_call")), ("tool", json!("slow"))]);
    assert_eq!(calls.len(), 1, "{:#?}", run.events);
    assert_eq!(calls[0]["outcome"], "cancelled", "{calls:#?}");
    assert_eq!(calls[0]["reason"], "the client went away", "{calls:#?}");
    let denials = run.events_where(&[
        ("kind", json!("net")),
        ("decision", json!("deny")),
        ("port", json!(port)),
    ]);
    assert_eq!(
        denials.len(),
        1,
        "the late connect is denied: {:#?}",
        run.events
    );
    assert!(denials[0]["tool"].is_null(), "{denials:#?}");
    assert_nothing_tracked(&run);
}

#[test]
fn upstream_binding_outside_network_bind_fails_to_start() {
    let allowed = free_port();
    let other = free_port();
    let listen = free_port();
    let sc = Scenario::new("http-bind", &policy(allowed, 9));
    let served = Served::start(
        sc,
        &format!("127.0.0.1:{listen}"),
        &format!("http://127.0.0.1:{other}"),
        &["streamable-http", "--port", &other.to_string()],
    );
    let mut served = served;
    let deadline = Instant::now() + Duration::from_secs(30);
    while served
        .child
        .as_mut()
        .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    {
        assert!(Instant::now() < deadline, "the server kept running");
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = served.stop();
    assert_ne!(run.status, 0, "{run:#?}");
    let binds = run.events_where(&[
        ("kind", json!("net")),
        ("decision", json!("deny")),
        ("port", json!(other)),
    ]);
    assert!(
        binds.iter().any(|e| e["op"] == "bind"),
        "no bind denial for port {other}: {:#?}",
        run.events
    );
}

/// `[mcp] sampling` over HTTP: a denied server request (in an SSE event of
/// the call's response stream) never reaches the client; the relay answers
/// the server itself. Allowed, it passes; both are recorded.
#[test]
fn server_requests_are_governed_over_http() {
    for (mode, decision, text) in [
        ("deny", "deny", "sampling failed:"),
        ("allow", "allow", "model said: forty-two"),
    ] {
        let up = free_port();
        let listen = free_port();
        let policy = format!(
            "version = 1\nserver = \"toolbox-http\"\n\n[files]\n{}\n\n[network]\nbind = [\"127.0.0.1:{up}\"]\n\n\
             [tools]\nallow = [\"ask_model\"]\n\n[mcp]\nsampling = \"{mode}\"\n",
            python_read_rules()
        );
        let sc = Scenario::new("http-sampling", &policy);
        let served = Served::start(
            sc,
            &format!("127.0.0.1:{listen}"),
            &format!("http://127.0.0.1:{up}"),
            &["streamable-http", "--port", &up.to_string()],
        );
        wait_listening(&Listen::Tcp(listen));
        let results = drive(
            &format!("http://127.0.0.1:{listen}/mcp"),
            None,
            "legacy",
            &json!([{"tool": "ask_model", "args": {"question": "the answer?"}}]),
        );
        let run = served.stop();
        let got = results[0]["text"].as_str().unwrap_or("");
        assert!(got.starts_with(text), "{mode}: {results:#?} {run:#?}");
        if mode == "deny" {
            assert!(got.contains("denied by the policy"), "{got}");
        }
        let ev = run.events_where(&[("event", json!("server_request"))]);
        assert_eq!(ev.len(), 1, "{:#?}", run.events);
        assert_eq!(ev[0]["decision"], decision);
        assert_eq!(ev[0]["tool"], "ask_model");
        assert_nothing_tracked(&run);
    }
}

/// The server's own endpoint on a unix socket (in a directory its policy
/// lets it write), the relay on TCP: same rights, same attribution.
#[test]
fn upstream_on_a_unix_socket() {
    let target = TcpListener::bind("127.0.0.1:0").expect("target listener");
    let port = target.local_addr().expect("addr").port();
    let dir = mcp_warden_tests::TempDir::new("http-upsock");
    let sock = dir.path().join("server.sock");
    let listen = free_port();
    let policy = policy(1, port).replace(
        "[network]",
        &format!("write = [\"{}/**\"]\n\n[network]", dir.path().display()),
    );
    let sc = Scenario::new("http-upsock", &policy);
    let sock_s = sock.display().to_string();
    let served = Served::start(
        sc,
        &format!("127.0.0.1:{listen}"),
        &format!("unix:{sock_s}"),
        &["streamable-http", "--uds", &sock_s],
    );
    wait_listening(&Listen::Tcp(listen));
    let results = drive(
        &format!("http://127.0.0.1:{listen}/mcp"),
        None,
        "legacy",
        &json!([
            {"tool": "fetch", "args": {"port": port}},
            {"tool": "compute", "args": {"port": port}},
            {"tool": "secret_tool", "args": {}},
        ]),
    );
    let run = served.stop();
    assert_eq!(results.len(), 3, "{results:#?} {run:#?}");
    assert_eq!(results[0]["text"], "ok", "{results:#?}");
    assert_eq!(results[1]["text"], "errno=1", "{results:#?}");
    assert_eq!(results[2]["ok"], false, "{results:#?}");
    let denials = run.events_where(&[
        ("kind", json!("net")),
        ("decision", json!("deny")),
        ("port", json!(port)),
    ]);
    assert_eq!(denials.len(), 1, "{:#?}", run.events);
    assert_eq!(denials[0]["tool"], "compute");
    assert_nothing_tracked(&run);
}
