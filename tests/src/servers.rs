//! Throw-away PostgreSQL and Redis servers for the tests of the shared store and quotas: the
//! real servers from Debian's packages (`cargo xtask setup` installs them), each in a temp
//! folder of its own, on a loopback port picked by the kernel. No mocks.
//!
//! - PostgreSQL refuses to run as root, so `initdb` and `postgres` run as `nobody`; TCP clients
//!   authenticate with a password (scram-sha-256), which the fixture writes to a 0600 file the
//!   gateway reads (`[store] password_file`).
//! - [`Pg::start_tls`] serves TLS only (`hostssl` in `pg_hba.conf`) with a certificate from
//!   a CA of the test's own; [`Redis::start_with_password`] needs `AUTH`.
//! - Both are killed (SIGKILL) and their folders removed on drop, panics included; [`Pg::kill`]
//!   and [`Redis::kill`] end them mid-test (the failure-posture tests).

use std::{
    fs,
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// The unprivileged user PostgreSQL runs as.
const PG_USER: &str = "nobody";
const PG_ROLE: &str = "moat";
const PG_PASSWORD: &str = "test-only-db-password";

/// How long a server may take to accept connections.
const READY: Duration = Duration::from_secs(30);

/// A port nobody listens on right now (the server binds it a moment later; a clash shows up
/// as a start failure, never as two tests sharing a server). The kernel may hand the same
/// port to two binds in a row once the first is closed, so a port given out once is not given
/// out again by this process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a free port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn postgres_bin_dir() -> PathBuf {
    // Debian: /usr/lib/postgresql/<major>/bin; the newest installed major wins.
    let mut majors: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run `cargo xtask setup`")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors
        .pop()
        .expect("no PostgreSQL server binaries below /usr/lib/postgresql: run `cargo xtask setup`")
        .1
}

