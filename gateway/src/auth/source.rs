//! Who is on the other end of a token request, for the per-source password throttle: the peer
//! address, or — only when the peer is one of the operator's `auth.trusted_proxies` — the
//! client its forwarding headers name. And the key a source is counted under (IPv6 per /64).
//!
//! Forwarding headers are believed hop by hop from the right: each trusted proxy vouches for
//! the address to its left, so the client is the rightmost address that is not a trusted
//! proxy. Anything to its left was written by the client itself and is ignored. With no
//! trusted proxy configured (the default) the headers are never read.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

use crate::config::parse_proxy;

/// The key a source address is counted under: an IPv4 address (IPv4-mapped IPv6 included) as
/// itself, an IPv6 address by its /64, which one host or home usually holds whole.
pub fn throttle_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// The proxies whose forwarding headers are believed (`auth.trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// From the checked config entries (an entry that does not parse is left out: the config
    /// load refused it already).
    pub fn new(entries: &[String]) -> Self {
        Self(entries.iter().filter_map(|e| parse_proxy(e).ok()).collect())
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client address of a request from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut current = canonical(peer);
        if !self.trusts(current) {
            return current;
        }
        for hop in forwarded_chain(headers).iter().rev() {
            // A hop that is no address (`unknown`, an obfuscated name, garbage) ends the walk:
            // the last address a trusted proxy gave is as far as anything can be believed.
            let Some(ip) = parse_hop(hop) else {
                return current;
            };
            current = canonical(ip);
            if !self.trusts(current) {
                return current;
            }
        }
        current
    }
}

/// IPv4-mapped IPv6 as IPv4, so `10.0.0.0/8` matches `::ffff:10.1.2.3`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The forwarding chain, leftmost (claimed client) first: `Forwarded` (RFC 7239) `for=`
/// values if that header is present, else `X-Forwarded-For`. Several header lines are one
/// list, in order.
fn forwarded_chain(headers: &HeaderMap) -> Vec<String> {
    let lines = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|s| s.trim().to_owned())
            .collect()
    };
    let forwarded = lines("forwarded");
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.trim().split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                    .map(|(_, v)| v.trim().trim_matches('"').to_owned())
                    .unwrap_or_default()
            })
            .collect();
    }
    lines("x-forwarded-for")
}

/// An address from a hop: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_is_keyed_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(throttle_key(ip("192.0.2.1")), "192.0.2.1");
        assert_eq!(throttle_key(ip("::ffff:192.0.2.1")), "192.0.2.1");
        assert_eq!(
            throttle_key(ip("2001:db8:a:b:1:2:3:4")),
            throttle_key(ip("2001:db8:a:b:ffff::"))
        );
        assert_ne!(
            throttle_key(ip("2001:db8:a:b::1")),
            throttle_key(ip("2001:db8:a:c::1"))
        );
        assert_eq!(throttle_key(ip("2001:db8:a:b::1")), "2001:db8:a:b::/64");
    }

    #[test]
    fn headers_are_ignored_unless_the_peer_is_a_trusted_proxy() {
        let spoof = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=1.1.1.1"),
        ]);
        let none = TrustedProxies::default();
        assert_eq!(none.client(ip("198.51.100.1"), &spoof), ip("198.51.100.1"));
        let lb = TrustedProxies::new(&["10.0.0.0/8".into()]);
        assert_eq!(lb.client(ip("198.51.100.1"), &spoof), ip("198.51.100.1"));
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let proxies = TrustedProxies::new(&["10.0.0.0/8".into(), "2001:db8:ffff::/48".into()]);
        // The client forged its own leftmost entry; the trusted proxy appended the real one.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.1.1.1")]);
        assert_eq!(proxies.client(ip("10.2.2.2"), &h), ip("203.0.113.9"));
        // Several header lines are one list.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.7:5555"),
        ]);
        assert_eq!(proxies.client(ip("10.2.2.2"), &h), ip("203.0.113.7"));
        // RFC 7239, IPv6 in brackets with a port, mapped peers.
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.5",
        )]);
        assert_eq!(proxies.client(ip("::ffff:10.9.9.9"), &h), ip("2001:db8::1"));
        // An unknown hop ends the walk at the last proxy that spoke.
        let h = headers(&[("forwarded", "for=unknown, for=10.0.0.5")]);
        assert_eq!(proxies.client(ip("10.9.9.9"), &h), ip("10.0.0.5"));
        // No header: the proxy itself.
        assert_eq!(
            proxies.client(ip("10.9.9.9"), &HeaderMap::new()),
            ip("10.9.9.9")
        );
        assert_eq!(parse_proxy("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert!(parse_proxy("10.0.0.0/33").is_err());
        assert!(parse_proxy("proxy.local").is_err());
    }
}
