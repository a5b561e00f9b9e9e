//! `mcp-warden learn`: learn a least-privilege policy from an observed run,
//! or (`--diff POLICY`) report what a run does that a policy does not allow.
//!
//! The server runs confined exactly as under `mcp-warden run`, relaying the
//! client's stdio, but in audit mode: nothing is refused, and every
//! operation the policy would refuse is an `audit` record. For learning the
//! policy is empty, so every file, exec and network operation is one; a
//! [`record::Recorder`] sink folds them into [`record::Observations`] by
//! scope (outside calls or the tool in flight), [`collapse`] turns paths
//! into a few rules, and [`learned::Learned`] writes the commented TOML.
//!
//! Stages: [`record`] -> [`collapse`] -> [`learned`] (build, merge, write);
//! [`diff`] for `--diff`.
pub mod collapse;
pub mod diff;
pub mod learned;
pub mod record;

use std::{
    ffi::OsString,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::{
    events::{sink::JsonLinesFile, Sinks},
    host::Host,
    policy::{self, Mode, OnViolation, Policy, Rules},
    run::{self, RunError},
};

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("{0}")]
    Run(#[from] RunError),
    #[error("{0}")]
    Host(#[from] crate::host::HostError),
    #[error("{0}")]
    Policy(#[from] policy::PolicyError),
    #[error("--merge policy: {0}")]
    Merge(String),
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the learned policy does not pass `mcp-warden check` (a bug):\n{0}")]
    Invalid(String),
    #[error("--out FILE is required (unless --diff)")]
    NoOut,
    #[error("server name {0:?} is not valid; give one with --server NAME")]
    ServerName(String),
    #[error("learn needs root (it loads eBPF programs): run `sudo mcp-warden learn ...`")]
    NeedRoot,
}

#[derive(Debug, Clone)]
pub struct LearnArgs {
    pub out: Option<PathBuf>,
    pub merge: Option<PathBuf>,
    pub diff: Option<PathBuf>,
    pub server: Option<String>,
    pub events: Option<PathBuf>,
    pub cmd: Vec<OsString>,
}

/// Exit status of `--diff` when the run did something the policy does not
/// allow.
pub const EXIT_DRIFT: i32 = 1;

pub fn main(args: LearnArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcp-warden: starting the runtime: {e}");
            return run::EXIT_SETUP_FAILED;
        }
    };
    let code = match rt.block_on(learn(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mcp-warden learn: {}", run::error_chain(&e));
            run::EXIT_SETUP_FAILED
        }
    };
    rt.shutdown_background();
    code
}

/// A server name from the command: the package (`.../node_modules/@scope/
/// server-x/...` -> `server-x`), else the script, else the program.
pub fn default_server_name(cmd: &[OsString]) -> String {
    let args: Vec<String> = cmd
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    for a in &args {
        let comps: Vec<&str> = a.split('/').collect();
        if let Some(i) = comps.iter().rposition(|c| *c == "node_modules") {
            let name = match comps.get(i + 1) {
                Some(s) if s.starts_with('@') => comps.get(i + 2),
                other => other,
            };
            if let Some(n) = name.filter(|n| !n.is_empty()) {
                return sanitize(n);
            }
        }
    }
    let script = args
        .iter()
        .skip(1)
        .find(|a| !a.starts_with('-') && Path::new(a).is_file());
    let pick = script.or(args.first()).cloned().unwrap_or_default();
    let stem = Path::new(&pick)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    sanitize(&stem)
}

fn sanitize(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(64)
        .collect();
    if t.is_empty() {
        "server".to_string()
    } else {
        t
    }
}

/// The empty audit-mode policy a learn run starts from: everything the
/// server does is a would-be refusal, hence recorded.
fn learn_policy(server: &str) -> Policy {
    Policy {
        version: 1,
        server: server.to_string(),
        mode: Mode::Audit,
        on_violation: OnViolation::Deny,
        rules: Rules::default(),
        tools_allow: None,
        tools: Vec::new(),
        source: "learn".to_string(),
        // Nothing held back while learning: annotations are not enforced.
        mcp: policy::McpRules {
            enforce_annotations: false,
            ..Default::default()
        },
    }
}

/// The launched command (resolved from PATH) and its interpreters.
fn launched_chain(cmd: &[OsString]) -> Vec<PathBuf> {
    let Some(path) = cmd.first().and_then(|p| which::which(p).ok()) else {
        return Vec::new();
    };
    match crate::confine::landlock::exec_chain(&path) {
        Ok((c, _)) => c,
        Err(_) => vec![path],
    }
}

