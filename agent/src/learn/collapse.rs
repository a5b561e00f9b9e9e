//! Path collapsing: many observed files become a few reviewable rules.
//!
//! In order, for each observed path:
//! 1. Under a known tree (runtime and library trees such as /usr/lib, the
//!    interpreter's own prefix, a `node_modules`, `site-packages` or `.venv`
//!    directory: the server's own package) -> that tree's `/dir/**`.
//! 2. `/proc/<pid>/...` is left out, with a note: the server's own /proc
//!    entries cannot be named ahead of time, and `/proc/**` would expose
//!    every other process's (docs/backends-fallback.md).
//! 3. A write that creates, removes or renames an entry, or a read of a
//!    directory (a listing) -> the directory's `/dir/**`, since that is
//!    where the kernel checks the right.
//! 4. Otherwise the exact path.
//!
//! Then, repeatedly, deepest first, a directory with 3 or more distinct
//! entries in it that hold observed paths becomes `/dir/**`. Never widened to: `/`, a top-level
//! directory, a home directory or anything above one, `${HOME}/.config`,
//! `${HOME}/.local`, `${HOME}/.cache`, `${HOME}/.ssh`, `/tmp`, `/var/tmp`,
//! `/dev/shm`, `/etc`, `/usr/local`, `/usr/share`, `/var/lib`, `/var/cache`,
//! `/run/user/<uid>`. What would need one of those is kept exact or left out
//! with a comment.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::record::Seen;

/// Trees that are always collapsed to: runtime, library and system data
/// trees a server reads but never owns.
const KNOWN_TREES: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
    "/usr/libexec",
    "/usr/local/lib",
    "/usr/share/zoneinfo",
    "/usr/share/locale",
    "/usr/share/i18n",
    "/usr/share/ca-certificates",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/sys/devices/system/cpu",
    "/sys/devices/system/node",
    "/sys/fs/cgroup",
];

/// Component names whose directory is a package tree of its own.
const PACKAGE_DIRS: &[&str] = &["node_modules", "site-packages", "dist-packages", ".venv"];

/// One rule made from observations, with its merged counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collapsed {
    /// The rule as written in the policy, before `${HOME}` substitution:
    /// `/abs/path` or `/abs/dir/**`.
    pub rule: String,
    pub seen: Seen,
    /// How many distinct observed paths it stands for.
    pub paths: usize,
    /// Why it is a tree (for the comment), when it is one.
    pub why: Option<&'static str>,
}

/// What bounds collapsing.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub home: String,
    /// Extra trees: the interpreter prefix of the launched command.
    pub trees: Vec<String>,
}

impl Context {
    /// May `dir` become `dir/**`?
    pub fn may_widen_to(&self, dir: &str) -> bool {
        let depth = dir.split('/').filter(|c| !c.is_empty()).count();
        if depth < 2 {
            return false;
        }
        let home = self.home.trim_end_matches('/');
        if !home.is_empty() && home != "/" {
            // The home directory or anything above it.
            if home == dir || home.starts_with(&format!("{dir}/")) {
                return false;
            }
            for sub in [
                ".config",
                ".local",
                ".local/share",
                ".cache",
                ".ssh",
                ".gnupg",
            ] {
                if dir == format!("{home}/{sub}") {
                    return false;
                }
            }
        }
        // Any other home directory root.
        let comps: Vec<&str> = dir.split('/').filter(|c| !c.is_empty()).collect();
        if comps.len() == 2 && comps[0] == "home" {
            return false;
        }
        if comps.len() == 3 && comps[0] == "run" && comps[1] == "user" {
            return false;
        }
        const BROAD: &[&str] = &[
            "/usr/local",
            "/usr/share",
            "/usr/bin",
            "/usr/sbin",
            "/var/lib",
            "/var/cache",
            "/var/log",
            "/var/tmp",
            "/dev/shm",
            "/run/user",
            "/proc/self",
            "/proc/sys",
        ];
        !BROAD.contains(&dir)
    }

