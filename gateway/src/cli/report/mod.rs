//! `moat audit report`: what an auditor asks of an installation, answered from the config,
//! the files, the kernel and a live check (Markdown by default, `--json`).
//!
//! - every credential's file with its owner and mode, and what is wrong with each;
//! - the hash algorithms and parameters in force, token lifetimes, leeway, rotation;
//! - a live expiry check through the real code path ([`probe`]);
//! - listeners and what each exposes; the kernel hooks attached now and the protected set;
//!   the service user and the worker's privileges as `/proc` reports them;
//! - the attack surface per component with its controls and tests ([`surface`]);
//! - versions, runtime and data path; and whether the audit log verifies.
//!
//! The report fails (exit 1) when a credential file is wrong, the expiry check fails, or the
//! audit log does not verify.

pub mod probe;
pub mod surface;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use anyhow::Context;
use serde::Serialize;

use crate::{
    audit,
    auth::{password, secrets},
    config::{Config, SigningAlgorithm},
    segment,
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub config: String,
    pub credentials: Vec<Credential>,
    pub algorithms: BTreeMap<String, String>,
    pub tokens: BTreeMap<String, String>,
    pub expiry_check: Result<probe::ProbeResult, String>,
    pub listeners: Vec<Listener>,
    pub kernel: Kernel,
    pub service_user: String,
    pub worker_processes: Vec<ProcessFacts>,
    pub attack_surface: &'static [surface::Component],
    pub versions: BTreeMap<String, String>,
    pub paths: BTreeMap<String, String>,
    pub audit_log: String,
    pub problems: Vec<String>,
    pub ok: bool,
}

