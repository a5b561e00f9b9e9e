//! Types shared by the mcp-warden kernel programs (`ebpf/`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, has no `bool` and no implicit
//! padding, so the same bytes mean the same thing on both sides of a map or
//! of the ring buffer. Sizes are asserted at compile time.
#![no_std]

/// Map names. The kernel keeps 15 bytes of a map name; keep them shorter.
pub mod maps {
    pub const INSTANCES: &str = "mw_instances";
    pub const NET4_RULES: &str = "mw_net4";
    pub const NET6_RULES: &str = "mw_net6";
    pub const UNIX_RULES: &str = "mw_unix";
    pub const EVENTS: &str = "mw_events";
    pub const STATS: &str = "mw_stats";
    pub const SYSCALLS: &str = "mw_syscalls";
    pub const FILE_RULES: &str = "mw_files";
    pub const BYTES: &str = "mw_bytes";
    pub const CONFIG: &str = "mw_config";
    pub const REPORTED: &str = "mw_reported";
    pub const PARENT: &str = "mw_parent";
}

/// Indices of `mw_config`, agent-wide switches the agent writes.
pub mod config {
    /// Non-zero while some instance has `flags::AUDIT` or
    /// `flags::EMIT_ALLOWED`: only then does sys_exit look at successful
    /// syscalls.
    pub const WANTS_ALLOWED: u32 = 0;
    pub const COUNT: u32 = 1;
}

/// Program names as they appear in the object file (function names).
pub mod programs {
    pub const CONNECT4: &str = "mw_connect4";
    pub const CONNECT6: &str = "mw_connect6";
    pub const SENDMSG4: &str = "mw_sendmsg4";
    pub const SENDMSG6: &str = "mw_sendmsg6";
    pub const BIND4: &str = "mw_bind4";
    pub const BIND6: &str = "mw_bind6";
    pub const SOCK_CREATE: &str = "mw_sock_create";
    pub const SYS_ENTER: &str = "mw_sys_enter";
    pub const SYS_EXIT: &str = "mw_sys_exit";
    pub const SKB_EGRESS: &str = "mw_skb_egress";
    pub const SKB_INGRESS: &str = "mw_skb_ingress";
    pub const SYS_ENTER_CONNECT: &str = "mw_sys_connect";
    pub const SCHED_EXEC: &str = "mw_sched_exec";
    pub const SCHED_EXIT: &str = "mw_sched_exit";
    /// Loaded by the agent itself with expected attach type
    /// BPF_CGROUP_UNIX_CONNECT / UNIX_SENDMSG (aya 0.14 cannot).
    pub const UNIX_CONNECT: &str = "mw_unix_connect";
    pub const UNIX_SENDMSG: &str = "mw_unix_sendmsg";
    /// BPF-LSM backend (ebpf/src/lsm.rs): (program, LSM hook).
    pub const LSM_HOOKS: [(&str, &str); 12] = [
        ("mw_file_open", "file_open"),
        ("mw_path_unlink", "path_unlink"),
        ("mw_path_rmdir", "path_rmdir"),
        ("mw_path_mkdir", "path_mkdir"),
        ("mw_path_rename", "path_rename"),
        ("mw_path_link", "path_link"),
        ("mw_path_symlink", "path_symlink"),
        ("mw_path_truncate", "path_truncate"),
        ("mw_path_chmod", "path_chmod"),
        ("mw_path_chown", "path_chown"),
        ("mw_bprm_check", "bprm_check_security"),
        ("mw_ptrace_check", "ptrace_access_check"),
    ];
}

/// Bit 0 of every rule mask: the rule belongs to the server itself and holds
/// at all times. Bits 1..=63 are tools (tool index + 1), held only while a
/// call of that tool is in flight.
pub const SERVER_BIT: u64 = 1;
/// At most this many tools can carry their own rules in one policy.
pub const MAX_TOOLS_WITH_RULES: usize = 63;

