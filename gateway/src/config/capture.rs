//! What a config load reads from outside its own text — DNS answers, environment variables,
//! files — and how a later load replays it.
//!
//! The supervisor loads from the system (as root, before any lockdown) and hands the
//! [`Captured`] answers to the worker with the text; the worker replays them: no DNS under
//! egress lockdown, no root-only files, no environment needed, and the same answers the
//! supervisor got.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use super::destinations::{resolve_host_port, resolve_literal, split_port};

/// What a config load read from outside its own text: the addresses of the host names, the
/// environment variables and the files it names.
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
pub(super) struct Reader<'a> {
    sources: Sources<'a>,
    captured: RefCell<Captured>,
    /// `server.user`: besides root, the one owner a secret file may have.
    service_user: String,
}

impl<'a> Reader<'a> {
    pub(super) fn new(sources: Sources<'a>, service_user: &str) -> Self {
        Self {
            sources,
            captured: Default::default(),
            service_user: service_user.to_owned(),
        }
    }

    /// Everything read so far.
    pub(super) fn into_captured(self) -> Captured {
        self.captured.into_inner()
    }

    pub(super) fn lenient(&self) -> bool {
        matches!(self.sources, Sources::Lenient)
    }

    pub(super) fn host(&self, entry: &str) -> Result<Vec<SocketAddr>, String> {
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

    pub(super) fn env(&self, name: &str) -> Option<String> {
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
    pub(super) fn file(&self, path: &Path) -> Result<Option<Vec<u8>>, String> {
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

    /// A secret file (`Ok(None)`: it does not exist). Read from the system it must be a
    /// regular file, not a symlink, owned by root, the service user or this process's user, and
    /// without group or other access (`auth::secrets`); a replay gives what the supervisor's
    /// checked read captured.
    pub(super) fn secret_file(&self, path: &Path) -> Result<Option<Vec<u8>>, String> {
        let bytes = match self.sources {
            Sources::System | Sources::Lenient => {
                let owners = crate::secret_files::secret_owners(&self.service_user);
                match crate::secret_files::read_named_secret_file(path, &owners) {
                    Ok(b) => Some(b.to_vec()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    // The message names the file already.
                    Err(e) => return Err(e.to_string()),
                }
            }
            Sources::Replay(_) => return self.file(path),
        };
        self.captured
            .borrow_mut()
            .files
            .insert(path.to_path_buf(), bytes.clone());
        Ok(bytes)
    }

    /// A secret file that must exist (a private key): [`Reader::secret_file`]'s checks, and a
    /// missing file is an error.
    pub(super) fn required_secret_file(&self, path: &Path) -> Result<Vec<u8>, String> {
        self.secret_file(path)?
            .ok_or_else(|| format!("cannot read {}: no such file", path.display()))
    }

    pub(super) fn required_file(&self, path: &Path) -> Result<Vec<u8>, String> {
        self.file(path)?
            .ok_or_else(|| format!("cannot read {}: no such file", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, tests::load};

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
}
