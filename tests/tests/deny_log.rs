//! The deny log's flood limit, end to end through `moat serve` (root required; never skipped):
//! a flood of kernel denies is logged at most 200 lines a second, and the rest are summed up in
//! one `…_suppressed` line with their count — on the gateway host (refused connects,
//! `kernel_deny`) and on an inference host (dropped datagrams, `kernel_ingress_deny`, where the
//! README states the rate).

use std::{
    net::UdpSocket,
    path::Path,
    time::{Duration, Instant},
};

use moat_tests::{
    daemon::Daemon,
    kernel::{EPERM, listener, probe, require_root},
    netns::{Echo, Lab, PortReservation, sa},
};
use serde_json::Value;

/// The rate the README states for deny lines.
const PER_SECOND: usize = 200;
/// Denies in a flood: well past the rate, well inside the ring buffer.
const FLOOD: usize = 1000;

/// The log's JSON lines.
fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Lines of `event` whose `field` is `value`.
fn lines_with(lines: &[Value], event: &str, field: &str, value: u64) -> usize {
    lines
        .iter()
        .filter(|l| l["event"] == event && l[field].as_u64() == Some(value))
        .count()
}

/// The daemon (the process that reads the deny ring buffer) stopped with SIGSTOP until
/// dropped. The kernel keeps enforcing and queueing deny events meanwhile.
struct Held(nix::unistd::Pid);

impl Held {
    /// Stops `pid` and waits until every thread of it is stopped, so none is still reading.
    fn stop(pid: u32) -> Held {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let held = Held(pid);
        let tasks = format!("/proc/{pid}/task");
        let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(10));
        loop {
            // The state follows the `)` that closes the command name in `stat`.
            let running = std::fs::read_dir(&tasks).unwrap().any(|t| {
                let stat =
                    std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                let state = stat.rsplit_once(')').map_or("", |s| s.1.trim_start());
                !state.starts_with(['T', 't'])
            });
            if !running {
                return held;
            }
            assert!(Instant::now() < deadline, "the daemon did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// What a flood left in the log, checked against the limit. `flood` makes the denies (all
/// identified by `field` = `flood_id`) and returns that id and how many denies the kernel
/// counted (at least [`FLOOD`]); `one` makes one more deny and returns its `field`. `reader`
/// is the daemon's pid.
///
/// The limiter's windows run on the reader's clock: a window opens with the first deny read
/// after the last one ended, and what is read in one go is judged at the time it was read. A
/// slow machine (a VM under emulation) can take seconds to make a thousand denies, so the
/// flood would reach the reader spread over several windows; instead the reader is held
/// stopped while the kernel refuses and queues the flood, and reads it as the burst the limit
/// is for. After a quiet second, the burst opens a fresh window and falls into it whole:
/// exactly [`PER_SECOND`] lines. The summary is written when the next deny arrives after the
/// window, so single denies trickle in until it shows; those still inside the window are
/// suppressed too and counted.
fn check_flood(
    log: &Path,
    reader: u32,
    event: &str,
    field: &str,
    flood: impl FnOnce() -> (u64, u64),
    mut one: impl FnMut() -> u64,
) {
    let suppressed_event = format!("{event}_suppressed");
    // A quiet period to wait out, not a condition to poll for.
    std::thread::sleep(Duration::from_millis(1200));
    let held = Held::stop(reader);
    let (flood_id, denied) = flood();
    drop(held);
    assert!(denied >= FLOOD as u64, "only {denied} denies in the flood");
    let mut trickle = Vec::new();
    let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(15));
    let summary = loop {
        if let Some(s) = log_lines(log)
            .into_iter()
            .find(|l| l["event"] == suppressed_event.as_str())
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no {suppressed_event} line:\n{}",
            std::fs::read_to_string(log).unwrap()
        );
        trickle.push(one());
        std::thread::sleep(Duration::from_millis(200));
    };
    // The last trickle came after the summary's trigger, so it is logged; once its line is
    // there, every line before it is too.
    let last = *trickle.last().unwrap();
    let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(15));
    while lines_with(&log_lines(log), event, field, last) == 0 {
        assert!(Instant::now() < deadline, "the last trickle is not logged");
        std::thread::sleep(Duration::from_millis(20));
    }