#[derive(Debug, Serialize)]
pub struct Credential {
    pub what: String,
    /// A path, or `env:NAME` for a credential read from the environment.
    pub location: String,
    pub exists: bool,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub mode: Option<String>,
    /// Who should own it.
    pub expected_owner: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Listener {
    pub name: String,
    pub address: String,
    pub exposes: String,
}

#[derive(Debug, Serialize)]
pub struct Kernel {
    pub segmentation: String,
    /// `moat segment status`: what is attached now, the protected set and the counters.
    pub attached: Option<String>,
    pub protected_set: String,
}

#[derive(Debug, Serialize)]
pub struct ProcessFacts {
    pub pid: u32,
    pub role: String,
    /// Lines of `/proc/<pid>/status` about identity and privilege.
    pub status: BTreeMap<String, String>,
}

pub fn build(config_path: &Path) -> anyhow::Result<Report> {
    let config = Config::load(config_path)?;
    let mut problems = Vec::new();
    let user = &config.server().user;
    let service = nix::unistd::User::from_name(user).ok().flatten();
    let service_uid = service.as_ref().map(|u| u.uid.as_raw());

    let credentials = credentials(&config, user, service_uid);
    for c in &credentials {
        for p in &c.problems {
            problems.push(format!("{} ({}): {p}", c.what, c.location));
        }
    }

    let expiry_check = probe::run_as_service_user(&config).map_err(|e| format!("{e:#}"));
    match &expiry_check {
        Ok(r) if r.ok => {}
        Ok(r) => problems.push(format!("live expiry check failed: {}", r.detail.join("; "))),
        Err(e) => problems.push(format!("live expiry check could not run: {e}")),
    }

    let audit_log = match audit_status(&config) {
        Ok((ok, text)) => {
            if !ok {
                problems.push(format!("audit log: {text}"));
            }
            text
        }
        Err(e) => {
            problems.push(format!("audit log: {e:#}"));
            format!("{e:#}")
        }
    };

    let seg = config.segmentation();
    let kernel = Kernel {
        segmentation: format!("{:?}", seg.mode).to_lowercase(),
        attached: segment::status(&segment::Pins::new(&seg.pin_root))
            .ok()
            .map(|s| s.to_string()),
        protected_set: if config.runs_gateway() {
            segment::Policy::from_config(&config).to_string()
        } else {
            String::new()
        },
    };

    Ok(Report {
        generated_at: audit::record::now_rfc3339(),
        config: config.path.display().to_string(),
        credentials,
        algorithms: algorithms(&config),
        tokens: tokens(&config),
        expiry_check,
        listeners: listeners(&config),
        kernel,
        service_user: match &service {
            Some(u) => format!("{} (uid {}, gid {})", u.name, u.uid, u.gid),
            None => format!("{user} (does not exist)"),
        },
        worker_processes: processes(&config),
        attack_surface: surface::SURFACE,
        versions: versions(),
        paths: [
            ("config", config.path.display().to_string()),
            ("data_dir", config.data_dir.display().to_string()),
            ("audit_dir", config.audit_dir().display().to_string()),
            ("pin_root", seg.pin_root.display().to_string()),
            (
                "binary",
                std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        audit_log,
        ok: problems.is_empty(),
        problems,
    })
}

fn name_of_uid(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

fn name_of_gid(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

/// Every credential location, judged: a secret file must be a regular file (not a link),
/// 0600 or stricter, owned by whom it belongs to.
fn credentials(config: &Config, user: &str, service_uid: Option<u32>) -> Vec<Credential> {
    let data = &config.data_dir;
    let sec = secrets::secrets_dir(data);
    let svc = format!("{user} (service user)");
    let mut out = vec![
        file(
            "identity store (SQLite)",
            &data.join(crate::store::sqlite::DB_FILE),
            &svc,
            service_uid,
            true,
        ),
        file(
            "pepper (HMAC key of API keys and refresh tokens)",
            &sec.join(secrets::PEPPER_FILE),
            &svc,
            service_uid,
            true,
        ),
        file(
            "audit key (HMAC of the audit log)",
            &audit::chain::AuditKey::path(data),
            "root",
            Some(0),
            true,
        ),
    ];
    match config.auth().algorithm {
        SigningAlgorithm::EdDSA => out.push(file(
            "JWT signing keys (Ed25519)",
            &sec.join(crate::auth::jwt::ED25519_KEYS_FILE),
            &svc,
            service_uid,
            false,
        )),
        SigningAlgorithm::HS256 => {
            let path = match &config.auth().hs256_secret_file {
                Some(p) => config.resolve(p),
                None => sec.join("jwt-hs256.key"),
            };
            out.push(file(
                "JWT HS256 secret",
                &path,
                &format!("root or {svc}"),
                None,
                true,
            ));
        }
    }
    for (name, pool) in &config.pools {
        let raw = config.raw_pool(name);
        if pool.tls_client.is_some() {
            let key = raw
                .and_then(|r| r.tls_client_key_file.clone())
                .map(|p| config.resolve(&p));
            if let Some(k) = key {
                out.push(file(
                    &format!("pool `{name}`: TLS client key"),
                    &k,
                    &format!("root or {svc}"),
                    None,
                    true,
                ));
            }
        }
        if let Some(r) = raw {
            if let Some(f) = &r.api_key_file {
                out.push(file(
                    &format!("pool `{name}`: upstream credential"),
                    &config.resolve(f),
                    &format!("root or {svc}"),
                    None,
                    true,
                ));
            }
            if let Some(env) = &r.api_key_env {
                out.push(Credential {
                    what: format!("pool `{name}`: upstream credential"),
                    location: format!("env:{env}"),
                    exists: std::env::var_os(env).is_some() || pool.credential.is_some(),
                    owner: None,
                    group: None,
                    mode: None,
                    expected_owner: "the supervisor's environment (passed to the worker over the control channel, never by environment)".into(),
                    problems: Vec::new(),
                });
            }
        }
    }
    out
}

fn file(
    what: &str,
    path: &Path,
    expected: &str,
    owner_uid: Option<u32>,
    secret: bool,
) -> Credential {
    let mut c = Credential {
        what: what.to_owned(),
        location: path.display().to_string(),
        exists: false,
        owner: None,
        group: None,
        mode: None,
        expected_owner: expected.to_owned(),
        problems: Vec::new(),
    };
    match std::fs::symlink_metadata(path) {
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                c.problems.push(format!("cannot inspect: {e}"));
            }
            // Not created yet (first start creates it): nothing wrong with a file that is not there.
        }
        Ok(m) => {
            c.exists = true;
            c.owner = Some(name_of_uid(m.uid()));
            c.group = Some(name_of_gid(m.gid()));
            let mode = m.permissions().mode() & 0o7777;
            c.mode = Some(format!("{mode:04o}"));
            if m.file_type().is_symlink() {
                c.problems
                    .push("is a symbolic link: moat refuses to read secrets through links".into());
            } else if !m.is_file() {
                c.problems.push("is not a regular file".into());
            }
            if secret && mode & 0o077 != 0 {
                c.problems.push(format!(
                    "mode {mode:04o}: readable or writable by group or others (chmod 600)"
                ));
            }
            if let Some(uid) = owner_uid
                && m.uid() != uid
            {
                c.problems.push(format!(
                    "owned by {}, expected {expected}",
                    name_of_uid(m.uid())
                ));
            }
            if let Some(parent) = path.parent()
                && let Ok(pm) = std::fs::metadata(parent)
                && pm.permissions().mode() & 0o022 != 0
            {
                c.problems.push(format!(
                    "its folder {} is writable by group or others",
                    parent.display()
                ));
            }
        }
    }
    c
}

fn algorithms(config: &Config) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "api_keys".into(),
        "HMAC-SHA256 under the pepper (256-bit secrets, constant-time compare; key id stored in clear)".into(),
    );
    m.insert(
        "refresh_tokens".into(),
        "HMAC-SHA256 under the pepper; single use, rotated, successor derived by HMAC".into(),
    );
    m.insert(
        "passwords".into(),
        format!(
            "Argon2id v0x13, m = {} KiB, t = {}, p = {}; {}..{} characters",
            password::M_COST_KIB,
            password::T_COST,
            password::P_COST,
            password::MIN_LEN,
            password::MAX_LEN
        ),
    );
    m.insert(
        "access_tokens".into(),
        match config.auth().algorithm {
            SigningAlgorithm::EdDSA => "JWT, EdDSA (Ed25519)".into(),
            SigningAlgorithm::HS256 => "JWT, HS256 (HMAC-SHA256)".into(),
        },
    );
    m.insert(
        "audit_log".into(),
        "SHA-256 hash chain; HMAC-SHA256 per record under the audit key".into(),
    );
    m.insert(
        "config_digest".into(),
        "SHA-256 of the config text (in daemon_start and config_reload records)".into(),
    );
    m
}

fn tokens(config: &Config) -> BTreeMap<String, String> {
    let a = config.auth();
    let mut m = BTreeMap::new();
    let secs = |s: u64| format!("{s} s");
    m.insert(
        "access_token_lifetime".into(),
        secs(a.access_token_ttl_secs),
    );
    m.insert("leeway".into(), secs(a.leeway_secs));
    m.insert(
        "refresh_idle_lifetime".into(),
        secs(a.refresh_idle_ttl_secs),
    );
    m.insert(
        "refresh_absolute_lifetime".into(),
        secs(a.refresh_absolute_ttl_secs),
    );
    m.insert(
        "refresh_reuse_grace".into(),
        secs(a.refresh_reuse_grace_secs),
    );
    m.insert(
        "signing_key_rotation".into(),
        match a.algorithm {
            SigningAlgorithm::EdDSA => format!(
                "every {} s, old key verifies {} s more",
                a.signing_key_rotation_secs, a.signing_key_overlap_secs
            ),
            SigningAlgorithm::HS256 => "none (HS256: a fixed secret; rotate by hand)".into(),
        },
    );
    m.insert("issuer".into(), a.issuer.clone());
    m.insert("audience".into(), a.audience.clone());
    m
}

fn listeners(config: &Config) -> Vec<Listener> {
    let mut out = vec![Listener {
        name: "data plane".into(),
        address: config.server().listen.to_string(),
        exposes: "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, \
                  /v1/auth/token, /v1/auth/revoke, /.well-known/jwks.json, /healthz, /readyz"
            .into(),
    }];
    if let Some(a) = config.admin().listen {
        out.push(Listener {
            name: "admin plane".into(),
            address: a.to_string(),
            exposes: "/admin/tenants, /admin/users, /admin/keys, /admin/policy, /admin/audit, \
                      /metrics (each with its own permission)"
                .into(),
        });
    }
    out.push(Listener {
        name: "supervisor".into(),
        address: "none (Unix socket pair to the worker only)".into(),
        exposes: "control channel (config, counters), audit datagrams from the worker".into(),
    });
    out
}

/// The daemon for this config (a `moat serve` naming it) and its children, as `/proc` sees them.
fn processes(config: &Config) -> Vec<ProcessFacts> {
    let want = config.path.display().to_string();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let cmdline = |pid: u32| -> Vec<String> {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let status = |pid: u32| -> BTreeMap<String, String> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| {
                matches!(
                    *k,
                    "Name"
                        | "PPid"
                        | "Uid"
                        | "Gid"
                        | "Groups"
                        | "CapInh"
                        | "CapPrm"
                        | "CapEff"
                        | "CapBnd"
                        | "CapAmb"
                        | "NoNewPrivs"
                        | "Seccomp"
                        | "Seccomp_filters"
                )
            })
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect()
    };
    let supervisors: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&p| {
            let c = cmdline(p);
            c.iter().any(|a| a == "serve")
                && c.iter().any(|a| {
                    a == &want
                        || std::path::absolute(a).is_ok_and(|p| p.display().to_string() == want)
                })
        })
        .collect();
    for s in supervisors {
        out.push(ProcessFacts {
            pid: s,
            role: "supervisor".into(),
            status: status(s),
        });
        for &p in &pids {
            let st = status(p);
            if st.get("PPid").is_some_and(|pp| pp == &s.to_string()) {
                out.push(ProcessFacts {
                    pid: p,
                    role: "worker".into(),
                    status: st,
                });
            }
        }
    }
    out
}

