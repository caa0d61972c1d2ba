//! The one TOML file that drives moat: listeners, pools and models, segmentation.
//!
//! Loading is all-or-nothing: the file is parsed with unknown keys refused, then validated and
//! resolved (host names to addresses, relative paths against the file's folder). Any problem is
//! a [`ConfigError`] naming the file, the key and what is wrong; nothing is applied from a bad
//! file.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;

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

/// The file as written. Every table refuses keys it does not know.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    pub segmentation: SegmentationConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    /// Named sets of permissions (`authz`).
    #[serde(default)]
    pub roles: BTreeMap<String, RoleConfig>,
    /// Tenancy policy by tenant name (tenants themselves live in the store).
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Default quotas, for tenants without their own.
    #[serde(default)]
    pub quotas: QuotasConfig,
    #[serde(default)]
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Data-plane listener.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory for the store and secrets; relative paths are taken from the config's folder.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The unprivileged user the worker runs as.
    #[serde(default = "default_user")]
    pub user: String,
    /// Largest request body the data plane reads; larger ones get 413 before any parsing.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

fn default_user() -> String {
    "moat".to_owned()
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            data_dir: default_data_dir(),
            user: default_user(),
            max_body_bytes: default_max_body_bytes(),
        }
    }
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/moat")
}

/// A set of inference hosts that serve the same models.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Provider label, used by `inference:<provider>` permissions (e.g. `local`, `external`).
    #[serde(default = "default_provider")]
    pub provider: String,
    /// `host:port` entries; host names are resolved when the config loads.
    pub hosts: Vec<String>,
    /// Whether the kernel reserves these hosts for the gateway. Opt out for an external
    /// provider that other services on this host also use; the gateway may still reach it.
    #[serde(default = "yes")]
    pub protect: bool,
    /// Speak TLS (rustls) to the hosts; the server name is the host as written.
    #[serde(default)]
    pub tls: bool,
    /// PEM bundle of the CAs that may sign the hosts' certificates (with `tls`); without it,
    /// the webpki roots are trusted.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Environment variable holding the credential sent upstream as `Authorization: Bearer`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding that credential instead (first line; relative to the config's folder).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// TCP (and TLS) connect timeout per attempt.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// From the request being sent to the response head arriving. A non-streamed completion
    /// only answers when it is done, so this bounds a whole generation.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Longest silence between two chunks of a response body.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Path of the active health check (`GET`, 2xx is healthy, the pool credential is sent).
    #[serde(default = "default_health_path")]
    pub health_path: String,
    #[serde(default = "default_health_interval_ms")]
    pub health_interval_ms: u64,
    #[serde(default = "default_health_timeout_ms")]
    pub health_timeout_ms: u64,
    /// Consecutive failed requests after which a host is ejected (passive health).
    #[serde(default = "default_eject_after_failures")]
    pub eject_after_failures: u32,
    /// First ejection period; it doubles on each ejection in a row, up to `eject_max_ms`.
    #[serde(default = "default_eject_base_ms")]
    pub eject_base_ms: u64,
    #[serde(default = "default_eject_max_ms")]
    pub eject_max_ms: u64,
    /// Attempts per request, each on another host. Only failures where nothing reached the
    /// upstream (connect refused or timed out) are retried.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The provider is outside the operator's walls (a hosted API): `local_only` tenants never
    /// reach it.
    #[serde(default)]
    pub external: bool,
    /// The tenant this pool belongs to: it serves that (dedicated) tenant only.
    #[serde(default)]
    pub dedicated_to: Option<String>,
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_first_byte_timeout_ms() -> u64 {
    120_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_health_path() -> String {
    "/v1/models".to_owned()
}
fn default_health_interval_ms() -> u64 {
    5_000
}
fn default_health_timeout_ms() -> u64 {
    2_000
}
fn default_eject_after_failures() -> u32 {
    3
}
fn default_eject_base_ms() -> u64 {
    1_000
}
fn default_eject_max_ms() -> u64 {
    30_000
}
fn default_max_attempts() -> u32 {
    3
}

fn default_provider() -> String {
    "local".to_owned()
}

fn yes() -> bool {
    true
}

/// A public model name and where it is served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub pool: String,
    /// The model id the upstream expects; defaults to the public name.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Most entries in `messages` a chat request may carry.
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
    /// Largest `max_tokens` / `max_completion_tokens`; also injected when a request sets none,
    /// so no request can generate without bound.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// Largest `n` (and `best_of`): each one is a whole generation on the GPU.
    #[serde(default = "default_max_n")]
    pub max_n: u64,
    /// Most items in an embeddings `input` or a completions `prompt` array.
    #[serde(default = "default_max_inputs")]
    pub max_inputs: usize,
    /// Dedicated tenant → its own pool for this model. A dedicated tenant is served from here
    /// and nowhere else; without an entry the model does not exist for it.
    #[serde(default)]
    pub tenant_pools: BTreeMap<String, String>,
}

/// The admin plane's listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// A loopback address (never the data plane's); absent: no admin plane (the CLI still
    /// works on the store).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// A role: a named set of permissions (see `authz::Permission` for the grammar).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub permissions: Vec<String>,
}

/// How a tenant is kept apart, and its quotas.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Served only by pools `dedicated_to` it; never falls back to a shared pool.
    #[serde(default)]
    pub dedicated: bool,
    /// Never routed to a pool marked `external`.
    #[serde(default)]
    pub local_only: bool,
    /// The whole tenant's quota (default: `quotas.tenant`).
    #[serde(default)]
    pub quota: Option<Quota>,
    /// Each key's (or session's) quota in this tenant (default: `quotas.key`).
    #[serde(default)]
    pub key_quota: Option<Quota>,
}

/// Defaults for tenants that set none.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotasConfig {
    #[serde(default)]
    pub tenant: Quota,
    #[serde(default)]
    pub key: Quota,
}

