//! Turn the path a process passed to a file or exec syscall into the path
//! the kernel resolved, at event time, for audit mode and learn mode.
//!
//! Approximate by nature (docs/policy.md, "Audit mode"): the event is read
//! after the syscall returned, so a relative path is resolved against the
//! process's *current* working directory (/proc/PID/cwd) or the dirfd as it
//! is *now* (/proc/PID/fd/N); a process that changed directory, closed the
//! dirfd or exited in between leaves the path unresolved, and a symlink
//! changed in between resolves to its new target.
use std::path::{Component, Path, PathBuf};

/// AT_FDCWD as the event carries it.
const AT_FDCWD: i32 = -100;

/// Resolve `path` (as passed by process `pid`, relative to `dirfd`) to an
/// absolute, symlink-free path. `follow`: the call follows a symlink in the
/// last component (open, exec); unlink, mkdir, rename and the like do not.
/// None when a relative path's base cannot be read.
pub fn resolve(pid: u32, dirfd: i32, path: &str, follow: bool) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let p = Path::new(path);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        let base = if dirfd == AT_FDCWD {
            format!("/proc/{pid}/cwd")
        } else {
            format!("/proc/{pid}/fd/{dirfd}")
        };
        std::fs::read_link(base).ok()?.join(p)
    };
    let abs = lexical(&abs);
    let real = if follow {
        std::fs::canonicalize(&abs).ok()
    } else {
        None
    };
    let real = real.or_else(|| {
        // The last component as named (deleted file, not followed), its
        // parent resolved.
        let parent = abs.parent()?;
        let name = abs.file_name()?;
        Some(std::fs::canonicalize(parent).ok()?.join(name))
    });
    Some(real.unwrap_or(abs).to_string_lossy().into_owned())
}

/// Remove `.` and `..` without touching the filesystem (the fallback when
/// nothing can be canonicalized).
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_to_cwd_and_dirfd() {
        let me = std::process::id();
        let cwd = std::env::current_dir().unwrap();
        let cwd = std::fs::canonicalize(cwd).unwrap();
        let got = resolve(me, AT_FDCWD, "Cargo.toml", true).unwrap();
        assert_eq!(got, cwd.join("Cargo.toml").to_string_lossy());
        let dir = std::fs::File::open("/usr").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
        let got = resolve(me, fd, "./bin/../lib/nonexistent-x", true).unwrap();
        assert_eq!(
            got,
            format!(
                "{}/nonexistent-x",
                std::fs::canonicalize("/usr/lib").unwrap().display()
            )
        );
        assert_eq!(resolve(me, AT_FDCWD, "/a/./b/../c", false).unwrap(), "/a/c");
        assert_eq!(resolve(me, AT_FDCWD, "", true), None);
    }
}
