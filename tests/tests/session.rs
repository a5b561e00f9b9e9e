//! Nothing outlives its session: when the client goes away, the server's
//! whole tree ends (after a grace period), a setsid grandchild included.
use std::process::Stdio;

use mcp_warden_tests::{assert_no_leftover_cgroups, base_read_rules, Scenario, TempDir};
use serde_json::json;

#[test]
fn a_closed_client_leaves_no_process_behind() {
    let out = TempDir::new("session-out");
    let pidfile = out.path().join("grandchild.pid");
    let policy = format!(
        "version = 1\nserver = \"lingering\"\n\n[files]\n{}\nwrite = [\"{}/**\"]\n\n[exec]\nallow = [\"/usr/bin/**\", \"/bin/**\"]\n",
        base_read_rules(&["/bin/**"]),
        out.path().display()
    );
    let sc = Scenario::new("session", &policy);
    // The server ignores its stdin, starts a daemonized grandchild, and
    // would run for five minutes.
    let script = format!(
        "setsid sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 300' & sleep 300",
        p = pidfile.display()
    );
    let child = sc
        .command(&["/bin/sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let warden_pid = child.id();
    let out = child.wait_with_output().expect("wait");
    let run = sc.collect(warden_pid, out);
    // The main server process was killed (SIGKILL -> 128 + 9).
    assert_eq!(run.status, 137, "{run:?}");
    let gpid: i32 = std::fs::read_to_string(&pidfile)
        .expect("the grandchild started")
        .trim()
        .parse()
        .expect("pid");
    // Dead: gone, or a zombie waiting for its new parent to reap it.
    let alive = std::fs::read_to_string(format!("/proc/{gpid}/stat"))
        .map(|s| {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z")
        })
        .unwrap_or(false);
    assert!(!alive, "the setsid grandchild {gpid} survived its session");
    assert_no_leftover_cgroups(warden_pid);
    assert!(
        run.events_where(&[("kind", json!("server")), ("event", json!("exited"))])
            .len()
            == 1,
        "{:#?}",
        run.events
    );
}
