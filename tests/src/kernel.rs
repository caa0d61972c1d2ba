//! Real-kernel test fixtures. Each fixture owns what it creates and removes it on drop, also
//! when the test panics: cgroups under the cgroup2 mount, a pin root under /sys/fs/bpf, and
//! spawned processes. Beside them what the tests probe the hooks with: [`probe`] (one
//! `moat-probe` run), [`ProbeLoop`] (connects in a loop while the test changes something),
//! [`listener`] (something to connect to).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use moat::{cgroup::Cgroup, segment};
use serde_json::Value;

pub const EPERM: i32 = libc::EPERM;
pub const ECONNREFUSED: i32 = libc::ECONNREFUSED;

/// Kernel tests need root; as root in CI they must run, never skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (cgroups, bpffs, eBPF): run `sudo cargo xtask test`"
    );
}

/// A name no other test (or test run) uses at the same time.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A cgroup below the cgroup2 mount, removed (with its children) on drop.
pub struct TestCgroup {
    pub cgroup: Cgroup,
    /// Path relative to the cgroup2 mount, as the config's `gateway_cgroup` takes it.
    pub relative: PathBuf,
}

impl TestCgroup {
    pub fn new(relative: impl Into<PathBuf>) -> TestCgroup {
        let relative = relative.into();
        let cgroup = Cgroup::ensure(&relative).expect("create test cgroup");
        TestCgroup { cgroup, relative }
    }

    pub fn child(&self, name: &str) -> TestCgroup {
        TestCgroup::new(self.relative.join(name))
    }

    pub fn path(&self) -> &Path {
        &self.cgroup.path
    }

    /// This cgroup as the gateway of a policy.
    pub fn gateway_identity(&self) -> segment::GatewayIdentity {
        segment::GatewayIdentity {
            cgroup_id: self.cgroup.id,
            level: self.cgroup.level,
        }
    }
}

/// The gateway-side policy of the config file `toml`, with `gateway` as the gateway cgroup
/// (for tests that attach programs themselves, without a daemon).
pub fn policy_for(toml: &str, gateway: &TestCgroup) -> segment::Policy {
    let config =
        moat::config::Config::from_str(Path::new("/test/moat.toml"), toml).expect("test config");
    segment::Policy {
        gateway: Some(gateway.gateway_identity()),
        ..segment::Policy::from_config(&config)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if self.cgroup.path.exists()
            && let Err(e) = self.cgroup.remove()
        {
            eprintln!("warning: cannot remove {}: {e}", self.cgroup.path.display());
        }
    }
}

/// A pin root of the test's own under /sys/fs/bpf; everything pinned there is uninstalled on
/// drop, which detaches the test's programs.
pub struct TestPins {
    pub root: PathBuf,
    pub pins: segment::Pins,
}

impl TestPins {
    pub fn new() -> TestPins {
        let root = PathBuf::from("/sys/fs/bpf").join(unique("moat-test"));
        TestPins {
            pins: segment::Pins::new(&root),
            root,
        }
    }
}

impl Default for TestPins {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = segment::uninstall(&self.pins) {
            eprintln!("warning: cannot uninstall {}: {e:#}", self.root.display());
        }
    }
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one probe run saw.
#[derive(Debug, Clone)]
pub struct ProbeRun {
    pub pid: u32,
    pub cgroup_id: u64,
    pub results: Vec<Value>,
}

impl ProbeRun {
    /// The errno per target, in order (0 = the call went through).
    pub fn errnos(&self) -> Vec<i32> {
        self.results
            .iter()
            .map(|r| r["errno"].as_i64().expect("errno") as i32)
            .collect()
    }
}

/// Runs `moat-probe` in `cgroup` (or the caller's cgroup) with `action` and its targets.
pub fn probe(cgroup: Option<&Path>, action: &str, args: &[String]) -> ProbeRun {
    let mut cmd = Command::new(crate::bin("moat-probe"));
    if let Some(c) = cgroup {
        cmd.arg("--cgroup").arg(c);
    }
    let out = cmd
        .arg(action)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run moat-probe");
    assert!(out.status.success(), "moat-probe failed: {}", out.status);
    let v: Value = serde_json::from_slice(&out.stdout).expect("probe output is JSON");
    ProbeRun {
        pid: v["pid"].as_u64().unwrap() as u32,
        cgroup_id: v["cgroup_id"].as_u64().unwrap(),
        results: v["results"].as_array().unwrap().clone(),
    }
}

