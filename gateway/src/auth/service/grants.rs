//! The token endpoint's side of [`Identity`]: the `api_key`, `password` and `refresh_token`
//! grants (sessions are refresh-token families, access tokens short-lived JWTs) and RFC 7009
//! revocation. No token, password or key is ever logged: sessions appear by id.

use std::net::IpAddr;

use serde::Serialize;
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::{AuthError, Identity};
use crate::{
    auth::{jwt::AccessClaims, now, password::Refusal, refresh, secrets::random_base62},
    store::{NewFamily, NewRefreshToken, RotateOutcome},
};

/// What the token endpoint answers.
#[derive(Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub refresh_token: Zeroizing<String>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

impl Identity {
    fn issue_access(&self, user_id: &str, tenant: &str, sid: &str) -> String {
        let t = now();
        self.keys.current().sign(&AccessClaims {
            iss: self.params.issuer.clone(),
            aud: self.params.audience.clone(),
            sub: user_id.to_owned(),
            tenant: tenant.to_owned(),
            sid: sid.to_owned(),
            jti: random_base62(22),
            iat: t,
            nbf: t,
            exp: t + self.access_ttl as i64,
        })
    }

    fn response(&self, access_token: String, refresh_token: Zeroizing<String>) -> TokenResponse {
        TokenResponse {
            access_token,
            token_type: "Bearer",
            expires_in: self.access_ttl,
            refresh_token,
        }
    }

    /// Opens a session (refresh family) and returns its first tokens.
    async fn open_session(
        &self,
        user_id: &str,
        tenant: &str,
        key_id: Option<&str>,
    ) -> Result<TokenResponse, AuthError> {
        let t = now();
        let sid = random_base62(22);
        let rt = refresh::mint();
        let hash = refresh::hash(&self.pepper, &rt);
        let (fid, uid, kid) = (sid.clone(), user_id.to_owned(), key_id.map(str::to_owned));
        let (abs, idle) = (t + self.refresh_absolute, t + self.refresh_idle);
        self.db(move |s| {
            s.create_family(
                &NewFamily {
                    id: &fid,
                    user_id: &uid,
                    key_id: kid.as_deref(),
                    now: t,
                    absolute_expires_at: abs,
                },
                &NewRefreshToken {
                    token_hmac: &hash,
                    idle_expires_at: idle,
                },
            )
        })
        .await?;
        match key_id {
            Some(key_id) => info!(event = "session_opened", user_id, sid = %sid, key_id),
            None => info!(event = "session_opened", user_id, sid = %sid),
        }
        crate::audit::emit(crate::audit::Event::AuthSuccess {
            method: if key_id.is_some() {
                "api_key_grant"
            } else {
                "password"
            }
            .to_owned(),
            user_id: Some(user_id.to_owned()),
            key_id: key_id.map(str::to_owned),
            sid: Some(sid.clone()),
            tenant: Some(tenant.to_owned()),
        });
        Ok(self.response(self.issue_access(user_id, tenant, &sid), rt))
    }

    /// `grant_type=api_key`.
    pub async fn grant_api_key(&self, key: &str) -> Result<TokenResponse, AuthError> {
        let p = self.verify_api_key(key).await?;
        self.open_session(&p.user_id, &p.tenant, p.key_id.as_deref())
            .await
    }

    /// The client address of a token request from `peer` (for the per-source throttle): the
    /// peer, or the client a trusted proxy names (`auth.trusted_proxies`).
    pub fn client_address(&self, peer: IpAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        self.proxies.client(peer, headers)
    }

    /// `grant_type=password`.
    pub async fn grant_password(
        &self,
        username: &str,
        password: Zeroizing<String>,
        source: IpAddr,
    ) -> Result<TokenResponse, AuthError> {
        let user = if username.is_empty() || username.len() > 128 {
            None
        } else {
            let name = username.to_owned();
            self.db(move |s| s.user_by_name(&name)).await?
        };
        let stored = user
            .as_ref()
            .filter(|u| u.disabled_at.is_none())
            .and_then(|u| u.password_hash.clone());
        match self
            .passwords
            .check(username, source, password, stored)
            .await
        {
            Ok(()) => {}
            Err(Refusal::Invalid) => {
                info!(event = "auth_failed", method = "password", user_id = user.as_ref().map_or("", |u| u.id.as_str()), source = %source);
                crate::audit::emit(crate::audit::Event::AuthFailure {
                    method: "password".into(),
                    reason: "invalid credentials".into(),
                    user_id: user.as_ref().map(|u| u.id.clone()),
                    key_id: None,
                    sid: None,
                    source: Some(source.to_string()),
                });
                return Err(AuthError::InvalidGrant);
            }
            Err(Refusal::Throttled(s)) => {
                info!(event = "auth_throttled", method = "password", source = %source);
                crate::audit::emit(crate::audit::Event::AuthFailure {
                    method: "password".into(),
                    reason: "throttled".into(),
                    user_id: None,
                    key_id: None,
                    sid: None,
                    source: Some(source.to_string()),
                });
                return Err(AuthError::Throttled(s));
            }
            Err(Refusal::Busy(s)) => return Err(AuthError::Busy(s)),
        }
        let user = user.expect("a password matched, so the user exists");
        self.open_session(&user.id, &user.tenant, None).await
    }