/// `InstanceState::flags`
pub mod flags {
    /// Audit mode: never refuse, report `decision = audit` instead of deny.
    pub const AUDIT: u32 = 1 << 0;
    /// Report allowed operations too (learn mode, verbose audit trail).
    pub const EMIT_ALLOWED: u32 = 1 << 1;
    /// `on_violation = "kill"`: userspace ends the whole tree on a denial.
    pub const KILL: u32 = 1 << 2;
    /// Every call in flight is of a tool that declared `openWorldHint:
    /// false`: network egress (connect, sendmsg) is refused even where the
    /// rules allow it.
    pub const CLOSED_WORLD: u32 = 1 << 3;
    /// Enforce mode where the kernel cannot narrow file rights per call
    /// (fallback backend; Linux 6.1's mutations): successful file
    /// operations are reported too, and userspace ends the tree when one
    /// used a right that only a tool not in flight holds, or broke
    /// `READ_ONLY`.
    pub const REPORT_FILES: u32 = 1 << 4;
    /// Every call in flight is of a tool that declared `readOnlyHint:
    /// true`: file writes and mutations are refused (BPF-LSM) or reported
    /// as violations (with `REPORT_FILES`), even where the rules allow
    /// them. Character devices and /proc are not the filesystem a tool
    /// changes: writes there are not judged by this flag.
    pub const READ_ONLY: u32 = 1 << 5;
}

/// Value of `mw_instances`, keyed by the instance's cgroup id (u64, the
/// inode number of its cgroup v2 directory). Replaced whole by userspace
/// (a hash-map update is atomic for readers), never edited in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceState {
    /// Agent-assigned instance number, echoed in every event.
    pub instance_id: u32,
    /// Which rule set in the LPM tries belongs to this instance.
    pub policy_id: u32,
    /// `SERVER_BIT` | the bits of every tool with a call in flight.
    pub active_mask: u64,
    /// Bumped by every call-begin and call-end; events carry it so userspace
    /// knows exactly which calls were in flight when the kernel decided.
    pub epoch: u64,
    pub flags: u32,
    pub _pad: u32,
}

/// Operation kinds in rule keys and events.
pub mod op {
    pub const CONNECT: u32 = 1;
    pub const SENDMSG: u32 = 2;
    pub const BIND: u32 = 3;
    pub const SOCK_CREATE: u32 = 4;
    pub const UNIX_CONNECT: u32 = 5;
    pub const EXEC: u32 = 6;
    pub const EXIT: u32 = 7;
    pub const OPEN: u32 = 8;
    pub const UNLINK: u32 = 9;
    pub const MKDIR: u32 = 10;
    pub const RENAME: u32 = 11;
    pub const LINK: u32 = 12;
    pub const SYMLINK: u32 = 13;
    pub const TRUNCATE: u32 = 14;
    pub const CHMOD: u32 = 15;
    pub const CHOWN: u32 = 16;
    pub const RMDIR: u32 = 17;
    /// ptrace or /proc access to another process (`port` holds its tgid).
    pub const PTRACE: u32 = 18;
    /// A DNS response a confined socket received (learn and audit mode):
    /// `addr`/`port` the responder, `path` the first `EVENT_PATH_LEN`
    /// bytes of the DNS message, `sock_type` its whole length.
    pub const DNS: u32 = 19;
}

/// Rule key kind: what an address rule grants.
pub mod rule_kind {
    /// connect / sendmsg destination
    pub const CONNECT: u32 = 1;
    /// local address of bind
    pub const BIND: u32 = 2;
}

/// LPM key data for IPv4 rules. The LPM prefix length covers `policy_id`
/// and `kind` fully (64 bits) plus the CIDR length of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net4Key {
    /// Big-endian policy id, so the prefix bits compare in order.
    pub policy_id: [u8; 4],
    pub kind: [u8; 4],
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net6Key {
    pub policy_id: [u8; 4],
    pub kind: [u8; 4],
    pub addr: [u8; 16],
}

/// Bits of `Net*Key` before the address: policy id + kind.
pub const NET_KEY_FIXED_BITS: u32 = 64;

/// One port range and the rule sets (server bit, tool bits) that grant it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    /// Inclusive range, host byte order. 0..=65535 is "any port".
    pub lo: u16,
    pub hi: u16,
    pub _pad: u32,
    pub mask: u64,
}

pub const MAX_PORT_RULES: usize = 16;

/// LPM value: every port rule that covers this prefix, including those of
/// every shorter prefix that contains it (the compiler folds them in, since
/// an LPM lookup returns only the longest match).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRule {
    pub count: u32,
    pub _pad: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

