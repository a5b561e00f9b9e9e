//! `mcp-warden agent`: the service. Loads the kernel programs once (or
//! re-adopts a previous agent's pins), serves many instances over the
//! control socket, reloads policies, writes the audit log, and streams
//! events to `mcp-warden events --follow`.
//!
//! Trust (shared/design.md, "Trust boundaries"): a peer inside a confined
//! cgroup gets nothing; a user acts only on the instances it registered
//! (root on all); `place` moves a pid only when it is the peer's own child
//! and runs as the peer's uid.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{broadcast, mpsc},
};

use crate::{
    config::{Config, ConfigError},
    control::{
        self,
        server::{self as srv, Conn, Handler, Peer, Reply},
        CallDone, CallRef, Request,
    },
    events::{
        sink::{EventSink, JsonLinesFile},
        Sinks,
    },
    host::{Host, HostError, HostOptions, Registered},
    policy::{self, model::Governance, Policy, Vars},
    relay::{CallEnd, CallStart, Outcome, RelayHooks, RequestId, SessionInfo},
    session::Session,
};

/// A JSON-RPC id from the wire (a number keeps its text).
fn request_id(v: &Value) -> Result<RequestId, String> {
    match v {
        Value::Number(n) => Ok(RequestId::Number(n.to_string())),
        Value::String(s) => Ok(RequestId::String(s.clone())),
        other => Err(format!("bad call id {other}")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Host(#[from] HostError),
    #[error("{0}")]
    Control(#[from] control::ControlError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the agent must run as root")]
    NotRoot,
    #[error("{0}")]
    Cgroup(#[from] crate::confine::cgroup::CgroupError),
    #[error(
        "creating the cgroup parent {0}: {1} (the cgroup2 root is 0555: the agent needs \
         CAP_DAC_OVERRIDE at start, see the systemd unit)"
    )]
    CgroupParent(PathBuf, std::io::Error),
    #[error("dropping CAP_DAC_OVERRIDE after the start: {0}")]
    DropCaps(std::io::Error),
}

/// How long a registered instance may wait for its server to be placed
/// while no client is attached, before it is torn down.
const UNPLACED_GRACE: Duration = Duration::from_secs(30);

pub fn main(config: Option<PathBuf>) -> i32 {
    let cfg = match Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcp-warden agent: {e}");
            return 2;
        }
    };
    // Before any thread exists: capabilities are per thread, and every
    // thread started later inherits the reduced sets.
    if let Err(e) = prepare(&cfg) {
        eprintln!("mcp-warden agent: {e}");
        return 1;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-warden agent: starting the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mcp-warden agent: {}", crate::run::error_chain(&e));
            1
        }
    }
}

/// What needs CAP_DAC_OVERRIDE, done first: the cgroup parent, in the
/// cgroup2 root, which the kernel makes mode 0555 even for root. Then the
/// agent gives that capability up (effective and permitted): nothing else
/// it opens needs it, and without it a mistake cannot write past a file's
/// mode (packaging/systemd/mcp-warden.service keeps it for this alone).
fn prepare(cfg: &Config) -> Result<(), DaemonError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DaemonError::NotRoot);
    }
    let parent = crate::confine::cgroup::cgroup2_mount()?.join(&cfg.cgroup_parent);
    std::fs::create_dir_all(&parent).map_err(|e| DaemonError::CgroupParent(parent, e))?;
    use crate::confine::caps;
    caps::drop_own(&[caps::CAP_DAC_OVERRIDE]).map_err(DaemonError::DropCaps)
}

/// What the agent remembers of an instance across its own restarts
/// (`<state_dir>/instances.json`, mode 0600: it holds the tokens).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StateRecord {
    instance: String,
    instance_id: u32,
    cgroup: PathBuf,
    cgroup_id: u64,
    policy_id: u32,
    server: String,
    policy_source: String,
    #[serde(default)]
    policy_file: Option<PathBuf>,
    policy_text: String,
    owner_uid: u32,
    token: String,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    cmd: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    instances: Vec<StateRecord>,
}

/// Bookkeeping of one instance (the kernel side is in `reg`/`session`).
#[derive(Debug)]
struct Meta {
    owner: u32,
    token: String,
    pid: Option<u32>,
    client_pid: Option<u32>,
    server: String,
    source: String,
    policy_file: Option<PathBuf>,
    policy_text: String,
    cmd: Vec<String>,
    attached: u32,
    created: Instant,
    instance_id: u32,
}

struct Entry {
    name: String,
    session: Arc<Session>,
    meta: Mutex<Meta>,
    /// Taken by finish; locked by reload.
    reg: tokio::sync::Mutex<Option<Registered>>,
}

/// Counts of emitted records by "kind/decision", for `status`.
type Counters = Arc<Mutex<BTreeMap<String, u64>>>;

/// Sends every record to `events --follow` subscribers and counts it.
struct Broadcast {
    tx: broadcast::Sender<Value>,
    counters: Counters,
}

