//! Spawning the worker with no privilege: into the gateway cgroup, supplementary groups
//! dropped, setgid/setuid to the service user, every capability gone (effective, permitted,
//! inheritable, ambient and the bounding set), `no_new_privs` set, the supervisor's resource
//! limits put back to small values (`RLIMIT_MEMLOCK` is unlimited for the eBPF loader, no core
//! files) and every descriptor but the ones passed down on purpose closed at `exec`.
//!
//! Also what the supervisor checks before it starts one: that the service user is moat's own
//! (not `nobody`, running no other program), and that the data directory it hands over is a
//! real directory and not a symbolic link to somewhere else. The worker itself then makes
//! itself non-dumpable ([`make_undumpable`]) and installs its seccomp filter
//! ([`super::seccomp`]).
//!
//! Everything the child needs is prepared before `fork`; the code that runs between `fork`
//! and `exec` only makes system calls (no allocation, no locks).

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::Path,
};

use anyhow::{Context, Result, bail};
use nix::unistd::{Gid, Uid, User};

/// The worker's `RLIMIT_MEMLOCK` (soft and hard): the supervisor lifts its own to unlimited
/// for the eBPF loader; the worker locks no memory.
pub const WORKER_MEMLOCK_BYTES: u64 = 64 * 1024;

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
            bail!("service user `{name}` is root; the worker must not run as root");
        }
        // `nobody` by any name: the kernel's overflow uid is shared by whatever runs as
        // nobody, and by files of unmapped owners.
        let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(65534);
        if user.uid.as_raw() == overflow {
            bail!(
                "`server.user` = `{name}` has uid {overflow}, the shared `nobody` account: \
                 give moat a user of its own (`useradd --system --no-create-home --shell \
                 /usr/sbin/nologin moat`)"
            );
        }
        Ok(ServiceUser {
            name: name.to_owned(),
            uid: user.uid,
            gid: user.gid,
        })
    }

    /// Refuses a service user that runs any program but moat: whatever else runs as that uid
    /// could signal the worker, read its data directory, and would have traced it. Checked
    /// once, when the supervisor starts. Other moat processes (another daemon's worker, a
    /// `moat identity` command) are moat and do not count.
    pub fn ensure_dedicated(&self) -> Result<()> {
        let mut others = Vec::new();
        for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
            let Some(pid) = entry?
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // A process that exits while we look is not one to refuse for.
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .map(str::trim)
                    .unwrap_or("")
            };
            let uid = self.uid.as_raw().to_string();
            let owned = field("Uid:").split_whitespace().any(|u| u == uid);
            if !owned || field("State:").starts_with('Z') || is_moat(pid) {
                continue;
            }
            others.push(format!("{pid} ({})", field("Name:")));
        }
        if others.is_empty() {
            return Ok(());
        }
        let shown = others.len().min(5);
        bail!(
            "`server.user` = `{}` must be a user of moat's own, but it runs other processes \
             (pid {}{}): they could signal the worker and read its data directory; give moat a \
             dedicated user",
            self.name,
            others[..shown].join(", "),
            if others.len() > shown { ", …" } else { "" }
        )
    }

    /// Switches this (single-threaded, CLI) process to the service user for good.
    pub fn become_now(&self) -> Result<()> {
        nix::unistd::setgroups(&[]).context("setgroups")?;
        nix::unistd::setresgid(self.gid, self.gid, self.gid).context("setresgid")?;
        nix::unistd::setresuid(self.uid, self.uid, self.uid).context("setresuid")?;
        Ok(())
    }
}

/// Names the calling process `moat` (its `comm`): exec'd through `/proc/self/fd/N`, the worker
/// would show as `N` in `ps` and in the dedicated-user check's refusal.
pub fn name_moat() -> Result<()> {
    // SAFETY: prctl with a NUL-terminated string that outlives the call.
    check(unsafe { libc::prctl(libc::PR_SET_NAME, c"moat".as_ptr(), 0, 0, 0) })
        .context("prctl(PR_SET_NAME)")?;
    Ok(())
}

/// Whether `/proc/<pid>/exe` is a program called `moat`. A process with no executable left
/// to read (root may read any) is exiting — a worker of a daemon that just stopped, say — and
/// runs nothing anymore: it does not count either.
fn is_moat(pid: u32) -> bool {
    match std::fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(exe) => exe
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.trim_end_matches(" (deleted)") == "moat"),
        Err(_) => true,
    }
}

/// The data directory belongs to the service user, mode 0700: the worker keeps its store and
/// secrets there, nobody else reads them.
///
/// Root hands the directory over, and the worker owns what is inside (and maybe the folder
/// around it): so the directory is opened with `O_NOFOLLOW` and changed through that
/// descriptor (`fchown`, `fchmod`), never by path. A symbolic link in its place is refused —
/// following it would give its target (`/etc`, say) to the service user — and so is a
/// directory that belongs to a third user.
pub fn prepare_data_dir(dir: &Path, user: &ServiceUser) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "`server.data_dir` {} is a symbolic link: moat gives its data directory to the \
             service user and does not follow links to do it; point `server.data_dir` at the \
             directory itself",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .with_context(|| format!("cannot open {} (not following links)", dir.display()))?;
    let meta = opened.metadata()?;
    if meta.uid() != 0 && meta.uid() != user.uid.as_raw() {
        bail!(
            "`server.data_dir` {} belongs to uid {}, neither root nor the service user `{}`: \
             refusing to take it over",
            dir.display(),
            meta.uid(),
            user.name
        );
    }
    std::os::unix::fs::fchown(&opened, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("cannot give {} to {}", dir.display(), user.name))?;
    opened.set_permissions(std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Makes the calling process non-dumpable, and checks that it stuck: then a process of the
/// same uid can neither `ptrace` it, nor read its memory (`process_vm_readv`,
/// `/proc/<pid>/mem`), nor its environment, and it leaves no core file. The worker calls this
/// first thing after `exec`: `execve` resets the flag to dumpable, so the child cannot set it
/// before.
pub fn make_undumpable() -> Result<()> {
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })
        .context("prctl(PR_SET_DUMPABLE, 0)")?;
    // SAFETY: as above.
    let now = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    if now != 0 {
        bail!("the worker is still dumpable (PR_GET_DUMPABLE = {now})");
    }
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
        // Whatever descriptor the supervisor holds (eBPF maps and links, pins, a descriptor
        // its own parent leaked) closes at exec; the ones passed down on purpose are opened
        // up again below.
        cloexec_from(3)?;
        for (resource, limit) in [
            (libc::RLIMIT_MEMLOCK, WORKER_MEMLOCK_BYTES),
            (libc::RLIMIT_CORE, 0),
        ] {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: plain syscall with a valid pointer. Still root here: the hard limit may
            // go down (and then never up again for the worker).
            check(unsafe { libc::setrlimit(resource, &limit) })?;
        }
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

/// Sets close-on-exec on every descriptor from `first` up. `close_range(2)` where the kernel
/// has it (5.11+), otherwise one `fcntl` per possible descriptor.
fn cloexec_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range with integer arguments; CLOEXEC only flags, closes nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    let last = limit.rlim_cur.min(1 << 20) as i32;
    for fd in first as i32..last {
        // SAFETY: fcntl on a number that may or may not be an open descriptor (EBADF then).
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
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
