//! The guest's initramfs: just enough to reach the real root. It holds a static busybox, the
//! modules that 9p over virtio needs (resolved through the kernel's `modules.dep`,
//! decompressed), `/dev/console` and an `/init` script that loads them, mounts the host's root
//! read-only and the run's output folder read-write, and hands over to `xtask vm-guest` on
//! that root (see `guest.rs`).

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use super::kernel::Kernel;

/// What mounting the host's root over virtio-9p needs; built-ins (virtio_pci on 6.12) are
/// skipped.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// 9p tags of the two shares `qemu` exports (see `mod.rs`).
pub const ROOT_TAG: &str = "hostroot";
pub const OUT_TAG: &str = "out";

/// Writes the initramfs for `kernel` to `path`. `out_dir` is mounted read-write at the same
/// path in the guest; `guest_cmd` is exec'd as pid 1 on the new root.
pub fn build(
    path: &Path,
    kernel: &Kernel,
    busybox: &Path,
    out_dir: &Path,
    guest_cmd: &[String],
) -> Result<()> {
    let modules = boot_modules(kernel)?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file(
        "bin/busybox",
        &std::fs::read(busybox).with_context(|| format!("read {}", busybox.display()))?,
        0o755,
    );
    let mut insmods = String::new();
    for (i, m) in modules.iter().enumerate() {
        let name = format!("modules/{i:02}.ko");
        cpio.file(&name, &decompressed(m)?, 0o644);
        insmods.push_str(&format!(
            "insmod /{name} || fail \"insmod {}\"\n",
            m.display()
        ));
    }
    let exec = guest_cmd
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "moat-vm: init failed: $1"; sleep 1; reboot -f; }}
echo "moat-vm: init"
mount -t sysfs sys /sys
{insmods}
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {ROOT_TAG} /newroot \
    || fail "mount the host's root (9p)"
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=512000 {OUT_TAG} '/newroot{out}' \
    || fail "mount the output folder (9p)"
umount /proc /sys
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
exec switch_root /newroot {exec}
"#,
        out = out_dir.display(),
    );
    cpio.file("init", init.as_bytes(), 0o755);
    std::fs::write(path, cpio.finish()).with_context(|| format!("write {}", path.display()))
}

/// The module files for [`BOOT_MODULES`], dependencies first.
fn boot_modules(kernel: &Kernel) -> Result<Vec<PathBuf>> {
    let dir = kernel.modules_dir();
    let dep = std::fs::read_to_string(dir.join("modules.dep"))
        .with_context(|| format!("read {}/modules.dep", dir.display()))?;
    // `kernel/fs/9p/9p.ko: kernel/fs/netfs/netfs.ko kernel/net/9p/9pnet.ko`
    let deps: Vec<(&str, Vec<&str>)> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let by_name = |name: &str| {
        deps.iter().find(|(m, _)| {
            let file = m.rsplit('/').next().unwrap_or(m);
            let stem = file.split('.').next().unwrap_or(file);
            stem.replace('-', "_") == name
        })
    };
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in BOOT_MODULES {
        let Some((module, needs)) = by_name(name) else {
            continue; // built in
        };
        // modules.dep lists a module's dependencies so that loading them last to first works.
        for m in needs.iter().rev().chain(std::iter::once(module)) {
            if seen.insert(*m) {
                order.push(dir.join(m));
            }
        }
    }
    if order.is_empty() {
        bail!("none of {BOOT_MODULES:?} is a module of {}", kernel.release);
    }
    Ok(order)
}

/// A module as `insmod` takes it: trixie's are xz-compressed.
fn decompressed(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz").arg("-dc").arg(path).output()?;
        if !out.status.success() {
            bail!("xz -dc {} failed", path.display());
        }
        return Ok(out.stdout);
    }
    Ok(std::fs::read(path)?)
}

/// A `newc` cpio archive, the format the kernel unpacks an initramfs from.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() + 1,
            0, // check
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf.flush().expect("a Vec takes every write");
        self.buf
    }
}
