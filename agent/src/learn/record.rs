//! Recording: what a server did during a learn run, from the event records
//! the session emits (the same JSON records the audit log gets), keyed by
//! where it happened (the server outside calls, or a tool's calls), which
//! section of a policy would grant it, and the target.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use serde_json::Value;

use crate::{events::EventSink, policy::values::parse_addr};

/// Where an operation happened.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Outside every tool call: at start, between calls, in the background.
    Server,
    /// While a call of this tool was in flight.
    Tool(String),
}

/// The policy key that would grant an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    Read,
    Write,
    Exec,
    Connect,
    Bind,
    Unix,
}

impl Section {
    pub const ALL: [Section; 6] = [
        Section::Read,
        Section::Write,
        Section::Exec,
        Section::Connect,
        Section::Bind,
        Section::Unix,
    ];

    /// (table, key) in a policy: `files.read`, `network.connect`, ...
    pub fn key(self) -> (&'static str, &'static str) {
        match self {
            Section::Read => ("files", "read"),
            Section::Write => ("files", "write"),
            Section::Exec => ("exec", "allow"),
            Section::Connect => ("network", "connect"),
            Section::Bind => ("network", "bind"),
            Section::Unix => ("network", "unix"),
        }
    }

    pub fn is_path(self) -> bool {
        !matches!(self, Section::Connect | Section::Bind)
    }

    /// Verb for comments: "read", "connect", ...
    pub fn verb(self) -> &'static str {
        match self {
            Section::Read => "read",
            Section::Write => "write",
            Section::Exec => "exec",
            Section::Connect => "connect",
            Section::Bind => "bind",
            Section::Unix => "unix connect",
        }
    }
}

/// How often, and when, one target was seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub count: u64,
    /// Server scope: seen before the first tool call.
    pub at_start: bool,
    /// Server scope: seen after a tool call had begun.
    pub later: bool,
    /// A write that creates, removes or renames an entry: Landlock needs the
    /// right on the directory, not on the entry.
    pub dir_write: bool,
    /// A `name:port` peer: the addresses the server reached it at.
    pub resolved: BTreeSet<String>,
}

/// A DNS name the server resolved (from the DNS answers it received).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameSeen {
    /// Responses received for it.
    pub count: u64,
    /// Addresses it resolved to.
    pub addrs: BTreeSet<String>,
}

/// Everything observed in one run.
#[derive(Clone, Debug, Default)]
pub struct Observations {
    pub seen: BTreeMap<(Scope, Section, String), Seen>,
    /// Tool calls that reached the server, by tool (ok, error or cancelled).
    pub tools_called: BTreeMap<String, u64>,
    /// A tool call has begun (later server-scope events are "between calls").
    pub calls_began: bool,
    /// Records that carried a would-be refusal (`decision = audit`), kept
    /// only when `keep_audit` is set (`--diff`; a learn run would keep
    /// every record of the run).
    pub audit_records: Vec<Value>,
    pub keep_audit: bool,
    /// Records folded in so far (tells a snapshot writer something changed).
    pub records: u64,
    /// Refusals the policy cannot lift (seccomp, capabilities): noted only.
    pub hard_denials: BTreeMap<String, u64>,
    /// File operations whose path could not be resolved.
    pub unresolved: u64,
    /// DNS names the server resolved, by name.
    pub names: BTreeMap<String, NameSeen>,
    /// Address -> the name it was last given as an answer for: a connect to
    /// it is learned as `name:port`.
    pub answer_of: BTreeMap<IpAddr, String>,
}

