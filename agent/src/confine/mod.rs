//! confine: everything applied to a server process before it executes.
//! Fallback backend: Landlock ([`landlock`]), seccomp ([`seccomp`]) and the
//! capability drop ([`caps`]), prepared in the parent and applied in the
//! child by [`prepared::Prepared`].
pub mod caps;
pub mod landlock;
pub mod prepared;
pub mod seccomp;

pub use landlock::{Enforcement, LandlockReport, RuleReport};
pub use prepared::{ConfineError, ConfinementReport, Prepared};
pub use seccomp::SeccompLine;
