//! The agent's core, hosted in-process: the loaded kernel programs, the
//! event pipeline, the metrics, and the live instances. `mcp-warden run`
//! (standalone, as root) and `mcp-warden demo` use it for one server; the
//! daemon uses the same code for many.
use std::{
    collections::HashMap,
    ffi::OsString,
    os::fd::AsRawFd,
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::{
    confine::cgroup::{self, InstanceCgroup},
    dns,
    events::{self, reader::Control, InstanceInfo, Sinks},
    kernel::{pin::PinRoot, CgroupLinks, Kernel, KernelError},
    metrics::Metrics,
    policy::{compile, Policy},
    session::{Session, SessionError},
};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0}")]
    Kernel(#[from] KernelError),
    #[error("{0}")]
    Session(#[from] SessionError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("compiling the network rules: {0}")]
    Compile(#[from] compile::CompileError),
    #[error("dns: {0}")]
    Dns(#[from] dns::DnsError),
    #[error("metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("confinement: {0}")]
    Confine(#[from] crate::confine::ConfineError),
    #[error("starting {cmd:?}: {source}")]
    Spawn {
        cmd: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("command {0:?} not found in PATH")]
    NotFound(OsString),
    #[error("empty command")]
    NoCommand,
    #[error("event reader: {0}")]
    Reader(std::io::Error),
    #[error("internal lock poisoned")]
    Poisoned,
    #[error("the instance is gone")]
    Gone,
    #[error("moving pid {pid} into the instance cgroup: {source}")]
    Place {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

type Registry = Arc<Mutex<HashMap<u64, Arc<Session>>>>;

/// The loaded agent core.
pub struct Host {
    kernel: Arc<Mutex<Kernel>>,
    sessions: Registry,
    sinks: Arc<Mutex<Sinks>>,
    metrics: Metrics,
    next_id: AtomicU32,
    control: mpsc::Sender<Control>,
    reader: Option<tokio::task::JoinHandle<std::io::Result<u64>>>,
    backend: &'static str,
    /// bpf-lsm with every path mutation hook (false on Linux 6.1).
    lsm_mutations: bool,
    /// Where maps, programs and links are pinned (the daemon); None when
    /// everything ends with the process (standalone `run`, demo).
    pins: Option<PinRoot>,
    cgroup_parent: String,
    adopted: bool,
    events_gate: Mutex<Option<oneshot::Sender<()>>>,
    approvals: crate::approval::Approvals,
    _approval_socket: Option<crate::approval::ServeGuard>,
}

/// How the host loads and places things.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// Pin under this root, and re-adopt what a previous agent pinned there.
    pub pin_root: Option<PathBuf>,
    /// Directory under the cgroup2 mount for the instance cgroups.
    pub cgroup_parent: String,
    /// Hold the events back until [`Host::start_events`].
    pub defer_events: bool,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            pin_root: None,
            cgroup_parent: cgroup::PARENT.to_string(),
            defer_events: false,
        }
    }
}

impl Host {
    /// Load the kernel programs and start the event reader.
    pub fn start(sinks: Sinks) -> Result<Self, HostError> {
        Self::start_with(sinks, HostOptions::default())
    }

    /// [`Host::start`] with pinning: with a pin root, a previous agent's
    /// pinned programs and maps are reopened instead of loading new ones.
    pub fn start_with(sinks: Sinks, opts: HostOptions) -> Result<Self, HostError> {
        let pins = opts.pin_root.as_deref().map(PinRoot::new);
        let (mut kernel, adopted) = match &pins {
            Some(root) => Kernel::load_or_adopt(root)?,
            None => (Kernel::load()?, false),
        };
        // Loading parsed the kernel's BTF and the eBPF object: ~13 MB of
        // heap that is free again but kept by malloc (measured with
        // `cargo xtask bench`: idle RSS 31 -> 18 MB). Hand it back.
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        let backend = kernel.backend();
        let lsm_mutations = kernel.lsm_mutations();
        let metrics = Metrics::new()?;
        for (hook, on) in &kernel.capabilities().hooks {
            metrics
                .enforcement_available
                .with_label_values(&[hook])
                .set(if *on { 1.0 } else { 0.0 });
        }
        let ring = kernel
            .take_events()
            .ok_or(KernelError::MissingMap("mw_events"))?;
        let sessions: Registry = Arc::new(Mutex::new(HashMap::new()));
        let (control, control_rx) = mpsc::channel::<Control>(16);
        let reg = sessions.clone();
        let dispatch = move |ev: mcp_warden_common::Event| {
            let s = reg.lock().ok().and_then(|m| m.get(&ev.cgroup_id).cloned());
            match s {
                Some(s) => s.on_kernel_event(&ev),
                None => log::debug!("event for unknown cgroup {}", ev.cgroup_id),
            }
        };
        // An adopting agent delivers nothing until it has re-registered the
        // instances it adopts: the events the kernel kept in the ring buffer
        // while no agent ran would otherwise find no session.
        let (gate_tx, gate_rx) = oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            let _ = gate_rx.await;
            events::reader::run(ring, dispatch, control_rx).await
        });
        let gate = if opts.defer_events {
            Some(gate_tx)
        } else {
            let _ = gate_tx.send(());
            None
        };
        let approvals = crate::approval::Approvals::default();
        Ok(Self {
            events_gate: Mutex::new(gate),
            kernel: Arc::new(Mutex::new(kernel)),
            sessions,
            sinks: Arc::new(Mutex::new(sinks)),
            metrics,
            next_id: AtomicU32::new(1),
            control,
            reader: Some(reader),
            backend,
            lsm_mutations,
            pins,
            cgroup_parent: opts.cgroup_parent,
            adopted,
            _approval_socket: match approvals.serve() {
                Ok(g) => Some(g),
                Err(e) => {
                    log::warn!("approvals: {e}; tools that need approval will be refused");
                    None
                }
            },
            approvals,
        })
    }

    /// Start delivering events (after [`HostOptions::defer_events`]).
    pub fn start_events(&self) {
        if let Ok(mut g) = self.events_gate.lock() {
            if let Some(tx) = g.take() {
                let _ = tx.send(());
            }
        }
    }

    /// Who enforces file rights in the server process: Landlock alone
    /// (fallback), or BPF-LSM with Landlock keeping only its scopes (and the
    /// path mutations where this kernel refuses those LSM hooks).
    pub fn files_by(&self) -> crate::confine::landlock::FilesBy {
        use crate::confine::landlock::FilesBy;
        match (
            self.backend == crate::kernel::lsm::BACKEND_LSM,
            self.lsm_mutations,
        ) {
            (false, _) => FilesBy::Landlock,
            (true, true) => FilesBy::BpfLsm,
            (true, false) => FilesBy::BpfLsmExceptMutations,
        }
    }

    /// BPF-LSM: compile and install the instance's file/exec entries, with
    /// `always` (the command, its resolved path and its interpreters) always
    /// runnable; in force before the server is placed. Nothing on the
    /// fallback, where Landlock in the server process holds the file rules.
    pub fn install_files(
        &self,
        reg: &mut Registered,
        always: Vec<String>,
    ) -> Result<(), HostError> {
        reg.exec_always = always;
        if self.backend != crate::kernel::lsm::BACKEND_LSM {
            return Ok(());
        }
        let policy = reg.session.policy();
        let files = compile::compile_files(&policy, reg.session.policy_id(), &reg.exec_always)?;
        let mut k = self.kernel.lock().map_err(|_| HostError::Poisoned)?;
        k.install_files(&files, Some(&reg.files))?;
        reg.files = files;
        Ok(())
    }

    /// Did this host reopen a previous agent's pinned programs and maps?
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pins(&self) -> Option<&PinRoot> {
        self.pins.as_ref()
    }

    /// Hooks the kernel gives us (name -> in force).
    pub fn hooks(&self) -> std::collections::BTreeMap<&'static str, bool> {
        self.kernel
            .lock()
            .map(|k| k.capabilities().hooks.clone())
            .unwrap_or_default()
    }

    /// Events lost per kind, as last read from the kernel.
    pub fn lost(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(k) = self.kernel.lock() {
            if let Ok(lost) = k.lost() {
                for (i, n) in lost.iter().enumerate() {
                    if let Some(name) = events::lost_kind_name(i as u32) {
                        *out.entry(name).or_insert(0) += *n;
                    }
                }
            }
        }
        out
    }

    /// Never hand out an id at or below `max` (ids a previous agent used).
    pub fn reserve_ids(&self, max: u32) {
        self.next_id
            .fetch_max(max.saturating_add(1), Ordering::Relaxed);
    }

    /// Cgroup ids in the kernel's instance map.
    pub fn kernel_instances(&self) -> Vec<u64> {
        self.kernel
            .lock()
            .map(|k| k.instance_ids())
            .unwrap_or_default()
    }

    /// Remove a dead instance's kernel state (no session, cgroup gone).
    pub fn forget_kernel_instance(&self, cgroup_id: u64, policy_id: Option<u32>) {
        if let Ok(mut k) = self.kernel.lock() {
            if let Some(pid) = policy_id.or_else(|| k.instance(cgroup_id).map(|s| s.policy_id)) {
                if let Err(e) = k.remove_policy_entries(pid) {
                    log::error!("removing rule set {pid}: {e}");
                }
            }
            if let Err(e) = k.remove_instance(cgroup_id) {
                log::error!("removing instance {cgroup_id}: {e}");
            }
        }
        if let Some(root) = &self.pins {
            root.remove_instance(cgroup_id);
        }
    }

    /// Take over an instance a previous agent registered: its cgroup (still
    /// holding the server), its pinned links and kernel state. Its rules are
    /// recompiled from `policy` and swapped in without a gap.
    pub async fn adopt_instance(
        &self,
        cgroup_path: &std::path::Path,
        instance_id: u32,
        policy: Arc<Policy>,
        info: InstanceInfo,
    ) -> Result<Registered, HostError> {
        let root = self.pins.as_ref().ok_or(HostError::Gone)?;
        let cg = InstanceCgroup::open(cgroup_path)?;
        let cgroup_id = cg.id();
        let (links, state) = {
            let k = self.kernel.lock().map_err(|_| HostError::Poisoned)?;
            let links = k.adopt_cgroup_links(root, cgroup_id)?;
            (links, k.instance(cgroup_id))
        };
        let state = state.ok_or(HostError::Gone)?;
        let mut info = info;
        info.instance = cgroup_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        info.backend = self.backend.to_string();
        let (account_tx, account_rx) = tokio::sync::mpsc::unbounded_channel();
        let session = Arc::new(Session::resume(
            self.kernel.clone(),
            cgroup_id,
            cgroup_path.to_path_buf(),
            instance_id,
            state.policy_id,
            policy.clone(),
            info,
            self.sinks.clone(),
            self.metrics.clone(),
            account_tx,
            self.files_by(),
            state.epoch,
        )?);
        let accountant = tokio::spawn(crate::session::run_accountant(session.clone(), account_rx));
        session.set_approvals(self.approvals.clone());
        session.set_reader(self.control.clone());
        let mut reg = Registered {
            session,
            cgroup: Some(cg),
            guardian: None,
            hooks: links.hooks(),
            links: Some(links),
            dns_task: None,
            accountant: Some(accountant),
            files: Vec::new(),
            exec_always: Vec::new(),
        };
        self.sessions
            .lock()
            .map_err(|_| HostError::Poisoned)?
            .insert(cgroup_id, reg.session.clone());
        self.reload_instance(&mut reg, policy).await?;
        metrics_server_state(&self.metrics, 1);
        reg.session
            .record("server", json!({"event": "adopted", "pids": reg.pids()}));
        Ok(reg)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Send a record to every sink (agent-level records).
    pub fn emit(&self, rec: &serde_json::Value) {
        if let Ok(mut s) = self.sinks.lock() {
            s.emit(rec);
        }
    }

    /// Reopen the JSON-lines files (SIGHUP, after log rotation).
    pub fn reopen_logs(&self) {
        if let Ok(mut s) = self.sinks.lock() {
            s.reopen();
        }
    }

    /// Deliver every event the kernel has written so far.
    pub async fn drain(&self) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Drain(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Update `mcp_warden_events_lost_total` from the kernel's counters.
    pub fn refresh_lost(&self) {
        let Ok(k) = self.kernel.lock() else { return };
        if let Ok(lost) = k.lost() {
            for (i, n) in lost.iter().enumerate() {
                let Some(name) = events::lost_kind_name(i as u32) else {
                    continue;
                };
                let c = self.metrics.events_lost.with_label_values(&[name]);
                let cur = c.get();
                if *n > cur {
                    c.inc_by(*n - cur);
                }
            }
        }
    }

    /// Confine and start a server: cgroup, kernel state and hooks first,
    /// then fork -> join the cgroup -> apply Landlock/seccomp/caps -> exec.
    pub async fn launch(
        &self,
        policy: Arc<Policy>,
        argv: &[OsString],
        info: InstanceInfo,
    ) -> Result<Instance, HostError> {
        let (prog, _) = argv.split_first().ok_or(HostError::NoCommand)?;
        let cmd_path = resolve_command(prog)?;
        let reg = self.register(policy, info).await?;
        self.spawn(reg, argv, &cmd_path).await
    }

    /// Register an instance: its cgroup, its compiled rules and instance
    /// state in the kernel, and the cgroup hooks (pinned when the host pins).
    /// Nothing runs in the cgroup yet; [`Host::place`] or [`Host::spawn`]
    /// puts the server there before it executes.
    pub async fn register(
        &self,
        policy: Arc<Policy>,
        info: InstanceInfo,
    ) -> Result<Registered, HostError> {
        let instance_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let policy_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{}",
            sanitize(&policy.server),
            std::process::id(),
            instance_id
        );
        let cg = InstanceCgroup::create_in(&self.cgroup_parent()?, &name)?;
        // Without pins, the hooks live only as long as this process: should
        // it die without tearing the instance down, the guardian ends the
        // tree, so nothing outlives its confinement. (Pinned links outlive
        // the agent and keep the tree confined for the next one to adopt.)
        let guardian = match self.pins {
            None => Some(cg.guard()?),
            Some(_) => None,
        };
        let mut info = info;
        info.instance = name.clone();
        info.backend = self.backend.to_string();
        let (account_tx, account_rx) = tokio::sync::mpsc::unbounded_channel();
        let session = Arc::new(Session::new(
            self.kernel.clone(),
            cg.id(),
            cg.path().to_path_buf(),
            instance_id,
            policy_id,
            policy.clone(),
            info,
            self.sinks.clone(),
            self.metrics.clone(),
            account_tx,
            self.files_by(),
        )?);
        let accountant = tokio::spawn(crate::session::run_accountant(session.clone(), account_rx));
        session.set_approvals(self.approvals.clone());
        session.set_reader(self.control.clone());
        let mut reg = Registered {
            session,
            cgroup: Some(cg),
            guardian,
            links: None,
            dns_task: None,
            hooks: Vec::new(),
            accountant: Some(accountant),
            files: Vec::new(),
            exec_always: Vec::new(),
        };
        self.install_rules(&mut reg, &policy, policy_id).await?;
        let parent_dir = self.cgroup_parent()?;
        let parent =
            std::fs::File::open(&parent_dir).map_err(|source| cgroup::CgroupError::Io {
                op: "open",
                path: parent_dir.clone(),
                source,
            })?;
        let mut links = {
            let mut k = self.kernel.lock().map_err(|_| HostError::Poisoned)?;
            k.set_instances_parent(&parent)?;
            k.attach_cgroup(reg.cgroup_dir()?)?
        };
        if let Some(root) = &self.pins {
            let k = self.kernel.lock().map_err(|_| HostError::Poisoned)?;
            k.pin_cgroup_links(root, &mut links, reg.session.cgroup_id())?;
        }
        reg.hooks = links.hooks();
        reg.links = Some(links);
        self.sessions
            .lock()
            .map_err(|_| HostError::Poisoned)?
            .insert(reg.session.cgroup_id(), reg.session.clone());
        metrics_server_state(&self.metrics, 1);
        Ok(reg)
    }

    fn cgroup_parent(&self) -> Result<PathBuf, HostError> {
        Ok(cgroup::cgroup2_mount()?.join(&self.cgroup_parent))
    }

    /// Compile `policy` as rule set `policy_id` (resolving its DNS names),
    /// insert the entries, and keep the names fresh within their TTL.
    /// Replaces the instance's DNS refresher.
    async fn install_rules(
        &self,
        reg: &mut Registered,
        policy: &Arc<Policy>,
        policy_id: u32,
    ) -> Result<(), HostError> {
        let resolver = dns::Resolver::new()?;
        let names = dns::names(policy);
        let resolved = resolver.resolve(&names).await;
        for (n, e) in &resolved.failed {
            log::warn!(
                "{}: DNS name {n} did not resolve ({e}); nothing is allowed for it until it does",
                policy.server
            );
        }
        let net = compile::compile_net(policy, policy_id, &resolved.addrs)?;
        self.kernel
            .lock()
            .map_err(|_| HostError::Poisoned)?
            .install_net(&net, None)?;
        if self.backend == crate::kernel::lsm::BACKEND_LSM && !reg.exec_always.is_empty() {
            let files = compile::compile_files(policy, policy_id, &reg.exec_always)?;
            self.kernel
                .lock()
                .map_err(|_| HostError::Poisoned)?
                .install_files(&files, None)?;
            reg.files = files;
        }
        if let Some(t) = reg.dns_task.take() {
            t.abort();
        }
        if names.is_empty() {
            return Ok(());
        }
        let kernel = self.kernel.clone();
        let policy = policy.clone();
        let mut current = net;
        let mut next = resolved.next_refresh;
        reg.dns_task = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep_until(next.into()).await;
                let r = resolver.resolve(&names).await;
                next = r.next_refresh;
                match compile::compile_net(&policy, policy_id, &r.addrs) {
                    Ok(new) if new != current => {
                        let res = kernel.lock().map_err(|_| ()).and_then(|mut k| {
                            k.install_net(&new, Some(&current)).map_err(|e| {
                                log::error!("refreshing DNS rules: {e}");
                            })
                        });
                        if res.is_ok() {
                            log::info!("{}: DNS rules refreshed", policy.server);
                            current = new;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => log::error!("refreshing DNS rules: {e}"),
                }
            }
        }));
        Ok(())
    }

    /// Switch a running instance to `policy` without a gap: its rules go in
    /// as a new rule set, one instance-state update moves the programs to it,
    /// then the old rule set is removed.
    pub async fn reload_instance(
        &self,
        reg: &mut Registered,
        policy: Arc<Policy>,
    ) -> Result<(), HostError> {
        let old_id = reg.session.policy_id();
        let new_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.install_rules(reg, &policy, new_id).await {
            let _ = self
                .kernel
                .lock()
                .map_err(|_| HostError::Poisoned)?
                .remove_policy_entries(new_id);
            return Err(e);
        }
        reg.session.swap_policy(policy, new_id)?;
        self.kernel
            .lock()
            .map_err(|_| HostError::Poisoned)?
            .remove_policy_entries(old_id)?;
        reg.session.record(
            "server",
            json!({"event": "policy_reloaded", "policy_id": new_id}),
        );
        Ok(())
    }

    /// Move `pid` (a process forked by a `run` client, blocked before exec)
    /// into the instance cgroup.
    pub fn place(&self, reg: &Registered, pid: u32) -> Result<(), HostError> {
        let cg = reg.cgroup.as_ref().ok_or(HostError::Gone)?;
        let mut f = cg.procs_file()?;
        use std::io::Write;
        f.write_all(pid.to_string().as_bytes())
            .map_err(|source| HostError::Place { pid, source })?;
        Ok(())
    }

    /// Fork the server in-process: join the cgroup, apply Landlock, seccomp
    /// and the capability drop, exec (standalone mode).
    pub async fn spawn(
        &self,
        reg: Registered,
        argv: &[OsString],
        cmd_path: &std::path::Path,
    ) -> Result<Instance, HostError> {
        let (prog, args) = argv.split_first().ok_or(HostError::NoCommand)?;
        let policy = reg.session.policy();
        // Audit mode judges execs in userspace: the launched command and its
        // interpreters are always allowed (learn/audit plumbing).
        reg.session.set_launched(cmd_path);
        // Opens a file per rule and lists directories: off the runtime.
        let prepared = {
            let policy = policy.clone();
            let cmd_path = cmd_path.to_path_buf();
            let by = self.files_by();
            tokio::task::spawn_blocking(move || {
                crate::confine::Prepared::new_for(&policy, &cmd_path, by)
            })
            .await
            .map_err(|e| HostError::Reader(std::io::Error::other(e)))??
        };
        let confinement = prepared.report();
        for w in &confinement.landlock.warnings {
            log::warn!("{}: {w}", policy.server);
        }
        // BPF-LSM: files and exec rules, with the command and its
        // interpreters always runnable, in force before the fork.
        let mut reg = reg;
        self.install_files(&mut reg, exec_always(cmd_path, &confinement))?;
        let procs = reg.cgroup.as_ref().ok_or(HostError::Gone)?.procs_file()?;
        let procs_fd = procs.as_raw_fd();
        let mut cmd = tokio::process::Command::new(cmd_path);
        cmd.arg0(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs between fork and exec; it only makes
        // async-signal-safe calls (write(2) of a stack buffer, prctl,
        // landlock and seccomp syscalls on data prepared in the parent).
        unsafe {
            cmd.pre_exec(move || {
                cgroup::join_procs_raw(procs_fd)?;
                prepared.apply_in_child()
            });
        }
        let child = cmd.spawn().map_err(|source| HostError::Spawn {
            cmd: prog.clone(),
            source,
        })?;
        drop(procs);
        reg.session.record(
            "server",
            json!({
                "event": "started",
                "pid": child.id(),
                "cmd": argv.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
                "policy_source": policy.source,
                "mode": format!("{:?}", policy.mode).to_lowercase(),
                "backend": self.backend,
                "files_by": crate::control::files_by_name(self.files_by()),
                "hooks": reg.hooks,
                "confinement": serde_json::to_value(&confinement).unwrap_or(serde_json::Value::Null),
            }),
        );
        Ok(Instance {
            session: reg.session.clone(),
            reg,
            child,
        })
    }

    /// Tear an instance down after its server exited: kill what is left of
    /// the tree, deliver its last events, detach, remove its kernel state.
    pub async fn finish(&self, inst: Instance, status: i32) -> Result<(), HostError> {
        self.finish_registered(inst.reg, status).await
    }

    /// [`Host::finish`] for an instance without an in-process child.
    pub async fn finish_registered(
        &self,
        mut reg: Registered,
        status: i32,
    ) -> Result<(), HostError> {
        if let Some(t) = reg.dns_task.take() {
            t.abort();
        }
        let cg = reg.cgroup.take();
        if let Some(cg) = &cg {
            let cg_path = cg.path().to_path_buf();
            let left = cg.pids().unwrap_or_default();
            if !left.is_empty() {
                log::info!(
                    "{}: ending {} process(es) left in {}",
                    reg.session.info().instance,
                    left.len(),
                    cg_path.display()
                );
            }
            cg.kill_all(Duration::from_secs(5))?;
        }
        self.drain().await;
        self.refresh_lost();
        if let Some(t) = reg.accountant.take() {
            t.abort();
        }
        // Last syscall counts, and the records of calls still waiting on them.
        let s = reg.session.clone();
        let _ = tokio::task::spawn_blocking(move || s.account(true)).await;
        // The standalone agent serves no /metrics: the exit record carries
        // the kernel's lost-event counters (agent-wide, since its start).
        reg.session.record(
            "server",
            json!({"event": "exited", "status": status, "events_lost": self.lost()}),
        );
        if let Some(l) = reg.links.take() {
            l.unpin();
        }
        let policy_id = reg.session.policy_id();
        {
            let mut k = self.kernel.lock().map_err(|_| HostError::Poisoned)?;
            k.remove_files(&reg.files)?;
            k.remove_policy_entries(policy_id)?;
        }
        reg.session.unregister()?;
        self.sessions
            .lock()
            .map_err(|_| HostError::Poisoned)?
            .remove(&reg.session.cgroup_id());
        if let Some(root) = &self.pins {
            root.remove_instance(reg.session.cgroup_id());
        }
        if let Some(cg) = cg {
            cg.remove()?;
        }
        drop(reg.guardian.take());
        metrics_server_state(&self.metrics, -1);
        Ok(())
    }

    /// Stop the event reader after a last drain.
    pub async fn shutdown(mut self) -> Result<u64, HostError> {
        self.drain().await;
        let _ = self.control.send(Control::Stop).await;
        match self.reader.take() {
            Some(h) => match h.await {
                Ok(r) => r.map_err(HostError::Reader),
                Err(e) => Err(HostError::Reader(std::io::Error::other(e))),
            },
            None => Ok(0),
        }
    }
}

