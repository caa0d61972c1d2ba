//! Files only root or the service user may read: private folders (0700), secret files (0600,
//! never through a symlink, owner and mode checked on the opened file), atomic writes and
//! race-free first creation. Used by the identity secrets, the store and the config load, so it
//! depends on nothing else in the crate. Contents are never logged or printed.

use std::{
    fs::{self, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Reads a secret file, refusing a symlink and one that others can read or write.
pub fn read_secret_file(path: &Path) -> io::Result<Zeroizing<Vec<u8>>> {
    read_checked(path, None)
}

/// Reads a secret file the config names (`auth.hs256_secret_file`, a pool's `api_key_file`):
/// as [`read_secret_file`], and it must also be owned by one of `owners` (root, the service
/// user, whoever runs this process).
pub fn read_named_secret_file(path: &Path, owners: &[u32]) -> io::Result<Zeroizing<Vec<u8>>> {
    read_checked(path, Some(owners))
}

/// Opens without following a symlink (the check below would otherwise judge the link's
/// target, which its owner can swap at will), then judges the opened file itself (`fstat`),
/// so nothing can change between the check and the read.
fn read_checked(path: &Path, owners: Option<&[u32]>) -> io::Result<Zeroizing<Vec<u8>>> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: {why}", path.display()),
        ))
    };
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return refuse(
                "is a symbolic link; a secret file is named by its own path, not a link".into(),
            );
        }
        // Keep the kind (NotFound means "create it"); name the file.
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return refuse("is not a regular file".into());
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return refuse(format!(
            "has mode {:o}: a secret file must not be readable or writable by group or others \
             (chmod 600)",
            mode & 0o777
        ));
    }
    if let Some(owners) = owners
        && !owners.contains(&meta.uid())
    {
        return refuse(format!(
            "is owned by uid {}: a secret file must be owned by root or the service user",
            meta.uid()
        ));
    }
    let mut buf = Zeroizing::new(Vec::new());
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Who may own a secret file the config names: root, the service user (if it exists), and
/// whoever runs this process (an unprivileged developer's own files).
pub fn secret_owners(service_user: &str) -> Vec<u32> {
    let mut owners = vec![0, nix::unistd::geteuid().as_raw()];
    if let Ok(Some(u)) = nix::unistd::User::from_name(service_user) {
        owners.push(u.uid.as_raw());
    }
    owners
}

/// Writes `bytes` to `path` atomically (temp file + rename), mode 0600 from creation on.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = write_temp(path, bytes)?;
    fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Writes `bytes` to a fresh 0600 file beside `path` (synced) and returns its name.
fn write_temp(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    ensure_private_dir(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("secret"),
        temp_suffix()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(tmp)
}

/// Makes a rename or link in `path`'s directory durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Reads `path`, or creates it with `make()` if it does not exist yet. Several processes may
/// race here (the worker starting while an operator runs `moat keys create`): the file is
/// published with `link`, which refuses to replace, so exactly one secret wins and every
/// racer reads that one.
pub fn load_or_create(
    path: &Path,
    make: impl FnOnce() -> Zeroizing<Vec<u8>>,
) -> io::Result<Zeroizing<Vec<u8>>> {
    match read_secret_file(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = write_temp(path, &make())?;
            let published = fs::hard_link(&tmp, path);
            let _ = fs::remove_file(&tmp);
            match published {
                Ok(()) => sync_dir(path)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            read_secret_file(path)
        }
        Err(e) => Err(e),
    }
}

/// A random suffix for a temp file's name, so racing writers never share one.
fn temp_suffix() -> String {
    let mut raw = [0u8; 6];
    // A failure leaves zeros; `create_new` then refuses a clash instead of sharing a file.
    let _ = getrandom::fill(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}
