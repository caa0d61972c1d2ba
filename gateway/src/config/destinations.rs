//! Destinations and addresses as the config writes them: `host:port` entries, destination
//! rules (`addr[/prefix]:port`), source prefixes, and resolving host names to addresses.

use std::{
    fmt,
    net::{IpAddr, SocketAddr, ToSocketAddrs},
};

use ipnet::IpNet;

/// A destination rule: every address in `net`, on exactly `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestinationRule {
    pub net: IpNet,
    pub port: u16,
}

impl fmt::Display for DestinationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpNet::V4(n) => write!(f, "{n}:{}", self.port),
            IpNet::V6(n) => write!(f, "[{n}]:{}", self.port),
        }
    }
}

/// A source prefix (`10.0.0.0/8`, `fd00::/64`) or a single address. IPv4-mapped IPv6
/// (`::ffff:10.0.0.1`) is the IPv4 host it maps, which is how the kernel side judges it.
pub fn parse_source_prefix(entry: &str) -> Result<IpNet, String> {
    let net: IpNet = if entry.contains('/') {
        entry
            .parse()
            .map_err(|_| format!("`{entry}` is not an address prefix"))?
    } else {
        IpNet::from(
            entry
                .parse::<IpAddr>()
                .map_err(|_| format!("`{entry}` is not an address or prefix (no host names)"))?,
        )
    };
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        if v6.prefix_len() < 96 {
            return Err(format!(
                "`{entry}` spans beyond the IPv4-mapped range (use a prefix of /96 or longer)"
            ));
        }
        return Ok(IpNet::V4(
            ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .expect("valid length")
                .trunc(),
        ));
    }
    Ok(net.trunc())
}

/// Splits `host:port` / `[v6]:port` / `net/len:port` / `[net/len]:port` into host and port.
pub(super) fn split_port(entry: &str) -> Result<(&str, u16), String> {
    let (host, port) = entry
        .rsplit_once(':')
        .ok_or_else(|| format!("`{entry}` has no port (expected host:port)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{port}` is not a port number"))?;
    if port == 0 {
        return Err("port 0 is not a destination".into());
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(format!("`{entry}` has no host"));
    }
    Ok((host, port))
}

/// An `ip:port` / `[v6]:port` entry; names are an error here.
pub(super) fn resolve_literal(entry: &str) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = split_port(entry)?;
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(vec![SocketAddr::new(ip, port)]),
        Err(_) => Err(format!("`{host}` was not resolved by the supervisor")),
    }
}

/// Resolves a pool host (`name:port`, `ip:port`, `[v6]:port`) to its socket addresses.
pub fn resolve_host_port(entry: &str) -> Result<Vec<SocketAddr>, String> {
    let (host, port) = split_port(entry)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("`{host}` resolved to no address"));
    }
    Ok(addrs)
}

/// Parses a destination rule: `addr/len:port`, `[v6/len]:port`, `addr:port` or `host:port`.
pub fn parse_destination(
    entry: &str,
    resolve: &mut impl FnMut(&str) -> Result<Vec<SocketAddr>, String>,
) -> Result<Vec<DestinationRule>, String> {
    let (host, port) = split_port(entry)?;
    if host.contains('/') {
        let net: IpNet = host
            .parse()
            .map_err(|_| format!("`{host}` is not an address prefix"))?;
        return Ok(fold_mapped_prefix(net.trunc())
            .into_iter()
            .map(|net| DestinationRule { net, port })
            .collect());
    }
    Ok(resolve(entry)?
        .into_iter()
        .map(|a| DestinationRule {
            net: IpNet::from(a.ip().to_canonical()),
            port,
        })
        .collect())
}

/// The kernel judges a destination written `::ffff:a.b.c.d` as the IPv4 host a.b.c.d (it
/// is where the packet goes), so a prefix inside the IPv4-mapped range (`::ffff:0:0/96`) is
/// the IPv4 prefix it maps; one wider than that range (`::/0`) covers the IPv6 prefix and
/// every IPv4 address too. Anything else is unchanged.
pub fn fold_mapped_prefix(net: IpNet) -> Vec<IpNet> {
    let IpNet::V6(v6) = net else {
        return vec![net];
    };
    const MAPPED: ipnet::Ipv6Net =
        match ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96) {
            Ok(n) => n,
            Err(_) => panic!("valid prefix"),
        };
    if let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        let v4 = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("valid length");
        return vec![IpNet::V4(v4.trunc())];
    }
    if v6.contains(&MAPPED) {
        return vec![net, "0.0.0.0/0".parse().expect("valid prefix")];
    }
    vec![net]
}

/// Parses one `auth.trusted_proxies` entry: a CIDR, or a bare address (one host).
pub fn parse_proxy(entry: &str) -> Result<IpNet, String> {
    entry
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{entry}` is not an IP address or CIDR (like 10.0.0.0/8)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_destination_sys(entry: &str) -> Result<Vec<DestinationRule>, String> {
        parse_destination(entry, &mut resolve_host_port)
    }

    #[test]
    fn ipv4_mapped_destinations_fold_to_ipv4() {
        let r = parse_destination_sys("[::ffff:10.0.0.5]:8000").unwrap();
        assert_eq!(r[0].to_string(), "10.0.0.5/32:8000");
        let r = parse_destination_sys("[::ffff:10.0.0.0/104]:8000").unwrap();
        assert_eq!(r[0].to_string(), "10.0.0.0/8:8000");
        let r = parse_destination_sys("[::ffff:0:0/96]:8000").unwrap();
        assert_eq!(r[0].to_string(), "0.0.0.0/0:8000");
        // Wider than the mapped range: the IPv6 prefix and all of IPv4.
        let r = parse_destination_sys("[::/0]:8000").unwrap();
        let r: Vec<String> = r.iter().map(ToString::to_string).collect();
        assert_eq!(r, ["[::/0]:8000", "0.0.0.0/0:8000"]);
        // A prefix that does not reach the mapped range stays as written.
        let r = parse_destination_sys("[fd00::/8]:8000").unwrap();
        assert_eq!(r[0].to_string(), "[fd00::/8]:8000");
    }

    #[test]
    fn destination_rules_parse() {
        let r = parse_destination_sys("10.0.0.0/8:443").unwrap();
        assert_eq!(r[0].to_string(), "10.0.0.0/8:443");
        let r = parse_destination_sys("[2001:db8::/32]:443").unwrap();
        assert_eq!(r[0].to_string(), "[2001:db8::/32]:443");
        let r = parse_destination_sys("10.1.2.3:53").unwrap();
        assert_eq!(r[0].to_string(), "10.1.2.3/32:53");
        assert!(parse_destination_sys("10.0.0.0/33:1").is_err());
        assert!(parse_destination_sys("10.0.0.1:0").is_err());
    }
}
