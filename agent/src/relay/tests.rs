//! End-to-end tests of the relay loop over in-memory pipes and a real child.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{duplex, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::task::JoinHandle;

use super::*;
use crate::policy::model::{Mode, OnViolation, Policy, Rules};

fn policy(allow: Option<&[&str]>) -> Arc<Policy> {
    Arc::new(Policy {
        version: 1,
        server: "fs".into(),
        mode: Mode::Enforce,
        on_violation: OnViolation::Deny,
        rules: Rules::default(),
        tools_allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
        tools: Vec::new(),
        source: "test:policy.toml".into(),
        mcp: Default::default(),
    })
}

/// Records every hook call, in order, with optional delays and failure.
#[derive(Default)]
struct Rec {
    log: Mutex<Vec<String>>,
    ends: Mutex<Vec<CallEnd>>,
    refused: Mutex<Vec<(CallStart, String)>>,
    sessions: Mutex<Vec<SessionInfo>>,
    tools: Mutex<BTreeMap<String, ToolAnnotations>>,
    begin_delay: Duration,
    end_delay: Duration,
    fail_begin: bool,
    /// Every call_end answers that the agent stopped the server for this.
    stopped: Option<String>,
}

impl Rec {
    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }
    fn push(&self, s: String) {
        self.log.lock().expect("log").push(s);
    }
    fn has(&self, s: &str) -> bool {
        self.log().iter().any(|l| l == s)
    }
}

impl RelayHooks for Rec {
    async fn call_begin(&self, call: &CallStart) -> Result<(), HookError> {
        tokio::time::sleep(self.begin_delay).await;
        if self.fail_begin {
            return Err(HookError::Unreachable("no agent socket".into()));
        }
        self.push(format!("begin {} {}", call.id, call.tool));
        Ok(())
    }

    async fn call_end(&self, call: &CallEnd) -> Option<String> {
        tokio::time::sleep(self.end_delay).await;
        self.push(format!(
            "end {} {} {}",
            call.id,
            call.tool,
            call.outcome.as_str()
        ));
        self.ends.lock().expect("ends").push(call.clone());
        self.stopped.clone()
    }

    fn call_refused(&self, call: &CallStart, reason: &str) {
        self.push(format!("refused {} {}", call.id, call.tool));
        self.refused
            .lock()
            .expect("refused")
            .push((call.clone(), reason.to_owned()));
    }

    fn session_info(&self, info: &SessionInfo) {
        self.sessions.lock().expect("sessions").push(info.clone());
    }

    fn tools_listed(&self, tools: &BTreeMap<String, ToolAnnotations>) {
        *self.tools.lock().expect("tools") = tools.clone();
    }
}

/// The four pipe ends a test drives, and the running relay.
struct Rig {
    /// Test writes here as the client.
    client_w: DuplexStream,
    /// Test reads what the relay sends the client.
    client_r: BufReader<DuplexStream>,
    /// Test reads what the relay sends the server.
    server_r: BufReader<DuplexStream>,
    /// Test writes here as the server.
    server_w: DuplexStream,
    relay: JoinHandle<Result<RelayStats, RelayError>>,
}

fn rig(policy: Arc<Policy>, hooks: Arc<Rec>, opts: RelayOptions) -> Rig {
    let (client_w, relay_cin) = duplex(1 << 16);
    let (relay_cout, client_r) = duplex(1 << 16);
    let (relay_sin, server_r) = duplex(1 << 16);
    let (server_w, relay_sout) = duplex(1 << 16);
    // Spawned, so this also checks the relay future is Send.
    let relay = tokio::spawn(relay_with(
        opts, relay_cin, relay_cout, relay_sin, relay_sout, policy, hooks,
    ));
    Rig {
        client_w,
        client_r: BufReader::new(client_r),
        server_r: BufReader::new(server_r),
        server_w,
        relay,
    }
}

async fn line(r: &mut BufReader<DuplexStream>) -> String {
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), r.read_until(b'\n', &mut buf))
        .await
        .expect("timed out waiting for a line")
        .expect("read");
    assert!(n > 0, "unexpected EOF");
    String::from_utf8(buf).expect("utf-8 line")
}

async fn send(w: &mut DuplexStream, s: &str) {
    w.write_all(s.as_bytes()).await.expect("write");
}

async fn finish(rig: Rig) -> RelayStats {
    let Rig {
        client_w,
        mut client_r,
        server_r,
        server_w,
        relay,
    } = rig;
    drop(client_w);
    drop(server_w);
    drop(server_r);
    let mut rest = Vec::new();
    client_r.read_to_end(&mut rest).await.expect("drain client");
    tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("relay did not stop")
        .expect("relay task")
        .expect("relay result")
}

fn call(id: &str, tool: &str) -> String {
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/call\",\"params\":{{\"name\":\"{tool}\",\"arguments\":{{\"path\":\"/secret\"}}}}}}\n"
    )
}

