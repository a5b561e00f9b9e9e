//! One client connection: each request judged, forwarded, and its response
//! read on its way back (see the module docs of [`super`]).
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::{up_full, up_stream, BoxError, FrameTx, RelayBody, UpBody};
use super::message::Message;
use super::sse::SseReader;
use super::{origin_allowed, Inner, Owner, Upstream};
use crate::policy::model::Governance;
use crate::relay::calls::{CallEnd, Outcome};
use crate::relay::jsonrpc::{
    classify, lenient_copy, Classified, Message as Rpc, Request as RpcRequest, RequestId,
};
use crate::relay::stdio::{
    c2s_note, classify_copy, governance_reply, plan_calls, refusal_reply, s2c_messages,
    stopped_reply, S2cEffects, STREAM_AFTER,
};
use crate::relay::RelayHooks;

/// JSON-RPC code of a request whose `Mcp-*` headers disagree with its body
/// (2026-07-28 transport, "header mismatch").
pub const HEADER_MISMATCH: i64 = -32020;

const SESSION_HEADER: &str = "mcp-session-id";
const METHOD_HEADER: &str = "mcp-method";
const NAME_HEADER: &str = "mcp-name";
const VERSION_HEADER: &str = "mcp-protocol-version";

/// Protocol versions that use the `initialize` handshake (no `Mcp-*`
/// routing headers).
const HANDSHAKE_VERSIONS: [&str; 4] = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

