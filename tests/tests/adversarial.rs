//! The adversarial suite: each known way around a confinement, performed for
//! real by mw-probe under `mcp-warden run`, with the kernel outcome expected
//! on each backend. The backend is read from the server's `started` event;
//! the VM lane runs this same binary on kernels with BPF-LSM.
//!
//! Outcomes are errnos the kernel returned and events the agent delivered:
//! nothing is mocked, and no test depends on timing thresholds.
use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use mcp_warden_tests::{
    assert_no_leftover_cgroups, base_read_rules, read_events, Run, Scenario, TempDir,
};
use serde_json::{json, Value};

const PROBE: &str = env!("CARGO_BIN_EXE_mw-probe");
const EPERM: &str = "errno=1";
const EACCES: &str = "errno=13";
const EXDEV: &str = "errno=18";

fn q(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A policy: the base read rules plus `read`, `write` trees and `connect` rules.
fn policy(server: &str, read: &[String], write: &[String], connect: &[String]) -> String {
    let read: Vec<&str> = read.iter().map(String::as_str).collect();
    format!(
        "version = 1\nserver = {server:?}\n\n[files]\n{}\nwrite = [{}]\n\n[network]\nconnect = [{}]\n",
        base_read_rules(&read),
        q(write),
        q(connect)
    )
}

fn args<'a>(ops: &[&[&'a str]]) -> Vec<&'a str> {
    let mut v = vec![PROBE];
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            v.push(";");
        }
        v.extend_from_slice(op);
    }
    v
}

fn probe(sc: &Scenario, ops: &[&[&str]]) -> Run {
    // Floods take seconds on a loaded machine: keep the client attached.
    let run = sc.run_attached(&args(ops));
    assert_eq!(run.status, 0, "probe failed: {run:?}");
    assert_no_leftover_cgroups(run.warden_pid);
    run
}

fn started(events: &[Value]) -> Value {
    events
        .iter()
        .find(|e| e["kind"] == "server" && e["event"] == "started")
        .cloned()
        .unwrap_or_else(|| panic!("no started event in {events:#?}"))
}

/// The backend in force, from the server's `started` event.
fn backend(run: &Run) -> String {
    started(&run.events)["backend"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn is_fallback(run: &Run) -> bool {
    let b = backend(run);
    assert!(!b.is_empty(), "started event names no backend: {run:?}");
    b == "fallback"
}

fn seccomp_refuses(run: &Run, syscall: &str) -> bool {
    started(&run.events)["confinement"]["seccomp"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .any(|l| {
            l["action"] == "EPERM"
                && l["syscalls"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|s| s == syscall))
        })
}

/// A file refusal: EACCES from Landlock on the fallback, EPERM from the
/// BPF-LSM hooks.
fn refused(fallback: bool, line: &str) -> bool {
    if fallback {
        line == EACCES
    } else {
        line == EPERM
    }
}

/// File refusals reported for `path` (any op).
fn file_denials<'a>(run: &'a Run, path: &str) -> Vec<&'a Value> {
    run.events_where(&[
        ("kind", json!("file")),
        ("decision", json!("deny")),
        ("path", json!(path)),
    ])
}

fn tcp_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind listener");
    let p = l.local_addr().expect("addr").port();
    (l, p)
}

fn net_denials(run: &Run, port: u16) -> Vec<&Value> {
    run.events_where(&[
        ("kind", json!("net")),
        ("decision", json!("deny")),
        ("port", json!(port)),
    ])
}

/// Files for the file scenarios: a secret outside every rule, a readable
/// file in a read-only tree, and a writable tree.
struct Files {
    _dir: TempDir,
    secret: String,
    readable: String,
    ro_tree: String,
    rw_tree: String,
}

