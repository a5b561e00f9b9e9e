//! The Landlock half of the fallback backend: turn a [`Policy`] into a
//! created (not yet enforced) Landlock ruleset.
//!
//! Landlock cannot switch rules per tool call, so the ruleset grants the
//! UNION of the server's and every tool's rules; per-tool narrowing on this
//! backend is audit + kill, done elsewhere. Everything here runs in the
//! parent; the child only calls `landlock_restrict_self` on the fd
//! (see [`crate::confine::prepared`]).
//!
//! Rights granted per policy line:
//! - `files.read`  -> read file, read dir
//! - `files.write` -> read + write file, every make_*, remove file/dir,
//!   refer (link/rename between directories), truncate
//! - `exec.allow`  -> execute + read
//! - the launched command, its ELF interpreter and every interpreter of its
//!   shebang chain -> execute + read
//!
//! `ioctl_dev` is handled and never granted: a server gets no ioctls on
//! device files it opens itself (the kernel's always-allowed ioctls such as
//! FIONBIO/FIOCLEX still work, and inherited stdio fds are not affected).
//! This keeps TIOCSTI-style injection into a newly opened tty closed.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    Scope, ABI,
};
use serde::Serialize;

use crate::policy::model::{PathRule, Policy, Rules};

/// The newest Landlock ABI whose rights we request. Rights of newer ABIs are
/// not handled until they are tested here (ABI 9's `resolve_unix` would
/// otherwise refuse every pathname unix socket not named in the policy);
/// pathname unix sockets are judged by the eBPF cgroup unix hooks.
/// On an older kernel the crate drops what the kernel lacks (best effort) and
/// the report says `partially_enforced`.
pub const REQUESTED_ABI: ABI = ABI::V7;
const REQUESTED_ABI_NUM: i32 = 7;

/// How deep a shebang chain may go (the kernel stops at 5 levels too).
const MAX_INTERP_DEPTH: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("Landlock is not available on this kernel (create_ruleset version probe: {0})")]
    Unavailable(io::Error),
    #[error("building the Landlock ruleset: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    #[error("Landlock ruleset has no file descriptor (kernel refused every requested right)")]
    NoRulesetFd,
    #[error("launched command {path}: {source}")]
    Command { path: PathBuf, source: io::Error },
}

/// Whether the requested rights are all in force on the running kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    FullyEnforced,
    PartiallyEnforced,
}

/// One rule added to the ruleset (for the report and for tests).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleReport {
    pub path: PathBuf,
    /// "beneath" for a directory (the whole hierarchy), "file" for one file.
    pub kind: &'static str,
    pub access: Vec<&'static str>,
}

/// What the Landlock ruleset enforces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LandlockReport {
    /// ABI the running kernel reports.
    pub kernel_abi: i32,
    /// ABI whose rights were requested ([`REQUESTED_ABI`]).
    pub requested_abi: i32,
    pub enforcement: Enforcement,
    /// File-system rights the ruleset handles (everything not granted by a
    /// rule is refused).
    pub handled_fs: Vec<&'static str>,
    /// Landlock scopes in force ("abstract_unix_socket", "signal").
    pub scopes: Vec<&'static str>,
    pub rules: Vec<RuleReport>,
    /// Directories split because of a `files.deny` inside an allowed tree.
    /// Entries created later directly in them are not readable or writable.
    pub split_dirs: Vec<PathBuf>,
    /// Rules skipped (missing paths, symlinks, hard links, ...), never
    /// replaced by anything wider.
    pub warnings: Vec<String>,
    /// Interpreters (ELF and shebang) added with execute rights.
    pub interpreters: Vec<PathBuf>,
}

/// A created ruleset, ready for `landlock_restrict_self` in the child.
#[derive(Debug)]
pub struct PreparedRuleset {
    pub fd: OwnedFd,
    pub report: LandlockReport,
}

fn read_rights() -> BitFlags<AccessFs> {
    AccessFs::ReadFile | AccessFs::ReadDir
}

fn write_rights() -> BitFlags<AccessFs> {
    read_rights()
        | AccessFs::WriteFile
        | AccessFs::MakeChar
        | AccessFs::MakeDir
        | AccessFs::MakeReg
        | AccessFs::MakeSock
        | AccessFs::MakeFifo
        | AccessFs::MakeBlock
        | AccessFs::MakeSym
        | AccessFs::RemoveFile
        | AccessFs::RemoveDir
        | AccessFs::Refer
        | AccessFs::Truncate
}

