//! Appending records: the one place a line is added to the log.
//!
//! Every append takes an exclusive `flock` on the head file, reads where the log ends from the
//! head, writes the batch, `fdatasync`s the log, then rewrites and syncs the head. So several
//! writers (the daemon's, an operator's `moat users …` run) share one chain, and a record is
//! durable before anyone is told it was written. Only the daemon rotates, under the same lock:
//! past `max_file_bytes` the current file is renamed to `audit-<last seq>.log` and a new one
//! begins; its first record's `prev` is the old file's last hash, so the chain runs across.
//!
//! The directory is root's, mode 0750, group the service user's: the worker may read the log
//! (for `GET /admin/audit`) but neither write, rename nor remove anything in it.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use super::{
    chain::{AuditKey, Head, line_hash},
    files::{self, CURRENT, HEAD},
    record::{self, Event, Record, Source},
};

/// The head is rewritten in place, padded to this size (a sealed head is ~170 bytes).
const HEAD_LEN: usize = 256;

#[derive(Debug, Clone)]
pub struct Options {
    /// Rotate past this size (the daemon only).
    pub max_file_bytes: u64,
    pub rotate: bool,
    /// The group that may read the log (the service user's), when running as root.
    pub group: Option<u32>,
    /// Also send each line to syslog (`LOG_AUTHPRIV`), which journald picks up.
    pub syslog: bool,
}

pub struct Writer {
    dir_path: PathBuf,
    dir: File,
    head: File,
    log: File,
    key: AuditKey,
    opts: Options,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Writer({})", self.dir_path.display())
    }
}

struct Locked<'a>(&'a File);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn lock(f: &File) -> io::Result<Locked<'_>> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Locked(f))
}

impl Writer {
    /// Opens (creating on first use) the log in `dir`. Refuses a directory that is a link or
    /// that belongs to someone else than whoever runs this (root for the daemon): a directory
    /// the worker made could be written by the worker.
    pub fn open(dir: &Path, key: AuditKey, opts: Options) -> io::Result<Writer> {
        let err = |what: String| io::Error::new(io::ErrorKind::PermissionDenied, what);
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)?;
        }
        let dir_file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: {e} (a link is refused)", dir.display()),
                )
            })?;
        let meta = dir_file.metadata()?;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(err(format!(
                "{} belongs to uid {}, not {me}: the audit log's directory must be this process's own",
                dir.display(),
                meta.uid()
            )));
        }
        if me == 0 {
            std::os::unix::fs::fchown(&dir_file, Some(0), opts.group)?;
        }
        // On the opened directory, not the path (which could be swapped meanwhile).
        dir_file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o750))?;
        let head = open_at(&dir_file, HEAD, libc::O_RDWR, opts.group)?;
        let log = open_at(
            &dir_file,
            CURRENT,
            libc::O_WRONLY | libc::O_APPEND,
            opts.group,
        )?;
        Ok(Writer {
            dir_path: dir.to_path_buf(),
            dir: dir_file,
            head,
            log,
            key,
            opts,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// Appends `batch` (durably) and returns where the log ends now.
    pub fn append(&mut self, batch: &[(Source, Event)]) -> io::Result<Head> {
        let head_file = self.head.try_clone()?;
        let _lock = lock(&head_file)?;
        self.follow_rotation()?;
        let mut head = self.read_head()?;
        let mut out = String::new();
        for (source, event) in batch {
            let rec = Record {
                seq: head.seq + 1,
                ts: record::now_rfc3339(),
                prev: head.hash.clone(),
                source: *source,
                event: event.clone(),
            };
            let line = self.key.seal(&record::body(&rec));
            head = Head {
                seq: rec.seq,
                hash: line_hash(&line),
            };
            if self.opts.syslog {
                syslog(&line);
            }
            out.push_str(&line);
            out.push('\n');
        }
        self.log.write_all(out.as_bytes())?;
        self.log.sync_data()?;
        self.write_head(&head)?;
        if self.opts.rotate && self.log.metadata()?.len() >= self.opts.max_file_bytes {
            self.rotate(head.seq)?;
        }
        Ok(head)
    }

    /// Another writer may have rotated since this one opened the file: write to the current.
    fn follow_rotation(&mut self) -> io::Result<()> {
        let ours = self.log.metadata()?;
        let now = nix::sys::stat::fstatat(
            Some(self.dir.as_raw_fd()),
            CURRENT,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        let same = now.is_ok_and(|s| s.st_ino == ours.ino() && s.st_dev == ours.dev());
        if !same {
            self.log = open_at(
                &self.dir,
                CURRENT,
                libc::O_WRONLY | libc::O_APPEND,
                self.opts.group,
            )?;
        }
        Ok(())
    }

    fn read_head(&self) -> io::Result<Head> {
        let mut buf = vec![0u8; HEAD_LEN * 2];
        let n = nix::sys::uio::pread(&self.head, &mut buf, 0).map_err(io::Error::from)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        if text.trim().is_empty() {
            // A new log, or a lost head: start after the last record there is.
            return Ok(last_record(&self.dir_path)?.unwrap_or_else(Head::genesis));
        }
        match Head::open(&text, &self.key) {
            Ok(h) => Ok(h),
            Err(e) => {
                // Keep writing (the chain then shows the gap); say so loudly.
                tracing::error!(error = %e, dir = %self.dir_path.display(), "audit head is damaged; continuing after the last record in the log");
                Ok(last_record(&self.dir_path)?.unwrap_or_else(Head::genesis))
            }
        }
    }

    fn write_head(&self, head: &Head) -> io::Result<()> {
        let mut text = head.seal(&self.key);
        if text.len() >= HEAD_LEN {
            return Err(io::Error::other("audit head too long"));
        }
        text.extend(std::iter::repeat_n(' ', HEAD_LEN - 1 - text.len()));
        text.push('\n');
        nix::sys::uio::pwrite(&self.head, text.as_bytes(), 0).map_err(io::Error::from)?;
        self.head.sync_data()
    }

    fn rotate(&mut self, last_seq: u64) -> io::Result<()> {
        let dir = Some(self.dir.as_raw_fd());
        nix::fcntl::renameat(dir, CURRENT, dir, files::rotated_name(last_seq).as_str())
            .map_err(io::Error::from)?;
        self.log = open_at(
            &self.dir,
            CURRENT,
            libc::O_WRONLY | libc::O_APPEND,
            self.opts.group,
        )?;
        self.dir.sync_all()?;
        tracing::info!(dir = %self.dir_path.display(), last_seq, "audit log rotated");
        Ok(())
    }
}

/// Opens (creating 0640) `name` in `dir`, never through a link.
fn open_at(dir: &File, name: &str, flags: i32, group: Option<u32>) -> io::Result<File> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::OFlag::from_bits_truncate(
            flags | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        ),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{name}: {e}")))?;
    // SAFETY: a descriptor openat just gave us.
    let f = unsafe { File::from_raw_fd(fd) };
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::fchown(&f, Some(0), group)?;
    }
    Ok(f)
}

