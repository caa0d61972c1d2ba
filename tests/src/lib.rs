//! Helpers for moat's end-to-end tests: start real `moat` and `moat-sim` processes (killed on
//! drop, panics included), and talk HTTP to them.
//!
//! The binaries are taken from the target folder the test executable runs from
//! (`target/debug/deps/<test>` → `target/debug/`); `cargo xtask test` builds them first.
//! [`kernel`] holds throw-away cgroups, pin roots and probes for the real-kernel tests;
//! [`moatd`] a real `moat serve` with its own data dir and port, and its CLI; [`daemon`] a
//! `moat serve` on a config of the test's own; [`netns`] network namespaces.

pub mod bench;
pub mod daemon;
pub mod kernel;
pub mod moatd;
pub mod netns;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, header::HeaderMap};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;

/// The folder holding the workspace's binaries for this build profile: the test executable's
/// (`target/<profile>/deps/<test>` → `target/<profile>`), or a binary's own folder (the
/// benchmarks run from `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable in a folder");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
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
        match rx.recv_timeout(Duration::from_secs(20)) {
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

/// The cgroup test daemons put their workers in: not the production `moat.gateway`, whose
/// egress a daemon running on the same machine in enforce mode locks down (the tests' upstreams
/// would then be unreachable).
pub const TEST_CGROUP: &str = "moat.tests";

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

/// A running `moat serve` with its own temp folder (config, data dir) and an API key made
/// through the CLI (`moat tenants add`, `moat users add`, `moat keys create`).
pub struct Moat {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// A valid API key (`moat_…`) of user `tester` in tenant `testing`.
    pub key: String,
}

impl Moat {
    /// Writes a config (a `[server]` table on a free port and a temp data dir, segmentation
    /// off, then `rest`) and starts `moat serve` with it. `files` are written next to it.
    pub fn start(rest: &str, files: &[(&str, &str)]) -> Moat {
        Self::start_with("", rest, files)
    }

    /// As [`Moat::start`], with extra `[server]` keys (TOML lines).
    pub fn start_with(server: &str, rest: &str, files: &[(&str, &str)]) -> Moat {
        let dir = tempfile::tempdir().unwrap();
        for (name, content) in files {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            // Private like a real secret: moat refuses a key file others can read.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        // The harness's user `tester` has role `tester`: every model on every provider,
        // unless the test defines that role itself (authorization denies by default).
        let role = if rest.contains("[roles.tester]") {
            ""
        } else {
            "[roles.tester]\npermissions = [\"model:*\", \"inference:*\", \"logprobs\"]\n"
        };
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{server}\n\
             [segmentation]\nmode = \"off\"\ngateway_cgroup = \"{TEST_CGROUP}\"\n\n{role}\n{rest}\n"
        );
        let path = dir.path().join("moat.toml");
        std::fs::write(&path, config).unwrap();
        let key = create_key(&path);
        let mut cmd = Command::new(bin("moat"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&path)
            .env("MOAT_LOG", "info");
        let (proc, addr) = Proc::spawn(cmd, "moat serve", |line| {
            let v: Value = serde_json::from_str(line).ok()?;
            (v["message"] == "data plane listening")
                .then(|| v["listen"].as_str()?.parse().ok())
                .flatten()
        });
        Moat {
            proc,
            addr,
            dir,
            key,
        }
    }

    /// `Authorization: Bearer <key>`.
    pub fn bearer(&self) -> (&'static str, String) {
        ("authorization", format!("Bearer {}", self.key))
    }

    /// POSTs JSON to `path` with the API key (and `extra` headers); parses the JSON answer.
    pub async fn post(
        &self,
        path: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        let (k, v) = self.bearer();
        let mut headers = vec![(k, v.as_str())];
        headers.extend_from_slice(extra);
        post_json(&self.url(path), body, &headers).await
    }

    /// POSTs JSON to `path` with the API key; the answer's body is left unread (streams).
    pub async fn open(&self, path: &str, body: &Value) -> Response<Incoming> {
        let (k, v) = self.bearer();
        send(
            "POST",
            &self.url(path),
            &[("content-type", "application/json"), (k, v.as_str())],
            body.to_string(),
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = get_json(&self.url("/readyz")).await;
            if status == StatusCode::OK {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "moat never became ready: {body}\n{}",
                self.proc.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        self.proc.output()
    }
}

/// Makes tenant `testing`, user `tester` and an API key for it with the `moat` CLI on the
/// store of the config at `config`; returns the key.
pub fn create_key(config: &Path) -> String {
    let moat = |args: &[&str]| daemon::moat_cli(config, args);
    moat(&["tenants", "add", "testing"]);
    moat(&[
        "users", "add", "tester", "--tenant", "testing", "--role", "tester",
    ]);
    let out = moat(&["keys", "create", "--user", "tester", "--json"]);
    let v: Value = serde_json::from_str(out.trim()).expect("keys create --json");
    v["key"].as_str().expect("key").to_owned()
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and returns the response with its body unread (for streams).
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    client()
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// A whole response: status, headers, body bytes.
pub async fn fetch(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    let resp = send(method, url, headers, body).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

pub async fn get_json(url: &str) -> (StatusCode, Value) {
    let (status, _, body) = fetch("GET", url, &[], Bytes::new()).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// POSTs a JSON body (with `extra` headers) and parses the JSON answer.
pub async fn post_json(
    url: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    let (status, headers, body) = fetch("POST", url, &headers, body.to_string()).await;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, headers, value)
}

/// Reads server-sent events from a response as they arrive: each `data:` payload with the
/// time it arrived. Stops at the end of the body or on a body error (reported as `Err`).
pub struct Events {
    body: Incoming,
    buf: Vec<u8>,
}

impl Events {
    pub fn new(resp: Response<Incoming>) -> Self {
        Events {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next event's data, `Ok(None)` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8_lossy(&event).into_owned();
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                None => {
                    return if self.buf.iter().all(u8::is_ascii_whitespace) {
                        Ok(None)
                    } else {
                        Err(format!(
                            "stream ended inside an event: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ))
                    };
                }
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `within` passed; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
