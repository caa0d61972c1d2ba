//! Sealing secrets the shared store keeps (the Ed25519 signing key set): XChaCha20-Poly1305
//! under a key derived from the pepper with HKDF-SHA256. The pepper is not in the database, so
//! a stolen database (or a backup) yields no signing key, and each replica opens the sealed
//! keys with its own copy of the pepper file.
//!
//! Layout: a 24-byte random nonce, then the ciphertext with its 16-byte tag. The associated
//! data names what was sealed, so a blob sealed for one purpose never opens as another.

use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use zeroize::Zeroizing;

use super::secrets::{Pepper, random_bytes};

const NONCE_LEN: usize = 24;

/// A sealing key for one purpose.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    aad: &'static [u8],
}

/// The sealed bytes do not open: a different pepper, or corruption.
#[derive(Debug, thiserror::Error)]
#[error("cannot be decrypted with this replica's pepper")]
pub struct OpenError;

impl Sealer {
    /// The sealer for `purpose` (also the HKDF info label and the associated data).
    pub fn new(pepper: &Pepper, purpose: &'static str) -> Self {
        let key = pepper.derive_key(purpose);
        Self {
            cipher: XChaCha20Poly1305::new_from_slice(&key[..]).expect("a 32-byte key"),
            aad: purpose.as_bytes(),
        }
    }

    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let nonce = random_bytes::<NONCE_LEN>();
        let ct = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: self.aad,
                },
            )
            .expect("sealing in memory cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| OpenError)?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: self.aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| OpenError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_with_the_same_pepper_only() {
        let p = Pepper::from_bytes([7; 32]);
        let s = Sealer::new(&p, "moat test v1");
        let sealed = s.seal(b"seed");
        assert_eq!(&s.open(&sealed).unwrap()[..], b"seed");
        // Another pepper, another purpose, or one flipped bit: refused.
        let other = Sealer::new(&Pepper::from_bytes([8; 32]), "moat test v1");
        assert!(other.open(&sealed).is_err());
        assert!(Sealer::new(&p, "moat other v1").open(&sealed).is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(s.open(&bad).is_err());
        assert!(s.open(&sealed[..10]).is_err());
    }
}
