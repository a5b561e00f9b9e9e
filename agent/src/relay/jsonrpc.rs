//! Classify one line of MCP stdio traffic (JSON-RPC 2.0).
//!
//! Reading is shallow: an object is split into its keys and the raw text of
//! their values ([`RawValue`], borrowed from the line, no copy), and only the
//! few small fields the relay needs are decoded. Duplicate keys resolve to the
//! last one, as JavaScript's `JSON.parse` and Python's `json` do, so the relay
//! judges a message the way a typical server will read it.
//!
//! Tool arguments are never kept: `tools/call` yields a SHA-256 of their
//! canonical form (keys sorted, no whitespace), first 16 hex characters.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A JSON-RPC request id, normalised so a response matches its request even
/// when the peer re-encoded the id: numbers by their value as a double (what
/// a JavaScript peer keeps: `1`, `1.0` and `1e0` are one id), integers
/// written without a fraction; strings by their decoded value. `1` and `"1"`
/// are different ids, as JSON-RPC says. Ids a double can't tell apart
/// (integers past 2^53) are one key, so the relay refuses the second of them
/// while the first is in flight rather than confuse their ends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestId {
    Number(String),
    String(String),
}

impl RequestId {
    /// From a raw id; `None` for null, booleans, objects and arrays.
    pub fn from_raw(raw: &RawValue) -> Option<Self> {
        match serde_json::from_str::<Value>(raw.get()).ok()? {
            Value::Number(n) => Some(RequestId::Number(number_key(&n))),
            Value::String(s) => Some(RequestId::String(s)),
            _ => None,
        }
    }

    /// The id as JSON (its normalised form), for error responses the relay
    /// writes itself when it no longer has the original.
    pub fn to_json(&self) -> Value {
        match self {
            RequestId::Number(n) => serde_json::from_str(n).unwrap_or(Value::Null),
            RequestId::String(s) => Value::String(s.clone()),
        }
    }
}

fn number_key(n: &serde_json::Number) -> String {
    // Integers a double holds exactly: their decimal text is the key (what
    // the float path below gives, without its slow exact formatting).
    const EXACT: u64 = 1 << 53;
    if let Some(i) = n.as_i64().filter(|i| i.unsigned_abs() <= EXACT) {
        return i.to_string();
    }
    if let Some(u) = n.as_u64().filter(|u| *u <= EXACT) {
        return u.to_string();
    }
    let Some(f) = n.as_f64().filter(|f| f.is_finite()) else {
        return n.to_string();
    };
    // -0 and 0 are one id.
    let f = if f == 0.0 { 0.0 } else { f };
    if f.fract() == 0.0 && f.abs() < 1e21 {
        format!("{f:.0}")
    } else {
        format!("{f}")
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestId::Number(n) => f.write_str(n),
            RequestId::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// Status of an MCP task (2025-11-25 "tasks" utility).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    Working,
    InputRequired,
    Completed,
    Failed,
    Cancelled,
    Other(String),
}

impl TaskStatus {
    fn parse(s: &str) -> Self {
        match s {
            "working" => TaskStatus::Working,
            "input_required" => TaskStatus::InputRequired,
            "completed" => TaskStatus::Completed,
            "failed" => TaskStatus::Failed,
            "cancelled" => TaskStatus::Cancelled,
            other => TaskStatus::Other(other.to_owned()),
        }
    }

    /// Terminal statuses never change again; the task's call is over.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

/// A task as seen in `CreateTaskResult.task`, a `tasks/get` result or a
/// `notifications/tasks/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRef {
    pub task_id: String,
    pub status: TaskStatus,
}

/// `tools/call` essentials. Argument values are not kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    /// `params.name`; `None` when missing or not a string.
    pub name: Option<String>,
    /// SHA-256 of canonical `params.arguments` (absent hashes as `null`),
    /// first 16 hex characters.
    pub args_hash: String,
    /// Task-augmented (`params.task` present): the result may be a task handle.
    pub task: bool,
}

/// What a client says about itself in `initialize` (or `server/discover`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    pub protocol_version: Option<String>,
    pub client_name: Option<String>,
    pub client_version: Option<String>,
}

/// What a server answers to `initialize` (or `server/discover`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerHello {
    pub protocol_version: Option<String>,
    pub server_name: Option<String>,
    pub server_version: Option<String>,
}

/// Requests the relay cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    ToolsCall(ToolCall),
    Initialize(ClientHello),
    /// `server/discover` (2026-07-28 era); fields read best-effort.
    Discover(ClientHello),
    ToolsList,
    TasksGet {
        task_id: Option<String>,
    },
    TasksResult {
        task_id: Option<String>,
    },
    TasksCancel {
        task_id: Option<String>,
    },
    Other,
}

