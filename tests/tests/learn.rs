//! `mcp-warden learn`, on the real kernel: learn a policy from a scripted
//! session (official MCP Python SDK client), enforce it on the same
//! session, and see a new behaviour denied and attributed to its tool call;
//! `--merge` keeps the policy small; `--diff` reports drift and exits 1; a
//! peer the server found through DNS is learned by its name.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use mcp_warden_tests::{read_events, repo_root, sdk_drive, venv_python, warden, Scenario, TempDir};
use serde_json::{json, Value};

/// The npm reference filesystem server installed by `cargo xtask setup`.
fn fs_server() -> PathBuf {
    let p = repo_root()
        .join(".cache/npm/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

/// Drive `mcp-warden ARGS -- SERVER...` with tests/fixtures/sdk/drive.py.
/// Returns the step results and drive.py's stderr (which holds the
/// warden's stderr: the SDK passes the server's stderr through).
fn drive(steps: &Value, warden_args: &[&str], server: &[&str]) -> (Vec<Value>, String) {
    let out = Command::new(venv_python())
        .arg(repo_root().join("tests/fixtures/sdk/drive.py"))
        .arg(steps.to_string())
        .arg("--")
        .arg(warden())
        .args(warden_args)
        .arg("--")
        .args(server)
        .stdin(Stdio::null())
        .output()
        .expect("run drive.py");
    let results = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (results, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every list entry of a policy file, by `table.key`: enough TOML to count
/// rules and find duplicates in what `learn` writes (one entry a line).
fn rules_of(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut table = String::new();
    let mut key: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && !line.starts_with("[\"") {
            table = line.trim_matches(['[', ']']).to_string();
        } else if let Some(k) = line.strip_suffix("= [") {
            key = Some(format!("{table}.{}", k.trim()));
        } else if line == "]" {
            key = None;
        } else if let (Some(k), true) = (&key, line.starts_with('"')) {
            let v = line.trim_end_matches(',').trim_matches('"').to_string();
            out.entry(k.clone()).or_default().push(v);
        }
    }
    out
}

/// The learned policy passes `mcp-warden check`, has no duplicate entry in
/// any list, never widens to the root, a home or /tmp, and has at most
/// `max_rules` rules (tools.allow not counted).
fn assert_reviewable(path: &Path, max_rules: usize) -> BTreeMap<String, Vec<String>> {
    let check = Command::new(warden())
        .arg("check")
        .arg(path)
        .output()
        .expect("run mcp-warden check");
    let text = std::fs::read_to_string(path).expect("read learned policy");
    assert!(
        check.status.success(),
        "check failed: {}\n{text}",
        String::from_utf8_lossy(&check.stderr)
    );
    let rules = rules_of(&text);
    let mut n = 0;
    for (k, v) in &rules {
        let set: BTreeSet<&String> = v.iter().collect();
        assert_eq!(set.len(), v.len(), "duplicates in {k}:\n{text}");
        for r in v {
            for bad in [
                "/**",
                "/tmp/**",
                "/home/**",
                "${HOME}/**",
                "/root/**",
                "/etc/**",
            ] {
                assert_ne!(r, bad, "too wide in {k}:\n{text}");
            }
        }
        if k != "tools.allow" {
            n += v.len();
        }
    }
    assert!(n <= max_rules, "{n} rules (max {max_rules}):\n{text}");
    rules
}

/// A denial of the server's own /proc entries at start: learn leaves them
/// out on purpose (docs/policy.md), node and python run without them.
fn own_proc_entry(e: &Value) -> bool {
    let p = e["path"].as_str().unwrap_or("");
    let own = p.starts_with("/proc/self/")
        || p.strip_prefix("/proc/").is_some_and(|r| {
            r.split('/')
                .next()
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        });
    own && e["tool"].is_null() && e["kind"] == "file"
}

fn tool_results_ok(results: &[Value], n: usize) {
    assert!(results.len() >= n, "{results:#?}");
    for r in &results[..n] {
        if r.get("list").is_some() {
            continue;
        }
        assert_eq!(r["ok"], true, "{results:#?}");
    }
}

#[test]
fn filesystem_server_learn_enforce_diff() {
    mcp_warden_tests::require_root();
    let t = TempDir::new("learn-fs");
    let data = t.path().join("data");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&data).expect("mkdir data");
    std::fs::create_dir_all(&outside).expect("mkdir outside");
    std::fs::write(data.join("a.txt"), "hello").expect("write a.txt");
    std::fs::write(outside.join("secret.txt"), "top secret").expect("write secret");
    let srv = fs_server();
    let server: Vec<String> = vec![
        "node".into(),
        srv.display().to_string(),
        data.display().to_string(),
        // Allowed by the server's own arguments, never touched while
        // learning: the kernel is what keeps it out afterwards.
        outside.display().to_string(),
    ];
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let a = data.join("a.txt").display().to_string();
    let b = data.join("b.txt").display().to_string();
    let session = json!([
        {"list": true},
        {"tool": "read_text_file", "args": {"path": a}},
        {"tool": "list_directory", "args": {"path": data.display().to_string()}},
        {"tool": "write_file", "args": {"path": b, "content": "written"}},
        {"tool": "read_text_file", "args": {"path": b}},
    ]);

    // 1. Learn.
    let learned = t.path().join("learned.toml");
    let events = t.path().join("learn-events.jsonl");
    let (results, stderr) = drive(
        &session,
        &[
            "learn",
            "--out",
            learned.to_str().unwrap_or_default(),
            "--events",
            events.to_str().unwrap_or_default(),
        ],
        &server,
    );
    assert_eq!(results.len(), 5, "{results:#?}\n{stderr}");
    tool_results_ok(&results, 5);
    assert_eq!(results[4]["text"], "written");
    assert!(learned.exists(), "no policy written:\n{stderr}");
    let rules = assert_reviewable(&learned, 20);
    let text = std::fs::read_to_string(&learned).unwrap_or_default();
    assert_eq!(
        rules.get("tools.allow").cloned().unwrap_or_default(),
        vec!["list_directory", "read_text_file", "write_file"],
        "{text}"
    );
    // Startup reads are the server's; the data tree is the tools'.
    assert!(
        rules
            .get("files.read")
            .is_some_and(|r| r.iter().any(|p| p.ends_with("node_modules/**"))),
        "the server's package tree: {text}"
    );
    let data_tree = format!("{}/**", data.display());
    assert_eq!(
        rules.get("tools.write_file.files.write"),
        Some(&vec![data_tree.clone()]),
        "{text}"
    );
    let outside_s = outside.display().to_string();
    assert!(
        rules.values().flatten().all(|r| !r.starts_with(&outside_s)),
        "learned something about a directory it never touched: {text}"
    );
    // Every rule says how often it was seen.
    assert!(text.contains("# seen "), "{text}");
    assert!(
        !rules
            .values()
            .flatten()
            .any(|r| r.starts_with("/proc/self") || r == "/proc/**"),
        "{text}"
    );
    let learn_events = read_events(&events);
    assert!(
        learn_events.iter().all(|e| e["decision"] != "deny"),
        "learn mode refused something: {learn_events:#?}"
    );

    // 2. The same session passes under the learned policy, enforced; a
    //    read outside it is denied by the kernel and attributed.
    std::fs::remove_file(data.join("b.txt")).expect("rm b.txt");
    let policy = std::fs::read_to_string(&learned).expect("read learned");
    let sc = Scenario::new("learn-fs-enforce", &policy);
    let mut steps = session.as_array().cloned().unwrap_or_default();
    steps.push(json!({"tool": "read_text_file", "args": {"path": outside.join("secret.txt")}}));
    let (results, run) = sdk_drive(&sc, &Value::Array(steps), &server);
    assert_eq!(results.len(), 6, "{results:#?}\n{}", run.stderr);
    tool_results_ok(&results, 5);
    assert_eq!(results[4]["text"], "written");
    // EACCES from Landlock (fallback), EPERM from the BPF-LSM hooks.
    assert!(
        results[5]["text"]
            .as_str()
            .is_some_and(|t| t.contains("EACCES") || t.contains("EPERM")),
        "{results:#?}"
    );
    let denials: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["decision"] == "deny" && !own_proc_entry(e))
        .collect();
    assert_eq!(
        denials.len(),
        1,
        "only the new behaviour is denied: {denials:#?}"
    );
    let d = denials[0];
    assert_eq!(d["kind"], "file");
    assert_eq!(d["path"], outside.join("secret.txt").display().to_string());
    assert_eq!(d["tool"], "read_text_file");
    assert!(d["call_id"].is_number(), "{d}");

    // 3. The learned policy in audit mode: nothing is refused; the read
    //    outside it and the call of a tool tools.allow leaves out are
    //    `audit` records, attributed; what the policy allows is not.
    std::fs::remove_file(data.join("b.txt")).expect("rm b.txt");
    let sc = Scenario::new(
        "learn-fs-audit",
        &policy.replace("mode = \"enforce\"", "mode = \"audit\""),
    );
    let steps = json!([
        {"tool": "read_text_file", "args": {"path": a}},
        {"tool": "read_text_file", "args": {"path": outside.join("secret.txt")}},
        {"tool": "get_file_info", "args": {"path": a}},
    ]);
    let (results, run) = sdk_drive(&sc, &steps, &server);
    assert_eq!(results.len(), 3, "{results:#?}\n{}", run.stderr);
    tool_results_ok(&results, 3);
    assert_eq!(results[1]["text"], "top secret", "audit refuses nothing");
    assert!(
        run.events.iter().all(|e| e["decision"] != "deny"),
        "{:#?}",
        run.events
    );
    let audits: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["decision"] == "audit")
        .collect();
    let secret = audits
        .iter()
        .find(|e| e["path"] == outside.join("secret.txt").display().to_string())
        .unwrap_or_else(|| panic!("no audit record of the secret read: {audits:#?}"));
    assert_eq!(secret["kind"], "file");
    assert_eq!(secret["tool"], "read_text_file");
    assert!(secret["call_id"].is_number());
    assert!(
        audits
            .iter()
            .any(|e| e["kind"] == "tool_call" && e["tool"] == "get_file_info"),
        "{audits:#?}"
    );
    // Precise: nothing the policy allows (the server's package, the data
    // tree) is reported. get_file_info may read time zone data.
    for e in &audits {
        let p = e["path"].as_str().unwrap_or("");
        assert!(
            e["kind"] == "tool_call"
                || own_proc_entry(e)
                || p == outside.join("secret.txt").display().to_string()
                || (e["tool"] == "get_file_info" && p.starts_with("/usr/share/zoneinfo")),
            "unexpected audit record {e}"
        );
    }

    // 4. --diff: the same read is drift, named with its tool; exit 1.
    let drift = t.path().join("drift.jsonl");
    let mut child = Command::new(warden())
        .args(["learn", "--diff"])
        .arg(&learned)
        .arg("--out")
        .arg(&drift)
        .arg("--")
        .args(&server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn learn --diff");
    let mut sin = child.stdin.take().expect("stdin");
    let sout = child.stdout.take().expect("stdout");
    let msgs = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "learn-test", "version": "1"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "read_text_file", "arguments": {"path": outside.join("secret.txt")}}}),
    ];
    for m in &msgs {
        writeln!(sin, "{m}").expect("write request");
    }
    // Wait for the call's response, then end the session.
    let mut answered = false;
    for line in BufReader::new(sout).lines() {
        let Ok(line) = line else { break };
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["id"] == 2 {
            answered = true;
            break;
        }
    }
    assert!(answered, "no answer to the tools/call");
    drop(sin);
    let out = child.wait_with_output().expect("wait learn --diff");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "drift exits 1: {err}");
    assert!(
        err.contains("secret.txt in tool read_text_file"),
        "readable drift: {err}"
    );
    let lines: Vec<Value> = read_events(&drift);
    let secret = lines
        .iter()
        .find(|l| l["target"] == outside.join("secret.txt").display().to_string())
        .unwrap_or_else(|| panic!("no drift line for the secret: {lines:#?}"));
    assert_eq!(secret["tool"], "read_text_file");
    assert_eq!(secret["key"], "files.read");
}

