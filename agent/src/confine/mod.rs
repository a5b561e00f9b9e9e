//! confine: everything applied to a server process before it executes.
//! - [`cgroup`]: the instance's cgroup v2 (all backends); the child joins it
//!   between fork and exec.
//! - Fallback backend: Landlock ([`landlock`]), seccomp ([`seccomp`]) and the
//!   capability drop ([`caps`]), prepared in the parent and applied in the
//!   child by [`prepared::Prepared`].
pub mod caps;
pub mod cgroup;
pub mod landlock;
pub mod prepared;
pub mod seccomp;

pub use landlock::{Enforcement, LandlockReport, RuleReport};
pub use prepared::{ConfineError, ConfinementReport, Prepared};
pub use seccomp::SeccompLine;
