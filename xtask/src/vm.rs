//! `cargo xtask vm`: run a command in a QEMU guest on a stock Debian cloud
//! kernel, where BPF-LSM is active (the development and CI kernel refuses LSM
//! programs).
//!
//! - The kernel comes from its Debian package (`apt-get download`,
//!   `dpkg-deb -x` into `.cache/vm/<kernel>/`); it is never installed on the host.
//! - The initramfs is busybox-static, an /init written here and, where the
//!   kernel has them as modules (6.1), the virtio and virtiofs modules from
//!   the same package, loaded in dependency order.
//! - The host's root filesystem is shared with virtiofs (virtiofsd started and
//!   stopped here); the guest mounts it, mounts proc, sys, dev, securityfs,
//!   bpffs, cgroup2, tracefs and tmpfs on /tmp and /run inside it, chroots
//!   into it and runs the command in the caller's working directory, so the
//!   guest uses the host's binaries, toolchains and test programs.
//! - The guest prints the command's exit status on the serial console behind
//!   a per-run marker and powers off; QEMU itself always exits 0, so the
//!   marker is what carries the result back.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

use crate::cmd::{self, Cmd};
use crate::cpio;
use crate::repo_root;

const VIRTIOFSD: &[&str] = &["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"];
const BUSYBOX: &str = "/bin/busybox";
/// Modules the guest needs for virtiofs; whichever the kernel builds in are skipped.
const GUEST_MODULES: &[&str] = &["virtio_pci", "virtiofs"];
const SERIAL_TAIL_LINES: usize = 100;
/// Environment passed from the caller to the command in the guest.
const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "RUST_BACKTRACE",
    "RUST_LOG",
    "CI",
];
/// Prefix of our own variables, passed through as well.
const PASSED_ENV_PREFIX: &str = "MCP_WARDEN_";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// Debian 12's own kernel (bookworm-security).
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12 backports' kernel (bookworm-backports).
    #[value(name = "6.12")]
    V6_12,
}

impl Kernel {
    pub const ALL: [Kernel; 2] = [Kernel::V6_1, Kernel::V6_12];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
        }
    }

    /// Package names are `<prefix><ABI or version><suffix>`.
    fn package_pattern(self) -> (&'static str, &'static str) {
        match self {
            Kernel::V6_1 => ("linux-image-6.1.0-", "-cloud-amd64"),
            Kernel::V6_12 => ("linux-image-6.12.", "-cloud-amd64-unsigned"),
        }
    }

    fn in_backports(self) -> bool {
        self == Kernel::V6_12
    }
}

#[derive(clap::Args)]
pub struct VmArgs {
    /// Guest kernel.
    #[arg(long, value_enum, default_value = "6.12")]
    kernel: Kernel,
    /// Give up (and fail) when the guest has not reported after this many seconds.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
    /// The command to run in the guest, as root, in the current directory.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

/// A kernel unpacked from its package, ready to boot.
pub struct PreparedKernel {
    package: String,
    vmlinuz: PathBuf,
    /// Modules to insmod, dependencies first.
    modules: Vec<PathBuf>,
}

fn kernel_dir(root: &Path, kernel: Kernel) -> PathBuf {
    root.join(".cache/vm").join(kernel.name())
}

/// Download and unpack the kernel package once; later calls reuse the cache.
pub fn prepare_kernel(root: &Path, kernel: Kernel) -> Result<PreparedKernel> {
    let dir = kernel_dir(root, kernel);
    let extract = dir.join("extract");
    let package_file = dir.join("package");
    let item = format!("VM kernel {}", kernel.name());
    if let (Ok(package), true) = (fs::read_to_string(&package_file), extract.is_dir()) {
        let package = package.trim().to_owned();
        println!("ok: {item}: {package} (already present)");
        return unpacked(package, &extract);
    }
    println!(
        "installing: {item} (Debian package, unpacked into {})",
        dir.display()
    );
    let package = download_and_unpack(root, kernel, &dir, &extract)?;
    fs::write(&package_file, format!("{package}\n"))?;
    unpacked(package, &extract)
}

fn unpacked(package: String, extract: &Path) -> Result<PreparedKernel> {
    let vmlinuz = only_entry(&extract.join("boot"), "vmlinuz-")?;
    let modules = guest_modules(extract)?;
    Ok(PreparedKernel {
        package,
        vmlinuz,
        modules,
    })
}

/// The single entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().as_bytes().starts_with(prefix.as_bytes()) {
            found.push(entry.path());
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one {prefix}* in {}, found {found:?}",
            dir.display()
        ),
    }
}

