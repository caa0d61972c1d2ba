//! The one TOML file that drives moat: listeners, pools and models, segmentation.
//!
//! Loading is all-or-nothing: the file is parsed with unknown keys refused (`schema`), then
//! checked section by section and resolved (`validate`: host names to addresses, relative
//! paths against the file's folder, credentials read). Any problem is a [`ConfigError`] naming
//! the file, the key and what is wrong; nothing is applied from a bad file. What the load read
//! from outside the file is kept (`capture`) so another process can replay it.
//!
//! This module owns the checked [`Config`] and its pools; the file as written stays private
//! to it and is reached through the read-only accessors below.

mod capture;
mod destinations;
mod schema;
mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

pub use capture::{Captured, Sources};
pub use destinations::{
    DestinationRule, parse_destination, parse_proxy, parse_source_prefix, resolve_host_port,
};
use ipnet::IpNet;
pub use schema::{
    AdminConfig, AuditConfig, AuthConfig, ClassifierConfig, GuardAttach, GuardrailPolicyConfig,
    GuardrailRuleConfig, GuardrailsConfig, InferenceGuardConfig, MAX_LEEWAY_SECS,
    MAX_LIFETIME_SECS, ModelConfig, OnBackendError, PoolConfig, Quota, QuotaBackendKind,
    QuotasConfig, RoleConfig, SegmentationConfig, SegmentationMode, ServerConfig, SigningAlgorithm,
    StoreConfig, StoreKind, TenantConfig,
};
pub use validate::{PgTls, pg_tls};

use self::{capture::Reader, schema::RawConfig, validate::Invalid};

/// Where `moat` looks for its config when `--config` and `MOAT_CONFIG` are not given.
pub const DEFAULT_PATH: &str = "/etc/moat/moat.toml";

/// A config problem: which file, which key (dotted path), and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(
                f,
                "{}: key `{}`: {}",
                self.file.display(),
                self.key,
                self.reason
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// A loaded, validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (absolute).
    pub path: PathBuf,
    /// The text it was parsed from (handed to the worker as is).
    pub source: String,
    /// The file as written; read through the accessors.
    raw: RawConfig,
    pub pools: BTreeMap<String, Pool>,
    pub data_dir: PathBuf,
    pub egress_allow: Vec<DestinationRule>,
    pub extra_protected: Vec<DestinationRule>,
    /// The inference-host guard, when `[segmentation.inference]` is present.
    pub inference: Option<InferenceGuard>,
    /// Everything the load read from outside the file's text (see [`Captured`]).
    pub captured: Captured,
    /// The shared store's password (`[store] password_file` / `password_env`).
    pub store_password: Option<Secret>,
    /// The CAs (DER) for PostgreSQL over TLS (`[store] ca_file`); `None`: the webpki roots.
    pub store_ca: Option<Vec<Vec<u8>>>,
    /// Redis's password (`[quotas] redis_password_file` / `redis_password_env`).
    pub redis_password: Option<Secret>,
    /// `[guardrails]`, compiled once per load.
    pub guardrails: std::sync::Arc<crate::guardrails::Guardrails>,
}

/// A pool after validation: its hosts resolved, its credential and CAs read, its durations
/// ready to use.
#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    /// Provider label, used by `inference:<provider>` permissions.
    pub provider: String,
    /// As written (`host:port`), in order, for the router and for logs.
    pub hosts: Vec<String>,
    /// Every address each host resolved to.
    pub addrs: Vec<SocketAddr>,
    /// The addresses of `hosts[i]`, so the upstream client never needs DNS at run time.
    pub host_addrs: Vec<Vec<SocketAddr>>,
    /// Whether the kernel reserves these hosts for the gateway.
    pub protect: bool,
    /// Outside the operator's walls: `local_only` tenants never reach it.
    pub external: bool,
    /// The tenant this pool serves exclusively.
    pub dedicated_to: Option<String>,
    /// The credential injected upstream, read when the config loads.
    pub credential: Option<Secret>,
    /// Speak TLS to the hosts (the server name is the host as written).
    pub tls: bool,
    /// Trusted CAs for `tls` (DER), from `tls_ca_file`; `None` means the webpki roots.
    pub tls_roots: Option<Vec<Vec<u8>>>,
    /// The client certificate presented to the hosts (mutual TLS), when the pool names one.
    pub tls_client: Option<ClientCert>,
    pub timeouts: Timeouts,
    /// The active health check.
    pub health: HealthCheck,
    /// Passive health: when a failing host is taken out.
    pub ejection: Ejection,
    /// Attempts per request, each on another host (only failures that reached nothing).
    pub max_attempts: u32,
    /// Who shares the hosts' KV prefix cache (`cache_salt` set by the gateway).
    pub prefix_cache_isolation: PrefixCacheIsolation,
}

