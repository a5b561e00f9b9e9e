//! events (in progress)