fn exec_rights() -> BitFlags<AccessFs> {
    AccessFs::Execute | AccessFs::ReadFile | AccessFs::ReadDir
}

/// Rights that mean something on a non-directory (the kernel refuses a
/// file rule carrying directory-only rights).
fn file_rights() -> BitFlags<AccessFs> {
    AccessFs::Execute
        | AccessFs::WriteFile
        | AccessFs::ReadFile
        | AccessFs::Truncate
        | AccessFs::IoctlDev
}

/// The ABI the running kernel reports (0 or a negative errno if none).
pub fn kernel_abi() -> io::Result<i32> {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION takes a NULL attr and size 0.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v as i32)
}

fn access_names(a: BitFlags<AccessFs>) -> Vec<&'static str> {
    a.iter()
        .map(|r| match r {
            AccessFs::Execute => "execute",
            AccessFs::WriteFile => "write_file",
            AccessFs::ReadFile => "read_file",
            AccessFs::ReadDir => "read_dir",
            AccessFs::RemoveDir => "remove_dir",
            AccessFs::RemoveFile => "remove_file",
            AccessFs::MakeChar => "make_char",
            AccessFs::MakeDir => "make_dir",
            AccessFs::MakeReg => "make_reg",
            AccessFs::MakeSock => "make_sock",
            AccessFs::MakeFifo => "make_fifo",
            AccessFs::MakeBlock => "make_block",
            AccessFs::MakeSym => "make_sym",
            AccessFs::Refer => "refer",
            AccessFs::Truncate => "truncate",
            AccessFs::IoctlDev => "ioctl_dev",
            _ => "other",
        })
        .collect()
}

