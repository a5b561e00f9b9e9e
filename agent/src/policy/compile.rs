//! Policy -> kernel map entries (in progress).

/// Network map entries of one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledNet;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {}

/// Placeholder until the compiler lands.
pub fn compile_net() {}