fn download_and_unpack(root: &Path, kernel: Kernel, dir: &Path, extract: &Path) -> Result<String> {
    let apt = AptConfig::new(root, kernel)?;
    let download = dir.join("download");
    let package = match download_newest(&apt, kernel, &download) {
        Ok(package) => package,
        Err(e) => {
            // Empty or stale package lists (a fresh machine): refresh and retry once.
            println!("   {e:#}: refreshing the package lists");
            apt.get().arg("update").check()?;
            download_newest(&apt, kernel, &download)?
        }
    };
    let deb = only_entry(&download, &format!("{package}_"))?;
    let tmp = dir.join("extract.tmp");
    let _ = fs::remove_dir_all(&tmp);
    Cmd::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp).check()?;
    let _ = fs::remove_dir_all(extract);
    fs::rename(&tmp, extract)?;
    fs::remove_dir_all(&download)?;
    Ok(package)
}

/// `apt-get download` the newest kernel package into `download`; its name.
fn download_newest(apt: &AptConfig, kernel: Kernel, download: &Path) -> Result<String> {
    let (prefix, suffix) = kernel.package_pattern();
    let package = newest_package(apt, kernel)?
        .with_context(|| format!("no package {prefix}*{suffix} in the APT lists"))?;
    let _ = fs::remove_dir_all(download);
    fs::create_dir_all(download)?;
    apt.get()
        .args(["download", &package])
        .current_dir(download)
        .check()?;
    Ok(package)
}

/// apt-get / apt-cache with either the host's sources or, for backports, a
/// private configuration under the cache (the host's APT setup is not touched).
struct AptConfig {
    options: Vec<String>,
}

impl AptConfig {
    fn new(root: &Path, kernel: Kernel) -> Result<Self> {
        let mut options = vec!["-o".to_owned(), "APT::Sandbox::User=root".to_owned()];
        if kernel.in_backports() {
            let dir = root.join(".cache/vm/apt");
            for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
                fs::create_dir_all(dir.join(sub))?;
            }
            let sources = dir.join("sources.list");
            fs::write(&sources, backports_source_line()?)?;
            let private = [
                format!("Dir::Etc::SourceList={}", sources.display()),
                format!(
                    "Dir::Etc::SourceParts={}",
                    dir.join("sources.list.d").display()
                ),
                format!("Dir::State::Lists={}", dir.join("lists").display()),
                format!("Dir::Cache={}", dir.join("cache").display()),
                "Debug::NoLocking=1".to_owned(),
            ];
            for opt in private {
                options.push("-o".to_owned());
                options.push(opt);
            }
        }
        Ok(Self { options })
    }

    fn get(&self) -> Cmd {
        Cmd::new("apt-get").args(&self.options)
    }

    fn cache(&self) -> Cmd {
        Cmd::new("apt-cache").args(&self.options)
    }
}

/// A sources.list line for `<codename>-backports`, on the mirror and keyring the
/// host already uses for its Debian release.
fn backports_source_line() -> Result<String> {
    let os = fs::read_to_string("/etc/os-release").context("read /etc/os-release")?;
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_owned())
        .context("no VERSION_CODENAME in /etc/os-release")?;
    let (uri, keyring) = host_debian_mirror(&codename)?;
    let signed_by = keyring
        .map(|k| format!("[signed-by={k}] "))
        .unwrap_or_default();
    Ok(format!("deb {signed_by}{uri} {codename}-backports main\n"))
}

/// The URI (and keyring) of the host's APT entry for `codename` itself.
fn host_debian_mirror(codename: &str) -> Result<(String, Option<String>)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        if name.ends_with(".sources") {
            // deb822: blank-line separated stanzas of `Key: value`.
            for stanza in text.split("\n\n") {
                let field = |key: &str| {
                    stanza.lines().find_map(|l| {
                        l.strip_prefix(key)
                            .and_then(|rest| rest.strip_prefix(':'))
                            .map(|v| v.trim().to_owned())
                    })
                };
                let has_suite =
                    field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == codename));
                if let (true, Some(uris)) = (has_suite, field("URIs")) {
                    let uri = uris
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    return Ok((uri, field("Signed-By")));
                }
            }
        } else if name.ends_with(".list") {
            for line in text.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() != Some(&"deb") {
                    continue;
                }
                // `deb [options] URI suite components...`
                let rest: Vec<&str> = words[1..]
                    .iter()
                    .copied()
                    .skip_while(|w| w.starts_with('['))
                    .collect();
                if rest.len() >= 2 && rest[1] == codename {
                    return Ok((rest[0].to_owned(), None));
                }
            }
        }
    }
    bail!("no APT source for Debian {codename} found in /etc/apt")
}

