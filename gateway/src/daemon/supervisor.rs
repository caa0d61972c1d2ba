//! `moat serve` as root: the supervisor. It holds every privilege moat needs and exposes no
//! network port of its own:
//!
//! - loads and pins the eBPF side (or adopts the pins) and creates the gateway cgroup;
//! - binds the data-plane listener (so ports below 1024 work) and passes it down;
//! - refuses a service user shared with other programs, and hands the worker its data
//!   directory without following links;
//! - spawns the worker into the gateway cgroup as the service user with no capabilities,
//!   small resource limits and only the descriptors meant for it, and restarts it with
//!   back-off when it dies (also when its seccomp filter killed it);
//! - logs the kernel's deny events;
//! - checks every few seconds that the kernel still runs every hook, and restores a link or a
//!   pin removed behind its back (`kernel_enforcement_restored`);
//! - owns the audit log: writes its own events and those the worker sends over the audit
//!   socket (the worker has no write access to the log);
//! - on SIGHUP re-reads the config and applies kernel policy and worker config together.
//!
//! Reload order, so no connection is wrongly refused during the swap: the kernel first gets
//! the union of the old and the new policy, then the worker switches to the new config, then
//! the kernel gets the new policy alone. A bad file, or a config the worker refuses, leaves
//! the old one in force everywhere.

use std::{
    os::fd::AsRawFd,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    process::{Child, Command},
    signal::unix::{Signal, SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    audit,
    cgroup::Cgroup,
    config::{Config, SegmentationMode},
    daemon::control::{
        self, ENV_ADMIN_FD, ENV_AUDIT_FD, ENV_CONTROL_FD, ENV_LISTEN_FD, ENV_SUPERVISOR_PID,
        FromWorker, ToWorker,
    },
    daemon::privdrop::{DropPlan, ServiceUser, prepare_data_dir},
    daemon::{inference_host, listen},
    segment::{Enforcer, GatewayIdentity, Pins, Policy, inference::Guard},
};

/// How long a worker gets to apply a config before the supervisor gives up on it. Generous:
/// on a loaded or emulated machine (qemu under TCG) a healthy worker has taken 30 s; a worker
/// that is stuck is still found out, and then restarted (see [`Supervisor::try_reload`]).
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Restart back-off: doubles from the first value up to the cap; reset after a worker has run
/// for `STABLE` without dying.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
const STABLE: Duration = Duration::from_secs(60);

pub fn run(config: Config) -> Result<()> {
    // A gateway that is also an inference host guards its own model ports too.
    let guard = inference_host::start_guard(&config)?;
    let user = ServiceUser::lookup(&config.server().user)?;
    user.ensure_dedicated()?;
    prepare_data_dir(&config.data_dir, &user)?;
    // First, so the start and everything after it is on record.
    let audit = audit::start_daemon(&config, Some(user.gid.as_raw()), audit::Source::Supervisor)?;
    let (audit_in, audit_out) = std::os::unix::net::UnixDatagram::pair()?;
    let seg = config.segmentation();
    // Without enforcement there is no gateway cgroup to join: a daemon with segmentation off
    // must not land in the cgroup another, enforcing daemon owns.
    let (enforcer, cgroup, gateway) = match seg.mode {
        SegmentationMode::Enforce => {
            let cgroup = Cgroup::ensure(&seg.gateway_cgroup)?;
            let gateway = GatewayIdentity {
                cgroup_id: cgroup.id,
                level: cgroup.level,
            };
            let policy = policy(&config, gateway);
            let enforcer = Enforcer::install_or_adopt(&Pins::new(&seg.pin_root), &policy).context(
                "kernel enforcement is required (segmentation.mode = \"enforce\") but failed",
            )?;
            info!(
                gateway_cgroup = %cgroup.path.display(),
                cgroup_id = cgroup.id,
                destinations = policy.destinations.len(),
                adopted = enforcer.adopted(),
                "kernel enforcement active"
            );
            (Some(enforcer), Some(cgroup), gateway)
        }
        SegmentationMode::Off => {
            warn!("segmentation is off: the kernel does not protect the inference hosts");
            (None, None, GatewayIdentity::default())
        }
    };
    let listen = config.server().listen;
    // One listener per core the worker serves on (see `worker`), bound here as root so ports
    // below 1024 work.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listeners =
        listen::bind_group(listen, cores).with_context(|| format!("cannot listen on {listen}"))?;
    // The admin plane gets its own listener, bound here like the data plane's.
    let admin = config
        .admin()
        .listen
        .map(|a| {
            std::net::TcpListener::bind(a).with_context(|| format!("cannot listen on {a} (admin)"))
        })
        .transpose()?;
    info!(listen = %listeners[0].local_addr()?, sockets = listeners.len(), user = %user.name, "supervisor ready; starting the worker");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let event_logger = enforcer
            .as_ref()
            .map(Enforcer::spawn_event_logger)
            .transpose()?;
        if let Some(g) = &guard {
            g.spawn_event_logger()?;
        }
        audit_in.set_nonblocking(true)?;
        let audit_in = tokio::net::UnixDatagram::from_std(audit_in)?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; audit::sink::MAX_DATAGRAM];
            while let Ok(n) = audit_in.recv(&mut buf).await {
                audit::sink::queue_from_worker(&audit, &buf[..n]);
            }
        });
        let result = Supervisor {
            guard,
            config,
            user,
            cgroup,
            gateway,
            enforcer,
            event_logger,
            listeners,
            admin,
            audit_out,
        }
        .run()
        .await;
        audit::stop_daemon();
        result
    })
}