fn metrics_server_state(m: &Metrics, delta: i64) {
    m.servers.with_label_values(&["running"]).add(delta);
}

/// A registered instance: cgroup, kernel state, hooks. Whoever forks the
/// server (the host itself, or a `run` client via [`Host::place`]) puts it
/// in the cgroup before it executes.
pub struct Registered {
    pub session: Arc<Session>,
    cgroup: Option<InstanceCgroup>,
    /// Ends the tree if this process dies first (unpinned hosts only).
    guardian: Option<cgroup::Guardian>,
    links: Option<CgroupLinks>,
    dns_task: Option<tokio::task::JoinHandle<()>>,
    hooks: Vec<&'static str>,
    accountant: Option<tokio::task::JoinHandle<()>>,
    /// BPF-LSM file/exec entries of this instance (empty on the fallback).
    files: Vec<compile::FileEntry>,
    /// Paths always executable (the command and its interpreters).
    exec_always: Vec<String>,
}

impl Registered {
    pub fn cgroup_path(&self) -> Option<PathBuf> {
        self.cgroup.as_ref().map(|c| c.path().to_path_buf())
    }

    fn cgroup_dir(&self) -> Result<&std::fs::File, HostError> {
        Ok(self.cgroup.as_ref().ok_or(HostError::Gone)?.dir())
    }

