//! Command line (contract: shared/design.md, "CLI").
use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mcp-warden",
    version,
    about = "Confine local MCP servers in the kernel, per tool call"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run an MCP server confined by a policy, relaying its stdio.
    Run(RunCmd),
    /// Validate policy files; every error as file:line:col.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Learn a policy from a run (audit mode, stdio relayed), or with
    /// --diff report what a run does that a policy does not allow.
    Learn(LearnCmd),
    /// Show a confined MCP server trying to exfiltrate, and the denial.
    Demo,
    /// The agent service: load the programs once, serve `run` clients over
    /// the control socket, reload policies, write the audit log.
    Agent {
        /// Agent config (TOML); the embedded defaults without it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// The agent's backend, hooks, instances and counters.
    Status {
        /// Print the raw JSON response.
        #[arg(long)]
        json: bool,
    },
    /// Print audit events (JSON lines) from the audit log, or follow the
    /// agent's live stream.
    Events {
        /// Stream new events from the agent until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only this server's events.
        #[arg(long)]
        server: Option<String>,
        /// Audit log to read (without --follow). Default: the `audit_log`
        /// of the agent config (`--config`).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// Agent config naming the audit log (without --follow).
        /// Default: /etc/mcp-warden/agent.toml when it exists.
        #[arg(long, value_name = "FILE", conflicts_with = "log")]
        config: Option<PathBuf>,
    },
    /// Rewrite an MCP client's JSON config (Claude Desktop, VS Code,
    /// Cursor) so each local server runs through `mcp-warden run`.
    WrapConfig {
        file: PathBuf,
        /// Print the change as a unified diff and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// The mcp-warden the client should start (default: this binary).
        #[arg(long, value_name = "PATH")]
        warden: Option<String>,
    },
    /// Let a tool call that waits for approval run.
    Approve { id: String },
    /// Refuse a tool call that waits for approval.
    Deny { id: String },
    /// List the tool calls waiting for approval.
    Approvals,
}

#[derive(Debug, Args)]
struct LearnCmd {
    /// Write the learned policy to FILE (with --diff: the drift as JSON lines).
    #[arg(long, value_name = "FILE", required_unless_present = "diff")]
    out: Option<PathBuf>,
    /// Union the learned rules with an earlier learned policy.
    #[arg(long, value_name = "FILE", conflicts_with = "diff")]
    merge: Option<PathBuf>,
    /// Report what this run does that POLICY does not allow; exit 1 if any.
    #[arg(long, value_name = "POLICY")]
    diff: Option<PathBuf>,
    /// Server name in the learned policy (default: from the command).
    #[arg(long, conflicts_with = "diff")]
    server: Option<String>,
    /// Also write every event of the run to FILE (JSON lines).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// The server command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

#[derive(Debug, Args)]
struct RunCmd {
    /// Policy file (TOML, policy v1).
    #[arg(long, conflicts_with = "server", required_unless_present = "server")]
    policy: Option<PathBuf>,
    /// Policy by server name, from /etc/mcp-warden/policies (agent service).
    #[arg(long)]
    server: Option<String>,
    /// Also write the events of this server to FILE (JSON lines).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Relay MCP over HTTP: listen on ADDR (HOST:PORT on loopback, or
    /// unix:/path) and forward to the server's own endpoint (--upstream).
    #[arg(long, value_name = "ADDR", requires = "upstream")]
    listen: Option<String>,
    /// The confined server's HTTP endpoint: http://127.0.0.1:PORT (a
    /// loopback origin) or unix:/path.
    #[arg(long, value_name = "URL", requires = "listen")]
    upstream: Option<String>,
    /// Allow a --listen address that is not loopback (the MCP endpoint is
    /// then open to the network).
    #[arg(long, requires = "listen")]
    listen_any: bool,
    /// Standalone only: serve Prometheus /metrics on ADDR while the server
    /// runs (the end-to-end test; the agent service has its own).
    #[arg(long, value_name = "ADDR", hide = true)]
    metrics: Option<std::net::SocketAddr>,
    /// The server command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

impl RunCmd {
    fn http(&self) -> Result<Option<crate::serve_http::HttpArgs>, crate::relay::http::AddrError> {
        let (Some(listen), Some(upstream)) = (&self.listen, &self.upstream) else {
            return Ok(None);
        };
        Ok(Some(crate::serve_http::HttpArgs {
            listen: crate::relay::http::Listen::parse(listen, self.listen_any)?,
            upstream: crate::relay::http::Upstream::parse(upstream)?,
        }))
    }
}

pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(r) => match r.http() {
            Ok(http) => crate::run::main(crate::run::RunArgs {
                policy: r.policy,
                server: r.server,
                events: r.events,
                http,
                cmd: r.cmd,
                metrics: r.metrics,
            }),
            Err(e) => {
                eprintln!("mcp-warden: {e}");
                2
            }
        },
        Cmd::Check { files } => crate::policy::check_main(&files),
        Cmd::Learn(l) => crate::learn::main(crate::learn::LearnArgs {
            out: l.out,
            merge: l.merge,
            diff: l.diff,
            server: l.server,
            events: l.events,
            cmd: l.cmd,
        }),
        Cmd::Demo => crate::demo::main(),
        Cmd::Agent { config } => crate::daemon::main(config),
        Cmd::Status { json } => crate::status::status_main(json),
        Cmd::Events {
            follow,
            server,
            log,
            config,
        } => crate::status::events_main(follow, server, log, config),
        Cmd::WrapConfig {
            file,
            dry_run,
            warden,
        } => crate::wrap::main(&file, dry_run, warden),
        Cmd::Approve { id } => crate::approval::cli("approve", Some(&id)),
        Cmd::Deny { id } => crate::approval::cli("deny", Some(&id)),
        Cmd::Approvals => crate::approval::cli("list", None),
    };
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}

/// Logs go to stderr: stdout is the MCP channel under `run`.
fn init_logging() {
    let env = env_logger::Env::default().filter_or("MCP_WARDEN_LOG", "info");
    env_logger::Builder::from_env(env)
        .target(env_logger::Target::Stderr)
        .format_target(false)
        .format_timestamp_millis()
        .init();
}
