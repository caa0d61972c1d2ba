//! The file as written: the serde structs every table is read into, and their defaults.
//!
//! Every table refuses keys it does not know. Tables whose keys are all optional read missing
//! keys from their `Default` impl; the others name a `default_*` function per key. Nothing here
//! checks values: that is [`super::validate`]'s job.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// The file as written; every table may be left out.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub server: ServerConfig,
    pub pools: BTreeMap<String, PoolConfig>,
    pub models: BTreeMap<String, ModelConfig>,
    pub segmentation: SegmentationConfig,
    pub auth: AuthConfig,
    /// Named sets of permissions (`authz`).
    pub roles: BTreeMap<String, RoleConfig>,
    /// Tenancy policy by tenant name (tenants themselves live in the store).
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Default quotas, for tenants without their own.
    pub quotas: QuotasConfig,
    pub admin: AdminConfig,
    pub audit: AuditConfig,
    pub guardrails: GuardrailsConfig,
    /// Where identity lives: the embedded SQLite file or a shared PostgreSQL.
    pub store: StoreConfig,
}

/// `[store]`: the identity store's engine.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `postgres://user@host:port/db` (with `kind = "postgres"`); never a password.
    /// `?sslmode=require` speaks TLS and verifies the server's certificate.
    pub url: Option<String>,
    /// PEM CAs that sign the PostgreSQL server's certificate (with `sslmode=require`;
    /// default: the webpki roots). Relative to the config's folder.
    pub ca_file: Option<PathBuf>,
    /// File holding the database password (first line; relative to the config's folder).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the database password instead.
    pub password_env: Option<String>,
    /// Connections per replica (PostgreSQL).
    pub pool_size: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One SQLite file in the data directory: one gateway host.
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by every replica.
    Postgres,
}

/// `[server]`: the data plane's listener and the worker's user and data. A key left out takes
/// its value from [`ServerConfig::default`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data-plane listener.
    pub listen: SocketAddr,
    /// Directory for the store and secrets; relative paths are taken from the config's folder.
    pub data_dir: PathBuf,
    /// The unprivileged user the worker runs as.
    pub user: String,
    /// Largest request body the data plane reads; larger ones get 413 before any parsing.
    pub max_body_bytes: usize,
    /// A request's head must arrive within this, and a kept-alive connection is closed after
    /// this long without a new request (a client that trickles its headers cannot hold a
    /// connection open).
    pub header_timeout_ms: u64,
    /// A request's whole body must arrive within this after its head (408 otherwise).
    pub body_timeout_ms: u64,
    /// A connection whose client reads nothing of its answer for this long is closed (and
    /// the upstream request behind it cancelled).
    pub send_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("/var/lib/moat"),
            user: "moat".to_owned(),
            max_body_bytes: 1024 * 1024,
            header_timeout_ms: 30_000,
            body_timeout_ms: 60_000,
            send_timeout_ms: 60_000,
        }
    }
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
    #[serde(default = "default_true")]
    pub protect: bool,
    /// Speak TLS (rustls) to the hosts; the server name is the host as written.
    #[serde(default)]
    pub tls: bool,
    /// PEM bundle of the CAs that may sign the hosts' certificates (with `tls`); without it,
    /// the webpki roots are trusted.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate (leaf first, then any intermediates) the gateway presents to the hosts
    /// (mutual TLS; with `tls` and `tls_client_key_file`). Reloaded on SIGHUP.
    #[serde(default)]
    pub tls_client_cert_file: Option<PathBuf>,
    /// The private key of that certificate (PEM: PKCS#8, PKCS#1 or SEC1). A secret file: it
    /// must not be readable by group or others. Reloaded on SIGHUP.
    #[serde(default)]
    pub tls_client_key_file: Option<PathBuf>,
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
    /// Who may share the hosts' KV prefix cache (vLLM's `cache_salt`): `tenant` (default),
    /// `user`, or `off` (no `cache_salt` is sent; for servers that do not know the field).
    #[serde(default = "default_prefix_cache_isolation")]
    pub prefix_cache_isolation: String,
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
fn default_prefix_cache_isolation() -> String {
    "tenant".to_owned()
}

fn default_provider() -> String {
    "local".to_owned()
}