fn ok(id: &str) -> String {
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"content\":[]}}}}\n")
}

fn xorshift_bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if x.is_multiple_of(11) {
                b'\n'
            } else {
                (x >> 8) as u8
            }
        })
        .collect()
}

fn hostile_stream(seed: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(b"\n\r\n\n");
    v.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\r\n");
    v.extend(xorshift_bytes(200_000, seed));
    v.extend_from_slice(b"\n\xff\xfe\xc0\x80 not utf-8 \xed\xa0\x80\n");
    // 16 MiB line: a tools/call whose argument is huge.
    v.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":\"big\",\"method\":\"tools/call\",\"params\":{\"name\":\"w\",\"arguments\":{\"d\":\"");
    v.extend(std::iter::repeat_n(b'a', 16 << 20));
    v.extend_from_slice(b"\"}}}\n");
    v.extend_from_slice(b"[{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/list\"},{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}]\n");
    v.extend_from_slice(b"{\"unterminated\": [1,2,");
    v.extend(xorshift_bytes(1000, seed ^ 0x55));
    v.extend_from_slice(b"last line without newline");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_pass_unchanged_both_ways() {
    let hooks = Arc::new(Rec::default());
    let rig = rig(policy(None), hooks.clone(), RelayOptions::default());
    let Rig {
        mut client_w,
        mut client_r,
        mut server_r,
        mut server_w,
        relay,
    } = rig;
    let up = hostile_stream(0x9e37_79b9);
    let down = hostile_stream(0x1234_5678);
    let (up2, down2) = (up.clone(), down.clone());
    let cw = tokio::spawn(async move {
        client_w.write_all(&up2).await.expect("client write");
    });
    let sw = tokio::spawn(async move {
        server_w.write_all(&down2).await.expect("server write");
        server_w
    });
    let sr = tokio::spawn(async move {
        let mut got = Vec::new();
        server_r.read_to_end(&mut got).await.expect("server read");
        got
    });
    let cr = tokio::spawn(async move {
        let mut got = Vec::new();
        client_r.read_to_end(&mut got).await.expect("client read");
        got
    });
    cw.await.expect("cw");
    // The client's EOF closes the server's stdin once all is forwarded.
    let at_server = sr.await.expect("sr");
    assert!(
        at_server == up,
        "client->server bytes differ ({} vs {})",
        at_server.len(),
        up.len()
    );
    let server_w = sw.await.expect("sw");
    drop(server_w);
    let stats = relay.await.expect("join").expect("relay");
    let at_client = cr.await.expect("cr");
    assert!(
        at_client == down,
        "server->client bytes differ ({} vs {})",
        at_client.len(),
        down.len()
    );
    assert_eq!(stats.bytes_c2s, up.len() as u64);
    assert_eq!(stats.bytes_s2c, down.len() as u64);
    assert_eq!(stats.refused, 0);
    assert_eq!(
        stats.lines_c2s,
        up.iter().filter(|&&b| b == b'\n').count() as u64 + 1
    );
    assert!(stats.unparsed_c2s > 0);
    assert!(hooks.has("begin \"big\" w"), "{:?}", hooks.log());
    // Nothing answered the big call, so the server's exit ended it.
    let ends = hooks.ends.lock().expect("ends").clone();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].detail.as_deref(), Some("server exited"));
    assert_eq!(ends[0].outcome, Outcome::Error);
}

#[tokio::test]
async fn oversize_lines_are_forwarded_and_counted() {
    let hooks = Arc::new(Rec::default());
    let opts = RelayOptions {
        parse_limit: 64,
        read_size: 7,
    };
    let mut r = rig(policy(Some(&[])), hooks.clone(), opts);
    // Over the parse limit and not a tools/call: forwarded whole, counted.
    let long = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"resources/read\",\"params\":{{\"uri\":\"{}\"}}}}   \n",
        "u".repeat(300)
    );
    send(&mut r.client_w, &long).await;
    assert_eq!(line(&mut r.server_r).await, long);
    let long_down = format!("{}\n", "x".repeat(500));
    send(&mut r.server_w, &long_down).await;
    assert_eq!(line(&mut r.client_r).await, long_down);
    let stats = finish(r).await;
    assert_eq!((stats.oversize_c2s, stats.oversize_s2c), (1, 1));
    assert_eq!((stats.unparsed_c2s, stats.unparsed_s2c), (1, 1));
    assert_eq!(stats.bytes_c2s, long.len() as u64);
    assert!(hooks.log().is_empty());
}

