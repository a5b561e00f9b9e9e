//! The learned policy: rules per scope and section with how often each was
//! seen; built from observations, merged with an earlier learned policy,
//! and written as commented policy v1 TOML.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use toml_edit::{DocumentMut, Item, Value};

use super::collapse::{self, Context};
use super::record::{Observations, Scope, Section, Seen};
use super::LearnError;

/// One rule of the learned policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub count: u64,
    /// Notes for the comment ("at start", "runtime/library tree", ...).
    pub notes: BTreeSet<String>,
}

/// rule text (with `${HOME}`) -> entry.
pub type RuleSet = BTreeMap<String, Entry>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub server: String,
    pub rules: BTreeMap<Scope, BTreeMap<Section, RuleSet>>,
    /// tools.allow, with the number of calls seen.
    pub tools: BTreeMap<String, u64>,
    /// Header comment lines (without `# `).
    pub header: Vec<String>,
}

/// `${HOME}` for the home prefix.
pub fn with_home_var(path: &str, home: &str) -> String {
    let home = home.trim_end_matches('/');
    if home.is_empty() || home == "/" {
        return path.to_string();
    }
    if path == home {
        return "${HOME}".to_string();
    }
    match path.strip_prefix(&format!("{home}/")) {
        Some(rest) => format!("${{HOME}}/{rest}"),
        None => path.to_string(),
    }
}

/// Does `rule` (same section) grant `target`? Subtree covers what is below
/// it; otherwise equality.
fn covers(rule: &str, target: &str) -> bool {
    if rule == target {
        return true;
    }
    match rule.strip_suffix("/**") {
        Some("") => target.starts_with('/') || target.starts_with("${"),
        Some(dir) => {
            let t = target.strip_suffix("/**").unwrap_or(target);
            t == dir || t.starts_with(&format!("{dir}/"))
        }
        None => false,
    }
}

fn notes_for(s: &Seen, why: Option<&str>, paths: usize, scope: &Scope) -> BTreeSet<String> {
    let mut n = BTreeSet::new();
    if *scope == Scope::Server {
        match (s.at_start, s.later) {
            (true, true) => n.insert("at start and between calls".to_string()),
            (true, false) => n.insert("at start".to_string()),
            (false, true) => n.insert("between calls".to_string()),
            _ => false,
        };
    }
    if let Some(w) = why {
        n.insert(w.to_string());
    }
    if paths > 1 {
        n.insert(format!("{paths} paths"));
    }
    n
}

impl Learned {
    /// Build the policy from one run's observations.
    pub fn build(server: &str, obs: &Observations, cx: &Context) -> Learned {
        let mut by: BTreeMap<(Scope, Section), BTreeMap<String, Seen>> = BTreeMap::new();
        for ((scope, section, target), s) in &obs.seen {
            by.entry((scope.clone(), *section))
                .or_default()
                .insert(target.clone(), s.clone());
        }
        let mut l = Learned {
            server: server.to_string(),
            tools: obs.tools_called.clone(),
            ..Default::default()
        };
        // (verb, reason) -> paths left out, for one note each.
        let mut left: BTreeMap<(&str, &str), BTreeSet<String>> = BTreeMap::new();
        for ((scope, section), targets) in by {
            let set = l
                .rules
                .entry(scope.clone())
                .or_default()
                .entry(section)
                .or_default();
            // Files collapse into trees; programs and sockets stay exact
            // (an exec right on a tree would let any binary in it run).
            if matches!(section, Section::Read | Section::Write) {
                let (rules, left_out) = collapse::collapse(cx, &targets);
                for c in rules {
                    let e = set.entry(with_home_var(&c.rule, &cx.home)).or_default();
                    e.count += c.seen.count;
                    e.notes.extend(notes_for(&c.seen, c.why, c.paths, &scope));
                }
                for (p, why) in left_out {
                    left.entry((section.verb(), why))
                        .or_default()
                        .insert(with_home_var(&p, &cx.home));
                }
            } else {
                for (t, s) in targets {
                    let t = if section.is_path() {
                        with_home_var(&t, &cx.home)
                    } else {
                        t
                    };
                    let e = set.entry(t.clone()).or_default();
                    e.count += s.count;
                    e.notes.extend(notes_for(&s, None, 1, &scope));
                    if !s.resolved.is_empty() {
                        let ips: Vec<&str> = s.resolved.iter().map(String::as_str).collect();
                        e.notes
                            .insert(format!("resolved by the server to {}", ips.join(", ")));
                    }
                    if section == Section::Connect && t.ends_with(":53") {
                        e.notes.insert("DNS".to_string());
                    }
                }
            }
        }
        if !obs.names.is_empty() {
            l.header.push("DNS names the server resolved:".to_string());
            for (name, n) in &obs.names {
                let to = if n.addrs.is_empty() {
                    "no address".to_string()
                } else {
                    n.addrs.iter().cloned().collect::<Vec<_>>().join(", ")
                };
                l.header
                    .push(format!("  {name} ({}: {to})", plural(n.count, "answer")));
            }
        }
        for ((verb, why), paths) in left {
            let paths: Vec<String> = paths.into_iter().collect();
            l.header
                .push(format!("not granted: {verb} {}", paths.join(", ")));
            l.header.push(format!("  ({why})"));
        }
        l.normalize();
        l
    }

