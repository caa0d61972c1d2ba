//! API keys: `moat_<key id>_<secret><checksum>`.
//!
//! - key id: 12 base62 characters, public, the store's lookup key and the only part ever logged;
//! - secret: 43 base62 characters from the OS CSPRNG (43 × log2 62 ≈ 256 bits);
//! - checksum: CRC32 of everything before it, as 6 base62 characters, so a mistyped or
//!   truncated key is refused without a store look-up and a leaked key is recognisable.
//!
//! Stored as HMAC-SHA256 under the server pepper; compared in constant time.

use subtle::ConstantTimeEq;

use super::secrets::{BASE62, Pepper, random_base62};

pub const PREFIX: &str = "moat_";
pub const KEY_ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 43;
pub const CHECKSUM_LEN: usize = 6;
/// The whole key's length: fixed, so anything else is refused at once.
pub const KEY_LEN: usize = PREFIX.len() + KEY_ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;
const HMAC_DOMAIN: &str = "moat api key v1";

/// A syntactically valid key whose checksum matches. Only now is a store look-up worth it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub key_id: &'a str,
    secret: &'a str,
}

/// A freshly minted key: the plaintext (shown once) and what the store keeps.
pub struct NewKey {
    pub key_id: String,
    pub plaintext: zeroize::Zeroizing<String>,
    pub secret_hmac: [u8; 32],
}

fn checksum(body: &str) -> String {
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for c in out.iter_mut().rev() {
        *c = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("base62 is ASCII")
}

fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Generates a key id alone (for a retry after an id collision).
pub fn new_key_id() -> String {
    random_base62(KEY_ID_LEN)
}

/// Mints a key with `key_id`.
pub fn mint(pepper: &Pepper, key_id: &str) -> NewKey {
    let secret = zeroize::Zeroizing::new(random_base62(SECRET_LEN));
    let body = format!("{PREFIX}{key_id}_{}", secret.as_str());
    let plaintext = zeroize::Zeroizing::new(format!("{body}{}", checksum(&body)));
    NewKey {
        key_id: key_id.to_owned(),
        secret_hmac: hash_secret(pepper, key_id, &secret),
        plaintext,
    }
}

/// Checks the shape and the checksum. `None`: not a key (refuse without a look-up).
pub fn parse(key: &str) -> Option<ParsedKey<'_>> {
    if key.len() != KEY_LEN || !key.is_ascii() {
        return None;
    }
    let rest = key.strip_prefix(PREFIX)?;
    let (key_id, rest) = rest.split_at(KEY_ID_LEN);
    let rest = rest.strip_prefix('_')?;
    let (secret, sum) = rest.split_at(SECRET_LEN);
    if !is_base62(key_id) || !is_base62(secret) || !is_base62(sum) {
        return None;
    }
    let body = &key[..key.len() - CHECKSUM_LEN];
    if !bool::from(checksum(body).as_bytes().ct_eq(sum.as_bytes())) {
        return None;
    }
    Some(ParsedKey { key_id, secret })
}

fn hash_secret(pepper: &Pepper, key_id: &str, secret: &str) -> [u8; 32] {
    pepper.mac(HMAC_DOMAIN, &[key_id.as_bytes(), secret.as_bytes()])
}

impl ParsedKey<'_> {
    /// Constant-time comparison of this key's secret with a stored HMAC.
    pub fn matches(&self, pepper: &Pepper, stored: &[u8]) -> bool {
        let h = hash_secret(pepper, self.key_id, self.secret);
        bool::from(h.as_slice().ct_eq(stored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pepper() -> Pepper {
        Pepper::from_bytes([7; 32])
    }

    #[test]
    fn minted_keys_parse_and_match() {
        let p = pepper();
        let k = mint(&p, &new_key_id());
        assert_eq!(k.plaintext.len(), KEY_LEN);
        let parsed = parse(&k.plaintext).expect("a minted key parses");
        assert_eq!(parsed.key_id, k.key_id);
        assert!(parsed.matches(&p, &k.secret_hmac));
        assert!(!parsed.matches(&Pepper::from_bytes([8; 32]), &k.secret_hmac));
    }

    #[test]
    fn any_single_character_change_breaks_the_checksum_or_shape() {
        let k = mint(&pepper(), &new_key_id());
        let s = k.plaintext.as_str();
        for i in PREFIX.len()..s.len() {
            if &s[i..=i] == "_" {
                continue;
            }
            let mut b = s.as_bytes().to_vec();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let t = String::from_utf8(b).unwrap();
            assert!(parse(&t).is_none(), "change at {i} accepted");
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        let k = mint(&pepper(), &new_key_id());
        let s = k.plaintext.as_str();
        assert!(parse(&s[..s.len() - 1]).is_none());
        assert!(parse(&format!("{s}x")).is_none());
        assert!(parse(&s.replacen("moat_", "mOat_", 1)).is_none());
        assert!(parse("").is_none());
        assert!(parse(&"é".repeat(KEY_LEN / 2)).is_none());
    }

    #[test]
    fn wrong_secret_with_valid_checksum_does_not_match() {
        let p = pepper();
        let a = mint(&p, "AAAAAAAAAAAA");
        let b = mint(&p, "AAAAAAAAAAAA");
        let pb = parse(&b.plaintext).unwrap();
        assert!(!pb.matches(&p, &a.secret_hmac));
    }
}
