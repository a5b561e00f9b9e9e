//! Validation of single policy values: paths, network addresses, names.
//!
//! Pure string -> model functions. An error carries the byte offset inside
//! the written value when it points at one character (a glob, a variable),
//! so the TOML layer can turn it into an exact column.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mcp_warden_common::UNIX_PATH_MAX;

use super::model::{AddrRule, Host, PathRule, PortRange};
use super::vars::{expand, var_refs, Vars};

/// Longest file or exec path accepted (PATH_MAX without the NUL).
pub const MAX_PATH_LEN: usize = 4095;
/// Longest server name.
pub const MAX_SERVER_LEN: usize = 64;
/// Longest tool name (MCP tool names are at most 128 characters).
pub const MAX_TOOL_LEN: usize = 128;

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ValueError {
    /// Byte offset inside the value as written, when the error is at one spot.
    pub at: Option<usize>,
    pub message: String,
}

impl ValueError {
    fn whole(message: impl Into<String>) -> Self {
        ValueError {
            at: None,
            message: message.into(),
        }
    }
    fn at(at: usize, message: impl Into<String>) -> Self {
        ValueError {
            at: Some(at),
            message: message.into(),
        }
    }
}

/// Which list a path comes from: changes only what is allowed at the edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PathKind {
    File,
    Exec,
    Unix,
}

const GLOB_CHARS: [char; 4] = ['*', '?', '[', '{'];

/// First glob character of `s` outside `${...}` references.
fn first_glob(s: &str, refs: &[std::ops::Range<usize>]) -> Option<(usize, char)> {
    s.char_indices()
        .find(|(i, c)| GLOB_CHARS.contains(c) && !refs.iter().any(|r| r.contains(i)))
}

/// Parse one path rule: an absolute path, or `/dir/**` for a subtree.
///
/// Variables are expanded first, then the result is normalised: empty
/// components (`//`) are dropped; `.` and `..` components, a trailing `/`
/// (other than the root itself) and every glob form but a final `/**` are
/// errors.
pub(crate) fn parse_path(raw: &str, kind: PathKind, vars: &Vars) -> Result<PathRule, ValueError> {
    let refs = var_refs(raw).map_err(|e| ValueError::at(e.at, e.message))?;
    if raw.contains('\0') {
        return Err(ValueError::whole("path contains a NUL byte"));
    }
    if kind == PathKind::Unix && raw.starts_with('@') {
        return parse_abstract(raw, &refs, vars);
    }
    // Only a final `/**` is a glob we understand.
    let (base, subtree) = match raw.strip_suffix("/**") {
        Some(b) => (b, true),
        None => (raw, false),
    };
    if let Some((i, c)) = first_glob(base, &refs) {
        let msg = if base[i..].starts_with("**") {
            "`**` is only allowed as the last component (`/dir/**`)".to_string()
        } else if c == '*' && base[i..].len() == 1 && base[..i].ends_with('/') {
            format!(
                "`/*` is not supported: use `{}**` for the whole tree",
                &base[..i]
            )
        } else {
            format!(
                "unsupported glob character `{c}`: only exact paths and a trailing `/**` are allowed"
            )
        };
        return Err(ValueError::at(i, msg));
    }
    let expanded = expand(base, vars).map_err(|e| ValueError::at(e.at, e.message))?;
    let base = if subtree && expanded.is_empty() {
        // "/**": the whole filesystem.
        "/".to_string()
    } else {
        expanded
    };
    if !base.starts_with('/') {
        return Err(ValueError::whole(format!(
            "relative path `{raw}`: paths must be absolute (start with `/` or `${{HOME}}`)"
        )));
    }
    if base.len() > 1 && base.ends_with('/') {
        let trimmed = base.trim_end_matches('/');
        return Err(ValueError::whole(format!(
            "trailing `/` in `{raw}`: write `{trimmed}/**` for the tree or `{}` for the entry itself",
            if trimmed.is_empty() { "/" } else { trimmed }
        )));
    }
    let mut parts = Vec::new();
    for comp in base.split('/') {
        match comp {
            "" => {}
            "." | ".." => {
                return Err(ValueError::whole(format!(
                    "`{comp}` component in `{raw}`: write the path without `.` or `..`"
                )))
            }
            c => parts.push(c),
        }
    }
    let path = format!("/{}", parts.join("/"));
    match kind {
        PathKind::File | PathKind::Exec => {
            if path.len() > MAX_PATH_LEN {
                return Err(ValueError::whole(format!(
                    "path longer than {MAX_PATH_LEN} bytes"
                )));
            }
        }
        PathKind::Unix => {
            if path == "/" && !subtree {
                return Err(ValueError::whole(
                    "`/` is a directory, not a socket: write `/**` for every socket path",
                ));
            }
            // A subtree is stored with its trailing '/', an exact path
            // with its terminating NUL (policy/compile.rs).
            let key_len = if subtree && path == "/" {
                path.len()
            } else {
                path.len() + 1
            };
            if key_len > UNIX_PATH_MAX {
                return Err(ValueError::whole(format!(
                    "unix socket path longer than {} bytes",
                    UNIX_PATH_MAX - 1
                )));
            }
        }
    }
    Ok(if subtree {
        PathRule::Subtree(path)
    } else {
        PathRule::Exact(path)
    })
}

