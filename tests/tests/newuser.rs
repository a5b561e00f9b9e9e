//! Issue #5, "what it must show", done as a new user would, from the
//! packaged product and nothing else of the build tree:
//!
//! 1. the .deb (cargo-deb) installed with `dpkg --root` into a scratch root;
//! 2. the agent started from the installed binary, the way the installed
//!    unit's ExecStart says, with the installed agent.toml (only its paths
//!    and metrics port changed, by uncommenting the shipped lines, so it
//!    never meets another agent on this machine). systemd is not PID 1 on
//!    the test machines, so the unit's ExecStart runs directly under the
//!    unit's UMask, capability bounding set and NoNewPrivileges (setpriv);
//!    the filesystem sandboxing of the unit (ProtectSystem=...) is not
//!    reproduced;
//! 3. a fresh non-root account (useradd, removed at the end) runs the npm
//!    reference filesystem server through `mcp-warden run --server
//!    filesystem` under the installed example policy (adapted the way an
//!    admin would: the tree the server is installed in is added to `read`),
//!    driven by the official MCP Python SDK client; a tool call reads the
//!    project's `.env`, which the policy denies inside the allowed tree;
//!    `nobody` meanwhile runs a probe whose connect is denied;
//! 4. the errno the server saw, the deny event in `mcp-warden events` (root:
//!    everything; the user: its own records only), the violation counter on
//!    /metrics, and a real Prometheus (Debian package) scraping the agent
//!    with the installed alert rules: the counter and McpWardenViolation
//!    firing;
//! 5. kill -9 of the agent: the denials hold (the probe's connect, the
//!    file on disk unchanged; the relay refuses tool calls while no agent
//!    answers), Prometheus puts McpWardenAgentDown in pending; the agent
//!    restarted re-adopts both instances (status), with the same programs
//!    attached to their cgroups and no duplicate (BPF_PROG_QUERY per attach
//!    type), and a new denial is an event and a counter again, which
//!    Prometheus sees across the counter reset.
mod ops_util;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use mcp_warden_tests::{base_read_rules, cgroup2_mount, repo_root, venv_python};
use ops_util::{
    deb::{build_deb, ScratchRoot},
    free_port, http_get, require_tool, run_ok, urlencode, wait_until, Reaped,
};
use serde_json::{json, Value};

const PROBE: &str = env!("CARGO_BIN_EXE_mw-probe");
const PROMETHEUS_PKG: &str = "apt-get install prometheus (Debian package)";
const LIMIT: Duration = Duration::from_secs(60);
const NOBODY: u32 = 65534;

/// A login created for the test (useradd), removed with its home on drop.
struct User {
    name: String,
    uid: u32,
    home: PathBuf,
}

