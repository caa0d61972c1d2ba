//! Inside the guest: `xtask vm-guest <plan>` is pid 1 on the host's (read-only) root. It
//! mounts what the kernel tests need (proc, sys, dev, cgroup2, bpffs, tracefs, tmpfs on /tmp,
//! /run and /var/tmp), points the kernel's module loader at the guest kernel's modules, loads
//! what the NAT tests' nft rules need, brings up loopback, then runs the plan in a child (`vm-guest --run <plan>`) while it reaps orphans
//! as an init must (a test checking that a process is gone must not see a zombie), and
//! finally reboots, which ends qemu (`-no-reboot`).
//!
//! The plan is a file of `suite<TAB>executable<TAB>working dir<TAB>args…` lines in the run's
//! output folder; each suite's output goes to `<suite>.log` beside it, and one line per suite
//! to the console, which the host reads (`moat-vm: …` lines, see `mod.rs`).

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// Pid 1: set up, run the plan in a child, reap, reboot. Never returns.
pub fn pid1(plan: &Path) -> ! {
    match setup(plan) {
        Ok(()) => {
            println!("moat-vm: ready");
            match Command::new(std::env::current_exe().expect("own path"))
                .args(["vm-guest", "--run"])
                .arg(plan)
                .spawn()
            {
                Ok(child) => reap_until(child.id() as libc::pid_t),
                Err(e) => println!("moat-vm: setup failed: cannot start the runner: {e}"),
            }
        }
        Err(e) => println!("moat-vm: setup failed: {e:#}"),
    }
    // SAFETY: plain syscalls; pid 1 ends the machine here.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    unreachable!("reboot returned")
}

/// Reaps every child (orphans included) until `runner` exits.
fn reap_until(runner: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == runner
            || (pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            return;
        }
    }
}

fn setup(plan: &Path) -> Result<()> {
    // (type, target, options)
    let system: &[(&str, &str, &str)] = &[
        ("proc", "/proc", ""),
        ("sysfs", "/sys", ""),
        ("devtmpfs", "/dev", ""),
        ("devpts", "/dev/pts", ""),
        ("tmpfs", "/dev/shm", "mode=1777"),
    ];
    let kernel: &[(&str, &str, &str)] = &[
        ("cgroup2", "/sys/fs/cgroup", ""),
        ("bpf", "/sys/fs/bpf", ""),
        ("tracefs", "/sys/kernel/tracing", ""),
        ("debugfs", "/sys/kernel/debug", ""),
    ];
    for (fs, target, options) in system {
        // /dev/pts and /dev/shm are made in the fresh devtmpfs; every other target exists
        // on the host's root.
        let _ = std::fs::create_dir_all(target);
        mount(fs, target, options)?;
    }
    // Scratch space is a fresh tmpfs, which hides what the host has there. The workspace may
    // be there (CI clones wherever it likes, /tmp included): what the guest needs from under
    // a scratch mount point is set aside on a bind mount and moved back on top of the tmpfs.
    let kept = kept_under_scratch(plan)?;
    for (i, dir) in kept.iter().enumerate() {
        let aside = PathBuf::from(format!("/dev/.moat-kept-{i}"));
        std::fs::create_dir_all(&aside)?;
        remount(dir, &aside, libc::MS_BIND | libc::MS_REC)?;
    }
    for target in SCRATCH {
        let mode = if *target == "/run" {
            "mode=755"
        } else {
            "mode=1777"
        };
        mount("tmpfs", target, mode)?;
    }
    for (i, dir) in kept.iter().enumerate() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        remount(
            Path::new(&format!("/dev/.moat-kept-{i}")),
            dir,
            libc::MS_MOVE,
        )?;
    }
    for (fs, target, options) in kernel {
        mount(fs, target, options)?;
    }
    // The host's root has no modules of this kernel; the wrapper beside the plan runs
    // `modprobe -d <the unpacked package>`, for the kernel's own requests and iptables'.
    let modprobe = out_dir(plan).join("modprobe");
    std::fs::write(
        "/proc/sys/kernel/modprobe",
        modprobe.as_os_str().as_encoded_bytes(),
    )
    .context("set /proc/sys/kernel/modprobe")?;
    // What the NAT tests' nft rules need, loaded up front: the kernel would load each on first
    // use through the wrapper too, but an nft transaction that triggers a module load is
    // aborted and replayed, which costs under TCG and hides a module missing from the package.
    run(Command::new(&modprobe).arg("-a").args(NAT_MODULES))?;
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    Ok(())
}

/// nf_tables with NAT chains (`dnat`, `redirect`) for both families, and connection tracking,
/// which NAT runs on.
const NAT_MODULES: &[&str] = &[
    "nf_tables",
    "nf_conntrack",
    "nf_nat",
    "nft_chain_nat",
    "nft_nat",
    "nft_redir",
];

