//! Policy v1 TOML -> [`Policy`], with every error located at file:line:col.
//!
//! The document is parsed once by `toml_edit` (which keeps the byte span of
//! every key and value); this module then walks it by hand so that it can
//! keep going after an error and report all of them, each at the key or the
//! value it is about.
use std::collections::HashMap;
use std::ops::Range;

use ipnet::IpNet;

use mcp_warden_common::MAX_TOOLS_WITH_RULES;
use toml_edit::{ImDocument, Item, Key, TableLike, Value};

use super::compile::{compile_net, unmap, CompileError};
use super::diag::{Diagnostic, LineIndex};
use super::model::{
    Governance, Host, McpRules, Mode, OnViolation, PathRule, Policy, Rules, ToolRules,
};
use super::values::{
    check_server_name, check_tool_name, parse_addr, parse_path, PathKind, ValueError,
};
use super::vars::Vars;

/// The only policy format version this build reads.
pub const POLICY_VERSION: i64 = 1;

const ROOT_KEYS: &str = "version, server, mode, on_violation, files, network, exec, tools, mcp";

/// Parse and validate a policy. `source` names the file in diagnostics and
/// becomes [`Policy::source`]. Returns every problem found, in file order.
pub fn parse(text: &str, source: &str, vars: &Vars) -> Result<Policy, Vec<Diagnostic>> {
    let mut cx = Cx {
        li: LineIndex::new(text),
        file: source,
        vars,
        diags: Vec::new(),
        nets: Vec::new(),
    };
    let doc = match ImDocument::parse(text) {
        Ok(d) => d,
        Err(e) => {
            let msg = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            cx.err(e.span(), format!("TOML syntax error: {msg}"));
            return Err(cx.diags);
        }
    };
    let policy = cx.root(doc.as_table(), source);
    if cx.diags.is_empty() {
        cx.compile_check(&policy);
    }
    if cx.diags.is_empty() {
        Ok(policy)
    } else {
        let mut d = cx.diags;
        d.sort_by_key(|d| (d.line, d.col));
        Err(d)
    }
}

struct Cx<'a> {
    li: LineIndex<'a>,
    file: &'a str,
    vars: &'a Vars,
    diags: Vec<Diagnostic>,
    /// Every literal network of `connect`/`bind` and where it is written.
    nets: Vec<(IpNet, Option<Range<usize>>)>,
}

fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => value_type_name(v),
    }
}

fn value_type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "an inline table",
    }
}

/// Every (key, item) of a table or inline table, in file order.
fn entries(t: &dyn TableLike) -> Vec<(&Key, &Item)> {
    t.iter().filter_map(|(k, _)| t.get_key_value(k)).collect()
}

