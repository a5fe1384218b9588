//! The listening sockets, bound once by the master and shared by every
//! worker: TCP (`host:port`) and Unix (`unix:/path`), one or several, bound
//! here or handed over open (systemd's socket activation, respawn's own
//! upgrade; see activation.rs).
//!
//! A Unix socket leaves a file behind, and that file outlives a crash. So
//! binding one looks first at what is there: nothing, fine; a socket file
//! nobody answers on (a connect is refused), stale: it is replaced, with a
//! line; a socket a live server answers on, or a file that is not a socket,
//! is refused. The file this process made is removed when [`crate::run`]
//! returns (every worker is gone then), and only if it is still the one
//! this process made; an upgrade re-executes the master without returning
//! from `run`, so the file stays for the new one. Files of sockets systemd
//! passed are systemd's (`RemoveOnStop=`): respawn never removes them.

use crate::activation::{self, HandedBy, Inherited};
use crate::Error;
use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, UnixAddr,
};
use respawn_ipc::{Listener, MAX_LISTENERS};
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// How long the kernel holds a connection that has sent nothing before it
/// hands it to accept (TCP_DEFER_ACCEPT, rounded by the kernel to SYN-ACK
/// retransmissions): a client that connects and stays silent does not hold
/// a worker for this long. The demo's whole-head deadline is the same.
const DEFER_ACCEPT_SECS: u32 = 5;

/// How many connections may wait for a worker (the kernel caps it at
/// net.core.somaxconn). Deep on purpose: while a worker is being replaced,
/// this queue is where clients wait instead of being refused.
const BACKLOG: i32 = 1024;

/// The listening sockets a master serves, in order, with where each came
/// from. Made by [`bind_all`], or from a listener of your own
/// (`TcpListener`, `UnixListener`, [`Listener`], or a `Vec<Listener>`).
#[derive(Debug, Default)]
pub struct Listeners {
    list: Vec<Listening>,
}

/// One listening socket, and where it came from.
#[derive(Debug)]
pub struct Listening {
    listener: Listener,
    origin: Origin,
    /// The Unix socket file this process made, to remove at the end.
    socket_file: Option<SocketFile>,
}

/// Where a listening socket came from, for the `listening on` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Bound by [`bind_all`] from an address.
    Bound,
    /// Handed to [`crate::run`] by the program.
    Given,
    /// Passed by systemd at this fd number, with this name
    /// (`FileDescriptorName=`, or empty).
    Systemd { fd: RawFd, name: String },
    /// Kept open across respawn's upgrade, at this fd number.
    Upgrade { fd: RawFd },
}

/// A socket file, and which file it is (device and inode), so that the one
/// removed at the end is the one made, not another bound there since. A
/// guard, not a proof: a file deleted and made again at once may get the
/// same inode number back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Listeners {
    pub fn iter(&self) -> impl Iterator<Item = &Listening> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The fd numbers, in order: what an upgrade hands over.
    pub fn fds(&self) -> Vec<RawFd> {
        self.list.iter().map(|l| l.listener.as_raw_fd()).collect()
    }

    /// Sets the permission bits of every socket file this process made
    /// (0660: the owner and the group may connect). Files of sockets handed
    /// over are left as they are (systemd's `SocketMode=` sets those).
    /// Until this is called, a new socket file has the mode the umask gives.
    pub fn set_socket_mode(&self, mode: u32) -> Result<(), Error> {
        for file in self.list.iter().filter_map(|l| l.socket_file.as_ref()) {
            std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(mode)).map_err(|err| {
                Error::io(
                    format!("setting the mode of {} to {mode:04o}", file.path.display()),
                    err,
                )
            })?;
        }
        Ok(())
    }

    /// The socket files this process made.
    pub(crate) fn socket_files(&self) -> Vec<SocketFile> {
        self.list.iter().filter_map(|l| l.socket_file.clone()).collect()
    }

    /// The listeners alone, taken: a worker started by an upgrade serves
    /// on them itself.
    pub(crate) fn into_listeners(self) -> Vec<Listener> {
        self.list.into_iter().map(|l| l.listener).collect()
    }

    /// The listeners alone, for the workers.
    pub(crate) fn listeners(&self) -> impl Iterator<Item = &Listener> {
        self.list.iter().map(|l| &l.listener)
    }

    fn push(&mut self, listener: Listener, origin: Origin, socket_file: Option<SocketFile>) {
        self.list.push(Listening {
            listener,
            origin,
            socket_file,
        });
    }
}

