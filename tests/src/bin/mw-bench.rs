//! mw-bench: the workloads of `cargo xtask bench`. Each subcommand prints
//! `key=value` lines the bench reads; timing is taken inside the process
//! (CLOCK_MONOTONIC around the measured loop), never from process start-up.
//!
//! - `loop KIND N [PORT]`: N iterations of KIND (open: open+close of
//!   /etc/ld.so.cache; udp: UDP socket+connect(127.0.0.1:PORT)+close;
//!   getppid), prints `ns_per_op` (thread CPU time) and `wall_ns_per_op`.
//! - `ready`: print `ready` and exit (start-to-enforcing time).
//! - `idle`: wait for end of input.
//! - `flood PORT N`: N UDP connects to 127.0.0.1:PORT as fast as possible
//!   (each one a denial under the bench policy), prints `generated` and
//!   `elapsed_ns`, then `done`, then waits for end of input.
//! - `nop-hooks raw|btf [both|enter|exit]`: attach empty programs
//!   (`return 0`) to the sys_enter and sys_exit tracepoints (or only one),
//!   as raw_tp or as tp_btf, print
//!   `attached`, and keep them until end of input: the kernel's own cost of
//!   a global syscall hook (the floor under the agent's sys_enter/sys_exit).
//! - `server`: a minimal MCP server on stdio with tools `echo` (answers
//!   "ok"), `big` ({"bytes": n}: answers n bytes of text, serialized once and
//!   written again for each call) and `loop`
//!   ({"kind", "n", "port"}: runs the loop, answers its `ns_per_op`).
//! - `client rtt N | ping N | big BYTES REPS | loop KIND N PORT -- CMD...`: drive
//!   an MCP server (CMD, directly or under `mcp-warden run`) over its stdio.
//! - `forward CMD...`: run CMD with its stdio piped through this process, a
//!   minimal forwarder (poll, read, write; no parsing): the floor of what
//!   any process between a client and a server costs on this machine.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    time::Instant,
};

use serde_json::{json, Value};

fn fail(msg: &str) -> ! {
    eprintln!("mw-bench: {msg}");
    std::process::exit(2)
}

fn udp_once(port: u16) -> bool {
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        libc::connect(
            fd.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) == 0
    }
}

/// This thread's CPU time (user + system), in nanoseconds.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; this clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Run `n` iterations of `kind`: (CPU ns, wall ns) per iteration. CPU time
/// is what the work costs this thread, in user space and in the kernel
/// (hooks included); it leaves out time other processes took the CPU.
fn run_loop(kind: &str, n: u64, port: u16) -> (f64, f64) {
    let path = c"/etc/ld.so.cache";
    let cpu = thread_cpu_ns();
    let start = Instant::now();
    match kind {
        "open" => {
            for _ in 0..n {
                // SAFETY: valid C string; the descriptor is closed at once.
                unsafe {
                    let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        fail("open /etc/ld.so.cache failed");
                    }
                    libc::close(fd);
                }
            }
        }
        "udp" => {
            for _ in 0..n {
                if !udp_once(port) {
                    fail("udp connect failed");
                }
            }
        }
        "getppid" => {
            for _ in 0..n {
                // SAFETY: no preconditions.
                unsafe { libc::getppid() };
            }
        }
        other => fail(&format!("unknown loop kind {other}")),
    }
    let wall = start.elapsed().as_nanos() as f64;
    let cpu = (thread_cpu_ns() - cpu) as f64;
    let n = n.max(1) as f64;
    (cpu / n, wall / n)
}