fn policy(config: &Config, gateway: GatewayIdentity) -> Policy {
    Policy {
        gateway: Some(gateway),
        ..Policy::from_config(config)
    }
}

struct Supervisor {
    config: Config,
    user: ServiceUser,
    /// The gateway cgroup the worker runs in (with enforcement only).
    cgroup: Option<Cgroup>,
    gateway: GatewayIdentity,
    enforcer: Option<Enforcer>,
    /// Reads the gateway side's deny events into the log; replaced when a restoration had to
    /// create the ring buffer anew.
    event_logger: Option<tokio::task::JoinHandle<()>>,
    /// The inference guard, when this host also serves models (`[segmentation.inference]`).
    guard: Option<Guard>,
    /// The data plane's listeners, one per serving thread of the worker.
    listeners: Vec<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    /// The worker's end of the audit socket (each worker inherits it).
    audit_out: std::os::unix::net::UnixDatagram,
}

/// A running worker and its end of the control channel.
struct Worker {
    child: Child,
    pid: u32,
    started: Instant,
    replies: Lines<BufReader<OwnedReadHalf>>,
    requests: OwnedWriteHalf,
}

enum Event {
    WorkerExited(std::io::Result<std::process::ExitStatus>),
    Reload,
    PushCounters,
    Stop,
}