    /// `grant_type=refresh_token`: single use, rotated; a spent token revokes its family.
    ///
    /// Of concurrent refreshes with one token exactly one rotates it. Within
    /// `auth.refresh_reuse_grace_secs` of that, the same token presented again gets the same
    /// successor (derived from the token, see `auth::refresh`) with a fresh access token, as
    /// long as the successor itself is unspent; a spent token after the grace, or one whose
    /// successor was already rotated, is a replay and ends the session (the newest tokens
    /// included).
    pub async fn grant_refresh(&self, token: &str) -> Result<TokenResponse, AuthError> {
        if !refresh::is_well_formed(token) {
            return Err(AuthError::InvalidGrant);
        }
        let presented = refresh::hash(&self.pepper, token);
        let next = refresh::successor(&self.pepper, token);
        let next_hash = refresh::hash(&self.pepper, &next);
        let idle = now() + self.refresh_idle;
        let grace = self.refresh_grace;
        let outcome = self
            .db(move |s| {
                s.rotate_refresh(
                    &presented,
                    &NewRefreshToken {
                        token_hmac: &next_hash,
                        idle_expires_at: idle,
                    },
                    now(),
                    grace,
                )
            })
            .await?;
        let session = match outcome {
            RotateOutcome::Rotated { session } => session,
            RotateOutcome::Regranted { session } => {
                info!(event = "refresh_regranted", sid = %session.family_id, "a just-rotated refresh token came back within the grace; same successor");
                session
            }
            RotateOutcome::Unknown => {
                info!(
                    event = "auth_failed",
                    method = "refresh_token",
                    reason = "unknown token"
                );
                Self::audit_failure("refresh_token", "unknown token", None, None);
                return Err(AuthError::InvalidGrant);
            }
            RotateOutcome::Dead { family_id } => {
                info!(event = "auth_failed", method = "refresh_token", sid = %family_id, reason = "session ended or token expired");
                Self::audit_failure(
                    "refresh_token",
                    "session ended or token expired",
                    None,
                    Some(&family_id),
                );
                return Err(AuthError::InvalidGrant);
            }
            RotateOutcome::Reused { family_id } => {
                self.evict_session(&family_id);
                warn!(event = "refresh_reuse_detected", sid = %family_id, "a spent refresh token was presented again; the session is revoked");
                crate::audit::emit(crate::audit::Event::RefreshReuse {
                    sid: family_id.clone(),
                });
                crate::audit::emit(crate::audit::Event::SessionRevoked {
                    sid: family_id.clone(),
                    reason: "refresh_token_reuse".into(),
                });
                return Err(AuthError::InvalidGrant);
            }
        };
        let access = self.issue_access(&session.user_id, &session.tenant, &session.family_id);
        crate::audit::emit(crate::audit::Event::AuthSuccess {
            method: "refresh_token".into(),
            user_id: Some(session.user_id.clone()),
            key_id: None,
            sid: Some(session.family_id.clone()),
            tenant: Some(session.tenant.clone()),
        });
        Ok(self.response(access, next))
    }

    /// Revokes the session a refresh token or an access token belongs to. Unknown or invalid
    /// tokens are ignored (RFC 7009): the answer tells a caller nothing.
    pub async fn revoke(&self, token: &str) -> Result<(), AuthError> {
        let sid = if refresh::is_well_formed(token) {
            let h = refresh::hash(&self.pepper, token);
            self.db(move |s| s.family_of_refresh(&h)).await?
        } else if token.bytes().filter(|&b| b == b'.').count() == 2 {
            self.keys
                .current()
                .verify(token, &self.params, now())
                .ok()
                .map(|c| c.sid)
        } else {
            None
        };
        let Some(sid) = sid else {
            return Ok(());
        };
        let id = sid.clone();
        let revoked = self
            .db(move |s| s.revoke_family(&id, "revoked_by_client", now()))
            .await?;
        self.evict_session(&sid);
        if revoked {
            info!(event = "session_revoked", sid = %sid);
            crate::audit::emit(crate::audit::Event::SessionRevoked {
                sid: sid.clone(),
                reason: "revoked_by_client".into(),
            });
        }
        Ok(())
    }
}
