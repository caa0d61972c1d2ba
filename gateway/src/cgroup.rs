//! cgroup v2: finding the mount, creating the gateway cgroup, reading its id, moving processes.
//!
//! The kernel identifies a cgroup by the inode number of its directory in the cgroup2 file
//! system; that is the id the eBPF programs compare against.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

/// Where the cgroup2 hierarchy is mounted, read from `/proc/mounts`: `/sys/fs/cgroup` on pure
/// v2 hosts, often `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    parse_cgroup2_mount(&mounts).context("no cgroup2 file system is mounted (see /proc/mounts)")
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        // /proc/mounts escapes spaces in paths as \040.
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// A cgroup v2 directory and the facts the kernel programs need about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub path: PathBuf,
    /// Kernel cgroup id (the directory's inode number).
    pub id: u64,
    /// Depth below the cgroup2 root (the root is 0).
    pub level: u32,
}

impl Cgroup {
    /// Creates (if needed) `relative` below the cgroup2 mount.
    pub fn ensure(relative: &Path) -> Result<Cgroup> {
        let root = cgroup2_mount()?;
        let path = root.join(relative);
        fs::create_dir_all(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Self::open(&root, &path)
    }

    /// Describes an existing cgroup directory below `root`.
    pub fn open(root: &Path, path: &Path) -> Result<Cgroup> {
        let rel = path
            .strip_prefix(root)
            .with_context(|| format!("{} is not below {}", path.display(), root.display()))?;
        let meta = fs::metadata(path).with_context(|| format!("no cgroup {}", path.display()))?;
        if !path.join("cgroup.procs").exists() {
            bail!("{} is not a cgroup v2 directory", path.display());
        }
        Ok(Cgroup {
            path: path.to_path_buf(),
            id: meta.ino(),
            level: rel.components().count() as u32,
        })
    }

    /// The cgroup the calling process is in (its cgroup v2 entry in `/proc/self/cgroup`).
    pub fn of_pid(pid: u32) -> Result<Cgroup> {
        let root = cgroup2_mount()?;
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("process has no cgroup v2 entry")?;
        Self::open(&root, &root.join(rel.trim_start_matches('/')))
    }

    /// Moves a process (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))?;
        f.write_all(pid.to_string().as_bytes())
    }

    /// Removes the cgroup directory after moving any process left in it to the root; child
    /// cgroups are removed first. Used by tests and uninstall paths.
    pub fn remove(&self) -> io::Result<()> {
        remove_tree(&self.path)
    }
}

fn remove_tree(path: &Path) -> io::Result<()> {
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    // A process that just exited can keep the cgroup busy for a moment after it was reaped (the
    // kernel releases it asynchronously): move what is left out and retry for a while.
    let mut attempts = 0;
    loop {
        if let (Ok(procs), Ok(root)) = (
            fs::read_to_string(path.join("cgroup.procs")),
            cgroup2_mount(),
        ) {
            for pid in procs.lines() {
                let _ = fs::write(root.join("cgroup.procs"), pid);
            }
        }
        match fs::remove_dir(path) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 200 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_pure_mounts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid).unwrap(),
            Path::new("/sys/fs/cgroup/unified")
        );
        let pure = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(pure).unwrap(),
            Path::new("/sys/fs/cgroup")
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }
}
