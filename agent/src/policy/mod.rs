//! Policy v1: parse (TOML with spans) -> validate -> expand variables ->
//! [`model::Policy`]; compile to kernel map entries in [`compile`].
pub mod model;
pub use model::*;