/// Copy our stdin to CMD's and CMD's stdout to ours until CMD's stdout ends.
fn forward(cmd: &[String]) {
    let (prog, rest) = cmd
        .split_first()
        .unwrap_or_else(|| fail("usage: forward CMD..."));
    let mut child = Command::new(prog)
        .args(rest)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("spawn {prog}: {e}")));
    let (Some(to_child), Some(mut from_child)) = (child.stdin.take(), child.stdout.take()) else {
        fail("child stdio")
    };
    // Dropped at our end of input, so CMD sees its own.
    let mut to_child = Some(to_child);
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = [
        libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: from_child.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    loop {
        // SAFETY: two pollfd structs we own.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            break;
        }
        if fds[0].revents != 0 {
            match (stdin.read(&mut buf), to_child.as_mut()) {
                (Ok(n), Some(w)) if n > 0 => {
                    if w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                _ => {
                    fds[0].fd = -1;
                    to_child = None;
                }
            }
        }
        if fds[1].revents != 0 {
            match from_child.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout
                        .write_all(&buf[..n])
                        .and_then(|()| stdout.flush())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    }
    drop(to_child);
    let _ = child.wait();
}

fn wait_eof() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

fn server() {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut line = Vec::new();
    let mut big_line: (usize, Vec<u8>) = (usize::MAX, Vec::new());
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
            continue;
        };
        let Some(id) = msg.get("id").cloned() else {
            continue;
        };
        let method = msg["method"].as_str().unwrap_or("");
        let result = match method {
            "ping" => json!({}),
            "initialize" => json!({
                "protocolVersion": msg["params"]["protocolVersion"].as_str().unwrap_or("2025-06-18"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "mw-bench", "version": "0"},
            }),
            "tools/list" => json!({"tools": [
                {"name": "echo", "inputSchema": {"type": "object"}},
                {"name": "big", "inputSchema": {"type": "object"}},
                {"name": "loop", "inputSchema": {"type": "object"}},
            ]}),
            "tools/call" if msg["params"]["name"] == "big" => {
                // The same n bytes every time: serialized once, so the
                // figure is the transfer, not this server building 16 MB of
                // JSON (which made the direct baseline slow and noisy).
                let n = msg["params"]["arguments"]["bytes"].as_u64().unwrap_or(0) as usize;
                if big_line.0 != n {
                    let r = json!({"content": [{"type": "text", "text": "x".repeat(n)}]});
                    big_line = (n, serde_json::to_vec(&r).unwrap_or_default());
                }
                let head = format!("{{\"id\":{id},\"jsonrpc\":\"2.0\",\"result\":");
                let sent = out
                    .write_all(head.as_bytes())
                    .and_then(|()| out.write_all(&big_line.1))
                    .and_then(|()| out.write_all(b"}\n"))
                    .and_then(|()| out.flush());
                if sent.is_err() {
                    return;
                }
                continue;
            }
            "tools/call" => {
                let args = &msg["params"]["arguments"];
                let text = match msg["params"]["name"].as_str().unwrap_or("") {
                    "loop" => {
                        let (cpu, wall) = run_loop(
                            args["kind"].as_str().unwrap_or(""),
                            args["n"].as_u64().unwrap_or(0),
                            args["port"].as_u64().unwrap_or(9) as u16,
                        );
                        format!("ns_per_op={cpu} wall_ns_per_op={wall}")
                    }
                    _ => "ok".to_string(),
                };
                json!({"content": [{"type": "text", "text": text}]})
            }
            _ => {
                let e = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "no such method"}});
                let _ = writeln!(out, "{e}");
                let _ = out.flush();
                continue;
            }
        };
        let r = json!({"jsonrpc": "2.0", "id": id, "result": result});
        let mut bytes = serde_json::to_vec(&r).unwrap_or_default();
        bytes.push(b'\n');
        if out.write_all(&bytes).and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

struct Client {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    buf: Vec<u8>,
}

