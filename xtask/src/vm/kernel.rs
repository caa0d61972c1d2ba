//! The guest kernels: Debian's generic `linux-image-amd64` of a release, fetched with
//! `apt-get download` through a sources list of our own (the machine's sources, lists and
//! package cache stay as they are), unpacked and `depmod`ed under `target/vm/`, and reused
//! from there on later runs.
//!
//! The generic image, not the cloud one: the cloud kernels lack 9p, which the guest's root
//! filesystem (a read-only view of the host's) is mounted over.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// A kernel the VM suite boots.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// What `--kernel` calls it.
    pub name: &'static str,
    /// The Debian release whose kernel this is.
    pub suite: &'static str,
    /// The version of `linux-image-amd64` starts with this.
    pub version_prefix: &'static str,
}

/// Oldest first: Debian 12's kernel, then Debian 13's.
pub const KERNELS: &[Spec] = &[
    Spec {
        name: "6.1",
        suite: "bookworm",
        version_prefix: "6.1.",
    },
    Spec {
        name: "6.12",
        suite: "trixie",
        version_prefix: "6.12.",
    },
];

/// A kernel unpacked on disk.
pub struct Kernel {
    pub spec: Spec,
    /// `uname -r` of the guest, e.g. `6.1.0-50-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `modprobe -d` base: `<base>/lib/modules/<release>` holds the modules.
    pub module_base: PathBuf,
}

impl Kernel {
    pub fn modules_dir(&self) -> PathBuf {
        self.module_base.join("lib/modules").join(&self.release)
    }
}

/// The Debian sources the kernels (and the initramfs's busybox) come from.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
";

/// `apt-get`/`apt-cache` confined to `vm_dir/apt`: its own sources list, package lists and
/// cache, so the machine's apt state is untouched.
pub struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    pub fn new(vm_dir: &Path) -> Apt {
        Apt {
            dir: vm_dir.join("apt"),
            updated: false,
        }
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::sourcelist={d}/sources.list"),
            "-oDir::Etc::sourceparts=-".into(),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}/cache"),
            // Downloads land in a folder of root's; apt's `_apt` user could not write there.
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(self.dir.join(sub))?;
        }
        std::fs::write(self.dir.join("sources.list"), SOURCES)?;
        eprintln!(
            "vm-test: apt-get update (own sources list, {})",
            self.dir.display()
        );
        self.output("apt-get", &["update", "-q"])?;
        self.updated = true;
        Ok(())
    }

    fn output(&self, tool: &str, args: &[&str]) -> Result<String> {
        let out = Command::new(tool)
            .args(self.options())
            .args(args)
            .output()
            .with_context(|| format!("cannot run {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {args:?} failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The newest version of `package` that starts with `prefix`.
    fn version(&mut self, package: &str, prefix: &str) -> Result<String> {
        self.update()?;
        let madison = self.output("apt-cache", &["madison", package])?;
        madison
            .lines()
            .filter_map(|l| l.split('|').nth(1).map(str::trim))
            .find(|v| v.starts_with(prefix))
            .map(str::to_owned)
            .with_context(|| format!("no {package} {prefix}* in Debian's lists:\n{madison}"))
    }

    /// Downloads `package=version` into `dir`; returns the .deb's path.
    fn download(&mut self, package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
        self.update()?;
        std::fs::create_dir_all(dir)?;
        let status = Command::new("apt-get")
            .args(self.options())
            .args(["download", "-q", &format!("{package}={version}")])
            .current_dir(dir)
            .status()?;
        if !status.success() {
            bail!("apt-get download {package}={version} failed: {status}");
        }
        std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))
    }
}

/// The kernel `spec`, from the cache or fetched into it.
pub fn fetch(apt: &mut Apt, vm_dir: &Path, spec: Spec) -> Result<Kernel> {
    let dir = vm_dir.join(format!("kernel-{}", spec.name));
    let done = dir.join("complete");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let meta = apt.version("linux-image-amd64", spec.version_prefix)?;
        // The metapackage depends on the versioned image, e.g. linux-image-6.1.0-50-amd64.
        let show = apt.output("apt-cache", &["show", &format!("linux-image-amd64={meta}")])?;
        let image = show
            .lines()
            .find_map(|l| l.strip_prefix("Depends: "))
            .and_then(|d| d.split([' ', ',']).find(|p| p.starts_with("linux-image-")))
            .with_context(|| format!("linux-image-amd64={meta} names no image:\n{show}"))?
            .to_owned();
        eprintln!("vm-test: fetching {image} {meta} ({})", spec.suite);
        let deb = apt.download(&image, &meta, &dir)?;
        let root = dir.join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        std::fs::remove_file(&deb)?;
        let (release, base) = unpacked(&root)?;
        // The package's postinst would run depmod; modprobe in the guest needs modules.dep.
        run(Command::new("depmod").arg("-b").arg(&base).arg(&release))?;
        std::fs::write(&done, format!("{image} {meta}\n"))?;
    }
    let root = dir.join("root");
    let (release, module_base) = unpacked(&root)?;
    Ok(Kernel {
        spec,
        vmlinuz: root.join(format!("boot/vmlinuz-{release}")),
        release,
        module_base,
    })
}

/// The release and module base of an unpacked image: bookworm's package puts its modules
/// in `/lib/modules`, trixie's in `/usr/lib/modules`.
fn unpacked(root: &Path) -> Result<(String, PathBuf)> {
    let release = std::fs::read_dir(root.join("boot"))?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .with_context(|| format!("no boot/vmlinuz-* in {}", root.display()))?;
    let base = [root.to_path_buf(), root.join("usr")]
        .into_iter()
        .find(|b| b.join("lib/modules").join(&release).is_dir())
        .with_context(|| format!("no lib/modules/{release} in {}", root.display()))?;
    Ok((release, base))
}

/// Debian's static busybox (the initramfs's shell, mount and insmod), cached.
pub fn busybox(apt: &mut Apt, vm_dir: &Path) -> Result<PathBuf> {
    let dir = vm_dir.join("busybox");
    let bin = dir.join("root/bin/busybox");
    if !bin.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let version = apt.version("busybox-static", "1:1.35")?;
        let deb = apt.download("busybox-static", &version, &dir)?;
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("root")))?;
        std::fs::remove_file(&deb)?;
    }
    Ok(bin)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