pub(super) async fn serve_conn<H, T>(inner: Arc<Inner<H>>, io: T)
where
    H: RelayHooks,
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let inner = inner.clone();
        async move { Ok::<_, Infallible>(handle(inner, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .await
    {
        log::debug!("http relay: client connection: {e}");
    }
}

async fn handle<H: RelayHooks>(
    inner: Arc<Inner<H>>,
    req: Request<Incoming>,
) -> Response<RelayBody> {
    inner.count(|s| s.requests += 1);
    if let Some(origin) = req.headers().get(ORIGIN) {
        if !origin_allowed(origin.as_bytes()) {
            inner.count(|s| s.refused_origin += 1);
            log::warn!(
                "http relay: refused a request from origin {:?} (not a localhost origin)",
                String::from_utf8_lossy(origin.as_bytes())
            );
            return plain(
                StatusCode::FORBIDDEN,
                "mcp-warden: cross-origin request refused\n",
            );
        }
    }
    match *req.method() {
        Method::POST => post(inner, req).await,
        Method::DELETE => delete(inner, req).await,
        _ => other(inner, req).await,
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<RelayBody> {
    let mut r = Response::new(RelayBody::full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, body: &Value) -> Response<RelayBody> {
    let mut r = Response::new(RelayBody::full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn header_str<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The session key of the 2024-11-05 transport, from a message endpoint URI
/// (`/messages?session_id=...` or `sessionId=...`).
fn legacy_key(uri: &str) -> Option<String> {
    let query = uri.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "session_id" || k == "sessionId").then(|| v.to_owned())
    })
}

async fn post<H: RelayHooks>(inner: Arc<Inner<H>>, req: Request<Incoming>) -> Response<RelayBody> {
    let (parts, body) = req.into_parts();
    let bytes = match Limited::new(body, inner.opts.parse_limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                inner.count(|s| s.too_large += 1);
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "mcp-warden: request body over the relay's parse limit\n",
                );
            }
            log::debug!("http relay: reading a request body: {e}");
            return plain(
                StatusCode::BAD_REQUEST,
                "mcp-warden: unreadable request body\n",
            );
        }
    };
    let mut copy: Option<Vec<u8>> = None;
    let classified = match classify(&bytes) {
        Classified::NotMcp => {
            copy = lenient_copy(&bytes);
            let (c, lenient) = classify_copy(copy.as_deref());
            if lenient {
                inner.lock().core.stats.lenient_c2s += 1;
            }
            c
        }
        c => c,
    };
    let (msgs, batch) = match classified {
        Classified::Single(m) => (vec![m], false),
        Classified::Batch(ms) => (ms, true),
        Classified::NotMcp => {
            inner.lock().core.stats.unparsed_c2s += 1;
            (Vec::new(), false)
        }
    };
    {
        let mut st = inner.lock();
        st.core.stats.lines_c2s += 1;
    }
    let read_from = copy_or(&copy, &bytes);
    if let Err(why) = check_headers(&parts.headers, &msgs, batch, read_from) {
        inner.count(|s| s.refused_headers += 1);
        log::warn!("http relay: refused a request: {why}");
        let id = match msgs.first() {
            Some(Rpc::Request { id_json, .. }) if !batch => id_json.clone(),
            _ => Value::Null,
        };
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({
                "jsonrpc": "2.0",
                "id": id,
                "error": {"code": HEADER_MISMATCH, "message": format!("mcp-warden refused the request: {why}")},
            }),
        );
    }

    let plan = plan_calls(
        &inner.policy,
        &inner.lock().core.tracker,
        &msgs,
        bytes.len() as u64,
    );
    let key = legacy_key(&parts.uri.to_string());
    if plan.unusable_call {
        let reason = "tools/call without a usable request id";
        let why = plan.why.as_deref().unwrap_or(reason);
        return refuse(&inner, &msgs, &plan.calls, why, batch, key.as_deref());
    }
    if let Some(why) = plan.why {
        return refuse(&inner, &msgs, &plan.calls, &why, batch, key.as_deref());
    }

    let session = header_str(&parts.headers, SESSION_HEADER).map(str::to_owned);
    let mut guard = CallGuard::new(inner.clone());
    // Begin every call, in order; the first failure refuses the body.
    let mut failed = None;
    for start in &plan.calls {
        let fresh = {
            let mut st = inner.lock();
            let fresh = st.core.tracker.begin(start.clone());
            if fresh {
                st.owners.insert(
                    start.id.clone(),
                    Owner {
                        guard: guard.serial,
                        session: session.clone(),
                    },
                );
            }
            fresh
        };
        if !fresh {
            failed = Some(format!("request id {} is already in flight", start.id));
            break;
        }
        guard.ids.push(start.id.clone());
        match inner.hooks.call_begin(start).await {
            Ok(()) => inner.lock().core.stats.calls_begun += 1,
            Err(e) => {
                {
                    let mut st = inner.lock();
                    st.core.tracker.abort(&start.id);
                    st.owners.remove(&start.id);
                }
                guard.ids.pop();
                failed = Some(format!(
                    "rights for tool {:?} could not be put in force ({e})",
                    start.tool
                ));
                break;
            }
        }
    }
    if let Some(reason) = failed {
        guard.finish(Outcome::Refused, "batch refused").await;
        return refuse(&inner, &msgs, &plan.calls, &reason, batch, key.as_deref());
    }

    // Cancellations end calls before the notification goes on; requests
    // whose answers we read are noted (and owned by this response).
    let (ends, hello) = c2s_note(&mut inner.lock().core, &msgs);
    inner.end_calls(&ends).await;
    if let Some(h) = hello {
        inner.hooks.session_info(&h);
    }
    {
        let mut st = inner.lock();
        for m in &msgs {
            if let Rpc::Request { id, .. } = m {
                if !st.owners.contains_key(id) && st.core.pending.contains_key(id) {
                    st.owners.insert(
                        id.clone(),
                        Owner {
                            guard: guard.serial,
                            session: session.clone(),
                        },
                    );
                    guard.ids.push(id.clone());
                }
            }
        }
        st.core.stats.bytes_c2s += bytes.len() as u64;
    }

    let reply_to = ReplyTo::of(&parts);
    let up = Request::from_parts(parts, up_full(bytes));
    let resp = match send(&inner, up).await {
        Ok(r) => r,
        Err(e) => {
            inner.count(|s| s.upstream_errors += 1);
            log::warn!("http relay: upstream {}: {e}", inner.upstream);
            guard
                .finish(Outcome::Error, "the server's HTTP endpoint failed")
                .await;
            return plain(
                StatusCode::BAD_GATEWAY,
                "mcp-warden: the server's HTTP endpoint failed\n",
            );
        }
    };
    if resp.status() == StatusCode::ACCEPTED {
        if let Some(key) = key {
            guard.detach(&key);
        }
    }
    respond(inner, resp, guard, reply_to)
}

