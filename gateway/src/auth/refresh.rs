//! Refresh tokens: opaque, `moat_rt_` followed by 43 base62 characters (≈256 bits). Stored
//! only as HMAC-SHA256 under the pepper; single use (see
//! [`crate::store::Store::rotate_refresh`]). The prefix lets the bearer check refuse a refresh
//! token presented as a credential and makes a leaked one recognisable.
//!
//! A session's first token comes from the OS CSPRNG; each later one is derived from the token
//! it replaces ([`successor`]: HMAC under the pepper). So a just-rotated token presented again
//! within `auth.refresh_reuse_grace_secs` (two refreshes of one client racing) can be answered
//! with the very same successor without storing any token in plaintext: only its holder and
//! the server can compute it, and the store still holds hashes only.

use zeroize::Zeroizing;

use super::secrets::{BASE62, Pepper, random_base62};

pub const PREFIX: &str = "moat_rt_";
const BODY_LEN: usize = 43;
pub const TOKEN_LEN: usize = PREFIX.len() + BODY_LEN;
const HMAC_DOMAIN: &str = "moat refresh token v1";
const SUCCESSOR_DOMAIN: &str = "moat refresh successor v1";

pub fn mint() -> Zeroizing<String> {
    Zeroizing::new(format!("{PREFIX}{}", random_base62(BODY_LEN)))
}

/// The token that replaces `presented` when it is rotated: always the same for the same token,
/// unpredictable without the pepper, and as uniform as a minted one (rejection sampling over
/// an HMAC stream).
pub fn successor(pepper: &Pepper, presented: &str) -> Zeroizing<String> {
    let mut body = String::with_capacity(BODY_LEN);
    let mut block = 0u64;
    while body.len() < BODY_LEN {
        let bytes = pepper.mac(
            SUCCESSOR_DOMAIN,
            &[presented.as_bytes(), &block.to_be_bytes()],
        );
        for b in bytes {
            if b < 248 && body.len() < BODY_LEN {
                body.push(BASE62[(b % 62) as usize] as char);
            }
        }
        block += 1;
    }
    Zeroizing::new(format!("{PREFIX}{body}"))
}

/// Whether `token` has a refresh token's shape (no look-up needed to refuse other strings).
pub fn is_well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token
            .strip_prefix(PREFIX)
            .is_some_and(|b| b.bytes().all(|c| c.is_ascii_alphanumeric()))
}

pub fn hash(pepper: &Pepper, token: &str) -> [u8; 32] {
    pepper.mac(HMAC_DOMAIN, &[token.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_well_formed_and_distinct() {
        let a = mint();
        let b = mint();
        assert!(is_well_formed(&a));
        assert_ne!(*a, *b);
        assert!(!is_well_formed(&a[..TOKEN_LEN - 1]));
        assert!(!is_well_formed(&a.replace("moat_rt_", "moat_xx_")));
        let p = Pepper::from_bytes([1; 32]);
        assert_ne!(hash(&p, &a), hash(&p, &b));
    }

    #[test]
    fn successors_are_well_formed_fixed_per_token_and_keyed() {
        let p = Pepper::from_bytes([1; 32]);
        let a = mint();
        let next = successor(&p, &a);
        assert!(is_well_formed(&next));
        assert_eq!(*next, *successor(&p, &a));
        assert_ne!(*next, *successor(&p, &mint()));
        assert_ne!(*next, *successor(&Pepper::from_bytes([2; 32]), &a));
        assert_ne!(*next, *successor(&p, &next));
    }
}
