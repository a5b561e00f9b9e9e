//! The stdio relay loop: client <-> confined server, both directions at once.
//!
//! Guarantees (design: "Per-tool enforcement, race-free"):
//! - Bytes are forwarded unchanged and in order in each direction. The relay
//!   only ever adds whole lines of its own (error responses to the client) and
//!   withholds whole lines (refused calls); it never edits one.
//! - A `tools/call` reaches the server only after [`RelayHooks::call_begin`]
//!   returned `Ok` (rights in force); otherwise the client gets an error
//!   response with code [`REFUSED_CODE`] and the same id.
//! - The message that ends a call (its response, a terminal task status) is
//!   forwarded to the client only after [`RelayHooks::call_end`] returned, so
//!   rights are gone before the client sees the result.
//! - A batch (JSON array) holding any refused call is refused whole: the relay
//!   cannot forward part of a line without rewriting it, and never rewrites.
//!   Every request in the batch gets an error response, in one batch reply.
//! - Lines the relay writes itself never interleave with a line being
//!   forwarded from the server: both hold the client writer's lock for a
//!   whole line.
//! - When the server's stdout ends, every call still in flight ends with
//!   outcome error ("server exited").
//! - A server line past [`STREAM_AFTER`] bytes that reads as a response is
//!   forwarded as it arrives, its bytes from the last non-whitespace one on
//!   held back until the whole line was classified and its call ended.
//!
//! A line strict JSON rejects is read again through
//! [`super::jsonrpc::lenient_copy`] (invalid UTF-8, lone surrogates, NaN...),
//! so a refused tool can't slip past in a form a lenient server parser
//! accepts, and a server can't hide a response from the relay that a lenient
//! client accepts. Lines that still can't be read (not JSON-RPC, or longer
//! than the parse limit) are forwarded and counted. Such a line never starts
//! a call's rights. Lines over the parse limit are scanned as they stream
//! ([`LineScan`]): a huge server result still ends its call before its last
//! piece is written; a huge client `tools/call` is refused (its closing
//! bracket is held back so the server never has it whole, and the server's
//! stdin is closed since it holds a partial line).
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::calls::{CallEnd, CallStart, CallTracker, Outcome};
use super::framing::{Frame, Framer, DEFAULT_PARSE_LIMIT};
use super::jsonrpc::{
    call_result, classify, lenient_copy, server_hello, task_result, tool_annotations, CallResult,
    Classified, LineScan, Message, Notification, Request, RequestId, ResponseBody, ToolAnnotations,
    ToolCall,
};
use super::{Handshake, RelayError, RelayHooks, SessionInfo};
use crate::policy::model::{Governance, Policy};

/// JSON-RPC error code of every response the relay writes itself when it
/// refuses a call: -32001, in the range JSON-RPC reserves for
/// implementation-defined server errors (-32000..=-32099). `error.data.reason`
/// says why (policy, agent unreachable, duplicate id, malformed call).
pub const REFUSED_CODE: i64 = -32001;

/// Most requests whose responses the relay waits to read (initialize,
/// tools/list, tasks/*) at once; more are forwarded without being watched.
const MAX_PENDING: usize = 4096;

/// Tunables; [`relay`] uses the defaults.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Longest line handed to the classifier.
    pub parse_limit: usize,
    /// Read buffer size per direction.
    pub read_size: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            parse_limit: DEFAULT_PARSE_LIMIT,
            read_size: 64 * 1024,
        }
    }
}

/// Counters for one relay run. Lines count every line read (refused ones
/// included); bytes count what was forwarded (not what the relay wrote or
/// withheld).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub lines_c2s: u64,
    pub lines_s2c: u64,
    /// Lines forwarded without being understood (not JSON-RPC, or oversize).
    pub unparsed_c2s: u64,
    pub unparsed_s2c: u64,
    /// Of the unparsed, lines longer than the parse limit.
    pub oversize_c2s: u64,
    pub oversize_s2c: u64,
    /// Lines strict JSON rejected but read through [`lenient_copy`] (what
    /// lenient server and client parsers accept); acted on like any other.
    pub lenient_c2s: u64,
    pub lenient_s2c: u64,
    pub bytes_c2s: u64,
    pub bytes_s2c: u64,
    /// `tools/call`s answered by the relay and never forwarded.
    pub refused: u64,
    pub calls_begun: u64,
    pub calls_ended: u64,
    pub session: SessionInfo,
    /// Every tool seen in `tools/list` results, with its annotations.
    pub tool_annotations: BTreeMap<String, ToolAnnotations>,
}

/// Relay with default options. See [`relay_with`].
pub async fn relay<H, CR, CW, SW, SR>(
    client_in: CR,
    client_out: CW,
    server_in: SW,
    server_out: SR,
    policy: Arc<Policy>,
    hooks: Arc<H>,
) -> Result<RelayStats, RelayError>
where
    H: RelayHooks,
    CR: AsyncRead + Unpin + Send,
    CW: AsyncWrite + Unpin + Send,
    SW: AsyncWrite + Unpin + Send,
    SR: AsyncRead + Unpin + Send,
{
    relay_with(
        RelayOptions::default(),
        client_in,
        client_out,
        server_in,
        server_out,
        policy,
        hooks,
    )
    .await
}

