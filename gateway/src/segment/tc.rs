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
