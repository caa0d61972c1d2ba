//! Kernel enforcement on the gateway host, in the real kernel (root required; never skipped).
//!
//! Each test attaches its own programs at the cgroup2 root under its own pin root, protects
//! only ports of listeners it opened itself, and uses cgroups of its own — so tests run in
//! parallel and leave nothing behind, even when they fail.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use moat::segment::{Deny, DenyRecord, Enforcer};
use moat_tests::{
    daemon::Daemon,
    kernel,
    kernel::{
        EPERM, ProbeLoop, TestCgroup, TestPins, monotonic_ns, policy_for, probe, require_root,
        try_from, unique,
    },
};
use serde_json::Value;

/// A dual-stack listener on `[::]:0` (accepts IPv4 and IPv6) that accepts and closes every
/// connection until the test process ends, so probes never fill its backlog.
fn listener() -> u16 {
    kernel::listener("[::]:0").port()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn protected_destinations_are_refused_to_everyone_but_the_gateway() {
    require_root();
    let protected = listener();
    let open = listener();
    let base = TestCgroup::new(unique("moat-test"));
    let gateway = base.child("gateway");
    let worker = gateway.child("worker");
    let outsider = base.child("outsider");
    let pins = TestPins::new();

    let toml = format!("[pools.gpu]\nhosts = [\"127.0.0.1:{protected}\"]\n");
    let enforcer = Enforcer::install_or_adopt(&pins.pins, &policy_for(&toml, &gateway)).unwrap();
    assert!(!enforcer.adopted());

    let v4 = addr(&format!("127.0.0.1:{protected}"));
    let v6 = addr(&format!("[::1]:{protected}"));
    let other_loopback = addr(&format!("127.0.0.2:{protected}"));
    let unspecified = addr(&format!("0.0.0.0:{protected}"));
    let unprotected = addr(&format!("127.0.0.1:{open}"));

    let out = Some(outsider.path());
    assert_eq!(
        try_from(out, "tcp", &[v4, v6, other_loopback, unspecified]),
        [EPERM; 4],
        "TCP from outside"
    );
    assert_eq!(
        try_from(out, "tcp6", &[v4]),
        [EPERM],
        "::ffff:127.0.0.1 from an AF_INET6 socket"
    );
    assert_eq!(
        try_from(out, "udp", &[v4, v6]),
        [EPERM, EPERM],
        "unconnected UDP sendto"
    );
    assert_eq!(
        try_from(out, "tcp", &[unprotected]),
        [0],
        "an unprotected port is unaffected"
    );

    for inside in [gateway.path(), worker.path()] {
        assert_eq!(
            try_from(Some(inside), "tcp", &[v4, v6]),
            [0, 0],
            "gateway {}",
            inside.display()
        );
        assert_eq!(try_from(Some(inside), "tcp6", &[v4]), [0]);
        // Egress lockdown: nothing outside the pools and egress_allow.
        assert_eq!(
            try_from(Some(inside), "tcp", &[unprotected]),
            [EPERM],
            "gateway egress"
        );
    }

    // Allowing the port for the gateway's egress opens it to the gateway only.
    let toml = format!("{toml}[segmentation]\negress_allow = [\"127.0.0.1:{open}\"]\n");
    let mut enforcer = enforcer;
    enforcer.apply(&policy_for(&toml, &gateway)).unwrap();
    assert_eq!(try_from(Some(gateway.path()), "tcp", &[unprotected]), [0]);
    assert_eq!(try_from(out, "tcp", &[v4, unprotected]), [EPERM, 0]);

    // Counters saw both verdicts.
    let counters = enforcer.maps().counters().unwrap();
    assert!(
        counters[0] > 0 && counters[1] > 0,
        "connect4 allowed/denied counters: {counters:?}"
    );
}

#[test]
fn deny_events_carry_who_and_where() {
    require_root();
    let port = listener();
    let base = TestCgroup::new(unique("moat-test"));
    let gateway = base.child("gateway");
    let outsider = base.child("outsider");
    let pins = TestPins::new();
    let toml = format!("[pools.gpu]\nhosts = [\"127.0.0.1:{port}\"]\n");
    let enforcer = Enforcer::install_or_adopt(&pins.pins, &policy_for(&toml, &gateway)).unwrap();

    let tcp = probe(Some(outsider.path()), "tcp", &[format!("127.0.0.1:{port}")]);
    let udp = probe(Some(outsider.path()), "udp", &[format!("[::1]:{port}")]);
    assert_eq!(tcp.errnos(), [EPERM]);
    assert_eq!(udp.errnos(), [EPERM]);
    assert_eq!(tcp.cgroup_id, outsider.cgroup.id);

    let mut ring = enforcer.open_events().unwrap();
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.extend(Deny::decode(&item));
    }
    let tcp_event = events
        .iter()
        .find(|e| e.pid == tcp.pid)
        .expect("deny event for the TCP probe");
    assert_eq!(tcp_event.cgroup_id, outsider.cgroup.id);
    assert_eq!(tcp_event.hook, "connect4");
    assert_eq!(tcp_event.reason, "not_gateway");
    assert_eq!(tcp_event.protocol, "tcp");
    assert_eq!(tcp_event.addr.to_string(), "127.0.0.1");
    assert_eq!(tcp_event.port, port);
    let udp_event = events
        .iter()
        .find(|e| e.pid == udp.pid)
        .expect("deny event for the UDP probe");
    assert_eq!(udp_event.hook, "sendmsg6");
    assert_eq!(udp_event.protocol, "udp");
    assert_eq!(udp_event.addr.to_string(), "::1");
}

