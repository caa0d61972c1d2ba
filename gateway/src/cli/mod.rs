//! The `moat` command line: one subcommand per operator task. `identity` holds the users, keys
//! and tenants commands, `doctor` the host check, `certs` the mutual-TLS material, `audit` the
//! audit log's verification and the security report.

pub mod audit;
pub mod certs;
pub mod doctor;
pub mod identity;
pub mod report;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{config::Config, logging, segment};

#[derive(Parser, Debug)]
#[command(
    name = "moat",
    version,
    about = "Security-first gateway for self-hosted AI inference"
)]
pub struct Cli {
    /// Config file.
    #[arg(long, short, global = true, env = "MOAT_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: load or adopt the kernel enforcement, then serve.
    Serve,
    /// The unprivileged worker; started by `moat serve`, never by hand.
    #[command(hide = true)]
    Worker,
    /// Kernel segmentation: inspect or remove what moat pinned.
    Segment {
        #[command(subcommand)]
        command: SegmentCommand,
    },
    /// The facts of this installation: kernel, BTF, mounts, which hooks can attach, what is
    /// attached now, versions, paths, the service user. Exits non-zero on a problem that would
    /// stop `moat serve`.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Users: add, set passwords, disable, list.
    Users {
        #[command(subcommand)]
        command: crate::cli::identity::UsersCommand,
    },
    /// API keys: create (printed once), list, revoke.
    Keys {
        #[command(subcommand)]
        command: crate::cli::identity::KeysCommand,
    },
    /// Tenants: add, list.
    Tenants {
        #[command(subcommand)]
        command: crate::cli::identity::TenantsCommand,
    },
    /// The identity store: bring its schema up to date.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Certificates for mutual TLS between the gateway and its model servers.
    Certs {
        #[command(subcommand)]
        command: crate::cli::certs::CertsCommand,
    },
    /// The audit log and the security report: `verify` checks the log, `report` describes
    /// this installation's credentials, algorithms, listeners, hooks and attack surface.
    Audit {
        #[command(subcommand)]
        command: crate::cli::audit::AuditCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum SegmentCommand {
    /// What is attached, the protected set and the counters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Detach and remove everything moat pinned (enforcement stops).
    Uninstall,
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Apply the pending schema migrations (SQLite or PostgreSQL, per `[store]`) and print the
    /// version. Replicas also migrate when they start; run this first to roll out a new schema
    /// before the replicas.
    Migrate,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Load and validate the config; print the protected set it derives.
    Check,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log = logging::init();
    let result = run(cli);
    // Identity commands record their changes; they are on disk before the command ends.
    crate::audit::sink::flush(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve => {
            let config = Config::load(&cli.config)?;
            crate::daemon::serve::run(config)?;
        }
        Command::Worker => crate::daemon::worker::run()?,
        Command::Segment { command } => {
            let config = Config::load_lenient(&cli.config)?;
            let pins = segment::Pins::new(&config.segmentation().pin_root);
            match command {
                SegmentCommand::Status { json } => {
                    let status = segment::status(&pins)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else {
                        print!("{status}");
                    }
                }
                SegmentCommand::Uninstall => {
                    let removed = segment::uninstall(&pins)?;
                    println!("removed {removed} pins under {}", pins.dir().display());
                }
            }
        }
        Command::Doctor { json } => {
            let report = crate::cli::doctor::run(&cli.config);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            if !report.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            let config = Config::load(&cli.config)?;
            println!("{}: ok", config.path.display());
            if config.runs_gateway() {
                print!("{}", segment::Policy::from_config(&config));
            }
            if let Some(guard) = &config.inference {
                println!("inference guard ({:?}):", guard.attach);
                print!("{}", segment::inference::GuardPolicy::from_config(guard));
            }
        }
        Command::Users { command } => {
            crate::cli::identity::users(&store_config(&cli.config)?, command)?
        }
        Command::Keys { command } => {
            crate::cli::identity::keys(&store_config(&cli.config)?, command)?
        }
        Command::Tenants { command } => {
            crate::cli::identity::tenants(&store_config(&cli.config)?, command)?
        }
        Command::Store {
            command: StoreCommand::Migrate,
        } => {
            let config = store_config(&cli.config)?;
            crate::store::open(&config).context("cannot open the store")?;
            println!(
                "store schema at version {} ({:?})",
                crate::store::MIGRATIONS.len(),
                config.store().kind
            );
        }
        Command::Certs { command } => crate::cli::certs::run(command)?,
        Command::Audit { command } => return crate::cli::audit::run(&cli.config, command),
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the config for a command that works on the store. Run as root, the command first
/// becomes the service user, so every file it creates in the data directory (database, WAL,
/// secrets) stays readable and writable by the unprivileged worker.
///
/// The audit log is opened before that (as root: the key and the log are root's), so the
/// command records its changes through descriptors it keeps; it never rotates the log (the
/// daemon does).
fn store_config(path: &std::path::Path) -> anyhow::Result<Config> {
    let config = Config::load_lenient(path)?;
    if nix::unistd::geteuid().is_root() {
        let user = crate::daemon::privdrop::ServiceUser::lookup(&config.server().user)?;
        crate::daemon::privdrop::prepare_data_dir(&config.data_dir, &user)?;
        let writer = crate::audit::open_writer(&config, Some(user.gid.as_raw()), false)?;
        crate::audit::sink::install_writer(writer, crate::audit::Source::Cli);
        // Who runs the command, named while still that user.
        crate::audit::cli_actor();
        user.become_now()?;
    } else {
        let writer = crate::audit::open_writer(&config, None, false)?;
        crate::audit::sink::install_writer(writer, crate::audit::Source::Cli);
    }
    Ok(config)
}
