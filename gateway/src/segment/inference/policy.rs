//! The guard's policy: which ports are guarded and which source prefixes may reach each.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use ipnet::IpNet;

use crate::config::InferenceGuard;

/// One complete guard policy: written into the idle slot, then made active in one step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuardPolicy {
    pub ports: BTreeSet<u16>,
    /// (model port, allowed source prefix).
    pub sources: BTreeSet<(u16, IpNet)>,
}

impl GuardPolicy {
    /// Every allowed gateway prefix for every model port.
    pub fn from_config(guard: &InferenceGuard) -> GuardPolicy {
        let ports: BTreeSet<u16> = guard.model_ports.iter().copied().collect();
        let sources = ports
            .iter()
            .flat_map(|&p| guard.allowed.iter().map(move |n| (p, *n)))
            .collect();
        GuardPolicy { ports, sources }
    }

    /// The verdict the kernel gives a packet from `src` to `port`: `None` when the port is
    /// not guarded, otherwise whether it passes.
    pub fn allows(&self, src: IpAddr, port: u16) -> Option<bool> {
        if !self.ports.contains(&port) {
            return None;
        }
        let src = crate::segment::pinned_maps::unmap_v4(src);
        Some(
            self.sources
                .iter()
                .any(|(p, net)| *p == port && net.contains(&src)),
        )
    }
}

impl fmt::Display for GuardPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for port in &self.ports {
            let allowed: Vec<String> = self
                .sources
                .iter()
                .filter(|(p, _)| p == port)
                .map(|(_, n)| n.to_string())
                .collect();
            if allowed.is_empty() {
                writeln!(f, "  port {port:<5} allowed from: nobody")?;
            } else {
                writeln!(f, "  port {port:<5} allowed from: {}", allowed.join(", "))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn policy(toml: &str) -> GuardPolicy {
        let c = Config::from_str(Path::new("/t.toml"), toml).unwrap();
        GuardPolicy::from_config(c.inference.as_ref().unwrap())
    }

    #[test]
    fn allowlist_applies_to_every_model_port_and_maps_v4() {
        let p = policy(
            "[segmentation.inference]\nmodel_ports = [8000, 8001]\n\
             allowed_gateways = [\"10.0.0.1/32\", \"fd00::/64\", \"::ffff:192.0.2.0/120\"]\n",
        );
        for port in [8000, 8001] {
            assert_eq!(p.allows("10.0.0.1".parse().unwrap(), port), Some(true));
            assert_eq!(p.allows("10.0.0.2".parse().unwrap(), port), Some(false));
            assert_eq!(p.allows("fd00::7".parse().unwrap(), port), Some(true));
            assert_eq!(
                p.allows("::ffff:10.0.0.1".parse().unwrap(), port),
                Some(true)
            );
            assert_eq!(p.allows("192.0.2.9".parse().unwrap(), port), Some(true));
        }
        assert_eq!(p.allows("10.0.0.1".parse().unwrap(), 9000), None);
    }

    #[test]
    fn empty_allowlist_denies_everyone() {
        let p = policy("[segmentation.inference]\nmodel_ports = [8000]\n");
        assert_eq!(p.allows("127.0.0.1".parse().unwrap(), 8000), Some(false));
        assert!(p.sources.is_empty());
    }
}