    /// The tree `path` belongs to, and why, if any.
    fn tree_of(&self, path: &str) -> Option<(String, &'static str)> {
        let under = |t: &str| path.starts_with(&format!("{t}/"));
        let mut best: Option<(String, &'static str)> = None;
        for t in KNOWN_TREES {
            if under(t) && best.as_ref().is_none_or(|(b, _)| t.len() > b.len()) {
                best = Some((t.to_string(), "runtime/library tree"));
            }
        }
        for t in &self.trees {
            if under(t) && best.as_ref().is_none_or(|(b, _)| t.len() > b.len()) {
                best = Some((t.clone(), "interpreter prefix"));
            }
        }
        // The first package directory on the path (its outermost
        // node_modules, site-packages or venv).
        let mut acc = String::new();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            acc.push('/');
            acc.push_str(c);
            if PACKAGE_DIRS.contains(&c) && acc.len() < path.len() {
                if self.may_widen_to(&acc)
                    && best
                        .as_ref()
                        .is_none_or(|(b, _)| acc.len() < b.len() || !under(b))
                {
                    best = Some((acc.clone(), "package tree"));
                }
                break;
            }
        }
        best
    }
}

fn parent(p: &str) -> Option<&str> {
    let i = p.rfind('/')?;
    Some(if i == 0 { "/" } else { &p[..i] })
}

fn merge_seen(into: &mut Seen, s: &Seen) {
    into.count += s.count;
    into.at_start |= s.at_start;
    into.later |= s.later;
    into.dir_write |= s.dir_write;
}

/// `/proc/<digits>/...`, `/proc/self/...` or `/proc/thread-self/...`, as
/// `/proc/self/...` (thread ids folded to `TID`).
fn per_process_proc(p: &str) -> Option<String> {
    let rest = p.strip_prefix("/proc/")?;
    let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let pid = !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit());
    if !(pid || first == "self" || first == "thread-self") {
        return None;
    }
    let tail = match tail.split_once('/') {
        Some(("task", t)) => {
            let (_, after) = t.split_once('/').unwrap_or((t, ""));
            format!("task/TID/{after}")
        }
        _ => tail.to_string(),
    };
    Some(format!("/proc/self/{tail}"))
}

