//! The tool annotations each server declared, remembered between runs so a
//! change (a tool that was read-only no longer says so) is reported.
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where declared annotations are kept, per server name.
pub const STATE_DIR: &str = "/var/lib/mcp-warden/annotations";

fn path_for(dir: &Path, server: &str) -> PathBuf {
    dir.join(format!("{server}.json"))
}

/// Record `seen` for `server`; returns what was recorded before when it
/// differs. Unwritable state is logged, never fatal.
pub fn remember(server: &str, seen: &Value) -> Option<Value> {
    remember_in(Path::new(STATE_DIR), server, seen)
}

pub fn remember_in(dir: &Path, server: &str, seen: &Value) -> Option<Value> {
    let p = path_for(dir, server);
    let before: Option<Value> = std::fs::read(&p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if before.as_ref() != Some(seen) {
        let tmp = p.with_extension("json.tmp");
        let r = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, seen.to_string()))
            .and_then(|_| std::fs::rename(&tmp, &p));
        if let Err(e) = r {
            log::warn!("remembering tool annotations in {}: {e}", p.display());
        }
    }
    match before {
        Some(b) if &b != seen => Some(b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_change_once() {
        let dir = std::env::temp_dir().join(format!("mw-annot-{}", std::process::id()));
        let a = serde_json::json!({"t": {"readOnlyHint": true}});
        let b = serde_json::json!({"t": {"readOnlyHint": false}});
        assert_eq!(remember_in(&dir, "s", &a), None);
        assert_eq!(remember_in(&dir, "s", &a), None);
        assert_eq!(remember_in(&dir, "s", &b), Some(a));
        assert_eq!(remember_in(&dir, "s", &b), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
