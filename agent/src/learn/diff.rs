//! `mcp-warden learn --diff POLICY`: what a run does that POLICY does not
//! allow. The run is made under POLICY in audit mode, so every would-be
//! refusal is an `audit` record; they are grouped by where they happened
//! and what they touched.
use std::collections::BTreeMap;

use serde_json::{json, Value};

/// One behaviour the policy does not allow, with how often it was seen.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Drift {
    /// The tool(s) in flight, or None outside calls.
    pub tool: Option<String>,
    /// file | exec | net | tool_call
    pub kind: String,
    /// open (read / write ...), connect, exec, call ...
    pub op: String,
    pub target: String,
    /// The key that would allow it (`files.read`, `tools.allow`, ...).
    pub key: String,
}

/// Group the `audit` records of a run.
pub fn drift(records: &[Value]) -> BTreeMap<Drift, u64> {
    let mut out = BTreeMap::new();
    for r in records {
        let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        if s("decision") != "audit" {
            continue;
        }
        let kind = s("kind");
        let op = s("op");
        let (op, target, key) = match kind.as_str() {
            "file" => {
                let access = s("access");
                let key = if op == "open" && !access.contains("write") && !access.contains("create")
                {
                    "files.read"
                } else {
                    "files.write"
                };
                let op = if op == "open" {
                    format!("open {access}")
                } else {
                    op
                };
                (op, s("path"), key.to_string())
            }
            "exec" => (op, s("path"), "exec.allow".to_string()),
            "net" => match (r.get("addr").and_then(Value::as_str), r.get("port")) {
                (Some(a), Some(p)) => {
                    let a = if a.contains(':') {
                        format!("[{a}]")
                    } else {
                        a.to_string()
                    };
                    let key = if op == "bind" {
                        "network.bind"
                    } else {
                        "network.connect"
                    };
                    (op, format!("{a}:{p}"), key.to_string())
                }
                _ => (op, s("path"), "network.unix".to_string()),
            },
            "tool_call" => (op, s("tool"), "tools.allow".to_string()),
            _ => continue,
        };
        let tool = match kind.as_str() {
            "tool_call" => None,
            _ => match r.get("tool") {
                Some(Value::String(t)) => Some(t.clone()),
                _ => None,
            },
        };
        *out.entry(Drift {
            tool,
            kind,
            op,
            target,
            key,
        })
        .or_default() += 1;
    }
    out
}

/// One readable line.
pub fn human(d: &Drift, n: u64) -> String {
    let place = match &d.tool {
        Some(t) => format!("in tool {t}"),
        None => "outside tool calls".to_string(),
    };
    let times = if n == 1 {
        "1 time".to_string()
    } else {
        format!("{n} times")
    };
    let section = match &d.tool {
        Some(t) if d.key != "tools.allow" => format!("tools.{t}.{}", d.key),
        _ => d.key.clone(),
    };
    if d.kind == "tool_call" {
        return format!("tools/call {} ({times}); not in tools.allow", d.target);
    }
    format!(
        "{} {} {} {place} ({times}); not allowed by {section}",
        d.kind, d.op, d.target
    )
}

/// One JSON line.
pub fn json_line(d: &Drift, n: u64) -> Value {
    json!({
        "drift": true,
        "tool": d.tool,
        "kind": d.kind,
        "op": d.op,
        "target": d.target,
        "key": d.key,
        "count": n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_audit_records() {
        let recs = vec![
            json!({"kind": "file", "op": "open", "decision": "audit", "access": "read",
                   "path": "/etc/shadow", "tool": "read_file"}),
            json!({"kind": "file", "op": "open", "decision": "audit", "access": "read",
                   "path": "/etc/shadow", "tool": "read_file"}),
            json!({"kind": "net", "op": "connect", "decision": "audit", "addr": "::1",
                   "port": 9, "tool": null}),
            json!({"kind": "net", "op": "connect", "decision": "deny", "addr": "::1", "port": 9}),
            json!({"kind": "tool_call", "op": "call", "decision": "audit", "tool": "rm_rf"}),
        ];
        let d = drift(&recs);
        assert_eq!(d.len(), 3);
        let lines: Vec<String> = d.iter().map(|(k, n)| human(k, *n)).collect();
        assert!(lines.contains(
            &"file open read /etc/shadow in tool read_file (2 times); not allowed by tools.read_file.files.read".to_string()
        ), "{lines:#?}");
        assert!(lines
            .iter()
            .any(|l| l.contains("net connect [::1]:9 outside tool calls")));
        assert!(lines.contains(&"tools/call rm_rf (1 time); not in tools.allow".to_string()));
        let j = json_line(d.keys().next().unwrap(), 1);
        assert_eq!(j["drift"], true);
    }
}