fn ids(user: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(user)
        .expect("user lookup")
        .unwrap_or_else(|| panic!("user {user} missing"));
    (u.uid.as_raw(), u.gid.as_raw())
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn wait_port(port: u16, child: &mut Child, what: &str, log: &Path) {
    let start = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "{what} exited ({st}) before listening: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < READY,
            "{what} did not listen on {port} within {READY:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A PostgreSQL server of the test's own.
pub struct Pg {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    databases: AtomicUsize,
    /// TLS only: the server's certificate and key files in `run/`.
    tls: bool,
}

/// A CA of the test's own and the PEM of the server certificate it signed for 127.0.0.1.
pub struct TestCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn for_loopback() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        TestCa {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl Pg {
    /// initdb into a temp folder and start the server; waits until it accepts connections.
    pub fn start() -> Pg {
        Self::start_with(None)
    }

    /// A server that accepts TCP sessions over TLS only, with `ca`'s server certificate.
    pub fn start_tls(ca: &TestCa) -> Pg {
        Self::start_with(Some(ca))
    }

    fn start_with(tls: Option<&TestCa>) -> Pg {
        let bin = postgres_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("moat-pg-")
            .tempdir()
            .expect("temp folder");
        let (uid, gid) = ids(PG_USER);
        // The server's own folder must be its user's; the temp folder is only searched.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
        let data = dir.path().join("data");
        let run = dir.path().join("run");
        for d in [&data, &run] {
            fs::create_dir(d).unwrap();
            nix::unistd::chown(d, Some(uid.into()), Some(gid.into())).unwrap();
        }
        let pwfile = run.join("pw");
        fs::write(&pwfile, PG_PASSWORD).unwrap();
        nix::unistd::chown(&pwfile, Some(uid.into()), Some(gid.into())).unwrap();
        let out = Command::new(bin.join("initdb"))
            .args([
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["-U", PG_ROLE, "-E", "UTF8", "--locale=C"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data)
            .current_dir(dir.path())
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = fs::remove_file(&pwfile);
        if let Some(ca) = tls {
            // PostgreSQL wants its key private to its user.
            for (name, pem, mode) in [
                ("server.crt", &ca.cert_pem, 0o644),
                ("server.key", &ca.key_pem, 0o600),
            ] {
                let path = run.join(name);
                fs::write(&path, pem).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                nix::unistd::chown(&path, Some(uid.into()), Some(gid.into())).unwrap();
            }
            let hba = data.join("pg_hba.conf");
            let text = fs::read_to_string(&hba).unwrap();
            let only_tls: String = text
                .lines()
                .map(|l| match l.strip_prefix("host ") {
                    Some(rest) => format!("hostssl {rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            fs::write(&hba, only_tls).unwrap();
        }
        let mut pg = Pg {
            child: None,
            port: 0,
            bin,
            dir,
            databases: AtomicUsize::new(0),
            tls: tls.is_some(),
        };
        pg.spawn();
        pg
    }

    fn spawn(&mut self) {
        let (uid, gid) = ids(PG_USER);
        let log = self.dir.path().join("postgres.log");
        for _ in 0..5 {
            let port = free_port();
            let logf = fs::File::create(&log).unwrap();
            let mut child = Command::new(self.bin.join("postgres"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-c", "listen_addresses=127.0.0.1", "-p", &port.to_string()])
                .arg("-c")
                .arg(format!(
                    "unix_socket_directories={}",
                    self.dir.path().join("run").display()
                ))
                .args(["-c", "fsync=off", "-c", "max_connections=200"])
                .args(if self.tls {
                    let run = self.dir.path().join("run");
                    vec![
                        "-c".to_owned(),
                        "ssl=on".to_owned(),
                        "-c".to_owned(),
                        format!("ssl_cert_file={}", run.join("server.crt").display()),
                        "-c".to_owned(),
                        format!("ssl_key_file={}", run.join("server.key").display()),
                    ]
                } else {
                    Vec::new()
                })
                .current_dir(self.dir.path())
                .uid(uid)
                .gid(gid)
                .stdin(Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf)
                .spawn()
                .expect("start postgres");
            let start = Instant::now();
            let up = loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break true;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                assert!(start.elapsed() < READY, "postgres did not start");
                std::thread::sleep(Duration::from_millis(20));
            };
            if up {
                self.port = port;
                self.child = Some(child);
                self.wait_accepting();
                return;
            }
        }
        panic!(
            "postgres did not start: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Listening is not accepting: the server refuses sessions until its start-up ends.
    fn wait_accepting(&self) {
        let start = Instant::now();
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(self.dir.path().join("run"))
                .args(["-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(start.elapsed() < READY, "postgres did not accept sessions");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything database `db` holds, as SQL text (`pg_dump`), written to `to`.
    pub fn dump(&self, db: &str, to: &Path) {
        let out = Command::new(self.bin.join("pg_dump"))
            .arg("-h")
            .arg(self.dir.path().join("run"))
            .args(["-p", &self.port.to_string(), "-U", PG_ROLE, db])
            .output()
            .expect("run pg_dump");
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(to, out.stdout).unwrap();
    }

    /// Runs `sql` as the superuser through the Unix socket (trust there).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.dir.path().join("run"))
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                PG_ROLE,
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new, empty database; returns its URL (no password: see [`Pg::password`]).
    pub fn create_database(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("moat_{n}");
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://{PG_ROLE}@127.0.0.1:{}/{db}", self.port)
    }

    /// The role's password, for the file a config names.
    pub fn password(&self) -> &'static str {
        PG_PASSWORD
    }

    /// The `[store]` table for database `url`, its password in `password_file`.
    pub fn store_toml(&self, url: &str, password_file: &str) -> String {
        format!(
            "[store]\nkind = \"postgres\"\nurl = \"{url}\"\npassword_file = \"{password_file}\"\n"
        )
    }

    /// SIGKILL the server (a crash: no shutdown; its backends notice and exit, connections drop).
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// The postmaster's pid (its backends are its children), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on its data folder (a new port).
    pub fn restart(&mut self) {
        self.kill();
        // A killed postmaster leaves its pid file; postgres checks the pid and starts anyway.
        self.spawn();
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Immediate shutdown: the postmaster ends its backends too (a SIGKILL would leave
        // them to notice on their own).
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Some(c) = self.child.as_mut()
                    && let Ok(Some(_)) = c.try_wait()
                {
                    self.child = None;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        kill_child(&mut self.child);
    }
}

/// A Redis server of the test's own (no persistence).
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    password: Option<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(None)
    }

    /// A server whose clients must `AUTH` with `password` first (`requirepass`).
    pub fn start_with_password(password: &str) -> Redis {
        Self::start_with(Some(password.to_owned()))
    }

    fn start_with(password: Option<String>) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("moat-redis-")
            .tempdir()
            .expect("temp folder");
        let mut r = Redis {
            child: None,
            port: 0,
            dir,
            password,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("redis-server is not installed: run `cargo xtask setup`");
        let log = self.dir.path().join("redis.log");
        for _ in 0..5 {
            let port = free_port();
            let logf = fs::File::create(&log).unwrap();
            let mut child = Command::new(bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(match &self.password {
                    Some(p) => vec!["--requirepass", p.as_str()],
                    None => Vec::new(),
                })
                .arg("--dir")
                .arg(self.dir.path())
                .stdin(Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf)
                .spawn()
                .expect("start redis-server");
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(Some(_)) = child.try_wait() {
                continue;
            }
            wait_port(port, &mut child, "redis-server", &log);
            self.port = port;
            self.child = Some(child);
            return;
        }
        panic!(
            "redis-server did not start: {}",
            fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}
