//! `mcp-warden run`: confine one MCP server and relay its stdio.
//!
//! Standalone (root, no agent reachable): the agent core runs in-process
//! ([`crate::host::Host`]) for this one server.
use std::{ffi::OsString, path::PathBuf, sync::Arc};

use tokio::signal::unix::{signal, SignalKind};

use crate::{
    events::{sink::JsonLinesFile, sink::StderrDenials, InstanceInfo, Sinks},
    host::{Host, HostError, Instance},
    policy::{self, Policy},
};

/// Default audit trail of the standalone agent (the daemon's log path).
pub const DEFAULT_AUDIT_LOG: &str = "/var/log/mcp-warden/audit.jsonl";

#[derive(Debug, Clone)]
pub struct RunArgs {
    pub policy: Option<PathBuf>,
    pub server: Option<String>,
    pub events: Option<PathBuf>,
    /// `--listen ADDR --upstream URL`: relay HTTP instead of stdio.
    pub http: Option<crate::serve_http::HttpArgs>,
    pub cmd: Vec<OsString>,
    /// Standalone only: serve /metrics on this address while the server runs.
    pub metrics: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Policy(#[from] policy::PolicyError),
    #[error("{0}")]
    Host(#[from] HostError),
    #[error(
        "no mcp-warden agent is reachable and standalone mode needs root: \
         run `sudo mcp-warden run ...` or start the agent service"
    )]
    NeedRoot,
    #[error("--server NAME needs the agent service (policies in /etc/mcp-warden/policies)")]
    ServerNeedsAgent,
    #[error(
        "no mcp-warden agent answers on {} ({reason}), and standalone mode needs root: \
         start the agent service (or set {} to its socket)",
        sock.display(), crate::config::SOCKET_ENV
    )]
    NoAgent { sock: PathBuf, reason: String },
    #[error("agent: {0}")]
    Agent(#[from] crate::control::ControlError),
    #[error("empty command")]
    NoCommand,
    #[error("opening event log {path}: {source}")]
    EventLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("looking up the account of uid {0}: {1}")]
    Account(u32, String),
    #[error("relay: {0}")]
    Relay(String),
    #[error("{0}")]
    Metrics(#[from] crate::metrics_http::MetricsHttpError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How long a server may outlive its client's stdin before its tree is ended.
pub const CLIENT_GONE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Exit status when mcp-warden itself could not run the server.
pub const EXIT_SETUP_FAILED: i32 = 125;

pub fn main(args: RunArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-warden: starting the runtime: {e}");
            return EXIT_SETUP_FAILED;
        }
    };
    let code = match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mcp-warden: {}", error_chain(&e));
            EXIT_SETUP_FAILED
        }
    };
    // The stdin reader may sit in a blocking read(2) forever: don't wait.
    rt.shutdown_background();
    code
}

/// Identity fields every event carries, for a server run by this process's
/// user.
pub fn instance_info(policy: &Policy) -> InstanceInfo {
    instance_info_for(policy, nix::unistd::getuid().as_raw())
}

/// Identity fields every event carries, for a server run by `uid`.
pub fn instance_info_for(policy: &Policy, uid: u32) -> InstanceInfo {
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let host = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    InstanceInfo {
        server: policy.server.clone(),
        instance: String::new(),
        policy_source: policy.source.clone(),
        backend: String::new(),
        uid,
        user,
        host,
    }
}

pub fn load_policy(path: &std::path::Path) -> Result<Policy, RunError> {
    let uid = nix::unistd::getuid().as_raw();
    let vars = policy::Vars::for_uid(uid).map_err(|e| RunError::Account(uid, e.to_string()))?;
    Ok(policy::load(path, &vars)?)
}

/// Sinks of the standalone agent: its audit log (when writable), the
/// `--events` file, and denials on stderr.
pub fn standalone_sinks(events: Option<&PathBuf>) -> Result<Sinks, RunError> {
    let mut sinks = Sinks::default();
    match JsonLinesFile::open(std::path::Path::new(DEFAULT_AUDIT_LOG)) {
        Ok(f) => sinks.push(Box::new(f)),
        Err(e) => log::warn!("audit log {DEFAULT_AUDIT_LOG} not writable: {e}"),
    }
    if let Some(p) = events {
        let f = JsonLinesFile::open(p).map_err(|source| RunError::EventLog {
            path: p.clone(),
            source,
        })?;
        sinks.push(Box::new(f));
    }
    sinks.push(Box::new(StderrDenials::new()));
    Ok(sinks)
}