impl Files {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let p = |s: &str| dir.path().join(s);
        for d in ["secret", "ro", "rw"] {
            std::fs::create_dir_all(p(d)).expect("mkdir");
        }
        std::fs::write(p("secret/key"), "s3cret").expect("write secret");
        std::fs::write(p("ro/data"), "data").expect("write data");
        let s = |x: PathBuf| x.display().to_string();
        Self {
            secret: s(p("secret/key")),
            readable: s(p("ro/data")),
            ro_tree: s(p("ro")),
            rw_tree: s(p("rw")),
            _dir: dir,
        }
    }

    /// The writable tree is readable too (on BPF-LSM `write` does not
    /// imply `read`; Landlock's rules on the fallback read what they write).
    fn policy(&self, server: &str) -> String {
        policy(
            server,
            &[
                format!("{}/**", self.ro_tree),
                format!("{}/**", self.rw_tree),
            ],
            &[format!("{}/**", self.rw_tree)],
            &[],
        )
    }

    fn rw(&self, name: &str) -> String {
        format!("{}/{name}", self.rw_tree)
    }
}

/// io_uring, inline and through the SQPOLL kernel thread: on the fallback
/// the ring itself is refused by seccomp (its socket and xattr operations
/// would pass seccomp's argument checks); elsewhere each operation meets the
/// same hooks as the plain syscall (the SQPOLL thread carries our cgroup).
#[test]
fn io_uring_with_and_without_sqpoll() {
    let f = Files::new("adv-uring");
    let (_l1, ok) = tcp_listener();
    let (_l2, denied) = tcp_listener();
    let sc = Scenario::new(
        "adv-uring",
        &policy(
            "adv",
            &[format!("{}/**", f.ro_tree)],
            &[],
            &[format!("127.0.0.1:{ok}")],
        ),
    );
    let run = probe(
        &sc,
        &[
            &["uring-open", &f.readable],
            &["uring-open", &f.secret],
            &["uring-open-sqpoll", &f.secret],
            &["uring-connect", &format!("127.0.0.1:{ok}")],
            &["uring-connect", &format!("127.0.0.1:{denied}")],
            &["uring-connect-sqpoll", &format!("127.0.0.1:{denied}")],
        ],
    );
    if is_fallback(&run) {
        assert!(seccomp_refuses(&run, "io_uring_setup"), "{run:?}");
        assert_eq!(run.lines(), vec![EPERM; 6], "{run:?}");
        assert!(net_denials(&run, denied).is_empty(), "{run:?}");
    } else {
        assert_eq!(
            run.lines(),
            vec!["ok", EPERM, EPERM, "ok", EPERM, EPERM],
            "{run:?}"
        );
        // file_open judged both (inline and on the SQPOLL thread).
        let d = file_denials(&run, &f.secret);
        assert_eq!(d.len(), 2, "{:#?}", run.events);
        assert!(d.iter().all(|e| e["op"] == "open" && e["errno"] == 1));
        assert_eq!(net_denials(&run, denied).len(), 2, "{:#?}", run.events);
    }
}

