//! Where records go: JSON-lines files (flushed per record, reopened on
//! SIGHUP for log rotation) and a human line on stderr for denials.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde_json::Value;

pub trait EventSink: Send {
    fn write(&mut self, rec: &Value) -> io::Result<()>;
    /// Reopen the underlying file (after rotation). Default: nothing.
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Append-only JSON-lines file, mode 0600 when created.
pub struct JsonLinesFile {
    path: PathBuf,
    file: File,
}

impl JsonLinesFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Self::open_file(path)?,
        })
    }

    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }
}

impl EventSink for JsonLinesFile {
    fn write(&mut self, rec: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
        line.push(b'\n');
        // One write per record: O_APPEND keeps lines whole between writers.
        self.file.write_all(&line)
    }

    fn reopen(&mut self) -> io::Result<()> {
        self.file = Self::open_file(&self.path)?;
        Ok(())
    }
}

/// Human-readable denials on stderr (never stdout: that is the MCP channel).
///
/// stderr belongs to whoever started the server (an MCP client, a
/// terminal, a test) and nothing obliges it to read: a full pipe must never
/// stall the event path (and through it the relay). Lines go through a
/// bounded queue to a writer thread; when the queue is full a line is
/// dropped and counted, and the count is printed once the reader catches
/// up. Every record still reaches the audit log and the `--events` file.
pub struct StderrDenials {
    tx: Option<std::sync::mpsc::SyncSender<String>>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Lines that may wait for a slow stderr reader.
const STDERR_QUEUE: usize = 256;

impl StderrDenials {
    pub fn new() -> Self {
        Self::to(Box::new(io::stderr()))
    }

    fn to(mut out: Box<dyn Write + Send>) -> Self {
        use std::sync::atomic::Ordering;
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(STDERR_QUEUE);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = dropped.clone();
        let spawned = std::thread::Builder::new()
            .name("mw-stderr".into())
            .spawn(move || {
                let mut reported = 0;
                for line in rx {
                    let now = seen.load(Ordering::Relaxed);
                    if now > reported {
                        let _ = writeln!(
                            out,
                            "mcp-warden: {} denial lines not shown here (stderr was not read fast enough; the audit log has every event)",
                            now - reported
                        );
                        reported = now;
                    }
                    if writeln!(out, "mcp-warden: {line}").is_err() {
                        break;
                    }
                }
            });
        match spawned {
            Ok(_) => Self {
                tx: Some(tx),
                dropped,
            },
            Err(e) => {
                log::warn!("no thread for denial lines on stderr: {e}");
                Self { tx: None, dropped }
            }
        }
    }

    /// Lines dropped because stderr was not read.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for StderrDenials {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for StderrDenials {
    fn write(&mut self, rec: &Value) -> io::Result<()> {
        let d = rec.get("decision").and_then(Value::as_str);
        if !matches!(d, Some("deny") | Some("audit")) {
            return Ok(());
        }
        let Some(tx) = &self.tx else { return Ok(()) };
        match tx.try_send(super::human_line(rec)) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // The writer ended (stderr closed): nobody to tell.
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => self.tx = None,
        }
        Ok(())
    }
}

/// Every sink of a process. A sink that fails is reported once per failure
/// on stderr and counted; the other sinks still get the record.
#[derive(Default)]
pub struct Sinks {
    sinks: Vec<Box<dyn EventSink>>,
    pub write_errors: u64,
}

impl Sinks {
    pub fn push(&mut self, s: Box<dyn EventSink>) {
        self.sinks.push(s);
    }

    pub fn emit(&mut self, rec: &Value) {
        for s in &mut self.sinks {
            if let Err(e) = s.write(rec) {
                self.write_errors += 1;
                log::error!("writing an event: {e}");
            }
        }
    }

    pub fn reopen(&mut self) {
        for s in &mut self.sinks {
            if let Err(e) = s.reopen() {
                log::error!("reopening an event log: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_append_and_reopen() {
        let dir = std::env::temp_dir().join(format!("mw-sink-{}", std::process::id()));
        let p = dir.join("a.jsonl");
        let mut f = JsonLinesFile::open(&p).expect("open");
        f.write(&serde_json::json!({"a": 1})).expect("write");
        std::fs::rename(&p, dir.join("a.jsonl.1")).expect("rotate");
        f.reopen().expect("reopen");
        f.write(&serde_json::json!({"b": 2})).expect("write");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "{\"b\":2}\n");
        assert_eq!(
            std::fs::read_to_string(dir.join("a.jsonl.1")).expect("read"),
            "{\"a\":1}\n"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A writer that blocks until released, like a pipe nobody reads.
    struct Stuck(
        std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        std::sync::mpsc::Receiver<()>,
    );

    impl Write for Stuck {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.1.recv();
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_unread_stderr_never_blocks_and_counts_what_it_dropped() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (release, gate) = std::sync::mpsc::channel();
        let mut sink = StderrDenials::to(Box::new(Stuck(buf.clone(), gate)));
        let deny = serde_json::json!({"decision": "deny", "kind": "net", "op": "connect"});
        let n = STDERR_QUEUE as u64 * 4;
        for _ in 0..n {
            sink.write(&deny).expect("never fails");
        }
        // The writer holds at most one line, the queue the next ones: the
        // rest were dropped, not waited for.
        let dropped = sink.dropped();
        assert!(
            dropped >= n - STDERR_QUEUE as u64 - 1,
            "dropped {dropped} of {n}"
        );
        for _ in 0..(4 * n) {
            let _ = release.send(());
        }
        // The queued lines drain; the first one after the drops says how
        // many were dropped.
        drop(sink);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = String::from_utf8_lossy(&buf.lock().expect("lock")).into_owned();
            // The writer may look at the count while drops still happen:
            // then the notices split it.
            let told: u64 = text
                .lines()
                .filter_map(|l| l.strip_prefix("mcp-warden: "))
                .filter_map(|l| l.strip_suffix(" denial lines not shown here (stderr was not read fast enough; the audit log has every event)"))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum();
            if told == dropped {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no drop notice in {text:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
