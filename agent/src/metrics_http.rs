//! The Prometheus endpoint: `GET /metrics` answers the text exposition of
//! [`Metrics::render`]; every other path is 404, every other method on
//! /metrics 405. HTTP/1.1 only (what Prometheus speaks), served by hyper.
//!
//! Default listen address: 127.0.0.1:9479 (shared/design.md). Label values
//! are bounded by [`crate::metrics`]; nothing from the request reaches the
//! response but the path it asked for.
//!
//! Used by the daemon (`mcp-warden agent`) and, hidden, by standalone
//! `mcp-warden run --metrics ADDR` (for the end-to-end test).
use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};

use crate::metrics::Metrics;

/// 127.0.0.1:9479, the design's default.
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9479);

/// The text exposition format version Prometheus negotiates for.
const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// At most this many connections are served at once; further ones wait in
/// the listen backlog. Prometheus uses one per target.
const MAX_CONNECTIONS: usize = 16;
/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive connection is closed (gracefully, after the request in
/// flight) after this long, so idle clients cannot hold every slot.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);
/// Time a connection gets to finish its request once asked to close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetricsHttpError {
    #[error("binding the metrics endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics endpoint address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// Called before each scrape, to bring gauges and counters that are read
/// from the kernel up to date (the daemon refreshes lost-event counts).
pub type BeforeScrape = Arc<dyn Fn() + Send + Sync>;

/// A bound, not yet serving, metrics endpoint. Binding first lets a caller
/// fail early (address in use) before it starts anything else.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsHttpError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsHttpError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(MetricsHttpError::LocalAddr)?;
        if !addr.ip().is_loopback() {
            log::warn!(
                "metrics on {addr}, not loopback: whoever reaches it sees the names of \
                 servers and tools and their violation counts"
            );
        }
        Ok(Self { listener, addr })
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until `shutdown` completes. Connections still open then are
    /// dropped.
    pub async fn serve<F: Future>(self, metrics: Metrics, shutdown: F) {
        self.serve_with(metrics, None, shutdown).await
    }

    /// [`Self::serve`], calling `before` ahead of each scrape.
    pub async fn serve_with<F: Future>(
        self,
        metrics: Metrics,
        before: Option<BeforeScrape>,
        shutdown: F,
    ) {
        log::info!("metrics on http://{}/metrics", self.addr);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            // Reap finished connection tasks so the set does not grow.
            while conns.try_join_next().is_some() {}
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break, // the semaphore is never closed
                },
            };
            let stream = tokio::select! {
                _ = &mut shutdown => break,
                r = self.listener.accept() => match r {
                    Ok((s, _peer)) => s,
                    Err(e) => {
                        // EMFILE and friends pass; don't spin on them.
                        log::warn!("metrics endpoint: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            let before = before.clone();
            conns.spawn(async move {
                serve_connection(stream, metrics, before).await;
                drop(permit);
            });
        }
        conns.shutdown().await;
        log::debug!("metrics endpoint on {} stopped", self.addr);
    }
}

/// Bind `addr` and serve /metrics until `shutdown` completes. Returns an
/// error only when the address cannot be bound.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future,
) -> Result<(), MetricsHttpError> {
    MetricsListener::bind(addr)
        .await?
        .serve(metrics, shutdown)
        .await;
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    metrics: Metrics,
    before: Option<BeforeScrape>,
) {
    let svc = service_fn(move |req: Request<Incoming>| {
        let resp = respond(&req, &metrics, before.as_ref());
        async move { Ok::<_, Infallible>(resp) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = res {
        log::debug!("metrics connection: {e}");
    }
}

/// The whole routing table.
fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    before: Option<&BeforeScrape>,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if let Some(f) = before {
        f();
    }
    let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One raw HTTP/1.1 exchange (Connection: close), as a client would.
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the endpoint");
        s.write_all(request.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("response within 10 s")
            .expect("read");
        String::from_utf8(out).expect("utf-8 response")
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    }

    struct Served {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(metrics: Metrics, before: Option<BeforeScrape>) -> Served {
        let l = MetricsListener::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = l.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(l.serve_with(metrics, before, rx));
        Served {
            addr,
            stop: Some(tx),
            task,
        }
    }

    #[tokio::test]
    async fn serves_the_exposition_and_nothing_else() {
        let m = Metrics::new().expect("metrics");
        m.violations
            .with_label_values(&["fetch", "fetch", "net", "deny"])
            .inc();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let srv = start(
            m,
            Some(Arc::new(move || {
                c.fetch_add(1, Ordering::Relaxed);
            })),
        )
        .await;

        let r = exchange(srv.addr, &get("/metrics")).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{r}"
        );
        assert!(
            r.contains(
                "mcp_warden_violations_total{decision=\"deny\",kind=\"net\",server=\"fetch\",tool=\"fetch\"} 1"
            ),
            "{r}"
        );
        // A query string does not change the answer.
        let r = exchange(srv.addr, &get("/metrics?name[]=up")).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert_eq!(
            calls.load(Ordering::Relaxed),
            2,
            "refresh before each scrape"
        );

        for p in ["/", "/metricsx", "/metrics/", "/debug/pprof", "/../metrics"] {
            let r = exchange(srv.addr, &get(p)).await;
            assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{p}: {r}");
            assert!(!r.contains("mcp_warden_"), "{p}: {r}");
        }
        let r = exchange(
            srv.addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.to_ascii_lowercase().contains("allow: get, head"), "{r}");

        let r = exchange(
            srv.addr,
            "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(!r.contains("mcp_warden_"), "HEAD has no body: {r}");

        // Garbage is answered with an error, and the endpoint stays up.
        let r = exchange(srv.addr, "NOT HTTP\r\n\r\n").await;
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
        let r = exchange(srv.addr, &get("/metrics")).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");

        let Served {
            addr,
            mut stop,
            task,
        } = srv;
        if let Some(s) = stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops on shutdown")
            .expect("task");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener closed after shutdown"
        );
    }

    #[tokio::test]
    async fn keep_alive_serves_several_scrapes_on_one_connection() {
        let m = Metrics::new().expect("metrics");
        m.servers.with_label_values(&["running"]).set(2);
        let srv = start(m, None).await;
        let mut s = tokio::net::TcpStream::connect(srv.addr)
            .await
            .expect("connect");
        let req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        s.write_all(format!("{req}{req}").as_bytes())
            .await
            .expect("send");
        s.shutdown().await.expect("half-close");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("in time")
            .expect("read");
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert_eq!(
            out.matches("mcp_warden_servers{state=\"running\"} 2")
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let l = MetricsListener::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = l.local_addr();
        let m = Metrics::new().expect("metrics");
        let e = serve_metrics(addr, m, std::future::ready(()))
            .await
            .expect_err("address in use");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        assert_eq!(DEFAULT_METRICS_ADDR.to_string(), "127.0.0.1:9479");
    }
}