    let lines = log_lines(log);
    assert_eq!(
        lines_with(&lines, event, field, flood_id),
        PER_SECOND,
        "{event} lines for a flood of {denied} in one window"
    );
    let trickle_suppressed = trickle
        .iter()
        .filter(|id| lines_with(&lines, event, field, **id) == 0)
        .count();
    assert_eq!(
        summary["suppressed"].as_u64(),
        Some(denied - PER_SECOND as u64 + trickle_suppressed as u64),
        "the summary counts every deny not logged ({trickle_suppressed} of the trickle): \
         {summary}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event"] == suppressed_event.as_str())
            .count(),
        1,
        "one summary for one flooded window"
    );
}

/// Refused connects on the gateway host (`kernel_deny`, told apart by the probe's pid).
#[test]
fn a_connect_deny_flood_is_logged_at_the_stated_rate_with_a_summary() {
    require_root();
    let pool = listener("127.0.0.1:0");
    let mut daemon = Daemon::enforcing();
    let _gateway = daemon.cgroup().child("gateway");
    let outsider = daemon.cgroup().child("outsider");
    daemon.write_config(&daemon.enforcing_config(&[pool], "", ""));
    daemon.start();
    daemon.wait_log("worker started");
    let target = pool.to_string();
    let refused = |n: usize| {
        let run = probe(Some(outsider.path()), "tcp", &vec![target.clone(); n]);
        assert!(
            run.errnos().iter().all(|e| *e == EPERM),
            "every connect refused"
        );
        u64::from(run.pid)
    };
    check_flood(
        daemon.log_path(),
        daemon.pid(),
        "kernel_deny",
        "pid",
        || (refused(FLOOD), FLOOD as u64),
        || refused(1),
    );
    // The audit log has the same events at the same rate, and the summary, and verifies.
    let audit = daemon.data_dir().join("audit/audit.log");
    let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(10));
    let records = loop {
        let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if records
            .iter()
            .any(|r| r["event"]["kind"] == "kernel_deny_suppressed")
        {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "no kernel_deny_suppressed audit record"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let denies: Vec<_> = records
        .iter()
        .filter(|r| r["event"]["kind"] == "kernel_deny")
        .collect();
    assert!(
        denies.len() as u64 >= 200,
        "{} kernel_deny records",
        denies.len()
    );
    assert!(denies.len() < FLOOD, "the audit log is rate-limited too");
    let d = &denies[0]["event"];
    assert_eq!(d["side"], "gateway");
    assert_eq!(d["detail"]["dst_addr"], pool.ip().to_string());
    assert_eq!(denies[0]["source"], "supervisor");
    let verified = daemon.cli(&["audit", "verify"], None);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
}

/// Datagrams from a rogue host dropped by an inference host's guard (`kernel_ingress_deny`,
/// told apart by the source port).
#[test]
fn an_ingress_deny_flood_is_logged_at_the_stated_rate_with_a_summary() {
    require_root();
    let model = PortReservation::new();
    let port = model.port;
    let lab = Lab::new();
    let _echo = Echo::start(&lab.inference, port);
    let mut daemon = Daemon::enforcing();
    daemon.write_config(&format!(
        "[segmentation]\npin_root = \"{}\"\n[segmentation.inference]\n\
         model_ports = [{port}]\nallowed_gateways = [\"{}\"]\n",
        daemon.pin_root().display(),
        Lab::GW4
    ));
    daemon.start_in(&lab.inference);
    daemon.wait_log("inference guard active");
    let to = sa(Lab::INF_ROGUE4, port);
    // `n` datagrams from one fresh socket of the rogue host; returns its source port.
    let dropped = |n: usize| {
        lab.rogue.run(|| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            for _ in 0..n {
                s.send_to(b"ping", to).unwrap();
            }
            u64::from(s.local_addr().unwrap().port())
        })
    };
    // What the guard dropped, from its pinned counters (a burst on a veth may lose a datagram
    // before the hook sees it; every one the hook dropped is an event).
    let guard_drops = || -> u64 {
        let status = moat::segment::status(daemon.pins()).unwrap().inference;
        assert_eq!(status.events_lost, 0, "deny events lost in the ring buffer");
        status.counters.iter().map(|c| c.dropped).sum()
    };
    check_flood(
        daemon.log_path(),
        daemon.pid(),
        "kernel_ingress_deny",
        "src_port",
        || {
            let before = guard_drops();
            let id = dropped(FLOOD + 50);
            (id, guard_drops() - before)
        },
        || dropped(1),
    );
}