fn toolbox() -> Vec<String> {
    mcp_warden_tests::sdk_tool_server()
}

#[test]
fn python_server_network_peer_learned_per_tool_and_merged() {
    mcp_warden_tests::require_root();
    let t = TempDir::new("learn-py");
    let known = TcpListener::bind("127.0.0.1:0").expect("listen");
    let known_port = known.local_addr().expect("addr").port();
    let new = TcpListener::bind("127.0.0.1:0").expect("listen");
    let new_port = new.local_addr().expect("addr").port();
    let server = toolbox();
    let server: Vec<&str> = server.iter().map(String::as_str).collect();

    let learned = t.path().join("learned.toml");
    let session = json!([
        {"tool": "fetch", "args": {"port": known_port}},
        {"tool": "getppid_loop", "args": {"n": 3}},
    ]);
    let (results, stderr) = drive(
        &session,
        &["learn", "--out", learned.to_str().unwrap_or_default()],
        &server,
    );
    assert_eq!(results.len(), 2, "{results:#?}\n{stderr}");
    assert_eq!(results[0]["text"], "ok", "{results:#?}");
    assert!(learned.exists(), "no policy written:\n{stderr}");
    let rules = assert_reviewable(&learned, 30);
    let text = std::fs::read_to_string(&learned).unwrap_or_default();
    // The peer belongs to fetch alone: it was seen only inside its calls.
    assert_eq!(
        rules.get("tools.fetch.network.connect"),
        Some(&vec![format!("127.0.0.1:{known_port}")]),
        "{text}"
    );
    assert!(!rules.contains_key("network.connect"), "{text}");
    // The interpreter's install tree (under the home: ${HOME}).
    assert!(
        rules
            .get("files.read")
            .is_some_and(|r| r.iter().any(|p| p.contains(".venv/**"))),
        "{text}"
    );

    // Enforced: the learned peer works, a new one is denied and attributed.
    let policy = std::fs::read_to_string(&learned).expect("read learned");
    let sc = Scenario::new("learn-py-enforce", &policy);
    let steps = json!([
        {"tool": "fetch", "args": {"port": known_port}},
        {"tool": "getppid_loop", "args": {"n": 3}},
        {"tool": "fetch", "args": {"port": new_port}},
    ]);
    let (results, run) = sdk_drive(&sc, &steps, &server);
    assert_eq!(results.len(), 3, "{results:#?}\n{}", run.stderr);
    assert_eq!(results[0]["text"], "ok", "{results:#?}\n{}", run.stderr);
    assert_eq!(results[1]["text"], "done", "{results:#?}");
    assert_eq!(results[2]["text"], "errno=1", "{results:#?}");
    let denials: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["decision"] == "deny" && !own_proc_entry(e))
        .collect();
    assert_eq!(denials.len(), 1, "{denials:#?}");
    assert_eq!(denials[0]["kind"], "net");
    assert_eq!(denials[0]["port"], new_port);
    assert_eq!(denials[0]["tool"], "fetch");
    assert!(denials[0]["call_id"].is_number());

    // The learned policy in audit mode: the new peer and a program the
    // policy does not allow both go through, reported as `audit` and
    // attributed; so is the call of a tool tools.allow leaves out.
    let sc = Scenario::new(
        "learn-py-audit",
        &policy.replace("mode = \"enforce\"", "mode = \"audit\""),
    );
    let steps = json!([
        {"tool": "fetch", "args": {"port": new_port}},
        {"tool": "run_true", "args": {}},
    ]);
    let (results, run) = sdk_drive(&sc, &steps, &server);
    assert_eq!(results.len(), 2, "{results:#?}\n{}", run.stderr);
    assert_eq!(results[0]["text"], "ok", "{results:#?}");
    assert_eq!(results[1]["text"], "exit=0", "{results:#?}");
    assert!(
        run.events
            .iter()
            .all(|e| e["decision"] != "deny" || own_proc_entry(e)),
        "{:#?}",
        run.events
    );
    let audit = |kind: &str, tool: &str| -> Vec<&Value> {
        run.events
            .iter()
            .filter(|e| e["decision"] == "audit" && e["kind"] == kind && e["tool"] == tool)
            .collect()
    };
    let net = audit("net", "fetch");
    assert!(
        net.iter()
            .any(|e| e["port"] == new_port && e["call_id"].is_number()),
        "{:#?}",
        run.events
    );
    let exec = audit("exec", "run_true");
    assert!(
        exec.iter()
            .any(|e| e["path"].as_str().is_some_and(|p| p.ends_with("/true"))),
        "{:#?}",
        run.events
    );
    assert_eq!(audit("tool_call", "run_true").len(), 1, "{:#?}", run.events);

    // --merge: a second run that also calls compute; the union stays free
    // of duplicates and about as small, and keeps what both runs saw.
    let merged = t.path().join("merged.toml");
    let session2 = json!([
        {"tool": "fetch", "args": {"port": known_port}},
        {"tool": "compute", "args": {"port": new_port}},
    ]);
    let (results, stderr) = drive(
        &session2,
        &[
            "learn",
            "--out",
            merged.to_str().unwrap_or_default(),
            "--merge",
            learned.to_str().unwrap_or_default(),
        ],
        &server,
    );
    assert_eq!(results.len(), 2, "{results:#?}\n{stderr}");
    let before: usize = rules
        .iter()
        .filter(|(k, _)| *k != "tools.allow")
        .map(|(_, v)| v.len())
        .sum();
    assert!(merged.exists(), "no policy written:\n{stderr}");
    let m = assert_reviewable(&merged, before + 3);
    let mtext = std::fs::read_to_string(&merged).unwrap_or_default();
    assert_eq!(
        m.get("tools.allow").cloned().unwrap_or_default(),
        vec!["compute", "fetch", "getppid_loop"],
        "{mtext}"
    );
    assert_eq!(
        m.get("tools.compute.network.connect"),
        Some(&vec![format!("127.0.0.1:{new_port}")]),
        "{mtext}"
    );
    // fetch's peer was seen in both runs: its count adds up.
    assert!(mtext.contains("# seen 2 times"), "{mtext}");
}

