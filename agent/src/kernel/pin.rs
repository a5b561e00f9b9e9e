//! Pinning: the agent's maps, programs and links live in bpffs under a pin
//! root (default /sys/fs/bpf/mcp-warden), so a confined server stays confined
//! when the agent dies, and a restarted agent re-adopts everything without
//! loading a second copy of any program.
//!
//! Layout under the root:
//! - `maps/<map name>`: every map the agent opens.
//! - `progs/<program name>`: every program attached per instance cgroup.
//! - `links/tp-<n>`: the global tracepoint links (exec/exit, audit).
//! - `instances/<cgroup id>/<program name>`: each instance's cgroup links.
//!
//! A pinned link stays attached until its pin is removed *and* the last fd
//! to it is closed; [`CgroupLinks::unpin`] does both.
use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockAddrAttachType,
        CgroupSockAttachType, Program,
    },
};
use mcp_warden_common::{programs, InstanceState};

use super::{
    raw::{self, RawProgram},
    unix, Capabilities, CgroupLinks, Kernel, KernelError, Maps, SOCK_ADDR_PROGRAMS,
};

/// The unix hooks, loaded through [`raw`] (aya cannot): pinned and reopened
/// with BPF_OBJ_PIN / BPF_OBJ_GET directly.
const RAW_HOOKS: [(&str, u32); 2] = [
    (unix::HOOK_CONNECT, raw::UNIX_CONNECT),
    (unix::HOOK_SENDMSG, raw::UNIX_SENDMSG),
];

/// `union bpf_attr` for BPF_OBJ_PIN / BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;

