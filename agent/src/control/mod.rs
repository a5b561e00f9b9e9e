//! The control socket between `mcp-warden run` (and `status`, `events`) and
//! the agent: newline-delimited JSON, one request object per line, one
//! response object per line (a stream of event lines for `events`).
//! The protocol is documented in docs/architecture.md, "Control protocol".
//!
//! - [`server`]: accept loop, peer credentials (SO_PEERCRED), the refusal
//!   of peers inside a confined cgroup, line framing.
//! - [`client`]: the client side used by `run`, `status` and `events`.
pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest request line accepted (a user policy travels inside `register`).
pub const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("connecting to {path}: {source}")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent closed the connection")]
    Closed,
    #[error("bad message from the agent: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the agent refused: {0}")]
    Refused(String),
    #[error("line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the agent did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// A tool call named in `attach` (calls in flight when the connection broke).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallRef {
    pub call_id: Value,
    pub tool: String,
}

/// A finished (or refused) tool call, as the relay saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallDone {
    pub call_id: Value,
    pub tool: String,
    /// ok | error | cancelled | refused
    pub outcome: String,
    #[serde(default)]
    pub duration_ms: f64,
    #[serde(default)]
    pub args_sha256: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub request_bytes: u64,
    #[serde(default)]
    pub response_bytes: u64,
    #[serde(default)]
    pub task_id: Option<String>,
}

/// The MCP handshake as the relay saw it (see [`crate::relay::SessionInfo`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Handshake {
    #[serde(default)]
    pub protocol_version: Option<String>,
    #[serde(default)]
    pub client_name: Option<String>,
    #[serde(default)]
    pub client_version: Option<String>,
    #[serde(default)]
    pub negotiated_version: Option<String>,
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub server_version: Option<String>,
}

/// Every request. `op` names the variant in kebab-case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Is an agent there? Answers `{"ok":true,"agent":VERSION}`.
    Ping,
    /// Create an instance. Exactly one of `server` (policy from the agent's
    /// policy directory) and `policy_text` (the user's own policy, with the
    /// path it was read from) is given. Binds the connection to it.
    Register {
        #[serde(default)]
        server: Option<String>,
        #[serde(default)]
        policy_text: Option<String>,
        #[serde(default)]
        policy_path: Option<String>,
        #[serde(default)]
        cmd: Vec<String>,
    },
    /// Move `pid` (the client's forked child, blocked before exec) into the
    /// instance cgroup. Sent by that child on a connection its parent opened.
    Place {
        instance: String,
        token: String,
        pid: u32,
    },
    /// The paths the server may always execute (its command and
    /// interpreters), sent before the child is placed: on BPF-LSM they
    /// join the instance's file rules. Bound connection, before `place`.
    ExecPaths { paths: Vec<String> },
    /// Re-identify an instance after a broken connection (or an agent
    /// restart); `calls` are the calls still in flight, whose rights are put
    /// back in force. Binds the connection to it.
    Attach {
        instance: String,
        token: String,
        #[serde(default)]
        calls: Vec<CallRef>,
    },
    /// Put the tool's rights in force; acked after the kernel map update
    /// (and, for an `[mcp] approval` tool, after a person approved).
    CallBegin {
        call_id: Value,
        tool: String,
        #[serde(default)]
        args_sha256: Option<String>,
        #[serde(default)]
        request_bytes: u64,
        #[serde(default)]
        task: bool,
    },
    /// Withdraw the call's rights and record it.
    CallEnd(CallDone),
    /// Record a call the relay refused itself.
    CallRefused(CallDone),
    /// A lifecycle record for the bound instance.
    Record { fields: Value },
    /// The MCP handshake (client identity on every later record).
    SessionInfo(Handshake),
    /// The server sent a request the policy's `[mcp]` section governs;
    /// `decision` is allow | log | deny.
    ServerRequest { method: String, decision: String },
    /// The server exited with `status`: tear the instance down.
    Finish { status: i32 },
    /// Backend, hooks, instances, counters.
    Status,
    /// Stream event records (one per line) until the client hangs up.
    Events {
        #[serde(default)]
        server: Option<String>,
        #[serde(default)]
        instance: Option<String>,
    },
}

/// `files_by` in the register answer: how the client prepares Landlock.
pub fn files_by_name(f: crate::confine::landlock::FilesBy) -> &'static str {
    use crate::confine::landlock::FilesBy;
    match f {
        FilesBy::Landlock => "landlock",
        FilesBy::BpfLsm => "bpf-lsm",
        FilesBy::BpfLsmExceptMutations => "bpf-lsm-except-mutations",
    }
}

/// The inverse of [`files_by_name`]; unknown names keep every file right in
/// Landlock (the stricter side).
pub fn files_by_from(s: &str) -> crate::confine::landlock::FilesBy {
    use crate::confine::landlock::FilesBy;
    match s {
        "bpf-lsm" => FilesBy::BpfLsm,
        "bpf-lsm-except-mutations" => FilesBy::BpfLsmExceptMutations,
        _ => FilesBy::Landlock,
    }
}

/// `{"ok":true, ...fields}`
pub fn ok(fields: Value) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("ok".into(), Value::Bool(true));
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    Value::Object(m)
}

/// `{"ok":false,"error":msg}`
pub fn err(msg: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": msg.to_string()})
}

/// The error of a response, if it is one.
pub fn response_error(v: &Value) -> Option<String> {
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        return None;
    }
    Some(
        v.get("error")
            .and_then(Value::as_str)
            .unwrap_or("malformed response")
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(r#"{"op":"call-begin","call_id":7,"tool":"fetch"}"#)
            .expect("parse");
        assert_eq!(
            r,
            Request::CallBegin {
                call_id: json!(7),
                tool: "fetch".into(),
                args_sha256: None,
                request_bytes: 0,
                task: false,
            }
        );
        let r: Request =
            serde_json::from_str(r#"{"op":"register","server":"git","cmd":["uvx"]}"#).expect("p");
        assert!(matches!(r, Request::Register { server: Some(ref s), .. } if s == "git"));
        let s = serde_json::to_string(&Request::Place {
            instance: "a".into(),
            token: "t".into(),
            pid: 5,
        })
        .expect("ser");
        assert_eq!(s, r#"{"op":"place","instance":"a","token":"t","pid":5}"#);
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
        assert_eq!(response_error(&ok(json!({"a": 1}))), None);
        assert_eq!(response_error(&err("no")), Some("no".into()));
    }
}
