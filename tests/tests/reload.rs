//! SIGHUP as operators use it, on a real `moat serve` with kernel enforcement (root required;
//! never skipped): a reload that changes the pools under traffic refuses nothing that both
//! configs allow, and a reload that changes a key only a restart can change is refused with
//! the key named, leaving enforcement and the running config as they were.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use moat_tests::{
    PoolSim,
    daemon::Daemon,
    http::Request,
    kernel::{EPERM, ProbeLoop, listener, monotonic_ns, require_root, try_from},
    netns::PortReservation,
};
use nix::sys::signal::Signal;

/// The test's config ([`Daemon::enforcing_config`]): model `m` on pool `gpu` (`hosts`),
/// `extra` after it. One attempt per request, so a connect the kernel refused would reach the
/// client as an error instead of being retried on another host; health checks only when a
/// config is applied (the first tick is at once), so a check the kernel refused would keep its
/// host out of routing for the rest of the test.
///
/// For the same reason a check must not fail for want of time: the check's timeout (2 s by
/// default) stretches with [`moat_tests::patience`]. On a guest under emulation, with clients
/// keeping the worker busy, a check's answer can take longer than 2 s to be read; the host
/// would count as down until the next check ten minutes later, and every request would get 503
/// ("no healthy inference host") although nothing is wrong with the host or the reload.
fn config(d: &Daemon, hosts: &[SocketAddr], extra: &str) -> String {
    let timeout = moat_tests::patience(Duration::from_secs(2)).as_millis();
    d.enforcing_config(
        hosts,
        &format!("max_attempts = 1\nhealth_interval_ms = 600000\nhealth_timeout_ms = {timeout}"),
        extra,
    )
}

/// Sends `request` (a [`Daemon::chat`]); returns the HTTP status (0: no answer). Any other
/// answer than 200 goes to stderr with its body, for the failure's story.
fn status_of(request: Request) -> u16 {
    match request.send() {
        Ok(r) => {
            let status = r.status().as_u16();
            if status != 200 {
                eprintln!("chat answered {status}: {}", r.text().unwrap_or_default());
            }
            status
        }
        Err(e) => {
            eprintln!("chat not answered: {e}");
            0
        }
    }
}

/// Chat requests through moat on `n` threads until stopped: (start, end, status) of each.
struct Clients {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<(Instant, Instant, u16)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(n: usize, chat: Request) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..n)
            .map(|_| {
                let (stop, done, chat) = (stop.clone(), done.clone(), chat.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let status = status_of(chat.clone());
                        done.lock().unwrap().push((start, Instant::now(), status));
                    }
                })
            })
            .collect();
        Clients {
            stop,
            done,
            threads,
        }
    }

    /// Waits (up to 10 s) until a request completed, so what follows happens under traffic.
    fn wait_running(&self) {
        let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(10));
        while self.done.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no request completed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) -> Vec<(Instant, Instant, u16)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.done.lock().unwrap())
    }
}

