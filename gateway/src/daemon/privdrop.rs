//! Spawning the worker with no privilege: into the gateway cgroup, supplementary groups
//! dropped, setgid/setuid to the service user, every capability gone (effective, permitted,
//! inheritable, ambient and the bounding set), `no_new_privs` set.
//!
//! Everything the child needs is prepared before `fork`; the code that runs between `fork`
//! and `exec` only makes system calls (no allocation, no locks).

use std::{
    fs::{File, OpenOptions},
    io,
    os::fd::{AsRawFd, RawFd},
    path::Path,
};

use anyhow::{Context, Result};
use nix::unistd::{Gid, Uid, User};

/// The unprivileged identity the worker runs as.
#[derive(Debug, Clone)]
pub struct ServiceUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

impl ServiceUser {
    pub fn lookup(name: &str) -> Result<ServiceUser> {
        let user = User::from_name(name)
            .with_context(|| format!("cannot look up service user `{name}`"))?
            .with_context(|| {
                format!(
                    "service user `{name}` does not exist: create it \
                     (`useradd --system --no-create-home --shell /usr/sbin/nologin {name}`) \
                     or set `server.user`"
                )
            })?;
        if user.uid.is_root() {
            anyhow::bail!("service user `{name}` is root; the worker must not run as root");
        }
        Ok(ServiceUser {
            name: name.to_owned(),
            uid: user.uid,
            gid: user.gid,
        })
    }

    /// Switches this (single-threaded, CLI) process to the service user for good.
    pub fn become_now(&self) -> Result<()> {
        nix::unistd::setgroups(&[]).context("setgroups")?;
        nix::unistd::setresgid(self.gid, self.gid, self.gid).context("setresgid")?;
        nix::unistd::setresuid(self.uid, self.uid, self.uid).context("setresuid")?;
        Ok(())
    }
}

/// The data directory belongs to the service user, mode 0700: the worker keeps its store and
/// secrets there, nobody else reads them.
pub fn prepare_data_dir(dir: &Path, user: &ServiceUser) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    nix::unistd::chown(dir, Some(user.uid), Some(user.gid))
        .with_context(|| format!("cannot give {} to {}", dir.display(), user.name))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// What the child does between `fork` and `exec`, prepared in the parent.
pub struct DropPlan {
    /// `cgroup.procs` of the cgroup to join, when there is one.
    cgroup_procs: Option<File>,
    user: ServiceUser,
    cap_last: libc::c_ulong,
    /// Descriptors the worker inherits (their close-on-exec flag is cleared in the child).
    inherit: Vec<RawFd>,
}

impl DropPlan {
    pub fn new(
        cgroup_dir: Option<&Path>,
        user: ServiceUser,
        inherit: Vec<RawFd>,
    ) -> Result<DropPlan> {
        let cgroup_procs = match cgroup_dir {
            Some(dir) => {
                let procs = dir.join("cgroup.procs");
                let file = OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .with_context(|| format!("cannot open {}", procs.display()))?;
                Some(file)
            }
            None => None,
        };
        let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        Ok(DropPlan {
            cgroup_procs,
            user,
            cap_last,
            inherit,
        })
    }

    /// Runs in the forked child before `exec`. Only system calls.
    pub fn apply_in_child(&self) -> io::Result<()> {
        if let Some(procs) = &self.cgroup_procs {
            // Writing "0" to cgroup.procs moves the writing process.
            let zero = b"0";
            // SAFETY: valid fd and buffer.
            check(unsafe { libc::write(procs.as_raw_fd(), zero.as_ptr().cast(), 1) } as i32)?;
        }
        // SAFETY: setgroups with an empty list.
        check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
        let (gid, uid) = (self.user.gid.as_raw(), self.user.uid.as_raw());
        // SAFETY: plain credential syscalls.
        check(unsafe { libc::setresgid(gid, gid, gid) })?;
        for cap in 0..=self.cap_last {
            // SAFETY: prctl with integer arguments. EINVAL for caps this kernel lacks is fine.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        }
        // SAFETY: prctl with integer arguments.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        })?;
        // Without SECBIT_KEEP_CAPS, leaving uid 0 clears the permitted and effective sets.
        // SAFETY: plain credential syscall.
        check(unsafe { libc::setresuid(uid, uid, uid) })?;
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        for &fd in &self.inherit {
            // SAFETY: fcntl on a descriptor the parent keeps open across the fork.
            check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) })?;
        }
        Ok(())
    }
}

fn check(r: i32) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Asks the kernel to send SIGTERM to this process when its parent dies, and exits at once
/// if the parent is already gone. The worker calls this first thing: a worker must never
/// outlive the supervisor that restarts and reloads it.
pub fn exit_with_parent(expected_parent: i32) {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) };
    if nix::unistd::getppid().as_raw() != expected_parent {
        std::process::exit(0);
    }
}
