//! Fuzz the policy parser and the network compiler.
//!
//! Properties: on any UTF-8 text, `parse` returns (never panics) and is
//! deterministic; every diagnostic points inside the text (line and column
//! are 1-based and within it) and names the file; an accepted policy
//! compiles to map entries without error (parse runs the same check), every
//! tool with rules gets a distinct kernel bit, and every DNS name it needs is
//! lower-case ASCII.
//!
//! The policy module is compiled from the agent's own source files rather
//! than through the `mcp-warden` crate, whose build pulls in aya and the eBPF
//! programs; it depends only on ipnet, toml_edit, thiserror, nix and the
//! shared no_std types.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unused_imports)]
#[path = "../../src/policy/mod.rs"]
mod policy;

const FILE: &str = "fuzz.toml";

fn vars() -> policy::Vars {
    policy::Vars {
        home: "/home/fuzz".into(),
        user: "fuzz".into(),
        uid: 1000,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars = vars();
    let first = policy::parse(text, FILE, &vars);
    let again = policy::parse(text, FILE, &vars);
    assert_eq!(first, again, "parse is not deterministic");
    match first {
        Err(diags) => {
            assert!(!diags.is_empty(), "rejected without a diagnostic");
            let lines = text.split('\n').count();
            for d in &diags {
                assert_eq!(d.file, FILE);
                assert!(d.line >= 1 && d.line <= lines, "line out of range: {d}");
                let len = text
                    .split('\n')
                    .nth(d.line - 1)
                    .map_or(0, |l| l.chars().count());
                assert!(d.col >= 1 && d.col <= len + 1, "column out of range: {d}");
                assert!(!d.message.is_empty());
            }
        }
        Ok(p) => {
            let mut bits = Vec::new();
            for t in &p.tools {
                let b = p.tool_bit(&t.name).expect("a tool with rules has a bit");
                assert!(b > 1, "a tool took the server bit");
                bits.push(b);
            }
            let n = bits.len();
            bits.sort_unstable();
            bits.dedup();
            assert_eq!(bits.len(), n, "two tools share a bit");
            let names = p.dns_names();
            let mut resolved = HashMap::new();
            for n in &names {
                assert!(
                    n.bytes().all(|b| b.is_ascii() && !b.is_ascii_uppercase()),
                    "DNS name not normalised: {n:?}"
                );
                resolved.insert(n.clone(), vec!["192.0.2.1".parse().unwrap()]);
            }
            policy::compile_net(&p, 7, &resolved).expect("an accepted policy compiles");
        }
    }
});
