//! The hash chain and the HMAC: what makes an edit, a deletion, an insertion, a reorder or a
//! splice visible.
//!
//! A line is the record's JSON with one last member, `"hmac"`: HMAC-SHA256 under the audit
//! key of everything before it (the JSON up to that member, closed with `}`). Each record's
//! `prev` is the SHA-256 of the whole previous line. The key lives apart from the log (a
//! root-only 0600 file in the data directory): whoever can rewrite the log without the key
//! can neither forge a record nor mend the chain after removing one.
//!
//! The *head* (last sequence number and line hash, HMAC'd) is kept beside the log and
//! rewritten on every flush; it is what reveals records cut off the end of the log, which the
//! chain alone cannot.

use std::{io, path::Path};

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The audit key's file name, in the data directory.
pub const KEY_FILE: &str = "audit.key";
const KEY_LEN: usize = 32;
/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HMAC_MEMBER: &str = ",\"hmac\":\"";

/// The HMAC key of the audit log. `Debug` shows nothing.
#[derive(Clone)]
pub struct AuditKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(…)")
    }
}

impl AuditKey {
    pub fn path(data_dir: &Path) -> std::path::PathBuf {
        data_dir.join(KEY_FILE)
    }

    /// Reads the key (0600, not a link, owned by root or whoever runs this process).
    pub fn load(data_dir: &Path) -> io::Result<Self> {
        let owners = [0, nix::unistd::geteuid().as_raw()];
        let bytes = crate::secret_files::read_named_secret_file(&Self::path(data_dir), &owners)?;
        Self::from_bytes(&bytes)
    }

    /// Reads the key, or creates it on first start. Refuses to create one when a log already
    /// exists in `log_dir`: a new key would leave every old record unverifiable, which is what
    /// an attacker who deleted the key would want.
    pub fn load_or_create(data_dir: &Path, log_dir: &Path) -> io::Result<Self> {
        match Self::load(data_dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if super::files::log_exists(log_dir) {
                    return Err(io::Error::other(format!(
                        "{} is missing but the audit log in {} has records: refusing to start a \
                         new key that could not verify them (restore the key, or move the old \
                         log away after archiving it)",
                        Self::path(data_dir).display(),
                        log_dir.display()
                    )));
                }
                let owners = [0, nix::unistd::geteuid().as_raw()];
                let bytes = crate::secret_files::load_or_create(&Self::path(data_dir), || {
                    Zeroizing::new(crate::auth::secrets::random_bytes::<KEY_LEN>().to_vec())
                })?;
                drop(bytes);
                let bytes =
                    crate::secret_files::read_named_secret_file(&Self::path(data_dir), &owners)?;
                Self::from_bytes(&bytes)
            }
            other => other,
        }
    }

    fn from_bytes(bytes: &[u8]) -> io::Result<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the audit key must be {KEY_LEN} bytes"),
            )
        })?;
        Ok(Self(Zeroizing::new(arr)))
    }

    #[cfg(test)]
    pub fn for_tests(b: u8) -> Self {
        Self(Zeroizing::new([b; KEY_LEN]))
    }

    fn mac(&self, data: &[u8]) -> String {
        let mut m = HmacSha256::new_from_slice(&self.0[..]).expect("HMAC takes any key length");
        m.update(data);
        hex(&m.finalize().into_bytes())
    }

    /// A record's JSON (from [`super::record::body`]) with its HMAC appended: one line.
    pub fn seal(&self, body: &str) -> String {
        debug_assert!(body.ends_with('}'));
        let mac = self.mac(body.as_bytes());
        format!("{}{HMAC_MEMBER}{mac}\"}}", &body[..body.len() - 1])
    }

    /// Whether `line`'s HMAC is right. `None`: the line has no HMAC member where it belongs.
    pub fn check(&self, line: &str) -> Option<bool> {
        let (body, mac) = unseal(line)?;
        let want = self.mac(body.as_bytes());
        Some(subtle::ConstantTimeEq::ct_eq(want.as_bytes(), mac.as_bytes()).into())
    }
}

/// Splits a sealed line into the body the HMAC covers and the HMAC.
fn unseal(line: &str) -> Option<(String, &str)> {
    let at = line.rfind(HMAC_MEMBER)?;
    let mac = line[at + HMAC_MEMBER.len()..].strip_suffix("\"}")?;
    if mac.len() != 64 || !mac.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((format!("{}}}", &line[..at]), mac))
}

/// The chain hash of a line (without its newline).
pub fn line_hash(line: &str) -> String {
    hex(&Sha256::digest(line.as_bytes()))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The SHA-256 of a config's text, for `config_reload` and `daemon_start`.
pub fn digest(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Where the log ends: the last record's sequence number and line hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Head {
    pub fn genesis() -> Head {
        Head {
            seq: 0,
            hash: GENESIS.to_owned(),
        }
    }

    /// The head as stored: JSON sealed like a record.
    pub fn seal(&self, key: &AuditKey) -> String {
        key.seal(&serde_json::to_string(self).expect("head serializes"))
    }

    /// Parses a stored head, checking its HMAC.
    pub fn open(text: &str, key: &AuditKey) -> Result<Head, String> {
        let text = text.trim();
        match key.check(text) {
            Some(true) => {}
            Some(false) => return Err("the head's HMAC does not match".into()),
            None => return Err("the head is not a sealed record".into()),
        }
        let (body, _) = unseal(text).expect("checked above");
        serde_json::from_str(&body).map_err(|e| format!("undecodable head: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_check() {
        let k = AuditKey::for_tests(1);
        let line = k.seal(r#"{"seq":1,"x":"a"}"#);
        assert!(line.starts_with(r#"{"seq":1,"x":"a","hmac":""#));
        assert_eq!(k.check(&line), Some(true));
        assert_eq!(k.check(&line.replace("\"a\"", "\"b\"")), Some(false));
        assert_eq!(AuditKey::for_tests(2).check(&line), Some(false));
        assert_eq!(k.check(r#"{"seq":1}"#), None);
        let h = Head {
            seq: 3,
            hash: "ab".into(),
        };
        assert_eq!(Head::open(&h.seal(&k), &k).unwrap(), h);
        assert!(Head::open(&h.seal(&k), &AuditKey::for_tests(2)).is_err());
    }
}