/// Notifications the relay cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// `notifications/cancelled`; `request_id` is `params.requestId`.
    Cancelled {
        request_id: Option<RequestId>,
    },
    /// `notifications/progress` (nothing is decoded from it).
    Progress,
    /// `notifications/tasks/status`.
    TaskStatus(TaskRef),
    Other,
}

/// Body of a response, borrowed from the line.
#[derive(Clone, Copy, Debug)]
pub enum ResponseBody<'a> {
    Result(&'a RawValue),
    Error { code: Option<i64> },
}

/// One JSON-RPC message.
#[derive(Clone, Debug)]
pub enum Message<'a> {
    Request {
        id: RequestId,
        /// The id as the client wrote it, echoed in the relay's own errors.
        id_json: Value,
        method: String,
        request: Request,
    },
    Notification {
        method: String,
        notification: Notification,
    },
    /// `id` is `None` for `"id": null` (a peer's parse-error answer).
    Response {
        id: Option<RequestId>,
        body: ResponseBody<'a>,
    },
    /// Has a string `method` but an id that is neither number nor string.
    /// It can't be answered and must not reach a server if it is a tool call.
    Malformed { method: String },
    /// A batch element (or object) that is not JSON-RPC at all.
    Invalid,
}

/// A classified line.
#[derive(Clone, Debug)]
pub enum Classified<'a> {
    Single(Message<'a>),
    /// A JSON array of messages (JSON-RPC batch, 2025-03-26 era).
    Batch(Vec<Message<'a>>),
    /// Not JSON, or JSON that is not JSON-RPC.
    NotMcp,
}

/// Classify one line (with or without its `\n`). Never panics.
pub fn classify(line: &[u8]) -> Classified<'_> {
    let first = line.iter().find(|b| !b" \t\r\n".contains(b));
    match first {
        // One pass: the object's fields straight from the line (the whole
        // line is still checked to be one JSON value).
        Some(b'{') => match serde_json::from_slice::<Obj<'_>>(line) {
            Ok(obj) => match message_obj(obj) {
                Message::Invalid => Classified::NotMcp,
                m => Classified::Single(m),
            },
            Err(_) => Classified::NotMcp,
        },
        Some(b'[') => match serde_json::from_slice::<Vec<&RawValue>>(line) {
            Ok(items) if !items.is_empty() => {
                Classified::Batch(items.into_iter().map(message).collect())
            }
            _ => Classified::NotMcp,
        },
        _ => Classified::NotMcp,
    }
}

/// A strict-JSON copy of a line that serde_json rejects but a lenient server
/// parser may accept, for classification only (the original bytes are what
/// gets forwarded). `None` when the copy would not differ.
///
/// What it smooths over, each accepted by a common server stack:
/// - invalid UTF-8 (Node's `Buffer.toString("utf8")` then `JSON.parse`):
///   replaced with U+FFFD, as Node does;
/// - lone UTF-16 surrogate escapes such as `\ud800` (`JSON.parse`, Python):
///   replaced with `\ufffd`;
/// - `NaN`, `Infinity`, `-Infinity` outside strings (Python's `json`):
///   replaced with `null`;
/// - vertical tab and form feed outside strings (servers that `strip()`
///   lines): replaced with spaces.
///
/// Without this, a `tools/call` of a refused tool could reach such a server
/// unchecked by dressing its arguments in one of these forms.
pub fn lenient_copy(line: &[u8]) -> Option<Vec<u8>> {
    let text = String::from_utf8_lossy(line);
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let mut in_string = false;
    while i < b.len() {
        let c = b[i];
        if in_string {
            match c {
                b'"' => {
                    in_string = false;
                    out.push(c);
                    i += 1;
                }
                b'\\' if b.get(i + 1) == Some(&b'u') => {
                    let unit = hex4(b, i + 2);
                    match unit {
                        Some(0xd800..=0xdbff) => {
                            let low = (b.get(i + 6) == Some(&b'\\') && b.get(i + 7) == Some(&b'u'))
                                .then(|| hex4(b, i + 8))
                                .flatten();
                            if matches!(low, Some(0xdc00..=0xdfff)) {
                                out.extend_from_slice(&b[i..i + 12]);
                                i += 12;
                            } else {
                                out.extend_from_slice(b"\\ufffd");
                                i += 6;
                            }
                        }
                        Some(0xdc00..=0xdfff) => {
                            out.extend_from_slice(b"\\ufffd");
                            i += 6;
                        }
                        _ => {
                            out.extend_from_slice(&b[i..(i + 2).min(b.len())]);
                            i += 2;
                        }
                    }
                }
                b'\\' => {
                    out.extend_from_slice(&b[i..(i + 2).min(b.len())]);
                    i += 2;
                }
                _ => {
                    out.push(c);
                    i += 1;
                }
            }
        } else if c == b'"' {
            in_string = true;
            out.push(c);
            i += 1;
        } else if c == 0x0b || c == 0x0c {
            out.push(b' ');
            i += 1;
        } else if let Some(n) = [&b"-Infinity"[..], b"Infinity", b"NaN"]
            .iter()
            .find(|w| b[i..].starts_with(w))
            .map(|w| w.len())
        {
            out.extend_from_slice(b"null");
            i += n;
        } else {
            out.push(c);
            i += 1;
        }
    }
    (out != line).then_some(out)
}

fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let digits = b.get(at..at + 4)?;
    let s = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Reads a line too long to parse as it streams past, in bounded memory, for
/// its top-level `id`, `method` and whether it has `result` or `error`.
/// Server side: a huge result still ends its call (otherwise a server could
/// keep a tool's rights by padding its answers). Client side: a huge
/// `tools/call` is recognised and refused.
#[derive(Debug, Default)]
pub struct LineScan {
    started: bool,
    /// The line is not a JSON object; nothing more to learn.
    dead: bool,
    depth: u32,
    in_string: bool,
    escaped: bool,
    expect_key: bool,
    /// Raw text (quotes included) of the key being read at depth 1.
    key: Vec<u8>,
    reading_key: bool,
    current_key: Option<TopKey>,
    /// Raw text of the `id` or `method` value being read.
    value: Vec<u8>,
    reading: Option<TopKey>,
    id: Option<Vec<u8>>,
    method: Option<Vec<u8>>,
    has_result: bool,
    has_error: bool,
    has_method: bool,
    bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopKey {
    Id,
    Result,
    Error,
    Method,
    Other,
}

/// Longest key, id or method text the scan keeps (longer ones can't be ours).
const SCAN_KEEP: usize = 1024;

impl LineScan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn push(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        let mut i = 0;
        while i < data.len() {
            if self.dead {
                return;
            }
            // Inside a string nothing is kept: only a quote or a backslash
            // changes the state, so jump to the next one.
            if self.in_string && !self.escaped && !self.reading_key && self.reading.is_none() {
                match memchr::memchr2(b'"', b'\\', &data[i..]) {
                    Some(off) => i += off,
                    None => return,
                }
            }
            self.step(data[i]);
            i += 1;
        }
    }

    /// What was read so far is a response's: a top-level `result` or
    /// `error` member, and no `method` member (yet).
    pub fn response_so_far(&self) -> bool {
        self.started && !self.dead && !self.has_method && (self.has_result || self.has_error)
    }

    fn keep(&mut self, c: u8) {
        if self.reading.is_some() && self.value.len() <= SCAN_KEEP {
            self.value.push(c);
        }
    }