fn path_cstring(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Pin a BPF object fd (program or link) at `path`.
fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = path_cstring(path)?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: bpf(2) with a valid attr of the size passed; `c` outlives it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &attr as *const ObjAttr,
            std::mem::size_of::<ObjAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Open the BPF object pinned at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = path_cstring(path)?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: as in obj_pin; on success the kernel returns a new fd we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjAttr,
            std::mem::size_of::<ObjAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

fn raw_pin_err(what: &str, path: &Path) -> impl FnOnce(io::Error) -> PinError {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |e| PinError::Open {
        what,
        path,
        reason: format!("BPF_OBJ_PIN: {e}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("pinning {what} at {path}: {source}")]
    Pin {
        what: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("opening the pinned {what} at {path}: {reason}")]
    Open {
        what: String,
        path: PathBuf,
        reason: String,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting bpffs at {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "the pins under {0} are incomplete (missing {1}); stop the confined servers and \
         remove the directory, or start the agent with a different pin root"
    )]
    Incomplete(PathBuf, String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PinError + 'a {
    move |source| PinError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Every program attached to an instance cgroup: reopened from its pin.
/// Extend this list (and [`reopen_program`]) with each new cgroup hook.
pub fn cgroup_programs() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = SOCK_ADDR_PROGRAMS.to_vec();
    v.push(programs::SOCK_CREATE);
    v.push(programs::SKB_EGRESS);
    v.push(programs::SKB_INGRESS);
    v
}

fn reopen_program(name: &'static str, path: &Path) -> Result<Program, KernelError> {
    let open_err = |e: aya::programs::ProgramError| PinError::Open {
        what: format!("program {name}"),
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let addr = |t| {
        CgroupSockAddr::from_pin(path, t)
            .map(Program::CgroupSockAddr)
            .map_err(open_err)
    };
    let p = match name {
        programs::CONNECT4 => addr(CgroupSockAddrAttachType::Connect4)?,
        programs::CONNECT6 => addr(CgroupSockAddrAttachType::Connect6)?,
        programs::SENDMSG4 => addr(CgroupSockAddrAttachType::UDPSendMsg4)?,
        programs::SENDMSG6 => addr(CgroupSockAddrAttachType::UDPSendMsg6)?,
        programs::BIND4 => addr(CgroupSockAddrAttachType::Bind4)?,
        programs::BIND6 => addr(CgroupSockAddrAttachType::Bind6)?,
        programs::SOCK_CREATE => CgroupSock::from_pin(path, CgroupSockAttachType::SockCreate)
            .map(Program::CgroupSock)
            .map_err(open_err)?,
        programs::SKB_EGRESS => CgroupSkb::from_pin(path, CgroupSkbAttachType::Egress)
            .map(Program::CgroupSkb)
            .map_err(open_err)?,
        programs::SKB_INGRESS => CgroupSkb::from_pin(path, CgroupSkbAttachType::Ingress)
            .map(Program::CgroupSkb)
            .map_err(open_err)?,
        other => {
            return Err(PinError::Open {
                what: format!("program {other}"),
                path: path.to_path_buf(),
                reason: "no attach type known for it".into(),
            }
            .into())
        }
    };
    Ok(p)
}

/// Pin one map at `dir/name` (replacing nothing: an existing pin is an error).
pub(super) fn pin_map(m: &Map, dir: &Path, name: &str) -> Result<(), PinError> {
    let path = dir.join(name);
    m.pin(&path).map_err(|source| PinError::Pin {
        what: format!("map {name}"),
        path,
        source,
    })
}

/// Is `path` on a bpf filesystem (per /proc/self/mountinfo)?
fn on_bpffs(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let Some((pre, post)) = l.split_once(" - ") else {
            return false;
        };
        post.split_whitespace().next() == Some("bpf")
            && pre
                .split_whitespace()
                .nth(4)
                .is_some_and(|mp| path.starts_with(mp))
    })
}

/// The pin root and its layout.
#[derive(Clone, Debug)]
pub struct PinRoot {
    root: PathBuf,
}

impl PinRoot {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    fn progs(&self) -> PathBuf {
        self.root.join("progs")
    }
    fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    fn instance(&self, cgroup_id: u64) -> PathBuf {
        self.root.join("instances").join(cgroup_id.to_string())
    }

    /// Make sure the root is on bpffs (mounting one at /sys/fs/bpf, or at
    /// the root itself elsewhere) and that its directories exist, mode 0700.
    pub fn prepare(&self) -> Result<(), PinError> {
        if !on_bpffs(&self.root) {
            let bpf = Path::new("/sys/fs/bpf");
            let at = if self.root.starts_with(bpf) {
                bpf.to_path_buf()
            } else {
                self.root.clone()
            };
            fs::create_dir_all(&at).map_err(io_err("mkdir", &at))?;
            nix::mount::mount(
                Some("bpffs"),
                &at,
                Some("bpf"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                Some("mode=0700"),
            )
            .map_err(|source| PinError::Mount {
                path: at.clone(),
                source,
            })?;
            log::info!("mounted bpffs at {}", at.display());
        }
        for d in [
            self.root.clone(),
            self.maps(),
            self.progs(),
            self.links(),
            self.root.join("instances"),
        ] {
            match fs::create_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("mkdir", &d)(e)),
            }
        }
        // Only root opens the pins (a pinned map fd would let its holder
        // rewrite the rules).
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &self.root))?;
        Ok(())
    }

    /// Are programs pinned here (a previous agent's)?
    pub fn has_programs(&self) -> bool {
        fs::read_dir(self.progs())
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }

    /// Cgroup ids with pinned links.
    pub fn pinned_instances(&self) -> Vec<u64> {
        fs::read_dir(self.root.join("instances"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Remove every pin (no instance is left to keep confined).
    pub fn remove_all(&self) -> Result<(), PinError> {
        match fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("rm -r", &self.root)(e)),
        }
    }

    /// Remove an instance's link pins (what is left of a dead instance).
    pub fn remove_instance(&self, cgroup_id: u64) {
        let d = self.instance(cgroup_id);
        if let Err(e) = fs::remove_dir_all(&d) {
            if e.kind() != io::ErrorKind::NotFound {
                log::error!("removing {}: {e}", d.display());
            }
        }
    }
}

impl Kernel {
    /// Load the programs and pin everything under `root`, or, when a previous
    /// agent's pins are there, reopen them and load nothing. Returns whether
    /// it re-adopted.
    pub fn load_or_adopt(root: &PinRoot) -> Result<(Self, bool), KernelError> {
        root.prepare()?;
        if root.has_programs() {
            return Ok((Self::adopt(root)?, true));
        }
        let mut k = Self::load_with(Some(&root.maps()))?;
        let progs = root.progs();
        if let Some(ebpf) = &mut k.ebpf {
            for (name, p) in ebpf.programs_mut() {
                // Programs aya did not load itself (the unix hooks, loaded
                // through `raw`) are pinned below from their own fds.
                if p.fd().is_err() {
                    continue;
                }
                let path = progs.join(name);
                p.pin(&path).map_err(|source| PinError::Pin {
                    what: format!("program {name}"),
                    path,
                    source,
                })?;
            }
        }
        for p in &k.unix_progs {
            let path = progs.join(p.name);
            obj_pin(p.fd.as_fd(), &path).map_err(raw_pin_err(p.name, &path))?;
        }
        let links = root.links();
        let tps = std::mem::take(&mut k._tracepoints);
        for (i, l) in tps.into_iter().enumerate() {
            let path = links.join(format!("tp-{i}"));
            let pinned = l.pin(&path).map_err(|source| PinError::Pin {
                what: "tracepoint link".into(),
                path,
                source,
            })?;
            k._tracepoints.push(FdLink::from(pinned));
        }
        // BPF-LSM hooks are global links too (none on the fallback).
        let lsm = std::mem::take(&mut k._lsm_links);
        for (hook, l) in lsm {
            let path = links.join(format!("lsm-{hook}"));
            let pinned = l.pin(&path).map_err(|source| PinError::Pin {
                what: format!("LSM link {hook}"),
                path,
                source,
            })?;
            k._lsm_links.push((hook, FdLink::from(pinned)));
        }
        Ok((k, false))
    }

    fn adopt(root: &PinRoot) -> Result<Self, KernelError> {
        let mut caps = Capabilities::default();
        let mut progs = BTreeMap::new();
        for name in cgroup_programs() {
            let path = root.progs().join(name);
            if !path.exists() {
                return Err(PinError::Incomplete(root.path().to_path_buf(), name.into()).into());
            }
            progs.insert(name, reopen_program(name, &path)?);
            caps.hooks.insert(name, true);
        }
        let mut tracepoints = Vec::new();
        let mut lsm_links = Vec::new();
        let links = root.links();
        for e in fs::read_dir(&links)
            .map_err(io_err("readdir", &links))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let l = FdLink::from(PinnedLink::from_pin(e.path())?);
            let lsm_hook = name.strip_prefix("lsm-").and_then(|h| {
                programs::LSM_HOOKS
                    .iter()
                    .find(|(_, hook)| *hook == h)
                    .map(|(_, hook)| *hook)
            });
            match lsm_hook {
                Some(hook) => lsm_links.push((hook, l)),
                None => tracepoints.push(l),
            }
        }
        for (_, hook) in programs::LSM_HOOKS {
            caps.hooks
                .insert(hook, lsm_links.iter().any(|(h, _)| *h == hook));
        }
        let backend = if lsm_links.is_empty() {
            super::lsm::BACKEND_FALLBACK
        } else {
            super::lsm::BACKEND_LSM
        };
        // Tracepoint hooks: present when their links are.
        for name in [
            programs::SCHED_EXEC,
            programs::SCHED_EXIT,
            programs::SYS_ENTER,
            programs::SYS_EXIT,
        ] {
            caps.hooks.insert(name, !tracepoints.is_empty());
        }
        let dir = root.maps();
        let maps = Maps::open(&mut |name| {
            let path = dir.join(name);
            let open_err = |reason: String| -> KernelError {
                PinError::Open {
                    what: format!("map {name}"),
                    path: path.clone(),
                    reason,
                }
                .into()
            };
            let d = MapData::from_pin(&path).map_err(|e| open_err(e.to_string()))?;
            Map::from_map_data(d).map_err(|e| open_err(e.to_string()))
        })?;
        let mut unix_progs = Vec::new();
        for (hook, attach_type) in RAW_HOOKS {
            let path = root.progs().join(hook);
            let on = match obj_get(&path) {
                Ok(fd) => {
                    unix_progs.push(RawProgram {
                        name: hook,
                        attach_type,
                        fd,
                    });
                    true
                }
                Err(e) => {
                    log::error!(
                        "{hook} NOT enabled: the previous agent pinned no {} ({e})",
                        path.display()
                    );
                    false
                }
            };
            caps.hooks.insert(hook, on);
        }
        Ok(Self::assemble(
            None,
            progs,
            maps,
            tracepoints,
            unix_progs,
            backend,
            lsm_links,
            caps,
        ))
    }

    /// Pin an instance's freshly attached links, so they outlive the agent.
    pub fn pin_cgroup_links(
        &self,
        root: &PinRoot,
        links: &mut CgroupLinks,
        cgroup_id: u64,
    ) -> Result<(), KernelError> {
        let dir = root.instance(cgroup_id);
        fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
        let mut pinned = Vec::new();
        for (name, l) in std::mem::take(&mut links.links) {
            let path = dir.join(name);
            let p = l.pin(&path).map_err(|source| PinError::Pin {
                what: format!("link {name}"),
                path,
                source,
            })?;
            pinned.push((name, FdLink::from(p)));
        }
        links.links = pinned;
        for (name, fd) in &links.raw {
            let path = dir.join(name);
            obj_pin(fd.as_fd(), &path).map_err(raw_pin_err(name, &path))?;
        }
        links.pin_dir = Some(dir);
        Ok(())
    }

    /// Reopen a previous agent's pinned links of an instance.
    pub fn adopt_cgroup_links(
        &self,
        root: &PinRoot,
        cgroup_id: u64,
    ) -> Result<CgroupLinks, KernelError> {
        let dir = root.instance(cgroup_id);
        let mut links = Vec::new();
        for name in cgroup_programs() {
            let path = dir.join(name);
            if path.exists() {
                links.push((name, FdLink::from(PinnedLink::from_pin(&path)?)));
            } else {
                log::error!(
                    "instance cgroup {cgroup_id}: hook {name} has no pinned link (not enforced)"
                );
            }
        }
        let mut raw_links = Vec::new();
        for (hook, _) in RAW_HOOKS {
            let path = dir.join(hook);
            match obj_get(&path) {
                Ok(fd) => raw_links.push((hook, fd)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::error!(
                    "instance cgroup {cgroup_id}: reopening {}: {e}",
                    path.display()
                ),
            }
        }
        Ok(CgroupLinks {
            links,
            raw: raw_links,
            pin_dir: Some(dir),
            unpin_on_drop: false,
        })
    }

    /// The instance state the kernel holds for `cgroup_id`.
    pub fn instance(&self, cgroup_id: u64) -> Option<InstanceState> {
        self.instances.get(&cgroup_id, 0).ok()
    }

    /// Every cgroup id in the instance map.
    pub fn instance_ids(&self) -> Vec<u64> {
        self.instances.keys().filter_map(|k| k.ok()).collect()
    }

    /// Remove every rule entry of rule set `policy_id` (all families).
    pub fn remove_policy_entries(&mut self, policy_id: u32) -> Result<usize, KernelError> {
        let pid = policy_id.to_be_bytes();
        let mut n = 0;
        let v4: Vec<_> = self
            .net4
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.data().policy_id == pid)
            .collect();
        for k in v4 {
            super::ignore_missing(self.net4.remove(&k))
                .map_err(super::map_err(mcp_warden_common::maps::NET4_RULES))?;
            n += 1;
        }
        let v6: Vec<_> = self
            .net6
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.data().policy_id == pid)
            .collect();
        for k in v6 {
            super::ignore_missing(self.net6.remove(&k))
                .map_err(super::map_err(mcp_warden_common::maps::NET6_RULES))?;
            n += 1;
        }
        let ux: Vec<_> = self
            .unix
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.data().policy_id == pid)
            .collect();
        for k in ux {
            super::ignore_missing(self.unix.remove(&k))
                .map_err(super::map_err(mcp_warden_common::maps::UNIX_RULES))?;
            n += 1;
        }
        let files: Vec<_> = self
            .files
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.data().policy_id == pid)
            .collect();
        for k in files {
            super::ignore_missing(self.files.remove(&k))
                .map_err(super::map_err(mcp_warden_common::maps::FILE_RULES))?;
            n += 1;
        }
        Ok(n)
    }
}

impl CgroupLinks {
    /// Remove the pins, then detach (closing the last fds).
    pub fn unpin(mut self) {
        self.unpin_on_drop = true;
    }

    pub fn is_pinned(&self) -> bool {
        self.pin_dir.is_some()
    }
}

impl Drop for CgroupLinks {
    fn drop(&mut self) {
        if !self.unpin_on_drop {
            return;
        }
        if let Some(dir) = self.pin_dir.take() {
            if let Err(e) = fs::remove_dir_all(&dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::error!("unpinning {}: {e}", dir.display());
                }
            }
        }
    }
}
