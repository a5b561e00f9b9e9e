//! The kernel side: load the embedded eBPF object, attach programs to an
//! instance's cgroup, and keep the maps (instances, rules) in step with the
//! sessions. Every failure here is an error the caller must surface: an
//! enforcement hook that did not attach is never silently skipped.
pub mod btf;
pub mod lsm;
pub mod raw;
pub mod unix;

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{AsFd, OwnedFd},
    path::Path,
    sync::{Arc, Mutex},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, CgroupArray, HashMap, LpmTrie, Map, MapData, PerCpuArray,
        PerCpuHashMap, RingBuf,
    },
    programs::{
        links::{FdLink, LinkError},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, Program,
        ProgramError, RawTracePoint, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use mcp_warden_common::{
    config, flags, kind, maps, programs, BytesKey, FileKey, FileRule, InstanceState, Net4Key,
    Net6Key, NetRule, PathRule, SyscallKey, UnixKey,
};

use crate::policy::compile::{CompiledNet, FileEntry};

pub mod pin;

/// The eBPF object built by agent/build.rs. Empty when the agent was built
/// without bpf-linker.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcp-warden"));

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this mcp-warden binary was built without its kernel programs (bpf-linker was missing \
         at build time); run `cargo xtask setup` and rebuild"
    )]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("mounting tracefs at /sys/kernel/tracing: {0}")]
    Tracefs(std::io::Error),
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error("{0}")]
    Pin(#[from] pin::PinError),
    #[error("{0}")]
    Raw(#[from] raw::RawError),
    #[error(
        "the kernel accepts LSM programs but a BPF-LSM hook failed, so the backend is not \
         claimed: {0}"
    )]
    Lsm(String),
}

/// Load (verify) one program, logging how long the kernel took: the
/// verifier is most of the agent's start-up.
fn timed_load(
    name: &str,
    load: impl FnOnce() -> Result<(), ProgramError>,
) -> Result<(), ProgramError> {
    let t = std::time::Instant::now();
    let r = load();
    log::debug!(
        "program {name}: loaded in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    r
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> KernelError {
    move |source| KernelError::Program { name, source }
}

/// The cgroup socket-address hooks attached to every instance cgroup.
const SOCK_ADDR_PROGRAMS: [&str; 6] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::BIND4,
    programs::BIND6,
];

/// What an instance's cgroup has attached. Dropping it detaches everything.
/// When pinned ([`pin`]), the links outlive the agent; dropping them then
/// detaches only if [`CgroupLinks::release`] was called first.
#[derive(Debug)]
pub struct CgroupLinks {
    links: Vec<(&'static str, FdLink)>,
    /// bpf_links made by [`raw`] (the unix hooks): closing the fd detaches.
    raw: Vec<(&'static str, OwnedFd)>,
    pin_dir: Option<std::path::PathBuf>,
    unpin_on_drop: bool,
}

impl CgroupLinks {
    /// Names of the attached hooks, for `status` and the log.
    pub fn hooks(&self) -> Vec<&'static str> {
        self.links
            .iter()
            .map(|(n, _)| *n)
            .chain(self.raw.iter().map(|(n, _)| *n))
            .collect()
    }
}

/// Which enforcement hooks this kernel gives us (metric
/// `mcp_warden_enforcement_available{hook}`).
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    pub hooks: BTreeMap<&'static str, bool>,
}

pub struct Kernel {
    /// The loaded object; None when the programs were reopened from pins.
    ebpf: Option<Ebpf>,
    /// Programs reopened from their pins by an agent that re-adopts.
    pinned_programs: BTreeMap<&'static str, Program>,
    instances: HashMap<MapData, u64, InstanceState>,
    net4: LpmTrie<MapData, Net4Key, NetRule>,
    net6: LpmTrie<MapData, Net6Key, NetRule>,
    unix: LpmTrie<MapData, UnixKey, PathRule>,
    stats: PerCpuArray<MapData, u64>,
    /// The per-call counters, behind their own lock: draining them takes
    /// many map syscalls, and the relay's path (instance updates under the
    /// `Kernel` lock) must not wait for that.
    counters: Arc<Mutex<Counters>>,
    events: Option<RingBuf<MapData>>,
    _tracepoints: Vec<FdLink>,
    /// The unix connect/sendmsg programs, when this kernel has them.
    unix_progs: Vec<raw::RawProgram>,
    files: LpmTrie<MapData, FileKey, FileRule>,
    backend: &'static str,
    _lsm_links: Vec<(&'static str, FdLink)>,
    caps: Capabilities,
    /// Agent-wide switches the programs read (`config::*`); None when
    /// re-adopted programs predate the map.
    config: Option<Array<MapData, u32>>,
    /// Slot 0: the parent cgroup of the instance cgroups (None when
    /// re-adopted programs predate the map).
    parent: Option<CgroupArray<MapData>>,
    /// Instances (cgroup ids) that want successful file operations
    /// reported (audit or learn mode): `config::WANTS_ALLOWED` is set
    /// while this is not empty.
    wanting_allowed: BTreeSet<u64>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel").field("caps", &self.caps).finish()
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones use
/// memory cgroup accounting. Raise it where we can; where we cannot (no
/// CAP_SYS_RESOURCE), map creation itself fails loudly if it mattered.
fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        log::debug!(
            "raising RLIMIT_MEMLOCK: {} (not needed on Linux 5.11+)",
            std::io::Error::last_os_error()
        );
    }
}

/// Tracepoint attachment needs tracefs; mount it where the kernel expects
/// it if nothing is mounted there yet (minimal hosts and VMs).
fn ensure_tracefs() -> Result<(), KernelError> {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| s.lines().any(|l| l.contains(" - tracefs ")))
        .unwrap_or(false);
    if mounted {
        return Ok(());
    }
    let target = std::path::Path::new("/sys/kernel/tracing");
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| KernelError::Tracefs(std::io::Error::from(e)))
}

