//! `cargo xtask setup`: install what the build, the demo and the tests need.
//!
//! Every item first checks whether it is already there and says so in one
//! line; only missing items are installed, so a second run changes nothing and
//! takes seconds. Nothing is installed system-wide except Debian packages,
//! rustup components and `cargo install bpf-linker`; the Python venv and the
//! npm servers live under the repository (git-ignored).

use std::path::Path;

use anyhow::{bail, Context as _, Result};

use crate::cmd::{self, Cmd};
use crate::{repo_root, vm};

/// Debian packages, with why each is needed.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links against LLVM 22, the LLVM of nightly rustc",
    ),
    (
        "libpolly-22-dev",
        "needed to link bpf-linker against LLVM 22",
    ),
    ("liburing-dev", "io_uring tests"),
    (
        "qemu-system-x86",
        "VM lane (ships /usr/lib/qemu/virtiofsd too)",
    ),
    ("busybox-static", "VM lane initramfs"),
    ("strace", "tests and debugging"),
    ("iproute2", "network namespace tests"),
    ("python3-venv", "the Python venv for the MCP SDK"),
    (
        "prometheus",
        "metrics scrape test (and promtool for the alert rules)",
    ),
    ("systemd", "systemd-analyze verify of the unit"),
    ("dpkg", "the .deb install test"),
];

/// The MCP Python SDK, pinned (2.x: FastMCP became `mcp.server.mcpserver.MCPServer`).
const MCP_PY_VERSION: &str = "2.3.0";
/// What must import for the venv to count as present.
const MCP_PY_PROBE: &str = "from mcp.server.mcpserver import MCPServer; \
     from mcp.client.stdio import stdio_client; \
     from mcp.client.session import ClientSession";

/// The npm project (package.json + lock) installed into `.cache/npm`.
const NPM_PROJECT: &str = "xtask/npm";
const NPM_SERVER: &str = "@modelcontextprotocol/server-filesystem";

/// LLVM that bpf-linker is built against.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    let root = repo_root();
    println!("== setup");
    apt_packages()?;
    node()?;
    rust_toolchains()?;
    bpf_linker()?;
    python_venv(&root)?;
    npm_servers(&root)?;
    for kernel in vm::Kernel::ALL {
        vm::prepare_kernel(&root, kernel)?;
    }
    println!("== setup done");
    Ok(())
}

fn ok(item: &str) {
    println!("ok: {item} (already present)");
}

fn installing(item: &str) {
    println!("installing: {item}");
}

fn dpkg_installed(package: &str) -> bool {
    Cmd::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .quiet()
        .read()
        .is_ok_and(|status| status.trim() == "install ok installed")
}

/// A command line for something that needs root: as is when we are root, else via sudo.
fn as_root(program: &str) -> Cmd {
    if cmd::is_root() {
        Cmd::new(program)
    } else {
        Cmd::new("sudo").arg(program)
    }
}

fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for (package, why) in APT_PACKAGES {
        if dpkg_installed(package) {
            ok(&format!("apt {package}"));
        } else {
            installing(&format!("apt {package} ({why})"));
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    as_root("apt-get").arg("update").check()?;
    as_root("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .check()
}

fn node() -> Result<()> {
    let version = Cmd::new("node").arg("--version").quiet().read();
    match version {
        Ok(v) if cmd::on_path("npm") => {
            ok(&format!("node {} and npm", v.trim()));
            Ok(())
        }
        // Node comes with the machine image (nodesource 20); Debian's 18 is too old
        // for the reference servers, so there is nothing sensible to install here.
        _ => bail!("node (>= 20) and npm are needed on PATH for the reference MCP servers"),
    }
}

fn rustup_has(toolchain: &str, component: &str) -> bool {
    Cmd::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .quiet()
        .read()
        .is_ok_and(|list| {
            list.lines()
                .any(|l| l == component || l.starts_with(&format!("{component}-")))
        })
}

fn rust_toolchains() -> Result<()> {
    let toolchains = Cmd::new("rustup")
        .args(["toolchain", "list"])
        .quiet()
        .read()
        .context("rustup is needed (https://rustup.rs)")?;
    // Never update a nightly that is present: bpf-linker is tied to its LLVM.
    if toolchains.lines().any(|l| l.starts_with("nightly-")) {
        ok("rust nightly toolchain");
    } else {
        installing("rust nightly toolchain");
        Cmd::new("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .check()?;
    }
    for (toolchain, component, why) in [
        ("nightly", "rust-src", "build-std for the eBPF target"),
        ("nightly", "clippy", "lint of the eBPF crate"),
        ("stable", "clippy", "lint"),
        ("stable", "rustfmt", "format check"),
    ] {
        let item = format!("rust {toolchain} {component}");
        if rustup_has(toolchain, component) {
            ok(&item);
        } else {
            installing(&format!("{item} ({why})"));
            Cmd::new("rustup")
                .args(["component", "add", component, "--toolchain", toolchain])
                .check()?;
        }
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if Cmd::new("bpf-linker").arg("--version").succeeds() {
        ok("bpf-linker");
        return Ok(());
    }
    installing("bpf-linker (cargo install, against LLVM 22)");
    // bpf-linker's build finds LLVM through llvm-config: it must be the LLVM 22 one.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(Path::new(LLVM_PREFIX).join("bin")).chain(std::env::split_paths(&path)),
    )?;
    Cmd::new("cargo")
        .args([
            "install",
            "--locked",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("PATH", path)
        .check()
}

/// A python3 that can create venvs: the one on PATH (pyenv here), else Debian's.
fn system_python() -> &'static str {
    if Cmd::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .succeeds()
    {
        "python3"
    } else {
        "/usr/bin/python3"
    }
}

fn python_venv(root: &Path) -> Result<()> {
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    let item = format!("python venv .venv with mcp=={MCP_PY_VERSION}");
    let probe = || {
        Cmd::new(&python)
            .args([
                "-c",
                &format!(
                    "import importlib.metadata as m; assert m.version('mcp') == '{MCP_PY_VERSION}'; {MCP_PY_PROBE}"
                ),
            ])
            .succeeds()
    };
    if probe() {
        ok(&item);
        return Ok(());
    }
    installing(&item);
    if !python.exists() {
        Cmd::new(system_python())
            .args(["-m", "venv"])
            .arg(&venv)
            .check()?;
    }
    Cmd::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("mcp=={MCP_PY_VERSION}"))
        .check()?;
    if !probe() {
        bail!("the MCP SDK does not import in .venv: {MCP_PY_PROBE}");
    }
    Ok(())
}

/// The entry point of the filesystem reference server, once installed.
pub fn filesystem_server(root: &Path) -> std::path::PathBuf {
    root.join(".cache/npm/node_modules")
        .join(NPM_SERVER)
        .join("dist/index.js")
}

fn npm_servers(root: &Path) -> Result<()> {
    let src = root.join(NPM_PROJECT);
    let dest = root.join(".cache/npm");
    let lock = std::fs::read(src.join("package-lock.json")).context("read npm lock file")?;
    let stamp = dest.join("installed-package-lock.json");
    let item = format!("npm {NPM_SERVER} in .cache/npm");
    if std::fs::read(&stamp).is_ok_and(|s| s == lock) && filesystem_server(root).is_file() {
        ok(&item);
        return Ok(());
    }
    installing(&item);
    std::fs::create_dir_all(&dest)?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(src.join(file), dest.join(file)).with_context(|| format!("copy {file}"))?;
    }
    Cmd::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dest)
        .check()?;
    smoke_test_filesystem_server(root)?;
    std::fs::write(&stamp, lock)?;
    Ok(())
}

/// Start the server and check that it answers `initialize` on stdio.
fn smoke_test_filesystem_server(root: &Path) -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::process::{Command, Stdio};

    let dir = std::env::temp_dir();
    let mut child = Command::new("node")
        .arg(filesystem_server(root))
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start the filesystem server")?;
    let request = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"xtask","version":"0"}}}"#;
    let mut stdin = child.stdin.take().context("server stdin")?;
    writeln!(stdin, "{request}")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let answer = rx.recv_timeout(std::time::Duration::from_secs(60));
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    let line = answer.context("the filesystem server did not answer initialize within 60 s")?;
    let reply: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("not JSON-RPC: {line:?}"))?;
    if reply["id"] != 1 || reply["result"]["serverInfo"].is_null() {
        bail!("the filesystem server did not answer initialize: {line}");
    }
    println!(
        "   filesystem server answers initialize: {}",
        reply["result"]["serverInfo"]
    );
    Ok(())
}