impl Listening {
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }
}

/// `127.0.0.1:8080`, `unix:/run/app.sock`, or with where it came from:
/// `127.0.0.1:8080 (fd 3, passed by systemd as "web")`.
impl fmt::Display for Listening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.listener.local())?;
        match &self.origin {
            Origin::Bound | Origin::Given => Ok(()),
            Origin::Systemd { fd, name } if name.is_empty() => write!(f, " (fd {fd}, passed by systemd)"),
            Origin::Systemd { fd, name } => write!(f, " (fd {fd}, passed by systemd as {name:?})"),
            Origin::Upgrade { fd } => write!(f, " (fd {fd}, kept across the upgrade)"),
        }
    }
}

impl From<Listener> for Listeners {
    fn from(listener: Listener) -> Listeners {
        Listeners::from(vec![listener])
    }
}

impl From<Vec<Listener>> for Listeners {
    fn from(listeners: Vec<Listener>) -> Listeners {
        let mut all = Listeners::default();
        for listener in listeners {
            all.push(listener, Origin::Given, None);
        }
        all
    }
}

impl From<TcpListener> for Listeners {
    fn from(listener: TcpListener) -> Listeners {
        Listeners::from(Listener::from(listener))
    }
}

impl From<UnixListener> for Listeners {
    fn from(listener: UnixListener) -> Listeners {
        Listeners::from(Listener::from(listener))
    }
}

/// Binds `addr` (`host:port`, IPv4 or IPv6; port 0 picks a free port) and
/// listens on it. The error says what was bound and why it failed:
/// `binding 127.0.0.1:8080: address already in use`. For Unix sockets or
/// several listeners, see [`bind_all`].
///
/// A listener handed over open comes first (systemd's socket activation,
/// or respawn's own upgrade, see [`crate::inherited_listeners`]): then
/// nothing is bound, and `addr` is not used; it must be one TCP listener.
pub fn bind(addr: &str) -> Result<TcpListener, Error> {
    if addr.starts_with("unix:") {
        return Err(Error::io(
            format!("binding {addr}"),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "bind makes TCP listeners only: bind_all binds Unix sockets",
            ),
        ));
    }
    let mut listeners = bind_all(&[addr])?;
    match listeners.list.pop() {
        Some(Listening {
            listener: Listener::Tcp(tcp),
            ..
        }) if listeners.is_empty() => Ok(tcp),
        _ => Err(Error::io(
            format!("binding {addr}"),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the listeners handed over are not one TCP listener: bind_all takes them all",
            ),
        )),
    }
}

/// Binds every address in `addrs`: `host:port` (as [`bind`]) or
/// `unix:/path/to.sock` (see the module docs for a file already there),
/// in order. When listeners were handed over open (systemd's socket
/// activation, respawn's upgrade), takes all of them instead, and binds
/// nothing: each must be a listening stream socket, TCP or Unix, and the
/// error names the fd that is not.
///
/// On an error, the socket files made so far are removed again.
pub fn bind_all(addrs: &[&str]) -> Result<Listeners, Error> {
    let inherited = activation::inherited_listeners()?;
    if !inherited.is_empty() {
        return take_inherited(inherited, addrs);
    }
    if addrs.len() > MAX_LISTENERS {
        return Err(Error::io(
            format!("binding {} addresses", addrs.len()),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_LISTENERS} listeners are supported"),
            ),
        ));
    }
    let mut listeners = Listeners::default();
    for addr in addrs {
        let bound = match addr.strip_prefix("unix:") {
            Some(path) => bind_unix(addr, Path::new(path)),
            None => bind_tcp(addr).map(|tcp| (Listener::from(tcp), None)),
        };
        match bound {
            Ok((listener, file)) => listeners.push(listener, Origin::Bound, file),
            Err(err) => {
                remove_socket_files(&listeners.socket_files());
                return Err(err);
            }
        }
    }
    Ok(listeners)
}

