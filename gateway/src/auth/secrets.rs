//! Secret material: randomness from the OS CSPRNG, and the secret files in the data directory
//! (the HMAC pepper, the JWT signing keys). The files themselves (0600 in a 0700 folder, never
//! through a symlink) are handled by [`crate::secret_files`]; their contents are never logged
//! or printed.

use std::{
    io,
    path::{Path, PathBuf},
};

use hmac::{KeyInit, Mac};
use zeroize::Zeroizing;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The folder below the data directory that holds secret files.
pub const SECRETS_DIR: &str = "secrets";
/// The HMAC pepper for API-key and refresh-token hashes.
pub const PEPPER_FILE: &str = "pepper";
const PEPPER_LEN: usize = 32;

/// Fills `buf` from the OS CSPRNG. There is no fallback: without the OS generator nothing
/// secret can be made, so this panics rather than return something guessable.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random number generator failed");
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill_random(&mut b);
    b
}

pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `n` characters drawn uniformly from [`BASE62`] (rejection sampling: no modulo bias).
/// Each character carries log2(62) ≈ 5.954 bits.
pub fn random_base62(n: usize) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        fill_random(&mut buf);
        for &b in &buf {
            // 248 = 4 * 62: bytes at or above it would favour the first 8 characters.
            if b < 248 && out.len() < n {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    out
}

pub fn secrets_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(SECRETS_DIR)
}

pub use crate::secret_files::{
    ensure_private_dir, load_or_create, read_named_secret_file, read_secret_file, secret_owners,
    write_secret_file,
};

/// The server pepper: the HMAC key under which API-key secrets and refresh tokens are stored.
/// It lives in a file outside the database, so a stolen database alone verifies nothing.
#[derive(Clone)]
pub struct Pepper {
    bytes: Zeroizing<[u8; PEPPER_LEN]>,
    /// HMAC keyed with the pepper, its two padded key blocks already hashed: a MAC costs two
    /// SHA-256 compressions rather than four (one per request with an API key, one per
    /// `cache_salt`). It holds nothing the pepper itself does not.
    keyed: HmacSha256,
}

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pepper(…)")
    }
}

impl Pepper {
    /// Loads `data_dir/secrets/pepper`, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> io::Result<Self> {
        let path = secrets_dir(data_dir).join(PEPPER_FILE);
        let bytes = load_or_create(&path, || {
            Zeroizing::new(random_bytes::<PEPPER_LEN>().to_vec())
        })?;
        let arr: [u8; PEPPER_LEN] = bytes.as_slice().try_into().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: expected {PEPPER_LEN} bytes", path.display()),
            )
        })?;
        Ok(Self::from_bytes(arr))
    }

    pub fn from_bytes(bytes: [u8; PEPPER_LEN]) -> Self {
        let keyed = HmacSha256::new_from_slice(&bytes).expect("HMAC takes any key length");
        Self {
            bytes: Zeroizing::new(bytes),
            keyed,
        }
    }

    /// A 32-byte key for `purpose`, derived from the pepper with HKDF-SHA256 (`purpose` is the
    /// info label, distinct for every use so no derived key doubles as another).
    pub fn derive_key(&self, purpose: &str) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<sha2::Sha256>::new(None, &self.bytes[..])
            .expand(purpose.as_bytes(), &mut out[..])
            .expect("32 bytes is a valid HKDF-SHA256 length");
        out
    }

    /// HMAC-SHA256 over `domain` and `parts`, each length-prefixed so no two inputs collide.
    pub fn mac(&self, domain: &str, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.keyed.clone();
        for p in std::iter::once(domain.as_bytes()).chain(parts.iter().copied()) {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;

    #[test]
    fn mac_is_plain_hmac_sha256_of_the_length_prefixed_parts() {
        // Stored hashes outlive builds: the pre-keyed state must give the textbook HMAC.
        let pepper = Pepper::from_bytes([7; PEPPER_LEN]);
        let mut fresh = HmacSha256::new_from_slice(&[7; PEPPER_LEN]).unwrap();
        for p in [&b"domain"[..], b"kid", b"secret"] {
            fresh.update(&(p.len() as u64).to_be_bytes());
            fresh.update(p);
        }
        let expected: [u8; 32] = fresh.finalize().into_bytes().into();
        assert_eq!(pepper.mac("domain", &[b"kid", b"secret"]), expected);
        assert_eq!(
            pepper.mac("domain", &[b"kid", b"secret"]),
            expected,
            "reusable"
        );
        assert_ne!(pepper.mac("domain", &[b"kids", b"ecret"]), expected);
    }

    #[test]
    fn base62_is_the_right_length_and_alphabet() {
        let s = random_base62(43);
        assert_eq!(s.len(), 43);
        assert!(s.bytes().all(|b| BASE62.contains(&b)));
        assert_ne!(s, random_base62(43));
    }

    #[test]
    fn pepper_file_is_created_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pepper::load_or_create(dir.path()).unwrap();
        let path = dir.path().join("secrets/pepper");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = fs::metadata(dir.path().join("secrets"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        let b = Pepper::load_or_create(dir.path()).unwrap();
        assert_eq!(a.mac("d", &[b"x"]), b.mac("d", &[b"x"]));
        assert_ne!(a.mac("d", &[b"x"]), a.mac("e", &[b"x"]));
        assert_ne!(a.mac("d", &[b"ab", b"c"]), a.mac("d", &[b"a", b"bc"]));
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_secret() {
        let dir = tempfile::tempdir().unwrap();
        let macs: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Pepper::load_or_create(dir.path()).unwrap().mac("t", &[])))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(macs.windows(2).all(|w| w[0] == w[1]));
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("secrets"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("pepper")]);
    }

    #[test]
    fn a_world_readable_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_secret_file(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }
}