/// Limits over a sliding minute and on concurrency; an absent limit is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub requests_per_minute: Option<u64>,
    /// Reserved as `max_tokens` × `n` plus an estimate of the prompt, reconciled with the
    /// upstream's reported usage.
    pub tokens_per_minute: Option<u64>,
    pub concurrent_requests: Option<u64>,
    pub concurrent_streams: Option<u64>,
}

fn default_max_messages() -> usize {
    256
}
fn default_max_tokens() -> u64 {
    4096
}
fn default_max_n() -> u64 {
    1
}
fn default_max_inputs() -> usize {
    256
}

/// Whether the kernel side is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SegmentationMode {
    /// Hooks must attach or the daemon refuses to start.
    #[default]
    Enforce,
    /// No kernel enforcement; `/readyz` and `moat doctor` say so.
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentationConfig {
    #[serde(default)]
    pub mode: SegmentationMode,
    /// The gateway's cgroup, relative to the cgroup2 mount. Created by the daemon.
    #[serde(default = "default_gateway_cgroup")]
    pub gateway_cgroup: PathBuf,
    /// bpffs folder for moat's pins; the schema version is appended (`…/v1`).
    #[serde(default = "default_pin_root")]
    pub pin_root: PathBuf,
    /// Destinations beyond the pools the gateway itself may reach (`addr[/prefix]:port` or
    /// `host:port`). Empty means pools only.
    #[serde(default)]
    pub egress_allow: Vec<String>,
    /// Refuse the gateway cgroup everything but its pools and `egress_allow`.
    #[serde(default = "yes")]
    pub egress_lockdown: bool,
    /// Destinations to protect beyond the pools (`addr[/prefix]:port` or `host:port`).
    #[serde(default)]
    pub extra_protected: Vec<String>,
    /// Inference-host mode: the ingress guard in front of the model ports.
    #[serde(default)]
    pub inference: Option<InferenceGuardConfig>,
}

/// `[segmentation.inference]`: on an inference host, packets to `model_ports` pass only from
/// `allowed_gateways`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceGuardConfig {
    /// The ports the model servers listen on (TCP and UDP are both guarded).
    pub model_ports: Vec<u16>,
    /// Source prefixes (`10.0.0.1/32`, `fd00::/64`) or addresses allowed to reach the model
    /// ports. Empty: nobody may.
    #[serde(default)]
    pub allowed_gateways: Vec<String>,
    /// Where the guard hooks in.
    #[serde(default)]
    pub attach: GuardAttach,
    /// Interfaces for TC ingress (`attach = "tc"` or `"both"`).
    #[serde(default)]
    pub interfaces: Vec<String>,
}

/// Where the inference guard attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardAttach {
    /// `cgroup_skb` ingress at the cgroup2 root: every socket on the machine, loopback
    /// included, whatever the interface.
    #[default]
    CgroupSkb,
    /// TC (tcx) ingress on `interfaces` only.
    Tc,
    /// Both.
    Both,
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

impl Default for SegmentationConfig {
    fn default() -> Self {
        Self {
            mode: SegmentationMode::default(),
            gateway_cgroup: default_gateway_cgroup(),
            pin_root: default_pin_root(),
            egress_allow: Vec::new(),
            egress_lockdown: true,
            extra_protected: Vec::new(),
            inference: None,
        }
    }
}

fn default_gateway_cgroup() -> PathBuf {
    PathBuf::from("moat.gateway")
}

fn default_pin_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/moat")
}

/// `[auth]`: token lifetimes, signing, caches and password throttling. Every duration is in
/// seconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `iss` of the access tokens moat issues (and the only one it accepts).
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// `aud` of the access tokens moat issues (and the only one it accepts).
    #[serde(default = "default_audience")]
    pub audience: String,
    /// `EdDSA` (Ed25519, default; keys generated and rotated in the data directory) or `HS256`.
    #[serde(default)]
    pub algorithm: crate::auth::jwt::SigningAlgorithm,
    /// HS256 only: file holding the secret (≥ 32 bytes); created with 32 random bytes if
    /// missing. Default: `<data_dir>/secrets/jwt-hs256.key`.
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    #[serde(default = "default_access_ttl")]
    pub access_token_ttl_secs: u64,
    /// Clock-skew allowance on `exp`/`nbf`/`iat`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// A refresh token unused this long expires.
    #[serde(default = "default_refresh_idle")]
    pub refresh_idle_ttl_secs: u64,
    /// A session ends this long after login, however often it is refreshed.
    #[serde(default = "default_refresh_absolute")]
    pub refresh_absolute_ttl_secs: u64,
    /// Ed25519 only: a new signing key after this long.
    #[serde(default = "default_rotation")]
    pub signing_key_rotation_secs: u64,
    /// Ed25519 only: how long a replaced key still verifies; at least the token lifetime plus
    /// leeway, so no token in flight is cut short by a rotation.
    #[serde(default = "default_overlap")]
    pub signing_key_overlap_secs: u64,
    /// How long a verified API key or a live session is trusted without a store look-up.
    /// Revocations by this process evict at once; changes by other processes (the CLI) are
    /// picked up within `revocation_poll_ms`.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_secs: u64,
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: usize,
    /// How often the store's revocation epoch is polled.
    #[serde(default = "default_revocation_poll")]
    pub revocation_poll_ms: u64,
    /// Password hashes computed at once; 0 = half the CPUs (at least one).
    #[serde(default)]
    pub password_concurrency: usize,
    #[serde(default = "default_failures_user")]
    pub password_max_failures_per_user: u32,
    #[serde(default = "default_failures_source")]
    pub password_max_failures_per_source: u32,
    /// How long a user or source address stays locked out after too many failures.
    #[serde(default = "default_lockout")]
    pub password_lockout_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: default_issuer(),
            audience: default_audience(),
            algorithm: Default::default(),
            hs256_secret_file: None,
            access_token_ttl_secs: default_access_ttl(),
            leeway_secs: default_leeway(),
            refresh_idle_ttl_secs: default_refresh_idle(),
            refresh_absolute_ttl_secs: default_refresh_absolute(),
            signing_key_rotation_secs: default_rotation(),
            signing_key_overlap_secs: default_overlap(),
            cache_ttl_secs: default_cache_ttl(),
            cache_capacity: default_cache_capacity(),
            revocation_poll_ms: default_revocation_poll(),
            password_concurrency: 0,
            password_max_failures_per_user: default_failures_user(),
            password_max_failures_per_source: default_failures_source(),
            password_lockout_secs: default_lockout(),
        }
    }
}