/// The newest installable `<prefix>N<suffix>` package, if any.
fn newest_package(apt: &AptConfig, kernel: Kernel) -> Result<Option<String>> {
    let (prefix, suffix) = kernel.package_pattern();
    let names = apt.cache().args(["pkgnames", prefix]).quiet().read()?;
    let mut candidates: Vec<(Vec<u64>, String)> = names
        .lines()
        .filter_map(|name| {
            let middle = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
            let plausible =
                middle.starts_with(|c: char| c.is_ascii_digit()) && !middle.contains('-');
            plausible.then(|| (version_key(middle), name.to_owned()))
        })
        .collect();
    candidates.sort();
    for (_, name) in candidates.into_iter().rev() {
        // pkgnames also lists names that are only mentioned; keep a real one.
        let policy = apt.cache().args(["policy", &name]).quiet().read()?;
        let installable = policy
            .lines()
            .any(|l| l.trim().starts_with("Candidate:") && !l.contains("(none)"));
        if installable {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// "90+deb12.1" -> [90, 12, 1]: good enough to order kernel package names.
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The module files for [`GUEST_MODULES`] and what they depend on,
/// dependencies first. Modules the kernel builds in have no file and need nothing.
fn guest_modules(extract: &Path) -> Result<Vec<PathBuf>> {
    let mut files = BTreeMap::new();
    let modules_root = extract.join("lib/modules");
    if modules_root.is_dir() {
        collect_modules(&modules_root, &mut files)?;
    }
    let mut ordered = Vec::new();
    for name in GUEST_MODULES {
        add_with_dependencies(name, &files, &mut ordered, 0)?;
    }
    Ok(ordered)
}

fn collect_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_modules(&path, files)?;
        } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = stem.strip_suffix(".ko") {
                files.insert(stem.replace('-', "_"), path);
            }
        }
    }
    Ok(())
}