impl Supervisor {
    async fn run(mut self) -> Result<()> {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut push = tokio::time::interval(crate::metrics::PUSH_EVERY);
        let mut backoff = BACKOFF_FIRST;
        let mut first = true;
        loop {
            let mut worker = match self.spawn_worker().await {
                Ok(w) => w,
                // A worker that cannot serve the config it starts with will not do better on
                // a retry: refuse to start, with its reason.
                Err(e) if first => return Err(e),
                Err(e) => {
                    error!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "worker failed to start");
                    if self.sleep_or_stop(backoff, &mut term, &mut int).await {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(BACKOFF_CAP);
                    continue;
                }
            };
            first = false;
            loop {
                let event = tokio::select! {
                    status = worker.child.wait() => Event::WorkerExited(status),
                    _ = hup.recv() => Event::Reload,
                    _ = push.tick() => Event::PushCounters,
                    _ = term.recv() => Event::Stop,
                    _ = int.recv() => Event::Stop,
                };
                match event {
                    Event::Reload => self.reload(&mut worker).await,
                    Event::PushCounters => {
                        self.check_enforcement();
                        self.push_counters(&mut worker).await
                    }
                    Event::Stop => {
                        stop_worker(&mut worker).await;
                        info!("supervisor stopping");
                        info!("supervisor stopped; kernel enforcement stays in place");
                        return Ok(());
                    }
                    Event::WorkerExited(status) => {
                        if worker.started.elapsed() >= STABLE {
                            backoff = BACKOFF_FIRST;
                        }
                        error!(pid = worker.pid, status = ?status, restart_in_ms = backoff.as_millis() as u64, "worker died; restarting");
                        audit::emit(audit::Event::WorkerRestart {
                            pid: worker.pid,
                            status: match &status {
                                Ok(s) => s.to_string(),
                                Err(e) => e.to_string(),
                            },
                            restart_in_ms: backoff.as_millis() as u64,
                        });
                        if self.sleep_or_stop(backoff, &mut term, &mut int).await {
                            return Ok(());
                        }
                        backoff = (backoff * 2).min(BACKOFF_CAP);
                        break;
                    }
                }
            }
        }
    }