/// Links to a denied file: a symlink the server makes in its writable tree
/// does not open the target; a hard link to it cannot be made (Landlock
/// refuses a link that would give the file new rights with EXDEV; BPF-LSM's
/// path_link hook with EACCES/EPERM). A hard link made *outside* the
/// confinement into an allowed tree is judged by its path on both backends
/// (rules name paths, not inodes): readable. That one is documented, not a
/// bypass the server can make itself.
#[test]
fn symlinks_and_hardlinks_to_denied_files() {
    let f = Files::new("adv-links");
    let outside_link = f.rw("made-outside");
    std::fs::hard_link(&f.secret, &outside_link).expect("hard link from the test");
    let sc = Scenario::new("adv-links", &f.policy("adv"));
    let sl = f.rw("sl");
    let hl = f.rw("hl");
    let run = probe(
        &sc,
        &[
            &["open-read", &f.secret],
            &["symlink", &f.secret, &sl],
            &["open-read", &sl],
            &["hardlink", &f.secret, &hl],
            &["open-read", &hl],
            &["open-read", &outside_link],
        ],
    );
    let l = run.lines();
    let fb = is_fallback(&run);
    // Linux 6.1's BPF-LSM leaves links to Landlock (path_link cannot load).
    let link_by_landlock = fb || run.mutations_by_landlock();
    assert!(refused(fb, &l[0]), "{run:?}");
    assert_eq!(l[1], "ok", "symlink creation in the writable tree: {run:?}");
    assert!(refused(fb, &l[2]), "open through the symlink: {run:?}");
    if link_by_landlock {
        assert_eq!(l[3], EXDEV, "{run:?}");
    } else {
        assert_eq!(l[3], EPERM, "{run:?}");
    }
    assert_eq!(l[4], "errno=2", "the link was not made: {run:?}");
    assert!(!Path::new(&hl).exists());
    assert_eq!(l[5], "ok", "path rules judge the name: {run:?}");
    // The refusals are reported: the fallback audits them at sys_exit with
    // the path the process passed; BPF-LSM reports the opened file's path
    // (the symlink's target).
    let denials = run.events_where(&[("kind", json!("file")), ("decision", json!("deny"))]);
    let named = |p: &String| denials.iter().filter(|e| e["path"] == json!(p)).count();
    if fb {
        assert!(
            named(&f.secret) >= 1 && named(&sl) >= 1,
            "{:#?}",
            run.events
        );
    } else {
        // The direct open and the open through the symlink (bpf_d_path
        // names the target); path_link names the file lacking the rights.
        let opens = file_denials(&run, &f.secret)
            .iter()
            .filter(|e| e["op"] == "open")
            .count();
        assert_eq!(opens, 2, "{:#?}", run.events);
        let links = run.events_where(&[("op", json!("link")), ("decision", json!("deny"))]);
        assert_eq!(links.len(), 1, "{:#?}", run.events);
        if !link_by_landlock {
            assert_eq!(links[0]["path"], json!(f.secret), "{links:#?}");
            assert_eq!(links[0]["errno"], 1, "{links:#?}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(&f.secret).expect("secret"),
        "s3cret"
    );
}

/// Descriptors cannot widen rights: re-opening through /proc/self/fd is a
/// new open judged on the file's path, in the process that holds the fd or
/// in one it was passed to over a unix socketpair (SCM_RIGHTS); an O_PATH
/// descriptor of a denied file (which needs no right) re-opens to nothing.
#[test]
fn fd_passing_and_proc_self_fd_reopens() {
    let f = Files::new("adv-fd");
    let sc = Scenario::new("adv-fd", &f.policy("adv"));
    let run = probe(
        &sc,
        &[
            &["open-read", &f.readable],
            &["open-write", &f.readable],
            &["reopen-write", &f.readable],
            &["fdpass-reopen-write", &f.readable],
            &["opath-reopen-read", &f.secret],
            &["fdpass-opath-read", &f.secret],
        ],
    );
    let l = run.lines();
    let fb = is_fallback(&run);
    assert_eq!(l[0], "ok", "{run:?}");
    assert!(l[1..].iter().all(|x| refused(fb, x)), "{run:?}");
    assert_eq!(l.len(), 6, "{run:?}");
    assert_eq!(std::fs::read_to_string(&f.readable).expect("read"), "data");
    if !fb {
        // Every re-open is a new file_open, judged on the file's path.
        let w = file_denials(&run, &f.readable);
        assert_eq!(w.len(), 3, "{:#?}", run.events);
        assert!(w.iter().all(|e| e["access"] == "write"), "{w:#?}");
        let r = file_denials(&run, &f.secret);
        assert_eq!(r.len(), 2, "{:#?}", run.events);
        assert!(r.iter().all(|e| e["access"] == "read"), "{r:#?}");
    }
}

/// An IPv4-mapped IPv6 address is judged as the IPv4 address it maps.
#[test]
fn ipv4_mapped_ipv6_to_a_denied_v4() {
    let (_l1, ok) = tcp_listener();
    let (_l2, denied) = tcp_listener();
    let sc = Scenario::new(
        "adv-mapped",
        &policy("adv", &[], &[], &[format!("127.0.0.1:{ok}")]),
    );
    let run = probe(
        &sc,
        &[
            &["tcp-connect", &format!("[::ffff:127.0.0.1]:{ok}")],
            &["tcp-connect", &format!("[::ffff:127.0.0.1]:{denied}")],
            &["udp-sendto", &format!("[::ffff:127.0.0.1]:{denied}")],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM, EPERM], "{run:?}");
    let d = net_denials(&run, denied);
    assert_eq!(d.len(), 2, "{:#?}", run.events);
    // connect is judged by the v6 hook on the mapped address; an unconnected
    // sendto on a v6 socket to a mapped address goes down the kernel's IPv4
    // path, so the v4 hook judges (and reports) the plain IPv4 address.
    assert_eq!(d[0]["addr"], "::ffff:127.0.0.1", "{d:#?}");
    assert!(
        d[1]["addr"] == "::ffff:127.0.0.1" || d[1]["addr"] == "127.0.0.1",
        "{d:#?}"
    );
}

/// TCP Fast Open connects inside sendto(MSG_FASTOPEN): the connect hook
/// still judges it (Landlock's own TCP rules would not; we don't use them).
#[test]
fn tcp_fast_open_to_a_denied_port() {
    let (_l1, ok) = tcp_listener();
    let (_l2, denied) = tcp_listener();
    let sc = Scenario::new(
        "adv-tfo",
        &policy("adv", &[], &[], &[format!("127.0.0.1:{ok}")]),
    );
    let run = probe(
        &sc,
        &[
            &["tfo-sendto", &format!("127.0.0.1:{ok}")],
            &["tfo-sendto", &format!("127.0.0.1:{denied}")],
        ],
    );
    assert_eq!(run.lines(), vec!["ok", EPERM], "{run:?}");
    let d = net_denials(&run, denied);
    assert_eq!(d.len(), 1, "{:#?}", run.events);
    assert_eq!(d[0]["op"], "connect");
}

/// Raw and packet sockets are refused whatever the network rules say.
#[test]
fn raw_sockets() {
    let sc = Scenario::new(
        "adv-raw",
        &policy("adv", &[], &[], &["127.0.0.0/8:*".to_string()]),
    );
    let run = probe(
        &sc,
        &[&["raw-socket"], &["raw6-socket"], &["packet-socket"]],
    );
    assert_eq!(run.lines(), vec![EPERM; 3], "{run:?}");
    if is_fallback(&run) {
        assert!(seccomp_refuses(&run, "socket"), "{run:?}");
    }
}

/// A double-forked, setsid grandchild (reparented away from the server) is
/// still in the instance's cgroup: still confined, its events still carry
/// the instance, and it ends with the instance.
#[test]
fn double_fork_and_setsid() {
    let (_l, port) = tcp_listener();
    let out = TempDir::new("adv-daemon-out");
    let file = out.path().join("gc.txt");
    let tree = format!("{}/**", out.path().display());
    let sc = Scenario::new(
        "adv-daemon",
        &policy(
            "adv",
            std::slice::from_ref(&tree),
            std::slice::from_ref(&tree),
            &[],
        ),
    );
    let target = format!("127.0.0.1:{port}");
    let run = probe(
        &sc,
        &[&[
            "daemonize",
            file.to_str().expect("utf8"),
            "tcp-connect",
            &target,
        ]],
    );
    let line = &run.lines()[0];
    assert!(line.starts_with(EPERM), "grandchild: {run:?}");
    let gc_pid: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    let d = net_denials(&run, port);
    assert_eq!(d.len(), 1, "{:#?}", run.events);
    assert_eq!(d[0]["pid"], gc_pid);
    assert_eq!(d[0]["instance"], started(&run.events)["instance"]);
}

/// memfd exec. Landlock cannot stop it (a memfd is on an internal mount no
/// rule names; docs/backends-fallback.md says so): on the fallback the copy
/// runs, and the exec is reported. BPF-LSM's bprm_check_security may refuse
/// it; either way the attempt must be in the events.
#[test]
fn memfd_exec() {
    let sc = Scenario::new("adv-memfd", &policy("adv", &[], &[], &[]));
    let run = probe(&sc, &[&["memfd-exec"]]);
    let server_pid = started(&run.events)["pid"].clone();
    let execs: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["op"] == "exec" && e["pid"] != server_pid)
        .collect();
    if is_fallback(&run) {
        assert_eq!(run.lines(), vec!["ok"], "the memfd copy ran: {run:?}");
        assert!(
            execs.iter().any(|e| e["decision"] == "allow"),
            "the memfd exec is reported: {:#?}",
            run.events
        );
        let doc = std::fs::read_to_string(
            mcp_warden_tests::repo_root().join("docs/backends-fallback.md"),
        )
        .expect("docs/backends-fallback.md");
        assert!(
            doc.contains("memfd"),
            "the fallback's memfd exec gap must be documented"
        );
    } else {
        // The memfd's path (`/memfd:NAME (deleted)`) is in no rule: the
        // exec's open of it is refused and reported.
        assert_eq!(run.lines(), vec![EPERM], "{run:?}");
        let refusals: Vec<&Value> = run
            .events
            .iter()
            .filter(|e| {
                e["decision"] == "deny"
                    && e["errno"] == 1
                    && e["path"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("/memfd:mw-probe-memfd"))
            })
            .collect();
        assert_eq!(refusals.len(), 1, "{:#?}", run.events);
    }
}

/// Start `mcp-warden run` on `ops` with piped stdio; wait for `started`.
fn start(sc: &Scenario, ops: &[&[&str]]) -> Child {
    let child = sc
        .command(&args(ops))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mcp-warden");
    wait_for(Duration::from_secs(30), "server started", || {
        read_events(&sc.events)
            .iter()
            .any(|e| e["kind"] == "server" && e["event"] == "started")
    });
    child
}

fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn finish(sc: &Scenario, mut child: Child) -> Run {
    drop(child.stdin.take());
    let pid = child.id();
    let out = child.wait_with_output().expect("wait mcp-warden");
    sc.collect(pid, out)
}

/// PID reuse: instance A's child (pid P) is denied and exits; then, while A
/// still runs, instance B forks until a child gets pid P again (the test
/// steers the kernel's next pid through ns_last_pid) and that child is
/// denied too. Each event names its own instance: attribution follows the
/// cgroup the kernel saw, never the pid.
#[test]
fn pid_reuse_does_not_carry_attribution_across_instances() {
    let (_la, pa) = tcp_listener();
    let (_lb, pb) = tcp_listener();
    let sc_a = Scenario::new("adv-pid-a", &policy("adv-a", &[], &[], &[]));
    let sc_b = Scenario::new("adv-pid-b", &policy("adv-b", &[], &[], &[]));
    // B first, warmed up (its agent's threads, which take pids too, exist
    // before P is known); then A's child gets pid P, is denied and exits.
    let tb = format!("127.0.0.1:{pb}");
    let mut child_b = start(&sc_b, &[&["pid-reuse", "0", "tcp-connect", &tb]]);
    let mut sin = child_b.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child_b.stdout.take().expect("stdout")).lines();
    for _ in 0..3 {
        sin.write_all(b"0\n").expect("write to B");
        sin.flush().expect("flush");
        lines.next().expect("B's line").expect("read B");
    }
    let ta = format!("127.0.0.1:{pa}");
    let child_a = start(&sc_a, &[&["fork-pid", "tcp-connect", &ta], &["wait-stdin"]]);
    let mut pid = 0u64;
    wait_for(Duration::from_secs(20), "A's denial", || {
        pid = read_events(&sc_a.events)
            .iter()
            .find(|e| e["decision"] == "deny" && e["port"] == pa)
            .and_then(|e| e["pid"].as_u64())
            .unwrap_or(0);
        pid != 0
    });
    let mut hit = None;
    let mut misses = Vec::new();
    // Other processes on a busy host may take the pid between our write and
    // B's fork, or hold it for a while: retry, and wait while it is taken.
    for _ in 0..3000 {
        while Path::new(&format!("/proc/{pid}")).exists() && misses.len() < 3000 {
            misses.push(format!("pid {pid} taken"));
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("write ns_last_pid");
        sin.write_all(format!("{pid}\n").as_bytes())
            .expect("write to B");
        sin.flush().expect("flush");
        let l = lines.next().expect("B's line").expect("read B");
        misses.push(l.clone());
        if l.starts_with("hit") {
            hit = Some(l);
            break;
        }
    }
    drop(sin);
    let hit = hit.unwrap_or_else(|| {
        panic!(
            "could not get pid {pid} again in 3000 tries (a busy host?): {:?}",
            &misses[..misses.len().min(10)]
        )
    });
    assert!(hit.starts_with(&format!("hit {EPERM} pid={pid}")), "{hit}");
    for _ in lines {}
    let run_b = finish(&sc_b, child_b);
    let run_a = finish(&sc_a, child_a);
    let inst_a = started(&run_a.events)["instance"].clone();
    let inst_b = started(&run_b.events)["instance"].clone();
    assert_ne!(inst_a, inst_b);
    let da = net_denials(&run_a, pa);
    let db = net_denials(&run_b, pb);
    assert_eq!(da.len(), 1, "{:#?}", run_a.events);
    assert_eq!(db.len(), 1, "{:#?}", run_b.events);
    assert_eq!((&da[0]["pid"], &db[0]["pid"]), (&json!(pid), &json!(pid)));
    assert_eq!(da[0]["instance"], inst_a);
    assert_eq!(db[0]["instance"], inst_b);
    assert_eq!(db[0]["server"], "adv-b");
    assert!(net_denials(&run_a, pb).is_empty(), "{:#?}", run_a.events);
    assert!(net_denials(&run_b, pa).is_empty(), "{:#?}", run_b.events);
    assert_no_leftover_cgroups(run_a.warden_pid);
    assert_no_leftover_cgroups(run_b.warden_pid);
}

/// Processes in the fork flood: 10 000 on a real CPU; 1 000 in the VM lane
/// (`MCP_WARDEN_VM_KERNEL` set), whose emulated CPU forks about a hundred
/// times slower. The assertions are the same.
fn flood_size() -> u32 {
    if std::env::var_os("MCP_WARDEN_VM_KERNEL").is_some() {
        1_000
    } else {
        10_000
    }
}

/// A flood of allowed events ([`flood_size`] short-lived processes, each an
/// exit event) with one denied connect in the middle: the denial is
/// delivered, and every exit event is either delivered or counted as lost,
/// exactly.
#[test]
fn flood_of_allowed_events_with_one_denied() {
    let n_procs = flood_size();
    let (_l, port) = tcp_listener();
    let sc = Scenario::new("adv-flood", &policy("adv", &[], &[], &[]));
    let n = n_procs.to_string();
    let run = probe(
        &sc,
        &[&["flood", &n, "tcp-connect", &format!("127.0.0.1:{port}")]],
    );
    assert_eq!(
        run.lines(),
        vec![format!("{EPERM} forks={n_procs}")],
        "{run:?}"
    );
    let d = net_denials(&run, port);
    assert_eq!(d.len(), 1, "the denial must be delivered: {:#?}", d);
    let exits = run
        .events
        .iter()
        .filter(|e| e["op"] == "exit" && e["decision"] == "allow")
        .count() as u64;
    let exited = run
        .events_where(&[("kind", json!("server")), ("event", json!("exited"))])
        .first()
        .map(|e| (*e).clone())
        .unwrap_or_else(|| panic!("no exited event: {:#?}", run.events));
    let lost = exited["events_lost"]["process"]
        .as_u64()
        .unwrap_or_else(|| panic!("the exited event reports no events_lost.process: {exited}"));
    // N children plus the probe itself.
    assert_eq!(
        exits + lost,
        u64::from(n_procs) + 1,
        "delivered {exits} + lost {lost}"
    );
}

/// The instance cgroup of `mcp-warden run` process `warden_pid`, if it exists.
fn instance_cgroup(warden_pid: u32) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mount = info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })?;
    std::fs::read_dir(mount.join("mcp-warden"))
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(&format!("-{warden_pid}-"))
        })
        .map(|e| e.path())
}