fn copy_or<'a>(copy: &'a Option<Vec<u8>>, bytes: &'a [u8]) -> &'a [u8] {
    copy.as_deref().unwrap_or(bytes)
}

/// Answer a refused body ourselves (HTTP 200 with the JSON-RPC error, as a
/// server would answer a failed call), never forwarding it. On the
/// 2024-11-05 transport (`legacy`: the session key of the POST) answers go
/// on the session's SSE stream, as an event of the relay's own between the
/// server's events, and the POST gets 202.
fn refuse<H: RelayHooks>(
    inner: &Inner<H>,
    msgs: &[Rpc<'_>],
    calls: &[crate::relay::CallStart],
    reason: &str,
    batch: bool,
    legacy: Option<&str>,
) -> Response<RelayBody> {
    let (reason, body) = refusal_reply(&inner.policy, msgs, reason, batch);
    for call in calls {
        inner.hooks.call_refused(call, &reason);
    }
    inner.lock().core.stats.refused += calls.len().max(1) as u64;
    log::info!(
        "http relay: refused request(s) for server {:?}: {reason}",
        inner.policy.server
    );
    let stream = legacy.and_then(|k| inner.lock().legacy_streams.get(k).cloned());
    match (body, stream) {
        (Some(b), Some(tx)) => {
            let event = format!("event: message\r\ndata: {b}\r\n\r\n");
            if tx.try_send(Bytes::from(event)).is_err() {
                log::warn!(
                    "http relay: the session's SSE stream is gone or full; refusal not delivered"
                );
            }
            let mut r = Response::new(RelayBody::empty());
            *r.status_mut() = StatusCode::ACCEPTED;
            r
        }
        (Some(b), None) => json_response(StatusCode::OK, &b),
        (None, _) => plain(StatusCode::BAD_REQUEST, "mcp-warden: refused\n"),
    }
}

/// 2026-07-28: `Mcp-Method` (and `Mcp-Name` for the name-bearing methods)
/// must say what the body says, or a proxy routing on headers and the server
/// reading the body would see two different requests. Checked when the
/// request carries either header or a protocol version without the
/// handshake.
fn check_headers(h: &HeaderMap, msgs: &[Rpc<'_>], batch: bool, body: &[u8]) -> Result<(), String> {
    let method_h = h.get(METHOD_HEADER);
    let name_h = h.get(NAME_HEADER);
    let modern_version =
        header_str(h, VERSION_HEADER).is_some_and(|v| !HANDSHAKE_VERSIONS.contains(&v));
    if method_h.is_none() && name_h.is_none() && !modern_version {
        return Ok(());
    }
    if batch {
        return Err("a batch body with Mcp-* routing headers".to_owned());
    }
    let method = match msgs.first() {
        Some(Rpc::Request { method, .. } | Rpc::Notification { method, .. }) => {
            Some(method.as_str())
        }
        _ => None,
    };
    let Some(method) = method else {
        return match (method_h, name_h) {
            (None, None) => Ok(()),
            _ => Err("Mcp-Method/Mcp-Name on a body that is not a request".to_owned()),
        };
    };
    let header = method_h.and_then(|v| v.to_str().ok());
    if header != Some(method) {
        return Err(format!(
            "Mcp-Method {:?} does not match the body's method {method:?}",
            header.unwrap_or("")
        ));
    }
    let key = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return Ok(()),
    };
    let in_body = match msgs.first() {
        Some(Rpc::Request {
            request: RpcRequest::ToolsCall(c),
            ..
        }) => c.name.clone(),
        _ => serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("params")?.get(key)?.as_str().map(str::to_owned)),
    };
    let in_header = name_h.and_then(|v| decode_header_value(v.as_bytes()));
    if in_body.is_some() && in_header != in_body || in_body.is_none() && name_h.is_some() {
        return Err(format!("Mcp-Name does not match the body's params.{key}"));
    }
    Ok(())
}

/// [`check_headers`] on a raw body, for tests.
#[cfg(test)]
pub(super) fn check_headers_for_test(h: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let (msgs, batch) = match classify(body) {
        Classified::Single(m) => (vec![m], false),
        Classified::Batch(ms) => (ms, true),
        Classified::NotMcp => (Vec::new(), false),
    };
    check_headers(h, &msgs, batch, body)
}

