//! Policy -> kernel map entries. This is where a policy line becomes a map
//! key. Pure: no maps are touched here (the kernel module writes them).
//!
//! Network rules go into LPM tries keyed by (policy id, rule kind, address)
//! and unix socket rules into one keyed by (policy id, path bytes). An LPM
//! lookup returns only the longest matching prefix, so every entry carries
//! the grants of every shorter entry that contains it: the compiler folds
//! them in here, once, instead of the kernel walking parents.
//!
//! Path tries and exact entries: an exact entry keyed by its bytes alone
//! would be a prefix of longer names and, as the longest match, shadow a
//! subtree that contains it (`/run/**` for the server, `/run/a` for a tool:
//! `/run/ab` would find `/run/a`). Exact entries are therefore keyed with
//! their terminating NUL (`len + 1` bytes of prefix); the kernel looks up
//! the zero-padded path, so an exact entry matches only its own path and
//! the longest match is always a rule for the path looked up.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use mcp_warden_common::{
    access, FileKey, FileLayer, FileRule, FILE_KEY_FIXED_BITS, FILE_PATH_MAX, MAX_FILE_LAYERS,
    SERVER_BIT,
};
use mcp_warden_common::{
    rule_kind, Net4Key, Net6Key, NetRule, PortRule, UnixKey, MAX_PORT_RULES, MAX_TOOLS_WITH_RULES,
    NET_KEY_FIXED_BITS, UNIX_PATH_MAX,
};

use super::model::{AddrRule, Host, Policy, PortRange, Rules};

/// Network map entries of one policy: `(LPM prefix length, key, value)`.
/// The prefix length counts every key bit that must match, the fixed
/// policy id and kind included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledNet {
    pub v4: Vec<(u32, Net4Key, NetRule)>,
    pub v6: Vec<(u32, Net6Key, NetRule)>,
    pub unix: Vec<(u32, UnixKey, mcp_warden_common::PathRule)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error(
        "{kind} rules for {addr} need {count} distinct port ranges once the rules of \
         enclosing networks are included; at most {max} fit in one kernel entry"
    )]
    TooManyPortRules {
        /// "connect" or "bind".
        kind: &'static str,
        /// The address or network (CIDR) of the entry.
        addr: String,
        count: usize,
        max: usize,
    },
    #[error("{count} tools carry rules; at most {max} can")]
    TooManyTools { count: usize, max: usize },
    #[error("unix socket rule `{path}`: {reason}")]
    BadUnixPath { path: String, reason: String },
    #[error("file rule `{path}`: {reason}")]
    BadFilePath { path: String, reason: String },
    #[error(
        "`{path}` lies under {count} nested rules for one access; the kernel entry holds {max}"
    )]
    TooDeep {
        path: String,
        count: usize,
        max: usize,
    },
}

/// The rule sets of a policy with their mask bits: the server's, then each
/// tool's.
fn rule_sets(policy: &Policy) -> Result<Vec<(&Rules, u64)>, CompileError> {
    if policy.tools.len() > MAX_TOOLS_WITH_RULES {
        return Err(CompileError::TooManyTools {
            count: policy.tools.len(),
            max: MAX_TOOLS_WITH_RULES,
        });
    }
    Ok(policy.rule_sets().map(|(_, r, m)| (r, m)).collect())
}

/// IPv4-mapped IPv6 networks (`::ffff:a.b.c.d/96+n`) are stored as IPv4:
/// the kernel judges a mapped destination as IPv4.
pub(crate) fn unmap(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net {
        if n.prefix_len() >= 96 {
            if let Some(v4) = n.network().to_ipv4_mapped() {
                if let Ok(n4) = Ipv4Net::new(v4, n.prefix_len() - 96) {
                    return IpNet::V4(n4);
                }
            }
        }
    }
    net
}

/// One grant before folding: this network, these ports, these rule sets.
type Grant<N> = (N, PortRange, u64);

#[derive(Default)]
struct Grants {
    v4: BTreeMap<u32, Vec<Grant<Ipv4Net>>>,
    v6: BTreeMap<u32, Vec<Grant<Ipv6Net>>>,
}

impl Grants {
    fn add(&mut self, kind: u32, net: IpNet, ports: PortRange, mask: u64) {
        match unmap(net).trunc() {
            IpNet::V4(n) => self.v4.entry(kind).or_default().push((n, ports, mask)),
            IpNet::V6(n) => self.v6.entry(kind).or_default().push((n, ports, mask)),
        }
    }

    fn add_rule(
        &mut self,
        kind: u32,
        rule: &AddrRule,
        mask: u64,
        resolved: &HashMap<String, Vec<IpAddr>>,
    ) {
        match &rule.host {
            Host::Net(n) => self.add(kind, *n, rule.ports, mask),
            Host::Name(name) => {
                for a in resolved.get(name).into_iter().flatten() {
                    self.add(kind, IpNet::from(*a), rule.ports, mask);
                }
            }
        }
    }
}

