//! A real `moat serve` process for end-to-end tests: its JSON log captured to a file, killed
//! on drop (also when the test panics).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `moat serve --config cfg`, logging to `log`.
    pub fn start(cfg: &Path, log: &Path) -> Daemon {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(crate::bin("moat"))
            .args(["serve", "--config"])
            .arg(cfg)
            .env("MOAT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start moat serve");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to 15 s) for the `nth` (0-based) log line containing `needle`.
    pub fn wait_log_nth(&self, needle: &str, nth: usize) -> Value {
        wait_for_log(&self.log, needle, nth)
    }

    pub fn wait_log(&self, needle: &str) -> Value {
        self.wait_log_nth(needle, 0)
    }

    /// The data-plane address the daemon reports in its start-up log line (configs in tests
    /// listen on port 0, so no two daemons can race for a port).
    pub fn listen_addr(&self) -> SocketAddr {
        self.wait_log("supervisor ready")["listen"]
            .as_str()
            .expect("listen field")
            .parse()
            .unwrap()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `moat <args> --config <cfg>`, which must succeed; returns its standard output.
pub fn moat_cli(cfg: &Path, args: &[&str]) -> String {
    let out = Command::new(crate::bin("moat"))
        .args(args)
        .arg("--config")
        .arg(cfg)
        .stdin(Stdio::null())
        .output()
        .expect("run moat");
    assert!(
        out.status.success(),
        "moat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `moat segment status --json`.
pub fn segment_status(cfg: &Path) -> Value {
    serde_json::from_str(&moat_cli(cfg, &["segment", "status", "--json"])).expect("status JSON")
}

/// Waits (up to 15 s) for the `nth` JSON log line containing `needle` and returns it.
pub fn wait_for_log(log: &Path, needle: &str, nth: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().filter(|l| l.contains(needle)).nth(nth) {
            return serde_json::from_str(line).unwrap_or(Value::String(line.to_owned()));
        }
        assert!(
            Instant::now() < deadline,
            "no log line #{nth} with {needle:?} in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` over plain HTTP/1.1; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, None, None)
}

/// One HTTP/1.1 request on a fresh connection made by the calling thread (so it works from
/// a thread that entered a test network namespace); returns (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json_body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = json_body.unwrap_or("");
    if json_body.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    write!(s, "{head}\r\n{body}")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
