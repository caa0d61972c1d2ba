//! The kernel policy derived from the config: which destinations are protected, which the
//! gateway may reach, and who the gateway is.
//!
//! Routing and segmentation read the same pools, so they cannot drift apart.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use moat_common::{dest, slot_flags};

use crate::config::{Config, DestinationRule};

/// Who the gateway is, as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GatewayIdentity {
    pub cgroup_id: u64,
    pub level: u32,
}

/// One complete policy: written into the idle slot, then made active in one step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// `None`: nobody is the gateway; every protected destination is refused to everyone.
    pub gateway: Option<GatewayIdentity>,
    pub egress_lockdown: bool,
    /// Destination → [`dest`] flags, with inherited flags already folded in (see
    /// [`Policy::insert`]).
    pub destinations: BTreeMap<DestinationRule, u32>,
}

impl Policy {
    /// The policy for `config`, without a gateway identity (the daemon adds it once the
    /// gateway cgroup exists).
    pub fn from_config(config: &Config) -> Policy {
        let seg = config.segmentation();
        let mut rules: Vec<(DestinationRule, u32)> = Vec::new();
        for pool in config.pools.values() {
            let flags = if pool.protect {
                dest::PROTECTED | dest::GATEWAY_EGRESS
            } else {
                dest::GATEWAY_EGRESS
            };
            for addr in &pool.addrs {
                for net in reachable_as(addr.ip()) {
                    rules.push((
                        DestinationRule {
                            net,
                            port: addr.port(),
                        },
                        flags,
                    ));
                }
            }
        }
        for rule in &config.extra_protected {
            let nets = if rule.net.prefix_len() == full_len(rule.net) {
                reachable_as(rule.net.addr())
            } else if covers_loopback(rule.net) {
                // A loopback prefix reaches the local host like a loopback host does.
                let mut nets = reachable_as(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
                nets.push(rule.net);
                nets
            } else {
                vec![rule.net]
            };
            for net in nets {
                let rule = DestinationRule {
                    net,
                    port: rule.port,
                };
                rules.push((rule, dest::PROTECTED | dest::GATEWAY_EGRESS));
            }
        }
        for rule in &config.egress_allow {
            rules.push((*rule, dest::GATEWAY_EGRESS));
        }
        let mut policy = Policy {
            gateway: None,
            egress_lockdown: seg.egress_lockdown,
            destinations: BTreeMap::new(),
        };
        for (rule, flags) in rules {
            policy.insert(rule, flags);
        }
        policy.fold_inherited();
        policy
    }

    /// Adds `flags` to the entry for `rule`.
    pub fn insert(&mut self, rule: DestinationRule, flags: u32) {
        *self.destinations.entry(rule).or_default() |= flags;
    }

    /// The trie answers with the longest matching prefix only, so a narrow entry must carry the
    /// flags of every wider entry that covers it: an `egress_allow` /32 inside a protected /8
    /// must stay protected.
    pub fn fold_inherited(&mut self) {
        let snapshot = self.destinations.clone();
        for (rule, flags) in self.destinations.iter_mut() {
            for len in 0..rule.net.prefix_len() {
                let wider = DestinationRule {
                    net: truncate(rule.net, len),
                    port: rule.port,
                };
                if let Some(f) = snapshot.get(&wider) {
                    *flags |= f;
                }
            }
        }
    }

    /// Everything either policy allows or protects: the kernel holds this while the worker
    /// switches from one config to the other, so neither side's connections are refused.
    pub fn union(&self, other: &Policy) -> Policy {
        let mut p = self.clone();
        p.egress_lockdown = self.egress_lockdown && other.egress_lockdown;
        for (rule, flags) in &other.destinations {
            p.insert(*rule, *flags);
        }
        p.fold_inherited();
        p
    }

    pub fn slot_flags(&self) -> u32 {
        if self.egress_lockdown {
            slot_flags::EGRESS_LOCKDOWN
        } else {
            0
        }
    }

    /// The verdict this policy gives, computed in userspace the way the kernel does — used by
    /// tests and by `moat segment status` to explain entries.
    pub fn flags_for(&self, ip: IpAddr, port: u16) -> u32 {
        let ip = crate::segment::pinned_maps::unmap_v4(ip);
        self.destinations
            .iter()
            .filter(|(r, _)| r.port == port && r.net.contains(&ip))
            .max_by_key(|(r, _)| r.net.prefix_len())
            .map(|(_, f)| *f)
            .unwrap_or(0)
    }
}

fn full_len(net: IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 32,
        IpNet::V6(_) => 128,
    }
}

fn truncate(net: IpNet, len: u8) -> IpNet {
    IpNet::new(net.addr(), len)
        .expect("shorter prefix is valid")
        .trunc()
}

/// Whether `net` holds a loopback address (`127.0.0.0/8` or part of it, `::1/128`, or a wider
/// prefix holding one of them): then the local host is reachable through it.
fn covers_loopback(net: IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.contains(&std::net::Ipv4Addr::LOCALHOST) || n.addr().is_loopback(),
        IpNet::V6(n) => n.contains(&std::net::Ipv6Addr::LOCALHOST),
    }
}

