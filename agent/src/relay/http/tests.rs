//! The HTTP relay against a scripted upstream (hyper, in-process) and a raw
//! HTTP/1.1 client: ordering of hooks and bytes, refusals, backpressure,
//! large bodies, cut streams and vanished clients, and no state left over.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::policy::model::{Mode, OnViolation, Rules};
use crate::relay::{CallEnd, CallStart, HookError};

fn policy() -> Arc<Policy> {
    Arc::new(Policy {
        version: 1,
        server: "t".into(),
        mode: Mode::Enforce,
        on_violation: OnViolation::Deny,
        rules: Rules::default(),
        tools_allow: Some(vec!["ok_tool".into()]),
        tools: Vec::new(),
        source: "test".into(),
        mcp: Default::default(),
    })
}

/// Records hook calls in order, shared with the test's own observations.
#[derive(Default)]
struct Rec {
    log: Arc<Mutex<Vec<String>>>,
    end_delay: Duration,
    /// Every call_end answers that the agent stopped the server for this.
    stopped: Option<String>,
}

impl Rec {
    fn push(&self, s: String) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }
}

impl RelayHooks for Rec {
    async fn call_begin(&self, call: &CallStart) -> Result<(), HookError> {
        self.push(format!("begin {}", call.id));
        Ok(())
    }
    async fn call_end(&self, call: &CallEnd) -> Option<String> {
        tokio::time::sleep(self.end_delay).await;
        self.push(format!(
            "end {} {} {}",
            call.id,
            call.outcome.as_str(),
            call.detail.as_deref().unwrap_or("")
        ));
        self.stopped.clone()
    }
    fn call_refused(&self, call: &CallStart, _reason: &str) {
        self.push(format!("refused {}", call.id));
    }
}

type Script = Arc<dyn Fn(Request<Incoming>) -> (&'static str, RelayBody) + Send + Sync>;

/// An upstream answering every request with `script`'s content type and
/// body; counts requests.
async fn upstream(script: Script) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = l.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let script = script.clone();
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let (ct, body) = script(req);
                    let mut r = Response::new(body);
                    r.headers_mut()
                        .insert("content-type", ct.parse().expect("content type"));
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// A relay in front of `up`; returns its address and handle.
async fn relay(
    up: SocketAddr,
    end_delay: Duration,
) -> (SocketAddr, HttpRelay<Rec>, Arc<Mutex<Vec<String>>>) {
    relay_with(up, end_delay, None).await
}

async fn relay_with(
    up: SocketAddr,
    end_delay: Duration,
    stopped: Option<String>,
) -> (SocketAddr, HttpRelay<Rec>, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = Arc::new(Rec {
        log: log.clone(),
        end_delay,
        stopped,
    });
    let r = HttpRelay::new(
        policy(),
        rec,
        Upstream::Tcp(up),
        HttpOptions {
            parse_limit: 1 << 20,
            connect_wait: Duration::from_secs(2),
            queue_frames: 4,
        },
    );
    let l = Listener::bind(&Listen::Tcp("127.0.0.1:0".parse().expect("addr")))
        .await
        .expect("bind relay");
    let addr = l.local_addr().expect("relay addr");
    let served = r.clone();
    tokio::spawn(async move { served.serve(l, std::future::pending()).await });
    (addr, r, log)
}

fn call(id: u32, tool: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
    )
}

fn result(id: u32, text: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":"{text}"}}]}}}}"#
    )
}

/// Open a connection and send a POST of `body` (optionally with extra
/// header lines); the response is read by the caller.
async fn post(addr: SocketAddr, body: &str, extra: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect relay");
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    s
}

