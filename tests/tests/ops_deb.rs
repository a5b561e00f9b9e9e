//! The .deb, as a new user gets it: built with cargo-deb (release build),
//! its file list and control data checked, installed into a scratch root,
//! and the installed binary run from there: `--version`, `check` of every
//! shipped policy, `wrap-config --dry-run`, and the installed unit verified
//! by systemd-analyze against the installed binary.
mod ops_util;

use std::{collections::BTreeSet, path::Path, process::Command};

use mcp_warden_tests::TempDir;
use ops_util::{
    deb::{build_deb, ScratchRoot},
    packaging, require_tool, run_ok,
};

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).expect("utf-8 output")
}

/// The paths in the package (`./usr/bin/x` -> `/usr/bin/x`), files only.
fn package_files(deb: &Path) -> BTreeSet<String> {
    stdout(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

#[test]
fn the_package_installs_and_runs() {
    let deb = build_deb("mcp-warden");

    // Every file we ship, where the unit, docs and README say it is.
    let files = package_files(&deb);
    let mut expected: BTreeSet<String> = [
        "/usr/bin/mcp-warden",
        "/etc/mcp-warden/agent.toml",
        "/etc/logrotate.d/mcp-warden",
        "/usr/share/mcp-warden/alerts.yml",
        "/usr/share/mcp-warden/grafana-dashboard.json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let policies: Vec<String> = std::fs::read_dir(packaging("policies"))
        .expect("packaging/policies")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    assert!(policies.len() >= 3, "{policies:?}");
    for p in &policies {
        expected.insert(format!("/etc/mcp-warden/policies/{p}"));
    }
    for f in &expected {
        assert!(files.contains(f), "{f} not in the package: {files:#?}");
    }
    let unit = files
        .iter()
        .find(|f| f.ends_with("/systemd/system/mcp-warden.service"))
        .unwrap_or_else(|| panic!("no systemd unit in the package: {files:#?}"))
        .clone();

    // Control data: name, every /etc file a conffile, maintainer scripts
    // that enable the unit.
    let field = |f: &str| stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
    assert_eq!(field("Package").trim(), "mcp-warden");
    // cargo-deb adds the Debian revision.
    assert_eq!(
        field("Version").trim(),
        format!("{}-1", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(field("Section").trim(), "admin");
    let ctl = TempDir::new("deb-control");
    run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(ctl.path()));
    let conffiles: BTreeSet<String> = std::fs::read_to_string(ctl.path().join("conffiles"))
        .expect("conffiles")
        .lines()
        .map(str::to_string)
        .collect();
    for f in expected.iter().filter(|f| f.starts_with("/etc/")) {
        assert!(
            conffiles.contains(f),
            "{f} is not a conffile: {conffiles:?}"
        );
    }
    let postinst = std::fs::read_to_string(ctl.path().join("postinst")).expect("postinst");
    assert!(postinst.contains("mcp-warden.service"), "{postinst}");

    // Install into a scratch root with dpkg, maintainer scripts included:
    // they run chrooted there, with busybox as /bin/sh (no systemd in it,
    // so they enable nothing on this host).
    let root = ScratchRoot::install("deb-root", &deb);
    let status = root.query("${Status}");
    assert_eq!(status, "install ok installed");
    for f in &expected {
        let p = root.path().join(f.trim_start_matches('/'));
        assert!(p.is_file(), "{} not installed", p.display());
    }
    let r = |abs: &str| root.file(abs);
    assert_eq!(
        std::fs::read(r("/usr/share/mcp-warden/alerts.yml")).expect("alerts"),
        std::fs::read(packaging("prometheus/alerts.yml")).expect("alerts"),
    );
    assert_eq!(
        std::fs::read(r(&unit)).expect("unit"),
        std::fs::read(packaging("systemd/mcp-warden.service")).expect("unit"),
    );
    let bin = r("/usr/bin/mcp-warden");
    let version = stdout(Command::new(&bin).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("mcp-warden {}", env!("CARGO_PKG_VERSION"))
    );
    let mut check = Command::new(&bin);
    check.arg("check");
    for p in &policies {
        check.arg(r(&format!("/etc/mcp-warden/policies/{p}")));
    }
    run_ok(&mut check);

    // wrap-config from the installed binary points clients at it.
    let cfg = root.path().join("claude_desktop_config.json");
    std::fs::write(
        &cfg,
        r#"{"mcpServers": {"git": {"command": "uvx", "args": ["mcp-server-git"]}}}"#,
    )
    .expect("write config");
    let diff = stdout(
        Command::new(&bin)
            .arg("wrap-config")
            .arg(&cfg)
            .arg("--dry-run"),
    );
    assert!(
        diff.contains(&format!("\"command\": \"{}\"", bin.display())),
        "{diff}"
    );
    assert!(diff.contains("git: wrapped (policy git)"), "{diff}");

    // The installed unit is clean under systemd-analyze verify when it
    // points at the installed binary.
    let sa = require_tool(
        "systemd-analyze",
        "apt-get install systemd (provides systemd-analyze)",
    );
    let unit_copy = root.path().join("mcp-warden.service");
    std::fs::write(
        &unit_copy,
        std::fs::read_to_string(r(&unit))
            .expect("unit")
            .replace("/usr/bin/mcp-warden", bin.to_str().expect("utf-8")),
    )
    .expect("write unit");
    let out = run_ok(
        Command::new(&sa)
            .args(["verify", "--man=no"])
            .arg(&unit_copy),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("mcp-warden.service"), "{err}");

    // Remove keeps the conffiles (a local edit too), purge takes them.
    let agent_toml = r("/etc/mcp-warden/agent.toml");
    let mut edited = std::fs::read_to_string(&agent_toml).expect("read agent.toml");
    edited.push_str("# edited by the admin\n");
    std::fs::write(&agent_toml, &edited).expect("edit agent.toml");
    root.dpkg(&["-r", "mcp-warden"]);
    assert!(!bin.exists(), "binary removed");
    assert!(!r(&unit).exists(), "unit removed");
    assert_eq!(
        std::fs::read_to_string(&agent_toml).expect("kept"),
        edited,
        "remove keeps the edited conffile"
    );
    root.dpkg(&["-P", "mcp-warden"]);
    for f in expected.iter().filter(|f| f.starts_with("/etc/")) {
        assert!(!r(f).exists(), "{f} left after purge");
    }
}
