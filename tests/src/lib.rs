//! Helpers shared by the privileged end-to-end suites: temp dirs that clean
//! up, the paths of the built binaries, a runner for `mcp-warden run` that
//! returns the server's output, exit status and the audit events.
//!
//! Tests panic with context (no `Result` returns), for the stack trace.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

/// A directory removed on drop.
pub struct TempDir(PathBuf);

static SEQ: AtomicU32 = AtomicU32::new(0);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "mw-e2e-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// target/<profile>/ of the running test binary (which is in .../deps/).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent");
    deps.parent().expect("deps has a parent").to_path_buf()
}

/// The mcp-warden binary built alongside the tests.
pub fn warden() -> PathBuf {
    let p = target_dir().join("mcp-warden");
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p mcp-warden` first (cargo xtask test does)",
        p.display()
    );
    p
}

/// Must run as root: these tests load eBPF programs. Not a skip: a failure.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the end-to-end suite loads eBPF programs and must run as root"
    );
}

/// Read paths every dynamically linked test binary needs, plus `extra`.
pub fn base_read_rules(extra: &[&str]) -> String {
    let mut v: Vec<String> = [
        "/usr/**",
        "/lib/**",
        "/lib64/**",
        "/etc/ld.so.cache",
        "/etc/hosts",
        "/etc/nsswitch.conf",
        "/etc/resolv.conf",
        "/proc/**",
        "/dev/null",
        "/dev/urandom",
        "/sys/devices/system/cpu/**",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("{}/**", target_dir().display()));
    v.extend(extra.iter().map(|s| s.to_string()));
    let quoted: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
    format!("read = [{}]", quoted.join(", "))
}

/// The result of one confined run.
#[derive(Debug)]
pub struct Run {
    /// pid of the `mcp-warden run` process (it names the instance cgroup).
    pub warden_pid: u32,
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub events: Vec<Value>,
}

impl Run {
    /// On Linux 6.1 BPF-LSM's path mutation hooks cannot load (bpf_d_path is
    /// refused there): Landlock keeps the mutation rights, refuses with
    /// EACCES, and the started event's Landlock warnings say so. Elsewhere
    /// the LSM hook refuses with EPERM. In the VM lane a kernel other than
    /// 6.1 that leaves them to Landlock fails the test: a hook that stops
    /// loading is a failure, not a second expectation.
    pub fn mutations_by_landlock(&self) -> bool {
        let started = self
            .events
            .iter()
            .find(|e| e["kind"] == "server" && e["event"] == "started")
            .unwrap_or_else(|| panic!("no started event: {self:?}"));
        let by_landlock = started["confinement"]["landlock"]["warnings"]
            .as_array()
            .is_some_and(|w| {
                w.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.contains("creating, removing")))
            });
        if std::env::var("MCP_WARDEN_VM_KERNEL").is_ok_and(|k| k != "6.1") {
            assert!(
                !by_landlock,
                "path hooks not in force on this kernel: {self:?}"
            );
        }
        by_landlock
    }

    /// stdout lines (the probe prints one per operation).
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.stdout)
            .lines()
            .map(|s| s.to_string())
            .collect()
    }

    /// Events matching every (key, value) pair.
    pub fn events_where(&self, pairs: &[(&str, Value)]) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| pairs.iter().all(|(k, v)| e.get(*k) == Some(v)))
            .collect()
    }
}

/// A policy file plus the event file of one scenario.
pub struct Scenario {
    pub dir: TempDir,
    pub policy: PathBuf,
    pub events: PathBuf,
}

impl Scenario {
    pub fn new(tag: &str, policy_toml: &str) -> Self {
        require_root();
        let dir = TempDir::new(tag);
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, policy_toml).expect("write policy");
        let events = dir.path().join("events.jsonl");
        Self {
            dir,
            policy,
            events,
        }
    }

    pub fn command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new(warden());
        c.arg("run")
            .arg("--policy")
            .arg(&self.policy)
            .arg("--events")
            .arg(&self.events)
            .arg("--")
            .args(cmd);
        c
    }

    /// Start `cmd` confined with stdin, stdout and stderr piped.
    pub fn spawn_piped(&self, cmd: &[&str]) -> std::process::Child {
        self.command(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mcp-warden")
    }

    /// Run `cmd` confined, feeding `stdin`, and collect everything.
    pub fn run(&self, cmd: &[&str], stdin: &[u8]) -> Run {
        let mut child = self.spawn_piped(cmd);
        let mut sin = child.stdin.take().expect("stdin");
        let input = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = sin.write_all(&input);
        });
        let warden_pid = child.id();
        let out: Output = child.wait_with_output().expect("wait mcp-warden");
        let _ = writer.join();
        self.collect(warden_pid, out)
    }

    /// Run `cmd` confined with its stdin held open until it exits, and
    /// collect everything: a client that stays, so `run`'s grace period
    /// after the client leaves (5 s) never ends a long workload early.
    pub fn run_attached(&self, cmd: &[&str]) -> Run {
        let mut child = self.spawn_piped(cmd);
        let sin = child.stdin.take().expect("stdin");
        let warden_pid = child.id();
        let out: Output = child.wait_with_output().expect("wait mcp-warden");
        drop(sin);
        self.collect(warden_pid, out)
    }

    pub fn collect(&self, warden_pid: u32, out: Output) -> Run {
        let events = read_events(&self.events);
        Run {
            warden_pid,
            status: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            events,
        }
    }
}

/// The complete records of a JSON-lines file. A last line without its
/// newline is a record still being written (or cut by a killed writer) and
/// is left out; every complete line must parse.
pub fn read_events(p: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}")))
        .collect()
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
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

/// No instance cgroup of the `mcp-warden run` process `warden_pid` is left.
pub fn assert_no_leftover_cgroups(warden_pid: u32) {
    let parent = cgroup2_mount().join("mcp-warden");
    if let Ok(rd) = std::fs::read_dir(&parent) {
        let left: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(&format!("-{warden_pid}-")))
            .collect();
        assert!(left.is_empty(), "cgroups left behind: {left:?}");
    }
}

/// The repository root (the tests crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The project's Python venv with the MCP SDK (made by `cargo xtask setup`).
pub fn venv_python() -> PathBuf {
    let p = repo_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup` (it installs the MCP Python SDK)",
        p.display()
    );
    p
}