/// Errnos of one probe action against `targets`.
pub fn try_from(cgroup: Option<&Path>, action: &str, targets: &[SocketAddr]) -> Vec<i32> {
    let args: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    probe(cgroup, action, &args).errnos()
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of the machine, so a test can
/// compare its own instants with those `moat-probe loop` stamps its attempts with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A listener on `bind` (e.g. `127.0.0.1:0`, or `[::]:0` for both families) that accepts and
/// closes connections for the rest of the test process: a target that answers at once.
pub fn listener(bind: &str) -> SocketAddr {
    let l = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || l.incoming().for_each(drop));
    addr
}

/// `moat-probe loop` in a cgroup: TCP connects to its targets in turn, from the moment
/// [`ProbeLoop::start`] returns until [`ProbeLoop::finish`].
pub struct ProbeLoop {
    /// Held for its `Drop`: a failing test does not leave the loop running.
    _child: KillOnDrop,
    stdin: std::process::ChildStdin,
    out: BufReader<std::process::ChildStdout>,
}

/// What a [`ProbeLoop`] saw on one target.
#[derive(Debug, Clone)]
pub struct LoopTarget {
    /// Every errno seen (0 = connected), in order, each once.
    pub errnos: Vec<i32>,
    /// How many attempts of each errno: the probe's own JSON, for messages.
    pub counts: Value,
    /// Attempts that ran wholly inside the window given to [`ProbeLoop::finish`].
    pub in_window: u64,
}

impl ProbeLoop {
    pub fn start(cgroup: &Path, targets: &[SocketAddr]) -> ProbeLoop {
        let mut child = Command::new(crate::bin("moat-probe"))
            .arg("--cgroup")
            .arg(cgroup)
            .arg("loop")
            .args(targets.iter().map(ToString::to_string))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start moat-probe loop");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "moat-probe loop");
        ProbeLoop {
            stdin: child.stdin.take().unwrap(),
            _child: KillOnDrop(child),
            out,
        }
    }

    /// Rounds (one attempt on every target) the loop has finished so far.
    pub fn rounds(&mut self) -> u64 {
        writeln!(self.stdin, "rounds").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        line.trim()
            .parse()
            .expect("moat-probe loop answers `rounds` with a count")
    }

    /// Stops the loop; per target, what it saw, counting as `in_window` the attempts that
    /// started at or after `t0` and ended by `t1` ([`monotonic_ns`] instants).
    pub fn finish(mut self, t0: u64, t1: u64) -> Vec<LoopTarget> {
        writeln!(self.stdin, "window {t0} {t1}").unwrap();
        drop(self.stdin);
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).expect("moat-probe loop output is JSON");
        v["results"]
            .as_array()
            .expect("results")
            .iter()
            .map(|r| LoopTarget {
                errnos: r["counts"]
                    .as_object()
                    .expect("counts")
                    .keys()
                    .map(|k| k.parse().expect("errno"))
                    .collect(),
                counts: r["counts"].clone(),
                in_window: r["in_window"].as_u64().expect("in_window"),
            })
            .collect()
    }
}

/// Polls `ok` every 100 ms for up to 15 s, for plain `#[test]`s; panics naming `what`.
pub fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..150 {
        if ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// An nftables table of the test's own (`inet`, named uniquely), deleted on drop — also when
/// the test panics — so no NAT rule outlives the test. Tests keep their rules to loopback
/// addresses and ports they reserved.
pub struct NftTable {
    pub name: String,
}

impl NftTable {
    /// Creates table `inet <unique name>` holding `chains` (nft syntax, the table's body).
    pub fn new(chains: &str) -> NftTable {
        let name = unique("moat_test").replace('-', "_");
        let table = NftTable { name };
        let ruleset = format!("table inet {} {{\n{chains}\n}}\n", table.name);
        nft(&["-f", "-"], Some(&ruleset));
        table
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        let out = Command::new("nft")
            .args(["delete", "table", "inet", &self.name])
            .output();
        if !out.is_ok_and(|o| o.status.success()) {
            eprintln!("warning: cannot delete nft table inet {}", self.name);
        }
    }
}

/// Runs `nft` (installed by `cargo xtask setup`), panicking with its stderr on failure.
fn nft(args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft (install it with `cargo xtask setup`)");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdin.unwrap_or("")
    );
}