/// Attempts per target that must run wholly between the first and the last flip for the flip
/// test to mean anything (the flips go on until this many have).
const MIN_DURING_FLIPS: u64 = 50;

/// Flips between two policies 1,000 times while probes connect from outside and inside the
/// gateway cgroup. Destinations whose verdict is the same in both policies must never see a
/// different answer.
#[test]
fn policy_flips_never_change_a_shared_verdict() {
    require_root();
    let [p_both, p_only_a, p_only_b, p_never] = [listener(), listener(), listener(), listener()];
    let base = TestCgroup::new(unique("moat-test"));
    let gateway = base.child("gateway");
    let outsider = base.child("outsider");
    let pins = TestPins::new();
    let pool =
        |a: u16, b: u16| format!("[pools.gpu]\nhosts = [\"127.0.0.1:{a}\", \"127.0.0.1:{b}\"]\n");
    let policy_a = policy_for(&pool(p_both, p_only_a), &gateway);
    let policy_b = policy_for(&pool(p_both, p_only_b), &gateway);
    let mut enforcer = Enforcer::install_or_adopt(&pins.pins, &policy_a).unwrap();

    let targets = [
        addr(&format!("127.0.0.1:{p_both}")),
        addr(&format!("127.0.0.1:{p_never}")),
    ];
    let mut outside = ProbeLoop::start(outsider.path(), &targets);
    let mut inside = ProbeLoop::start(gateway.path(), &targets);

    // At least 1,000 flips, an even number, and on until both loops finished enough attempts
    // after the first flip: a loaded machine can stall the probes for a while, so the floor is
    // reached by flipping longer, never by hoping.
    let started = Instant::now();
    let first_flip = monotonic_ns();
    let (outside_at_start, inside_at_start) = (outside.rounds(), inside.rounds());
    // A round in progress at the first flip may have started before it: hence the `+ 1`.
    let overlapped =
        |probe: &mut ProbeLoop, at_start: u64| probe.rounds() > at_start + MIN_DURING_FLIPS + 1;
    let mut flips = 0;
    loop {
        enforcer
            .apply(if flips % 2 == 0 { &policy_b } else { &policy_a })
            .unwrap();
        flips += 1;
        if flips >= 1000
            && flips % 64 == 0
            && overlapped(&mut outside, outside_at_start)
            && overlapped(&mut inside, inside_at_start)
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the probes finished too few attempts in a minute of flipping"
        );
    }
    let last_flip = monotonic_ns();
    let flipping = started.elapsed();

    // Each probe reports how many of its attempts ran wholly between the first and the last
    // flip, the only ones that prove anything about the flips.
    let outside = outside.finish(first_flip, last_flip);
    let inside = inside.finish(first_flip, last_flip);

    // [target index] → the only errno allowed.
    let expect = |run: &[moat_tests::kernel::LoopTarget], who: &str, wanted: [i32; 2]| {
        for ((seen, target), want) in run.iter().zip(&targets).zip(wanted) {
            let during = seen.in_window;
            assert!(
                during >= MIN_DURING_FLIPS,
                "{who}: only {during} attempts on {target} ran between the first and the last \
                 of {flips} flips ({flipping:?}); at least {MIN_DURING_FLIPS} must"
            );
            assert_eq!(
                seen.errnos,
                [want],
                "{who} → {target}: every answer must be errno {want} (seen {})",
                seen.counts
            );
        }
    };
    expect(&outside, "outsider", [EPERM, 0]);
    expect(&inside, "gateway", [0, EPERM]);

    // The flips themselves took effect.
    let out = Some(outsider.path());
    let a = format!("127.0.0.1:{p_only_a}").parse().unwrap();
    let b = format!("127.0.0.1:{p_only_b}").parse().unwrap();
    assert_eq!(
        try_from(out, "tcp", &[a, b]),
        [EPERM, 0],
        "policy A is active after an even count"
    );
}