fn procs(cg: &Path) -> Vec<u32> {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
}

/// SIGKILL of the standalone `mcp-warden run` in the middle of a flood of
/// denials, with a daemonized grandchild retrying a denied connect every
/// 20 ms. Nothing of the server may run unconfined afterwards. The kernel
/// detaches the cgroup hooks when the agent's descriptors close, so the
/// tree must die with the agent: its guardian process writes cgroup.kill.
#[test]
fn agent_killed_mid_flood_leaves_nothing_unconfined() {
    let (_l, port) = tcp_listener();
    let flood = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let fport = flood.local_addr().expect("addr").port();
    let out = TempDir::new("adv-kill-out");
    let file = out.path().join("gc.txt");
    let sc = Scenario::new(
        "adv-kill",
        &policy("adv", &[], &[format!("{}/**", out.path().display())], &[]),
    );
    let target = format!("127.0.0.1:{port}");
    let ftarget = format!("127.0.0.1:{fport}");
    let mut child = start(
        &sc,
        &[&[
            "daemon-and-flood",
            file.to_str().expect("utf8"),
            &target,
            &ftarget,
        ]],
    );
    let warden_pid = child.id();
    let cg = instance_cgroup(warden_pid).expect("instance cgroup");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("flooding")
    );
    wait_for(Duration::from_secs(20), "the grandchild's denials", || {
        std::fs::read_to_string(&file).is_ok_and(|s| s.contains(EPERM))
    });
    // Mid-flood: denials are being written.
    wait_for(Duration::from_secs(20), "flood events", || {
        net_denials_in(&read_events(&sc.events), fport) > 100
    });
    // SAFETY: plain syscall on our own child.
    assert_eq!(
        unsafe { libc::kill(warden_pid as i32, libc::SIGKILL) },
        0,
        "kill"
    );
    let _ = child.wait();
    let killed_at = now_ms();
    std::thread::sleep(Duration::from_millis(1500));
    let left = procs(&cg);
    let after: Vec<String> = std::fs::read_to_string(&file)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|t| t.parse::<u128>().ok())
                .is_some_and(|t| t > killed_at + 200)
        })
        .map(str::to_string)
        .collect();
    // Clean up before asserting: nothing of this test may outlive it.
    let _ = std::fs::write(cg.join("cgroup.kill"), "1");
    wait_for(Duration::from_secs(10), "the tree to end", || {
        procs(&cg).is_empty()
    });
    let _ = std::fs::remove_dir(&cg);
    let unconfined: Vec<&String> = after.iter().filter(|l| !l.ends_with(EPERM)).collect();
    assert!(
        unconfined.is_empty(),
        "after the agent died, the surviving processes {left:?} connected unconfined: {unconfined:?}"
    );
    // What happens: the agent's guardian process ends the tree through
    // cgroup.kill and removes the cgroup (agent/src/confine/cgroup.rs).
    assert!(
        left.is_empty(),
        "the server tree must die with the agent; still running: {left:?}"
    );
    assert!(!cg.exists(), "the guardian removes the instance cgroup");
}

fn net_denials_in(events: &[Value], port: u16) -> usize {
    events
        .iter()
        .filter(|e| e["decision"] == "deny" && e["port"] == port)
        .count()
}
