//! Maps shared by every program. Names come from `mcp_warden_common::maps`.
use aya_ebpf::{
    macros::map,
    maps::{CgroupArray, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use mcp_warden_common::{
    kind, FileKey, FileRule, InstanceState, Net4Key, Net6Key, NetRule, PathRule, UnixKey,
};

/// Confined cgroups: cgroup id -> instance state. Written only by the agent.
#[map(name = "mw_instances")]
pub static INSTANCES: HashMap<u64, InstanceState> = HashMap::with_max_entries(4096, 0);

#[map(name = "mw_net4")]
pub static NET4_RULES: LpmTrie<Net4Key, NetRule> = LpmTrie::with_max_entries(65536, 0);

#[map(name = "mw_net6")]
pub static NET6_RULES: LpmTrie<Net6Key, NetRule> = LpmTrie::with_max_entries(65536, 0);

#[map(name = "mw_unix")]
pub static UNIX_RULES: LpmTrie<UnixKey, PathRule> = LpmTrie::with_max_entries(16384, 0);

/// File and exec rules of the BPF-LSM backend.
#[map(name = "mw_files")]
pub static FILE_RULES: LpmTrie<FileKey, FileRule> = LpmTrie::with_max_entries(65536, 0);

/// 8 MiB: about 22k events of 368 bytes before the first loss.
#[map(name = "mw_events")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Events the kernel could not deliver, per kind (index = `kind::*`).
#[map(name = "mw_stats")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(kind::COUNT, 0);

/// Slot 0: the cgroup every instance cgroup of this agent is created in
/// (set by the agent when it registers an instance).
#[map(name = "mw_parent")]
pub static PARENT: CgroupArray = CgroupArray::with_max_entries(1, 0);

/// [`current_instance`] for the global syscall tracepoints, which run for
/// every task on the host: a task outside the instances' parent cgroup is
/// turned away by one ancestor check, before the cgroup id is read and
/// hashed. An unset slot (an error) falls through to the lookup.
#[inline(always)]
pub fn current_instance_traced() -> Option<(u64, InstanceState)> {
    if let Ok(false) = PARENT.current_task_under_cgroup(0) {
        return None;
    }
    current_instance()
}

/// Look up the current task's instance, if its cgroup is confined.
#[inline(always)]
pub fn current_instance() -> Option<(u64, InstanceState)> {
    // SAFETY: helper with no arguments.
    let cg = unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() };
    // SAFETY: the value is a plain Copy struct owned by the map; copied out.
    let st = unsafe { INSTANCES.get(cg) }?;
    Some((cg, *st))
}