/// Read until `needle` shows up (or EOF); returns everything read.
async fn read_until(s: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut searched: usize = 0;
    loop {
        // Only the new bytes (and a needle's length before them) are searched.
        let from = searched.saturating_sub(needle.len());
        if out[from..].windows(needle.len()).any(|w| w == needle) {
            return out;
        }
        searched = out.len();
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

async fn settle<H: RelayHooks>(r: &HttpRelay<H>) -> Tracked {
    for _ in 0..100 {
        if r.tracked().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.tracked()
}

fn log_of(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    log.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[tokio::test]
async fn refused_tool_is_answered_by_the_relay_and_never_forwarded() {
    let (up, hits) = upstream(Arc::new(|_req| {
        ("application/json", RelayBody::full(result(1, "x")))
    }))
    .await;
    let (addr, r, log) = relay(up, Duration::ZERO).await;
    let mut s = post(addr, &call(1, "secret"), "").await;
    let out = read_until(&mut s, b"\"2.0\"}").await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("-32001") && text.contains("not allowed by policy"),
        "{text}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0, "never forwarded");
    assert_eq!(log_of(&log), vec!["refused 1"]);
    // Cross-origin: 403, not forwarded either.
    let mut s = post(addr, &call(2, "ok_tool"), "Origin: http://evil.example\r\n").await;
    let out = read_until(&mut s, b"refused").await;
    assert!(
        out.starts_with(b"HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert!(settle(&r).await.is_empty());
}

#[tokio::test]
async fn rights_are_withdrawn_before_the_sse_event_that_ends_the_call() {
    let (up, _) = upstream(Arc::new(|_req| {
        let (tx, body) = RelayBody::channel(4);
        tokio::spawn(async move {
            // A progress notification, then the result split mid-event.
            let ev1 = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\n\n";
            let res = format!("id: 9\ndata: {}\n\n", result(1, "done"));
            let (a, b) = res.split_at(res.len() / 2);
            for piece in [ev1.to_string(), a.to_string(), b.to_string()] {
                let _ = tx.send(Ok(Frame::data(Bytes::from(piece)))).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });
        ("text/event-stream", body)
    }))
    .await;
    let (addr, r, log) = relay(up, Duration::from_millis(200)).await;
    let mut s = post(addr, &call(1, "ok_tool"), "").await;
    let out = read_until(&mut s, b"done\"}]}}\n\n").await;
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push("client saw the result".into());
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("notifications/progress"), "{text}");
    let l = log_of(&log);
    assert_eq!(l[0], "begin 1");
    assert!(l[1].starts_with("end 1 ok"), "{l:?}");
    assert_eq!(
        l[2], "client saw the result",
        "rights withdrawn first: {l:?}"
    );
    assert!(settle(&r).await.is_empty(), "{:?}", r.tracked());
}

/// The agent stopped the server during the call: an SSE result is replaced
/// by an error event naming the reason; a JSON result is never delivered.
#[tokio::test]
async fn a_stopped_servers_result_is_withheld() {
    let (up, _) = upstream(Arc::new(|_req| {
        let (tx, body) = RelayBody::channel(4);
        tokio::spawn(async move {
            let res = format!("id: 9\ndata: {}\n\n", result(1, "s3cret"));
            let _ = tx.send(Ok(Frame::data(Bytes::from(res)))).await;
        });
        ("text/event-stream", body)
    }))
    .await;
    let why = Some("the tool declared readOnlyHint: true".to_string());
    let (addr, _r, _log) = relay_with(up, Duration::ZERO, why.clone()).await;
    let mut s = post(addr, &call(1, "ok_tool"), "").await;
    let out = read_until(&mut s, b"}}\n\n").await;
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("s3cret"), "{text}");
    assert!(
        text.contains("the server was stopped: the tool declared readOnlyHint: true"),
        "{text}"
    );
    assert!(text.contains("-32001"), "{text}");

    let (up, _) = upstream(Arc::new(|_req| {
        let (tx, body) = RelayBody::channel(4);
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from(result(2, "s3cret")))))
                .await;
        });
        ("application/json", body)
    }))
    .await;
    let (addr, _r, _log) = relay_with(up, Duration::ZERO, why).await;
    let mut s = post(addr, &call(2, "ok_tool"), "").await;
    let out = read_until(&mut s, b"never").await;
    let text = String::from_utf8_lossy(&out);
    assert!(!text.contains("s3cret"), "{text}");
}

