//! Events: decode what the kernel wrote into the ring buffer, enrich it with
//! the instance and the tool call it happened in, and hand it to the sinks
//! (JSON-lines files, the log, metrics).
//!
//! The JSON-lines record is a contract (shared/design.md, "Event record").
pub mod dns;
pub mod reader;
pub mod resolve;
pub mod sink;

use std::net::{Ipv4Addr, Ipv6Addr};

use mcp_warden_common::{decision, kind, op, Event};
use serde_json::{json, Map, Value};

pub use sink::{EventSink, Sinks};

/// Decode one ring-buffer record. `None` if it is not a whole `Event`.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is repr(C), Copy, every bit pattern is
    // valid; read_unaligned copes with any alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn kind_name(k: u32) -> &'static str {
    match k {
        kind::NET => "net",
        kind::FILE => "file",
        kind::EXEC => "exec",
        kind::PROC => "exec",
        _ => "unknown",
    }
}

pub fn op_name(o: u32) -> &'static str {
    match o {
        op::CONNECT => "connect",
        op::SENDMSG => "sendmsg",
        op::BIND => "bind",
        op::SOCK_CREATE => "socket",
        op::UNIX_CONNECT => "unix_connect",
        op::EXEC => "exec",
        op::EXIT => "exit",
        op::OPEN => "open",
        op::UNLINK => "unlink",
        op::MKDIR => "mkdir",
        op::RENAME => "rename",
        op::LINK => "link",
        op::SYMLINK => "symlink",
        op::TRUNCATE => "truncate",
        op::CHMOD => "chmod",
        op::CHOWN => "chown",
        op::RMDIR => "rmdir",
        op::PTRACE => "ptrace",
        op::DNS => "dns",
        _ => "unknown",
    }
}

pub fn decision_name(d: u32) -> &'static str {
    match d {
        decision::ALLOW => "allow",
        decision::DENY => "deny",
        decision::AUDIT => "audit",
        _ => "unknown",
    }
}

pub fn family_name(f: u32) -> &'static str {
    match f as i32 {
        libc::AF_INET => "inet",
        libc::AF_INET6 => "inet6",
        libc::AF_UNIX => "unix",
        libc::AF_PACKET => "packet",
        _ => "other",
    }
}

/// `read`, `write`, `read,write`, plus `create`/`truncate`, from open flags.
pub fn open_access(flags: u32) -> String {
    let flags = flags as i32;
    let mut v = vec![match flags & libc::O_ACCMODE {
        libc::O_WRONLY => "write",
        libc::O_RDWR => "read,write",
        _ => "read",
    }];
    if flags & libc::O_CREAT != 0 {
        v.push("create");
    }
    if flags & libc::O_TRUNC != 0 {
        v.push("truncate");
    }
    v.join(",")
}

/// Label of a kernel stats slot in `mcp_warden_events_lost_total{kind}`.
pub fn lost_kind_name(slot: u32) -> Option<&'static str> {
    match slot {
        kind::NET => Some("net"),
        kind::FILE => Some("file"),
        kind::EXEC => Some("exec"),
        kind::PROC => Some("process"),
        kind::SYSCALL => Some("syscall_count"),
        kind::BYTES => Some("byte_count"),
        _ => None,
    }
}

/// The tool call(s) a kernel event happened in.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Attribution {
    /// (call id as sent by the client, tool name) of every call in flight.
    pub calls: Vec<(Value, String)>,
}

impl Attribution {
    /// `tool` of the record: the tool when one call was in flight, the
    /// comma-joined tools when several, null when idle.
    pub fn tool(&self) -> Value {
        match self.calls.len() {
            0 => Value::Null,
            1 => Value::String(self.calls[0].1.clone()),
            _ => {
                let mut tools: Vec<&str> = self.calls.iter().map(|(_, t)| t.as_str()).collect();
                tools.sort_unstable();
                tools.dedup();
                Value::String(tools.join(","))
            }
        }
    }

    pub fn call_id(&self) -> Value {
        match self.calls.len() {
            1 => self.calls[0].0.clone(),
            _ => Value::Null,
        }
    }

    /// Bounded label for metrics: the tool, or "(idle)", or "(several)".
    pub fn tool_label(&self) -> String {
        match self.calls.len() {
            0 => "(idle)".to_string(),
            1 => self.calls[0].1.clone(),
            _ => "(several)".to_string(),
        }
    }
}

/// Identity of the instance an event belongs to.
#[derive(Clone, Debug, Default)]
pub struct InstanceInfo {
    pub server: String,
    pub instance: String,
    pub policy_source: String,
    pub backend: String,
    pub uid: u32,
    pub user: String,
    pub host: String,
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

fn base(kind: &str, info: &InstanceInfo) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("ts".into(), Value::String(now_rfc3339()));
    m.insert("kind".into(), Value::String(kind.into()));
    m.insert("server".into(), Value::String(info.server.clone()));
    m.insert("instance".into(), Value::String(info.instance.clone()));
    m.insert("host".into(), Value::String(info.host.clone()));
    m.insert("uid".into(), json!(info.uid));
    m.insert("user".into(), Value::String(info.user.clone()));
    m
}