/// A DNS server for the test's own names on 127.53.X.Y:53, UDP and TCP
/// (X.Y from the test's pid: no other test uses it; loopback only). Answers A queries
/// for its names, an empty answer for other types of them, NXDOMAIN for
/// anything else. Stops when dropped.
struct DnsResponder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DnsResponder {
    fn start(names: Vec<(String, Ipv4Addr)>) -> Self {
        let pid = std::process::id();
        let ip = Ipv4Addr::new(127, 53, (pid >> 8) as u8, pid as u8);
        let sock = UdpSocket::bind((ip, 53)).expect("bind the test's DNS responder");
        sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let tcp = TcpListener::bind(addr).expect("bind the test's DNS responder (TCP)");
        tcp.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (halt, udp_names) = (stop.clone(), names.clone());
        let udp = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !halt.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(r) = dns_answer(&buf[..n], &udp_names) {
                    let _ = sock.send_to(&r, from);
                }
            }
        });
        let halt = stop.clone();
        let tcp = std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = tcp.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(3)));
                let mut len = [0u8; 2];
                if c.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                if c.read_exact(&mut q).is_err() {
                    continue;
                }
                if let Some(r) = dns_answer(&q, &names) {
                    let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                    framed.extend(r);
                    let _ = c.write_all(&framed);
                }
            }
        });
        Self {
            addr,
            stop,
            threads: vec![udp, tcp],
        }
    }
}

