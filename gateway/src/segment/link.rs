//! The bpf links of both sides: pinning a new one, switching a pinned one to a new program in
//! place (`BPF_LINK_UPDATE`, for upgrades with no gap: aya 0.14 has no wrapper for it),
//! detaching one now (`BPF_LINK_DETACH`, likewise), reading their ids for `status`, and asking
//! the kernel whether a pinned link is still attached ([`link_state`]).
//!
//! Unlinking a pin only drops a reference: the kernel frees the link (and detaches the program)
//! later, after an RCU grace period and a workqueue run. `uninstall` must not return while the
//! hooks still refuse connections, so it detaches each link explicitly with `BPF_LINK_DETACH`
//! first.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::links::{FdLink, PinnedLink};

use super::pin_paths::remove_pin;
use crate::cgroup;

/// `enum bpf_cmd` values from the kernel UAPI (`include/uapi/linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 3]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised buffer at least as large as the fields each command
    // reads; the kernel copies `size` bytes and checks the unused tail is zero.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens the object pinned at `path`; `None` when nothing is pinned there.
pub(super) fn open_pinned(path: &Path) -> io::Result<Option<OwnedFd>> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    // bpf_attr.obj_get: { __u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [cpath.as_ptr() as u64, 0, 0];
    match bpf(BPF_OBJ_GET, &mut attr) {
        // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Detaches the link pinned at `path` now. `Ok(false)` when nothing is pinned there.
fn detach_pinned(path: &Path) -> io::Result<bool> {
    let Some(link) = open_pinned(path)? else {
        return Ok(false);
    };
    // bpf_attr.link_detach: { __u32 link_fd; }
    let mut attr = [u64::from(link.as_raw_fd() as u32), 0, 0];
    bpf(BPF_LINK_DETACH, &mut attr)?;
    Ok(true)
}

/// Atomically switches the link pinned at `path` to `program`. `Ok(false)` when nothing is
/// pinned there.
fn update_pinned(path: &Path, program: BorrowedFd<'_>) -> io::Result<bool> {
    let Some(link) = open_pinned(path)? else {
        return Ok(false);
    };
    // bpf_attr.link_update: { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    let lo_hi = |lo: i32, hi: i32| u64::from(lo as u32) | (u64::from(hi as u32) << 32);
    let mut attr = [lo_hi(link.as_raw_fd(), program.as_raw_fd()), 0, 0];
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(true)
}

/// What the kernel says of a pinned link (cgroup or tcx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Attached to a cgroup: its program runs.
    Attached { link_id: u32, program_id: u32 },
    /// The link object still exists (it is pinned) but was detached — `bpftool link detach`,
    /// or its cgroup or interface went away. Its program no longer runs, and it cannot be
    /// updated.
    Severed { link_id: u32 },
    /// Nothing is pinned there.
    Missing,
}

impl LinkState {
    pub fn attached(self) -> bool {
        matches!(self, LinkState::Attached { .. })
    }

    /// `attached`, `severed` or `missing`.
    pub fn label(self) -> &'static str {
        match self {
            LinkState::Attached { .. } => "attached",
            LinkState::Severed { .. } => "severed",
            LinkState::Missing => "missing",
        }
    }
}

/// Asks the kernel about the cgroup or tcx link pinned at `path` (`BPF_OBJ_GET_INFO_BY_FD`): a
/// detached cgroup link reports cgroup id 0, a detached tcx link interface index 0.
pub fn link_state(path: &Path) -> Result<LinkState> {
    let Some(link) =
        open_pinned(path).with_context(|| format!("cannot open {}", path.display()))?
    else {
        return Ok(LinkState::Missing);
    };
    // struct bpf_link_info: { __u32 type; __u32 id; __u32 prog_id; (pad) union { struct {
    // __u64 cgroup_id; __u32 attach_type; } cgroup; struct { __u32 ifindex; __u32
    // attach_type; } tcx; … } } — the union starts at byte 16. Its first 32 bits are 0 exactly
    // when the link is detached: a cgroup id's low half is the cgroup's inode number, never 0.
    let mut info = [0u64; 8];
    // bpf_attr.info: { __u32 bpf_fd; __u32 info_len; __u64 info; }
    let mut attr = [
        u64::from(link.as_raw_fd() as u32) | ((size_of_val(&info) as u64) << 32),
        info.as_mut_ptr() as u64,
        0,
    ];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .with_context(|| format!("cannot read link info of {}", path.display()))?;
    let link_id = (info[0] >> 32) as u32;
    let program_id = info[1] as u32;
    Ok(if info[2] as u32 == 0 {
        LinkState::Severed { link_id }
    } else {
        LinkState::Attached {
            link_id,
            program_id,
        }
    })
}

/// Switches the link pinned at `path` to `program`, if one is pinned there (see
/// [`update_pinned`]).
pub fn switch_pinned(path: &Path, program: BorrowedFd<'_>) -> Result<bool> {
    update_pinned(path, program)
        .with_context(|| format!("cannot switch link {} to the new program", path.display()))
}

/// Detaches the link pinned at `path` now and removes its pin; returns how many pins were
/// removed. A program pinned there records a TC filter attached through netlink (see
/// [`super::tc`]; the pin is named `tc-<interface>`): the filter is removed instead.
pub fn detach_and_unpin(path: &Path) -> Result<usize> {
    if super::tc::pinned_is_program(path) == Some(true) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let ifname = name
            .strip_prefix("tc-")
            .with_context(|| format!("a program pinned as a link: {}", path.display()))?;
        super::tc::detach_filter(ifname)?;
    } else {
        detach_pinned(path).with_context(|| format!("cannot detach {}", path.display()))?;
    }
    remove_pin(path)
}

/// Pins a freshly attached link.
pub fn pin(link: FdLink, path: &Path) -> Result<()> {
    link.pin(path)
        .with_context(|| format!("cannot pin link {}", path.display()))?;
    Ok(())
}

/// The cgroup2 root, where both sides' cgroup hooks attach, opened for an attach.
pub fn cgroup_root() -> Result<(PathBuf, File)> {
    let path = cgroup::cgroup2_mount()?;
    let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok((path, file))
}

/// The kernel's ids of the link pinned at `path` and of the program it runs; `None`s when
/// nothing (readable) is pinned there. A program pinned there (a netlink TC filter's record)
/// has no link id.
pub fn pinned_ids(path: &Path) -> (Option<u32>, Option<u32>) {
    if super::tc::pinned_is_program(path) == Some(true) {
        let id = aya::programs::ProgramInfo::from_pin(path)
            .ok()
            .map(|i| i.id());
        return (None, id);
    }
    let info = PinnedLink::from_pin(path)
        .ok()
        .and_then(|l| FdLink::from(l).info().ok());
    (
        info.as_ref().map(|i| i.id()),
        info.as_ref().map(|i| i.program_id()),
    )
}
