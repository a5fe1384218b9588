//! Listening sockets of two kinds, TCP and Unix, and the connections they
//! give: what a master hands its workers, and what a worker serves.
//!
//! A master may listen on several sockets at once (`127.0.0.1:8080` and
//! `unix:/run/app.sock`, or whatever systemd passed). Every worker gets all
//! of them, as a `Vec<Listener>` in its [`crate::Handoff`], and serves what
//! comes on any of them, one connection at a time. A service sees a
//! [`Conn`], which reads and writes the same whatever the kind, and gives
//! the TCP stream when it needs one ([`Conn::tcp`]).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// The most listeners a master hands its workers: the worker's stop handler
/// keeps their fd numbers in a fixed array (a signal handler cannot
/// allocate), and a bound far above any real setup costs 256 bytes.
pub const MAX_LISTENERS: usize = 64;

/// A listening stream socket: TCP (IPv4 or IPv6) or Unix.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Takes an fd that should be a listening stream socket (one passed by
    /// systemd, say), and says what it is instead if it is not one:
    /// not a socket, not a stream socket, not listening, or of a family
    /// respawn does not serve. The error names the fd.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        let raw = fd.as_raw_fd();
        let not = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("fd {raw} is {what}"));
        let kind = match int_option(raw, libc::SOL_SOCKET, libc::SO_TYPE) {
            Ok(kind) => kind,
            Err(err) if err.raw_os_error() == Some(libc::ENOTSOCK) => return Err(not("not a socket")),
            Err(err) => return Err(err),
        };
        if kind != libc::SOCK_STREAM {
            return Err(not("not a stream socket (a datagram socket, say)"));
        }
        if int_option(raw, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? == 0 {
            return Err(not("a socket that is not listening (listen(2) was never called)"));
        }
        match family(raw)? {
            libc::AF_INET | libc::AF_INET6 => Ok(Listener::Tcp(TcpListener::from(fd))),
            libc::AF_UNIX => Ok(Listener::Unix(UnixListener::from(fd))),
            other => Err(not(&format!(
                "a socket of address family {other}, neither TCP nor Unix"
            ))),
        }
    }

    /// The next connection. Blocking or not as the socket is (O_NONBLOCK
    /// belongs to the socket, shared by every process that holds it).
    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, addr) = listener.accept()?;
                Ok(Conn::from((stream, addr)))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept()?;
                Ok(Conn::from(stream))
            }
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(listener) => listener.set_nonblocking(on),
            Listener::Unix(listener) => listener.set_nonblocking(on),
        }
    }

    /// Where it listens, for a log line: `127.0.0.1:8080`,
    /// `unix:/run/app.sock`, or `unix:(unnamed)` for an abstract or
    /// unnamed Unix socket.
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|err| format!("a TCP socket ({err})"), |addr| addr.to_string()),
            Listener::Unix(listener) => match listener.local_addr() {
                Ok(addr) => match addr.as_pathname() {
                    Some(path) => format!("unix:{}", path.display()),
                    None => "unix:(unnamed)".to_owned(),
                },
                Err(err) => format!("a Unix socket ({err})"),
            },
        }
    }

    /// Is it a TCP socket (where TCP options apply)?
    pub fn is_tcp(&self) -> bool {
        matches!(self, Listener::Tcp(_))
    }
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::Tcp(listener)
    }
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Listener {
        Listener::Unix(listener)
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(listener) => listener.as_raw_fd(),
            Listener::Unix(listener) => listener.as_raw_fd(),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(listener) => listener.as_fd(),
            Listener::Unix(listener) => listener.as_fd(),
        }
    }
}

