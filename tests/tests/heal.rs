//! Enforcement removed behind moat's back comes back (root required; never skipped).
//!
//! An operator (or an attacker with root for a moment) can detach one of moat's links with
//! `bpftool link detach id N`, or remove a link's pin, while the daemon runs. The supervisor
//! asks the kernel every few seconds whether each hook's link is still attached, replaces a
//! severed or missing one, re-pins it and logs `kernel_enforcement_restored` naming what it
//! found; a restart adopts such pins the same way instead of refusing to start. These tests
//! do exactly that to every link kind and show a process outside the gateway cgroup refused
//! again afterwards.

use std::{net::SocketAddr, time::Duration};

use moat_tests::{
    daemon::Daemon,
    kernel::{self, EPERM, NftTable, require_root, try_from},
    netns::{Echo, Lab, Outcome, PortReservation, sa, tcp_echo},
};
use serde_json::Value;

/// What `moat-probe tcp` reports when its 2 s connect timeout ran out (a dropped SYN).
const TIMED_OUT: i32 = -1;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The kernel's id of `hook`'s link, as `moat segment status` reports it.
fn link_of(status: &Value, hook: &str) -> Value {
    status["links"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["hook"] == hook)
        .unwrap_or_else(|| panic!("no link {hook} in {status:#}"))
        .clone()
}

