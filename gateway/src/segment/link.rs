//! Operations on pinned bpf links that aya 0.14 has no wrapper for: switching a link to a new
//! program in place (`BPF_LINK_UPDATE`, for upgrades with no gap) and detaching it now
//! (`BPF_LINK_DETACH`).
//!
//! Unlinking a pin only drops a reference: the kernel frees the link (and detaches the program)
//! later, after an RCU grace period and a workqueue run. `uninstall` must not return while the
//! hooks still refuse connections, so it detaches each link explicitly with `BPF_LINK_DETACH`
//! first.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `enum bpf_cmd` values from the kernel UAPI (`include/uapi/linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
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
fn open_pinned(path: &Path) -> io::Result<Option<OwnedFd>> {
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
pub fn detach_pinned(path: &Path) -> io::Result<bool> {
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
pub fn update_pinned(path: &Path, program: BorrowedFd<'_>) -> io::Result<bool> {
    let Some(link) = open_pinned(path)? else {
        return Ok(false);
    };
    // bpf_attr.link_update: { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    let lo_hi = |lo: i32, hi: i32| u64::from(lo as u32) | (u64::from(hi as u32) << 32);
    let mut attr = [lo_hi(link.as_raw_fd(), program.as_raw_fd()), 0, 0];
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(true)
}
