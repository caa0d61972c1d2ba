//! What one audit record says: the [`Event`] (what happened, who did it) and the envelope
//! the writer adds (sequence number, UTC time, the previous record's hash, the HMAC).
//!
//! An event names people and credentials by id only — user ids, key ids, session ids, token
//! `jti`s — never a prompt, an answer, a password, a key or a token: the types have no field
//! that could carry one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Something an auditor wants to know about. Serialized with `kind` as its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A credential was accepted on the data plane.
    AuthSuccess {
        /// `api_key`, `access_token`, `password`, `refresh_token`.
        method: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
    },
    /// A credential was refused, and why.
    AuthFailure {
        method: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sid: Option<String>,
        /// The client's address (password attempts are throttled by it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        source: Option<String>,
    },
    /// An authenticated caller lacked a permission.
    AuthzDenied {
        permission: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        /// `data` or `admin`.
        plane: String,
    },
    /// A quota refused a request.
    QuotaDenied {
        tenant: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        /// Which limit (`requests_per_minute`, `tokens_per_minute`, `concurrent`, …).
        limit: String,
    },
    /// A guardrail matched a request or an answer (the rule's name, never the text).
    GuardrailHit {
        rule: String,
        /// What the guardrail did: `block`, `redact`, `flag`.
        action: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    /// A spent refresh token came back: its session is revoked.
    RefreshReuse {
        sid: String,
    },
    /// A session ended before its time.
    SessionRevoked {
        sid: String,
        reason: String,
    },
    /// A change to keys, users, tenants or roles. `actor` is who did it: `cli:<unix user>`
    /// or `admin:<username>`.
    IdentityChange {
        actor: String,
        /// `tenant_added`, `user_added`, `password_set`, `user_roles_changed`,
        /// `user_disabled`, `key_created`, `key_revoked`, `key_narrowed`.
        action: String,
        /// What changed: a tenant name, a user id or name, a key id.
        target: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        roles: Vec<String>,
    },
    /// SIGHUP: the config digests before and after, and whether the new one took.
    ConfigReload {
        old_digest: String,
        new_digest: String,
        applied: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    DaemonStart {
        version: String,
        config_digest: String,
    },
    DaemonStop {},
    /// The worker died and is restarted.
    WorkerRestart {
        pid: u32,
        status: String,
        restart_in_ms: u64,
    },
    /// The kernel refused a connection (gateway side) or dropped a packet (inference guard).
    KernelDeny {
        /// `gateway` or `inference`.
        side: String,
        hook: String,
        /// The rest of the deny event (addresses, ports, reason), as strings.
        detail: BTreeMap<String, String>,
    },
    /// Deny events beyond the per-second rate, summed up (the kernel counters count them all).
    KernelDenySuppressed {
        side: String,
        suppressed: u64,
    },
}

impl Event {
    /// The tenant the record belongs to, for tenant-scoped reading (`GET /admin/audit`).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Event::AuthSuccess { tenant, .. }
            | Event::AuthzDenied { tenant, .. }
            | Event::GuardrailHit { tenant, .. }
            | Event::IdentityChange { tenant, .. } => tenant.as_deref(),
            Event::QuotaDenied { tenant, .. } => Some(tenant),
            _ => None,
        }
    }

    /// The `kind` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::AuthSuccess { .. } => "auth_success",
            Event::AuthFailure { .. } => "auth_failure",
            Event::AuthzDenied { .. } => "authz_denied",
            Event::QuotaDenied { .. } => "quota_denied",
            Event::GuardrailHit { .. } => "guardrail_hit",
            Event::RefreshReuse { .. } => "refresh_reuse",
            Event::SessionRevoked { .. } => "session_revoked",
            Event::IdentityChange { .. } => "identity_change",
            Event::ConfigReload { .. } => "config_reload",
            Event::DaemonStart { .. } => "daemon_start",
            Event::DaemonStop { .. } => "daemon_stop",
            Event::WorkerRestart { .. } => "worker_restart",
            Event::KernelDeny { .. } => "kernel_deny",
            Event::KernelDenySuppressed { .. } => "kernel_deny_suppressed",
        }
    }
}

/// Which process wrote the event: the worker's events arrive through the supervisor, which
/// marks them, so a compromised worker cannot pass its events off as the supervisor's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Supervisor,
    Worker,
    Cli,
    /// `moat serve` as one unprivileged process.
    Standalone,
}

/// One line of the log as parsed back (the HMAC is checked on the raw line, see `chain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    /// Hex SHA-256 of the previous line (all zeros for the first record of a log).
    pub prev: String,
    pub source: Source,
    pub event: Event,
}

/// The record's JSON text without its HMAC. `serde_json` escapes C0 controls; this also
/// escapes DEL, the C1 controls and the Unicode line separators, so no field can start a new
/// line or move a terminal's cursor when an auditor `cat`s the file. (These characters can only
/// occur inside JSON strings, where `\uXXXX` is the same character.)
pub fn body(record: &Record) -> String {
    let raw = serde_json::to_string(record).expect("records serialize");
    escape_controls(&raw)
}

pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) || c == '\u{2028}' || c == '\u{2029}'
        {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Now, as the records write it.
pub fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_round_trip() {
        let r = Record {
            seq: 1,
            ts: now_rfc3339(),
            prev: "0".repeat(64),
            source: Source::Worker,
            event: Event::AuthFailure {
                method: "api_key".into(),
                reason: "bad\nsecret\u{1b}[2J\u{7f}\u{85}\u{2028}".into(),
                user_id: None,
                key_id: Some("k\r1".into()),
                sid: None,
                source: None,
            },
        };
        let line = body(&r);
        assert!(
            line.chars().all(|c| !c.is_control() && c != '\u{2028}'),
            "{line:?}"
        );
        assert!(line.contains("\\u001b") && line.contains("\\u007f") && line.contains("\\u0085"));
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }
}
