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

/// Debian packages: tools the tests drive (ip, bpftool, nft for the NAT tests), benchmarks
/// (wrk, nginx) and the virtualenv for the OpenAI SDK tests, openssl for the upstream TLS test
/// certificates, the servers of the shared store and quotas (the replica tests start
/// throw-away instances of PostgreSQL and Redis from these packages' binaries), and qemu and
/// kmod (depmod, and modprobe inside the guest) for `cargo xtask vm-test`.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "nftables",
    "wrk",
    "nginx-light",
    "python3-venv",
    "openssl",
    "postgresql",
    "redis-server",
    "qemu-system-x86",
    "kmod",
];

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
    let nightly = Nightly::detect()?;
    let lib = find_libllvm(&nightly.lib_dir(), &nightly.llvm_major())?;
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION}\nLLVM {}\nlibLLVM {}\n",
        nightly.llvm_version,
        lib.display()
    );
    let stamp_file = bpf_linker_stamp();
    let current = std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str())
        && output(Command::new(&bin).arg("--version"))
            .is_ok_and(|v| v.contains(BPF_LINKER_VERSION));
    if current {
        return Ok(());
    }
    let major = nightly.llvm_major();
    let feature = format!("llvm-{major}");
    if let Some(supported) = bpf_linker_llvm_features() {
        check_llvm_supported(&supported, &nightly)?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} ({})",
        nightly.llvm_version,
        lib.display()
    );
    // bpf-linker's build looks for `$LLVM_PREFIX/lib/libLLVM.so`.
    let prefix = std::env::temp_dir().join(format!("moat-llvm-{}", nightly.llvm_version));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    let _ = std::fs::remove_file(&stamp_file);
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", &feature])
        .env("LLVM_PREFIX", &prefix)
        // Find the toolchain's libLLVM at run time without LD_LIBRARY_PATH.
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", nightly.lib_dir().display()),
        )
        .status()?;
    if !status.success() {
        bail!(
            "building bpf-linker {BPF_LINKER_VERSION} with `{feature}` against {} failed: {status}",
            lib.display()
        );
    }
    std::fs::write(&stamp_file, stamp)
        .with_context(|| format!("cannot write {}", stamp_file.display()))?;
    Ok(())
}

/// Records which LLVM the installed bpf-linker was linked against: one built for an older LLVM
/// than rustc emits fails only later, at link time, with a cryptic error.
fn bpf_linker_stamp() -> PathBuf {
    cargo_bin(".bpf-linker.moat-stamp")
}

/// The installed nightly toolchain, as `rustc +nightly --version --verbose` describes it.
pub struct Nightly {
    /// `1.101.0-nightly`
    pub release: String,
    /// `23.1.0`
    pub llvm_version: String,
    sysroot: PathBuf,
}

impl Nightly {
    pub fn detect() -> Result<Self> {
        let verbose = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))
            .context("no nightly toolchain: `rustup toolchain install nightly`")?;
        let field = |name: &str| {
            verbose
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .with_context(|| format!("`rustc +nightly -vV` prints no `{name}` line"))
        };
        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
        Ok(Self {
            release: field("release:")?,
            llvm_version: field("LLVM version:")?,
            sysroot: PathBuf::from(sysroot.trim()),
        })
    }

    pub fn llvm_major(&self) -> String {
        llvm_major(&self.llvm_version)
    }

    fn lib_dir(&self) -> PathBuf {
        self.sysroot.join("lib")
    }
}

fn llvm_major(version: &str) -> String {
    version.split('.').next().unwrap_or_default().to_owned()
}

/// The LLVM majors bpf-linker's `llvm-<N>` features cover, from the registry's manifest; `None`
/// when the registry cannot say (the build then reports for itself).
fn bpf_linker_llvm_features() -> Option<Vec<String>> {
    let info = output(Command::new("cargo").args([
        "info",
        "--quiet",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
    ]))
    .ok()?;
    let majors = llvm_features(&info);
    (!majors.is_empty()).then_some(majors)
}

/// The `N` of every `llvm-N` feature in `cargo info` output, in ascending order.
fn llvm_features(cargo_info: &str) -> Vec<String> {
    let mut majors: Vec<String> = cargo_info
        .lines()
        .filter_map(|l| {
            let feature = l.trim_start_matches([' ', '+']).split_whitespace().next()?;
            let major = feature.strip_prefix("llvm-")?;
            major
                .chars()
                .all(|c| c.is_ascii_digit())
                .then(|| major.to_owned())
        })
        .collect();
    majors.sort_by_key(|m| m.parse::<u32>().unwrap_or(0));
    majors
}

