//! The listening socket, bound once by the master and shared by every worker.

use crate::Error;
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;

/// How long the kernel holds a connection that has sent nothing before it
/// hands it to accept (TCP_DEFER_ACCEPT, rounded by the kernel to SYN-ACK
/// retransmissions): a client that connects and stays silent does not hold
/// a worker for this long. The demo's whole-head deadline is the same.
const DEFER_ACCEPT_SECS: u32 = 5;

/// How many connections may wait for a worker (the kernel caps it at
/// net.core.somaxconn). Deep on purpose: while a worker is being replaced,
/// this queue is where clients wait instead of being refused.
const BACKLOG: i32 = 1024;

/// Binds `addr` (`host:port`, IPv4 or IPv6; port 0 picks a free port) and
/// listens on it. The error says what was bound and why it failed:
/// `binding 127.0.0.1:8080: address already in use`.
///
/// A listener handed over open comes first (systemd's socket activation,
/// or respawn's own upgrade, see [`crate::inherited_listeners`]): then
/// nothing is bound, and `addr` is not used.
pub fn bind(addr: &str) -> Result<TcpListener, Error> {
    if let Some(inherited) = crate::activation::inherited_listeners()?.into_iter().next() {
        log::debug!("using an inherited listener instead of binding {addr}");
        return Ok(TcpListener::from(inherited.fd));
    }
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

/// Makes a listener fit for the workers' accept loop, whoever bound it: a
/// non-blocking listener (the caller's own, say) would make every accept
/// fail at once with EAGAIN, so it is made blocking; and connections that
/// have sent nothing yet are not handed to accept (TCP_DEFER_ACCEPT, as
/// unicorn and nginx's `deferred` do), so silent clients wake no worker.
pub(crate) fn prepare(listener: &TcpListener) -> Result<(), Error> {
    listener
        .set_nonblocking(false)
        .map_err(|err| Error::io("making the listener blocking", err))?;
    let secs = DEFER_ACCEPT_SECS as libc::c_int;
    // SAFETY: setsockopt reads one c_int from `secs`, which lives for the call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::addr_of!(secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!(
            "setting TCP_DEFER_ACCEPT on the listener: {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_is_made_blocking_and_deferred() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a test listener");
        listener.set_nonblocking(true).expect("making it non-blocking");
        prepare(&listener).expect("preparing it");
        let flags = nix::fcntl::fcntl(&listener, nix::fcntl::FcntlArg::F_GETFL).expect("F_GETFL");
        assert_eq!(flags & libc::O_NONBLOCK, 0, "blocking again");
        let mut secs: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `secs`.
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                std::ptr::addr_of_mut!(secs).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert!(secs > 0, "TCP_DEFER_ACCEPT is set ({secs})");
    }

    #[test]
    fn a_busy_address_is_named_in_the_error() {
        let taken = TcpListener::bind("127.0.0.1:0").expect("binding a test listener");
        let addr = taken.local_addr().expect("its address").to_string();
        let err = bind(&addr).map(|_| ()).unwrap_err();
        assert_eq!(err.to_string(), format!("binding {addr}: address already in use"));
        let err = bind("127.0.0.1").map(|_| ()).unwrap_err();
        assert_eq!(err.to_string(), "resolving 127.0.0.1: invalid socket address");
    }

    /// The log lines of a forked child, as its logger received them.
    static LINES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    struct Lines;

    impl log::Log for Lines {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            let mut lines = LINES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            lines.push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    #[test]
    fn a_listener_without_tcp_options_is_prepared_all_the_same_and_says_why_at_debug() {
        let outcome = crate::signals::tests::in_child(|| {
            log::set_logger(&Lines).map_err(|e| e.to_string())?;
            log::set_max_level(log::LevelFilter::Debug);
            let lines = || LINES.lock().map(|lines| lines.clone()).unwrap_or_default();
            let tcp = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            prepare(&tcp).map_err(|e| e.to_string())?;
            if !lines().is_empty() {
                return Err(format!("a TCP listener logged {:?}", lines()));
            }
            // A unix socket, handed in as a listener: no TCP options.
            let (unix, _peer) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
            let listener = TcpListener::from(std::os::fd::OwnedFd::from(unix));
            prepare(&listener).map_err(|e| e.to_string())?;
            match lines().as_slice() {
                [line] if line.starts_with("setting TCP_DEFER_ACCEPT on the listener: ") => Ok(()),
                other => Err(format!("logged {other:?}")),
            }
        });
        assert_eq!(outcome, Ok(()));
    }
}