    fn step(&mut self, c: u8) {
        if !self.started {
            if !c.is_ascii_whitespace() {
                self.started = true;
                self.dead = c != b'{';
                self.depth = 1;
                self.expect_key = true;
            }
            return;
        }
        if self.depth == 0 {
            return;
        }
        if self.in_string {
            if self.reading_key && self.key.len() < SCAN_KEEP {
                self.key.push(c);
            }
            self.keep(c);
            if self.escaped {
                self.escaped = false;
            } else if c == b'\\' {
                self.escaped = true;
            } else if c == b'"' {
                self.in_string = false;
                if self.reading_key {
                    self.reading_key = false;
                    let name = serde_json::from_slice::<String>(&self.key).ok();
                    self.current_key = Some(match name.as_deref() {
                        Some("id") => TopKey::Id,
                        Some("result") => TopKey::Result,
                        Some("error") => TopKey::Error,
                        Some("method") => TopKey::Method,
                        _ => TopKey::Other,
                    });
                }
            }
            return;
        }
        match c {
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && self.expect_key {
                    self.reading_key = true;
                    self.key.clear();
                    self.key.push(c);
                } else {
                    self.keep(c);
                }
            }
            b'{' | b'[' => {
                self.depth += 1;
                self.keep(c);
            }
            b'}' | b']' if self.depth == 1 => {
                self.end_value();
                self.depth = 0;
            }
            b'}' | b']' => {
                self.depth -= 1;
                self.keep(c);
            }
            b':' if self.depth == 1 => {
                self.expect_key = false;
                match self.current_key.take() {
                    Some(k @ (TopKey::Id | TopKey::Method)) => {
                        self.has_method |= k == TopKey::Method;
                        self.reading = Some(k);
                        self.value.clear();
                    }
                    Some(TopKey::Result) => self.has_result = true,
                    Some(TopKey::Error) => self.has_error = true,
                    Some(TopKey::Other) | None => {}
                }
            }
            b',' if self.depth == 1 => {
                self.end_value();
                self.expect_key = true;
            }
            c if c.is_ascii_whitespace() => {}
            _ => self.keep(c),
        }
    }

    fn end_value(&mut self) {
        // Last duplicate wins, as in `classify`.
        let kept = (self.value.len() <= SCAN_KEEP).then(|| self.value.clone());
        match self.reading.take() {
            Some(TopKey::Id) => self.id = kept,
            Some(TopKey::Method) => self.method = kept,
            _ => {}
        }
    }

    fn complete(&self) -> bool {
        self.started && !self.dead && self.depth == 0
    }

    /// After the whole line: the top-level id, if a number or string.
    pub fn id(&self) -> Option<RequestId> {
        if !self.complete() {
            return None;
        }
        let raw = serde_json::from_slice::<&RawValue>(self.id.as_deref()?).ok()?;
        RequestId::from_raw(raw)
    }

    /// After the whole line: the top-level method, if a string.
    pub fn method(&self) -> Option<String> {
        if !self.complete() {
            return None;
        }
        serde_json::from_slice(self.method.as_deref()?).ok()
    }

    /// After the whole line: `(id, is_error)` if it was a complete response
    /// object (no method) with a number or string id.
    pub fn response(&self) -> Option<(RequestId, bool)> {
        if self.has_method || (!self.has_result && !self.has_error) {
            return None;
        }
        Some((self.id()?, self.has_error))
    }
}

/// An object's keys with the raw text of their values; last duplicate wins.
struct Obj<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Obj<'a> {
    fn parse(raw: &'a RawValue) -> Option<Self> {
        serde_json::from_str(raw.get()).ok()
    }

    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    fn string(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|v| serde_json::from_str(v.get()).ok())
    }

    fn object(&self, key: &str) -> Option<Obj<'a>> {
        self.get(key).and_then(Obj::parse)
    }

    fn bool(&self, key: &str) -> Option<bool> {
        self.get(key)
            .and_then(|v| serde_json::from_str(v.get()).ok())
    }
}

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Obj<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Obj<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Obj<'de>, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    fields.push((k.0, v));
                }
                Ok(Obj(fields))
            }
        }
        d.deserialize_map(V)
    }
}

fn message(raw: &RawValue) -> Message<'_> {
    match Obj::parse(raw) {
        Some(obj) => message_obj(obj),
        None => Message::Invalid,
    }
}

fn message_obj(obj: Obj<'_>) -> Message<'_> {
    if let Some(method_raw) = obj.get("method") {
        let Ok(method) = serde_json::from_str::<String>(method_raw.get()) else {
            return Message::Invalid;
        };
        let params = obj.object("params");
        return match obj.get("id") {
            None => Message::Notification {
                notification: notification(&method, params.as_ref()),
                method,
            },
            Some(id_raw) => match RequestId::from_raw(id_raw) {
                Some(id) => Message::Request {
                    id,
                    id_json: serde_json::from_str(id_raw.get()).unwrap_or(Value::Null),
                    request: request(&method, params.as_ref()),
                    method,
                },
                None => Message::Malformed { method },
            },
        };
    }
    let body = if let Some(result) = obj.get("result") {
        ResponseBody::Result(result)
    } else if let Some(error) = obj.get("error") {
        let code = Obj::parse(error)
            .and_then(|e| e.get("code"))
            .and_then(|c| serde_json::from_str::<i64>(c.get()).ok());
        ResponseBody::Error { code }
    } else {
        return Message::Invalid;
    };
    match obj.get("id") {
        Some(id_raw) => Message::Response {
            id: RequestId::from_raw(id_raw),
            body,
        },
        None => Message::Invalid,
    }
}

fn hello(params: Option<&Obj<'_>>) -> ClientHello {
    let info = params.and_then(|p| p.object("clientInfo"));
    ClientHello {
        protocol_version: params.and_then(|p| p.string("protocolVersion")),
        client_name: info.as_ref().and_then(|i| i.string("name")),
        client_version: info.as_ref().and_then(|i| i.string("version")),
    }
}

fn request(method: &str, params: Option<&Obj<'_>>) -> Request {
    let task_id = || params.and_then(|p| p.string("taskId"));
    match method {
        "tools/call" => Request::ToolsCall(ToolCall {
            name: params.and_then(|p| p.string("name")),
            args_hash: args_hash(params.and_then(|p| p.get("arguments"))),
            task: params.and_then(|p| p.get("task")).is_some(),
        }),
        "initialize" => Request::Initialize(hello(params)),
        "server/discover" => Request::Discover(hello(params)),
        "tools/list" => Request::ToolsList,
        "tasks/get" => Request::TasksGet { task_id: task_id() },
        "tasks/result" => Request::TasksResult { task_id: task_id() },
        "tasks/cancel" => Request::TasksCancel { task_id: task_id() },
        _ => Request::Other,
    }
}

fn notification(method: &str, params: Option<&Obj<'_>>) -> Notification {
    match method {
        "notifications/cancelled" => Notification::Cancelled {
            request_id: params
                .and_then(|p| p.get("requestId"))
                .and_then(RequestId::from_raw),
        },
        "notifications/progress" => Notification::Progress,
        "notifications/tasks/status" => match params.and_then(task_fields) {
            Some(t) => Notification::TaskStatus(t),
            None => Notification::Other,
        },
        _ => Notification::Other,
    }
}

fn task_fields(obj: &Obj<'_>) -> Option<TaskRef> {
    Some(TaskRef {
        task_id: obj.string("taskId")?,
        status: TaskStatus::parse(&obj.string("status")?),
    })
}

/// How a `tools/call` result ended, or that it became a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// A `CallToolResult`; `is_error` is its `isError`.
    Done { is_error: bool },
    /// A `CreateTaskResult`: `{"task": {"taskId", "status", ...}}`.
    Task(TaskRef),
}