/// Reloads that add a pool host and take it away again, back to back, while clients send
/// requests through the gateway and probes connect from the gateway cgroup and from outside:
/// no request fails (each has one attempt, so a refused connect to the new host would show),
/// no connect the gateway may make in both configs is refused, no outsider gets through —
/// and the new host really took requests between reloads.
#[test]
fn reloads_under_traffic_refuse_nothing_both_configs_allow() {
    /// Reloads in the run at least (host B added, removed, added, …), and for at least
    /// `MIN_RUN`, so a stall of the machine cannot leave the probes idle all along.
    const RELOADS: usize = 6;
    const MIN_RUN: Duration = Duration::from_secs(3);
    const MIN_PROBES: u64 = 50;
    require_root();
    let mut daemon = Daemon::enforcing();
    let (a, b) = (PoolSim::start(), PoolSim::start());
    // In both configs: pool `side` (a plain listener, protected) and an `egress_allow` entry
    // (unprotected, open to the gateway): what the probes connect to.
    let (side, allowed) = (listener("127.0.0.1:0"), listener("127.0.0.1:0"));
    let both_configs =
        format!("egress_allow = [\"{allowed}\"]\n[pools.side]\nhosts = [\"{side}\"]\n");
    let (one, both) = (
        config(&daemon, &[a.addr], &both_configs),
        config(&daemon, &[a.addr, b.addr], &both_configs),
    );
    daemon.write_config(&one);
    daemon.create_tester_key();
    let gateway = daemon.cgroup().child("gateway");
    let outsider = daemon.cgroup().child("outsider");
    daemon.start();
    daemon.wait_log("worker started");
    assert_eq!(
        status_of(daemon.chat("m")),
        200,
        "control: a request before the reloads"
    );

    let mut inside = ProbeLoop::start(gateway.path(), &[side, allowed]);
    let mut outside = ProbeLoop::start(outsider.path(), &[side, allowed]);
    let clients = Clients::start(4, daemon.chat("m"));
    clients.wait_running();
    let (t0, first) = (monotonic_ns(), Instant::now());
    let (inside_at_start, outside_at_start) = (inside.rounds(), outside.rounds());
    // Enough connects ran wholly during the reloads (a round in flight at the start may have
    // begun before it: hence the `+ 1`).
    let mut probes_overlapped = || {
        inside.rounds() > inside_at_start + MIN_PROBES + 1
            && outside.rounds() > outside_at_start + MIN_PROBES + 1
    };
    let mut b_between_reloads = 0;
    let mut reloads = 0;
    // An even number of reloads, so the last one removes B; on until the probes overlapped
    // enough of them, however slow the machine.
    while reloads < RELOADS || first.elapsed() < MIN_RUN || reloads % 2 == 1 || !probes_overlapped()
    {
        let limit = moat_tests::patience(Duration::from_secs(120));
        assert!(
            first.elapsed() < limit,
            "the probes finished too few connects in {limit:?} of reloads"
        );
        let (i, adds_b) = (reloads, reloads % 2 == 0);
        reloads += 1;
        daemon.write_config(if adds_b { &both } else { &one });
        daemon.signal(Signal::SIGHUP);
        daemon.wait_log_nth("config reloaded", i);
        if adds_b {
            // Let routing use the new host before it goes again.
            let before = b.requests();
            let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(10));
            while b.requests() < before + 3 {
                assert!(Instant::now() < deadline, "the new host took no requests");
                std::thread::sleep(Duration::from_millis(10));
            }
            b_between_reloads += b.requests() - before;
        }
    }
    let (t1, last) = (monotonic_ns(), Instant::now());
    let requests = clients.stop();
    let inside = inside.finish(t0, t1);
    let outside = outside.finish(t0, t1);

    let failed: Vec<u16> = requests.iter().map(|r| r.2).filter(|s| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "requests failed across the reloads: {failed:?} ({} in all)",
        requests.len()
    );
    let during = requests
        .iter()
        .filter(|(s, e, _)| *s >= first && *e <= last)
        .count();
    assert!(
        during >= 30,
        "only {during} requests ran wholly during the {reloads} reloads"
    );
    assert!(b_between_reloads >= 3 * (reloads as u64 / 2));
    // [side pool host, egress_allow entry]: the only errno each caller may ever see.
    for (who, runs, wanted) in [
        ("the gateway cgroup", &inside, [0, 0]),
        ("an outsider", &outside, [EPERM, 0]),
    ] {
        for (seen, (target, want)) in runs.iter().zip([side, allowed].iter().zip(wanted)) {
            let during = seen.in_window;
            assert_eq!(
                seen.errnos,
                [want],
                "{who} → {target}: every connect across the reloads must be errno {want} \
                 (seen {})",
                seen.counts
            );
            assert!(
                during >= MIN_PROBES,
                "{who} → {target}: only {during} connects ran during the reloads"
            );
        }
    }
    // The last reload removed B: the kernel protects it no more, routing no longer uses it.
    let out = Some(outsider.path());
    assert_eq!(try_from(out, "tcp", &[a.addr, b.addr]), [EPERM, 0]);
}