/// A pool's `prefix_cache_isolation`: the scope of the `cache_salt` the gateway sets on each
/// generation request, so that only requests of the same scope can hit each other's cached
/// prefixes (a cache hit is observable in timing, which would leak other tenants' prompts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixCacheIsolation {
    Tenant,
    User,
    /// No `cache_salt` (the servers do not know the field, e.g. a hosted API).
    Off,
}

/// A pool's client certificate and key, read and checked when the config loads: the key
/// matches the certificate. `Debug` shows the certificate file, never the key.
#[derive(Clone)]
pub struct ClientCert {
    /// Where the certificate came from, for logs and `moat doctor`.
    pub cert_file: PathBuf,
    /// The chain (leaf first) with its signing key, ready for rustls.
    pub key: std::sync::Arc<rustls::sign::CertifiedKey>,
    /// The leaf's validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert_file", &self.cert_file)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A pool's per-attempt timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// From the request being sent to the response head arriving.
    pub first_byte: Duration,
    /// Longest silence between two chunks of a response body.
    pub idle: Duration,
}

/// A pool's active health check: `GET path` every `interval`, 2xx within `timeout` is healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
}

/// Passive ejection: after `after_failures` failures in a row a host is out for `base`,
/// doubled on every ejection in a row up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub after_failures: u32,
    pub base: Duration,
    pub max: Duration,
}

/// A secret read from the config's sources: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The inference guard after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceGuard {
    pub model_ports: Vec<u16>,
    /// Allowed source prefixes, truncated; IPv4-mapped IPv6 prefixes turned into IPv4.
    pub allowed: Vec<IpNet>,
    pub attach: GuardAttach,
    pub interfaces: Vec<String>,
}

