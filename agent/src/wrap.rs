//! `mcp-warden wrap-config FILE [--dry-run]`: rewrite an MCP client's JSON
//! configuration so that each local (stdio) server runs through
//! `mcp-warden run --server NAME -- <its command and arguments>`.
//!
//! Formats: Claude Desktop and Cursor (`{"mcpServers": {NAME: {command,
//! args, env}}}`), VS Code's `.vscode/mcp.json` (`{"servers": {NAME: {type,
//! command, args}}, "inputs": [...]}`) and VS Code's settings.json
//! (`{"mcp": {"servers": ...}}`). The file is edited in place as a concrete
//! syntax tree: key order, formatting and comments (VS Code's files are
//! JSONC) stay as they were; only `command` and `args` of a wrapped server
//! change. Remote servers (`url`, type http/sse) are left as they are, and
//! so is a server already wrapped, so running it twice changes nothing.
//!
//! `--dry-run` prints a unified diff and writes nothing. Otherwise the old
//! file is kept as `FILE.bak.<UTC timestamp>` and the new one replaces it
//! atomically (temporary file in the same directory, fsync, rename), with
//! the old file's mode and owner.
use std::{
    fs,
    io::Write,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use jsonc_parser::{
    cst::{CstInputValue, CstObject, CstRootNode},
    ParseOptions,
};
use serde_json::Value;

/// Root-owned policies, one per server name (`run --server NAME`).
pub const POLICY_DIR: &str = "/etc/mcp-warden/policies";

/// Keys under which clients keep their servers, outermost first.
const SERVER_TABLES: &[&[&str]] = &[&["mcpServers"], &["servers"], &["mcp", "servers"]];

#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error(
        "{}: no MCP servers in it (looked for \"mcpServers\", \"servers\" and \"mcp\".\"servers\")",
        path.display()
    )]
    NoServers { path: PathBuf },
    #[error("{}: {what}: {source}", path.display())]
    Write {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What happened to one server entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Now runs through `mcp-warden run --server policy`.
    Wrapped { policy: String },
    /// Its command already is `mcp-warden run ...`.
    AlreadyWrapped,
    /// A remote server (url or http/sse type): nothing local to confine.
    Remote,
    /// Left as is, for the reason given.
    Skipped(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReport {
    /// The server's key in the file.
    pub name: String,
    pub outcome: Outcome,
    /// Something the user should know (missing policy, renamed policy).
    pub note: Option<String>,
}

/// The result of wrapping a configuration text.
#[derive(Debug)]
pub struct Wrapped {
    pub text: String,
    pub servers: Vec<ServerReport>,
}

impl Wrapped {
    pub fn changed(&self) -> bool {
        self.servers
            .iter()
            .any(|s| matches!(s.outcome, Outcome::Wrapped { .. }))
    }
}

/// How to wrap: which mcp-warden the client should start, and where the
/// policies are looked up (only to warn when one is missing).
#[derive(Debug, Clone)]
pub struct Options {
    pub warden: String,
    pub policy_dir: PathBuf,
}

/// Wrap every local server in `text` (the contents of `path`, named in
/// errors).
pub fn wrap_text(text: &str, path: &Path, opts: &Options) -> Result<Wrapped, WrapError> {
    let root =
        CstRootNode::parse(text, &ParseOptions::default()).map_err(|e| WrapError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    let Some(top) = root.object_value() else {
        return Err(WrapError::Parse {
            path: path.to_path_buf(),
            msg: "the top level is not a JSON object".into(),
        });
    };
    let mut tables = Vec::new();
    for keys in SERVER_TABLES {
        let mut obj = Some(top.clone());
        for k in *keys {
            obj = obj.and_then(|o| o.object_value(k));
        }
        if let Some(o) = obj {
            tables.push(o);
        }
    }
    if tables.is_empty() {
        return Err(WrapError::NoServers {
            path: path.to_path_buf(),
        });
    }
    let mut servers = Vec::new();
    for table in &tables {
        for prop in table.properties() {
            let Some(name) = prop.decoded_name() else {
                continue;
            };
            let report = match prop.object_value() {
                Some(entry) => wrap_entry(&name, &entry, opts),
                None => ServerReport {
                    name: name.clone(),
                    outcome: Outcome::Skipped("not an object".into()),
                    note: None,
                },
            };
            servers.push(report);
        }
    }
    Ok(Wrapped {
        text: root.to_string(),
        servers,
    })
}

/// A policy name usable as `/etc/mcp-warden/policies/NAME.toml`: what the
/// server key is, with anything but `[A-Za-z0-9._-]` made `-`.
pub fn policy_name(server: &str) -> String {
    let s: String = server
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "server".into()
    } else {
        s
    }
}

fn is_warden(command: &str) -> bool {
    Path::new(command)
        .file_name()
        .is_some_and(|f| f == "mcp-warden")
}

fn wrap_entry(name: &str, entry: &CstObject, opts: &Options) -> ServerReport {
    let report = |outcome, note: Option<String>| ServerReport {
        name: name.to_string(),
        outcome,
        note,
    };
    let value = entry.to_serde_value().unwrap_or(Value::Null);
    let ty = value.get("type").and_then(Value::as_str);
    if value.get("url").is_some() || matches!(ty, Some(t) if t != "stdio") {
        return report(Outcome::Remote, None);
    }
    let Some(command) = value.get("command").and_then(Value::as_str) else {
        return report(Outcome::Skipped("no \"command\"".into()), None);
    };
    let args: Vec<Value> = match value.get("args") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return report(Outcome::Skipped("\"args\" is not an array".into()), None),
    };
    if is_warden(command) && args.first().and_then(Value::as_str) == Some("run") {
        return report(Outcome::AlreadyWrapped, None);
    }
    let (Some(cmd_prop), Some(cmd_lit)) = (
        entry.get("command"),
        entry
            .get("command")
            .and_then(|p| p.value())
            .and_then(|v| v.as_string_lit()),
    ) else {
        return report(Outcome::Skipped("no \"command\" string".into()), None);
    };
    let policy = policy_name(name);
    let prefix = [
        "run".to_string(),
        "--server".to_string(),
        policy.clone(),
        "--".to_string(),
        command.to_string(),
    ];
    let all: Vec<CstInputValue> = prefix
        .iter()
        .cloned()
        .chain(args.iter().filter_map(|a| a.as_str().map(str::to_string)))
        .map(CstInputValue::String)
        .collect();
    match entry.array_value("args") {
        // A multi-line array gets the new elements on lines of their own.
        Some(arr) if arr.to_string().contains('\n') => {
            for (i, a) in prefix.iter().enumerate() {
                arr.insert(i, CstInputValue::String(a.clone()));
            }
        }
        // A one-line array is written anew, on one line.
        Some(_) if all.len() == prefix.len() + args.len() => {
            if let Some(p) = entry.get("args") {
                p.set_value(CstInputValue::Array(all));
            }
        }
        Some(_) => {
            return report(
                Outcome::Skipped("\"args\" holds something other than strings".into()),
                None,
            )
        }
        None => {
            let items = prefix.iter().cloned().map(CstInputValue::String).collect();
            entry.insert(
                cmd_prop.property_index() + 1,
                "args",
                CstInputValue::Array(items),
            );
        }
    }
    cmd_lit.replace_with(CstInputValue::String(opts.warden.clone()));
    let mut notes = Vec::new();
    if policy != name {
        notes.push(format!(
            "policy name {policy:?} (from the server name {name:?})"
        ));
    }
    let file = opts.policy_dir.join(format!("{policy}.toml"));
    if !file.exists() {
        notes.push(format!(
            "no policy {} yet: the agent refuses to start the server until there is one \
             (write it with `mcp-warden learn`)",
            file.display()
        ));
    }
    report(
        Outcome::Wrapped { policy },
        (!notes.is_empty()).then(|| notes.join("; ")),
    )
}

/// A unified diff of `old` -> `new`, labelled with `path`.
pub fn unified_diff(old: &str, new: &str, path: &Path) -> String {
    let p = path.display().to_string();
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&p, &format!("{p} (wrapped)"))
        .to_string()
}