async fn run(args: RunArgs) -> Result<i32, RunError> {
    // The agent when one answers; standalone only as root with no agent.
    let sock = crate::config::client_socket();
    match crate::control::client::ping(&sock, std::time::Duration::from_secs(2)).await {
        Ok(_) => return crate::run_agent::run(args, &sock).await,
        Err(e) => {
            if !nix::unistd::geteuid().is_root() {
                return Err(RunError::NoAgent {
                    sock,
                    reason: e.to_string(),
                });
            }
            log::debug!("no agent on {} ({e}): running standalone", sock.display());
        }
    }
    let Some(policy_path) = &args.policy else {
        return Err(RunError::ServerNeedsAgent);
    };
    let policy = Arc::new(load_policy(policy_path)?);
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::NeedRoot);
    }
    let sinks = standalone_sinks(args.events.as_ref())?;
    let host = Host::start(sinks)?;
    let metrics_http = match args.metrics {
        Some(addr) => {
            let l = crate::metrics_http::MetricsListener::bind(addr).await?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(l.serve(host.metrics().clone(), stopped));
            Some((stop, task))
        }
        None => None,
    };
    let inst = host
        .launch(policy.clone(), &args.cmd, instance_info(&policy))
        .await?;
    let code = match &args.http {
        Some(http) => crate::serve_http::serve(&host, inst, http).await?,
        None => serve_stdio(&host, inst).await?,
    };
    if let Some((stop, task)) = metrics_http {
        let _ = stop.send(());
        let _ = task.await;
    }
    host.shutdown().await?;
    Ok(code)
}

/// Relay our stdio to the server until it exits (or we are signalled),
/// then tear the instance down. Returns the exit status to report.
pub(crate) async fn serve_stdio(host: &Host, mut inst: Instance) -> Result<i32, RunError> {
    let (Some(child_in), Some(child_out)) = (inst.child.stdin.take(), inst.child.stdout.take())
    else {
        return Err(RunError::Relay("child stdio not piped".into()));
    };
    let session = inst.session.clone();
    let (gone_tx, client_gone) = tokio::sync::oneshot::channel();
    let relay = crate::relay::pipe::spawn_stdio(
        child_in,
        child_out,
        session.policy().clone(),
        session,
        Some(gone_tx),
    );
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // Nothing outlives its session: once the client has gone away (our stdin
    // ended, so the server's stdin is closed), the server has a grace period
    // to exit by itself; then its whole tree is ended.
    let grace = async {
        if client_gone.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(CLIENT_GONE_GRACE).await;
    };
    tokio::pin!(grace);
    let mut grace_fired = false;
    let code = loop {
        tokio::select! {
            _ = &mut grace, if !grace_fired => {
                grace_fired = true;
                log::info!(
                    "{}: the client went away {} s ago; ending the server tree",
                    inst.session.info().instance,
                    CLIENT_GONE_GRACE.as_secs()
                );
                inst.session.kill_tree("the client went away");
            }
            st = inst.child.wait() => {
                let st = st?;
                break exit_code(st);
            }
            _ = sigint.recv() => {
                inst.session.kill_tree("SIGINT");
                let _ = inst.child.wait().await;
                break 130;
            }
            _ = sigterm.recv() => {
                inst.session.kill_tree("SIGTERM");
                let _ = inst.child.wait().await;
                break 143;
            }
            _ = sighup.recv() => {
                host.reopen_logs();
            }
        }
    };
    // The server is gone: end what is left of its tree (so nothing holds
    // its stdout open), let the relay flush what the server wrote and end
    // the calls still in flight, then remove the instance.
    inst.session.kill_tree("the server exited");
    match tokio::time::timeout(std::time::Duration::from_secs(5), relay).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => log::warn!("relay: {e}"),
        Ok(Err(e)) => log::warn!("relay task: {e}"),
        Err(_) => log::warn!("relay did not finish within 5 s after the server exited"),
    }
    host.finish(inst, code).await?;
    Ok(code)
}

pub fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}

/// "error: cause: cause" for the terminal.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}