fn default_true() -> bool {
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
    /// Most inputs in an embeddings `input` or a completions `prompt` array (strings or
    /// token-id arrays; a flat array of token ids is one input).
    #[serde(default = "default_max_inputs")]
    pub max_inputs: usize,
    /// Most entries in a chat request's `tools` (or `functions`).
    #[serde(default = "default_max_tools")]
    pub max_tools: usize,
    /// Dedicated tenant → its own pool for this model. A dedicated tenant is served from here
    /// and nowhere else; without an entry the model does not exist for it.
    #[serde(default)]
    pub tenant_pools: BTreeMap<String, String>,
}

/// The admin plane's listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// A loopback address (never the data plane's); absent: no admin plane (the CLI still
    /// works on the store).
    pub listen: Option<SocketAddr>,
}

/// `[audit]`: the audit trail (see docs/operations.md, Audit log).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The log's directory (root's, 0750); relative to the config's folder. Default:
    /// `audit` in the data directory.
    pub dir: Option<PathBuf>,
    /// The current file is rotated once it reaches this size.
    pub max_file_bytes: u64,
    /// Also send each record to syslog (`LOG_AUTHPRIV`; journald picks it up).
    pub syslog: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_file_bytes: 64 * 1024 * 1024,
            syslog: false,
        }
    }
}

/// A role: a named set of permissions (see [`crate::policy_grammar::Permission`] for the grammar).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub permissions: Vec<String>,
}

/// How a tenant is kept apart, and its quotas.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Served only by pools `dedicated_to` it; never falls back to a shared pool.
    pub dedicated: bool,
    /// Never routed to a pool marked `external`.
    pub local_only: bool,
    /// The whole tenant's quota (default: `quotas.tenant`).
    pub quota: Option<Quota>,
    /// Each key's (or session's) quota in this tenant (default: `quotas.key`).
    pub key_quota: Option<Quota>,
}

/// Defaults for tenants that set none.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Where the counters live: this replica's memory, or Redis shared by every replica.
    pub backend: QuotaBackendKind,
    /// `redis://[user@]host:port/` (with `backend = "redis"`); never a password.
    pub redis_url: Option<String>,
    /// File holding the Redis password (`requirepass` or the ACL user's; first line).
    pub redis_password_file: Option<PathBuf>,
    /// Environment variable holding the Redis password instead.
    pub redis_password_env: Option<String>,
    /// What a request gets while Redis is unreachable.
    pub on_backend_error: OnBackendError,
    /// How long a concurrency slot outlives its replica (seconds, default 30, 3 to 3600): the
    /// holder renews its leases every third of this, so a replica that dies frees its slots
    /// this long after its last renewal.
    pub redis_lease_secs: Option<u64>,
    pub tenant: Quota,
    pub key: Quota,
}

/// The Redis lease length when `redis_lease_secs` is not set.
pub const DEFAULT_REDIS_LEASE_SECS: u64 = 30;

impl QuotasConfig {
    pub fn redis_lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.redis_lease_secs.unwrap_or(DEFAULT_REDIS_LEASE_SECS))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaBackendKind {
    #[default]
    Memory,
    Redis,
}