/// Lexically clean an absolute path (`.`/`..`/duplicate slashes), then
/// resolve symlinks in the longest existing prefix. A path that does not
/// exist yet keeps its missing tail, so a deny on a file that is created
/// later still lands in the right directory.
fn canonical_lenient(p: &Path) -> PathBuf {
    let mut clean = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(s) => clean.push(s),
            Component::ParentDir => {
                clean.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let mut existing = clean.clone();
    let mut tail = Vec::new();
    loop {
        if let Ok(c) = fs::canonicalize(&existing) {
            let mut out = c;
            for t in tail.iter().rev() {
                out.push(t);
            }
            return out;
        }
        match (
            existing.file_name().map(|s| s.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                tail.push(name);
                existing = parent.to_path_buf();
            }
            _ => return clean,
        }
    }
}

/// The set of grants being built: canonical path -> rights.
#[derive(Default)]
struct Grants {
    /// Paths the policy names (subject to `files.deny`).
    policy: BTreeMap<PathBuf, BitFlags<AccessFs>>,
    /// The command and its interpreters: always allowed.
    always: BTreeMap<PathBuf, BitFlags<AccessFs>>,
    warnings: Vec<String>,
}

impl Grants {
    fn add_rule(&mut self, rule: &PathRule, access: BitFlags<AccessFs>, what: &str) {
        let raw = Path::new(rule.path());
        let path = match fs::canonicalize(raw) {
            Ok(p) => p,
            Err(e) => {
                self.warnings.push(format!(
                    "{what} {}: skipped, not present at launch ({e})",
                    raw.display()
                ));
                return;
            }
        };
        let is_dir = fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        if matches!(rule, PathRule::Exact(_)) && is_dir {
            // A Landlock rule on a directory covers its whole hierarchy;
            // granting that for an exact-path rule would widen it.
            self.warnings.push(format!(
                "{what} {}: skipped, an exact rule names a directory (write `{}/**` for the tree)",
                raw.display(),
                raw.display()
            ));
            return;
        }
        *self.policy.entry(path).or_insert(BitFlags::EMPTY) |= access;
    }

    fn add_rules(&mut self, r: &Rules) {
        for p in &r.files.read {
            self.add_rule(p, read_rights(), "files.read");
        }
        for p in &r.files.write {
            self.add_rule(p, write_rights(), "files.write");
        }
        for p in &r.exec.allow {
            self.add_rule(p, exec_rights(), "exec.allow");
        }
    }
}

/// `p` is strictly beneath `dir`.
fn strictly_beneath(p: &Path, dir: &Path) -> bool {
    p != dir && p.starts_with(dir)
}

/// Replace a rule on directory `dir` by rules on each of its entries except
/// the denied ones, recursing into entries that contain a denied path.
fn split_dir(
    dir: &Path,
    access: BitFlags<AccessFs>,
    denies: &[PathBuf],
    out: &mut BTreeMap<PathBuf, BitFlags<AccessFs>>,
    split_dirs: &mut Vec<PathBuf>,
    warnings: &mut Vec<String>,
) {
    split_dirs.push(dir.to_path_buf());
    // A rule on `dir` itself always covers the denied entry beneath it, so
    // the only right we keep there is read_dir (names only), and only when no
    // denied entry is (or could become) a directory whose listing it would
    // reveal.
    let denied_dir_below = denies
        .iter()
        .any(|d| fs::symlink_metadata(d).map(|m| m.is_dir()).unwrap_or(true));
    if access.contains(AccessFs::ReadDir) && !denied_dir_below {
        *out.entry(dir.to_path_buf()).or_insert(BitFlags::EMPTY) |= AccessFs::ReadDir;
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            warnings.push(format!(
                "split {}: cannot list ({e}); nothing beneath it is granted",
                dir.display()
            ));
            return;
        }
    };
    let mut symlinks = 0usize;
    let mut linked = 0usize;
    for entry in entries.flatten() {
        let p = entry.path();
        if denies.contains(&p) {
            continue;
        }
        let meta = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(_) => continue,
        };
        let inner: Vec<PathBuf> = denies
            .iter()
            .filter(|d| strictly_beneath(d, &p))
            .cloned()
            .collect();
        if !inner.is_empty() {
            if meta.is_dir() {
                split_dir(&p, access, &inner, out, split_dirs, warnings);
            }
            // A non-directory cannot contain the denied path: nothing to grant
            // that would reach it, but granting the entry itself is safe.
            else if !meta.file_type().is_symlink() && meta.nlink() == 1 {
                *out.entry(p).or_insert(BitFlags::EMPTY) |= access & file_rights();
            }
            continue;
        }
        if meta.file_type().is_symlink() {
            // The rule would land on the link's target, wherever it is.
            symlinks += 1;
            continue;
        }
        if !meta.is_dir() && meta.nlink() > 1 {
            // A rule is on the inode: it would grant every other name of it,
            // which may be the denied one.
            linked += 1;
            continue;
        }
        let a = if meta.is_dir() {
            access
        } else {
            access & file_rights()
        };
        *out.entry(p).or_insert(BitFlags::EMPTY) |= a;
    }
    if symlinks > 0 || linked > 0 {
        warnings.push(format!(
            "split {}: skipped {symlinks} symlink(s) and {linked} multiply-linked file(s)",
            dir.display()
        ));
    }
}

/// Apply `files.deny` to the policy grants: drop rules equal to a denied
/// path, split trees that contain one. A deny outside every allowed tree
/// needs nothing (it is refused already). A rule strictly inside a denied
/// tree stays: the most specific rule wins, as in the BPF-LSM backend.
fn apply_denies(
    grants: BTreeMap<PathBuf, BitFlags<AccessFs>>,
    denies: &[PathBuf],
    split_dirs: &mut Vec<PathBuf>,
    warnings: &mut Vec<String>,
) -> BTreeMap<PathBuf, BitFlags<AccessFs>> {
    let mut out = BTreeMap::new();
    for (path, access) in grants {
        if denies.contains(&path) {
            warnings.push(format!(
                "{}: allowed and denied by the same path; denied",
                path.display()
            ));
            continue;
        }
        let inner: Vec<PathBuf> = denies
            .iter()
            .filter(|d| strictly_beneath(d, &path))
            .cloned()
            .collect();
        let is_dir = fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        if inner.is_empty() || !is_dir {
            *out.entry(path).or_insert(BitFlags::EMPTY) |= access;
        } else {
            split_dir(&path, access, &inner, &mut out, split_dirs, warnings);
        }
    }
    out
}

