//! `mcp-warden run` as a client of the agent (any user): register the
//! instance, fork the server, have the agent place the child in the
//! instance cgroup while it waits before exec, apply Landlock/seccomp, exec,
//! and relay stdio while forwarding each tool call's begin/end to the agent.
//!
//! Fail closed: a `tools/call` is forwarded only after the agent acked its
//! `call-begin`; when the agent cannot be reached the relay refuses the call.
//! A broken connection is re-established and the instance re-identified by
//! its token (`attach`), with the calls still in flight.
use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    control::{
        client::Client, response_error, CallDone, CallRef, ControlError, Handshake, Request,
    },
    events::sink::{EventSink, JsonLinesFile, StderrDenials},
    policy::{self, model::Governance},
    relay::{CallEnd, CallStart, HookError, RelayHooks, SessionInfo},
    run::{exit_code, RunArgs, RunError},
    session::id_value,
};

/// How long one request may take before the agent counts as unreachable.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// The connection to the agent, shared by the relay's hooks.
struct Link {
    sock: PathBuf,
    instance: String,
    token: String,
    conn: tokio::sync::Mutex<Option<Client>>,
    in_flight: Mutex<Vec<CallRef>>,
}

impl Link {
    async fn request(&self, req: &Request) -> Result<Value, ControlError> {
        self.request_within(req, REQUEST_LIMIT).await
    }

    /// Send `req` on the connection, re-establishing it (and re-identifying
    /// the instance) once if it broke.
    async fn request_within(&self, req: &Request, limit: Duration) -> Result<Value, ControlError> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_mut() {
            match c.request_within(req, limit).await {
                Ok(v) => return Ok(v),
                Err(ControlError::Refused(e)) => return Err(ControlError::Refused(e)),
                Err(e) => {
                    log::warn!(
                        "{}: agent connection lost ({e}); reconnecting",
                        self.instance
                    );
                    *g = None;
                }
            }
        }
        let c = g.insert(self.reattach().await?);
        c.request_within(req, limit).await
    }

    /// Send `req` on a connection of its own (re-identified by token), so a
    /// call that waits for a person's approval never holds up the other
    /// calls' begin and end.
    async fn request_alone(&self, req: &Request, limit: Duration) -> Result<Value, ControlError> {
        let mut c = Client::connect(&self.sock).await?;
        c.request_within(
            &Request::Attach {
                instance: self.instance.clone(),
                token: self.token.clone(),
                calls: Vec::new(),
            },
            REQUEST_LIMIT,
        )
        .await?;
        c.request_within(req, limit).await
    }

    async fn reattach(&self) -> Result<Client, ControlError> {
        let mut c = Client::connect(&self.sock).await?;
        let calls = self.in_flight.lock().map(|v| v.clone()).unwrap_or_default();
        c.request_within(
            &Request::Attach {
                instance: self.instance.clone(),
                token: self.token.clone(),
                calls,
            },
            REQUEST_LIMIT,
        )
        .await?;
        log::info!("{}: re-attached to the agent", self.instance);
        Ok(c)
    }

    /// Keep the instance attached: after an agent restart, re-identify it
    /// as soon as the agent answers again (not only at the next call).
    async fn keepalive(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // A broken connection is re-established (and the instance
            // re-identified) inside `request`.
            let _ = self.request(&Request::Ping).await;
        }
    }
}

/// The relay's hooks: each call's begin and end go to the agent.
struct AgentHooks {
    link: Arc<Link>,
    /// Tools whose calls wait for a person's approval, and how long.
    approval: Vec<String>,
    approval_limit: Duration,
}

fn done(c: &CallEnd) -> CallDone {
    CallDone {
        call_id: id_value(&c.id),
        tool: c.tool.clone(),
        outcome: c.outcome.as_str().to_string(),
        duration_ms: c.duration.as_secs_f64() * 1000.0,
        args_sha256: Some(c.args_hash.clone()),
        reason: c.detail.clone(),
        request_bytes: c.request_bytes,
        response_bytes: c.response_bytes,
        task_id: c.task_id.clone(),
    }
}