fn kind_name(kind: u32) -> &'static str {
    if kind == rule_kind::BIND {
        "bind"
    } else {
        "connect"
    }
}

/// Merge port grants into kernel port rules: identical ranges OR their
/// masks; a range inside another whose mask covers its own adds nothing
/// and is dropped. Sorted by range.
fn merge_ports(grants: impl Iterator<Item = (PortRange, u64)>) -> Vec<PortRule> {
    let mut by_range: BTreeMap<(u16, u16), u64> = BTreeMap::new();
    for (r, m) in grants {
        *by_range.entry((r.lo, r.hi)).or_default() |= m;
    }
    let all: Vec<((u16, u16), u64)> = by_range.into_iter().collect();
    all.iter()
        .filter(|((lo, hi), mask)| {
            !all.iter().any(|((olo, ohi), omask)| {
                (olo, ohi) != (lo, hi) && olo <= lo && hi <= ohi && mask & !omask == 0
            })
        })
        .map(|&((lo, hi), mask)| PortRule {
            lo,
            hi,
            _pad: 0,
            mask,
        })
        .collect()
}

/// For every distinct network among `grants`, the merged port rules of all
/// grants whose network contains it (itself included).
fn fold<N: Copy + Ord + std::fmt::Display>(
    kind: u32,
    grants: &[Grant<N>],
    contains: impl Fn(&N, &N) -> bool,
) -> Result<Vec<(N, NetRule)>, CompileError> {
    let nets: BTreeSet<N> = grants.iter().map(|g| g.0).collect();
    let mut out = Vec::with_capacity(nets.len());
    for net in nets {
        let rules = merge_ports(
            grants
                .iter()
                .filter(|g| contains(&g.0, &net))
                .map(|g| (g.1, g.2)),
        );
        if rules.len() > MAX_PORT_RULES {
            return Err(CompileError::TooManyPortRules {
                kind: kind_name(kind),
                addr: net.to_string(),
                count: rules.len(),
                max: MAX_PORT_RULES,
            });
        }
        let mut value = NetRule {
            count: rules.len() as u32,
            ..NetRule::default()
        };
        value.rules[..rules.len()].copy_from_slice(&rules);
        out.push((net, value));
    }
    Ok(out)
}

/// Compile the network rules of `policy` for the rule set `policy_id`.
///
/// `resolved` maps each DNS name of the policy ([`Host::Name`], lower-case)
/// to its current addresses; every address becomes a /32 or /128 entry with
/// that rule's ports. A name missing from the map, or with no addresses,
/// grants nothing.
pub fn compile_net(
    policy: &Policy,
    policy_id: u32,
    resolved: &HashMap<String, Vec<IpAddr>>,
) -> Result<CompiledNet, CompileError> {
    let sets = rule_sets(policy)?;
    let mut grants = Grants::default();
    for (rules, mask) in &sets {
        for r in &rules.network.connect {
            grants.add_rule(rule_kind::CONNECT, r, *mask, resolved);
        }
        for r in &rules.network.bind {
            grants.add_rule(rule_kind::BIND, r, *mask, resolved);
        }
    }
    let pid = policy_id.to_be_bytes();
    let mut out = CompiledNet::default();
    for (kind, g) in &grants.v4 {
        for (net, value) in fold(*kind, g, |outer, inner| outer.contains(inner))? {
            let key = Net4Key {
                policy_id: pid,
                kind: kind.to_be_bytes(),
                addr: net.network().octets(),
            };
            out.v4
                .push((NET_KEY_FIXED_BITS + u32::from(net.prefix_len()), key, value));
        }
    }
    for (kind, g) in &grants.v6 {
        for (net, value) in fold(*kind, g, |outer, inner| outer.contains(inner))? {
            let key = Net6Key {
                policy_id: pid,
                kind: kind.to_be_bytes(),
                addr: net.network().octets(),
            };
            out.v6
                .push((NET_KEY_FIXED_BITS + u32::from(net.prefix_len()), key, value));
        }
    }
    out.unix = compile_unix(&sets, policy_id)?;
    Ok(out)
}

/// Bits of `UnixKey` before the path: the policy id.
pub use mcp_warden_common::UNIX_KEY_FIXED_BITS;