/// Every inherited fd, checked to be a listener. A Unix socket handed over
/// by an upgrade is this program's own when its path is among `addrs` (the
/// master bound it from the same flags before it re-executed): its file is
/// removed at the end, as if bound here.
fn take_inherited(inherited: Vec<Inherited>, addrs: &[&str]) -> Result<Listeners, Error> {
    if inherited.len() > MAX_LISTENERS {
        return Err(Error::io(
            format!("taking {} inherited listeners", inherited.len()),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_LISTENERS} listeners are supported"),
            ),
        ));
    }
    let mut listeners = Listeners::default();
    for Inherited { fd, name, by } in inherited {
        let raw = fd.as_raw_fd();
        let context = match by {
            HandedBy::Systemd => "taking the listeners systemd passed (LISTEN_FDS)",
            HandedBy::Upgrade => "taking the listeners of the upgrade (RESPAWN_LISTEN_FDS)",
        };
        let listener = Listener::from_fd(fd).map_err(|err| Error::io(context, err))?;
        let (origin, file) = match by {
            HandedBy::Systemd => (Origin::Systemd { fd: raw, name }, None),
            HandedBy::Upgrade => {
                let ours = listener
                    .local()
                    .strip_prefix("unix:")
                    .filter(|path| addrs.iter().any(|a| a.strip_prefix("unix:") == Some(path)))
                    .and_then(|path| socket_file(Path::new(path)).ok());
                (Origin::Upgrade { fd: raw }, ours)
            }
        };
        debug!("using inherited fd {raw} instead of binding");
        listeners.push(listener, origin, file);
    }
    Ok(listeners)
}

fn bind_tcp(addr: &str) -> Result<TcpListener, Error> {
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

/// Binds a Unix socket at `path`, after looking at what is there.
pub(crate) fn bind_unix(addr: &str, path: &Path) -> Result<(Listener, Option<SocketFile>), Error> {
    let failed = |err: io::Error| Error::io(format!("binding {addr}"), err);
    let refuse = |kind, why: &str| failed(io::Error::new(kind, why));
    if path.as_os_str().is_empty() {
        return Err(refuse(io::ErrorKind::InvalidInput, "no path after unix:"));
    }
    match std::fs::symlink_metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(failed(err)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(refuse(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is there; not replacing it",
            ))
        }
        Ok(_) => match probe(path) {
            Ok(Answer::Live) => return Err(refuse(io::ErrorKind::AddrInUse, "a live server answers there")),
            Ok(Answer::Refused) => {
                warn!(
                    "replacing the stale socket file {}: nothing answers there",
                    path.display()
                );
                std::fs::remove_file(path).map_err(failed)?;
            }
            Err(err) => return Err(failed(err)),
        },
    }
    let fd = unix_listen_on(path).map_err(failed)?;
    // A bind that worked made the file; if it cannot be read back, it is
    // simply not removed at the end.
    let file = socket_file(path).ok();
    Ok((Listener::from(fd), file))
}

/// What a connect to an existing socket file says.
enum Answer {
    /// Accepted, or queued behind a full backlog: a server is there.
    Live,
    /// ECONNREFUSED: the file is left from a process that is gone.
    Refused,
}

/// Connects to the socket at `path` without waiting (a live server with a
/// full queue says EAGAIN instead of making us wait in its queue).
fn probe(path: &Path) -> io::Result<Answer> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) | Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Ok(Answer::Live),
        Err(Errno::ECONNREFUSED) => Ok(Answer::Refused),
        Err(errno) => Err(errno.into()),
    }
}

fn unix_listen_on(path: &Path) -> io::Result<UnixListener> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    socket::listen(&fd, Backlog::new(BACKLOG)?)?;
    Ok(UnixListener::from(fd))
}