/// Where the backup of `path` goes: `path.bak.<YYYYmmddTHHMMSSZ>`, with a
/// `-N` suffix if that exists already.
fn backup_path(path: &Path) -> PathBuf {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let stamp = time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_else(|_| "0".into());
    let base = format!("{}.bak.{stamp}", path.display());
    let mut p = PathBuf::from(&base);
    let mut n = 1;
    while p.exists() {
        p = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    p
}

/// Keep a backup of `path` and replace it with `text` atomically. Returns
/// the backup's path.
pub fn replace_file(path: &Path, text: &str) -> Result<PathBuf, WrapError> {
    let werr = |what, p: &Path| {
        let p = p.to_path_buf();
        move |source| WrapError::Write {
            path: p,
            what,
            source,
        }
    };
    // Write through a symlink to the file it names, not over the link.
    let target = fs::canonicalize(path).map_err(werr("resolving", path))?;
    let meta = fs::metadata(&target).map_err(werr("stat", &target))?;
    let mode = meta.permissions().mode() & 0o7777;
    let backup = backup_path(path);
    fs::copy(&target, &backup).map_err(werr("writing the backup", &backup))?;
    let dir = target.parent().unwrap_or(Path::new("/"));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.mcp-warden-{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(WrapError::Write {
            path: tmp,
            what: "writing the new file",
            source: e,
        });
    }
    if let Err(e) = fs::rename(&tmp, &target) {
        let _ = fs::remove_file(&tmp);
        return Err(WrapError::Write {
            path: target,
            what: "replacing",
            source: e,
        });
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(backup)
}

/// The mcp-warden a client should start: this binary, by absolute path
/// (clients often start servers with a minimal PATH).
pub fn default_warden() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| fs::canonicalize(p).ok())
        .filter(|p| p.file_name().is_some_and(|f| f == "mcp-warden"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/usr/bin/mcp-warden".into())
}

/// `mcp-warden wrap-config`. Returns the exit status.
pub fn main(file: &Path, dry_run: bool, warden: Option<String>) -> i32 {
    let opts = Options {
        warden: warden.unwrap_or_else(default_warden),
        policy_dir: PathBuf::from(POLICY_DIR),
    };
    match run(file, dry_run, &opts, &mut std::io::stdout()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mcp-warden: {e}");
            1
        }
    }
}

/// The command's work, printing to `out` (tests pass a buffer).
pub fn run(
    file: &Path,
    dry_run: bool,
    opts: &Options,
    out: &mut dyn Write,
) -> Result<(), WrapError> {
    let old = fs::read_to_string(file).map_err(|source| WrapError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let w = wrap_text(&old, file, opts)?;
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    for s in &w.servers {
        let what = match &s.outcome {
            Outcome::Wrapped { policy } => format!("wrapped (policy {policy})"),
            Outcome::AlreadyWrapped => "already wrapped".into(),
            Outcome::Remote => {
                "remote (url) server, left as is: mcp-warden confines local processes".into()
            }
            Outcome::Skipped(why) => format!("left as is: {why}"),
        };
        let note = s
            .note
            .as_ref()
            .map(|n| format!(" - {n}"))
            .unwrap_or_default();
        say(out, format!("{}: {what}{note}", s.name));
    }
    if !w.changed() {
        say(out, format!("{}: nothing to change", file.display()));
        return Ok(());
    }
    if dry_run {
        let _ = write!(out, "{}", unified_diff(&old, &w.text, file));
        say(out, "dry run: nothing written".into());
        return Ok(());
    }
    let backup = replace_file(file, &w.text)?;
    say(
        out,
        format!(
            "{} rewritten; the old one is {}",
            file.display(),
            backup.display()
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> Options {
        Options {
            warden: "/usr/bin/mcp-warden".into(),
            policy_dir: dir.to_path_buf(),
        }
    }

    fn nowhere() -> Options {
        opts(Path::new("/nonexistent/mcp-warden-policies"))
    }

    fn wrap(text: &str) -> Wrapped {
        wrap_text(text, Path::new("cfg.json"), &nowhere()).expect("wraps")
    }

    fn json(text: &str) -> Value {
        jsonc_parser::parse_to_serde_value::<Value>(text, &ParseOptions::default()).expect("parses")
    }

    const CLAUDE: &str = r#"{
  "globalShortcut": "Ctrl+Space",
  "mcpServers": {
    "filesystem": {
      "command": "npx",
      "args": [
        "-y",
        "@modelcontextprotocol/server-filesystem",
        "/home/ann/work"
      ],
      "env": {
        "DEBUG": "1"
      }
    },
    "git": {
      "command": "uvx",
      "args": ["mcp-server-git", "--repository", "/home/ann/src/x"]
    },
    "time": {
      "env": {"TZ": "UTC"},
      "command": "/usr/local/bin/mcp-time"
    }
  }
}
"#;

    #[test]
    fn claude_desktop() {
        let w = wrap(CLAUDE);
        let v = json(&w.text);
        let fs = &v["mcpServers"]["filesystem"];
        assert_eq!(fs["command"], "/usr/bin/mcp-warden");
        assert_eq!(
            fs["args"],
            serde_json::json!([
                "run",
                "--server",
                "filesystem",
                "--",
                "npx",
                "-y",
                "@modelcontextprotocol/server-filesystem",
                "/home/ann/work"
            ])
        );
        assert_eq!(fs["env"]["DEBUG"], "1", "env kept");
        assert_eq!(
            v["mcpServers"]["git"]["args"],
            serde_json::json!([
                "run",
                "--server",
                "git",
                "--",
                "uvx",
                "mcp-server-git",
                "--repository",
                "/home/ann/src/x"
            ])
        );
        // No args before: an args array is added right after command.
        let t = &v["mcpServers"]["time"];
        assert_eq!(
            t["args"],
            serde_json::json!(["run", "--server", "time", "--", "/usr/local/bin/mcp-time"])
        );
        let keys: Vec<&String> = t.as_object().expect("obj").keys().collect();
        assert_eq!(v["globalShortcut"], "Ctrl+Space", "other settings kept");
        // Key order as written (the file text, not serde's map order).
        let env_at = w.text.find("\"TZ\"").expect("env");
        let cmd_at = w.text.rfind("\"command\"").expect("command");
        let args_at = w.text.rfind("\"args\"").expect("args");
        assert!(env_at < cmd_at && cmd_at < args_at, "{}", w.text);
        assert_eq!(keys.len(), 3);
        assert!(w.text.starts_with("{\n  \"globalShortcut\""), "{}", w.text);
        assert_eq!(
            w.servers
                .iter()
                .map(|s| s.outcome.clone())
                .collect::<Vec<_>>(),
            vec![
                Outcome::Wrapped {
                    policy: "filesystem".into()
                },
                Outcome::Wrapped {
                    policy: "git".into()
                },
                Outcome::Wrapped {
                    policy: "time".into()
                },
            ]
        );
        // Only command and args lines change: everything else is the same text.
        let diff = unified_diff(CLAUDE, &w.text, Path::new("c.json"));
        for l in diff
            .lines()
            .filter(|l| l.starts_with('-') && !l.starts_with("---"))
        {
            assert!(
                l.contains("\"command\"") || l.contains("\"args\""),
                "unexpected removal {l:?} in\n{diff}"
            );
        }
    }

    #[test]
    fn idempotent() {
        let once = wrap(CLAUDE);
        let twice = wrap(&once.text);
        assert_eq!(once.text, twice.text);
        assert!(!twice.changed());
        assert!(twice
            .servers
            .iter()
            .all(|s| s.outcome == Outcome::AlreadyWrapped));
        // Wrapped by another install path (PATH lookup) counts as wrapped too.
        let other = r#"{"mcpServers": {"a": {"command": "mcp-warden", "args": ["run", "--server", "a", "--", "x"]}}}"#;
        assert!(!wrap(other).changed());
    }

    const VSCODE: &str = r#"{
  // Inputs VS Code prompts for; untouched.
  "inputs": [
    {
      "type": "promptString",
      "id": "github-token",
      "description": "GitHub token",
      "password": true
    }
  ],
  "servers": {
    "github": {
      "type": "http",
      "url": "https://api.githubcopilot.com/mcp/",
      "headers": {"Authorization": "Bearer ${input:github-token}"}
    },
    "fetch": {
      "type": "stdio",
      "command": "uvx",
      "args": ["mcp-server-fetch"], // trailing comment
    },
    "memory": {
      "command": "npx",
      "args": ["-y", "@modelcontextprotocol/server-memory"],
      "envFile": "${workspaceFolder}/.env"
    },
    "sse-one": {"type": "sse", "url": "http://localhost:3000/sse"}
  }
}
"#;

    #[test]
    fn vscode_mcp_json_with_comments_inputs_and_remote_servers() {
        let w = wrap(VSCODE);
        assert!(w.text.contains("// Inputs VS Code prompts for; untouched."));
        assert!(
            w.text.contains(
                r#""args": ["run", "--server", "fetch", "--", "uvx", "mcp-server-fetch"], // trailing comment"#
            ),
            "{}",
            w.text
        );
        let v = json(&w.text);
        assert_eq!(v["inputs"], json(VSCODE)["inputs"]);
        assert_eq!(v["servers"]["github"], json(VSCODE)["servers"]["github"]);
        assert_eq!(v["servers"]["sse-one"], json(VSCODE)["servers"]["sse-one"]);
        assert_eq!(v["servers"]["fetch"]["type"], "stdio");
        assert_eq!(v["servers"]["fetch"]["command"], "/usr/bin/mcp-warden");
        assert_eq!(
            v["servers"]["fetch"]["args"],
            serde_json::json!(["run", "--server", "fetch", "--", "uvx", "mcp-server-fetch"])
        );
        assert_eq!(v["servers"]["memory"]["envFile"], "${workspaceFolder}/.env");
        let by_name = |n: &str| {
            w.servers
                .iter()
                .find(|s| s.name == n)
                .unwrap_or_else(|| panic!("{n} reported"))
                .clone()
        };
        assert_eq!(by_name("github").outcome, Outcome::Remote);
        assert_eq!(by_name("sse-one").outcome, Outcome::Remote);
        assert_eq!(
            by_name("memory").outcome,
            Outcome::Wrapped {
                policy: "memory".into()
            }
        );
        assert!(!wrap(&w.text).changed(), "idempotent");
    }

    #[test]
    fn vscode_settings_json_and_cursor() {
        let settings = r#"{
    "editor.fontSize": 14,
    "mcp": {
        "servers": {
            "sqlite": {"command": "uvx", "args": ["mcp-server-sqlite", "--db-path", "x.db"]}
        }
    }
}"#;
        let v = json(&wrap(settings).text);
        assert_eq!(v["mcp"]["servers"]["sqlite"]["args"][2], "sqlite");
        assert_eq!(v["editor.fontSize"], 14);

        // Cursor's ~/.cursor/mcp.json: the Claude shape, plus url servers.
        let cursor = r#"{"mcpServers": {"remote": {"url": "http://localhost:8000/mcp"}, "My Tools!": {"command": "node", "args": ["srv.js"]}}}"#;
        let w = wrap(cursor);
        let v = json(&w.text);
        assert_eq!(
            v["mcpServers"]["remote"],
            json(cursor)["mcpServers"]["remote"]
        );
        assert_eq!(
            v["mcpServers"]["My Tools!"]["args"],
            serde_json::json!(["run", "--server", "My-Tools-", "--", "node", "srv.js"])
        );
        let r = w
            .servers
            .iter()
            .find(|s| s.name == "My Tools!")
            .expect("reported");
        assert!(
            r.note.as_ref().expect("note").contains("My-Tools-"),
            "{r:?}"
        );
    }

    #[test]
    fn errors_and_odd_entries() {
        let e = wrap_text("{\"mcpServers\": {", Path::new("x.json"), &nowhere())
            .expect_err("truncated");
        assert!(e.to_string().starts_with("x.json: "), "{e}");
        assert!(e.to_string().contains("line"), "{e}");
        let e = wrap_text("{\"a\": 1}", Path::new("x.json"), &nowhere()).expect_err("none");
        assert!(matches!(e, WrapError::NoServers { .. }), "{e}");
        let e = wrap_text("[1]", Path::new("x.json"), &nowhere()).expect_err("array");
        assert!(e.to_string().contains("not a JSON object"), "{e}");
        let w = wrap(
            r#"{"mcpServers": {"a": 3, "b": {"args": []}, "c": {"command": "x", "args": "y"}}}"#,
        );
        assert!(!w.changed());
        assert!(w
            .servers
            .iter()
            .all(|s| matches!(s.outcome, Outcome::Skipped(_))));
    }

    #[test]
    fn policy_notes() {
        let dir = std::env::temp_dir().join(format!("mw-wrap-pol-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("git.toml"), "version = 1\nserver = \"git\"\n").expect("write");
        let w = wrap_text(CLAUDE, Path::new("c.json"), &opts(&dir)).expect("wraps");
        let note = |n: &str| {
            w.servers
                .iter()
                .find(|s| s.name == n)
                .and_then(|s| s.note.clone())
        };
        assert_eq!(note("git"), None, "policy present");
        assert!(
            note("filesystem")
                .expect("missing policy noted")
                .contains("filesystem.toml"),
            "{w:?}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn dry_run_prints_a_diff_and_writes_nothing_then_a_real_run_keeps_a_backup() {
        let dir = std::env::temp_dir().join(format!("mw-wrap-run-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("claude_desktop_config.json");
        fs::write(&file, CLAUDE).expect("write");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).expect("chmod");

        let mut out = Vec::new();
        run(&file, true, &nowhere(), &mut out).expect("dry run");
        let out = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            fs::read_to_string(&file).expect("read"),
            CLAUDE,
            "unchanged"
        );
        assert!(out.contains(&format!("--- {}", file.display())), "{out}");
        assert!(out.contains("-      \"command\": \"npx\","), "{out}");
        assert!(
            out.contains("+      \"command\": \"/usr/bin/mcp-warden\","),
            "{out}"
        );
        assert!(out.contains("dry run: nothing written"), "{out}");
        let entries = || fs::read_dir(&dir).expect("ls").count();
        assert_eq!(entries(), 1, "no backup, no temp file");

        let mut out = Vec::new();
        run(&file, false, &nowhere(), &mut out).expect("real run");
        let out = String::from_utf8(out).expect("utf-8");
        let new = fs::read_to_string(&file).expect("read");
        assert_eq!(new, wrap(CLAUDE).text);
        assert_eq!(
            fs::metadata(&file).expect("stat").permissions().mode() & 0o777,
            0o600,
            "mode kept"
        );
        let backups: Vec<PathBuf> = fs::read_dir(&dir)
            .expect("ls")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().contains(".bak."))
            .collect();
        assert_eq!(backups.len(), 1, "{backups:?}");
        assert_eq!(fs::read_to_string(&backups[0]).expect("read"), CLAUDE);
        assert!(out.contains(&backups[0].display().to_string()), "{out}");
        assert_eq!(entries(), 2, "file and backup, no temp file left");

        // Second run: nothing to change, no second backup.
        let mut out = Vec::new();
        run(&file, false, &nowhere(), &mut out).expect("again");
        assert!(String::from_utf8_lossy(&out).contains("nothing to change"));
        assert_eq!(entries(), 2);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn writes_through_a_symlink() {
        let dir = std::env::temp_dir().join(format!("mw-wrap-link-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let real = dir.join("real.json");
        let link = dir.join("link.json");
        fs::write(&real, CLAUDE).expect("write");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        run(&link, false, &nowhere(), &mut Vec::new()).expect("run");
        assert!(fs::symlink_metadata(&link)
            .expect("lstat")
            .file_type()
            .is_symlink());
        assert_eq!(fs::read_to_string(&real).expect("read"), wrap(CLAUDE).text);
        let _ = fs::remove_dir_all(&dir);
    }
}