fn add_with_dependencies(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    ordered: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<()> {
    ensure!(depth < 32, "module dependency loop at {name}");
    let Some(path) = files.get(name) else {
        return Ok(()); // built into the kernel
    };
    if ordered.contains(path) {
        return Ok(());
    }
    for dep in module_dependencies(path)? {
        add_with_dependencies(&dep, files, ordered, depth + 1)?;
    }
    ordered.push(path.clone());
    Ok(())
}

/// The `depends=` entry of a module's .modinfo section (NUL-separated `key=value`).
fn module_dependencies(path: &Path) -> Result<Vec<String>> {
    let bytes = fs::read(path)?;
    let key = b"\0depends=";
    let Some(start) = bytes.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let value = &bytes[start + key.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    let value = std::str::from_utf8(&value[..end]).context("module depends= is not UTF-8")?;
    Ok(value
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect())
}

/// Quote for a POSIX shell: everything literal.
fn shell_quote(arg: &[u8]) -> String {
    let text = String::from_utf8_lossy(arg);
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The guest's /init. `@NONCE@` marks this run's status lines.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

report() { printf '\n@NONCE@ %s\n' "$1"; sync; poweroff -f; }
fail() { echo "xtask-vm guest: $*"; report setup-failed; }

for m in $(cat /xtask/modules.order); do
    insmod "/xtask/modules/$m.ko" || fail "insmod $m failed"
done
mount -t virtiofs hostroot /mnt || fail "cannot mount the host's root filesystem (virtiofs)"
# Loopback only (no network card): the tests target 127.0.0.0/8 and ::1.
ip link set lo up || fail "cannot bring up the loopback interface"
R=/mnt
mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sysfs $R/sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs $R/dev || fail "mount devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t securityfs securityfs $R/sys/kernel/security || fail "mount securityfs"
mount -t bpf bpf $R/sys/fs/bpf || fail "mount bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "mount cgroup2"
mount -t tracefs tracefs $R/sys/kernel/tracing || fail "mount tracefs"
# The guest gets its own /tmp and /run; host directories the command needs
# from there (a checkout under /tmp) are kept visible by bind mounts.
i=0
while read -r d; do
    i=$((i + 1))
    mkdir -p /keep/$i
    mount --bind "$R$d" /keep/$i || fail "bind $d"
done < /xtask/keep
mount -t tmpfs tmpfs $R/tmp || fail "mount /tmp"
mount -t tmpfs tmpfs $R/run || fail "mount /run"
i=0
while read -r d; do
    i=$((i + 1))
    mkdir -p "$R$d"
    mount --bind /keep/$i "$R$d" || fail "bind $d back"
done < /xtask/keep
echo "@NONCE@ kernel=$(uname -r) lsm=$(cat $R/sys/kernel/security/lsm)"
mkdir -p $R/run/xtask-vm
cp /xtask/cmd.sh $R/run/xtask-vm/cmd.sh
chroot $R /bin/sh /run/xtask-vm/cmd.sh
report "exit=$?"
"#;

/// The script run in the chroot: the caller's environment basics, directory and command.
fn command_script(args: &VmArgs) -> Result<String> {
    let mut script = String::from("exec </dev/null\n");
    let mut vars: Vec<(String, OsString)> = PASSED_ENV
        .iter()
        .filter_map(|k| std::env::var_os(k).map(|v| ((*k).to_owned(), v)))
        .collect();
    for (k, v) in std::env::vars_os() {
        if let Some(k) = k.to_str().filter(|k| k.starts_with(PASSED_ENV_PREFIX)) {
            vars.push((k.to_owned(), v));
        }
    }
    vars.push(("MCP_WARDEN_VM_KERNEL".to_owned(), args.kernel.name().into()));
    for (k, v) in vars {
        script.push_str(&format!("export {k}={}\n", shell_quote(v.as_bytes())));
    }
    let cwd = std::env::current_dir()?;
    script.push_str(&format!(
        "cd {} || exit 126\n",
        shell_quote(cwd.as_os_str().as_bytes())
    ));
    let command: Vec<String> = args
        .command
        .iter()
        .map(|a| shell_quote(a.as_bytes()))
        .collect();
    script.push_str(&format!("exec {}\n", command.join(" ")));
    Ok(script)
}

/// Host directories under the guest's own /tmp and /run that the command
/// needs: the working directory, the repository and cargo's target directory.
fn kept_host_dirs(root: &Path) -> Result<String> {
    let mut dirs = vec![std::env::current_dir()?, root.to_owned()];
    dirs.extend(std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from));
    let mut kept = String::new();
    for dir in dirs {
        let Ok(dir) = dir.canonicalize() else {
            continue;
        };
        let hidden = dir.starts_with("/tmp") || dir.starts_with("/run");
        let line = format!("{}\n", dir.display());
        if hidden && !kept.contains(&line) {
            kept.push_str(&line);
        }
    }
    Ok(kept)
}

fn initramfs(kernel: &PreparedKernel, nonce: &str, script: &str, kept: &str) -> Result<Vec<u8>> {
    let mut archive = cpio::Archive::default();
    for dir in [
        "/bin",
        "/dev",
        "/proc",
        "/sys",
        "/mnt",
        "/tmp",
        "/keep",
        "/xtask",
        "/xtask/modules",
    ] {
        archive.dir(dir);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    archive.char_device("/dev/console", 0o600, 5, 1);
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("read {BUSYBOX} (apt package busybox-static)"))?;
    archive.file("/bin/busybox", 0o755, &busybox);
    archive.file("/init", 0o755, INIT.replace("@NONCE@", nonce).as_bytes());
    let mut order = String::new();
    for module in &kernel.modules {
        let stem = module
            .file_stem()
            .and_then(|s| s.to_str())
            .context("module file name")?;
        archive.file(
            &format!("/xtask/modules/{stem}.ko"),
            0o644,
            &fs::read(module)?,
        );
        order.push_str(stem);
        order.push('\n');
    }
    archive.file("/xtask/modules.order", 0o644, order.as_bytes());
    archive.file("/xtask/cmd.sh", 0o644, script.as_bytes());
    archive.file("/xtask/keep", 0o644, kept.as_bytes());
    Ok(archive.finish())
}

/// A child process killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawn a helper that the kernel terminates should xtask itself die.
fn spawn_tied(command: &mut Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

fn start_virtiofsd(socket: &Path, log: &Path) -> Result<Reaped> {
    let binary = VIRTIOFSD
        .iter()
        .find(|p| Path::new(p).is_file())
        .context("virtiofsd not found (apt package qemu-system-x86)")?;
    let log = fs::File::create(log)?;
    let child = spawn_tied(
        Command::new(binary)
            .arg(format!("--socket-path={}", socket.display()))
            .args(["-o", "source=/", "-o", "cache=auto", "-o", "sandbox=chroot"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )
    .with_context(|| format!("start {binary}"))?;
    let mut child = Reaped(child);
    let start = Instant::now();
    while !socket.exists() {
        if let Some(status) = child.0.try_wait()? {
            bail!("virtiofsd exited early ({status})");
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "virtiofsd did not create {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn qemu(kernel: &PreparedKernel, initrd: &Path, socket: &Path) -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "qemu64,-cx16"]) // 6.12 crashes under QEMU 7.2 without -cx16
        .args(["-m", "2G", "-smp", "2"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 lsm=landlock,lockdown,yama,bpf panic=-1 mitigations=off quiet",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=2G,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!("socket,id=vfs,path={}", socket.display()))
        .args(["-device", "vhost-user-fs-pci,chardev=vfs,tag=hostroot"]);
    qemu
}

/// What the guest said on the serial console, as it came.
enum Serial {
    Line(String),
    Closed,
}

/// Exit status of `xtask vm` when the guest kernel stopped while booting,
/// before the command started (EX_TEMPFAIL): the command never ran.
pub const BOOT_FAILED: i32 = 75;

pub fn run(args: &VmArgs) -> Result<i32> {
    ensure!(
        cmd::is_root(),
        "`cargo xtask vm` runs virtiofsd and needs root"
    );
    let root = repo_root();
    let kernel = prepare_kernel(&root, args.kernel)?;
    let dir = kernel_dir(&root, args.kernel);
    let work = dir.join(format!("run-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let result = boot(args, &kernel, &dir, &work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn boot(args: &VmArgs, kernel: &PreparedKernel, dir: &Path, work: &Path) -> Result<i32> {
    let started = Instant::now();
    let nonce = format!(
        "XTASK-VM-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let initrd = work.join("initramfs.cpio");
    let kept = kept_host_dirs(&repo_root())?;
    fs::write(
        &initrd,
        initramfs(kernel, &nonce, &command_script(args)?, &kept)?,
    )?;
    let socket = work.join("virtiofsd.sock");
    let _virtiofsd = start_virtiofsd(&socket, &dir.join("virtiofsd.log"))?;
    eprintln!(
        "xtask vm: booting {} ({} modules) with the host's / shared over virtiofs",
        kernel.package,
        kernel.modules.len()
    );
    let mut qemu = Reaped(
        spawn_tied(
            qemu(kernel, &initrd, &socket)
                .stdin(Stdio::null())
                .stdout(Stdio::piped()),
        )
        .context("start qemu-system-x86_64 (apt package qemu-system-x86)")?,
    );
    let stdout = qemu.0.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = printable(&String::from_utf8_lossy(&buf));
            if tx.send(Serial::Line(line)).is_err() {
                return;
            }
            buf.clear();
        }
        let _ = tx.send(Serial::Closed);
    });

    let log_path = dir.join("serial.log");
    let deadline = started + Duration::from_secs(args.timeout);
    let mut console = Console::new(&log_path)?;
    let report = console.follow(&rx, &nonce, deadline)?;
    if report == GuestReport::TimedOut {
        let _ = qemu.0.kill();
    }
    let qemu_status = qemu.0.wait()?;
    let status = match report {
        GuestReport::Exited(status) => status,
        GuestReport::TimedOut => {
            console.show_tail();
            bail!("the guest did not finish within {} s", args.timeout);
        }
        GuestReport::SetupFailed => {
            console.show_tail();
            bail!("the guest could not set up the shared root filesystem");
        }
        GuestReport::Silent if console.lsm.is_none() => {
            // The guest's init never ran: the kernel stopped while booting,
            // before the command was started (seen under TCG: an int3 oops
            // in early boot). Nothing of the command ran; say so apart.
            console.show_tail();
            eprintln!(
                "xtask vm: the guest kernel stopped while booting, before the command started \
                 (qemu: {qemu_status})"
            );
            return Ok(BOOT_FAILED);
        }
        GuestReport::Silent => {
            console.show_tail();
            bail!("the guest stopped without reporting a status (qemu: {qemu_status}): crash, panic or failed boot");
        }
    };
    match &console.lsm {
        Some(lsm) if !lsm.split(',').any(|m| m == "bpf") => {
            bail!("BPF-LSM is not active in the guest (lsm={lsm})")
        }
        None => bail!("the guest did not report its LSM list"),
        Some(_) => {}
    }
    eprintln!(
        "xtask vm: Linux {}: command exited {status}; boot+run+poweroff {:.1} s",
        args.kernel.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(status)
}

/// How the guest run ended, as told by the console.
#[derive(Debug, PartialEq, Eq)]
enum GuestReport {
    /// The command ran and exited with this status.
    Exited(i32),
    /// /init could not load modules or mount what the command needs.
    SetupFailed,
    /// The console closed without a status line.
    Silent,
    TimedOut,
}

/// The serial console: echoed live, logged whole, its tail kept for errors.
struct Console {
    log: fs::File,
    log_path: PathBuf,
    tail: VecDeque<String>,
    /// The guest's active LSM list, once reported.
    lsm: Option<String>,
}

impl Console {
    fn new(log_path: &Path) -> Result<Self> {
        Ok(Self {
            log: fs::File::create(log_path)?,
            log_path: log_path.to_owned(),
            tail: VecDeque::new(),
            lsm: None,
        })
    }

    fn follow(
        &mut self,
        rx: &mpsc::Receiver<Serial>,
        nonce: &str,
        deadline: Instant,
    ) -> Result<GuestReport> {
        let mut report = GuestReport::Silent;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(Serial::Line(line)) => line,
                Ok(Serial::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Ok(report)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(GuestReport::TimedOut),
            };
            writeln!(self.log, "{line}")?;
            // Firmware escape sequences may share a line with a marker.
            match line.find(nonce).map(|at| line[at + nonce.len()..].trim()) {
                Some(rest) if rest.starts_with("exit=") => {
                    report = rest["exit=".len()..]
                        .parse()
                        .map_or(GuestReport::Silent, GuestReport::Exited);
                }
                Some("setup-failed") => report = GuestReport::SetupFailed,
                Some(rest) => {
                    eprintln!("xtask vm: guest {rest}");
                    self.lsm = rest.split("lsm=").nth(1).map(str::to_owned);
                }
                None => println!("{line}"),
            }
            if self.tail.len() == SERIAL_TAIL_LINES {
                self.tail.pop_front();
            }
            self.tail.push_back(line);
        }
    }

    fn show_tail(&self) {
        eprintln!(
            "xtask vm: last {} lines of the serial console (all in {}):",
            self.tail.len(),
            self.log_path.display()
        );
        for line in &self.tail {
            eprintln!("| {line}");
        }
    }
}

/// A console line without its line ending and terminal escape sequences
/// (the firmware clears the screen).
fn printable(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.trim_end_matches(['\n', '\r']).chars();
    while let Some(c) = chars.next() {
        match c {
            // ESC [ params final-byte, or ESC and one character.
            '\x1b' => match chars.next() {
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                _ => continue,
            },
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_arguments_literal() {
        assert_eq!(shell_quote(b"exit 3"), "'exit 3'");
        assert_eq!(shell_quote(b"it's"), r"'it'\''s'");
        assert_eq!(shell_quote(b"$HOME"), "'$HOME'");
    }

    #[test]
    fn console_lines_lose_escape_sequences() {
        assert_eq!(
            printable("\x1bc\x1b[?7l\x1b[2JBooting from ROM..\r\n"),
            "Booting from ROM.."
        );
        assert_eq!(printable("plain [brackets]\n"), "plain [brackets]");
    }

    #[test]
    fn kernel_versions_order_numerically() {
        assert!(version_key("90+deb12.1") > version_key("90+deb12"));
        assert!(version_key("95+deb12") > version_key("9+deb12"));
        assert!(version_key("56") > version_key("9"));
    }

    #[test]
    fn repo_root_holds_the_workspace() {
        assert!(repo_root().join("Cargo.toml").is_file());
    }
}
