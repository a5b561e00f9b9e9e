//! One confined server instance as the agent sees it: its kernel state
//! (instance map entry, rules), the calls in flight, and the epoch history
//! that ties every kernel event to the `tools/call` it happened in.
//!
//! Race-freedom: `call_begin` updates the kernel's instance state (active
//! tool mask, epoch) and returns only after the map update returned, so the
//! relay forwards the request only once the tool's rights are in force.
//! `call_end` withdraws them before the relay forwards the response.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Instant,
};

use mcp_warden_common::{decision, flags, Event, InstanceState, SERVER_BIT};
use serde_json::Value;

use crate::{
    confine::landlock::FilesBy,
    events::{self, Attribution, InstanceInfo, Sinks, ToolCallRecord},
    kernel::{Kernel, KernelError},
    metrics::Metrics,
    policy::{Mode, OnViolation, Policy},
};

/// `direction` label values of the network byte counters, by index.
const DIRECTIONS: [&str; 2] = ["egress", "ingress"];

/// How many epochs of attribution history are kept. Events older than this
/// (a reader far behind the kernel) are attributed as unknown, never guessed.
const HISTORY: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    #[error("session state lock poisoned")]
    Poisoned,
}

#[derive(Clone, Debug)]
struct InFlight {
    id: Value,
    tool: String,
    bit: u64,
    started: Instant,
}

#[derive(Debug)]
struct State {
    inst: InstanceState,
    in_flight: Vec<InFlight>,
    /// (epoch, calls in flight during it), oldest first.
    history: VecDeque<(u64, Vec<(Value, String)>)>,
    /// Epochs during which the closed-world restriction was in force.
    closed_world_epochs: std::collections::BTreeSet<u64>,
    /// Epochs during which every call in flight was of a tool that
    /// declared `readOnlyHint: true`.
    read_only_epochs: std::collections::BTreeSet<u64>,
    /// Tool annotations from the server's tools/list.
    annotations: BTreeMap<String, crate::relay::ToolAnnotations>,
    /// Syscall accounting of calls in flight or ended and not yet drained,
    /// keyed by the call id's JSON text.
    acct: HashMap<String, CallAcct>,
}

/// A call's syscall counts while they are being gathered from the kernel.
#[derive(Debug)]
struct CallAcct {
    tool: String,
    counts: BTreeMap<u32, u64>,
    /// Network payload bytes: [egress, ingress].
    bytes: [u64; 2],
    /// Another call was in flight during some of it: counts are shared.
    shared: bool,
    /// Set when the call ended: its record, and the epoch it ended at.
    ended: Option<(u64, ToolCallRecord)>,
}

/// Shared between the relay, the event reader and the signal handler.
pub struct Session {
    kernel: Arc<Mutex<Kernel>>,
    counters: Arc<Mutex<crate::kernel::Counters>>,
    cgroup_id: u64,
    cgroup_path: std::path::PathBuf,
    /// Replaced whole on reload ([`Session::swap_policy`]).
    policy: std::sync::RwLock<Arc<Policy>>,
    info: InstanceInfo,
    state: Mutex<State>,
    sinks: Arc<Mutex<Sinks>>,
    metrics: Metrics,
    account_tx: tokio::sync::mpsc::UnboundedSender<()>,
    /// Audit mode: the launched command and its interpreters, always
    /// executable (set by the host at launch).
    launched: Mutex<Vec<String>>,
    /// Audit mode: the rules with their real paths, built on first use
    /// (server's, then each tool's by name).
    #[allow(clippy::type_complexity)]
    judging: Mutex<
        Option<(
            Arc<Policy>,
            Arc<(crate::policy::Rules, Vec<(String, crate::policy::Rules)>)>,
        )>,
    >,
    /// The MCP client's name and version from the handshake, stamped on
    /// every record once known (identity across a fleet).
    client: Mutex<Value>,
    /// Where calls of `[mcp] approval` tools wait for a person.
    approvals: std::sync::OnceLock<crate::approval::Approvals>,
    /// Which layer holds the file rules on this host.
    files_by: FilesBy,
    /// Why the agent ended the server tree, once it did: the calls still in
    /// flight are answered with this instead of the server's response.
    stopped: Mutex<Option<String>>,
    /// The event reader, asked to deliver everything the kernel wrote
    /// before a watched call's response is forwarded.
    reader: std::sync::OnceLock<tokio::sync::mpsc::Sender<events::reader::Control>>,
    /// File, exec and process events the kernel could not deliver (ring
    /// full, every instance), as last seen: per-call detection that lost
    /// events cannot vouch for a call.
    lost_seen: Mutex<u64>,
}

/// A reported file operation or exec, judged in userspace.
struct Judged {
    ev: Event,
    /// The path as resolved, when it was.
    resolved: Option<String>,
    /// Enforce mode: the operation ran but broke a rule the kernel could
    /// not hold (per-call file rules on the fallback, `readOnlyHint`); why.
    violation: Option<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("cgroup_id", &self.cgroup_id)
            .field("instance", &self.info.instance)
            .finish()
    }
}