impl EventSink for Broadcast {
    fn write(&mut self, rec: &Value) -> std::io::Result<()> {
        let kind = rec.get("kind").and_then(Value::as_str).unwrap_or("?");
        let d = rec
            .get("decision")
            .or_else(|| rec.get("outcome"))
            .or_else(|| rec.get("event"))
            .and_then(Value::as_str)
            .unwrap_or("-");
        if let Ok(mut c) = self.counters.lock() {
            *c.entry(format!("{kind}/{d}")).or_insert(0) += 1;
        }
        // No subscriber is not an error.
        let _ = self.tx.send(rec.clone());
        Ok(())
    }
}

pub struct Agent {
    cfg: Config,
    host: Host,
    entries: Mutex<BTreeMap<String, Arc<Entry>>>,
    events: broadcast::Sender<Value>,
    counters: Counters,
    /// Serialises state-file writes and reloads.
    state_lock: tokio::sync::Mutex<()>,
    started: String,
}

/// Serve /metrics. A failure to bind is loud but never stops enforcement.
async fn spawn_metrics(agent: Arc<Agent>) {
    let listen = agent.cfg.metrics_listen.trim();
    if listen.eq_ignore_ascii_case("off") {
        log::info!("metrics endpoint off (metrics_listen = \"off\")");
        return;
    }
    let addr: std::net::SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            log::error!("metrics_listen {listen:?}: {e}; no metrics endpoint");
            return;
        }
    };
    match crate::metrics_http::MetricsListener::bind(addr).await {
        Ok(l) => {
            let metrics = agent.host.metrics().clone();
            let a = agent.clone();
            let refresh: crate::metrics_http::BeforeScrape =
                Arc::new(move || a.host.refresh_lost());
            tokio::spawn(l.serve_with(metrics, Some(refresh), std::future::pending::<()>()));
        }
        Err(e) => log::error!("metrics endpoint: {e}; enforcement continues without it"),
    }
}

async fn run(cfg: Config) -> Result<(), DaemonError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(DaemonError::NotRoot);
    }
    std::fs::create_dir_all(&cfg.state_dir)?;
    let (tx, _) = broadcast::channel(4096);
    let counters: Counters = Arc::default();
    let mut sinks = Sinks::default();
    match JsonLinesFile::open(&cfg.audit_log) {
        Ok(f) => sinks.push(Box::new(f)),
        Err(e) => log::error!("audit log {}: {e}", cfg.audit_log.display()),
    }
    sinks.push(Box::new(Broadcast {
        tx: tx.clone(),
        counters: counters.clone(),
    }));
    let host = Host::start_with(
        sinks,
        HostOptions {
            pin_root: Some(cfg.pin_root.clone()),
            cgroup_parent: cfg.cgroup_parent.clone(),
            defer_events: true,
        },
    )?;
    let listener = srv::bind(&cfg.socket)?;
    let agent = Arc::new(Agent {
        cfg,
        host,
        entries: Mutex::new(BTreeMap::new()),
        events: tx,
        counters,
        state_lock: tokio::sync::Mutex::new(()),
        started: crate::events::now_rfc3339(),
    });
    let adopted = agent.adopt().await;
    agent.host.start_events();
    log::info!(
        "agent ready on {} (backend {}, programs {}, {} instance(s) re-adopted)",
        agent.cfg.socket.display(),
        agent.host.backend(),
        if agent.host.adopted() {
            "reopened from pins"
        } else {
            "loaded"
        },
        adopted
    );
    agent.agent_record(json!({
        "event": "started",
        "programs": if agent.host.adopted() { "adopted" } else { "loaded" },
        "instances_adopted": adopted,
        "pin_root": agent.cfg.pin_root,
        "socket": agent.cfg.socket,
    }));
    tokio::spawn(srv::serve(listener, agent.clone()));
    spawn_metrics(agent.clone()).await;
    tokio::spawn(reaper(agent.clone()));
    tokio::spawn(policy_poller(agent.clone()));

    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = sighup.recv() => {
                agent.host.reopen_logs();
                agent.reload("SIGHUP").await;
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    agent.shutdown().await;
    Ok(())
}

/// Tear down instances whose server is gone and whose client is gone too
/// (a `run` client that died without `finish`), and registrations that
/// were never placed.
async fn reaper(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let entries: Vec<Arc<Entry>> = match agent.entries.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => continue,
        };
        for e in entries {
            let (attached, placed, created) = match e.meta.lock() {
                Ok(m) => (m.attached, m.pid.is_some(), m.created),
                Err(_) => continue,
            };
            if attached > 0 {
                continue;
            }
            let empty = {
                let reg = e.reg.lock().await;
                reg.as_ref().map(|r| r.pids().is_empty()).unwrap_or(true)
            };
            let dead = (placed && empty) || (!placed && created.elapsed() > UNPLACED_GRACE);
            if dead {
                log::info!("{}: server and client gone, cleaning up", e.name);
                agent.finish(&e.name, -1).await;
            }
        }
    }
}