/// Trees of the launched command's interpreters: `<prefix>` of every
/// `<prefix>/bin/<program>` in its exec chain, unless the prefix is a
/// system-wide one (/usr, /usr/local, /), which the known trees cover.
fn interpreter_trees(cmd: &[OsString], cx: &collapse::Context) -> Vec<String> {
    launched_chain(cmd)
        .iter()
        .filter_map(|p| {
            let bin = p.parent()?;
            if bin.file_name()? != "bin" {
                return None;
            }
            let prefix = bin.parent()?.to_string_lossy().into_owned();
            cx.may_widen_to(&prefix).then_some(prefix)
        })
        .collect()
}

async fn learn(args: LearnArgs) -> Result<i32, LearnError> {
    if args.diff.is_none() && args.out.is_none() {
        return Err(LearnError::NoOut);
    }
    let uid = nix::unistd::getuid().as_raw();
    let vars = policy::Vars::for_uid(uid)?;
    // An earlier policy to merge with must be valid before anything runs.
    let earlier = match &args.merge {
        Some(p) => {
            policy::load(p, &vars)?;
            let text = std::fs::read_to_string(p).map_err(|source| LearnError::Write {
                path: p.clone(),
                source,
            })?;
            Some(learned::Learned::from_toml(&text)?)
        }
        None => None,
    };
    let policy = match &args.diff {
        Some(p) => {
            let mut pol = policy::load(p, &vars)?;
            pol.mode = Mode::Audit;
            pol
        }
        None => {
            let name = args
                .server
                .clone()
                .or_else(|| {
                    earlier
                        .as_ref()
                        .map(|e| e.server.clone())
                        .filter(|s| !s.is_empty())
                })
                .unwrap_or_else(|| default_server_name(&args.cmd));
            if policy::values::check_server_name(&name).is_err() {
                return Err(LearnError::ServerName(name));
            }
            learn_policy(&name)
        }
    };
    if !nix::unistd::geteuid().is_root() {
        return Err(LearnError::NeedRoot);
    }
    let policy = Arc::new(policy);
    let obs = Arc::new(Mutex::new(record::Observations {
        keep_audit: args.diff.is_some(),
        ..Default::default()
    }));
    let mut sinks = Sinks::default();
    sinks.push(Box::new(record::Recorder(obs.clone())));
    if let Some(p) = &args.events {
        let f = JsonLinesFile::open(p).map_err(|source| LearnError::Write {
            path: p.clone(),
            source,
        })?;
        sinks.push(Box::new(f));
    }
    let host = Host::start(sinks)?;
    let inst = host
        .launch(policy.clone(), &args.cmd, run::instance_info(&policy))
        .await?;
    log::info!(
        "{}: {} (mode = audit): nothing is refused",
        policy.server,
        if args.diff.is_some() {
            "checking for drift"
        } else {
            "learning"
        }
    );
    // Learn: keep the policy file current while the server runs (once a
    // second, when something new was seen). MCP clients end the server
    // process at shutdown, often with a kill after a short grace period:
    // a learn run ended that way still leaves the policy of what it saw.
    let snapshots = match (&args.diff, &args.out) {
        (None, Some(out)) => {
            let (obs, args, server, earlier, vars, out) = (
                obs.clone(),
                args.clone(),
                policy.server.clone(),
                earlier.clone(),
                vars.clone(),
                out.clone(),
            );
            Some(tokio::spawn(async move {
                let mut last = 0;
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let snap = obs
                        .lock()
                        .ok()
                        .filter(|o| o.records != last)
                        .map(|o| o.clone());
                    let Some(o) = snap else { continue };
                    last = o.records;
                    if let Err(e) =
                        write_learned(&args, &server, &o, earlier.clone(), &vars, &out, true)
                    {
                        log::debug!("learn: snapshot: {e}");
                    }
                }
            }))
        }
        _ => None,
    };
    let code = run::serve_stdio(&host, inst).await;
    if let Some(t) = snapshots {
        t.abort();
        let _ = t.await;
    }
    let code = code?;
    host.shutdown().await?;
    let obs = match obs.lock() {
        Ok(o) => o.clone(),
        Err(p) => p.into_inner().clone(),
    };
    for (what, n) in &obs.hard_denials {
        log::warn!("refused whatever the policy ({n}x): {what}");
    }
    if obs.unresolved > 0 {
        log::warn!(
            "{} file operation(s) with a relative path that could not be resolved were left out",
            obs.unresolved
        );
    }
    match &args.diff {
        Some(p) => report_drift(p, &obs, args.out.as_deref(), code),
        None => {
            let out = args.out.as_deref().ok_or(LearnError::NoOut)?;
            write_learned(&args, &policy.server, &obs, earlier, &vars, out, false)?;
            Ok(code)
        }
    }
}

