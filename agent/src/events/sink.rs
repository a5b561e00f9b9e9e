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
pub struct StderrDenials;

impl EventSink for StderrDenials {
    fn write(&mut self, rec: &Value) -> io::Result<()> {
        let d = rec.get("decision").and_then(Value::as_str);
        if matches!(d, Some("deny") | Some("audit")) {
            eprintln!("mcp-warden: {}", super::human_line(rec));
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
}