impl RelayHooks for AgentHooks {
    fn call_begin(
        &self,
        call: &CallStart,
    ) -> impl std::future::Future<Output = Result<(), HookError>> + Send {
        let link = self.link.clone();
        let id = id_value(&call.id);
        let tool = call.tool.clone();
        let approval = self.approval.contains(&tool);
        let limit = self.approval_limit;
        let req = Request::CallBegin {
            call_id: id.clone(),
            tool: tool.clone(),
            args_sha256: Some(call.args_hash.clone()),
            request_bytes: call.request_bytes,
            task: call.task,
        };
        async move {
            let r = if approval {
                link.request_alone(&req, limit).await
            } else {
                link.request(&req).await
            };
            match r {
                Ok(_) => {
                    if let Ok(mut v) = link.in_flight.lock() {
                        v.push(CallRef { call_id: id, tool });
                    }
                    Ok(())
                }
                Err(ControlError::Refused(e)) => Err(HookError::Refused(e)),
                Err(e) => Err(HookError::Unreachable(e.to_string())),
            }
        }
    }

    fn call_end(&self, call: &CallEnd) -> impl std::future::Future<Output = Option<String>> + Send {
        let link = self.link.clone();
        let d = done(call);
        async move {
            if let Ok(mut v) = link.in_flight.lock() {
                v.retain(|c| c.call_id != d.call_id);
            }
            let id = d.call_id.clone();
            match link.request(&Request::CallEnd(d)).await {
                // The agent stopped the server during the call: why.
                Ok(reply) => reply
                    .get("stopped")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_string),
                Err(e) => {
                    log::error!("{}: ending call {id} at the agent: {e}", link.instance);
                    None
                }
            }
        }
    }

    fn call_refused(&self, call: &CallStart, reason: &str) {
        let link = self.link.clone();
        let d = CallDone {
            call_id: id_value(&call.id),
            tool: call.tool.clone(),
            outcome: "refused".into(),
            duration_ms: 0.0,
            args_sha256: Some(call.args_hash.clone()),
            reason: Some(reason.to_string()),
            request_bytes: call.request_bytes,
            response_bytes: 0,
            task_id: None,
        };
        tokio::spawn(async move {
            let _ = link.request(&Request::CallRefused(d)).await;
        });
    }

    fn session_info(&self, info: &SessionInfo) {
        let link = self.link.clone();
        let h = Handshake {
            protocol_version: info.protocol_version.clone(),
            client_name: info.client_name.clone(),
            client_version: info.client_version.clone(),
            negotiated_version: info.negotiated_version.clone(),
            server_name: info.server_name.clone(),
            server_version: info.server_version.clone(),
        };
        tokio::spawn(async move {
            let _ = link.request(&Request::SessionInfo(h)).await;
        });
    }

    fn server_request(&self, method: &str, decision: Governance) {
        let link = self.link.clone();
        let req = Request::ServerRequest {
            method: method.to_string(),
            decision: match decision {
                Governance::Allow => "allow",
                Governance::Log => "log",
                Governance::Deny => "deny",
            }
            .to_string(),
        };
        tokio::spawn(async move {
            let _ = link.request(&req).await;
        });
    }
}

