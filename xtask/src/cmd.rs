//! Running child processes: print what runs, turn failures into errors.
use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context as _, Result};

/// A command that is echoed before it runs.
pub struct Cmd {
    inner: Command,
    quiet: bool,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            inner: Command::new(program),
            quiet: false,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.inner.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.inner.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.inner.env(key, value);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.inner.current_dir(dir);
        self
    }

    /// Don't echo the command line (for probes whose result is reported anyway).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    fn describe(&self) -> String {
        let mut line = self.inner.get_program().to_string_lossy().into_owned();
        for arg in self.inner.get_args() {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }

    fn echo(&self) {
        if !self.quiet {
            println!("+ {}", self.describe());
        }
    }

    /// Run with inherited stdio; the exit code (128 + signal for a signal death).
    pub fn status(mut self) -> Result<i32> {
        self.echo();
        let status = self
            .inner
            .status()
            .with_context(|| format!("cannot start `{}`", self.describe()))?;
        Ok(code_of(status))
    }

    /// Run with inherited stdio; an error unless it exits 0.
    pub fn check(self) -> Result<()> {
        let line = self.describe();
        match self.status()? {
            0 => Ok(()),
            code => bail!("`{line}` exited with {code}"),
        }
    }

    /// Whether it runs and exits 0, with all output discarded.
    pub fn succeeds(mut self) -> bool {
        self.inner
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Run and capture stdout (stderr passes through unless quiet); an error
    /// unless it exits 0.
    pub fn read(mut self) -> Result<String> {
        let line = self.describe();
        self.echo();
        let stderr = if self.quiet {
            Stdio::null()
        } else {
            Stdio::inherit()
        };
        let out = self
            .inner
            .stdin(Stdio::null())
            .stderr(stderr)
            .output()
            .with_context(|| format!("cannot start `{line}`"))?;
        if !out.status.success() {
            bail!("`{line}` exited with {}", code_of(out.status));
        }
        String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
    }
}

pub fn code_of(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// `cargo` (the one that runs us, when known) in the workspace root.
pub fn cargo(root: &Path) -> Cmd {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Cmd::new(cargo).current_dir(root)
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`).
pub fn cargo_bin_dir() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home).join("bin"),
        None => home_dir().join(".cargo/bin"),
    }
}

pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Tools installed by `cargo install` (bpf-linker) and rustup must be found by
/// every child, whatever PATH the caller had.
pub fn ensure_cargo_bin_on_path() {
    let bin = cargo_bin_dir();
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)));
    if let Ok(joined) = joined {
        // Called first thing in main, before any thread exists.
        std::env::set_var("PATH", joined);
    }
}

/// Whether `program` is found on PATH.
pub fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
