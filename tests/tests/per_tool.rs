//! Per-tool rights through the MCP relay, with the official MCP Python SDK
//! as client and server: a tool's network right holds only while a call of
//! that tool is in flight; other tools and idle background work are denied
//! by the kernel, and each denial names the right tool and call id.
use std::net::TcpListener;

use mcp_warden_tests::{python_read_rules, sdk_drive, Scenario};
use serde_json::{json, Value};

fn server_cmd() -> Vec<String> {
    mcp_warden_tests::sdk_tool_server()
}

fn policy(port: u16) -> String {
    format!(
        r#"version = 1
server = "toolbox"

[files]
{read}

[network]
connect = []

[tools]
allow = ["fetch", "compute", "spawn_background", "background_result", "getppid_loop", "send_bytes"]

[tools.fetch.network]
connect = ["127.0.0.1:{port}"]

[tools.send_bytes.network]
connect = ["127.0.0.1:{port}"]
"#,
        read = python_read_rules()
    )
}

#[test]
fn a_tool_right_holds_only_during_its_own_calls() {
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = l.local_addr().expect("addr").port();
    let sc = Scenario::new("pertool", &policy(port));
    let steps = json!([
        {"tool": "fetch", "args": {"port": port}},
        {"tool": "compute", "args": {"port": port}},
        {"tool": "secret_tool", "args": {}},
        {"tool": "spawn_background", "args": {"port": port, "delay_ms": 300}},
        {"sleep_ms": 1200},
        {"tool": "background_result", "args": {}},
        {"tool": "fetch", "args": {"port": port}},
    ]);
    let cmd = server_cmd();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (results, run) = sdk_drive(&sc, &steps, &cmd);
    assert_eq!(results.len(), 6, "results {results:#?}\nrun {run:?}");
    // fetch may connect during its call.
    assert_eq!(results[0]["text"], "ok", "{results:#?}");
    // compute may not: the right is fetch's alone.
    assert_eq!(results[1]["text"], "errno=1", "{results:#?}");
    // secret_tool is not in tools.allow: the relay answers, the server never runs it.
    assert_eq!(results[2]["ok"], false, "{results:#?}");
    assert!(
        results[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not allowed by policy")),
        "{results:#?}"
    );
    // A background thread connecting while no call is in flight is denied.
    assert_eq!(results[3]["text"], "started");
    assert_eq!(results[4]["text"], "errno=1", "{results:#?}");
    // And fetch still works afterwards.
    assert_eq!(results[5]["text"], "ok", "{results:#?}");

    let denials: Vec<&Value> = run.events_where(&[
        ("kind", json!("net")),
        ("decision", json!("deny")),
        ("port", json!(port)),
    ]);
    assert_eq!(denials.len(), 2, "{:#?}", run.events);
    let compute = denials
        .iter()
        .find(|e| e["tool"] == "compute")
        .unwrap_or_else(|| panic!("no denial attributed to compute: {denials:#?}"));
    // Identity: who launched it, on which host, through which client.
    assert_eq!(compute["user"], "root");
    assert_eq!(compute["uid"], 0);
    assert!(compute["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(compute["client"]["name"], "mcp", "{compute}");
    assert!(compute["call_id"].is_number(), "{compute}");
    assert_eq!(compute["calls_in_flight"].as_array().map(Vec::len), Some(1));
    let idle = denials
        .iter()
        .find(|e| e["tool"].is_null())
        .unwrap_or_else(|| panic!("no idle denial: {denials:#?}"));
    assert_eq!(idle["call_id"], Value::Null);

    // tool_call records: outcome per call, refused one included.
    let calls = run.events_where(&[("kind", json!("tool_call"))]);
    let outcome = |tool: &str| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c["tool"] == tool)
            .map(|c| c["outcome"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(outcome("fetch"), vec!["ok", "ok"]);
    assert_eq!(outcome("secret_tool"), vec!["refused"]);
    assert!(calls.iter().all(|c| c.get("args_sha256").is_some()));
    // The denial's call id is the compute call's id.
    let compute_call = calls
        .iter()
        .find(|c| c["tool"] == "compute")
        .expect("compute tool_call record");
    assert_eq!(compute_call["call_id"], compute["call_id"]);
}

#[test]
fn syscall_counts_per_call_match_the_workload() {
    let sc = Scenario::new("syscalls", &policy(9));
    let steps = json!([
        {"tool": "getppid_loop", "args": {"n": 1000}},
        {"tool": "getppid_loop", "args": {"n": 250}},
    ]);
    let cmd = server_cmd();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (results, run) = sdk_drive(&sc, &steps, &cmd);
    assert_eq!(results.len(), 2, "{results:#?} {run:?}");
    let calls = run.events_where(&[
        ("kind", json!("tool_call")),
        ("tool", json!("getppid_loop")),
    ]);
    let counts: Vec<u64> = calls
        .iter()
        .map(|c| c["syscalls"]["getppid"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(counts, vec![1000, 250], "{calls:#?}");
    assert!(calls.iter().all(|c| c["syscalls_shared"] == false));
}

#[test]
fn network_bytes_per_call_match_the_workload() {
    use std::io::{Read, Write};
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = l.local_addr().expect("addr").port();
    // The peer outside the sandbox: read everything, answer 5000 bytes.
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        s.write_all(&[b'y'; 5000]).expect("write");
        got.len()
    });
    let sc = Scenario::new("bytes", &policy(port));
    let steps = json!([{"tool": "send_bytes", "args": {"port": port, "n": 100_000}}]);
    let cmd = server_cmd();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let (results, run) = sdk_drive(&sc, &steps, &cmd);
    assert_eq!(
        results[0]["text"], "sent=100000 received=5000",
        "{results:#?} {run:?}"
    );
    assert_eq!(peer.join().expect("peer"), 100_000);
    let calls = run.events_where(&[("kind", json!("tool_call")), ("tool", json!("send_bytes"))]);
    assert_eq!(calls.len(), 1, "{:#?}", run.events);
    assert_eq!(calls[0]["net_bytes_out"], 100_000, "{}", calls[0]);
    assert_eq!(calls[0]["net_bytes_in"], 5000, "{}", calls[0]);
    assert!(calls[0]["request_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(calls[0]["response_bytes"].as_u64().unwrap_or(0) > 0);
}