fn default_issuer() -> String {
    "moat".to_owned()
}
fn default_audience() -> String {
    "moat".to_owned()
}
fn default_access_ttl() -> u64 {
    300
}
fn default_leeway() -> u64 {
    5
}
fn default_refresh_idle() -> u64 {
    24 * 3600
}
fn default_refresh_absolute() -> u64 {
    30 * 24 * 3600
}
fn default_rotation() -> u64 {
    7 * 24 * 3600
}
fn default_overlap() -> u64 {
    3600
}
fn default_cache_ttl() -> u64 {
    30
}
fn default_cache_capacity() -> usize {
    10_000
}
fn default_revocation_poll() -> u64 {
    500
}
fn default_failures_user() -> u32 {
    5
}
fn default_failures_source() -> u32 {
    20
}
fn default_lockout() -> u64 {
    900
}

impl AuthConfig {
    /// Checks bounds; the error is (key below `auth.`, reason).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        use crate::auth::jwt::{MAX_LEEWAY_SECS, MAX_LIFETIME_SECS};
        if self.issuer.is_empty() {
            return Err(("issuer", "must not be empty".into()));
        }
        if self.audience.is_empty() {
            return Err(("audience", "must not be empty".into()));
        }
        if !(30..=MAX_LIFETIME_SECS).contains(&self.access_token_ttl_secs) {
            return Err((
                "access_token_ttl_secs",
                format!("must be between 30 and {MAX_LIFETIME_SECS} (15 minutes)"),
            ));
        }
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(("leeway_secs", format!("must be at most {MAX_LEEWAY_SECS}")));
        }
        if self.refresh_idle_ttl_secs < 60 {
            return Err(("refresh_idle_ttl_secs", "must be at least 60".into()));
        }
        if self.refresh_absolute_ttl_secs < self.refresh_idle_ttl_secs {
            return Err((
                "refresh_absolute_ttl_secs",
                "must not be shorter than refresh_idle_ttl_secs".into(),
            ));
        }
        let min_overlap = self.access_token_ttl_secs + self.leeway_secs;
        if self.signing_key_overlap_secs < min_overlap {
            return Err((
                "signing_key_overlap_secs",
                format!(
                    "must be at least access_token_ttl_secs + leeway_secs ({min_overlap}) so a \
                     rotation never cuts a live token short"
                ),
            ));
        }
        if self.signing_key_rotation_secs < self.signing_key_overlap_secs {
            return Err((
                "signing_key_rotation_secs",
                "must not be shorter than signing_key_overlap_secs".into(),
            ));
        }
        if !(1..=300).contains(&self.cache_ttl_secs) {
            return Err(("cache_ttl_secs", "must be between 1 and 300".into()));
        }
        if self.cache_capacity == 0 {
            return Err(("cache_capacity", "must be at least 1".into()));
        }
        if !(50..=10_000).contains(&self.revocation_poll_ms) {
            return Err(("revocation_poll_ms", "must be between 50 and 10000".into()));
        }
        if self.password_max_failures_per_user == 0 {
            return Err((
                "password_max_failures_per_user",
                "must be at least 1".into(),
            ));
        }
        if self.password_max_failures_per_source == 0 {
            return Err((
                "password_max_failures_per_source",
                "must be at least 1".into(),
            ));
        }
        if self.hs256_secret_file.is_some()
            && self.algorithm != crate::auth::jwt::SigningAlgorithm::HS256
        {
            return Err((
                "hs256_secret_file",
                "only used with algorithm = \"HS256\"".into(),
            ));
        }
        Ok(())
    }
}

/// A destination rule: every address in `net`, on exactly `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestinationRule {
    pub net: IpNet,
    pub port: u16,
}

impl fmt::Display for DestinationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpNet::V4(n) => write!(f, "{n}:{}", self.port),
            IpNet::V6(n) => write!(f, "[{n}]:{}", self.port),
        }
    }
}

/// A pool after validation: its hosts resolved.
#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub provider: String,
    /// As written (`host:port`), in order, for the router and for logs.
    pub hosts: Vec<String>,
    /// Every address each host resolved to.
    pub addrs: Vec<SocketAddr>,
    /// The addresses of `hosts[i]`, so the upstream client never needs DNS at run time.
    pub host_addrs: Vec<Vec<SocketAddr>>,
    pub protect: bool,
    /// The credential injected upstream, read when the config loads.
    pub credential: Option<Secret>,
    /// Trusted CAs for `tls` (DER), from `tls_ca_file`; `None` means the webpki roots.
    pub tls_roots: Option<Vec<Vec<u8>>>,
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

/// A loaded, validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (absolute).
    pub path: PathBuf,
    /// The text it was parsed from (handed to the worker as is).
    pub source: String,
    pub raw: RawConfig,
    pub pools: BTreeMap<String, Pool>,
    pub data_dir: PathBuf,
    pub egress_allow: Vec<DestinationRule>,
    pub extra_protected: Vec<DestinationRule>,
    /// The inference-host guard, when `[segmentation.inference]` is present.
    pub inference: Option<InferenceGuard>,
    /// Everything the load read from outside the file's text (see [`Captured`]).
    pub captured: Captured,
}