impl Kernel {
    /// Load every program and map. Tracepoints are attached here (they
    /// filter on the confined cgroups themselves); cgroup hooks are attached
    /// per instance by [`Kernel::attach_cgroup`].
    pub fn load() -> Result<Self, KernelError> {
        Self::load_with(None)
    }

    /// [`Kernel::load`], pinning every map it opens under `pin_maps`.
    pub(crate) fn load_with(pin_maps: Option<&Path>) -> Result<Self, KernelError> {
        if OBJECT.is_empty() {
            return Err(KernelError::NoObject);
        }
        raise_memlock();
        // Struct offsets the unix and LSM hooks need, from this kernel's BTF.
        let t0 = std::time::Instant::now();
        let kbtf = btf::Btf::from_sys_fs();
        log::debug!(
            "kernel BTF parsed in {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let unix_layout: Result<unix::SockAddrKernLayout, String> = match &kbtf {
            Ok(b) => unix::layout(b).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let lsm_offsets: Result<lsm::Offsets, String> = match &kbtf {
            Ok(b) => lsm::offsets(b).map_err(|e| format!("reading struct offsets: {e}")),
            Err(e) => Err(e.to_string()),
        };
        // The backend: BPF-LSM where the kernel accepts LSM programs. Only
        // then is aya's own BTF table needed (to attach the hooks).
        let lsm_ready: Result<(), String> = match &kbtf {
            Ok(b) => lsm::probe(b),
            Err(e) => Err(e.to_string()),
        }
        .and_then(|()| lsm_offsets.as_ref().map(drop).map_err(Clone::clone));
        let aya_btf = match &lsm_ready {
            Ok(()) => aya::Btf::from_sys_fs().map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        let mut loader = EbpfLoader::new();
        if let Ok(o) = &lsm_offsets {
            lsm::set_globals(&mut loader, o);
        }
        if let Ok(l) = &unix_layout {
            loader
                .override_global(unix::GLOBAL_UADDR, &l.uaddr, true)
                .override_global(unix::GLOBAL_UADDRLEN, &l.uaddrlen, true);
        }
        let t0 = std::time::Instant::now();
        let mut ebpf = loader.load(OBJECT)?;
        log::debug!(
            "object parsed, maps created in {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let (backend, lsm_links) = match (&lsm_ready, &aya_btf) {
            (Ok(()), Ok(b)) => {
                let links = lsm::attach_all(&mut ebpf, b).map_err(KernelError::Lsm)?;
                log::info!(
                    "backend: bpf-lsm ({} hooks; offsets {:?})",
                    links.len(),
                    lsm_offsets.as_ref().map(|o| &o.0)
                );
                (lsm::BACKEND_LSM, links)
            }
            (Err(e), _) | (Ok(()), Err(e)) => {
                log::info!("backend: fallback (BPF-LSM not available: {e})");
                (lsm::BACKEND_FALLBACK, Vec::new())
            }
        };
        let mut caps = Capabilities::default();
        for (_, hook) in programs::LSM_HOOKS {
            caps.hooks
                .insert(hook, lsm_links.iter().any(|(h, _)| *h == hook));
        }
        let unix_progs = match &unix_layout {
            Ok(l) => match unix::load(&ebpf, OBJECT) {
                Ok(p) => {
                    log::debug!("unix socket hooks loaded (bpf_sock_addr_kern: {l:?})");
                    p
                }
                Err(e) => {
                    log::error!(
                        "unix socket hooks NOT enabled: connects and sends to unix sockets \
                         are not confined on this host: {e}"
                    );
                    Vec::new()
                }
            },
            Err(e) => {
                log::error!(
                    "unix socket hooks NOT enabled: connects and sends to unix sockets are \
                     not confined on this host: reading struct bpf_sock_addr_kern from {}: {e}",
                    btf::VMLINUX
                );
                Vec::new()
            }
        };
        for hook in [unix::HOOK_CONNECT, unix::HOOK_SENDMSG] {
            caps.hooks
                .insert(hook, unix_progs.iter().any(|p| p.name == hook));
        }
        for name in SOCK_ADDR_PROGRAMS {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            timed_load(name, || p.load()).map_err(prog_err(name))?;
            caps.hooks.insert(name, true);
        }
        {
            let name = programs::SOCK_CREATE;
            let p: &mut CgroupSock = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            timed_load(name, || p.load()).map_err(prog_err(name))?;
            caps.hooks.insert(name, true);
        }
        ensure_tracefs()?;
        let mut tracepoints = Vec::new();
        for (name, cat, tp) in [
            (programs::SCHED_EXEC, "sched", "sched_process_exec"),
            (programs::SCHED_EXIT, "sched", "sched_process_exit"),
        ] {
            let p: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            timed_load(name, || p.load()).map_err(prog_err(name))?;
            let id = p.attach(cat, tp).map_err(prog_err(name))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            tracepoints.push(FdLink::try_from(link)?);
            caps.hooks.insert(name, true);
        }
        // sys_enter: per-instance syscall counters (tagged with the call
        // epoch); sys_exit: the audit of the file/exec syscalls the
        // fallback's Landlock/seccomp refused.
        for (name, tp) in [
            (programs::SYS_ENTER, "sys_enter"),
            (programs::SYS_EXIT, "sys_exit"),
        ] {
            let p: &mut RawTracePoint = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            timed_load(name, || p.load()).map_err(prog_err(name))?;
            let id = p.attach(tp).map_err(prog_err(name))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            tracepoints.push(FdLink::from(link));
            caps.hooks.insert(name, true);
        }
        for name in [programs::SKB_EGRESS, programs::SKB_INGRESS] {
            let p: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            timed_load(name, || p.load()).map_err(prog_err(name))?;
            caps.hooks.insert(name, true);
        }
        let maps = Maps::open(&mut |name| {
            let m = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
            if let Some(dir) = pin_maps {
                pin::pin_map(&m, dir, name)?;
            }
            Ok(m)
        })?;
        Ok(Self::assemble(
            Some(ebpf),
            BTreeMap::new(),
            maps,
            tracepoints,
            unix_progs,
            backend,
            lsm_links,
            caps,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        ebpf: Option<Ebpf>,
        pinned_programs: BTreeMap<&'static str, Program>,
        maps: Maps,
        tracepoints: Vec<FdLink>,
        unix_progs: Vec<raw::RawProgram>,
        backend: &'static str,
        lsm_links: Vec<(&'static str, FdLink)>,
        caps: Capabilities,
    ) -> Self {
        let wanting_allowed = maps
            .instances
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, st)| wants_allowed(st))
            .map(|(cg, _)| cg)
            .collect();
        let mut k = Self {
            ebpf,
            pinned_programs,
            instances: maps.instances,
            net4: maps.net4,
            net6: maps.net6,
            unix: maps.unix,
            stats: maps.stats,
            counters: Arc::new(Mutex::new(Counters {
                syscalls: maps.syscalls,
                bytes: maps.bytes,
            })),
            events: Some(maps.events),
            _tracepoints: tracepoints,
            unix_progs,
            files: maps.files,
            backend,
            _lsm_links: lsm_links,
            caps,
            config: maps.config,
            parent: maps.parent,
            wanting_allowed,
        };
        if let Err(e) = k.write_wants_allowed() {
            log::error!("{e}");
        }
        k
    }

    /// Tell the syscall tracepoints which cgroup the instance cgroups are
    /// created in (an open directory fd): tasks outside it are turned away
    /// before the instance lookup. Set at every registration, so a parent
    /// removed and recreated meanwhile is followed.
    pub fn set_instances_parent<F: std::os::fd::AsRawFd>(
        &mut self,
        parent: &F,
    ) -> Result<(), KernelError> {
        match &mut self.parent {
            Some(p) => p
                .set(0, parent.as_raw_fd(), 0)
                .map_err(map_err(maps::PARENT)),
            None => Ok(()),
        }
    }

    /// Tell sys_exit whether any instance wants successes reported.
    fn write_wants_allowed(&mut self) -> Result<(), KernelError> {
        let on = u32::from(!self.wanting_allowed.is_empty());
        match &mut self.config {
            Some(c) => c
                .set(config::WANTS_ALLOWED, on, 0)
                .map_err(map_err(maps::CONFIG)),
            None => Ok(()),
        }
    }

    /// `bpf-lsm` or `fallback`: which backend enforces files and exec.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// On bpf-lsm: does every path-mutation hook run (Linux 6.1 refuses
    /// bpf_d_path in them)? When not, Landlock keeps the mutation rights.
    pub fn lsm_mutations(&self) -> bool {
        programs::LSM_HOOKS
            .iter()
            .all(|(_, h)| self._lsm_links.iter().any(|(l, _)| l == h))
    }

    /// Install file/exec entries (BPF-LSM backend); entries of `old` not in
    /// `new` are removed afterwards, so a refresh never opens a gap.
    pub fn install_files(
        &mut self,
        new: &[FileEntry],
        old: Option<&[FileEntry]>,
    ) -> Result<(), KernelError> {
        for (plen, k, v) in new {
            self.files
                .insert(&Key::new(*plen, *k), v, 0)
                .map_err(map_err(maps::FILE_RULES))?;
        }
        for (plen, k, _) in old.unwrap_or_default() {
            if !new.iter().any(|(p, n, _)| p == plen && n == k) {
                ignore_missing(self.files.remove(&Key::new(*plen, *k)))
                    .map_err(map_err(maps::FILE_RULES))?;
            }
        }
        Ok(())
    }

    pub fn remove_files(&mut self, entries: &[FileEntry]) -> Result<(), KernelError> {
        for (plen, k, _) in entries {
            ignore_missing(self.files.remove(&Key::new(*plen, *k)))
                .map_err(map_err(maps::FILE_RULES))?;
        }
        Ok(())
    }

    fn program_mut(&mut self, name: &'static str) -> Option<&mut Program> {
        match &mut self.ebpf {
            Some(e) => e.program_mut(name),
            None => self.pinned_programs.get_mut(name),
        }
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The event ring buffer; taken once by the event reader.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Attach every cgroup hook to `cgroup` (an open directory fd). These are
    /// bpf_links, which the kernel always runs alongside other programs on
    /// the cgroup (link attach takes no ALLOW_MULTI flag; `Single` passes 0). The
    /// instance state must already be in the map: the hooks fail closed.
    pub fn attach_cgroup<F: AsFd>(&mut self, cgroup: &F) -> Result<CgroupLinks, KernelError> {
        let mut links = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let p: &mut CgroupSockAddr = self
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            let id = p
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            links.push((name, FdLink::try_from(link)?));
        }
        let name = programs::SOCK_CREATE;
        let p: &mut CgroupSock = self
            .program_mut(name)
            .ok_or(KernelError::MissingProgram(name))?
            .try_into()
            .map_err(prog_err(name))?;
        let id = p
            .attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .map_err(prog_err(name))?;
        let link = p.take_link(id).map_err(prog_err(name))?;
        links.push((name, FdLink::try_from(link)?));
        for (name, ty) in [
            (programs::SKB_EGRESS, CgroupSkbAttachType::Egress),
            (programs::SKB_INGRESS, CgroupSkbAttachType::Ingress),
        ] {
            let p: &mut CgroupSkb = self
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?
                .try_into()
                .map_err(prog_err(name))?;
            let id = p
                .attach(cgroup.as_fd(), ty, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            links.push((name, FdLink::try_from(link)?));
        }
        let mut raw = Vec::new();
        for p in &self.unix_progs {
            raw.push((p.name, p.attach(cgroup)?));
        }
        Ok(CgroupLinks {
            links,
            raw,
            pin_dir: None,
            unpin_on_drop: false,
        })
    }

    /// Insert or replace an instance's state (atomic for the programs).
    /// The switch sys_exit reads is turned on before an instance that
    /// wants successes is in the map, and off only after none is.
    pub fn set_instance(&mut self, cgroup_id: u64, st: &InstanceState) -> Result<(), KernelError> {
        let was = !self.wanting_allowed.is_empty();
        if wants_allowed(st) {
            self.wanting_allowed.insert(cgroup_id);
            if !was {
                self.write_wants_allowed()?;
            }
        }
        self.instances
            .insert(cgroup_id, st, 0)
            .map_err(map_err(maps::INSTANCES))?;
        if !wants_allowed(st)
            && self.wanting_allowed.remove(&cgroup_id)
            && self.wanting_allowed.is_empty()
        {
            self.write_wants_allowed()?;
        }
        Ok(())
    }

    pub fn remove_instance(&mut self, cgroup_id: u64) -> Result<(), KernelError> {
        match self.instances.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::INSTANCES)(e)),
        }
        if self.wanting_allowed.remove(&cgroup_id) && self.wanting_allowed.is_empty() {
            self.write_wants_allowed()?;
        }
        Ok(())
    }

    /// Install compiled network rules. Entries present in `old` but not in
    /// `new` are removed afterwards, so a refresh never opens a gap.
    pub fn install_net(
        &mut self,
        new: &CompiledNet,
        old: Option<&CompiledNet>,
    ) -> Result<(), KernelError> {
        for (plen, k, v) in &new.v4 {
            self.net4
                .insert(&Key::new(*plen, *k), v, 0)
                .map_err(map_err(maps::NET4_RULES))?;
        }
        for (plen, k, v) in &new.v6 {
            self.net6
                .insert(&Key::new(*plen, *k), v, 0)
                .map_err(map_err(maps::NET6_RULES))?;
        }
        for (plen, k, v) in &new.unix {
            self.unix
                .insert(&Key::new(*plen, *k), v, 0)
                .map_err(map_err(maps::UNIX_RULES))?;
        }
        if let Some(old) = old {
            for (plen, k, _) in &old.v4 {
                if !new.v4.iter().any(|(p, n, _)| p == plen && n == k) {
                    ignore_missing(self.net4.remove(&Key::new(*plen, *k)))
                        .map_err(map_err(maps::NET4_RULES))?;
                }
            }
            for (plen, k, _) in &old.v6 {
                if !new.v6.iter().any(|(p, n, _)| p == plen && n == k) {
                    ignore_missing(self.net6.remove(&Key::new(*plen, *k)))
                        .map_err(map_err(maps::NET6_RULES))?;
                }
            }
            for (plen, k, _) in &old.unix {
                if !new.unix.iter().any(|(p, n, _)| p == plen && n == k) {
                    ignore_missing(self.unix.remove(&Key::new(*plen, *k)))
                        .map_err(map_err(maps::UNIX_RULES))?;
                }
            }
        }
        Ok(())
    }

    /// Remove every entry of `net`.
    pub fn remove_net(&mut self, net: &CompiledNet) -> Result<(), KernelError> {
        for (plen, k, _) in &net.v4 {
            ignore_missing(self.net4.remove(&Key::new(*plen, *k)))
                .map_err(map_err(maps::NET4_RULES))?;
        }
        for (plen, k, _) in &net.v6 {
            ignore_missing(self.net6.remove(&Key::new(*plen, *k)))
                .map_err(map_err(maps::NET6_RULES))?;
        }
        for (plen, k, _) in &net.unix {
            ignore_missing(self.unix.remove(&Key::new(*plen, *k)))
                .map_err(map_err(maps::UNIX_RULES))?;
        }
        Ok(())
    }

    /// The per-call counters (their own lock; see [`Counters`]).
    pub fn counters(&self) -> Arc<Mutex<Counters>> {
        self.counters.clone()
    }

    /// Events the kernel could not deliver, per kind index, summed over CPUs.
    pub fn lost(&self) -> Result<[u64; kind::COUNT as usize], KernelError> {
        let mut out = [0u64; kind::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let v = self
                .stats
                .get(&(i as u32), 0)
                .map_err(map_err(maps::STATS))?;
            *slot = v.iter().sum();
        }
        Ok(out)
    }
}

/// The per-call counter maps (`mw_syscalls`, `mw_bytes`), filled by the
/// programs and drained by the sessions' accountants.
pub struct Counters {
    syscalls: PerCpuHashMap<MapData, SyscallKey, u64>,
    bytes: PerCpuHashMap<MapData, BytesKey, u64>,
}

impl Counters {
    /// Take the syscall counts of `cgroup_id` for every epoch before
    /// `before_epoch` (epochs that can no longer grow) out of the kernel:
    /// (epoch, syscall nr, count summed over CPUs). `None` takes them all.
    pub fn drain_syscalls(
        &mut self,
        cgroup_id: u64,
        before_epoch: Option<u64>,
    ) -> Result<Vec<(u64, u32, u64)>, KernelError> {
        let taken = drain(&mut self.syscalls, |k| {
            k.cgroup_id == cgroup_id && before_epoch.is_none_or(|b| k.epoch < b)
        })
        .map_err(map_err(maps::SYSCALLS))?;
        Ok(taken.into_iter().map(|(k, n)| (k.epoch, k.nr, n)).collect())
    }

