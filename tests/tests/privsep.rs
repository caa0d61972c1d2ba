//! Privilege separation beyond uid and capabilities (root required; never skipped): the worker
//! is non-dumpable, runs under its seccomp filter, has small resource limits and only the
//! descriptors meant for it; the supervisor refuses a shared service user and does not follow
//! a symbolic link when it hands over the data directory.

use std::{
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        process::{CommandExt, ExitStatusExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use moat_tests::{
    bin,
    daemon::Daemon,
    kernel::{require_root, wait_until},
};
use nix::{sys::signal::Signal, unistd::User};

/// One enforcing daemon (the fixture) with one pool, running as `user`, data in `data`.
struct Setup {
    d: Daemon,
}

impl Setup {
    fn new(user: &str) -> Setup {
        let d = Daemon::enforcing();
        let toml = d
            .enforcing_config(&["127.0.0.1:9".parse().unwrap()], "", "")
            .replace("user = \"moat\"", &format!("user = \"{user}\""));
        d.write_config(&toml);
        Setup { d }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.d.dir().join(name)
    }

    /// Starts `moat serve` and returns its worker's pid.
    fn start(&mut self) -> u32 {
        self.d.start();
        worker_pid(self.d.log_path(), 0)
    }

    /// Runs `moat serve`, which must refuse to start; returns what it printed.
    fn refused(&mut self) -> String {
        let (status, log) = self.d.run_to_exit(None);
        assert!(!status.success(), "moat serve must refuse to start:\n{log}");
        log
    }

    /// The data plane answers `GET /healthz` with 200.
    fn healthy(&self) -> bool {
        self.d
            .get("/healthz")
            .send()
            .is_ok_and(|r| r.status() == 200)
    }
}

/// The pid of the `nth` worker started, from the daemon's log.
fn worker_pid(log: &Path, nth: usize) -> u32 {
    let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(20));
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let pid = text
            .lines()
            .filter(|l| l.contains("worker started"))
            .nth(nth)
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| v["pid"].as_u64());
        if let Some(pid) = pid {
            return pid as u32;
        }
        assert!(Instant::now() < deadline, "no worker #{nth} in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn proc_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn service_user() -> User {
    User::from_name("moat")
        .unwrap()
        .expect("the `moat` user (cargo xtask setup)")
}

#[test]
fn a_process_of_the_workers_own_uid_cannot_trace_or_read_it() {
    require_root();
    let mut s = Setup::new("moat");
    let pid = s.start();
    assert!(s.healthy());
    // The kernel gives a non-dumpable process's /proc files to root.
    let owner = std::fs::metadata(format!("/proc/{pid}/status"))
        .unwrap()
        .uid();
    assert_eq!(
        owner, 0,
        "/proc/{pid}/status of a non-dumpable worker belongs to root"
    );

    let moat = service_user();
    // The build tree may sit under a folder the service user cannot search (a `mktemp -d`
    // clone is 0700): run a copy from a folder it can.
    let exe_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(exe_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = exe_dir.path().join("moat-privsep");
    std::fs::copy(bin("moat-privsep"), &exe).unwrap();
    let out = Command::new(&exe)
        .args(["peek", &pid.to_string()])
        .uid(moat.uid.as_raw())
        .gid(moat.gid.as_raw())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["environ"], "EACCES", "{seen}");
    assert_eq!(seen["attach"], "EPERM", "{seen}");
    assert_eq!(seen["vm_readv"], "EPERM", "{seen}");
}

#[test]
fn nobody_and_a_user_that_runs_other_programs_are_refused() {
    require_root();
    let mut s = Setup::new("nobody");
    let err = s.refused();
    assert!(
        err.contains("server.user") && err.contains("nobody"),
        "{err}"
    );

    // `daemon` (uid 1) runs a program that is not moat: a shared account.
    let other = User::from_name("daemon").unwrap().expect("user daemon");
    let mut sleeper = Command::new("sleep")
        .arg("60")
        .uid(other.uid.as_raw())
        .gid(other.gid.as_raw())
        .spawn()
        .unwrap();
    let mut s = Setup::new("daemon");
    let err = s.refused();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(err.contains("`server.user` = `daemon`"), "{err}");
    assert!(err.contains(&sleeper.id().to_string()), "{err}");
    assert!(
        !s.path("data").exists(),
        "refused before the data directory is touched"
    );
}

#[test]
fn the_seccomp_filter_kills_forbidden_calls_and_allows_the_workers_own() {
    let run = |call: &str| {
        Command::new(bin("moat-privsep"))
            .args(["seccomp", call])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let allowed = run("allowed");
    assert!(allowed.status.success(), "{allowed:?}");
    let mut forbidden = vec![
        "bpf",
        "ptrace",
        "netlink",
        "packet",
        "mount",
        "unshare",
        "clone-newuser",
        "process_vm_readv",
        "keyctl",
        "io_uring_setup",
        "execve",
        "personality",
        "dumpable",
        "kill-other",
        "ioctl-other",
    ];
    if cfg!(target_arch = "x86_64") {
        forbidden.push("x32");
    }
    for call in forbidden {
        let out = run(call);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{call} must be killed by SIGSYS: {out:?}"
        );
    }
}

#[test]
fn the_worker_serves_under_seccomp_and_is_restarted_when_killed_by_sigsys() {
    require_root();
    let mut s = Setup::new("moat");
    let pid = s.start();
    assert_eq!(proc_field(pid, "Seccomp"), "2", "filter mode");
    assert!(s.healthy());

    // What the kernel does to a forbidden call; the supervisor must treat it as any death.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGSYS).unwrap();
    let again = worker_pid(s.d.log_path(), 1);
    assert_ne!(again, pid);
    s.d.wait_log("worker died; restarting");
    assert_eq!(proc_field(again, "Seccomp"), "2");
    wait_until("the new worker to serve", || s.healthy());
}

#[test]
fn the_worker_has_small_limits_and_no_descriptor_it_was_not_given() {
    require_root();
    let s = Setup::new("moat");
    // A descriptor `moat serve`'s own parent leaks to it (no close-on-exec): it must stop at
    // the supervisor.
    let marker = s.path("leaked-marker");
    let leaked = std::fs::File::create(&marker).unwrap();
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    const LEAKED_AT: i32 = 77;
    let log = s.path("serve-leak.log");
    let mut cmd = Command::new(bin("moat"));
    cmd.args(["serve", "--config"])
        .arg(s.d.config_path())
        .env("MOAT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: dup2 between fork and exec; the copy has no close-on-exec flag.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(leaked_fd, LEAKED_AT) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let serve = Killed(cmd.spawn().unwrap());
    let pid = worker_pid(&log, 0);
    let supervisor = serve.0.id();
    assert!(
        Path::new(&format!("/proc/{supervisor}/fd/{LEAKED_AT}")).exists(),
        "the supervisor did inherit the leaked descriptor (else this test proves nothing)"
    );

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        let line = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {limits}"));
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(limit("Max locked memory"), ["65536", "65536"], "{limits}");
    assert_eq!(limit("Max core file size"), ["0", "0"], "{limits}");

    let fds: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            (
                e.file_name().to_string_lossy().into_owned(),
                target.to_string_lossy().into_owned(),
            )
        })
        .collect();
    assert!(
        fds.iter().any(|(n, t)| n == "0" && t == "/dev/null"),
        "{fds:?}"
    );
    for (n, target) in &fds {
        assert!(
            !target.contains("leaked-marker"),
            "fd {n} leaked to the worker: {fds:?}"
        );
        assert!(
            !target.starts_with("anon_inode:bpf"),
            "eBPF object fd {n} reached the worker: {fds:?}"
        );
        assert!(
            !target.contains("cgroup"),
            "cgroup fd {n} reached the worker: {fds:?}"
        );
    }
    drop(leaked);
}