/// What a config load read from outside its own text: the addresses of the host names, the
/// environment variables and the files it names. The supervisor loads from the system (as
/// root, before any lockdown) and hands the capture to the worker with the text; the worker
/// replays it — no DNS under egress lockdown, no root-only files, no environment needed, and
/// the same answers the supervisor got.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Captured {
    /// `host:port` entry → its addresses.
    pub hosts: BTreeMap<String, Vec<SocketAddr>>,
    /// Variable → its value (`None`: not set).
    pub env: BTreeMap<String, Option<String>>,
    /// Path → its contents (`None`: no such file).
    pub files: BTreeMap<PathBuf, Option<Vec<u8>>>,
}

/// Names only: environment values and file contents are credentials.
impl fmt::Debug for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Captured")
            .field("hosts", &self.hosts)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Captured {
    /// The contents of a file the load read, if it existed.
    pub fn file(&self, path: &Path) -> Option<&[u8]> {
        self.files.get(path)?.as_deref()
    }
}

/// Where a load reads what lies outside the config's text.
#[derive(Debug, Clone, Copy)]
pub enum Sources<'a> {
    /// DNS, the environment and the file system (at load time only; never per request).
    System,
    /// What an earlier load captured.
    Replay(&'a Captured),
    /// The system, but what cannot be read or resolved — host names, pool credentials, CA
    /// files — is left out instead of refused. For commands that only work on the store or
    /// the pins (`moat keys …`, `moat segment uninstall`), which must not need the daemon's
    /// environment or DNS.
    Lenient,
}

/// Reads through [`Sources`] and records every answer.
struct Reader<'a> {
    sources: Sources<'a>,
    captured: std::cell::RefCell<Captured>,
}