/// Read a `tools/call` (or `tasks/result`) result.
pub fn call_result(result: &RawValue) -> CallResult {
    let Some(obj) = Obj::parse(result) else {
        return CallResult::Done { is_error: false };
    };
    if let Some(task) = obj.object("task").as_ref().and_then(task_fields) {
        return CallResult::Task(task);
    }
    CallResult::Done {
        is_error: obj.bool("isError").unwrap_or(false),
    }
}

/// Read a `tasks/get` or `tasks/cancel` result (a flat `Task`).
pub fn task_result(result: &RawValue) -> Option<TaskRef> {
    Obj::parse(result).as_ref().and_then(task_fields)
}

/// Read an `initialize` (or `server/discover`) result.
pub fn server_hello(result: &RawValue) -> ServerHello {
    let obj = Obj::parse(result);
    let info = obj.as_ref().and_then(|o| o.object("serverInfo"));
    ServerHello {
        protocol_version: obj.as_ref().and_then(|o| o.string("protocolVersion")),
        server_name: info.as_ref().and_then(|i| i.string("name")),
        server_version: info.as_ref().and_then(|i| i.string("version")),
    }
}

/// Behaviour hints a server declares for a tool (`Tool.annotations`). They
/// are the server's claims, untrusted: for reports and policy learning only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolAnnotations {
    pub title: Option<String>,
    pub read_only_hint: Option<bool>,
    pub destructive_hint: Option<bool>,
    pub idempotent_hint: Option<bool>,
    pub open_world_hint: Option<bool>,
}

/// Tool names and annotations from a `tools/list` result (one page).
pub fn tool_annotations(result: &RawValue) -> BTreeMap<String, ToolAnnotations> {
    let mut out = BTreeMap::new();
    let Some(obj) = Obj::parse(result) else {
        return out;
    };
    let Some(tools) = obj
        .get("tools")
        .and_then(|t| serde_json::from_str::<Vec<&RawValue>>(t.get()).ok())
    else {
        return out;
    };
    for tool in tools {
        let Some(t) = Obj::parse(tool) else { continue };
        let Some(name) = t.string("name") else {
            continue;
        };
        let a = t.object("annotations");
        let a = a.as_ref();
        out.insert(
            name,
            ToolAnnotations {
                title: a.and_then(|a| a.string("title")),
                read_only_hint: a.and_then(|a| a.bool("readOnlyHint")),
                destructive_hint: a.and_then(|a| a.bool("destructiveHint")),
                idempotent_hint: a.and_then(|a| a.bool("idempotentHint")),
                open_world_hint: a.and_then(|a| a.bool("openWorldHint")),
            },
        );
    }
    out
}

