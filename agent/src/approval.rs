//! Human approval of sensitive tool calls (`[mcp] approval = [...]`).
//!
//! The relay holds such a call (its rights are not in force and its request
//! is not forwarded) until a person runs `mcp-warden approve ID` or
//! `mcp-warden deny ID`, or the policy's timeout passes (a denial). Who
//! decided is recorded. Each agent process serves its pending approvals on a
//! unix socket under [`SOCKET_DIR`]; the CLI asks every socket there.
//!
//! Trust: the socket checks its peer with SO_PEERCRED. A process inside a
//! confined cgroup gets nothing; a user may decide only on calls of servers
//! it launched (root on all).
use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::oneshot,
};

/// Where agents publish their approval sockets.
pub const SOCKET_DIR: &str = "/run/mcp-warden/approvals";

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no pending approval {0} on this host")]
    Unknown(String),
    #[error("{0}")]
    Refused(String),
}

/// How a pending call was decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Approved { by: String },
    Denied { by: String },
    TimedOut,
}

struct Pending {
    info: Value,
    owner_uid: u32,
    tx: oneshot::Sender<Decision>,
}

/// The pending approvals of one agent process.
#[derive(Clone, Default)]
pub struct Approvals {
    pending: Arc<Mutex<BTreeMap<String, Pending>>>,
}

fn new_id() -> String {
    let mut b = [0u8; 6];
    // getrandom(2) through libc: no extra dependency for 6 bytes.
    // SAFETY: valid buffer and length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    hex::encode(b)
}

impl Approvals {
    /// Register a call that needs approval; returns its id and a future that
    /// resolves to the decision (a timeout is a denial).
    pub fn request(
        &self,
        info: Value,
        owner_uid: u32,
        timeout: Duration,
    ) -> (String, impl std::future::Future<Output = Decision> + Send) {
        let id = new_id();
        let (tx, rx) = oneshot::channel();
        let mut info = info;
        if let Value::Object(m) = &mut info {
            m.insert("approval_id".into(), Value::String(id.clone()));
        }
        if let Ok(mut p) = self.pending.lock() {
            p.insert(
                id.clone(),
                Pending {
                    info,
                    owner_uid,
                    tx,
                },
            );
        }
        let me = self.clone();
        let key = id.clone();
        let fut = async move {
            let d = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(d)) => d,
                Ok(Err(_)) | Err(_) => Decision::TimedOut,
            };
            if let Ok(mut p) = me.pending.lock() {
                p.remove(&key);
            }
            d
        };
        (id, fut)
    }

    /// Pending calls visible to `uid` (root sees all).
    pub fn list(&self, uid: u32) -> Vec<Value> {
        self.pending
            .lock()
            .map(|p| {
                p.values()
                    .filter(|x| uid == 0 || x.owner_uid == uid)
                    .map(|x| x.info.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Decide on `id` as user `uid` (`who` is recorded).
    pub fn decide(
        &self,
        id: &str,
        approve: bool,
        uid: u32,
        who: &str,
    ) -> Result<(), ApprovalError> {
        let mut p = self
            .pending
            .lock()
            .map_err(|_| ApprovalError::Refused("internal lock poisoned".into()))?;
        match p.get(id) {
            None => return Err(ApprovalError::Unknown(id.to_string())),
            Some(x) if uid != 0 && x.owner_uid != uid => {
                return Err(ApprovalError::Refused(format!(
                    "uid {uid} may not decide on a call of another user's server"
                )))
            }
            Some(_) => {}
        }
        if let Some(x) = p.remove(id) {
            let by = who.to_string();
            let _ = x.tx.send(if approve {
                Decision::Approved { by }
            } else {
                Decision::Denied { by }
            });
        }
        Ok(())
    }

    /// Serve this process's approvals on `<SOCKET_DIR>/<pid>.sock` until the
    /// returned guard is dropped.
    pub fn serve(&self) -> Result<ServeGuard, ApprovalError> {
        self.serve_at(Path::new(SOCKET_DIR))
    }

    pub fn serve_at(&self, dir: &Path) -> Result<ServeGuard, ApprovalError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| ApprovalError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("mkdir", dir))?;
        remove_stale(dir);
        let path = dir.join(format!("{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(io("bind", &path))?;
        // Anyone may connect; what they may do is decided per request.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .map_err(io("chmod", &path))?;
        let me = self.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.serve_one(s).await {
                        log::debug!("approval socket: {e}");
                    }
                });
            }
        });
        Ok(ServeGuard { path, task })
    }

    async fn serve_one(&self, s: UnixStream) -> std::io::Result<()> {
        let cred = s.peer_cred()?;
        let uid = cred.uid();
        let (rd, mut wr) = s.into_split();
        if let Some(pid) = cred.pid() {
            if is_confined(pid) {
                wr.write_all(b"{\"error\":\"refused: the peer is a confined process\"}\n")
                    .await?;
                return Ok(());
            }
        }
        let who = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        let mut lines = BufReader::new(rd).lines();
        while let Some(line) = lines.next_line().await? {
            let mut words = line.split_whitespace();
            let reply = match (words.next(), words.next()) {
                (Some("list"), None) => json!({"pending": self.list(uid)}),
                (Some(verb @ ("approve" | "deny")), Some(id)) => {
                    match self.decide(id, verb == "approve", uid, &who) {
                        Ok(()) => json!({"ok": true, "decided_by": who}),
                        Err(ApprovalError::Unknown(_)) => json!({"ok": false, "unknown": id}),
                        Err(e) => json!({"ok": false, "error": e.to_string()}),
                    }
                }
                _ => json!({"error": "usage: list | approve ID | deny ID"}),
            };
            let mut out = reply.to_string().into_bytes();
            out.push(b'\n');
            wr.write_all(&out).await?;
        }
        Ok(())
    }
}

