//! Kernel segmentation: moat's eBPF programs, pinned on the bpffs so enforcement outlives the
//! daemon (fail-static), for both roles a host can have:
//!
//! - [`gateway`]: on the gateway host, `cgroup_sock_addr` hooks refuse protected destinations
//!   to everyone but the gateway cgroup ([`Enforcer`]);
//! - [`inference`]: on an inference host, an ingress guard drops packets to the model ports
//!   unless they come from an allowed gateway ([`inference::Guard`]).
//!
//! Both sides are built the same way on the modules below, generic over [`side::Side`]: the
//! embedded object and its loading ([`object`]), the bpffs ([`bpffs`]), the pin layout and
//! pin removal ([`pin_paths`]), the handle on what is pinned ([`enforcement`]), the pinned maps ([`pinned_maps`], [`counters`]), links
//! ([`link`]), deny events ([`events`]), `moat segment status` ([`status`]) and
//! `moat segment uninstall` ([`uninstall`]). [`tc`] attaches TC programs as tcx links or, on
//! kernels before 6.6, as clsact filters through netlink.

mod bpffs;
mod counters;
mod enforcement;
mod events;
pub mod gateway;
pub mod inference;
mod kernel;
mod link;
mod object;
mod pin_paths;
mod pinned_maps;
mod side;
mod status;
pub mod tc;
mod uninstall;

pub use events::DenyRecord;
pub use gateway::{Deny, Enforcer, GatewayIdentity, Policy, PolicyMaps, describe_flags};
pub(crate) use object::object;
pub use object::object_len;
pub use pin_paths::Pins;
pub use status::{Status, status};
pub use uninstall::uninstall;
