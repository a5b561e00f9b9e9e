//! The .deb as a user gets it: built with cargo-deb (release build) and
//! installed with dpkg into a scratch root (maintainer scripts included).
//! Shared by ops_deb.rs (the package itself) and newuser.rs (the product
//! used from the installed files).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use mcp_warden_tests::{require_root, target_dir, TempDir};

use super::{repo_root, require_tool, run_ok};

const CARGO_DEB: &str = "cargo install cargo-deb --locked --version 3.8.0";

/// Build the package (the release build takes minutes the first time;
/// later runs reuse target/release). `name` keeps suites that run at the
/// same time from overwriting each other's file.
pub fn build_deb(name: &str) -> PathBuf {
    require_tool("cargo-deb", CARGO_DEB);
    require_tool("dpkg-deb", "apt-get install dpkg");
    let out_dir = target_dir()
        .parent()
        .expect("target/ above the profile dir")
        .join("ops-deb");
    std::fs::create_dir_all(&out_dir).expect("mkdir target/ops-deb");
    let deb = out_dir.join(format!("{name}.deb"));
    let _ = std::fs::remove_file(&deb);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_ok(
        Command::new(cargo)
            .args(["deb", "-p", "mcp-warden", "--strip", "--output"])
            .arg(&deb)
            .current_dir(repo_root()),
    );
    assert!(deb.exists(), "cargo deb wrote no {}", deb.display());
    deb
}

/// A scratch root with the package installed by `dpkg --root`; removed
/// (directory and all) on drop.
pub struct ScratchRoot {
    pub dir: TempDir,
}

impl ScratchRoot {
    /// An empty dpkg database and busybox as /bin/sh (the maintainer
    /// scripts run chrooted there; no systemd in it, so they enable
    /// nothing on this host), then `dpkg -i`.
    pub fn install(tag: &str, deb: &Path) -> Self {
        require_root();
        let busybox = require_tool("busybox", "apt-get install busybox-static");
        let dir = TempDir::new(tag);
        let dpkg_db = dir.path().join("var/lib/dpkg");
        for d in ["info", "updates"] {
            std::fs::create_dir_all(dpkg_db.join(d)).expect("mkdir dpkg db");
        }
        for f in ["status", "available"] {
            std::fs::write(dpkg_db.join(f), "").expect("dpkg db file");
        }
        std::fs::create_dir_all(dir.path().join("bin")).expect("mkdir bin");
        std::fs::copy(&busybox, dir.path().join("bin/sh")).expect("busybox as sh");
        let root = Self { dir };
        // libc6 is not in the scratch root's database: that dependency only.
        root.dpkg(&["--force-depends", "-i", deb.to_str().expect("utf-8 path")]);
        root
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// An absolute path of the installed system, inside the scratch root.
    pub fn file(&self, abs: &str) -> PathBuf {
        self.path().join(abs.trim_start_matches('/'))
    }

    pub fn dpkg(&self, args: &[&str]) -> Output {
        let mut c = Command::new(require_tool("dpkg", "apt-get install dpkg"));
        c.arg(format!("--root={}", self.path().display()))
            .args(args);
        run_ok(&mut c)
    }

    /// `dpkg-query -W -f=FORMAT mcp-warden` in the scratch root.
    pub fn query(&self, format: &str) -> String {
        let out = run_ok(
            Command::new("dpkg-query")
                .arg(format!("--root={}", self.path().display()))
                .args(["-W", &format!("-f={format}"), "mcp-warden"]),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
