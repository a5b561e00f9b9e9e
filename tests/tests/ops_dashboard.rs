//! The Grafana dashboard and the alert rules name only metrics the agent
//! really exports. The exported names come from the agent itself:
//! `Metrics::new()`, every family touched once, rendered; not from a list
//! written here.
mod ops_util;

use std::collections::BTreeSet;

use mcp_warden::metrics::Metrics;
use ops_util::packaging;
use serde_json::Value;

/// Series names in the agent's exposition (histograms as their `_bucket`,
/// `_sum` and `_count` series, as PromQL sees them).
fn exported() -> BTreeSet<String> {
    let m = Metrics::new().expect("metrics");
    // Touch every family so each renders (a labelled family with no child
    // renders nothing). Label values are arbitrary.
    m.violations
        .with_label_values(&["s", "t", "net", "deny"])
        .inc();
    m.tool_calls.with_label_values(&["s", "t", "ok"]).inc();
    m.tool_call_duration
        .with_label_values(&["s", "t"])
        .observe(0.1);
    m.tool_syscalls
        .with_label_values(&["s", "t", "openat"])
        .inc();
    m.tool_bytes.with_label_values(&["s", "t", "egress"]).inc();
    m.events_lost.with_label_values(&["net"]).inc();
    m.servers.with_label_values(&["running"]).set(1);
    m.enforcement_available
        .with_label_values(&["cgroup_connect4"])
        .set(1.0);
    let text = m.render();
    let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert_eq!(
        families, 8,
        "a metric family was added or removed: touch it above\n{text}"
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            l.split(['{', ' '])
                .next()
                .expect("a sample line starts with its name")
                .to_string()
        })
        .collect()
}

/// Series Prometheus adds itself for every target.
const PROMETHEUS_SERIES: &[&str] = &["up", "scrape_duration_seconds"];

/// PromQL words that are not metric names: operators, modifiers and the
/// aggregations (which may be followed by `by (...)` rather than `(`).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Metric names an expression reads: identifiers that are not functions or
/// aggregations (followed by `(`), keywords, label matchers (`{...}`),
/// label lists (`by (...)` and the like), ranges (`[...]`), strings,
/// numbers or Grafana variables (`$x`, `${x}`).
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut label_list_pending = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            if chars[i] == '\\' {
                                i += 1;
                            }
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if label_list_pending => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                label_list_pending = false;
            }
            '$' => {
                i += 1;
                if i < chars.len() && chars[i] == '{' {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations (5m, 1h30m, 1e3).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let call = j < chars.len() && chars[j] == '(';
                let lower = word.to_ascii_lowercase();
                if matches!(
                    lower.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    label_list_pending = true;
                } else if !call && !KEYWORDS.contains(&lower.as_str()) {
                    out.push(word);
                }
            }
            _ => i += 1,
        }
    }
    out
}

#[test]
fn the_extractor_reads_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (le, server) (rate(a_bucket{x=~"$v", y="b{c}"}[$__rate_interval]))) > 4 * on (job) group_left(tool) b offset 5m or vector(0) unless c_total"#
        ),
        ["a_bucket", "b", "c_total"]
    );
    assert_eq!(
        metric_names("sum(increase(mcp_warden_x[1h30m])) / 1e3"),
        ["mcp_warden_x"]
    );
}

/// Every `expr` of the dashboard's panels (rows included) and the metric
/// of every `label_values(...)` variable.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "expr" {
                        out.push(v.as_str().expect("expr is a string").to_string());
                    } else {
                        walk(v, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    for var in d["templating"]["list"].as_array().expect("templating") {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .expect("query variable has a query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {} is not label_values(...): {q}", var["name"]));
        // label_values(METRIC_SELECTOR, LABEL): the selector is PromQL.
        let (selector, _label) = inner.rsplit_once(',').expect("label_values(sel, label)");
        out.push(selector.to_string());
    }
    out
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let exported = exported();
    let path = packaging("grafana/mcp-warden.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read dashboard"))
        .expect("the dashboard is JSON");
    assert_eq!(d["uid"], "mcp-warden");
    let exprs = dashboard_exprs(&d);
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "query reads no metric: {e}");
        for n in names {
            assert!(
                exported.contains(&n) || PROMETHEUS_SERIES.contains(&n.as_str()),
                "{} queries {n}, which the agent does not export ({e});\nexported: {exported:?}",
                path.display()
            );
            used.insert(n);
        }
    }
    // What the issue asks the dashboard to show.
    for needed in [
        "mcp_warden_tool_calls_total",
        "mcp_warden_violations_total",
        "mcp_warden_tool_bytes_total",
        "mcp_warden_events_lost_total",
        "mcp_warden_enforcement_available",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
    // Every panel has a query and a title; panel ids are unique.
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate id {}",
            p["id"]
        );
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        if p["type"] != "row" {
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "panel {} has no query",
                p["title"]
            );
        }
    }
}

/// A made-up name is caught: the check can fail.
#[test]
fn a_wrong_name_is_caught() {
    let exported = exported();
    let names = metric_names("sum(rate(mcp_warden_tool_call_total[5m]))");
    assert_eq!(names, ["mcp_warden_tool_call_total"]);
    assert!(!exported.contains(&names[0]));
}

#[test]
fn alert_rules_name_only_exported_metrics() {
    let exported = exported();
    let text = std::fs::read_to_string(packaging("prometheus/alerts.yml")).expect("read alerts");
    let mut seen = 0;
    for l in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for n in metric_names(l)
            .into_iter()
            .filter(|n| n.starts_with("mcp_warden_"))
        {
            assert!(
                exported.contains(&n),
                "alerts.yml uses {n}, not exported: {l}"
            );
            seen += 1;
        }
    }
    assert!(seen >= 6, "alerts.yml names the agent's metrics");
}

/// The hooks that read 0 by design on the fallback backend: the agent's
/// BPF-LSM hooks. The alert and the dashboard leave out exactly these.
#[test]
fn lsm_hooks_left_out_of_the_unavailable_alert_are_the_agents() {
    let lsm: BTreeSet<&str> = mcp_warden_common::programs::LSM_HOOKS
        .iter()
        .map(|(_, hook)| *hook)
        .collect();
    let excluded = |text: &str, what: &str| -> BTreeSet<String> {
        let (_, rest) = text
            .split_once("hook!~\"")
            .unwrap_or_else(|| panic!("{what}: no hook!~ matcher"));
        let (list, _) = rest.split_once('"').expect("closing quote");
        list.split('|').map(str::to_string).collect()
    };
    let alerts = std::fs::read_to_string(packaging("prometheus/alerts.yml")).expect("alerts");
    let rule = alerts
        .split("- alert: ")
        .find(|r| r.starts_with("McpWardenEnforcementUnavailable"))
        .expect("the rule");
    let ex = excluded(rule, "alerts.yml");
    assert_eq!(
        ex.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        lsm,
        "alerts.yml"
    );
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(packaging("grafana/mcp-warden.json")).expect("dashboard"),
    )
    .expect("json");
    let stat = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| p["title"] == "Required hooks unavailable")
        .expect("the stat");
    let ex = excluded(
        stat["targets"][0]["expr"].as_str().expect("expr"),
        "dashboard",
    );
    assert_eq!(
        ex.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        lsm,
        "dashboard"
    );
}
