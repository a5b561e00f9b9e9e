//! One cgroup v2 per server instance. The server is moved into it between
//! fork and exec, so nothing of it ever runs outside; children inherit it,
//! and `cgroup.kill` ends the whole tree.
use std::{
    fs::{self, File},
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (read /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(io::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {0} still has processes after cgroup.kill")]
    NotEmpty(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup2 mount point, read from mountinfo (it is /sys/fs/cgroup on
/// most hosts and /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
    parse_mountinfo(&info).ok_or(CgroupError::NoCgroup2)
}

fn parse_mountinfo(info: &str) -> Option<PathBuf> {
    for line in info.lines() {
        // fields ... mount_point(4) ... " - " fstype source options
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        return Some(PathBuf::from(unescape_octal(mount_point)));
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parent directory of every instance cgroup.
pub const PARENT: &str = "mcp-warden";

/// A live instance cgroup. Dropping it kills what is left inside and removes
/// the directory.
#[derive(Debug)]
pub struct InstanceCgroup {
    path: PathBuf,
    id: u64,
    dir: File,
    removed: bool,
}

impl InstanceCgroup {
    /// Create `<cgroup2>/mcp-warden/<name>`.
    pub fn create(name: &str) -> Result<Self, CgroupError> {
        let root = cgroup2_mount()?;
        Self::create_in(&root.join(PARENT), name)
    }

    pub fn create_in(parent: &Path, name: &str) -> Result<Self, CgroupError> {
        match fs::create_dir(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("mkdir", parent)(e)),
        }
        let path = parent.join(name);
        fs::create_dir(&path).map_err(io_err("mkdir", &path))?;
        let dir = File::open(&path).map_err(io_err("open", &path))?;
        let id = dir.metadata().map_err(io_err("stat", &path))?.ino();
        Ok(Self {
            path,
            id,
            dir,
            removed: false,
        })
    }

    /// Open an existing instance cgroup (an agent re-adopting it).
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let dir = File::open(path).map_err(io_err("open", path))?;
        let id = dir.metadata().map_err(io_err("stat", path))?.ino();
        Ok(Self {
            path: path.to_path_buf(),
            id,
            dir,
            removed: false,
        })
    }

    /// The cgroup id as the kernel reports it (bpf_get_current_cgroup_id):
    /// the inode number of the directory.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open directory fd, for attaching programs.
    pub fn dir(&self) -> &File {
        &self.dir
    }

    /// Open `cgroup.procs` for writing; the launcher writes the child's pid
    /// into it between fork and exec.
    pub fn procs_file(&self) -> Result<File, CgroupError> {
        let p = self.path.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(io_err("open", &p))
    }

    /// Pids currently inside.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let p = self.path.join("cgroup.procs");
        let s = fs::read_to_string(&p).map_err(io_err("read", &p))?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// End every process inside (cgroup.kill, Linux 5.14+; SIGKILL to each
    /// pid otherwise) and wait until it is empty.
    pub fn kill_all(&self, wait: Duration) -> Result<(), CgroupError> {
        let kill = self.path.join("cgroup.kill");
        let used_kill_file = match fs::OpenOptions::new().write(true).open(&kill) {
            Ok(mut f) => f.write_all(b"1").is_ok(),
            Err(_) => false,
        };
        let deadline = Instant::now() + wait;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if !used_kill_file {
                for pid in &pids {
                    // SAFETY: plain kill(2).
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::NotEmpty(self.path.clone()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kill what is left and remove the directory.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.remove_inner()
    }

    fn remove_inner(&mut self) -> Result<(), CgroupError> {
        if self.removed {
            return Ok(());
        }
        self.kill_all(Duration::from_secs(5))?;
        // rmdir can race with the last task's exit being accounted.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io_err("rmdir", &self.path)(e)),
            }
        }
        self.removed = true;
        Ok(())
    }
}

impl Drop for InstanceCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove_inner() {
            log::error!("removing cgroup {}: {e}", self.path.display());
        }
    }
}

/// Write the calling process's pid into an open `cgroup.procs`.
/// Async-signal-safe: no allocation; for use between fork and exec.
pub fn join_procs_raw(fd: i32) -> io::Result<()> {
    let mut buf = [0u8; 12];
    // SAFETY: getpid has no preconditions.
    let mut pid = unsafe { libc::getpid() } as u32;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    let s = &buf[i..];
    // SAFETY: writing a valid buffer to a valid fd.
    let n = unsafe { libc::write(fd, s.as_ptr().cast(), s.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_mount() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_plain_mount_and_escapes() {
        let info = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_mountinfo(info), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(unescape_octal("/a\\040b"), "/a b");
        assert_eq!(parse_mountinfo("1 2 3 / /x - ext4 /dev/sda rw\n"), None);
    }
}