/// Write `buf` whole to `fd`. Async-signal-safe.
fn write_all_raw(fd: i32, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writing a valid buffer to an fd we own.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// In the forked child, before exec: ask the agent to place us (the request
/// line is `prefix` + our pid + `}`), and wait for its answer. Nothing runs
/// before the agent has moved us into the instance cgroup. Async-signal-safe:
/// stack buffers and raw syscalls only.
fn place_in_child(fd: i32, prefix: &[u8]) -> std::io::Result<()> {
    let mut num = [0u8; 24];
    // SAFETY: getpid has no preconditions.
    let mut pid = unsafe { libc::getpid() } as u32;
    let mut i = num.len();
    num[i - 2] = b'}';
    num[i - 1] = b'\n';
    i -= 2;
    loop {
        i -= 1;
        num[i] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    write_all_raw(fd, prefix)?;
    write_all_raw(fd, &num[i..])?;
    let mut ans = [0u8; 512];
    let mut len = 0;
    while len < ans.len() {
        // SAFETY: reading into the unused tail of a stack buffer.
        let n = unsafe { libc::read(fd, ans[len..].as_mut_ptr().cast(), ans.len() - len) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        len += n as usize;
        if ans[..len].contains(&b'\n') {
            break;
        }
    }
    const OK: &[u8] = b"{\"ok\":true";
    if len >= OK.len() && &ans[..OK.len()] == OK {
        return Ok(());
    }
    let _ = write_all_raw(2, b"mcp-warden: the agent refused to place the server: ");
    let _ = write_all_raw(2, &ans[..len]);
    Err(std::io::Error::from_raw_os_error(libc::EPERM))
}

/// Follow this instance's events: denials on stderr, everything into
/// `--events FILE`. Ends when the agent closes the stream or the server
/// exit record went by.
async fn follow_events(
    sock: PathBuf,
    instance: String,
    file: Option<PathBuf>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut sinks: Vec<Box<dyn EventSink>> = vec![Box::new(StderrDenials::new())];
    if let Some(p) = &file {
        match JsonLinesFile::open(p) {
            Ok(f) => sinks.push(Box::new(f)),
            Err(e) => log::error!("event log {}: {e}", p.display()),
        }
    }
    let req = Request::Events {
        server: None,
        instance: Some(instance),
    };
    let mut ready = Some(ready);
    // Follow across agent restarts: the stream of a restarted agent picks up
    // where the kernel's ring buffer kept the events.
    loop {
        let c = match Client::connect(&sock).await {
            Ok(mut c) => c.send(&req).await.map(|_| c),
            Err(e) => Err(e),
        };
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        if let Ok(mut c) = c {
            while let Ok(Some(rec)) = c.next().await {
                if rec.get("ok").is_some() && response_error(&rec).is_some() {
                    log::warn!("events: {rec}");
                    return;
                }
                for s in &mut sinks {
                    let _ = s.write(&rec);
                }
                if rec.get("event").and_then(Value::as_str) == Some("approval_requested") {
                    let g = |k: &str| rec.get(k).cloned().unwrap_or(Value::Null);
                    eprintln!(
                        "mcp-warden: tools/call {} (id {}) waits for approval: \
                         `mcp-warden approve {}` or `mcp-warden deny {}`",
                        g("tool"),
                        g("call_id"),
                        g("approval_id").as_str().unwrap_or("?"),
                        g("approval_id").as_str().unwrap_or("?"),
                    );
                }
                if rec.get("kind").and_then(Value::as_str) == Some("server")
                    && rec.get("event").and_then(Value::as_str) == Some("exited")
                {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(args: RunArgs, sock: &Path) -> Result<i32, RunError> {
    let (prog, rest) = args.cmd.split_first().ok_or(RunError::NoCommand)?;
    let cmd_path = crate::host::resolve_command(prog)?;
    let mut conn = Client::connect(sock).await?;
    let (policy_text, policy_path) = match &args.policy {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| {
                RunError::Policy(policy::PolicyError::Read {
                    path: p.clone(),
                    source,
                })
            })?;
            let abs = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            (Some(text), Some(abs.display().to_string()))
        }
        None => (None, None),
    };
    let cmd: Vec<String> = args
        .cmd
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let resp = conn
        .request(&Request::Register {
            server: args.server.clone(),
            policy_text,
            policy_path: policy_path.clone(),
            cmd,
        })
        .await?;
    let field = |k: &str| {
        resp.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| RunError::Relay(format!("register response without {k}")))
    };
    let instance = field("instance")?;
    let token = field("token")?;
    let text = field("policy_text")?;
    let source = field("policy_source")?;
    // The same policy the agent compiled, expanded for us (same uid), for
    // the parts enforced in our child: Landlock, seccomp, capabilities.
    let uid = nix::unistd::getuid().as_raw();
    let vars = policy::Vars::for_uid(uid).map_err(|e| RunError::Account(uid, e.to_string()))?;
    let label = policy_path.unwrap_or_else(|| source.clone());
    let mut pol = policy::parse(&text, &label, &vars).map_err(|diagnostics| {
        RunError::Policy(policy::PolicyError::Invalid {
            path: PathBuf::from(&label),
            diagnostics,
        })
    })?;
    pol.source = source;
    let pol = Arc::new(pol);
    let files_by = crate::control::files_by_from(
        resp.get("files_by")
            .and_then(Value::as_str)
            .unwrap_or("landlock"),
    );
    let prepared = {
        let pol = pol.clone();
        let cmd_path = cmd_path.clone();
        tokio::task::spawn_blocking(move || {
            crate::confine::Prepared::new_for(&pol, &cmd_path, files_by)
        })
        .await
        .map_err(|e| RunError::Relay(e.to_string()))?
        .map_err(crate::host::HostError::from)?
    };
    let report = prepared.report();
    for w in &report.landlock.warnings {
        log::warn!("{}: {w}", pol.server);
    }
    // BPF-LSM: the command and its interpreters join the instance's file
    // rules before the child is placed.
    conn.request(&Request::ExecPaths {
        paths: crate::host::exec_always(&cmd_path, &report),
    })
    .await?;

    let link = Arc::new(Link {
        sock: sock.to_path_buf(),
        instance: instance.clone(),
        token: token.clone(),
        conn: tokio::sync::Mutex::new(Some(conn)),
        in_flight: Mutex::new(Vec::new()),
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let events = tokio::spawn(follow_events(
        sock.to_path_buf(),
        instance.clone(),
        args.events.clone(),
        ready_tx,
    ));
    let _ = ready_rx.await;

    // The child's own connection for `place` (opened here, so the agent
    // sees us, its parent, as the peer; close-on-exec).
    let place =
        std::os::unix::net::UnixStream::connect(sock).map_err(|source| ControlError::Connect {
            path: sock.to_path_buf(),
            source,
        })?;
    let place_fd = place.as_raw_fd();
    let prefix = format!(
        "{{\"op\":\"place\",\"instance\":{},\"token\":{},\"pid\":",
        serde_json::to_string(&instance).map_err(ControlError::from)?,
        serde_json::to_string(&token).map_err(ControlError::from)?
    )
    .into_bytes();
    let mut command = tokio::process::Command::new(&cmd_path);
    command
        .arg0(prog)
        .args(rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: between fork and exec the closure only makes async-signal-safe
    // calls: read/write on an inherited fd with stack buffers, then the
    // prepared confinement's raw syscalls.
    unsafe {
        command.pre_exec(move || {
            place_in_child(place_fd, &prefix)?;
            prepared.apply_in_child()
        });
    }
    let spawned = command.spawn();
    drop(place);
    let mut child = match spawned {
        Ok(c) => c,
        Err(source) => {
            let _ = link.request(&Request::Finish { status: 127 }).await;
            return Err(RunError::Host(crate::host::HostError::Spawn {
                cmd: prog.clone(),
                source,
            }));
        }
    };
    let _ = link
        .request(&Request::Record {
            fields: json!({
                "event": "confinement",
                "confinement": serde_json::to_value(&report).unwrap_or(Value::Null),
            }),
        })
        .await;
    let keepalive = tokio::spawn(link.clone().keepalive());

    let (Some(child_in), Some(child_out)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(RunError::Relay("child stdio not piped".into()));
    };
    let relay = crate::serve_http::Relayed::start(
        args.http.as_ref(),
        pol.clone(),
        Arc::new(AgentHooks {
            link: link.clone(),
            approval: pol.mcp.approval.to_vec(),
            approval_limit: Duration::from_secs(pol.mcp.approval_timeout_secs) + REQUEST_LIMIT,
        }),
        child_in,
        child_out,
    )
    .await;
    let relay = match relay {
        Ok(r) => r,
        Err(e) => {
            // Nothing to relay to (the HTTP listen address failed): end the
            // server and the instance.
            if let Some(p) = child.id() {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            keepalive.abort();
            let _ = link.request(&Request::Finish { status: 125 }).await;
            return Err(e);
        }
    };
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let pid = child.id();
    let kill = |pid: Option<u32>| {
        if let Some(p) = pid {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    };
    let code = tokio::select! {
        st = child.wait() => exit_code(st?),
        _ = sigint.recv() => { kill(pid); let _ = child.wait().await; 130 }
        _ = sigterm.recv() => { kill(pid); let _ = child.wait().await; 143 }
    };
    // Calls still in flight end now, while the agent still has the
    // instance: a server the agent stopped for a violation gets its calls
    // answered with the reason (a grandchild holding stdout open delays
    // the teardown by at most this).
    let relay = relay.settle(Duration::from_secs(1)).await;
    keepalive.abort();
    // The agent ends what is left of the tree and removes the instance.
    let mut finished = false;
    for _ in 0..10 {
        match link.request(&Request::Finish { status: code }).await {
            Ok(_) => {
                finished = true;
                break;
            }
            Err(ControlError::Refused(e)) if e.starts_with("no instance") => {
                // A restarted agent found the cgroup empty and cleaned up.
                log::info!("{instance}: already torn down by the agent");
                finished = true;
                break;
            }
            Err(ControlError::Refused(e)) => {
                log::error!("{instance}: finish refused: {e}");
                break;
            }
            Err(e) => {
                log::warn!("{instance}: finish: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    if !finished {
        log::error!("{instance}: the agent did not confirm the teardown; it cleans up when it sees the cgroup empty");
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), events).await;
    relay.finish().await;
    Ok(code)
}
