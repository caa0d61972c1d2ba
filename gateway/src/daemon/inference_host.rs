//! `moat serve`'s inference-host side: starting, reloading and running the ingress guard
//! (`[segmentation.inference]`, see [`crate::segment::inference`]).
//!
//! On an inference host — a config with `[segmentation.inference]` and no pools — the daemon
//! runs only the guard: no service user, no gateway cgroup, no connect hooks, no worker, no
//! listening socket. It installs or adopts the guard, logs its deny events, reloads it on
//! SIGHUP and exits on SIGTERM/SIGINT, leaving the guard pinned (fail-static).
//!
//! A config with pools and `[segmentation.inference]` runs both: the supervisor starts the
//! guard with [`start_guard`] and reloads it with [`reload`].

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::{Config, InferenceGuard, SegmentationMode},
    segment::{Pins, inference::Guard},
};

/// The guard the config asks for, if segmentation is enforced.
fn wanted(config: &Config) -> Option<&InferenceGuard> {
    config
        .inference
        .as_ref()
        .filter(|_| config.segmentation().mode == SegmentationMode::Enforce)
}

/// Installs or adopts the guard when the config has one (and segmentation is enforced).
/// Fails — so the daemon refuses to start — when a hook the config asks for cannot attach.
pub fn start_guard(config: &Config) -> Result<Option<Guard>> {
    if config.inference.is_some() && config.segmentation().mode == SegmentationMode::Off {
        warn!("segmentation is off: the inference guard is not enforced");
    }
    let Some(want) = wanted(config) else {
        return Ok(None);
    };
    let guard = Guard::install_or_adopt(&Pins::new(&config.segmentation().pin_root), want)
        .context("the inference guard is required (segmentation.mode = \"enforce\") but failed")?;
    info!(
        model_ports = ?want.model_ports,
        allowed_gateways = want.allowed.len(),
        attach = ?want.attach,
        adopted = guard.adopted(),
        "inference guard active"
    );
    Ok(Some(guard))
}

/// Checks that `new` can be applied to the running daemon's guard: a reload cannot turn the
/// guard on or off, nor turn an inference host into a gateway or back. Call before anything
/// else of a reload is applied.
pub fn check_reload(guard: &Option<Guard>, old: &Config, new: &Config) -> Result<()> {
    if old.runs_gateway() != new.runs_gateway() {
        anyhow::bail!(
            "the new config {} the gateway side (pools); restart moat to change what this host runs",
            if new.runs_gateway() {
                "adds"
            } else {
                "removes"
            }
        );
    }
    crate::segment::inference::check_reload(guard.is_some(), wanted(new))
}

/// Applies `config`'s guard policy and attachments to the running guard (after
/// [`check_reload`]), all or nothing (see [`Guard::apply`]): on an error the running guard
/// stays as it was.
pub fn apply(guard: &mut Option<Guard>, config: &Config) -> Result<()> {
    if let (Some(g), Some(want)) = (guard.as_mut(), wanted(config)) {
        g.apply(want)?;
        info!(
            model_ports = ?want.model_ports,
            allowed_gateways = want.allowed.len(),
            "inference guard reloaded"
        );
    }
    Ok(())
}

/// Asks the kernel whether every wanted guard link is still attached and restores what was
/// removed behind moat's back (see [`Guard::heal`]); the daemon calls it every few seconds.
pub fn heal(guard: &mut Option<Guard>, config: &Config) {
    if let (Some(g), Some(want)) = (guard.as_mut(), wanted(config))
        && let Err(e) = g.heal(want)
    {
        error!(
            event = "kernel_enforcement_degraded",
            found = %g.check(want).join(", "),
            error = %format!("{e:#}"),
            "the inference guard is incomplete and could not be restored; retrying"
        );
    }
}

/// Runs an inference host: the guard alone, until SIGTERM/SIGINT.
pub fn run(mut config: Config) -> Result<()> {
    let mut guard = start_guard(&config)?;
    // A guard-only host keeps no data directory of its own unless told: its audit log (the
    // guard's deny events, start and stop) is written when `audit.dir` names one.
    let audited = config.audit().dir.is_some();
    if audited {
        let source = if nix::unistd::geteuid().is_root() {
            crate::audit::Source::Supervisor
        } else {
            crate::audit::Source::Standalone
        };
        crate::audit::start_daemon(&config, None, source)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        if let Some(g) = &guard {
            g.spawn_event_logger()?;
        }
        info!("inference host: guard only, no data plane");
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut check = tokio::time::interval(crate::metrics::PUSH_EVERY);
        loop {
            tokio::select! {
                _ = check.tick() => heal(&mut guard, &config),
                _ = hup.recv() => {
                    let new = match Config::load(&config.path) {
                        Ok(c) => c,
                        Err(e) => {
                            error!(error = %e, "config reload refused; the running config stays");
                            continue;
                        }
                    };
                    if let Err(e) = check_reload(&guard, &config, &new) {
                        error!(error = %format!("{e:#}"), "config reload refused; the running config stays");
                        continue;
                    }
                    match apply(&mut guard, &new) {
                        // What the periodic check restores is the config in force.
                        Ok(()) => config = new,
                        Err(e) => error!(error = %format!("{e:#}"), "config reload refused: the inference guard does not apply; the running guard stays"),
                    }
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        info!("stopped; the inference guard stays in place");
        if audited {
            crate::audit::stop_daemon();
        }
        Ok(())
    })
}
