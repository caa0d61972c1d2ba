//! `cargo xtask vm-test`: the kernel-facing test suites, unchanged, inside qemu on Debian's
//! kernels (see `docs/kernel-enforcement.md`, "Tested kernels").
//!
//! How, in the manner of virtme-ng: the guest boots Debian's kernel ([`kernel`]) with a tiny
//! initramfs ([`initramfs`]) that mounts the host's root filesystem read-only over virtio-9p
//! and runs `xtask vm-guest` ([`guest`]) on it as pid 1. So the guest runs the very test
//! executables, `moat` binaries, `ip`, users and libraries of the host at the same paths, and
//! nothing is copied. The run's output folder (`target/vm/run-<kernel>/`) is the one
//! read-write share: the plan, the module loader wrapper and each suite's log.
//!
//! The host reads the serial console for `moat-vm: …` lines: `init` (the kernel is up), `ready`
//! (the guest is set up: boot time ends), `suite <name> <ok|FAILED(..)> <secs> <passed>
//! <failed>`, and `done` (test time ends).
//!
//! KVM when it works, TCG otherwise: a guest that shows no sign of life within
//! [`KVM_PROBE`] under KVM is killed and booted again under TCG (on these machines /dev/kvm
//! exists but guests hang). `MOAT_VM_ACCEL=tcg|kvm` skips the probe.

pub mod guest;
mod initramfs;
pub mod kernel;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The kernel-facing suites (`tests/tests/<name>.rs`).
pub const SUITES: &[&str] = &[
    "hooks",
    "inference",
    "three_hosts",
    "privsep",
    "reload",
    "doctor",
    "segment",
    "deny_log",
    "nat",
    "heal",
];

/// How long a KVM guest may stay silent before KVM counts as unusable.
const KVM_PROBE: Duration = Duration::from_secs(30);
/// How much longer the fixtures wait for things under TCG than on the host.
const TCG_TIME_SCALE: u32 = 10;
/// A whole kernel's run, boot included; beyond this the guest is killed.
const RUN_LIMIT: Duration = Duration::from_secs(80 * 60);

/// What to run: kernels (by [`kernel::Spec::name`], or `all`), suites, extra test arguments.
pub struct Request {
    pub kernel: String,
    pub suites: Vec<String>,
    pub test_args: Vec<String>,
}

/// One kernel's outcome.
pub struct Outcome {
    pub line: String,
    pub ok: bool,
}