/// One sentence naming both versions when bpf-linker cannot be built for the nightly's LLVM.
fn check_llvm_supported(supported: &[String], nightly: &Nightly) -> Result<()> {
    let major = nightly.llvm_major();
    if supported.contains(&major) {
        return Ok(());
    }
    bail!(
        "bpf-linker {BPF_LINKER_VERSION} supports LLVM {} but the installed nightly ({}) uses \
         LLVM {}: raise BPF_LINKER_VERSION in xtask/src/setup.rs to a release with an \
         `llvm-{major}` feature",
        supported.join(", "),
        nightly.release,
        nightly.llvm_version
    )
}

/// The real libLLVM shared library in a toolchain's `lib/`, for LLVM `major`.
///
/// Recent nightlies ship two entries: `libLLVM-<major>-rust-<ver>.so`, a linker script
/// (`INPUT(libLLVM.so.<major>.<minor>-rust-<ver>)`), beside the ELF library it names. Every
/// candidate is resolved to the ELF file it stands for (a script is followed to the file it
/// names), so the answer does not depend on directory order.
fn find_libllvm(lib_dir: &Path, major: &str) -> Result<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir(lib_dir)
        .with_context(|| format!("cannot read {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("libLLVM") && n.contains(".so"))
        .collect();
    names.sort();
    let mut found: Vec<PathBuf> = Vec::new();
    for name in &names {
        let real = resolve_shared_object(&lib_dir.join(name), 4)?;
        if !found.contains(&real) {
            found.push(real);
        }
    }
    // Several LLVMs in one toolchain would be new; take the one rustc reports.
    let versioned = |p: &PathBuf| {
        let n = p.file_name().unwrap_or_default().to_string_lossy();
        n.contains(&format!(".so.{major}")) || n.contains(&format!("LLVM-{major}"))
    };
    match found.as_slice() {
        [] => bail!(
            "the nightly toolchain ships no libLLVM in {}",
            lib_dir.display()
        ),
        [only] => Ok(only.clone()),
        many => many
            .iter()
            .find(|p| versioned(p))
            .cloned()
            .with_context(|| {
                format!(
                    "{} holds several libLLVM libraries ({many:?}) and none for LLVM {major}",
                    lib_dir.display()
                )
            }),
    }
}

/// Follows symlinks and GNU ld linker scripts (`INPUT(…)` / `GROUP(…)`) to the ELF file they
/// stand for.
fn resolve_shared_object(path: &Path, depth: u32) -> Result<PathBuf> {
    let real = std::fs::canonicalize(path)
        .with_context(|| format!("{} points nowhere", path.display()))?;
    let mut head = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(&real)
            .with_context(|| format!("cannot open {}", real.display()))?;
        let n = f.read(&mut head)?;
        if n == 4 && &head == b"\x7fELF" {
            return Ok(real);
        }
    }
    if depth == 0 {
        bail!("{}: linker scripts nest too deep", path.display());
    }
    let script = std::fs::read_to_string(&real)
        .with_context(|| format!("{} is neither ELF nor a linker script", real.display()))?;
    let target = linker_script_input(&script).with_context(|| {
        format!(
            "{} is neither ELF nor a linker script naming a library",
            real.display()
        )
    })?;
    let target = Path::new(&target);
    let target = if target.is_absolute() {
        target.to_path_buf()
    } else {
        real.parent().unwrap_or(Path::new("/")).join(target)
    };
    resolve_shared_object(&target, depth - 1)
}

/// The first file a linker script's `INPUT(…)` or `GROUP(…)` names (`AS_NEEDED` unwrapped).
fn linker_script_input(script: &str) -> Option<String> {
    let open = ["INPUT", "GROUP"]
        .iter()
        .filter_map(|k| {
            let at = script.find(k)? + k.len();
            script[at..].trim_start().starts_with('(').then_some(at)
        })
        .min()?;
    let rest = &script[open..];
    rest.split(|c: char| c.is_whitespace() || matches!(c, ',' | '(' | ')'))
        .find(|t| !t.is_empty() && *t != "AS_NEEDED")
        .map(str::to_owned)
}

