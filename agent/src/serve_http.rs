//! `mcp-warden run --listen ADDR --upstream URL -- CMD`: the server is
//! launched and confined exactly as with stdio; clients reach it through the
//! HTTP relay ([`crate::relay::http`]) instead of our stdio. The server's own
//! stdout is passed through to ours (it is not the MCP channel here) and its
//! stdin is held open, unused.
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use std::sync::Arc;

use crate::{
    host::{Host, Instance},
    policy::model::Policy,
    relay::http::{HttpOptions, HttpRelay, Listen, Listener, Upstream},
    relay::RelayHooks,
    run::RunError,
};

/// `--listen` / `--upstream`, validated.
#[derive(Clone, Debug)]
pub struct HttpArgs {
    pub listen: Listen,
    pub upstream: Upstream,
}

/// Relay HTTP to the server until it exits (or we are signalled), then tear
/// the instance down. Returns the exit status to report.
pub async fn serve(host: &Host, mut inst: Instance, args: &HttpArgs) -> Result<i32, RunError> {
    let child_in = inst.child.stdin.take();
    let out = inst.child.stdout.take().map(|mut o| {
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut o, &mut tokio::io::stdout()).await;
        })
    });
    let listener = match Listener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            inst.session.kill_tree("the relay could not listen");
            let _ = inst.child.wait().await;
            host.finish(inst, 1).await?;
            return Err(RunError::Relay(e.to_string()));
        }
    };
    log::info!(
        "{}: relaying MCP over HTTP from {} to {}",
        inst.session.info().instance,
        args.listen,
        args.upstream
    );
    let session = inst.session.clone();
    let relay = HttpRelay::new(
        session.policy().clone(),
        session,
        args.upstream.clone(),
        HttpOptions::default(),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let relay = relay.clone();
        async move {
            relay
                .serve(listener, async {
                    let _ = stop_rx.await;
                })
                .await
        }
    });
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let code = loop {
        tokio::select! {
            st = inst.child.wait() => break crate::run::exit_code(st?),
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
            _ = sighup.recv() => host.reopen_logs(),
        }
    };
    inst.session.kill_tree("the server exited");
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => log::warn!("http relay: {e}"),
        Ok(Err(e)) => log::warn!("http relay task: {e}"),
        Err(_) => log::warn!("http relay did not stop within 5 s after the server exited"),
    }
    let (stats, core) = relay.stats();
    let left = relay.tracked();
    log::info!(
        "{}: http relay: {} requests, {} calls begun, {} ended, {} refused; still tracked: {:?}",
        inst.session.info().instance,
        stats.requests,
        core.calls_begun,
        core.calls_ended,
        core.refused,
        left
    );
    drop(child_in);
    if let Some(t) = out {
        let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
    }
    host.finish(inst, code).await?;
    Ok(code)
}

fn log_stdio_end(
    r: Result<
        Result<crate::relay::RelayStats, crate::relay::RelayError>,
        crate::relay::pipe::RelayThreadError,
    >,
) {
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => log::warn!("relay: {e}"),
        Err(e) => log::warn!("relay task: {e}"),
    }
}

/// How `mcp-warden run` relays for its server: stdio, or HTTP. Used by the
/// agent-client path ([`crate::run_agent`]), which has its own hooks.
pub enum Relayed {
    Stdio(crate::relay::pipe::RelayThread),
    Http(HttpTask),
    /// The stdio relay already ended ([`Relayed::settle`]).
    Done,
}

impl Relayed {
    /// Start relaying: HTTP when `http` is set (the server's stdout is then
    /// passed through to ours and its stdin held open), stdio otherwise.
    pub async fn start<H: RelayHooks>(
        http: Option<&HttpArgs>,
        policy: Arc<Policy>,
        hooks: Arc<H>,
        child_in: tokio::process::ChildStdin,
        child_out: tokio::process::ChildStdout,
    ) -> Result<Self, RunError> {
        let Some(http) = http else {
            return Ok(Relayed::Stdio(crate::relay::pipe::spawn_stdio(
                child_in, child_out, policy, hooks, None,
            )));
        };
        let listener = Listener::bind(&http.listen)
            .await
            .map_err(|e| RunError::Relay(e.to_string()))?;
        log::info!(
            "relaying MCP over HTTP from {} to {}",
            http.listen,
            http.upstream
        );
        let mut out = child_out;
        let out = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut out, &mut tokio::io::stdout()).await;
        });
        let relay = HttpRelay::new(policy, hooks, http.upstream.clone(), HttpOptions::default());
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            relay
                .serve(listener, async {
                    let _ = stop_rx.await;
                })
                .await
        });
        Ok(Relayed::Http(HttpTask {
            stop,
            task,
            _child_in: child_in,
            out,
        }))
    }

    /// The server is gone: let the relay finish (stdio: flush and end the
    /// calls in flight; HTTP: stop listening and end them).
    /// The server exited: give the stdio relay up to `limit` to end the
    /// calls still in flight (their end hooks ask the agent why the server
    /// ended) while the instance still exists at the agent.
    pub async fn settle(self, limit: Duration) -> Self {
        match self {
            Relayed::Stdio(mut relay) => match tokio::time::timeout(limit, &mut relay).await {
                Ok(r) => {
                    log_stdio_end(r);
                    Relayed::Done
                }
                Err(_) => Relayed::Stdio(relay),
            },
            other => other,
        }
    }

    pub async fn finish(self) {
        match self {
            Relayed::Done => {}
            Relayed::Stdio(relay) => {
                match tokio::time::timeout(Duration::from_secs(5), relay).await {
                    Ok(r) => log_stdio_end(r),
                    Err(_) => log::warn!("relay did not finish within 5 s after the server exited"),
                }
            }
            Relayed::Http(h) => {
                let _ = h.stop.send(());
                match tokio::time::timeout(Duration::from_secs(5), h.task).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(e))) => log::warn!("http relay: {e}"),
                    Ok(Err(e)) => log::warn!("http relay task: {e}"),
                    Err(_) => {
                        log::warn!("http relay did not stop within 5 s after the server exited")
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), h.out).await;
            }
        }
    }
}

/// A running HTTP relay of the agent-client path.
pub struct HttpTask {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), crate::relay::http::HttpError>>,
    _child_in: tokio::process::ChildStdin,
    out: tokio::task::JoinHandle<()>,
}