/// Builds what the guest runs, then boots each requested kernel in turn.
pub fn run(root: &Path, req: &Request) -> Result<Vec<Outcome>> {
    let specs: Vec<kernel::Spec> = match req.kernel.as_str() {
        "all" => kernel::KERNELS.to_vec(),
        name => vec![
            *kernel::KERNELS
                .iter()
                .find(|k| k.name == name)
                .with_context(|| {
                    let names: Vec<_> = kernel::KERNELS.iter().map(|k| k.name).collect();
                    format!("--kernel {name}: known kernels are {names:?} and all")
                })?,
        ],
    };
    let suites: Vec<String> = if req.suites.is_empty() {
        SUITES.iter().map(|s| s.to_string()).collect()
    } else {
        req.suites.clone()
    };
    let executables = test_executables(root, &suites)?;
    let vm_dir = root.join("target/vm");
    std::fs::create_dir_all(&vm_dir)?;
    let mut apt = kernel::Apt::new(&vm_dir);
    let busybox = kernel::busybox(&mut apt, &vm_dir)?;
    let mut accel = match std::env::var("MOAT_VM_ACCEL").ok().as_deref() {
        Some("tcg") => Some(Accel::Tcg),
        Some("kvm") => Some(Accel::Kvm),
        Some(other) => bail!("MOAT_VM_ACCEL={other}: use tcg or kvm"),
        None if Path::new("/dev/kvm").exists() => None,
        None => Some(Accel::Tcg),
    };
    let mut outcomes = Vec::new();
    for spec in specs {
        let kernel = kernel::fetch(&mut apt, &vm_dir, spec)?;
        let out_dir = vm_dir.join(format!("run-{}", spec.name));
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir)?;
        let plan = out_dir.join("plan");

        let cwd = root.join("tests");
        let mut text = String::new();
        for suite in &suites {
            let mut fields = vec![
                suite.clone(),
                executables[suite].display().to_string(),
                cwd.display().to_string(),
            ];
            fields.extend(req.test_args.iter().cloned());
            text.push_str(&fields.join("\t"));
            text.push('\n');
        }
        std::fs::write(&plan, text)?;
        let modprobe = out_dir.join("modprobe");
        std::fs::write(
            &modprobe,
            format!(
                "#!/bin/sh\nexec /usr/sbin/modprobe -d '{}' \"$@\"\n",
                kernel.module_base.display()
            ),
        )?;
        set_mode(&modprobe, 0o755)?;
        let initrd = vm_dir.join(format!("initramfs-{}.cpio", spec.name));
        // `cargo build --bins` above may have replaced this very executable (its path then
        // reads "… (deleted)"); the guest runs the one now at the path.
        let xtask = std::env::current_exe()?;
        let xtask = xtask
            .to_str()
            .and_then(|p| p.strip_suffix(" (deleted)"))
            .map_or(xtask.clone(), PathBuf::from);
        initramfs::build(
            &initrd,
            &kernel,
            &busybox,
            &out_dir,
            &[
                xtask.display().to_string(),
                "vm-guest".into(),
                plan.display().to_string(),
            ],
        )?;
        let boot = loop {
            let chosen = accel.unwrap_or(Accel::Kvm);
            // Under TCG everything runs several times slower: the fixtures' waits stretch
            // (see `moat_tests::patience`). Written per boot: the accelerator is known only then.
            let scale = match chosen {
                Accel::Kvm => 1,
                Accel::Tcg => TCG_TIME_SCALE,
            };
            std::fs::write(out_dir.join("time_scale"), scale.to_string())?;
            match boot(&kernel, &initrd, &out_dir, chosen, accel.is_none())? {
                Some(b) => {
                    accel = Some(chosen);
                    break b;
                }
                None => {
                    eprintln!(
                        "vm-test: no sign of life from a KVM guest within {KVM_PROBE:?}: \
                         using TCG (software emulation)"
                    );
                    accel = Some(Accel::Tcg);
                }
            }
        };
        outcomes.push(summarize(&kernel, &boot, &out_dir));
    }
    Ok(outcomes)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Accel {
    Kvm,
    Tcg,
}

/// What one boot showed.
struct Boot {
    accel: Accel,
    /// Until the guest was set up; None when it never was.
    boot: Option<Duration>,
    /// From set up to done; None when the guest never finished.
    tests: Option<Duration>,
    /// suite → (verdict, seconds, passed, failed)
    suites: BTreeMap<String, (String, f64, u32, u32)>,
    failure: Option<String>,
}

