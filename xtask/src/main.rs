//! `cargo xtask`: the project's chores, one subcommand each.
//!
//! - `setup`: install what the build, the demo and the tests need (idempotent).
//! - `demo`: setup, build the agent, run `mcp-warden demo`.
//! - `test`: the whole suite, as CI runs it.
//! - `bench`: measure against same-run baselines, write BENCHMARKS.md.
//! - `vm`: run a command inside a QEMU guest on a stock Debian kernel with
//!   BPF-LSM active, sharing the host's root filesystem.

mod bench;
mod cmd;
mod cpio;
mod setup;
mod test;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "mcp-warden project chores"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install everything the build, the demo and the tests need. Safe to repeat.
    Setup,
    /// Setup, build the release agent and run `mcp-warden demo`.
    Demo,
    /// Run the whole suite (what CI runs) and print a summary.
    Test {
        /// Skip the VM lane (BPF-LSM suites on Debian kernels) for a quick local run.
        #[arg(long)]
        no_vm: bool,
    },
    /// Measure overheads against baselines taken in the same run and write
    /// BENCHMARKS.md (root, release build).
    Bench(bench::BenchArgs),
    /// Run CMD as root in a VM booted on a Debian cloud kernel with BPF-LSM,
    /// with the host's root filesystem shared; exit with CMD's status.
    Vm(vm::VmArgs),
}

fn main() -> ExitCode {
    cmd::ensure_cargo_bin_on_path();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Command::Demo => demo(),
        Command::Test { no_vm } => test::run(!no_vm),
        Command::Bench(args) => bench::run(&args),
        Command::Vm(args) => vm::run(&args).map(exit_code),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<ExitCode> {
    setup::run()?;
    let root = repo_root();
    cmd::cargo(&root)
        .args(["build", "--release", "-p", "mcp-warden"])
        .check()?;
    let status = cmd::Cmd::new(root.join("target/release/mcp-warden"))
        .arg("demo")
        .current_dir(&root)
        .status()?;
    Ok(exit_code(status))
}

/// The workspace root: the parent of this crate's directory.
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A child's exit code (see `cmd::code_of`) as our own.
fn exit_code(status: i32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}