#[test]
fn a_symlinked_data_dir_is_refused_and_links_inside_it_are_not_followed() {
    require_root();
    // The data directory replaced by a link to a root-owned folder: following it would give
    // that folder to the service user.
    let mut s = Setup::new("moat");
    let target = s.path("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&target, s.path("data")).unwrap();
    let err = s.refused();
    assert!(
        err.contains("server.data_dir") && err.contains("symbolic link"),
        "{err}"
    );
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o755),
        "target untouched"
    );

    // A link planted inside the data directory: the data directory is handed over, the link's
    // target keeps its owner and mode.
    let mut s = Setup::new("moat");
    let precious = s.path("precious");
    std::fs::write(&precious, "root's").unwrap();
    std::fs::set_permissions(&precious, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir(s.path("data")).unwrap();
    std::os::unix::fs::symlink(&precious, s.path("data").join("planted")).unwrap();
    let _pid = s.start();
    let data = std::fs::symlink_metadata(s.path("data")).unwrap();
    assert_eq!(data.uid(), service_user().uid.as_raw());
    assert_eq!(data.mode() & 0o777, 0o700);
    let meta = std::fs::metadata(&precious).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o644));

    // A data directory that belongs to a third user is not taken over.
    let mut s = Setup::new("moat");
    let other = User::from_name("daemon").unwrap().expect("user daemon");
    std::fs::create_dir(s.path("data")).unwrap();
    nix::unistd::chown(&s.path("data"), Some(other.uid), Some(other.gid)).unwrap();
    let err = s.refused();
    assert!(err.contains("server.data_dir"), "{err}");
    assert_eq!(
        std::fs::metadata(s.path("data")).unwrap().uid(),
        other.uid.as_raw()
    );
}
