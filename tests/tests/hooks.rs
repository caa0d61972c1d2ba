//! The gateway host's connect hooks against the ways to open a flow that are not a plain
//! `connect()` (root required; never skipped): TCP Fast Open (`sendto(MSG_FASTOPEN)`, which
//! connects without `connect()`) and connected UDP (`connect()` then `send()` with no address,
//! which no sendmsg hook sees) — and the deny log's flood limit, end to end through
//! `moat serve`.
//!
//! Each test attaches its own programs under its own pin root and protects only ports of
//! listeners it opened itself.

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use moat::{
    config::Config,
    segment::{Enforcer, GatewayIdentity, Policy},
};
use moat_tests::{
    daemon::Daemon,
    kernel::{EPERM, TestCgroup, TestPins, probe, require_root, try_from, unique},
};
use serde_json::Value;

/// A dual-stack TCP listener on `[::]:0` that accepts and closes every connection until the
/// test process ends (a TFO client's data then has somewhere to go).
fn listener() -> u16 {
    let l = TcpListener::bind("[::]:0").expect("bind dual-stack listener");
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || l.incoming().for_each(drop));
    port
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn policy_for(toml: &str, gateway: &TestCgroup) -> Policy {
    let config = Config::from_str(Path::new("/test/moat.toml"), toml).expect("test config");
    Policy {
        gateway: Some(GatewayIdentity {
            cgroup_id: gateway.cgroup.id,
            level: gateway.cgroup.level,
        }),
        ..Policy::from_config(&config)
    }
}

/// TCP Fast Open and connected UDP to a pool host: `EPERM` for a process outside the gateway
/// cgroup, through for the gateway; the gateway's egress lockdown refuses both to anything
/// else. Controls: the same calls to an unprotected port go through for the outsider, and
/// before the hooks are attached everything goes through.
#[test]
fn fast_open_and_connected_udp_meet_the_connect_hooks() {
    require_root();
    let protected = listener();
    let open = listener();
    let base = TestCgroup::new(unique("moat-test"));
    let gateway = base.child("gateway");
    let outsider = base.child("outsider");
    let pins = TestPins::new();
    let targets = [
        addr(&format!("127.0.0.1:{protected}")),
        addr(&format!("[::1]:{protected}")),
    ];
    let unprotected = [
        addr(&format!("127.0.0.1:{open}")),
        addr(&format!("[::1]:{open}")),
    ];
    let (out, gw) = (Some(outsider.path()), Some(gateway.path()));
    let actions = ["tfo", "udpc"];

    // Control: with no hooks, both kinds of call go through from anywhere (so a refusal below
    // is the hooks' doing, and `tfo` really completes here).
    for action in actions {
        assert_eq!(try_from(out, action, &targets), [0, 0], "{action} unhooked");
    }

    let toml = format!("[pools.gpu]\nhosts = [\"127.0.0.1:{protected}\", \"[::1]:{protected}\"]\n");
    let _enforcer = Enforcer::install_or_adopt(&pins.pins, &policy_for(&toml, &gateway)).unwrap();
    for action in actions {
        assert_eq!(
            try_from(out, action, &targets),
            [EPERM, EPERM],
            "{action} from outside the gateway cgroup"
        );
        assert_eq!(
            try_from(out, action, &unprotected),
            [0, 0],
            "{action} from outside to an unprotected port"
        );
        assert_eq!(
            try_from(gw, action, &targets),
            [0, 0],
            "{action} from the gateway cgroup"
        );
        assert_eq!(
            try_from(gw, action, &unprotected),
            [EPERM, EPERM],
            "{action} from the gateway to what its egress lockdown does not allow"
        );
    }
}

/// A flood of refused connects is logged at most [`PER_SECOND`] lines a second; the rest are
/// summed up in one `kernel_deny_suppressed` line with their count (README, "deny events").
#[test]
fn a_deny_flood_is_logged_at_the_stated_rate_with_a_summary() {
    /// The rate the README states for deny lines.
    const PER_SECOND: usize = 200;
    /// Refused connects in the flood: well past the rate, well inside the ring buffer.
    const FLOOD: usize = 1000;
    require_root();
    let port = listener();
    let base = TestCgroup::new(unique("moat-test"));
    let _gateway = base.child("gateway");
    let outsider = base.child("outsider");
    let pins = TestPins::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("moat.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"nobody\"\n\
             [pools.gpu]\nhosts = [\"127.0.0.1:{port}\"]\n\
             [segmentation]\ngateway_cgroup = \"{}/gateway\"\npin_root = \"{}\"\n",
            base.relative.display(),
            pins.root.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&cfg, &dir.path().join("serve.log"));
    daemon.wait_log("worker started");
    // The limiter's window starts with the logger; once a second has passed with no deny, the
    // flood's first event opens a fresh window, so the whole flood falls into one. (A quiet
    // period to wait out, not a condition to poll for.)
    std::thread::sleep(Duration::from_millis(1200));

    let target = format!("127.0.0.1:{port}");
    let flood = probe(Some(outsider.path()), "tcp", &vec![target.clone(); FLOOD]);
    assert!(
        flood.errnos().iter().all(|e| *e == EPERM),
        "every connect of the flood refused"
    );
    // The summary is written when the next deny arrives after the window: trickle single
    // refused connects until it shows. Those still inside the window are suppressed too.
    let mut trickles = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let summary = loop {
        let text = std::fs::read_to_string(&daemon.log).unwrap();
        if let Some(line) = text.lines().find(|l| l.contains("kernel_deny_suppressed")) {
            break serde_json::from_str::<Value>(line).unwrap();
        }
        assert!(Instant::now() < deadline, "no suppression summary:\n{text}");
        let one = probe(Some(outsider.path()), "tcp", std::slice::from_ref(&target));
        assert_eq!(one.errnos(), [EPERM]);
        trickles.push(one.pid);
        std::thread::sleep(Duration::from_millis(200));
    };
    // The last trickle came after the summary's trigger, so it is logged; once its line is
    // there, every line before it is too.
    daemon.wait_log(&format!("\"pid\":{},", trickles.last().unwrap()));

    let text = std::fs::read_to_string(&daemon.log).unwrap();
    let deny_lines = |pid: u32| {
        let pid = format!("\"pid\":{pid},");
        text.lines()
            .filter(|l| l.contains("\"event\":\"kernel_deny\"") && l.contains(&pid))
            .count()
    };
    let logged = deny_lines(flood.pid);
    assert_eq!(
        logged, PER_SECOND,
        "deny lines for the flood of {FLOOD} (one window)"
    );
    let trickles_suppressed = trickles.iter().filter(|p| deny_lines(**p) == 0).count();
    assert_eq!(summary["event"], "kernel_deny_suppressed", "{summary}");
    assert_eq!(
        summary["suppressed"].as_u64(),
        Some((FLOOD - PER_SECOND + trickles_suppressed) as u64),
        "the summary counts every deny not logged ({trickles_suppressed} of the trickle): \
         {summary}"
    );
    assert_eq!(
        text.matches("kernel_deny_suppressed").count(),
        1,
        "one summary for one flooded window"
    );
}
