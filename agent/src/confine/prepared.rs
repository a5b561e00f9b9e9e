//! Confinement for the fallback backend, prepared in the parent and applied
//! in the forked child just before exec.
//!
//! The parent (a multi-threaded tokio process) builds everything that
//! allocates: the Landlock ruleset fd, the compiled seccomp program and the
//! capability plan. The child runs [`Prepared::apply_in_child`] inside a
//! `pre_exec` closure, where only async-signal-safe work is allowed; it
//! makes syscalls on memory prepared here and allocates nothing.
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use super::caps::{CapDrop, CapsError};
use super::landlock::{self as ll, LandlockError, LandlockReport, PreparedRuleset};
use super::seccomp::{self as sc, PreparedFilter, SeccompError, SeccompLine};
use crate::policy::model::Policy;

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Caps(#[from] CapsError),
}

/// Everything the fallback backend enforces, for the log and `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfinementReport {
    pub landlock: LandlockReport,
    pub seccomp: Vec<SeccompLine>,
    pub capabilities: String,
    pub no_new_privs: bool,
}

impl fmt::Display for ConfinementReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.landlock;
        writeln!(
            f,
            "landlock: kernel ABI {}, requested ABI {}, {:?}; {} rules, {} split dirs",
            l.kernel_abi,
            l.requested_abi,
            l.enforcement,
            l.rules.len(),
            l.split_dirs.len()
        )?;
        writeln!(f, "landlock handled: {}", l.handled_fs.join(","))?;
        writeln!(f, "landlock scopes: {}", l.scopes.join(","))?;
        for w in &l.warnings {
            writeln!(f, "landlock warning: {w}")?;
        }
        for s in &self.seccomp {
            match s.when {
                Some(w) => writeln!(
                    f,
                    "seccomp: {} when {} -> {} ({})",
                    s.syscalls.join(","),
                    w,
                    s.action,
                    s.reason
                )?,
                None => writeln!(
                    f,
                    "seccomp: {} -> {} ({})",
                    s.syscalls.join(","),
                    s.action,
                    s.reason
                )?,
            }
        }
        write!(
            f,
            "capabilities: {}; no_new_privs: {}",
            self.capabilities, self.no_new_privs
        )
    }
}

/// Confinement ready to apply in a forked child.
#[derive(Debug)]
pub struct Prepared {
    ruleset: PreparedRuleset,
    filter: PreparedFilter,
    caps: CapDrop,
}

impl Prepared {
    /// Build the Landlock ruleset (union of the server's and all tools'
    /// rules, plus `cmd_path` and its interpreters), the seccomp program and
    /// the capability drop. `cmd_path` is the file that will be executed
    /// (resolved from PATH by the caller).
    pub fn new(policy: &Policy, cmd_path: &Path) -> Result<Prepared, ConfineError> {
        let ruleset = ll::prepare(policy, cmd_path)?;
        let filter = sc::prepare()?;
        let caps = CapDrop::new()?;
        Ok(Prepared {
            ruleset,
            filter,
            caps,
        })
    }

    /// What is enforced once applied.
    pub fn report(&self) -> ConfinementReport {
        ConfinementReport {
            landlock: self.ruleset.report.clone(),
            seccomp: self.filter.lines.clone(),
            capabilities: self.caps.describe(),
            no_new_privs: true,
        }
    }

    /// Apply in the calling (forked, single-threaded) process, in order:
    /// drop capabilities (the bounding-set drop needs CAP_SETPCAP, so it
    /// comes first), set no_new_privs, enforce the Landlock ruleset, install
    /// the seccomp filter last (so the filter does not see the setup calls).
    /// Returns the first error's errno; the exec must not happen then.
    ///
    /// # Safety
    /// Async-signal-safe (no allocation, no locks): call it only in a
    /// `pre_exec` closure or another single-threaded child before exec. It
    /// restricts the calling process irreversibly.
    pub unsafe fn apply_in_child(&self) -> io::Result<()> {
        // SAFETY: each step is a raw syscall on memory owned by `self`.
        unsafe {
            self.caps.apply()?;
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            ll::restrict_self(self.ruleset.fd.as_raw_fd())?;
            sc::install(&self.filter.program)?;
        }
        Ok(())
    }

    /// Register [`Prepared::apply_in_child`] as a `pre_exec` hook of `cmd`.
    /// Hooks run in registration order, so register the cgroup move first.
    pub fn attach_to(self, cmd: &mut Command) {
        // SAFETY: the closure only calls apply_in_child, which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(move || self.apply_in_child());
        }
    }
}
