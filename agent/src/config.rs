//! The agent's configuration file (`mcp-warden agent --config FILE`), TOML.
//! Every default lives here, in [`Config::default`]; a missing file means
//! the defaults. Unknown keys are errors (a typo never silently reverts a
//! setting to its default).
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The control socket the agent listens on and `run` looks for.
pub const DEFAULT_SOCKET: &str = "/run/mcp-warden/agent.sock";
/// Environment override of the socket path for clients (`run`, `status`,
/// `events`), so test agents never collide with an installed one.
pub const SOCKET_ENV: &str = "MCP_WARDEN_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{col}: {msg}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        col: usize,
        msg: String,
    },
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Control socket (mode 0666: each request is checked by SO_PEERCRED).
    pub socket: PathBuf,
    /// Runtime state: the instance state file lives here.
    pub state_dir: PathBuf,
    /// bpffs directory for maps, programs and links.
    pub pin_root: PathBuf,
    /// Root-owned policies, `NAME.toml` for `run --server NAME`.
    pub policy_dir: PathBuf,
    /// JSON-lines audit log (reopened on SIGHUP).
    pub audit_log: PathBuf,
    /// Accept a user's own `run --policy FILE` (recorded as `user:UID:PATH`).
    pub allow_user_policies: bool,
    /// Directory under the cgroup2 mount that holds the instance cgroups.
    pub cgroup_parent: String,
    /// How often the policy directory is checked for changes, milliseconds.
    pub policy_poll_ms: u64,
    /// Prometheus endpoint (`ADDR:PORT`), loopback by default; `"off"`
    /// serves none.
    pub metrics_listen: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            state_dir: PathBuf::from("/run/mcp-warden"),
            pin_root: PathBuf::from("/sys/fs/bpf/mcp-warden"),
            policy_dir: PathBuf::from("/etc/mcp-warden/policies"),
            audit_log: PathBuf::from("/var/log/mcp-warden/audit.jsonl"),
            allow_user_policies: false,
            cgroup_parent: crate::confine::cgroup::PARENT.to_string(),
            policy_poll_ms: 2000,
            metrics_listen: crate::metrics_http::DEFAULT_METRICS_ADDR.to_string(),
        }
    }
}

impl Config {
    /// Read `path`, or the defaults when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, col) = e
                .span()
                .map(|s| crate::policy::diag::LineIndex::new(text).position(s.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                col,
                msg: e.message().to_string(),
            }
        })
    }

    /// The instance state file.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("instances.json")
    }
}

/// The socket clients use: `$MCP_WARDEN_SOCKET` or the default.
pub fn client_socket() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        let c = Config::parse(
            "allow_user_policies = true\npin_root = \"/sys/fs/bpf/t\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert!(c.allow_user_policies);
        assert_eq!(c.pin_root, PathBuf::from("/sys/fs/bpf/t"));
        assert_eq!(c.policy_dir, Config::default().policy_dir);
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = Config::parse("socket = \"/x\"\nsokcet = 1\n", Path::new("a.toml")).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("a.toml:2:1:"), "{s}");
    }
}
