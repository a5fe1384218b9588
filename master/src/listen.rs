//! The listening socket, bound once by the master and shared by every worker.

use crate::Error;
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;

/// How many connections may wait for a worker (the kernel caps it at
/// net.core.somaxconn). Deep on purpose: while a worker is being replaced,
/// this queue is where clients wait instead of being refused.
const BACKLOG: i32 = 1024;

/// Binds `addr` (`host:port`, IPv4 or IPv6; port 0 picks a free port) and
/// listens on it. The error says what was bound and why it failed:
/// `binding 127.0.0.1:8080: address already in use`.
pub fn bind(addr: &str) -> Result<TcpListener, Error> {
    let candidates = addr
        .to_socket_addrs()
        .map_err(|err| Error::io(format!("resolving {addr}"), err))?;
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "no address to bind");
    for candidate in candidates {
        match listen_on(candidate) {
            Ok(listener) => return Ok(listener),
            Err(err) => last = err,
        }
    }
    Err(Error::io(format!("binding {addr}"), last))
}

fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // A restarted master must be able to bind while connections of the
    // previous one sit in TIME_WAIT.
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    socket::listen(&fd, Backlog::new(BACKLOG)?)?;
    Ok(TcpListener::from(fd))
}