/// The last complete record in `dir`'s log, as a head.
fn last_record(dir: &Path) -> io::Result<Option<Head>> {
    for f in files::list(dir)?.iter().rev() {
        let lines = files::lines(std::slice::from_ref(f))?;
        if let Some(l) = lines.iter().rev().find(|l| l.complete)
            && let Ok(r) = serde_json::from_str::<serde_json::Value>(&l.text)
            && let Some(seq) = r.get("seq").and_then(|s| s.as_u64())
        {
            return Ok(Some(Head {
                seq,
                hash: line_hash(&l.text),
            }));
        }
    }
    Ok(None)
}

fn syslog(line: &str) {
    let Ok(msg) = std::ffi::CString::new(line) else {
        return;
    };
    // SAFETY: a constant format string and a NUL-terminated argument.
    unsafe {
        libc::syslog(
            libc::LOG_AUTHPRIV | libc::LOG_NOTICE,
            c"%s".as_ptr(),
            msg.as_ptr(),
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u32) -> (Source, Event) {
        (
            Source::Supervisor,
            Event::WorkerRestart {
                pid: n,
                status: "x".into(),
                restart_in_ms: 0,
            },
        )
    }

    #[test]
    fn appends_rotates_and_two_writers_share_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit");
        let opts = Options {
            max_file_bytes: 1500,
            rotate: true,
            group: None,
            syslog: false,
        };
        let mut a = Writer::open(&log, AuditKey::for_tests(7), opts.clone()).unwrap();
        let mut b = Writer::open(
            &log,
            AuditKey::for_tests(7),
            Options {
                rotate: false,
                ..opts
            },
        )
        .unwrap();
        for i in 0..20 {
            let w = if i % 3 == 0 { &mut b } else { &mut a };
            w.append(&[ev(i), ev(i + 100)]).unwrap();
        }
        let files = files::list(&log).unwrap();
        assert!(files.len() > 2, "rotated: {files:?}");
        let report =
            super::super::verify::verify(&files, &AuditKey::for_tests(7), Some(&log), false)
                .unwrap();
        assert!(report.ok(), "{report:?}");
        assert_eq!(report.records, 40);
    }
}
