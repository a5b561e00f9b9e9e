//! `cargo xtask bench`: measure mcp-warden against baselines taken in the
//! same run, and write BENCHMARKS.md.
//!
//! Every figure is a ratio or a difference against its own baseline,
//! measured in the same run, interleaved round by round (baseline, then the
//! measured case) so that drift in the machine's load hits both; each is the
//! median of `--runs` rounds. The workloads are tests/src/bin/mw-bench.rs.
//! Needs root (the agent loads eBPF programs) and a release build.
//!
//! No figure here is a pass/fail threshold for the test suite: goals are
//! reported as met or missed in BENCHMARKS.md, never asserted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::cmd::{self, Cmd};
use crate::repo_root;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rounds per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Use the existing release build (skip `cargo build --release`).
    #[arg(long)]
    no_build: bool,
    /// Use the debug build instead (a quick check of the bench itself; the
    /// figures are not meaningful).
    #[arg(long)]
    debug: bool,
    /// Where to write the report (default: BENCHMARKS.md in the repository).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Loop sizes: long enough that one run takes a few hundred ms.
const N_OPEN: u64 = 200_000;
const N_UDP: u64 = 50_000;
const N_GETPPID: u64 = 200_000;
const N_RTT: u64 = 2_000;
const BIG: u64 = 16 << 20;
const BIG_REPS: u64 = 5;
const N_FLOOD: u64 = 200_000;
/// UDP port the loops connect to (discard; nothing needs to listen).
const UDP_PORT: u16 = 9;

struct Bins {
    warden: PathBuf,
    bench: PathBuf,
}