#[tokio::test]
async fn oversize_tool_call_is_refused_and_never_completed() {
    let hooks = Arc::new(Rec::default());
    let opts = RelayOptions {
        parse_limit: 64,
        read_size: 7,
    };
    // Even an allowed tool: its name can't be read, so its rights can't be
    // put in force.
    let mut r = rig(policy(None), hooks.clone(), opts);
    let long = format!(
        "{}{}\n",
        call("\"big\"", "read_file").trim_end(),
        " \t".repeat(100)
    );
    send(&mut r.client_w, &long).await;
    let reply: Value = serde_json::from_str(&line(&mut r.client_r).await).expect("json");
    assert_eq!(reply["id"], "big");
    assert_eq!(reply["error"]["code"], REFUSED_CODE);
    // The server got a strict prefix that is not JSON, then end of input.
    let mut got = Vec::new();
    r.server_r
        .read_to_end(&mut got)
        .await
        .expect("server input closed");
    assert!(long.as_bytes().starts_with(&got) && got.len() < long.len());
    assert!(!got.contains(&b'\n'));
    assert!(serde_json::from_slice::<Value>(&got).is_err());
    // The server can still answer what it had.
    send(&mut r.server_w, &ok("0")).await;
    assert_eq!(line(&mut r.client_r).await, ok("0"));
    let stats = finish(r).await;
    assert_eq!(
        (stats.refused, stats.oversize_c2s, stats.calls_begun),
        (1, 1, 0)
    );
    assert_eq!(hooks.log(), vec!["refused \"big\" "]);
}

#[tokio::test]
async fn oversize_result_ends_its_call_first() {
    // A call whose result is over the limit still ends, before the client
    // has the whole line.
    let hooks_ok = Arc::new(Rec {
        end_delay: Duration::from_millis(50),
        ..Rec::default()
    });
    let mut r = rig(
        policy(None),
        hooks_ok.clone(),
        RelayOptions {
            parse_limit: 200,
            read_size: 7,
        },
    );
    send(&mut r.client_w, &call("\"k\"", "read_file")).await;
    line(&mut r.server_r).await;
    let big = format!(
        "{{\"jsonrpc\":\"2.0\",\"result\":{{\"content\":[{{\"type\":\"text\",\"text\":\"{}\"}}]}},\"id\":\"k\"}}\n",
        "y".repeat(1000)
    );
    send(&mut r.server_w, &big).await;
    assert_eq!(line(&mut r.client_r).await, big);
    assert!(
        hooks_ok.has("end \"k\" read_file ok"),
        "{:?}",
        hooks_ok.log()
    );
    let ends = hooks_ok.ends.lock().expect("ends").clone();
    assert_eq!(ends[0].response_bytes, big.len() as u64);
    finish(r).await;
}

#[tokio::test]
async fn refused_tool_never_reaches_server_and_client_gets_same_id() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(
        policy(Some(&["read_file"])),
        hooks.clone(),
        RelayOptions::default(),
    );
    for id in ["7", "\"req-7\"", "7.0", "9007199254740993"] {
        send(&mut r.client_w, &call(id, "delete_everything")).await;
        let reply: Value = serde_json::from_str(&line(&mut r.client_r).await).expect("json");
        assert_eq!(reply["id"], serde_json::from_str::<Value>(id).expect("id"));
        assert_eq!(reply["error"]["code"], REFUSED_CODE);
        let msg = reply["error"]["message"].as_str().expect("message");
        assert!(msg.contains("delete_everything"), "{msg}");
        assert!(msg.contains("\"fs\""), "{msg}");
        assert!(msg.contains("test:policy.toml"), "{msg}");
    }
    // An allowed call after them is the first thing the server sees.
    send(&mut r.client_w, &call("8", "read_file")).await;
    assert_eq!(line(&mut r.server_r).await, call("8", "read_file"));
    send(&mut r.server_w, &ok("8")).await;
    assert_eq!(line(&mut r.client_r).await, ok("8"));
    let stats = finish(r).await;
    assert_eq!(stats.refused, 4);
    let refused = hooks.refused.lock().expect("refused").clone();
    assert_eq!(refused.len(), 4);
    assert_eq!(refused[1].0.id, RequestId::String("req-7".into()));
    assert!(refused[0].1.contains("not allowed by policy"));
    assert_eq!(
        hooks.log(),
        vec![
            "refused 7 delete_everything",
            "refused \"req-7\" delete_everything",
            "refused 7 delete_everything",
            "refused 9007199254740992 delete_everything",
            "begin 8 read_file",
            "end 8 read_file ok"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_begin_completes_before_the_server_sees_the_request() {
    let hooks = Arc::new(Rec {
        begin_delay: Duration::from_millis(100),
        ..Rec::default()
    });
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, &call("1", "read_file")).await;
    let seen = line(&mut r.server_r).await;
    assert_eq!(seen, call("1", "read_file"));
    assert!(
        hooks.has("begin 1 read_file"),
        "server saw the call before rights were in force"
    );
    finish(r).await;
}

/// The agent stopped the server during a call (a violation it could only
/// detect): the server's response is withheld and the client gets an error
/// that names the reason and the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_servers_response_is_withheld_and_the_client_told_why() {
    let hooks = Arc::new(Rec {
        stopped: Some("only a tool not in flight may read it".into()),
        ..Rec::default()
    });
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, &call("7", "peek_file")).await;
    line(&mut r.server_r).await;
    send(&mut r.server_w, &ok("7")).await;
    let got: serde_json::Value = serde_json::from_str(&line(&mut r.client_r).await).expect("json");
    assert_eq!(got["id"], 7, "{got}");
    assert!(got.get("result").is_none(), "the response leaked: {got}");
    assert_eq!(got["error"]["code"], REFUSED_CODE, "{got}");
    let reason = got["error"]["data"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("the server was stopped: only a tool not in flight"),
        "{got}"
    );
    assert_eq!(got["error"]["data"]["tool"], "peek_file", "{got}");
    assert!(hooks.has("end 7 peek_file ok"));
    finish(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_end_completes_before_the_client_sees_the_response() {
    let hooks = Arc::new(Rec {
        end_delay: Duration::from_millis(100),
        ..Rec::default()
    });
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, &call("1", "read_file")).await;
    line(&mut r.server_r).await;
    send(&mut r.server_w, &ok("1")).await;
    assert_eq!(line(&mut r.client_r).await, ok("1"));
    assert!(
        hooks.has("end 1 read_file ok"),
        "client saw the result before rights were withdrawn"
    );
    let ends = hooks.ends.lock().expect("ends").clone();
    assert_eq!(ends[0].response_bytes, ok("1").len() as u64);
    assert_eq!(ends[0].request_bytes, call("1", "read_file").len() as u64);
    assert_eq!(ends[0].args_hash.len(), 16);
    finish(r).await;
}