fn write_learned(
    args: &LearnArgs,
    server: &str,
    obs: &record::Observations,
    earlier: Option<learned::Learned>,
    vars: &policy::Vars,
    out: &Path,
    snapshot: bool,
) -> Result<(), LearnError> {
    let mut cx = collapse::Context {
        home: vars.home.clone(),
        trees: Vec::new(),
    };
    cx.trees = interpreter_trees(&args.cmd, &cx);
    let obs = with_interpreters(obs, &launched_chain(&args.cmd));
    let mut l = learned::Learned::build(server, &obs, &cx);
    let mut header = vec![
        format!(
            "Learned by `mcp-warden learn` on {} from:",
            crate::events::now_rfc3339()
        ),
        format!(
            "  {}",
            args.cmd
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        "Each rule says how often it was seen. Review before use: a run only shows".into(),
        "what that run did; rarely used paths are missing, and trees (/dir/**) grant".into(),
        "more than was touched.".into(),
    ];
    if let Some(e) = &earlier {
        if let Some(m) = &args.merge {
            header.push(format!("Merged with {}.", m.display()));
        }
        l.merge(e);
    }
    l.drop_unwritable(vars);
    header.append(&mut l.header);
    l.header = header;
    let text = l.to_toml();
    // The output must pass `mcp-warden check`.
    if let Err(d) = policy::parse(&text, &out.display().to_string(), vars) {
        let msg = d
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        return Err(LearnError::Invalid(msg));
    }
    // Whole or not at all: write a sibling, then rename it over `out`.
    let tmp = {
        let mut name = out.file_name().unwrap_or_default().to_os_string();
        name.push(".learn-tmp");
        out.with_file_name(name)
    };
    let write = |p: &Path| -> std::io::Result<()> {
        let mut f = std::fs::File::create(p)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(p, out)
    };
    write(&tmp).map_err(|source| LearnError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    if snapshot {
        return Ok(());
    }
    eprintln!(
        "mcp-warden learn: wrote {} ({} rules, {} tools)",
        out.display(),
        l.rule_count(),
        l.tools.len()
    );
    Ok(())
}

/// A program the server ran needs its interpreters to be executable too
/// (a `#!/bin/sh` script needs /bin/sh; the kernel reports only the
/// script): add each one's chain where the program was seen.
fn with_interpreters(obs: &record::Observations, launched: &[PathBuf]) -> record::Observations {
    let mut out = obs.clone();
    for ((scope, section, path), seen) in &obs.seen {
        if *section != record::Section::Exec {
            continue;
        }
        let Ok((chain, _)) = crate::confine::landlock::exec_chain(Path::new(path)) else {
            continue;
        };
        // The launched command's own interpreters are always allowed.
        for interp in chain.iter().skip(1).filter(|i| !launched.contains(i)) {
            let key = (
                scope.clone(),
                record::Section::Exec,
                interp.to_string_lossy().into_owned(),
            );
            let e = out.seen.entry(key).or_default();
            e.count += seen.count;
            e.at_start |= seen.at_start;
            e.later |= seen.later;
        }
    }
    out
}

/// Print the drift readably (stderr) and as JSON lines (`--out FILE`, or
/// stderr). Exit 1 when there is any.
fn report_drift(
    policy_path: &Path,
    obs: &record::Observations,
    out: Option<&Path>,
    server_code: i32,
) -> Result<i32, LearnError> {
    let d = diff::drift(&obs.audit_records);
    let mut json = String::new();
    for (k, n) in &d {
        json.push_str(&diff::json_line(k, *n).to_string());
        json.push('\n');
    }
    if d.is_empty() {
        eprintln!(
            "mcp-warden learn --diff: no drift: this run stayed within {}",
            policy_path.display()
        );
    } else {
        eprintln!(
            "mcp-warden learn --diff: {} behaviour(s) not allowed by {}:",
            d.len(),
            policy_path.display()
        );
        for (k, n) in &d {
            eprintln!("  {}", diff::human(k, *n));
        }
    }
    match out {
        Some(p) => std::fs::write(p, json.as_bytes()).map_err(|source| LearnError::Write {
            path: p.to_path_buf(),
            source,
        })?,
        None => eprint!("{json}"),
    }
    Ok(if d.is_empty() {
        server_code
    } else {
        EXIT_DRIFT
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        let c = |v: &[&str]| default_server_name(&v.iter().map(OsString::from).collect::<Vec<_>>());
        assert_eq!(
            c(&[
                "node",
                "/x/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js",
                "/d"
            ]),
            "server-filesystem"
        );
        assert_eq!(c(&["/usr/bin/python3", "-u", "/etc/hostname"]), "hostname");
        assert_eq!(c(&["uvx"]), "uvx");
    }
}