    /// Pids in the instance cgroup (empty when gone).
    pub fn pids(&self) -> Vec<u32> {
        self.cgroup
            .as_ref()
            .and_then(|c| c.pids().ok())
            .unwrap_or_default()
    }

    /// Names of the attached hooks.
    pub fn hooks(&self) -> &[&'static str] {
        &self.hooks
    }

    /// Leave the instance running and confined when the agent exits: keep
    /// the cgroup and the pinned links (nothing is killed or detached).
    pub fn keep(mut self) {
        if let Some(g) = self.guardian.take() {
            g.disarm();
        }
        if let Some(cg) = self.cgroup.take() {
            std::mem::forget(cg);
        }
        if let Some(t) = self.dns_task.take() {
            t.abort();
        }
        if let Some(t) = self.accountant.take() {
            t.abort();
        }
    }
}

/// A launched, confined server.
pub struct Instance {
    pub session: Arc<Session>,
    reg: Registered,
    pub child: tokio::process::Child,
}

impl Instance {
    pub fn cgroup_path(&self) -> Option<PathBuf> {
        self.reg.cgroup_path()
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// The paths BPF-LSM must always let the server execute: the command as
/// given, its resolved path, and its interpreters (ELF loader, shebangs).
pub fn exec_always(
    cmd_path: &std::path::Path,
    confinement: &crate::confine::ConfinementReport,
) -> Vec<String> {
    let mut always = vec![cmd_path.to_string_lossy().into_owned()];
    if let Ok(c) = std::fs::canonicalize(cmd_path) {
        always.push(c.to_string_lossy().into_owned());
    }
    always.extend(
        confinement
            .landlock
            .interpreters
            .iter()
            .map(|p| p.to_string_lossy().into_owned()),
    );
    always
}

/// Resolve the command like execvp would, to an absolute path. Symlinks are
/// kept (not canonicalized): a venv's `bin/python` finds its venv through the
/// path it was started by.
pub fn resolve_command(prog: &OsString) -> Result<PathBuf, HostError> {
    let p = PathBuf::from(prog);
    let found = if p.is_absolute() {
        p
    } else if p.components().count() > 1 {
        std::env::current_dir()
            .map_err(|_| HostError::NotFound(prog.clone()))?
            .join(p)
    } else {
        which::which(&p).map_err(|_| HostError::NotFound(prog.clone()))?
    };
    if !found.exists() {
        return Err(HostError::NotFound(prog.clone()));
    }
    Ok(found)
}