#[tokio::test]
async fn begin_hook_error_refuses_the_call() {
    let hooks = Arc::new(Rec {
        fail_begin: true,
        ..Rec::default()
    });
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, &call("\"a\"", "read_file")).await;
    let reply: Value = serde_json::from_str(&line(&mut r.client_r).await).expect("json");
    assert_eq!(reply["id"], "a");
    assert_eq!(reply["error"]["code"], REFUSED_CODE);
    assert!(reply["error"]["data"]["reason"]
        .as_str()
        .is_some_and(|s| s.contains("no agent socket")));
    // A non-call message still flows, and it is the first the server sees.
    let ping = "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n";
    send(&mut r.client_w, ping).await;
    assert_eq!(line(&mut r.server_r).await, ping);
    let stats = finish(r).await;
    assert_eq!((stats.refused, stats.calls_begun), (1, 0));
    assert_eq!(hooks.log(), vec!["refused \"a\" read_file"]);
}

#[tokio::test]
async fn cancellation_ends_the_call() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, &call("4", "slow")).await;
    line(&mut r.server_r).await;
    let cancel = "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/cancelled\",\"params\":{\"requestId\":4,\"reason\":\"user\"}}\n";
    send(&mut r.client_w, cancel).await;
    assert_eq!(line(&mut r.server_r).await, cancel);
    assert!(hooks.has("end 4 slow cancelled"));
    // A late response is forwarded and ends nothing more.
    send(&mut r.server_w, &ok("4")).await;
    assert_eq!(line(&mut r.client_r).await, ok("4"));
    let stats = finish(r).await;
    assert_eq!(stats.calls_ended, 1);
    let ends = hooks.ends.lock().expect("ends").clone();
    assert_eq!(ends[0].detail.as_deref(), Some("cancelled by client"));
}

#[tokio::test]
async fn overlapping_calls_with_number_and_string_ids() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, &call("1", "a")).await;
    send(&mut r.client_w, &call("\"1\"", "b")).await;
    send(&mut r.client_w, &call("2", "c")).await;
    for _ in 0..3 {
        line(&mut r.server_r).await;
    }
    // Answer out of order; an error result and a tool error (isError).
    send(
        &mut r.server_w,
        "{\"jsonrpc\":\"2.0\",\"id\":\"1\",\"error\":{\"code\":-32602,\"message\":\"bad\"}}\n",
    )
    .await;
    send(
        &mut r.server_w,
        "{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"content\":[],\"isError\":true}}\n",
    )
    .await;
    send(&mut r.server_w, &ok("1")).await;
    for _ in 0..3 {
        line(&mut r.client_r).await;
    }
    assert_eq!(
        hooks.log(),
        vec![
            "begin 1 a",
            "begin \"1\" b",
            "begin 2 c",
            "end \"1\" b error",
            "end 2 c error",
            "end 1 a ok"
        ]
    );
    // A reused id while the first is in flight is refused.
    send(&mut r.client_w, &call("9", "a")).await;
    line(&mut r.server_r).await;
    send(&mut r.client_w, &call("9", "b")).await;
    let reply: Value = serde_json::from_str(&line(&mut r.client_r).await).expect("json");
    assert_eq!(reply["error"]["code"], REFUSED_CODE);
    let stats = finish(r).await;
    assert_eq!((stats.calls_begun, stats.calls_ended), (4, 4));
}