impl NetRule {
    /// Does any rule grant `port` to a holder of `active_mask`?
    #[inline(always)]
    pub fn allows(&self, port: u16, active_mask: u64) -> bool {
        let mut i = 0;
        while i < MAX_PORT_RULES {
            if i as u32 >= self.count {
                break;
            }
            let r = &self.rules[i];
            if r.mask & active_mask != 0 && r.lo <= port && port <= r.hi {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Unix socket paths: LPM over (policy id, path bytes). Abstract names are
/// stored with their leading NUL as '@'.
pub const UNIX_PATH_MAX: usize = 108;
/// Bits of `UnixKey` before the path: the policy id.
pub const UNIX_KEY_FIXED_BITS: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixKey {
    pub policy_id: [u8; 4],
    pub path: [u8; UNIX_PATH_MAX],
}

impl Default for UnixKey {
    fn default() -> Self {
        Self {
            policy_id: [0; 4],
            path: [0; UNIX_PATH_MAX],
        }
    }
}

/// Value for path rules: which rule sets grant it, and whether the entry is
/// a subtree (`/dir/**`) or an exact path. Exact entries are keyed with
/// their terminating NUL (prefix covers `len + 1` path bytes) and lookups
/// use the zero-padded path, so an exact entry matches only its own path
/// and never shadows a subtree that contains it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathRule {
    pub mask: u64,
    /// 1: subtree rule, 0: exact.
    pub subtree: u32,
    /// Length in bytes of the rule's path (exact rules match only this length).
    pub len: u32,
}

/// File paths (BPF-LSM backend): LPM over (policy id, path bytes). The
/// kernel caps LPM keys at 256 bytes of data, so 252 bytes of path; longer
/// paths are judged on their first 252 bytes (only a subtree can match).
pub const FILE_PATH_MAX: usize = 252;
pub const FILE_KEY_FIXED_BITS: u32 = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileKey {
    pub policy_id: [u8; 4],
    pub path: [u8; FILE_PATH_MAX],
}

impl Default for FileKey {
    fn default() -> Self {
        Self {
            policy_id: [0; 4],
            path: [0; FILE_PATH_MAX],
        }
    }
}

/// Access kinds, the first index of `FileRule::layers`.
pub mod access {
    pub const READ: usize = 0;
    pub const WRITE: usize = 1;
    pub const EXEC: usize = 2;
    pub const COUNT: usize = 3;
}

/// Rules of one specificity (one rule path) covering an entry: the rule
/// sets granting the access there, and those denying it there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileLayer {
    pub grant: u64,
    pub deny: u64,
}

/// Nested rule paths over one entry that can decide it (per access kind).
pub const MAX_FILE_LAYERS: usize = 8;

/// LPM value for a path entry. For each access kind, the rule paths that
/// cover this entry, most specific first: the first layer naming any rule
/// set in force decides ("the most specific rule among all rules in force
/// decides"; at equal specificity deny wins). The compiler folds the rules
/// of every enclosing subtree in, so one lookup is enough.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileRule {
    pub counts: [u32; 4],
    pub layers: [[FileLayer; MAX_FILE_LAYERS]; access::COUNT],
}

impl FileRule {
    /// Does `active_mask` hold `access` (an `access::*` index) here?
    #[inline(always)]
    pub fn allows(&self, access: usize, active_mask: u64) -> bool {
        if access >= access::COUNT {
            return false;
        }
        let n = self.counts[access];
        let layers = &self.layers[access];
        let mut i = 0;
        while i < MAX_FILE_LAYERS {
            if i as u32 >= n {
                break;
            }
            let l = &layers[i];
            if (l.grant | l.deny) & active_mask != 0 {
                return l.deny & active_mask == 0;
            }
            i += 1;
        }
        false
    }
}

/// Event kinds (ring buffer `Event::kind`) and stats indices.
pub mod kind {
    pub const NET: u32 = 1;
    pub const FILE: u32 = 2;
    pub const EXEC: u32 = 3;
    pub const PROC: u32 = 4;
    /// Not an event kind: syscall counts the kernel could not record
    /// (counter map full).
    pub const SYSCALL: u32 = 5;
    /// Not an event kind: byte counts the kernel could not record.
    pub const BYTES: u32 = 6;
    /// Number of stats slots (index = kind).
    pub const COUNT: u32 = 7;
}

/// Decision carried in events.
pub mod decision {
    pub const ALLOW: u32 = 0;
    pub const DENY: u32 = 1;
    pub const AUDIT: u32 = 2;
}

pub const COMM_LEN: usize = 16;
pub const EVENT_PATH_LEN: usize = 256;

/// One record in the ring buffer. Fixed size: the kernel reserves exactly
/// this, so an event is either delivered whole or counted as lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    pub op: u32,
    pub decision: u32,
    pub instance_id: u32,
    pub cgroup_id: u64,
    pub epoch: u64,
    pub active_mask: u64,
    pub ktime_ns: u64,
    /// Process id (tgid), not the thread id.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    /// AF_INET / AF_INET6 / AF_UNIX for net events. File and exec events
    /// from the syscall tracepoints: the dirfd a relative `path` is
    /// relative to (AT_FDCWD, -100 as u32, when the call takes none).
    pub family: u32,
    /// SOCK_STREAM / SOCK_DGRAM / SOCK_RAW ...
    pub sock_type: u32,
    pub protocol: u32,
    /// Host byte order.
    pub port: u32,
    /// errno returned to the process (0 when allowed).
    pub errno: u32,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
    pub comm: [u8; COMM_LEN],
    /// NUL-terminated path (unix socket, file, exec), or empty.
    pub path: [u8; EVENT_PATH_LEN],
}