pub(crate) fn socket_file(path: &Path) -> io::Result<SocketFile> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok(SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Removes each socket file that is still the one this process made.
pub(crate) fn remove_socket_files(files: &[SocketFile]) {
    for file in files {
        match socket_file(&file.path) {
            Ok(now) if now == *file => match std::fs::remove_file(&file.path) {
                Ok(()) => debug!("removed the socket file {}", file.path.display()),
                Err(err) => warn!("removing the socket file {}: {err}", file.path.display()),
            },
            // Gone, or another socket bound there since: not ours to remove.
            _ => debug!(
                "not removing {}: it is not the socket file this process made",
                file.path.display()
            ),
        }
    }
}

/// Makes the listeners fit for the workers' accept loop, whoever bound
/// them: one alone is made blocking (a non-blocking one would make every
/// accept fail at once with EAGAIN, and the workers sleep in accept);
/// several are made non-blocking (the workers wait on all of them at once,
/// and an accept another worker beat them to must fail, not block; see
/// respawn-worker's accept.rs). TCP connections that have sent nothing yet
/// are not handed to accept (TCP_DEFER_ACCEPT, as unicorn and nginx's
/// `deferred` do), so silent clients wake no worker.
pub(crate) fn prepare(listeners: &Listeners) -> Result<(), Error> {
    if listeners.is_empty() || listeners.len() > MAX_LISTENERS {
        return Err(Error::io(
            format!("serving {} listeners", listeners.len()),
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("from 1 to {MAX_LISTENERS} are supported"),
            ),
        ));
    }
    let several = listeners.len() > 1;
    for listener in listeners.listeners() {
        prepare_one(listener, several)?;
    }
    Ok(())
}

fn prepare_one(listener: &Listener, nonblocking: bool) -> Result<(), Error> {
    listener.set_nonblocking(nonblocking).map_err(|err| {
        let how = if nonblocking { "non-blocking" } else { "blocking" };
        Error::io(format!("making the listener {} {how}", listener.local()), err)
    })?;
    if !listener.is_tcp() {
        return Ok(());
    }
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
        let copy = Listener::from(listener.try_clone().expect("dup"));
        prepare_one(&copy, false).expect("preparing it");
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
            prepare(&Listeners::from(tcp)).map_err(|e| e.to_string())?;
            if !lines().is_empty() {
                return Err(format!("a TCP listener logged {:?}", lines()));
            }
            // A unix socket, handed in as a listener: no TCP options.
            let (unix, _peer) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
            let listener = TcpListener::from(std::os::fd::OwnedFd::from(unix));
            prepare_one(&Listener::from(listener), false).map_err(|e| e.to_string())?;
            match lines().as_slice() {
                [line] if line.starts_with("setting TCP_DEFER_ACCEPT on the listener: ") => Ok(()),
                other => Err(format!("logged {other:?}")),
            }
        });
        assert_eq!(outcome, Ok(()));
    }

    fn temp_socket(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("respawn-listen-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn a_socket_file_is_removed_only_while_it_is_the_one_made() {
        let path = temp_socket("ours");
        let addr = format!("unix:{}", path.display());
        let listeners = bind_all(&[&addr]).expect("binding");
        let files = listeners.socket_files();
        assert_eq!(files.len(), 1);
        // Someone else binds the path since (ours moved away, so that its
        // inode is not reused for theirs): theirs stays.
        drop(listeners);
        let moved = path.with_extension("moved");
        std::fs::rename(&path, &moved).expect("moving ours away");
        let theirs = UnixListener::bind(&path).expect("binding again");
        remove_socket_files(&files);
        assert!(path.exists(), "another's socket file was removed");
        drop(theirs);
        std::fs::remove_file(&path).expect("removing");
        std::fs::remove_file(&moved).expect("removing");
        // Ours, still there: removed.
        let listeners = bind_all(&[&addr]).expect("binding");
        remove_socket_files(&listeners.socket_files());
        assert!(!path.exists());
    }

    #[test]
    fn a_failed_bind_all_removes_the_socket_files_it_made() {
        let path = temp_socket("undone");
        let taken = TcpListener::bind("127.0.0.1:0").expect("binding");
        let busy = taken.local_addr().expect("address").to_string();
        let unix = format!("unix:{}", path.display());
        let err = bind_all(&[&unix, &busy]).map(|_| ()).unwrap_err();
        assert_eq!(err.to_string(), format!("binding {busy}: address already in use"));
        assert!(!path.exists(), "left behind");
        let err = bind("unix:/x.sock").map(|_| ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "binding unix:/x.sock: bind makes TCP listeners only: bind_all binds Unix sockets"
        );
    }
}