impl Drop for DnsResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The response to DNS query `q` (one question), or None for garbage.
fn dns_answer(q: &[u8], names: &[(String, Ipv4Addr)]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    while *q.get(i)? != 0 {
        let l = q[i] as usize;
        labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + l)?).to_lowercase());
        i += 1 + l;
    }
    let end = i + 5;
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    q.get(..end)?;
    let hit = names.iter().find(|(n, _)| *n == labels.join("."));
    let answer = hit.filter(|_| qtype == 1).map(|(_, ip)| *ip);
    let mut r = q[..2].to_vec();
    r.push(0x84 | (q[2] & 1)); // response, authoritative, RD echoed
    r.push(0x80 | if hit.is_some() { 0 } else { 3 }); // RA; NOERROR or NXDOMAIN
    r.extend(1u16.to_be_bytes());
    r.extend(u16::from(answer.is_some()).to_be_bytes());
    r.extend([0, 0, 0, 0]);
    r.extend(&q[12..end]);
    if let Some(ip) = answer {
        // The question's name (pointer to offset 12), A, IN, TTL 60.
        r.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend(ip.octets());
    }
    Some(r)
}

/// A bare JSON-RPC client on `cmd`'s stdio: initialize, then each
/// tools/call in turn (waiting for its answer), then end the session.
/// Returns each call's text (or "error: ...") and the process output.
fn stdio_session(mut cmd: Command, calls: &[(&str, Value)]) -> (Vec<String>, Output) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mcp-warden");
    let mut sin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut answer = |id: u64| -> Value {
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if v["id"] == id {
                return v;
            }
        }
        Value::Null
    };
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "learn-test", "version": "1"}}});
    writeln!(sin, "{init}").expect("write initialize");
    let mut texts = Vec::new();
    if answer(0)["result"].is_object() {
        writeln!(
            sin,
            "{}",
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
        )
        .expect("write initialized");
        for (n, (tool, args)) in calls.iter().enumerate() {
            let id = n as u64 + 1;
            let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                "params": {"name": tool, "arguments": args}});
            writeln!(sin, "{call}").expect("write tools/call");
            let v = answer(id);
            texts.push(match v["result"]["content"][0]["text"].as_str() {
                Some(t) => t.to_string(),
                None => format!("error: {v}"),
            });
        }
    }
    drop(sin);
    let out = child.wait_with_output().expect("wait mcp-warden");
    (texts, out)
}