impl Client {
    fn start(cmd: &[String]) -> Self {
        let (prog, args) = cmd.split_first().unwrap_or_else(|| fail("no command"));
        let mut child = Command::new(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| fail(&format!("spawn {prog}: {e}")));
        let stdin = child.stdin.take().unwrap_or_else(|| fail("stdin"));
        let stdout = BufReader::with_capacity(
            1 << 20,
            child.stdout.take().unwrap_or_else(|| fail("stdout")),
        );
        let mut c = Self {
            child,
            stdin,
            stdout,
            buf: Vec::new(),
        };
        c.request(
            0,
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "mw-bench", "version": "0"}}),
        );
        c.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        c
    }

    fn send(&mut self, v: &Value) {
        let mut b = serde_json::to_vec(v).unwrap_or_default();
        b.push(b'\n');
        if self
            .stdin
            .write_all(&b)
            .and_then(|()| self.stdin.flush())
            .is_err()
        {
            fail("server closed its input");
        }
    }

    /// Send a request and read lines until its response; the response's length.
    fn request(&mut self, id: u64, method: &str, params: Value) -> usize {
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let want = format!("\"id\":{id},");
        let want2 = format!("\"id\":{id}}}");
        loop {
            self.buf.clear();
            match self.stdout.read_until(b'\n', &mut self.buf) {
                Ok(0) | Err(_) => fail("server closed its output"),
                Ok(n) => {
                    // The id is near the start or the end; avoid parsing 16 MB.
                    let head = &self.buf[..n.min(64)];
                    let tail = &self.buf[n.saturating_sub(64)..];
                    let has = |s: &[u8], w: &str| s.windows(w.len()).any(|x| x == w.as_bytes());
                    if has(head, &want) || has(tail, &want) || has(tail, &want2) {
                        return n;
                    }
                }
            }
        }
    }

    fn call(&mut self, id: u64, tool: &str, args: Value) -> usize {
        self.request(id, "tools/call", json!({"name": tool, "arguments": args}))
    }

    fn text(&self) -> String {
        serde_json::from_slice::<Value>(&self.buf)
            .ok()
            .and_then(|v| v["result"]["content"][0]["text"].as_str().map(String::from))
            .unwrap_or_default()
    }

    fn close(self) {
        drop(self.stdin);
        let mut child = self.child;
        let _ = child.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn client(args: &[String]) {
    let split = args
        .iter()
        .position(|a| a == "--")
        .unwrap_or_else(|| fail("client needs -- CMD"));
    let (opts, cmd) = (&args[..split], &args[split + 1..]);
    let num = |i: usize| -> u64 {
        opts.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fail("bad number"))
    };
    let mut c = Client::start(cmd);
    match opts.first().map(String::as_str) {
        Some(mode @ ("rtt" | "ping")) => {
            let n = num(1);
            let ping = mode == "ping";
            let one = |c: &mut Client, id: u64| {
                if ping {
                    c.request(id, "ping", json!({}));
                } else {
                    c.call(id, "echo", json!({}));
                }
            };
            for i in 0..200 {
                one(&mut c, 1_000_000 + i);
            }
            let mut v: Vec<f64> = (1..=n)
                .map(|i| {
                    let t = Instant::now();
                    one(&mut c, i);
                    t.elapsed().as_nanos() as f64
                })
                .collect();
            let med = median(&mut v);
            let p90 = v[(v.len() * 9 / 10).min(v.len() - 1)];
            println!("median_ns={med}\np90_ns={p90}");
        }
        Some("big") => {
            let (bytes, reps) = (num(1), num(2));
            c.call(1_000_000, "big", json!({"bytes": bytes}));
            let mut v: Vec<f64> = (1..=reps)
                .map(|i| {
                    let t = Instant::now();
                    let n = c.call(i, "big", json!({"bytes": bytes}));
                    if (n as u64) < bytes {
                        fail("short big response");
                    }
                    t.elapsed().as_nanos() as f64
                })
                .collect();
            println!("median_ns={}", median(&mut v));
        }
        Some("loop") => {
            let kind = opts.get(1).cloned().unwrap_or_default();
            let (n, port) = (num(2), num(3));
            c.call(1, "loop", json!({"kind": kind, "n": n, "port": port}));
            println!("{}", c.text());
        }
        _ => fail("client rtt N | ping N | big BYTES REPS | loop KIND N PORT -- CMD"),
    }
    c.close();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).cloned().unwrap_or_default();
    let num = |i: usize| -> u64 { a(i).parse().unwrap_or_else(|_| fail("bad number")) };
    match a(0).as_str() {
        "loop" => {
            let port = a(3).parse().unwrap_or(9);
            let (cpu, wall) = run_loop(&a(1), num(2), port);
            println!("ns_per_op={cpu}\nwall_ns_per_op={wall}");
        }
        "ready" => println!("ready"),
        "idle" => wait_eof(),
        "flood" => {
            let port: u16 = a(1).parse().unwrap_or_else(|_| fail("bad port"));
            let n = num(2);
            let t = Instant::now();
            for _ in 0..n {
                udp_once(port);
            }
            println!("generated={n}\nelapsed_ns={}\ndone", t.elapsed().as_nanos());
            let _ = std::io::stdout().flush();
            wait_eof();
        }
        "server" => server(),
        "forward" => forward(&args[1..]),
        "client" => client(&args[1..]),
        "nop-hooks" => {
            let btf = match a(1).as_str() {
                "raw" => false,
                "btf" => true,
                _ => fail("usage: nop-hooks raw|btf [both|enter|exit]"),
            };
            // Optional third word: only one of the two tracepoints.
            let tps: &[&str] = match a(2).as_str() {
                "" | "both" => &["sys_enter", "sys_exit"],
                "enter" => &["sys_enter"],
                "exit" => &["sys_exit"],
                _ => fail("usage: nop-hooks raw|btf [both|enter|exit]"),
            };
            let _links: Vec<OwnedFd> = tps
                .iter()
                .map(|tp| nop::attach(tp, btf).unwrap_or_else(|e| fail(&format!("{tp}: {e}"))))
                .collect();
            println!("attached");
            let _ = std::io::stdout().flush();
            wait_eof();
        }
        _ => fail(
            "usage: loop | ready | idle | flood | nop-hooks | server | client (see the source)",
        ),
    }
}

