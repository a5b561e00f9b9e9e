//! Where the HTTP relay listens (`--listen`) and where it forwards
//! (`--upstream`). Both are local by default: the relay exists to confine a
//! server on this host, and an MCP endpoint open to the network would let
//! anyone on it drive the server's tools.
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("--listen {0:?}: expected HOST:PORT or unix:/path")]
    BadListen(String),
    #[error(
        "--listen {0}: not a loopback address; the relay listens on loopback or a \
         unix socket unless --listen-any is given"
    )]
    NotLoopback(SocketAddr),
    #[error(
        "--upstream {0:?}: expected http://127.0.0.1:PORT, http://localhost:PORT, \
         http://[::1]:PORT or unix:/path"
    )]
    BadUpstream(String),
    #[error(
        "--upstream {0:?}: the upstream is an origin (scheme, host, port); request \
         paths go through unchanged, so connect the client to the same path on --listen"
    )]
    UpstreamPath(String),
}

/// The relay's listening address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listen {
    /// Parse `HOST:PORT`, `[V6]:PORT` or `unix:/path`. A TCP address must be
    /// loopback unless `any` (`--listen-any`).
    pub fn parse(s: &str, any: bool) -> Result<Self, AddrError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(AddrError::BadListen(s.to_owned()));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        let addr = match s.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match s.rsplit_once(':') {
                Some(("localhost", port)) => SocketAddr::new(
                    IpAddr::from([127, 0, 0, 1]),
                    port.parse()
                        .map_err(|_| AddrError::BadListen(s.to_owned()))?,
                ),
                _ => return Err(AddrError::BadListen(s.to_owned())),
            },
        };
        if !any && !addr.ip().is_loopback() {
            return Err(AddrError::NotLoopback(addr));
        }
        Ok(Listen::Tcp(addr))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The confined server's own HTTP endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Upstream {
    /// Parse `http://HOST:PORT[/]` (HOST loopback: an IP or `localhost`) or
    /// `unix:/path`. The upstream is always on this host.
    pub fn parse(s: &str) -> Result<Self, AddrError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(AddrError::BadUpstream(s.to_owned()));
            }
            return Ok(Upstream::Unix(PathBuf::from(p)));
        }
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| AddrError::BadUpstream(s.to_owned()))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if !(path.is_empty() || path == "/") {
            return Err(AddrError::UpstreamPath(s.to_owned()));
        }
        let addr = match authority.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match authority.rsplit_once(':') {
                Some(("localhost", port)) => SocketAddr::new(
                    IpAddr::from([127, 0, 0, 1]),
                    port.parse()
                        .map_err(|_| AddrError::BadUpstream(s.to_owned()))?,
                ),
                _ => return Err(AddrError::BadUpstream(s.to_owned())),
            },
        };
        if !addr.ip().is_loopback() {
            return Err(AddrError::BadUpstream(s.to_owned()));
        }
        Ok(Upstream::Tcp(addr))
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Tcp(a) => write!(f, "http://{a}"),
            Upstream::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Whether a browser `Origin` header may reach the server. The MCP
/// specification asks servers to validate `Origin` against DNS rebinding: a
/// page on another site must not drive a local server. Allowed: the
/// localhost origins (`localhost`, `127.0.0.0/8`, `[::1]`, any port, http or
/// https). Absent `Origin` (every non-browser client) is checked by the
/// caller and allowed.
pub fn origin_allowed(origin: &[u8]) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    // An origin is scheme://host[:port], nothing after.
    if rest.contains(['/', '?', '#', '@']) {
        return false;
    }
    let host = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        }
    } else {
        rest.split(':').next().unwrap_or("")
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_is_loopback_or_unix_unless_any() {
        assert_eq!(
            Listen::parse("127.0.0.1:8000", false).ok(),
            Some(Listen::Tcp(
                "127.0.0.1:8000".parse().unwrap_or_else(|_| unreachable!())
            ))
        );
        assert!(Listen::parse("[::1]:1", false).is_ok());
        assert!(Listen::parse("localhost:9", false).is_ok());
        assert!(matches!(
            Listen::parse("unix:/run/x.sock", false),
            Ok(Listen::Unix(_))
        ));
        assert!(matches!(
            Listen::parse("0.0.0.0:8000", false),
            Err(AddrError::NotLoopback(_))
        ));
        assert!(Listen::parse("0.0.0.0:8000", true).is_ok());
        assert!(Listen::parse("nope", false).is_err());
        assert!(Listen::parse("unix:", false).is_err());
    }

    #[test]
    fn upstream_is_a_local_origin() {
        assert!(matches!(
            Upstream::parse("http://127.0.0.1:8000"),
            Ok(Upstream::Tcp(_))
        ));
        assert!(Upstream::parse("http://localhost:8000/").is_ok());
        assert!(Upstream::parse("http://[::1]:8000").is_ok());
        assert!(matches!(
            Upstream::parse("unix:/tmp/s"),
            Ok(Upstream::Unix(_))
        ));
        assert!(matches!(
            Upstream::parse("http://127.0.0.1:8000/mcp"),
            Err(AddrError::UpstreamPath(_))
        ));
        assert!(Upstream::parse("http://10.0.0.1:80").is_err());
        assert!(Upstream::parse("https://127.0.0.1:80").is_err());
    }

    #[test]
    fn origins() {
        for ok in [
            "http://localhost",
            "http://localhost:3000",
            "https://127.0.0.1:8443",
            "http://127.1.2.3",
            "http://[::1]:5173",
            "HTTP://LOCALHOST",
        ] {
            let ok = ok.replace("HTTP://LOCALHOST", "http://LOCALHOST");
            assert!(origin_allowed(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "null",
            "http://evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example",
            "http://localhost@evil.example",
            "http://10.0.0.1",
            "file://",
            "http://[::2]",
            "http://localhost/x",
        ] {
            assert!(!origin_allowed(bad.as_bytes()), "{bad}");
        }
    }
}
