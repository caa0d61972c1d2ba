//! Real-kernel test fixtures. Each fixture owns what it creates and removes it on drop, also
//! when the test panics: cgroups under the cgroup2 mount, a pin root under /sys/fs/bpf, and
//! spawned processes.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
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

/// `moat-sim` on 127.0.0.1 serving a pool of an enforcing daemon, with its `/_sim/*` control
/// routes on a second port: the kernel reserves the inference port for the gateway (the test
/// itself gets `EPERM` there), so the test reads the counters on the other one.
pub struct PoolSim {
    /// The inference port, for the config's `hosts`.
    pub addr: SocketAddr,
    /// The control port.
    pub control: SocketAddr,
    _proc: KillOnDrop,
}

impl PoolSim {
    pub fn start() -> PoolSim {
        let mut child = Command::new(crate::bin("moat-sim"))
            .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moat-sim");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = |prefix: &str| -> SocketAddr {
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            l.strip_prefix(prefix)
                .and_then(|a| a.trim().parse().ok())
                .unwrap_or_else(|| panic!("moat-sim: {l}"))
        };
        let addr = line("LISTENING ");
        let control = line("CONTROL ");
        PoolSim {
            addr,
            control,
            _proc: KillOnDrop(child),
        }
    }

    /// Inference requests the simulator has answered so far.
    pub fn requests(&self) -> u64 {
        let stats: Value = reqwest::blocking::get(format!("http://{}/_sim/stats", self.control))
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .expect("sim stats");
        stats["requests"].as_u64().expect("requests count")
    }
}
