//! `moat audit verify|report`: the audit log's integrity check, and the security report (see
//! `crate::audit` for the log, `report` for what the report holds).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Subcommand;

use crate::{
    audit::{chain::AuditKey, files, verify},
    config::Config,
};

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check sequence numbers, the hash chain and every HMAC across the log's files (default:
    /// every file in the configured audit directory), and that the log ends where its head
    /// says. Names the first bad record; exits 0 only when everything verifies. Needs the
    /// audit key (root).
    Verify {
        /// Log files (rotated ones too), in any order.
        files: Vec<PathBuf>,
        /// Do not compare the end of the log with the head of the configured directory (for
        /// files copied from elsewhere).
        #[arg(long)]
        no_head: bool,
        /// Accept a log that does not start at record 1 (older files archived away).
        #[arg(long)]
        partial: bool,
        #[arg(long)]
        json: bool,
    },
    /// The security report: credentials and their files, hash algorithms, token lifetimes
    /// with a live expiry check, listeners, kernel hooks, privileges, attack surface,
    /// versions. Markdown unless `--json`. Exits non-zero when a check fails.
    Report {
        #[arg(long)]
        json: bool,
    },
    /// The report's live expiry check; run by `report` as the service user.
    #[command(hide = true)]
    Probe,
}

pub fn run(config_path: &std::path::Path, command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            files: given,
            no_head,
            partial,
            json,
        } => {
            let config = Config::load_lenient(config_path)?;
            let dir = config.audit_dir();
            let key = AuditKey::load(&config.data_dir).context("cannot read the audit key")?;
            let list = if given.is_empty() {
                files::list(&dir).with_context(|| format!("cannot list {}", dir.display()))?
            } else {
                given
            };
            if list.is_empty() {
                anyhow::bail!("no audit log files in {}", dir.display());
            }
            let head_dir = (!no_head).then_some(dir.as_path());
            let report = verify::verify(&list, &key, head_dir, partial)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Probe => {
            crate::cli::report::probe::child()?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Report { json } => {
            let report = crate::cli::report::build(config_path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.markdown());
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
