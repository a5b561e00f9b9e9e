//! In-flight `tools/call` tracking.
//!
//! A call starts when the relay forwards its request and ends on the first of:
//! the response with its id (result or error), `notifications/cancelled` for
//! its id, a terminal task status when the result was a task handle, or the
//! server's exit. Only sizes are kept of the messages, never their contents.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::jsonrpc::{RequestId, TaskStatus};

/// How a call ended (the event record's `outcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    Error,
    Refused,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// Outcome of a task that reached `status` (`None` while it runs).
    pub fn of_task(status: &TaskStatus) -> Option<Outcome> {
        match status {
            TaskStatus::Completed => Some(Outcome::Ok),
            TaskStatus::Failed => Some(Outcome::Error),
            TaskStatus::Cancelled => Some(Outcome::Cancelled),
            TaskStatus::Working | TaskStatus::InputRequired | TaskStatus::Other(_) => None,
        }
    }
}

/// A `tools/call` about to be forwarded (or refused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallStart {
    pub id: RequestId,
    /// `params.name`; empty when the request had none (it is then refused).
    pub tool: String,
    /// See [`super::jsonrpc::args_hash`].
    pub args_hash: String,
    /// Size of the line that carried the request (the whole batch line for a
    /// call inside a batch), newline included.
    pub request_bytes: u64,
    /// The request asked for task-augmented execution.
    pub task: bool,
}

/// A finished call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallEnd {
    pub id: RequestId,
    pub tool: String,
    pub args_hash: String,
    pub outcome: Outcome,
    pub duration: Duration,
    pub request_bytes: u64,
    /// Size of the line that ended the call (0 when nothing came back, e.g.
    /// cancelled or server exited).
    pub response_bytes: u64,
    /// Set when the result was a task handle.
    pub task_id: Option<String>,
    /// Why, when not a plain response: "cancelled by client", "server exited".
    pub detail: Option<String>,
}

#[derive(Debug)]
struct InFlight {
    start: CallStart,
    started: Instant,
    task_id: Option<String>,
}

/// Calls in flight, keyed by request id (overlapping calls are normal).
#[derive(Debug, Default)]
pub struct CallTracker {
    calls: HashMap<RequestId, InFlight>,
    by_task: HashMap<String, RequestId>,
}