struct Ctx {
    bins: Bins,
    dir: PathBuf,
    allow: PathBuf,
    deny: PathBuf,
    runs: usize,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A figure: the median of its rounds, and each round's value.
#[derive(Clone, Debug, Default)]
struct Figure {
    rounds: Vec<f64>,
}

impl Figure {
    fn push(&mut self, v: f64) {
        self.rounds.push(v);
    }
    fn median(&self) -> f64 {
        median(&self.rounds)
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `key=value` pairs anywhere in a program's output.
fn kv(out: &str) -> BTreeMap<String, String> {
    out.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(m: &BTreeMap<String, String>, k: &str) -> Result<f64> {
    m.get(k)
        .with_context(|| format!("no {k}= in the output {m:?}"))?
        .parse()
        .with_context(|| format!("{k} is not a number"))
}

/// Run a program, capture stdout, fail unless it exits 0. Its stdin is a
/// pipe held open until it exits: `mcp-warden run` takes end of input as
/// its client leaving and ends the server 5 s later, which a loaded
/// machine can reach before a long loop finishes.
fn output(prog: &Path, args: &[&str]) -> Result<String> {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", prog.display()))?;
    let stdin = child.stdin.take();
    let out = child.wait_with_output()?;
    drop(stdin);
    if !out.status.success() {
        bail!(
            "{} {args:?} exited with {}",
            prog.display(),
            cmd::code_of(out.status)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Ctx {
    fn warden_run<'a>(&'a self, policy: &'a Path, events: Option<&'a Path>) -> Vec<String> {
        let mut v = vec![
            self.bins.warden.display().to_string(),
            "run".into(),
            "--policy".into(),
            policy.display().to_string(),
        ];
        if let Some(e) = events {
            v.push("--events".into());
            v.push(e.display().to_string());
        }
        v.push("--".into());
        v
    }

    /// `mw-bench ARGS`, directly or confined under `mcp-warden run`.
    fn bench(&self, confined: Option<&Path>, args: &[&str]) -> Result<String> {
        match confined {
            None => output(&self.bins.bench, args),
            Some(policy) => {
                let mut a = self.warden_run(policy, None);
                a.push(self.bins.bench.display().to_string());
                a.extend(args.iter().map(|s| s.to_string()));
                let a: Vec<&str> = a.iter().skip(1).map(String::as_str).collect();
                output(&self.bins.warden, &a)
            }
        }
    }

    /// Empty programs on sys_enter and sys_exit (`mw-bench nop-hooks
    /// how`) kept attached while `f` runs.
    fn with_nop_hooks<T>(&self, how: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut child = Command::new(&self.bins.bench)
            .args(["nop-hooks", how])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting mw-bench nop-hooks")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let r = if line.trim() == "attached" {
            f()
        } else {
            Err(anyhow::anyhow!("mw-bench nop-hooks {how} did not attach"))
        };
        drop(child.stdin.take());
        let _ = child.wait();
        r
    }

    /// An idle confined server kept alive while `f` runs.
    fn with_idle_agent<T>(&self, f: impl FnOnce(u32) -> Result<T>) -> Result<T> {
        let events = self.dir.join("idle-events.jsonl");
        let _ = std::fs::remove_file(&events);
        let mut a = self.warden_run(&self.allow, Some(&events));
        a.push(self.bins.bench.display().to_string());
        a.push("idle".into());
        let mut child = Command::new(&a[0])
            .args(&a[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting an idle mcp-warden run")?;
        let pid = child.id();
        let r = wait_started(&events).and_then(|()| f(pid));
        drop(child.stdin.take());
        let _ = child.wait();
        r
    }
}

/// mcp-warden processes on the host that are not this bench's (other
/// users' agents attach the same global tracepoints and would tax the
/// "no agent" baseline).
fn foreign_agents() -> usize {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "mcp-warden")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Wait (up to 5 s) until no other mcp-warden runs; whether that happened.
fn quiet_host() -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while foreign_agents() > 0 {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

fn wait_started(events: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::read_to_string(events).is_ok_and(|s| s.contains("\"started\"")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the confined server did not start within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_events(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// kB of `field` (VmRSS, VmHWM) in /proc/PID/status.
fn proc_kb(pid: u32, field: &str) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} for pid {pid}"))
}

/// Resident kB of the process's mappings of BPF maps: the event ring
/// buffer, whose data pages the kernel maps twice (so 2 x 8 MiB), memory
/// the kernel allocated for the map whether or not it is mapped.
fn bpf_map_rss_kb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_map = false;
    let mut kb = 0.0;
    for l in s.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_map = l.ends_with("anon_inode:bpf-map");
        } else if in_map {
            if let Some(v) = l.strip_prefix("Rss:") {
                kb += v
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    kb
}

/// Seconds since midnight UTC of an RFC 3339 timestamp (enough to measure
/// spans within one run).
fn ts_seconds(ts: &str) -> Option<f64> {
    let t = ts.split('T').nth(1)?.trim_end_matches('Z');
    let t = t.split(['+']).next()?;
    let mut it = t.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn policy_text(ctx_target: &Path, connect: &[String]) -> String {
    let read = [
        "/usr/**".to_string(),
        "/lib/**".into(),
        "/lib64/**".into(),
        "/etc/ld.so.cache".into(),
        "/dev/null".into(),
        format!("{}/**", ctx_target.display()),
    ];
    let q = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "version = 1\nserver = \"bench\"\n\n[files]\nread = [{}]\n\n[network]\nconnect = [{}]\n",
        q(&read),
        q(connect)
    )
}

struct Machine {
    nproc: String,
    kernel: String,
    cpu: String,
    load_start: String,
    load_end: String,
    date: String,
    commit: String,
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

fn machine(root: &Path) -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let sh = |p: &str, a: &[&str]| {
        Cmd::new(p)
            .args(a)
            .current_dir(root)
            .quiet()
            .read()
            .map(|s| first_line(&s))
            .unwrap_or_default()
    };
    Machine {
        nproc: sh("nproc", &[]),
        kernel: sh("uname", &["-r"]),
        cpu,
        load_start: loadavg(),
        load_end: String::new(),
        date: sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        commit: sh("git", &["rev-parse", "--short", "HEAD"]),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[derive(Default)]
struct Results {
    /// (kind) -> figures
    no_agent: BTreeMap<&'static str, Figure>,
    confined: BTreeMap<&'static str, Figure>,
    agent_running: BTreeMap<&'static str, Figure>,
    confined_ratio: BTreeMap<&'static str, Figure>,
    agent_ratio: BTreeMap<&'static str, Figure>,
    /// Unconfined, empty programs on sys_enter + sys_exit: (raw_tp, tp_btf).
    floor: BTreeMap<(&'static str, &'static str), Figure>,
    floor_ratio: BTreeMap<(&'static str, &'static str), Figure>,
    rtt_direct: Figure,
    rtt_relay: Figure,
    rtt_added: Figure,
    ping_direct: Figure,
    ping_relay: Figure,
    /// tools/call through `mw-bench forward` (poll + read + write): the
    /// floor for any process between client and server.
    rtt_forward: Figure,
    /// The same three with every process on CPU 0 (`taskset -c 0`): no
    /// cross-CPU wake-ups.
    rtt_direct_1cpu: Figure,
    rtt_relay_1cpu: Figure,
    rtt_forward_1cpu: Figure,
    big_direct: Figure,
    big_relay: Figure,
    plain_wall: Figure,
    strace_wall: Figure,
    warden_wall: Figure,
    accounting_exact: Vec<bool>,
    flood: Vec<Flood>,
    rss_idle: Figure,
    rss_idle_no_ring: Figure,
    /// Baseline samples (loops without our agent) taken while another
    /// mcp-warden was running on the host, and all of them.
    tainted: usize,
    baselines: usize,
    start_direct: Figure,
    start_warden: Figure,
    /// `mcp-warden run` as a client of a running `mcp-warden agent`.
    start_client: Figure,
    /// Confined loops under perf: (kind, layer index) -> share of samples.
    layer_share: BTreeMap<(&'static str, usize), Figure>,
    /// ns/op of the profiled confined runs, per kind.
    profiled_ns: BTreeMap<&'static str, Figure>,
    /// Why there is no profile (perf missing or failing).
    profile_skipped: Option<String>,
}

struct Flood {
    generated: u64,
    gen_rate: f64,
    delivered: u64,
    lost: u64,
    drain_rate: f64,
    rss_load_kb: f64,
    hwm_kb: f64,
}

pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    if !cmd::is_root() {
        bail!("the bench loads eBPF programs: run it as root");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let root = repo_root();
    if !args.no_build && !args.debug {
        cmd::cargo(&root)
            .args([
                "build",
                "--release",
                "-p",
                "mcp-warden",
                "-p",
                "mcp-warden-tests",
            ])
            .check()?;
    }
    let target = root.join(if args.debug {
        "target/debug"
    } else {
        "target/release"
    });
    let bins = Bins {
        warden: target.join("mcp-warden"),
        bench: target.join("mw-bench"),
    };
    for b in [&bins.warden, &bins.bench] {
        if !b.exists() {
            bail!("{} missing: build with --release first", b.display());
        }
    }
    let dir = std::env::temp_dir().join(format!("mw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let allow = dir.join("allow.toml");
    let deny = dir.join("deny.toml");
    std::fs::write(
        &allow,
        policy_text(&target, &[format!("127.0.0.1:{UDP_PORT}")]),
    )?;
    std::fs::write(&deny, policy_text(&target, &[]))?;
    let ctx = Ctx {
        bins,
        dir,
        allow,
        deny,
        runs: args.runs,
    };
    let mut m = machine(&root);
    let mut r = Results::default();
    println!("== bench: {} rounds per figure", ctx.runs);
    loops(&ctx, &mut r)?;
    relay(&ctx, &mut r)?;
    accounting(&ctx, &mut r)?;
    flood(&ctx, &mut r)?;
    footprint(&ctx, &mut r)?;
    if let Err(e) = layers(&ctx, &mut r) {
        r.profile_skipped = Some(format!("{e:#}"));
    }
    m.load_end = loadavg();
    let report = render(&ctx, &m, &r);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("BENCHMARKS.md"));
    std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
    println!("== wrote {}", out.display());
    Ok(ExitCode::SUCCESS)
}

const KINDS: [(&str, u64); 2] = [("open", N_OPEN), ("udp", N_UDP)];

/// How the empty floor programs are attached (`mw-bench nop-hooks HOW`).
const FLOORS: [&str; 2] = ["raw", "btf"];

fn loops(ctx: &Ctx, r: &mut Results) -> Result<()> {
    let port = UDP_PORT.to_string();
    for round in 0..ctx.runs {
        println!("-- loops, round {}", round + 1);
        for (kind, n) in KINDS {
            let n = n.to_string();
            let args = ["loop", kind, n.as_str(), port.as_str()];
            let clean = quiet_host();
            let base = num(&kv(&ctx.bench(None, &args)?), "ns_per_op")?;
            r.baselines += 1;
            if !clean || foreign_agents() > 0 {
                r.tainted += 1;
            }
            let conf = num(&kv(&ctx.bench(Some(&ctx.allow), &args)?), "ns_per_op")?;
            let running =
                ctx.with_idle_agent(|_| num(&kv(&ctx.bench(None, &args)?), "ns_per_op"))?;
            for how in FLOORS {
                let v =
                    ctx.with_nop_hooks(how, || num(&kv(&ctx.bench(None, &args)?), "ns_per_op"))?;
                r.floor.entry((kind, how)).or_default().push(v);
                r.floor_ratio.entry((kind, how)).or_default().push(v / base);
            }
            r.no_agent.entry(kind).or_default().push(base);
            r.confined.entry(kind).or_default().push(conf);
            r.agent_running.entry(kind).or_default().push(running);
            r.confined_ratio.entry(kind).or_default().push(conf / base);
            r.agent_ratio.entry(kind).or_default().push(running / base);
        }
    }
    Ok(())
}

/// What sits between `mw-bench client` and `mw-bench server`.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    Direct,
    Relay,
    /// `mw-bench forward`: a minimal forwarder.
    Forward,
}

fn client_args(ctx: &Ctx, mode: &[&str], via: Via) -> Vec<String> {
    let mut a: Vec<String> = vec!["client".into()];
    a.extend(mode.iter().map(|s| s.to_string()));
    a.push("--".into());
    match via {
        Via::Direct => {}
        Via::Relay => a.extend(ctx.warden_run(&ctx.allow, None)),
        Via::Forward => {
            a.push(ctx.bins.bench.display().to_string());
            a.push("forward".into());
        }
    }
    a.push(ctx.bins.bench.display().to_string());
    a.push("server".into());
    a
}

fn client(ctx: &Ctx, mode: &[&str], relay: bool) -> Result<BTreeMap<String, String>> {
    client_via(
        ctx,
        mode,
        if relay { Via::Relay } else { Via::Direct },
        false,
    )
}

/// `one_cpu`: the client and everything it starts run on CPU 0 only.
fn client_via(
    ctx: &Ctx,
    mode: &[&str],
    via: Via,
    one_cpu: bool,
) -> Result<BTreeMap<String, String>> {
    let a = client_args(ctx, mode, via);
    if one_cpu {
        let mut t = vec![
            "-c".to_string(),
            "0".into(),
            ctx.bins.bench.display().to_string(),
        ];
        t.extend(a);
        let t: Vec<&str> = t.iter().map(String::as_str).collect();
        return Ok(kv(&output(Path::new("taskset"), &t)?));
    }
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    Ok(kv(&output(&ctx.bins.bench, &a)?))
}

fn relay(ctx: &Ctx, r: &mut Results) -> Result<()> {
    let n = N_RTT.to_string();
    let big = BIG.to_string();
    let reps = BIG_REPS.to_string();
    for round in 0..ctx.runs {
        println!("-- relay, round {}", round + 1);
        let d = num(&client(ctx, &["rtt", &n], false)?, "median_ns")?;
        let w = num(&client(ctx, &["rtt", &n], true)?, "median_ns")?;
        r.rtt_direct.push(d);
        r.rtt_relay.push(w);
        r.rtt_added.push(w - d);
        r.ping_direct
            .push(num(&client(ctx, &["ping", &n], false)?, "median_ns")?);
        r.ping_relay
            .push(num(&client(ctx, &["ping", &n], true)?, "median_ns")?);
        let rtt = |via, one_cpu| -> Result<f64> {
            num(&client_via(ctx, &["rtt", &n], via, one_cpu)?, "median_ns")
        };
        r.rtt_forward.push(rtt(Via::Forward, false)?);
        r.rtt_direct_1cpu.push(rtt(Via::Direct, true)?);
        r.rtt_relay_1cpu.push(rtt(Via::Relay, true)?);
        r.rtt_forward_1cpu.push(rtt(Via::Forward, true)?);
        let d = num(&client(ctx, &["big", &big, &reps], false)?, "median_ns")?;
        let w = num(&client(ctx, &["big", &big, &reps], true)?, "median_ns")?;
        r.big_direct.push(d);
        r.big_relay.push(w);
    }
    Ok(())
}

fn accounting(ctx: &Ctx, r: &mut Results) -> Result<()> {
    let n = N_GETPPID.to_string();
    let port = UDP_PORT.to_string();
    let strace = Path::new("strace");
    for round in 0..ctx.runs {
        println!("-- syscall accounting vs strace, round {}", round + 1);
        let plain = num(
            &kv(&ctx.bench(None, &["loop", "getppid", &n])?),
            "wall_ns_per_op",
        )?;
        let bench = ctx.bins.bench.display().to_string();
        let traced = num(
            &kv(&output(
                strace,
                &["-f", "-c", "-o", "/dev/null", &bench, "loop", "getppid", &n],
            )?),
            "wall_ns_per_op",
        )?;
        // The same loop as a tool call of a confined server: its syscalls
        // are counted per call by the sys_enter hook.
        let events = ctx.dir.join("acct-events.jsonl");
        let _ = std::fs::remove_file(&events);
        let mut a = vec!["client".to_string(), "loop".into(), "getppid".into()];
        a.push(n.clone());
        a.push(port.clone());
        a.push("--".into());
        a.extend(ctx.warden_run(&ctx.allow, Some(&events)));
        a.push(bench.clone());
        a.push("server".into());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let confined = num(&kv(&output(&ctx.bins.bench, &a)?), "wall_ns_per_op")?;
        let counted = read_events(&events)
            .iter()
            .find(|e| e["kind"] == "tool_call" && e["tool"] == "loop")
            .and_then(|e| e["syscalls"]["getppid"].as_u64());
        r.accounting_exact.push(counted == Some(N_GETPPID));
        r.plain_wall.push(plain);
        r.strace_wall.push(traced);
        r.warden_wall.push(confined);
    }
    Ok(())
}

fn flood(ctx: &Ctx, r: &mut Results) -> Result<()> {
    for round in 0..ctx.runs {
        println!("-- event flood, round {}", round + 1);
        let events = ctx.dir.join("flood-events.jsonl");
        let _ = std::fs::remove_file(&events);
        let mut a = ctx.warden_run(&ctx.deny, Some(&events));
        a.push(ctx.bins.bench.display().to_string());
        a.extend(["flood".into(), UDP_PORT.to_string(), N_FLOOD.to_string()]);
        let mut child = Command::new(&a[0])
            .args(&a[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the flood")?;
        let pid = child.id();
        let mut out = BufReader::new(child.stdout.take().context("stdout")?);
        let mut text = String::new();
        let mut line = String::new();
        while out.read_line(&mut line)? > 0 {
            text.push_str(&line);
            if line.trim() == "done" {
                break;
            }
            line.clear();
        }
        // The server is idle again; wait until the agent has written what
        // it will (the events file stops growing), then read its memory.
        let mut last = 0;
        let mut still = 0;
        while still < 6 {
            std::thread::sleep(Duration::from_millis(50));
            let len = std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0);
            if len == last {
                still += 1;
            } else {
                (last, still) = (len, 0);
            }
        }
        let rss_load_kb = proc_kb(pid, "VmRSS")?;
        let hwm_kb = proc_kb(pid, "VmHWM")?;
        drop(child.stdin.take());
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        let status = child.wait()?;
        if !status.success() {
            bail!("the flood run exited with {status}");
        }
        let m = kv(&text);
        let generated = num(&m, "generated")? as u64;
        let elapsed = num(&m, "elapsed_ns")?;
        let evs = read_events(&events);
        let denials: Vec<&Value> = evs
            .iter()
            .filter(|e| e["kind"] == "net" && e["decision"] == "deny" && e["port"] == UDP_PORT)
            .collect();
        let lost = evs
            .iter()
            .find(|e| e["event"] == "exited")
            .and_then(|e| e["events_lost"]["net"].as_u64())
            .context("the exited event carries no events_lost.net")?;
        let times: Vec<f64> = denials
            .iter()
            .filter_map(|e| ts_seconds(e["ts"].as_str()?))
            .collect();
        let span = times.iter().copied().fold(f64::NAN, f64::max)
            - times.iter().copied().fold(f64::NAN, f64::min);
        r.flood.push(Flood {
            generated,
            gen_rate: generated as f64 / (elapsed / 1e9),
            delivered: denials.len() as u64,
            lost,
            drain_rate: denials.len() as f64 / span,
            rss_load_kb,
            hwm_kb,
        });
    }
    Ok(())
}

fn footprint(ctx: &Ctx, r: &mut Results) -> Result<()> {
    for round in 0..ctx.runs {
        println!("-- footprint and start-up, round {}", round + 1);
        let (rss, ring) = ctx.with_idle_agent(|pid| {
            std::thread::sleep(Duration::from_millis(500));
            Ok((proc_kb(pid, "VmRSS")?, bpf_map_rss_kb(pid)))
        })?;
        r.rss_idle.push(rss);
        r.rss_idle_no_ring.push(rss - ring);
        r.start_direct.push(time_to_ready(
            &[ctx.bins.bench.display().to_string()],
            None,
        )?);
        let mut a = ctx.warden_run(&ctx.allow, None);
        a.push(ctx.bins.bench.display().to_string());
        r.start_warden.push(time_to_ready(&a, None)?);
    }
    // The fleet path: `run` as a client of an agent that already loaded
    // everything.
    let agent = BenchAgent::start(ctx)?;
    for round in 0..ctx.runs {
        println!("-- start-up with an agent running, round {}", round + 1);
        let mut a = ctx.warden_run(&ctx.allow, None);
        a.push(ctx.bins.bench.display().to_string());
        r.start_client.push(time_to_ready(&a, Some(&agent.sock))?);
    }
    drop(agent);
    Ok(())
}

/// A `mcp-warden agent` of the bench's own (socket, pins, cgroups and log
/// in the bench's directory), stopped and cleaned up on drop.
struct BenchAgent {
    child: std::process::Child,
    sock: PathBuf,
    pin_root: PathBuf,
    cgroup_parent: String,
}

impl BenchAgent {
    fn start(ctx: &Ctx) -> Result<Self> {
        let dir = ctx.dir.join("agent");
        std::fs::create_dir_all(dir.join("policies"))?;
        let uniq = format!("mw-bench-{}", std::process::id());
        let sock = dir.join("agent.sock");
        let pin_root = PathBuf::from("/sys/fs/bpf").join(&uniq);
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "socket = {:?}\nstate_dir = {:?}\npin_root = {:?}\npolicy_dir = {:?}\n\
                 audit_log = {:?}\nallow_user_policies = true\ncgroup_parent = {uniq:?}\n\
                 metrics_listen = \"off\"\n",
                sock,
                dir.join("state"),
                pin_root,
                dir.join("policies"),
                dir.join("audit.jsonl"),
            ),
        )?;
        let child = Command::new(&ctx.bins.warden)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mcp-warden agent")?;
        let agent = Self {
            child,
            sock,
            pin_root,
            cgroup_parent: uniq,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = Command::new(&ctx.bins.warden)
                .arg("status")
                .env("MCP_WARDEN_SOCKET", &agent.sock)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                bail!("mcp-warden agent did not answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        // Its pins hold the global tracepoints: remove them so later
        // baselines run without.
        let _ = std::fs::remove_dir_all(&self.pin_root);
        if let Some(root) = cgroup2_mount() {
            let parent = root.join(&self.cgroup_parent);
            if let Ok(rd) = std::fs::read_dir(&parent) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// Where cgroup2 is mounted (from /proc/self/mountinfo).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// The layers a confined syscall goes through, as perf sees them: a
/// sample belongs to the first layer one of its kernel frames (leaf to
/// root) names.
const LAYERS: [&str; 5] = [
    "Landlock (`hook_*`, path walk)",
    "seccomp filter",
    "sys_enter/sys_exit programs and their dispatch",
    "cgroup socket hooks",
    "traced-syscall entry/exit work",
];

fn layer_of(frames: &[&str]) -> Option<usize> {
    for f in frames {
        if f.starts_with("hook_") || f.contains("landlock") || *f == "is_access_to_paths_allowed" {
            return Some(0);
        }
        if f.contains("seccomp") {
            return Some(1);
        }
        if f.contains("bpf_trace_run")
            || f.contains("traceiter_sys_")
            || f.contains("mw_sys_enter")
            || f.contains("mw_sys_exit")
        {
            return Some(2);
        }
        if f.contains("__cgroup_bpf_run") {
            return Some(3);
        }
    }
    match frames.first() {
        Some(&"syscall_trace_enter") | Some(&"syscall_exit_work") => Some(4),
        _ => None,
    }
}

/// Profile the confined loops with `perf record` and split their samples
/// by layer.
fn layers(ctx: &Ctx, r: &mut Results) -> Result<()> {
    let perf = Path::new("perf");
    output(perf, &["--version"]).context("perf is not installed")?;
    let port = UDP_PORT.to_string();
    let data = ctx.dir.join("perf.data");
    let data_s = data.display().to_string();
    for round in 0..ctx.runs {
        println!("-- profile of the confined loops, round {}", round + 1);
        for (kind, n) in KINDS {
            let n = n.to_string();
            let mut a: Vec<String> = ["record", "-q", "-e", "cpu-clock", "-F", "4999", "-g", "-o"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            a.push(data_s.clone());
            a.push("--".into());
            a.extend(ctx.warden_run(&ctx.allow, None));
            a.push(ctx.bins.bench.display().to_string());
            a.extend(["loop".into(), kind.into(), n, port.clone()]);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let ns = num(&kv(&output(perf, &a)?), "ns_per_op")?;
            let script = output(
                perf,
                &[
                    "script",
                    "-i",
                    &data_s,
                    "--comm",
                    "mw-bench",
                    "-F",
                    "comm,ip,sym",
                ],
            )?;
            let mut counts = [0usize; LAYERS.len()];
            let mut total = 0usize;
            for block in script.split("\n\n") {
                let frames: Vec<&str> = block
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_whitespace().nth(1))
                    .collect();
                if frames.is_empty() {
                    continue;
                }
                total += 1;
                if let Some(i) = layer_of(&frames) {
                    counts[i] += 1;
                }
            }
            if total == 0 {
                bail!("perf recorded no samples of mw-bench");
            }
            for (i, c) in counts.iter().enumerate() {
                r.layer_share
                    .entry((kind, i))
                    .or_default()
                    .push(*c as f64 / total as f64);
            }
            r.profiled_ns.entry(kind).or_default().push(ns);
        }
    }
    let _ = std::fs::remove_file(&data);
    Ok(())
}

/// Seconds from spawning `cmd ready` to reading the server's `ready` line:
/// the server printed it, so it ran confined, every hook already attached.
fn time_to_ready(cmd: &[String], agent_sock: Option<&Path>) -> Result<f64> {
    let mut c = Command::new(&cmd[0]);
    if let Some(sock) = agent_sock {
        c.env("MCP_WARDEN_SOCKET", sock);
    }
    let t = Instant::now();
    let mut child = c
        .args(&cmd[1..])
        .arg("ready")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let dt = t.elapsed().as_secs_f64();
    if line.trim() != "ready" {
        bail!("expected `ready`, got {line:?}");
    }
    let _ = child.wait();
    Ok(dt)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn render(ctx: &Ctx, m: &Machine, r: &Results) -> String {
    let mut s = String::new();
    let runs = ctx.runs;
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench` (rounds per figure: `--runs`, here {runs}). Every \
         figure is the **median of {runs} rounds**; each round measures the baseline and \
         the measured case back to back, so both see the same machine load. Rerun with \
         `sudo cargo xtask bench` (a release build). No figure is asserted by the test \
         suite.\n"
    );
    let _ = writeln!(s, "## Machine\n");
    let _ = writeln!(s, "- {} CPUs (`nproc`), {}", m.nproc, m.cpu);
    let _ = writeln!(s, "- Linux {} (`uname -r`)", m.kernel);
    let _ = writeln!(
        s,
        "- load average at start {} and at end {} (a shared build machine: other \
         jobs compete for the CPUs)",
        m.load_start, m.load_end
    );
    let _ = writeln!(s, "- {}, commit {}", m.date, m.commit);
    let _ = writeln!(
        s,
        "- other mcp-warden agents (other users' test runs) attach the same global \
         tracepoints: the bench waits up to 5 s for none before each baseline; {} of {} \
         baseline samples still had one running (their cost then counts in the \
         baseline and makes the ratios look better than they are)",
        r.tainted, r.baselines
    );
    let _ = writeln!(
        s,
        "- backend: **fallback** (eBPF cgroup hooks + Landlock + seccomp). BPF-LSM is \
         only available in the VM lane, which runs under TCG emulation (no KVM here): \
         timings there are not comparable, so only host figures are reported.\n"
    );

    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(s, "| figure | measured | goal | |\n|---|---|---|---|");
    let mut goals: Vec<(String, String, String, bool)> = Vec::new();
    for (kind, _) in KINDS {
        let c = r.confined_ratio[kind].median();
        goals.push((
            format!("{} in a confined server / unconfined", label(kind)),
            format!("{c:.3}"),
            "≤ 1.15".into(),
            c <= 1.15,
        ));
    }
    for (kind, _) in KINDS {
        let a = r.agent_ratio[kind].median();
        goals.push((
            format!("{} unconfined, agent running / no agent", label(kind)),
            format!("{a:.3}"),
            "≤ 1.03".into(),
            a <= 1.03,
        ));
    }
    let added_us = r.rtt_added.median() / 1000.0;
    goals.push((
        "tools/call round trip added by the relay (median)".into(),
        format!("{added_us:.1} µs"),
        "≤ 20 µs".into(),
        added_us <= 20.0,
    ));
    let added_1cpu = (r.rtt_relay_1cpu.median() - r.rtt_direct_1cpu.median()) / 1000.0;
    goals.push((
        "the same, every process on one CPU (no cross-CPU wake-ups; see Relay)".into(),
        format!("{added_1cpu:.1} µs"),
        "≤ 20 µs".into(),
        added_1cpu <= 20.0,
    ));
    let added_big = r.big_relay.median() - r.big_direct.median();
    let gbps = BIG as f64 / added_big.max(1.0);
    goals.push((
        "16 MiB tool result: bytes / time the relay adds".into(),
        if added_big <= 0.0 {
            // Noise: the relayed runs were not slower than the direct ones.
            format!(
                "not measurable in this run (relayed {:.1} ms ≤ direct {:.1} ms)",
                r.big_relay.median() / 1e6,
                r.big_direct.median() / 1e6
            )
        } else {
            format!("{gbps:.2} GB/s")
        },
        "≥ 1 GB/s".into(),
        gbps >= 1.0,
    ));
    let strace_added = r.strace_wall.median() - r.plain_wall.median();
    let warden_added = r.warden_wall.median() - r.plain_wall.median();
    let acct_ratio = strace_added / warden_added.max(1.0);
    goals.push((
        "syscall accounting: strace -f -c added time / mcp-warden added time".into(),
        if warden_added <= 1.0 {
            format!("> {strace_added:.0} (mcp-warden added ≤ 1 ns/syscall)")
        } else {
            format!("{acct_ratio:.0}x")
        },
        "≥ 20x".into(),
        acct_ratio >= 20.0,
    ));
    let rss_mb = r.rss_idle.median() / 1024.0;
    goals.push((
        "agent RSS, idle (one confined server)".into(),
        format!("{rss_mb:.1} MiB"),
        "≤ 30 MB".into(),
        rss_mb * 1.048_576 <= 30.0,
    ));
    let start_ms = r.start_warden.median() * 1000.0;
    goals.push((
        "start to enforcing (spawn `mcp-warden run` → server's first line)".into(),
        format!("{start_ms:.0} ms"),
        "≤ 300 ms".into(),
        start_ms <= 300.0,
    ));
    let client_ms = r.start_client.median() * 1000.0;
    goals.push((
        "start to enforcing, `mcp-warden run` as a client of a running agent".into(),
        format!("{client_ms:.0} ms"),
        "≤ 300 ms".into(),
        client_ms <= 300.0,
    ));
    for (f, v, g, ok) in &goals {
        let _ = writeln!(s, "| {f} | {v} | {g} | {} |", verdict(*ok));
    }
    let missed: Vec<&String> = goals.iter().filter(|g| !g.3).map(|g| &g.0).collect();
    let _ = writeln!(s);

    let _ = writeln!(s, "## Syscall loops\n");
    let _ = writeln!(
        s,
        "Thread CPU time per iteration (user + kernel, `CLOCK_THREAD_CPUTIME_ID`): what \
         the work costs the process, hooks included, without the time other jobs held the \
         CPU. open+close: `open(\"/etc/ld.so.cache\")` + `close`, {N_OPEN} per run; UDP: \
         `socket` + `connect(127.0.0.1:{UDP_PORT})` + `close`, {N_UDP} per run. Policy: \
         read rules for the binary and libraries, `connect = [\"127.0.0.1:{UDP_PORT}\"]`, \
         so both loops are allowed. Medians over {runs} rounds (ratio: median of the \
         per-round ratios).\n"
    );
    let _ = writeln!(
        s,
        "| loop | no agent | confined | ratio | added | unconfined, agent running | ratio | added |\n|---|---|---|---|---|---|---|---|"
    );
    for (kind, _) in KINDS {
        let base = r.no_agent[kind].median();
        let _ = writeln!(
            s,
            "| {} | {:.0} ns | {:.0} ns | {:.3} | {:.0} ns | {:.0} ns | {:.3} | {:.0} ns |",
            label(kind),
            base,
            r.confined[kind].median(),
            r.confined_ratio[kind].median(),
            r.confined[kind].median() - base,
            r.agent_running[kind].median(),
            r.agent_ratio[kind].median(),
            r.agent_running[kind].median() - base,
        );
    }
    if r.tainted > 0 {
        let _ = writeln!(
            s,
            "\n{} of {} baseline samples ran while another mcp-warden (not this bench's) \
             was running, its tracepoints attached: those baselines already pay one \
             agent's global cost, so the ratios above understate ours. The *added* \
             columns do not depend on that (the foreign cost is in both terms). Against \
             a baseline without the foreign agent, estimated as no-agent minus our added \
             cost, the agent-running ratios would be: {}.",
            r.tainted,
            r.baselines,
            KINDS
                .iter()
                .map(|(k, _)| {
                    let base = r.no_agent[*k].median();
                    let added = r.agent_running[*k].median() - base;
                    format!("{} {:.3}", label(k), base / (base - added).max(1.0))
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        s,
        "\nReproduce one round by hand (release build, as root):\n\n```\n\
         target/release/mw-bench loop open {N_OPEN}\n\
         target/release/mcp-warden run --policy POLICY -- target/release/mw-bench loop open {N_OPEN}\n\
         # agent running: keep `mcp-warden run --policy POLICY -- target/release/mw-bench idle` \
         alive in another shell, then\n\
         target/release/mw-bench loop udp {N_UDP} {UDP_PORT}\n```\n"
    );
    let _ = writeln!(
        s,
        "The global raw tracepoints (sys_enter, sys_exit) run for every syscall of every \
         process while the agent runs: sys_enter reads the current cgroup id and looks it \
         up in `mw_instances`; sys_exit compares the return value and, for a success, \
         reads one `mw_config` slot (set only while an instance is in audit or learn \
         mode); only a refusal (or a success in those modes) looks the cgroup up. The \
         \"agent running\" column is that cost, measured.\n"
    );
    let _ = writeln!(s, "### Where a confined syscall's time goes\n");
    match &r.profile_skipped {
        Some(why) => {
            let _ = writeln!(s, "Not profiled in this run: {why}.\n");
        }
        None => {
            let _ = writeln!(
                s,
                "The confined loops again, under `perf record -e cpu-clock -F 4999 -g` \
                 (sampling; hardware counters are not available in this VM). A sample \
                 counts for a layer when one of its kernel frames belongs to it; the \
                 share of all of the loop's samples times its CPU time per iteration \
                 gives each layer's cost per iteration. Medians over {runs} rounds. \
                 Compare with the *added* column above: what is not in these rows is \
                 the syscalls' own work, which the unconfined loop pays too.\n"
            );
            let _ = writeln!(
                s,
                "| layer | open+close: share | per iteration | UDP: share | per iteration |\n|---|---|---|---|---|"
            );
            for (i, name) in LAYERS.iter().enumerate() {
                let cell = |kind: &'static str| {
                    let sh = r.layer_share[&(kind, i)].median();
                    (sh * 100.0, sh * r.profiled_ns[kind].median())
                };
                let (so, no) = cell("open");
                let (su, nu) = cell("udp");
                let _ = writeln!(
                    s,
                    "| {name} | {so:.1} % | {no:.0} ns | {su:.1} % | {nu:.0} ns |"
                );
            }
            let _ = writeln!(
                s,
                "\n```\nperf record -e cpu-clock -F 4999 -g -- target/release/mcp-warden run --policy POLICY -- target/release/mw-bench loop open {N_OPEN}\n\
                 perf script -F comm,ip,sym --comm mw-bench   # classified as above (xtask/src/bench.rs `layer_of`)\n```\n"
            );
        }
    }
    let _ = writeln!(s, "### The kernel's floor for a global syscall hook\n");
    let _ = writeln!(
        s,
        "While any program is attached to sys_enter or sys_exit, every task in the \
         system takes the kernel's traced syscall path and runs the tracepoint \
         dispatch, whatever the program does. `mw-bench nop-hooks raw|btf` attaches two \
         empty programs (`r0 = 0; exit`) to sys_enter and sys_exit, as raw_tp or as \
         tp_btf, and the same unconfined loops run meanwhile. That is the floor: what \
         any agent with per-syscall hooks costs; the rest of the \"agent running\" \
         figure is our programs' work.\n"
    );
    let _ = writeln!(
        s,
        "| loop | no agent | empty raw_tp | ratio | empty tp_btf | ratio | agent running | ratio | ours above the raw_tp floor |\n|---|---|---|---|---|---|---|---|---|"
    );
    for (kind, _) in KINDS {
        let fr = &r.floor[&(kind, "raw")];
        let fb = &r.floor[&(kind, "btf")];
        let _ = writeln!(
            s,
            "| {} | {:.0} ns | {:.0} ns | {:.3} | {:.0} ns | {:.3} | {:.0} ns | {:.3} | {:.0} ns |",
            label(kind),
            r.no_agent[kind].median(),
            fr.median(),
            r.floor_ratio[&(kind, "raw")].median(),
            fb.median(),
            r.floor_ratio[&(kind, "btf")].median(),
            r.agent_running[kind].median(),
            r.agent_ratio[kind].median(),
            r.agent_running[kind].median() - fr.median(),
        );
    }
    let _ = writeln!(
        s,
        "\n```\n# in one shell (as root), until end of input:\ntarget/release/mw-bench nop-hooks raw\n\
         # in another:\ntarget/release/mw-bench loop open {N_OPEN}\n```\n"
    );

    let _ = writeln!(s, "## Relay\n");
    let _ = writeln!(
        s,
        "`mw-bench client` drives `mw-bench server` (a minimal MCP server) over stdio, \
         directly and under `mcp-warden run` (policy as above, every tool allowed). Round \
         trip: {N_RTT} sequential `tools/call` of `echo` after 200 warm-up calls, median per \
         round. Large message: a `tools/call` whose result is {} MiB of text, {BIG_REPS} \
         times, median; wall-clock time from sending the request to reading the whole \
         response line.\n",
        BIG >> 20
    );
    let _ = writeln!(
        s,
        "| | direct pipe | through the relay | added |\n|---|---|---|---|"
    );
    let _ = writeln!(
        s,
        "| tools/call round trip | {:.1} µs | {:.1} µs | {:.1} µs |",
        r.rtt_direct.median() / 1e3,
        r.rtt_relay.median() / 1e3,
        added_us
    );
    let _ = writeln!(
        s,
        "| `ping` round trip (relayed, no call bookkeeping) | {:.1} µs | {:.1} µs | {:.1} µs |",
        r.ping_direct.median() / 1e3,
        r.ping_relay.median() / 1e3,
        (r.ping_relay.median() - r.ping_direct.median()) / 1e3
    );
    let _ = writeln!(
        s,
        "| tools/call round trip, through `mw-bench forward` instead of the relay | {:.1} µs | {:.1} µs | {:.1} µs |",
        r.rtt_direct.median() / 1e3,
        r.rtt_forward.median() / 1e3,
        (r.rtt_forward.median() - r.rtt_direct.median()) / 1e3
    );
    let _ = writeln!(
        s,
        "| tools/call round trip, every process on CPU 0 | {:.1} µs | {:.1} µs | {:.1} µs |",
        r.rtt_direct_1cpu.median() / 1e3,
        r.rtt_relay_1cpu.median() / 1e3,
        added_1cpu
    );
    let _ = writeln!(
        s,
        "| the same through `mw-bench forward`, on CPU 0 | {:.1} µs | {:.1} µs | {:.1} µs |",
        r.rtt_direct_1cpu.median() / 1e3,
        r.rtt_forward_1cpu.median() / 1e3,
        (r.rtt_forward_1cpu.median() - r.rtt_direct_1cpu.median()) / 1e3
    );
    let _ = writeln!(
        s,
        "| 16 MiB result | {:.1} ms ({:.2} GB/s) | {:.1} ms ({:.2} GB/s) | {} |",
        r.big_direct.median() / 1e6,
        BIG as f64 / r.big_direct.median(),
        r.big_relay.median() / 1e6,
        BIG as f64 / r.big_relay.median(),
        if added_big > 0.0 {
            format!("{:.1} ms ({gbps:.2} GB/s)", added_big / 1e6)
        } else {
            format!("none measurable ({:.1} ms)", added_big / 1e6)
        }
    );
    let _ = writeln!(
        s,
        "\n`mw-bench forward` is the floor for any process between a client and a server: \
         a loop of poll, read and write, no parsing, no hooks. A direct pipe has two processes \
         handing the CPU to each other; a third one in between makes the scheduler wake \
         tasks on the other, idle CPU, and on this VM (cpuidle `haltpoll` with guest halt \
         polling off) waking an idle vCPU costs tens of µs: the forwarder alone adds about \
         as much as the relay. On one CPU that cost is gone, and what remains is the work \
         of each: the relay's figure there (framing, JSON-RPC classification, the call's \
         two `mw_instances` updates, attribution) is the one our code controls."
    );
    let _ = writeln!(
        s,
        "\nThe test server serializes the 16 MiB result once and writes the same bytes \
         every time (only the id changes), so the direct pipe is bounded by the pipe and \
         the client reading it, not by building JSON; the relay's own rate is the message \
         size over the time it adds."
    );
    let _ = writeln!(
        s,
        "\n```\ntarget/release/mw-bench client rtt {N_RTT} -- target/release/mw-bench server\n\
         target/release/mw-bench client rtt {N_RTT} -- target/release/mcp-warden run --policy POLICY -- target/release/mw-bench server\n\
         target/release/mw-bench client rtt {N_RTT} -- target/release/mw-bench forward target/release/mw-bench server\n\
         taskset -c 0 target/release/mw-bench client rtt {N_RTT} -- [each of the three]\n\
         target/release/mw-bench client big {BIG} {BIG_REPS} -- [same two commands]\n```\n"
    );

    let _ = writeln!(s, "## Per-tool syscall accounting vs strace\n");
    let exact = r.accounting_exact.iter().filter(|x| **x).count();
    let _ = writeln!(
        s,
        "Workload: {N_GETPPID} `getppid` calls (the cheapest syscall: the worst case for a \
         per-syscall cost), wall time per call. Baseline: the loop alone. strace: \
         `strace -f -c -o /dev/null mw-bench loop getppid {N_GETPPID}`. mcp-warden: the \
         same loop as a `tools/call` of a confined server, its syscalls counted per call \
         by the sys_enter hook (and judged by the fallback's seccomp filter). The \
         tool_call record held exactly {N_GETPPID} getppid calls in {exact} of {} rounds.\n",
        r.accounting_exact.len()
    );
    let _ = writeln!(
        s,
        "| | per syscall | added |\n|---|---|---|\n| no tracing | {:.0} ns | |\n\
         | strace -f -c | {:.0} ns | {:.0} ns |\n| mcp-warden (per-tool counts) | {:.0} ns | {:.0} ns |\n",
        r.plain_wall.median(),
        r.strace_wall.median(),
        strace_added,
        r.warden_wall.median(),
        warden_added
    );

    let _ = writeln!(s, "## Event delivery and loss\n");
    let _ = writeln!(
        s,
        "A confined server makes {N_FLOOD} UDP connects to a denied port as fast as it can \
         (`mw-bench flood {UDP_PORT} {N_FLOOD}` under a policy with no connect rule): each \
         is refused in the kernel and written to the 8 MiB ring buffer (368-byte events, \
         about 22 800 in flight). Delivered: deny events in the `--events` file. Lost: \
         the kernel's per-kind counter, reported in the `exited` record \
         (`events_lost.net`, the figure behind `mcp_warden_events_lost_total`). The \
         drain rate is delivered events over the span of their timestamps: the rate the \
         agent delivers at while the ring is full, i.e. before and at the first loss.\n"
    );
    let _ = writeln!(
        s,
        "| round | generated | generation rate | delivered | lost | delivered + lost = generated | drain rate |\n|---|---|---|---|---|---|---|"
    );
    for (i, f) in r.flood.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0}/s | {} | {} | {} | {:.0}/s |",
            i + 1,
            f.generated,
            f.gen_rate,
            f.delivered,
            f.lost,
            if f.delivered + f.lost == f.generated {
                "yes"
            } else {
                "**no**"
            },
            f.drain_rate
        );
    }
    let drain = median(&r.flood.iter().map(|f| f.drain_rate).collect::<Vec<_>>());
    let _ = writeln!(s, "\nMedian drain rate: **{drain:.0} events/s**.\n");

    let _ = writeln!(s, "## Footprint and start-up\n");
    let rss_load = median(&r.flood.iter().map(|f| f.rss_load_kb).collect::<Vec<_>>());
    let hwm = median(&r.flood.iter().map(|f| f.hwm_kb).collect::<Vec<_>>());
    let _ = writeln!(
        s,
        "| | median |\n|---|---|\n| agent RSS, idle server (`VmRSS` of `mcp-warden run`, 0.5 s after start) | {:.1} MiB |\n\
         | the same without the ring buffer's mapping (8 MiB mapped twice; kernel memory of the map) | {:.1} MiB |\n\
         | agent RSS after the flood (events all written) | {:.1} MiB |\n| agent peak RSS over the flood run (`VmHWM`) | {:.1} MiB |\n\
         | start to first line, server alone | {:.1} ms |\n| start to first line, under `mcp-warden run` (standalone: loads every program, all hooks attached, confined) | {:.1} ms |\n\
         | start to first line, `mcp-warden run` as a client of a running `mcp-warden agent` | {:.1} ms |\n",
        rss_mb,
        r.rss_idle_no_ring.median() / 1024.0,
        rss_load / 1024.0,
        hwm / 1024.0,
        r.start_direct.median() * 1e3,
        start_ms,
        client_ms
    );
    let _ = writeln!(
        s,
        "```\ntarget/release/mcp-warden run --policy POLICY -- target/release/mw-bench ready\n\
         # with an agent: start `mcp-warden agent --config CONFIG` (allow_user_policies = true), then\n\
         MCP_WARDEN_SOCKET=SOCKET target/release/mcp-warden run --policy POLICY -- target/release/mw-bench ready\n```\n"
    );

    let _ = writeln!(s, "## Goals missed, and why\n");
    if missed.is_empty() {
        let _ = writeln!(s, "None in this run.\n");
    } else {
        for g in &missed {
            let _ = writeln!(s, "- {g}");
        }
        let _ = writeln!(s);
    }
    s.push_str(ANALYSIS);
    s
}

fn label(kind: &str) -> &'static str {
    match kind {
        "open" => "open+close",
        _ => "UDP socket+connect+close",
    }
}

/// What profiling found (kept with the bench, so the report carries it).
const ANALYSIS: &str = include_str!("bench_analysis.md");