/// An `Mcp-Name` value: verbatim, or `=?base64?...?=` around UTF-8 (how the
/// 2026-07-28 transport carries values a header can't). `None` when
/// malformed, so it never matches.
fn decode_header_value(v: &[u8]) -> Option<String> {
    use base64::Engine as _;
    let s = std::str::from_utf8(v).ok()?;
    match s
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => {
            let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            String::from_utf8(raw).ok()
        }
        None => Some(s.to_owned()),
    }
}

async fn delete<H: RelayHooks>(
    inner: Arc<Inner<H>>,
    req: Request<Incoming>,
) -> Response<RelayBody> {
    let session = header_str(req.headers(), SESSION_HEADER).map(str::to_owned);
    let (parts, body) = req.into_parts();
    let reply_to = ReplyTo::of(&parts);
    let resp = match send(&inner, Request::from_parts(parts, up_stream(body))).await {
        Ok(r) => r,
        Err(e) => {
            inner.count(|s| s.upstream_errors += 1);
            log::warn!("http relay: upstream {}: {e}", inner.upstream);
            return plain(
                StatusCode::BAD_GATEWAY,
                "mcp-warden: the server's HTTP endpoint failed\n",
            );
        }
    };
    if let (Some(sid), true) = (session, resp.status().is_success()) {
        // The session is over: its calls can't be answered any more.
        let ends = {
            let mut st = inner.lock();
            let ids: Vec<RequestId> = st
                .owners
                .iter()
                .filter(|(_, o)| o.session.as_deref() == Some(sid.as_str()))
                .map(|(id, _)| id.clone())
                .collect();
            let mut ends = Vec::new();
            for id in ids {
                st.owners.remove(&id);
                st.core.pending.remove(&id);
                ends.extend(st.core.tracker.end(
                    &id,
                    Outcome::Cancelled,
                    0,
                    Some("session deleted"),
                ));
            }
            ends
        };
        inner.end_calls(&ends).await;
    }
    respond(inner.clone(), resp, CallGuard::new(inner), reply_to)
}

async fn other<H: RelayHooks>(inner: Arc<Inner<H>>, req: Request<Incoming>) -> Response<RelayBody> {
    let (parts, body) = req.into_parts();
    let reply_to = ReplyTo::of(&parts);
    match send(&inner, Request::from_parts(parts, up_stream(body))).await {
        Ok(r) => respond(inner.clone(), r, CallGuard::new(inner), reply_to),
        Err(e) => {
            inner.count(|s| s.upstream_errors += 1);
            log::warn!("http relay: upstream {}: {e}", inner.upstream);
            plain(
                StatusCode::BAD_GATEWAY,
                "mcp-warden: the server's HTTP endpoint failed\n",
            )
        }
    }
}

/// One request to the upstream, on a connection of its own (local sockets
/// are cheap; no pool state to leak). Waits for the server to listen.
async fn send<H: RelayHooks>(
    inner: &Inner<H>,
    req: Request<UpBody>,
) -> Result<Response<Incoming>, BoxError> {
    let deadline = Instant::now() + inner.opts.connect_wait;
    loop {
        let r = match &inner.upstream {
            Upstream::Tcp(a) => match tokio::net::TcpStream::connect(a).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return send_on(s, req).await;
                }
                Err(e) => e,
            },
            Upstream::Unix(p) => match tokio::net::UnixStream::connect(p).await {
                Ok(s) => return send_on(s, req).await,
                Err(e) => e,
            },
        };
        let waiting = matches!(
            r.raw_os_error(),
            Some(libc::ECONNREFUSED | libc::ENOENT | libc::EAGAIN)
        );
        if !waiting || Instant::now() >= deadline {
            return Err(Box::new(r));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn send_on<T>(io: T, req: Request<UpBody>) -> Result<Response<Incoming>, BoxError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("http relay: upstream connection: {e}");
        }
    });
    Ok(sender.send_request(req).await?)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Json,
    Sse,
    Opaque,
}