impl Config {
    /// Reads, parses, validates and resolves `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::read_and_parse(path, Sources::System)
    }

    /// Like [`Config::load`], with [`Sources::Lenient`]: for commands that work on the store
    /// or the pins only.
    pub fn load_lenient(path: &Path) -> Result<Config, ConfigError> {
        Self::read_and_parse(path, Sources::Lenient)
    }

    fn read_and_parse(path: &Path, sources: Sources<'_>) -> Result<Config, ConfigError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            file: path.clone(),
            key: String::new(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(&path, &text, sources)
    }

    /// Parses and validates `text` as if it were the file `path`.
    pub fn from_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Self::parse(path, text, Sources::System)
    }

    /// Parses and validates `text` as if it were the file `path`, reading host names,
    /// environment variables and files through `sources`.
    pub fn parse(path: &Path, text: &str, sources: Sources<'_>) -> Result<Config, ConfigError> {
        Self::check(path, text, sources).map_err(|Invalid { key, reason }| ConfigError {
            file: path.to_path_buf(),
            key,
            reason,
        })
    }

    /// Every section's check, in order; the first problem wins.
    fn check(path: &Path, text: &str, sources: Sources<'_>) -> Result<Config, Invalid> {
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            Invalid::new(key, e.into_inner().message().trim())
        })?;
        let base = path.parent().unwrap_or(Path::new("/"));
        let reader = Reader::new(sources, &raw.server.user);

        let pools = validate::pools(&raw.pools, base, &reader)?;
        validate::models(&raw.models, &pools)?;
        validate::server(&raw.server)?;
        validate::tenancy(&raw)?;
        validate::admin(&raw.admin, &raw.server)?;
        let seg = validate::segmentation(&raw.segmentation, &reader)?;
        validate::auth(&raw.auth, base, &reader)?;
        let shared = validate::store(&raw, base, &reader)?;
        let guardrails = validate::guardrails(&raw)?;

        Ok(Config {
            path: path.to_path_buf(),
            source: text.to_owned(),
            data_dir: base.join(&raw.server.data_dir),
            raw,
            pools,
            egress_allow: seg.egress_allow,
            extra_protected: seg.extra_protected,
            inference: seg.inference,
            guardrails,
            captured: reader.into_captured(),
            store_password: shared.store_password,
            store_ca: shared.store_ca,
            redis_password: shared.redis_password,
        })
    }

    /// `[server]`.
    pub fn server(&self) -> &ServerConfig {
        &self.raw.server
    }

    /// A pool as written (file names the validated [`Pool`] no longer keeps).
    pub fn raw_pool(&self, name: &str) -> Option<&PoolConfig> {
        self.raw.pools.get(name)
    }

    /// `[audit]`.
    pub fn audit(&self) -> &AuditConfig {
        &self.raw.audit
    }

    /// Where the audit log lives.
    pub fn audit_dir(&self) -> PathBuf {
        match &self.raw.audit.dir {
            Some(d) => self.path.parent().unwrap_or(Path::new("/")).join(d),
            None => self.data_dir.join("audit"),
        }
    }

    /// `[admin]`.
    pub fn admin(&self) -> &AdminConfig {
        &self.raw.admin
    }

    /// `[segmentation]` as written (the checked rules are [`Config::egress_allow`], …).
    pub fn segmentation(&self) -> &SegmentationConfig {
        &self.raw.segmentation
    }

    /// `[auth]`.
    pub fn auth(&self) -> &AuthConfig {
        &self.raw.auth
    }

    /// `[store]`.
    pub fn store(&self) -> &StoreConfig {
        &self.raw.store
    }

    /// `[models]`: public name → where it is served and its request limits.
    pub fn models(&self) -> &BTreeMap<String, ModelConfig> {
        &self.raw.models
    }

    /// `[roles]`: role name → its permissions (checked at load).
    pub fn roles(&self) -> &BTreeMap<String, RoleConfig> {
        &self.raw.roles
    }

    /// `[tenants]`: the tenants the config names.
    pub fn tenants(&self) -> &BTreeMap<String, TenantConfig> {
        &self.raw.tenants
    }

    /// `[quotas]`: the defaults for tenants without their own.
    pub fn quotas(&self) -> &QuotasConfig {
        &self.raw.quotas
    }

    /// A tenant's policy; tenants the config does not name are shared, not local-only, and
    /// get the default quotas.
    pub fn tenant(&self, name: &str) -> TenantConfig {
        self.raw.tenants.get(name).cloned().unwrap_or_default()
    }

    /// A path from the config, taken relative to the config file's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        self.path.parent().unwrap_or(Path::new("/")).join(p)
    }

    /// Whether this host runs the gateway (data plane and connect hooks). An inference host —
    /// a config with `[segmentation.inference]` and no pools — runs only the ingress guard.
    pub fn runs_gateway(&self) -> bool {
        !self.pools.is_empty() || self.inference.is_none()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_str(Path::new("/etc/moat/test.toml"), text)
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = load("[segmentation]\nmode = \"enforce\"\nbogus = 1\n").unwrap_err();
        assert_eq!(e.file, Path::new("/etc/moat/test.toml"));
        assert_eq!(e.key, "segmentation.bogus");
        assert!(e.reason.contains("bogus"), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "/etc/moat/test.toml: key `segmentation.bogus`: {}",
                e.reason
            )
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = load("[pools.a]\nhosts = \"127.0.0.1:1\"\n").unwrap_err();
        assert_eq!(e.key, "pools.a.hosts", "{e}");
    }

    #[test]
    fn defaults_fill_every_table_left_out() {
        let c = load("").unwrap();
        assert_eq!(c.server().listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(c.server().user, "moat");
        assert_eq!(c.server().max_body_bytes, 1024 * 1024);
        assert_eq!(c.admin().listen, None);
        let seg = c.segmentation();
        assert_eq!(seg.mode, SegmentationMode::Enforce);
        assert_eq!(seg.gateway_cgroup, Path::new("moat.gateway"));
        assert_eq!(seg.pin_root, Path::new("/sys/fs/bpf/moat"));
        assert!(seg.egress_lockdown);
        // A key left out of a table that is present takes the same default.
        let c = load("[server]\nuser = \"svc\"\n[segmentation]\nmode = \"off\"\n").unwrap();
        assert_eq!(c.server().max_body_bytes, 1024 * 1024);
        assert_eq!(c.server().user, "svc");
        assert!(c.segmentation().egress_lockdown);
        assert_eq!(c.segmentation().mode, SegmentationMode::Off);
    }

    #[test]
    fn relative_data_dir_is_taken_from_the_config_folder() {
        let c = load("[server]\ndata_dir = \"data\"\n").unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/moat/data"));
        assert_eq!(load("").unwrap().data_dir, Path::new("/var/lib/moat"));
    }
}
