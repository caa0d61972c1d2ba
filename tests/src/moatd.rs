//! A real `moat serve` for end-to-end tests: its own temp data dir, a loopback port the daemon
//! picks itself (`127.0.0.1:0`, read back from its log — a port picked by the test could be
//! taken by another test's daemon in between), a config with kernel segmentation off, its log
//! in a file; killed on drop (also on panic).

use std::{
    fs,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// `target/<profile>/moat`, next to the running test binary.
pub fn moat_binary() -> PathBuf {
    crate::bin("moat")
}

pub struct Moat {
    child: Option<Child>,
    /// The `moat` binary to run; `None`: [`moat_binary`] (the bench sets the release one).
    pub binary: Option<PathBuf>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Moat {
    /// Starts the daemon with the base config plus `extra` TOML (whole tables, e.g. `[auth]`).
    pub fn start(extra: &str) -> Moat {
        let m = Self::configure(extra);
        m.spawn_and_wait()
    }

    /// Writes the config without starting anything (for CLI-only runs or expected failures).
    pub fn configure(extra: &str) -> Moat {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        let config = dir.path().join("moat.toml");
        // Role `user` may use every model (authorization denies by default), unless the
        // test defines it itself.
        let role = if extra.contains("[roles.user]") {
            ""
        } else {
            "[roles.user]\npermissions = [\"model:*\", \"inference:*\"]\n"
        };
        let cg = crate::TEST_CGROUP;
        let text = format!(
            "[server]\nlisten = \"{addr}\"\ndata_dir = \"data\"\n\n\
             [pools.local]\nprovider = \"local\"\nhosts = [\"127.0.0.1:9\"]\n\n\
             [models.\"test-model\"]\npool = \"local\"\n\n\
             [segmentation]\nmode = \"off\"\ngateway_cgroup = \"{cg}\"\n\n{role}\n{extra}\n"
        );
        fs::write(&config, text).expect("write config");
        let log = dir.path().join("moat.log");
        Moat {
            child: None,
            binary: None,
            addr,
            dir,
            config,
            log,
        }
    }

    fn bin(&self) -> PathBuf {
        self.binary.clone().unwrap_or_else(moat_binary)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Spawns `moat serve`, reads the address it listens on from its log, and waits until it
    /// serves `/healthz` (or the process exits).
    pub fn spawn_and_wait(mut self) -> Moat {
        let log = fs::File::create(&self.log).expect("create log");
        let child = Command::new(self.bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env(
                "MOAT_LOG",
                std::env::var("MOAT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn moat serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("moat serve exited with {status}:\n{}", self.log_text());
            }
            if self.addr.port() == 0
                && let Some(addr) = listen_addr(&self.log_text())
            {
                self.addr = addr;
            }
            // The supervisor binds the port before its worker serves: ready means /healthz.
            if self.addr.port() != 0
                && crate::daemon::http_get(self.addr, "/healthz")
                    .is_ok_and(|(status, _)| status == 200)
            {
                return self;
            }
            assert!(
                Instant::now() < deadline,
                "moat did not listen on {} within 20 s:\n{}",
                self.addr,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `moat serve` expecting it to fail; returns its exit status success flag and log.
    pub fn serve_expecting_failure(&self) -> Output {
        Command::new(self.bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("run moat serve")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Runs a `moat` CLI command against this config, with `stdin` piped in.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(self.bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn moat cli");
        {
            let mut si = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                si.write_all(s.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().expect("moat cli output")
    }

    /// Like [`Self::cli`], panicking with the output unless it succeeded; returns stdout.
    pub fn cli_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "moat {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moat {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every file below `dir`, recursively.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The data-plane address from the daemon's JSON log (the `listen` field of its start-up line).
fn listen_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["listen"].as_str()?.parse().ok())
}