    /// No duplicates: drop a rule another rule of the same key covers
    /// (crediting its count to the wider one), and a tool's rule the
    /// server's rules already cover. Tools the policy calls are kept in
    /// `tools.allow`; tools with no rules left lose their table.
    pub fn normalize(&mut self) {
        for sections in self.rules.values_mut() {
            for set in sections.values_mut() {
                dedup_set(set);
            }
        }
        let server = self.rules.get(&Scope::Server).cloned().unwrap_or_default();
        for (scope, sections) in self.rules.iter_mut() {
            if *scope == Scope::Server {
                continue;
            }
            for (section, set) in sections.iter_mut() {
                let Some(srv) = server.get(section) else {
                    continue;
                };
                set.retain(|t, _| !srv.keys().any(|r| covers(r, t)));
            }
        }
        for sections in self.rules.values_mut() {
            sections.retain(|_, s| !s.is_empty());
        }
        self.rules
            .retain(|scope, s| *scope == Scope::Server || !s.is_empty());
        // A tool with rules was called; make sure it is allowed.
        for scope in self.rules.keys() {
            if let Scope::Tool(t) = scope {
                self.tools.entry(t.clone()).or_insert(0);
            }
        }
    }

    /// Union with `other` (an earlier learned policy): counts add up.
    pub fn merge(&mut self, other: &Learned) {
        for (scope, sections) in &other.rules {
            for (section, set) in sections {
                let mine = self
                    .rules
                    .entry(scope.clone())
                    .or_default()
                    .entry(*section)
                    .or_default();
                for (t, e) in set {
                    let m = mine.entry(t.clone()).or_default();
                    m.count += e.count;
                    m.notes.extend(e.notes.iter().cloned());
                }
            }
        }
        for (t, n) in &other.tools {
            *self.tools.entry(t.clone()).or_default() += n;
        }
        self.normalize();
    }

    /// Drop what a policy cannot express (a path with a glob character or a
    /// `${`, an over-long path, a tool name outside the allowed
    /// characters), each with a note in the header, so that what is
    /// written always passes `mcp-warden check`.
    pub fn drop_unwritable(&mut self, vars: &crate::policy::Vars) {
        use crate::policy::values::{check_tool_name, parse_addr, parse_path, PathKind};
        let mut notes = Vec::new();
        for (scope, sections) in self.rules.iter_mut() {
            for (section, set) in sections.iter_mut() {
                set.retain(|rule, _| {
                    let ok = match section {
                        Section::Read | Section::Write => {
                            parse_path(rule, PathKind::File, vars).is_ok()
                        }
                        Section::Exec => parse_path(rule, PathKind::Exec, vars).is_ok(),
                        Section::Unix => parse_path(rule, PathKind::Unix, vars).is_ok(),
                        Section::Connect => parse_addr(rule, false).is_ok(),
                        Section::Bind => parse_addr(rule, true).is_ok(),
                    };
                    if !ok {
                        notes.push(format!(
                            "not written (a policy cannot express it): {} {rule:?}{}",
                            section.verb(),
                            match scope {
                                Scope::Tool(t) => format!(" in tool {t}"),
                                Scope::Server => String::new(),
                            }
                        ));
                    }
                    ok
                });
            }
        }
        let bad: Vec<String> = self
            .tools
            .keys()
            .filter(|t| check_tool_name(t).is_err())
            .cloned()
            .collect();
        for t in bad {
            notes.push(format!(
                "not written: tool name {t:?} is not a valid policy name"
            ));
            self.tools.remove(&t);
            self.rules.remove(&Scope::Tool(t));
        }
        self.header.extend(notes);
        self.normalize();
    }

