//! Helpers for moat's end-to-end tests: start real `moat` and `moat-sim` processes (killed on
//! drop, panics included), and talk HTTP to them.
//!
//! The binaries are found in one place, [`bin_dir`]. [`daemon`] is the one `moat serve`
//! fixture; [`http`] the one HTTP client; [`kernel`] throw-away cgroups, pin roots and probes
//! for the real-kernel tests; [`netns`] network namespaces; [`Sim`] the inference simulator
//! (async), [`PoolSim`] the same in front of a daemon that enforces (blocking).

pub mod bench;
pub mod daemon;
pub mod http;
pub mod kernel;
pub mod netns;
pub mod servers;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

pub use daemon::Daemon;
pub use http::{Events, eventually, fetch, get_json, post_json, send};
use hyper::StatusCode;
use serde_json::Value;

/// The folder holding the workspace's binaries: `$MOAT_TEST_BIN_DIR` when set (binaries
/// copied elsewhere, e.g. into a VM), else the test executable's profile folder
/// (`target/<profile>/deps/<test>` → `target/<profile>`), or a binary's own folder (the
/// benchmarks run from `target/release`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MOAT_TEST_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable in a folder");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// `d` stretched by `$MOAT_TEST_TIME_SCALE` (default 1). For upper bounds on waiting for
/// something to happen (a daemon to come up, an answer to arrive), never for a speed
/// assertion: `cargo xtask vm-test` sets it when the guest runs under TCG, where everything
/// takes several times longer.
pub fn patience(d: Duration) -> Duration {
    let scale = std::env::var("MOAT_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * scale
}

/// Path of a workspace binary; panics with what to run when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which \
         `cargo xtask test` does)",
        path.display()
    );
    path
}

/// A child process, killed and reaped on drop; its output lines are kept.
pub struct Proc {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` and waits until an output line satisfies `ready` (which returns a value).
    fn spawn<T: Send + 'static>(
        mut cmd: Command,
        what: &str,
        ready: impl Fn(&str) -> Option<T> + Send + Sync + 'static,
    ) -> (Proc, T) {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let ready = Arc::new(ready);
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for stream in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let lines = lines.clone();
            let tx = tx.clone();
            let ready = ready.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if let Some(v) = ready(&line) {
                        let _ = tx.send(v);
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut proc = Proc {
            child: Some(child),
            lines,
        };
        match rx.recv_timeout(patience(Duration::from_secs(20))) {
            Ok(v) => (proc, v),
            Err(_) => {
                let status = proc.child.as_mut().unwrap().try_wait().ok().flatten();
                panic!(
                    "{what} did not come up (exit: {status:?}); output:\n{}",
                    proc.output()
                );
            }
        }
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `moat-sim`.
pub struct Sim {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Sim {
    /// Starts a simulator on a free port with extra arguments (see `moat-sim --help`).
    pub fn start(args: &[&str]) -> Sim {
        let mut cmd = Command::new(bin("moat-sim"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        let (proc, addr) = Proc::spawn(cmd, "moat-sim", |line| {
            line.strip_prefix("LISTENING ")
                .and_then(|a| a.trim().parse().ok())
        });
        Sim { proc, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn stats(&self) -> Value {
        let (status, body) = get_json(&self.url("/_sim/stats")).await;
        assert_eq!(status, StatusCode::OK);
        body
    }

    /// Number of inference requests this simulator received.
    pub async fn requests(&self) -> u64 {
        self.stats().await["requests"].as_u64().unwrap()
    }

    /// Injects a failure (`{"mode": …, "after_chunks": …, "count": …}`).
    pub async fn fail(&self, spec: Value) {
        let resp = send(
            "POST",
            &self.url("/_sim/fail"),
            &[("content-type", "application/json")],
            spec.to_string(),
        )
        .await;
        assert!(resp.status().is_success(), "sim fail: {}", resp.status());
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// A `moat-sim` serving a pool of a daemon that enforces, for plain `#[test]`s: its `/_sim/*`
/// control routes are on a second port as well, because the kernel reserves the inference
/// port ([`PoolSim::addr`]) for the gateway (the test itself gets `EPERM` there), so the test
/// reads the counters on the other one.
pub struct PoolSim {
    /// The inference port, for the config's `hosts`.
    pub addr: SocketAddr,
    /// The control port.
    pub control: SocketAddr,
    _proc: Proc,
}

impl PoolSim {
    pub fn start() -> PoolSim {
        let mut cmd = Command::new(bin("moat-sim"));
        cmd.args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"]);
        // `CONTROL` is printed after `LISTENING`, whose line is kept by then.
        let (proc, control) = Proc::spawn(cmd, "moat-sim", |line| {
            line.strip_prefix("CONTROL ")
                .and_then(|a| a.trim().parse().ok())
        });
        let addr = proc
            .output()
            .lines()
            .find_map(|l| l.strip_prefix("LISTENING ")?.trim().parse().ok())
            .expect("moat-sim prints LISTENING before CONTROL");
        PoolSim {
            addr,
            control,
            _proc: proc,
        }
    }

    /// Inference requests the simulator has answered so far.
    pub fn requests(&self) -> u64 {
        let r = http::Client::new()
            .get(format!("http://{}/_sim/stats", self.control))
            .send()
            .expect("sim stats");
        assert_eq!(r.status(), StatusCode::OK, "sim stats");
        let stats: Value = r.json().expect("sim stats JSON");
        stats["requests"].as_u64().expect("requests count")
    }
}

/// Every entry below `dir` (not `dir` itself), folders included, recursively.
pub fn entries_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Every file below `dir`, recursively.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    entries_below(dir)
        .into_iter()
        .filter(|p| !p.is_dir())
        .collect()
}

/// A Python with the official `openai` package: a virtualenv under `target/py-venv`, made
/// once (`python3 -m venv`, `pip install openai`) and reused; a file lock keeps concurrent
/// test binaries from building it twice.
pub fn python_with_openai() -> PathBuf {
    use nix::fcntl::{Flock, FlockArg};
    let target = bin_dir()
        .parent()
        .expect("target folder above the profile folder")
        .to_path_buf();
    let venv = target.join("py-venv");
    let python = venv.join("bin/python");
    let lock = std::fs::File::create(target.join("py-venv.lock")).expect("venv lock file");
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the venv");
    let has_openai = || {
        Command::new(&python)
            .args(["-c", "import openai"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_openai() {
        return python;
    }
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed (is python3-venv installed? `cargo xtask setup` installs it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    );
    run(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai",
        ]),
        "pip install openai",
    );
    assert!(has_openai(), "openai not importable after pip install");
    python
}

/// The folder of the `tests` package (for scripts kept next to the tests).
pub fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
