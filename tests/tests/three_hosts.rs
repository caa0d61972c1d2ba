//! moat as operators run it, across three hosts: a gateway, an inference host and a rogue host,
//! each its own network namespace joined by veth pairs (addresses exist only inside them).
//!
//! The gateway host runs `moat serve` (supervisor + unprivileged worker, connect hooks), the
//! inference host runs `moat serve` in inference-host mode (the ingress guard) in front of the
//! OpenAI simulator. Root required; never skipped. Everything is removed on drop.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Stdio,
    time::Duration,
};

use moat_tests::{
    bin, create_key,
    daemon::{http_request, wait_for_log},
    kernel::{EPERM, KillOnDrop, TestCgroup, TestPins, require_root, unique},
    netns::{Lab, Netns, PortReservation, sa},
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `moat-sim` listening on `0.0.0.0:port` inside `ns`.
fn sim(ns: &Netns, port: u16) -> KillOnDrop {
    let mut child = ns
        .command(bin("moat-sim"))
        .args(["--listen", &format!("0.0.0.0:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moat-sim");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("LISTENING"), "moat-sim: {line}");
    KillOnDrop(child)
}

/// `moat serve` inside `ns`, killed on drop (also when the test fails).
fn serve(ns: &Netns, cfg: &Path, log: &Path) -> KillOnDrop {
    KillOnDrop(
        ns.command(bin("moat"))
            .args(["serve", "-c"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("start moat serve"),
    )
}

fn signal(daemon: &KillOnDrop, sig: Signal) {
    kill(Pid::from_raw(daemon.0.id() as i32), sig).unwrap();
}

fn chat(ns: &Netns, moat: SocketAddr, key: &str) -> u16 {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
    let key = key.to_owned();
    ns.run(move || http_request(moat, "POST", "/v1/chat/completions", Some(&key), Some(body)))
        .map(|(status, _)| status)
        .unwrap_or(0)
}

/// Requests the simulator on the inference host has seen.
fn sim_requests(lab: &Lab, port: u16) -> u64 {
    let (status, body) = lab
        .inference
        .run(move || http_request(sa("127.0.0.1", port), "GET", "/_sim/stats", None, None))
        .expect("sim stats");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("stats JSON");
    v["requests"].as_u64().expect("requests count")
}

/// Whether a TCP connect from `ns` to `to` gets through within a second.
fn tcp_reaches(ns: &Netns, to: SocketAddr) -> bool {
    ns.run(move || TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
}

/// `moat-probe tcp` from inside `ns`, in `cgroup`.
fn probe_errno(ns: &Netns, cgroup: &Path, to: SocketAddr) -> i32 {
    let out = ns
        .command(bin("moat-probe"))
        .arg("--cgroup")
        .arg(cgroup)
        .args(["tcp", &to.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["results"][0]["errno"].as_i64().unwrap() as i32
}

#[test]
fn gateway_inference_and_rogue_hosts() {
    require_root();
    let lab = Lab::new();
    // Model ports are reserved in the main namespace: the guard at the cgroup2 root then
    // judges no socket of the machine but the test's own.
    let (port1, port2) = (PortReservation::new(), PortReservation::new());
    let (p1, p2) = (port1.port, port2.port);
    let _sim1 = sim(&lab.inference, p1);
    let sim2 = sim(&lab.inference, p2);
    let dir = tempfile::tempdir().unwrap();
    let base = TestCgroup::new(unique("moat-test"));
    let gateway_cgroup = base.child("gateway");
    let outsider = base.child("outsider");
    let (gw_pins, inf_pins) = (TestPins::new(), TestPins::new());

    // Controls: without moat, the rogue host and a bystander on the gateway host both reach
    // the model port — so what is refused below is refused by moat.
    assert!(
        tcp_reaches(&lab.rogue, sa(Lab::INF_ROGUE4, p1)),
        "lab wiring: rogue → model"
    );
    assert_eq!(
        probe_errno(&lab.gateway, outsider.path(), sa(Lab::INF_GW4, p1)),
        0
    );

    // The inference host: the guard admits only the gateway's addresses (and loopback, for
    // the simulator's counters, as an operator would for local health checks).
    let inf_cfg = dir.path().join("inference.toml");
    let inference_toml = |ports: &[u16]| {
        format!(
            "[segmentation]\npin_root = \"{}\"\n[segmentation.inference]\nmodel_ports = {ports:?}\n\
             allowed_gateways = [\"{}\", \"{}\", \"127.0.0.1\"]\n",
            inf_pins.root.display(),
            Lab::GW4,
            Lab::GW6
        )
    };
    std::fs::write(&inf_cfg, inference_toml(&[p1])).unwrap();
    let mut inference = serve(&lab.inference, &inf_cfg, &dir.path().join("inference.log"));
    wait_for_log(
        &dir.path().join("inference.log"),
        "inference guard active",
        0,
    );

    // The gateway host: one pool on the inference host.
    let gw_cfg = dir.path().join("gateway.toml");
    let gateway_toml = |ports: &[u16]| {
        let hosts: Vec<String> = ports
            .iter()
            .map(|p| format!("\"{}:{p}\"", Lab::INF_GW4))
            .collect();
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"moat\"\n\
             [pools.gpu]\nhosts = [{}]\nhealth_interval_ms = 200\n\
             [models.m]\npool = \"gpu\"\n\
             [roles.tester]\npermissions = [\"model:*\", \"inference:*\"]\n\
             [segmentation]\ngateway_cgroup = \"{}\"\npin_root = \"{}\"\n",
            hosts.join(", "),
            gateway_cgroup.relative.display(),
            gw_pins.root.display()
        )
    };
    std::fs::write(&gw_cfg, gateway_toml(&[p1])).unwrap();
    let key = create_key(&gw_cfg);
    let gw_log = dir.path().join("gateway.log");
    let mut gateway = serve(&lab.gateway, &gw_cfg, &gw_log);
    let listening = wait_for_log(&gw_log, "data plane listening", 0);
    let moat: SocketAddr = listening["listen"].as_str().unwrap().parse().unwrap();

    // The gateway reaches the simulator through moat.
    let before = sim_requests(&lab, p1);
    assert_eq!(chat(&lab.gateway, moat, &key), 200, "chat through moat");
    assert_eq!(
        sim_requests(&lab, p1),
        before + 1,
        "the request reached the inference host"
    );

    // The rogue host is dropped by the inference host's guard; a rogue process on the gateway
    // host, outside the gateway cgroup, gets EPERM from its own kernel.
    let model1 = sa(Lab::INF_GW4, p1);
    assert!(
        !tcp_reaches(&lab.rogue, sa(Lab::INF_ROGUE4, p1)),
        "rogue host reached the model port"
    );
    assert_eq!(probe_errno(&lab.gateway, outsider.path(), model1), EPERM);

    // SIGHUP with a new pool host: routing, the gateway's connect hooks and the inference
    // host's guard change together.
    std::fs::write(&inf_cfg, inference_toml(&[p1, p2])).unwrap();
    signal(&inference, Signal::SIGHUP);
    wait_for_log(
        &dir.path().join("inference.log"),
        "inference guard reloaded",
        0,
    );
    std::fs::write(&gw_cfg, gateway_toml(&[p1, p2])).unwrap();
    signal(&gateway, Signal::SIGHUP);
    wait_for_log(&gw_log, "config reloaded", 0);
    let model2 = sa(Lab::INF_GW4, p2);
    assert_eq!(
        probe_errno(&lab.gateway, outsider.path(), model2),
        EPERM,
        "new host protected"
    );
    assert!(
        !tcp_reaches(&lab.rogue, sa(Lab::INF_ROGUE4, p2)),
        "new port guarded"
    );
    let before2 = sim_requests(&lab, p2);
    for _ in 0..6 {
        assert_eq!(chat(&lab.gateway, moat, &key), 200);
    }
    assert!(
        sim_requests(&lab, p2) > before2,
        "the new host takes traffic after the reload"
    );
    drop(sim2);

    // SIGKILL both supervisors: both guards stay.
    for daemon in [&mut gateway, &mut inference] {
        daemon.0.kill().unwrap();
        daemon.0.wait().unwrap();
    }
    assert_eq!(
        probe_errno(&lab.gateway, outsider.path(), model1),
        EPERM,
        "gateway guard after SIGKILL"
    );
    assert!(
        !tcp_reaches(&lab.rogue, sa(Lab::INF_ROGUE4, p1)),
        "inference guard after SIGKILL"
    );
    // The gateway cgroup still reaches the model: the kernel never needed the daemon for that.
    assert_eq!(probe_errno(&lab.gateway, gateway_cgroup.path(), model1), 0);
}