    /// Number of rules (every entry of every list, tools.allow excluded).
    pub fn rule_count(&self) -> usize {
        self.rules
            .values()
            .flat_map(|s| s.values())
            .map(BTreeMap::len)
            .sum()
    }

    /// The policy as commented TOML.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        // Header lines may hold anything (the command's arguments): every
        // line of them is a comment line.
        for h in self.header.iter().flat_map(|h| h.lines()) {
            let _ = writeln!(out, "# {h}");
        }
        let _ = writeln!(out, "version = 1");
        let _ = writeln!(out, "server = {}", quote(&self.server));
        let _ = writeln!(out, "mode = \"enforce\"");
        let _ = writeln!(out, "on_violation = \"deny\"");
        let empty = BTreeMap::new();
        let server = self.rules.get(&Scope::Server).unwrap_or(&empty);
        write_sections(&mut out, "", server);
        let _ = writeln!(out, "\n[tools]");
        if self.tools.is_empty() {
            let _ = writeln!(
                out,
                "# No tool was called while learning: every tools/call is refused."
            );
        }
        let _ = writeln!(out, "allow = [");
        for (t, n) in &self.tools {
            let _ = writeln!(out, "    # {}", plural(*n, "call"));
            let _ = writeln!(out, "    {},", quote(t));
        }
        let _ = writeln!(out, "]");
        for (scope, sections) in &self.rules {
            if let Scope::Tool(t) = scope {
                write_sections(&mut out, &format!("tools.{}.", key(t)), sections);
            }
        }
        out
    }

    /// Read a policy written by [`Learned::to_toml`] (or by hand): every
    /// list entry with the count from its `# seen N ...` comment (0 when
    /// there is none). `${HOME}` stays as written. The file must be a valid
    /// policy: the caller checks it with `policy::parse` first.
    pub fn from_toml(text: &str) -> Result<Learned, LearnError> {
        let doc: DocumentMut = text
            .parse()
            .map_err(|e: toml_edit::TomlError| LearnError::Merge(e.to_string()))?;
        let mut l = Learned {
            server: doc
                .get("server")
                .and_then(Item::as_str)
                .unwrap_or("")
                .to_string(),
            ..Default::default()
        };
        read_sections(doc.as_table(), Scope::Server, &mut l);
        if let Some(tools) = doc.get("tools").and_then(Item::as_table_like) {
            if let Some(arr) = tools.get("allow").and_then(Item::as_array) {
                for v in arr.iter() {
                    if let Some(s) = v.as_str() {
                        l.tools.insert(s.to_string(), comment_count(v));
                    }
                }
            }
            for (name, item) in tools.iter() {
                if name == "allow" {
                    continue;
                }
                if let Some(t) = item.as_table_like() {
                    read_sections(t, Scope::Tool(name.to_string()), &mut l);
                }
            }
        }
        Ok(l)
    }
}

fn dedup_set(set: &mut RuleSet) {
    let keys: Vec<String> = set.keys().cloned().collect();
    for k in &keys {
        let wider = keys
            .iter()
            .filter(|r| *r != k && covers(r, k))
            .max_by_key(|r| r.len());
        if let Some(w) = wider {
            if let Some(e) = set.remove(k) {
                if let Some(we) = set.get_mut(w) {
                    we.count += e.count;
                }
            }
        }
    }
}

