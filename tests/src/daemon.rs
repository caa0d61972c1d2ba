//! The tests' one daemon fixture: a real `moat serve` with a temp folder of its own (config,
//! data dir, one log file per run), started from the workspace's binaries ([`crate::bin`]),
//! in the test's network namespace or a lab namespace.
//!
//! - **Address**: configs listen on port 0 (a port picked by the test could be taken by another
//!   test's daemon in between); the fixture reads the bound address back from the log line
//!   `data plane listening`.
//! - **Ready** means the daemon said it serves: `data plane listening` (the worker took the
//!   listener; connections already queue on it) or, on an inference host without a data
//!   plane, `guard only, no data plane`. Anything else a test waits for, it waits for in the
//!   log ([`Daemon::wait_log`]) or over HTTP.
//! - **HTTP**: [`crate::http`], blocking ([`Daemon::get`], [`Daemon::post`]) or async
//!   ([`Daemon::fetch_json`], [`Daemon::open`], streams included).
//! - **Clean-up** on drop, also when the test panics: SIGKILL and reap the daemon, uninstall and
//!   remove its pin root, remove its cgroup tree, delete its temp folder. Pin roots and cgroups
//!   are named `moat-test-<pid>-<n>` ([`crate::kernel::unique`]) so that `cargo xtask test`
//!   sweeps only those whose test process is gone.