    /// Sleeps for `d`; true when a stop signal came first.
    async fn sleep_or_stop(&self, d: Duration, term: &mut Signal, int: &mut Signal) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = term.recv() => true,
            _ = int.recv() => true,
        }
    }

    async fn spawn_worker(&self) -> Result<Worker> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut inherit = vec![theirs.as_raw_fd(), self.audit_out.as_raw_fd()];
        inherit.extend(self.listeners.iter().map(|l| l.as_raw_fd()));
        inherit.extend(self.admin.as_ref().map(|a| a.as_raw_fd()));
        let cgroup = self.cgroup.as_ref().map(|c| c.path.as_path());
        let plan = DropPlan::new(cgroup, self.user.clone(), inherit)?;
        // The worker is exec'd after it dropped to the service user, who may not be allowed to
        // walk to the binary (a checkout under a 0700 folder, say). Exec through a descriptor
        // opened now, as root: /proc/self/fd/N needs no search permission on the path.
        let exe = std::env::current_exe().context("cannot find the moat binary")?;
        let exe =
            std::fs::File::open(&exe).with_context(|| format!("cannot open {}", exe.display()))?;
        let mut cmd = Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
        cmd.arg("worker")
            .env_clear()
            .env(ENV_LISTEN_FD, listen::encode(&self.listeners))
            .env(ENV_CONTROL_FD, theirs.as_raw_fd().to_string())
            .env(ENV_SUPERVISOR_PID, std::process::id().to_string())
            .env(ENV_AUDIT_FD, self.audit_out.as_raw_fd().to_string())
            .envs(
                self.admin
                    .as_ref()
                    .map(|a| (ENV_ADMIN_FD, a.as_raw_fd().to_string())),
            )
            .env(
                "MOAT_LOG",
                std::env::var("MOAT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .current_dir("/")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        // SAFETY: `apply_in_child` only makes system calls on data prepared before the fork.
        unsafe { cmd.pre_exec(move || plan.apply_in_child()) };
        let child = cmd.spawn().context("cannot spawn the worker")?;
        drop(theirs);
        let pid = child.id().unwrap_or(0);
        ours.set_nonblocking(true)?;
        let (read, write) = tokio::net::UnixStream::from_std(ours)?.into_split();
        let mut worker = Worker {
            child,
            pid,
            started: Instant::now(),
            replies: BufReader::new(read).lines(),
            requests: write,
        };
        match apply(&mut worker, &self.config).await? {
            FromWorker::Applied => {
                let cgroup = self.cgroup.as_ref().map(|c| c.path.display().to_string());
                info!(pid, user = %self.user.name, cgroup = cgroup.as_deref().unwrap_or("(none: segmentation off)"), "worker started");
                Ok(worker)
            }
            FromWorker::Refused { error } => {
                stop_worker(&mut worker).await;
                bail!("the worker refused the config: {error}")
            }
        }
    }

    /// Asks the kernel whether every hook's link is still attached and every map pinned, and
    /// restores what was removed behind moat's back (`bpftool link detach`, a removed pin):
    /// see [`Enforcer::heal`].
    fn check_enforcement(&mut self) {
        inference_host::heal(&mut self.guard, &self.config);
        let policy = policy(&self.config, self.gateway);
        let Some(enforcer) = self.enforcer.as_mut() else {
            return;
        };
        match enforcer.heal(&policy) {
            // A map pin that was gone is a new map now: read the new ring buffer.
            Ok(found) if found.iter().any(|f| f.starts_with("maps/")) => {
                match enforcer.spawn_event_logger() {
                    Ok(logger) => {
                        if let Some(old) = self.event_logger.replace(logger) {
                            old.abort();
                        }
                    }
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "cannot read the new deny-event ring buffer")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => error!(
                event = "kernel_enforcement_degraded",
                found = %enforcer.check().join(", "),
                error = %format!("{e:#}"),
                "kernel enforcement is incomplete and could not be restored; retrying"
            ),
        }
    }

    /// Sends the worker the kernel's counters and link state (it cannot read the pinned maps
    /// itself).
    async fn push_counters(&self, worker: &mut Worker) {
        let mut counters = crate::metrics::KernelCounters::default();
        if let Some(Ok((hooks, lost))) = self.enforcer.as_ref().map(Enforcer::hook_counts) {
            (counters.gateway, counters.gateway_events_lost) = (hooks, lost);
        }
        if let Some(enforcer) = &self.enforcer {
            counters.gateway_links = enforcer
                .links_attached()
                .into_iter()
                .map(|(hook, attached)| crate::metrics::LinkAttached {
                    hook: hook.into(),
                    attached,
                })
                .collect();
        }
        if let Some(Ok((hooks, lost))) = self.guard.as_ref().map(Guard::hook_counts) {
            (counters.inference, counters.inference_events_lost) = (hooks, lost);
        }
        (counters.audit_written, counters.audit_dropped) = audit::sink::counts();
        let msg = control::encode(&ToWorker::Counters(counters));
        // A worker that is gone is noticed by the main loop; nothing to do here.
        let _ = worker.requests.write_all(msg.as_bytes()).await;
    }

    /// SIGHUP: reloads, and records the outcome with the old and new config digests.
    async fn reload(&mut self, worker: &mut Worker) {
        info!(config = %self.config.path.display(), "SIGHUP: reloading the config");
        let old_digest = audit::chain::digest(&self.config.source);
        let new_text = std::fs::read_to_string(&self.config.path).unwrap_or_default();
        let outcome = self.try_reload(worker).await;
        audit::emit(audit::Event::ConfigReload {
            old_digest,
            new_digest: audit::chain::digest(&new_text),
            applied: outcome.is_ok(),
            error: outcome.err(),
        });
    }

    async fn try_reload(&mut self, worker: &mut Worker) -> Result<(), String> {
        let new = match Config::load(&self.config.path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "config reload refused; the running config stays");
                return Err(e.to_string());
            }
        };
        if let Some(what) = needs_restart(&self.config, &new) {
            error!(
                key = what,
                "config reload refused: this key changes only with a restart; the running config stays"
            );
            return Err(format!("{what} changes only with a restart"));
        }
        if let Err(e) = inference_host::check_reload(&self.guard, &self.config, &new) {
            error!(error = %format!("{e:#}"), "config reload refused; the running config stays");
            return Err(format!("{e:#}"));
        }
        // The guard first: it applies all or nothing, and is rolled back below if the rest of
        // the reload is refused.
        if let Err(e) = inference_host::apply(&mut self.guard, &new) {
            error!(error = %format!("{e:#}"), "config reload refused: the inference guard does not apply; the running config stays");
            return Err(format!("{e:#}"));
        }
        let old_policy = policy(&self.config, self.gateway);
        let new_policy = policy(&new, self.gateway);
        if let Some(enforcer) = self.enforcer.as_mut()
            && let Err(e) = enforcer.apply(&old_policy.union(&new_policy))
        {
            error!(error = %format!("{e:#}"), "config reload refused: the kernel policy does not apply; the old one stays");
            let _ = enforcer.apply(&old_policy);
            self.restore_guard();
            return Err(format!("{e:#}"));
        }
        let outcome = apply(worker, &new).await;
        let applied = matches!(outcome, Ok(FromWorker::Applied));
        if let Some(enforcer) = self.enforcer.as_mut() {
            let target = if applied { &new_policy } else { &old_policy };
            if let Err(e) = enforcer.apply(target) {
                error!(error = %format!("{e:#}"), "kernel policy update failed after reload");
            }
        }
        match outcome {
            Ok(FromWorker::Applied) => {
                info!(
                    destinations = new_policy.destinations.len(),
                    "config reloaded: routing and kernel policy"
                );
                self.config = new;
                Ok(())
            }
            Ok(FromWorker::Refused { error }) => {
                error!(
                    error,
                    "config reload refused by the worker; the running config stays"
                );
                self.restore_guard();
                Err(error)
            }
            Err(e) => {
                // No answer: the worker may still apply the new config later, and then route
                // by a config whose kernel policy was just rolled back. A restart puts it back
                // on the running config, the one the kernel enforces.
                error!(error = %format!("{e:#}"), "config reload failed; the running config stays and the worker restarts on it");
                self.restore_guard();
                let _ = worker.child.start_kill();
                Err(format!("{e:#}"))
            }
        }
    }

    /// Puts the running config's guard policy back after a refused reload.
    fn restore_guard(&mut self) {
        if let Err(e) = inference_host::apply(&mut self.guard, &self.config) {
            error!(error = %format!("{e:#}"), "cannot restore the inference guard after a refused reload");
        }
    }
}