impl User {
    fn create() -> Self {
        let name = format!("mwnu{}", std::process::id());
        let home = PathBuf::from("/home").join(&name);
        run_ok(
            Command::new(require_tool("useradd", "apt-get install passwd"))
                .args(["--create-home", "--user-group", "--shell", "/bin/sh"])
                .arg("--home-dir")
                .arg(&home)
                .arg(&name),
        );
        let id = |flag: &str| -> u32 {
            String::from_utf8_lossy(&run_ok(Command::new("id").args([flag, &name])).stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        let uid = id("-u");
        Self { name, uid, home }
    }

    /// A file of the user's, made by root and handed over.
    fn write(&self, rel: &str, text: &str, mode: u32) -> PathBuf {
        let p = self.home.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write user file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        run_ok(
            Command::new("chown")
                .args(["-R", &format!("{0}:{0}", self.name)])
                .arg(&self.home),
        );
        p
    }
}

impl Drop for User {
    fn drop(&mut self) {
        // Its processes are gone by now (their instance cgroups are killed
        // by the agent guard, dropped first).
        let _ = Command::new("userdel")
            .args(["--remove", &self.name])
            .output();
    }
}

/// `setpriv` to `uid` with the login's environment (HOME, USER, PATH), the
/// agent's socket passed on, then `args`: the whole command line.
fn as_user_argv(uid: u32, sock: &Path, args: &[&str]) -> Vec<String> {
    let gid =
        String::from_utf8_lossy(&run_ok(Command::new("id").arg("-g").arg(uid.to_string())).stdout)
            .trim()
            .to_string();
    let groups = if uid == NOBODY {
        "--clear-groups"
    } else {
        "--init-groups"
    };
    let mut v = vec![
        "setpriv".to_string(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        groups.to_string(),
        "--reset-env".to_string(),
        "/usr/bin/env".to_string(),
        format!("MCP_WARDEN_SOCKET={}", sock.display()),
    ];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

fn as_user(uid: u32, sock: &Path, args: &[&str]) -> Command {
    let v = as_user_argv(uid, sock, args);
    let mut c = Command::new(&v[0]);
    c.args(&v[1..]);
    c
}

/// The installed agent, started as the installed unit starts it. Drop
/// kills it and removes its instance cgroups and pins.
struct Agent {
    exec: Vec<String>,
    caps: Vec<String>,
    logs: PathBuf,
    sock: PathBuf,
    audit: PathBuf,
    metrics: SocketAddr,
    pin_root: PathBuf,
    cgroup_parent: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    pids: Vec<u32>,
}

impl Agent {
    fn start(&mut self) {
        let n = self.pids.len() + 1;
        let log = std::fs::File::create(self.logs.join(format!("agent-{n}.log"))).expect("log");
        let mut c = Command::new("setpriv");
        // NoNewPrivileges=yes, CapabilityBoundingSet=..., AmbientCapabilities=
        c.arg("--no-new-privs")
            .arg("--inh-caps=-all")
            .arg(format!("--bounding-set=-all,{}", self.caps.join(",")))
            .args(&self.exec)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // UMask=0027
        // SAFETY: umask(2) is async-signal-safe and has no preconditions.
        unsafe {
            c.pre_exec(|| {
                libc::umask(0o027);
                Ok(())
            });
        }
        let child = c.spawn().expect("spawn the agent");
        let pid = child.id();
        self.pids.push(pid);
        self.child = Some(child);
        wait_until("the agent's status answer", LIMIT, |last| {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("the agent exited: {st}\n{}", self.log());
            }
            let v = self.status(None)?;
            *last = v.to_string();
            (v["agent_pid"] == json!(pid)).then_some(())
        });
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.logs.join(format!("agent-{}.log", self.pids.len())))
            .unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `mcp-warden status --json`, as root or as `uid`.
    fn status(&self, uid: Option<u32>) -> Option<Value> {
        let bin = self.bin.to_str().expect("utf-8");
        let mut c = match uid {
            Some(u) => as_user(u, &self.sock, &[bin, "status", "--json"]),
            None => {
                let mut c = Command::new(&self.bin);
                c.env("MCP_WARDEN_SOCKET", &self.sock)
                    .args(["status", "--json"]);
                c
            }
        };
        let out = c.output().ok()?;
        out.status.success().then_some(())?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn instances(&self, uid: Option<u32>) -> Vec<Value> {
        let v = self
            .status(uid)
            .unwrap_or_else(|| panic!("status failed; agent log:\n{}", self.log()));
        v["instances"].as_array().cloned().unwrap_or_default()
    }

    /// `mcp-warden events --server NAME --log AUDIT` (root reads the log).
    fn events(&self, server: &str) -> Vec<Value> {
        let out = run_ok(
            Command::new(&self.bin)
                .args(["events", "--server", server, "--log"])
                .arg(&self.audit),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("an event per line"))
            .collect()
    }

    fn wait_events(&self, server: &str, n: usize, pairs: &[(&str, Value)]) -> Vec<Value> {
        wait_until(&format!("{n} events {pairs:?}"), LIMIT, |last| {
            let ev: Vec<Value> = self
                .events(server)
                .into_iter()
                .filter(|e| pairs.iter().all(|(k, v)| e.get(*k) == Some(v)))
                .collect();
            *last = format!("{ev:#?}\nagent log:\n{}", self.log());
            (ev.len() >= n).then_some(ev)
        })
    }

    /// The agent's own /metrics: every sample line of `name`.
    fn metric(&self, name: &str) -> Vec<String> {
        let (status, body) = http_get(self.metrics, "/metrics").expect("/metrics answers");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if let Ok(rd) = std::fs::read_dir(&self.cgroup_parent) {
            for e in rd.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                for _ in 0..100 {
                    if std::fs::remove_dir(e.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup_parent);
        let _ = std::fs::remove_dir_all(&self.pin_root);
        for pid in &self.pids {
            let _ = std::fs::remove_file(format!("/run/mcp-warden/approvals/{pid}.sock"));
        }
    }
}

/// A child whose stdout lines arrive on a channel; killed on drop.
struct Lines {
    child: Reaped,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Lines {
    fn spawn(mut cmd: Command, what: &'static str, stderr: &Path) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self {
            child: Reaped(Some(child), what),
            stdin,
            rx,
            stderr: stderr.to_path_buf(),
        }
    }

    fn next(&self) -> String {
        self.rx.recv_timeout(LIMIT).unwrap_or_else(|_| {
            panic!(
                "no line from {} within {LIMIT:?}; its stderr:\n{}",
                self.child.1,
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            )
        })
    }

    fn send(&mut self, line: &str) {
        let w = self.stdin.as_mut().expect("stdin open");
        writeln!(w, "{line}").expect("write stdin");
        w.flush().expect("flush");
    }
}

/// The next JSON result of drive.py.
fn result(d: &Lines) -> Value {
    loop {
        let l = d.next();
        if let Ok(v) = serde_json::from_str::<Value>(&l) {
            return v;
        }
    }
}

/// Prometheus' `/api/v1/query` result vector for `expr`.
fn query(prom: SocketAddr, expr: &str) -> Option<Vec<Value>> {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", urlencode(expr)))?;
    (status == 200).then_some(())?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"].as_array().cloned()
}

/// The alert `name` in state `state`, as Prometheus reports it.
fn wait_alert(prom: SocketAddr, name: &str, state: &str) -> Value {
    wait_until(&format!("{name} {state} in Prometheus"), LIMIT, |last| {
        let (_, body) = http_get(prom, "/api/v1/alerts")?;
        *last = body.clone();
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name && a["state"] == state)
            .cloned()
    })
}

/// The programs attached directly to the cgroup `dir`, by attach type
/// (BPF_PROG_QUERY for every attach type the kernel accepts on a cgroup).
fn attached_programs(dir: &Path) -> BTreeMap<u32, Vec<u32>> {
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    let f = std::fs::File::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()));
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let mut out = BTreeMap::new();
    for attach_type in 0..64u32 {
        let mut ids = [0u32; 16];
        let mut q = Query {
            target_fd: fd as u32,
            attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..Default::default()
        };
        // SAFETY: bpf(2) with a properly sized, initialised attr whose
        // prog_ids points at `ids` (prog_cnt entries), alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut q as *mut Query,
                std::mem::size_of::<Query>() as u32,
            )
        };
        if r == 0 && q.prog_cnt > 0 {
            out.insert(attach_type, ids[..q.prog_cnt as usize].to_vec());
        }
    }
    out
}

/// Every instance cgroup of the agent: name -> programs attached.
fn instance_programs(parent: &Path) -> BTreeMap<String, BTreeMap<u32, Vec<u32>>> {
    std::fs::read_dir(parent)
        .expect("cgroup parent")
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                attached_programs(&e.path()),
            )
        })
        .collect()
}

