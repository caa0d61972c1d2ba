//! TC ingress attachment of the inference guard, the two ways the kernel offers:
//!
//! - **tcx** (Linux 6.6+): a bpf link, pinned at the attachment's link pin; an upgrade switches
//!   the link to the new program in place (`BPF_LINK_UPDATE`).
//! - **netlink** (older kernels, e.g. Debian 12's 6.1): a `cls_bpf` filter in direct-action
//!   mode on the interface's `clsact` qdisc (added when missing), at moat's fixed priority and
//!   handle. Such a filter is no bpf object and cannot be pinned; it stays in the kernel until
//!   removed (fail-static as a link is). moat pins the *program* the filter runs at the
//!   attachment's link pin, as the record that it attached there (status, reconcile and
//!   uninstall read it); an upgrade replaces the filter's program with one netlink change at
//!   the same priority and handle, which the kernel swaps atomically.
//!
//! Which one is the kernel's: tcx where the kernel has it, as aya decides.

use std::{fmt, io, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};
use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use serde::Serialize;

/// moat's filter on the clsact ingress: first in line (lowest priority number), one handle.
const NL_PRIORITY: u16 = 1;
const NL_HANDLE: TcHandle = TcHandle::new(0, 0x6d74);

/// How TC programs attach on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcMode {
    /// A tcx bpf link (Linux 6.6+).
    Tcx,
    /// A cls_bpf filter on a clsact qdisc, through netlink (kernels before 6.6).
    Netlink,
}

impl TcMode {
    /// This kernel's way.
    pub fn of_kernel() -> TcMode {
        // As aya's own `attach` decides (an unreadable version counts as new).
        let tcx = KernelVersion::current()
            .map(|v| v >= KernelVersion::new(6, 6, 0))
            .unwrap_or(true);
        if tcx { TcMode::Tcx } else { TcMode::Netlink }
    }

    /// For `doctor` and `segment status`.
    pub fn describe(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx link",
            TcMode::Netlink => "clsact qdisc filter via netlink (no tcx before Linux 6.6)",
        }
    }
}

impl fmt::Display for TcMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// What an attach left to pin.
pub enum Attached {
    /// tcx: the link.
    Link(FdLink),
    /// netlink: nothing (the filter lives in the qdisc); pin the program as its record.
    Filter,
}

/// Attaches `prog` (loaded) on `ifname`'s ingress the kernel's way.
pub fn attach(prog: &mut SchedClassifier, ifname: &str) -> Result<Attached> {
    match TcMode::of_kernel() {
        TcMode::Tcx => {
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| format!("cannot attach tcx ingress on interface {ifname}"))?;
            let link = FdLink::try_from(prog.take_link(id)?)
                .context("a tcx attach returned no bpf link")?;
            Ok(Attached::Link(link))
        }
        TcMode::Netlink => {
            add_clsact(ifname)?;
            let id = prog
                .attach_with_options(
                    ifname,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(nl_options()),
                )
                .with_context(|| {
                    format!("cannot attach a cls_bpf filter to clsact ingress on {ifname}")
                })?;
            keep(prog.take_link(id)?);
            Ok(Attached::Filter)
        }
    }
}

/// netlink mode: replaces the program of moat's filter on `ifname` with `prog`, atomically.
pub fn replace_filter(prog: &mut SchedClassifier, ifname: &str) -> Result<()> {
    let link = our_filter(ifname)?;
    let id = prog
        .attach_to_link(link)
        .with_context(|| format!("cannot replace the cls_bpf filter's program on {ifname}"))?;
    keep(prog.take_link(id)?);
    Ok(())
}