/// Keys the running daemon cannot change in place.
fn needs_restart(old: &Config, new: &Config) -> Option<&'static str> {
    if old.server().listen != new.server().listen {
        return Some("server.listen");
    }
    if old.admin() != new.admin() {
        return Some("admin.listen");
    }
    if old.server().user != new.server().user {
        return Some("server.user");
    }
    if old.data_dir != new.data_dir {
        return Some("server.data_dir");
    }
    if old.audit() != new.audit() {
        return Some("audit");
    }
    // The worker's identity service (signing keys, caches, lifetimes) is built once at start.
    if old.auth() != new.auth() {
        return Some("auth");
    }
    let (os, ns) = (old.segmentation(), new.segmentation());
    if os.mode != ns.mode {
        return Some("segmentation.mode");
    }
    if os.gateway_cgroup != ns.gateway_cgroup {
        return Some("segmentation.gateway_cgroup");
    }
    if os.pin_root != ns.pin_root {
        return Some("segmentation.pin_root");
    }
    None
}

/// Sends a config and waits for the worker's answer.
async fn apply(worker: &mut Worker, config: &Config) -> Result<FromWorker> {
    let msg = ToWorker::Config {
        path: config.path.display().to_string(),
        text: config.source.clone(),
        captured: config.captured.clone(),
    };
    worker
        .requests
        .write_all(control::encode(&msg).as_bytes())
        .await
        .context("worker control channel closed")?;
    let line = tokio::time::timeout(APPLY_TIMEOUT, worker.replies.next_line())
        .await
        .context("the worker did not answer in time")??
        .context("the worker closed its control channel")?;
    serde_json::from_str(&line).context("undecodable answer from the worker")
}

async fn stop_worker(worker: &mut Worker) {
    if let Some(pid) = worker.child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), worker.child.wait())
        .await
        .is_err()
    {
        let _ = worker.child.kill().await;
    }
}
