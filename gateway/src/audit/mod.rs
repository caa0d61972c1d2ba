//! The audit trail (see docs/operations.md, Audit log): append-only JSON lines, one record
//! per security-relevant event, each with a sequence number, UTC time, the SHA-256 of the
//! previous record and an HMAC under a key kept apart from the log.
//!
//! - [`record`]: what a record says ([`Event`]) and how it is serialized;
//! - [`chain`]: the key, the HMAC, the hash chain and the head;
//! - [`writer`]: appending (locked, synced, rotated);
//! - [`sink`]: [`emit`], the one call the rest of moat makes, and where each process sends it;
//! - [`files`], [`verify`], [`read`]: the log's files, `moat audit verify`, `GET /admin/audit`.
//!
//! Any stage records an event with one call, e.g.
//! `audit::emit(audit::Event::GuardrailHit { rule, action, tenant, user_id, request_id })`.

pub mod chain;
pub mod files;
pub mod read;
pub mod record;
pub mod sink;
pub mod verify;
pub mod writer;

pub use record::{Event, Source};
pub use sink::emit;

use std::path::Path;

use crate::config::Config;

/// The daemon's writer for `config`: the key (created on first start) and the log directory.
/// `group` is the service user's group (it may read the log), when running as root.
pub fn open_writer(
    config: &Config,
    group: Option<u32>,
    rotate: bool,
) -> anyhow::Result<writer::Writer> {
    use anyhow::Context;
    let dir = config.audit_dir();
    let key = chain::AuditKey::load_or_create(&config.data_dir, &dir)
        .context("cannot read or create the audit key")?;
    let a = config.audit();
    writer::Writer::open(
        &dir,
        key,
        writer::Options {
            max_file_bytes: a.max_file_bytes,
            rotate,
            group,
            syslog: a.syslog,
        },
    )
    .with_context(|| format!("cannot open the audit log in {}", dir.display()))
}

static CLI_ACTOR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The actor name of whoever runs a CLI command: `cli:<user>`, with `(sudo <user>)` when run
/// through sudo. Fixed by the first call, which the CLI makes before it becomes the service
/// user.
pub fn cli_actor() -> String {
    CLI_ACTOR
        .get_or_init(|| {
            let uid = nix::unistd::getuid();
            let name = nix::unistd::User::from_uid(uid)
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| uid.to_string());
            match std::env::var("SUDO_USER") {
                Ok(s) if !s.is_empty() && uid.is_root() => {
                    let s: String = s.chars().filter(|c| !c.is_control()).take(64).collect();
                    format!("cli:{name} (sudo {s})")
                }
                _ => format!("cli:{name}"),
            }
        })
        .clone()
}

/// Whether `dir` holds an audit log.
pub fn exists(dir: &Path) -> bool {
    files::log_exists(dir)
}

/// Starts this daemon's audit writer and records its start. `group` as in [`open_writer`].
pub fn start_daemon(
    config: &Config,
    group: Option<u32>,
    source: Source,
) -> anyhow::Result<std::sync::mpsc::SyncSender<sink::Msg>> {
    let tx = sink::install_writer(open_writer(config, group, true)?, source);
    emit(Event::DaemonStart {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        config_digest: chain::digest(&config.source),
    });
    Ok(tx)
}

/// Records the daemon's stop and waits for the log to be on disk.
pub fn stop_daemon() {
    emit(Event::DaemonStop {});
    sink::flush(std::time::Duration::from_secs(5));
}
