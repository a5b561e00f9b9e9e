//! Policy v1: parse (TOML with spans) -> validate -> expand variables ->
//! [`model::Policy`]; compile to kernel map entries in [`compile`].
//!
//! The user-facing contract is docs/policy.md.
pub mod check;
pub mod compile;
pub mod diag;
pub mod model;
pub mod parse;
pub mod values;
pub mod vars;

use std::path::{Path, PathBuf};

pub use check::check_main;
pub use compile::{compile_net, CompileError, CompiledNet};
pub use diag::Diagnostic;
pub use model::*;
pub use parse::{parse, POLICY_VERSION};
pub use vars::Vars;

/// Errors of loading a policy file or of resolving its variables.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: cannot read policy: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid policy:\n{}", path.display(), join_lines(diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
    #[error("cannot resolve policy variables for uid {uid}: {reason}")]
    Account { uid: u32, reason: String },
}

fn join_lines(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Read, parse and validate the policy at `path`. Diagnostics name the
/// file as `path` displays; [`Policy::source`] is that same string.
pub fn load(path: &Path, vars: &Vars) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, &path.display().to_string(), vars).map_err(|diagnostics| PolicyError::Invalid {
        path: path.to_path_buf(),
        diagnostics,
    })
}
