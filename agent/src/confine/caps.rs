//! Capability drop for the confined server: empty bounding set, no ambient,
//! inheritable, permitted or effective capabilities. A server launched as
//! root keeps uid 0 but holds no capability, and because the bounding and
//! inheritable sets are empty, exec cannot give any back (the root
//! special case grants permitted = inheritable | bounding).
//!
//! Done with raw prctl/capset: the `caps` crate builds HashSets, and the
//! child side runs in a `pre_exec` closure where allocation is not allowed.
use std::io;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("reading /proc/sys/kernel/cap_last_cap: {0}")]
    LastCap(io::Error),
    #[error("bad /proc/sys/kernel/cap_last_cap value {0:?}")]
    BadLastCap(String),
}

/// The plan, computed in the parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapDrop {
    /// Highest capability number the kernel knows.
    pub last_cap: u32,
}

impl CapDrop {
    pub fn new() -> Result<Self, CapsError> {
        let s =
            std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").map_err(CapsError::LastCap)?;
        let last_cap = s
            .trim()
            .parse::<u32>()
            .map_err(|_| CapsError::BadLastCap(s.trim().to_string()))?;
        if last_cap > 63 {
            return Err(CapsError::BadLastCap(s.trim().to_string()));
        }
        Ok(CapDrop { last_cap })
    }

    /// For the report.
    pub fn describe(&self) -> String {
        format!(
            "bounding set emptied (0..={}), ambient, inheritable, permitted and effective cleared",
            self.last_cap
        )
    }

    /// Drop everything. Async-signal-safe: prctl and capset only.
    /// Bounding-set drops need CAP_SETPCAP, so this runs before anything
    /// else clears it; a process without CAP_SETPCAP (a non-root launcher)
    /// has nothing to drop from the bounding set that exec could grant
    /// without file capabilities, which no_new_privs then disables, so
    /// EPERM from PR_CAPBSET_DROP is tolerated in that case only.
    ///
    /// # Safety
    /// Meant for a `pre_exec` closure in a forked child.
    pub unsafe fn apply(&self) -> io::Result<()> {
        // SAFETY (all calls below): integer-argument syscalls, and capset
        // reads from stack memory that outlives the call.
        unsafe {
            for cap in 0..=self.last_cap {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EPERM) {
                        // No CAP_SETPCAP: see above.
                        break;
                    }
                    // EINVAL: capability unknown to this kernel.
                    if e.raw_os_error() != Some(libc::EINVAL) {
                        return Err(e);
                    }
                }
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                let e = io::Error::last_os_error();
                // EINVAL: kernel without ambient capabilities (< 4.3).
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
            let mut hdr = CapHeader {
                version: CAP_V3,
                pid: 0,
            };
            let data = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// CAP_DAC_OVERRIDE (linux/capability.h).
pub const CAP_DAC_OVERRIDE: u32 = 1;

/// Remove `caps` from the calling thread's effective and permitted sets
/// (the agent's own, at start, before it has other threads; threads made
/// later inherit the result). The other capabilities are left as they are.
pub fn drop_own(caps: &[u32]) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget writes two CapData into `data`, which is that large.
    if unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut hdr as *mut CapHeader,
            data.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    for &cap in caps {
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        if let Some(d) = data.get_mut(word) {
            d.effective &= !bit;
            d.permitted &= !bit;
        }
    }
    // SAFETY: capset reads two CapData from `data`, alive for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The effective and permitted sets of the calling thread.
    fn own_sets() -> (u64, u64) {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let get = |k: &str| {
            let v = s.lines().find_map(|l| l.strip_prefix(k)).unwrap();
            u64::from_str_radix(v.trim(), 16).unwrap()
        };
        (get("CapEff:"), get("CapPrm:"))
    }

    #[test]
    fn drop_own_removes_only_the_named_capabilities() {
        // A thread of its own: capabilities are per thread, so the other
        // tests keep theirs.
        std::thread::spawn(|| {
            let (eff, prm) = own_sets();
            let dac = 1u64 << CAP_DAC_OVERRIDE;
            drop_own(&[CAP_DAC_OVERRIDE]).unwrap();
            let (eff2, prm2) = own_sets();
            assert_eq!(eff2, eff & !dac, "effective {eff:x} -> {eff2:x}");
            assert_eq!(prm2, prm & !dac, "permitted {prm:x} -> {prm2:x}");
            // Dropping what is not held changes nothing.
            drop_own(&[CAP_DAC_OVERRIDE]).unwrap();
            assert_eq!(own_sets(), (eff2, prm2));
        })
        .join()
        .unwrap();
    }
}
