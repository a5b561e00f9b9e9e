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
    kernel::{CgroupLinks, Kernel, KernelError},
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
    approvals: crate::approval::Approvals,
    _approval_socket: Option<crate::approval::ServeGuard>,
}

impl Host {
    /// Load the kernel programs and start the event reader.
    pub fn start(sinks: Sinks) -> Result<Self, HostError> {
        let mut kernel = Kernel::load()?;
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
        let reader = tokio::spawn(events::reader::run(ring, dispatch, control_rx));
        let approvals = crate::approval::Approvals::default();
        Ok(Self {
            kernel: Arc::new(Mutex::new(kernel)),
            sessions,
            sinks: Arc::new(Mutex::new(sinks)),
            metrics,
            next_id: AtomicU32::new(1),
            control,
            reader: Some(reader),
            backend,
            lsm_mutations,
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

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn backend(&self) -> &'static str {
        self.backend
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
        let (prog, args) = argv.split_first().ok_or(HostError::NoCommand)?;
        let cmd_path = resolve_command(prog)?;
        let instance_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let policy_id = instance_id;
        let name = format!(
            "{}-{}-{}",
            sanitize(&policy.server),
            std::process::id(),
            instance_id
        );
        let cg = InstanceCgroup::create(&name)?;

        let resolver = dns::Resolver::new()?;
        let names = dns::names(&policy);
        let resolved = resolver.resolve(&names).await;
        for (n, e) in &resolved.failed {
            log::warn!(
                "{}: DNS name {n} did not resolve ({e}); nothing is allowed for it until it does",
                policy.server
            );
        }
        let net = compile::compile_net(&policy, policy_id, &resolved.addrs)?;
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
        )?);
        // Audit mode judges execs in userspace: the launched command and its
        // interpreters are always allowed (learn/audit plumbing).
        session.set_launched(&cmd_path);
        let accountant = tokio::spawn(crate::session::run_accountant(session.clone(), account_rx));
        session.set_approvals(self.approvals.clone());
        let links = {
            let mut k = self.kernel.lock().map_err(|_| HostError::Poisoned)?;
            k.install_net(&net, None)?;
            k.attach_cgroup(cg.dir())?
        };
        self.sessions
            .lock()
            .map_err(|_| HostError::Poisoned)?
            .insert(cg.id(), session.clone());

        let backend = self.backend;
        // Opens a file per rule and lists directories: off the runtime.
        let prepared = {
            let policy = policy.clone();
            let cmd_path = cmd_path.clone();
            use crate::confine::landlock::FilesBy;
            let by = match (
                backend == crate::kernel::lsm::BACKEND_LSM,
                self.lsm_mutations,
            ) {
                (false, _) => FilesBy::Landlock,
                (true, true) => FilesBy::BpfLsm,
                (true, false) => FilesBy::BpfLsmExceptMutations,
            };
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
        let files = if backend == crate::kernel::lsm::BACKEND_LSM {
            let mut always = vec![cmd_path.to_string_lossy().into_owned()];
            if let Ok(c) = std::fs::canonicalize(&cmd_path) {
                always.push(c.to_string_lossy().into_owned());
            }
            always.extend(
                confinement
                    .landlock
                    .interpreters
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned()),
            );
            let files = compile::compile_files(&policy, policy_id, &always)?;
            self.kernel
                .lock()
                .map_err(|_| HostError::Poisoned)?
                .install_files(&files, None)?;
            files
        } else {
            Vec::new()
        };
        let procs = cg.procs_file()?;
        let procs_fd = procs.as_raw_fd();
        let mut cmd = tokio::process::Command::new(&cmd_path);
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
        session.record(
            "server",
            json!({
                "event": "started",
                "pid": child.id(),
                "cmd": argv.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>(),
                "policy_source": policy.source,
                "mode": format!("{:?}", policy.mode).to_lowercase(),
                "backend": self.backend,
                "hooks": links.hooks(),
                "confinement": serde_json::to_value(&confinement).unwrap_or(serde_json::Value::Null),
            }),
        );
        metrics_server_state(&self.metrics, 1);

        // Keep DNS names fresh within their TTL.
        let dns_task = if names.is_empty() {
            None
        } else {
            let kernel = self.kernel.clone();
            let policy = policy.clone();
            let mut current = net.clone();
            let mut next = resolved.next_refresh;
            Some(tokio::spawn(async move {
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
            }))
        };

        Ok(Instance {
            session,
            cgroup: Some(cg),
            links: Some(links),
            net,
            files,
            child,
            dns_task,
            accountant: Some(accountant),
        })
    }

    /// Tear an instance down after its server exited: kill what is left of
    /// the tree, deliver its last events, detach, remove its kernel state.
    pub async fn finish(&self, mut inst: Instance, status: i32) -> Result<(), HostError> {
        if let Some(t) = inst.dns_task.take() {
            t.abort();
        }
        let cg = inst.cgroup.take();
        if let Some(cg) = &cg {
            let cg_path = cg.path().to_path_buf();
            let left = cg.pids().unwrap_or_default();
            if !left.is_empty() {
                log::info!(
                    "{}: ending {} process(es) left in {}",
                    inst.session.info().instance,
                    left.len(),
                    cg_path.display()
                );
            }
            cg.kill_all(Duration::from_secs(5))?;
        }
        self.drain().await;
        self.refresh_lost();
        if let Some(t) = inst.accountant.take() {
            t.abort();
        }
        // Last syscall counts, and the records of calls still waiting on them.
        let s = inst.session.clone();
        let _ = tokio::task::spawn_blocking(move || s.account(true)).await;
        inst.session
            .record("server", json!({"event": "exited", "status": status}));
        drop(inst.links.take());
        {
            let mut k = self.kernel.lock().map_err(|_| HostError::Poisoned)?;
            k.remove_net(&inst.net)?;
            k.remove_files(&inst.files)?;
        }
        inst.session.unregister()?;
        self.sessions
            .lock()
            .map_err(|_| HostError::Poisoned)?
            .remove(&inst.session.cgroup_id());
        if let Some(cg) = cg {
            cg.remove()?;
        }
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

/// A launched, confined server.
pub struct Instance {
    pub session: Arc<Session>,
    cgroup: Option<InstanceCgroup>,
    links: Option<CgroupLinks>,
    net: compile::CompiledNet,
    /// BPF-LSM file/exec entries of this instance (empty on the fallback).
    files: Vec<compile::FileEntry>,
    pub child: tokio::process::Child,
    dns_task: Option<tokio::task::JoinHandle<()>>,
    accountant: Option<tokio::task::JoinHandle<()>>,
}

impl Instance {
    pub fn cgroup_path(&self) -> Option<PathBuf> {
        self.cgroup.as_ref().map(|c| c.path().to_path_buf())
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

/// Resolve the command like execvp would, to an absolute path. Symlinks are
/// kept (not canonicalized): a venv's `bin/python` finds its venv through the
/// path it was started by.
fn resolve_command(prog: &OsString) -> Result<PathBuf, HostError> {
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