fn read_sections(t: &dyn toml_edit::TableLike, scope: Scope, l: &mut Learned) {
    for section in Section::ALL {
        let (table, k) = section.key();
        let Some(arr) = t
            .get(table)
            .and_then(Item::as_table_like)
            .and_then(|tt| tt.get(k))
            .and_then(Item::as_array)
        else {
            continue;
        };
        let set = l
            .rules
            .entry(scope.clone())
            .or_default()
            .entry(section)
            .or_default();
        for v in arr.iter() {
            if let Some(s) = v.as_str() {
                let e = set.entry(s.to_string()).or_default();
                e.count += comment_count(v);
                e.notes.extend(comment_notes(v));
            }
        }
    }
}

fn comment_text(v: &Value) -> String {
    v.decor()
        .prefix()
        .and_then(|p| p.as_str())
        .unwrap_or("")
        .to_string()
}

/// N of a `# seen N times` or `# N calls` comment before the value.
fn comment_count(v: &Value) -> u64 {
    let c = comment_text(v);
    for line in c.lines() {
        let l = line.trim().trim_start_matches('#').trim();
        let l = l.strip_prefix("seen ").unwrap_or(l);
        if let Some(n) = l.split_whitespace().next().and_then(|w| w.parse().ok()) {
            return n;
        }
    }
    0
}