/// One `int` socket option.
fn int_option(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, an int
    // that lives for the call; a bad fd is an error, not undefined behaviour.
    let rc = unsafe { libc::getsockopt(fd, level, name, std::ptr::addr_of_mut!(value).cast(), &mut len) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The address family of a socket, from getsockname.
fn family(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`, which is
    // large enough for any address.
    let rc = unsafe { libc::getsockname(fd, std::ptr::addr_of_mut!(addr).cast(), &mut len) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(addr.ss_family))
}

/// Who is at the other end of a connection, as accept(2) said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A Unix peer: usually unnamed (a client's socket is rarely bound),
    /// so there is nothing to say but the kind.
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// An accepted connection, TCP or Unix: `Read + Write`, with the socket
/// calls a service needs (timeouts, shutdown), and the stream itself.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    peer: Peer,
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// Who connected: the address accept(2) gave, so no system call.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// The TCP stream, for what only TCP has (`set_nodelay`, say).
    pub fn tcp(&mut self) -> Option<&mut TcpStream> {
        match &mut self.stream {
            Stream::Tcp(stream) => Some(stream),
            Stream::Unix(_) => None,
        }
    }

    /// The Unix stream, for what only Unix sockets have (credentials, fds).
    pub fn unix(&mut self) -> Option<&mut UnixStream> {
        match &mut self.stream {
            Stream::Tcp(_) => None,
            Stream::Unix(stream) => Some(stream),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(stream) => stream.set_read_timeout(timeout),
            Stream::Unix(stream) => stream.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(stream) => stream.set_write_timeout(timeout),
            Stream::Unix(stream) => stream.set_write_timeout(timeout),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match &self.stream {
            Stream::Tcp(stream) => stream.shutdown(how),
            Stream::Unix(stream) => stream.shutdown(how),
        }
    }
}

impl From<(TcpStream, SocketAddr)> for Conn {
    fn from((stream, peer): (TcpStream, SocketAddr)) -> Conn {
        Conn {
            stream: Stream::Tcp(stream),
            peer: Peer::Tcp(peer),
        }
    }
}

impl From<UnixStream> for Conn {
    fn from(stream: UnixStream) -> Conn {
        Conn {
            stream: Stream::Unix(stream),
            peer: Peer::Unix,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(stream) => stream.read(buf),
            Stream::Unix(stream) => stream.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.stream {
            Stream::Tcp(stream) => stream.write(buf),
            Stream::Unix(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(stream) => stream.flush(),
            Stream::Unix(stream) => stream.flush(),
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match &self.stream {
            Stream::Tcp(stream) => stream.as_raw_fd(),
            Stream::Unix(stream) => stream.as_raw_fd(),
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Tcp(stream) => stream.as_fd(),
            Stream::Unix(stream) => stream.as_fd(),
        }
    }
}

impl Listener {
    /// A second `Listener` over the same fd, of the same kind, for a forked
    /// child that must own one (its [`crate::Handoff`]) while the parent's
    /// copy of the address space still holds the original.
    ///
    /// # Safety
    ///
    /// Two values now own one fd: the caller must make sure one of them is
    /// never dropped (a forked child leaves with `_exit`, so the parent's
    /// copy in its address space never is).
    pub unsafe fn alias(&self) -> Listener {
        let fd = self.as_raw_fd();
        match self {
            // SAFETY: the caller's promise, above.
            Listener::Tcp(_) => Listener::Tcp(unsafe { TcpListener::from_raw_fd(fd) }),
            // SAFETY: the caller's promise, above.
            Listener::Unix(_) => Listener::Unix(unsafe { UnixListener::from_raw_fd(fd) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn temp_path(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("respawn-ipc-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn an_fd_is_taken_for_what_it_is_or_refused_by_number() {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("binding");
        assert!(Listener::from_fd(OwnedFd::from(tcp))
            .expect("a TCP listener")
            .is_tcp());
        let path = temp_path("from-fd.sock");
        let unix = UnixListener::bind(&path).expect("binding");
        let unix = Listener::from_fd(OwnedFd::from(unix)).expect("a Unix listener");
        assert_eq!(unix.local(), format!("unix:{}", path.display()));
        let _ = std::fs::remove_file(&path);

        let file = std::fs::File::open("/dev/null").expect("opening /dev/null");
        let fd = file.as_raw_fd();
        let err = Listener::from_fd(OwnedFd::from(file)).expect_err("a file");
        assert_eq!(err.to_string(), format!("fd {fd} is not a socket"));

        let (datagram, _other) = UnixDatagram::pair().expect("socketpair");
        let fd = datagram.as_raw_fd();
        let err = Listener::from_fd(OwnedFd::from(datagram)).expect_err("a datagram socket");
        assert!(
            err.to_string()
                .starts_with(&format!("fd {fd} is not a stream socket")),
            "{err}"
        );

        let (stream, _other) = UnixStream::pair().expect("socketpair");
        let fd = stream.as_raw_fd();
        let err = Listener::from_fd(OwnedFd::from(stream)).expect_err("a connected socket");
        assert!(
            err.to_string()
                .starts_with(&format!("fd {fd} is a socket that is not listening")),
            "{err}"
        );
    }

    #[test]
    fn a_conn_reads_writes_and_says_its_peer_on_both_kinds() {
        let tcp = Listener::from(TcpListener::bind("127.0.0.1:0").expect("binding"));
        let Listener::Tcp(inner) = &tcp else {
            unreachable!()
        };
        let mut client = TcpStream::connect(inner.local_addr().expect("address")).expect("connecting");
        let mut conn = tcp.accept().expect("accepting");
        assert_eq!(conn.peer(), Peer::Tcp(client.local_addr().expect("address")));
        assert!(conn.tcp().is_some() && conn.unix().is_none());
        conn.set_read_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        client.write_all(b"ping").expect("writing");
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).expect("reading");
        assert_eq!(&buf, b"ping");
        conn.write_all(b"pong").expect("writing");
        client.read_exact(&mut buf).expect("reading");
        assert_eq!(&buf, b"pong");

        let path = temp_path("conn.sock");
        let unix = Listener::from(UnixListener::bind(&path).expect("binding"));
        let mut client = UnixStream::connect(&path).expect("connecting");
        let mut conn = unix.accept().expect("accepting");
        assert_eq!(conn.peer().to_string(), "unix");
        assert!(conn.unix().is_some() && conn.tcp().is_none());
        conn.set_write_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        // A read timeout works on a Unix stream too: nothing comes, EAGAIN.
        conn.set_read_timeout(Some(Duration::from_millis(10)))
            .expect("timeout");
        let err = conn.read(&mut buf).expect_err("nothing to read");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        conn.write_all(b"pong").expect("writing");
        conn.shutdown(Shutdown::Write).expect("shutdown");
        let mut all = Vec::new();
        client.read_to_end(&mut all).expect("reading");
        assert_eq!(all, b"pong");
        let _ = std::fs::remove_file(&path);
    }
}