/// Every key the supervisor refuses to change on SIGHUP (`needs_restart` in
/// `daemon/supervisor.rs`), and what the host runs (`inference_host::check_reload`): the
/// reload is refused, the log names the key and says why, and neither enforcement nor the
/// running config change — although each refused file also adds a pool host, which must stay
/// unprotected. A valid reload at the end still applies.
#[test]
fn every_restart_only_key_is_refused_on_reload() {
    require_root();
    let mut daemon = Daemon::enforcing();
    let (a, b) = (PoolSim::start(), PoolSim::start());
    daemon.write_config(&config(&daemon, &[a.addr], ""));
    daemon.create_tester_key();
    let _gateway = daemon.cgroup().child("gateway");
    let outsider = daemon.cgroup().child("outsider");
    daemon.start();
    daemon.wait_log("worker started");
    let toml = |hosts: &[SocketAddr], extra: &str| config(&daemon, hosts, extra);
    let out = Some(outsider.path());
    assert_eq!(try_from(out, "tcp", &[a.addr, b.addr]), [EPERM, 0]);

    let pin_root = daemon.pin_root().display().to_string();
    let other_pins = format!("{pin_root}-other");
    let changes: [(&str, String); 8] = [
        (
            "server.listen",
            toml(&[a.addr, b.addr], "").replace("127.0.0.1:0", "127.0.0.1:1"),
        ),
        (
            "admin.listen",
            toml(&[a.addr, b.addr], "[admin]\nlisten = \"127.0.0.1:0\"\n"),
        ),
        (
            "server.user",
            toml(&[a.addr, b.addr], "").replace("user = \"moat\"", "user = \"daemon\""),
        ),
        (
            "server.data_dir",
            toml(&[a.addr, b.addr], "").replace("data_dir = \"data\"", "data_dir = \"data2\""),
        ),
        (
            "auth",
            toml(&[a.addr, b.addr], "[auth]\nrevocation_poll_ms = 4321\n"),
        ),
        (
            "segmentation.mode",
            toml(&[a.addr, b.addr], "mode = \"off\"\n"),
        ),
        (
            "segmentation.gateway_cgroup",
            toml(&[a.addr, b.addr], "").replace("/gateway\"", "/gateway2\""),
        ),
        (
            "segmentation.pin_root",
            toml(&[a.addr, b.addr], "").replace(&pin_root, &other_pins),
        ),
    ];
    for (i, (changed, text)) in changes.iter().enumerate() {
        assert_ne!(
            *text,
            toml(&[a.addr, b.addr], ""),
            "{changed}: the file changes it"
        );
        daemon.write_config(text);
        daemon.signal(Signal::SIGHUP);
        let refused = daemon.wait_log_nth("config reload refused", i);
        assert_eq!(refused["key"], *changed, "{refused}");
        assert_eq!(refused["level"], "ERROR", "{refused}");
        assert!(
            refused["message"]
                .as_str()
                .is_some_and(|m| m.contains("changes only with a restart")),
            "the log says why: {refused}"
        );
        assert_eq!(
            try_from(out, "tcp", &[a.addr, b.addr]),
            [EPERM, 0],
            "{changed}: enforcement as before, the refused file's new host not protected"
        );
        let before = a.requests();
        assert_eq!(
            status_of(daemon.chat("m")),
            200,
            "{changed}: the running config serves"
        );
        assert_eq!(a.requests(), before + 1, "{changed}: on the old pool");
    }
    assert!(
        !Path::new(&other_pins).exists(),
        "nothing pinned under the refused pin root"
    );
    assert!(
        !daemon.dir().join("data2").exists(),
        "nothing made in the refused data dir"
    );

    // Nor can a reload change what the host runs: start an ingress guard, or drop the gateway
    // side (the guard's port is reserved, in case a regression attached it).
    let model = PortReservation::new();
    let guard = format!(
        "[segmentation.inference]\nmodel_ports = [{}]\nallowed_gateways = [\"127.0.0.1\"]\n",
        model.port
    );
    let gateway_side = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"moat\"\n[segmentation]\ngateway_cgroup = \"{}/gateway\"\n\
         pin_root = \"{}\"\n{guard}",
        daemon.cgroup().relative.display(),
        pin_root
    );
    for (i, (text, why)) in [
        (
            toml(&[a.addr, b.addr], &guard),
            "the new config adds [segmentation.inference]; restart moat to install the guard",
        ),
        (
            gateway_side,
            "the new config removes the gateway side (pools); restart moat to change what this \
             host runs",
        ),
    ]
    .iter()
    .enumerate()
    {
        daemon.write_config(text);
        daemon.signal(Signal::SIGHUP);
        let refused = daemon.wait_log_nth("config reload refused", changes.len() + i);
        assert_eq!(refused["error"], *why, "{refused}");
        assert_eq!(
            try_from(out, "tcp", &[a.addr, b.addr]),
            [EPERM, 0],
            "enforcement as before"
        );
        assert_eq!(
            status_of(daemon.chat("m")),
            200,
            "the running config serves"
        );
    }
    assert!(
        moat::segment::status(daemon.pins())
            .unwrap()
            .inference
            .links
            .is_empty(),
        "no guard attached"
    );

    // The daemon still reloads a file that changes only what a reload may change.
    daemon.write_config(&toml(&[a.addr, b.addr], ""));
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("config reloaded");
    assert_eq!(try_from(out, "tcp", &[a.addr, b.addr]), [EPERM, EPERM]);
}

