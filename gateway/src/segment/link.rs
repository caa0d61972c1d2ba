//! Synchronous detach of a pinned bpf link.
//!
//! Unlinking a pin only drops a reference: the kernel frees the link (and detaches the program)
//! later, after an RCU grace period and a workqueue run. `uninstall` must not return while the
//! hooks still refuse connections, so it detaches each link explicitly with `BPF_LINK_DETACH`
//! first — aya 0.14 has no wrapper for that command.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `enum bpf_cmd` values from the kernel UAPI (`include/uapi/linux/bpf.h`).
const BPF_OBJ_GET: libc::c_long = 7;
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

/// Detaches the link pinned at `path` now. `Ok(false)` when nothing is pinned there.
pub fn detach_pinned(path: &Path) -> io::Result<bool> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    // bpf_attr.obj_get: { __u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [cpath.as_ptr() as u64, 0, 0];
    let fd = match bpf(BPF_OBJ_GET, &mut attr) {
        Ok(fd) => fd as i32,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // bpf_attr.link_detach: { __u32 link_fd; }
    let mut attr = [u64::from(std::os::fd::AsRawFd::as_raw_fd(&fd) as u32), 0, 0];
    bpf(BPF_LINK_DETACH, &mut attr)?;
    Ok(true)
}