/// The install tree of the venv's interpreter (sys.base_prefix).
pub fn python_base_prefix() -> String {
    let out = Command::new(venv_python())
        .args(["-c", "import sys; print(sys.base_prefix)"])
        .output()
        .expect("run venv python");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Read rules for a Python MCP server from the venv and the fixtures.
pub fn python_read_rules() -> String {
    let root = repo_root();
    let prefix = python_base_prefix();
    base_read_rules(&[
        &format!("{}/.venv/**", root.display()),
        &format!("{prefix}/**"),
        &format!("{}/tests/fixtures/**", root.display()),
        "/etc/localtime",
        "/etc/ssl/**",
    ])
}

/// [`python_read_rules`] plus the venv's real directory (BPF-LSM judges
/// resolved paths, `bpf_d_path`: a symlinked venv needs its target) and
/// `extra` read paths.
pub fn python_read_rules_resolved(extra: &[String]) -> String {
    let venv = std::fs::canonicalize(repo_root().join(".venv")).expect("venv");
    let mut first = vec![format!("{}/**", venv.display())];
    first.extend(extra.iter().cloned());
    let quoted: Vec<String> = first.iter().map(|p| format!("{p:?}")).collect();
    python_read_rules().replacen("read = [", &format!("read = [{}, ", quoted.join(", ")), 1)
}

/// The SDK test server (tests/fixtures/sdk/tool_server.py) as a command.
pub fn sdk_tool_server() -> Vec<String> {
    vec![
        venv_python().display().to_string(),
        repo_root()
            .join("tests/fixtures/sdk/tool_server.py")
            .display()
            .to_string(),
    ]
}

/// One step's result as printed by tests/fixtures/sdk/drive.py.
pub fn sdk_drive(sc: &Scenario, steps: &Value, server: &[&str]) -> (Vec<Value>, Run) {
    let drive = repo_root().join("tests/fixtures/sdk/drive.py");
    let mut c = Command::new(venv_python());
    c.arg(&drive)
        .arg(steps.to_string())
        .arg("--")
        .arg(warden())
        .arg("run")
        .arg("--policy")
        .arg(&sc.policy)
        .arg("--events")
        .arg(&sc.events)
        .arg("--")
        .args(server)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn().expect("spawn drive.py");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait drive.py");
    let results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let run = sc.collect(pid, out);
    (results, run)
}