/// Unix socket rules. An exact rule's key is its path (abstract names keep
/// their leading `@`) and a NUL, a subtree's key is its directory and a `/`
/// (see [`crate::policy::PathRule::prefix`]); the prefix length covers
/// exactly those bytes. Subtree masks are folded into every longer entry
/// under them.
fn compile_unix(
    sets: &[(&Rules, u64)],
    policy_id: u32,
) -> Result<Vec<(u32, UnixKey, mcp_warden_common::PathRule)>, CompileError> {
    // key bytes -> (subtree, own mask)
    let mut entries: BTreeMap<Vec<u8>, (bool, u64)> = BTreeMap::new();
    for (rules, mask) in sets {
        for r in &rules.network.unix {
            let bytes = r.prefix().into_bytes();
            let bad = |reason: &str| CompileError::BadUnixPath {
                path: r.path().to_string(),
                reason: reason.to_string(),
            };
            // An exact path needs room for its terminating NUL in the key.
            let max = if r.is_subtree() {
                UNIX_PATH_MAX
            } else {
                UNIX_PATH_MAX - 1
            };
            if bytes.len() > max {
                return Err(bad(&format!("longer than {max} bytes")));
            }
            if bytes.len() < 2 && !r.is_subtree() {
                return Err(bad("not a socket path"));
            }
            let e = entries.entry(bytes).or_insert((r.is_subtree(), 0));
            if e.0 != r.is_subtree() {
                // Only possible for a hand-made exact path ending in '/'.
                return Err(bad("an exact path cannot end in `/`"));
            }
            e.1 |= *mask;
        }
    }
    let subtrees: Vec<(&Vec<u8>, u64)> = entries
        .iter()
        .filter(|(_, (sub, _))| *sub)
        .map(|(b, (_, m))| (b, *m))
        .collect();
    let mut out = Vec::with_capacity(entries.len());
    for (bytes, (subtree, own)) in &entries {
        let inherited = subtrees
            .iter()
            .filter(|(sb, _)| sb.len() < bytes.len() && bytes.starts_with(sb))
            .fold(0u64, |acc, (_, m)| acc | m);
        let mut key = UnixKey {
            policy_id: policy_id.to_be_bytes(),
            ..UnixKey::default()
        };
        key.path[..bytes.len()].copy_from_slice(bytes);
        let len = bytes.len() as u32;
        // The key is zero-padded: an exact entry's prefix takes in the NUL
        // after its path.
        let key_bytes = if *subtree { len } else { len + 1 };
        out.push((
            UNIX_KEY_FIXED_BITS + 8 * key_bytes,
            key,
            mcp_warden_common::PathRule {
                mask: own | inherited,
                subtree: u32::from(*subtree),
                len,
            },
        ));
    }
    Ok(out)
}

/// File and exec entries of the BPF-LSM backend: `(LPM prefix length,
/// key, value)`.
pub type FileEntry = (u32, FileKey, FileRule);

/// What a file rule item says about its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileGrant {
    Access(usize),
    Deny,
}

/// Compile `[files]` and `[exec]` of every rule set for the BPF-LSM
/// backend (ebpf/src/lsm.rs). `always_exec` are files the server may
/// always run and read (the launched command and its interpreters).
///
/// Keys are built like the unix ones: a subtree `/d/**` is keyed `/d/`
/// (and its directory `/d` as an exact entry, so the directory itself can
/// be listed), an exact path with its NUL. Each entry's value lists, per
/// access kind, the rule paths covering it from the most specific down,
/// with the rule sets granting or denying there.
pub fn compile_files(
    policy: &Policy,
    policy_id: u32,
    always_exec: &[String],
) -> Result<Vec<FileEntry>, CompileError> {
    let sets = rule_sets(policy)?;
    // (key bytes, grant, mask) of every rule item.
    let mut items: Vec<(Vec<u8>, FileGrant, u64)> = Vec::new();
    let mut add =
        |r: &super::model::PathRule, g: FileGrant, mask: u64| -> Result<(), CompileError> {
            let bad = |reason: String| CompileError::BadFilePath {
                path: r.path().to_string(),
                reason,
            };
            let mut key = r.prefix().into_bytes();
            if r.is_subtree() {
                if key.len() > FILE_PATH_MAX {
                    return Err(bad(format!("longer than {} bytes", FILE_PATH_MAX - 1)));
                }
                if r.path() != "/" {
                    let mut dir = r.path().as_bytes().to_vec();
                    dir.push(0);
                    items.push((dir, g, mask));
                }
            } else {
                key.push(0);
                if key.len() > FILE_PATH_MAX {
                    return Err(bad(format!("longer than {} bytes", FILE_PATH_MAX - 1)));
                }
            }
            items.push((key, g, mask));
            Ok(())
        };
    for (rules, mask) in &sets {
        for r in &rules.files.read {
            add(r, FileGrant::Access(access::READ), *mask)?;
        }
        for r in &rules.files.write {
            add(r, FileGrant::Access(access::WRITE), *mask)?;
        }
        for r in &rules.exec.allow {
            add(r, FileGrant::Access(access::EXEC), *mask)?;
        }
        for r in &rules.files.deny {
            add(r, FileGrant::Deny, *mask)?;
        }
    }
    for p in always_exec {
        let r = super::model::PathRule::Exact(p.clone());
        add(&r, FileGrant::Access(access::EXEC), SERVER_BIT)?;
        add(&r, FileGrant::Access(access::READ), SERVER_BIT)?;
    }
    let keys: BTreeSet<&Vec<u8>> = items.iter().map(|(k, _, _)| k).collect();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let mut value = FileRule::default();
        for acc in 0..access::COUNT {
            // depth -> layer
            let mut layers: BTreeMap<usize, FileLayer> = BTreeMap::new();
            for (k, g, mask) in &items {
                if !key.starts_with(k) {
                    continue;
                }
                let l = layers.entry(k.len()).or_default();
                match g {
                    FileGrant::Access(a) if *a == acc => l.grant |= mask,
                    FileGrant::Deny => l.deny |= mask,
                    FileGrant::Access(_) => {}
                }
            }
            let layers: Vec<FileLayer> = layers
                .into_values()
                .rev()
                .filter(|l| l.grant | l.deny != 0)
                .collect();
            if layers.len() > MAX_FILE_LAYERS {
                let end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
                return Err(CompileError::TooDeep {
                    path: String::from_utf8_lossy(&key[..end]).into_owned(),
                    count: layers.len(),
                    max: MAX_FILE_LAYERS,
                });
            }
            value.counts[acc] = layers.len() as u32;
            value.layers[acc][..layers.len()].copy_from_slice(&layers);
        }
        let mut k = FileKey {
            policy_id: policy_id.to_be_bytes(),
            ..FileKey::default()
        };
        k.path[..key.len()].copy_from_slice(key);
        out.push((FILE_KEY_FIXED_BITS + 8 * key.len() as u32, k, value));
    }
    Ok(out)
}