/// `key = value` in place of the shipped `#key = default` line.
fn set_config(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("#{key} = ");
    assert!(
        text.lines().any(|l| l.starts_with(&prefix)),
        "the shipped agent.toml has no `{prefix}...` line"
    );
    text.lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                format!("{key} = {value}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn new_user_from_the_package() {
    mcp_warden_tests::require_root();
    let prometheus = require_tool("prometheus", PROMETHEUS_PKG);
    let node = require_tool("node", "apt-get install nodejs");
    let npm_tree = repo_root()
        .join(".cache/npm")
        .canonicalize()
        .expect(".cache/npm: run `cargo xtask setup`");
    let fs_server =
        npm_tree.join("node_modules/@modelcontextprotocol/server-filesystem/dist/index.js");
    assert!(
        fs_server.is_file(),
        "{}: run `cargo xtask setup`",
        fs_server.display()
    );

    // 1. The package, installed.
    let deb = build_deb("newuser");
    let root = ScratchRoot::install("newuser-root", &deb);
    assert_eq!(root.query("${Status}"), "install ok installed");
    let bin = root.file("/usr/bin/mcp-warden");
    let listed = String::from_utf8_lossy(&root.dpkg(&["-L", "mcp-warden"]).stdout).into_owned();
    let unit = listed
        .lines()
        .find(|l| l.ends_with("/systemd/system/mcp-warden.service"))
        .unwrap_or_else(|| panic!("no unit in the package: {listed}"));
    let unit = std::fs::read_to_string(root.file(unit)).expect("read the installed unit");
    let directive = |k: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k}= missing in the installed unit"))
            .to_string()
    };
    assert_eq!(directive("UMask"), "0027");
    assert_eq!(directive("NoNewPrivileges"), "yes");
    // ExecStart's absolute paths, in the scratch root.
    let exec: Vec<String> = directive("ExecStart")
        .split_whitespace()
        .map(|a| {
            if a.starts_with('/') {
                let p = root.file(a);
                assert!(p.exists(), "ExecStart names {a}, not installed");
                p.to_string_lossy().into_owned()
            } else {
                a.to_string()
            }
        })
        .collect();
    let caps: Vec<String> = directive("CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();

    // The installed agent.toml, its lines uncommented for this test's own
    // paths. RuntimeDirectory= (0755) and LogsDirectory= (0750), as
    // systemd would make them.
    let uniq = format!("mw-newuser-{}", std::process::id());
    let run_dir = root.file("/run/mcp-warden");
    let logs_dir = root.file("/var/log/mcp-warden");
    for (d, mode) in [(&run_dir, 0o755), (&logs_dir, 0o750)] {
        std::fs::create_dir_all(d).expect("mkdir");
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let policy_dir = root.file("/etc/mcp-warden/policies");
    let cfg_path = root.file("/etc/mcp-warden/agent.toml");
    let mut cfg = std::fs::read_to_string(&cfg_path).expect("installed agent.toml");
    let sock = run_dir.join("agent.sock");
    let audit = logs_dir.join("audit.jsonl");
    let pin_root = PathBuf::from("/sys/fs/bpf").join(&uniq);
    for (k, v) in [
        ("socket", format!("{sock:?}")),
        ("state_dir", format!("{run_dir:?}")),
        ("pin_root", format!("{pin_root:?}")),
        ("policy_dir", format!("{policy_dir:?}")),
        ("metrics_listen", format!("\"{metrics}\"")),
        ("audit_log", format!("{audit:?}")),
        ("cgroup_parent", format!("{uniq:?}")),
    ] {
        cfg = set_config(&cfg, k, &v);
    }
    std::fs::write(&cfg_path, cfg).expect("edit agent.toml");

    // The example filesystem policy, with the tree the server is installed
    // in added to `read` (the one change an admin makes for this host).
    let fs_policy = policy_dir.join("filesystem.toml");
    let text = std::fs::read_to_string(&fs_policy).expect("installed filesystem.toml");
    let anchor = "  \"${HOME}/projects/**\",\n";
    assert!(text.contains(anchor), "{text}");
    let text = text.replacen(
        anchor,
        &format!("{anchor}  \"{}/**\",\n", npm_tree.display()),
        1,
    );
    std::fs::write(&fs_policy, text).expect("edit filesystem.toml");
    // And one of ours for the probe that `nobody` runs.
    std::fs::write(
        policy_dir.join("probe.toml"),
        format!(
            "version = 1\nserver = \"probe\"\n\n[files]\n{}\n\n[network]\nconnect = [\"127.0.0.1:1\"]\n",
            base_read_rules(&[])
        ),
    )
    .expect("write probe.toml");
    run_ok(
        Command::new(&bin)
            .arg("check")
            .arg(&fs_policy)
            .arg(policy_dir.join("probe.toml")),
    );

    // 2. The agent, as the unit starts it.
    let user = User::create();
    let mut agent = Agent {
        exec,
        caps,
        logs: root.path().to_path_buf(),
        sock: sock.clone(),
        audit: audit.clone(),
        metrics,
        pin_root,
        cgroup_parent: cgroup2_mount().join(&uniq),
        bin: bin.clone(),
        child: None,
        pids: Vec::new(),
    };
    agent.start();
    let st = agent.status(None).expect("status");
    assert_eq!(st["programs"], "loaded", "{st:#}");
    // CAP_DAC_OVERRIDE served to make the cgroup parent, then went; the
    // rest of the unit's set is held.
    let caps_of = |pid: u32, k: &str| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let v = s.lines().find_map(|l| l.strip_prefix(k)).expect("cap line");
        u64::from_str_radix(v.trim(), 16).expect("hex")
    };
    let agent_pid = *agent.pids.last().expect("pid");
    // linux/capability.h: DAC_OVERRIDE 1, KILL 5, NET_ADMIN 12, SYS_ADMIN 21, BPF 39.
    let eff = caps_of(agent_pid, "CapEff:");
    assert_eq!(eff & (1 << 1), 0, "CapEff {eff:x}");
    assert_eq!(caps_of(agent_pid, "CapPrm:") & (1 << 1), 0);
    for cap in [5, 12, 21, 39] {
        assert_ne!(eff & (1 << cap), 0, "cap {cap} missing: CapEff {eff:x}");
    }
    assert!(
        agent.cgroup_parent.is_dir(),
        "the agent made its cgroup parent"
    );
    let sock_mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(sock_mode, 0o666, "control socket mode under UMask=0027");

    // Prometheus scrapes it, with the installed alert rules.
    let pdir = mcp_warden_tests::TempDir::new("newuser-prom");
    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let prom_cfg = pdir.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {:?}\n\
             scrape_configs:\n  - job_name: mcp-warden\n    static_configs:\n      - targets: ['{metrics}']\n",
            root.file("/usr/share/mcp-warden/alerts.yml")
        ),
    )
    .expect("prometheus.yml");
    let _prom = Reaped(
        Some(
            Command::new(&prometheus)
                .arg(format!("--config.file={}", prom_cfg.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    pdir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={prom_addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(pdir.path().join("prom.log")).expect("log"))
                .spawn()
                .expect("spawn prometheus"),
        ),
        "prometheus",
    );

    // 3. `nobody` runs a probe whose connects are denied, stepping on stdin.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let target = format!("127.0.0.1:{port}");
    let bin_s = bin.to_str().expect("utf-8").to_string();
    let mut probe_args: Vec<&str> = vec![&bin_s, "run", "--server", "probe", "--", PROBE];
    for _ in 0..3 {
        probe_args.extend(["wait-stdin", ";", "tcp-connect", &target, ";"]);
    }
    probe_args.push("wait-stdin");
    let mut probe = Lines::spawn(
        as_user(NOBODY, &sock, &probe_args),
        "nobody's probe",
        &root.path().join("probe.err"),
    );
    let probe_step = |p: &mut Lines| {
        p.send("go");
        assert_eq!(p.next(), "ok", "wait-stdin");
        p.next()
    };
    assert_eq!(probe_step(&mut probe), "errno=1", "connect denied (EPERM)");
    agent.wait_events(
        "probe",
        1,
        &[("decision", json!("deny")), ("port", json!(port))],
    );

    // The user follows its own events, then its MCP client starts the
    // filesystem server through mcp-warden.
    let projects = user.home.join("projects");
    let notes = user.write("projects/notes.md", "hello\n", 0o644);
    let secret_text = "API_KEY=do-not-leak\n";
    let env = user.write("projects/.env", secret_text, 0o600);
    let follow_seen = Arc::new(Mutex::new(Vec::<Value>::new()));
    let mut follow = Reaped(
        Some(
            as_user(user.uid, &sock, &[&bin_s, "events", "--follow"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("events --follow"),
        ),
        "events --follow",
    );
    {
        let out = follow.child().stdout.take().expect("stdout");
        let seen = Arc::clone(&follow_seen);
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    seen.lock().expect("lock").push(v);
                }
            }
        });
    }
    let read = |p: &Path| json!({"tool": "read_text_file", "args": {"path": p}});
    let steps = json!([
        read(&notes),
        read(&env),
        read(&env),
        {"tool": "write_file", "args": {"path": env, "content": "overwritten"}},
        {"wait_stdin": true},
        read(&env),
        {"wait_stdin": true},
        read(&env),
        read(&notes),
    ]);
    let mut client_cmd = Command::new(venv_python());
    client_cmd
        .arg(repo_root().join("tests/fixtures/sdk/drive.py"))
        .arg(steps.to_string())
        .arg("--")
        .args(as_user_argv(
            user.uid,
            &sock,
            &[
                &bin_s,
                "run",
                "--server",
                "filesystem",
                "--",
                node.to_str().expect("utf-8"),
                fs_server.to_str().expect("utf-8"),
                projects.to_str().expect("utf-8"),
            ],
        ));
    let client_err = root.path().join("client.err");
    let mut client = Lines::spawn(client_cmd, "the MCP client", &client_err);
    let client_log = || std::fs::read_to_string(&client_err).unwrap_or_default();

    // 4. The allowed read works; the secret is refused by the kernel.
    let r = result(&client);
    assert_eq!(r["ok"], true, "{r}\n{}", client_log());
    assert_eq!(r["text"], "hello\n", "{r}");
    for _ in 0..2 {
        let r = result(&client);
        assert!(
            r.to_string().contains("EACCES"),
            "the server's read of .env fails with EACCES: {r}\n{}",
            client_log()
        );
    }
    let r = result(&client);
    assert!(
        r.to_string().contains("EACCES"),
        "the server's write of .env fails with EACCES: {r}\n{}",
        client_log()
    );
    assert_eq!(
        std::fs::read_to_string(&env).expect("read .env"),
        secret_text
    );
    let listing = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&projects)
            .expect("projects")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(listing(), [".env", "notes.md"], "nothing left on disk");
    assert_eq!(result(&client), json!({"waiting": true}));

    let mine = agent.instances(Some(user.uid));
    assert_eq!(
        mine.len(),
        1,
        "the user sees its own instance only: {mine:#?}"
    );
    assert_eq!(mine[0]["server"], "filesystem");
    assert_eq!(agent.instances(None).len(), 2, "root sees both");

    // The deny event, as root reads it from the audit log.
    let deny = agent.wait_events(
        "filesystem",
        2,
        &[
            ("decision", json!("deny")),
            ("kind", json!("file")),
            ("path", json!(env)),
        ],
    );
    agent.wait_events(
        "filesystem",
        1,
        &[("decision", json!("deny")), ("tool", json!("write_file"))],
    );
    let d = &deny[0];
    assert_eq!(d["uid"], user.uid, "{d}");
    assert_eq!(d["user"], user.name.as_str(), "{d}");
    assert_eq!(d["tool"], "read_text_file", "{d}");
    assert_eq!(
        d["policy_source"],
        json!(format!("file:{}", fs_policy.display())),
        "{d}"
    );
    // The user's live stream: the same denial, and nothing of nobody's.
    let streamed = wait_until(
        "the denial in the user's `events --follow`",
        LIMIT,
        |last| {
            let seen = follow_seen.lock().expect("lock");
            *last = format!("{seen:#?}");
            seen.iter()
                .find(|e| e["decision"] == "deny" && e["path"] == json!(env))
                .cloned()
        },
    );
    assert_eq!(streamed["uid"], user.uid);
    {
        let seen = follow_seen.lock().expect("lock");
        assert!(
            seen.iter().all(|e| e["uid"] == user.uid),
            "the user saw another user's records: {seen:#?}"
        );
    }
    // The user may not read the audit log itself (mode 0600, root's).
    let out = as_user(user.uid, &sock, &[&bin_s, "events", "--log"])
        .arg(&audit)
        .output()
        .expect("events as the user");
    assert!(!out.status.success(), "{out:?}");

    // /metrics, and Prometheus with the shipped rules.
    let file_denials = |a: &Agent| -> Vec<String> {
        a.metric("mcp_warden_violations_total")
            .into_iter()
            .filter(|l| l.contains("server=\"filesystem\"") && l.contains("kind=\"file\""))
            .collect()
    };
    let lines = wait_until("the file violations on /metrics", LIMIT, |last| {
        let l = file_denials(&agent);
        *last = format!("{l:?}");
        (!l.is_empty()).then_some(l)
    });
    assert!(
        lines
            .iter()
            .any(|l| l.contains("tool=\"read_text_file\"") && l.contains("decision=\"deny\"")),
        "{lines:?}"
    );
    let series = wait_until("Prometheus sees the file violation", LIMIT, |last| {
        let r = query(
            prom_addr,
            "mcp_warden_violations_total{server=\"filesystem\",kind=\"file\",tool=\"read_text_file\"} > 0",
        )?;
        *last = format!("{r:?}");
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(series[0]["metric"]["decision"], "deny", "{series:?}");
    let alert = wait_alert(prom_addr, "McpWardenViolation", "firing");
    assert!(
        alert["labels"]["server"] == "filesystem" || alert["labels"]["server"] == "probe",
        "{alert}"
    );

    // 5. kill -9 of the agent.
    let before = instance_programs(&agent.cgroup_parent);
    assert_eq!(before.len(), 2, "{before:?}");
    for (inst, progs) in &before {
        assert!(!progs.is_empty(), "{inst}: no program attached");
        assert!(progs.values().all(|p| p.len() == 1), "{inst}: {progs:?}");
    }
    let names: Vec<String> = agent
        .instances(None)
        .iter()
        .map(|i| i["instance"].as_str().expect("name").to_string())
        .collect();
    agent.kill9();
    assert_eq!(
        probe_step(&mut probe),
        "errno=1",
        "the connect is still denied with no agent running"
    );
    assert_eq!(instance_programs(&agent.cgroup_parent), before);
    wait_alert(prom_addr, "McpWardenAgentDown", "pending");
    // The client's next call: the relay refuses it (fail closed), the
    // server never reads the file.
    client.send("go");
    let r = result(&client);
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("agent")),
        "refused for want of the agent: {r}\n{}",
        client_log()
    );
    assert_eq!(
        std::fs::read_to_string(&env).expect("read .env"),
        secret_text
    );
    assert_eq!(result(&client), json!({"waiting": true}));

    // Restart: both instances re-adopted, the same programs attached.
    let denials_before = agent
        .events("filesystem")
        .iter()
        .filter(|e| e["decision"] == "deny" && e["path"] == json!(env))
        .count();
    agent.start();
    let st = agent.status(None).expect("status");
    assert_eq!(st["programs"], "adopted", "{st:#}");
    let mut now: Vec<String> = agent
        .instances(None)
        .iter()
        .map(|i| i["instance"].as_str().expect("name").to_string())
        .collect();
    now.sort();
    let mut names = names;
    names.sort();
    assert_eq!(now, names, "re-adopted: {st:#}");
    assert_eq!(agent.instances(Some(user.uid)).len(), 1);
    assert_eq!(
        instance_programs(&agent.cgroup_parent),
        before,
        "re-adoption attaches nothing again"
    );
    assert_eq!(probe_step(&mut probe), "errno=1");

    // A new denial after the restart: the errno, the event, the counter.
    wait_until("the client to re-attach", LIMIT, |last| {
        let i = agent.instances(Some(user.uid));
        *last = format!("{i:?}");
        (i.first()?["clients_attached"] == json!(1)).then_some(())
    });
    client.send("go");
    let r = result(&client);
    assert!(r.to_string().contains("EACCES"), "{r}\n{}", client_log());
    let r = result(&client);
    assert_eq!(r["text"], "hello\n", "{r}");
    assert_eq!(
        std::fs::read_to_string(&env).expect("read .env"),
        secret_text
    );
    assert_eq!(listing(), [".env", "notes.md"]);
    agent.wait_events(
        "filesystem",
        denials_before + 1,
        &[("decision", json!("deny")), ("path", json!(env))],
    );
    // The new agent counts from zero: exactly the one denial since it
    // started (nothing delivered twice).
    let reads = |a: &Agent| -> Option<String> {
        file_denials(a)
            .into_iter()
            .find(|l| l.contains("tool=\"read_text_file\"") && l.contains("decision=\"deny\""))
            .and_then(|l| l.rsplit(' ').next().map(str::to_string))
    };
    let value = wait_until("the violation counted by the new agent", LIMIT, |last| {
        let v = reads(&agent);
        *last = format!("{v:?}");
        v
    });
    let audit_reads: Vec<Value> = agent
        .events("filesystem")
        .into_iter()
        .filter(|e| e["decision"] == "deny" && e["path"] == json!(env))
        .collect();
    assert_eq!(
        value, "1",
        "the restarted agent's counter; the audit log has {audit_reads:#?}"
    );
    assert_eq!(audit_reads.len(), denials_before + 1, "{audit_reads:#?}");
    // Prometheus: the agent was down (up 0), is up again, and the counter
    // went back (a reset, which rate() and increase() account for).
    let series = "mcp_warden_violations_total{server=\"filesystem\",kind=\"file\",\
                  tool=\"read_text_file\",decision=\"deny\"}";
    wait_until("Prometheus sees the new agent's counter", LIMIT, |last| {
        let v = query(prom_addr, series)?;
        let r = query(prom_addr, &format!("resets({series}[5m])"))?;
        let down = query(prom_addr, "min_over_time(up{job=\"mcp-warden\"}[5m])")?;
        let up = query(prom_addr, "up{job=\"mcp-warden\"}")?;
        *last = format!("value {v:?}, resets {r:?}, min up {down:?}, up {up:?}");
        (v.first()?["value"][1] == json!(value)
            && r.first()?["value"][1] == json!("1")
            && down.first()?["value"][1] == json!("0")
            && up.first()?["value"][1] == json!("1"))
        .then_some(())
    });

    // The servers end; the instances go away.
    assert_eq!(
        client.child.wait_for_exit(LIMIT).code(),
        Some(0),
        "{}",
        client_log()
    );
    probe.send("go");
    assert_eq!(probe.next(), "ok");
    drop(probe.stdin.take());
    assert!(probe.child.wait_for_exit(LIMIT).success());
    wait_until("the instances to go away", LIMIT, |last| {
        let i = agent.instances(None);
        *last = format!("{i:?}");
        i.is_empty().then_some(())
    });
    drop(follow);
}