impl Observations {
    /// Fold one event record in.
    pub fn ingest(&mut self, rec: &Value) {
        self.records += 1;
        let s = |k: &str| rec.get(k).and_then(Value::as_str).unwrap_or("");
        let kind = s("kind");
        if kind == "tool_call" {
            let tool = s("tool");
            if matches!(s("outcome"), "ok" | "error" | "cancelled") && !tool.is_empty() {
                *self.tools_called.entry(tool.to_string()).or_default() += 1;
            }
            if s("decision") == "audit" && self.keep_audit {
                self.audit_records.push(rec.clone());
            }
            return;
        }
        if !matches!(kind, "file" | "exec" | "net") {
            return;
        }
        let op = s("op");
        if kind == "net" && op == "dns" {
            self.ingest_dns(rec);
            return;
        }
        let decision = s("decision");
        if decision == "audit" && self.keep_audit {
            self.audit_records.push(rec.clone());
        }
        if decision == "deny" {
            let what = format!("{kind} {op} {}", s("path"));
            *self.hard_denials.entry(what).or_default() += 1;
            return;
        }
        // Allowed operations are the ones every policy grants (the launched
        // command); only would-be refusals become rules.
        if decision != "audit" {
            return;
        }
        let mut items: Vec<(Section, String, bool)> = Vec::new();
        // The address a `name:port` peer was reached at.
        let mut via: Option<String> = None;
        match kind {
            "file" => {
                let path = s("path");
                if !path.starts_with('/') {
                    self.unresolved += 1;
                    return;
                }
                if op == "open" {
                    let access = s("access");
                    let create = access.contains("create");
                    if access.split(',').any(|a| a == "read") {
                        items.push((Section::Read, path.to_string(), false));
                    }
                    if access.contains("write") || create || access.contains("truncate") {
                        items.push((Section::Write, path.to_string(), create));
                    }
                } else {
                    // unlink, mkdir, rename, link, symlink: the directory
                    // changes; truncate, chmod, chown: the file does.
                    let dir = matches!(op, "unlink" | "mkdir" | "rename" | "link" | "symlink");
                    items.push((Section::Write, path.to_string(), dir));
                }
            }
            "exec" => {
                if op == "exec" && s("path").starts_with('/') {
                    items.push((Section::Exec, s("path").to_string(), false));
                }
            }
            _ if s("family") == "unix" => {
                // connect or sendmsg to a unix socket: a path, or an
                // abstract name written with a leading '@'.
                let p = s("path");
                if p.starts_with('/') || p.starts_with('@') {
                    items.push((Section::Unix, p.to_string(), false));
                } else if !p.is_empty() {
                    self.unresolved += 1;
                }
            }
            _ => match op {
                "connect" | "sendmsg" | "bind" => {
                    let (Some(addr), Some(port)) = (
                        rec.get("addr").and_then(Value::as_str),
                        rec.get("port").and_then(Value::as_u64),
                    ) else {
                        return;
                    };
                    let Ok(ip) = addr.parse::<IpAddr>() else {
                        return;
                    };
                    let ip = ip.to_canonical();
                    let host = match ip {
                        IpAddr::V6(v6) => format!("[{v6}]"),
                        IpAddr::V4(v4) => v4.to_string(),
                    };
                    let target = format!("{host}:{port}");
                    if op == "bind" {
                        items.push((Section::Bind, target, false));
                    } else {
                        // A peer the server found by name is learned by
                        // that name (when a policy can say it).
                        match self.answer_of.get(&ip).map(|n| format!("{n}:{port}")) {
                            Some(named) if parse_addr(&named, false).is_ok() => {
                                items.push((Section::Connect, named, false));
                                via = Some(ip.to_string());
                            }
                            _ => items.push((Section::Connect, target, false)),
                        }
                    }
                }
                _ => {}
            },
        }
        let tools: Vec<String> = rec
            .get("calls_in_flight")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.get("tool").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let scopes: Vec<Scope> = if tools.is_empty() {
            vec![Scope::Server]
        } else {
            // Overlapping calls: every tool in flight is credited (the
            // kernel cannot tell which one did it).
            tools.into_iter().map(Scope::Tool).collect()
        };
        for scope in scopes {
            for (section, target, dir_write) in &items {
                let e = self
                    .seen
                    .entry((scope.clone(), *section, target.clone()))
                    .or_default();
                e.count += 1;
                e.dir_write |= *dir_write;
                if let Some(ip) = &via {
                    e.resolved.insert(ip.clone());
                }
                if scope == Scope::Server {
                    if self.calls_began {
                        e.later = true;
                    } else {
                        e.at_start = true;
                    }
                }
            }
        }
    }

    /// A DNS response the server received: remember which name each
    /// answer address belongs to (the latest name wins).
    fn ingest_dns(&mut self, rec: &Value) {
        let Some(name) = rec.get("name").and_then(Value::as_str) else {
            return;
        };
        let answers: Vec<IpAddr> = rec
            .get("answers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|s| s.parse::<IpAddr>().ok())
                    .map(|ip| ip.to_canonical())
                    .collect()
            })
            .unwrap_or_default();
        let n = self.names.entry(name.to_string()).or_default();
        n.count += 1;
        for ip in answers {
            n.addrs.insert(ip.to_string());
            self.answer_of.insert(ip, name.to_string());
        }
    }

    /// A tools/call is about to be forwarded (from the event stream: the
    /// first attributed record also marks it).
    pub fn note_call_began(&mut self) {
        self.calls_began = true;
    }
}

/// An event sink that folds every record into shared [`Observations`].
pub struct Recorder(pub Arc<Mutex<Observations>>);