fn bpftool_detach(link_id: u64) {
    let out = std::process::Command::new("bpftool")
        .args(["link", "detach", "id", &link_id.to_string()])
        .output()
        .expect("run bpftool (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "bpftool link detach id {link_id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every link kind of the gateway side, detached with `bpftool link detach` (one link pin and
/// one map pin removed instead) while the daemon runs: each comes back as a new, attached link, the supervisor
/// logs what it found, and the probe that names the hook's kind of destination is refused
/// again. `/readyz` and `moat segment status` report the kernel's state.
#[test]
fn severed_and_missing_links_are_restored_while_the_daemon_runs() {
    require_root();
    let server = kernel::listener("[::]:0");
    let p = server.port();
    let mut daemon = Daemon::enforcing();
    let outsider = daemon.cgroup().child("outsider");
    let _gateway = daemon.cgroup().child("gateway");
    let out = Some(outsider.path());
    // A DNAT'd address in front of the pool, for the egress hook's probe.
    let front = PortReservation::new();
    let _nat = NftTable::new(&format!(
        "chain out {{
            type nat hook output priority -100;
            ip daddr 127.0.0.6 tcp dport {} dnat ip to 127.0.0.1:{p}
        }}",
        front.port
    ));
    let v4 = addr(&format!("127.0.0.1:{p}"));
    let v6 = addr(&format!("[::1]:{p}"));
    let natted = addr(&format!("127.0.0.6:{}", front.port));
    let toml = daemon.enforcing_config(&[v4, v6], "", "");
    daemon.write_config(&toml);
    daemon.start();
    daemon.wait_log("worker started");

    // (hook, probe action, target, what the outsider gets while the hook is in place)
    let cases = [
        ("connect4", "tcp", v4, EPERM),
        ("connect6", "tcp", v6, EPERM),
        ("sendmsg4", "udp", v4, EPERM),
        ("sendmsg6", "udp", v6, EPERM),
        ("cgroup_egress", "tcp", natted, TIMED_OUT),
    ];
    for (n, (hook, action, target, refused)) in cases.into_iter().enumerate() {
        assert_eq!(try_from(out, action, &[target]), [refused], "{hook} before");
        let before = link_of(&daemon.segment_status(), hook);
        assert_eq!(before["state"], "attached", "{hook}: {before}");
        let old_id = before["link_id"].as_u64().unwrap();
        // sendmsg6's pin is removed instead: the kernel frees the link (nothing else holds
        // it), which detaches the program.
        let found = if hook == "sendmsg6" {
            std::fs::remove_file(daemon.pins().dir().join("links").join(hook)).unwrap();
            "missing"
        } else {
            bpftool_detach(old_id);
            "severed"
        };
        let line = daemon.wait_log_nth("kernel_enforcement_restored", n);
        assert_eq!(line["found"], format!("{hook} ({found})"), "{line}");
        assert_eq!(line["during"], "check");
        let after = link_of(&daemon.segment_status(), hook);
        assert_eq!(after["state"], "attached", "{hook} restored: {after}");
        assert_ne!(after["link_id"].as_u64().unwrap(), old_id, "a new link");
        assert_eq!(
            try_from(out, action, &[target]),
            [refused],
            "{hook}: refused again after the restoration"
        );
    }
    // A map pin removed: the programs get a new map (the deny-event ring buffer here), and
    // the daemon reads the new one.
    std::fs::remove_file(daemon.pins().dir().join("maps/MOAT_EVENTS")).unwrap();
    let line = daemon.wait_log_nth("kernel_enforcement_restored", cases.len());
    assert_eq!(line["found"], "maps/MOAT_EVENTS (missing)", "{line}");
    let denied = kernel::probe(out, "tcp", &[v4.to_string()]);
    assert_eq!(denied.errnos(), [EPERM]);
    let event = daemon.wait_log(&format!("\"pid\":{}", denied.pid));
    assert_eq!(
        event["event"], "kernel_deny",
        "deny events still reach the log"
    );

    let status = daemon.segment_status();
    assert_eq!(status["installed"], true, "{status:#}");
    let ready: Value = daemon.get("/readyz").send().unwrap().json().unwrap();
    assert_eq!(ready["segmentation"], "enforce", "{ready}");
    assert_eq!(ready["hooks_not_attached"], serde_json::json!([]));
}

/// A daemon that finds pinned links severed when it starts (here: detached while
/// no daemon ran) restores it instead of refusing to start; until then `moat segment
/// status` reports the severed link and enforcement as degraded, not installed.
#[test]
fn a_restart_restores_a_link_severed_while_the_daemon_was_down() {
    require_root();
    let server = kernel::listener("[::]:0");
    let p = server.port();
    let mut daemon = Daemon::enforcing();
    let outsider = daemon.cgroup().child("outsider");
    let _gateway = daemon.cgroup().child("gateway");
    let out = Some(outsider.path());
    let target = addr(&format!("127.0.0.1:{p}"));
    let toml = daemon.enforcing_config(&[target], "", "");
    daemon.write_config(&toml);
    daemon.start();
    daemon.wait_log("worker started");
    daemon.kill();
    assert_eq!(try_from(out, "tcp", &[target]), [EPERM], "fail-static");

    // connect4 alone would not open the port (the egress hook drops the SYN): sever both.
    let status = daemon.segment_status();
    for hook in ["connect4", "cgroup_egress"] {
        bpftool_detach(link_of(&status, hook)["link_id"].as_u64().unwrap());
    }
    assert_eq!(
        try_from(out, "tcp", &[target]),
        [0],
        "the hole severed links leave"
    );
    let status = daemon.segment_status();
    assert_eq!(link_of(&status, "connect4")["state"], "severed");
    assert_eq!(status["installed"], false, "severed is not installed");
    assert_eq!(
        status["not_attached"],
        serde_json::json!(["connect4 (severed)", "cgroup_egress (severed)"])
    );
    let text = daemon.cli_ok(&["segment", "status"], None);
    assert!(text.contains("DEGRADED"), "{text}");

    daemon.start();
    let line = daemon.wait_log("kernel_enforcement_restored");
    assert_eq!(line["found"], "connect4 (severed), cgroup_egress (severed)");
    assert_eq!(line["during"], "adopt");
    daemon.wait_log("worker started");
    assert_eq!(
        try_from(out, "tcp", &[target]),
        [EPERM],
        "restored at start"
    );
    let status = daemon.segment_status();
    assert_eq!(status["installed"], true, "{status:#}");
    assert_eq!(link_of(&status, "connect4")["state"], "attached");
}

/// The inference guard's attachments — the `cgroup_skb` link at the cgroup2 root and the TC
/// attachment on an interface — removed under a guard-only daemon: links with `bpftool link
/// detach`, and below Linux 6.6, where the TC guard is a clsact filter added through netlink
/// (no link), the filter with `tc filter del`. Each comes back, logged, and the rogue host
/// stays dropped.
#[test]
fn severed_guard_links_are_restored_while_the_daemon_runs() {
    require_root();
    let model = PortReservation::new();
    let port = model.port;
    let lab = Lab::new();
    let _echo = Echo::start(&lab.inference, port);
    let mut daemon = Daemon::enforcing();
    daemon.write_config(&format!(
        "[segmentation]\npin_root = \"{}\"\n[segmentation.inference]\n\
         model_ports = [{port}]\nallowed_gateways = [\"{}\"]\nattach = \"both\"\n\
         interfaces = [\"{}\"]\n",
        daemon.pin_root().display(),
        Lab::GW4,
        Lab::IF_FROM_ROGUE
    ));
    daemon.start_in(&lab.inference);
    daemon.wait_log("inference guard active");
    let rogue_to = sa(Lab::INF_ROGUE4, port);
    let wait = Duration::from_millis(800);
    let guard_link = |name: &str| -> Value {
        // `moat segment status` in the daemon's namespace: below Linux 6.6 it looks the
        // netlink filter up by interface name, which only means something there.
        let out = lab
            .inference
            .command(moat_tests::bin("moat"))
            .args(["segment", "status", "--json", "--config"])
            .arg(daemon.config_path())
            .output()
            .expect("run moat segment status");
        assert!(out.status.success(), "moat segment status: {out:?}");
        let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        status["inference"]["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["attachment"] == name)
            .unwrap_or_else(|| panic!("no guard link {name} in {status:#}"))
            .clone()
    };
    let tc = format!("tc-{}", Lab::IF_FROM_ROGUE);
    for (n, name) in ["cgroup_skb", tc.as_str()].into_iter().enumerate() {
        assert_eq!(tcp_echo(&lab.rogue, rogue_to, wait).0, Outcome::TimedOut);
        let before = guard_link(name);
        assert_eq!(before["state"], "attached", "{before}");
        if before["via"] == "netlink" {
            // Below Linux 6.6 the TC guard is a clsact filter, no link: removed with `tc`.
            assert!(before["link_id"].is_null(), "{before}");
            let old_program = before["program_id"].as_u64().unwrap();
            let out = lab
                .inference
                .command("tc")
                .args(["filter", "del", "dev", Lab::IF_FROM_ROGUE, "ingress"])
                .output()
                .expect("run tc");
            assert!(out.status.success(), "tc filter del: {out:?}");
            let line = daemon.wait_log_nth("kernel_enforcement_restored", n);
            assert_eq!(line["found"], format!("{name} (missing)"), "{line}");
            let after = guard_link(name);
            assert_eq!(after["state"], "attached", "{name} restored: {after}");
            assert_eq!(after["via"], "netlink", "{after}");
            assert_ne!(
                after["program_id"].as_u64().unwrap(),
                old_program,
                "a new load"
            );
        } else {
            let old_id = before["link_id"].as_u64().unwrap();
            bpftool_detach(old_id);
            let line = daemon.wait_log_nth("kernel_enforcement_restored", n);
            assert_eq!(line["found"], format!("{name} (severed)"), "{line}");
            let after = guard_link(name);
            assert_eq!(after["state"], "attached", "{name} restored: {after}");
            assert_ne!(after["link_id"].as_u64().unwrap(), old_id, "a new link");
        }
        assert_eq!(
            tcp_echo(&lab.rogue, rogue_to, wait).0,
            Outcome::TimedOut,
            "{name}: the rogue host is dropped after the restoration"
        );
    }
}