/// The file rule a kernel lookup would pick for `path` (test model of the
/// LPM lookup in ebpf/src/lsm.rs).
#[cfg(test)]
fn file_lookup<'a>(c: &'a [FileEntry], policy_id: u32, path: &str) -> Option<&'a FileRule> {
    let mut key = [0u8; FILE_PATH_MAX];
    let n = path.len().min(FILE_PATH_MAX);
    key[..n].copy_from_slice(&path.as_bytes()[..n]);
    c.iter()
        .filter(|(plen, k, _)| {
            let n = ((plen - FILE_KEY_FIXED_BITS) / 8) as usize;
            k.policy_id == policy_id.to_be_bytes() && k.path[..n] == key[..n]
        })
        .max_by_key(|(plen, _, _)| *plen)
        .map(|(_, _, v)| v)
}

/// The unix rule a kernel lookup would pick for `path`: the longest entry
/// whose prefix bits equal those of the zero-padded key (test model of
/// `bpf_map_lookup_elem` on the LPM trie in ebpf/src/unix.rs).
#[cfg(test)]
fn unix_lookup<'a>(
    c: &'a [(u32, UnixKey, mcp_warden_common::PathRule)],
    policy_id: u32,
    path: &str,
) -> Option<&'a mcp_warden_common::PathRule> {
    let mut key = [0u8; UNIX_PATH_MAX];
    let n = path.len().min(UNIX_PATH_MAX);
    key[..n].copy_from_slice(&path.as_bytes()[..n]);
    // Whole bytes are enough here: every entry's prefix is whole bytes.
    c.iter()
        .filter(|(plen, k, _)| {
            let n = ((plen - UNIX_KEY_FIXED_BITS) / 8) as usize;
            k.policy_id == policy_id.to_be_bytes() && k.path[..n] == key[..n]
        })
        .max_by_key(|(plen, _, _)| *plen)
        .map(|(_, _, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse, PathRule, Vars};
    use mcp_warden_common::SERVER_BIT;

    fn pol(text: &str) -> Policy {
        let vars = Vars {
            home: "/home/ann".into(),
            user: "ann".into(),
            uid: 1000,
        };
        match parse(
            &format!("version = 1\nserver = \"s\"\n{text}"),
            "t.toml",
            &vars,
        ) {
            Ok(p) => p,
            Err(d) => panic!("{d:#?}"),
        }
    }

    fn no_dns() -> HashMap<String, Vec<IpAddr>> {
        HashMap::new()
    }

    fn pr(lo: u16, hi: u16, mask: u64) -> PortRule {
        PortRule {
            lo,
            hi,
            _pad: 0,
            mask,
        }
    }

    /// (prefix_len, "addr", kind, rules) of every v4 entry.
    fn v4(c: &CompiledNet) -> Vec<(u32, String, u32, Vec<PortRule>)> {
        c.v4.iter()
            .map(|(l, k, v)| {
                (
                    *l,
                    std::net::Ipv4Addr::from(k.addr).to_string(),
                    u32::from_be_bytes(k.kind),
                    v.rules[..v.count as usize].to_vec(),
                )
            })
            .collect()
    }

    fn v6(c: &CompiledNet) -> Vec<(u32, String, u32, Vec<PortRule>)> {
        c.v6.iter()
            .map(|(l, k, v)| {
                (
                    *l,
                    std::net::Ipv6Addr::from(k.addr).to_string(),
                    u32::from_be_bytes(k.kind),
                    v.rules[..v.count as usize].to_vec(),
                )
            })
            .collect()
    }

    const C: u32 = rule_kind::CONNECT;
    const B: u32 = rule_kind::BIND;
    const S: u64 = SERVER_BIT;

    #[test]
    fn nested_cidrs_fold() {
        let p = pol(r#"
[network]
connect = ["10.0.0.0/8:443", "10.1.2.3:80", "11.0.0.0/8:53"]
[tools.t.network]
connect = ["10.1.0.0/16:22"]
"#);
        let t = p.tool_bit("t").unwrap();
        assert_eq!(t, 2);
        let c = compile_net(&p, 7, &no_dns()).unwrap();
        assert_eq!(
            v4(&c),
            vec![
                (72, "10.0.0.0".into(), C, vec![pr(443, 443, S)]),
                (
                    80,
                    "10.1.0.0".into(),
                    C,
                    vec![pr(22, 22, t), pr(443, 443, S)]
                ),
                (
                    96,
                    "10.1.2.3".into(),
                    C,
                    vec![pr(22, 22, t), pr(80, 80, S), pr(443, 443, S)]
                ),
                (72, "11.0.0.0".into(), C, vec![pr(53, 53, S)]),
            ]
        );
        for (_, k, _) in &c.v4 {
            assert_eq!(k.policy_id, [0, 0, 0, 7]);
            assert_eq!(k.kind, [0, 0, 0, 1]);
        }
        assert!(c.v6.is_empty() && c.unix.is_empty());
    }

    #[test]
    fn tool_bits_and_merged_ranges() {
        let p = pol(r#"
[network]
connect = ["127.0.0.1:443"]
bind = ["127.0.0.1:*"]
[tools.a.network]
connect = ["127.0.0.1:443", "127.0.0.1:8000-9000"]
[tools.b.network]
connect = ["127.0.0.1:8080", "127.0.0.0/8:*"]
bind = ["127.0.0.1:8080"]
"#);
        let (a, b) = (p.tool_bit("a").unwrap(), p.tool_bit("b").unwrap());
        assert_eq!((a, b), (2, 4));
        let c = compile_net(&p, 1, &no_dns()).unwrap();
        assert_eq!(
            v4(&c),
            vec![
                (72, "127.0.0.0".into(), C, vec![pr(0, 65535, b)]),
                // 443 granted to server and a: one rule, masks OR-ed. 8080
                // for b lies inside b's own `*` from the /8: dropped.
                (
                    96,
                    "127.0.0.1".into(),
                    C,
                    vec![pr(0, 65535, b), pr(443, 443, S | a), pr(8000, 9000, a)]
                ),
                // bind: the server's `*` covers b's 8080 only for the server
                // bit, so both stay.
                (
                    96,
                    "127.0.0.1".into(),
                    B,
                    vec![pr(0, 65535, S), pr(8080, 8080, b)]
                ),
            ]
        );
        let bind_key = c.v4[2].1;
        assert_eq!(bind_key.kind, rule_kind::BIND.to_be_bytes());
        // The kernel's check sees the union for overlapping calls.
        let v = &c.v4[1].2;
        assert!(v.allows(443, S));
        assert!(!v.allows(8500, S));
        assert!(v.allows(8500, S | a));
        assert!(v.allows(1, S | b));
    }

    #[test]
    fn dns_entries() {
        let p = pol(r#"
[network]
connect = ["api.example.com:443", "gone.example.com:443", "10.0.0.0/8:80"]
[tools.t.network]
connect = ["db.internal:5432"]
"#);
        let mut dns = HashMap::new();
        dns.insert(
            "api.example.com".to_string(),
            vec![
                "10.2.3.4".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                "::ffff:192.0.2.7".parse().unwrap(),
            ],
        );
        dns.insert("gone.example.com".to_string(), vec![]);
        dns.insert(
            "db.internal".to_string(),
            vec!["192.0.2.7".parse().unwrap()],
        );
        let c = compile_net(&p, 3, &dns).unwrap();
        assert_eq!(
            v4(&c),
            vec![
                (72, "10.0.0.0".into(), C, vec![pr(80, 80, S)]),
                // inside 10/8: the /8's port 80 is folded in
                (
                    96,
                    "10.2.3.4".into(),
                    C,
                    vec![pr(80, 80, S), pr(443, 443, S)]
                ),
                // the mapped v6 address and the tool's name share an entry
                (
                    96,
                    "192.0.2.7".into(),
                    C,
                    vec![pr(443, 443, S), pr(5432, 5432, 2)]
                ),
            ]
        );
        assert_eq!(
            v6(&c),
            vec![(192, "2001:db8::1".into(), C, vec![pr(443, 443, S)])]
        );
        // Without resolutions names grant nothing.
        let c = compile_net(&p, 3, &no_dns()).unwrap();
        assert_eq!(c.v4.len(), 1);
        assert!(c.v6.is_empty());
    }

    #[test]
    fn mapped_v6_is_stored_as_v4() {
        let p = pol(r#"
[network]
connect = ["[::ffff:10.0.0.0/104]:443", "[::ffff:192.0.2.1]:*", "[::1]:22", "[::/0]:80"]
"#);
        let c = compile_net(&p, 1, &no_dns()).unwrap();
        assert_eq!(
            v4(&c),
            vec![
                (72, "10.0.0.0".into(), C, vec![pr(443, 443, S)]),
                (96, "192.0.2.1".into(), C, vec![pr(0, 65535, S)]),
            ]
        );
        assert_eq!(
            v6(&c),
            vec![
                (64, "::".into(), C, vec![pr(80, 80, S)]),
                (192, "::1".into(), C, vec![pr(22, 22, S), pr(80, 80, S)]),
            ]
        );
    }

    /// A policy with `connect` rules `(net, port)` for the server. Built by
    /// hand: `parse` itself refuses policies that overflow an entry.
    fn with_ports(rules: &[(&str, u16)]) -> Policy {
        let mut p = pol("");
        for (net, port) in rules {
            p.rules.network.connect.push(AddrRule {
                host: Host::Net(net.parse().unwrap()),
                ports: PortRange {
                    lo: *port,
                    hi: *port,
                },
            });
        }
        p
    }

    #[test]
    fn too_many_ports() {
        let rules: Vec<(&str, u16)> = (1..=17).map(|p| ("127.0.0.2/32", p)).collect();
        let e = compile_net(&with_ports(&rules), 1, &no_dns()).unwrap_err();
        assert_eq!(
            e,
            CompileError::TooManyPortRules {
                kind: "connect",
                addr: "127.0.0.2/32".into(),
                count: 17,
                max: MAX_PORT_RULES
            }
        );
        assert!(e.to_string().contains("127.0.0.2/32"), "{e}");
        // 16 fit.
        let c = compile_net(&with_ports(&rules[..16]), 1, &no_dns()).unwrap();
        assert_eq!(c.v4[0].2.count, 16);
        // Folding can overflow an entry whose own rules fit.
        let mut rules: Vec<(&str, u16)> = (1..=10).map(|p| ("10.0.0.0/8", p)).collect();
        rules.extend((11..=17).map(|p| ("10.9.9.9/32", p)));
        match compile_net(&with_ports(&rules), 1, &no_dns()) {
            Err(CompileError::TooManyPortRules { addr, count, .. }) => {
                assert_eq!((addr.as_str(), count), ("10.9.9.9/32", 17));
            }
            other => panic!("{other:?}"),
        }
        // DNS resolutions can overflow too: each address gets the name's
        // ports on top of the networks containing it.
        let mut p = with_ports(&rules[..10]);
        for port in 11..=17 {
            p.rules.network.connect.push(AddrRule {
                host: Host::Name("many.example".into()),
                ports: PortRange { lo: port, hi: port },
            });
        }
        let mut dns = HashMap::new();
        dns.insert(
            "many.example".to_string(),
            vec!["10.1.1.1".parse().unwrap()],
        );
        assert!(compile_net(&p, 1, &no_dns()).is_ok());
        assert!(matches!(
            compile_net(&p, 1, &dns),
            Err(CompileError::TooManyPortRules { .. })
        ));
    }

    #[test]
    fn policy_ids_separate() {
        let p = pol("[network]\nconnect = [\"[::1]:1\", \"127.0.0.1:1\"]\nunix = [\"@x\"]\n");
        let a = compile_net(&p, 1, &no_dns()).unwrap();
        let b = compile_net(&p, 0x0102_0304, &no_dns()).unwrap();
        assert_eq!(a.v4[0].1.policy_id, [0, 0, 0, 1]);
        assert_eq!(b.v4[0].1.policy_id, [1, 2, 3, 4]);
        assert_eq!(b.v6[0].1.policy_id, [1, 2, 3, 4]);
        assert_eq!(b.unix[0].1.policy_id, [1, 2, 3, 4]);
        assert_ne!(a.v4[0].1, b.v4[0].1);
        assert_eq!(a.v4[0].1.addr, b.v4[0].1.addr);
        assert_eq!(a.v4[0].2, b.v4[0].2);
        assert_eq!(a.v6[0].0, b.v6[0].0);
    }

    #[test]
    fn unix_entries_fold() {
        let p = pol(r#"
[network]
unix = ["/run/**", "@dbus", "/run/pg/.s.PGSQL.5432"]
[tools.t.network]
unix = ["/run/pg/**", "/tmp/x.sock", "@dbus"]
"#);
        let c = compile_net(&p, 9, &no_dns()).unwrap();
        // (prefix length, key bytes the prefix covers, value)
        let got: Vec<(u32, Vec<u8>, mcp_warden_common::PathRule)> = c
            .unix
            .iter()
            .map(|(l, k, v)| {
                let n = ((l - 32) / 8) as usize;
                (*l, k.path[..n].to_vec(), *v)
            })
            .collect();
        let r = |mask, subtree, len| mcp_warden_common::PathRule { mask, subtree, len };
        assert_eq!(
            got,
            vec![
                (32 + 8 * 5, b"/run/".to_vec(), r(S, 1, 5)),
                (32 + 8 * 8, b"/run/pg/".to_vec(), r(S | 2, 1, 8)),
                // exact entries: the path and its NUL
                (
                    32 + 8 * 22,
                    b"/run/pg/.s.PGSQL.5432\0".to_vec(),
                    r(S | 2, 0, 21)
                ),
                (32 + 8 * 12, b"/tmp/x.sock\0".to_vec(), r(2, 0, 11)),
                (32 + 8 * 6, b"@dbus\0".to_vec(), r(S | 2, 0, 5)),
            ]
        );
        for (_, k, _) in &c.unix {
            assert_eq!(k.policy_id, [0, 0, 0, 9]);
            // zero padding after the path
            assert!(k.path[21..].iter().all(|b| *b == 0));
        }
        let m = |path| unix_lookup(&c.unix, 9, path).map(|v| v.mask);
        assert_eq!(m("/run/a.sock"), Some(S));
        assert_eq!(m("/run/pg/other"), Some(S | 2));
        assert_eq!(m("/run/pg/.s.PGSQL.5432"), Some(S | 2));
        assert_eq!(m("/run/pgx"), Some(S));
        assert_eq!(m("/tmp/x.sock"), Some(2));
        assert_eq!(m("/tmp/x.sock2"), None);
        assert_eq!(m("/tmp/x.soc"), None);
        assert_eq!(m("@dbus"), Some(S | 2));
        assert_eq!(m("@dbus2"), None);
        assert_eq!(m("/var/run/x"), None);
        assert_eq!(unix_lookup(&c.unix, 8, "/run/a"), None);
        // No shadowing: `/tmp/x.sock` is exact for the tool only; with a
        // server subtree over it, a longer name under it finds the subtree.
        let p =
            pol("[network]\nunix = [\"/tmp/**\"]\n[tools.t.network]\nunix = [\"/tmp/x.sock\"]\n");
        let c = compile_net(&p, 9, &no_dns()).unwrap();
        assert_eq!(
            unix_lookup(&c.unix, 9, "/tmp/x.sock2").map(|v| v.mask),
            Some(S)
        );
        assert_eq!(
            unix_lookup(&c.unix, 9, "/tmp/x.soc").map(|v| v.mask),
            Some(S)
        );
        assert_eq!(
            unix_lookup(&c.unix, 9, "/tmp/x.sock").map(|v| v.mask),
            Some(S | 2)
        );
        // A subtree and an exact entry of the same directory name.
        let p = pol("[network]\nunix = [\"/srv/a\"]\n[tools.t.network]\nunix = [\"/srv/a/**\"]\n");
        let c = compile_net(&p, 9, &no_dns()).unwrap();
        assert_eq!(unix_lookup(&c.unix, 9, "/srv/a").map(|v| v.mask), Some(S));
        assert_eq!(unix_lookup(&c.unix, 9, "/srv/a/s").map(|v| v.mask), Some(2));
        assert_eq!(unix_lookup(&c.unix, 9, "/srv/ab"), None);
    }

    #[test]
    fn unix_path_lengths() {
        // 107 bytes is the longest exact path (its NUL takes the 108th byte
        // of the key); a subtree may use all 108.
        let mut p = pol("");
        let exact = format!("/{}", "a".repeat(106));
        p.rules.network.unix.push(PathRule::Exact(exact.clone()));
        let c = compile_net(&p, 1, &no_dns()).unwrap();
        assert_eq!(c.unix[0].0, 32 + 8 * 108);
        assert_eq!(unix_lookup(&c.unix, 1, &exact).map(|v| v.mask), Some(S));
        // A 108-byte path under it is a different name.
        assert_eq!(unix_lookup(&c.unix, 1, &format!("{exact}b")), None);
        let mut p = pol("");
        p.rules
            .network
            .unix
            .push(PathRule::Exact(format!("/{}", "a".repeat(107))));
        assert!(matches!(
            compile_net(&p, 1, &no_dns()),
            Err(CompileError::BadUnixPath { .. })
        ));
        let mut p = pol("");
        p.rules
            .network
            .unix
            .push(PathRule::Subtree(format!("/{}", "a".repeat(106))));
        let c = compile_net(&p, 1, &no_dns()).unwrap();
        assert_eq!(c.unix[0].0, 32 + 8 * 108);
        // Paths longer than the key are judged on their first 108 bytes,
        // which here lie under the subtree.
        let long = format!("/{}/{}", "a".repeat(106), "b".repeat(20));
        assert_eq!(unix_lookup(&c.unix, 1, &long).map(|v| v.mask), Some(S));
    }

    #[test]
    fn root_unix_subtree_and_bad_paths() {
        let p = pol("[network]\nunix = [\"/**\"]\n");
        let c = compile_net(&p, 1, &no_dns()).unwrap();
        assert_eq!(c.unix.len(), 1);
        assert_eq!(c.unix[0].0, 40);
        assert_eq!(&c.unix[0].1.path[..2], b"/\0");
        let mut p = pol("");
        p.rules
            .network
            .unix
            .push(PathRule::Exact(format!("/{}", "a".repeat(108))));
        assert!(matches!(
            compile_net(&p, 1, &no_dns()),
            Err(CompileError::BadUnixPath { .. })
        ));
    }

    #[test]
    fn rule_sets_and_dns_names() {
        let p = pol(r#"
[network]
connect = ["b.example:1", "10.0.0.1:1"]
[tools.x.network]
bind = ["a.example:1", "b.example:2"]
[tools.y.files]
read = ["/y"]
"#);
        let sets: Vec<(Option<&str>, u64)> = p.rule_sets().map(|(n, _, m)| (n, m)).collect();
        assert_eq!(sets, [(None, SERVER_BIT), (Some("x"), 2), (Some("y"), 4)]);
        assert_eq!(p.dns_names(), ["a.example", "b.example"]);
    }

    #[test]
    fn too_many_tools() {
        let mut p = pol("");
        for i in 0..64 {
            p.tools.push(crate::policy::ToolRules {
                name: format!("t{i}"),
                rules: Rules::default(),
            });
        }
        assert_eq!(
            compile_net(&p, 1, &no_dns()),
            Err(CompileError::TooManyTools { count: 64, max: 63 })
        );
        assert_eq!(p.tool_bit("t62"), Some(1 << 63));
        assert_eq!(p.tool_bit("t63"), None);
    }

    #[test]
    fn file_rules_most_specific_wins() {
        let p = pol(r#"
[files]
read = ["/srv/**", "/etc/hosts"]
write = ["/srv/out/**"]
deny = ["/srv/secrets/**", "/srv/out/.env"]
[exec]
allow = ["/usr/bin/git"]
[tools.t.files]
read = ["/srv/secrets/public/**"]
write = ["/tmp/**"]
deny = ["/srv/docs/**"]
"#);
        let c = compile_files(&p, 4, &["/usr/bin/server".to_string()]).unwrap();
        let t = p.tool_bit("t").unwrap();
        let can = |path: &str, acc: usize, mask: u64| {
            file_lookup(&c, 4, path).is_some_and(|r| r.allows(acc, mask))
        };
        use access::{EXEC, READ, WRITE};
        assert!(can("/srv/a/b", READ, S));
        assert!(can("/srv", READ, S), "the tree's directory itself");
        assert!(!can("/srvx", READ, S));
        assert!(!can("/srv/a/b", WRITE, S));
        assert!(can("/srv/out/x", WRITE, S));
        // write does not take read away: read comes from /srv/**.
        assert!(can("/srv/out/x", READ, S));
        assert!(!can("/srv/out/.env", READ, S));
        assert!(!can("/srv/out/.env", WRITE, S));
        assert!(can("/srv/out/.envx", WRITE, S));
        assert!(!can("/srv/secrets/k", READ, S));
        assert!(!can("/srv/secrets", READ, S));
        assert!(can("/etc/hosts", READ, S));
        assert!(!can("/etc/hostsx", READ, S));
        assert!(!can("/etc/passwd", READ, S));
        // exec
        assert!(can("/usr/bin/git", EXEC, S));
        assert!(!can("/usr/bin/git", READ, S));
        assert!(can("/usr/bin/server", EXEC, S) && can("/usr/bin/server", READ, S));
        assert!(!can("/usr/bin/ls", EXEC, S));
        // The tool: an allow inside the server's denied tree, while a call
        // of t is in flight only.
        assert!(!can("/srv/secrets/public/x", READ, S));
        assert!(can("/srv/secrets/public/x", READ, S | t));
        assert!(!can("/srv/secrets/k", READ, S | t));
        assert!(can("/tmp/a", WRITE, S | t) && !can("/tmp/a", WRITE, S));
        // The tool's deny applies while it runs.
        assert!(can("/srv/docs/a", READ, S));
        assert!(!can("/srv/docs/a", READ, S | t));
        // Over-long paths: judged on their first bytes, inside /srv/**.
        let long = format!("/srv/{}", "a".repeat(400));
        assert!(can(&long, READ, S));
        let long = format!("/etc/{}", "a".repeat(400));
        assert!(!can(&long, READ, S));
    }

    #[test]
    fn file_rules_equal_path_deny_wins_and_limits() {
        let p = pol("[files]\nread = [\"/a/**\"]\ndeny = [\"/a/**\"]\n");
        let c = compile_files(&p, 1, &[]).unwrap();
        let r = file_lookup(&c, 1, "/a/b").unwrap();
        assert!(!r.allows(access::READ, S));
        let mut p = pol("");
        p.rules
            .files
            .read
            .push(PathRule::Exact(format!("/{}", "a".repeat(251))));
        assert!(matches!(
            compile_files(&p, 1, &[]),
            Err(CompileError::BadFilePath { .. })
        ));
        let mut p = pol("");
        for i in 1..=9 {
            p.rules.files.read.push(PathRule::Subtree(format!(
                "/{}",
                "d/".repeat(i).trim_end_matches('/')
            )));
        }
        assert!(matches!(
            compile_files(&p, 1, &[]),
            Err(CompileError::TooDeep { .. })
        ));
    }
}