/// One line per toolchain piece, printed at the start of `cargo xtask test` so a CI log shows
/// what it ran with.
pub fn toolchain_report() -> String {
    let first_line = |cmd: &mut Command| {
        output(cmd)
            .map(|s| s.lines().next().unwrap_or_default().to_owned())
            .unwrap_or_else(|e| format!("unavailable ({e})"))
    };
    let stable = first_line(Command::new("rustc").arg("--version"));
    let nightly = first_line(Command::new("rustc").args(["+nightly", "--version"]));
    let llvm = Nightly::detect()
        .map(|n| n.llvm_version)
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let linker = first_line(Command::new(cargo_bin("bpf-linker")).arg("--version"));
    format!(
        "toolchain: stable {stable}\ntoolchain: nightly {nightly}, LLVM {llvm}\ntoolchain: {linker}"
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch `lib/` folder, removed on drop.
    struct LibDir(PathBuf);

    impl LibDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("xtask-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn elf(&self, name: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, b"\x7fELF\x02\x01\x01rest-of-a-library").unwrap();
            p.canonicalize().unwrap()
        }
        fn file(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }
    }

    impl Drop for LibDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_a_lone_shared_object() {
        let dir = LibDir::new("lone");
        let lib = dir.elf("libLLVM-19-rust-1.85.0-nightly.so");
        dir.elf("librustc_driver-abc.so");
        assert_eq!(find_libllvm(&dir.0, "19").unwrap(), lib);
    }

    #[test]
    fn follows_a_linker_script_to_the_library_it_names() {
        // The layout of rustc 1.101.0-nightly (LLVM 23): the script sorts first.
        let dir = LibDir::new("script");
        dir.file(
            "libLLVM-23-rust-1.101.0-nightly.so",
            "INPUT(libLLVM.so.23.1-rust-1.101.0-nightly)\n",
        );
        let lib = dir.elf("libLLVM.so.23.1-rust-1.101.0-nightly");
        assert_eq!(find_libllvm(&dir.0, "23").unwrap(), lib);
    }

    #[test]
    fn follows_symlinks_and_group_scripts() {
        let dir = LibDir::new("group");
        let lib = dir.elf("libLLVM.so.22.1-rust-1.97.0-nightly");
        dir.file(
            "libLLVM-22-rust-1.97.0-nightly.so",
            "/* GNU ld script */\nGROUP ( AS_NEEDED ( libLLVM.so.22.1-rust-1.97.0-nightly ) )",
        );
        std::os::unix::fs::symlink(&lib, dir.0.join("libLLVM.so")).unwrap();
        assert_eq!(find_libllvm(&dir.0, "22").unwrap(), lib);
        dir.file(
            "libLLVM-22-rust-1.97.0-nightly.so",
            "GROUP(AS_NEEDED(libLLVM.so.22.1-rust-1.97.0-nightly))",
        );
        assert_eq!(find_libllvm(&dir.0, "22").unwrap(), lib);
    }

    #[test]
    fn a_script_naming_a_missing_file_is_an_error() {
        let dir = LibDir::new("dangling");
        dir.file("libLLVM-23-rust-x.so", "INPUT(libLLVM.so.23.1-gone)");
        let err = find_libllvm(&dir.0, "23").unwrap_err();
        assert!(format!("{err:#}").contains("points nowhere"), "{err:#}");
    }

    #[test]
    fn an_empty_toolchain_is_an_error() {
        let dir = LibDir::new("empty");
        dir.elf("librustc_driver-abc.so");
        assert!(find_libllvm(&dir.0, "23").is_err());
    }

    #[test]
    fn picks_the_major_rustc_reports_among_several() {
        let dir = LibDir::new("several");
        dir.elf("libLLVM.so.22.1-rust-1.97.0-nightly");
        let lib = dir.elf("libLLVM.so.23.1-rust-1.101.0-nightly");
        assert_eq!(find_libllvm(&dir.0, "23").unwrap(), lib);
    }

    /// What `cargo info --quiet bpf-linker@0.13.0` prints.
    const CARGO_INFO: &str = "bpf-linker #BPF #eBPF #linker #llvm
BPF static linker
version: 0.13.0
features:
 +default          = [llvm-23]
  llvm-23          = [dep:llvm-sys-23]
  llvm-21          = [dep:llvm-sys-21]
  llvm-22          = [dep:llvm-sys-22]
  llvm-link-static = []
  no-llvm-linking  = []
";

    #[test]
    fn reads_the_llvm_features_of_bpf_linker() {
        assert_eq!(llvm_features(CARGO_INFO), ["21", "22", "23"]);
    }

    #[test]
    fn an_unsupported_llvm_is_one_sentence_naming_both_versions() {
        let nightly = |llvm: &str| Nightly {
            release: "1.104.0-nightly".into(),
            llvm_version: llvm.into(),
            sysroot: PathBuf::new(),
        };
        let supported = llvm_features(CARGO_INFO);
        assert!(check_llvm_supported(&supported, &nightly("23.1.4")).is_ok());
        let err = check_llvm_supported(&supported, &nightly("24.0.1"))
            .unwrap_err()
            .to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("LLVM 21, 22, 23"), "{err}");
        assert!(err.contains("LLVM 24.0.1"), "{err}");
        assert!(err.contains("1.104.0-nightly"), "{err}");
    }

    #[test]
    fn llvm_major_is_the_first_component() {
        assert_eq!(llvm_major("23.1.0"), "23");
        assert_eq!(llvm_major("22.1.4"), "22");
    }
}
