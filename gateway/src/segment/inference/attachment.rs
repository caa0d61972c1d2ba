//! Where the guard is attached: the cgroup2 root and/or tcx ingress on listed interfaces, and
//! how each attachment's link pin is named.

use moat_common::guard::IngressHook;

use crate::config::{GuardAttach, InferenceGuard};

/// One place the guard is attached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attachment {
    /// cgroup_skb ingress at the cgroup2 root.
    CgroupRoot,
    /// tcx ingress on an interface (of the daemon's network namespace).
    Tc(String),
}

impl Attachment {
    /// The file name of the link's pin.
    pub fn pin_name(&self) -> String {
        match self {
            Attachment::CgroupRoot => "cgroup_skb".to_owned(),
            Attachment::Tc(ifname) => format!("tc-{ifname}"),
        }
    }

    pub(in crate::segment) fn from_pin_name(name: &str) -> Option<Attachment> {
        if name == "cgroup_skb" {
            Some(Attachment::CgroupRoot)
        } else {
            name.strip_prefix("tc-")
                .map(|i| Attachment::Tc(i.to_owned()))
        }
    }

    pub fn hook(&self) -> IngressHook {
        match self {
            Attachment::CgroupRoot => IngressHook::CgroupSkb,
            Attachment::Tc(_) => IngressHook::Tc,
        }
    }

    /// What the config asks for.
    pub fn wanted(guard: &InferenceGuard) -> Vec<Attachment> {
        let mut out = Vec::new();
        if matches!(guard.attach, GuardAttach::CgroupSkb | GuardAttach::Both) {
            out.push(Attachment::CgroupRoot);
        }
        if matches!(guard.attach, GuardAttach::Tc | GuardAttach::Both) {
            out.extend(guard.interfaces.iter().cloned().map(Attachment::Tc));
        }
        out
    }
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attachment::CgroupRoot => write!(f, "cgroup_skb ingress at the cgroup2 root"),
            Attachment::Tc(i) => write!(f, "tc ingress on {i}"),
        }
    }
}