/// Hand the upstream's response to the client: headers now, the body
/// through [`pump`].
fn respond<H: RelayHooks>(
    inner: Arc<Inner<H>>,
    resp: Response<Incoming>,
    guard: CallGuard<H>,
    reply_to: ReplyTo,
) -> Response<RelayBody> {
    let (parts, body) = resp.into_parts();
    let ct = header_str(&parts.headers, CONTENT_TYPE.as_str()).map(|s| {
        s.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    let kind = match ct.as_deref() {
        Some("text/event-stream") => Kind::Sse,
        Some("application/json") => Kind::Json,
        _ => Kind::Opaque,
    };
    let (tx, rx) = RelayBody::channel(inner.opts.queue_frames);
    tokio::spawn(pump(inner, body, kind, guard, tx, reply_to));
    Response::from_parts(parts, rx)
}

enum End {
    Done,
    Cut(String),
    ClientGone,
}

/// Forward a response body, reading its messages on the way.
async fn pump<H: RelayHooks>(
    inner: Arc<Inner<H>>,
    mut body: Incoming,
    kind: Kind,
    mut guard: CallGuard<H>,
    tx: FrameTx,
    reply_to: ReplyTo,
) {
    let limit = inner.opts.parse_limit;
    let mut json = Message::new(limit);
    let mut carry = BytesMut::new();
    let mut sse = SseReader::new(limit);
    let mut events = Vec::new();
    let mut legacy: Option<String> = None;
    // SSE: the bytes of the event being read (see below).
    let mut held = BytesMut::new();
    let mut streaming_event = false;
    let mut reply_to = reply_to;
    // The relay's own events for this (2024-11-05) stream, written only
    // between the server's events.
    let mut inject: Option<tokio::sync::mpsc::Receiver<Bytes>> = None;
    let mut injected: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    let mut forwarded: u64 = 0;
    let end = 'read: loop {
        if sse.at_boundary() {
            while let Some(ev) = injected.pop_front() {
                if tx.send(Ok(hyper::body::Frame::data(ev))).await.is_err() {
                    break 'read End::ClientGone;
                }
            }
        }
        let frame = tokio::select! {
            f = body.frame() => f,
            () = tx.closed() => break End::ClientGone,
            Some(ev) = async {
                match &mut inject {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                injected.push_back(ev);
                continue;
            }
        };
        let frame = match frame {
            None => break End::Done,
            Some(Err(e)) => break End::Cut(e.to_string()),
            Some(Ok(f)) => f,
        };
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(trailers) => {
                if tx.send(Ok(trailers)).await.is_err() {
                    break End::ClientGone;
                }
                continue;
            }
        };
        match kind {
            Kind::Opaque => {
                if !send_data(&tx, data, &mut forwarded).await {
                    break End::ClientGone;
                }
            }
            Kind::Json => {
                json.push(&data);
                // A body up to STREAM_AFTER is held whole until it was
                // read (as the stdio relay holds a line), so a response the
                // relay withholds never reaches the client in part.
                if json.bytes() <= STREAM_AFTER as u64 {
                    carry.extend_from_slice(&data);
                    continue;
                }
                match data.iter().rposition(|b| !b.is_ascii_whitespace()) {
                    Some(p) => {
                        let held = std::mem::replace(&mut carry, BytesMut::from(&data[p..]));
                        if !send_data(&tx, held.freeze(), &mut forwarded).await
                            || !send_data(&tx, data.slice(..p), &mut forwarded).await
                        {
                            break End::ClientGone;
                        }
                    }
                    None => {
                        carry.extend_from_slice(&data);
                        if carry.len() > 1 << 20 {
                            let held = std::mem::take(&mut carry);
                            if !send_data(&tx, held.freeze(), &mut forwarded).await {
                                break End::ClientGone;
                            }
                        }
                    }
                }
            }
            Kind::Sse => {
                sse.feed(&data, &mut events);
                let mut from = 0;
                for ev in events.drain(..) {
                    inner.count(|s| s.sse_events += 1);
                    // The event's bytes up to its dispatching byte: held
                    // (unless the event outgrew the parse limit and is
                    // streaming), so a refused server request never reaches
                    // the client, not even in part.
                    let part = data.slice(from..ev.at);
                    if streaming_event {
                        if !send_data(&tx, part, &mut forwarded).await {
                            break 'read End::ClientGone;
                        }
                    } else {
                        held.extend_from_slice(&part);
                    }
                    from = ev.at;
                    let verdict = if ev.kind == "endpoint" {
                        // 2024-11-05: the session's message endpoint.
                        if let Some(d) = ev.data.as_slice() {
                            let uri = String::from_utf8_lossy(d).into_owned();
                            if let Some(k) = legacy_key(&uri) {
                                let (itx, irx) = tokio::sync::mpsc::channel(64);
                                inner.lock().legacy_streams.insert(k.clone(), itx);
                                inject = Some(irx);
                                legacy = Some(k);
                                reply_to.path = uri;
                                reply_to.session = None;
                            }
                        }
                        Verdict::Forward
                    } else {
                        judge(&inner, &ev.data).await
                    };
                    match verdict {
                        Verdict::AnswerServer(reply) if !streaming_event => {
                            held.clear();
                            from = ev.at + 1;
                            answer_server(&inner, &reply_to, reply);
                        }
                        Verdict::Stopped(errors) if !streaming_event => {
                            // The server's answer is withheld; the client
                            // gets the reason, one event per call.
                            held.clear();
                            from = ev.at + 1;
                            let mut out = Vec::new();
                            for line in errors.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                                out.extend_from_slice(b"event: message\ndata: ");
                                out.extend_from_slice(line);
                                out.extend_from_slice(b"\n\n");
                            }
                            if !send_data(&tx, Bytes::from(out), &mut forwarded).await {
                                break 'read End::ClientGone;
                            }
                        }
                        Verdict::Stopped(_) => {
                            // Its start is with the client: cut the stream
                            // rather than finish the event (fail closed).
                            break 'read End::Cut(
                                "the agent stopped the server while its event streamed".into(),
                            );
                        }
                        other => {
                            if matches!(other, Verdict::AnswerServer(_)) {
                                log::warn!(
                                    "http relay: a refused server request over the parse limit \
                                     was already streaming to the client"
                                );
                            }
                            let head = held.split().freeze();
                            if !send_data(&tx, head, &mut forwarded).await
                                || !send_data(&tx, data.slice(from..=ev.at), &mut forwarded).await
                            {
                                break 'read End::ClientGone;
                            }
                            from = ev.at + 1;
                        }
                    }
                    streaming_event = false;
                }
                let rest = data.slice(from..);
                if streaming_event {
                    if !send_data(&tx, rest, &mut forwarded).await {
                        break End::ClientGone;
                    }
                } else {
                    held.extend_from_slice(&rest);
                    let over = held.len() > limit;
                    if sse.at_boundary() || over {
                        streaming_event = over && !sse.at_boundary();
                        if !send_data(&tx, held.split().freeze(), &mut forwarded).await {
                            break End::ClientGone;
                        }
                    }
                }
            }
        }
    };
    inner.lock().core.stats.bytes_s2c += forwarded;
    match end {
        End::Done => {
            if kind == Kind::Json && json.bytes() > 0 {
                if let Verdict::Stopped(_) = judge(&inner, &json).await {
                    // All but the body's last byte is with the client:
                    // withhold it and cut the body (fail closed); the
                    // client cannot read the result.
                    inner.count(|s| s.cut += 1);
                    guard
                        .finish(Outcome::Error, "the agent stopped the server")
                        .await;
                    let _ = tx
                        .send(Err("mcp-warden: the agent stopped the server".into()))
                        .await;
                    return;
                }
            }
            if !carry.is_empty() {
                let _ = tx.send(Ok(hyper::body::Frame::data(carry.freeze()))).await;
            }
            if !held.is_empty() {
                let _ = tx.send(Ok(hyper::body::Frame::data(held.freeze()))).await;
            }
            guard
                .finish(
                    Outcome::Error,
                    "the response ended without the call's result",
                )
                .await;
        }
        End::Cut(e) => {
            inner.count(|s| s.cut += 1);
            log::warn!("http relay: the server's response was cut: {e}");
            guard
                .finish(Outcome::Error, "the server's response was cut")
                .await;
            let _ = tx.send(Err(e.into())).await;
        }
        End::ClientGone => {
            inner.count(|s| s.client_gone += 1);
            guard
                .finish(Outcome::Cancelled, "the client went away")
                .await;
        }
    }
    if let Some(k) = legacy {
        // The 2024-11-05 session's stream is over: its calls can't be
        // answered any more.
        let ends = {
            let mut st = inner.lock();
            st.legacy_streams.remove(&k);
            let ids = st.detached.remove(&k).unwrap_or_default();
            let mut ends = Vec::new();
            for id in ids {
                if st.owners.remove(&id).is_some() {
                    st.core.pending.remove(&id);
                    ends.extend(st.core.tracker.end(
                        &id,
                        Outcome::Error,
                        0,
                        Some("the session's SSE stream ended"),
                    ));
                }
            }
            ends
        };
        inner.end_calls(&ends).await;
    }
}