/// Empty programs on the syscall tracepoints, loaded with the bpf(2)
/// syscall directly (no loader library: two instructions).
mod nop {
    use std::os::fd::{FromRawFd, OwnedFd};

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
    const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
    const BPF_PROG_TYPE_TRACING: u32 = 26;
    const BPF_TRACE_RAW_TP: u32 = 23;

    /// The prefix of `union bpf_attr` for BPF_PROG_LOAD that we fill.
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        prog_btf_fd: u32,
        func_info_rec_size: u32,
        func_info: u64,
        func_info_cnt: u32,
        line_info_rec_size: u32,
        line_info: u64,
        line_info_cnt: u32,
        attach_btf_id: u32,
        attach_prog_fd: u32,
        /// Zero up to a multiple of 8: no padding byte is left
        /// uninitialised (the kernel refuses non-zero bytes past the
        /// attributes it knows with E2BIG).
        _rest: [u32; 17],
    }

    const _: () = assert!(std::mem::size_of::<ProgLoad>() == 184);

    #[repr(C)]
    struct RawTpOpen {
        name: u64,
        prog_fd: u32,
        _pad: u32,
        cookie: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<OwnedFd, String> {
        // SAFETY: `attr` is a valid, zero-padded bpf_attr prefix of its size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as u32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: a new descriptor the kernel just gave us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Load `r0 = 0; exit` and attach it to tracepoint `tp`.
    pub fn attach(tp: &str, btf: bool) -> Result<OwnedFd, String> {
        use std::os::fd::AsRawFd;
        // mov64 r0, 0 ; exit
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = c"GPL";
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_RAW_TRACEPOINT,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        if btf {
            load.prog_type = BPF_PROG_TYPE_TRACING;
            load.expected_attach_type = BPF_TRACE_RAW_TP;
            load.attach_btf_id = btf_typedef_id(&format!("btf_trace_{tp}"))?;
        }
        let prog = bpf(BPF_PROG_LOAD, &mut load)?;
        let name = std::ffi::CString::new(tp).map_err(|e| e.to_string())?;
        let mut open = RawTpOpen {
            // tp_btf takes its tracepoint from attach_btf_id.
            name: if btf { 0 } else { name.as_ptr() as u64 },
            prog_fd: prog.as_raw_fd() as u32,
            _pad: 0,
            cookie: 0,
        };
        bpf(BPF_RAW_TRACEPOINT_OPEN, &mut open)
    }

    /// Type id of the typedef `name` in the kernel's BTF.
    fn btf_typedef_id(name: &str) -> Result<u32, String> {
        let b = std::fs::read("/sys/kernel/btf/vmlinux").map_err(|e| e.to_string())?;
        let u32_at = |o: usize| -> Result<u32, String> {
            b.get(o..o + 4)
                .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
                .ok_or_else(|| "truncated BTF".to_string())
        };
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let str_off = u32_at(16)? as usize;
        let types = hdr_len + type_off;
        let strs = hdr_len + str_off;
        let mut o = types;
        let mut id = 1;
        while o < types + type_len {
            let (name_off, info) = (u32_at(o)? as usize, u32_at(o + 4)?);
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            if kind == 8 {
                let s = &b[strs + name_off..];
                let end = s.iter().position(|c| *c == 0).unwrap_or(0);
                if &s[..end] == name.as_bytes() {
                    return Ok(id);
                }
            }
            o += 12
                + match kind {
                    1 | 14 | 17 => 4,
                    3 => 12,
                    4 | 5 | 15 | 19 => 12 * vlen,
                    6 | 13 => 8 * vlen,
                    _ => 0,
                };
            id += 1;
        }
        Err(format!("no typedef {name} in the kernel's BTF"))
    }
}