/// SHA-256 of the canonical JSON of `arguments`, first 16 hex characters.
/// Canonical: object keys sorted by their UTF-8 bytes (last duplicate wins),
/// no whitespace, numbers and strings as serde_json writes them. Missing
/// arguments hash as `null`; arguments serde_json can't build a value from
/// (nested deeper than its limit) hash as their raw text behind a `raw:`
/// prefix, so they never collide with a canonical form.
pub fn args_hash(arguments: Option<&RawValue>) -> String {
    let mut hasher = Sha256::new();
    match arguments {
        None => hasher.update(b"null"),
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(value) => canonical(&value, &mut hasher),
            Err(_) => {
                hasher.update(b"raw:");
                hasher.update(raw.get().as_bytes());
            }
        },
    }
    let digest = hasher.finalize();
    hex::encode(&digest[..8])
}

fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Null => h.update(b"null"),
        Value::Bool(b) => h.update(if *b { &b"true"[..] } else { &b"false"[..] }),
        Value::Number(n) => h.update(n.to_string().as_bytes()),
        Value::String(s) => h.update(Value::String(s.clone()).to_string().as_bytes()),
        Value::Array(items) => {
            h.update(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                canonical(item, h);
            }
            h.update(b"]");
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            h.update(b"{");
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                h.update(Value::String((*k).clone()).to_string().as_bytes());
                h.update(b":");
                if let Some(item) = map.get(*k) {
                    canonical(item, h);
                }
            }
            h.update(b"}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(line: &str) -> Message<'_> {
        match classify(line.as_bytes()) {
            Classified::Single(m) => m,
            other => panic!("not a single message: {other:?} for {line}"),
        }
    }

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).expect("test JSON")
    }

    #[test]
    fn tools_call_with_number_and_string_ids() {
        let m = single(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read_file","arguments":{"path":"/etc/passwd"}}}"#,
        );
        let Message::Request {
            id,
            request,
            method,
            ..
        } = m
        else {
            panic!("{m:?}")
        };
        assert_eq!(id, RequestId::Number("7".into()));
        assert_eq!(method, "tools/call");
        let Request::ToolsCall(call) = request else {
            panic!()
        };
        assert_eq!(call.name.as_deref(), Some("read_file"));
        assert_eq!(call.args_hash.len(), 16);
        assert!(!call.task);

        let m =
            single(r#"{"jsonrpc":"2.0","id":"abc","method":"tools/call","params":{"name":"x"}}"#);
        assert!(matches!(m, Message::Request { id: RequestId::String(ref s), .. } if s == "abc"));
    }

    #[test]
    fn number_and_string_ids_differ() {
        assert_ne!(
            RequestId::from_raw(raw("1")),
            RequestId::from_raw(raw("\"1\""))
        );
        assert_eq!(RequestId::from_raw(raw("null")), None);
        assert_eq!(RequestId::from_raw(raw("{}")), None);
        assert_eq!(
            RequestId::Number("12".into()).to_json(),
            serde_json::json!(12)
        );
        let key = |s: &str| RequestId::from_raw(raw(s));
        assert_eq!(key("1"), key("1.0"));
        assert_eq!(key("1"), key("1e0"));
        assert_eq!(key("-0"), key("0"));
        assert_eq!(key("9007199254740993"), key("9007199254740992"));
        assert_ne!(key("1.5"), key("1"));
        assert_eq!(key("1.5"), Some(RequestId::Number("1.5".into())));
        assert_eq!(key("-7"), Some(RequestId::Number("-7".into())));
    }

    #[test]
    fn args_hash_is_canonical_and_hides_values() {
        let a = args_hash(Some(raw(r#"{"b":1,"a":[true,null,"s"]}"#)));
        let b = args_hash(Some(raw(
            " { \"a\" : [ true , null , \"s\" ] , \"b\" : 1 } ",
        )));
        assert_eq!(a, b);
        assert_ne!(a, args_hash(Some(raw(r#"{"b":2,"a":[true,null,"s"]}"#))));
        assert_eq!(args_hash(None), args_hash(Some(raw("null"))));
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        // Duplicate keys: the last one counts, as it does for the server.
        assert_eq!(
            args_hash(Some(raw(r#"{"p":"/a","p":"/etc"}"#))),
            args_hash(Some(raw(r#"{"p":"/etc"}"#)))
        );
    }

    #[test]
    fn duplicate_keys_last_wins() {
        let m = single(
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"a","name":"b"}}"#,
        );
        let Message::Request {
            request: Request::ToolsCall(c),
            ..
        } = m
        else {
            panic!("{m:?}")
        };
        assert_eq!(c.name.as_deref(), Some("b"));
    }

    #[test]
    fn escaped_keys_are_decoded() {
        let m = single(
            r#"{"jsonrpc":"2.0","id":1,"\u006dethod":"tools\/call","params":{"n\u0061me":"w"}}"#,
        );
        let Message::Request {
            request: Request::ToolsCall(c),
            ..
        } = m
        else {
            panic!("{m:?}")
        };
        assert_eq!(c.name.as_deref(), Some("w"));
    }

    #[test]
    fn notifications_and_responses() {
        let m = single(
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"r1","reason":"x"}}"#,
        );
        assert!(matches!(
            m,
            Message::Notification { notification: Notification::Cancelled { request_id: Some(RequestId::String(ref s)) }, .. } if s == "r1"
        ));
        let m = single(
            r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":2}}"#,
        );
        assert!(matches!(
            m,
            Message::Notification {
                notification: Notification::Progress,
                ..
            }
        ));
        let m = single(r#"{"jsonrpc":"2.0","id":3,"result":{"content":[]}}"#);
        assert!(matches!(
            m,
            Message::Response {
                id: Some(_),
                body: ResponseBody::Result(_)
            }
        ));
        let m = single(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse"}}"#);
        assert!(matches!(
            m,
            Message::Response {
                id: None,
                body: ResponseBody::Error { code: Some(-32700) }
            }
        ));
        let m = single(r#"{"jsonrpc":"2.0","id":true,"method":"tools/call"}"#);
        assert!(matches!(m, Message::Malformed { .. }));
    }

    #[test]
    fn initialize_and_discover() {
        let m = single(
            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"cli","version":"1.2"}}}"#,
        );
        let Message::Request {
            request: Request::Initialize(h),
            ..
        } = m
        else {
            panic!()
        };
        assert_eq!(h.protocol_version.as_deref(), Some("2025-11-25"));
        assert_eq!(h.client_name.as_deref(), Some("cli"));
        assert_eq!(h.client_version.as_deref(), Some("1.2"));
        let m = single(r#"{"jsonrpc":"2.0","id":0,"method":"server/discover","params":{}}"#);
        assert!(matches!(
            m,
            Message::Request {
                request: Request::Discover(_),
                ..
            }
        ));
        let s = server_hello(raw(
            r#"{"protocolVersion":"2025-06-18","capabilities":{},"serverInfo":{"name":"fs","version":"0.6"}}"#,
        ));
        assert_eq!(s.server_name.as_deref(), Some("fs"));
        assert_eq!(s.protocol_version.as_deref(), Some("2025-06-18"));
    }

    #[test]
    fn batches_and_garbage() {
        let line = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}},{"jsonrpc":"2.0","method":"notifications/progress"},5]"#;
        let Classified::Batch(items) = classify(line) else {
            panic!()
        };
        assert_eq!(items.len(), 3);
        assert!(matches!(items[2], Message::Invalid));
        for bad in [
            &b""[..],
            b"\n",
            b"[]",
            b"{",
            b"nope",
            b"\xff\xfe{}",
            b"{\"id\":1}",
            b"{} x",
        ] {
            assert!(matches!(classify(bad), Classified::NotMcp), "{bad:?}");
        }
    }

    #[test]
    fn lenient_copy_makes_what_lenient_parsers_accept_classifiable() {
        let cases: [&[u8]; 5] = [
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"rm\",\"arguments\":{\"x\":\"\xff\xfe\"}}}\n",
            br#"{"\ud800":0,"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm"}}"#,
            br#"{"\udc00\ud800\ud800":1,"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm","arguments":{"x":[NaN,-Infinity,Infinity]}}}"#,
            b"\x0c{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"rm\"}}\x0b",
        ];
        for line in cases {
            assert!(
                matches!(classify(line), Classified::NotMcp),
                "strict rejects {line:?}"
            );
            let copy = lenient_copy(line).expect("differs");
            let Classified::Single(Message::Request {
                request: Request::ToolsCall(c),
                ..
            }) = classify(&copy)
            else {
                panic!(
                    "lenient copy not a call: {:?}",
                    String::from_utf8_lossy(&copy)
                )
            };
            assert_eq!(c.name.as_deref(), Some("rm"));
        }
        // Valid pairs, strings that merely mention NaN, and clean lines stay.
        let fine = br#"{"a":"\ud83d\ude00 NaN Infinity \" \\u0041"}"#;
        assert_eq!(lenient_copy(fine), None);
        for junk in [&b"\\"[..], b"\"\\u12", b"\"\\ud800\\u", b"-Inf", b"\xff\\"] {
            let _ = lenient_copy(junk);
        }
    }

    #[test]
    fn line_scan_finds_id_and_method_of_a_streamed_line() {
        let scan = |line: &[u8], piece: usize| {
            let mut s = LineScan::new();
            for p in line.chunks(piece) {
                s.push(p);
            }
            s.response()
        };
        let big = "x".repeat(5000);
        let cases: Vec<(String, Option<(RequestId, bool)>)> = vec![
            (
                format!(
                    r#"{{"jsonrpc":"2.0","id":7,"result":{{"content":[{{"text":"{big}\"}}{{"}}]}}}}"#
                ),
                Some((RequestId::Number("7".into()), false)),
            ),
            (
                format!(r#"{{"result":{{"id":1,"t":"{big}"}},"jsonrpc":"2.0", "id" : "a\"b" }}"#),
                Some((RequestId::String("a\"b".into()), false)),
            ),
            (
                format!(
                    r#"{{"jsonrpc":"2.0","error":{{"code":1,"message":"{big}"}},"\u0069d":3}}"#
                ),
                Some((RequestId::Number("3".into()), true)),
            ),
            (
                format!(r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":"{big}"}}"#),
                None,
            ),
            (
                format!(
                    r#"{{"jsonrpc":"2.0","id":1,"params":{{"method":"no"}},"me\u0074hod":"tools/call","x":"{big}"}}"#
                ),
                None,
            ),
            (
                format!(r#"{{"jsonrpc":"2.0","id":1,"result":"{big}""#),
                None,
            ),
            (format!(r#"["{big}"]"#), None),
            (
                format!(r#"{{"jsonrpc":"2.0","id":null,"result":"{big}"}}"#),
                None,
            ),
        ];
        for (line, want) in cases {
            for piece in [1, 3, 100, 100_000] {
                assert_eq!(
                    scan(line.as_bytes(), piece),
                    want,
                    "{piece}: {}",
                    &line[..60.min(line.len())]
                );
            }
            let mut s = LineScan::new();
            s.push(line.as_bytes());
            let method = match classify(line.as_bytes()) {
                Classified::Single(
                    Message::Request { method, .. } | Message::Notification { method, .. },
                ) => Some(method),
                _ => None,
            };
            assert_eq!(s.method(), method);
            // Agrees with the full classifier where that can read the line.
            if let Classified::Single(Message::Response { id: Some(id), body }) =
                classify(line.as_bytes())
            {
                let is_error = matches!(body, ResponseBody::Error { .. });
                assert_eq!(want, Some((id, is_error)));
            }
        }
    }

    #[test]
    fn tasks_shapes() {
        let r = raw(
            r#"{"task":{"taskId":"t-1","status":"working","createdAt":"2025-11-25T10:30:00Z","ttl":60000}}"#,
        );
        assert_eq!(
            call_result(r),
            CallResult::Task(TaskRef {
                task_id: "t-1".into(),
                status: TaskStatus::Working
            })
        );
        assert_eq!(
            call_result(raw(r#"{"content":[],"isError":true}"#)),
            CallResult::Done { is_error: true }
        );
        let t = task_result(raw(r#"{"taskId":"t-1","status":"completed"}"#)).expect("task");
        assert!(t.status.is_terminal());
        let m = single(
            r#"{"jsonrpc":"2.0","method":"notifications/tasks/status","params":{"taskId":"t-1","status":"failed"}}"#,
        );
        assert!(matches!(
            m,
            Message::Notification {
                notification: Notification::TaskStatus(TaskRef {
                    status: TaskStatus::Failed,
                    ..
                }),
                ..
            }
        ));
        let m =
            single(r#"{"jsonrpc":"2.0","id":9,"method":"tasks/get","params":{"taskId":"t-1"}}"#);
        assert!(matches!(
            m,
            Message::Request {
                request: Request::TasksGet { task_id: Some(_) },
                ..
            }
        ));
        let m = single(
            r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"slow","arguments":{},"task":{"ttl":1000}}}"#,
        );
        assert!(matches!(
            m,
            Message::Request {
                request: Request::ToolsCall(ToolCall { task: true, .. }),
                ..
            }
        ));
    }

    #[test]
    fn tools_list_annotations() {
        let r = raw(
            r#"{"tools":[{"name":"read","inputSchema":{},"annotations":{"readOnlyHint":true,"openWorldHint":false,"title":"Read"}},{"name":"plain","inputSchema":{}},{"nope":1}]}"#,
        );
        let map = tool_annotations(r);
        assert_eq!(map.len(), 2);
        assert_eq!(map["read"].read_only_hint, Some(true));
        assert_eq!(map["read"].open_world_hint, Some(false));
        assert_eq!(map["read"].title.as_deref(), Some("Read"));
        assert_eq!(map["plain"], ToolAnnotations::default());
    }
}
