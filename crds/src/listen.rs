//! How the server and the operator listen. Their default, `[::]`, means every address of both
//! families: the kubelet probes a pod at its IP, which is IPv4, IPv6 or either on a dual-stack
//! cluster, and a node may have no IPv6 at all.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Opens a non-blocking listening socket on `addr` (ready for tokio's `TcpListener::from_std`).
/// The unspecified IPv6 address `[::]` also accepts IPv4 (whatever the host's
/// `net.ipv6.bindv6only`), and on a host without IPv6 it becomes `0.0.0.0`. Any other address is
/// bound exactly as given, so `0.0.0.0` stays IPv4 only.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let dual = matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified());
    match open(addr, dual) {
        Err(e) if dual && no_ipv6(&e) => open(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())), false),
        other => other,
    }
}

fn open(addr: SocketAddr, dual: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if dual {
        socket.set_only_v6(false)?;
    }
    // As tokio's own bind does: a restarted process must not wait out the old sockets' TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Whether binding failed because the host has no IPv6: a kernel without it (`ipv6.disable=1`)
/// refuses the address family, and one with IPv6 switched off everywhere has no address for it.
fn no_ipv6(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAFNOSUPPORT) || e.kind() == io::ErrorKind::AddrNotAvailable
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, TcpStream};

    fn accepts(port: u16) -> (bool, bool) {
        let v4 = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok();
        let v6 = TcpStream::connect((Ipv6Addr::LOCALHOST, port)).is_ok();
        (v4, v6)
    }

    #[test]
    fn the_unspecified_ipv6_address_takes_both_families_and_an_ipv4_one_only_ipv4() -> io::Result<()> {
        let dual = listen("[::]:0".parse().map_err(io::Error::other)?)?;
        assert_eq!(accepts(dual.local_addr()?.port()), (true, true));
        let v4 = listen("0.0.0.0:0".parse().map_err(io::Error::other)?)?;
        assert_eq!(accepts(v4.local_addr()?.port()), (true, false));
        Ok(())
    }

    #[test]
    fn a_host_without_ipv6_is_told_from_other_bind_failures() {
        assert!(no_ipv6(&io::Error::from_raw_os_error(libc::EAFNOSUPPORT)));
        assert!(no_ipv6(&io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EADDRINUSE)));
        assert!(!no_ipv6(&io::Error::from_raw_os_error(libc::EACCES)));
    }
}