/// The program interpreter (PT_INTERP) of an ELF file, if it has one.
fn elf_interp(f: &mut File) -> io::Result<Option<PathBuf>> {
    let mut ident = [0u8; 64];
    f.seek(SeekFrom::Start(0))?;
    let n = read_up_to(f, &mut ident)?;
    if n < 52 || ident[..4] != *b"\x7fELF" {
        return Ok(None);
    }
    let is64 = ident[4] == 2;
    let le = ident[5] == 1;
    let u16_at = |b: &[u8], o: usize| -> u16 {
        let a = [b[o], b[o + 1]];
        if le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }
    };
    let u32_at = |b: &[u8], o: usize| -> u32 {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let u64_at = |b: &[u8], o: usize| -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        if le {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    };
    let (phoff, phentsize, phnum) = if is64 {
        if n < 64 {
            return Ok(None);
        }
        (
            u64_at(&ident, 32),
            u16_at(&ident, 54) as usize,
            u16_at(&ident, 56) as usize,
        )
    } else {
        (
            u32_at(&ident, 28) as u64,
            u16_at(&ident, 42) as usize,
            u16_at(&ident, 44) as usize,
        )
    };
    let min_ent = if is64 { 56 } else { 32 };
    if phentsize < min_ent || phnum == 0 || phnum > 4096 {
        return Ok(None);
    }
    let mut ph = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff))?;
    if read_up_to(f, &mut ph)? < ph.len() {
        return Ok(None);
    }
    for i in 0..phnum {
        let e = &ph[i * phentsize..(i + 1) * phentsize];
        if u32_at(e, 0) != 3 {
            continue; // not PT_INTERP
        }
        let (off, size) = if is64 {
            (u64_at(e, 8), u64_at(e, 32))
        } else {
            (u32_at(e, 4) as u64, u32_at(e, 16) as u64)
        };
        if size == 0 || size > 4096 {
            return Ok(None);
        }
        let mut s = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(off))?;
        if read_up_to(f, &mut s)? < s.len() {
            return Ok(None);
        }
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        let text = String::from_utf8_lossy(&s[..end]).into_owned();
        return Ok(Some(PathBuf::from(text)));
    }
    Ok(None)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The interpreter named by a `#!` line, if the file starts with one.
fn shebang_interp(f: &mut File) -> io::Result<Option<PathBuf>> {
    let mut buf = [0u8; 256];
    f.seek(SeekFrom::Start(0))?;
    let n = read_up_to(f, &mut buf)?;
    if n < 2 || buf[..2] != *b"#!" {
        return Ok(None);
    }
    let line = &buf[2..n];
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let start = line
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(line.len());
    let rest = &line[start..];
    let end = rest
        .iter()
        .position(|&b| b == b' ' || b == b'\t' || b == b'\r')
        .unwrap_or(rest.len());
    if end == 0 {
        return Ok(None);
    }
    Ok(Some(PathBuf::from(
        String::from_utf8_lossy(&rest[..end]).into_owned(),
    )))
}

/// The command and every interpreter the kernel will execute for it:
/// ELF PT_INTERP of each ELF in the chain and each shebang interpreter.
/// Returns canonical paths, the command first, plus notes for the report.
pub fn exec_chain(cmd: &Path) -> Result<(Vec<PathBuf>, Vec<String>), LandlockError> {
    let canon = fs::canonicalize(cmd).map_err(|source| LandlockError::Command {
        path: cmd.to_path_buf(),
        source,
    })?;
    let mut chain = vec![canon.clone()];
    let mut notes = Vec::new();
    let mut cur = canon;
    for _ in 0..MAX_INTERP_DEPTH {
        let mut f = match File::open(&cur) {
            Ok(f) => f,
            Err(e) => {
                notes.push(format!(
                    "{}: cannot read to find its interpreter ({e})",
                    cur.display()
                ));
                break;
            }
        };
        if let Ok(Some(interp)) = elf_interp(&mut f) {
            match fs::canonicalize(&interp) {
                Ok(p) => chain.push(p),
                Err(e) => notes.push(format!(
                    "{}: ELF interpreter {} missing ({e})",
                    cur.display(),
                    interp.display()
                )),
            }
            break; // the ELF interpreter itself has none
        }
        let Ok(Some(interp)) = shebang_interp(&mut f) else {
            break;
        };
        let p = match fs::canonicalize(&interp) {
            Ok(p) => p,
            Err(e) => {
                notes.push(format!(
                    "{}: shebang interpreter {} missing ({e})",
                    cur.display(),
                    interp.display()
                ));
                break;
            }
        };
        if p.file_name().is_some_and(|n| n == "env") {
            notes.push(format!(
                "{}: `#!{}` searches PATH at run time; the program env runs must be in exec.allow",
                cur.display(),
                interp.display()
            ));
        }
        if chain.contains(&p) {
            break;
        }
        chain.push(p.clone());
        cur = p;
    }
    Ok((chain, notes))
}