impl CallTracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    pub fn contains(&self, id: &RequestId) -> bool {
        self.calls.contains_key(id)
    }

    /// The start of the call with `id`, if it is in flight.
    pub fn get(&self, id: &RequestId) -> Option<&CallStart> {
        self.calls.get(id).map(|f| &f.start)
    }

    /// Start tracking. False (and nothing changes) if `id` is already in
    /// flight: a reused id would make the two calls' ends ambiguous.
    pub fn begin(&mut self, start: CallStart) -> bool {
        if self.calls.contains_key(&start.id) {
            return false;
        }
        self.calls.insert(
            start.id.clone(),
            InFlight {
                start,
                started: Instant::now(),
                task_id: None,
            },
        );
        true
    }

    /// Forget a call that never went out (its begin hook failed).
    pub fn abort(&mut self, id: &RequestId) -> Option<CallStart> {
        let f = self.calls.remove(id)?;
        if let Some(t) = &f.task_id {
            self.by_task.remove(t);
        }
        Some(f.start)
    }

    /// End the call with `id`, if it is in flight.
    pub fn end(
        &mut self,
        id: &RequestId,
        outcome: Outcome,
        response_bytes: u64,
        detail: Option<&str>,
    ) -> Option<CallEnd> {
        let f = self.calls.remove(id)?;
        if let Some(t) = &f.task_id {
            self.by_task.remove(t);
        }
        Some(CallEnd {
            id: f.start.id,
            tool: f.start.tool,
            args_hash: f.start.args_hash,
            outcome,
            duration: f.started.elapsed(),
            request_bytes: f.start.request_bytes,
            response_bytes,
            task_id: f.task_id,
            detail: detail.map(str::to_owned),
        })
    }

    /// The call's result was a task handle: it stays in flight until the task
    /// reaches a terminal status. False if `id` is not in flight.
    pub fn attach_task(&mut self, id: &RequestId, task_id: &str) -> bool {
        let Some(f) = self.calls.get_mut(id) else {
            return false;
        };
        if let Some(old) = f.task_id.replace(task_id.to_owned()) {
            self.by_task.remove(&old);
        }
        self.by_task.insert(task_id.to_owned(), id.clone());
        true
    }

    /// End the call running as task `task_id`, if any.
    pub fn end_task(
        &mut self,
        task_id: &str,
        outcome: Outcome,
        response_bytes: u64,
        detail: Option<&str>,
    ) -> Option<CallEnd> {
        let id = self.by_task.get(task_id)?.clone();
        self.end(&id, outcome, response_bytes, detail)
    }

    /// End every call (server exited, relay stopping), oldest first.
    pub fn end_all(&mut self, outcome: Outcome, detail: &str) -> Vec<CallEnd> {
        let mut ids: Vec<(Instant, RequestId)> = self
            .calls
            .iter()
            .map(|(id, f)| (f.started, id.clone()))
            .collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|(_, id)| self.end(&id, outcome, 0, Some(detail)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(id: RequestId, tool: &str) -> CallStart {
        CallStart {
            id,
            tool: tool.into(),
            args_hash: "0123456789abcdef".into(),
            request_bytes: 10,
            task: false,
        }
    }

    fn num(n: u32) -> RequestId {
        RequestId::Number(n.to_string())
    }

    #[test]
    fn overlapping_calls_end_independently() {
        let mut t = CallTracker::new();
        assert!(t.begin(start(num(1), "a")));
        assert!(t.begin(start(RequestId::String("1".into()), "b")));
        assert!(!t.begin(start(num(1), "dup")), "reused id refused");
        assert_eq!(t.len(), 2);
        let e = t
            .end(&RequestId::String("1".into()), Outcome::Ok, 99, None)
            .expect("b");
        assert_eq!(
            (e.tool.as_str(), e.response_bytes, e.request_bytes),
            ("b", 99, 10)
        );
        assert!(t
            .end(&RequestId::String("1".into()), Outcome::Ok, 0, None)
            .is_none());
        let e = t
            .end(&num(1), Outcome::Cancelled, 0, Some("cancelled by client"))
            .expect("a");
        assert_eq!(e.outcome, Outcome::Cancelled);
        assert!(t.is_empty());
    }

    #[test]
    fn task_calls_end_at_terminal_status() {
        let mut t = CallTracker::new();
        t.begin(start(num(5), "slow"));
        assert!(t.attach_task(&num(5), "task-9"));
        assert!(t.end_task("other", Outcome::Ok, 0, None).is_none());
        let e = t
            .end_task("task-9", Outcome::Error, 3, None)
            .expect("ended");
        assert_eq!((e.id, e.task_id.as_deref()), (num(5), Some("task-9")));
        assert!(t.end_task("task-9", Outcome::Ok, 0, None).is_none());
        assert_eq!(Outcome::of_task(&TaskStatus::Working), None);
        assert_eq!(
            Outcome::of_task(&TaskStatus::Cancelled),
            Some(Outcome::Cancelled)
        );
    }

    #[test]
    fn end_all_ends_everything_oldest_first() {
        let mut t = CallTracker::new();
        t.begin(start(num(1), "a"));
        t.begin(start(num(2), "b"));
        t.attach_task(&num(2), "t");
        let ends = t.end_all(Outcome::Error, "server exited");
        assert_eq!(ends.len(), 2);
        assert_eq!(ends[0].tool, "a");
        assert!(ends
            .iter()
            .all(|e| e.outcome == Outcome::Error && e.detail.as_deref() == Some("server exited")));
        assert!(t.is_empty());
        assert!(t.end_task("t", Outcome::Ok, 0, None).is_none());
    }
}
