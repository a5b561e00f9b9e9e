//! Governance of server-initiated requests: sampling allowed, logged or
//! refused per the policy's `[mcp]` section, each one an event; with the
//! official MCP Python SDK on both sides.
use mcp_warden_tests::{python_read_rules, sdk_drive, Scenario};
use serde_json::{json, Value};

fn run_with(sampling: &str) -> (Vec<Value>, mcp_warden_tests::Run) {
    let policy = format!(
        "version = 1\nserver = \"toolbox\"\n\n[files]\n{}\n\n[tools]\nallow = [\"ask_model\"]\n\n[mcp]\nsampling = \"{sampling}\"\n",
        python_read_rules()
    );
    let sc = Scenario::new("sampling", &policy);
    let server = mcp_warden_tests::sdk_tool_server();
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let steps = json!([{"tool": "ask_model", "args": {"question": "the answer?"}}]);
    sdk_drive(&sc, &steps, &server)
}

fn request_event(run: &mcp_warden_tests::Run) -> Value {
    let ev = run.events_where(&[("event", json!("server_request"))]);
    assert_eq!(ev.len(), 1, "{:#?}", run.events);
    ev[0].clone()
}

#[test]
fn sampling_denied_never_reaches_the_client() {
    let (results, run) = run_with("deny");
    let text = results[0]["text"].as_str().unwrap_or("");
    assert!(text.starts_with("sampling failed:"), "{results:#?} {run:?}");
    assert!(text.contains("denied by the policy"), "{text}");
    let ev = request_event(&run);
    assert_eq!(ev["method"], "sampling/createMessage");
    assert_eq!(ev["decision"], "deny");
    // It happened during the ask_model call, and the event says so.
    assert_eq!(ev["tool"], "ask_model");
    assert!(ev["call_id"].is_number(), "{ev}");
}

#[test]
fn sampling_allowed_or_logged_passes_and_is_recorded() {
    for (mode, decision) in [("allow", "allow"), ("log", "audit")] {
        let (results, run) = run_with(mode);
        assert_eq!(
            results[0]["text"], "model said: forty-two",
            "{results:#?} {run:?}"
        );
        assert_eq!(request_event(&run)["decision"], decision);
    }
}

/// Run one `fetch` call of a tool that needs approval, deciding with `verb`
/// once it is pending. Returns the call's result, the run, and whether the
/// tool reached its peer.
fn approval_run(verb: &str) -> (Value, mcp_warden_tests::Run, bool) {
    use std::net::TcpListener;
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    l.set_nonblocking(true).expect("nonblocking");
    let port = l.local_addr().expect("addr").port();
    // A server name of this test's own: `mcp-warden approvals` lists the
    // pending calls of every agent on the host.
    let name = format!("approvals-{}-{verb}", std::process::id());
    let policy = format!(
        "version = 1\nserver = \"{name}\"\n\n[files]\n{}\n\n[tools]\nallow = [\"fetch\"]\n\n[tools.fetch.network]\nconnect = [\"127.0.0.1:{port}\"]\n\n[mcp]\napproval = [\"fetch\"]\napproval_timeout = 60\n",
        python_read_rules()
    );
    let sc = Scenario::new("approval", &policy);
    let server = mcp_warden_tests::sdk_tool_server();
    let steps = json!([{"tool": "fetch", "args": {"port": port}}]);
    let drive = std::thread::spawn(move || {
        let server: Vec<&str> = server.iter().map(String::as_str).collect();
        let r = sdk_drive(&sc, &steps, &server);
        (r, sc)
    });
    // Wait for the call to show up as pending, then decide on it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let id = loop {
        let out = std::process::Command::new(mcp_warden_tests::warden())
            .arg("approvals")
            .output()
            .expect("mcp-warden approvals");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mine = format!("server {name} ");
        if let Some(line) = text
            .lines()
            .find(|l| l.contains(&mine) && l.contains("tool fetch"))
        {
            break line.split_whitespace().next().unwrap_or("").to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the call never waited for approval: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let out = std::process::Command::new(mcp_warden_tests::warden())
        .args([verb, &id])
        .output()
        .expect("mcp-warden approve/deny");
    assert!(out.status.success(), "{verb} {id}: {out:?}");
    let ((results, run), _sc) = drive.join().expect("drive thread");
    let reached = l.accept().is_ok();
    (results[0].clone(), run, reached)
}

#[test]
fn an_approval_call_runs_only_after_approve() {
    let (result, run, reached) = approval_run("approve");
    assert_eq!(result["text"], "ok", "{result} {run:?}");
    assert!(reached, "the approved call reached its peer");
    let decided = run.events_where(&[("event", json!("approval_decided"))]);
    assert_eq!(decided.len(), 1, "{:#?}", run.events);
    assert_eq!(decided[0]["decision"], "approved");
    assert_eq!(decided[0]["decided_by"], "root");
}

#[test]
fn an_approval_call_never_runs_after_deny() {
    let (result, run, reached) = approval_run("deny");
    assert_eq!(result["ok"], false, "{result} {run:?}");
    assert!(
        result["error"]
            .as_str()
            .is_some_and(|e| e.contains("denied by root")),
        "{result}"
    );
    assert!(!reached, "a denied call must never reach its peer");
    let calls = run.events_where(&[("kind", json!("tool_call")), ("tool", json!("fetch"))]);
    assert_eq!(calls.len(), 1, "{:#?}", run.events);
    assert_eq!(calls[0]["outcome"], "refused");
}
