//! mcp-warden: confine local MCP servers in the kernel, per tool call.
//!
//! Modules follow the data's path, and dependencies point one way, down:
//! - entry points: [`cli`], [`run`], [`learn`], [`demo`]
//! - [`relay`] (stdio framing, JSON-RPC, call tracking)
//! - [`session`] (one confined server instance: kernel state + relay hooks)
//! - [`kernel`] (load, attach, maps) and [`confine`] (cgroup, Landlock, seccomp)
//! - [`events`] (decode -> enrich -> sinks)
//! - [`policy`] (parse -> validate -> compile to map entries)
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod annotations;
pub mod approval;
pub mod cli;
pub mod config;
pub mod confine;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod dns;
pub mod events;
pub mod host;
pub mod kernel;
pub mod learn;
pub mod metrics;
pub mod metrics_http;
pub mod policy;
pub mod relay;
pub mod run;
pub mod run_agent;
pub mod serve_http;
pub mod session;
pub mod status;
pub mod wrap;