async fn send_data(tx: &FrameTx, data: Bytes, forwarded: &mut u64) -> bool {
    if data.is_empty() {
        return true;
    }
    let n = data.len() as u64;
    if tx.send(Ok(hyper::body::Frame::data(data))).await.is_err() {
        return false;
    }
    *forwarded += n;
    true
}

/// What to do with a server message once read.
enum Verdict {
    Forward,
    /// A server request the policy's `[mcp]` section denies: withheld, and
    /// this goes to the server instead.
    AnswerServer(Value),
    /// The agent stopped the server during the calls it ends: withheld, and
    /// the client gets these error responses (one JSON text per line).
    Stopped(Vec<u8>),
}

/// Read one server message (a JSON body or an SSE event's data): end the
/// calls it answers, awaiting their end hooks, report handshake and tool list.
async fn judge<H: RelayHooks>(inner: &Inner<H>, msg: &Message) -> Verdict {
    let fx = match msg.as_slice() {
        Some(bytes) if !bytes.is_empty() => {
            let copy;
            let classified = match classify(bytes) {
                Classified::NotMcp => {
                    copy = lenient_copy(bytes);
                    classify_copy(copy.as_deref()).0
                }
                c => c,
            };
            let msgs = match classified {
                Classified::Single(m) => vec![m],
                Classified::Batch(ms) => ms,
                Classified::NotMcp => {
                    inner.lock().core.stats.unparsed_s2c += 1;
                    return Verdict::Forward;
                }
            };
            let mut st = inner.lock();
            st.core.stats.lines_s2c += 1;
            let fx = s2c_messages(&mut st.core, &inner.policy, &msgs, bytes.len());
            for m in &msgs {
                if let Rpc::Response { id: Some(id), .. } = m {
                    if !st.core.tracker.contains(id) && !st.core.pending.contains_key(id) {
                        st.owners.remove(id);
                    }
                }
            }
            fx
        }
        Some(_) => return Verdict::Forward,
        None => {
            // Over the parse limit: scanned as it streamed.
            let mut st = inner.lock();
            st.core.stats.lines_s2c += 1;
            st.core.stats.oversize_s2c += 1;
            let mut fx = S2cEffects::default();
            if let Some((id, is_error)) = msg.scan().response() {
                let outcome = if is_error {
                    Outcome::Error
                } else {
                    Outcome::Ok
                };
                fx.ends
                    .extend(st.core.tracker.end(&id, outcome, msg.bytes(), None));
                st.core.pending.remove(&id);
                st.owners.remove(&id);
            }
            fx
        }
    };
    {
        let mut st = inner.lock();
        for e in &fx.ends {
            st.owners.remove(&e.id);
        }
    }
    let stopped = inner.end_calls(&fx.ends).await;
    if let Some(why) = stopped {
        inner.lock().core.stats.refused += 1;
        return Verdict::Stopped(stopped_reply(&inner.policy, &fx.ends, &why));
    }
    if let Some(s) = &fx.session {
        inner.hooks.session_info(s);
    }
    if let Some(t) = &fx.tools {
        inner.hooks.tools_listed(t);
    }
    for (_, method, g) in &fx.governed {
        inner.hooks.server_request(method, *g);
    }
    if fx.governed.iter().any(|(_, _, g)| *g == Governance::Deny) {
        inner.lock().core.stats.refused += 1;
        return Verdict::AnswerServer(governance_reply(&inner.policy, &fx.request_ids));
    }
    Verdict::Forward
}