/// Relay until the server's stdout ends. Client EOF shuts the server's stdin
/// (after everything read was forwarded) and the relay keeps reading the
/// server. Returns when the server's stdout ends (or on a server read or
/// client write error), after ending every call still in flight.
pub async fn relay_with<H, CR, CW, SW, SR>(
    opts: RelayOptions,
    client_in: CR,
    client_out: CW,
    server_in: SW,
    server_out: SR,
    policy: Arc<Policy>,
    hooks: Arc<H>,
) -> Result<RelayStats, RelayError>
where
    H: RelayHooks,
    CR: AsyncRead + Unpin + Send,
    CW: AsyncWrite + Unpin + Send,
    SW: AsyncWrite + Unpin + Send,
    SR: AsyncRead + Unpin + Send,
{
    let (replies_tx, replies_rx) = tokio::sync::mpsc::unbounded_channel();
    let shared = Shared {
        state: Mutex::new(State::default()),
        client_out: tokio::sync::Mutex::new(client_out),
        server_replies: replies_tx,
        policy: &policy,
        hooks: &*hooks,
        opts: &opts,
    };
    let mut c2s = Box::pin(client_to_server(&shared, client_in, server_in, replies_rx));
    let mut s2c = Box::pin(server_to_client(&shared, server_out));
    let mut c2s_done = false;
    let result = loop {
        tokio::select! {
            () = &mut c2s, if !c2s_done => c2s_done = true,
            r = &mut s2c => break r,
        }
    };
    // Stop reading the client before ending calls, so none can begin after
    // the sweep below. A call whose begin hook was still pending is in the
    // tracker already and is swept too.
    drop(c2s);
    drop(s2c);
    let detail = match &result {
        Ok(()) => "server exited",
        Err(RelayError::ServerRead(_)) => "server output unreadable",
        Err(RelayError::ClientWrite(_)) => "client gone",
        Err(RelayError::ServerLineCut(_)) => "server line withheld",
    };
    let ends = shared.lock().tracker.end_all(Outcome::Error, detail);
    let mut stopped = Vec::new();
    for end in &ends {
        if let Some(why) = shared.hooks.call_end(end).await {
            stopped.extend(stopped_reply(
                shared.policy,
                std::slice::from_ref(end),
                &why,
            ));
        }
    }
    // The agent ended the server: its calls get the reason, not silence
    // (only between whole lines: after a withheld line, nothing more).
    if !stopped.is_empty() && result.is_ok() {
        shared.write_client(&stopped).await;
    }
    let flushed = shared.client_out.lock().await.flush().await;
    let mut st = shared.lock();
    st.stats.calls_ended += ends.len() as u64;
    let stats = std::mem::take(&mut st.stats);
    drop(st);
    result?;
    flushed.map_err(RelayError::ClientWrite)?;
    Ok(stats)
}

/// A request whose response the relay reads.
pub(super) enum Pending {
    Hello,
    ToolsList,
    /// tasks/get, tasks/cancel: the result is a Task.
    TaskStatus,
    /// tasks/result for this task id: the result is the call's own result.
    TaskResult(Option<String>),
}

#[derive(Default)]
pub(super) struct State {
    pub tracker: CallTracker,
    pub pending: HashMap<RequestId, Pending>,
    pub stats: RelayStats,
}

struct Shared<'a, H, CW> {
    state: Mutex<State>,
    client_out: tokio::sync::Mutex<CW>,
    /// Lines of the relay's own for the server (answers to server requests
    /// the policy refuses), written by the client->server task between
    /// whole client lines.
    server_replies: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    policy: &'a Policy,
    hooks: &'a H,
    opts: &'a RelayOptions,
}

impl<H: RelayHooks, CW: AsyncWrite + Unpin + Send> Shared<'_, H, CW> {
    /// The state lock is never held across an await.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write one whole line of the relay's own to the client.
    async fn write_client(&self, line: &[u8]) {
        let mut w = self.client_out.lock().await;
        let r = match w.write_all(line).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            log::warn!("relay: could not write an error response to the client: {e}");
        }
    }

    /// End the calls; returns why the agent stopped the server, if it did.
    async fn end_calls(&self, ends: &[CallEnd]) -> Option<String> {
        let mut stopped = None;
        for end in ends {
            if let Some(why) = self.hooks.call_end(end).await {
                stopped = Some(why);
            }
        }
        self.lock().stats.calls_ended += ends.len() as u64;
        stopped
    }
}