/// Every address under which a host address is reachable from this machine. A loopback
/// service is reachable through the whole loopback range and through the unspecified
/// address (`connect(0.0.0.0)` and `connect(::)` go to the local host), so all of them are
/// protected together.
fn reachable_as(ip: IpAddr) -> Vec<IpNet> {
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        vec![
            "127.0.0.0/8".parse().unwrap(),
            "0.0.0.0/32".parse().unwrap(),
            "::1/128".parse().unwrap(),
            "::/128".parse().unwrap(),
        ]
    } else {
        vec![IpNet::from(ip)]
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.gateway {
            Some(g) => writeln!(f, "gateway cgroup: id {} (level {})", g.cgroup_id, g.level)?,
            None => writeln!(
                f,
                "gateway cgroup: none (protected destinations refused to all)"
            )?,
        }
        writeln!(
            f,
            "egress lockdown: {}",
            if self.egress_lockdown { "on" } else { "off" }
        )?;
        writeln!(f, "destinations ({}):", self.destinations.len())?;
        for (rule, flags) in &self.destinations {
            writeln!(f, "  {rule:<32} {}", describe_flags(*flags))?;
        }
        Ok(())
    }
}

/// `protected, gateway-egress` style names for a flags word.
pub fn describe_flags(flags: u32) -> String {
    let mut names = Vec::new();
    if flags & dest::PROTECTED != 0 {
        names.push("protected");
    }
    if flags & dest::GATEWAY_EGRESS != 0 {
        names.push("gateway-egress");
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(toml: &str) -> Policy {
        Policy::from_config(&Config::from_str(Path::new("/t.toml"), toml).unwrap())
    }

    #[test]
    fn loopback_pool_protects_every_local_alias() {
        let p = policy("[pools.a]\nhosts = [\"127.0.0.1:8000\"]\n");
        let both = dest::PROTECTED | dest::GATEWAY_EGRESS;
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(p.flags_for(ip.parse().unwrap(), 8000), both, "{ip}");
        }
        assert_eq!(p.flags_for("127.0.0.1".parse().unwrap(), 8001), 0);
    }

    /// A destination written IPv4-mapped lands in the IPv4 trie, which is where the programs
    /// judge `::ffff:a.b.c.d` (it used to land in the IPv6 trie and protect nothing).
    #[test]
    fn ipv4_mapped_destinations_are_protected_as_ipv4() {
        let p = policy(
            "[pools.a]\nhosts = [\"[::ffff:10.0.0.5]:8000\"]\n\
             [segmentation]\nextra_protected = [\"[::ffff:10.0.1.0/120]:9000\", \"[::ffff:10.0.2.7]:9001\"]\n",
        );
        let rules: Vec<String> = p.destinations.keys().map(ToString::to_string).collect();
        assert_eq!(
            rules,
            ["10.0.0.5/32:8000", "10.0.1.0/24:9000", "10.0.2.7/32:9001"]
        );
        assert!(p.destinations.keys().all(|r| r.net.addr().is_ipv4()));
        for (ip, port) in [
            ("10.0.0.5", 8000),
            ("::ffff:10.0.0.5", 8000),
            ("10.0.1.77", 9000),
            ("10.0.2.7", 9001),
        ] {
            assert_ne!(
                p.flags_for(ip.parse().unwrap(), port) & dest::PROTECTED,
                0,
                "{ip}:{port}"
            );
        }
    }

    /// A loopback prefix reaches the local host like a loopback host: `::1`, `0.0.0.0` and
    /// `::` are protected with it.
    #[test]
    fn loopback_prefix_gets_the_loopback_aliases() {
        for prefix in ["127.0.0.0/8", "127.0.0.0/24", "[::ffff:127.0.0.0/104]"] {
            let p = policy(&format!(
                "[segmentation]\nextra_protected = [\"{prefix}:9000\"]\n"
            ));
            for ip in ["127.0.0.1", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1"] {
                assert_ne!(
                    p.flags_for(ip.parse().unwrap(), 9000) & dest::PROTECTED,
                    0,
                    "{prefix}: {ip}"
                );
            }
        }
        // A prefix without loopback gets no aliases.
        let p = policy("[segmentation]\nextra_protected = [\"10.0.0.0/8:9000\"]\n");
        assert_eq!(p.flags_for("::1".parse().unwrap(), 9000), 0);
    }

    #[test]
    fn unprotected_pool_is_gateway_egress_only() {
        let p = policy("[pools.ext]\nhosts = [\"192.0.2.10:443\"]\nprotect = false\n");
        assert_eq!(
            p.flags_for("192.0.2.10".parse().unwrap(), 443),
            dest::GATEWAY_EGRESS
        );
    }

    #[test]
    fn narrow_allow_inside_protected_prefix_stays_protected() {
        let p = policy(
            "[segmentation]\nextra_protected = [\"10.0.0.0/8:8000\"]\n\
             egress_allow = [\"10.1.2.3:8000\", \"10.1.2.3:53\"]\n",
        );
        let both = dest::PROTECTED | dest::GATEWAY_EGRESS;
        assert_eq!(
            p.destinations[&DestinationRule {
                net: "10.1.2.3/32".parse().unwrap(),
                port: 8000
            }],
            both
        );
        assert_eq!(
            p.flags_for("10.1.2.3".parse().unwrap(), 53),
            dest::GATEWAY_EGRESS
        );
        assert_eq!(p.flags_for("10.200.0.1".parse().unwrap(), 8000), both);
    }
}