#[tokio::test]
async fn batch_with_a_refused_call_is_refused_whole() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(
        policy(Some(&["read_file"])),
        hooks.clone(),
        RelayOptions::default(),
    );
    let batch = "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"read_file\"}},\
                 {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}},\
                 {\"jsonrpc\":\"2.0\",\"id\":\"x\",\"method\":\"tools/call\",\"params\":{\"name\":\"rm\"}},\
                 {\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"tools/list\"}]\n";
    send(&mut r.client_w, batch).await;
    let reply: Value = serde_json::from_str(&line(&mut r.client_r).await).expect("json");
    let items = reply.as_array().expect("batch reply");
    let ids: Vec<&Value> = items.iter().map(|i| &i["id"]).collect();
    assert_eq!(
        ids,
        vec![&Value::from(1), &Value::from("x"), &Value::from(3)]
    );
    assert!(items.iter().all(|i| i["error"]["code"] == REFUSED_CODE));
    // An allowed batch afterwards goes through whole, and is the first thing
    // the server sees.
    let fine = "[{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"tools/call\",\"params\":{\"name\":\"read_file\"}}]\n";
    send(&mut r.client_w, fine).await;
    assert_eq!(line(&mut r.server_r).await, fine);
    send(
        &mut r.server_w,
        "[{\"jsonrpc\":\"2.0\",\"id\":5,\"result\":{\"content\":[]}}]\n",
    )
    .await;
    line(&mut r.client_r).await;
    let stats = finish(r).await;
    assert_eq!(stats.refused, 2);
    assert_eq!(
        hooks.log(),
        vec![
            "refused 1 read_file",
            "refused \"x\" rm",
            "begin 5 read_file",
            "end 5 read_file ok"
        ]
    );
}

#[tokio::test]
async fn refused_tool_in_lenient_json_is_still_refused() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(
        policy(Some(&["read_file"])),
        hooks.clone(),
        RelayOptions::default(),
    );
    let sneaky: [&[u8]; 3] = [
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"rm\",\"arguments\":{\"p\":\"\xff\"}}}\n",
        b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"rm\",\"arguments\":{\"n\":NaN}}}\n",
        b"{\"\\udfff\":0,\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"tools/call\",\"params\":{\"name\":\"rm\"}}\n",
    ];
    for (i, l) in sneaky.iter().enumerate() {
        r.client_w.write_all(l).await.expect("write");
        let reply: Value = serde_json::from_str(&line(&mut r.client_r).await).expect("json");
        assert_eq!(reply["id"], i + 1);
        assert_eq!(reply["error"]["code"], REFUSED_CODE);
    }
    // An allowed call in lenient form goes through, bytes untouched, with its
    // rights begun; a lenient response ends it.
    let allowed = b"{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"tools/call\",\"params\":{\"name\":\"read_file\",\"arguments\":{\"p\":\"\xfe\"}}}\n";
    r.client_w.write_all(allowed).await.expect("write");
    let mut got = Vec::new();
    r.server_r.read_until(b'\n', &mut got).await.expect("read");
    assert_eq!(got, allowed);
    let reply = b"{\"jsonrpc\":\"2.0\",\"id\":4,\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"\xc0\"}]}}\n";
    r.server_w.write_all(reply).await.expect("write");
    let mut got = Vec::new();
    r.client_r.read_until(b'\n', &mut got).await.expect("read");
    assert_eq!(got, reply);
    let stats = finish(r).await;
    assert_eq!(
        (stats.refused, stats.lenient_c2s, stats.lenient_s2c),
        (3, 4, 1)
    );
    assert_eq!(
        hooks.log()[3..],
        ["begin 4 read_file", "end 4 read_file ok"]
    );
}

#[tokio::test]
async fn tool_call_without_usable_id_is_dropped() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(
        &mut r.client_w,
        "{\"jsonrpc\":\"2.0\",\"method\":\"tools/call\",\"params\":{\"name\":\"a\"}}\n",
    )
    .await;
    send(
        &mut r.client_w,
        "{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":\"tools/call\",\"params\":{\"name\":\"a\"}}\n",
    )
    .await;
    let ping = "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"ping\"}\n";
    send(&mut r.client_w, ping).await;
    assert_eq!(line(&mut r.server_r).await, ping);
    let stats = finish(r).await;
    assert_eq!(stats.refused, 2);
}

