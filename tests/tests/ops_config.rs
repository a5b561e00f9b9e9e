//! The shipped agent.toml: all defaults, commented out. Uncommented, every
//! line is valid TOML and says what the code's defaults are.
mod ops_util;

use ops_util::packaging;

/// The example with every `#key = value` line uncommented.
fn uncommented() -> String {
    std::fs::read_to_string(packaging("agent.toml"))
        .expect("read agent.toml")
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn shipped_config_is_all_defaults() {
    let path = packaging("agent.toml");
    let shipped = std::fs::read_to_string(&path).expect("read");
    let as_is: toml::Table = shipped.parse().expect("agent.toml is TOML");
    assert!(
        as_is.is_empty(),
        "every setting is commented out: {as_is:?}"
    );

    // Uncommented, every line is a real key (the agent refuses unknown
    // ones) holding the agent's default.
    let text = uncommented();
    let t: toml::Table = text.parse().expect("uncommented agent.toml is TOML");
    assert!(t.len() >= 8, "{t:?}");
    let cfg = mcp_warden::config::Config::parse(&text, &path)
        .unwrap_or_else(|e| panic!("the agent rejects its example config: {e}"));
    assert_eq!(cfg, mcp_warden::config::Config::default());
    assert_eq!(
        cfg.audit_log,
        std::path::Path::new(mcp_warden::run::DEFAULT_AUDIT_LOG)
    );
    assert_eq!(
        cfg.policy_dir,
        std::path::Path::new(mcp_warden::wrap::POLICY_DIR)
    );

    // The unit's writable paths hold what the config says is written.
    let unit = std::fs::read_to_string(packaging("systemd/mcp-warden.service")).expect("unit");
    let rw: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ReadWritePaths="))
        .expect("ReadWritePaths=")
        .split_whitespace()
        .collect();
    assert!(cfg.socket.starts_with("/run/mcp-warden"));
    assert!(cfg.state_dir.starts_with("/run/mcp-warden"));
    assert!(unit.contains("RuntimeDirectory=mcp-warden"));
    assert!(cfg.audit_log.starts_with("/var/log/mcp-warden"));
    assert!(unit.contains("LogsDirectory=mcp-warden"));
    assert!(rw.iter().any(|p| cfg.pin_root.starts_with(p)), "{rw:?}");
    assert!(rw.contains(&"/sys/fs/cgroup"), "{rw:?}");
}
