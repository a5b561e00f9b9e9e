//! Prometheus metrics (names are a contract: shared/design.md). Label values
//! are bounded: tool names come from the policy or are folded into
//! "(other)", "(idle)" and "(several)"; kinds and decisions are enums.
use prometheus::{
    core::Collector, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("prometheus: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// The agent's metric families.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub violations: IntCounterVec,
    pub tool_calls: IntCounterVec,
    pub tool_call_duration: HistogramVec,
    pub tool_syscalls: IntCounterVec,
    pub tool_bytes: IntCounterVec,
    pub events_lost: IntCounterVec,
    pub servers: IntGaugeVec,
    pub enforcement_available: GaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn reg<C: Collector + Clone + 'static>(r: &Registry, c: C) -> Result<C, MetricsError> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registry::new();
        Ok(Self {
            violations: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "mcp_warden_violations_total",
                        "Operations outside the policy, by server, tool, kind and decision",
                    ),
                    &["server", "tool", "kind", "decision"],
                )?,
            )?,
            tool_calls: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "mcp_warden_tool_calls_total",
                        "Finished tools/call requests",
                    ),
                    &["server", "tool", "outcome"],
                )?,
            )?,
            tool_call_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "mcp_warden_tool_call_duration_seconds",
                        "Duration of tools/call requests",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                    &["server", "tool"],
                )?,
            )?,
            tool_syscalls: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "mcp_warden_tool_syscalls_total",
                        "System calls made during tool calls",
                    ),
                    &["server", "tool", "syscall"],
                )?,
            )?,
            tool_bytes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "mcp_warden_tool_bytes_total",
                        "Bytes of tool-call requests and results",
                    ),
                    &["server", "tool", "direction"],
                )?,
            )?,
            events_lost: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "mcp_warden_events_lost_total",
                        "Kernel events that could not be delivered, by kind",
                    ),
                    &["kind"],
                )?,
            )?,
            servers: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("mcp_warden_servers", "Confined server instances by state"),
                    &["state"],
                )?,
            )?,
            enforcement_available: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "mcp_warden_enforcement_available",
                        "1 when the enforcement hook is loaded and in force, 0 when not",
                    ),
                    &["hook"],
                )?,
            )?,
            registry: r,
        })
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            log::error!("encoding metrics: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_names_render() {
        let m = Metrics::new().expect("metrics");
        m.violations
            .with_label_values(&["demo", "fetch", "net", "deny"])
            .inc();
        m.tool_calls
            .with_label_values(&["demo", "fetch", "ok"])
            .inc();
        m.tool_call_duration
            .with_label_values(&["demo", "fetch"])
            .observe(0.01);
        m.tool_syscalls
            .with_label_values(&["demo", "fetch", "openat"])
            .inc_by(3);
        m.events_lost.with_label_values(&["net"]).inc_by(0);
        m.servers.with_label_values(&["running"]).set(1);
        m.enforcement_available
            .with_label_values(&["cgroup_connect4"])
            .set(1.0);
        let text = m.render();
        for name in [
            "mcp_warden_violations_total{",
            "mcp_warden_tool_calls_total{",
            "mcp_warden_tool_call_duration_seconds_bucket{",
            "mcp_warden_tool_syscalls_total{",
            "mcp_warden_events_lost_total{",
            "mcp_warden_servers{",
            "mcp_warden_enforcement_available{",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