/// The JSON record of a kernel event.
pub fn kernel_record(ev: &Event, info: &InstanceInfo, attr: &Attribution) -> Value {
    let mut m = base(kind_name(ev.kind), info);
    m.insert("op".into(), Value::String(op_name(ev.op).into()));
    m.insert(
        "decision".into(),
        Value::String(decision_name(ev.decision).into()),
    );
    m.insert("pid".into(), json!(ev.pid));
    m.insert("comm".into(), Value::String(cstr(&ev.comm)));
    let exe = std::fs::read_link(format!("/proc/{}/exe", ev.pid))
        .ok()
        .map(|p| Value::String(p.to_string_lossy().into_owned()))
        .unwrap_or(Value::Null);
    m.insert("exe".into(), exe);
    m.insert("tool".into(), attr.tool());
    m.insert("call_id".into(), attr.call_id());
    m.insert(
        "calls_in_flight".into(),
        Value::Array(
            attr.calls
                .iter()
                .map(|(id, tool)| json!({"call_id": id, "tool": tool}))
                .collect(),
        ),
    );
    m.insert("epoch".into(), json!(ev.epoch));
    m.insert("backend".into(), Value::String(info.backend.clone()));
    match ev.kind {
        kind::NET => {
            m.insert(
                "family".into(),
                Value::String(family_name(ev.family).into()),
            );
            match ev.family as i32 {
                libc::AF_INET if ev.op != op::SOCK_CREATE => {
                    let a = Ipv4Addr::new(ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]);
                    m.insert("addr".into(), Value::String(a.to_string()));
                    m.insert("port".into(), json!(ev.port));
                }
                libc::AF_INET6 if ev.op != op::SOCK_CREATE => {
                    let a = Ipv6Addr::from(ev.addr);
                    m.insert("addr".into(), Value::String(a.to_string()));
                    m.insert("port".into(), json!(ev.port));
                }
                libc::AF_UNIX => {
                    m.insert("path".into(), Value::String(cstr(&ev.path)));
                }
                _ => {}
            }
            if ev.op == op::DNS {
                dns_fields(ev, &mut m);
            } else {
                m.insert(
                    "sock_type".into(),
                    Value::String(
                        match ev.sock_type as i32 {
                            libc::SOCK_STREAM => "stream",
                            libc::SOCK_DGRAM => "dgram",
                            libc::SOCK_RAW => "raw",
                            libc::SOCK_SEQPACKET => "seqpacket",
                            _ => "other",
                        }
                        .into(),
                    ),
                );
            }
        }
        kind::FILE | kind::EXEC | kind::PROC => {
            if ev.kind == kind::FILE && ev.op == op::OPEN {
                m.insert("access".into(), Value::String(open_access(ev.protocol)));
            }
            if ev.op == op::PTRACE {
                m.insert("target_pid".into(), json!(ev.port));
            }
            let p = cstr(&ev.path);
            m.insert(
                "path".into(),
                if p.is_empty() {
                    Value::Null
                } else {
                    Value::String(p)
                },
            );
        }
        _ => {}
    }
    if ev.errno != 0 {
        m.insert("errno".into(), json!(ev.errno));
    }
    m.insert(
        "policy_source".into(),
        Value::String(info.policy_source.clone()),
    );
    Value::Object(m)
}

/// A DNS response (`op::DNS`): the name asked for, the answers, and no
/// process (the kernel saw the packet arrive, not who reads it).
fn dns_fields(ev: &Event, m: &mut Map<String, Value>) {
    for k in ["pid", "comm", "exe"] {
        m.insert(k.into(), Value::Null);
    }
    m.insert(
        "protocol".into(),
        Value::String(
            if ev.protocol == libc::IPPROTO_TCP as u32 {
                "tcp"
            } else {
                "udp"
            }
            .into(),
        ),
    );
    let whole = ev.sock_type as usize;
    let copied = whole.min(ev.path.len());
    match dns::parse(&ev.path[..copied], whole) {
        Some(a) => {
            m.insert("name".into(), Value::String(a.name));
            m.insert("rcode".into(), Value::String(a.rcode));
            m.insert(
                "answers".into(),
                Value::Array(
                    a.addrs
                        .iter()
                        .map(|ip| Value::String(ip.to_string()))
                        .collect(),
                ),
            );
            if a.cut > 0 {
                m.insert("answers_cut".into(), json!(a.cut));
            }
        }
        None => {
            m.insert("name".into(), Value::Null);
        }
    }
}

/// Outcome of a finished tool call.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCallRecord {
    pub tool: String,
    pub call_id: Value,
    pub outcome: &'static str,
    pub duration_ms: f64,
    pub args_hash: Option<String>,
    pub syscalls: Option<Map<String, Value>>,
    /// Other calls were in flight during part of this one: the counts of
    /// those stretches are shared by every call in flight.
    pub syscalls_shared: bool,
    pub reason: Option<String>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Network payload bytes sent and received by the server's sockets
    /// during the call (shared like the syscall counts).
    pub net_bytes_out: u64,
    pub net_bytes_in: u64,
}