/// Remove sockets of agents that are gone (killed before they could).
fn remove_stale(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        let pid = p
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// Is `pid` inside an mcp-warden instance cgroup?
fn is_confined(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|s| {
            s.lines()
                .any(|l| l.contains(&format!("/{}/", crate::confine::cgroup::PARENT)))
        })
        // Unreadable: treat as confined (fail closed).
        .unwrap_or(true)
}

/// Removes the socket when dropped.
pub struct ServeGuard {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ServeGuard {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `mcp-warden approve|deny ID` and `mcp-warden approvals`: ask every agent
/// socket on this host.
pub fn cli(verb: &str, id: Option<&str>) -> i32 {
    cli_at(Path::new(SOCKET_DIR), verb, id)
}

pub fn cli_at(dir: &Path, verb: &str, id: Option<&str>) -> i32 {
    let socks: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    let request = match id {
        Some(id) => format!("{verb} {id}\n"),
        None => "list\n".to_string(),
    };
    let mut decided = false;
    let mut listed = Vec::new();
    for sock in socks {
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&sock) else {
            continue;
        };
        use std::io::{BufRead, Write};
        if s.write_all(request.as_bytes()).is_err() {
            continue;
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        if std::io::BufReader::new(&s).read_line(&mut line).is_err() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if id.is_none() {
            if let Some(p) = v["pending"].as_array() {
                listed.extend(p.iter().cloned());
            }
        } else if v["ok"] == true {
            println!(
                "{verb}d {} (decided by {})",
                id.unwrap_or(""),
                v["decided_by"].as_str().unwrap_or("?")
            );
            decided = true;
        } else if let Some(e) = v["error"].as_str() {
            eprintln!("mcp-warden: {e}");
            return 1;
        }
    }
    match id {
        None => {
            if listed.is_empty() {
                println!("no tool call is waiting for approval");
            }
            for p in listed {
                println!(
                    "{}  server {}  tool {}  call {}  args sha256 {}",
                    p["approval_id"].as_str().unwrap_or("?"),
                    p["server"].as_str().unwrap_or("?"),
                    p["tool"].as_str().unwrap_or("?"),
                    p["call_id"],
                    p["args_sha256"].as_str().unwrap_or("?"),
                );
            }
            0
        }
        Some(id) if !decided => {
            eprintln!("mcp-warden: no pending approval {id} on this host");
            1
        }
        Some(_) => 0,
    }
}
