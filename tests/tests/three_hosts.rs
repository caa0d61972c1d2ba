//! moat as operators run it, across three hosts: a gateway, an inference host and a rogue host,
//! each its own network namespace joined by veth pairs (addresses exist only inside them).
//!
//! The gateway host runs `moat serve` (supervisor + unprivileged worker, connect hooks), the
//! inference host runs `moat serve` in inference-host mode (the ingress guard) in front of the
//! OpenAI simulator. Root required; never skipped. Everything is removed on drop.

use std::{
    io::{BufRead, BufReader, ErrorKind},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Stdio,
    time::Duration,
};

use moat_tests::{
    bin,
    daemon::Daemon,
    http::Client,
    kernel::{EPERM, KillOnDrop, require_root},
    netns::{Lab, Netns, PortReservation, sa},
};
use nix::sys::signal::Signal;

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

/// A chat request through the gateway `moat`, sent from inside `ns`: its status (0: no answer).
fn chat(ns: &Netns, moat: &Daemon) -> u16 {
    let request = moat.chat("m");
    ns.run(move || request.send())
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Requests the simulator on the inference host has seen.
fn sim_requests(lab: &Lab, port: u16) -> u64 {
    let url = format!("http://{}/_sim/stats", sa("127.0.0.1", port));
    let r = lab
        .inference
        .run(move || Client::new().get(url).send())
        .expect("sim stats");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().expect("stats JSON");
    v["requests"].as_u64().expect("requests count")
}

/// What a TCP connect from `ns` to `to` sees within a second: `Ok` when the handshake
/// completed; `Err(TimedOut)` when no answer came at all (the SYN was dropped, what the ingress
/// guard does), any other error kind otherwise (refused: nothing listens).
fn tcp_connect(ns: &Netns, to: SocketAddr) -> Result<(), ErrorKind> {
    ns.run(move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(1))
            .map(drop)
            .map_err(|e| e.kind())
    })
}

/// The inference host's guard drops the rogue host's SYNs to `port` (a connect that times
/// out, not one refused), while the same listener still completes a handshake with a process
/// in the gateway cgroup — the control: a dead simulator would fail both.
fn assert_guarded(lab: &Lab, gateway_cgroup: &Path, port: u16, what: &str) {
    assert_eq!(
        tcp_connect(&lab.rogue, sa(Lab::INF_ROGUE4, port)),
        Err(ErrorKind::TimedOut),
        "{what}: the rogue host's SYN must be dropped"
    );
    assert_eq!(
        probe_errno(&lab.gateway, gateway_cgroup, sa(Lab::INF_GW4, port)),
        0,
        "{what}: control, the gateway reaches the same listener"
    );
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
    let (mut gateway, mut inference) = (Daemon::enforcing(), Daemon::enforcing());
    let gateway_cgroup = gateway.cgroup().child("gateway");
    let outsider = gateway.cgroup().child("outsider");

    // Controls: without moat, the rogue host and a bystander on the gateway host both reach
    // the model port — so what is refused below is refused by moat.
    assert_eq!(
        tcp_connect(&lab.rogue, sa(Lab::INF_ROGUE4, p1)),
        Ok(()),
        "lab wiring: rogue → model"
    );
    assert_eq!(
        probe_errno(&lab.gateway, outsider.path(), sa(Lab::INF_GW4, p1)),
        0
    );

    // The inference host: the guard admits only the gateway's addresses (and loopback, for
    // the simulator's counters, as an operator would for local health checks).
    let inference_toml = |pin_root: &Path, ports: &[u16]| {
        format!(
            "[segmentation]\npin_root = \"{}\"\n[segmentation.inference]\nmodel_ports = {ports:?}\n\
             allowed_gateways = [\"{}\", \"{}\", \"127.0.0.1\"]\n",
            pin_root.display(),
            Lab::GW4,
            Lab::GW6
        )
    };
    inference.write_config(&inference_toml(inference.pin_root(), &[p1]));
    inference.start_in(&lab.inference);
    inference.wait_log("inference guard active");

    // The gateway host: one pool on the inference host.
    let gateway_toml = |pin_root: &Path, ports: &[u16]| {
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
            pin_root.display()
        )
    };
    gateway.write_config(&gateway_toml(gateway.pin_root(), &[p1]));
    gateway.create_tester_key();
    gateway.start_in(&lab.gateway);

    // The gateway reaches the simulator through moat.
    let before = sim_requests(&lab, p1);
    assert_eq!(chat(&lab.gateway, &gateway), 200, "chat through moat");
    assert_eq!(
        sim_requests(&lab, p1),
        before + 1,
        "the request reached the inference host"
    );

    // The rogue host is dropped by the inference host's guard; a rogue process on the gateway
    // host, outside the gateway cgroup, gets EPERM from its own kernel.
    let model1 = sa(Lab::INF_GW4, p1);
    assert_guarded(&lab, gateway_cgroup.path(), p1, "model port");
    assert_eq!(probe_errno(&lab.gateway, outsider.path(), model1), EPERM);

    // SIGHUP with a new pool host: routing, the gateway's connect hooks and the inference
    // host's guard change together.
    inference.write_config(&inference_toml(inference.pin_root(), &[p1, p2]));
    inference.signal(Signal::SIGHUP);
    inference.wait_log("inference guard reloaded");
    gateway.write_config(&gateway_toml(gateway.pin_root(), &[p1, p2]));
    gateway.signal(Signal::SIGHUP);
    gateway.wait_log("config reloaded");
    let model2 = sa(Lab::INF_GW4, p2);
    assert_eq!(
        probe_errno(&lab.gateway, outsider.path(), model2),
        EPERM,
        "new host protected"
    );
    assert_guarded(&lab, gateway_cgroup.path(), p2, "new port");
    let before2 = sim_requests(&lab, p2);
    for _ in 0..6 {
        assert_eq!(chat(&lab.gateway, &gateway), 200);
    }
    assert!(
        sim_requests(&lab, p2) > before2,
        "the new host takes traffic after the reload"
    );
    drop(sim2);

    // SIGKILL both supervisors: both guards stay.
    for daemon in [&mut gateway, &mut inference] {
        daemon.kill();
    }
    assert_eq!(
        probe_errno(&lab.gateway, outsider.path(), model1),
        EPERM,
        "gateway guard after SIGKILL"
    );
    assert_guarded(
        &lab,
        gateway_cgroup.path(),
        p1,
        "inference guard after SIGKILL",
    );
    // The gateway cgroup still reaches the model: the kernel never needed the daemon for that.
    assert_eq!(probe_errno(&lab.gateway, gateway_cgroup.path(), model1), 0);
}
