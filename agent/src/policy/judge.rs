//! Judge one file or exec operation against the rules in force, in
//! userspace. Used where the kernel only observes: `mode = "audit"` on the
//! fallback backend (no Landlock ruleset is applied, the syscall tracepoints
//! report every operation and this decides which would have been refused),
//! and `mcp-warden learn --diff`.
//!
//! It follows what the fallback backend enforces (docs/backends-fallback.md):
//! the most specific matching rule decides, `deny` wins a tie; reading is
//! granted by `files.read`, by `files.write` and by `exec.allow` (Landlock's
//! write and execute rules carry read_file); writing (open for write,
//! create, truncate, unlink, mkdir, rename, link, symlink) by `files.write`;
//! executing by `exec.allow` or by being the launched command or one of its
//! interpreters.
use super::model::{PathRule, Rules};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Exec,
}

/// How specifically `rule` matches `path`: the rule's path length, plus
/// one for an exact rule (so `/a` exact beats `/a/**` on `/a`). None when
/// it does not match. A subtree matches its own directory too.
fn specificity(rule: &PathRule, path: &str) -> Option<usize> {
    match rule {
        PathRule::Exact(p) => (p == path).then(|| p.len() + 1),
        PathRule::Subtree(p) if p == "/" => Some(1),
        PathRule::Subtree(p) => {
            let under = path
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
            under.then_some(p.len())
        }
    }
}

fn best<'a>(rules: impl Iterator<Item = &'a PathRule>, path: &str) -> Option<usize> {
    rules.filter_map(|r| specificity(r, path)).max()
}

/// Would the union of `sets` allow `access` to the absolute, resolved
/// `path`? `implicit_exec`: paths always executable (the launched command
/// and its interpreters).
pub fn allowed(sets: &[&Rules], path: &str, access: Access, implicit_exec: &[String]) -> bool {
    if access == Access::Exec && implicit_exec.iter().any(|p| p == path) {
        return true;
    }
    // The launched command and its interpreters are readable too (Landlock
    // grants them execute + read_file).
    if access == Access::Read && implicit_exec.iter().any(|p| p == path) {
        return true;
    }
    let grant = best(
        sets.iter()
            .flat_map(|r| -> Box<dyn Iterator<Item = &PathRule>> {
                match access {
                    Access::Read => Box::new(
                        r.files
                            .read
                            .iter()
                            .chain(r.files.write.iter())
                            .chain(r.exec.allow.iter()),
                    ),
                    Access::Write => Box::new(r.files.write.iter()),
                    Access::Exec => Box::new(r.exec.allow.iter()),
                }
            }),
        path,
    );
    let deny = best(sets.iter().flat_map(|r| r.files.deny.iter()), path);
    match (grant, deny) {
        (Some(g), Some(d)) => g > d,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Device nodes and kernel interfaces (`/dev/...` other than `/dev/shm/...`,
/// `/proc/...`): writing them changes no file, so a tool that declared
/// `readOnlyHint: true` may (as the BPF-LSM hooks judge it).
pub fn pseudo_fs(path: &str) -> bool {
    path.starts_with("/proc/") || (path.starts_with("/dev/") && !path.starts_with("/dev/shm/"))
}

/// `r` with every path rule also under its real path (symlinks resolved),
/// as Landlock and the LSM hooks see it: a rule on `/lib/**` must match
/// `/usr/lib/...` on a merged-/usr system, since judged paths are resolved.
/// Paths that do not exist are kept as written.
pub fn with_real_paths(r: &Rules) -> Rules {
    fn real(list: &[PathRule]) -> Vec<PathRule> {
        let mut out = list.to_vec();
        for rule in list {
            let Ok(c) = std::fs::canonicalize(rule.path()) else {
                continue;
            };
            let c = c.to_string_lossy().into_owned();
            if c != rule.path() {
                out.push(match rule {
                    PathRule::Exact(_) => PathRule::Exact(c),
                    PathRule::Subtree(_) => PathRule::Subtree(c),
                });
            }
        }
        out
    }
    let mut r = r.clone();
    r.files.read = real(&r.files.read);
    r.files.write = real(&r.files.write);
    r.files.deny = real(&r.files.deny);
    r.exec.allow = real(&r.exec.allow);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{ExecRules, FileRules};

    fn sub(p: &str) -> PathRule {
        PathRule::Subtree(p.into())
    }
    fn exact(p: &str) -> PathRule {
        PathRule::Exact(p.into())
    }

    #[test]
    fn most_specific_wins() {
        let r = Rules {
            files: FileRules {
                read: vec![sub("/srv"), exact("/srv/secrets/ok")],
                write: vec![sub("/srv/out")],
                deny: vec![sub("/srv/secrets"), exact("/srv/out/x")],
            },
            exec: ExecRules {
                allow: vec![exact("/usr/bin/git")],
            },
            ..Default::default()
        };
        let s = [&r];
        assert!(allowed(&s, "/srv", Access::Read, &[]));
        assert!(allowed(&s, "/srv/a/b", Access::Read, &[]));
        assert!(!allowed(&s, "/srvx", Access::Read, &[]));
        assert!(!allowed(&s, "/srv/secrets/key", Access::Read, &[]));
        assert!(allowed(&s, "/srv/secrets/ok", Access::Read, &[]));
        assert!(!allowed(&s, "/srv/a", Access::Write, &[]));
        assert!(allowed(&s, "/srv/out/y", Access::Write, &[]));
        assert!(allowed(&s, "/srv/out/y", Access::Read, &[]));
        assert!(!allowed(&s, "/srv/out/x", Access::Write, &[]));
        assert!(allowed(&s, "/usr/bin/git", Access::Exec, &[]));
        assert!(allowed(&s, "/usr/bin/git", Access::Read, &[]));
        assert!(!allowed(&s, "/usr/bin/sh", Access::Exec, &[]));
        assert!(allowed(
            &s,
            "/usr/bin/sh",
            Access::Exec,
            &["/usr/bin/sh".into()]
        ));
        // Deny wins a tie.
        let t = Rules {
            files: FileRules {
                read: vec![exact("/e")],
                deny: vec![exact("/e")],
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!allowed(&[&t], "/e", Access::Read, &[]));
        // Root subtree.
        let root = Rules {
            files: FileRules {
                read: vec![sub("/")],
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(allowed(&[&root], "/etc/passwd", Access::Read, &[]));
        // Tool rules add to the server's.
        assert!(allowed(&[&t, &root], "/x", Access::Read, &[]));
    }

    #[test]
    fn rules_match_real_paths() {
        let dir = std::env::temp_dir().join(format!("mw-judge-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(dir.join("real"), &link).unwrap();
        let r = Rules {
            files: FileRules {
                read: vec![sub(link.to_str().unwrap())],
                ..Default::default()
            },
            ..Default::default()
        };
        let real = dir.join("real/f");
        let real = real.to_str().unwrap();
        assert!(!allowed(&[&r], real, Access::Read, &[]));
        assert!(allowed(&[&with_real_paths(&r)], real, Access::Read, &[]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
