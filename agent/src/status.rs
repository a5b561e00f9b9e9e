//! `mcp-warden status` and `mcp-warden events`: clients of the agent's
//! control socket (events also read the audit log directly).
use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use crate::control::{client::Client, response_error, Request};

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("mcp-warden: starting the runtime: {e}");
            None
        }
    }
}

/// `mcp-warden status [--json]`
pub fn status_main(json: bool) -> i32 {
    let Some(rt) = runtime() else { return 1 };
    let sock = crate::config::client_socket();
    let res = rt.block_on(async {
        let mut c = Client::connect(&sock).await?;
        c.request_within(&Request::Status, Duration::from_secs(5))
            .await
    });
    let v = match res {
        Ok(v) => v,
        Err(e) => {
            eprintln!("mcp-warden status: {e}");
            return 1;
        }
    };
    if json {
        println!("{v:#}");
    } else {
        print!("{}", render_status(&v));
    }
    0
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The human form of a status response.
pub fn render_status(v: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "agent: pid {}, started {}, backend {}, programs {} (pins under {})\n",
        s(&v["agent_pid"]),
        s(&v["started"]),
        s(&v["backend"]),
        s(&v["programs"]),
        s(&v["pin_root"]),
    ));
    out.push_str(&format!(
        "policies: {} (user policies {})\n",
        s(&v["policy_dir"]),
        if v["allow_user_policies"].as_bool() == Some(true) {
            "accepted"
        } else {
            "refused"
        }
    ));
    if let Some(h) = v["hooks"].as_object() {
        let on: Vec<&str> = h
            .iter()
            .filter(|(_, x)| x.as_bool() == Some(true))
            .map(|(k, _)| k.as_str())
            .collect();
        let off: Vec<&str> = h
            .iter()
            .filter(|(_, x)| x.as_bool() != Some(true))
            .map(|(k, _)| k.as_str())
            .collect();
        out.push_str(&format!(
            "hooks in force ({}): {}\n",
            on.len(),
            on.join(" ")
        ));
        if !off.is_empty() {
            out.push_str(&format!("hooks NOT in force: {}\n", off.join(" ")));
        }
    }
    let insts = v["instances"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("instances: {}\n", insts.len()));
    for i in &insts {
        let calls = i["calls_in_flight"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        out.push_str(&format!(
            "  {}  server={} pid={} uid={} policy={} calls_in_flight={} clients={}\n",
            s(&i["instance"]),
            s(&i["server"]),
            s(&i["pid"]),
            s(&i["uid"]),
            s(&i["policy_source"]),
            calls,
            s(&i["clients_attached"]),
        ));
    }
    if let Some(c) = v["counters"].as_object() {
        let parts: Vec<String> = c.iter().map(|(k, n)| format!("{k}={n}")).collect();
        out.push_str(&format!("records: {}\n", parts.join(" ")));
    }
    if let Some(c) = v["events_lost"].as_object() {
        let parts: Vec<String> = c.iter().map(|(k, n)| format!("{k}={n}")).collect();
        out.push_str(&format!("events lost: {}\n", parts.join(" ")));
    }
    out
}

fn matches(rec: &Value, server: Option<&str>) -> bool {
    match server {
        Some(sv) => rec.get("server").and_then(Value::as_str) == Some(sv),
        None => true,
    }
}

/// `mcp-warden events [--follow] [--server NAME] [--log FILE]`
pub fn events_main(
    follow: bool,
    server: Option<String>,
    log: Option<PathBuf>,
    config: Option<PathBuf>,
) -> i32 {
    if !follow {
        let path = match log {
            Some(p) => p,
            None => match audit_log_of(config.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("mcp-warden events: {e}");
                    return 1;
                }
            },
        };
        return print_log(&path, server.as_deref());
    }
    let Some(rt) = runtime() else { return 1 };
    let sock = crate::config::client_socket();
    let res: Result<(), crate::control::ControlError> = rt.block_on(async {
        let mut c = Client::connect(&sock).await?;
        c.send(&Request::Events {
            server,
            instance: None,
        })
        .await?;
        let stdout = std::io::stdout();
        while let Some(rec) = c.next().await? {
            if rec.get("ok").is_some() {
                if let Some(e) = response_error(&rec) {
                    return Err(crate::control::ControlError::Refused(e));
                }
            }
            let mut lock = stdout.lock();
            if writeln!(lock, "{rec}").and_then(|_| lock.flush()).is_err() {
                break;
            }
        }
        Ok(())
    });
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mcp-warden events: {e}");
            1
        }
    }
}

/// The agent config `events` reads the audit log's path from when none is
/// given.
pub const DEFAULT_AGENT_CONFIG: &str = "/etc/mcp-warden/agent.toml";

/// The audit log the agent writes: `audit_log` of `config`, else of the
/// installed config when there is one, else the built-in default.
fn audit_log_of(config: Option<&Path>) -> Result<PathBuf, crate::config::ConfigError> {
    let installed = Path::new(DEFAULT_AGENT_CONFIG);
    let path = match config {
        Some(p) => Some(p),
        None if installed.exists() => Some(installed),
        None => None,
    };
    Ok(crate::config::Config::load(path)?.audit_log)
}

fn print_log(path: &Path, server: Option<&str>) -> i32 {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "mcp-warden events: {}: {e} (the audit log is root's; `mcp-warden events \
                 --follow` streams your own instances' events from the agent)",
                path.display()
            );
            return 1;
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::BufReader::new(f).lines() {
        let Ok(line) = line else { break };
        let Ok(rec) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if matches(&rec, server) && writeln!(out, "{line}").is_err() {
            break;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn human_status() {
        let v = json!({
            "ok": true, "agent_pid": 42, "started": "t", "backend": "fallback",
            "programs": "adopted", "pin_root": "/sys/fs/bpf/mcp-warden",
            "policy_dir": "/etc/mcp-warden/policies", "allow_user_policies": false,
            "hooks": {"mw_connect4": true, "cgroup_unix_connect": false},
            "instances": [{"instance": "git-1-2", "server": "git", "pid": 7, "uid": 1000,
                           "policy_source": "file:/etc/mcp-warden/policies/git.toml",
                           "calls_in_flight": [{"call_id": 3, "tool": "log"}],
                           "clients_attached": 1}],
            "counters": {"net/deny": 2}, "events_lost": {"net": 0},
        });
        let s = render_status(&v);
        assert!(s.contains("programs adopted"), "{s}");
        assert!(s.contains("hooks NOT in force: cgroup_unix_connect"), "{s}");
        assert!(s.contains("git-1-2  server=git pid=7 uid=1000"), "{s}");
        assert!(s.contains("calls_in_flight=1"), "{s}");
        assert!(s.contains("net/deny=2"), "{s}");
        assert!(s.contains("events lost: net=0"), "{s}");
    }

    #[test]
    fn events_reads_the_audit_log_the_agent_config_names() {
        let dir = std::env::temp_dir().join(format!("mw-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("agent.toml");
        std::fs::write(&cfg, "audit_log = \"/srv/audit/a.jsonl\"\n").unwrap();
        assert_eq!(
            audit_log_of(Some(&cfg)).unwrap(),
            PathBuf::from("/srv/audit/a.jsonl")
        );
        std::fs::write(&cfg, "audit_log = 3\n").unwrap();
        assert!(
            audit_log_of(Some(&cfg)).is_err(),
            "a bad config is an error"
        );
        assert!(audit_log_of(Some(&dir.join("missing.toml"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