pub fn tool_call_record(info: &InstanceInfo, c: &ToolCallRecord) -> Value {
    let mut m = base("tool_call", info);
    m.insert("tool".into(), Value::String(c.tool.clone()));
    m.insert("call_id".into(), c.call_id.clone());
    m.insert("outcome".into(), Value::String(c.outcome.into()));
    m.insert("duration_ms".into(), json!(c.duration_ms));
    m.insert(
        "args_sha256".into(),
        c.args_hash
            .clone()
            .map(Value::String)
            .unwrap_or(Value::Null),
    );
    m.insert(
        "syscalls".into(),
        c.syscalls.clone().map(Value::Object).unwrap_or(Value::Null),
    );
    m.insert("syscalls_shared".into(), json!(c.syscalls_shared));
    m.insert("request_bytes".into(), json!(c.request_bytes));
    m.insert("response_bytes".into(), json!(c.response_bytes));
    m.insert("net_bytes_out".into(), json!(c.net_bytes_out));
    m.insert("net_bytes_in".into(), json!(c.net_bytes_in));
    if let Some(r) = &c.reason {
        m.insert("reason".into(), Value::String(r.clone()));
    }
    m.insert(
        "policy_source".into(),
        Value::String(info.policy_source.clone()),
    );
    Value::Object(m)
}

/// A `server` lifecycle record (started, exited) or an `agent` record.
pub fn lifecycle_record(kind: &str, info: &InstanceInfo, fields: Value) -> Value {
    let mut m = base(kind, info);
    if let Value::Object(extra) = fields {
        m.extend(extra);
    }
    Value::Object(m)
}

/// One human line for a denial, for the terminal.
pub fn human_line(rec: &Value) -> String {
    let g = |k: &str| rec.get(k).cloned().unwrap_or(Value::Null);
    let s = |v: Value| match v {
        Value::String(s) => s,
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let target = match (rec.get("addr"), rec.get("port"), rec.get("path")) {
        (Some(a), Some(p), _) => {
            let a = s(a.clone());
            if a.contains(':') {
                format!("[{a}]:{}", s(p.clone()))
            } else {
                format!("{a}:{}", s(p.clone()))
            }
        }
        (_, _, Some(p)) => s(p.clone()),
        _ => String::new(),
    };
    let call = match g("tool") {
        Value::Null => "while no tool call was in flight".to_string(),
        t => format!("during tools/call {} (id {})", s(t), s(g("call_id"))),
    };
    format!(
        "{} {} {} {} by {} (pid {}) {}",
        s(g("decision")).to_uppercase(),
        s(g("kind")),
        s(g("op")),
        target,
        s(g("comm")),
        s(g("pid")),
        call
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> Event {
        let mut e = Event {
            kind: kind::NET,
            op: op::CONNECT,
            decision: decision::DENY,
            instance_id: 3,
            pid: 42,
            family: libc::AF_INET as u32,
            sock_type: libc::SOCK_STREAM as u32,
            port: 9,
            errno: 1,
            ..Event::default()
        };
        e.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.comm[..6].copy_from_slice(b"python");
        e
    }

    #[test]
    fn decode_round_trip() {
        let e = ev();
        // SAFETY: viewing a repr(C) POD as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        };
        assert_eq!(decode(bytes), Some(e));
        assert_eq!(decode(&bytes[..10]), None);
    }

    #[test]
    fn record_has_contract_fields() {
        let info = InstanceInfo {
            server: "demo".into(),
            instance: "demo-3".into(),
            ..Default::default()
        };
        let attr = Attribution {
            calls: vec![(json!(7), "fetch".into())],
        };
        let r = kernel_record(&ev(), &info, &attr);
        for k in [
            "ts",
            "kind",
            "server",
            "instance",
            "op",
            "decision",
            "pid",
            "comm",
            "exe",
            "tool",
            "call_id",
            "calls_in_flight",
            "family",
            "addr",
            "port",
        ] {
            assert!(r.get(k).is_some(), "missing {k} in {r}");
        }
        assert_eq!(r["kind"], "net");
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["addr"], "127.0.0.1");
        assert_eq!(r["port"], 9);
        assert_eq!(r["tool"], "fetch");
        assert_eq!(r["call_id"], 7);
        let idle = kernel_record(&ev(), &info, &Attribution::default());
        assert_eq!(idle["tool"], Value::Null);
        assert_eq!(idle["call_id"], Value::Null);
        assert!(human_line(&r).contains("DENY net connect 127.0.0.1:9"));
    }

    #[test]
    fn several_calls_are_listed() {
        let attr = Attribution {
            calls: vec![(json!(1), "b".into()), (json!("x"), "a".into())],
        };
        assert_eq!(attr.tool(), "a,b");
        assert_eq!(attr.call_id(), Value::Null);
        assert_eq!(attr.tool_label(), "(several)");
    }
}