impl Reader<'_> {
    fn lenient(&self) -> bool {
        matches!(self.sources, Sources::Lenient)
    }

    fn host(&self, entry: &str) -> Result<Vec<SocketAddr>, String> {
        let addrs = match self.sources {
            Sources::System => resolve_host_port(entry)?,
            Sources::Lenient => {
                split_port(entry)?;
                resolve_host_port(entry).unwrap_or_default()
            }
            Sources::Replay(c) => match c.hosts.get(entry) {
                Some(addrs) => addrs.clone(),
                None => resolve_literal(entry)?,
            },
        };
        self.captured
            .borrow_mut()
            .hosts
            .insert(entry.to_owned(), addrs.clone());
        Ok(addrs)
    }

    fn env(&self, name: &str) -> Option<String> {
        let value = match self.sources {
            Sources::System | Sources::Lenient => std::env::var(name).ok(),
            Sources::Replay(c) => c.env.get(name).cloned().flatten(),
        };
        self.captured
            .borrow_mut()
            .env
            .insert(name.to_owned(), value.clone());
        value
    }

    /// `Ok(None)` when the file does not exist.
    fn file(&self, path: &Path) -> Result<Option<Vec<u8>>, String> {
        let bytes =
            match self.sources {
                Sources::System | Sources::Lenient => match std::fs::read(path) {
                    Ok(b) => Some(b),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
                },
                Sources::Replay(c) => c.files.get(path).cloned().ok_or_else(|| {
                    format!("{} was not read when the config loaded", path.display())
                })?,
            };
        self.captured
            .borrow_mut()
            .files
            .insert(path.to_path_buf(), bytes.clone());
        Ok(bytes)
    }

    fn required_file(&self, path: &Path) -> Result<Vec<u8>, String> {
        self.file(path)?
            .ok_or_else(|| format!("cannot read {}: no such file", path.display()))
    }
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
        let reader = Reader {
            sources,
            captured: Default::default(),
        };
        let mut resolve = |entry: &str| reader.host(entry);
        let err = |key: &str, reason: String| ConfigError {
            file: path.to_path_buf(),
            key: key.to_owned(),
            reason,
        };
        let de = toml::Deserializer::new(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            err(&key, e.into_inner().message().trim().to_owned())
        })?;

        let base = path.parent().unwrap_or(Path::new("/"));
        let data_dir = base.join(&raw.server.data_dir);

        let mut pools = BTreeMap::new();
        for (name, pool) in &raw.pools {
            let key = format!("pools.{name}.hosts");
            if pool.hosts.is_empty() {
                return Err(err(&key, "a pool needs at least one host".into()));
            }
            if pool.provider.is_empty() {
                return Err(err(
                    &format!("pools.{name}.provider"),
                    "must not be empty".into(),
                ));
            }
            let mut addrs = Vec::new();
            let mut host_addrs = Vec::new();
            for (i, host) in pool.hosts.iter().enumerate() {
                if pool.hosts[..i].contains(host) {
                    return Err(err(
                        &format!("{key}[{i}]"),
                        format!("`{host}` is listed twice"),
                    ));
                }
                let resolved = resolve(host).map_err(|r| err(&format!("{key}[{i}]"), r))?;
                addrs.extend(resolved.iter().copied());
                host_addrs.push(resolved);
            }
            let pkey = |k: &str| format!("pools.{name}.{k}");
            for (k, v) in [
                ("connect_timeout_ms", pool.connect_timeout_ms),
                ("first_byte_timeout_ms", pool.first_byte_timeout_ms),
                ("idle_timeout_ms", pool.idle_timeout_ms),
                ("health_interval_ms", pool.health_interval_ms),
                ("health_timeout_ms", pool.health_timeout_ms),
                ("eject_after_failures", pool.eject_after_failures.into()),
                ("eject_base_ms", pool.eject_base_ms),
                ("eject_max_ms", pool.eject_max_ms),
                ("max_attempts", pool.max_attempts.into()),
            ] {
                if v == 0 {
                    return Err(err(&pkey(k), "must be at least 1".into()));
                }
            }
            if pool.eject_max_ms < pool.eject_base_ms {
                return Err(err(
                    &pkey("eject_max_ms"),
                    "must not be below `eject_base_ms`".into(),
                ));
            }
            if !pool.health_path.starts_with('/') {
                return Err(err(&pkey("health_path"), "must start with `/`".into()));
            }
            let credential = (|| -> Result<Option<Secret>, ConfigError> {
                Ok(match (&pool.api_key_env, &pool.api_key_file) {
                    (Some(_), Some(_)) => {
                        return Err(err(
                            &pkey("api_key_file"),
                            "set either `api_key_env` or `api_key_file`, not both".into(),
                        ));
                    }
                    (Some(var), None) => match reader.env(var) {
                        Some(v) if !v.trim().is_empty() => Some(Secret(v.trim().to_owned())),
                        _ => {
                            return Err(err(
                                &pkey("api_key_env"),
                                format!("environment variable `{var}` is not set or empty"),
                            ));
                        }
                    },
                    (None, Some(file)) => {
                        let file = base.join(file);
                        let bytes = reader
                            .required_file(&file)
                            .map_err(|r| err(&pkey("api_key_file"), r))?;
                        let text = String::from_utf8_lossy(&bytes);
                        match text.lines().next().map(str::trim) {
                            Some(v) if !v.is_empty() => Some(Secret(v.to_owned())),
                            _ => {
                                return Err(err(
                                    &pkey("api_key_file"),
                                    format!("{} is empty", file.display()),
                                ));
                            }
                        }
                    }
                    (None, None) => None,
                })
            })();
            // A CLI command that only works on the store needs no upstream credential.
            let credential = match credential {
                Ok(c) => c,
                Err(_) if reader.lenient() => None,
                Err(e) => return Err(e),
            };
            if credential
                .as_ref()
                .is_some_and(|c| c.0.bytes().any(|b| b.is_ascii_control()))
            {
                return Err(err(
                    &pkey("api_key_env"),
                    "the credential contains control characters".into(),
                ));
            }
            let tls_roots = (|| -> Result<Option<Vec<Vec<u8>>>, ConfigError> {
                Ok(match &pool.tls_ca_file {
                    None => None,
                    Some(_) if !pool.tls => {
                        return Err(err(&pkey("tls_ca_file"), "only with `tls = true`".into()));
                    }
                    Some(file) => {
                        let file = base.join(file);
                        let pem = reader
                            .required_file(&file)
                            .map_err(|r| err(&pkey("tls_ca_file"), r))?;
                        Some(parse_ca_pem(&file, &pem).map_err(|r| err(&pkey("tls_ca_file"), r))?)
                    }
                })
            })();
            let tls_roots = match tls_roots {
                Ok(r) => r,
                Err(_) if reader.lenient() => None,
                Err(e) => return Err(e),
            };
            pools.insert(
                name.clone(),
                Pool {
                    name: name.clone(),
                    provider: pool.provider.clone(),
                    hosts: pool.hosts.clone(),
                    addrs,
                    host_addrs,
                    protect: pool.protect,
                    credential,
                    tls_roots,
                },
            );
        }
        for (name, model) in &raw.models {
            if !pools.contains_key(&model.pool) {
                return Err(err(
                    &format!("models.{name}.pool"),
                    format!("no pool named `{}` (known: {})", model.pool, known(&pools)),
                ));
            }
            for (k, v) in [
                ("max_messages", model.max_messages as u64),
                ("max_tokens", model.max_tokens),
                ("max_n", model.max_n),
                ("max_inputs", model.max_inputs as u64),
            ] {
                if v == 0 {
                    return Err(err(
                        &format!("models.{name}.{k}"),
                        "must be at least 1".into(),
                    ));
                }
            }
            if model.upstream_model.as_deref() == Some("") {
                return Err(err(
                    &format!("models.{name}.upstream_model"),
                    "must not be empty".into(),
                ));
            }
        }
        if raw.server.max_body_bytes == 0 {
            return Err(err("server.max_body_bytes", "must be at least 1".into()));
        }
        crate::dataplane::authz::check_config(&raw).map_err(|(k, r)| err(&k, r))?;
        if let Some(a) = raw.admin.listen {
            if !a.ip().is_loopback() {
                return Err(err(
                    "admin.listen",
                    format!("{a} is not a loopback address; the admin plane is local only"),
                ));
            }
            if a == raw.server.listen && a.port() != 0 {
                return Err(err(
                    "admin.listen",
                    "must differ from `server.listen`: the data plane has no admin route".into(),
                ));
            }
        }

        let seg = &raw.segmentation;
        let mut rules = |list: &[String], key: &str| -> Result<Vec<DestinationRule>, ConfigError> {
            let mut out = Vec::new();
            for (i, entry) in list.iter().enumerate() {
                let parsed = parse_destination(entry, &mut resolve);
                out.extend(parsed.map_err(|r| err(&format!("{key}[{i}]"), r))?);
            }
            Ok(out)
        };
        let egress_allow = rules(&seg.egress_allow, "segmentation.egress_allow")?;
        let extra_protected = rules(&seg.extra_protected, "segmentation.extra_protected")?;
        validate_cgroup_path(&seg.gateway_cgroup)
            .map_err(|r| err("segmentation.gateway_cgroup", r))?;
        if !seg.pin_root.is_absolute() {
            return Err(err(
                "segmentation.pin_root",
                "must be an absolute path on a bpffs".into(),
            ));
        }
        if raw.server.user.is_empty() {
            return Err(err("server.user", "must not be empty".into()));
        }
        let inference = match &seg.inference {
            Some(g) => Some(validate_guard(g).map_err(|(k, r)| err(&k, r))?),
            None => None,
        };

        raw.auth
            .validate()
            .map_err(|(k, r)| err(&format!("auth.{k}"), r))?;
        // Read now, so the worker gets it even when only root can read it, and so a short
        // secret is refused at load rather than by the worker later; a missing file is
        // created with 32 random bytes by the identity store on first start.
        if let Some(p) = &raw.auth.hs256_secret_file {
            let path = base.join(p);
            let secret = reader
                .file(&path)
                .map_err(|r| err("auth.hs256_secret_file", r))?;
            if let Some(secret) = secret.filter(|s| s.len() < 32) {
                return Err(err(
                    "auth.hs256_secret_file",
                    format!(
                        "{} holds {} bytes; an HS256 secret needs at least 32 bytes",
                        path.display(),
                        secret.len()
                    ),
                ));
            }
        }

        Ok(Config {
            path: path.to_path_buf(),
            source: text.to_owned(),
            raw,
            pools,
            data_dir,
            egress_allow,
            extra_protected,
            inference,
            captured: reader.captured.into_inner(),
        })
    }

    pub fn segmentation(&self) -> &SegmentationConfig {
        &self.raw.segmentation
    }

    pub fn auth(&self) -> &AuthConfig {
        &self.raw.auth
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

/// Checks `[segmentation.inference]`; errors carry the dotted key and the reason.
fn validate_guard(g: &InferenceGuardConfig) -> Result<InferenceGuard, (String, String)> {
    const KEY: &str = "segmentation.inference";
    let e = |k: &str, r: String| (format!("{KEY}.{k}"), r);
    if g.model_ports.is_empty() {
        return Err(e(
            "model_ports",
            "list at least one port (a guard without ports guards nothing)".into(),
        ));
    }
    let mut ports = Vec::new();
    for (i, &p) in g.model_ports.iter().enumerate() {
        if p == 0 {
            return Err(e(
                &format!("model_ports[{i}]"),
                "port 0 is not a port".into(),
            ));
        }
        if ports.contains(&p) {
            return Err(e(
                &format!("model_ports[{i}]"),
                format!("port {p} is listed twice"),
            ));
        }
        ports.push(p);
    }
    // One entry of the kernel's port map is the "guards something" marker.
    let max_ports = moat_common::guard::MAX_PORTS as usize - 1;
    if ports.len() > max_ports {
        return Err(e("model_ports", format!("at most {max_ports} ports")));
    }
    let mut allowed = Vec::new();
    for (i, entry) in g.allowed_gateways.iter().enumerate() {
        let net =
            parse_source_prefix(entry).map_err(|r| e(&format!("allowed_gateways[{i}]"), r))?;
        if !allowed.contains(&net) {
            allowed.push(net);
        }
    }
    if ports.len() * allowed.len() > moat_common::guard::MAX_SOURCES as usize {
        return Err(e(
            "allowed_gateways",
            format!(
                "ports × prefixes must stay within {}",
                moat_common::guard::MAX_SOURCES
            ),
        ));
    }
    let needs_interfaces = matches!(g.attach, GuardAttach::Tc | GuardAttach::Both);
    if needs_interfaces && g.interfaces.is_empty() {
        return Err(e(
            "interfaces",
            "attach = \"tc\" or \"both\" needs at least one interface".into(),
        ));
    }
    if !needs_interfaces && !g.interfaces.is_empty() {
        return Err(e(
            "interfaces",
            "interfaces are only used with attach = \"tc\" or \"both\"".into(),
        ));
    }
    let mut interfaces: Vec<String> = Vec::new();
    for (i, name) in g.interfaces.iter().enumerate() {
        // IFNAMSIZ is 16 with the NUL; a name is also a file name under the pin directory.
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', ' ', ':'])
            || name == "."
            || name == ".."
        {
            return Err(e(
                &format!("interfaces[{i}]"),
                format!("`{name}` is not an interface name"),
            ));
        }
        if interfaces.contains(name) {
            return Err(e(
                &format!("interfaces[{i}]"),
                format!("`{name}` is listed twice"),
            ));
        }
        interfaces.push(name.clone());
    }
    Ok(InferenceGuard {
        model_ports: ports,
        allowed,
        attach: g.attach,
        interfaces,
    })
}

/// A source prefix (`10.0.0.0/8`, `fd00::/64`) or a single address. IPv4-mapped IPv6
/// (`::ffff:10.0.0.1`) is the IPv4 host it maps, which is how the kernel side judges it.
pub fn parse_source_prefix(entry: &str) -> Result<IpNet, String> {
    let net: IpNet = if entry.contains('/') {
        entry
            .parse()
            .map_err(|_| format!("`{entry}` is not an address prefix"))?
    } else {
        IpNet::from(
            entry
                .parse::<IpAddr>()
                .map_err(|_| format!("`{entry}` is not an address or prefix (no host names)"))?,
        )
    };
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        if v6.prefix_len() < 96 {
            return Err(format!(
                "`{entry}` spans beyond the IPv4-mapped range (use a prefix of /96 or longer)"
            ));
        }
        return Ok(IpNet::V4(
            ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .expect("valid length")
                .trunc(),
        ));
    }
    Ok(net.trunc())
}

