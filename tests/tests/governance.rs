//! Governance of server-initiated requests: sampling allowed, logged or
//! refused per the policy's `[mcp]` section, each one an event; with the
//! official MCP Python SDK on both sides.
use mcp_warden_tests::{python_read_rules, repo_root, sdk_drive, venv_python, Scenario};
use serde_json::{json, Value};

fn run_with(sampling: &str) -> (Vec<Value>, mcp_warden_tests::Run) {
    let policy = format!(
        "version = 1\nserver = \"toolbox\"\n\n[files]\n{}\n\n[tools]\nallow = [\"ask_model\"]\n\n[mcp]\nsampling = \"{sampling}\"\n",
        python_read_rules()
    );
    let sc = Scenario::new("sampling", &policy);
    let server = [
        venv_python().display().to_string(),
        repo_root()
            .join("tests/fixtures/sdk/tool_server.py")
            .display()
            .to_string(),
    ];
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
