//! Build the kernel programs with aya-build and leave the object in OUT_DIR.
//!
//! Without bpf-linker (a `cargo check`/clippy machine) an empty object is
//! written instead and the agent refuses to start enforcement with a clear
//! error: it never runs with fewer programs than it claims.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=MCP_WARDEN_SKIP_EBPF");
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    let obj = std::path::Path::new(&out_dir).join("mcp-warden");
    let skip = std::env::var_os("MCP_WARDEN_SKIP_EBPF").is_some_and(|v| v == "1");
    if skip || which::which("bpf-linker").is_err() {
        println!(
            "cargo:warning=bpf-linker not found (or MCP_WARDEN_SKIP_EBPF=1): \
             building WITHOUT kernel programs; run `cargo xtask setup` for a working agent"
        );
        std::fs::write(&obj, []).context("write empty eBPF object")?;
        return Ok(());
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("agent has no parent dir"))?
        .join("ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    // aya-build turns every line the inner cargo prints into a warning;
    // keep it to real diagnostics.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mcp-warden-ebpf",
            root_dir: root,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::default(),
    )
}
