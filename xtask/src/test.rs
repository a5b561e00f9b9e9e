//! `cargo xtask test`: the whole suite, as CI runs it.
//!
//! Every step runs even when an earlier one failed, so one run shows every
//! problem; each prints its name and duration, and the run ends with a summary
//! and the line `N passed, N failed` counting steps.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{self, Cmd};
use crate::{repo_root, setup, vm};

/// The package holding the privileged end-to-end suites (tests/).
const E2E_PACKAGE: &str = "mcp-warden-tests";
const EBPF_PACKAGE: &str = "mcp-warden-ebpf";

struct Outcome {
    name: String,
    duration: Duration,
    result: Result<()>,
}

pub fn run(with_vm: bool) -> Result<ExitCode> {
    let root = repo_root();
    let mut outcomes = Vec::new();
    let mut step = |name: &str, f: &dyn Fn() -> Result<()>| {
        println!("\n==== step: {name}");
        let start = Instant::now();
        let result = f();
        let duration = start.elapsed();
        match &result {
            Ok(()) => println!("==== {name}: ok ({:.1} s)", duration.as_secs_f64()),
            Err(e) => println!(
                "==== {name}: FAILED ({:.1} s): {e:#}",
                duration.as_secs_f64()
            ),
        }
        outcomes.push(Outcome {
            name: name.to_owned(),
            duration,
            result,
        });
    };

    step("setup", &setup::run);
    step("fmt", &|| {
        cmd::cargo(&root)
            .args(["fmt", "--all", "--", "--check"])
            .check()
    });
    // Default members: the eBPF crate only builds for its own target (next step).
    step("clippy", &|| {
        cmd::cargo(&root)
            .args(["clippy", "--all-targets", "--", "-D", "warnings"])
            .check()
    });
    step("clippy ebpf (bpfel-unknown-none)", &|| clippy_ebpf(&root));
    step("unit tests", &|| {
        cmd::cargo(&root)
            .args(["test", "--workspace", "--exclude", EBPF_PACKAGE])
            .args(["--exclude", E2E_PACKAGE])
            .check()
    });
    for target in FUZZ_TARGETS {
        step(&format!("fuzz {target} ({FUZZ_SECONDS} s)"), &|| {
            fuzz(&root, target)
        });
    }
    step("e2e tests (host kernel)", &|| {
        // Every suite in tests/tests/ runs here, newuser.rs (the product
        // from its installed .deb, issue #5) included; it builds the package
        // itself. The suites run the real `mcp-warden` binary: build it first.
        cmd::cargo(&root)
            .args(["build", "-p", "mcp-warden", "-p", E2E_PACKAGE])
            .check()?;
        cmd::cargo(&root)
            .args(["test", "-p", E2E_PACKAGE, "--", "--test-threads=1"])
            .check()
    });
    if with_vm {
        for kernel in vm::Kernel::ALL {
            let name = format!("e2e tests in VM (Linux {}, BPF-LSM)", kernel.name());
            step(&name, &|| e2e_in_vm(&root, kernel));
        }
    } else {
        println!("\n==== VM lane skipped (--no-vm)");
    }

    println!("\n==== summary");
    let mut failed = 0;
    for o in &outcomes {
        let verdict = if o.result.is_ok() { "ok" } else { "FAILED" };
        if o.result.is_err() {
            failed += 1;
        }
        println!(
            "{verdict:>7}  {:>7.1} s  {}",
            o.duration.as_secs_f64(),
            o.name
        );
    }
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// cargo-fuzz targets in agent/fuzz, each run for [`FUZZ_SECONDS`] per test run.
const FUZZ_TARGETS: [&str; 2] = ["relay_framing", "policy_parse"];
const FUZZ_SECONDS: u32 = 25;

/// A bounded fuzz run: the target's seeds plus its corpus (kept between
/// runs, git-ignored). A crash fails the step; libFuzzer writes the input to
/// agent/fuzz/artifacts/TARGET/, which then becomes a regression test.
fn fuzz(root: &Path, target: &str) -> Result<()> {
    let dir = root.join("agent/fuzz");
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    Cmd::new("cargo")
        .args(["+nightly", "fuzz", "run", target])
        .arg(&corpus)
        .arg(dir.join("seeds").join(target))
        .args([
            "--",
            &format!("-max_total_time={FUZZ_SECONDS}"),
            "-print_final_stats=1",
        ])
        .current_dir(&dir)
        .check()
}

/// Lint the kernel crate for its own target, alone, so that feature
/// unification with the userspace crates cannot change what it sees.
fn clippy_ebpf(root: &Path) -> Result<()> {
    Cmd::new("cargo")
        .args(["+nightly", "clippy", "-p", EBPF_PACKAGE])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .current_dir(root.join("ebpf"))
        .check()
}

/// Run every kernel-dependent test binary of the e2e package inside the
/// VM, one boot per suite (a boot costs seconds; each suite gets the VM's
/// whole time limit, and a guest that hangs costs one suite). Every suite
/// runs even when one fails; each prints its duration.
fn e2e_in_vm(root: &Path, kernel: vm::Kernel) -> Result<()> {
    let binaries = e2e_test_binaries(root)?;
    if binaries.is_empty() {
        bail!("no test binary found in {E2E_PACKAGE}");
    }
    let mut failed = Vec::new();
    for (bin, filter) in &binaries {
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let start = Instant::now();
        let run = || -> Result<i32> {
            let mut cmd = Cmd::new(std::env::current_exe()?)
                .args(["vm", "--kernel", kernel.name(), "--"])
                .arg(bin)
                .arg("--test-threads=1");
            if let Some(f) = filter {
                cmd = cmd.arg(f);
            }
            cmd.current_dir(root).status()
        };
        let mut status = run()?;
        if status == vm::BOOT_FAILED {
            // The guest kernel died before the suite started (an emulation
            // fault, not a test outcome): one more boot, said out loud.
            println!(
                "==== VM Linux {}: {name}: the guest kernel stopped while booting; booting again",
                kernel.name()
            );
            status = run()?;
        }
        println!(
            "==== VM Linux {}: {name}: {} ({:.1} s)",
            kernel.name(),
            if status == 0 { "ok" } else { "FAILED" },
            start.elapsed().as_secs_f64()
        );
        if status != 0 {
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("suites failed in the VM: {}", failed.join(", "));
    }
    Ok(())
}

/// The suites whose outcome depends on the kernel's backend; the VM lane
/// runs these (the relay-only suites would only repeat the host's run, at
/// emulation speed). The adversarial suite's fork flood shrinks from 10 000
/// to 1 000 processes in the VM (it reads `MCP_WARDEN_VM_KERNEL`), with the
/// same assertions: TCG forks about a hundred times slower.
/// A filter runs only the suite's tests whose names contain it: learn's
/// npm and multi-session tests take most of a boot's 20 minutes under TCG,
/// so the VM runs its DNS test (the cgroup_skb answer copy on the VM
/// kernels, audit mode on BPF-LSM); all of learn passed there by hand
/// (docs/backend-lsm.md).
const VM_SUITES: [(&str, Option<&str>); 7] = [
    ("net", None),
    ("unix", None),
    ("per_tool", None),
    ("files_lsm", None),
    ("annotations", None),
    ("adversarial", None),
    ("learn", Some("dns_names")),
];

/// The kernel-dependent e2e test executables, built by `cargo test --no-run`.
fn e2e_test_binaries(root: &Path) -> Result<Vec<(PathBuf, Option<&'static str>)>> {
    let out = cmd::cargo(root)
        .args([
            "test",
            "-p",
            E2E_PACKAGE,
            "--no-run",
            "--message-format=json",
        ])
        .read()?;
    let mut binaries = Vec::new();
    for line in out.lines() {
        let msg: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo printed {line:?}"))?;
        let is_test = msg["profile"]["test"].as_bool() == Some(true);
        let own = msg["package_id"]
            .as_str()
            .is_some_and(|id| id.contains(E2E_PACKAGE));
        let suite = msg["target"]["name"].as_str().unwrap_or("");
        let vm = VM_SUITES.iter().find(|(name, _)| *name == suite);
        if let (true, true, true, Some((_, filter))) =
            (msg["reason"] == "compiler-artifact", is_test, own, vm)
        {
            if let Some(exe) = msg["executable"].as_str() {
                binaries.push((PathBuf::from(exe), *filter));
            }
        }
    }
    Ok(binaries)
}