/// Reloads under load on keep-alive connections: 32 clients send chat requests as fast as they
/// can over pooled connections while the config is reloaded (a quota changed back and forth,
/// so every reload builds a new data plane) ten times. Every request is answered 200, none
/// is dropped or reset, and the requests did run across the reloads.
#[test]
fn a_reload_under_load_drops_no_request() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};

    const CLIENTS: usize = 32;
    const RELOADS: usize = 10;
    require_root();
    let mut daemon = Daemon::enforcing();
    let sim = PoolSim::start();
    let with_quota = |rpm: u64| {
        config(&daemon, &[sim.addr], "") + &format!("[quotas.key]\nrequests_per_minute = {rpm}\n")
    };
    let (one, two) = (with_quota(10_000_000), with_quota(20_000_000));
    daemon.write_config(&one);
    daemon.create_tester_key();
    let _gateway = daemon.cgroup().child("gateway");
    daemon.start();
    daemon.wait_log("worker started");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CLIENTS)
        .build_http::<Full<Bytes>>();
    let url: hyper::Uri = daemon.url("/v1/chat/completions").parse().unwrap();
    let auth = format!("Bearer {}", daemon.key());
    let body = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::<(Instant, Instant, String)>::new()));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, auth, body) =
                (client.clone(), url.clone(), auth.clone(), body.clone());
            let (stop, done) = (stop.clone(), done.clone());
            runtime.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = hyper::Request::post(url.clone())
                        .header("authorization", &auth)
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let start = Instant::now();
                    let outcome = match client.request(req).await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            match resp.into_body().collect().await {
                                Ok(_) => status.to_string(),
                                Err(e) => format!("{status}, body broken: {e}"),
                            }
                        }
                        Err(e) => format!("no answer: {e:?}"),
                    };
                    done.lock().unwrap().push((start, Instant::now(), outcome));
                }
            })
        })
        .collect();
    let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(20));
    while done.lock().unwrap().len() < 100 {
        assert!(Instant::now() < deadline, "the load did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = Instant::now();
    for i in 0..RELOADS {
        daemon.write_config(if i % 2 == 0 { &two } else { &one });
        daemon.signal(Signal::SIGHUP);
        daemon.wait_log_nth("config reloaded", i);
    }
    let last = Instant::now();
    // Some more load after the last reload, on the same connections.
    // Measured from the last reload: on a loaded machine the reloads themselves may take a
    // minute, which says nothing about the load going on.
    let after = done.lock().unwrap().len();
    let more_by = last + moat_tests::patience(Duration::from_secs(30));
    while done.lock().unwrap().len() < after + 100 {
        assert!(
            Instant::now() < more_by,
            "the load stopped: {} requests in {:?} after the last reload",
            done.lock().unwrap().len() - after,
            last.elapsed()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    let done = std::mem::take(&mut *done.lock().unwrap());
    let failed: Vec<&String> = done.iter().map(|d| &d.2).filter(|s| *s != "200").collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the reloads: {:?}",
        failed.len(),
        done.len(),
        &failed[..failed.len().min(5)]
    );
    let across = done
        .iter()
        .filter(|(s, e, _)| *s < last && *e > first)
        .count();
    assert!(
        across >= CLIENTS,
        "only {across} requests ran while the config was reloaded"
    );
}