impl Default for Event {
    fn default() -> Self {
        Self {
            kind: 0,
            op: 0,
            decision: 0,
            instance_id: 0,
            cgroup_id: 0,
            epoch: 0,
            active_mask: 0,
            ktime_ns: 0,
            pid: 0,
            tid: 0,
            uid: 0,
            family: 0,
            sock_type: 0,
            protocol: 0,
            port: 0,
            errno: 0,
            addr: [0; 16],
            comm: [0; COMM_LEN],
            path: [0; EVENT_PATH_LEN],
        }
    }
}

/// Key of the per-instance syscall counters. Counts are tagged with the
/// instance's call epoch, so userspace can tell which calls were in flight
/// when each syscall was made, without snapshots on the relay's hot path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SyscallKey {
    pub cgroup_id: u64,
    pub epoch: u64,
    pub nr: u32,
    pub _pad: u32,
}

/// Key of the per-instance network byte counters (payload bytes, epoch
/// tagged like the syscall counters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BytesKey {
    pub cgroup_id: u64,
    pub epoch: u64,
    /// `DIR_EGRESS` or `DIR_INGRESS`.
    pub dir: u32,
    pub _pad: u32,
}

pub const DIR_EGRESS: u32 = 0;
pub const DIR_INGRESS: u32 = 1;

// Layout checks: a change here must be a deliberate change on both sides.
const _: () = assert!(core::mem::size_of::<InstanceState>() == 32);
const _: () = assert!(core::mem::size_of::<Net4Key>() == 12);
const _: () = assert!(core::mem::size_of::<Net6Key>() == 24);
const _: () = assert!(core::mem::size_of::<PortRule>() == 16);
const _: () = assert!(core::mem::size_of::<NetRule>() == 8 + 16 * MAX_PORT_RULES);
const _: () = assert!(core::mem::size_of::<UnixKey>() == 112);
const _: () = assert!(core::mem::size_of::<PathRule>() == 16);
const _: () = assert!(core::mem::size_of::<FileKey>() == 256);
const _: () =
    assert!(core::mem::size_of::<FileRule>() == 16 + 16 * MAX_FILE_LAYERS * access::COUNT);
const _: () = assert!(core::mem::size_of::<Event>() == 80 + 16 + COMM_LEN + EVENT_PATH_LEN);
const _: () = assert!(core::mem::size_of::<SyscallKey>() == 24);
const _: () = assert!(core::mem::size_of::<BytesKey>() == 24);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no padding or
    // invalid bit patterns (asserted sizes above).
    unsafe impl aya::Pod for InstanceState {}
    unsafe impl aya::Pod for Net4Key {}
    unsafe impl aya::Pod for Net6Key {}
    unsafe impl aya::Pod for NetRule {}
    unsafe impl aya::Pod for UnixKey {}
    unsafe impl aya::Pod for PathRule {}
    unsafe impl aya::Pod for FileKey {}
    unsafe impl aya::Pod for FileRule {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for SyscallKey {}
    unsafe impl aya::Pod for BytesKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_rule_masks() {
        let mut r = NetRule::default();
        r.rules[0] = PortRule {
            lo: 443,
            hi: 443,
            _pad: 0,
            mask: SERVER_BIT,
        };
        r.rules[1] = PortRule {
            lo: 80,
            hi: 80,
            _pad: 0,
            mask: 1 << 3,
        };
        r.count = 2;
        assert!(r.allows(443, SERVER_BIT));
        assert!(!r.allows(80, SERVER_BIT));
        assert!(r.allows(80, SERVER_BIT | 1 << 3));
        assert!(!r.allows(8080, u64::MAX));
    }
}
