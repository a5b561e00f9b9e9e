//! Policy v1: parse (TOML with spans) -> validate -> expand variables ->
//! [`model::Policy`]; compile to kernel map entries in [`compile`].
//!
//! The user-facing contract is docs/policy.md.
pub mod check;
pub mod compile;
pub mod diag;
pub mod judge;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars::ann()
    }

    /// Every policy shipped in packaging/policies is valid and compiles.
    #[test]
    fn shipped_policies_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/policies");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let p = load(&path, &vars()).unwrap_or_else(|e| panic!("{e}"));
            let stem = path.file_stem().unwrap().to_str().unwrap();
            assert_eq!(p.server, stem, "{}", path.display());
            let mut dns = std::collections::HashMap::new();
            dns.insert(
                "registry.npmjs.org".to_string(),
                vec!["104.16.0.1".parse().unwrap()],
            );
            compile_net(&p, 1, &dns).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert!(n >= 3, "only {n} policies in {}", dir.display());
    }

    #[test]
    fn load_errors() {
        let e = load(Path::new("/nonexistent/p.toml"), &vars()).unwrap_err();
        assert!(matches!(e, PolicyError::Read { .. }), "{e}");
        let dir = std::env::temp_dir().join(format!("mw-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.toml");
        std::fs::write(&f, "version = 1\nserver = \"\"\nmode = 1\n").unwrap();
        let e = load(&f, &vars()).unwrap_err();
        let PolicyError::Invalid { diagnostics, .. } = &e else {
            panic!("{e}");
        };
        assert_eq!(diagnostics.len(), 2);
        assert_eq!(diagnostics[0].file, f.display().to_string());
        assert!(
            e.to_string().contains(":3:8: `mode` must be a string"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