/// Where a response stream's server requests are answered: the path and
/// session of the request that opened it (or, on the 2024-11-05 transport,
/// the session's message endpoint).
#[derive(Clone, Debug)]
struct ReplyTo {
    path: String,
    session: Option<HeaderValue>,
    version: Option<HeaderValue>,
    host: Option<HeaderValue>,
}

impl ReplyTo {
    fn of(parts: &hyper::http::request::Parts) -> Self {
        ReplyTo {
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            session: parts.headers.get(SESSION_HEADER).cloned(),
            version: parts.headers.get(VERSION_HEADER).cloned(),
            host: parts.headers.get(hyper::header::HOST).cloned(),
        }
    }
}

/// POST the relay's own answer to a refused server request to the server
/// (in the background: the stream goes on meanwhile).
fn answer_server<H: RelayHooks>(inner: &Arc<Inner<H>>, to: &ReplyTo, reply: Value) {
    let mut req = Request::new(up_full(Bytes::from(reply.to_string())));
    *req.method_mut() = Method::POST;
    match to.path.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => {
            log::warn!("http relay: can't answer the server at {:?}: {e}", to.path);
            return;
        }
    }
    let h = req.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        hyper::header::ACCEPT,
        HeaderValue::from_static("application/json, text/event-stream"),
    );
    for (name, v) in [
        (SESSION_HEADER, &to.session),
        (VERSION_HEADER, &to.version),
        ("host", &to.host),
    ] {
        if let Some(v) = v {
            h.insert(name, v.clone());
        }
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        match send(&inner, req).await {
            Ok(resp) => {
                let _ = resp.into_body().collect().await;
            }
            Err(e) => log::warn!("http relay: answering a refused server request: {e}"),
        }
    });
}