async fn client_to_server<H, CW, CR, SW>(
    sh: &Shared<'_, H, CW>,
    mut input: CR,
    mut server: SW,
    mut replies: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
    CR: AsyncRead + Unpin + Send,
    SW: AsyncWrite + Unpin + Send,
{
    let mut framer = Framer::new(sh.opts.parse_limit);
    let mut buf = vec![0u8; sh.opts.read_size.max(1)];
    let mut server_open = true;
    let mut long: Option<LongRequest> = None;
    'read: loop {
        while let Some(frame) = framer.next_frame() {
            if !c2s_frame(sh, frame, &mut long, &mut server).await {
                server_open = false;
                break 'read;
            }
        }
        // The relay's own answers go to the server only between whole
        // client lines (never inside a long one being forwarded).
        let read = tokio::select! {
            r = input.read(&mut buf) => r,
            Some(line) = replies.recv(), if long.is_none() && !framer.in_oversize() => {
                if !forward_server(sh, &mut server, &line).await {
                    server_open = false;
                    break 'read;
                }
                continue;
            }
        };
        match read {
            Ok(0) => break,
            Ok(n) => framer.feed(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("relay: reading the client failed, treating as end of input: {e}");
                break;
            }
        }
    }
    if server_open {
        if let Some(frame) = framer.finish() {
            c2s_frame(sh, frame, &mut long, &mut server).await;
        }
    }
    // Closing the server's stdin tells it the client is gone.
    let _ = server.flush().await;
    if let Err(e) = server.shutdown().await {
        log::debug!("relay: closing the server's stdin: {e}");
    }
    drop(server);
}

/// A client line over the parse limit, being forwarded piece by piece.
#[derive(Default)]
struct LongRequest {
    scan: LineScan,
    /// Held back: the line from its last non-whitespace byte seen so far. With
    /// the closing bracket withheld, what the server has is never a whole
    /// JSON text, so a `tools/call` found at the end can still be stopped.
    carry: Vec<u8>,
    /// The carry outgrew [`MAX_CARRY`] (a run of whitespace) and went out.
    leaked: bool,
}

/// Most whitespace held back behind a long line's last non-whitespace byte.
const MAX_CARRY: usize = 1 << 20;

/// Handle one frame from the client. False when the server can no longer be
/// written to (or must not be: see [`long_request_end`]).
async fn c2s_frame<H, CW, SW>(
    sh: &Shared<'_, H, CW>,
    frame: Frame<'_>,
    long: &mut Option<LongRequest>,
    server: &mut SW,
) -> bool
where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
    SW: AsyncWrite + Unpin + Send,
{
    match frame {
        Frame::Oversize { bytes, last } => {
            let lr = long.get_or_insert_with(LongRequest::default);
            lr.scan.push(bytes);
            if last {
                let lr = std::mem::take(lr);
                *long = None;
                {
                    let mut st = sh.lock();
                    st.stats.lines_c2s += 1;
                    st.stats.unparsed_c2s += 1;
                    st.stats.oversize_c2s += 1;
                }
                return long_request_end(sh, lr, bytes, server).await;
            }
            match bytes.iter().rposition(|b| !b.is_ascii_whitespace()) {
                Some(p) => {
                    let carry = std::mem::replace(&mut lr.carry, bytes[p..].to_vec());
                    forward_server(sh, server, &carry).await
                        && forward_server(sh, server, &bytes[..p]).await
                }
                None => {
                    lr.carry.extend_from_slice(bytes);
                    if lr.carry.len() > MAX_CARRY {
                        lr.leaked = true;
                        let carry = std::mem::take(&mut lr.carry);
                        forward_server(sh, server, &carry).await
                    } else {
                        true
                    }
                }
            }
        }
        Frame::Line(line) => {
            sh.lock().stats.lines_c2s += 1;
            let copy;
            let (classified, lenient) = match classify(line) {
                Classified::NotMcp => {
                    copy = lenient_copy(line);
                    classify_copy(copy.as_deref())
                }
                c => (c, false),
            };
            if lenient {
                sh.lock().stats.lenient_c2s += 1;
            }
            match classified {
                Classified::NotMcp => {
                    sh.lock().stats.unparsed_c2s += 1;
                    forward_server(sh, server, line).await
                }
                Classified::Single(m) => {
                    c2s_messages(sh, line, std::slice::from_ref(&m), false, server).await
                }
                Classified::Batch(ms) => c2s_messages(sh, line, &ms, true, server).await,
            }
        }
    }
}

/// Classify the lenient copy of a line strict parsing rejected; true when
/// that found JSON-RPC.
pub(super) fn classify_copy(copy: Option<&[u8]>) -> (Classified<'_>, bool) {
    match copy.map(classify) {
        Some(c @ (Classified::Single(_) | Classified::Batch(_))) => (c, true),
        _ => (Classified::NotMcp, false),
    }
}