/// Mount points that get a fresh tmpfs: the tests' scratch space.
const SCRATCH: &[&str] = &["/tmp", "/run", "/var/tmp"];

/// The folders right below a [`SCRATCH`] mount point that hold something the guest runs or
/// writes: this program, the run's output folder, the plan's executables and working dirs
/// (e.g. `/tmp/clone` for a workspace at `/tmp/clone`).
fn kept_under_scratch(plan: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(plan).with_context(|| format!("read {}", plan.display()))?;
    let mut paths = vec![std::env::current_exe()?, out_dir(plan)];
    for line in text.lines() {
        paths.extend(line.split('\t').skip(1).take(2).map(PathBuf::from));
    }
    let mut kept: Vec<PathBuf> = Vec::new();
    for path in &paths {
        for scratch in SCRATCH {
            if let Ok(rest) = path.strip_prefix(scratch)
                && let Some(first) = rest.components().next()
            {
                let dir = Path::new(scratch).join(first);
                if !kept.contains(&dir) {
                    kept.push(dir);
                }
            }
        }
    }
    Ok(kept)
}

/// mount(2) of an existing mount or folder: a bind (`MS_BIND`) or a move (`MS_MOVE`).
fn remount(from: &Path, to: &Path, flags: libc::c_ulong) -> Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL");
    let (from_c, to_c) = (c(from), c(to));
    // SAFETY: NUL-terminated strings that outlive the call; no type or data for these flags.
    let r = unsafe {
        libc::mount(
            from_c.as_ptr(),
            to_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        bail!(
            "mount {} on {} (flags {flags:#x}): {}",
            from.display(),
            to.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// mount(2) directly: every exec costs under TCG.
fn mount(fs: &str, target: &str, options: &str) -> Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (fs_c, target_c, options_c) = (c(fs), c(target), c(options));
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            fs_c.as_ptr(),
            target_c.as_ptr(),
            fs_c.as_ptr(),
            0,
            options_c.as_ptr().cast(),
        )
    };
    if r != 0 {
        bail!(
            "mount -t {fs} {target}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn out_dir(plan: &Path) -> PathBuf {
    plan.parent().expect("plan in a folder").to_path_buf()
}

/// The runner: each suite of the plan in turn, one console line per suite.
pub fn run_plan(plan: &Path) -> Result<()> {
    let text = std::fs::read_to_string(plan).with_context(|| format!("read {}", plan.display()))?;
    let scale = std::fs::read_to_string(out_dir(plan).join("time_scale")).unwrap_or_default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let mut fields = line.split('\t');
        let (Some(suite), Some(exe), Some(cwd)) = (fields.next(), fields.next(), fields.next())
        else {
            bail!("bad plan line {line:?}");
        };
        let log_path = out_dir(plan).join(format!("{suite}.log"));
        let log = File::create(&log_path)?;
        let args: Vec<&str> = fields.collect();
        let mut cmd = Command::new(exe);
        cmd.args(&args);
        // Under TCG each test's daemon, clients and probes compete for two emulated CPUs on a
        // shared host: side by side, tests starve each other's daemons (a worker that takes
        // more than the supervisor's 30 s to apply its first config, health checks timing
        // out). One test at a time there.
        if scale.trim() != "1" && !args.iter().any(|a| a.starts_with("--test-threads")) {
            cmd.arg("--test-threads=1");
        }
        let start = Instant::now();
        let status = cmd
            .env("MOAT_TEST_TIME_SCALE", scale.trim())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status();
        let secs = start.elapsed().as_secs_f64();
        let (passed, failed) = counts(&std::fs::read_to_string(&log_path).unwrap_or_default());
        let verdict = match status {
            Ok(s) if s.success() => "ok".to_string(),
            // One word: the host splits this line at spaces.
            Ok(s) => format!(
                "FAILED(exit={})",
                s.code().map_or("signal".into(), |c| c.to_string())
            ),
            Err(e) => {
                println!("moat-vm: cannot start {exe}: {e}");
                "FAILED(not-started)".into()
            }
        };
        println!("moat-vm: suite {suite} {verdict} {secs:.1} {passed} {failed}");
    }
    println!("moat-vm: done");
    Ok(())
}

/// Passed and failed tests summed over the `test result:` lines of libtest's output.
pub fn counts(log: &str) -> (u32, u32) {
    let mut total = (0, 0);
    for line in log.lines().filter(|l| l.starts_with("test result:")) {
        let num = |what: &str| {
            line.split(';')
                .find_map(|part| part.trim().strip_suffix(what))
                .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u32>().ok())
                .unwrap_or(0)
        };
        total.0 += num(" passed");
        total.1 += num(" failed");
    }
    total
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::counts;

    #[test]
    fn counts_sum_every_test_result_line() {
        let log = "running 2 tests\n\
            test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s\n\
            test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.0s\n";
        assert_eq!(counts(log), (5, 1));
        assert_eq!(counts("no summary"), (0, 0));
    }
}
