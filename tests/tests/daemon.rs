//! The daemon as operators run it (root required; never skipped): the supervisor spawns an
//! unprivileged worker in the gateway cgroup, restarts it when it dies, reloads on SIGHUP, and
//! refuses to start when enforcement cannot be put in place.

use std::{net::SocketAddr, path::Path, time::Duration};

use moat_tests::{
    daemon::Daemon,
    http::Client,
    kernel::{EPERM, TestCgroup, require_root, try_from},
};
use nix::sys::signal::Signal;

/// A listener that accepts and closes connections for the rest of the test process.
fn listener() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || l.incoming().for_each(drop));
    port
}

/// The daemon under test: its own cgroup and pin root.
struct Setup {
    daemon: Daemon,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            daemon: Daemon::enforcing(),
        }
    }

    fn write(&self, pool_ports: &[u16], extra: &str) {
        let hosts: Vec<String> = pool_ports
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"nobody\"\n\
             [pools.gpu]\nhosts = [{}]\n\
             [segmentation]\ngateway_cgroup = \"{}/gateway\"\npin_root = \"{}\"\n{extra}",
            hosts.join(", "),
            self.base().relative.display(),
            self.daemon.pin_root().display()
        );
        self.daemon.write_config(&toml);
    }

    fn base(&self) -> &TestCgroup {
        self.daemon.cgroup()
    }

    fn gateway_cgroup(&self) -> TestCgroup {
        self.base().child("gateway")
    }
}

/// `GET path` on `addr` with a bearer key: (status, body).
fn get(addr: SocketAddr, path: &str, key: &str) -> (u16, String) {
    let r = Client::new()
        .get(format!("http://{addr}{path}"))
        .bearer_auth(key)
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap())
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
    let mut s = Setup::new();
    let pool = listener();
    s.write(&[pool], "");
    let gateway = s.gateway_cgroup();
    s.daemon.start();
    let daemon = &s.daemon;
    let pid = worker_pid(&daemon.wait_log("worker started"));
    assert_eq!(daemon.get("/healthz").send().unwrap().status(), 200);

    let status = proc_status(pid);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let uid = nobody.uid.to_string();
    let gid = nobody.gid.to_string();
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
    let outsider = s.base().child("outsider");
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
        daemon
            .get("/healthz")
            .send()
            .is_ok_and(|r| r.status() == 200)
    });

    // SIGKILL of the supervisor: the worker follows it, the kernel guard stays.
    s.daemon.kill();
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
    let mut s = Setup::new();
    let (first, second) = (listener(), listener());
    s.write(&[first], "");
    let _gateway = s.gateway_cgroup();
    let outsider = s.base().child("outsider");
    s.daemon.start();
    let daemon = &s.daemon;
    daemon.wait_log("worker started");
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
    assert_eq!(daemon.get("/healthz").send().unwrap().status(), 200);

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
    let moved = s
        .daemon
        .read_config()
        .replace("[server.extra]\n", "")
        .replace("127.0.0.1:0", "127.0.0.1:1");
    s.daemon.write_config(&moved);
    daemon.signal(Signal::SIGHUP);
    let refused = daemon.wait_log_nth("config reload refused", 1);
    assert_eq!(refused["key"], "server.listen");
    assert_eq!(try_from(out, "tcp", &[a, b]), [EPERM, EPERM]);
    assert_eq!(daemon.get("/healthz").send().unwrap().status(), 200);
}

#[test]
fn refuses_to_start_when_enforcement_cannot_be_put_in_place() {
    require_root();
    let mut s = Setup::new();
    s.write(&[listener()], "");
    // A pin root outside any bpffs: the hooks cannot be pinned, so enforcement is impossible.
    let bad = s.daemon.read_config().replace(
        &s.daemon.pin_root().display().to_string(),
        &s.daemon.dir().join("not-bpffs").display().to_string(),
    );
    s.daemon.write_config(&bad);
    let (status, stderr) = s.daemon.run_to_exit(None);
    assert!(!status.success(), "moat serve must refuse to run");
    assert!(
        stderr.contains("kernel enforcement is required"),
        "{stderr}"
    );
    assert!(stderr.contains("not on a bpffs"), "{stderr}");
    assert!(!stderr.contains("worker started"), "nothing serves");

    // With segmentation off it runs, and says enforcement is off.
    let off = s
        .daemon
        .read_config()
        .replace("[segmentation]\n", "[segmentation]\nmode = \"off\"\n");
    s.daemon.write_config(&off);
    let _gateway = s.gateway_cgroup();
    s.daemon.start();
    let daemon = &s.daemon;
    daemon.wait_log("segmentation is off");
    daemon.wait_log("worker started");
    assert_eq!(daemon.get("/healthz").send().unwrap().status(), 200);
}

#[test]
fn kernel_counters_reach_the_admin_plane_metrics() {
    require_root();
    let mut s = Setup::new();
    let pool = listener();
    s.write(
        &[pool],
        "[admin]\nlisten = \"127.0.0.1:0\"\n[roles.ops]\npermissions = [\"audit:read\"]\n\
         [roles.user]\npermissions = [\"model:*\", \"inference:*\"]\n",
    );
    let cli = |args: &[&str]| s.daemon.cli_ok(args, None);
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
    s.daemon.start();
    let daemon = &s.daemon;
    let admin: SocketAddr = daemon.wait_log("admin plane listening")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // Two refused connects, then the counters (pushed every 2 s) show them.
    let outsider = s.base().child("outsider");
    let pool_addr: SocketAddr = format!("127.0.0.1:{pool}").parse().unwrap();
    for _ in 0..2 {
        assert_eq!(
            try_from(Some(outsider.path()), "tcp", &[pool_addr]),
            [EPERM]
        );
    }
    let denied = || -> u64 {
        let (status, body) = get(admin, "/metrics", &auditor);
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
    assert_eq!(get(admin, "/metrics", &app).0, 403);
    assert_eq!(get(daemon.addr(), "/metrics", &auditor).0, 404);
}
