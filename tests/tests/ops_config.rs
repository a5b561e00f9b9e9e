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
    let shipped = std::fs::read_to_string(packaging("agent.toml")).expect("read");
    let as_is: toml::Table = shipped.parse().expect("agent.toml is TOML");
    assert!(
        as_is.is_empty(),
        "every setting is commented out: {as_is:?}"
    );

    let t: toml::Table = uncommented()
        .parse()
        .expect("uncommented agent.toml is TOML");
    assert!(t.len() >= 8, "{t:?}");
    let s = |k: &str| {
        t.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("{k} missing in agent.toml"))
            .to_string()
    };
    assert_eq!(
        s("metrics_listen"),
        mcp_warden::metrics_http::DEFAULT_METRICS_ADDR.to_string()
    );
    assert_eq!(s("audit_log"), mcp_warden::run::DEFAULT_AUDIT_LOG);
    assert_eq!(s("policy_dir"), mcp_warden::wrap::POLICY_DIR);
    assert_eq!(s("socket"), "/run/mcp-warden/agent.sock");
    assert_eq!(s("pin_root"), "/sys/fs/bpf/mcp-warden");
    assert_eq!(
        t.get("allow_user_policies").and_then(|v| v.as_bool()),
        Some(false)
    );

    // The unit's writable paths hold what the config says is written.
    let unit = std::fs::read_to_string(packaging("systemd/mcp-warden.service")).expect("unit");
    assert!(s("socket").starts_with("/run/mcp-warden/"));
    assert!(unit.contains("RuntimeDirectory=mcp-warden"));
    assert!(s("audit_log").starts_with("/var/log/mcp-warden/"));
    assert!(unit.contains("LogsDirectory=mcp-warden"));
    assert!(s("pin_root").starts_with("/sys/fs/bpf/"));
}