/// Collapse the observed paths of one section. `dir_rights`: the section
/// grants rights checked on directories (read: listing; write: creating).
/// Returns the rules and the paths left out (with the reason).
pub fn collapse(
    cx: &Context,
    observed: &BTreeMap<String, Seen>,
) -> (Vec<Collapsed>, Vec<(String, &'static str)>) {
    // rule path -> (is subtree, seen, distinct paths, why)
    let mut rules: BTreeMap<String, (bool, Seen, usize, Option<&'static str>)> = BTreeMap::new();
    let mut left_out = Vec::new();
    let mut add = |path: String, sub: bool, s: &Seen, why: Option<&'static str>| {
        let e = rules.entry(path).or_insert((sub, Seen::default(), 0, why));
        e.0 |= sub;
        if e.3.is_none() {
            e.3 = why;
        }
        merge_seen(&mut e.1, s);
        e.2 += 1;
    };
    for (path, s) in observed {
        if let Some((tree, why)) = cx.tree_of(path) {
            add(tree, true, s, Some(why));
            continue;
        }
        if let Some(own) = per_process_proc(path) {
            left_out.push((
                own,
                "the server's own /proc/PID cannot be named ahead of time, and /proc/** \
                 would expose other processes' environment: add \"/proc/**\" only if \
                 the server fails without these",
            ));
            continue;
        }
        let is_dir = Path::new(path).is_dir();
        let dir_target = if s.dir_write {
            parent(path).map(str::to_string)
        } else if is_dir {
            Some(path.clone())
        } else {
            None
        };
        match dir_target {
            Some(d) if cx.may_widen_to(&d) => {
                let why = if s.dir_write {
                    "entries created or removed in it"
                } else {
                    "directory listed"
                };
                add(d, true, s, Some(why));
            }
            Some(_) if is_dir && !s.dir_write => {
                left_out.push((
                    path.clone(),
                    "listing it needs a rule on the whole directory, too wide to grant",
                ));
            }
            _ => add(path.clone(), false, s, None),
        }
    }
    // Directories with 3 or more distinct entries directly in them.
    loop {
        // directory -> its entries that hold (or are) an observed path
        let mut by_parent: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in rules.keys() {
            let mut child = p.as_str();
            while let Some(d) = parent(child) {
                if d == child {
                    break;
                }
                by_parent
                    .entry(d.to_string())
                    .or_default()
                    .insert(child.to_string());
                child = d;
            }
        }
        let Some((dir, _)) = by_parent
            .iter()
            .filter(|(d, kids)| kids.len() >= 3 && cx.may_widen_to(d))
            .max_by_key(|(d, _)| d.len())
        else {
            break;
        };
        let dir = dir.clone();
        let prefix = format!("{dir}/");
        let inside: Vec<String> = rules
            .keys()
            .filter(|p| p.starts_with(&prefix) || **p == dir)
            .cloned()
            .collect();
        let mut seen = Seen::default();
        let mut n = 0;
        for p in inside {
            if let Some((_, s, k, _)) = rules.remove(&p) {
                merge_seen(&mut seen, &s);
                n += k;
            }
        }
        rules.insert(dir, (true, seen, n, Some("3 or more entries seen in it")));
    }
    // Drop what a subtree already covers.
    let subtrees: Vec<String> = rules
        .iter()
        .filter(|(_, v)| v.0)
        .map(|(k, _)| k.clone())
        .collect();
    let covered: Vec<(String, String)> = rules
        .keys()
        .filter_map(|p| {
            subtrees
                .iter()
                .filter(|t| *t != p && (p.starts_with(&format!("{t}/")) || t.as_str() == "/"))
                .max_by_key(|t| t.len())
                .map(|t| (p.clone(), t.clone()))
        })
        .collect();
    for (p, t) in covered {
        if let Some((_, s, k, _)) = rules.remove(&p) {
            if let Some(e) = rules.get_mut(&t) {
                merge_seen(&mut e.1, &s);
                e.2 += k;
            }
        }
    }
    let out = rules
        .into_iter()
        .map(|(p, (sub, seen, paths, why))| Collapsed {
            rule: if sub {
                if p == "/" {
                    "/**".to_string()
                } else {
                    format!("{p}/**")
                }
            } else {
                p
            },
            seen,
            paths,
            why: if sub { why } else { None },
        })
        .collect();
    (out, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(n: u64) -> Seen {
        Seen {
            count: n,
            at_start: true,
            ..Default::default()
        }
    }

    fn run(cx: &Context, paths: &[(&str, bool)]) -> Vec<String> {
        let m: BTreeMap<String, Seen> = paths
            .iter()
            .map(|(p, dw)| {
                let mut s = seen(1);
                s.dir_write = *dw;
                (p.to_string(), s)
            })
            .collect();
        collapse(cx, &m).0.into_iter().map(|c| c.rule).collect()
    }

    #[test]
    fn collapses_sensibly() {
        let cx = Context {
            home: "/home/ann".into(),
            trees: vec!["/opt/node20".into()],
        };
        let got = run(
            &cx,
            &[
                ("/usr/lib/x86_64-linux-gnu/libc.so.6", false),
                ("/usr/lib/x86_64-linux-gnu/libm.so.6", false),
                ("/opt/node20/include/x.h", false),
                ("/srv/app/node_modules/a/index.js", false),
                ("/srv/app/node_modules/b/c/index.js", false),
                ("/etc/hosts", false),
                ("/etc/passwd", false),
                ("/etc/resolv.conf", false),
                ("/etc/nsswitch.conf", false),
                ("/home/ann/a", false),
                ("/home/ann/b", false),
                ("/home/ann/c", false),
                ("/home/ann/proj/out/new.txt", true),
                ("/tmp/x", true),
                ("/proc/1234/maps", false),
                ("/proc/meminfo", false),
                ("/data/p/1", false),
                ("/data/p/2", false),
                ("/data/p/3/x", false),
            ],
        );
        assert_eq!(
            got,
            vec![
                "/data/p/**",
                "/etc/hosts",
                "/etc/nsswitch.conf",
                "/etc/passwd",
                "/etc/resolv.conf",
                "/home/ann/a",
                "/home/ann/b",
                "/home/ann/c",
                "/home/ann/proj/out/**",
                "/opt/node20/**",
                "/proc/meminfo",
                "/srv/app/node_modules/**",
                "/tmp/x",
                "/usr/lib/**",
            ]
        );
    }

    #[test]
    fn never_too_wide() {
        let cx = Context {
            home: "/home/ann".into(),
            trees: vec![],
        };
        for d in [
            "/",
            "/home",
            "/home/ann",
            "/home/bob",
            "/tmp",
            "/etc",
            "/usr",
            "/home/ann/.config",
        ] {
            assert!(!cx.may_widen_to(d), "{d}");
        }
        for d in ["/home/ann/proj", "/srv/data", "/tmp/mw-x"] {
            assert!(cx.may_widen_to(d), "{d}");
        }
    }
}