fn versions() -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = env!("MOAT_DEPENDENCY_VERSIONS")
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    m.insert("moat".into(), env!("CARGO_PKG_VERSION").into());
    m.insert(
        "rustc (built with)".into(),
        env!("MOAT_RUSTC_VERSION").into(),
    );
    m.insert(
        "kernel".into(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
    );
    m.insert(
        "runtime".into(),
        "tokio (multi-threaded worker, current-thread supervisor), mimalloc".into(),
    );
    m
}

fn audit_status(config: &Config) -> anyhow::Result<(bool, String)> {
    let dir = config.audit_dir();
    let files = audit::files::list(&dir).with_context(|| format!("{}", dir.display()))?;
    if files.is_empty() {
        return Ok((true, format!("no records yet in {}", dir.display())));
    }
    let key = audit::chain::AuditKey::load(&config.data_dir).context("the audit key")?;
    let r = audit::verify::verify(&files, &key, Some(&dir), false)?;
    Ok((r.ok(), r.to_string().trim().to_owned()))
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# moat security report\n");
        let _ = writeln!(
            s,
            "Generated {} for `{}`. Result: **{}**.\n",
            self.generated_at,
            self.config,
            if self.ok { "ok" } else { "PROBLEMS FOUND" }
        );
        if !self.problems.is_empty() {
            let _ = writeln!(s, "## Problems\n");
            for p in &self.problems {
                let _ = writeln!(s, "- {p}");
            }
            s.push('\n');
        }
        let _ = writeln!(s, "## Credentials\n");
        let _ = writeln!(
            s,
            "| What | Location | Owner | Group | Mode | Expected owner | Problems |\n|---|---|---|---|---|---|---|"
        );
        for c in &self.credentials {
            let dash = || "-".to_owned();
            let _ = writeln!(
                s,
                "| {} | `{}` | {} | {} | {} | {} | {} |",
                c.what,
                c.location,
                c.owner.clone().unwrap_or_else(dash),
                c.group.clone().unwrap_or_else(dash),
                c.mode.clone().unwrap_or_else(|| if c.exists {
                    "-".into()
                } else {
                    "not created yet".into()
                }),
                c.expected_owner,
                if c.problems.is_empty() {
                    "none".into()
                } else {
                    c.problems.join("; ")
                }
            );
        }
        let _ = writeln!(s, "\n## Hash algorithms\n");
        for (k, v) in &self.algorithms {
            let _ = writeln!(s, "- **{k}**: {v}");
        }
        let _ = writeln!(s, "\n## Tokens\n");
        for (k, v) in &self.tokens {
            let _ = writeln!(s, "- **{k}**: {v}");
        }
        let _ = writeln!(s, "\n## Live expiry check\n");
        match &self.expiry_check {
            Ok(r) => {
                let _ = writeln!(
                    s,
                    "Result: **{}**\n",
                    if r.ok { "passed" } else { "FAILED" }
                );
                for d in &r.detail {
                    let _ = writeln!(s, "- {d}");
                }
            }
            Err(e) => {
                let _ = writeln!(s, "Could not run: {e}");
            }
        }
        let _ = writeln!(s, "\n## Listeners\n");
        for l in &self.listeners {
            let _ = writeln!(s, "- **{}** `{}`: {}", l.name, l.address, l.exposes);
        }
        let _ = writeln!(
            s,
            "\n## Kernel\n\nSegmentation: {}\n",
            self.kernel.segmentation
        );
        match &self.kernel.attached {
            Some(a) => {
                let _ = writeln!(s, "Attached now:\n\n```\n{}\n```", a.trim_end());
            }
            None => {
                let _ = writeln!(s, "Attached now: nothing pinned (or not readable).");
            }
        }
        if !self.kernel.protected_set.is_empty() {
            let _ = writeln!(
                s,
                "\nProtected set (from the config):\n\n```\n{}\n```",
                self.kernel.protected_set.trim_end()
            );
        }
        let _ = writeln!(
            s,
            "\n## Service user and privileges\n\nService user: {}\n",
            self.service_user
        );
        if self.worker_processes.is_empty() {
            let _ = writeln!(s, "No running daemon for this config.");
        }
        for p in &self.worker_processes {
            let _ = writeln!(s, "- {} pid {}:", p.role, p.pid);
            for (k, v) in &p.status {
                let _ = writeln!(s, "  - {k}: `{v}`");
            }
        }
        let _ = writeln!(s, "\n## Attack surface\n");
        for c in self.attack_surface {
            let _ = writeln!(
                s,
                "### {}\n\nExposed to: {}\n\nControls:",
                c.component, c.exposed_to
            );
            for ctl in c.controls {
                let _ = writeln!(s, "- {ctl}");
            }
            let _ = writeln!(s, "\nTests: {}\n", c.tests.join(", "));
        }
        let _ = writeln!(s, "## Versions and paths\n");
        for (k, v) in &self.versions {
            let _ = writeln!(s, "- {k}: {v}");
        }
        for (k, v) in &self.paths {
            let _ = writeln!(s, "- {k}: `{v}`");
        }
        let _ = writeln!(s, "\n## Audit log\n\n{}", self.audit_log);
        s
    }
}