/// `@name`: a Linux abstract unix socket name, matched exactly.
fn parse_abstract(
    raw: &str,
    refs: &[std::ops::Range<usize>],
    vars: &Vars,
) -> Result<PathRule, ValueError> {
    if let Some((i, c)) = first_glob(raw, refs) {
        return Err(ValueError::at(
            i,
            format!("unsupported character `{c}`: abstract socket names are matched exactly"),
        ));
    }
    let name = expand(raw, vars).map_err(|e| ValueError::at(e.at, e.message))?;
    if name.len() < 2 {
        return Err(ValueError::whole("empty abstract socket name after `@`"));
    }
    // Stored as `@name` and a NUL in a key of UNIX_PATH_MAX bytes.
    if name.len() + 1 > UNIX_PATH_MAX {
        return Err(ValueError::whole(format!(
            "abstract socket name longer than {} bytes",
            UNIX_PATH_MAX - 2
        )));
    }
    Ok(PathRule::Exact(name))
}

/// Parse `HOST:PORT`. HOST is an IPv4 address or CIDR, a bracketed IPv6
/// address or CIDR (`[::1]`, `[fd00::/8]`) or a DNS name. PORT is `*`, a
/// number or an inclusive range `lo-hi`. Port 0 is accepted only where
/// `allow_port0` (bind: "let the kernel pick").
pub(crate) fn parse_addr(raw: &str, allow_port0: bool) -> Result<AddrRule, ValueError> {
    if let Some(i) = raw.find("${") {
        return Err(ValueError::at(
            i,
            "variables are not allowed in network addresses",
        ));
    }
    if raw.is_empty() {
        return Err(ValueError::whole("empty address"));
    }
    let (host, port_at, port) = if let Some(rest) = raw.strip_prefix('[') {
        let Some(close) = rest.find(']') else {
            return Err(ValueError::whole(format!("missing `]` in `{raw}`")));
        };
        let inner = &rest[..close];
        let after = &rest[close + 1..];
        let Some(port) = after.strip_prefix(':') else {
            return Err(if after.is_empty() {
                ValueError::whole(format!(
                    "missing port in `{raw}`: write `{raw}:PORT` or `{raw}:*`"
                ))
            } else {
                ValueError::at(close + 2, format!("expected `:PORT` after `]` in `{raw}`"))
            });
        };
        (parse_v6_host(inner)?, close + 3, port)
    } else {
        let Some((host, port)) = raw.rsplit_once(':') else {
            return Err(ValueError::whole(format!(
                "missing port in `{raw}`: write `{raw}:PORT` or `{raw}:*`"
            )));
        };
        if host.contains(':') || Ipv6Addr::from_str(raw).is_ok() {
            return Err(ValueError::whole(format!(
                "IPv6 addresses must be in brackets, e.g. `[::1]:443` or `[fd00::/8]:*` (got `{raw}`)"
            )));
        }
        (parse_plain_host(host)?, host.len() + 1, port)
    };
    let ports = parse_ports(port, allow_port0).map_err(|m| ValueError::at(port_at, m))?;
    Ok(AddrRule { host, ports })
}

fn parse_v6_host(inner: &str) -> Result<Host, ValueError> {
    if inner.contains('/') {
        let net = Ipv6Net::from_str(inner)
            .map_err(|_| ValueError::whole(format!("bad IPv6 CIDR `{inner}`")))?;
        if net.trunc() != net {
            return Err(ValueError::whole(format!(
                "host bits set in `{inner}` (the network is `{}`)",
                net.trunc()
            )));
        }
        Ok(Host::Net(IpNet::V6(net)))
    } else if let Ok(a) = Ipv6Addr::from_str(inner) {
        Ok(Host::Net(IpNet::from(IpAddr::V6(a))))
    } else if Ipv4Addr::from_str(inner).is_ok() {
        Err(ValueError::whole(format!(
            "brackets are only for IPv6: write `{inner}:PORT`"
        )))
    } else {
        Err(ValueError::whole(format!("bad IPv6 address `{inner}`")))
    }
}