#[tokio::test]
async fn task_calls_stay_in_flight_until_terminal_status() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    let task_call = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"slow\",\"arguments\":{},\"task\":{\"ttl\":60000}}}\n";
    send(&mut r.client_w, task_call).await;
    line(&mut r.server_r).await;
    let created = "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"task\":{\"taskId\":\"t-1\",\"status\":\"working\",\"createdAt\":\"2025-11-25T10:30:00Z\",\"ttl\":60000}}}\n";
    send(&mut r.server_w, created).await;
    assert_eq!(line(&mut r.client_r).await, created);
    assert_eq!(
        hooks.log(),
        vec!["begin 1 slow"],
        "a task handle does not end the call"
    );
    // Polling: still working, then completed.
    send(
        &mut r.client_w,
        "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tasks/get\",\"params\":{\"taskId\":\"t-1\"}}\n",
    )
    .await;
    line(&mut r.server_r).await;
    send(&mut r.server_w, "{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"taskId\":\"t-1\",\"status\":\"input_required\"}}\n").await;
    line(&mut r.client_r).await;
    assert_eq!(hooks.log().len(), 1);
    send(
        &mut r.client_w,
        "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"tasks/get\",\"params\":{\"taskId\":\"t-1\"}}\n",
    )
    .await;
    line(&mut r.server_r).await;
    send(
        &mut r.server_w,
        "{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"taskId\":\"t-1\",\"status\":\"completed\"}}\n",
    )
    .await;
    line(&mut r.client_r).await;
    assert_eq!(hooks.log(), vec!["begin 1 slow", "end 1 slow ok"]);

    // Second task, ended by a status notification.
    send(&mut r.client_w, &task_call.replace("\"id\":1", "\"id\":10")).await;
    line(&mut r.server_r).await;
    send(
        &mut r.server_w,
        &created
            .replace("\"id\":1", "\"id\":10")
            .replace("t-1", "t-2"),
    )
    .await;
    line(&mut r.client_r).await;
    send(&mut r.server_w, "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/tasks/status\",\"params\":{\"taskId\":\"t-2\",\"status\":\"failed\"}}\n").await;
    line(&mut r.client_r).await;
    assert!(hooks.has("end 10 slow error"), "{:?}", hooks.log());

    // Third task, ended by tasks/result (the call's own result).
    send(&mut r.client_w, &task_call.replace("\"id\":1", "\"id\":20")).await;
    line(&mut r.server_r).await;
    send(
        &mut r.server_w,
        &created
            .replace("\"id\":1", "\"id\":20")
            .replace("t-1", "t-3"),
    )
    .await;
    line(&mut r.client_r).await;
    send(&mut r.client_w, "{\"jsonrpc\":\"2.0\",\"id\":21,\"method\":\"tasks/result\",\"params\":{\"taskId\":\"t-3\"}}\n").await;
    line(&mut r.server_r).await;
    send(&mut r.server_w, "{\"jsonrpc\":\"2.0\",\"id\":21,\"result\":{\"content\":[],\"_meta\":{\"io.modelcontextprotocol/related-task\":{\"taskId\":\"t-3\"}}}}\n").await;
    line(&mut r.client_r).await;
    assert!(hooks.has("end 20 slow ok"), "{:?}", hooks.log());
    let ends = hooks.ends.lock().expect("ends").clone();
    assert_eq!(ends[0].task_id.as_deref(), Some("t-1"));
    finish(r).await;
}

#[tokio::test]
async fn unrequested_task_handle_does_not_keep_rights() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    // No params.task: the client did not ask for a task.
    send(&mut r.client_w, &call("1", "slow")).await;
    line(&mut r.server_r).await;
    send(&mut r.server_w, "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"task\":{\"taskId\":\"t\",\"status\":\"working\"}}}\n").await;
    line(&mut r.client_r).await;
    assert_eq!(hooks.log(), vec!["begin 1 slow", "end 1 slow ok"]);
    finish(r).await;
}

#[tokio::test]
async fn handshake_and_tool_annotations_are_reported() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"initialize\",\"params\":{\"protocolVersion\":\"2025-11-25\",\"capabilities\":{},\"clientInfo\":{\"name\":\"ide\",\"version\":\"3.1\"}}}\n").await;
    line(&mut r.server_r).await;
    send(&mut r.server_w, "{\"jsonrpc\":\"2.0\",\"id\":0,\"result\":{\"protocolVersion\":\"2025-06-18\",\"capabilities\":{},\"serverInfo\":{\"name\":\"fs-server\",\"version\":\"0.6.2\"}}}\n").await;
    line(&mut r.client_r).await;
    send(
        &mut r.client_w,
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\"}\n",
    )
    .await;
    line(&mut r.server_r).await;
    send(&mut r.server_w, "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"read_file\",\"inputSchema\":{},\"annotations\":{\"readOnlyHint\":true,\"openWorldHint\":false}}]}}\n").await;
    line(&mut r.client_r).await;
    let stats = finish(r).await;
    let sessions = hooks.sessions.lock().expect("sessions").clone();
    assert_eq!(sessions.len(), 2);
    let s = &sessions[1];
    assert_eq!(s.handshake, Some(Handshake::Initialize));
    assert_eq!(s.protocol_version.as_deref(), Some("2025-11-25"));
    assert_eq!(s.negotiated_version.as_deref(), Some("2025-06-18"));
    assert_eq!(
        (s.client_name.as_deref(), s.client_version.as_deref()),
        (Some("ide"), Some("3.1"))
    );
    assert_eq!(s.server_name.as_deref(), Some("fs-server"));
    assert_eq!(stats.session, *s);
    let tools = hooks.tools.lock().expect("tools").clone();
    assert_eq!(tools["read_file"].read_only_hint, Some(true));
    assert_eq!(tools["read_file"].open_world_hint, Some(false));
    assert_eq!(stats.tool_annotations, tools);
}

