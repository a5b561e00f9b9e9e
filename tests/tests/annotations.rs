//! Declared capabilities: a tool that declares `openWorldHint: false` gets
//! no network egress during its calls, even where the server's rules allow
//! it; the annotations are recorded and a change between runs is reported.
use std::net::TcpListener;

use mcp_warden_tests::{python_read_rules, repo_root, sdk_drive, venv_python, Scenario};
use serde_json::{json, Value};

fn run(port: u16, variant: &str) -> (Vec<Value>, mcp_warden_tests::Run) {
    // `env` sets the variant and execs the interpreter: allow that exec.
    let python = std::fs::canonicalize(venv_python()).expect("python");
    let policy = format!(
        "version = 1\nserver = \"annotated\"\n\n[files]\n{}\n\n[network]\nconnect = [\"127.0.0.1:{port}\"]\n\n[exec]\nallow = [\"{}\"]\n",
        python_read_rules(),
        python.display()
    );
    let sc = Scenario::new("annot", &policy);
    let server = [
        "/usr/bin/env".to_string(),
        format!("TOOLBOX_VARIANT={variant}"),
        venv_python().display().to_string(),
        repo_root()
            .join("tests/fixtures/sdk/tool_server.py")
            .display()
            .to_string(),
    ];
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let steps = json!([
        {"list": true},
        {"tool": "fetch", "args": {"port": port}},
        {"tool": "offline_lookup", "args": {"port": port}},
    ]);
    sdk_drive(&sc, &steps, &server)
}

#[test]
fn closed_world_tools_get_no_egress_and_changes_are_reported() {
    let _ = std::fs::remove_file("/var/lib/mcp-warden/annotations/annotated.json");
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = l.local_addr().expect("addr").port();

    let (results, first) = run(port, "1");
    assert_eq!(results.len(), 3, "{results:#?} {first:?}");
    assert_eq!(results[1]["text"], "ok", "fetch may connect: {results:#?}");
    assert_eq!(
        results[2]["text"], "errno=1",
        "offline_lookup declared openWorldHint: false: {results:#?}"
    );
    let denied = first.events_where(&[("kind", json!("net")), ("decision", json!("deny"))]);
    assert_eq!(denied.len(), 1, "{:#?}", first.events);
    assert_eq!(denied[0]["tool"], "offline_lookup");
    assert_eq!(
        denied[0]["reason"],
        "the tool declared openWorldHint: false"
    );
    let listed = first.events_where(&[("event", json!("tools_listed"))]);
    assert_eq!(
        listed[0]["annotations"]["offline_lookup"]["openWorldHint"], false,
        "{listed:#?}"
    );
    assert!(first
        .events_where(&[("event", json!("annotations_changed"))])
        .is_empty());

    // The next run declares otherwise: the change is reported, and the
    // tool may now use the server's network rights.
    let (results, second) = run(port, "2");
    assert_eq!(results[2]["text"], "ok", "{results:#?} {second:?}");
    let changed = second.events_where(&[("event", json!("annotations_changed"))]);
    assert_eq!(changed.len(), 1, "{:#?}", second.events);
    assert_eq!(
        changed[0]["before"]["offline_lookup"]["openWorldHint"],
        false
    );
    assert_eq!(changed[0]["after"]["offline_lookup"]["openWorldHint"], true);
}

/// A tool that declared `readOnlyHint: true` changes nothing on disk, even
/// where the server's rules allow writing: BPF-LSM refuses the write
/// (EPERM); the fallback cannot refuse it (Landlock holds the server's
/// rules for the whole run), so the agent judges it, ends the tree and
/// answers the call with the reason. `enforce_annotations = false` turns
/// this off.
#[test]
fn a_read_only_tool_may_not_write() {
    let dir = mcp_warden_tests::TempDir::new("annot-ro");
    let data = std::fs::canonicalize(dir.path()).expect("dir");
    let target = data.join("notes.txt");
    std::fs::write(&target, b"").expect("write");
    let read = mcp_warden_tests::python_read_rules_resolved(&[]);
    let policy = |extra: &str| {
        format!(
            "version = 1\nserver = \"annotated-ro\"\n\n[files]\n{read}\nwrite = [{:?}]\n{extra}",
            format!("{}/**", data.display())
        )
    };
    let server = mcp_warden_tests::sdk_tool_server();
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let path = target.display().to_string();
    let steps = json!([
        {"list": true},
        {"tool": "write_file", "args": {"path": path}},
        {"tool": "inspect_file", "args": {"path": path}},
    ]);

    let sc = Scenario::new("annot-ro", &policy(""));
    let (results, run) = sdk_drive(&sc, &steps, &server);
    let backend = run
        .events_where(&[("event", json!("started"))])
        .first()
        .map(|e| e["backend"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(
        results[1]["text"], "ok",
        "write_file may write: {results:#?}\n{run:?}"
    );
    let denied = run.events_where(&[
        ("kind", json!("file")),
        ("decision", json!("deny")),
        ("path", json!(path)),
    ]);
    assert_eq!(denied.len(), 1, "{:#?}", run.events);
    let e = denied[0];
    assert_eq!(e["tool"], "inspect_file", "{e}");
    assert!(e["call_id"].is_number(), "{e}");
    assert_eq!(e["reason"], "the tool declared readOnlyHint: true", "{e}");
    let written = std::fs::read(&target).expect("read back");
    if backend == "bpf-lsm" {
        assert_eq!(results[2]["text"], "errno=1", "{results:#?}");
        assert_eq!(written, b"x", "the refused write changed the file");
        assert!(e.get("refused").is_none(), "{e}");
    } else {
        assert_eq!(backend, "fallback", "{run:?}");
        assert_eq!(results[2]["ok"], false, "{results:#?}");
        let err = results[2]["error"].as_str().unwrap_or("");
        assert!(
            err.contains("the server was stopped: the tool declared readOnlyHint: true"),
            "{results:#?}"
        );
        assert_eq!(e["refused"], false, "{e}");
        assert_eq!(e["action"], "kill", "{e}");
        // Detected, not refused (docs/policy.md): the open for writing
        // ran; the kill lands before or after the byte is written.
        assert!(written == b"x" || written == b"xx", "{written:?}");
    }

    // Switched off: the declared hint is not held.
    std::fs::write(&target, b"").expect("write");
    let sc = Scenario::new(
        "annot-ro-off",
        &policy("\n[mcp]\nenforce_annotations = false\n"),
    );
    let (results, run) = sdk_drive(&sc, &steps, &server);
    assert_eq!(results[2]["text"], "ok", "{results:#?}\n{run:?}");
    assert!(
        run.events_where(&[("decision", json!("deny")), ("path", json!(path))])
            .is_empty(),
        "{results:#?}\n{:#?}",
        run.events
    );
    assert_eq!(
        std::fs::read(&target).expect("read back"),
        b"xx",
        "{results:#?}"
    );
}
