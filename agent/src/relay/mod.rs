//! The MCP relay: sits between an MCP client and a confined server on stdio,
//! forwards every byte unchanged, and tells the session when each `tools/call`
//! begins and ends so the tool's kernel rights are in force exactly while the
//! call is in flight (design: "Per-tool enforcement, race-free").
//!
//! - [`framing`]: split the byte stream into lines, losslessly.
//! - [`jsonrpc`]: classify a line (request, notification, response, batch).
//! - [`calls`]: in-flight `tools/call` tracking and outcomes.
//! - [`stdio`]: the two-direction relay loop and its ordering guarantees.
//! - [`pipe`]: non-blocking stdio and server pipes; the relay's own thread.
use std::collections::BTreeMap;
use std::future::Future;

pub mod calls;
pub mod eof;
pub mod framing;
pub mod http;
pub mod jsonrpc;
pub mod pipe;
pub mod stdio;

pub use calls::{CallEnd, CallStart, Outcome};
pub use jsonrpc::{RequestId, ToolAnnotations};
pub use stdio::{relay, relay_with, RelayOptions, RelayStats, REFUSED_CODE};

/// Why a begin hook could not put a tool's rights in force. Any error makes
/// the relay refuse the call (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("agent unreachable: {0}")]
    Unreachable(String),
    #[error("agent refused the call: {0}")]
    Refused(String),
}

/// Errors that stop the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading the server's stdout: {0}")]
    ServerRead(#[source] std::io::Error),
    #[error("writing to the client: {0}")]
    ClientWrite(#[source] std::io::Error),
    #[error("{0}")]
    ServerLineCut(String),
}

/// Which handshake the session data came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    /// `initialize` (every protocol version up to 2025-11-25).
    Initialize,
    /// `server/discover` (2026-07-28 era); fields read best-effort.
    Discover,
}

/// What the handshake said. Reported to [`RelayHooks::session_info`] when the
/// client's request passes (client fields) and again when the server answers
/// (server fields added).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionInfo {
    pub handshake: Option<Handshake>,
    /// Version the client asked for.
    pub protocol_version: Option<String>,
    pub client_name: Option<String>,
    pub client_version: Option<String>,
    /// Version the server answered with (the one in force).
    pub negotiated_version: Option<String>,
    pub server_name: Option<String>,
    pub server_version: Option<String>,
}

/// What the relay asks of the session (kernel rights, events, metrics).
/// Hooks run inside the relay's task; a slow hook delays the messages of its
/// direction (that is the point of `call_begin`).
pub trait RelayHooks: Send + Sync + 'static {
    /// Put `call.tool`'s rights in force. The request is forwarded only after
    /// this returns `Ok`; on `Err` the call is refused.
    fn call_begin(&self, call: &CallStart) -> impl Future<Output = Result<(), HookError>> + Send;

    /// Withdraw the call's rights and record it. Awaited before the message
    /// that ended the call is forwarded to the client. Every call whose
    /// `call_begin` was entered gets exactly one `call_end`, including one
    /// whose begin future was dropped because the relay stopped, and the
    /// already-begun calls of a batch refused when a later begin failed
    /// (outcome `Refused`).
    ///
    /// Returns why the agent ended the server tree, when it did (a
    /// violation the kernel could only report, or `on_violation = kill`):
    /// the message that ended the call is then withheld and the client gets
    /// an error response naming the reason instead.
    fn call_end(&self, call: &CallEnd) -> impl Future<Output = Option<String>> + Send;

    /// A call the relay answered itself with an error (code
    /// [`REFUSED_CODE`]), never forwarded. `call.tool` is empty when the
    /// request named none or was too long to read.
    fn call_refused(&self, call: &CallStart, reason: &str);

    /// Handshake data (protocol version, client and server name and version).
    fn session_info(&self, _info: &SessionInfo) {}

    /// A `tools/list` result was seen; `tools` is everything seen so far.
    fn tools_listed(&self, _tools: &BTreeMap<String, ToolAnnotations>) {}

    /// The server sent a request the policy's `[mcp]` section governs
    /// (sampling, elicitation), and what was done with it.
    fn server_request(&self, _method: &str, _decision: crate::policy::model::Governance) {}
}

#[cfg(test)]
mod tests;