/// Boots `kernel`; `None` when `probing` KVM and the guest stayed silent.
fn boot(
    kernel: &kernel::Kernel,
    initrd: &Path,
    out_dir: &Path,
    accel: Accel,
    probing: bool,
) -> Result<Option<Boot>> {
    let mut qemu = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => qemu.args(["-accel", "tcg", "-cpu", "max"]),
    };
    qemu.args([
        "-m",
        "3G",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off random.trust_cpu=on",
    ])
    .arg("-virtfs")
    .arg(format!(
        "local,path=/,mount_tag={},security_model=none,readonly=on,multidevs=remap",
        initramfs::ROOT_TAG
    ))
    .arg("-virtfs")
    .arg(format!(
        "local,path={},mount_tag={},security_model=none",
        out_dir.display(),
        initramfs::OUT_TAG
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = qemu.spawn().context("cannot start qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                buf.clear();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut console = std::fs::File::create(out_dir.join("console.log"))?;
    let mut b = Boot {
        accel,
        boot: None,
        tests: None,
        suites: BTreeMap::new(),
        failure: None,
    };
    let mut alive = false;
    let name = kernel.spec.name;
    loop {
        let limit = if probing && !alive {
            KVM_PROBE
        } else {
            RUN_LIMIT
        };
        let Some(left) = limit.checked_sub(start.elapsed()) else {
            if probing && !alive {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            b.failure = Some(format!("killed after {RUN_LIMIT:?}"));
            let _ = child.kill();
            break;
        };
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // qemu ended; under KVM before the guest said anything, KVM is unusable
                // (here qemu aborts on `-cpu host`).
                if probing && !alive {
                    let _ = child.wait();
                    return Ok(None);
                }
                break;
            }
        };
        writeln!(console, "{line}")?;
        // The console may put kernel messages in front of ours on the same line.
        let Some(msg) = line
            .find("moat-vm: ")
            .map(|i| &line[i + "moat-vm: ".len()..])
        else {
            continue;
        };
        eprintln!("vm-test {name}: {msg}");
        if msg == "init" {
            alive = true;
        } else if msg == "ready" {
            b.boot = Some(start.elapsed());
        } else if msg == "done" {
            b.tests = b.boot.map(|boot| start.elapsed() - boot);
        } else if let Some(rest) = msg.strip_prefix("suite ") {
            let f: Vec<&str> = rest.split(' ').collect();
            if let [suite, verdict, secs, passed, failed] = f[..] {
                b.suites.insert(
                    suite.to_string(),
                    (
                        verdict.to_string(),
                        secs.parse().unwrap_or(0.0),
                        passed.parse().unwrap_or(0),
                        failed.parse().unwrap_or(0),
                    ),
                );
            }
        } else if msg.contains("failed") {
            alive = true;
            b.failure = Some(msg.to_string());
        }
    }
    let status = child.wait()?;
    if b.tests.is_none() && b.failure.is_none() {
        b.failure = Some(format!(
            "the guest stopped before it finished (qemu: {status}); see {}",
            out_dir.join("console.log").display()
        ));
    }
    Ok(Some(b))
}

fn summarize(kernel: &kernel::Kernel, b: &Boot, out_dir: &Path) -> Outcome {
    let secs = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()));
    let passed: u32 = b.suites.values().map(|s| s.2).sum();
    let failed: u32 = b.suites.values().map(|s| s.3).sum();
    let bad: Vec<&String> = b
        .suites
        .iter()
        .filter(|(_, s)| s.0 != "ok")
        .map(|(n, _)| n)
        .collect();
    for suite in &bad {
        let log = out_dir.join(format!("{suite}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(80).collect();
        eprintln!("---- {} (last lines of {}) ----", suite, log.display());
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
    let ok = b.failure.is_none() && bad.is_empty() && b.tests.is_some();
    let mut line = format!(
        "vm-test {} ({}, {:?}): boot {}, tests {}: {} suites, {passed} passed, {failed} failed",
        kernel.spec.name,
        kernel.release,
        b.accel,
        secs(b.boot),
        secs(b.tests),
        b.suites.len(),
    );
    if !bad.is_empty() {
        line.push_str(&format!("; failing suites: {bad:?}"));
    }
    if let Some(f) = &b.failure {
        line.push_str(&format!("; {f}"));
    }
    Outcome { line, ok }
}

/// Builds the eBPF object, the binaries and the suites' test executables; returns suite →
/// executable.
fn test_executables(root: &Path, suites: &[String]) -> Result<BTreeMap<String, PathBuf>> {
    super::build_ebpf()?;
    super::cargo(&["build", "--bins"])?;
    let mut cmd = Command::new("cargo");
    cmd.args([
        "test",
        "-p",
        "moat-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for s in suites {
        cmd.args(["--test", s]);
    }
    let out = cmd
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", out.status);
    }
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if suites.iter().any(|s| s == name) && v["profile"]["test"] == true {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for s in suites {
        if !found.contains_key(s) {
            bail!("cargo built no test executable for suite {s}");
        }
    }
    Ok(found)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
