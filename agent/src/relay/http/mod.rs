//! The HTTP relay: a reverse proxy (hyper 1.x) from the listen address to the
//! confined server's own HTTP endpoint, applying the same judgement as the
//! stdio relay to every JSON-RPC message that passes.
//!
//! - Client -> server: each POST body (one message or a batch) is read whole
//!   (up to the parse limit), classified with the stdio relay's classifier,
//!   judged by the same [`plan_calls`](super::stdio) rules; a refused
//!   `tools/call` is answered by the relay (HTTP 200, JSON-RPC error, code
//!   [`REFUSED_CODE`](super::REFUSED_CODE)) and never forwarded; otherwise
//!   [`RelayHooks::call_begin`] is awaited for each call before the request
//!   goes upstream, its bytes unchanged.
//! - Server -> client: JSON bodies and SSE streams are read as they pass
//!   ([`sse::SseReader`], [`message::Message`]); the message that ends a call
//!   is forwarded only after [`RelayHooks::call_end`] returned. A JSON body's
//!   last non-blank byte, and an SSE event's dispatching line terminator, are
//!   what the relay holds back, so the client never has the result before the
//!   rights are gone. Nothing is buffered beyond one chunk and the classifier's
//!   copy of one message (bounded by the parse limit); a slow client slows
//!   the upstream read through a bounded channel.
//! - A call ends, besides its response: when the client goes away (outcome
//!   cancelled), when the response that should carry it ends or is cut
//!   (error), when its session is deleted (cancelled), or when the relay
//!   stops (error). Every call whose begin hook was entered gets exactly one
//!   end.
//!
//! Era specifics: `MCP-Session-Id`, `Last-Event-ID` and the GET stream pass
//! through unchanged (2025-11-25); `Mcp-Method`/`Mcp-Name` must match the
//! body or the request is refused with 400 before forwarding (2026-07-28);
//! the 2024-11-05 HTTP+SSE transport passes through, its POSTs are judged
//! like any other and its results, which arrive on the session's GET stream,
//! end their calls there.
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;

use super::jsonrpc::RequestId;
use super::stdio::State;
use super::{Outcome, RelayHooks, RelayStats};
use crate::policy::model::Policy;

pub mod addr;
mod body;
mod message;
mod proxy;
mod sse;
#[cfg(test)]
mod tests;

pub use addr::{origin_allowed, AddrError, Listen, Upstream};
pub use body::RelayBody;

/// Errors that stop the HTTP relay.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Addr(#[from] AddrError),
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("accepting a connection: {0}")]
    Accept(#[source] std::io::Error),
}

/// Tunables; `Default` is what `mcp-warden run --listen` uses.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Largest POST body, and largest message the classifier reads whole
    /// (larger responses are scanned as they stream).
    pub parse_limit: usize,
    /// How long a request waits for the upstream to accept connections (the
    /// server may still be starting when the first client arrives).
    pub connect_wait: Duration,
    /// Frames queued towards a client before the relay stops reading the
    /// upstream (backpressure).
    pub queue_frames: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            parse_limit: super::framing::DEFAULT_PARSE_LIMIT,
            connect_wait: Duration::from_secs(30),
            queue_frames: 8,
        }
    }
}

/// Counters of one relay run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpStats {
    pub requests: u64,
    /// Refused with 403 (cross-origin browser request).
    pub refused_origin: u64,
    /// Refused with 400 (`Mcp-Method`/`Mcp-Name` disagree with the body).
    pub refused_headers: u64,
    /// Refused with 413 (POST body over the parse limit).
    pub too_large: u64,
    /// Answered 502 (upstream unreachable or failed).
    pub upstream_errors: u64,
    /// Responses whose client went away before their end.
    pub client_gone: u64,
    /// Responses the upstream cut in the middle.
    pub cut: u64,
    /// SSE events read.
    pub sse_events: u64,
}

/// What the relay still tracks. All zero once every response has ended:
/// tests assert it to prove nothing leaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tracked {
    pub calls: usize,
    pub pending: usize,
    pub owners: usize,
    pub detached: usize,
}

impl Tracked {
    pub fn is_empty(&self) -> bool {
        *self == Tracked::default()
    }
}

/// Who sent a request still in flight.
#[derive(Debug)]
struct Owner {
    /// The response stream (guard serial) that ends it if nothing else does.
    guard: u64,
    /// Its `MCP-Session-Id`, for DELETE.
    session: Option<String>,
}