use std::{
    fs,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use hyper::{HeaderMap, Response, StatusCode, body::Incoming};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{
    http::{self, Request},
    kernel::{TestCgroup, TestPins, unique},
    netns::Netns,
};

/// The cgroup daemons with segmentation off put their workers in: not the production
/// `moat.gateway`, whose egress a daemon running on the same machine in enforce mode locks
/// down (the tests' upstreams would then be unreachable).
pub const TEST_CGROUP: &str = "moat.tests";

/// How long a daemon may take to say it serves, or a log line to appear.
/// How long a daemon gets to start or stop (see [`crate::patience`]).
fn wait() -> Duration {
    crate::patience(Duration::from_secs(20))
}

/// A `moat serve` of the test's own; see the module docs.
pub struct Daemon {
    child: Option<Child>,
    addr: Option<SocketAddr>,
    /// An API key made by [`Daemon::gateway`] (user `tester`, tenant `testing`).
    key: Option<String>,
    config: PathBuf,
    /// The current run's log (stdout and stderr).
    log: PathBuf,
    runs: usize,
    // Dropped in this order, after the process is gone: pins, cgroup, folder.
    pins: Option<TestPins>,
    cgroup: Option<TestCgroup>,
    /// The PostgreSQL server of a fixture on the shared store ([`STORE_ENV`]); after the
    /// process is gone.
    pg: Option<(crate::servers::Pg, String)>,
    dir: tempfile::TempDir,
}

/// `MOAT_TEST_STORE=postgres` runs the suites built on [`Daemon::off`] against a throw-away
/// PostgreSQL ([`crate::servers::Pg`]) instead of the embedded SQLite file.
pub const STORE_ENV: &str = "MOAT_TEST_STORE";

impl Daemon {
    /// A fixture with an empty temp folder; write its config with [`Daemon::write_config`].
    pub fn new() -> Daemon {
        let dir = tempfile::tempdir().expect("temp folder");
        Daemon {
            child: None,
            addr: None,
            key: None,
            config: dir.path().join("moat.toml"),
            log: dir.path().join("serve-0.log"),
            runs: 0,
            pins: None,
            cgroup: None,
            pg: None,
            dir,
        }
    }

    /// A fixture whose config is `toml`.
    pub fn with_config(toml: &str) -> Daemon {
        let d = Daemon::new();
        d.write_config(toml);
        d
    }

    /// A fixture with the plain test config: a `[server]` table on port 0 with a data dir (and
    /// `server` lines), kernel segmentation off, then `rest`.
    pub fn off(server: &str, rest: &str) -> Daemon {
        let mut store = String::new();
        let pg = match std::env::var(STORE_ENV).as_deref() {
            Ok("postgres") => {
                let pg = crate::servers::Pg::start();
                let url = pg.create_database();
                store = pg.store_toml(&url, "pgpass");
                let db = url.rsplit('/').next().unwrap().to_owned();
                Some((pg, db))
            }
            Ok("sqlite") | Err(_) => None,
            Ok(other) => panic!("{STORE_ENV}={other}: sqlite or postgres"),
        };
        let mut d = Daemon::with_config(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n{server}\n\
             [segmentation]\nmode = \"off\"\ngateway_cgroup = \"{TEST_CGROUP}\"\n\n{rest}\n{store}"
        ));
        if let Some(pg) = pg {
            d.write_file("pgpass", pg.0.password());
            d.pg = Some(pg);
        }
        d
    }

    /// On the shared store ([`STORE_ENV`]): everything the database holds, dumped as SQL to a
    /// file in the fixture's folder. `None` on SQLite (the store is `data/moat.db`).
    pub fn store_dump(&self) -> Option<PathBuf> {
        let (pg, db) = self.pg.as_ref()?;
        let to = self.dir.path().join("store-dump.sql");
        pg.dump(db, &to);
        Some(to)
    }

    /// A fixture (not started) for tests that never proxy: the plain test config
    /// ([`Daemon::off`]) with pool `local` (nothing listens there) serving model `test-model`,
    /// role `user` on every model unless `extra` defines it, then `extra`.
    pub fn no_upstream(extra: &str) -> Daemon {
        Daemon::off(
            "",
            &with_role(
                &format!(
                    "[pools.local]\nprovider = \"local\"\nhosts = [\"127.0.0.1:9\"]\n\n\
                     [models.\"test-model\"]\npool = \"local\"\n\n{extra}"
                ),
                "user",
                "\"model:*\", \"inference:*\"",
            ),
        )
    }

    /// A started gateway on the plain test config ([`Daemon::off`]) with `files` next to the
    /// config and an API key ([`Daemon::key`]) of user `tester` in tenant `testing`, whose role
    /// `tester` may use every model unless `rest` defines it.
    pub fn gateway(server: &str, rest: &str, files: &[(&str, &str)]) -> Daemon {
        let rest = with_role(rest, "tester", "\"model:*\", \"inference:*\", \"logprobs\"");
        let mut d = Daemon::off(server, &rest);
        for (name, content) in files {
            d.write_file(name, content);
        }
        d.create_tester_key();
        d.start();
        d
    }

    /// Makes tenant `testing`, user `tester` (role `tester`) and an API key for it with the
    /// CLI; the key is [`Daemon::key`] from then on.
    pub fn create_tester_key(&mut self) -> String {
        self.cli_ok(&["tenants", "add", "testing"], None);
        self.add_user("testing", "tester", &["tester"]);
        let key = self.create_key("tester");
        self.key = Some(key.clone());
        key
    }

    /// Adds user `name` with `roles` to `tenant` (which must exist) with the CLI.
    pub fn add_user(&self, tenant: &str, name: &str, roles: &[&str]) {
        let mut args = vec!["users", "add", name, "--tenant", tenant];
        for role in roles {
            args.extend(["--role", role]);
        }
        self.cli_ok(&args, None);
    }

    /// Creates an API key for user `user` with the CLI; returns it.
    pub fn create_key(&self, user: &str) -> String {
        let out = self.cli_ok(&["keys", "create", "--user", user, "--json"], None);
        let v: Value = serde_json::from_str(out.trim()).expect("keys create --json");
        v["key"].as_str().expect("key").to_owned()
    }

    /// A fixture with a cgroup and a pin root of its own, for a daemon that enforces: the
    /// config's `gateway_cgroup` goes below [`Daemon::cgroup`] (so do the test's bystanders,
    /// [`TestCgroup::child`]), its `pin_root` is [`Daemon::pin_root`].
    pub fn enforcing() -> Daemon {
        let mut d = Daemon::new();
        d.cgroup = Some(TestCgroup::new(unique("moat-test")));
        d.pins = Some(TestPins::new());
        d
    }

    /// The config of a gateway that enforces, for a fixture made by [`Daemon::enforcing`]:
    /// started as root, its worker runs as `moat` in `<the fixture's cgroup>/gateway`; pool
    /// `gpu` on `hosts` (then the `pool` settings lines), model `m` on it, role `tester` (of
    /// [`Daemon::create_tester_key`]) may use every model; the fixture's pin root; then
    /// `extra`, which continues the `[segmentation]` table.
    pub fn enforcing_config(&self, hosts: &[SocketAddr], pool: &str, extra: &str) -> String {
        let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"moat\"\n\
             [pools.gpu]\nhosts = [{}]\n{pool}\n[models.m]\npool = \"gpu\"\n\
             [roles.tester]\npermissions = [\"model:*\", \"inference:*\"]\n\
             [segmentation]\ngateway_cgroup = \"{}/gateway\"\npin_root = \"{}\"\n{extra}",
            hosts.join(", "),
            self.cgroup().relative.display(),
            self.pin_root().display()
        )
    }

    /// The cgroup of a fixture made by [`Daemon::enforcing`].
    pub fn cgroup(&self) -> &TestCgroup {
        self.cgroup
            .as_ref()
            .expect("a fixture made by Daemon::enforcing")
    }

    /// The pin root of a fixture made by [`Daemon::enforcing`].
    pub fn pin_root(&self) -> &Path {
        &self.test_pins().root
    }

    pub fn pins(&self) -> &moat::segment::Pins {
        &self.test_pins().pins
    }

    fn test_pins(&self) -> &TestPins {
        self.pins
            .as_ref()
            .expect("a fixture made by Daemon::enforcing")
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn write_config(&self, toml: &str) {
        fs::write(&self.config, toml).expect("write config");
    }

    pub fn read_config(&self) -> String {
        fs::read_to_string(&self.config).expect("read config")
    }

    /// Writes a file next to the config, private like a real secret (moat refuses a key file
    /// others can read).
    pub fn write_file(&self, name: &str, content: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        fs::write(&path, content).expect("write file");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod file");
    }

    /// The temp folder (config, data dir, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts `moat serve` and waits until it is ready (see the module docs).
    pub fn start(&mut self) -> &mut Daemon {
        let cmd = Command::new(crate::bin("moat"));
        self.spawn(cmd);
        self.wait_ready();
        self
    }

    /// As [`Daemon::start`], with another `moat` binary (the benchmark's `--moat-before`: an
    /// older build measured in the same run).
    pub fn start_binary(&mut self, moat: &Path) -> &mut Daemon {
        self.spawn(Command::new(moat));
        self.wait_ready();
        self
    }

    /// As [`Daemon::start`], inside the network namespace `ns`.
    pub fn start_in(&mut self, ns: &Netns) -> &mut Daemon {
        let cmd = ns.command(crate::bin("moat"));
        self.spawn(cmd);
        self.wait_ready();
        self
    }

    /// Runs `moat serve` (inside `ns` if given) expecting it to stop on its own; returns how it
    /// ended and its log.
    pub fn run_to_exit(&mut self, ns: Option<&Netns>) -> (ExitStatus, String) {
        let cmd = match ns {
            Some(ns) => ns.command(crate::bin("moat")),
            None => Command::new(crate::bin("moat")),
        };
        self.spawn(cmd);
        let deadline = Instant::now() + wait();
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return (status, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "moat serve still runs after {:?}:\n{}",
                wait(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self, mut cmd: Command) {
        assert!(self.child.is_none(), "the daemon is already running");
        self.runs += 1;
        self.addr = None;
        self.log = self.dir.path().join(format!("serve-{}.log", self.runs));
        let log = fs::File::create(&self.log).expect("create log");
        let child = cmd
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
            .expect("start moat serve");
        self.child = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + wait();
        loop {
            let ready = self.log().lines().find_map(|line| {
                let v: Value = serde_json::from_str(line).ok()?;
                let message = v["message"].as_str()?;
                if message.starts_with("data plane listening") {
                    Some(v["listen"].as_str()?.parse().ok())
                } else if message.ends_with("guard only, no data plane") {
                    Some(None)
                } else {
                    None
                }
            });
            if let Some(addr) = ready {
                self.addr = addr;
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("moat serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "moat serve did not say it serves within {:?}:\n{}",
                wait(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The data plane's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("the daemon serves no data plane")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// The key [`Daemon::gateway`] made.
    pub fn key(&self) -> &str {
        self.key
            .as_deref()
            .expect("a daemon made by Daemon::gateway")
    }

    /// `Authorization: Bearer <key>`.
    pub fn bearer(&self) -> (&'static str, String) {
        ("authorization", format!("Bearer {}", self.key()))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig)
            .expect("signal the daemon");
    }

    /// SIGKILL and reap: nothing of the daemon's own clean-up runs; pins, cgroup and folder
    /// stay until the fixture is dropped (a restart with [`Daemon::start`] finds them).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait (up to 10 s, then SIGKILL): the daemon's own shutdown runs.
    pub fn stop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + crate::patience(Duration::from_secs(10));
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits for the `nth` (0-based) line of the current run's log containing `needle`;
    /// returns it parsed (a JSON string when it is not JSON).
    pub fn wait_log_nth(&self, needle: &str, nth: usize) -> Value {
        let deadline = Instant::now() + wait();
        loop {
            let text = self.log();
            if let Some(line) = text.lines().filter(|l| l.contains(needle)).nth(nth) {
                return serde_json::from_str(line).unwrap_or(Value::String(line.to_owned()));
            }
            assert!(
                Instant::now() < deadline,
                "no log line #{nth} with {needle:?} in {}:\n{text}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_log(&self, needle: &str) -> Value {
        self.wait_log_nth(needle, 0)
    }

    /// Runs `moat <args> --config <config>`, with `stdin` piped in.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(crate::bin("moat"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run moat");
        {
            let mut si = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                si.write_all(s.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().expect("moat output")
    }

    /// As [`Daemon::cli`], panicking with the output unless it succeeded; returns stdout.
    pub fn cli_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "moat {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// `moat segment status --json`.
    pub fn segment_status(&self) -> Value {
        serde_json::from_str(&self.cli_ok(&["segment", "status", "--json"], None))
            .expect("status JSON")
    }

    /// A blocking `GET` of `path` on the data plane.
    pub fn get(&self, path: &str) -> Request {
        http::Client::new().get(self.url(path))
    }

    /// A blocking `POST` to `path` on the data plane.
    pub fn post(&self, path: &str) -> Request {
        http::Client::new().post(self.url(path))
    }

    /// A blocking chat completion for `model` ("hello") with the key, ready to send (and to
    /// clone, for clients on several threads).
    pub fn chat(&self, model: &str) -> Request {
        self.post("/v1/chat/completions")
            .bearer_auth(self.key())
            .json(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "hello"}],
            }))
    }

    /// POSTs JSON to `path` with the key (and `extra` headers); parses the JSON answer.
    pub async fn post_json(
        &self,
        path: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        let (k, v) = self.bearer();
        let mut headers = vec![(k, v.as_str())];
        headers.extend_from_slice(extra);
        http::post_json(&self.url(path), body, &headers).await
    }

    /// POSTs JSON to `path` with the key; the answer's body is left unread (streams).
    pub async fn open(&self, path: &str, body: &Value) -> Response<Incoming> {
        let (k, v) = self.bearer();
        http::send(
            "POST",
            &self.url(path),
            &[("content-type", "application/json"), (k, v.as_str())],
            body.to_string(),
        )
        .await
    }

    /// The admin plane's address (a config with `[admin] listen`), from the log.
    pub fn admin_addr(&self) -> SocketAddr {
        self.wait_log("admin plane listening")["listen"]
            .as_str()
            .expect("listen field")
            .parse()
            .expect("admin listen address")
    }

    /// Calls the admin plane: `method path` with `key` as the bearer and `body` as JSON;
    /// returns the status and the JSON answer (`Null` when the answer is not JSON).
    pub async fn admin(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let auth = format!("Bearer {key}");
        let mut headers = vec![("authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let url = format!("http://{}{path}", self.admin_addr());
        let (status, _, bytes) = http::fetch(method, &url, &headers, body).await;
        (
            status.as_u16(),
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Waits until `/readyz` answers 200 (every pool has a healthy host).
    pub async fn wait_pools_ready(&self) {
        let deadline = Instant::now() + crate::patience(Duration::from_secs(15));
        loop {
            let (status, body) = http::get_json(&self.url("/readyz")).await;
            if status == StatusCode::OK {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "moat never became ready: {body}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Default for Daemon {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        // The fields go next, pins first (see the struct); a pin root's folder is left empty.
        if let Some(pins) = self.pins.take() {
            let root = pins.root.clone();
            drop(pins);
            let _ = fs::remove_dir_all(root);
        }
    }
}

/// `rest` plus a `[roles.<role>]` table with `permissions` (TOML list items), unless `rest`
/// defines that role itself (authorization denies by default).
pub fn with_role(rest: &str, role: &str, permissions: &str) -> String {
    if rest.contains(&format!("[roles.{role}]")) {
        rest.to_owned()
    } else {
        format!("[roles.{role}]\npermissions = [{permissions}]\n{rest}")
    }
}
