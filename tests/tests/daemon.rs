//! The daemon as operators run it (root required; never skipped): the supervisor spawns an
//! unprivileged worker in the gateway cgroup, restarts it when it dies, reloads on SIGHUP, and
//! refuses to start when enforcement cannot be put in place.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use moat_tests::{
    bin,
    daemon::{Daemon, http_get, http_request, moat_cli},
    kernel::{EPERM, TestCgroup, TestPins, require_root, try_from, unique},
};
use nix::sys::signal::Signal;

/// A listener that accepts and closes connections for the rest of the test process.
fn listener() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || l.incoming().for_each(drop));
    port
}

struct Setup {
    dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
    base: TestCgroup,
    pins: TestPins,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("moat.toml");
        Setup {
            cfg,
            base: TestCgroup::new(unique("moat-test")),
            pins: TestPins::new(),
            dir,
        }
    }

    fn write(&self, pool_ports: &[u16], extra: &str) {
        let hosts: Vec<String> = pool_ports
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"moat\"\n\
             [pools.gpu]\nhosts = [{}]\n\
             [segmentation]\ngateway_cgroup = \"{}/gateway\"\npin_root = \"{}\"\n{extra}",
            hosts.join(", "),
            self.base.relative.display(),
            self.pins.root.display()
        );
        std::fs::write(&self.cfg, toml).unwrap();
    }

    fn gateway_cgroup(&self) -> TestCgroup {
        self.base.child("gateway")
    }
}

fn proc_status(pid: u32) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn worker_pid(event: &serde_json::Value) -> u32 {
    event["pid"].as_u64().expect("worker pid in the log") as u32
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..150 {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn worker_runs_unprivileged_in_the_gateway_cgroup_and_is_restarted() {
    require_root();
    let s = Setup::new();
    let pool = listener();
    s.write(&[pool], "");
    let gateway = s.gateway_cgroup();
    let daemon = Daemon::start(&s.cfg, &s.dir.path().join("serve.log"));
    let pid = worker_pid(&daemon.wait_log("worker started"));
    let listen = daemon.listen_addr();
    assert_eq!(http_get(listen, "/healthz").unwrap().0, 200);

    let status = proc_status(pid);
    let service = nix::unistd::User::from_name("moat").unwrap().unwrap();
    let uid = service.uid.to_string();
    let gid = service.gid.to_string();
    assert_eq!(
        status["Uid"].split_whitespace().collect::<Vec<_>>(),
        [uid.as_str(); 4],
        "{status:?}"
    );
    assert_eq!(
        status["Gid"].split_whitespace().collect::<Vec<_>>(),
        [gid.as_str(); 4]
    );
    assert_eq!(status["Groups"], "", "supplementary groups dropped");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            u64::from_str_radix(&status[cap], 16).unwrap(),
            0,
            "{cap} of the worker"
        );
    }
    assert_eq!(status["NoNewPrivs"], "1");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup
            .lines()
            .any(|l| l == format!("0::/{}", gateway.relative.display())),
        "worker cgroup: {cgroup}"
    );
    // The worker is the gateway: it reaches the pool, a bystander does not.
    let pool_addr: SocketAddr = format!("127.0.0.1:{pool}").parse().unwrap();
    let outsider = s.base.child("outsider");
    assert_eq!(
        try_from(Some(outsider.path()), "tcp", &[pool_addr]),
        [EPERM]
    );

    // A dead worker is replaced.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let again = worker_pid(&daemon.wait_log_nth("worker started", 1));
    assert_ne!(again, pid);
    daemon.wait_log("worker died; restarting");
    wait_until("the new worker to serve", || {
        http_get(listen, "/healthz").is_ok_and(|r| r.0 == 200)
    });

    // SIGKILL of the supervisor: the worker follows it, the kernel guard stays.
    let mut daemon = daemon;
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    wait_until("the worker to exit with its supervisor", || {
        !Path::new(&format!("/proc/{again}")).exists()
    });
    assert_eq!(
        try_from(Some(outsider.path()), "tcp", &[pool_addr]),
        [EPERM],
        "still enforced"
    );
}

