//! One confined server instance as the agent sees it: its kernel state
//! (instance map entry, rules), the calls in flight, and the epoch history
//! that ties every kernel event to the `tools/call` it happened in.
//!
//! Race-freedom: `call_begin` updates the kernel's instance state (active
//! tool mask, epoch) and returns only after the map update returned, so the
//! relay forwards the request only once the tool's rights are in force.
//! `call_end` withdraws them before the relay forwards the response.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Instant,
};

use mcp_warden_common::{decision, flags, Event, InstanceState, SERVER_BIT};
use serde_json::Value;

use crate::{
    events::{self, Attribution, InstanceInfo, Sinks, ToolCallRecord},
    kernel::{Kernel, KernelError},
    metrics::Metrics,
    policy::{Mode, OnViolation, Policy},
};

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
}

/// Shared between the relay, the event reader and the signal handler.
pub struct Session {
    kernel: Arc<Mutex<Kernel>>,
    cgroup_id: u64,
    cgroup_path: std::path::PathBuf,
    /// Replaced whole on reload ([`Session::swap_policy`]).
    policy: std::sync::RwLock<Arc<Policy>>,
    info: InstanceInfo,
    state: Mutex<State>,
    sinks: Arc<Mutex<Sinks>>,
    metrics: Metrics,
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
        epoch: u64,
    ) -> Result<Self, SessionError> {
        let mut fl = 0;
        if policy.mode == Mode::Audit {
            fl |= flags::AUDIT;
        }
        if policy.on_violation == OnViolation::Kill {
            fl |= flags::KILL;
        }
        let inst = InstanceState {
            instance_id,
            policy_id,
            active_mask: SERVER_BIT,
            epoch,
            flags: fl,
            _pad: 0,
        };
        kernel
            .lock()
            .map_err(|_| SessionError::Poisoned)?
            .set_instance(cgroup_id, &inst)?;
        let mut history = VecDeque::new();
        history.push_back((epoch, Vec::new()));
        Ok(Self {
            kernel,
            cgroup_id,
            cgroup_path,
            policy: std::sync::RwLock::new(policy),
            info,
            state: Mutex::new(State {
                inst,
                in_flight: Vec::new(),
                history,
            }),
            sinks,
            metrics,
        })
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
        let calls = st
            .in_flight
            .iter()
            .map(|c| (c.id.clone(), c.tool.clone()))
            .collect();
        st.history.push_back((st.inst.epoch, calls));
        while st.history.len() > HISTORY {
            st.history.pop_front();
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
        let mut st = self.state.lock().map_err(|_| SessionError::Poisoned)?;
        st.in_flight.push(InFlight {
            id: id.clone(),
            tool: tool.to_string(),
            bit: self.policy().tool_bit(tool).unwrap_or(0),
            started: Instant::now(),
        });
        if let Err(e) = self.publish(&mut st) {
            st.in_flight.retain(|c| &c.id != id);
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

    /// A kernel event for this instance: attribute, record, count, act.
    pub fn on_kernel_event(&self, ev: &Event) {
        let attr = self.attribution(ev.epoch).unwrap_or_default();
        let rec = events::kernel_record(ev, &self.info, &attr);
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
        if ev.decision == decision::DENY && self.policy().on_violation == OnViolation::Kill {
            self.kill_tree("on_violation = kill");
        }
    }

    /// End every process of the instance (cgroup.kill).
    pub fn kill_tree(&self, why: &str) {
        let kill = self.cgroup_path.join("cgroup.kill");
        match std::fs::write(&kill, b"1") {
            Ok(()) => log::warn!("{}: killed the server tree ({why})", self.info.instance),
            Err(e) => log::error!("{}: writing {}: {e}", self.info.instance, kill.display()),
        }
    }

    /// Record a finished (or refused) tool call.
    pub fn record_call(&self, c: &ToolCallRecord) {
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
        let rec = events::tool_call_record(&self.info, c);
        if let Ok(mut s) = self.sinks.lock() {
            s.emit(&rec);
        }
    }

    /// Emit a lifecycle record.
    pub fn record(&self, kind: &str, fields: Value) {
        let rec = events::lifecycle_record(kind, &self.info, fields);
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
        let r = Session::call_begin(self, &id_value(&call.id), &call.tool)
            .map_err(|e| crate::relay::HookError::Unreachable(e.to_string()));
        async move { r }
    }

    fn call_end(
        &self,
        call: &crate::relay::CallEnd,
    ) -> impl std::future::Future<Output = ()> + Send {
        let id = id_value(&call.id);
        if let Err(e) = Session::call_end(self, &id) {
            log::error!(
                "{}: withdrawing the rights of call {id}: {e}",
                self.info.instance
            );
        }
        self.record_call(&ToolCallRecord {
            tool: call.tool.clone(),
            call_id: id,
            outcome: call.outcome.as_str(),
            duration_ms: call.duration.as_secs_f64() * 1000.0,
            args_hash: Some(call.args_hash.clone()),
            syscalls: None,
            reason: call.detail.clone(),
            request_bytes: call.request_bytes,
            response_bytes: call.response_bytes,
        });
        async {}
    }

    fn call_refused(&self, call: &crate::relay::CallStart, reason: &str) {
        self.record_call(&ToolCallRecord {
            tool: call.tool.clone(),
            call_id: id_value(&call.id),
            outcome: "refused",
            duration_ms: 0.0,
            args_hash: Some(call.args_hash.clone()),
            syscalls: None,
            reason: Some(reason.to_string()),
            request_bytes: call.request_bytes,
            response_bytes: 0,
        });
    }

    fn session_info(&self, info: &crate::relay::SessionInfo) {
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