impl Session {
    /// Register the instance in the kernel (server rules only, epoch 0).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kernel: Arc<Mutex<Kernel>>,
        cgroup_id: u64,
        cgroup_path: std::path::PathBuf,
        instance_id: u32,
        policy_id: u32,
        policy: Arc<Policy>,
        info: InstanceInfo,
        sinks: Arc<Mutex<Sinks>>,
        metrics: Metrics,
        account_tx: tokio::sync::mpsc::UnboundedSender<()>,
        files_by: FilesBy,
    ) -> Result<Self, SessionError> {
        Self::resume(
            kernel,
            cgroup_id,
            cgroup_path,
            instance_id,
            policy_id,
            policy,
            info,
            sinks,
            metrics,
            account_tx,
            files_by,
            0,
        )
    }

    /// [`Session::new`] continuing from `epoch` (an agent re-adopting an
    /// instance whose kernel state a previous agent wrote). No call is in
    /// flight: the tools' rights are withdrawn until a client re-attaches.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        kernel: Arc<Mutex<Kernel>>,
        cgroup_id: u64,
        cgroup_path: std::path::PathBuf,
        instance_id: u32,
        policy_id: u32,
        policy: Arc<Policy>,
        info: InstanceInfo,
        sinks: Arc<Mutex<Sinks>>,
        metrics: Metrics,
        account_tx: tokio::sync::mpsc::UnboundedSender<()>,
        files_by: FilesBy,
        epoch: u64,
    ) -> Result<Self, SessionError> {
        let mut fl = 0;
        if policy.mode == Mode::Audit {
            fl |= flags::AUDIT;
        }
        if policy.on_violation == OnViolation::Kill {
            fl |= flags::KILL;
        }
        if watches_tool_files(&policy, files_by) {
            fl |= flags::REPORT_FILES;
        }
        let inst = InstanceState {
            instance_id,
            policy_id,
            active_mask: SERVER_BIT,
            epoch,
            flags: fl,
            _pad: 0,
        };
        let (lost_seen, counters) = {
            let mut k = kernel.lock().map_err(|_| SessionError::Poisoned)?;
            k.set_instance(cgroup_id, &inst)?;
            (file_events_lost(&k)?, k.counters())
        };
        let mut history = VecDeque::new();
        history.push_back((epoch, Vec::new()));
        Ok(Self {
            kernel,
            counters,
            cgroup_id,
            cgroup_path,
            policy: std::sync::RwLock::new(policy),
            info,
            state: Mutex::new(State {
                inst,
                in_flight: Vec::new(),
                history,
                closed_world_epochs: Default::default(),
                read_only_epochs: Default::default(),
                annotations: BTreeMap::new(),
                acct: HashMap::new(),
            }),
            sinks,
            metrics,
            account_tx,
            launched: Mutex::new(Vec::new()),
            judging: Mutex::new(None),
            client: Mutex::new(Value::Null),
            approvals: std::sync::OnceLock::new(),
            files_by,
            stopped: Mutex::new(None),
            reader: std::sync::OnceLock::new(),
            lost_seen: Mutex::new(lost_seen),
        })
    }

    /// Connect the session to the event reader (see [`Session::call_end`]).
    pub fn set_reader(&self, tx: tokio::sync::mpsc::Sender<events::reader::Control>) {
        let _ = self.reader.set(tx);
    }

    /// Why the agent ended the server tree, if it did.
    pub fn stopped(&self) -> Option<String> {
        self.stopped.lock().ok().and_then(|s| s.clone())
    }

    /// Audit mode: the launched command and its interpreter chain, which
    /// are always allowed to run (as on the enforcing backends).
    pub fn set_launched(&self, cmd_path: &std::path::Path) {
        let chain = match crate::confine::landlock::exec_chain(cmd_path) {
            Ok((chain, _)) => chain,
            Err(_) => vec![cmd_path.to_path_buf()],
        };
        if let Ok(mut l) = self.launched.lock() {
            *l = chain
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
        }
    }

    /// Connect the session to its agent's approval service.
    pub fn set_approvals(&self, a: crate::approval::Approvals) {
        let _ = self.approvals.set(a);
    }

    /// Hold a call of an `[mcp] approval` tool until a person decides.
    async fn await_approval(&self, id: &Value, tool: &str, args_hash: &str) -> Result<(), String> {
        use crate::approval::Decision;
        let Some(appr) = self.approvals.get() else {
            return Err("the tool needs approval and no approval service is running".into());
        };
        let timeout = std::time::Duration::from_secs(self.policy().mcp.approval_timeout_secs);
        let info = serde_json::json!({
            "server": self.info.server,
            "instance": self.info.instance,
            "tool": tool,
            "call_id": id,
            "args_sha256": args_hash,
            "requested_at": crate::events::now_rfc3339(),
        });
        let (aid, decision) = appr.request(info, self.info.uid, timeout);
        self.record(
            "server",
            serde_json::json!({"event": "approval_requested", "approval_id": aid,
                               "tool": tool, "call_id": id}),
        );
        eprintln!(
            "mcp-warden: tools/call {tool} (id {id}) of {} waits for approval: \
             `mcp-warden approve {aid}` or `mcp-warden deny {aid}` ({} s, then denied)",
            self.info.instance,
            timeout.as_secs()
        );
        let d = decision.await;
        let (outcome, by, result) = match &d {
            Decision::Approved { by } => ("approved", Value::String(by.clone()), Ok(())),
            Decision::Denied { by } => (
                "denied",
                Value::String(by.clone()),
                Err(format!("denied by {by} (approval {aid})")),
            ),
            Decision::TimedOut => (
                "timed_out",
                Value::Null,
                Err(format!(
                    "no decision within {} s (approval {aid}); a timeout denies",
                    timeout.as_secs()
                )),
            ),
        };
        self.record(
            "server",
            serde_json::json!({"event": "approval_decided", "approval_id": aid,
                               "tool": tool, "call_id": id, "decision": outcome,
                               "decided_by": by}),
        );
        result
    }

    /// Add the client's identity to a record.
    fn stamp(&self, rec: &mut Value) {
        if let (Value::Object(m), Ok(c)) = (rec, self.client.lock()) {
            m.insert("client".into(), c.clone());
        }
    }

    pub fn info(&self) -> &InstanceInfo {
        &self.info
    }

    /// The policy in force (a reload may replace it).
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn instance_id(&self) -> u32 {
        self.state.lock().map(|s| s.inst.instance_id).unwrap_or(0)
    }

    /// The rule set the kernel uses for this instance.
    pub fn policy_id(&self) -> u32 {
        self.state.lock().map(|s| s.inst.policy_id).unwrap_or(0)
    }

    /// (call id, tool) of every call in flight.
    pub fn calls_in_flight(&self) -> Vec<(Value, String)> {
        self.state
            .lock()
            .map(|s| {
                s.in_flight
                    .iter()
                    .map(|c| (c.id.clone(), c.tool.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Switch to `policy`, whose rules the kernel already holds as rule set
    /// `policy_id`: one atomic instance-state update points the programs at
    /// the new rules (calls in flight keep their tool's bit under the new
    /// numbering). The caller removes the old rule set afterwards.
    pub fn swap_policy(&self, policy: Arc<Policy>, policy_id: u32) -> Result<(), SessionError> {
        let mut st = self.state.lock().map_err(|_| SessionError::Poisoned)?;
        for c in &mut st.in_flight {
            c.bit = policy.tool_bit(&c.tool).unwrap_or(0);
        }
        let mut fl = st.inst.flags & flags::EMIT_ALLOWED;
        if policy.mode == Mode::Audit {
            fl |= flags::AUDIT;
        }
        if policy.on_violation == OnViolation::Kill {
            fl |= flags::KILL;
        }
        st.inst.flags = fl;
        st.inst.policy_id = policy_id;
        match self.policy.write() {
            Ok(mut p) => *p = policy,
            Err(_) => return Err(SessionError::Poisoned),
        }
        self.publish(&mut st)
    }

    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }

    /// Also emit allowed operations (learn mode).
    pub fn set_emit_allowed(&self, on: bool) -> Result<(), SessionError> {
        let mut st = self.state.lock().map_err(|_| SessionError::Poisoned)?;
        if on {
            st.inst.flags |= flags::EMIT_ALLOWED;
        } else {
            st.inst.flags &= !flags::EMIT_ALLOWED;
        }
        let inst = st.inst;
        self.kernel
            .lock()
            .map_err(|_| SessionError::Poisoned)?
            .set_instance(self.cgroup_id, &inst)?;
        Ok(())
    }

    /// Publish the new state to the kernel; called with the state locked so
    /// epochs reach the kernel in order.
    fn publish(&self, st: &mut State) -> Result<(), SessionError> {
        let mask = st.in_flight.iter().fold(SERVER_BIT, |m, c| m | c.bit);
        st.inst.active_mask = mask;
        st.inst.epoch += 1;
        // Declared capabilities: when every call in flight is of a tool that
        // declared it touches no open world, egress is refused; when every
        // one declared itself read-only, writes are.
        let policy = self.policy();
        let declared = |st: &State, f: fn(&crate::relay::ToolAnnotations) -> bool| {
            policy.mcp.enforce_annotations
                && !st.in_flight.is_empty()
                && st
                    .in_flight
                    .iter()
                    .all(|c| st.annotations.get(&c.tool).is_some_and(f))
        };
        let closed = declared(st, |a| a.open_world_hint == Some(false));
        let read_only = declared(st, |a| a.read_only_hint == Some(true));
        let e = st.inst.epoch;
        set_flag(&mut st.inst.flags, flags::CLOSED_WORLD, closed);
        if closed {
            st.closed_world_epochs.insert(e);
        }
        set_flag(&mut st.inst.flags, flags::READ_ONLY, read_only);
        if read_only {
            st.read_only_epochs.insert(e);
        }
        // Where the kernel cannot refuse the writes itself, they are
        // reported and judged here.
        let report = watches_tool_files(&policy, self.files_by)
            || (read_only && policy.mode == Mode::Enforce && self.files_by != FilesBy::BpfLsm);
        set_flag(&mut st.inst.flags, flags::REPORT_FILES, report);
        let calls = st
            .in_flight
            .iter()
            .map(|c| (c.id.clone(), c.tool.clone()))
            .collect();
        st.history.push_back((st.inst.epoch, calls));
        while st.history.len() > HISTORY {
            st.history.pop_front();
        }
        if let Some(&(oldest, _)) = st.history.front() {
            if st.closed_world_epochs.first().is_some_and(|e| *e < oldest) {
                st.closed_world_epochs = st.closed_world_epochs.split_off(&oldest);
            }
            if st.read_only_epochs.first().is_some_and(|e| *e < oldest) {
                st.read_only_epochs = st.read_only_epochs.split_off(&oldest);
            }
        }
        self.kernel
            .lock()
            .map_err(|_| SessionError::Poisoned)?
            .set_instance(self.cgroup_id, &st.inst)?;
        Ok(())
    }

    /// A `tools/call` of `tool` with request id `id` is about to be
    /// forwarded: its rules are in force when this returns Ok.
    pub fn call_begin(&self, id: &Value, tool: &str) -> Result<(), SessionError> {
        let policy = self.policy();
        if policy.mode == Mode::Audit && !policy.tool_allowed(tool) {
            self.audit_undeclared_call(id, tool);
        }
        let mut st = self.state.lock().map_err(|_| SessionError::Poisoned)?;
        st.in_flight.push(InFlight {
            id: id.clone(),
            tool: tool.to_string(),
            bit: self.policy().tool_bit(tool).unwrap_or(0),
            started: Instant::now(),
        });
        st.acct.insert(
            id.to_string(),
            CallAcct {
                tool: tool.to_string(),
                counts: BTreeMap::new(),
                bytes: [0; 2],
                shared: false,
                ended: None,
            },
        );
        if let Err(e) = self.publish(&mut st) {
            st.in_flight.retain(|c| &c.id != id);
            st.acct.remove(&id.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// The call with request id `id` ended: withdraw its rights. Returns
    /// the tool and the time since `call_begin`.
    pub fn call_end(&self, id: &Value) -> Result<Option<(String, f64)>, SessionError> {
        let mut st = self.state.lock().map_err(|_| SessionError::Poisoned)?;
        let Some(pos) = st.in_flight.iter().position(|c| &c.id == id) else {
            return Ok(None);
        };
        let call = st.in_flight.remove(pos);
        self.publish(&mut st)?;
        Ok(Some((
            call.tool,
            call.started.elapsed().as_secs_f64() * 1000.0,
        )))
    }

    /// Calls in flight at `epoch`, or None when the epoch is out of history.
    fn attribution(&self, epoch: u64) -> Option<Attribution> {
        let st = self.state.lock().ok()?;
        let idx = st.history.binary_search_by_key(&epoch, |(e, _)| *e).ok()?;
        Some(Attribution {
            calls: st.history[idx].1.clone(),
        })
    }

    /// The call ended (its rights are already withdrawn): keep its record
    /// until its syscall counts are drained from the kernel by
    /// [`Session::account`], which emits it.
    pub fn call_finished(&self, rec: ToolCallRecord) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let epoch = st.inst.epoch;
        match st.acct.get_mut(&rec.call_id.to_string()) {
            Some(a) => a.ended = Some((epoch, rec)),
            None => {
                drop(st);
                self.emit_call(rec);
            }
        }
    }

    /// Drain the syscall counters of every epoch that can no longer grow,
    /// attribute them to the calls in flight during each epoch (exact when
    /// alone, shared otherwise, "(idle)" when none), and emit the records of
    /// calls whose counts are complete. `all`: the instance has ended.
    pub fn account(&self, all: bool) {
        let before = match self.state.lock() {
            Ok(st) => st.inst.epoch,
            Err(_) => return,
        };
        // The counters' own lock: the relay's instance updates never wait
        // for a drain.
        let (drained, bytes) = match self.counters.lock() {
            Ok(mut k) => (
                k.drain_syscalls(self.cgroup_id, (!all).then_some(before)),
                k.drain_bytes(self.cgroup_id, (!all).then_some(before)),
            ),
            Err(_) => return,
        };
        let drained = drained.unwrap_or_else(|e| {
            log::error!("{}: reading syscall counters: {e}", self.info.instance);
            Vec::new()
        });
        let bytes = bytes.unwrap_or_else(|e| {
            log::error!("{}: reading byte counters: {e}", self.info.instance);
            Vec::new()
        });
        let mut idle_bytes = [0u64; 2];
        let mut idle: BTreeMap<u32, u64> = BTreeMap::new();
        let mut done = Vec::new();
        {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            for (epoch, nr, n) in drained {
                let calls = st
                    .history
                    .binary_search_by_key(&epoch, |(e, _)| *e)
                    .ok()
                    .map(|i| st.history[i].1.clone())
                    .unwrap_or_default();
                if calls.is_empty() {
                    *idle.entry(nr).or_default() += n;
                }
                let shared = calls.len() > 1;
                for (id, _) in &calls {
                    if let Some(a) = st.acct.get_mut(&id.to_string()) {
                        *a.counts.entry(nr).or_default() += n;
                        a.shared |= shared;
                    }
                }
            }
            for (epoch, dir, n) in bytes {
                let d = usize::from(dir != mcp_warden_common::DIR_EGRESS);
                let calls = st
                    .history
                    .binary_search_by_key(&epoch, |(e, _)| *e)
                    .ok()
                    .map(|i| st.history[i].1.clone())
                    .unwrap_or_default();
                if calls.is_empty() {
                    idle_bytes[d] += n;
                }
                let shared = calls.len() > 1;
                for (id, _) in &calls {
                    if let Some(a) = st.acct.get_mut(&id.to_string()) {
                        a.bytes[d] += n;
                        a.shared |= shared;
                    }
                }
            }
            let finished: Vec<String> = st
                .acct
                .iter()
                .filter(|(_, a)| a.ended.as_ref().is_some_and(|(e, _)| all || *e <= before))
                .map(|(k, _)| k.clone())
                .collect();
            for k in finished {
                if let Some(a) = st.acct.remove(&k) {
                    done.push(a);
                }
            }
        }
        for (nr, n) in &idle {
            self.metrics
                .tool_syscalls
                .with_label_values(&[self.info.server.as_str(), "(idle)", &syscall_name(*nr)])
                .inc_by(*n);
        }
        for (d, n) in idle_bytes.iter().enumerate() {
            if *n > 0 {
                self.metrics
                    .tool_bytes
                    .with_label_values(&[self.info.server.as_str(), "(idle)", DIRECTIONS[d]])
                    .inc_by(*n);
            }
        }
        for a in done {
            let Some((_, mut rec)) = a.ended else {
                continue;
            };
            rec.net_bytes_out = a.bytes[0];
            rec.net_bytes_in = a.bytes[1];
            for (d, n) in a.bytes.iter().enumerate() {
                self.metrics
                    .tool_bytes
                    .with_label_values(&[self.info.server.as_str(), &a.tool, DIRECTIONS[d]])
                    .inc_by(*n);
            }
            for (dir, n) in [
                ("request", rec.request_bytes),
                ("response", rec.response_bytes),
            ] {
                self.metrics
                    .tool_bytes
                    .with_label_values(&[self.info.server.as_str(), &a.tool, dir])
                    .inc_by(n);
            }
            let mut m = serde_json::Map::new();
            for (nr, n) in &a.counts {
                let name = syscall_name(*nr);
                self.metrics
                    .tool_syscalls
                    .with_label_values(&[self.info.server.as_str(), &a.tool, &name])
                    .inc_by(*n);
                m.insert(name, serde_json::json!(n));
            }
            rec.syscalls = Some(m);
            rec.syscalls_shared = a.shared;
            self.emit_call(rec);
        }
    }

    /// A kernel event for this instance: attribute, record, count, act.
    pub fn on_kernel_event(&self, ev: &Event) {
        let attr = self.attribution(ev.epoch).unwrap_or_default();
        // Reported file operations and execs are judged here (audit mode,
        // and rules the kernel cannot hold per call); allowed ones are
        // dropped unless asked for.
        let Some(judged) = self.judge_reported(ev, &attr) else {
            return;
        };
        let ev = &judged.ev;
        let mut rec = events::kernel_record(ev, &self.info, &attr);
        if let (Some(path), Value::Object(m)) = (judged.resolved, &mut rec) {
            if let Some(Value::String(passed)) = m.get("path").cloned() {
                if passed != path {
                    m.insert("path_as_passed".into(), Value::String(passed));
                }
            }
            m.insert("path".into(), Value::String(path));
        }
        self.stamp(&mut rec);
        let (closed, read_only) = self
            .state
            .lock()
            .map(|st| {
                (
                    st.closed_world_epochs.contains(&ev.epoch),
                    st.read_only_epochs.contains(&ev.epoch),
                )
            })
            .unwrap_or((false, false));
        if let Value::Object(m) = &mut rec {
            use mcp_warden_common::kind;
            if closed && ev.kind == kind::NET && ev.decision != decision::ALLOW {
                m.insert(
                    "reason".into(),
                    Value::String("the tool declared openWorldHint: false".into()),
                );
            }
            let write = ev.kind == kind::FILE
                && (ev.op != mcp_warden_common::op::OPEN || open_writes(ev.protocol));
            if read_only && write && ev.decision != decision::ALLOW && judged.violation.is_none() {
                m.insert("reason".into(), Value::String(READ_ONLY_REASON.into()));
            }
            if let Some(why) = &judged.violation {
                // The kernel let it run: say so, and what was done instead.
                m.insert("reason".into(), Value::String(why.clone()));
                m.insert("refused".into(), Value::Bool(false));
                m.insert("action".into(), Value::String("kill".into()));
            } else if ev.decision == decision::DENY
                && self.policy().on_violation == OnViolation::Kill
            {
                m.insert("action".into(), Value::String("kill".into()));
            }
        }
        if ev.decision != decision::ALLOW {
            self.metrics
                .violations
                .with_label_values(&[
                    self.info.server.as_str(),
                    &attr.tool_label(),
                    events::kind_name(ev.kind),
                    events::decision_name(ev.decision),
                ])
                .inc();
        }
        if let Ok(mut s) = self.sinks.lock() {
            s.emit(&rec);
        }
        if let Some(why) = judged.violation {
            log::warn!(
                "{}: killing the server tree: {why} ({} {})",
                self.info.instance,
                events::op_name(ev.op),
                rec.get("path").and_then(Value::as_str).unwrap_or("?")
            );
            self.stop(&why);
        } else if ev.decision == decision::DENY && self.policy().on_violation == OnViolation::Kill {
            log::warn!(
                "{}: killing the server tree (on_violation = kill)",
                self.info.instance
            );
            self.stop(&format!(
                "on_violation = kill: a {} {} was refused",
                events::kind_name(ev.kind),
                events::op_name(ev.op)
            ));
        }
    }

    /// Per-call detection judges what the kernel reported: if file, exec or
    /// process events were lost since the last look (the ring buffer was
    /// full; the counters are the agent's, not this instance's), a call
    /// cannot be shown to have kept to its rights. Fail closed: why.
    fn events_lost_since_last_look(&self) -> Option<String> {
        let now = match self.kernel.lock() {
            Ok(k) => file_events_lost(&k),
            Err(_) => Err(SessionError::Poisoned),
        };
        let mut seen = self.lost_seen.lock().unwrap_or_else(|p| p.into_inner());
        match now {
            Ok(n) if n <= *seen => None,
            Ok(n) => {
                let lost = n - *seen;
                *seen = n;
                Some(format!(
                    "{lost} file/exec events were lost (ring buffer full) while per-call file \
                     rules were held by detection: the call cannot be shown to have kept to \
                     its rights"
                ))
            }
            Err(e) => Some(format!(
                "the lost-event counters could not be read ({e}) while per-call file rules were \
                 held by detection"
            )),
        }
    }

    /// End the tree for a violation, remembering why for the relay.
    fn stop(&self, why: &str) {
        if let Ok(mut s) = self.stopped.lock() {
            s.get_or_insert_with(|| why.to_string());
        }
        self.kill_tree(why);
    }

    /// A file operation or exec the kernel reported without judging it
    /// (it succeeded). Judged here against the server's rules and those of
    /// the tools in flight when it ran:
    /// - audit mode (no Landlock ruleset): a would-be denial becomes
    ///   `decision = audit`;
    /// - enforce mode where the kernel cannot narrow file rules per call
    ///   (`flags::REPORT_FILES`): an operation that only a tool not in
    ///   flight may do, or a write while every call in flight is of a tool
    ///   that declared `readOnlyHint: true`, is a violation: the caller
    ///   records it as a denial the kernel did not refuse and ends the tree.
    ///
    /// Returns None to drop an allowed operation (unless EMIT_ALLOWED asks
    /// for those). Other events pass unchanged.
    fn judge_reported(&self, ev: &Event, attr: &Attribution) -> Option<Judged> {
        use crate::policy::judge::{allowed, Access};
        use mcp_warden_common::{kind, op};
        let pass = Some(Judged {
            ev: *ev,
            resolved: None,
            violation: None,
        });
        let file = ev.kind == kind::FILE && ev.decision == decision::ALLOW;
        let exec = ev.kind == kind::PROC && ev.op == op::EXEC;
        if !(file || exec) {
            return pass;
        }
        let policy = self.policy();
        let read_only = self
            .state
            .lock()
            .map(|st| st.read_only_epochs.contains(&ev.epoch))
            .unwrap_or(false);
        let audit = policy.mode == Mode::Audit;
        let watch = !audit
            && self.files_by != FilesBy::BpfLsm
            && (watches_tool_files(&policy, self.files_by) || (read_only && file));
        if !audit && !watch {
            return pass;
        }
        // BPF-LSM judged opens and execs itself (and reported what it would
        // refuse): what reaches here from the syscall exit was allowed.
        if self.files_by != FilesBy::Landlock && (exec || ev.op == op::OPEN) {
            if exec || !self.emit_allowed_off() {
                return pass;
            }
            return None;
        }
        let passed = {
            let end = ev
                .path
                .iter()
                .position(|c| *c == 0)
                .unwrap_or(ev.path.len());
            String::from_utf8_lossy(&ev.path[..end]).into_owned()
        };
        let follow = exec || ev.op == op::OPEN;
        let dirfd = if exec { -100 } else { ev.family as i32 };
        let resolved = events::resolve::resolve(ev.pid, dirfd, &passed, follow);
        let writes = file && (ev.op != op::OPEN || open_writes(ev.protocol));
        let accesses: &[Access] = if exec {
            &[Access::Exec]
        } else if ev.op == op::OPEN {
            let fl = ev.protocol as i32;
            match fl & libc::O_ACCMODE {
                libc::O_WRONLY => &[Access::Write],
                libc::O_RDWR => &[Access::Read, Access::Write],
                _ if writes => &[Access::Read, Access::Write],
                _ => &[Access::Read],
            }
        } else {
            &[Access::Write]
        };
        let judging = self.judging_rules(&policy);
        let (server_rules, tool_rules) = &*judging;
        let in_flight: Vec<&crate::policy::Rules> =
            std::iter::once(server_rules)
                .chain(attr.calls.iter().filter_map(|(_, tool)| {
                    tool_rules.iter().find(|(n, _)| n == tool).map(|(_, r)| r)
                }))
                .collect();
        let launched = self.launched.lock().map(|l| l.clone()).unwrap_or_default();
        let by = |sets: &[&crate::policy::Rules], p: &str| {
            accesses.iter().all(|a| allowed(sets, p, *a, &launched))
        };
        let ro_broken = read_only
            && writes
            && !resolved
                .as_deref()
                .is_some_and(crate::policy::judge::pseudo_fs);
        let mut out = *ev;
        if audit {
            // An unresolvable path cannot be shown to be allowed.
            let ok = !ro_broken && resolved.as_deref().is_some_and(|p| by(&in_flight, p));
            if !ok {
                out.decision = decision::AUDIT;
            } else if file && self.emit_allowed_off() {
                return None;
            }
            return Some(Judged {
                ev: out,
                resolved,
                violation: None,
            });
        }
        // Enforce mode: Landlock already refused what no rule of the server
        // or of any tool allows; what is judged here is what it had to let
        // through for the sake of a tool not in flight.
        let violation = if ro_broken {
            Some(READ_ONLY_REASON.to_string())
        } else {
            match resolved.as_deref() {
                None => Some(format!(
                    "the path {passed:?} could not be resolved while per-call file rules are held by \
                     detection: it cannot be shown to be allowed"
                )),
                Some(p) if !by(&in_flight, p) => {
                    let all: Vec<&crate::policy::Rules> = std::iter::once(server_rules)
                        .chain(tool_rules.iter().map(|(_, r)| r))
                        .collect();
                    by(&all, p).then(|| {
                        format!(
                            "only a tool not in flight may {} it (per-call file rules are held by \
                             detection and the kill action on this backend)",
                            if exec {
                                "run"
                            } else if writes {
                                "write"
                            } else {
                                "read"
                            }
                        )
                    })
                }
                Some(_) => None,
            }
        };
        if violation.is_none() && file && self.emit_allowed_off() {
            return None;
        }
        if violation.is_some() {
            out.decision = decision::DENY;
        }
        Some(Judged {
            ev: out,
            resolved,
            violation,
        })
    }

    /// The server's and each tool's rules with their real paths, built once
    /// per policy (a reload brings a new one).
    fn judging_rules(
        &self,
        policy: &Arc<Policy>,
    ) -> Arc<(crate::policy::Rules, Vec<(String, crate::policy::Rules)>)> {
        use crate::policy::judge::with_real_paths;
        let mut j = match self.judging.lock() {
            Ok(j) => j,
            Err(p) => p.into_inner(),
        };
        match &*j {
            Some(cur) if Arc::ptr_eq(&cur.0, policy) => cur.1.clone(),
            _ => {
                let built = Arc::new((
                    with_real_paths(&policy.rules),
                    policy
                        .tools
                        .iter()
                        .map(|t| (t.name.clone(), with_real_paths(&t.rules)))
                        .collect::<Vec<_>>(),
                ));
                *j = Some((policy.clone(), built.clone()));
                built
            }
        }
    }

    fn emit_allowed_off(&self) -> bool {
        self.state
            .lock()
            .map(|st| st.inst.flags & flags::EMIT_ALLOWED == 0)
            .unwrap_or(true)
    }

    /// End every process of the instance (cgroup.kill).
    pub fn kill_tree(&self, why: &str) {
        let kill = self.cgroup_path.join("cgroup.kill");
        match std::fs::write(&kill, b"1") {
            Ok(()) => log::debug!("{}: ended the server tree ({why})", self.info.instance),
            Err(e) => log::error!("{}: writing {}: {e}", self.info.instance, kill.display()),
        }
    }

    /// Audit mode let through a call of a tool `tools.allow` leaves out:
    /// report the would-be refusal and count it.
    fn audit_undeclared_call(&self, id: &Value, tool: &str) {
        self.metrics
            .violations
            .with_label_values(&[
                self.info.server.as_str(),
                "(undeclared)",
                "tool_call",
                "audit",
            ])
            .inc();
        self.record(
            "tool_call",
            serde_json::json!({
                "op": "call",
                "decision": "audit",
                "tool": tool,
                "call_id": id,
                "reason": format!("tool {tool:?} is not in tools.allow"),
                "policy_source": self.policy().source,
            }),
        );
    }

    /// Record a finished (or refused) tool call.
    pub fn emit_call(&self, c: ToolCallRecord) {
        self.record_call(&c);
    }

    fn record_call(&self, c: &ToolCallRecord) {
        let label = if self.policy().tool_allowed(&c.tool) || c.outcome != "refused" {
            c.tool.clone()
        } else {
            "(undeclared)".to_string()
        };
        self.metrics
            .tool_calls
            .with_label_values(&[self.info.server.as_str(), &label, c.outcome])
            .inc();
        if c.outcome != "refused" {
            self.metrics
                .tool_call_duration
                .with_label_values(&[self.info.server.as_str(), &label])
                .observe(c.duration_ms / 1000.0);
        }
        let mut rec = events::tool_call_record(&self.info, c);
        self.stamp(&mut rec);
        if let Ok(mut s) = self.sinks.lock() {
            s.emit(&rec);
        }
    }

    /// Emit a lifecycle record.
    pub fn record(&self, kind: &str, fields: Value) {
        let mut rec = events::lifecycle_record(kind, &self.info, fields);
        self.stamp(&mut rec);
        if let Ok(mut s) = self.sinks.lock() {
            s.emit(&rec);
        }
    }

    /// Remove the instance from the kernel (called after the tree is gone).
    pub fn unregister(&self) -> Result<(), SessionError> {
        self.kernel
            .lock()
            .map_err(|_| SessionError::Poisoned)?
            .remove_instance(self.cgroup_id)?;
        Ok(())
    }
}

/// The request id as the client sent it, for events.
pub fn id_value(id: &crate::relay::RequestId) -> Value {
    use crate::relay::RequestId;
    match id {
        RequestId::Number(n) => {
            serde_json::from_str(n).unwrap_or_else(|_| Value::String(n.clone()))
        }
        RequestId::String(s) => Value::String(s.clone()),
    }
}

/// The relay drives the session: rights in force before a call is
/// forwarded, withdrawn before its response is.
impl crate::relay::RelayHooks for Session {
    fn call_begin(
        &self,
        call: &crate::relay::CallStart,
    ) -> impl std::future::Future<Output = Result<(), crate::relay::HookError>> + Send {
        let id = id_value(&call.id);
        let tool = call.tool.clone();
        let hash = call.args_hash.clone();
        let needs_approval = self.policy().mcp.approval.contains(&tool);
        async move {
            if needs_approval {
                self.await_approval(&id, &tool, &hash)
                    .await
                    .map_err(crate::relay::HookError::Refused)?;
            }
            Session::call_begin(self, &id, &tool)
                .map_err(|e| crate::relay::HookError::Unreachable(e.to_string()))
        }
    }

    fn call_end(
        &self,
        call: &crate::relay::CallEnd,
    ) -> impl std::future::Future<Output = Option<String>> + Send {
        let id = id_value(&call.id);
        // File operations the kernel only reported (REPORT_FILES) are
        // judged before the response is forwarded: the event reader delivers
        // everything written so far (the server's operations of this call
        // happened before it wrote its response), so a violation ends the
        // tree and the response is withheld.
        let watched = self
            .state
            .lock()
            .map(|st| st.inst.flags & flags::REPORT_FILES != 0)
            .unwrap_or(true);
        let reader = if watched {
            self.reader.get().cloned()
        } else {
            None
        };
        if let Err(e) = Session::call_end(self, &id) {
            log::error!(
                "{}: withdrawing the rights of call {id}: {e}",
                self.info.instance
            );
        }
        self.call_finished(ToolCallRecord {
            tool: call.tool.clone(),
            call_id: id,
            outcome: call.outcome.as_str(),
            duration_ms: call.duration.as_secs_f64() * 1000.0,
            args_hash: Some(call.args_hash.clone()),
            syscalls: None,
            syscalls_shared: false,
            reason: call.detail.clone(),
            request_bytes: call.request_bytes,
            response_bytes: call.response_bytes,
            net_bytes_out: 0,
            net_bytes_in: 0,
        });
        // Counting happens off the relay's path.
        let _ = self.account_tx.send(());
        async move {
            if let Some(tx) = reader {
                let (ack, done) = tokio::sync::oneshot::channel();
                let drained = async {
                    tx.send(events::reader::Control::Drain(ack)).await.is_ok() && done.await.is_ok()
                };
                // The response waits for the judgement; one that cannot be
                // had in time is not given (fail closed).
                match tokio::time::timeout(DRAIN_LIMIT, drained).await {
                    Ok(true) => {
                        if let Some(why) = self.events_lost_since_last_look() {
                            self.stop(&why);
                        }
                    }
                    Ok(false) | Err(_) => self.stop(&format!(
                        "the kernel's reports of the call could not be judged within {} s \
                         (event reader gone or stalled)",
                        DRAIN_LIMIT.as_secs()
                    )),
                }
            }
            self.stopped()
        }
    }

    fn call_refused(&self, call: &crate::relay::CallStart, reason: &str) {
        self.record_call(&ToolCallRecord {
            tool: call.tool.clone(),
            call_id: id_value(&call.id),
            outcome: "refused",
            duration_ms: 0.0,
            args_hash: Some(call.args_hash.clone()),
            syscalls: None,
            syscalls_shared: false,
            reason: Some(reason.to_string()),
            request_bytes: call.request_bytes,
            response_bytes: 0,
            net_bytes_out: 0,
            net_bytes_in: 0,
        });
    }

    fn tools_listed(&self, tools: &BTreeMap<String, crate::relay::ToolAnnotations>) {
        if let Ok(mut st) = self.state.lock() {
            st.annotations = tools.clone();
        }
        let seen: serde_json::Map<String, Value> = tools
            .iter()
            .map(|(name, a)| (name.clone(), annotations_json(a)))
            .collect();
        let seen = Value::Object(seen);
        let changed = crate::annotations::remember(&self.info.server, &seen);
        self.record(
            "server",
            serde_json::json!({"event": "tools_listed", "annotations": seen}),
        );
        if let Some(before) = changed {
            log::warn!(
                "{}: the server's tool annotations changed since its last run",
                self.info.instance
            );
            self.record(
                "server",
                serde_json::json!({"event": "annotations_changed", "before": before, "after": seen}),
            );
        }
    }

    fn server_request(&self, method: &str, decision: crate::policy::Governance) {
        use crate::policy::Governance;
        let calls = self
            .state
            .lock()
            .map(|st| {
                st.in_flight
                    .iter()
                    .map(|c| (c.id.clone(), c.tool.clone()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let attr = crate::events::Attribution { calls };
        let d = match decision {
            Governance::Allow => "allow",
            Governance::Log => "audit",
            Governance::Deny => "deny",
        };
        if decision != Governance::Allow {
            log::warn!(
                "{}: server-initiated {method} {} (policy [mcp])",
                self.info.instance,
                if decision == Governance::Deny {
                    "refused"
                } else {
                    "logged"
                }
            );
            self.metrics
                .violations
                .with_label_values(&[self.info.server.as_str(), &attr.tool_label(), "server", d])
                .inc();
        }
        self.record(
            "server",
            serde_json::json!({
                "event": "server_request",
                "method": method,
                "decision": d,
                "tool": attr.tool(),
                "call_id": attr.call_id(),
            }),
        );
    }

    fn session_info(&self, info: &crate::relay::SessionInfo) {
        if info.client_name.is_some() {
            if let Ok(mut c) = self.client.lock() {
                *c = serde_json::json!({
                    "name": info.client_name,
                    "version": info.client_version,
                });
            }
        }
        self.record(
            "server",
            serde_json::json!({
                "event": "handshake",
                "protocol_version": info.negotiated_version.as_ref().or(info.protocol_version.as_ref()),
                "client_name": info.client_name,
                "client_version": info.client_version,
                "server_name": info.server_name,
                "server_version": info.server_version,
            }),
        );
    }
}

/// The syscall's name on this architecture ("nr_N" when unknown).
pub fn syscall_name(nr: u32) -> String {
    match syscalls::Sysno::new(nr as usize) {
        Some(s) => s.name().to_string(),
        None => format!("nr_{nr}"),
    }
}

/// How long the accountant waits after a call ends before draining, so a
/// burst of calls costs one drain.
const ACCOUNT_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// Runs [`Session::account`] whenever a call ends, off the relay's path
/// (draining the counters is a few hundred map syscalls).
pub async fn run_accountant(
    session: Arc<Session>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    while rx.recv().await.is_some() {
        // Coalesce bursts of call ends into one drain: a drain holds the
        // kernel maps' lock, which the next call's epoch switch waits for.
        tokio::time::sleep(ACCOUNT_DELAY).await;
        while rx.try_recv().is_ok() {}
        let s = session.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || s.account(false)).await {
            log::error!("syscall accounting task: {e}");
        }
    }
}

fn annotations_json(a: &crate::relay::ToolAnnotations) -> Value {
    serde_json::json!({
        "readOnlyHint": a.read_only_hint,
        "destructiveHint": a.destructive_hint,
        "idempotentHint": a.idempotent_hint,
        "openWorldHint": a.open_world_hint,
    })
}

/// How long a watched call's response waits for its events to be judged.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a write during a read-only call is a violation.
const READ_ONLY_REASON: &str = "the tool declared readOnlyHint: true";

fn set_flag(flags: &mut u32, flag: u32, on: bool) {
    if on {
        *flags |= flag;
    } else {
        *flags &= !flag;
    }
}

/// Does an open with these flags write (or create, or truncate)?
fn open_writes(open_flags: u32) -> bool {
    let fl = open_flags as i32;
    fl & libc::O_ACCMODE != libc::O_RDONLY || fl & (libc::O_CREAT | libc::O_TRUNC) != 0
}

/// Enforce mode where the kernel cannot narrow file rights per call (the
/// fallback, and Linux 6.1's mutations) and some tool has file or exec
/// rules of its own: successful file operations are reported and judged
/// per call ([`flags::REPORT_FILES`]).
fn watches_tool_files(policy: &Policy, files_by: FilesBy) -> bool {
    policy.mode == Mode::Enforce
        && files_by != FilesBy::BpfLsm
        && policy.tools.iter().any(|t| {
            let f = &t.rules.files;
            !(f.read.is_empty()
                && f.write.is_empty()
                && f.deny.is_empty()
                && t.rules.exec.allow.is_empty())
        })
}

/// Events of the kinds per-call detection judges (file, exec, process) the
/// kernel could not deliver, since the programs were loaded.
fn file_events_lost(k: &Kernel) -> Result<u64, SessionError> {
    use mcp_warden_common::kind;
    let lost = k.lost()?;
    Ok([kind::FILE, kind::EXEC, kind::PROC]
        .iter()
        .filter_map(|i| lost.get(*i as usize))
        .sum())
}