/// The posture while the shared quota counters are unreachable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    /// 503 with `Retry-After` for every request a quota applies to.
    #[default]
    Deny,
    /// Count on this replica alone (each replica admits up to the limit), logged loudly.
    Local,
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
fn default_max_tools() -> usize {
    128
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

/// `[segmentation]`: the kernel side. A key left out takes its value from
/// [`SegmentationConfig::default`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentationConfig {
    pub mode: SegmentationMode,
    /// The gateway's cgroup, relative to the cgroup2 mount. Created by the daemon.
    pub gateway_cgroup: PathBuf,
    /// bpffs folder for moat's pins; the schema version is appended (`…/v1`).
    pub pin_root: PathBuf,
    /// Destinations beyond the pools the gateway itself may reach (`addr[/prefix]:port` or
    /// `host:port`). Empty means pools only.
    pub egress_allow: Vec<String>,
    /// Refuse the gateway cgroup everything but its pools and `egress_allow`.
    pub egress_lockdown: bool,
    /// Destinations to protect beyond the pools (`addr[/prefix]:port` or `host:port`).
    pub extra_protected: Vec<String>,
    /// Inference-host mode: the ingress guard in front of the model ports.
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

impl Default for SegmentationConfig {
    fn default() -> Self {
        Self {
            mode: SegmentationMode::default(),
            gateway_cgroup: PathBuf::from("moat.gateway"),
            pin_root: PathBuf::from("/sys/fs/bpf/moat"),
            egress_allow: Vec::new(),
            egress_lockdown: true,
            extra_protected: Vec::new(),
            inference: None,
        }
    }
}

/// `[auth]`: token lifetimes, signing, caches and password throttling. Every duration is in
/// seconds. A key left out takes its value from [`AuthConfig::default`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `iss` of the access tokens moat issues (and the only one it accepts).
    pub issuer: String,
    /// `aud` of the access tokens moat issues (and the only one it accepts).
    pub audience: String,
    /// `EdDSA` (Ed25519, default; keys generated and rotated in the data directory) or `HS256`.
    pub algorithm: SigningAlgorithm,
    /// HS256 only: file holding the secret (≥ 32 bytes); created with 32 random bytes if
    /// missing. Default: `<data_dir>/secrets/jwt-hs256.key`.
    pub hs256_secret_file: Option<PathBuf>,
    pub access_token_ttl_secs: u64,
    /// Clock-skew allowance on `exp`/`nbf`/`iat`.
    pub leeway_secs: u64,
    /// A refresh token unused this long expires.
    pub refresh_idle_ttl_secs: u64,
    /// A session ends this long after login, however often it is refreshed.
    pub refresh_absolute_ttl_secs: u64,
    /// How long a just-rotated refresh token may be presented again and get the same
    /// successor (concurrent refreshes of one client); after it, a spent token revokes its
    /// session. 0: no grace. At most 60.
    pub refresh_reuse_grace_secs: u64,
    /// Ed25519 only: a new signing key after this long.
    pub signing_key_rotation_secs: u64,
    /// Ed25519 only: how long a replaced key still verifies; at least the token lifetime plus
    /// leeway, so no token in flight is cut short by a rotation.
    pub signing_key_overlap_secs: u64,
    /// How long a verified API key or a live session is trusted without a store look-up.
    /// Revocations by this process evict at once; changes by other processes (the CLI) are
    /// picked up within `revocation_poll_ms`.
    pub cache_ttl_secs: u64,
    pub cache_capacity: usize,
    /// How often the store's revocation epoch is polled.
    pub revocation_poll_ms: u64,
    /// Password hashes computed at once; 0 = half the CPUs (at least one).
    pub password_concurrency: usize,
    pub password_max_failures_per_user: u32,
    pub password_max_failures_per_source: u32,
    /// How long a user or source address stays locked out after too many failures.
    pub password_lockout_secs: u64,
    /// Proxies (CIDRs or addresses) whose `Forwarded` / `X-Forwarded-For` name the client for
    /// the per-source password throttle. Empty (default): the peer address is the source and
    /// the headers are never read.
    pub trusted_proxies: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "moat".to_owned(),
            audience: "moat".to_owned(),
            algorithm: Default::default(),
            hs256_secret_file: None,
            access_token_ttl_secs: 300,
            leeway_secs: 5,
            refresh_idle_ttl_secs: 24 * 3600,
            refresh_absolute_ttl_secs: 30 * 24 * 3600,
            refresh_reuse_grace_secs: 5,
            signing_key_rotation_secs: 7 * 24 * 3600,
            signing_key_overlap_secs: 3600,
            cache_ttl_secs: 30,
            cache_capacity: 10_000,
            revocation_poll_ms: 500,
            password_concurrency: 0,
            password_max_failures_per_user: 5,
            password_max_failures_per_source: 20,
            password_lockout_secs: 900,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Hard ceiling on an access token's lifetime, whatever the config says.
pub const MAX_LIFETIME_SECS: u64 = 15 * 60;
/// Hard ceiling on clock-skew leeway.
pub const MAX_LEEWAY_SECS: u64 = 30;

/// Which algorithm signs new tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum SigningAlgorithm {
    #[default]
    EdDSA,
    HS256,
}