fn parse_plain_host(host: &str) -> Result<Host, ValueError> {
    if host.is_empty() {
        return Err(ValueError::whole("empty host before `:`"));
    }
    if host.contains('/') {
        let net = Ipv4Net::from_str(host)
            .map_err(|_| ValueError::whole(format!("bad IPv4 CIDR `{host}`")))?;
        if net.trunc() != net {
            return Err(ValueError::whole(format!(
                "host bits set in `{host}` (the network is `{}`)",
                net.trunc()
            )));
        }
        return Ok(Host::Net(IpNet::V4(net)));
    }
    if let Ok(a) = Ipv4Addr::from_str(host) {
        return Ok(Host::Net(IpNet::from(IpAddr::V4(a))));
    }
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(ValueError::whole(format!("bad IPv4 address `{host}`")));
    }
    parse_dns_name(host).map(Host::Name)
}

/// RFC 1123 host name: labels of 1-63 letters, digits and `-` (not at either
/// end of a label), 253 bytes at most, last label not all digits. Returned
/// lower-cased and without a trailing dot.
pub(crate) fn parse_dns_name(name: &str) -> Result<String, ValueError> {
    if name.contains('*') {
        return Err(ValueError::whole(format!(
            "wildcard names are not supported (`{name}`): list each name"
        )));
    }
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if n.is_empty() || n.len() > 253 {
        return Err(ValueError::whole(format!(
            "bad DNS name `{name}`: 1 to 253 characters"
        )));
    }
    let labels: Vec<&str> = n.split('.').collect();
    for l in &labels {
        let ok = !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-');
        if !ok {
            return Err(ValueError::whole(format!(
                "bad DNS name `{name}`: each label is 1-63 letters, digits or `-`, not starting or ending with `-`"
            )));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(ValueError::whole(format!(
            "bad DNS name `{name}`: the last label cannot be all digits"
        )));
    }
    Ok(n)
}

fn parse_port_num(s: &str, allow_port0: bool) -> Result<u16, String> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "bad port `{s}`: expected `*`, a number 1-65535 or a range `lo-hi`"
        ));
    }
    let n: u32 = s
        .parse()
        .map_err(|_| format!("port `{s}` out of range 1-65535"))?;
    if n > 65535 {
        return Err(format!("port `{s}` out of range 1-65535"));
    }
    if n == 0 && !allow_port0 {
        return Err("port 0 is only meaningful in `bind` (use `*` for any port)".to_string());
    }
    Ok(n as u16)
}

fn parse_ports(s: &str, allow_port0: bool) -> Result<PortRange, String> {
    if s == "*" {
        return Ok(PortRange { lo: 0, hi: 65535 });
    }
    if let Some((lo, hi)) = s.split_once('-') {
        let lo = parse_port_num(lo, allow_port0)?;
        let hi = parse_port_num(hi, allow_port0)?;
        if lo > hi {
            return Err(format!("empty port range `{s}`: low end above high end"));
        }
        return Ok(PortRange { lo, hi });
    }
    let p = parse_port_num(s, allow_port0)?;
    Ok(PortRange { lo: p, hi: p })
}

/// Server names become metric labels and log fields.
pub(crate) fn check_server_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("`server` must not be empty".to_string());
    }
    if s.len() > MAX_SERVER_LEN {
        return Err(format!("`server` longer than {MAX_SERVER_LEN} characters"));
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "bad server name `{s}`: use letters, digits, `_`, `-`, `.`, starting with a letter or digit"
        ));
    }
    Ok(())
}