async fn forward_server<H, CW, SW>(sh: &Shared<'_, H, CW>, server: &mut SW, bytes: &[u8]) -> bool
where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
    SW: AsyncWrite + Unpin + Send,
{
    let r = match server.write_all(bytes).await {
        Ok(()) => server.flush().await,
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => {
            sh.lock().stats.bytes_c2s += bytes.len() as u64;
            true
        }
        Err(e) => {
            log::warn!("relay: writing to the server failed, no longer forwarding: {e}");
            false
        }
    }
}

/// The last piece of a client line over the parse limit. A `tools/call` can't
/// be judged without its tool name, so it is refused: its line is never
/// completed, and the server's stdin is closed (returns false) because the
/// server holds a partial line that anything sent after it would extend.
async fn long_request_end<H, CW, SW>(
    sh: &Shared<'_, H, CW>,
    lr: LongRequest,
    last: &[u8],
    server: &mut SW,
) -> bool
where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
    SW: AsyncWrite + Unpin + Send,
{
    if lr.scan.method().as_deref() != Some("tools/call") || lr.leaked {
        return forward_server(sh, server, &lr.carry).await
            && forward_server(sh, server, last).await;
    }
    let reason = format!(
        "a tools/call of {} bytes is over the relay's parse limit of {} bytes; \
         the server's input is closed",
        lr.scan.bytes(),
        sh.opts.parse_limit
    );
    match lr.scan.id() {
        Some(id) => {
            let start = CallStart {
                id: id.clone(),
                tool: String::new(),
                args_hash: String::new(),
                request_bytes: lr.scan.bytes(),
                task: false,
            };
            let msg = Message::Request {
                id_json: id.to_json(),
                id,
                method: "tools/call".to_owned(),
                request: Request::ToolsCall(ToolCall {
                    name: None,
                    args_hash: String::new(),
                    task: false,
                }),
            };
            refuse(
                sh,
                std::slice::from_ref(&msg),
                std::slice::from_ref(&start),
                &reason,
                false,
            )
            .await;
        }
        None => {
            sh.lock().stats.refused += 1;
            log::warn!("relay: {reason}");
        }
    }
    false
}

/// Why the policy (or the relay's own rules) refuse this call, if it does.
pub(super) fn refusal(
    policy: &Policy,
    tracker: &CallTracker,
    call: &CallStart,
    named: bool,
) -> Option<String> {
    if !named {
        return Some("tools/call without a tool name".to_owned());
    }
    // Audit mode refuses nothing: the session reports the call as a
    // would-be refusal (`decision = audit`) and it goes through.
    if !policy.tool_allowed(&call.tool) && policy.mode != crate::policy::Mode::Audit {
        return Some(format!("tool {:?} is not allowed by policy", call.tool));
    }
    if tracker.contains(&call.id) {
        return Some(format!("request id {} is already in flight", call.id));
    }
    None
}

/// What a client message (or batch) asks of the relay: the `tools/call`s it
/// carries, and why it must be refused, if it must. Shared by the stdio and
/// HTTP relays so both judge a message the same way.
pub(super) struct CallPlan {
    pub calls: Vec<CallStart>,
    /// The first reason to refuse the message, if any.
    pub why: Option<String>,
    /// A `tools/call` without a usable id: never forwarded.
    pub unusable_call: bool,
}

/// Judge the `tools/call`s of `msgs` (one line or HTTP body of `bytes`
/// bytes) against the policy and the calls in flight.
pub(super) fn plan_calls(
    policy: &Policy,
    tracker: &CallTracker,
    msgs: &[Message<'_>],
    bytes: u64,
) -> CallPlan {
    let mut calls = Vec::new();
    let mut why: Option<String> = None;
    let mut unusable_call = false;
    for m in msgs {
        match m {
            Message::Request {
                id,
                request: Request::ToolsCall(c),
                ..
            } => {
                let start = CallStart {
                    id: id.clone(),
                    tool: c.name.clone().unwrap_or_default(),
                    args_hash: c.args_hash.clone(),
                    request_bytes: bytes,
                    task: c.task,
                };
                if why.is_none() {
                    why = refusal(policy, tracker, &start, c.name.is_some());
                }
                if why.is_none() && calls.iter().any(|s: &CallStart| s.id == start.id) {
                    why = Some(format!(
                        "request id {} is used twice in the batch",
                        start.id
                    ));
                }
                calls.push(start);
            }
            // A tools/call that can't be answered (no usable id) could
            // still be run by a lenient server: never forward it.
            Message::Malformed { method } | Message::Notification { method, .. }
                if method == "tools/call" =>
            {
                unusable_call = true;
            }
            _ => {}
        }
    }
    CallPlan {
        calls,
        why,
        unusable_call,
    }
}

async fn c2s_messages<H, CW, SW>(
    sh: &Shared<'_, H, CW>,
    line: &[u8],
    msgs: &[Message<'_>],
    batch: bool,
    server: &mut SW,
) -> bool
where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
    SW: AsyncWrite + Unpin + Send,
{
    let CallPlan {
        calls,
        why,
        unusable_call,
    } = plan_calls(sh.policy, &sh.lock().tracker, msgs, line.len() as u64);

    if unusable_call {
        if batch {
            let reason = "tools/call without a usable request id".to_owned();
            refuse(sh, msgs, &calls, &why.unwrap_or(reason), batch).await;
        } else {
            sh.lock().stats.refused += 1;
            log::warn!("relay: dropped a tools/call without a usable request id");
        }
        return true;
    }
    if let Some(reason) = why {
        refuse(sh, msgs, &calls, &reason, batch).await;
        return true;
    }

    // Begin every call, in order; the first failure refuses the line.
    let mut begun: Vec<&CallStart> = Vec::new();
    let mut failed: Option<String> = None;
    for start in &calls {
        if !sh.lock().tracker.begin(start.clone()) {
            failed = Some(format!("request id {} is already in flight", start.id));
            break;
        }
        match sh.hooks.call_begin(start).await {
            Ok(()) => {
                sh.lock().stats.calls_begun += 1;
                begun.push(start);
            }
            Err(e) => {
                sh.lock().tracker.abort(&start.id);
                failed = Some(format!(
                    "rights for tool {:?} could not be put in force ({e})",
                    start.tool
                ));
                break;
            }
        }
    }
    if let Some(reason) = failed {
        let ends: Vec<CallEnd> = {
            let mut st = sh.lock();
            begun
                .iter()
                .filter_map(|s| {
                    st.tracker
                        .end(&s.id, Outcome::Refused, 0, Some("batch refused"))
                })
                .collect()
        };
        sh.end_calls(&ends).await;
        refuse(sh, msgs, &calls, &reason, batch).await;
        return true;
    }

    // Cancellations end calls before the notification goes on; requests
    // whose answers we read are noted before they can be answered.
    let (ends, session) = c2s_note(&mut sh.lock(), msgs);
    sh.end_calls(&ends).await;
    if let Some(s) = session {
        sh.hooks.session_info(&s);
    }
    forward_server(sh, server, line).await
}

/// Note what a forwarded client message means for the relay's state:
/// cancellations end their calls (returned, for the hooks), and requests
/// whose answers the relay reads are remembered before they can be answered.
pub(super) fn c2s_note(
    st: &mut State,
    msgs: &[Message<'_>],
) -> (Vec<CallEnd>, Option<SessionInfo>) {
    let mut ends = Vec::new();
    let mut session = None;
    for m in msgs {
        match m {
            Message::Notification {
                notification:
                    Notification::Cancelled {
                        request_id: Some(id),
                    },
                ..
            } => {
                ends.extend(
                    st.tracker
                        .end(id, Outcome::Cancelled, 0, Some("cancelled by client")),
                );
            }
            Message::Request { id, request, .. } => {
                let pending = match request {
                    Request::Initialize(h) | Request::Discover(h) => {
                        let s = &mut st.stats.session;
                        s.handshake = Some(if matches!(request, Request::Initialize(_)) {
                            Handshake::Initialize
                        } else {
                            Handshake::Discover
                        });
                        s.protocol_version = h.protocol_version.clone();
                        s.client_name = h.client_name.clone();
                        s.client_version = h.client_version.clone();
                        session = Some(s.clone());
                        Some(Pending::Hello)
                    }
                    Request::ToolsList => Some(Pending::ToolsList),
                    Request::TasksGet { .. } | Request::TasksCancel { .. } => {
                        Some(Pending::TaskStatus)
                    }
                    Request::TasksResult { task_id } => Some(Pending::TaskResult(task_id.clone())),
                    Request::ToolsCall(_) | Request::Other => None,
                };
                if let Some(p) = pending {
                    if st.pending.len() < MAX_PENDING {
                        st.pending.insert(id.clone(), p);
                    }
                }
            }
            _ => {}
        }
    }
    (ends, session)
}

/// Answer every request in `msgs` with a refusal, in one line (a batch reply
/// for a batch), and report the refused calls.
async fn refuse<H, CW>(
    sh: &Shared<'_, H, CW>,
    msgs: &[Message<'_>],
    calls: &[CallStart],
    reason: &str,
    batch: bool,
) where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
{
    let (reason, body) = refusal_reply(sh.policy, msgs, reason, batch);
    for call in calls {
        sh.hooks.call_refused(call, &reason);
    }
    sh.lock().stats.refused += calls.len().max(1) as u64;
    log::info!(
        "relay: refused request(s) for server {:?}: {reason}",
        sh.policy.server
    );
    let Some(body) = body else { return };
    let mut line = body.to_string().into_bytes();
    line.push(b'\n');
    sh.write_client(&line).await;
}

/// The relay's own answer to a refused message: one error response per
/// request in `msgs` (a batch reply for a batch), and the reason as
/// reported. `None` when `msgs` holds no request to answer.
pub(super) fn refusal_reply(
    policy: &Policy,
    msgs: &[Message<'_>],
    reason: &str,
    batch: bool,
) -> (String, Option<Value>) {
    let reason = if batch {
        format!("batch refused: {reason}")
    } else {
        reason.to_owned()
    };
    let mut errors = Vec::new();
    for m in msgs {
        if let Message::Request {
            id_json,
            request,
            method,
            ..
        } = m
        {
            let tool = match request {
                Request::ToolsCall(c) => c.name.as_deref(),
                _ => None,
            };
            errors.push(error_response(policy, id_json, method, tool, &reason));
        }
    }
    let body = match (batch, errors.len()) {
        (_, 0) => None,
        (true, _) => Some(Value::Array(errors)),
        (false, _) => Some(errors.swap_remove(0)),
    };
    (reason, body)
}

/// What `[mcp]` says of a server-initiated request, if it governs it.
fn governance(policy: &Policy, method: &str) -> Option<Governance> {
    match method {
        "sampling/createMessage" => Some(policy.mcp.sampling),
        "elicitation/create" => Some(policy.mcp.elicitation),
        _ => None,
    }
}

/// The relay's answer to the server for a line holding a server-initiated
/// request `[mcp]` denies: an error for every request in it (a batch is
/// refused whole). Shared by the stdio and HTTP relays.
pub(super) fn governance_reply(policy: &Policy, request_ids: &[(Value, String)]) -> Value {
    let errors: Vec<Value> = request_ids
        .iter()
        .map(|(id, method)| {
            let reason = match governance(policy, method) {
                Some(Governance::Deny) => {
                    format!("server-initiated {method} is denied by the policy's [mcp] section")
                }
                _ => "it came in a batch with a refused request".to_string(),
            };
            error_response(policy, id, method, None, &reason)
        })
        .collect();
    if errors.len() == 1 {
        errors.into_iter().next().unwrap_or(Value::Null)
    } else {
        Value::Array(errors)
    }
}

/// The relay's answer, in place of the server's, to calls that ended while
/// the agent stopped the server: one error response line per call.
pub(super) fn stopped_reply(policy: &Policy, ends: &[CallEnd], why: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for e in ends {
        let reason = format!("the server was stopped: {why}");
        let v = error_response(
            policy,
            &e.id.to_json(),
            "tools/call",
            Some(&e.tool),
            &reason,
        );
        out.extend_from_slice(v.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn error_response(
    policy: &Policy,
    id: &Value,
    method: &str,
    tool: Option<&str>,
    reason: &str,
) -> Value {
    let what = match tool {
        Some(t) => format!("tool {t:?}"),
        None => method.to_owned(),
    };
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": REFUSED_CODE,
            "message": format!(
                "mcp-warden refused {what}: {reason} (server {:?}, policy {})",
                policy.server, policy.source
            ),
            "data": {
                "tool": tool,
                "server": policy.server,
                "policySource": policy.source,
                "reason": reason,
            },
        },
    })
}

async fn server_to_client<H, CW, SR>(
    sh: &Shared<'_, H, CW>,
    mut input: SR,
) -> Result<(), RelayError>
where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
    SR: AsyncRead + Unpin + Send,
{
    let mut framer = Framer::new(sh.opts.parse_limit);
    let mut buf = vec![0u8; sh.opts.read_size.max(1)];
    let mut long: Option<LongLine<'_, CW>> = None;
    loop {
        while let Some(frame) = framer.next_frame() {
            s2c_frame(sh, frame, &mut long).await?;
        }
        s2c_partial(sh, framer.partial(), &mut long).await?;
        match input.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => framer.feed(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RelayError::ServerRead(e)),
        }
    }
    if let Some(frame) = framer.finish() {
        s2c_frame(sh, frame, &mut long).await?;
    }
    Ok(())
}

/// A server line past [`STREAM_AFTER`] bytes is forwarded as it arrives once
/// what was read of it is a response's (a top-level `result` or `error`
/// member and no `method`), so a large tool result flows to the client
/// while the server is still writing it instead of being stored whole first.
/// Everything from the line's last non-whitespace byte on is held back (the
/// client never has a complete JSON text) until the whole line was read and
/// the call it ends, if any, has ended.
pub const STREAM_AFTER: usize = 64 * 1024;

/// A server line being forwarded piece by piece: streamed (see
/// [`STREAM_AFTER`]) and/or over the parse limit. Once anything of it went
/// out, the client writer stays locked until its last piece, so the relay's
/// own lines never land inside it.
struct LongLine<'s, CW> {
    writer: Option<tokio::sync::MutexGuard<'s, CW>>,
    /// Reads the line for its id as it streams (used past the parse limit).
    scan: LineScan,
    /// Line offset of the next oversize piece's first byte.
    pos: usize,
    /// Bytes of the line fed to `scan`.
    scanned: usize,
    /// Bytes of the line written to the client.
    sent: usize,
}

impl<'s, CW> LongLine<'s, CW> {
    fn new() -> Self {
        LongLine {
            writer: None,
            scan: LineScan::new(),
            pos: 0,
            scanned: 0,
            sent: 0,
        }
    }
}

/// The start of a server line still being read: forward what can go.
async fn s2c_partial<'s, H, CW>(
    sh: &'s Shared<'_, H, CW>,
    partial: &[u8],
    long: &mut Option<LongLine<'s, CW>>,
) -> Result<(), RelayError>
where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
{
    if partial.is_empty() || (long.is_none() && partial.len() <= STREAM_AFTER) {
        return Ok(());
    }
    let l = long.get_or_insert_with(LongLine::new);
    if partial.len() > l.scanned {
        l.scan.push(&partial[l.scanned..]);
        l.scanned = partial.len();
    }
    if !l.scan.response_so_far() {
        return Ok(());
    }
    let upto = partial
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap_or(0);
    if upto <= l.sent {
        return Ok(());
    }
    let w = match &mut l.writer {
        Some(w) => w,
        None => l.writer.insert(sh.client_out.lock().await),
    };
    w.write_all(&partial[l.sent..upto])
        .await
        .map_err(RelayError::ClientWrite)?;
    sh.lock().stats.bytes_s2c += (upto - l.sent) as u64;
    l.sent = upto;
    Ok(())
}

async fn s2c_frame<'s, H, CW>(
    sh: &'s Shared<'_, H, CW>,
    frame: Frame<'_>,
    long: &mut Option<LongLine<'s, CW>>,
) -> Result<(), RelayError>
where
    H: RelayHooks,
    CW: AsyncWrite + Unpin + Send,
{
    match frame {
        Frame::Oversize { bytes, last } => {
            let l = long.get_or_insert_with(LongLine::new);
            // This piece is line bytes [start, end); earlier bytes may have
            // been scanned and sent while the line was streamed.
            let start = l.pos;
            let end = start + bytes.len();
            l.pos = end;
            let scan_from = l.scanned.saturating_sub(start).min(bytes.len());
            l.scan.push(&bytes[scan_from..]);
            l.scanned = l.scanned.max(end);
            if last {
                // The client can't act on a line before its end arrives, so
                // ending the call before writing the last piece still
                // withdraws rights before the client sees the result.
                if let Some((id, is_error)) = l.scan.response() {
                    let outcome = if is_error {
                        Outcome::Error
                    } else {
                        Outcome::Ok
                    };
                    let end = sh.lock().tracker.end(&id, outcome, l.scan.bytes(), None);
                    if let Some(end) = end {
                        if let Some(why) = sh.end_calls(std::slice::from_ref(&end)).await {
                            // Its start is with the client already: stop
                            // relaying rather than finish it (fail closed).
                            return Err(RelayError::ServerLineCut(format!(
                                "the agent stopped the server ({why}); the rest of its \
                                 response was withheld"
                            )));
                        }
                    }
                }
            }
            let send_from = l.sent.saturating_sub(start).min(bytes.len());
            let w = match &mut l.writer {
                Some(w) => w,
                None => l.writer.insert(sh.client_out.lock().await),
            };
            w.write_all(&bytes[send_from..])
                .await
                .map_err(RelayError::ClientWrite)?;
            l.sent = l.sent.max(end);
            if last {
                w.flush().await.map_err(RelayError::ClientWrite)?;
                *long = None;
            }
            let mut st = sh.lock();
            st.stats.bytes_s2c += (bytes.len() - send_from) as u64;
            if last {
                st.stats.lines_s2c += 1;
                st.stats.unparsed_s2c += 1;
                st.stats.oversize_s2c += 1;
            }
            Ok(())
        }
        Frame::Line(line) => {
            let effects = {
                let mut st = sh.lock();
                st.stats.lines_s2c += 1;
                let copy;
                let (classified, lenient) = match classify(line) {
                    Classified::NotMcp => {
                        copy = lenient_copy(line);
                        classify_copy(copy.as_deref())
                    }
                    c => (c, false),
                };
                if lenient {
                    st.stats.lenient_s2c += 1;
                }
                match classified {
                    Classified::NotMcp => {
                        st.stats.unparsed_s2c += 1;
                        S2cEffects::default()
                    }
                    Classified::Single(m) => {
                        s2c_messages(&mut st, sh.policy, std::slice::from_ref(&m), line.len())
                    }
                    Classified::Batch(ms) => s2c_messages(&mut st, sh.policy, &ms, line.len()),
                }
            };
            // Rights are withdrawn before the client can see the result.
            let stopped = sh.end_calls(&effects.ends).await;
            if let Some(s) = &effects.session {
                sh.hooks.session_info(s);
            }
            if let Some(t) = &effects.tools {
                sh.hooks.tools_listed(t);
            }
            for (_, method, g) in &effects.governed {
                sh.hooks.server_request(method, *g);
            }
            let streamed = long.take();
            let sent = streamed.as_ref().map_or(0, |l| l.sent);
            if let Some(why) = stopped {
                // The agent ended the server during these calls (a
                // violation judged after the kernel let it run): what the
                // server answered is withheld, the client gets the reason.
                if sent > 0 {
                    return Err(RelayError::ServerLineCut(format!(
                        "the agent stopped the server ({why}); the rest of its response was \
                         withheld"
                    )));
                }
                drop(streamed);
                sh.write_client(&stopped_reply(sh.policy, &effects.ends, &why))
                    .await;
                let mut st = sh.lock();
                st.stats.refused += 1;
                return Ok(());
            }
            if effects
                .governed
                .iter()
                .any(|(_, _, g)| *g == Governance::Deny)
            {
                if sent > 0 {
                    // A streamed line that turned out to be a refused
                    // request (a `method` after its `result`): the client
                    // holds its start but not its end, and anything written
                    // after would extend it. Stop relaying (fail closed).
                    return Err(RelayError::ServerLineCut(
                        "a server line read as a response while it streamed ended as a \
                         request the policy refuses; the rest of it was withheld"
                            .into(),
                    ));
                }
                // Refused: the client never sees it; the server gets an
                // error for every request in the line (a batch is refused
                // whole: the relay never rewrites bytes it forwards).
                let body = governance_reply(sh.policy, &effects.request_ids);
                let mut reply = body.to_string().into_bytes();
                reply.push(b'\n');
                let _ = sh.server_replies.send(reply);
                let mut st = sh.lock();
                st.stats.refused += 1;
                st.stats.bytes_s2c += line.len() as u64;
                return Ok(());
            }
            let mut w = match streamed.and_then(|l| l.writer) {
                Some(w) => w,
                None => sh.client_out.lock().await,
            };
            let rest = line.get(sent..).unwrap_or_default();
            w.write_all(rest).await.map_err(RelayError::ClientWrite)?;
            w.flush().await.map_err(RelayError::ClientWrite)?;
            drop(w);
            sh.lock().stats.bytes_s2c += rest.len() as u64;
            Ok(())
        }
    }
}

#[derive(Default)]
pub(super) struct S2cEffects {
    /// Server-initiated requests under `[mcp]` governance: (id as written,
    /// method, what the policy says).
    pub governed: Vec<(Value, String, Governance)>,
    /// Ids of every request in the line (to refuse a whole batch).
    pub request_ids: Vec<(Value, String)>,
    pub ends: Vec<CallEnd>,
    pub session: Option<SessionInfo>,
    pub tools: Option<BTreeMap<String, ToolAnnotations>>,
}

/// Read the server's messages against what is in flight. Sync: runs under
/// the state lock.
pub(super) fn s2c_messages(
    st: &mut State,
    policy: &Policy,
    msgs: &[Message<'_>],
    bytes: usize,
) -> S2cEffects {
    let bytes = bytes as u64;
    let mut fx = S2cEffects::default();
    for m in msgs {
        match m {
            Message::Request {
                id_json, method, ..
            } => {
                fx.request_ids.push((id_json.clone(), method.clone()));
                if let Some(g) = governance(policy, method) {
                    fx.governed.push((id_json.clone(), method.clone(), g));
                }
            }
            Message::Response { id: Some(id), body } => {
                if let Some(start) = st.tracker.get(id) {
                    let asked_for_task = start.task;
                    let outcome = match body {
                        ResponseBody::Error { .. } => Some(Outcome::Error),
                        ResponseBody::Result(r) => match call_result(r) {
                            CallResult::Done { is_error: true } => Some(Outcome::Error),
                            CallResult::Done { is_error: false } => Some(Outcome::Ok),
                            // A task handle keeps the call (and its rights)
                            // alive, so it counts only when the client asked
                            // for a task: a server can't extend its own rights.
                            CallResult::Task(t) if asked_for_task => {
                                st.tracker.attach_task(id, &t.task_id);
                                Outcome::of_task(&t.status)
                            }
                            CallResult::Task(_) => Some(Outcome::Ok),
                        },
                    };
                    if let Some(o) = outcome {
                        fx.ends.extend(st.tracker.end(id, o, bytes, None));
                    }
                    continue;
                }
                let Some(pending) = st.pending.remove(id) else {
                    continue;
                };
                let ResponseBody::Result(r) = body else {
                    if let Pending::TaskResult(Some(task)) = pending {
                        fx.ends
                            .extend(st.tracker.end_task(&task, Outcome::Error, bytes, None));
                    }
                    continue;
                };
                match pending {
                    Pending::Hello => {
                        let h = server_hello(r);
                        let s = &mut st.stats.session;
                        s.negotiated_version = h.protocol_version;
                        s.server_name = h.server_name;
                        s.server_version = h.server_version;
                        fx.session = Some(s.clone());
                    }
                    Pending::ToolsList => {
                        st.stats.tool_annotations.extend(tool_annotations(r));
                        fx.tools = Some(st.stats.tool_annotations.clone());
                    }
                    Pending::TaskStatus => {
                        if let Some(t) = task_result(r) {
                            if let Some(o) = Outcome::of_task(&t.status) {
                                fx.ends
                                    .extend(st.tracker.end_task(&t.task_id, o, bytes, None));
                            }
                        }
                    }
                    Pending::TaskResult(Some(task)) => {
                        let o = match call_result(r) {
                            CallResult::Done { is_error: true } => Some(Outcome::Error),
                            CallResult::Done { is_error: false } => Some(Outcome::Ok),
                            CallResult::Task(t) => Outcome::of_task(&t.status),
                        };
                        if let Some(o) = o {
                            fx.ends.extend(st.tracker.end_task(&task, o, bytes, None));
                        }
                    }
                    Pending::TaskResult(None) => {}
                }
            }
            Message::Notification {
                notification: Notification::TaskStatus(t),
                ..
            } => {
                if let Some(o) = Outcome::of_task(&t.status) {
                    fx.ends
                        .extend(st.tracker.end_task(&t.task_id, o, bytes, None));
                }
            }
            _ => {}
        }
    }
    fx
}
