//! `moat users|keys|tenants`: the operator's identity commands, run against the configured
//! store directly (the daemon need not be running; a running one picks the change up within
//! its revocation poll). Passwords are read from the terminal without echo, or from the first
//! line of stdin; a new API key is printed once, on stdout, and never again.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use clap::Subcommand;
use zeroize::Zeroizing;

use crate::{
    auth::{admin::Admin, secrets::Pepper},
    config::Config,
    store::Store,
};

#[derive(Subcommand, Debug)]
pub enum UsersCommand {
    /// Add a user to a tenant.
    Add {
        username: String,
        #[arg(long)]
        tenant: String,
        /// A role (repeat for several).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Give the user a password (read from the terminal or stdin) for `grant_type=password`.
        #[arg(long)]
        password: bool,
    },
    /// Set a user's password (read from the terminal or stdin).
    Passwd { username: String },
    /// Replace a user's roles (none: no rights). Running gateways apply it within
    /// `auth.revocation_poll_ms`.
    Roles {
        username: String,
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Disable a user: its keys stop working and its sessions end.
    Disable { username: String },
    /// List users.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an API key for a user and print it once.
    Create {
        #[arg(long)]
        user: String,
        /// A label for the key (shown in listings).
        #[arg(long, default_value = "")]
        name: String,
        /// Narrow the key to these roles (repeat; default: all of the user's roles).
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long)]
        expires_in_days: Option<u64>,
        /// Print `{"key_id", "key"}` as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (ids and metadata; never secrets).
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id: it stops working and the sessions opened with it end.
    Revoke { key_id: String },
    /// Narrow a key to some of its roles (none: no rights). Running gateways apply it within
    /// `auth.revocation_poll_ms`.
    Narrow {
        key_id: String,
        #[arg(long = "role")]
        roles: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TenantsCommand {
    /// Add a tenant.
    Add { name: String },
    /// List tenants.
    List {
        #[arg(long)]
        json: bool,
    },
}

struct Opened {
    store: std::sync::Arc<dyn Store>,
    pepper: Pepper,
}

impl Opened {
    fn new(config: &Config) -> anyhow::Result<Self> {
        let store = crate::store::open(config).with_context(|| match config.store().kind {
            crate::config::StoreKind::Sqlite => {
                format!("cannot open the store in {}", config.data_dir.display())
            }
            crate::config::StoreKind::Postgres => "cannot open the PostgreSQL store".to_owned(),
        })?;
        let pepper =
            Pepper::load_or_create(&config.data_dir).context("cannot read or create the pepper")?;
        Ok(Self { store, pepper })
    }

    fn admin(&self) -> Admin<'_> {
        Admin {
            store: self.store.as_ref(),
            pepper: &self.pepper,
            // The root CLI: all-powerful.
            caller: None,
        }
    }
}

/// Reads a password: from the terminal with echo off, or the first line of stdin.
fn read_password(prompt: &str) -> anyhow::Result<Zeroizing<String>> {
    let stdin = std::io::stdin();
    let mut line = Zeroizing::new(String::new());
    if stdin.is_terminal() {
        eprint!("{prompt}: ");
        std::io::stderr().flush()?;
        let _echo = EchoOff::new();
        stdin.lock().read_line(&mut line)?;
        eprintln!();
    } else {
        stdin.lock().read_line(&mut line)?;
    }
    let trimmed = line.trim_end_matches(['\r', '\n']);
    Ok(Zeroizing::new(trimmed.to_owned()))
}

/// Turns terminal echo off for its lifetime.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> Self {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed, then filled, termios struct.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Self(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Self(Some(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the attributes read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

fn fmt_time(t: Option<i64>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.to_string())
}

pub fn users(config: &Config, cmd: UsersCommand) -> anyhow::Result<()> {
    let o = Opened::new(config)?;
    let a = o.admin();
    match cmd {
        UsersCommand::Add {
            username,
            tenant,
            roles,
            password,
        } => {
            let pw = password.then(|| read_password("password")).transpose()?;
            let id = a.add_user(&username, &tenant, &roles, pw.as_ref().map(|p| p.as_str()))?;
            println!("user {username} added ({id})");
        }
        UsersCommand::Passwd { username } => {
            let pw = read_password("new password")?;
            a.set_password(&username, &pw)?;
            println!("password of {username} changed");
        }
        UsersCommand::Roles { username, roles } => {
            let id = a.set_user_roles(&username, &roles)?;
            println!("roles of {username} ({id}) set to [{}]", roles.join(","));
        }
        UsersCommand::Disable { username } => {
            let (id, changed) = a.disable_user(&username)?;
            if changed {
                println!("user {username} ({id}) disabled; its keys and sessions no longer work");
            } else {
                println!("user {username} ({id}) was already disabled");
            }
        }
        UsersCommand::List { json } => {
            let users = a.users()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&users)?);
            } else {
                println!(
                    "{:<24} {:<16} {:<24} {:<10} ROLES",
                    "ID", "TENANT", "USERNAME", "STATE"
                );
                for u in users {
                    let state = if u.disabled_at.is_some() {
                        "disabled"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<24} {:<16} {:<24} {:<10} {}",
                        u.id,
                        u.tenant,
                        u.username,
                        state,
                        u.roles.join(",")
                    );
                }
            }
        }
    }
    Ok(())
}

pub fn keys(config: &Config, cmd: KeysCommand) -> anyhow::Result<()> {
    let o = Opened::new(config)?;
    let a = o.admin();
    match cmd {
        KeysCommand::Create {
            user,
            name,
            roles,
            expires_in_days,
            json,
        } => {
            let roles = (!roles.is_empty()).then_some(roles);
            let k = a.create_key(&user, &name, roles.as_deref(), expires_in_days)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"key_id": k.key_id, "key": k.plaintext.as_str()})
                );
            } else {
                println!("{}", k.plaintext.as_str());
                eprintln!(
                    "key id {}: the key above is shown once and cannot be recovered; store it now",
                    k.key_id
                );
            }
        }
        KeysCommand::List { user, json } => {
            let keys = a.keys(user.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!(
                    "{:<14} {:<20} {:<16} {:<16} {:<12} {:<12} ROLES",
                    "KEY ID", "USER", "TENANT", "NAME", "EXPIRES", "REVOKED"
                );
                for k in keys {
                    println!(
                        "{:<14} {:<20} {:<16} {:<16} {:<12} {:<12} {}",
                        k.key_id,
                        k.username,
                        k.tenant,
                        k.name,
                        fmt_time(k.expires_at),
                        fmt_time(k.revoked_at),
                        k.roles.join(",")
                    );
                }
            }
        }
        KeysCommand::Narrow { key_id, roles } => {
            a.narrow_key(&key_id, &roles)?;
            println!("key {key_id} narrowed to [{}]", roles.join(","));
        }
        KeysCommand::Revoke { key_id } => {
            if a.revoke_key(&key_id)? {
                println!("key {key_id} revoked; sessions opened with it ended");
            } else {
                println!("key {key_id} was already revoked");
            }
        }
    }
    Ok(())
}

pub fn tenants(config: &Config, cmd: TenantsCommand) -> anyhow::Result<()> {
    let o = Opened::new(config)?;
    let a = o.admin();
    match cmd {
        TenantsCommand::Add { name } => {
            a.add_tenant(&name)?;
            println!("tenant {name} added");
        }
        TenantsCommand::List { json } => {
            let tenants = a.tenants()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tenants)?);
            } else {
                println!("{:<24} CREATED", "NAME");
                for t in tenants {
                    println!("{:<24} {}", t.name, t.created_at);
                }
            }
        }
    }
    Ok(())
}