impl Cx<'_> {
    /// What can be known of the kernel limits without DNS: compile with no
    /// resolutions and point an overflowing entry at the rule that names
    /// its address (or, failing that, the first network containing it).
    fn compile_check(&mut self, policy: &Policy) {
        // The BPF-LSM file entries have limits too (nesting, key length).
        if let Err(e) = super::compile::compile_files(policy, 0, &[]) {
            self.err(None, e.to_string());
        }
        let Err(e) = compile_net(policy, 0, &HashMap::new()) else {
            return;
        };
        let span = match &e {
            CompileError::TooManyPortRules { addr, .. } => {
                addr.parse::<IpNet>().ok().and_then(|bad| {
                    let exact = self.nets.iter().find(|(n, _)| unmap(*n) == bad);
                    exact
                        .or_else(|| self.nets.iter().find(|(n, _)| unmap(*n).contains(&bad)))
                        .and_then(|(_, sp)| sp.clone())
                })
            }
            _ => None,
        };
        self.err(span, e.to_string());
    }

    fn err(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        let (line, col) = self.li.position(span.map_or(0, |s| s.start));
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
        });
    }

    /// Span of an item, falling back to its key (implicit tables have none).
    fn item_span(key: &Key, item: &Item) -> Option<Range<usize>> {
        item.span().or_else(|| key.span())
    }

    /// Report a [`ValueError`] about the string value at `span`, pointing at
    /// the exact character when the string is written without escapes.
    fn value_err(&mut self, span: Option<Range<usize>>, text: &str, e: ValueError) {
        let pos = match (&span, e.at) {
            (Some(sp), Some(at)) => {
                let raw = self.li.slice(sp).unwrap_or("");
                let plain = [("\"", "\""), ("'", "'")].iter().any(|(o, c)| {
                    raw.strip_prefix(o).and_then(|r| r.strip_suffix(c)) == Some(text)
                });
                if plain {
                    Some(sp.start + 1 + at..sp.end)
                } else {
                    span.clone()
                }
            }
            _ => span.clone(),
        };
        self.err(pos, e.message);
    }

    fn unknown_key(&mut self, key: &Key, where_: &str, expected: &str) {
        self.err(
            key.span(),
            format!(
                "unknown key `{}` in {where_} (expected one of: {expected})",
                key.get()
            ),
        );
    }

    fn table_like<'i>(
        &mut self,
        name: &str,
        key: &Key,
        item: &'i Item,
    ) -> Option<&'i dyn TableLike> {
        match item.as_table_like() {
            Some(t) => Some(t),
            None => {
                self.err(
                    Self::item_span(key, item),
                    format!("`{name}` must be a table, found {}", type_name(item)),
                );
                None
            }
        }
    }

    /// A string value.
    fn string<'i>(&mut self, name: &str, key: &Key, item: &'i Item) -> Option<&'i str> {
        match item.as_str() {
            Some(s) => Some(s),
            None => {
                self.err(
                    Self::item_span(key, item),
                    format!("`{name}` must be a string, found {}", type_name(item)),
                );
                None
            }
        }
    }

    /// An array of strings, with each element's span.
    fn strings<'i>(
        &mut self,
        name: &str,
        key: &Key,
        item: &'i Item,
    ) -> Vec<(&'i str, Option<Range<usize>>)> {
        let Some(arr) = item.as_array() else {
            self.err(
                Self::item_span(key, item),
                format!(
                    "`{name}` must be an array of strings, found {}",
                    type_name(item)
                ),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for v in arr.iter() {
            match v.as_str() {
                Some(s) => out.push((s, v.span())),
                None => self.err(
                    v.span(),
                    format!(
                        "`{name}` entries must be strings, found {}",
                        value_type_name(v)
                    ),
                ),
            }
        }
        out
    }

    fn root(&mut self, t: &toml_edit::Table, source: &str) -> Policy {
        let mut version = None;
        let mut server = None;
        let mut mode = Mode::Enforce;
        let mut on_violation = OnViolation::Deny;
        let mut rules = Rules::default();
        let mut tools_allow = None;
        let mut tools = Vec::new();
        let mut mcp = McpRules::default();
        let mut approval_spans = Vec::new();

        for (key, item) in entries(t) {
            match key.get() {
                "version" => match item.as_integer() {
                    Some(POLICY_VERSION) => version = Some(1u32),
                    Some(v) => {
                        version = Some(0);
                        self.err(
                            item.span(),
                            format!(
                                "unsupported version {v}: this mcp-warden reads version {POLICY_VERSION}"
                            ),
                        )
                    }
                    None => {
                        version = Some(0);
                        self.err(
                            Self::item_span(key, item),
                            format!("`version` must be an integer, found {}", type_name(item)),
                        )
                    }
                },
                "server" => {
                    server = Some(String::new());
                    if let Some(s) = self.string("server", key, item) {
                        match check_server_name(s) {
                            Ok(()) => server = Some(s.to_string()),
                            Err(m) => self.err(item.span(), m),
                        }
                    }
                }
                "mode" => {
                    if let Some(s) = self.string("mode", key, item) {
                        match s {
                            "enforce" => mode = Mode::Enforce,
                            "audit" => mode = Mode::Audit,
                            other => self.err(
                                item.span(),
                                format!("bad mode `{other}`: expected \"enforce\" or \"audit\""),
                            ),
                        }
                    }
                }
                "on_violation" => {
                    if let Some(s) = self.string("on_violation", key, item) {
                        match s {
                            "deny" => on_violation = OnViolation::Deny,
                            "kill" => on_violation = OnViolation::Kill,
                            other => self.err(
                                item.span(),
                                format!(
                                    "bad on_violation `{other}`: expected \"deny\" or \"kill\""
                                ),
                            ),
                        }
                    }
                }
                "files" | "network" | "exec" => self.section("", key, item, &mut rules),
                "tools" => {
                    let (allow, t) = self.tools(key, item);
                    tools_allow = allow;
                    tools = t;
                }
                "mcp" => approval_spans = self.mcp(key, item, &mut mcp),
                _ => self.unknown_key(key, "the top level", ROOT_KEYS),
            }
        }
        if version.is_none() {
            self.err(None, "missing `version = 1` (the policy format version)");
        }
        if server.is_none() {
            self.err(
                None,
                "missing `server = \"NAME\"` (the server's name in logs and metrics)",
            );
        }
        if let Some(allow) = &tools_allow {
            for (name, span) in &approval_spans {
                if !allow.iter().any(|a| a == name) {
                    self.err(
                        span.clone(),
                        format!(
                            "mcp.approval names `{name}`, which `tools.allow` leaves out: \
                             its calls are refused anyway"
                        ),
                    );
                }
            }
        }
        Policy {
            version: version.unwrap_or(0),
            server: server.unwrap_or_default(),
            mode,
            on_violation,
            rules,
            tools_allow,
            tools,
            source: source.to_string(),
            mcp,
        }
    }

    /// `[mcp]`: sampling, elicitation, approval, approval_timeout. Returns
    /// the approval entries with their spans (checked against tools.allow).
    fn mcp(
        &mut self,
        key: &Key,
        item: &Item,
        mcp: &mut McpRules,
    ) -> Vec<(String, Option<Range<usize>>)> {
        let mut approvals = Vec::new();
        let Some(t) = self.table_like("mcp", key, item) else {
            return approvals;
        };
        for (k, v) in entries(t) {
            match k.get() {
                "sampling" | "elicitation" => {
                    let name = format!("mcp.{}", k.get());
                    let Some(s) = self.string(&name, k, v) else {
                        continue;
                    };
                    let g = match s {
                        "allow" => Governance::Allow,
                        "log" => Governance::Log,
                        "deny" => Governance::Deny,
                        other => {
                            self.err(
                                v.span(),
                                format!(
                                    "bad {name} `{other}`: expected \"allow\", \"log\" or \"deny\""
                                ),
                            );
                            continue;
                        }
                    };
                    if k.get() == "sampling" {
                        mcp.sampling = g;
                    } else {
                        mcp.elicitation = g;
                    }
                }
                "approval" => {
                    for (s, span) in self.strings("mcp.approval", k, v) {
                        match check_tool_name(s) {
                            Ok(()) => {
                                mcp.approval.push(s.to_string());
                                approvals.push((s.to_string(), span));
                            }
                            Err(m) => self.err(span, m),
                        }
                    }
                }
                "enforce_annotations" => match v.as_bool() {
                    Some(b) => mcp.enforce_annotations = b,
                    None => self.err(
                        Self::item_span(k, v),
                        format!(
                            "`mcp.enforce_annotations` must be true or false, found {}",
                            type_name(v)
                        ),
                    ),
                },
                "approval_timeout" => match v.as_integer() {
                    Some(n) if (1..=86_400).contains(&n) => mcp.approval_timeout_secs = n as u64,
                    Some(n) => self.err(
                        v.span(),
                        format!("mcp.approval_timeout {n} out of range: 1 to 86400 seconds"),
                    ),
                    None => self.err(
                        Self::item_span(k, v),
                        format!(
                            "`mcp.approval_timeout` must be an integer (seconds), found {}",
                            type_name(v)
                        ),
                    ),
                },
                _ => self.unknown_key(
                    k,
                    "[mcp]",
                    "sampling, elicitation, approval, approval_timeout, enforce_annotations",
                ),
            }
        }
        approvals
    }

    /// `[files]`, `[network]` or `[exec]`, at the top level (`prefix` empty)
    /// or under `tools.NAME.` (`prefix` = "tools.NAME.").
    fn section(&mut self, prefix: &str, key: &Key, item: &Item, rules: &mut Rules) {
        let name = format!("{prefix}{}", key.get());
        let Some(t) = self.table_like(&name, key, item) else {
            return;
        };
        for (k, v) in entries(t) {
            let field = format!("{name}.{}", k.get());
            match (key.get(), k.get()) {
                ("files", "read") => {
                    let l = self.paths(&field, k, v, PathKind::File);
                    rules.files.read.extend(l);
                }
                ("files", "write") => {
                    let l = self.paths(&field, k, v, PathKind::File);
                    rules.files.write.extend(l);
                }
                ("files", "deny") => {
                    let l = self.paths(&field, k, v, PathKind::File);
                    rules.files.deny.extend(l);
                }
                ("network", "connect") | ("network", "bind") => {
                    let bind = k.get() == "bind";
                    for (s, span) in self.strings(&field, k, v) {
                        match parse_addr(s, bind) {
                            Ok(a) => {
                                if let Host::Net(n) = a.host {
                                    self.nets.push((n, span.clone()));
                                }
                                if bind {
                                    rules.network.bind.push(a);
                                } else {
                                    rules.network.connect.push(a);
                                }
                            }
                            Err(e) => self.value_err(span, s, e),
                        }
                    }
                }
                ("network", "unix") => {
                    let l = self.paths(&field, k, v, PathKind::Unix);
                    rules.network.unix.extend(l);
                }
                ("exec", "allow") => {
                    let l = self.paths(&field, k, v, PathKind::Exec);
                    rules.exec.allow.extend(l);
                }
                (sec, _) => {
                    let expected = match sec {
                        "files" => "read, write, deny",
                        "network" => "connect, bind, unix",
                        _ => "allow",
                    };
                    self.unknown_key(k, &format!("[{name}]"), expected)
                }
            }
        }
    }

    fn paths(&mut self, name: &str, key: &Key, item: &Item, kind: PathKind) -> Vec<PathRule> {
        let mut out = Vec::new();
        for (s, span) in self.strings(name, key, item) {
            match parse_path(s, kind, self.vars) {
                Ok(p) => out.push(p),
                Err(e) => self.value_err(span, s, e),
            }
        }
        out
    }

    fn tools(&mut self, key: &Key, item: &Item) -> (Option<Vec<String>>, Vec<ToolRules>) {
        let Some(t) = self.table_like("tools", key, item) else {
            return (None, Vec::new());
        };
        let mut allow: Option<Vec<String>> = None;
        let mut tools: Vec<(ToolRules, Option<Range<usize>>)> = Vec::new();
        for (k, v) in entries(t) {
            if k.get() == "allow" {
                if v.as_array().is_none() {
                    self.err(
                        Self::item_span(k, v),
                        format!(
                            "`tools.allow` must be an array of tool names, found {} \
                             (a tool named `allow` cannot carry rules)",
                            type_name(v)
                        ),
                    );
                    continue;
                }
                let mut names: Vec<String> = Vec::new();
                for (s, span) in self.strings("tools.allow", k, v) {
                    if let Err(m) = check_tool_name(s) {
                        self.err(span, m);
                    } else if names.iter().any(|n| n == s) {
                        self.err(span, format!("duplicate tool `{s}` in tools.allow"));
                    } else {
                        names.push(s.to_string());
                    }
                }
                // Keep the list even if some entries were bad, so rules for
                // the good ones are still cross-checked.
                allow = Some(names);
                continue;
            }
            let name = k.get();
            if let Err(m) = check_tool_name(name) {
                self.err(k.span(), m);
            }
            let Some(tt) = self.table_like(&format!("tools.{name}"), k, v) else {
                continue;
            };
            let mut rules = Rules::default();
            let prefix = format!("tools.{name}.");
            for (sk, sv) in entries(tt) {
                match sk.get() {
                    "files" | "network" | "exec" => self.section(&prefix, sk, sv, &mut rules),
                    _ => self.unknown_key(sk, &format!("[tools.{name}]"), "files, network, exec"),
                }
            }
            tools.push((
                ToolRules {
                    name: name.to_string(),
                    rules,
                },
                k.span(),
            ));
        }
        if let Some(allow) = &allow {
            for (tr, span) in &tools {
                if !allow.contains(&tr.name) {
                    self.err(
                        span.clone(),
                        format!(
                            "rules for tool `{}`, which tools.allow leaves out (it can never be called)",
                            tr.name
                        ),
                    );
                }
            }
        }
        if let Some((tr, span)) = tools.get(MAX_TOOLS_WITH_RULES) {
            self.err(
                span.clone(),
                format!(
                    "too many tools with rules: at most {MAX_TOOLS_WITH_RULES} (`{}` is number {})",
                    tr.name,
                    MAX_TOOLS_WITH_RULES + 1
                ),
            );
        }
        (allow, tools.into_iter().map(|(t, _)| t).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        Vars::ann()
    }

    /// "line:col: message" of every diagnostic.
    fn errs(text: &str) -> Vec<String> {
        match parse(text, "p.toml", &vars()) {
            Ok(_) => Vec::new(),
            Err(d) => d
                .iter()
                .map(|d| {
                    assert_eq!(d.file, "p.toml");
                    format!("{}:{}: {}", d.line, d.col, d.message)
                })
                .collect(),
        }
    }

    fn ok(text: &str) -> Policy {
        match parse(text, "p.toml", &vars()) {
            Ok(p) => p,
            Err(d) => panic!("unexpected errors: {d:#?}"),
        }
    }

    const HEAD: &str = "version = 1\nserver = \"s\"\n";

    /// Errors of HEAD + `rest` (so `rest` starts on line 3).
    fn errs3(rest: &str) -> Vec<String> {
        errs(&format!("{HEAD}{rest}"))
    }

    fn one(rest: &str, at: &str, msg_part: &str) {
        let e = errs3(rest);
        assert_eq!(e.len(), 1, "{rest:?}: {e:#?}");
        assert!(
            e[0].starts_with(&format!("{at}: ")) && e[0].contains(msg_part),
            "{rest:?}: wanted {at} ~ {msg_part:?}, got {:?}",
            e[0]
        );
    }

    #[test]
    fn mcp_section() {
        let p = ok(&format!(
            "{HEAD}[tools]\nallow = [\"a\", \"rm\"]\n[mcp]\nsampling = \"deny\"\nelicitation = \"log\"\napproval = [\"rm\"]\napproval_timeout = 30\n"
        ));
        assert_eq!(p.mcp.sampling, Governance::Deny);
        assert_eq!(p.mcp.elicitation, Governance::Log);
        assert_eq!(p.mcp.approval, vec!["rm".to_string()]);
        assert_eq!(p.mcp.approval_timeout_secs, 30);
        assert_eq!(ok(HEAD).mcp, McpRules::default());
        one(
            "[mcp]\nsampling = \"maybe\"\n",
            "4:12",
            "bad mcp.sampling `maybe`",
        );
        one(
            "[mcp]\nsample = \"deny\"\n",
            "4:1",
            "unknown key `sample` in [mcp]",
        );
        one("[mcp]\napproval_timeout = 0\n", "4:20", "out of range");
        one(
            "[tools]\nallow = [\"a\"]\n[mcp]\napproval = [\"b\"]\n",
            "6:13",
            "`tools.allow` leaves out",
        );
    }

    #[test]
    fn full_example() {
        let p = ok(r#"
version = 1
server = "filesystem"
mode = "audit"
on_violation = "kill"

[files]
read  = ["/usr/**", "${HOME}/projects/**"]
write = ["${HOME}/projects/out/**"]
deny  = ["${HOME}/projects/.env"]

[network]
connect = ["127.0.0.1:8080", "10.1.0.0/16:443", "[::1]:*", "api.github.com:443"]
bind    = ["127.0.0.1:*"]
unix    = ["/run/postgresql/**", "@dbus"]

[exec]
allow = ["/usr/bin/git"]

[tools]
allow = ["read_file", "list_directory"]

[tools.read_file.files]
read = ["/srv/data/**"]

[tools.list_directory.network]
connect = ["10.0.0.1:22"]
"#);
        assert_eq!(p.version, 1);
        assert_eq!(p.server, "filesystem");
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.on_violation, OnViolation::Kill);
        assert_eq!(p.source, "p.toml");
        assert_eq!(
            p.rules.files.read,
            vec![
                PathRule::Subtree("/usr".into()),
                PathRule::Subtree("/home/ann/projects".into())
            ]
        );
        assert_eq!(
            p.rules.files.deny,
            vec![PathRule::Exact("/home/ann/projects/.env".into())]
        );
        assert_eq!(p.rules.network.connect.len(), 4);
        assert_eq!(p.rules.network.bind.len(), 1);
        assert_eq!(p.rules.network.unix.len(), 2);
        assert_eq!(
            p.rules.exec.allow,
            vec![PathRule::Exact("/usr/bin/git".into())]
        );
        assert_eq!(
            p.tools_allow,
            Some(vec!["read_file".to_string(), "list_directory".to_string()])
        );
        assert_eq!(p.tools.len(), 2);
        assert_eq!(p.tools[0].name, "read_file");
        assert_eq!(p.tool_bit("read_file"), Some(2));
        assert_eq!(p.tool_bit("list_directory"), Some(4));
        assert_eq!(p.tools[1].rules.network.connect.len(), 1);
        assert!(p.tool_allowed("read_file"));
        assert!(!p.tool_allowed("write_file"));
    }

    #[test]
    fn defaults_and_empty_policy() {
        let p = ok(HEAD);
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.on_violation, OnViolation::Deny);
        assert_eq!(p.rules, Rules::default());
        assert_eq!(p.tools_allow, None);
        assert!(p.tools.is_empty());
        assert!(p.tool_allowed("anything"));
    }

    #[test]
    fn tool_order_is_file_order() {
        let p = ok(&format!(
            "{HEAD}[tools.zeta.files]\nread = [\"/z\"]\n[tools.alpha.exec]\nallow = [\"/a\"]\n\
             [tools.zeta.network]\nconnect = [\"1.2.3.4:1\"]\n[tools]\nmid = {{ files = {{ read = [\"/m\"] }} }}\n"
        ));
        let names: Vec<&str> = p.tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha", "mid"]);
        assert_eq!(p.tools[0].rules.network.connect.len(), 1);
        assert_eq!(
            p.tools[2].rules.files.read,
            vec![PathRule::Exact("/m".into())]
        );
    }

    #[test]
    fn dotted_and_inline_forms() {
        let p = ok(&format!(
            "{HEAD}files.read = [\"/a\"]\nnetwork = {{ connect = [\"h.example:1\"] }}\n"
        ));
        assert_eq!(p.rules.files.read.len(), 1);
        assert_eq!(p.rules.network.connect.len(), 1);
    }

    #[test]
    fn toml_syntax_error() {
        let e = errs("version = 1\nserver = \"s\"\n[files\nread = []\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("3:7: TOML syntax error"), "{e:?}");
        let e = errs("version = 1\nversion = 1\n");
        assert!(e[0].starts_with("2:1: TOML syntax error"), "{e:?}");
        let e = errs("server = \"unterminated\n");
        assert!(e[0].starts_with("1:23: TOML syntax error"), "{e:?}");
    }

    #[test]
    fn version_and_server() {
        assert_eq!(
            errs("server = \"s\"\n"),
            ["1:1: missing `version = 1` (the policy format version)"]
        );
        assert_eq!(
            errs("version = 1\n"),
            ["1:1: missing `server = \"NAME\"` (the server's name in logs and metrics)"]
        );
        let e = errs("server = \"s\"\nversion = 2\n");
        assert_eq!(
            e,
            ["2:11: unsupported version 2: this mcp-warden reads version 1"]
        );
        let e = errs("server = \"s\"\nversion = \"1\"\n");
        assert_eq!(e, ["2:11: `version` must be an integer, found a string"]);
        let e = errs("version = 1\nserver = \"\"\n");
        assert_eq!(e, ["2:10: `server` must not be empty"]);
        let e = errs("version = 1\nserver = \"a b\"\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("2:10: bad server name"), "{e:?}");
        let e = errs("version = 1\nserver = 7\n");
        assert_eq!(e, ["2:10: `server` must be a string, found an integer"]);
    }

    #[test]
    fn mode_and_on_violation() {
        one("mode = \"strict\"\n", "3:8", "bad mode `strict`");
        one(
            "mode = true\n",
            "3:8",
            "`mode` must be a string, found a boolean",
        );
        one(
            "on_violation = \"warn\"\n",
            "3:16",
            "bad on_violation `warn`",
        );
        let p = ok(&format!(
            "{HEAD}mode = \"enforce\"\non_violation = \"deny\"\n"
        ));
        assert_eq!((p.mode, p.on_violation), (Mode::Enforce, OnViolation::Deny));
    }

    #[test]
    fn unknown_keys_everywhere() {
        one(
            "modes = \"audit\"\n",
            "3:1",
            "unknown key `modes` in the top level",
        );
        one(
            "[files]\nreed = []\n",
            "4:1",
            "unknown key `reed` in [files]",
        );
        one(
            "[network]\nlisten = []\n",
            "4:1",
            "unknown key `listen` in [network]",
        );
        one("[exec]\ndeny = []\n", "4:1", "unknown key `deny` in [exec]");
        one(
            "[tools.t]\nfile = {}\n",
            "4:1",
            "unknown key `file` in [tools.t]",
        );
        one(
            "[tools.t.files]\nread = []\n  writ = []\n",
            "5:3",
            "unknown key `writ` in [tools.t.files]",
        );
        one(
            "[tools.t.network]\nudp = []\n",
            "4:1",
            "unknown key `udp` in [tools.t.network]",
        );
        one(
            "[tools.t.exec]\nx = 1\n",
            "4:1",
            "unknown key `x` in [tools.t.exec]",
        );
        one(
            "[tools.t.proc]\n",
            "3:10",
            "unknown key `proc` in [tools.t]",
        );
    }

    #[test]
    fn wrong_types() {
        one(
            "files = 1\n",
            "3:9",
            "`files` must be a table, found an integer",
        );
        one(
            "[[files]]\nread = []\n",
            "3:1",
            "`files` must be a table, found an array of tables",
        );
        one(
            "[files]\nread = \"/usr/**\"\n",
            "4:8",
            "must be an array of strings, found a string",
        );
        one(
            "[files]\nread = [\"/a\", 2, \"/b\"]\n",
            "4:15",
            "`files.read` entries must be strings, found an integer",
        );
        one(
            "tools = []\n",
            "3:9",
            "`tools` must be a table, found an array",
        );
    }

    #[test]
    fn all_errors_reported_in_order() {
        let e = errs(
            "version = 3\nserver = \"\"\nmode = \"x\"\n[files]\nread = [\"a\", \"/b/../c\"]\n",
        );
        let at: Vec<&str> = e.iter().map(|s| s.split(": ").next().unwrap()).collect();
        assert_eq!(at, ["1:11", "2:10", "3:8", "5:9", "5:14"], "{e:#?}");
    }

    #[test]
    fn path_errors() {
        one(
            "[files]\nread = [\"usr/**\"]\n",
            "4:9",
            "relative path `usr/**`",
        );
        one("[files]\nread = [\"/a/../b\"]\n", "4:9", "`..` component");
        one("[files]\nwrite = [\"/a/./b\"]\n", "4:10", "`.` component");
        one("[files]\ndeny = [\"/a/b/\"]\n", "4:9", "trailing `/`");
        // The column points at the glob character itself.
        one("[files]\nread = [\"/dir/*\"]\n", "4:15", "use `/dir/**`");
        one(
            "[files]\nread = [\"/a/*.txt\"]\n",
            "4:13",
            "unsupported glob character `*`",
        );
        one(
            "[files]\nread = [\"/a/**/b\"]\n",
            "4:13",
            "`**` is only allowed as the last",
        );
        one(
            "[files]\nread = ['/a/b?']\n",
            "4:14",
            "unsupported glob character `?`",
        );
        one(
            "[files]\nread = [\"/a/[ab]\"]\n",
            "4:13",
            "unsupported glob character `[`",
        );
        one(
            "[files]\nread = [\"/a/{b,c}\"]\n",
            "4:13",
            "unsupported glob character `{`",
        );
        one("[exec]\nallow = [\"/bin/*\"]\n", "4:16", "use `/bin/**`");
        one(
            "[network]\nunix = [\"/run/*.sock\"]\n",
            "4:15",
            "unsupported glob",
        );
        // Escaped strings: no exact column inside, so the value's start.
        one(
            "[files]\nread = [\"/a/\\u0062*\"]\n",
            "4:9",
            "unsupported glob",
        );
        // `//` is normalised.
        let p = ok(&format!("{HEAD}[files]\nread = [\"//usr//lib/**\"]\n"));
        assert_eq!(
            p.rules.files.read,
            vec![PathRule::Subtree("/usr/lib".into())]
        );
    }

    #[test]
    fn variable_errors() {
        one(
            "[files]\nread = [\"${HOME}/a\", \"/x/${SHELL}/y\"]\n",
            "4:26",
            "unknown variable `${SHELL}`",
        );
        one(
            "[files]\nread = [\"${HOME\"]\n",
            "4:10",
            "unterminated `${`",
        );
        one(
            "[network]\nconnect = [\"${USER}.example:1\"]\n",
            "4:13",
            "variables are not allowed",
        );
        let p = ok(&format!(
            "{HEAD}[files]\nwrite = [\"/tmp/${{USER}}-${{UID}}/**\"]\n"
        ));
        assert_eq!(
            p.rules.files.write,
            vec![PathRule::Subtree("/tmp/ann-1000".into())]
        );
    }

    #[test]
    fn network_errors() {
        one(
            "[network]\nconnect = [\"10.0.0.0/33:1\"]\n",
            "4:12",
            "bad IPv4 CIDR",
        );
        one(
            "[network]\nconnect = [\"10.1.2.3/16:443\"]\n",
            "4:12",
            "host bits set",
        );
        one(
            "[network]\nconnect = [\"300.1.1.1:80\"]\n",
            "4:12",
            "bad IPv4 address",
        );
        one(
            "[network]\nconnect = [\"::1:443\"]\n",
            "4:12",
            "must be in brackets",
        );
        one(
            "[network]\nconnect = [\"fd00::/8:*\"]\n",
            "4:12",
            "must be in brackets",
        );
        one(
            "[network]\nconnect = [\"[fd00::1/8]:*\"]\n",
            "4:12",
            "host bits set",
        );
        one(
            "[network]\nconnect = [\"[zz::]:*\"]\n",
            "4:12",
            "bad IPv6 address",
        );
        one(
            "[network]\nconnect = [\"127.0.0.1\"]\n",
            "4:12",
            "missing port",
        );
        one("[network]\nconnect = [\"[::1]\"]\n", "4:12", "missing port");
        one(
            "[network]\nconnect = [\"api.github.com\"]\n",
            "4:12",
            "missing port",
        );
        // Port errors point at the port.
        one(
            "[network]\nconnect = [\"h.example:99999\"]\n",
            "4:23",
            "out of range",
        );
        one(
            "[network]\nconnect = [\"h.example:0\"]\n",
            "4:23",
            "port 0 is only",
        );
        one(
            "[network]\nconnect = [\"h.example:x\"]\n",
            "4:23",
            "bad port `x`",
        );
        one(
            "[network]\nconnect = [\"h.example:9-1\"]\n",
            "4:23",
            "empty port range",
        );
        one(
            "[network]\nconnect = [\"[::1]:http\"]\n",
            "4:19",
            "bad port `http`",
        );
        one(
            "[network]\nconnect = [\"bad_name.example:1\"]\n",
            "4:12",
            "bad DNS name",
        );
        one(
            "[network]\nconnect = [\"-x.example:1\"]\n",
            "4:12",
            "bad DNS name",
        );
        one(
            &format!("[network]\nconnect = [\"{}.example:1\"]\n", "a".repeat(64)),
            "4:12",
            "bad DNS name",
        );
        one(
            "[network]\nconnect = [\"*.example.com:1\"]\n",
            "4:12",
            "wildcard",
        );
    }

    #[test]
    fn network_ok() {
        let p = ok(&format!(
            "{HEAD}[network]\nbind = [\"[::]:0\", \"0.0.0.0:8000-8010\"]\nconnect = [\"[::ffff:10.0.0.1]:443\"]\n"
        ));
        assert_eq!(
            p.rules.network.bind[0].ports,
            crate::policy::PortRange { lo: 0, hi: 0 }
        );
        assert_eq!(p.rules.network.bind[1].ports.hi, 8010);
        assert_eq!(p.rules.network.connect.len(), 1);
    }

    #[test]
    fn tools_errors() {
        one(
            "[tools]\nallow = [\"a\", \"\"]\n",
            "4:15",
            "empty tool name",
        );
        one(
            "[tools]\nallow = [\"a\", \"a\"]\n",
            "4:15",
            "duplicate tool `a`",
        );
        one("[tools]\nallow = [\"a b\"]\n", "4:10", "bad tool name");
        one(
            "[tools]\nallow = [1]\n",
            "4:10",
            "entries must be strings, found an integer",
        );
        one(
            "[tools]\nallow = \"a\"\n",
            "4:9",
            "`tools.allow` must be an array",
        );
        one(
            "[tools.allow.files]\nread = []\n",
            "3:8",
            "`tools.allow` must be an array",
        );
        one(
            "[tools]\nallow = [\"a\"]\n[tools.b.files]\nread = [\"/x\"]\n",
            "5:8",
            "rules for tool `b`, which tools.allow leaves out",
        );
        one("[tools.\"a/b\".files]\n", "3:8", "bad tool name `a/b`");
        one(
            "[tools]\nt = 1\n",
            "4:5",
            "`tools.t` must be a table, found an integer",
        );
        // allow = [] is valid: no tool may be called.
        let p = ok(&format!("{HEAD}[tools]\nallow = []\n"));
        assert_eq!(p.tools_allow, Some(vec![]));
        assert!(!p.tool_allowed("x"));
    }

    #[test]
    fn port_rule_overflow_is_found_by_check() {
        let ports: Vec<String> = (1..=17).map(|p| format!("\"127.0.0.2:{p}\"")).collect();
        one(
            &format!(
                "[network]\nconnect = [\"10.0.0.0/8:1\",\n  {}]\n",
                ports.join(", ")
            ),
            "5:3",
            "connect rules for 127.0.0.2/32 need 17 distinct port ranges",
        );
        // The inner address overflows only once the /8's ranges fold in.
        let outer: Vec<String> = (1..=10).map(|p| format!("\"10.0.0.0/8:{p}\"")).collect();
        let inner: Vec<String> = (11..=17).map(|p| format!("\"10.9.9.9:{p}\"")).collect();
        one(
            &format!(
                "[tools.t.network]\nconnect = [{}]\n[network]\nconnect = [\n{}]\n",
                inner.join(", "),
                outer.join(", ")
            ),
            "4:12",
            "10.9.9.9/32 need 17",
        );
    }

    #[test]
    fn at_most_63_tools_with_rules() {
        let mut t = String::from("[tools]\n");
        for i in 0..63 {
            t.push_str(&format!("t{i} = {{}}\n"));
        }
        let p = ok(&format!("{HEAD}{t}"));
        assert_eq!(p.tool_bit("t62"), Some(1 << 63));
        t.push_str("t63 = {}\n");
        // [tools] is line 3, t0 line 4, t63 line 67.
        one(
            &t,
            "67:1",
            "too many tools with rules: at most 63 (`t63` is number 64)",
        );
    }
}