/// A fingerprint of the policy directory: (name, size, mtime) per entry.
fn dir_fingerprint(dir: &Path) -> Vec<(String, u64, i128)> {
    let mut v: Vec<(String, u64, i128)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let md = e.metadata().ok()?;
                    let mtime = md
                        .modified()
                        .ok()?
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()?
                        .as_nanos() as i128;
                    Some((
                        e.file_name().to_string_lossy().into_owned(),
                        md.len(),
                        mtime,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Poll the policy directory (see docs/architecture.md, "Reload", for why a
/// poll and not inotify).
async fn policy_poller(agent: Arc<Agent>) {
    let every = Duration::from_millis(agent.cfg.policy_poll_ms.max(100));
    let mut last = dir_fingerprint(&agent.cfg.policy_dir);
    loop {
        tokio::time::sleep(every).await;
        let now = dir_fingerprint(&agent.cfg.policy_dir);
        if now != last {
            last = now;
            agent.reload("policy directory changed").await;
        }
    }
}

fn random_token() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Fall back to the clock and pid: still unguessable enough is not
        // the point here; tokens only bind a client to its own instance,
        // and the uid check comes first.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&(t ^ std::process::id() as u128).to_le_bytes());
    }
    hex::encode(b)
}

fn valid_server_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !s.starts_with('.')
}

/// Refuse policies that would let a confined process reach the agent: no
/// `network.unix` rule (server or tool) may cover the agent's directory or
/// its socket.
pub fn check_agent_reachable(policy: &Policy, socket: &Path) -> Result<(), String> {
    let guarded = [
        PathBuf::from("/run/mcp-warden/agent.sock"),
        socket.to_path_buf(),
    ];
    for (tool, rules, _) in policy.rule_sets() {
        for r in &rules.network.unix {
            for g in &guarded {
                let g = g.to_string_lossy();
                let covers = if r.is_subtree() {
                    g.starts_with(&r.prefix())
                } else {
                    r.path() == g
                };
                if covers {
                    let scope = tool
                        .map(|t| format!("[tools.{t}.network]"))
                        .unwrap_or_else(|| "[network]".into());
                    return Err(format!(
                        "{}: {scope} unix rule {:?} covers the mcp-warden agent socket {g}; \
                         a confined server may never reach the agent",
                        policy.source,
                        if r.is_subtree() {
                            format!("{}/**", r.path().trim_end_matches('/'))
                        } else {
                            r.path().to_string()
                        }
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Parse `text` for `uid`, naming it `label` in diagnostics.
fn parse_for(text: &str, label: &str, uid: u32) -> Result<Policy, String> {
    let vars = Vars::for_uid(uid).map_err(|e| e.to_string())?;
    policy::parse(text, label, &vars).map_err(|d| {
        d.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// /proc/PID/status: (PPid, real uid, effective uid).
fn proc_parent_uid(pid: u32) -> Option<(u32, u32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut ppid = None;
    let mut uids = None;
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("PPid:") {
            ppid = v.trim().parse().ok();
        } else if let Some(v) = l.strip_prefix("Uid:") {
            let mut it = v.split_whitespace().filter_map(|x| x.parse::<u32>().ok());
            uids = Some((it.next()?, it.next()?));
        }
    }
    let (r, e) = uids?;
    Some((ppid?, r, e))
}

impl Agent {
    fn agent_record(&self, fields: Value) {
        let mut m = serde_json::Map::new();
        m.insert("ts".into(), json!(crate::events::now_rfc3339()));
        m.insert("kind".into(), json!("agent"));
        m.insert("server".into(), Value::Null);
        m.insert("instance".into(), Value::Null);
        if let Value::Object(f) = fields {
            m.extend(f);
        }
        self.host.emit(&Value::Object(m));
    }

    fn entry(&self, name: &str) -> Option<Arc<Entry>> {
        self.entries.lock().ok()?.get(name).cloned()
    }

    /// The entry bound to this connection, if the peer may act on it.
    fn bound(&self, peer: &Peer, conn: &Conn) -> Result<Arc<Entry>, String> {
        let name = conn
            .instance
            .as_ref()
            .ok_or("no instance: register or attach first")?;
        let e = self
            .entry(name)
            .ok_or_else(|| format!("no instance {name}"))?;
        self.may_act(peer, &e)?;
        Ok(e)
    }

    fn may_act(&self, peer: &Peer, e: &Entry) -> Result<(), String> {
        let owner = e.meta.lock().map_err(|_| "poisoned")?.owner;
        if peer.uid == 0 || peer.uid == owner {
            Ok(())
        } else {
            Err(format!("instance {} belongs to another user", e.name))
        }
    }

    async fn save_state(&self) {
        let _g = self.state_lock.lock().await;
        let entries: Vec<Arc<Entry>> = match self.entries.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return,
        };
        let mut recs = Vec::new();
        for e in entries {
            let reg = e.reg.lock().await;
            let Some(reg) = reg.as_ref() else { continue };
            let Some(cgroup) = reg.cgroup_path() else {
                continue;
            };
            let Ok(m) = e.meta.lock() else { continue };
            recs.push(StateRecord {
                instance: e.name.clone(),
                instance_id: m.instance_id,
                cgroup,
                cgroup_id: e.session.cgroup_id(),
                policy_id: e.session.policy_id(),
                server: m.server.clone(),
                policy_source: m.source.clone(),
                policy_file: m.policy_file.clone(),
                policy_text: m.policy_text.clone(),
                owner_uid: m.owner,
                token: m.token.clone(),
                pid: m.pid,
                cmd: m.cmd.clone(),
            });
        }
        let st = StateFile {
            version: 1,
            instances: recs,
        };
        let path = self.cfg.state_file();
        let tmp = path.with_extension("json.tmp");
        let res = serde_json::to_vec_pretty(&st)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = res {
            log::error!("writing {}: {e}", path.display());
        }
    }

    fn load_state(&self) -> StateFile {
        let path = self.cfg.state_file();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                log::error!("{}: {e}; starting with no instances", path.display());
                StateFile::default()
            }),
            Err(_) => StateFile::default(),
        }
    }

    /// Re-adopt the instances a previous agent left (state file + pins);
    /// clean up those whose cgroup is empty. Returns how many were adopted.
    async fn adopt(&self) -> usize {
        let st = self.load_state();
        let max_id = st
            .instances
            .iter()
            .flat_map(|r| [r.instance_id, r.policy_id])
            .max()
            .unwrap_or(0);
        self.host.reserve_ids(max_id);
        let mut n = 0;
        let mut kept = std::collections::HashSet::new();
        for rec in st.instances {
            let pids = std::fs::read_to_string(rec.cgroup.join("cgroup.procs"))
                .map(|s| s.lines().count())
                .unwrap_or(0);
            if pids == 0 {
                log::info!("{}: cgroup empty, cleaning up", rec.instance);
                self.agent_record(json!({
                    "event": "instance_cleaned",
                    "instance": rec.instance,
                    "server": rec.server,
                    "reason": "its cgroup was empty when the agent started",
                }));
                self.host
                    .forget_kernel_instance(rec.cgroup_id, Some(rec.policy_id));
                let _ = std::fs::remove_dir(&rec.cgroup);
                continue;
            }
            let label = rec
                .policy_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| rec.policy_source.clone());
            let mut policy = match parse_for(&rec.policy_text, &label, rec.owner_uid) {
                Ok(p) => p,
                Err(e) => {
                    log::error!(
                        "{}: its stored policy no longer parses ({e}); it stays confined by \
                         the rules in the kernel, unmanaged",
                        rec.instance
                    );
                    kept.insert(rec.cgroup_id);
                    continue;
                }
            };
            policy.source = rec.policy_source.clone();
            let policy = Arc::new(policy);
            let info = crate::run::instance_info_for(&policy, rec.owner_uid);
            match self
                .host
                .adopt_instance(&rec.cgroup, rec.instance_id, policy, info)
                .await
            {
                Ok(reg) => {
                    kept.insert(rec.cgroup_id);
                    let e = Arc::new(Entry {
                        name: rec.instance.clone(),
                        session: reg.session.clone(),
                        meta: Mutex::new(Meta {
                            owner: rec.owner_uid,
                            token: rec.token,
                            pid: rec.pid,
                            client_pid: None,
                            server: rec.server,
                            source: rec.policy_source,
                            policy_file: rec.policy_file,
                            policy_text: rec.policy_text,
                            cmd: rec.cmd,
                            attached: 0,
                            created: Instant::now(),
                            instance_id: rec.instance_id,
                        }),
                        reg: tokio::sync::Mutex::new(Some(reg)),
                    });
                    if let Ok(mut m) = self.entries.lock() {
                        m.insert(rec.instance.clone(), e);
                    }
                    log::info!("{}: re-adopted", rec.instance);
                    n += 1;
                }
                Err(e) => {
                    kept.insert(rec.cgroup_id);
                    log::error!(
                        "{}: re-adopting: {e}; it stays confined by the pinned hooks, unmanaged",
                        rec.instance
                    );
                }
            }
        }
        // Kernel state and pins nobody owns any more.
        for id in self.host.kernel_instances() {
            if !kept.contains(&id) {
                self.host.forget_kernel_instance(id, None);
            }
        }
        if let Some(root) = self.host.pins() {
            for id in root.pinned_instances() {
                if !kept.contains(&id) {
                    root.remove_instance(id);
                }
            }
        }
        self.save_state().await;
        n
    }

    fn load_policy(
        &self,
        peer: &Peer,
        server: Option<String>,
        text: Option<String>,
        path: Option<String>,
    ) -> Result<(Policy, Option<PathBuf>, String), String> {
        let (policy, file, text) = match (server, text) {
            (Some(name), None) => {
                if !valid_server_name(&name) {
                    return Err(format!("invalid server name {name:?}"));
                }
                let file = self.cfg.policy_dir.join(format!("{name}.toml"));
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    format!("no policy for server {name:?}: {}: {e}", file.display())
                })?;
                let mut p = parse_for(&text, &file.display().to_string(), peer.uid)?;
                p.source = format!("file:{}", file.display());
                (p, Some(file), text)
            }
            (None, Some(text)) => {
                if !self.cfg.allow_user_policies {
                    return Err(
                        "this agent does not accept user policies (allow_user_policies = false \
                         in its config); ask for a policy in the agent's policy directory and \
                         use --server NAME"
                            .into(),
                    );
                }
                let label = path.unwrap_or_else(|| "<user policy>".into());
                let mut p = parse_for(&text, &label, peer.uid)?;
                p.source = format!("user:{}:{label}", peer.uid);
                (p, None, text)
            }
            _ => return Err("register takes exactly one of server and policy_text".into()),
        };
        check_agent_reachable(&policy, &self.cfg.socket)?;
        Ok((policy, file, text))
    }

    async fn register(
        &self,
        peer: &Peer,
        conn: &mut Conn,
        server: Option<String>,
        text: Option<String>,
        path: Option<String>,
        cmd: Vec<String>,
    ) -> Value {
        if conn.instance.is_some() {
            return control::err("this connection already has an instance");
        }
        let (policy, file, text) = match self.load_policy(peer, server, text, path) {
            Ok(x) => x,
            Err(e) => return control::err(e),
        };
        let policy = Arc::new(policy);
        let info = crate::run::instance_info_for(&policy, peer.uid);
        let reg = match self.host.register(policy.clone(), info).await {
            Ok(r) => r,
            Err(e) => return control::err(crate::run::error_chain(&e)),
        };
        let name = reg.session.info().instance.clone();
        let token = random_token();
        let cgroup = reg.cgroup_path();
        let e = Arc::new(Entry {
            name: name.clone(),
            session: reg.session.clone(),
            meta: Mutex::new(Meta {
                owner: peer.uid,
                token: token.clone(),
                pid: None,
                client_pid: Some(peer.pid),
                server: policy.server.clone(),
                source: policy.source.clone(),
                policy_file: file,
                policy_text: text.clone(),
                cmd,
                attached: 1,
                created: Instant::now(),
                instance_id: reg.session.instance_id(),
            }),
            reg: tokio::sync::Mutex::new(Some(reg)),
        });
        if let Ok(mut m) = self.entries.lock() {
            m.insert(name.clone(), e);
        }
        conn.instance = Some(name.clone());
        self.save_state().await;
        log::info!(
            "{name}: registered by uid {} (pid {}), policy {}",
            peer.uid,
            peer.pid,
            policy.source
        );
        control::ok(json!({
            "instance": name,
            "token": token,
            "policy_source": policy.source,
            "policy_text": text,
            "cgroup": cgroup,
            "backend": self.host.backend(),
            "files_by": control::files_by_name(self.host.files_by()),
        }))
    }

    async fn place(&self, peer: &Peer, instance: &str, token: &str, pid: u32) -> Value {
        let Some(e) = self.entry(instance) else {
            return control::err(format!("no instance {instance}"));
        };
        let (owner, tok, placed) = match e.meta.lock() {
            Ok(m) => (m.owner, m.token.clone(), m.pid),
            Err(_) => return control::err("poisoned"),
        };
        if peer.uid != owner && peer.uid != 0 {
            return control::err(format!("instance {instance} belongs to another user"));
        }
        if tok != token {
            return control::err("wrong token");
        }
        if placed.is_some() {
            return control::err("the instance's server is already placed");
        }
        match proc_parent_uid(pid) {
            Some((ppid, ruid, euid))
                if ppid == peer.pid && ruid == peer.uid && euid == peer.uid => {}
            Some((ppid, ruid, _)) => {
                return control::err(format!(
                    "pid {pid} is not a child of the peer running as its uid \
                     (parent {ppid}, uid {ruid}; peer {} uid {})",
                    peer.pid, peer.uid
                ))
            }
            None => return control::err(format!("no process {pid}")),
        }
        let res = {
            let reg = e.reg.lock().await;
            match reg.as_ref() {
                Some(r) => self.host.place(r, pid).map(|_| r.hooks().to_vec()),
                None => Err(HostError::Gone),
            }
        };
        let hooks = match res {
            Ok(h) => h,
            Err(err) => return control::err(err),
        };
        let (cmd, source) = match e.meta.lock() {
            Ok(mut m) => {
                m.pid = Some(pid);
                (m.cmd.clone(), m.source.clone())
            }
            Err(_) => return control::err("poisoned"),
        };
        let policy = e.session.policy();
        e.session.record(
            "server",
            json!({
                "event": "started",
                "pid": pid,
                "client_pid": peer.pid,
                "cmd": cmd,
                "policy_source": source,
                "mode": format!("{:?}", policy.mode).to_lowercase(),
                "backend": self.host.backend(),
                "files_by": control::files_by_name(self.host.files_by()),
                "hooks": hooks,
            }),
        );
        self.save_state().await;
        control::ok(json!({"pid": pid}))
    }

    async fn attach(
        &self,
        peer: &Peer,
        conn: &mut Conn,
        instance: &str,
        token: &str,
        calls: Vec<CallRef>,
    ) -> Value {
        let Some(e) = self.entry(instance) else {
            return control::err(format!("no instance {instance}"));
        };
        if let Err(m) = self.may_act(peer, &e) {
            return control::err(m);
        }
        match e.meta.lock() {
            Ok(mut m) if m.token == token => {
                if conn.instance.as_deref() != Some(instance) {
                    m.attached += 1;
                }
                m.client_pid = Some(peer.pid);
            }
            Ok(_) => return control::err("wrong token"),
            Err(_) => return control::err("poisoned"),
        }
        conn.instance = Some(instance.to_string());
        let policy = e.session.policy();
        let mut restored = 0;
        for c in calls {
            if !policy.tool_allowed(&c.tool) {
                continue;
            }
            let known = e
                .session
                .calls_in_flight()
                .iter()
                .any(|(id, _)| *id == c.call_id);
            if !known && e.session.call_begin(&c.call_id, &c.tool).is_ok() {
                restored += 1;
            }
        }
        log::info!("{instance}: client pid {} re-attached", peer.pid);
        e.session.record(
            "server",
            json!({"event": "client_attached", "client_pid": peer.pid, "calls_restored": restored}),
        );
        control::ok(json!({"instance": instance, "calls_restored": restored}))
    }

    /// The relay's view of a call, rebuilt from the wire, so the session's
    /// own hooks (rights, approval, accounting, records) run in the agent
    /// exactly as they run in a standalone `run`.
    fn call_start(c: &CallDone) -> Result<CallStart, String> {
        Ok(CallStart {
            id: request_id(&c.call_id)?,
            tool: c.tool.clone(),
            args_hash: c.args_sha256.clone().unwrap_or_default(),
            request_bytes: c.request_bytes,
            task: false,
        })
    }

    fn call_end_of(c: &CallDone) -> Result<CallEnd, String> {
        Ok(CallEnd {
            id: request_id(&c.call_id)?,
            tool: c.tool.clone(),
            args_hash: c.args_sha256.clone().unwrap_or_default(),
            outcome: match c.outcome.as_str() {
                "ok" => Outcome::Ok,
                "error" => Outcome::Error,
                "cancelled" => Outcome::Cancelled,
                _ => Outcome::Refused,
            },
            duration: Duration::from_secs_f64((c.duration_ms / 1000.0).max(0.0)),
            request_bytes: c.request_bytes,
            response_bytes: c.response_bytes,
            task_id: c.task_id.clone(),
            detail: c.reason.clone(),
        })
    }

    /// Tear an instance down (server exited, or nobody left to care).
    async fn finish(&self, name: &str, status: i32) -> bool {
        let e = match self.entries.lock() {
            Ok(mut m) => m.remove(name),
            Err(_) => None,
        };
        let Some(e) = e else { return false };
        let reg = e.reg.lock().await.take();
        if let Some(reg) = reg {
            if let Err(err) = self.host.finish_registered(reg, status).await {
                log::error!("{name}: tearing down: {err}");
            }
        }
        self.save_state().await;
        log::info!("{name}: finished (status {status})");
        true
    }

    fn status(&self, peer: &Peer) -> Value {
        let entries: Vec<Arc<Entry>> = match self.entries.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let mut insts = Vec::new();
        for e in entries {
            let Ok(m) = e.meta.lock() else { continue };
            if peer.uid != 0 && m.owner != peer.uid {
                continue;
            }
            let calls: Vec<Value> = e
                .session
                .calls_in_flight()
                .into_iter()
                .map(|(id, tool)| json!({"call_id": id, "tool": tool}))
                .collect();
            insts.push(json!({
                "instance": e.name,
                "server": m.server,
                "pid": m.pid,
                "uid": m.owner,
                "policy_source": m.source,
                "policy_id": e.session.policy_id(),
                "cgroup_id": e.session.cgroup_id(),
                "calls_in_flight": calls,
                "clients_attached": m.attached,
                "cmd": m.cmd,
            }));
        }
        let counters = self.counters.lock().map(|c| c.clone()).unwrap_or_default();
        self.host.refresh_lost();
        control::ok(json!({
            "agent_pid": std::process::id(),
            "started": self.started,
            "backend": self.host.backend(),
            "programs": if self.host.adopted() { "adopted" } else { "loaded" },
            "hooks": self.host.hooks(),
            "files_by": control::files_by_name(self.host.files_by()),
            "pin_root": self.cfg.pin_root,
            "policy_dir": self.cfg.policy_dir,
            "allow_user_policies": self.cfg.allow_user_policies,
            "instances": insts,
            "counters": counters,
            "events_lost": self.host.lost(),
        }))
    }

    fn follow(&self, peer: &Peer, server: Option<String>, instance: Option<String>) -> Reply {
        let mut rx = self.events.subscribe();
        let (tx, out) = mpsc::channel(256);
        let uid = peer.uid;
        tokio::spawn(async move {
            loop {
                let rec = match rx.recv().await {
                    Ok(r) => r,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        json!({"kind": "agent", "event": "stream_lagged", "dropped": n})
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if uid != 0 && rec.get("uid").and_then(Value::as_u64) != Some(uid as u64) {
                    continue;
                }
                if let Some(s) = &server {
                    if rec.get("server").and_then(Value::as_str) != Some(s) {
                        continue;
                    }
                }
                if let Some(i) = &instance {
                    if rec.get("instance").and_then(Value::as_str) != Some(i) {
                        continue;
                    }
                }
                if tx.send(rec).await.is_err() {
                    break;
                }
            }
        });
        Reply::Stream(out)
    }

    /// Re-read the policies of running instances; a policy that no longer
    /// parses leaves the one in force and is reported file:line:col.
    async fn reload(&self, why: &str) {
        log::info!("reloading policies ({why})");
        // Report every broken file, in use or not.
        if let Ok(rd) = std::fs::read_dir(&self.cfg.policy_dir) {
            for f in rd.filter_map(|e| e.ok()).map(|e| e.path()) {
                if f.extension().and_then(|x| x.to_str()) != Some("toml") {
                    continue;
                }
                if let Ok(text) = std::fs::read_to_string(&f) {
                    if let Err(e) = parse_for(&text, &f.display().to_string(), 0) {
                        log::error!("policy rejected:\n{e}");
                        self.agent_record(json!({
                            "event": "policy_rejected",
                            "file": f,
                            "errors": e.lines().collect::<Vec<_>>(),
                        }));
                    }
                }
            }
        }
        let entries: Vec<Arc<Entry>> = match self.entries.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return,
        };
        let mut changed = false;
        for e in entries {
            let (file, old, owner, source) = match e.meta.lock() {
                Ok(m) => (
                    m.policy_file.clone(),
                    m.policy_text.clone(),
                    m.owner,
                    m.source.clone(),
                ),
                Err(_) => continue,
            };
            let Some(file) = file else { continue };
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(err) => {
                    log::warn!(
                        "{}: {}: {err}; keeping the policy in force",
                        e.name,
                        file.display()
                    );
                    continue;
                }
            };
            if text == old {
                continue;
            }
            let mut policy = match parse_for(&text, &file.display().to_string(), owner)
                .and_then(|p| check_agent_reachable(&p, &self.cfg.socket).map(|_| p))
            {
                Ok(p) => p,
                Err(err) => {
                    log::error!(
                        "{}: new policy rejected, the previous one stays in force:\n{err}",
                        e.name
                    );
                    continue;
                }
            };
            policy.source = source;
            let mut reg = e.reg.lock().await;
            let Some(r) = reg.as_mut() else { continue };
            match self.host.reload_instance(r, Arc::new(policy)).await {
                Ok(()) => {
                    if let Ok(mut m) = e.meta.lock() {
                        m.policy_text = text;
                    }
                    changed = true;
                    log::info!("{}: policy reloaded from {}", e.name, file.display());
                }
                Err(err) => log::error!(
                    "{}: reloading: {err}; the previous rules stay in force",
                    e.name
                ),
            }
        }
        if changed {
            self.save_state().await;
        }
    }

    /// SIGTERM/SIGINT: leave running instances confined (cgroups, pins and
    /// kernel state stay; a restarted agent re-adopts them), or remove every
    /// pin when none is left.
    async fn shutdown(&self) {
        let entries: Vec<Arc<Entry>> = match self.entries.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let _ = std::fs::remove_file(&self.cfg.socket);
        if entries.is_empty() {
            if let Some(root) = self.host.pins() {
                if let Err(e) = root.remove_all() {
                    log::error!("{e}");
                }
            }
            let _ = std::fs::remove_file(self.cfg.state_file());
            log::info!("agent stopped; no instance was running, pins removed");
        } else {
            self.save_state().await;
            for e in entries {
                if let Some(r) = e.reg.lock().await.take() {
                    r.keep();
                }
            }
            log::info!("agent stopped; running instances stay confined (pins kept)");
        }
        self.host.drain().await;
    }
}

impl Handler for Agent {
    fn refuse(&self, peer: &Peer) -> Option<String> {
        match srv::cgroup_of(peer.pid) {
            Some(cg) if srv::inside(&cg, &self.cfg.cgroup_parent) => {
                Some("confined processes may not use the agent".into())
            }
            Some(_) => None,
            None => Some("cannot identify the peer".into()),
        }
    }

    async fn handle(&self, peer: &Peer, conn: &mut Conn, req: Request) -> Reply {
        let v = match req {
            Request::Ping => control::ok(json!({
                "agent": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
            })),
            Request::Register {
                server,
                policy_text,
                policy_path,
                cmd,
            } => {
                self.register(peer, conn, server, policy_text, policy_path, cmd)
                    .await
            }
            Request::Place {
                instance,
                token,
                pid,
            } => self.place(peer, &instance, &token, pid).await,
            Request::Attach {
                instance,
                token,
                calls,
            } => self.attach(peer, conn, &instance, &token, calls).await,
            Request::CallBegin {
                call_id,
                tool,
                args_sha256,
                request_bytes,
                task,
            } => match self.bound(peer, conn) {
                Err(m) => control::err(m),
                Ok(e) => {
                    // The agent's policy is the one in force (a reload may
                    // have changed it since the client read its copy).
                    if !e.session.policy().tool_allowed(&tool) {
                        control::err(format!("tool {tool:?} is not allowed by the policy"))
                    } else {
                        match request_id(&call_id) {
                            Err(m) => control::err(m),
                            Ok(id) => {
                                let start = CallStart {
                                    id,
                                    tool,
                                    args_hash: args_sha256.unwrap_or_default(),
                                    request_bytes,
                                    task,
                                };
                                match RelayHooks::call_begin(&*e.session, &start).await {
                                    Ok(()) => control::ok(json!({})),
                                    Err(err) => control::err(err),
                                }
                            }
                        }
                    }
                }
            },
            Request::CallEnd(c) => match self.bound(peer, conn) {
                Err(m) => control::err(m),
                Ok(e) => match Self::call_end_of(&c) {
                    Err(m) => control::err(m),
                    Ok(end) => match RelayHooks::call_end(&*e.session, &end).await {
                        Some(why) => control::ok(json!({"stopped": why})),
                        None => control::ok(json!({})),
                    },
                },
            },
            Request::CallRefused(c) => match self.bound(peer, conn) {
                Err(m) => control::err(m),
                Ok(e) => match Self::call_start(&c) {
                    Err(m) => control::err(m),
                    Ok(start) => {
                        RelayHooks::call_refused(
                            &*e.session,
                            &start,
                            c.reason.as_deref().unwrap_or("refused by the relay"),
                        );
                        control::ok(json!({}))
                    }
                },
            },
            Request::SessionInfo(h) => match self.bound(peer, conn) {
                Err(m) => control::err(m),
                Ok(e) => {
                    RelayHooks::session_info(
                        &*e.session,
                        &SessionInfo {
                            handshake: None,
                            protocol_version: h.protocol_version,
                            client_name: h.client_name,
                            client_version: h.client_version,
                            negotiated_version: h.negotiated_version,
                            server_name: h.server_name,
                            server_version: h.server_version,
                        },
                    );
                    control::ok(json!({}))
                }
            },
            Request::ServerRequest { method, decision } => match self.bound(peer, conn) {
                Err(m) => control::err(m),
                Ok(e) => {
                    let d = match decision.as_str() {
                        "allow" => Governance::Allow,
                        "log" => Governance::Log,
                        _ => Governance::Deny,
                    };
                    RelayHooks::server_request(&*e.session, &method, d);
                    control::ok(json!({}))
                }
            },
            Request::Record { fields } => match self.bound(peer, conn) {
                Err(m) => control::err(m),
                Ok(e) => {
                    e.session.record("server", fields);
                    control::ok(json!({}))
                }
            },
            Request::Finish { status } => match self.bound(peer, conn) {
                Err(m) => control::err(m),
                Ok(e) => {
                    let name = e.name.clone();
                    drop(e);
                    conn.instance = None;
                    self.finish(&name, status).await;
                    control::ok(json!({}))
                }
            },
            Request::ExecPaths { paths } => match self.bound(peer, conn) {
                Err(m) => control::err(m),
                Ok(e) => {
                    let placed = e.meta.lock().map(|m| m.pid.is_some()).unwrap_or(true);
                    if placed {
                        control::err("exec paths are set before the server is placed")
                    } else {
                        let mut reg = e.reg.lock().await;
                        match reg.as_mut() {
                            Some(r) => match self.host.install_files(r, paths) {
                                Ok(()) => control::ok(json!({})),
                                Err(err) => control::err(err),
                            },
                            None => control::err("the instance is gone"),
                        }
                    }
                }
            },
            Request::Status => self.status(peer),
            Request::Events { server, instance } => {
                return self.follow(peer, server, instance);
            }
        };
        Reply::One(v)
    }

    async fn closed(&self, _peer: &Peer, conn: Conn) {
        if let Some(name) = conn.instance {
            if let Some(e) = self.entry(&name) {
                if let Ok(mut m) = e.meta.lock() {
                    m.attached = m.attached.saturating_sub(1);
                }
                log::info!("{name}: client connection closed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(unix: &str) -> Policy {
        let vars = Vars {
            home: "/home/ann".into(),
            user: "ann".into(),
            uid: 1000,
        };
        policy::parse(
            &format!("version = 1\nserver = \"s\"\n[network]\nunix = [{unix}]\n"),
            "p.toml",
            &vars,
        )
        .expect("parse")
    }

    #[test]
    fn agent_socket_is_never_reachable() {
        let sock = Path::new("/run/mcp-warden/agent.sock");
        assert!(check_agent_reachable(&policy("\"/run/mcp-warden/**\""), sock).is_err());
        assert!(check_agent_reachable(&policy("\"/run/**\""), sock).is_err());
        assert!(check_agent_reachable(&policy("\"/**\""), sock).is_err());
        assert!(check_agent_reachable(&policy("\"/run/mcp-warden/agent.sock\""), sock).is_err());
        assert!(check_agent_reachable(&policy("\"/run/postgresql/**\""), sock).is_ok());
        let other = Path::new("/tmp/t/agent.sock");
        assert!(check_agent_reachable(&policy("\"/tmp/**\""), other).is_err());
    }

    #[test]
    fn server_names() {
        assert!(valid_server_name("git"));
        assert!(valid_server_name("fs-1.2_x"));
        assert!(!valid_server_name("../etc/x"));
        assert!(!valid_server_name(".hidden"));
        assert!(!valid_server_name(""));
    }

    #[test]
    fn state_file_round_trip() {
        let st = StateFile {
            version: 1,
            instances: vec![StateRecord {
                instance: "git-1-2".into(),
                instance_id: 2,
                cgroup: "/sys/fs/cgroup/mcp-warden/git-1-2".into(),
                cgroup_id: 99,
                policy_id: 3,
                server: "git".into(),
                policy_source: "file:/etc/mcp-warden/policies/git.toml".into(),
                policy_file: Some("/etc/mcp-warden/policies/git.toml".into()),
                policy_text: "version = 1\n".into(),
                owner_uid: 1000,
                token: "ab".into(),
                pid: Some(5),
                cmd: vec!["uvx".into()],
            }],
        };
        let s = serde_json::to_string(&st).expect("ser");
        let back: StateFile = serde_json::from_str(&s).expect("de");
        assert_eq!(back.instances[0].cgroup_id, 99);
        assert_eq!(back.instances[0].pid, Some(5));
    }
}