    /// The same for network payload bytes: (epoch, direction, bytes).
    pub fn drain_bytes(
        &mut self,
        cgroup_id: u64,
        before_epoch: Option<u64>,
    ) -> Result<Vec<(u64, u32, u64)>, KernelError> {
        let taken = drain(&mut self.bytes, |k| {
            k.cgroup_id == cgroup_id && before_epoch.is_none_or(|b| k.epoch < b)
        })
        .map_err(map_err(maps::BYTES))?;
        Ok(taken
            .into_iter()
            .map(|(k, n)| (k.epoch, k.dir, n))
            .collect())
    }
}

/// Does this instance want successful file operations reported?
fn wants_allowed(st: &InstanceState) -> bool {
    st.flags & (flags::AUDIT | flags::EMIT_ALLOWED | flags::REPORT_FILES) != 0
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// Take the entries `take` selects out of a per-CPU counter map, summing
/// each over CPUs.
fn drain<K: aya::Pod>(
    map: &mut PerCpuHashMap<MapData, K, u64>,
    take: impl Fn(&K) -> bool,
) -> Result<Vec<(K, u64)>, aya::maps::MapError> {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| take(k))
        .collect();
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        match map.get(&k, 0) {
            Ok(v) => out.push((k, v.iter().sum())),
            Err(aya::maps::MapError::KeyNotFound) => continue,
            Err(e) => return Err(e),
        }
        ignore_missing(map.remove(&k))?;
    }
    Ok(out)
}