/// netlink mode: removes moat's filter from `ifname`. An interface that is gone took the
/// filter with it.
pub fn detach_filter(ifname: &str) -> Result<()> {
    match our_filter(ifname) {
        // Dropping the handle sends the delete (a filter already gone is no error to report).
        Ok(link) => {
            drop(link);
            Ok(())
        }
        Err(e) if is_no_device(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the object pinned at `path` is a program (a netlink filter's record) rather than a
/// link; `None` when nothing is pinned there.
pub fn pinned_is_program(path: &Path) -> Option<bool> {
    let file = super::link::open_pinned(path).ok()??;
    let target = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    Some(target.to_string_lossy().contains("bpf-prog"))
}

/// What the kernel says of moat's netlink filter on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterState {
    /// moat's filter (its priority and handle) runs the recorded program.
    Attached { program_id: u32 },
    /// moat's filter is there but runs another program (`tc filter replace` by hand).
    Replaced { program_id: u32 },
    /// No filter of moat's on the interface's clsact ingress (`tc filter del`, `tc qdisc del
    /// … clsact`), or no such interface.
    Missing,
}

impl FilterState {
    pub fn attached(self) -> bool {
        matches!(self, FilterState::Attached { .. })
    }

    /// `attached`, `replaced` or `missing`, as `segment status` shows it.
    pub fn label(self) -> &'static str {
        match self {
            FilterState::Attached { .. } => "attached",
            FilterState::Replaced { .. } => "replaced",
            FilterState::Missing => "missing",
        }
    }
}

/// netlink mode: asks the kernel for moat's filter on `ifname` (a filter dump of its clsact
/// ingress) and compares the program it runs with the one pinned at `record`. A netlink filter
/// has no bpf link the kernel could report on, so this is how the supervisor's check and
/// `segment status` see one removed behind moat's back.
pub fn filter_state(ifname: &str, record: &Path) -> Result<FilterState> {
    let recorded = aya::programs::ProgramInfo::from_pin(record)
        .with_context(|| format!("cannot read the program pinned at {}", record.display()))?
        .id();
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Ok(FilterState::Missing);
    }
    let running = nl::filter_program(ifindex, NL_PRIORITY, NL_HANDLE_RAW)
        .with_context(|| format!("cannot list the tc filters of {ifname}"))?;
    Ok(match running {
        Some(id) if id == recorded => FilterState::Attached { program_id: id },
        Some(id) => FilterState::Replaced { program_id: id },
        None => FilterState::Missing,
    })
}

/// `NL_HANDLE` as the kernel reports it (major 0, minor 0x6d74).
const NL_HANDLE_RAW: u32 = 0x6d74;

/// A filter dump over rtnetlink (aya keeps its own netlink code private).
mod nl {
    use std::{io, os::fd::AsRawFd, os::fd::FromRawFd, os::fd::OwnedFd};

    const RTM_NEWTFILTER: u16 = 44;
    const RTM_GETTFILTER: u16 = 46;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    /// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`.
    const CLSACT_INGRESS: u32 = 0xffff_fff2;
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_ID: u16 = 11;
    const NLA_TYPE_MASK: u16 = 0x3fff;
    /// nlmsghdr, then tcmsg.
    const NLMSG_HDR: usize = 16;
    const TCMSG: usize = 20;

    /// The id of the program the `bpf` filter at `priority` and `handle` on `ifindex`'s
    /// clsact ingress runs; `None` when there is no such filter.
    pub fn filter_program(ifindex: u32, priority: u16, handle: u32) -> io::Result<Option<u32>> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = Vec::with_capacity(NLMSG_HDR + TCMSG);
        req.extend(((NLMSG_HDR + TCMSG) as u32).to_ne_bytes());
        req.extend(RTM_GETTFILTER.to_ne_bytes());
        req.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend(1u32.to_ne_bytes()); // sequence
        req.extend(0u32.to_ne_bytes()); // port id: the kernel's
        req.extend([0u8; 4]); // family AF_UNSPEC, padding
        req.extend((ifindex as i32).to_ne_bytes());
        req.extend(0u32.to_ne_bytes()); // handle: any
        req.extend(CLSACT_INGRESS.to_ne_bytes());
        req.extend(0u32.to_ne_bytes()); // priority and protocol: any
        // SAFETY: a valid buffer of its length.
        if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut found = None;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: a valid buffer of its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut msgs = &buf[..n as usize];
            if msgs.is_empty() {
                return Ok(found);
            }
            while msgs.len() >= NLMSG_HDR {
                let len = u32_at(msgs, 0) as usize;
                if len < NLMSG_HDR || len > msgs.len() {
                    return Err(io::Error::other("malformed netlink message"));
                }
                let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
                let body = &msgs[NLMSG_HDR..len];
                match kind {
                    NLMSG_DONE => return Ok(found),
                    NLMSG_ERROR => {
                        let errno = body
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if errno != 0 {
                            return Err(io::Error::from_raw_os_error(-errno));
                        }
                    }
                    RTM_NEWTFILTER if body.len() >= TCMSG => {
                        let (msg_handle, info) = (u32_at(body, 8), u32_at(body, 16));
                        if msg_handle == handle && (info >> 16) as u16 == priority {
                            found = found.or(bpf_id(&body[TCMSG..]));
                        }
                    }
                    _ => {}
                }
                msgs = &msgs[align(len).min(msgs.len())..];
            }
        }
    }

    /// TCA_BPF_ID of a `bpf` filter's attributes.
    fn bpf_id(attrs: &[u8]) -> Option<u32> {
        let mut kind_bpf = false;
        let mut id = None;
        for (kind, data) in attributes(attrs) {
            match kind {
                TCA_KIND => kind_bpf = data.strip_suffix(b"\0").unwrap_or(data) == b"bpf",
                TCA_OPTIONS => {
                    id = attributes(data)
                        .find(|(k, d)| *k == TCA_BPF_ID && d.len() >= 4)
                        .map(|(_, d)| u32_at(d, 0));
                }
                _ => {}
            }
        }
        id.filter(|_| kind_bpf)
    }

    /// (type, payload) of each netlink attribute in `buf`.
    fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
        std::iter::from_fn(move || {
            if buf.len() < 4 {
                return None;
            }
            let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
            let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
            if len < 4 || len > buf.len() {
                return None;
            }
            let data = &buf[4..len];
            buf = &buf[align(len).min(buf.len())..];
            Some((kind, data))
        })
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn align(len: usize) -> usize {
        (len + 3) & !3
    }
}

fn nl_options() -> NlOptions {
    NlOptions {
        priority: NL_PRIORITY,
        handle: NL_HANDLE,
        classid: None,
    }
}

fn our_filter(ifname: &str) -> Result<SchedClassifierLink> {
    SchedClassifierLink::attached(ifname, TcAttachType::Ingress, NL_PRIORITY, NL_HANDLE, None)
        .with_context(|| format!("no interface {ifname}"))
}

/// The clsact qdisc the filter hangs on; one already there is fine.
fn add_clsact(ifname: &str) -> Result<()> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => Ok(()),
        Err(e)
            if io_error(&e).and_then(io::Error::raw_os_error) == Some(libc::EEXIST)
                || e.to_string().contains("exists") =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("cannot add a clsact qdisc to {ifname}")),
    }
}

/// A netlink filter must outlive this process: aya detaches a link when it is dropped.
fn keep(link: SchedClassifierLink) {
    std::mem::forget(link);
}

fn io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

fn is_no_device(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|c| c == libc::ENODEV)
    })
}