/// The requests one response stream answers. What is still in flight when
/// the stream ends (or the guard is dropped) ends then.
struct CallGuard<H: RelayHooks> {
    inner: Arc<Inner<H>>,
    serial: u64,
    ids: Vec<RequestId>,
}

impl<H: RelayHooks> CallGuard<H> {
    fn new(inner: Arc<Inner<H>>) -> Self {
        let serial = inner
            .next_guard
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CallGuard {
            inner,
            serial,
            ids: Vec::new(),
        }
    }

    /// Forget this stream's requests, ending the calls still in flight.
    fn take_ends(&mut self, outcome: Outcome, detail: &str) -> Vec<CallEnd> {
        if self.ids.is_empty() {
            return Vec::new();
        }
        let mut st = self.inner.lock();
        let mut ends = Vec::new();
        for id in self.ids.drain(..) {
            if st.owners.get(&id).is_some_and(|o| o.guard == self.serial) {
                st.owners.remove(&id);
                st.core.pending.remove(&id);
                ends.extend(st.core.tracker.end(&id, outcome, 0, Some(detail)));
            }
        }
        ends
    }

    async fn finish(&mut self, outcome: Outcome, detail: &str) {
        let ends = self.take_ends(outcome, detail);
        self.inner.end_calls(&ends).await;
    }

    /// 2024-11-05: the POST was answered 202; its results come on the
    /// session's SSE stream, which ends them (or its end does).
    fn detach(&mut self, key: &str) {
        let mut st = self.inner.lock();
        let ids: Vec<RequestId> = self.ids.drain(..).collect();
        st.detached.entry(key.to_owned()).or_default().extend(ids);
    }
}

impl<H: RelayHooks> Drop for CallGuard<H> {
    fn drop(&mut self) {
        let ends = self.take_ends(Outcome::Cancelled, "the client went away");
        if ends.is_empty() {
            return;
        }
        // Dropped without a finish: the request's task was cancelled (the
        // client's connection closed while the relay waited). End the calls
        // on a task of their own, since a drop can't await.
        let inner = self.inner.clone();
        let spawned = tokio::runtime::Handle::try_current().map(|h| {
            h.spawn(async move {
                inner.end_calls(&ends).await;
            })
        });
        if spawned.is_err() {
            log::error!("http relay: calls left without an end (no runtime)");
        }
    }
}
