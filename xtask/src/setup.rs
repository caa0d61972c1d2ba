//! `cargo xtask setup`: make a fresh machine of this kind able to build and test moat.
//!
//! Idempotent and quiet when everything is already there. Installs:
//! - the nightly `rust-src` component (the eBPF build uses `-Z build-std=core`);
//! - bpf-linker, built against the LLVM that ships inside the nightly toolchain (no system LLVM);
//! - the Debian packages the tests and benchmarks use;
//! - a bpffs at /sys/fs/bpf when none is mounted, and the system user `moat` the worker runs
//!   as (root only).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// Pinned: built from source against the nightly toolchain's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages: tools the tests drive (ip, bpftool), benchmarks (wrk, nginx) and the
/// virtualenv for the OpenAI SDK tests.
const APT_PACKAGES: &[&str] = &["iproute2", "bpftool", "wrk", "nginx-light", "python3-venv"];

pub fn run() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    apt_packages()?;
    bpffs()?;
    service_user()?;
    Ok(())
}

/// The worker runs as the unprivileged system user `moat` (`server.user`).
fn service_user() -> Result<()> {
    let exists = Command::new("id")
        .arg("moat")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    if exists || !nix_is_root() {
        return Ok(());
    }
    eprintln!("setup: creating system user moat");
    output(Command::new("useradd").args([
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "moat",
    ]))?;
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: installing nightly rust-src");
    output(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]))?;
    output(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok(())
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    home.join("bin").join(name)
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin("bpf-linker");
    if let Ok(v) = output(Command::new(&bin).arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly LLVM");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM") && n.contains(".so"))
        .context("the nightly toolchain ships no libLLVM")?;
    // libLLVM-<major>-rust-… or libLLVM.so.<major>.<minor>-rust-…
    let major: String = llvm
        .trim_start_matches("libLLVM")
        .trim_start_matches(['-', '.', 's', 'o'])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if major.is_empty() {
        bail!("cannot tell the LLVM version of {llvm}");
    }
    // bpf-linker's build looks for `$LLVM_PREFIX/lib/libLLVM.so`.
    let prefix = std::env::temp_dir().join(format!("moat-llvm-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(lib.join(&llvm), &link)?;
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        // Find the toolchain's libLLVM at run time without LD_LIBRARY_PATH.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
        )
        .status()?;
    if !status.success() {
        bail!("building bpf-linker failed: {status}");
    }
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
    }
    eprintln!("setup: installing {missing:?}");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let status = apt(&args)?;
    if !status.success() {
        bail!("apt-get install {missing:?} failed: {status}");
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
        || !nix_is_root()
    {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    let status = Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()?;
    if !status.success() {
        bail!("mount -t bpf bpf /sys/fs/bpf failed: {status}");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}