#[tokio::test]
async fn large_json_result_passes_intact_and_ends_its_call() {
    // 8 MiB result, over the 1 MiB parse limit: scanned as it streams.
    let text: String = (0..8 * 1024 * 1024 / 16)
        .map(|i| format!("{:015x}-", i))
        .collect();
    let body = Arc::new(result(3, &text));
    let sent = body.clone();
    let (up, _) = upstream(Arc::new(move |_req| {
        let (tx, rb) = RelayBody::channel(4);
        let body = sent.clone();
        tokio::spawn(async move {
            for chunk in body.as_bytes().chunks(100_003) {
                if tx
                    .send(Ok(Frame::data(Bytes::copy_from_slice(chunk))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        ("application/json", rb)
    }))
    .await;
    let (addr, r, log) = relay(up, Duration::ZERO).await;
    let mut s = post(addr, &call(3, "ok_tool"), "").await;
    let out = read_until(&mut s, b"\"}]}}0\r\n\r\n").await;
    let text_out = String::from_utf8_lossy(&out);
    let body_start = text_out.find("\r\n\r\n").map(|i| i + 4).unwrap_or(0);
    // De-chunk.
    let mut rest = &out[body_start..];
    let mut got = Vec::new();
    while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
        let n =
            usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap_or("0"), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
        rest = &rest[nl + 2 + n + 2..];
    }
    assert!(
        got == body.as_bytes(),
        "{} bytes back of {}",
        got.len(),
        body.len()
    );
    assert!(
        log_of(&log).iter().any(|l| l.starts_with("end 3 ok")),
        "{:?}",
        log_of(&log)
    );
    assert!(settle(&r).await.is_empty());
}

#[tokio::test]
async fn a_cut_stream_ends_its_calls() {
    let (up, _) = upstream(Arc::new(|_req| {
        let (tx, body) = RelayBody::channel(4);
        tokio::spawn(async move {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(
                    b"data: {\"jsonrpc\":\"2.0\",\"id\":1,",
                ))))
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Err("cut".into())).await;
        });
        ("text/event-stream", body)
    }))
    .await;
    let (addr, r, log) = relay(up, Duration::ZERO).await;
    let mut s = post(addr, &call(1, "ok_tool"), "").await;
    let _ = read_until(&mut s, b"never").await;
    assert!(settle(&r).await.is_empty(), "{:?}", r.tracked());
    let l = log_of(&log);
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(l[1].starts_with("end 1 error"), "{l:?}");
    assert_eq!(r.stats().0.cut, 1);
}

#[tokio::test]
async fn a_client_leaving_mid_call_cancels_it() {
    let (up, _) = upstream(Arc::new(|_req| {
        let (tx, body) = RelayBody::channel(4);
        tokio::spawn(async move {
            // Keep the stream open, silent, for a long time.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        });
        ("text/event-stream", body)
    }))
    .await;
    let (addr, r, log) = relay(up, Duration::ZERO).await;
    let s = post(addr, &call(5, "ok_tool"), "").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.tracked().calls, 1);
    drop(s);
    assert!(settle(&r).await.is_empty(), "{:?}", r.tracked());
    let l = log_of(&log);
    assert_eq!(l[1], "end 5 cancelled the client went away", "{l:?}");
}

#[tokio::test]
async fn a_slow_reader_holds_the_upstream_back() {
    // The upstream offers 64 MiB of SSE events as fast as it can; the client
    // reads nothing for a while: what the upstream got rid of stays bounded
    // (socket buffers + a few queued frames), not the whole stream.
    let produced = Arc::new(AtomicU64::new(0));
    let p = produced.clone();
    let (up, _) = upstream(Arc::new(move |_req| {
        let (tx, body) = RelayBody::channel(1);
        let p = p.clone();
        tokio::spawn(async move {
            let ev = Bytes::from(format!("data: {}\n\n", "x".repeat(64 * 1024 - 9)));
            for _ in 0..1024 {
                if tx.send(Ok(Frame::data(ev.clone()))).await.is_err() {
                    return;
                }
                p.fetch_add(ev.len() as u64, Ordering::SeqCst);
            }
        });
        ("text/event-stream", body)
    }))
    .await;
    let (addr, r, _log) = relay(up, Duration::ZERO).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET /mcp HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stalled = produced.load(Ordering::SeqCst);
    assert!(stalled < 24 << 20, "upstream ran ahead by {stalled} bytes");
    // Now read it all: nothing lost.
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        total += n as u64;
        if produced.load(Ordering::SeqCst) == 64 << 20 && total >= 64 << 20 {
            break;
        }
    }
    assert!(total >= 64 << 20, "read {total}");
    eprintln!("slow reader: upstream stalled after {stalled} bytes of 64 MiB");
    drop(s);
    assert!(settle(&r).await.is_empty());
}