#[test]
fn dns_names_the_server_resolved_are_learned_as_names() {
    mcp_warden_tests::require_root();
    let t = TempDir::new("learn-dns");
    let pid = std::process::id();
    let (hi, lo) = ((pid >> 8) as u8, pid as u8);
    let peer = Ipv4Addr::new(127, 77, hi, lo);
    let elsewhere = Ipv4Addr::new(127, 78, hi, lo);
    let listener = TcpListener::bind((peer, 0)).expect("listen");
    let port = listener.local_addr().expect("addr").port();
    // Asked over TCP: a second peer on the same port.
    let peer2 = Ipv4Addr::new(127, 79, hi, lo);
    let listener2 = TcpListener::bind((peer2, port)).expect("listen");
    let name = format!("api-{pid}.example.test");
    let name2 = format!("tcp-{pid}.example.test");
    let other = format!("other-{pid}.example.test");
    let dns = DnsResponder::start(vec![
        (name.clone(), peer),
        (name2.clone(), peer2),
        (other.clone(), elsewhere),
    ]);
    let dns_addr = dns.addr.to_string();
    let call = |n: &str, tcp: bool| -> (&'static str, Value) {
        (
            "lookup_fetch",
            json!({"dns": dns_addr, "name": n, "port": port, "tcp": tcp}),
        )
    };
    let server = toolbox();

    // 1. Learn: the server asks the test's DNS server for the name, then
    //    connects to the answer.
    let learned = t.path().join("learned.toml");
    let events = t.path().join("learn-events.jsonl");
    let mut c = Command::new(warden());
    c.arg("learn")
        .arg("--out")
        .arg(&learned)
        .arg("--events")
        .arg(&events)
        .arg("--")
        .args(&server);
    let (texts, out) = stdio_session(c, &[call(&name, false), call(&name2, true)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(texts, vec!["ok", "ok"], "{stderr}");
    let rules = assert_reviewable(&learned, 30);
    let text = std::fs::read_to_string(&learned).unwrap_or_default();
    // The peer is learned by its name (the agent resolves it again when
    // the policy is loaded); the resolver by its address.
    assert_eq!(
        rules.get("tools.lookup_fetch.network.connect"),
        Some(&vec![
            dns_addr.clone(),
            format!("{name}:{port}"),
            format!("{name2}:{port}")
        ]),
        "{text}"
    );
    assert!(
        rules
            .values()
            .flatten()
            .all(|r| !r.starts_with(&peer.to_string()) && !r.starts_with(&peer2.to_string())),
        "the bare addresses are not learned: {text}"
    );
    assert!(
        text.contains(&format!("# seen 1 time: resolved by the server to {peer}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("#   {name} (1 answer: {peer})")),
        "{text}"
    );
    // The kernel saw the answer arrive, during the call.
    let answers: Vec<Value> = read_events(&events)
        .into_iter()
        .filter(|e| e["op"] == "dns")
        .collect();
    assert_eq!(answers.len(), 2, "{answers:#?}");
    for (a, (n, ip, proto)) in answers
        .iter()
        .zip([(&name, peer, "udp"), (&name2, peer2, "tcp")])
    {
        assert_eq!(a["kind"], "net");
        assert_eq!(a["name"], n.as_str());
        assert_eq!(a["answers"], json!([ip.to_string()]));
        assert_eq!(a["protocol"], proto);
        assert_eq!(a["addr"], dns.addr.ip().to_string());
        assert_eq!(a["port"], 53);
        assert_eq!(a["tool"], "lookup_fetch");
        assert!(a["call_id"].is_number(), "{a}");
    }

    // 2. Enforced: the agent resolves the name itself (at the test's DNS
    //    server); the same call passes, a name the policy does not hold is
    //    refused at connect.
    let policy = std::fs::read_to_string(&learned).expect("read learned");
    let sc = Scenario::new("learn-dns-enforce", &policy);
    let server: Vec<&str> = server.iter().map(String::as_str).collect();
    let mut c = sc.command(&server);
    c.env("MCP_WARDEN_DNS", &dns_addr);
    let (texts, out) = stdio_session(
        c,
        &[call(&name, false), call(&name2, true), call(&other, false)],
    );
    let run = sc.collect(0, out);
    assert_eq!(texts, vec!["ok", "ok", "errno=1"], "{}", run.stderr);
    let denials: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["decision"] == "deny" && !own_proc_entry(e))
        .collect();
    assert_eq!(denials.len(), 1, "{denials:#?}");
    assert_eq!(denials[0]["kind"], "net");
    assert_eq!(denials[0]["addr"], elsewhere.to_string());
    assert_eq!(denials[0]["port"], port);
    assert_eq!(denials[0]["tool"], "lookup_fetch");
    drop((listener, listener2));
}
