//! The agent as a service: a real `mcp-warden agent` (its own socket, pin
//! root, cgroup parent and audit log, so it never collides with an installed
//! one), real `mcp-warden run` clients (root and an unprivileged user), a
//! confined mw-probe, kill -9 of the agent, restart and re-adoption.
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use mcp_warden_tests::{base_read_rules, read_events, require_root, warden, TempDir};
use serde_json::{json, Value};

const PROBE: &str = env!("CARGO_BIN_EXE_mw-probe");

fn cgroup2() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next() == Some("cgroup2"))
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .expect("cgroup2 mount")
}

/// A test agent. Drop kills it and removes its pins, cgroups and socket.
struct Agent {
    dir: TempDir,
    config: PathBuf,
    sock: PathBuf,
    audit: PathBuf,
    pin_root: PathBuf,
    cgroup_parent: String,
    policies: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Every agent pid started (each publishes an approval socket).
    pids: Vec<u32>,
}

impl Agent {
    fn new(tag: &str, allow_user_policies: bool) -> Self {
        require_root();
        let dir = TempDir::new(tag);
        let uniq = format!("mw-test-{tag}-{}", std::process::id());
        let sock = dir.path().join("run/agent.sock");
        let audit = dir.path().join("audit.jsonl");
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).expect("mkdir policies");
        let pin_root = PathBuf::from("/sys/fs/bpf").join(&uniq);
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "socket = {:?}\nstate_dir = {:?}\npin_root = {:?}\npolicy_dir = {:?}\n\
                 audit_log = {:?}\nallow_user_policies = {}\ncgroup_parent = {:?}\n\
                 policy_poll_ms = 300\n",
                sock,
                dir.path().join("state"),
                pin_root,
                policies,
                audit,
                allow_user_policies,
                uniq
            ),
        )
        .expect("write config");
        Self {
            dir,
            config,
            sock,
            audit,
            pin_root,
            cgroup_parent: uniq,
            policies,
            child: None,
            starts: 0,
            pids: Vec::new(),
        }
    }

    fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.path().join(format!("agent-{}.log", self.starts)))
            .expect("agent log");
        let child = Command::new(warden())
            .arg("agent")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.pids.push(child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.try_status() {
                if v["agent_pid"].as_u64() == self.child.as_ref().map(|c| c.id() as u64) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent did not come up; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("agent-{}.log", self.starts)))
            .unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(warden());
        c.env("MCP_WARDEN_SOCKET", &self.sock);
        c
    }

    fn try_status(&self) -> Option<Value> {
        let out = self.cmd().args(["status", "--json"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("status failed; agent log:\n{}", self.log()))
    }

    fn policy(&self, name: &str, connect: &str) {
        std::fs::write(
            self.policies.join(format!("{name}.toml")),
            format!(
                "version = 1\nserver = {name:?}\n\n[files]\n{}\n\n[network]\nconnect = [{connect:?}]\n",
                base_read_rules(&[])
            ),
        )
        .expect("write policy");
    }

    /// Events in the audit log matching every pair.
    fn events(&self, pairs: &[(&str, Value)]) -> Vec<Value> {
        read_events(&self.audit)
            .into_iter()
            .filter(|e| pairs.iter().all(|(k, v)| e.get(*k) == Some(v)))
            .collect()
    }

    /// Wait until the audit log has at least `n` events matching `pairs`.
    fn wait_events(&self, n: usize, pairs: &[(&str, Value)]) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ev = self.events(pairs);
            if ev.len() >= n {
                return ev;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} events matching {pairs:?}, got {}:\n{:#?}\nagent log:\n{}",
                ev.len(),
                read_events(&self.audit),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ids of the BPF programs the agent process holds fds to.
    fn held_prog_ids(&self) -> BTreeSet<u32> {
        let mut ids = BTreeSet::new();
        let dir = format!("/proc/{}/fdinfo", self.pid());
        for e in std::fs::read_dir(&dir).expect("fdinfo").flatten() {
            let Ok(s) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            if !s.lines().any(|l| l.starts_with("prog_type:")) {
                continue;
            }
            if let Some(id) = s
                .lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
            {
                ids.insert(id);
            }
        }
        ids
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        // End whatever is left in the test's instance cgroups, remove them.
        let parent = cgroup2().join(&self.cgroup_parent);
        if let Ok(rd) = std::fs::read_dir(&parent) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                    for _ in 0..100 {
                        if std::fs::remove_dir(e.path()).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(&parent);
        let _ = std::fs::remove_dir_all(&self.pin_root);
        for pid in &self.pids {
            let _ = std::fs::remove_file(format!("/run/mcp-warden/approvals/{pid}.sock"));
        }
    }
}

/// A `mcp-warden run` whose stdout lines arrive on a channel.
struct RunClient {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl RunClient {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn run");
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Let the probe past one `wait-stdin` (which prints `ok`) and return
    /// the line of the op after it.
    fn step(&mut self) -> String {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(b"go\n").expect("write stdin");
        w.flush().expect("flush");
        assert_eq!(self.next_line(), "ok", "wait-stdin");
        self.next_line()
    }

    fn next_line(&mut self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("a line from the probe")
    }

    fn wait(mut self) -> i32 {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "run did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn closed_port() -> u16 {
    // A port nobody listens on: bind, read the port, close.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn instances(status: &Value) -> Vec<Value> {
    status["instances"].as_array().cloned().unwrap_or_default()
}

fn wait_for<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn survives_kill9_and_readopts() {
    let mut agent = Agent::new("readopt", false);
    agent.policy("probe", "127.0.0.1:1");
    agent.start();
    let st = agent.status();
    assert_eq!(st["programs"], "loaded", "{st:#}");
    let first_progs = agent.held_prog_ids();
    assert!(!first_progs.is_empty());

    let port = closed_port();
    let target = format!("127.0.0.1:{port}");
    let mut cmd = agent.cmd();
    cmd.args(["run", "--server", "probe", "--", PROBE]);
    for _ in 0..5 {
        cmd.args(["wait-stdin", ";", "tcp-connect", &target, ";"]);
    }
    cmd.arg("wait-stdin");
    let mut run = RunClient::spawn(cmd);

    // 1. Agent up: the connect is denied in the kernel, and reported.
    assert_eq!(run.step(), "errno=1");
    let inst = instances(&agent.status());
    assert_eq!(inst.len(), 1, "{inst:#?}");
    let name = inst[0]["instance"].as_str().expect("name").to_string();
    assert!(inst[0]["policy_source"]
        .as_str()
        .expect("source")
        .starts_with("file:"));
    let deny = [
        ("kind", json!("net")),
        ("decision", json!("deny")),
        ("instance", json!(name)),
        ("port", json!(port)),
    ];
    agent.wait_events(1, &deny);

    // 2. kill -9: the links and maps stay in bpffs, the server stays confined.
    agent.kill9();
    assert_eq!(run.step(), "errno=1", "denied while no agent runs");

    // 3. Restart: the instance is re-adopted, no program is loaded again,
    //    and denials produce events again.
    agent.start();
    let st = agent.status();
    assert_eq!(st["programs"], "adopted", "{st:#}");
    let inst = instances(&st);
    assert_eq!(inst.len(), 1, "re-adopted instance in status: {st:#}");
    assert_eq!(inst[0]["instance"], json!(name));
    let second_progs = agent.held_prog_ids();
    assert!(
        second_progs.is_subset(&first_progs),
        "the restarted agent holds programs the first did not load: {second_progs:?} vs {first_progs:?}"
    );
    let before = agent.events(&deny).len();
    assert_eq!(run.step(), "errno=1");
    agent.wait_events(before + 1, &deny);
    // The denial that happened while no agent ran was kept in the ring
    // buffer and delivered after the restart.
    assert!(agent.events(&deny).len() >= 3, "{:#?}", agent.events(&deny));

    // 4. The run client re-identified its instance with its token.
    wait_for("the run client to re-attach", || {
        instances(&agent.status())
            .first()
            .map(|i| i["clients_attached"] == json!(1))
            .unwrap_or(false)
    });
    assert!(!agent
        .events(&[
            ("event", json!("client_attached")),
            ("instance", json!(name))
        ])
        .is_empty());

    // 5. A graceful stop (SIGTERM, as systemd does on restart) also leaves
    //    the server confined, and the next agent re-adopts it.
    let pid = agent.pid();
    // SAFETY: kill(2) of the agent this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    if let Some(mut c) = agent.child.take() {
        let st = c.wait().expect("wait agent");
        assert!(st.success(), "agent exit on SIGTERM: {st:?}");
    }
    assert_eq!(run.step(), "errno=1", "denied after a graceful stop");
    agent.start();
    let inst = instances(&agent.status());
    assert_eq!(inst.len(), 1, "re-adopted after SIGTERM: {inst:#?}");
    assert_eq!(inst[0]["instance"], json!(name));

    // 6. The server ends: the instance is torn down, nothing is left.
    assert_eq!(run.step(), "errno=1");
    let w = run.stdin.as_mut().expect("stdin");
    w.write_all(b"go\n").expect("write");
    assert_eq!(run.next_line(), "ok");
    assert_eq!(run.wait(), 0);
    wait_for("the instance to go away", || {
        instances(&agent.status()).is_empty()
    });
    agent.wait_events(1, &[("event", json!("exited")), ("instance", json!(name))]);
    let left: Vec<_> = std::fs::read_dir(cgroup2().join(&agent.cgroup_parent))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    let pinned: Vec<_> = std::fs::read_dir(agent.pin_root.join("instances"))
        .expect("pins")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(pinned.is_empty(), "instance pins left: {pinned:?}");
}

#[test]
fn unprivileged_user_runs_through_the_agent() {
    let mut agent = Agent::new("user", false);
    agent.policy("userprobe", "127.0.0.1:1");
    agent.start();
    let port = closed_port();
    let target = format!("127.0.0.1:{port}");
    // The user follows the live stream while its server runs.
    let mut follow = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(warden())
        .env("MCP_WARDEN_SOCKET", &agent.sock)
        .args(["events", "--follow", "--server", "userprobe"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("events --follow");
    let follow_out = follow.stdout.take().expect("stdout");
    let (ftx, frx) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for l in BufReader::new(follow_out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&l) {
                if ftx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let run = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(warden())
        .env("MCP_WARDEN_SOCKET", &agent.sock)
        .args([
            "run",
            "--server",
            "userprobe",
            "--",
            PROBE,
            "tcp-connect",
            &target,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run as nobody");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "stdout {stdout}\nstderr {stderr}\nagent:\n{}",
        agent.log()
    );
    assert_eq!(stdout.trim(), "errno=1", "stderr {stderr}");
    assert!(stderr.contains("DENY net connect"), "{stderr}");

    // `events --follow` as the same user streamed the denial live.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut streamed = None;
    while streamed.is_none() && Instant::now() < deadline {
        if let Ok(v) = frx.recv_timeout(Duration::from_millis(200)) {
            if v["decision"] == "deny" && v["port"] == port {
                streamed = Some(v);
            }
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let streamed = streamed.expect("the denial in `events --follow`");
    assert_eq!(streamed["uid"], 65534);

    // The denial, as `mcp-warden events` prints it.
    agent.wait_events(
        1,
        &[("server", json!("userprobe")), ("decision", json!("deny"))],
    );
    let ev = agent
        .cmd()
        .args(["events", "--server", "userprobe", "--log"])
        .arg(&agent.audit)
        .output()
        .expect("events");
    let lines: Vec<Value> = String::from_utf8_lossy(&ev.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let deny: Vec<&Value> = lines
        .iter()
        .filter(|e| e["decision"] == "deny" && e["kind"] == "net")
        .collect();
    assert_eq!(deny.len(), 1, "{lines:#?}");
    assert_eq!(deny[0]["uid"], 65534);
    assert_eq!(deny[0]["port"], port);
    assert_eq!(deny[0]["errno"], 1);
    assert!(deny[0]["policy_source"]
        .as_str()
        .expect("source")
        .starts_with(&format!("file:{}", agent.policies.display())));
    assert!(lines.iter().all(|e| e["server"] == "userprobe"));

    // A user's own policy is refused unless the agent config allows it.
    let own = agent.dir.path().join("own.toml");
    std::fs::write(&own, "version = 1\nserver = \"own\"\n").expect("write");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(warden())
        .env("MCP_WARDEN_SOCKET", &agent.sock)
        .arg("run")
        .arg("--policy")
        .arg(&own)
        .args(["--", PROBE, "exit", "0"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not accept user policies"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without an agent, a non-root run is a clear error, not a silent
    // unconfined start.
    agent.kill9();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(warden())
        .env("MCP_WARDEN_SOCKET", &agent.sock)
        .args(["run", "--server", "userprobe", "--", PROBE, "exit", "0"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no mcp-warden agent answers"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn user_policies_recorded_and_agent_socket_unreachable() {
    let mut agent = Agent::new("userpol", true);
    agent.start();
    let own = agent.dir.path().join("own.toml");
    std::fs::write(
        &own,
        format!(
            "version = 1\nserver = \"own\"\n[files]\n{}\n",
            base_read_rules(&[])
        ),
    )
    .expect("write");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(warden())
        .env("MCP_WARDEN_SOCKET", &agent.sock)
        .arg("run")
        .arg("--policy")
        .arg(&own)
        .args(["--", PROBE, "tcp-connect", "127.0.0.1:1"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = agent.wait_events(1, &[("server", json!("own")), ("decision", json!("deny"))]);
    assert_eq!(
        ev[0]["policy_source"],
        json!(format!("user:65534:{}", own.display()))
    );

    // A policy that would let the server reach the agent is refused.
    let bad = agent.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "version = 1\nserver = \"bad\"\n[network]\nunix = [\"{}/**\"]\n",
            agent.sock.parent().expect("dir").display()
        ),
    )
    .expect("write");
    let out = agent
        .cmd()
        .arg("run")
        .arg("--policy")
        .arg(&bad)
        .args(["--", PROBE, "exit", "0"])
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("covers the mcp-warden agent socket"), "{err}");
}

#[test]
fn confined_process_cannot_reach_the_agent() {
    let mut agent = Agent::new("confpeer", true);
    agent.policy("peer", "127.0.0.1:1");
    agent.start();
    let sock = agent.sock.display().to_string();
    // Twice: before and after a kill -9 and re-adoption of the agent (the
    // unix hook's links are pinned like the others).
    let mut cmd = agent.cmd();
    cmd.args([
        "run",
        "--server",
        "peer",
        "--",
        PROBE,
        "unix-connect",
        &sock,
        ";",
    ])
    .args(["wait-stdin", ";", "unix-connect", &sock, ";", "wait-stdin"]);
    let mut run = RunClient::spawn(cmd);
    assert_eq!(run.next_line(), "errno=1", "the kernel refuses the connect");
    agent.kill9();
    agent.start();
    assert_eq!(instances(&agent.status()).len(), 1);
    assert_eq!(run.step(), "errno=1", "still refused after re-adoption");
    let w = run.stdin.as_mut().expect("stdin");
    w.write_all(b"go\n").expect("write");
    assert_eq!(run.next_line(), "ok");
    assert_eq!(run.wait(), 0);
    let ev = agent.wait_events(
        2,
        &[
            ("op", json!("unix_connect")),
            ("decision", json!("deny")),
            ("path", json!(sock)),
        ],
    );
    assert_eq!(ev[0]["server"], "peer");
    // The agent never saw a request from the confined process.
    assert!(!agent.log().contains("refused pid"), "{}", agent.log());
}

#[test]
fn policy_reload_switches_running_instances_and_keeps_a_good_policy() {
    let mut agent = Agent::new("reload", false);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let target = format!("127.0.0.1:{port}");
    agent.policy("reload", "127.0.0.1:1");
    agent.start();
    let mut cmd = agent.cmd();
    cmd.args(["run", "--server", "reload", "--", PROBE]);
    for _ in 0..4 {
        cmd.args(["wait-stdin", ";", "tcp-connect", &target, ";"]);
    }
    cmd.arg("wait-stdin");
    let mut run = RunClient::spawn(cmd);
    assert_eq!(run.step(), "errno=1", "not allowed yet");
    let name = instances(&agent.status())[0]["instance"]
        .as_str()
        .expect("name")
        .to_string();
    let reloaded = [
        ("event", json!("policy_reloaded")),
        ("instance", json!(name)),
    ];

    // The policy directory changes: the running instance switches.
    agent.policy("reload", &target);
    agent.wait_events(1, &reloaded);
    assert_eq!(run.step(), "ok", "allowed after the reload");

    // A broken policy is refused with file:line:col; the good one stays.
    let file = agent.policies.join("reload.toml");
    std::fs::write(&file, "version = 1\nserver = \"reload\"\nmode = 7\n").expect("write");
    let rejected = agent.wait_events(1, &[("event", json!("policy_rejected"))]);
    let errors = rejected[0]["errors"].to_string();
    assert!(
        errors.contains(&format!("{}:3:8:", file.display())),
        "{errors}"
    );
    assert_eq!(run.step(), "ok", "the good policy is still in force");

    // SIGHUP reloads too, and reopens the audit log (rotation).
    let rotated = agent.audit.with_extension("jsonl.1");
    std::fs::rename(&agent.audit, &rotated).expect("rotate");
    agent.policy("reload", "127.0.0.1:1");
    // SAFETY: kill(2) of the agent this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    wait_for("the reload after SIGHUP", || {
        read_events(&agent.audit)
            .iter()
            .chain(read_events(&rotated).iter())
            .filter(|e| e["event"] == "policy_reloaded" && e["instance"] == json!(name))
            .count()
            >= 2
    });
    assert_eq!(run.step(), "errno=1", "narrowed again");
    let w = run.stdin.as_mut().expect("stdin");
    w.write_all(b"go\n").expect("write");
    assert_eq!(run.next_line(), "ok");
    assert_eq!(run.wait(), 0);
    // Records after the rotation went to the new file.
    agent.wait_events(1, &[("event", json!("exited")), ("instance", json!(name))]);
    drop(listener);
}

/// Per-tool rights through the agent: the run client forwards each
/// `tools/call` begin/end over the control socket, and the agent puts the
/// tool's rights in force before the call is forwarded (MCP Python SDK as
/// client and server, as in per_tool.rs).
#[test]
fn per_tool_rights_through_the_agent() {
    use mcp_warden_tests::python_read_rules;
    let mut agent = Agent::new("agenttools", false);
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = l.local_addr().expect("addr").port();
    std::fs::write(
        agent.policies.join("toolbox.toml"),
        format!(
            "version = 1\nserver = \"toolbox\"\n\n[files]\n{}\n\n[network]\nconnect = []\n\n\
             [tools]\nallow = [\"fetch\", \"compute\"]\n\n[tools.fetch.network]\n\
             connect = [\"127.0.0.1:{port}\"]\n",
            python_read_rules()
        ),
    )
    .expect("policy");
    agent.start();
    let events = agent.dir.path().join("run-events.jsonl");
    let steps = json!([
        {"tool": "fetch", "args": {"port": port}},
        {"tool": "compute", "args": {"port": port}},
        {"tool": "secret_tool", "args": {}},
        {"tool": "fetch", "args": {"port": port}},
    ]);
    let (results, out) = drive_through_agent(&agent, &steps, &events);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        results.len(),
        4,
        "{results:#?}\n{stderr}\nagent:\n{}",
        agent.log()
    );
    assert_eq!(
        results[0]["text"], "ok",
        "fetch holds its right: {results:#?}"
    );
    assert_eq!(
        results[1]["text"], "errno=1",
        "compute does not: {results:#?}"
    );
    assert_eq!(results[2]["ok"], false, "{results:#?}");
    assert_eq!(results[3]["text"], "ok", "{results:#?}");

    // The agent's audit log and the run's --events file both have the
    // attributed denial and the call records.
    for evs in [read_events(&agent.audit), read_events(&events)] {
        let deny: Vec<&Value> = evs
            .iter()
            .filter(|e| e["kind"] == "net" && e["decision"] == "deny" && e["port"] == port)
            .collect();
        assert_eq!(deny.len(), 1, "{evs:#?}");
        assert_eq!(deny[0]["tool"], "compute");
        assert!(deny[0]["call_id"].is_number());
        assert_eq!(deny[0]["client"]["name"], "mcp", "{}", deny[0]);
        let outcomes: Vec<(String, String)> = evs
            .iter()
            .filter(|e| e["kind"] == "tool_call")
            .map(|e| {
                (
                    e["tool"].as_str().unwrap_or("").to_string(),
                    e["outcome"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        for want in [
            ("fetch", "ok"),
            ("compute", "ok"),
            ("secret_tool", "refused"),
        ] {
            assert!(
                outcomes.iter().any(|(t, o)| t == want.0 && o == want.1),
                "{want:?} missing in {outcomes:?}"
            );
        }
    }
    drop(l);
}

/// Per-call file rules through the agent: a tool reading what only
/// another tool may read. BPF-LSM refuses it; the fallback detects it, the
/// agent ends the tree and the relay (a separate `run` process) answers the
/// call with the reason the agent gives, never with the file.
#[test]
fn per_tool_file_rules_through_the_agent() {
    use mcp_warden_tests::{python_read_rules, TempDir};
    let data = TempDir::new("agentfiles");
    let data = std::fs::canonicalize(data.path()).expect("dir");
    let secret = data.join("secret.txt");
    std::fs::write(&secret, b"s3cret").expect("write");
    let mut agent = Agent::new("agentfiles", false);
    std::fs::write(
        agent.policies.join("toolbox.toml"),
        format!(
            "version = 1\nserver = \"toolbox\"\n\n[files]\n{}\n\n\
             [tools.read_file.files]\nread = [{:?}]\n",
            python_read_rules(),
            format!("{}/**", data.display())
        ),
    )
    .expect("policy");
    agent.start();
    let events = agent.dir.path().join("run-events.jsonl");
    let path = secret.display().to_string();
    let steps = json!([
        {"tool": "read_file", "args": {"path": path}},
        {"tool": "peek_file", "args": {"path": path}},
    ]);
    let (results, out) = drive_through_agent(&agent, &steps, &events);
    let why = format!(
        "{results:#?}\n{}\nagent:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert_eq!(results.len(), 2, "{why}");
    assert_eq!(results[0]["text"], "ok", "{why}");
    let evs = read_events(&agent.audit);
    let deny: Vec<&Value> = evs
        .iter()
        .filter(|e| e["kind"] == "file" && e["decision"] == "deny" && e["path"] == path.as_str())
        .collect();
    assert_eq!(deny.len(), 1, "{evs:#?}");
    assert_eq!(deny[0]["tool"], "peek_file", "{}", deny[0]);
    if deny[0]["backend"] == "bpf-lsm" {
        assert_eq!(results[1]["text"], "errno=1", "{why}");
        return;
    }
    assert_eq!(results[1]["ok"], false, "{why}");
    let err = results[1]["error"].as_str().unwrap_or("");
    assert!(err.contains("the server was stopped"), "{why}");
    assert_eq!(deny[0]["refused"], false, "{}", deny[0]);
    assert_eq!(deny[0]["action"], "kill", "{}", deny[0]);
}

/// The agent dies mid-session: the next tool call is refused by the relay
/// (fail closed), never forwarded without its rights in force.
#[test]
fn tool_calls_fail_closed_when_the_agent_is_gone() {
    use mcp_warden_tests::python_read_rules;
    let mut agent = Agent::new("failclosed", false);
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = l.local_addr().expect("addr").port();
    std::fs::write(
        agent.policies.join("toolbox.toml"),
        format!(
            "version = 1\nserver = \"toolbox\"\n\n[files]\n{}\n\n[tools.fetch.network]\n\
             connect = [\"127.0.0.1:{port}\"]\n",
            python_read_rules()
        ),
    )
    .expect("policy");
    agent.start();
    let steps = json!([
        {"tool": "fetch", "args": {"port": port}},
        {"sleep_ms": 3000},
        {"tool": "fetch", "args": {"port": port}},
    ]);
    let child = drive_command(&agent, &steps, None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("drive.py");
    agent.wait_events(1, &[("kind", json!("tool_call")), ("tool", json!("fetch"))]);
    agent.kill9();
    let out = child.wait_with_output().expect("drive.py");
    let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        results.len(),
        2,
        "{results:#?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(results[0]["text"], "ok");
    assert_eq!(
        results[1]["ok"], false,
        "refused without the agent: {results:#?}"
    );
    assert!(
        results[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("agent")),
        "{results:#?}"
    );
    drop(l);
}

/// A tool that needs approval, through the agent: the call waits in the
/// agent until `mcp-warden approve`, while the client stays responsive.
#[test]
fn approval_through_the_agent() {
    use mcp_warden_tests::python_read_rules;
    let mut agent = Agent::new("approval", false);
    let l = TcpListener::bind("127.0.0.1:0").expect("listen");
    l.set_nonblocking(true).expect("nonblocking");
    let port = l.local_addr().expect("addr").port();
    std::fs::write(
        agent.policies.join("toolbox.toml"),
        format!(
            "version = 1\nserver = \"toolbox\"\n\n[files]\n{}\n\n[tools]\nallow = [\"fetch\"]\n\n\
             [tools.fetch.network]\nconnect = [\"127.0.0.1:{port}\"]\n\n[mcp]\n\
             approval = [\"fetch\"]\napproval_timeout = 60\n",
            python_read_rules()
        ),
    )
    .expect("policy");
    agent.start();
    let steps = json!([{"tool": "fetch", "args": {"port": port}}]);
    let child = drive_command(&agent, &steps, None)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("drive.py");
    let ev = agent.wait_events(1, &[("event", json!("approval_requested"))]);
    let id = ev[0]["approval_id"]
        .as_str()
        .expect("approval id")
        .to_string();
    let out = Command::new(warden())
        .args(["approve", &id])
        .output()
        .expect("approve");
    assert!(out.status.success(), "{out:?}");
    let out = child.wait_with_output().expect("drive.py");
    let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(results.len(), 1, "{results:#?}\n{stderr}");
    assert_eq!(results[0]["text"], "ok", "{results:#?}\n{stderr}");
    assert!(l.accept().is_ok(), "the approved call reached its peer");
    assert!(
        stderr.contains(&format!("mcp-warden approve {id}")),
        "{stderr}"
    );
    let decided = agent.wait_events(1, &[("event", json!("approval_decided"))]);
    assert_eq!(decided[0]["decision"], "approved");
}

/// Send request lines on one connection, return the response lines.
/// drive.py (the SDK client) running `steps` against the toolbox test
/// server through `mcp-warden run --server toolbox` and the agent.
fn drive_command(agent: &Agent, steps: &Value, events: Option<&std::path::Path>) -> Command {
    use mcp_warden_tests::{repo_root, venv_python};
    let mut c = Command::new(venv_python());
    // The SDK gives the server a minimal environment: pass the socket
    // through env(1).
    c.arg(repo_root().join("tests/fixtures/sdk/drive.py"))
        .arg(steps.to_string())
        .arg("--")
        .arg("/usr/bin/env")
        .arg(format!("MCP_WARDEN_SOCKET={}", agent.sock.display()))
        .arg(warden())
        .args(["run", "--server", "toolbox"]);
    if let Some(e) = events {
        c.arg("--events").arg(e);
    }
    c.arg("--")
        .arg(venv_python())
        .arg(repo_root().join("tests/fixtures/sdk/tool_server.py"))
        .stdin(Stdio::null());
    c
}

/// The MCP Python SDK client drives the toolbox test server through
/// `mcp-warden run --server toolbox` and the agent at `agent.sock`: one
/// result per step, and the client's output.
fn drive_through_agent(
    agent: &Agent,
    steps: &Value,
    events: &std::path::Path,
) -> (Vec<Value>, std::process::Output) {
    let out = drive_command(agent, steps, Some(events))
        .output()
        .expect("drive.py");
    let results = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (results, out)
}

fn converse(sock: &std::path::Path, reqs: &[Value]) -> Vec<Value> {
    let s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    for q in reqs {
        writeln!(w, "{q}").expect("send");
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        out.push(serde_json::from_str(&line).expect("json response"));
    }
    out
}

/// The control socket's own checks: `place` moves only the peer's own
/// child, and a user can neither act on nor see another user's instance.
#[test]
fn control_socket_trust() {
    let mut agent = Agent::new("trust", false);
    agent.policy("trust", "127.0.0.1:1");
    agent.start();
    let r = converse(
        &agent.sock,
        &[json!({"op": "register", "server": "trust", "cmd": ["x"]})],
    );
    assert_eq!(r[0]["ok"], true, "{r:?}");
    let inst = r[0]["instance"].as_str().expect("instance").to_string();
    let token = r[0]["token"].as_str().expect("token").to_string();
    // The registering connection is gone: a second one places.
    let r = converse(
        &agent.sock,
        &[
            json!({"op": "place", "instance": inst, "token": token, "pid": 1}),
            json!({"op": "place", "instance": inst, "token": "wrong", "pid": 1}),
            json!({"op": "register", "server": "../trust"}),
            json!({"op": "register", "server": "nosuch"}),
        ],
    );
    assert!(
        r[0]["error"]
            .as_str()
            .expect("error")
            .contains("not a child"),
        "{r:?}"
    );
    assert_eq!(r[1]["error"], "wrong token", "{r:?}");
    assert!(r[2]["error"]
        .as_str()
        .expect("e")
        .contains("invalid server name"));
    assert!(r[3]["error"]
        .as_str()
        .expect("e")
        .contains("no policy for server"));

    // Another user: cannot attach to root's instance, does not see it.
    let py = format!(
        "import socket,json\n\
         s=socket.socket(socket.AF_UNIX); s.connect({:?}); f=s.makefile('rwb')\n\
         for q in [{{'op':'attach','instance':{inst:?},'token':{token:?}}},{{'op':'status'}}]:\n\
         \x20   f.write((json.dumps(q)+'\\n').encode()); f.flush(); print(f.readline().decode().strip())\n",
        agent.sock.display().to_string()
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &py,
        ])
        .output()
        .expect("python as nobody");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(
        lines[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("belongs to another user")),
        "{lines:?}"
    );
    assert_eq!(lines[1]["instances"], json!([]), "{lines:?}");
    // Root sees it; the unplaced registration is torn down by its owner.
    assert_eq!(instances(&agent.status()).len(), 1);
    let r = converse(
        &agent.sock,
        &[
            json!({"op": "attach", "instance": inst, "token": token}),
            json!({"op": "finish", "status": 0}),
        ],
    );
    assert_eq!(r[1]["ok"], true, "{r:?}");
    assert!(instances(&agent.status()).is_empty());
}