#[tokio::test]
async fn resumption_passes_through_and_a_resumed_result_still_arrives() {
    // 2025-11-25: the server closes the POST's stream after a priming event;
    // the client resumes with GET + Last-Event-ID and gets the result there.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let (up, _) = upstream(Arc::new(move |req| {
        let (tx, body) = RelayBody::channel(4);
        let last = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let session = req
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        s2.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
            "{} {:?} {session}",
            req.method(),
            last
        ));
        let resumed = last.is_some();
        tokio::spawn(async move {
            let ev = if resumed {
                format!("id: 2\ndata: {}\n\n", result(4, "late"))
            } else {
                "id: 1\ndata: \n\n".to_owned()
            };
            let _ = tx.send(Ok(Frame::data(Bytes::from(ev)))).await;
        });
        ("text/event-stream", body)
    }))
    .await;
    let (addr, r, log) = relay(up, Duration::ZERO).await;
    let mut s = post(addr, &call(4, "ok_tool"), "Mcp-Session-Id: s-1\r\n").await;
    let first = read_until(&mut s, b"0\r\n\r\n").await;
    assert!(String::from_utf8_lossy(&first).contains("id: 1"));
    // The stream ended without the result: the call's rights are gone.
    assert!(settle(&r).await.is_empty(), "{:?}", r.tracked());
    let mut g = TcpStream::connect(addr).await.expect("connect");
    g.write_all(
        format!(
            "GET /mcp HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
             Mcp-Session-Id: s-1\r\nLast-Event-ID: 1\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("send");
    let out = read_until(&mut g, b"late").await;
    assert!(String::from_utf8_lossy(&out).contains("late"));
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(seen, vec!["POST None s-1", "GET Some(\"1\") s-1"]);
    let l = log_of(&log);
    assert_eq!(l.len(), 2, "{l:?}");
    assert!(l[1].starts_with("end 4 error"), "{l:?}");
    assert!(settle(&r).await.is_empty());
}

#[tokio::test]
async fn delete_ends_the_sessions_calls() {
    let (up, _) = upstream(Arc::new(|req| {
        let (tx, body) = RelayBody::channel(4);
        if req.method() == hyper::Method::DELETE {
            drop(tx);
            return ("text/plain", body);
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        });
        ("text/event-stream", body)
    }))
    .await;
    let (addr, r, log) = relay(up, Duration::ZERO).await;
    let _s = post(addr, &call(6, "ok_tool"), "Mcp-Session-Id: s-9\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(r.tracked().calls, 1);
    let mut d = TcpStream::connect(addr).await.expect("connect");
    d.write_all(
        format!("DELETE /mcp HTTP/1.1\r\nHost: {addr}\r\nMcp-Session-Id: s-9\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let out = read_until(&mut d, b"0\r\n\r\n").await;
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(r.tracked().calls, 0);
    assert_eq!(log_of(&log)[1], "end 6 cancelled session deleted");
}

#[tokio::test]
async fn a_batch_with_a_refused_call_is_refused_whole() {
    let (up, hits) = upstream(Arc::new(|_req| ("application/json", RelayBody::full("[]")))).await;
    let (addr, r, log) = relay(up, Duration::ZERO).await;
    let body = format!("[{},{}]", call(1, "ok_tool"), call(2, "secret"));
    let mut s = post(addr, &body, "").await;
    let out = read_until(&mut s, b"\"}]").await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let json = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{text}");
    assert!(json.contains("batch refused"), "{json}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(log_of(&log), vec!["refused 1", "refused 2"]);
    assert!(settle(&r).await.is_empty());
}

#[test]
fn routing_headers_must_match_the_body() {
    use super::proxy::check_headers_for_test as check;
    let body =
        br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r\u00e9sum\u00e9"}}"#;
    let h = |pairs: &[(&str, &str)]| {
        let mut m = hyper::HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        m
    };
    // No routing headers, handshake-era version: nothing to check.
    assert!(check(&h(&[("mcp-protocol-version", "2025-11-25")]), body).is_ok());
    // Matching, the name in its base64 form (non-ASCII).
    assert!(check(
        &h(&[
            ("mcp-method", "tools/call"),
            ("mcp-name", "=?base64?csOpc3Vtw6k=?=")
        ]),
        body
    )
    .is_ok());
    for bad in [
        h(&[
            ("mcp-method", "tools/list"),
            ("mcp-name", "=?base64?csOpc3Vtw6k=?="),
        ]),
        h(&[("mcp-method", "tools/call"), ("mcp-name", "other")]),
        h(&[("mcp-method", "tools/call")]),
        h(&[("mcp-method", "tools/call"), ("mcp-name", "=?base64?!!?=")]),
        h(&[("mcp-protocol-version", "2026-07-28")]),
    ] {
        assert!(check(&bad, body).is_err(), "{bad:?}");
    }
    let batch = format!("[{}]", String::from_utf8_lossy(body));
    assert!(check(&h(&[("mcp-method", "tools/call")]), batch.as_bytes()).is_err());
}
