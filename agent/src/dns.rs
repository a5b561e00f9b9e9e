//! DNS names in `network.connect`/`bind`: resolved by the agent (never by
//! the confined server's view), and refreshed within their TTL so the
//! kernel's allowlist follows the name.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use hickory_resolver::{
    config::{NameServerConfig, Protocol, ResolverConfig, ResolverOpts},
    TokioAsyncResolver,
};

use crate::policy::{Host, Policy};

/// Never refresh more often than this, whatever the TTL says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Refresh at least this often even for long TTLs.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("reading the system resolver configuration: {0}")]
    Config(#[from] hickory_resolver::error::ResolveError),
    #[error("MCP_WARDEN_DNS must be IP:PORT, got {0:?}")]
    BadOverride(String),
}

/// Every DNS name the policy mentions (server and tool rules).
pub fn names(policy: &Policy) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut add = |rules: &crate::policy::Rules| {
        for r in rules.network.connect.iter().chain(&rules.network.bind) {
            if let Host::Name(n) = &r.host {
                out.insert(n.clone());
            }
        }
    };
    add(&policy.rules);
    for t in &policy.tools {
        add(&t.rules);
    }
    out
}

pub struct Resolver {
    inner: TokioAsyncResolver,
}

impl Resolver {
    /// The system resolver (resolv.conf and /etc/hosts). `MCP_WARDEN_DNS`
    /// (IP:PORT) replaces the name servers: for tests on loopback, and for
    /// hosts whose agent must use a specific resolver. Only root runs the
    /// agent, so only root can set it.
    pub fn new() -> Result<Self, DnsError> {
        let inner = match std::env::var("MCP_WARDEN_DNS") {
            Ok(s) => {
                let addr: SocketAddr = s.parse().map_err(|_| DnsError::BadOverride(s.clone()))?;
                let mut cfg = ResolverConfig::new();
                cfg.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
                let mut opts = ResolverOpts::default();
                opts.use_hosts_file = false;
                opts.cache_size = 0;
                opts.attempts = 1;
                opts.timeout = Duration::from_secs(2);
                TokioAsyncResolver::tokio(cfg, opts)
            }
            Err(_) => TokioAsyncResolver::tokio_from_system_conf()?,
        };
        Ok(Self { inner })
    }

    /// Resolve every name. A name that does not resolve maps to no address
    /// (nothing is allowed for it) and is reported in `failed`.
    pub async fn resolve(&self, names: &BTreeSet<String>) -> Resolved {
        let mut addrs = HashMap::new();
        let mut failed = Vec::new();
        let mut next = Instant::now() + MAX_REFRESH;
        for name in names {
            match self.inner.lookup_ip(name.as_str()).await {
                Ok(l) => {
                    let mut v: Vec<IpAddr> = l.iter().collect();
                    v.sort();
                    v.dedup();
                    next = next.min(l.valid_until());
                    addrs.insert(name.clone(), v);
                }
                Err(e) => {
                    failed.push((name.clone(), e.to_string()));
                    addrs.insert(name.clone(), Vec::new());
                    next = next.min(Instant::now() + Duration::from_secs(5));
                }
            }
        }
        let now = Instant::now();
        let next = next.max(now + MIN_REFRESH);
        Resolved {
            addrs,
            failed,
            next_refresh: next,
        }
    }
}

#[derive(Debug)]
pub struct Resolved {
    pub addrs: HashMap<String, Vec<IpAddr>>,
    pub failed: Vec<(String, String)>,
    pub next_refresh: Instant,
}
