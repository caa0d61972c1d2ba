//! Refresh tokens: opaque, `moat_rt_` followed by 43 base62 characters (≈256 bits from the OS
//! CSPRNG). Stored only as HMAC-SHA256 under the pepper; single use (see
//! [`crate::store::Store::rotate_refresh`]). The prefix lets the bearer check refuse a refresh
//! token presented as a credential and makes a leaked one recognisable.

use zeroize::Zeroizing;

use super::secrets::{Pepper, random_base62};

pub const PREFIX: &str = "moat_rt_";
const BODY_LEN: usize = 43;
pub const TOKEN_LEN: usize = PREFIX.len() + BODY_LEN;
const HMAC_DOMAIN: &str = "moat refresh token v1";

pub fn mint() -> Zeroizing<String> {
    Zeroizing::new(format!("{PREFIX}{}", random_base62(BODY_LEN)))
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
}