/// MCP tool names: 1-128 of `A-Z a-z 0-9 _ - .`.
pub(crate) fn check_tool_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty tool name".to_string());
    }
    if s.len() > MAX_TOOL_LEN {
        return Err(format!("tool name longer than {MAX_TOOL_LEN} characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "bad tool name `{s}`: use letters, digits, `_`, `-`, `.`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars::ann()
    }

    fn p(s: &str) -> Result<PathRule, ValueError> {
        parse_path(s, PathKind::File, &vars())
    }

    #[test]
    fn paths_ok() {
        assert_eq!(p("/usr/**").unwrap(), PathRule::Subtree("/usr".into()));
        assert_eq!(p("/**").unwrap(), PathRule::Subtree("/".into()));
        assert_eq!(p("/").unwrap(), PathRule::Exact("/".into()));
        assert_eq!(p("//usr//bin").unwrap(), PathRule::Exact("/usr/bin".into()));
        assert_eq!(
            p("${HOME}/p/**").unwrap(),
            PathRule::Subtree("/home/ann/p".into())
        );
        assert_eq!(
            p("/run/user/${UID}/x").unwrap(),
            PathRule::Exact("/run/user/1000/x".into())
        );
        assert_eq!(p("/a$b").unwrap(), PathRule::Exact("/a$b".into()));
    }

    #[test]
    fn paths_bad() {
        assert!(p("usr/bin").unwrap_err().message.contains("relative"));
        assert!(p("").unwrap_err().message.contains("relative"));
        assert!(p("/a/../b").unwrap_err().message.contains("`..`"));
        assert!(p("/a/./b").unwrap_err().message.contains("`.`"));
        assert!(p("/a/b/").unwrap_err().message.contains("trailing"));
        assert_eq!(p("/a/*").unwrap_err().at, Some(3));
        assert!(p("/a/*").unwrap_err().message.contains("/a/**"));
        assert_eq!(p("/a/**/b").unwrap_err().at, Some(3));
        assert_eq!(p("/a/b*").unwrap_err().at, Some(4));
        assert_eq!(p("/a/?").unwrap_err().at, Some(3));
        assert_eq!(p("/a/[x]").unwrap_err().at, Some(3));
        assert_eq!(p("/a/{x,y}").unwrap_err().at, Some(3));
        assert_eq!(p("/x/${FOO}").unwrap_err().at, Some(3));
        assert!(p("/x/**/**").is_err());
    }

    #[test]
    fn unix_paths() {
        fn u(s: &str) -> Result<PathRule, ValueError> {
            parse_path(s, PathKind::Unix, &vars())
        }
        assert_eq!(u("@dbus").unwrap(), PathRule::Exact("@dbus".into()));
        assert!(u("@").is_err());
        assert!(u("@x*").is_err());
        assert!(u("/").is_err());
        assert_eq!(
            u("/run/pg/**").unwrap(),
            PathRule::Subtree("/run/pg".into())
        );
        // Exact: 107 bytes and the key's NUL; subtree: 107 and its `/`.
        assert!(u(&format!("/{}", "a".repeat(107))).is_err());
        assert!(u(&format!("/{}", "a".repeat(106))).is_ok());
        assert!(u(&format!("/{}/**", "a".repeat(107))).is_err());
        assert!(u(&format!("/{}/**", "a".repeat(106))).is_ok());
        assert!(u(&format!("@{}", "a".repeat(106))).is_ok());
        assert!(u(&format!("@{}", "a".repeat(107))).is_err());
    }

    fn a(s: &str) -> Result<AddrRule, ValueError> {
        parse_addr(s, false)
    }

    #[test]
    fn addrs_ok() {
        let r = a("10.1.0.0/16:443").unwrap();
        assert_eq!(r.host, Host::Net("10.1.0.0/16".parse().unwrap()));
        assert_eq!(r.ports, PortRange { lo: 443, hi: 443 });
        let r = a("[::1]:*").unwrap();
        assert_eq!(r.host, Host::Net("::1/128".parse().unwrap()));
        assert_eq!(r.ports, PortRange { lo: 0, hi: 65535 });
        let r = a("[fd00::/8]:8000-8100").unwrap();
        assert_eq!(r.host, Host::Net("fd00::/8".parse().unwrap()));
        assert_eq!(r.ports, PortRange { lo: 8000, hi: 8100 });
        let r = a("API.GitHub.com.:443").unwrap();
        assert_eq!(r.host, Host::Name("api.github.com".into()));
        assert_eq!(
            a("localhost:5432").unwrap().host,
            Host::Name("localhost".into())
        );
        assert_eq!(parse_addr("127.0.0.1:0", true).unwrap().ports.lo, 0);
    }

    #[test]
    fn addrs_bad() {
        for bad in [
            "127.0.0.1",
            "::1:443",
            "fd00::/8:*",
            "::1",
            "10.0.0.0/33:1",
            "10.1.2.3/16:443",
            "300.1.1.1:80",
            "1.2.3:80",
            "[10.0.0.1]:80",
            "[::1]",
            "[::1]443",
            "[zz::1]:1",
            "[fd00::1/8]:1",
            "a..b:1",
            "-a.com:1",
            "a_b.com:1",
            "*.github.com:443",
            "h:0",
            "h:65536",
            "h:",
            "h:x",
            "h:20-10",
            "h:1-",
            ":80",
            "${HOME}:1",
        ] {
            assert!(a(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(a("h:99999").unwrap_err().at, Some(2));
        assert_eq!(a("[::1]:x").unwrap_err().at, Some(6));
    }

    #[test]
    fn names() {
        assert!(check_server_name("filesystem").is_ok());
        assert!(check_server_name("git-2.x_y").is_ok());
        assert!(check_server_name("").is_err());
        assert!(check_server_name("-x").is_err());
        assert!(check_server_name("a b").is_err());
        assert!(check_server_name("a\"}").is_err());
        assert!(check_server_name(&"a".repeat(65)).is_err());
        assert!(check_tool_name("read_file").is_ok());
        assert!(check_tool_name("ns.tool-1").is_ok());
        assert!(check_tool_name("a/b").is_err());
        assert!(check_tool_name("").is_err());
    }
}
