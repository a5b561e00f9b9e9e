//! The validated, variable-expanded policy the rest of the agent consumes.
//! Produced only by `policy::load`/`policy::parse` (see mod.rs); every path
//! here is absolute and every address already parsed.
use ipnet::IpNet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnViolation {
    Deny,
    Kill,
}

/// `/dir/**` (subtree) or an exact path. Paths are absolute and normalised
/// (no empty, `.` or `..` components, no trailing `/`); the root subtree
/// `/**` is `Subtree("/")`. Unix socket rules may also be an abstract name,
/// `Exact("@name")`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathRule {
    Exact(String),
    Subtree(String),
}

impl PathRule {
    /// The path without the `/**` suffix.
    pub fn path(&self) -> &str {
        match self {
            PathRule::Exact(p) | PathRule::Subtree(p) => p,
        }
    }

    /// The bytes a matching path starts with: the path itself for an exact
    /// rule, the path and a `/` for a subtree (`/` for the root subtree),
    /// so `/run/pg/**` does not match `/run/pgx`.
    pub fn prefix(&self) -> String {
        match self {
            PathRule::Exact(p) => p.clone(),
            PathRule::Subtree(p) if p == "/" => "/".to_string(),
            PathRule::Subtree(p) => format!("{p}/"),
        }
    }

    pub fn is_subtree(&self) -> bool {
        matches!(self, PathRule::Subtree(_))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRules {
    pub read: Vec<PathRule>,
    pub write: Vec<PathRule>,
    pub deny: Vec<PathRule>,
}

/// Inclusive port range; `*` is 0..=65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// An address or CIDR (a bare address is a /32 or /128).
    Net(IpNet),
    /// A DNS name, resolved by the agent and refreshed within its TTL.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AddrRule {
    pub host: Host,
    pub ports: PortRange,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkRules {
    pub connect: Vec<AddrRule>,
    pub bind: Vec<AddrRule>,
    /// Unix socket paths (PathRule semantics); abstract names start with '@'.
    pub unix: Vec<PathRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRules {
    pub allow: Vec<PathRule>,
}

/// Rules of one section set: used for the server and for each tool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub files: FileRules,
    pub network: NetworkRules,
    pub exec: ExecRules,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolRules {
    pub name: String,
    pub rules: Rules,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub version: u32,
    pub server: String,
    pub mode: Mode,
    pub on_violation: OnViolation,
    /// Server-level rules: hold at all times.
    pub rules: Rules,
    /// `tools.allow`; None = every tool may be called.
    pub tools_allow: Option<Vec<String>>,
    /// Per-tool rules, in file order. A tool's index here + 1 is its bit in
    /// the kernel's rule masks (bit 0 is the server).
    pub tools: Vec<ToolRules>,
    /// Where the policy came from (file path, "embedded:demo", ...).
    pub source: String,
    /// `[mcp]`: governance of server-initiated requests and approvals.
    pub mcp: McpRules,
}

/// What happens to a server-initiated request of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Governance {
    /// Forwarded; recorded as an event.
    #[default]
    Allow,
    /// Forwarded; recorded as an `audit` event and logged as a warning.
    Log,
    /// Answered by the relay with a JSON-RPC error; never reaches the client.
    Deny,
}

impl Governance {
    pub fn as_str(self) -> &'static str {
        match self {
            Governance::Allow => "allow",
            Governance::Log => "log",
            Governance::Deny => "deny",
        }
    }
}

/// `[mcp]` keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McpRules {
    /// `sampling/createMessage` requests from the server.
    pub sampling: Governance,
    /// `elicitation/create` requests from the server.
    pub elicitation: Governance,
    /// Tools whose calls wait for a person's `mcp-warden approve ID`.
    pub approval: Vec<String>,
    /// Seconds to wait for a decision; no decision in time is a denial.
    pub approval_timeout_secs: u64,
    /// Hold tools to their declared annotations (`openWorldHint: false`:
    /// no network egress during their calls).
    pub enforce_annotations: bool,
}

impl Default for McpRules {
    fn default() -> Self {
        Self {
            sampling: Governance::Allow,
            elicitation: Governance::Allow,
            approval: Vec::new(),
            approval_timeout_secs: 120,
            enforce_annotations: true,
        }
    }
}

impl Policy {
    /// Bit of `tool` in kernel rule masks, if it has rules of its own (and
    /// is among the first 63, which `parse` guarantees).
    pub fn tool_bit(&self, tool: &str) -> Option<u64> {
        self.tools
            .iter()
            .position(|t| t.name == tool)
            .and_then(|i| u32::try_from(i + 1).ok())
            .and_then(|shift| 1u64.checked_shl(shift))
    }

    /// Every rule set with its mask bit: the server's (`None`, `SERVER_BIT`)
    /// first, then each tool's in file order. Tools past the 63rd (which
    /// `parse` refuses) are left out.
    pub fn rule_sets(&self) -> impl Iterator<Item = (Option<&str>, &Rules, u64)> {
        std::iter::once((None, &self.rules, mcp_warden_common::SERVER_BIT)).chain(
            self.tools
                .iter()
                .zip(1u32..64)
                .map(|(t, shift)| (Some(t.name.as_str()), &t.rules, 1u64 << shift)),
        )
    }

    /// Every DNS name in `connect` and `bind` rules (server and tools),
    /// sorted and without duplicates: what the agent must resolve.
    pub fn dns_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .rule_sets()
            .flat_map(|(_, r, _)| r.network.connect.iter().chain(r.network.bind.iter()))
            .filter_map(|a| match &a.host {
                Host::Name(n) => Some(n.clone()),
                Host::Net(_) => None,
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// May `tool` be called at all?
    pub fn tool_allowed(&self, tool: &str) -> bool {
        match &self.tools_allow {
            None => true,
            Some(list) => list.iter().any(|t| t == tool),
        }
    }
}