/// Parses a PEM bundle of CA certificates (DER out), refusing a file with none.
fn parse_ca_pem(path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        out.push(cert.to_vec());
    }
    if out.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(out)
}

fn known<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        "none".to_owned()
    } else {
        map.keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The cgroup path must stay below the cgroup2 mount: relative, no `..`, not empty.
fn validate_cgroup_path(p: &Path) -> Result<(), String> {
    use std::path::Component;
    if p.as_os_str().is_empty() {
        return Err("must not be empty".into());
    }
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            _ => {
                return Err("must be a relative path below the cgroup2 mount, without `..`".into());
            }
        }
    }
    Ok(())
}

/// Splits `host:port` / `[v6]:port` / `net/len:port` / `[net/len]:port` into host and port.
fn split_port(entry: &str) -> Result<(&str, u16), String> {
    let (host, port) = entry
        .rsplit_once(':')
        .ok_or_else(|| format!("`{entry}` has no port (expected host:port)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{port}` is not a port number"))?;
    if port == 0 {
        return Err("port 0 is not a destination".into());
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("`{entry}` has no host"));
    }
    Ok((host, port))
}

/// An `ip:port` / `[v6]:port` entry; names are an error here.
fn resolve_literal(entry: &str) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = split_port(entry)?;
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(vec![SocketAddr::new(ip, port)]),
        Err(_) => Err(format!("`{host}` was not resolved by the supervisor")),
    }
}

