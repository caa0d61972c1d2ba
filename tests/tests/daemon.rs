//! The daemon as operators run it (root required; never skipped): the supervisor spawns an
//! unprivileged worker in the gateway cgroup, restarts it when it dies, reloads on SIGHUP, and
//! refuses to start when enforcement cannot be put in place.

use std::{net::SocketAddr, path::Path};

use moat_tests::{
    PoolSim,
    daemon::Daemon,
    http::Client,
    kernel::{EPERM, listener, require_root, try_from, wait_until},
};
use nix::sys::signal::Signal;

/// Writes the fixture's enforcing gateway config ([`Daemon::enforcing_config`]) with pool
/// `hosts` checked every 200 ms, and `extra`.
fn write(d: &Daemon, hosts: &[SocketAddr], extra: &str) {
    d.write_config(&d.enforcing_config(hosts, "health_interval_ms = 200", extra));
}

/// A chat completion for model `m` through the gateway must be answered 200.
fn chat_ok(d: &Daemon, what: &str) {
    let r = d.chat("m").send().expect("chat through moat");
    let status = r.status();
    assert_eq!(status, 200, "{what}: {}", r.text().unwrap_or_default());
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

#[test]
fn worker_runs_unprivileged_in_the_gateway_cgroup_and_is_restarted() {
    require_root();
    let mut d = Daemon::enforcing();
    let upstream = PoolSim::start();
    let pool_addr = upstream.addr;
    write(&d, &[pool_addr], "");
    d.create_tester_key();
    let gateway = d.cgroup().child("gateway");
    d.start();
    let pid = worker_pid(&d.wait_log("worker started"));
    assert_eq!(d.get("/healthz").send().unwrap().status(), 200);

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
    // The worker is the gateway: a request through it is answered by the pool's simulator,
    // while a bystander's connect to the same host is refused.
    let before = upstream.requests();
    chat_ok(&d, "chat through the gateway");
    assert_eq!(upstream.requests(), before + 1, "the simulator answered it");
    let outsider = d.cgroup().child("outsider");
    assert_eq!(
        try_from(Some(outsider.path()), "tcp", &[pool_addr]),
        [EPERM]
    );

    // A dead worker is replaced.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let again = worker_pid(&d.wait_log_nth("worker started", 1));
    assert_ne!(again, pid);
    d.wait_log("worker died; restarting");
    wait_until("the new worker to serve", || {
        d.get("/healthz").send().is_ok_and(|r| r.status() == 200)
    });

    // SIGKILL of the supervisor: the worker follows it, the kernel guard stays.
    d.kill();
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
    let mut d = Daemon::enforcing();
    let (first_sim, second_sim) = (PoolSim::start(), PoolSim::start());
    let (a, b) = (first_sim.addr, second_sim.addr);
    write(&d, &[a], "");
    d.create_tester_key();
    let _gateway = d.cgroup().child("gateway");
    let outsider = d.cgroup().child("outsider");
    d.start();
    d.wait_log("worker started");
    let out = Some(outsider.path());
    assert_eq!(try_from(out, "tcp", &[a, b]), [EPERM, 0]);
    chat_ok(&d, "before the reload");
    assert_eq!(first_sim.requests(), 1, "the first host answered");
    assert_eq!(second_sim.requests(), 0, "the second is no pool host yet");

    // A new pool host: protected after the reload, and routed to (ties take turns, so a
    // few requests reach it) through the gateway's egress lockdown.
    write(&d, &[a, b], "");
    d.signal(Signal::SIGHUP);
    d.wait_log("config reloaded");
    assert_eq!(try_from(out, "tcp", &[a, b]), [EPERM, EPERM]);
    assert_eq!(d.get("/healthz").send().unwrap().status(), 200);
    let mut sent = 0;
    while second_sim.requests() == 0 {
        assert!(sent < 20, "20 requests and none reached the new host");
        chat_ok(&d, "after the reload");
        sent += 1;
    }

    // A broken file is refused, and nothing changes.
    write(&d, &[b], "[server.extra]\n");
    d.signal(Signal::SIGHUP);
    d.wait_log("config reload refused");
    assert_eq!(
        try_from(out, "tcp", &[a, b]),
        [EPERM, EPERM],
        "bad file changes nothing"
    );

    // So is a valid file that changes a key only a restart can change.
    let moved = d
        .read_config()
        .replace("[server.extra]\n", "")
        .replace("127.0.0.1:0", "127.0.0.1:1");
    d.write_config(&moved);
    d.signal(Signal::SIGHUP);
    let refused = d.wait_log_nth("config reload refused", 1);
    assert_eq!(refused["key"], "server.listen");
    assert_eq!(try_from(out, "tcp", &[a, b]), [EPERM, EPERM]);
    assert_eq!(d.get("/healthz").send().unwrap().status(), 200);
    chat_ok(&d, "the running config still serves");
}

#[test]
fn refuses_to_start_when_enforcement_cannot_be_put_in_place() {
    require_root();
    let mut d = Daemon::enforcing();
    write(&d, &[listener("127.0.0.1:0")], "");
    // A pin root outside any bpffs: the hooks cannot be pinned, so enforcement is impossible.
    let bad = d.read_config().replace(
        &d.pin_root().display().to_string(),
        &d.dir().join("not-bpffs").display().to_string(),
    );
    d.write_config(&bad);
    let (status, stderr) = d.run_to_exit(None);
    assert!(!status.success(), "moat serve must refuse to run");
    assert!(
        stderr.contains("kernel enforcement is required"),
        "{stderr}"
    );
    assert!(stderr.contains("not on a bpffs"), "{stderr}");
    assert!(!stderr.contains("worker started"), "nothing serves");

    // With segmentation off it runs, and says enforcement is off.
    let off = d
        .read_config()
        .replace("[segmentation]\n", "[segmentation]\nmode = \"off\"\n");
    d.write_config(&off);
    let _gateway = d.cgroup().child("gateway");
    d.start();
    d.wait_log("segmentation is off");
    d.wait_log("worker started");
    assert_eq!(d.get("/healthz").send().unwrap().status(), 200);
}

#[test]
fn kernel_counters_reach_the_admin_plane_metrics() {
    require_root();
    let mut d = Daemon::enforcing();
    let pool_addr = listener("127.0.0.1:0");
    write(
        &d,
        &[pool_addr],
        "[admin]\nlisten = \"127.0.0.1:0\"\n[roles.ops]\npermissions = [\"audit:read\"]\n\
         [roles.user]\npermissions = [\"model:*\", \"inference:*\"]\n",
    );
    let cli = |args: &[&str]| d.cli_ok(args, None);
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
    let _gateway = d.cgroup().child("gateway");
    d.start();
    let admin: SocketAddr = d.wait_log("admin plane listening")["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // Two refused connects, then the counters (pushed every 2 s) show them.
    let outsider = d.cgroup().child("outsider");
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
    assert_eq!(get(d.addr(), "/metrics", &auditor).0, 404);
}