/// Does any rule set ask for an abstract unix socket (`@name`)?
fn wants_abstract_unix(policy: &Policy) -> bool {
    std::iter::once(&policy.rules)
        .chain(policy.tools.iter().map(|t| &t.rules))
        .flat_map(|r| r.network.unix.iter())
        .any(|u| u.path().starts_with('@'))
}

/// Build the ruleset for `policy` and the command at `cmd_path`.
pub fn prepare(policy: &Policy, cmd_path: &Path) -> Result<PreparedRuleset, LandlockError> {
    prepare_for(policy, cmd_path, FilesBy::Landlock)
}

/// Which layer enforces the file rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilesBy {
    /// Fallback backend: every file right from the policy.
    Landlock,
    /// BPF-LSM does files and exec itself, per tool call: Landlock grants
    /// every file right beneath `/` and keeps only its scopes (it sits
    /// before BPF in the LSM order and would otherwise refuse first).
    BpfLsm,
    /// BPF-LSM does open and exec, but this kernel refuses its path
    /// mutation hooks (Linux 6.1): Landlock keeps the mutation rights
    /// (make_*, remove_*, refer, truncate) from the policy.
    BpfLsmExceptMutations,
}

/// As [`prepare`], with the file rights enforced as `by` says.
pub fn prepare_for(
    policy: &Policy,
    cmd_path: &Path,
    by: FilesBy,
) -> Result<PreparedRuleset, LandlockError> {
    let kabi = kernel_abi().map_err(LandlockError::Unavailable)?;
    if kabi < 1 {
        return Err(LandlockError::Unavailable(io::Error::from_raw_os_error(
            libc::EOPNOTSUPP,
        )));
    }
    let running = ABI::from(kabi.min(REQUESTED_ABI_NUM));
    let requested_fs = AccessFs::from_all(REQUESTED_ABI);
    let handled_fs = AccessFs::from_all(running);
    let mut requested_scopes = BitFlags::<Scope>::from(Scope::Signal);
    if !wants_abstract_unix(policy) {
        requested_scopes |= Scope::AbstractUnixSocket;
    }
    let handled_scopes = requested_scopes & Scope::from_all(running);
    let enforcement = if handled_fs == requested_fs && handled_scopes == requested_scopes {
        Enforcement::FullyEnforced
    } else {
        Enforcement::PartiallyEnforced
    };

    let mut grants = Grants::default();
    grants.add_rules(&policy.rules);
    for t in &policy.tools {
        grants.add_rules(&t.rules);
    }
    let mut denies: Vec<PathBuf> = std::iter::once(&policy.rules)
        .chain(policy.tools.iter().map(|t| &t.rules))
        .flat_map(|r| r.files.deny.iter())
        .map(|d| canonical_lenient(Path::new(d.path())))
        .collect();
    denies.sort();
    denies.dedup();

    let (chain, notes) = exec_chain(cmd_path)?;
    for p in &chain {
        *grants.always.entry(p.clone()).or_insert(BitFlags::EMPTY) |=
            AccessFs::Execute | AccessFs::ReadFile;
    }
    let mut warnings = std::mem::take(&mut grants.warnings);
    warnings.extend(notes);
    let mut split_dirs = Vec::new();
    let mut rules = match by {
        FilesBy::Landlock => apply_denies(grants.policy, &denies, &mut split_dirs, &mut warnings),
        FilesBy::BpfLsm => {
            warnings.push(
                "files and exec are enforced by BPF-LSM; Landlock grants every file right".into(),
            );
            std::iter::once((PathBuf::from("/"), requested_fs)).collect()
        }
        FilesBy::BpfLsmExceptMutations => {
            warnings.push(
                "opens and exec are enforced by BPF-LSM; creating, removing, renaming and \
                 truncating by Landlock (this kernel's BPF-LSM path hooks cannot name paths)"
                    .into(),
            );
            let mut r = apply_denies(grants.policy, &denies, &mut split_dirs, &mut warnings);
            let open_rights =
                (AccessFs::ReadFile | AccessFs::ReadDir | AccessFs::WriteFile | AccessFs::Execute)
                    & requested_fs;
            *r.entry(PathBuf::from("/")).or_insert(BitFlags::EMPTY) |= open_rights;
            r
        }
    };
    for (p, a) in grants.always {
        *rules.entry(p).or_insert(BitFlags::EMPTY) |= a;
    }

    let mut created = Ruleset::default()
        .handle_access(requested_fs)?
        .scope(requested_scopes)?
        .create()?;
    let mut rule_reports = Vec::new();
    for (path, access) in rules {
        let fd = match PathFd::new(&path) {
            Ok(fd) => fd,
            Err(e) => {
                warnings.push(format!("{}: skipped ({e})", path.display()));
                continue;
            }
        };
        let is_dir = fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        let access = if is_dir {
            access
        } else {
            access & file_rights()
        } & handled_fs;
        if access.is_empty() {
            continue;
        }
        created = created.add_rule(PathBeneath::new(fd, access))?;
        rule_reports.push(RuleReport {
            path,
            kind: if is_dir { "beneath" } else { "file" },
            access: access_names(access),
        });
    }
    let fd: Option<OwnedFd> = created.into();
    let fd = fd.ok_or(LandlockError::NoRulesetFd)?;
    let mut scopes = Vec::new();
    if handled_scopes.contains(Scope::AbstractUnixSocket) {
        scopes.push("abstract_unix_socket");
    }
    if handled_scopes.contains(Scope::Signal) {
        scopes.push("signal");
    }
    Ok(PreparedRuleset {
        fd,
        report: LandlockReport {
            kernel_abi: kabi,
            requested_abi: REQUESTED_ABI_NUM,
            enforcement,
            handled_fs: access_names(handled_fs),
            scopes,
            rules: rule_reports,
            split_dirs,
            warnings,
            interpreters: chain.into_iter().skip(1).collect(),
        },
    })
}

