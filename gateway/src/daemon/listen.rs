//! The data plane's listening sockets: one per serving thread of the worker, in one
//! `SO_REUSEPORT` group, so the kernel spreads new connections over the threads and no two
//! threads race for one accept queue.
//!
//! The supervisor binds them (as root, so ports below 1024 work; a reuse-port group only
//! admits sockets of the uid that bound the first, so the unprivileged worker, or any other
//! non-root process, cannot join it and take a share of the connections) and passes them
//! down as a list of descriptors in `MOAT_LISTEN_FD`.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd, RawFd},
};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections per socket (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// `n` listeners (at least one) on `addr`, in one reuse-port group. Port 0 picks a free port
/// once; the others join it.
pub fn bind_group(addr: SocketAddr, n: usize) -> Result<Vec<TcpListener>> {
    let first = bind_one(addr)?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..n.max(1) {
        all.push(bind_one(addr)?);
    }
    Ok(all)
}

fn bind_one(addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // As std's bind: an IPv6 address means IPv6 only, whatever the sysctl says.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The descriptors as `MOAT_LISTEN_FD` carries them: `5,6,7`.
pub fn encode(listeners: &[TcpListener]) -> String {
    let fds: Vec<String> = listeners
        .iter()
        .map(|l| l.as_raw_fd().to_string())
        .collect();
    fds.join(",")
}

/// The descriptors in `MOAT_LISTEN_FD`.
pub fn decode(value: &str) -> Result<Vec<RawFd>> {
    value
        .split(',')
        .map(|f| {
            f.trim()
                .parse()
                .with_context(|| format!("bad descriptor {f:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every socket of the group listens on the one port port 0 picked, and the list
    /// survives its trip through the environment.
    #[test]
    fn a_group_shares_one_port() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(group.len(), 3);
        let port = group[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(group.iter().all(|l| l.local_addr().unwrap().port() == port));
        let fds: Vec<RawFd> = group.iter().map(|l| l.as_raw_fd()).collect();
        assert_eq!(decode(&encode(&group)).unwrap(), fds);
        assert!(decode("5,x").is_err());
        // A socket outside the group cannot take the port.
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err());
    }
}
