//! Metrics and alerts end to end, with a real Prometheus server: a confined
//! probe makes a denied connect under `mcp-warden run --metrics`, a
//! Prometheus (Debian package) scrapes that endpoint every second with the
//! shipped alert rules loaded, and its HTTP API shows the violation counter
//! and the McpWardenViolation alert firing. Also: the rules pass
//! `promtool check rules` and their unit tests. Loopback only.
mod ops_util;

use std::{
    io::Write,
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use mcp_warden_tests::{base_read_rules, require_root, warden, TempDir};
use ops_util::{
    free_port, http_get, packaging, require_tool, run_ok, urlencode, wait_until, Reaped,
};
use serde_json::Value;

const PROBE: &str = env!("CARGO_BIN_EXE_mw-probe");
const PROMETHEUS_PKG: &str = "apt-get install prometheus (Debian package; ships promtool too)";

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = require_tool("promtool", PROMETHEUS_PKG);
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(packaging("prometheus/alerts.yml")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS: 5 rules found"), "{text}");
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "alerts_test.yml"])
            .current_dir(packaging("prometheus")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "{text}");
}

/// Every "expr" under `v`.
fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x.as_str()) {
                    ("expr", Some(e)) => out.push(e.to_string()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// `/api/v1/query` for `expr`: the result vector.
fn query(prom: SocketAddr, expr: &str) -> Option<Vec<Value>> {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", urlencode(expr)))?;
    if status != 200 {
        return None;
    }
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"].as_array().cloned()
}

#[test]
fn prometheus_scrapes_the_violation_and_fires_the_alert() {
    require_root();
    let prometheus = require_tool("prometheus", PROMETHEUS_PKG);
    let dir = TempDir::new("prom");

    // A server whose policy allows no connect; it connects to a listener
    // of ours, is refused, and waits on stdin so its metrics stay served.
    let target = std::net::TcpListener::bind("127.0.0.1:0").expect("bind target");
    let target_port = target.local_addr().expect("addr").port();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\nserver = \"promtest\"\n\n[files]\n{}\n",
            base_read_rules(&[])
        ),
    )
    .expect("write policy");
    let events = dir.path().join("events.jsonl");
    let warden_log = dir.path().join("warden.log");
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut warden_run = Reaped(
        Some(
            Command::new(warden())
                // Standalone, even if an agent runs on this machine.
                .env("MCP_WARDEN_SOCKET", dir.path().join("no-agent.sock"))
                .arg("run")
                .arg("--policy")
                .arg(&policy)
                .arg("--events")
                .arg(&events)
                .arg("--metrics")
                .arg(metrics_addr.to_string())
                .arg("--")
                .args([
                    PROBE,
                    "tcp-connect",
                    &format!("127.0.0.1:{target_port}"),
                    ";",
                    "wait-stdin",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&warden_log).expect("warden log"))
                .spawn()
                .expect("spawn mcp-warden run"),
        ),
        "mcp-warden run",
    );

    // The endpoint itself shows the denial first.
    wait_until(
        "the violation on /metrics",
        Duration::from_secs(30),
        |last| {
            if let Ok(Some(st)) = warden_run.child().try_wait() {
                panic!("mcp-warden run exited early: {st}");
            }
            let (status, body) = http_get(metrics_addr, "/metrics")?;
            *last = format!("{status}: {body}");
            (status == 200
                && body.lines().any(|l| {
                    l.starts_with("mcp_warden_violations_total{")
                        && l.contains("server=\"promtest\"")
                        && l.ends_with(" 1")
                }))
            .then_some(())
        },
    );
    let (status, _) = http_get(metrics_addr, "/").expect("answer on /");
    assert_eq!(status, 404, "only /metrics is served");

    // A real Prometheus: scrape every second, evaluate the shipped rules
    // every second.
    let prom_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    std::fs::copy(
        packaging("prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .expect("copy alerts.yml");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - alerts.yml\n\
             scrape_configs:\n  - job_name: mcp-warden\n    static_configs:\n      - targets: ['{metrics_addr}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let prom_log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&prom_log).expect("prometheus log");
    let mut prom = Reaped(
        Some(
            Command::new(&prometheus)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={prom_addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("spawn prometheus"),
        ),
        "prometheus",
    );
    let prom_log_text = || std::fs::read_to_string(&prom_log).unwrap_or_default();

    let series = wait_until(
        "Prometheus sees mcp_warden_violations_total > 0",
        Duration::from_secs(60),
        |last| {
            if let Ok(Some(st)) = prom.child().try_wait() {
                panic!("prometheus exited: {st}\n{}", prom_log_text());
            }
            let r = query(prom_addr, "mcp_warden_violations_total > 0")?;
            *last = format!("{r:?}");
            (!r.is_empty()).then_some(r)
        },
    );
    assert_eq!(series.len(), 1, "{series:?}");
    let m = &series[0]["metric"];
    assert_eq!(m["job"], "mcp-warden", "{m}");
    assert_eq!(m["server"], "promtest", "{m}");
    assert_eq!(m["kind"], "net", "{m}");
    assert_eq!(m["decision"], "deny", "{m}");
    assert_eq!(m["tool"], "(idle)", "no call in flight: {m}");
    assert_eq!(series[0]["value"][1], "1", "{series:?}");

    let up = query(prom_addr, "up{job=\"mcp-warden\"}").expect("up");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0]["value"][1], "1", "target is up: {up:?}");
    let enforced = query(prom_addr, "mcp_warden_enforcement_available == 1").expect("query");
    assert!(
        !enforced.is_empty(),
        "hooks in force are exported: {enforced:?}"
    );

    let alert = wait_until(
        "the McpWardenViolation alert firing in Prometheus",
        Duration::from_secs(60),
        |last| {
            let (status, body) = http_get(prom_addr, "/api/v1/alerts")?;
            *last = format!("{status}: {body}");
            let v: Value = serde_json::from_str(&body).ok()?;
            v["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "McpWardenViolation" && a["state"] == "firing"
                })
                .cloned()
        },
    );
    let l = &alert["labels"];
    assert_eq!(l["server"], "promtest", "{alert}");
    assert_eq!(l["severity"], "warning", "{alert}");
    assert_eq!(l["decision"], "deny", "{alert}");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("promtest"),
        "{alert}"
    );
    // No other alert of ours fires on a healthy agent.
    let (_, body) = http_get(prom_addr, "/api/v1/alerts").expect("alerts");
    let v: Value = serde_json::from_str(&body).expect("alerts json");
    let others: Vec<&Value> = v["data"]["alerts"]
        .as_array()
        .expect("alerts array")
        .iter()
        .filter(|a| a["labels"]["alertname"] != "McpWardenViolation")
        .collect();
    assert!(others.is_empty(), "unexpected alerts: {others:?}");

    // Every query of the Grafana dashboard is valid PromQL for this
    // Prometheus, and the violations-by-tool panel shows the denial.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(packaging("grafana/mcp-warden.json")).expect("read dashboard"),
    )
    .expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 15, "{exprs:?}");
    let mut violation_panels = 0;
    for e in &exprs {
        let q = e
            .replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$instance", ".*")
            .replace("$server", ".*");
        let (status, body) = http_get(prom_addr, &format!("/api/v1/query?query={}", urlencode(&q)))
            .expect("prometheus answers");
        assert_eq!(status, 200, "dashboard query rejected: {q}\n{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["status"], "success", "{q}: {body}");
        if e.contains("hook!~") {
            // Every hook both backends need is in force on this host.
            assert_eq!(v["data"]["result"][0]["value"][1], "0", "{q}: {body}");
        }
        if e.contains("mcp_warden_violations_total") && e.contains("$__range") {
            // The stat and the table over the time range count the one denial.
            let rows = v["data"]["result"].as_array().cloned().unwrap_or_default();
            assert_eq!(rows.len(), 1, "{q}: {body}");
            assert_eq!(rows[0]["value"][1], "1", "{q}: {body}");
            violation_panels += 1;
        }
    }
    assert_eq!(violation_panels, 2, "violation stat and table checked");

    // Let the server finish; `run` exits with its status.
    {
        let mut sin = warden_run.child().stdin.take().expect("stdin");
        sin.write_all(b"go\n").expect("write stdin");
    }
    let mut stdout = String::new();
    {
        use std::io::Read;
        let mut o = warden_run.child().stdout.take().expect("stdout");
        o.read_to_string(&mut stdout).expect("read probe output");
    }
    let st = warden_run.wait_for_exit(Duration::from_secs(30));
    let stderr = std::fs::read_to_string(&warden_log).unwrap_or_default();
    assert!(st.success(), "mcp-warden run: {st}\n{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["errno=1", "ok"],
        "the connect was refused with EPERM; stderr:\n{stderr}"
    );
    drop(target);
}
