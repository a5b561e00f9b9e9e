#![no_std]
//! Library target so the agent can name this crate as a build dependency.