/// Resolves a pool host (`name:port`, `ip:port`, `[v6]:port`) to its socket addresses.
pub fn resolve_host_port(entry: &str) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = split_port(entry)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("`{host}` resolved to no address"));
    }
    Ok(addrs)
}

/// Parses a destination rule: `addr/len:port`, `[v6/len]:port`, `addr:port` or `host:port`.
pub fn parse_destination(
    entry: &str,
    resolve: &mut impl FnMut(&str) -> Result<Vec<SocketAddr>, String>,
) -> Result<Vec<DestinationRule>, String> {
    let (host, port) = split_port(entry)?;
    if host.contains('/') {
        let net: IpNet = host
            .parse()
            .map_err(|_| format!("`{host}` is not an address prefix"))?;
        return Ok(vec![DestinationRule {
            net: net.trunc(),
            port,
        }]);
    }
    Ok(resolve(entry)?
        .into_iter()
        .map(|a| DestinationRule {
            net: IpNet::from(a.ip()),
            port,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_str(Path::new("/etc/moat/test.toml"), text)
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = load("[segmentation]\nmode = \"enforce\"\nbogus = 1\n").unwrap_err();
        assert_eq!(e.file, Path::new("/etc/moat/test.toml"));
        assert_eq!(e.key, "segmentation.bogus");
        assert!(e.reason.contains("bogus"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = load("[pools.a]\nhosts = \"127.0.0.1:1\"\n").unwrap_err();
        assert_eq!(e.key, "pools.a.hosts", "{e}");
    }

    #[test]
    fn pools_and_models_resolve() {
        let c = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\", \"[::1]:8001\"]\n\
             [models.m]\npool = \"gpu\"\n",
        )
        .unwrap();
        let p = &c.pools["gpu"];
        assert_eq!(p.addrs.len(), 2);
        assert!(p.protect);
        assert_eq!(c.data_dir, Path::new("/var/lib/moat"));
    }

    #[test]
    fn model_with_unknown_pool_is_refused() {
        let e = load("[models.m]\npool = \"nope\"\n").unwrap_err();
        assert_eq!(e.key, "models.m.pool");
        assert!(e.reason.contains("nope"));
    }

    #[test]
    fn host_without_port_is_refused() {
        let e = load("[pools.gpu]\nhosts = [\"127.0.0.1\"]\n").unwrap_err();
        assert_eq!(e.key, "pools.gpu.hosts[0]");
    }

    fn parse_destination_sys(entry: &str) -> Result<Vec<DestinationRule>, String> {
        parse_destination(entry, &mut resolve_host_port)
    }

    #[test]
    fn lenient_loads_leave_out_what_only_the_data_plane_needs() {
        let text =
            "[pools.gpu]\nhosts = [\"10.0.0.1:8000\"]\napi_key_env = \"MOAT_TEST_UNSET_VAR\"\n";
        let e = load(text).unwrap_err();
        assert_eq!(e.key, "pools.gpu.api_key_env", "strict loads refuse it");
        let c = Config::parse(Path::new("/t.toml"), text, Sources::Lenient).unwrap();
        assert!(c.pools["gpu"].credential.is_none());
    }

    #[test]
    fn a_replay_gives_the_answers_of_an_earlier_load() {
        let text = "[pools.gpu]\nhosts = [\"localhost:8000\", \"10.0.0.1:8000\"]\n";
        let first = load(text).unwrap();
        assert!(first.captured.hosts.contains_key("localhost:8000"));
        let again = Config::parse(
            Path::new("/etc/moat/test.toml"),
            text,
            Sources::Replay(&first.captured),
        )
        .unwrap();
        assert_eq!(again.pools["gpu"].addrs, first.pools["gpu"].addrs);
        let empty = Captured::default();
        let e = Config::parse(Path::new("/t.toml"), text, Sources::Replay(&empty)).unwrap_err();
        assert_eq!(e.key, "pools.gpu.hosts[0]");
    }

    #[test]
    fn destination_rules_parse() {
        let r = parse_destination_sys("10.0.0.0/8:443").unwrap();
        assert_eq!(r[0].to_string(), "10.0.0.0/8:443");
        let r = parse_destination_sys("[2001:db8::/32]:443").unwrap();
        assert_eq!(r[0].to_string(), "[2001:db8::/32]:443");
        let r = parse_destination_sys("10.1.2.3:53").unwrap();
        assert_eq!(r[0].to_string(), "10.1.2.3/32:53");
        assert!(parse_destination_sys("10.0.0.0/33:1").is_err());
        assert!(parse_destination_sys("10.0.0.1:0").is_err());
    }

    #[test]
    fn cgroup_path_must_stay_below_the_mount() {
        let e = load("[segmentation]\ngateway_cgroup = \"../escape\"\n").unwrap_err();
        assert_eq!(e.key, "segmentation.gateway_cgroup");
        let e = load("[segmentation]\ngateway_cgroup = \"/abs\"\n").unwrap_err();
        assert_eq!(e.key, "segmentation.gateway_cgroup");
    }

    #[test]
    fn data_plane_defaults_and_limits() {
        let c = load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\n[models.m]\npool = \"gpu\"\n")
            .unwrap();
        let p = &c.raw.pools["gpu"];
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.health_path, "/v1/models");
        assert_eq!(c.raw.models["m"].max_n, 1);
        assert_eq!(c.raw.server.max_body_bytes, 1024 * 1024);
        assert!(c.pools["gpu"].credential.is_none());
        let e =
            load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\nidle_timeout_ms = 0\n").unwrap_err();
        assert_eq!(e.key, "pools.gpu.idle_timeout_ms");
        let e =
            load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\", \"127.0.0.1:8000\"]\n").unwrap_err();
        assert_eq!(e.key, "pools.gpu.hosts[1]");
        let e = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\napi_key_env = \"MOAT_TEST_SURELY_UNSET\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "pools.gpu.api_key_env");
        let e = load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\ntls_ca_file = \"ca.pem\"\n")
            .unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_ca_file");
    }

    #[test]
    fn credential_is_read_from_a_file_and_not_printed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), "sk-upstream\n").unwrap();
        let c = Config::from_str(
            &dir.path().join("moat.toml"),
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\napi_key_file = \"key\"\n",
        )
        .unwrap();
        let cred = c.pools["gpu"].credential.as_ref().unwrap();
        assert_eq!(cred.expose(), "sk-upstream");
        assert!(!format!("{c:?}").contains("sk-upstream"));
    }

    #[test]
    fn auth_defaults_and_bounds() {
        let c = load("").unwrap();
        assert_eq!(c.auth().access_token_ttl_secs, 300);
        assert_eq!(c.auth().leeway_secs, 5);
        let e = load("[auth]\naccess_token_ttl_secs = 901\n").unwrap_err();
        assert_eq!(e.key, "auth.access_token_ttl_secs");
        let e = load("[auth]\nleeway_secs = 31\n").unwrap_err();
        assert_eq!(e.key, "auth.leeway_secs");
        let e = load("[auth]\nrefresh_idle_ttl_secs = 7200\nrefresh_absolute_ttl_secs = 3600\n")
            .unwrap_err();
        assert_eq!(e.key, "auth.refresh_absolute_ttl_secs");
        let e = load("[auth]\nsigning_key_overlap_secs = 60\n").unwrap_err();
        assert_eq!(e.key, "auth.signing_key_overlap_secs");
        let e = load("[auth]\nalgorithm = \"RS256\"\n").unwrap_err();
        assert_eq!(e.key, "auth.algorithm");
        let e = load("[auth]\nhs256_secret_file = \"k\"\n").unwrap_err();
        assert_eq!(e.key, "auth.hs256_secret_file");
        let e = load("[auth]\nbogus = 1\n").unwrap_err();
        assert!(e.key.starts_with("auth"), "{e}");
        assert!(e.reason.contains("bogus"), "{e}");
        assert!(load("[auth]\nalgorithm = \"HS256\"\nhs256_secret_file = \"k\"\n").is_ok());
    }

    #[test]
    fn inference_guard_parses_and_defaults() {
        let c = load(
            "[segmentation.inference]\nmodel_ports = [8000, 8001]\n\
             allowed_gateways = [\"10.0.0.1\", \"10.9.0.0/16\", \"fd00::/64\", \"::ffff:10.1.1.1\"]\n",
        )
        .unwrap();
        let g = c.inference.as_ref().unwrap();
        assert_eq!(g.model_ports, [8000, 8001]);
        assert_eq!(g.attach, GuardAttach::CgroupSkb);
        let allowed: Vec<String> = g.allowed.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            allowed,
            ["10.0.0.1/32", "10.9.0.0/16", "fd00::/64", "10.1.1.1/32"]
        );
        assert!(
            !c.runs_gateway(),
            "an inference host without pools runs the guard only"
        );
        assert_eq!(c.raw.server.user, "moat");
        let both = load(
            "[pools.a]\nhosts = [\"127.0.0.1:1\"]\n[segmentation.inference]\nmodel_ports = [1]\n",
        )
        .unwrap();
        assert!(both.runs_gateway() && both.inference.is_some());
        assert!(load("").unwrap().runs_gateway());
    }

    #[test]
    fn inference_guard_errors_name_the_key() {
        let cases = [
            ("model_ports = []\n", "segmentation.inference.model_ports"),
            (
                "model_ports = [0]\n",
                "segmentation.inference.model_ports[0]",
            ),
            (
                "model_ports = [1, 1]\n",
                "segmentation.inference.model_ports[1]",
            ),
            (
                "model_ports = [1]\nallowed_gateways = [\"gw.example\"]\n",
                "segmentation.inference.allowed_gateways[0]",
            ),
            (
                "model_ports = [1]\nallowed_gateways = [\"10.0.0.0/33\"]\n",
                "segmentation.inference.allowed_gateways[0]",
            ),
            (
                "model_ports = [1]\nallowed_gateways = [\"::ffff:0.0.0.0/80\"]\n",
                "segmentation.inference.allowed_gateways[0]",
            ),
            (
                "model_ports = [1]\nattach = \"tc\"\n",
                "segmentation.inference.interfaces",
            ),
            (
                "model_ports = [1]\ninterfaces = [\"eth0\"]\n",
                "segmentation.inference.interfaces",
            ),
            (
                "model_ports = [1]\nattach = \"tc\"\ninterfaces = [\"../x\"]\n",
                "segmentation.inference.interfaces[0]",
            ),
            (
                "model_ports = [1]\nattach = \"xdp\"\n",
                "segmentation.inference.attach",
            ),
            (
                "model_ports = [1]\nbogus = 1\n",
                "segmentation.inference.bogus",
            ),
            (
                "model_ports = [70000]\n",
                "segmentation.inference.model_ports[0]",
            ),
        ];
        for (body, key) in cases {
            let e = load(&format!("[segmentation.inference]\n{body}")).unwrap_err();
            assert_eq!(e.key, key, "{body}: {e}");
            assert_eq!(e.file, Path::new("/etc/moat/test.toml"));
            assert!(!e.reason.is_empty());
        }
        let e = load("[server]\nuser = \"\"\n").unwrap_err();
        assert_eq!(e.key, "server.user");
    }

    #[test]
    fn relative_data_dir_is_taken_from_the_config_folder() {
        let c = load("[server]\ndata_dir = \"data\"\n").unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/moat/data"));
    }
}
