//! The control socket's server side: accept, identify the peer by
//! SO_PEERCRED, refuse confined peers outright, read one JSON request per
//! line and write the handler's answer. What a request may do is the
//! handler's decision ([`Handler`], implemented by the daemon).
use std::{
    future::Future,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use serde_json::Value;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};

use super::{err, ControlError, Request, MAX_LINE};

/// Who is on the other end, from SO_PEERCRED (taken by the kernel at
/// connect time; the client cannot choose it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Per-connection state the handler keeps.
#[derive(Debug, Default)]
pub struct Conn {
    pub id: u64,
    /// The instance this connection registered or attached to.
    pub instance: Option<String>,
}

/// What the handler answers.
pub enum Reply {
    /// One response line.
    One(Value),
    /// Lines until the channel closes or the client hangs up.
    Stream(mpsc::Receiver<Value>),
}

pub trait Handler: Send + Sync + 'static {
    /// Refuse this peer without reading a request (e.g. it is confined).
    fn refuse(&self, peer: &Peer) -> Option<String>;
    fn handle(
        &self,
        peer: &Peer,
        conn: &mut Conn,
        req: Request,
    ) -> impl Future<Output = Reply> + Send;
    /// The connection ended (EOF, error, or after a stream).
    fn closed(&self, peer: &Peer, conn: Conn) -> impl Future<Output = ()> + Send;
}

/// Bind the socket at `path` (replacing a stale one), mode 0666: who may do
/// what is decided per request from the peer's credentials.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        // The directory is traversable by everyone; only root writes it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let l = UnixListener::bind(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

/// Accept connections forever, one task each.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::error!("control socket accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let h = handler.clone();
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, h, id).await {
                log::debug!("control connection {id}: {e}");
            }
        });
    }
}

/// Read one line of at most [`MAX_LINE`] bytes; None at EOF.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<()>, ControlError> {
    buf.clear();
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Ok(Some(()))
            };
        }
        let (chunk, done) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (&avail[..i], Some(i + 1)),
            None => (avail, None),
        };
        if buf.len() + chunk.len() > MAX_LINE {
            return Err(ControlError::TooLong);
        }
        buf.extend_from_slice(chunk);
        match done {
            Some(n) => {
                r.consume(n);
                return Ok(Some(()));
            }
            None => {
                let n = avail.len();
                r.consume(n);
            }
        }
    }
}

async fn write_value<W: AsyncWriteExt + Unpin>(w: &mut W, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

async fn connection<H: Handler>(
    stream: UnixStream,
    handler: Arc<H>,
    id: u64,
) -> Result<(), ControlError> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        pid: cred.pid().unwrap_or(0).max(0) as u32,
        uid: cred.uid(),
        gid: cred.gid(),
    };
    let (rd, mut wr) = stream.into_split();
    if let Some(why) = handler.refuse(&peer) {
        log::warn!("control: refused pid {} uid {}: {why}", peer.pid, peer.uid);
        let _ = write_value(&mut wr, &err(why)).await;
        return Ok(());
    }
    let mut rd = BufReader::new(rd);
    let mut conn = Conn { id, instance: None };
    let mut buf = Vec::new();
    let res = loop {
        match read_line(&mut rd, &mut buf).await {
            Ok(Some(())) => {}
            Ok(None) => break Ok(()),
            Err(e) => {
                let _ = write_value(&mut wr, &err(&e)).await;
                break Err(e);
            }
        }
        let req: Request = match serde_json::from_slice(&buf) {
            Ok(r) => r,
            Err(e) => {
                if let Err(e) = write_value(&mut wr, &err(format!("bad request: {e}"))).await {
                    break Err(e.into());
                }
                continue;
            }
        };
        match handler.handle(&peer, &mut conn, req).await {
            Reply::One(v) => {
                if let Err(e) = write_value(&mut wr, &v).await {
                    break Err(e.into());
                }
            }
            Reply::Stream(mut rx) => {
                // Until the client hangs up (its read side sees EOF) or the
                // stream ends.
                let mut sink = [0u8; 64];
                loop {
                    tokio::select! {
                        v = rx.recv() => match v {
                            Some(v) => {
                                if write_value(&mut wr, &v).await.is_err() {
                                    break;
                                }
                            }
                            None => break,
                        },
                        n = tokio::io::AsyncReadExt::read(&mut rd, &mut sink) => {
                            if matches!(n, Ok(0) | Err(_)) {
                                break;
                            }
                        }
                    }
                }
                break Ok(());
            }
        }
    };
    handler.closed(&peer, conn).await;
    res
}

/// The cgroup v2 path of `pid` ("0::/path" in /proc/PID/cgroup).
pub fn cgroup_of(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.to_string())
}

/// Is the cgroup path `cg` (as in /proc/PID/cgroup) inside `parent` (the
/// directory of the instance cgroups, relative to the cgroup2 root)?
pub fn inside(cg: &str, parent: &str) -> bool {
    let parent = parent.trim_matches('/');
    let cg = cg.trim_start_matches('/');
    cg == parent || cg.starts_with(&format!("{parent}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confined_cgroup_detection() {
        assert!(inside("/mcp-warden/git-1-2", "mcp-warden"));
        assert!(inside("/mcp-warden/git-1-2/sub", "mcp-warden"));
        assert!(inside("/mcp-warden", "mcp-warden"));
        assert!(!inside("/mcp-wardenx/a", "mcp-warden"));
        assert!(!inside("/user.slice/user-1000.slice", "mcp-warden"));
    }

    #[tokio::test]
    async fn line_limit() {
        let mut r = BufReader::new(&b"{\"op\":\"ping\"}\nrest"[..]);
        let mut buf = Vec::new();
        assert!(read_line(&mut r, &mut buf).await.unwrap().is_some());
        assert_eq!(buf, b"{\"op\":\"ping\"}");
        assert!(read_line(&mut r, &mut buf).await.unwrap().is_some());
        assert_eq!(buf, b"rest");
        assert!(read_line(&mut r, &mut buf).await.unwrap().is_none());
        let big = vec![b'a'; MAX_LINE + 10];
        let mut r = BufReader::new(&big[..]);
        assert!(read_line(&mut r, &mut buf).await.is_err());
    }
}