impl EventSink for Recorder {
    fn write(&mut self, rec: &Value) -> io::Result<()> {
        let mut o = self
            .0
            .lock()
            .map_err(|_| io::Error::other("recorder lock poisoned"))?;
        let in_call = rec
            .get("calls_in_flight")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        let call_record = rec.get("kind").and_then(Value::as_str) == Some("tool_call");
        if in_call || call_record {
            o.note_call_began();
        }
        o.ingest(rec);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_become_observations() {
        let mut o = Observations {
            keep_audit: true,
            ..Default::default()
        };
        o.ingest(&json!({"kind": "file", "op": "open", "decision": "audit",
            "access": "read", "path": "/usr/lib/x.so", "calls_in_flight": []}));
        o.note_call_began();
        o.ingest(&json!({"kind": "file", "op": "open", "decision": "audit",
            "access": "write,create", "path": "/d/new", "calls_in_flight": [{"tool": "w", "call_id": 1}]}));
        o.ingest(&json!({"kind": "net", "op": "connect", "decision": "audit",
            "addr": "::ffff:127.0.0.1", "port": 80, "calls_in_flight": [{"tool": "f"}, {"tool": "w"}]}));
        o.ingest(&json!({"kind": "net", "op": "connect", "decision": "audit",
            "addr": "::1", "port": 53, "calls_in_flight": []}));
        o.ingest(
            &json!({"kind": "exec", "op": "exec", "decision": "allow", "path": "/usr/bin/node"}),
        );
        o.ingest(
            &json!({"kind": "net", "op": "sendmsg", "family": "unix", "decision": "audit",
            "path": "/run/systemd/journal/socket", "calls_in_flight": []}),
        );
        o.ingest(&json!({"kind": "tool_call", "tool": "w", "outcome": "ok"}));
        o.ingest(&json!({"kind": "tool_call", "tool": "x", "outcome": "refused"}));
        let k = |s: Scope, sec, t: &str| o.seen.get(&(s, sec, t.to_string())).cloned();
        let r = k(Scope::Server, Section::Read, "/usr/lib/x.so").unwrap();
        assert!(r.at_start && !r.later);
        assert!(
            k(Scope::Tool("w".into()), Section::Write, "/d/new")
                .unwrap()
                .dir_write
        );
        assert!(k(Scope::Tool("w".into()), Section::Read, "/d/new").is_none());
        assert!(k(Scope::Tool("f".into()), Section::Connect, "127.0.0.1:80").is_some());
        assert!(k(Scope::Tool("w".into()), Section::Connect, "127.0.0.1:80").is_some());
        assert!(
            k(Scope::Server, Section::Connect, "[::1]:53")
                .unwrap()
                .later
        );
        assert!(k(Scope::Server, Section::Unix, "/run/systemd/journal/socket").is_some());
        assert_eq!(o.seen.len(), 6);
        assert_eq!(o.tools_called.get("w"), Some(&1));
        assert_eq!(o.tools_called.get("x"), None);
        assert_eq!(o.audit_records.len(), 5);
    }

    #[test]
    fn peers_found_by_name_are_learned_by_name() {
        let mut o = Observations::default();
        let dns = |name: &str, answers: &[&str]| {
            json!({"kind": "net", "op": "dns", "decision": "allow", "name": name,
                "answers": answers, "addr": "127.0.0.53", "port": 53, "calls_in_flight": []})
        };
        let connect = |addr: &str, port: u64, tool: &str| {
            json!({"kind": "net", "op": "connect", "decision": "audit", "addr": addr,
                "port": port, "calls_in_flight": [{"tool": tool, "call_id": 1}]})
        };
        o.ingest(&dns("api.example.test", &["127.0.0.77", "::1"]));
        o.ingest(&dns("api.example.test", &[]));
        o.ingest(&dns("gone.example.test", &[]));
        o.ingest(&connect("::ffff:127.0.0.77", 8443, "fetch"));
        o.ingest(&connect("::1", 8443, "fetch"));
        o.ingest(&connect("127.0.0.78", 8443, "fetch"));
        // The same address answered later for another name: the latest wins.
        o.ingest(&dns("cdn.example.test", &["127.0.0.77"]));
        o.ingest(&connect("127.0.0.77", 443, "fetch"));
        let fetch = Scope::Tool("fetch".into());
        let named = o
            .seen
            .get(&(
                fetch.clone(),
                Section::Connect,
                "api.example.test:8443".into(),
            ))
            .unwrap();
        assert_eq!(named.count, 2);
        assert_eq!(
            named.resolved.iter().collect::<Vec<_>>(),
            vec!["127.0.0.77", "::1"]
        );
        assert!(o
            .seen
            .contains_key(&(fetch.clone(), Section::Connect, "127.0.0.78:8443".into())));
        assert!(o
            .seen
            .contains_key(&(fetch, Section::Connect, "cdn.example.test:443".into())));
        assert_eq!(o.names["api.example.test"].count, 2);
        assert!(o.names["gone.example.test"].addrs.is_empty());
        assert_eq!(o.seen.len(), 3);
    }
}