/// The notes after `seen N times:` of the comment before the value.
fn comment_notes(v: &Value) -> BTreeSet<String> {
    let c = comment_text(v);
    c.lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .filter_map(|l| l.split_once(':').map(|(_, r)| r.to_string()))
        .flat_map(|r| {
            r.split(';')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn write_sections(out: &mut String, prefix: &str, sections: &BTreeMap<Section, RuleSet>) {
    for table in ["files", "network", "exec"] {
        let here: Vec<(Section, &RuleSet)> = Section::ALL
            .iter()
            .filter(|s| s.key().0 == table)
            .filter_map(|s| sections.get(s).map(|r| (*s, r)))
            .filter(|(_, r)| !r.is_empty())
            .collect();
        if here.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n[{prefix}{table}]");
        for (section, set) in here {
            let _ = writeln!(out, "{} = [", section.key().1);
            for (rule, e) in set {
                let mut c = format!("seen {}", plural(e.count, "time"));
                if !e.notes.is_empty() {
                    c.push_str(": ");
                    c.push_str(&e.notes.iter().cloned().collect::<Vec<_>>().join("; "));
                }
                let _ = writeln!(out, "    # {c}");
                let _ = writeln!(out, "    {},", quote(rule));
            }
            let _ = writeln!(out, "]");
        }
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    Value::from(s).to_string().trim().to_string()
}

/// A TOML key: bare when it can be.
fn key(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        s.to_string()
    } else {
        quote(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{parse, Vars};

    fn vars() -> Vars {
        Vars::ann()
    }

    fn obs() -> Observations {
        let mut o = Observations::default();
        let mut put = |scope: Scope, sec: Section, t: &str, n: u64, dw: bool| {
            o.seen.insert(
                (scope, sec, t.to_string()),
                Seen {
                    count: n,
                    at_start: true,
                    later: false,
                    dir_write: dw,
                    ..Default::default()
                },
            );
        };
        put(Scope::Server, Section::Read, "/usr/lib/a.so", 3, false);
        put(Scope::Server, Section::Read, "/usr/lib/b.so", 2, false);
        put(Scope::Server, Section::Read, "/home/ann/.npmrc", 1, false);
        put(Scope::Server, Section::Connect, "127.0.0.53:53", 4, false);
        let rf = Scope::Tool("read_file".into());
        put(rf.clone(), Section::Read, "/usr/lib/c.so", 1, false);
        put(rf.clone(), Section::Read, "/srv/data/x", 1, false);
        put(
            Scope::Tool("ns.write".into()),
            Section::Write,
            "/srv/out/new",
            1,
            true,
        );
        put(
            Scope::Tool("ns.write".into()),
            Section::Connect,
            "[::1]:8080",
            1,
            false,
        );
        o.tools_called.insert("read_file".into(), 2);
        o.tools_called.insert("ns.write".into(), 1);
        o.tools_called.insert("list".into(), 1);
        o
    }

    #[test]
    fn programs_stay_exact() {
        let mut o = Observations::default();
        for b in ["a", "b", "c"] {
            o.seen.insert(
                (
                    Scope::Server,
                    Section::Exec,
                    format!("/usr/lib/git-core/git-{b}"),
                ),
                Seen {
                    count: 1,
                    ..Default::default()
                },
            );
        }
        let cx = Context {
            home: "/home/ann".into(),
            trees: vec![],
        };
        let l = Learned::build("git", &o, &cx);
        let exec = &l.rules[&Scope::Server][&Section::Exec];
        assert_eq!(exec.len(), 3, "{exec:?}");
        assert!(exec.contains_key("/usr/lib/git-core/git-a"));
    }

    #[test]
    fn build_write_parse_merge() {
        let cx = Context {
            home: "/home/ann".into(),
            trees: vec![],
        };
        let l = Learned::build("fs", &obs(), &cx);
        let text = l.to_toml();
        let p = parse(&text, "learned.toml", &vars()).unwrap_or_else(|d| {
            panic!(
                "{text}\n{}",
                d.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert_eq!(p.tools_allow.as_ref().map(Vec::len), Some(3), "{text}");
        // /usr/lib/c.so is covered by the server's /usr/lib/**.
        let rf = p
            .tools
            .iter()
            .find(|t| t.name == "read_file")
            .expect("read_file");
        assert_eq!(rf.rules.files.read.len(), 1, "{text}");
        assert!(text.contains("\"${HOME}/.npmrc\""), "{text}");
        assert!(
            text.contains("# seen 5 times: 2 paths; at start; runtime/library tree"),
            "{text}"
        );
        assert!(text.contains("[tools.\"ns.write\".files]"), "{text}");
        assert!(text.contains("\"/srv/out/**\""), "{text}");
        assert_eq!(l.rule_count(), 6, "{text}");

        // Read back: the same rules and counts.
        let back = Learned::from_toml(&text).unwrap();
        assert_eq!(back.rules, l.rules, "{text}");
        assert_eq!(back.tools, l.tools);
        // Merge with itself: counts double, nothing repeats.
        let mut m = l.clone();
        m.merge(&back);
        assert_eq!(m.rule_count(), l.rule_count());
        assert_eq!(m.tools["read_file"], 4);
        let e = &m.rules[&Scope::Server][&Section::Read]["/usr/lib/**"];
        assert_eq!(e.count, 10);
        // A wider rule from the other run absorbs a narrower one.
        let mut other = Learned::default();
        other
            .rules
            .entry(Scope::Tool("read_file".into()))
            .or_default()
            .entry(Section::Read)
            .or_default()
            .insert(
                "/srv/**".into(),
                Entry {
                    count: 7,
                    ..Default::default()
                },
            );
        m.merge(&other);
        let rf = &m.rules[&Scope::Tool("read_file".into())][&Section::Read];
        assert_eq!(rf.keys().collect::<Vec<_>>(), vec!["/srv/**"]);
        assert_eq!(rf["/srv/**"].count, 9);
        parse(&m.to_toml(), "merged.toml", &vars()).unwrap();

        // What a policy cannot say is left out, with a note.
        let mut odd = Learned::build("fs", &obs(), &cx);
        odd.rules
            .entry(Scope::Server)
            .or_default()
            .entry(Section::Read)
            .or_default()
            .insert("/srv/a*b".into(), Entry::default());
        odd.tools.insert("bad name".into(), 1);
        odd.drop_unwritable(&vars());
        let text = odd.to_toml();
        parse(&text, "odd.toml", &vars()).unwrap_or_else(|d| panic!("{text}\n{d:?}"));
        assert!(
            text.contains("# not written (a policy cannot express it): read \"/srv/a*b\""),
            "{text}"
        );
        assert!(!text.contains("\"bad name\","), "{text}");
    }
}