/// `[guardrails]`: prompt screening and answer filtering (see `crate::guardrails` and
/// docs/guardrails.md). Off unless `enabled`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardrailsConfig {
    pub enabled: bool,
    /// Use the rule set shipped with moat (`guardrails::rules::VERSION`).
    pub shipped_rules: bool,
    /// Invisible characters in a caller's text: `strip` (removed before the rules, reported as
    /// `smuggling.invisible`) or `refuse` (the request is blocked).
    pub invisible: String,
    /// Base64 and hex runs at least this long are decoded for the rules (0: none).
    pub decode_min_len: usize,
    /// Bytes of a streamed answer held back until the filter has passed them.
    pub hold_back_bytes: usize,
    /// The defaults; `tenants`, `roles` and `models` override them key by key.
    pub policy: GuardrailPolicyConfig,
    pub tenants: BTreeMap<String, GuardrailPolicyConfig>,
    pub roles: BTreeMap<String, GuardrailPolicyConfig>,
    pub models: BTreeMap<String, GuardrailPolicyConfig>,
    /// The operator's own rules.
    pub rules: Vec<GuardrailRuleConfig>,
    /// Model-based screening, for policies with `classifier = true`.
    pub classifier: Option<ClassifierConfig>,
}

impl Default for GuardrailsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            shipped_rules: true,
            invisible: "strip".into(),
            decode_min_len: 24,
            hold_back_bytes: 256,
            policy: GuardrailPolicyConfig::default(),
            tenants: BTreeMap::new(),
            roles: BTreeMap::new(),
            models: BTreeMap::new(),
            rules: Vec::new(),
            classifier: None,
        }
    }
}

/// A guardrail policy; every key may be left out (it then comes from the level below:
/// built-in defaults, `[guardrails.policy]`, the model's, the tenant's, the roles').
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardrailPolicyConfig {
    /// `block`, `flag` or `off`, for user, system and assistant content.
    pub input: Option<String>,
    /// The same for `tool`/`function` messages and tool-call arguments.
    pub tool_input: Option<String>,
    /// Score (sum of the weights of the rules hit) at which `input` acts.
    pub threshold: Option<f32>,
    /// Score at which `tool_input` acts.
    pub tool_threshold: Option<f32>,
    /// `allow` or `refuse` `system`/`developer` messages from callers.
    pub system_messages: Option<String>,
    /// A system message the gateway puts first in every chat request.
    pub system_prompt: Option<String>,
    /// Put a per-request canary in the system prompt; an answer that repeats it is cut.
    pub canary: Option<bool>,
    /// `redact`, `block` or `off` for every secret class.
    pub secrets: Option<String>,
    /// The PII classes screened: `email`, `phone`, `card`, `iban`.
    pub pii: Option<Vec<String>>,
    /// `redact` or `block` for the PII classes screened.
    pub pii_action: Option<String>,
    /// `redact`, `block` or `off` for markdown links and images to hosts off `link_allowlist`.
    pub links: Option<String>,
    pub link_allowlist: Option<Vec<String>>,
    /// Per-class actions, over the keys above (`jwt = "block"`).
    pub classes: Option<BTreeMap<String, String>>,
    /// Also ask the classifier (`[guardrails.classifier]`).
    pub classifier: Option<bool>,
}

/// An operator rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardrailRuleConfig {
    pub id: String,
    /// A regex in the `regex` crate's syntax (linear time: no look-around, no
    /// back-references), matched case-insensitive against the normalised text.
    pub pattern: String,
    #[serde(default = "default_rule_weight")]
    pub weight: f32,
}

fn default_rule_weight() -> f32 {
    1.0
}

/// `[guardrails.classifier]`: a prompt-guard or moderation model served through the pools.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// A model of `[models]`; it is called on `/v1/chat/completions` with the text to judge as
    /// the user message, and its answer's first word is the verdict.
    pub model: String,
    #[serde(default = "default_classifier_timeout")]
    pub timeout_ms: u64,
    /// `block` (default) or `allow` when the classifier fails or times out.
    #[serde(default = "default_on_error")]
    pub on_error: String,
    /// Answers (first word, case-insensitive) that mean "injection".
    #[serde(default = "default_unsafe_labels")]
    pub unsafe_labels: Vec<String>,
}

fn default_classifier_timeout() -> u64 {
    2000
}
fn default_on_error() -> String {
    "block".into()
}
fn default_unsafe_labels() -> Vec<String> {
    ["unsafe", "injection", "jailbreak"]
        .map(String::from)
        .to_vec()
}