#[tokio::test]
async fn server_exit_ends_every_call_in_flight() {
    let hooks = Arc::new(Rec::default());
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, &call("1", "a")).await;
    send(&mut r.client_w, &call("2", "b")).await;
    line(&mut r.server_r).await;
    line(&mut r.server_r).await;
    // Server stdout closes while the client is still connected.
    let Rig {
        client_w,
        mut client_r,
        server_w,
        relay,
        ..
    } = r;
    drop(server_w);
    let stats = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("relay stops when the server's stdout ends")
        .expect("join")
        .expect("relay");
    let mut rest = Vec::new();
    client_r.read_to_end(&mut rest).await.expect("client EOF");
    drop(client_w);
    assert_eq!(stats.calls_ended, 2);
    let ends = hooks.ends.lock().expect("ends").clone();
    assert!(ends
        .iter()
        .all(|e| e.outcome == Outcome::Error && e.detail.as_deref() == Some("server exited")));
}

/// A real child process as the server: `cat` echoes what it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_to_cat_child() {
    let mut child = tokio::process::Command::new("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn cat");
    let server_in = child.stdin.take().expect("stdin");
    let server_out = child.stdout.take().expect("stdout");
    let (mut client_w, relay_cin) = duplex(1 << 16);
    let (relay_cout, client_r) = duplex(1 << 16);
    let hooks = Arc::new(Rec::default());
    let relay = tokio::spawn(relay(
        relay_cin,
        relay_cout,
        server_in,
        server_out,
        policy(Some(&["echo"])),
        hooks.clone(),
    ));
    let input = format!(
        "{}{}{}{}",
        call("1", "echo"),
        call("2", "forbidden"),
        "plain text \u{fffd}\r\n",
        "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"ping\"}"
    );
    let reader = tokio::spawn(async move {
        let mut out = String::new();
        let mut r = client_r;
        r.read_to_string(&mut out).await.expect("read client");
        out
    });
    client_w.write_all(input.as_bytes()).await.expect("write");
    drop(client_w);
    let stats = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("relay ends when cat exits")
        .expect("join")
        .expect("relay");
    let out = reader.await.expect("reader");
    let status = child.wait().await.expect("cat exit");
    assert!(status.success());
    // cat echoes everything forwarded; the refused call only comes back as
    // the relay's error response.
    assert!(out.contains(&call("1", "echo")));
    assert!(!out.contains("\"name\":\"forbidden\""));
    assert!(out.contains("plain text \u{fffd}\r\n"));
    assert!(out.contains("{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"ping\"}"));
    let refusal = out
        .lines()
        .find(|l| l.contains("\"error\""))
        .expect("refusal line");
    let v: Value = serde_json::from_str(refusal).expect("json");
    assert_eq!(v["id"], 2);
    assert_eq!(stats.refused, 1);
    // cat "answers" a call with the request itself, which ends nothing; the
    // call ends when cat exits.
    assert_eq!(
        hooks.log(),
        vec!["begin 1 echo", "refused 2 forbidden", "end 1 echo error"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_never_land_inside_a_server_line() {
    let hooks = Arc::new(Rec::default());
    let opts = RelayOptions {
        parse_limit: 150,
        read_size: 7,
    };
    let mut r = rig(policy(Some(&[])), hooks.clone(), opts);
    // Half of a long server line is on its way to the client...
    let half = format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{\"data\":\"{}",
        "z".repeat(400)
    );
    send(&mut r.server_w, &half).await;
    let mut first = vec![0u8; 64];
    r.client_r
        .read_exact(&mut first)
        .await
        .expect("first bytes");
    // ...when the relay refuses a call; its answer must wait for the line.
    send(&mut r.client_w, &call("1", "rm")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rest = format!("{}\"}}}}\n", "z".repeat(400));
    send(&mut r.server_w, &rest).await;
    let got_first = format!(
        "{}{}",
        String::from_utf8(first).expect("utf-8"),
        line(&mut r.client_r).await
    );
    assert_eq!(got_first, format!("{half}{rest}"));
    let refusal: Value = serde_json::from_str(&line(&mut r.client_r).await).expect("json");
    assert_eq!(refusal["id"], 1);
    finish(r).await;
}

/// A tool result over [`stdio::STREAM_AFTER`] bytes.
fn streamed_result(id: &str, n: usize) -> String {
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"content\":[{{\"type\":\"text\",\"text\":\"{}\"}}]}}}}\n",
        "z".repeat(n)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_result_streams_and_its_call_ends_before_its_last_byte() {
    let hooks = Arc::new(Rec {
        end_delay: Duration::from_millis(50),
        ..Rec::default()
    });
    let mut r = rig(policy(None), hooks.clone(), RelayOptions::default());
    send(&mut r.client_w, &call("7", "read_file")).await;
    line(&mut r.server_r).await;
    let big = streamed_result("7", 3 * stdio::STREAM_AFTER);
    // All but the closing bytes: the client gets most of the line while the
    // server has not finished writing it.
    let (head, tail) = big.split_at(big.len() - 10);
    let (head, tail) = (head.to_owned(), tail.to_owned());
    // The server writes concurrently: the pipes are smaller than the line.
    let mut server_w = r.server_w;
    let writer = tokio::spawn(async move {
        send(&mut server_w, &head).await;
        server_w
    });
    let mut got = vec![0u8; 2 * stdio::STREAM_AFTER];
    tokio::time::timeout(Duration::from_secs(10), r.client_r.read_exact(&mut got))
        .await
        .expect("the start of a large result was not forwarded before its end")
        .expect("read");
    assert_eq!(&got[..], &big.as_bytes()[..got.len()]);
    assert!(!hooks.has("end 7 read_file ok"), "{:?}", hooks.log());
    r.server_w = writer.await.expect("writer");
    send(&mut r.server_w, &tail).await;
    let rest = line(&mut r.client_r).await;
    got.extend_from_slice(rest.as_bytes());
    assert!(got == big.as_bytes(), "bytes changed");
    assert!(
        hooks.has("end 7 read_file ok"),
        "client had the whole result before rights were withdrawn"
    );
    let ends = hooks.ends.lock().expect("ends").clone();
    assert_eq!(ends[0].response_bytes, big.len() as u64);
    let stats = finish(r).await;
    assert_eq!(stats.bytes_s2c, big.len() as u64);
    assert_eq!(stats.lines_s2c, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_line_that_ends_as_a_denied_request_is_never_completed() {
    let mut p = (*policy(None)).clone();
    p.mcp.sampling = crate::policy::model::Governance::Deny;
    let hooks = Arc::new(Rec::default());
    let r = rig(Arc::new(p), hooks.clone(), RelayOptions::default());
    // Reads as a response while it streams; its `method` comes last.
    let sneaky = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":9,\"result\":{{\"x\":\"{}\"}},\"method\":\"sampling/createMessage\",\"params\":{{}}}}\n",
        "q".repeat(2 * stdio::STREAM_AFTER)
    );
    let Rig {
        client_w,
        mut client_r,
        server_r,
        mut server_w,
        relay,
    } = r;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = client_r.read_to_end(&mut got).await;
        got
    });
    let writer = tokio::spawn(async move {
        let _ = server_w.write_all(sneaky.as_bytes()).await;
        (server_w, sneaky)
    });
    let res = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("relay did not stop")
        .expect("relay task");
    assert!(matches!(res, Err(RelayError::ServerLineCut(_))), "{res:?}");
    let (server_w, sneaky) = writer.await.expect("writer");
    drop((client_w, server_r, server_w));
    let got = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("client output did not end")
        .expect("reader");
    assert!(!got.is_empty(), "nothing was streamed");
    assert!(
        got.len() < sneaky.len() - 1,
        "the line reached the client whole"
    );
    assert!(!got.contains(&b'\n'));
    assert_eq!(&got[..], &sneaky.as_bytes()[..got.len()]);
}

#[tokio::test]
async fn large_denied_request_is_withheld_whole() {
    let mut p = (*policy(None)).clone();
    p.mcp.sampling = crate::policy::model::Governance::Deny;
    let hooks = Arc::new(Rec::default());
    let mut r = rig(Arc::new(p), hooks.clone(), RelayOptions::default());
    let req = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"sampling/createMessage\",\"params\":{{\"x\":\"{}\"}}}}\n",
        "q".repeat(2 * stdio::STREAM_AFTER)
    );
    send(&mut r.server_w, &req).await;
    let reply: Value = serde_json::from_str(&line(&mut r.server_r).await).expect("json");
    assert_eq!(reply["id"], 3);
    assert_eq!(reply["error"]["code"], REFUSED_CODE);
    send(&mut r.server_w, &ok("4")).await;
    // The next line the client sees is the one after the refused request.
    assert_eq!(line(&mut r.client_r).await, ok("4"));
    finish(r).await;
}