#[test]
fn sighup_applies_kernel_policy_and_worker_config_together() {
    require_root();
    let s = Setup::new();
    let (first, second) = (listener(), listener());
    s.write(&[first], "");
    let _gateway = s.gateway_cgroup();
    let outsider = s.base.child("outsider");
    let daemon = Daemon::start(&s.cfg, &s.dir.path().join("serve.log"));
    daemon.wait_log("worker started");
    let listen = daemon.listen_addr();
    let out = Some(outsider.path());
    let (a, b): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{first}").parse().unwrap(),
        format!("127.0.0.1:{second}").parse().unwrap(),
    );
    assert_eq!(try_from(out, "tcp", &[a, b]), [EPERM, 0]);

    // A new pool host: protected after the reload.
    s.write(&[first, second], "");
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("config reloaded");
    assert_eq!(try_from(out, "tcp", &[a, b]), [EPERM, EPERM]);
    assert_eq!(http_get(listen, "/healthz").unwrap().0, 200);

    // A broken file is refused, and nothing changes.
    s.write(&[second], "[server.extra]\n");
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("config reload refused");
    assert_eq!(
        try_from(out, "tcp", &[a, b]),
        [EPERM, EPERM],
        "bad file changes nothing"
    );

    // So is a valid file that changes a key only a restart can change.
    let moved = std::fs::read_to_string(&s.cfg)
        .unwrap()
        .replace("[server.extra]\n", "")
        .replace("127.0.0.1:0", "127.0.0.1:1");
    std::fs::write(&s.cfg, moved).unwrap();
    daemon.signal(Signal::SIGHUP);
    let refused = daemon.wait_log_nth("config reload refused", 1);
    assert_eq!(refused["key"], "server.listen");
    assert_eq!(try_from(out, "tcp", &[a, b]), [EPERM, EPERM]);
    assert_eq!(http_get(listen, "/healthz").unwrap().0, 200);
}

#[test]
fn refuses_to_start_when_enforcement_cannot_be_put_in_place() {
    require_root();
    let s = Setup::new();
    s.write(&[listener()], "");
    // A pin root outside any bpffs: the hooks cannot be pinned, so enforcement is impossible.
    let bad = std::fs::read_to_string(&s.cfg).unwrap().replace(
        &s.pins.root.display().to_string(),
        &s.dir.path().join("not-bpffs").display().to_string(),
    );
    std::fs::write(&s.cfg, bad).unwrap();
    let out = Command::new(bin("moat"))
        .args(["serve", "-c"])
        .arg(&s.cfg)
        .output()
        .unwrap();
    assert!(!out.status.success(), "moat serve must refuse to run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kernel enforcement is required"),
        "{stderr}"
    );
    assert!(stderr.contains("not on a bpffs"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("worker started"),
        "nothing serves"
    );

    // With segmentation off it runs, and says enforcement is off.
    let off = std::fs::read_to_string(&s.cfg)
        .unwrap()
        .replace("[segmentation]\n", "[segmentation]\nmode = \"off\"\n");
    std::fs::write(&s.cfg, off).unwrap();
    let _gateway = s.gateway_cgroup();
    let daemon = Daemon::start(&s.cfg, &s.dir.path().join("off.log"));
    daemon.wait_log("segmentation is off");
    daemon.wait_log("worker started");
    assert_eq!(http_get(daemon.listen_addr(), "/healthz").unwrap().0, 200);
}

#[test]
fn kernel_counters_reach_the_admin_plane_metrics() {
    require_root();
    let s = Setup::new();
    let pool = listener();
    s.write(
        &[pool],
        "[admin]\nlisten = \"127.0.0.1:0\"\n[roles.ops]\npermissions = [\"audit:read\"]\n\
         [roles.user]\npermissions = [\"model:*\", \"inference:*\"]\n",
    );
    let cli = |args: &[&str]| moat_cli(&s.cfg, args);
    cli(&["tenants", "add", "ops"]);
    cli(&[
        "users", "add", "auditor", "--tenant", "ops", "--role", "ops",
    ]);
    cli(&["users", "add", "app", "--tenant", "ops", "--role", "user"]);
    let key = |user: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&cli(&["keys", "create", "--user", user, "--json"])).unwrap();
        v["key"].as_str().unwrap().to_owned()
    };
    let (auditor, app) = (key("auditor"), key("app"));
    let _gateway = s.gateway_cgroup();
    let daemon = Daemon::start(&s.cfg, &s.dir.path().join("serve.log"));
    let admin: SocketAddr = daemon.wait_log("admin plane listening")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // Two refused connects, then the counters (pushed every 2 s) show them.
    let outsider = s.base.child("outsider");
    let pool_addr: SocketAddr = format!("127.0.0.1:{pool}").parse().unwrap();
    for _ in 0..2 {
        assert_eq!(
            try_from(Some(outsider.path()), "tcp", &[pool_addr]),
            [EPERM]
        );
    }
    let denied = || -> u64 {
        let (status, body) = http_request(admin, "GET", "/metrics", Some(&auditor), None).unwrap();
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find(|l| {
                l.starts_with("moat_kernel_connect_total{hook=\"connect4\",verdict=\"denied\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    wait_until("the deny counter on /metrics", || denied() >= 2);
    // An inference key is refused there; the data plane has no such route.
    assert_eq!(
        http_request(admin, "GET", "/metrics", Some(&app), None)
            .unwrap()
            .0,
        403
    );
    let data = daemon.listen_addr();
    assert_eq!(
        http_request(data, "GET", "/metrics", Some(&auditor), None)
            .unwrap()
            .0,
        404
    );
}