#[derive(Default)]
struct HttpState {
    /// The stdio relay's own state: call tracker, requests whose answers are
    /// read, counters.
    core: State,
    owners: HashMap<RequestId, Owner>,
    /// 2024-11-05 transport: requests answered 202 whose results come on the
    /// session's SSE stream, by session key.
    detached: HashMap<String, Vec<RequestId>>,
    /// 2024-11-05 transport: the session's SSE stream by session key, to
    /// carry the relay's own answers (the POST itself is only acknowledged).
    legacy_streams: HashMap<String, tokio::sync::mpsc::Sender<bytes::Bytes>>,
    http: HttpStats,
}

struct Inner<H> {
    policy: Arc<Policy>,
    hooks: Arc<H>,
    upstream: Upstream,
    opts: HttpOptions,
    state: Mutex<HttpState>,
    next_guard: AtomicU64,
}

impl<H: RelayHooks> Inner<H> {
    /// Never held across an await.
    fn lock(&self) -> MutexGuard<'_, HttpState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut HttpStats)) {
        f(&mut self.lock().http);
    }

    /// End the calls; returns why the agent stopped the server, if it did.
    async fn end_calls(&self, ends: &[super::CallEnd]) -> Option<String> {
        let mut stopped = None;
        for end in ends {
            if let Some(why) = self.hooks.call_end(end).await {
                stopped = Some(why);
            }
        }
        self.lock().core.stats.calls_ended += ends.len() as u64;
        stopped
    }
}

/// A bound listening socket.
pub enum Listener {
    Tcp(TcpListener),
    /// The socket file is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind `listen`. A unix socket path left by a relay that is gone (a
    /// socket nobody accepts on) is replaced; anything else there is an error.
    pub async fn bind(listen: &Listen) -> Result<Self, HttpError> {
        let bind_err = |source| HttpError::Bind {
            addr: listen.to_string(),
            source,
        };
        match listen {
            Listen::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).await.map_err(bind_err)?)),
            Listen::Unix(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    let stale = meta.file_type().is_socket()
                        && tokio::net::UnixStream::connect(p).await.is_err();
                    if stale {
                        let _ = std::fs::remove_file(p);
                    }
                }
                let l = UnixListener::bind(p).map_err(bind_err)?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }

    /// The bound TCP address (tests bind port 0).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The HTTP relay for one confined server.
pub struct HttpRelay<H> {
    inner: Arc<Inner<H>>,
}

impl<H> Clone for HttpRelay<H> {
    fn clone(&self) -> Self {
        HttpRelay {
            inner: self.inner.clone(),
        }
    }
}

impl<H: RelayHooks> HttpRelay<H> {
    pub fn new(policy: Arc<Policy>, hooks: Arc<H>, upstream: Upstream, opts: HttpOptions) -> Self {
        HttpRelay {
            inner: Arc::new(Inner {
                policy,
                hooks,
                upstream,
                opts,
                state: Mutex::new(HttpState::default()),
                next_guard: AtomicU64::new(1),
            }),
        }
    }

    pub fn stats(&self) -> (HttpStats, RelayStats) {
        let st = self.inner.lock();
        (st.http.clone(), st.core.stats.clone())
    }

    pub fn tracked(&self) -> Tracked {
        let st = self.inner.lock();
        Tracked {
            calls: st.core.tracker.len(),
            pending: st.core.pending.len(),
            owners: st.owners.len(),
            detached: st.detached.values().map(Vec::len).sum(),
        }
    }

    /// Serve `listener` until `shutdown` resolves, then stop accepting, drop
    /// every connection, and end every call still in flight (outcome error,
    /// "relay stopped").
    pub async fn serve(
        &self,
        listener: Listener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), HttpError> {
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        let result = loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break Ok(()),
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                a = accept(&listener) => a,
            };
            match accepted {
                Ok(Conn::Tcp(s)) => {
                    let _ = s.set_nodelay(true);
                    conns.spawn(proxy::serve_conn(self.inner.clone(), TokioIo::new(s)));
                }
                Ok(Conn::Unix(s)) => {
                    conns.spawn(proxy::serve_conn(self.inner.clone(), TokioIo::new(s)));
                }
                Err(e) if transient(&e) => {
                    log::warn!("http relay: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => break Err(HttpError::Accept(e)),
            }
        };
        conns.abort_all();
        while conns.join_next().await.is_some() {}
        drop(listener);
        self.stop("relay stopped").await;
        result
    }

    /// End everything still tracked (the server is gone or the relay stops).
    pub async fn stop(&self, detail: &str) {
        let ends = {
            let mut st = self.inner.lock();
            st.owners.clear();
            st.detached.clear();
            st.core.pending.clear();
            st.core.tracker.end_all(Outcome::Error, detail)
        };
        self.inner.end_calls(&ends).await;
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<Conn> {
    match l {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
        Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
    }
}

/// Accept errors that concern one connection (or a momentary shortage),
/// not the listener.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
                | libc::EINTR
        )
    )
}