/// Enforce the ruleset on the calling thread. Async-signal-safe: one syscall.
/// The caller must have set no_new_privs (or hold CAP_SYS_ADMIN).
///
/// # Safety
/// Meant for a `pre_exec` closure; `fd` must be a Landlock ruleset fd.
pub unsafe fn restrict_self(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn canonical_lenient_keeps_missing_tail() {
        let d = std::env::temp_dir().join(format!("mw-canon-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let real = fs::canonicalize(&d).unwrap();
        let p = d.join("a/../missing/x");
        assert_eq!(canonical_lenient(&p), real.join("missing/x"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn elf_interp_of_sh_is_ld_so() {
        let mut f = File::open("/bin/sh").unwrap();
        let i = elf_interp(&mut f).unwrap().unwrap();
        assert!(i.to_string_lossy().contains("ld-linux"), "{i:?}");
    }

    #[test]
    fn shebang_chain_includes_interpreters() {
        let d = std::env::temp_dir().join(format!("mw-shebang-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let s = d.join("script");
        let mut f = File::create(&s).unwrap();
        writeln!(f, "#! /bin/sh -e\necho hi").unwrap();
        let e = d.join("envscript");
        let mut f = File::create(&e).unwrap();
        writeln!(f, "#!/usr/bin/env node\n").unwrap();
        let (chain, notes) = exec_chain(&s).unwrap();
        assert_eq!(chain[0], fs::canonicalize(&s).unwrap());
        assert_eq!(chain[1], fs::canonicalize("/bin/sh").unwrap());
        assert!(chain[2].to_string_lossy().contains("ld-linux"), "{chain:?}");
        assert!(notes.is_empty(), "{notes:?}");
        let (chain, notes) = exec_chain(&e).unwrap();
        assert_eq!(chain[1], fs::canonicalize("/usr/bin/env").unwrap());
        assert!(notes.iter().any(|n| n.contains("exec.allow")), "{notes:?}");
        fs::remove_dir_all(&d).unwrap();
    }
}
