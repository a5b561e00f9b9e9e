//! Confinement applied to the server process: its cgroup, and on hosts
//! without BPF-LSM the Landlock ruleset, seccomp filter and capability drop.
pub mod cgroup;
mod stub;
pub use stub::{ConfineError, Prepared};