/// The maps the agent reads and writes, however they were opened.
struct Maps {
    instances: HashMap<MapData, u64, InstanceState>,
    net4: LpmTrie<MapData, Net4Key, NetRule>,
    net6: LpmTrie<MapData, Net6Key, NetRule>,
    unix: LpmTrie<MapData, UnixKey, PathRule>,
    stats: PerCpuArray<MapData, u64>,
    syscalls: PerCpuHashMap<MapData, SyscallKey, u64>,
    bytes: PerCpuHashMap<MapData, BytesKey, u64>,
    files: LpmTrie<MapData, FileKey, FileRule>,
    events: RingBuf<MapData>,
    config: Option<Array<MapData, u32>>,
    parent: Option<CgroupArray<MapData>>,
}

impl Maps {
    fn open(
        take: &mut dyn FnMut(&'static str) -> Result<Map, KernelError>,
    ) -> Result<Self, KernelError> {
        Ok(Self {
            instances: HashMap::try_from(take(maps::INSTANCES)?)
                .map_err(map_err(maps::INSTANCES))?,
            net4: LpmTrie::try_from(take(maps::NET4_RULES)?).map_err(map_err(maps::NET4_RULES))?,
            net6: LpmTrie::try_from(take(maps::NET6_RULES)?).map_err(map_err(maps::NET6_RULES))?,
            unix: LpmTrie::try_from(take(maps::UNIX_RULES)?).map_err(map_err(maps::UNIX_RULES))?,
            stats: PerCpuArray::try_from(take(maps::STATS)?).map_err(map_err(maps::STATS))?,
            syscalls: PerCpuHashMap::try_from(take(maps::SYSCALLS)?)
                .map_err(map_err(maps::SYSCALLS))?,
            bytes: PerCpuHashMap::try_from(take(maps::BYTES)?).map_err(map_err(maps::BYTES))?,
            files: LpmTrie::try_from(take(maps::FILE_RULES)?).map_err(map_err(maps::FILE_RULES))?,
            events: RingBuf::try_from(take(maps::EVENTS)?).map_err(map_err(maps::EVENTS))?,
            // Absent only from the pins of an older agent, whose programs
            // do not read it.
            config: match take(maps::CONFIG) {
                Ok(m) => Some(Array::try_from(m).map_err(map_err(maps::CONFIG))?),
                Err(e) => {
                    log::debug!("{e}");
                    None
                }
            },
            parent: match take(maps::PARENT) {
                Ok(m) => Some(CgroupArray::try_from(m).map_err(map_err(maps::PARENT))?),
                Err(e) => {
                    log::debug!("{e}");
                    None
                }
            },
        })
    }
}