/// The daemon as an operator runs it: `moat serve` installs, survives SIGKILL with the policy
/// in force, a restart adopts the pins instead of stacking, SIGHUP with a broken file changes
/// nothing, and `moat segment uninstall` makes the port reachable again.
#[test]
fn daemon_enforcement_is_fail_static_and_uninstallable() {
    require_root();
    let port = listener();
    let mut daemon = Daemon::enforcing();
    let base = daemon.cgroup();
    let outsider = base.child("outsider");
    // The daemon creates `gateway` itself; the test holds it (and a child) to remove them.
    let gateway = base.child("gateway");
    let worker = gateway.child("worker");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"moat\"\n\
         [pools.gpu]\nhosts = [\"127.0.0.1:{port}\"]\n\
         [segmentation]\ngateway_cgroup = \"{}/gateway\"\npin_root = \"{}\"\n",
        base.relative.display(),
        daemon.pin_root().display()
    );
    daemon.write_config(&toml);
    let target = addr(&format!("127.0.0.1:{port}"));
    let out = Some(outsider.path());

    daemon.start();
    daemon.wait_log("worker started");
    let before = daemon.segment_status();
    assert_eq!(before["installed"], true);
    assert_eq!(try_from(out, "tcp", &[target]), [EPERM]);
    // The gateway cgroup's children are the gateway too.
    assert_eq!(try_from(Some(worker.path()), "tcp", &[target]), [0]);

    // Deny events reach the daemon's structured log with who and where.
    let denied = probe(out, "tcp", &[target.to_string()]);
    let event = daemon.wait_log(&format!("\"pid\":{}", denied.pid));
    assert_eq!(event["event"], "kernel_deny");
    assert_eq!(event["cgroup_id"], outsider.cgroup.id);
    assert_eq!(event["hook"], "connect4");
    assert_eq!(event["protocol"], "tcp");
    assert_eq!(event["dst_addr"], "127.0.0.1");
    assert_eq!(event["dst_port"], port);

    // A broken config on SIGHUP is refused and the policy stays.
    daemon.write_config("[segmentation]\nbogus = true\n");
    daemon.signal(nix::sys::signal::SIGHUP);
    daemon.wait_log("config reload refused");
    assert_eq!(try_from(out, "tcp", &[target]), [EPERM]);
    daemon.write_config(&toml);

    // SIGKILL: no clean-up runs, enforcement stays.
    daemon.kill();
    assert_eq!(
        try_from(out, "tcp", &[target]),
        [EPERM],
        "enforced after SIGKILL"
    );

    // A restart adopts the pinned links rather than attaching a second copy.
    daemon.start();
    daemon.wait_log("adopted pinned kernel enforcement");
    daemon.wait_log("worker started");
    let after = daemon.segment_status();
    let ids = |s: &Value, field: &str| -> Vec<Value> {
        s["links"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l[field].clone())
            .collect()
    };
    assert_eq!(
        ids(&after, "link_id"),
        ids(&before, "link_id"),
        "same links after restart"
    );
    assert_ne!(
        ids(&after, "program_id"),
        ids(&before, "program_id"),
        "programs updated in place"
    );
    assert_eq!(
        try_from(out, "tcp", &[target]),
        [EPERM],
        "enforced after the in-place update"
    );
    daemon.kill();

    daemon.cli_ok(&["segment", "uninstall"], None);
    assert_eq!(
        try_from(out, "tcp", &[target]),
        [0],
        "reachable after uninstall"
    );
    assert_eq!(daemon.segment_status()["installed"], false);
    assert!(!daemon.pins().dir().exists(), "uninstall removes the pins");
}
