//! Command line (contract in shared/design.md).
use std::process::ExitCode;

pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
