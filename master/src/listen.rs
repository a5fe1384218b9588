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
//!
//! The directory may be one another user can write in (the workers' user,
//! say), and the master is often root, so nothing here acts on a path that
//! may have changed since it was looked at: bind never follows a link (a
//! name that exists, a link included, is EADDRINUSE); the file's mode is
//! the umask's at bind ([`Listeners::bind_all_with_mode`]), not a chmod by
//! path after it; [`Listeners::set_socket_mode`] acts through an fd, on the
//! socket bound or not at all; a file kept across an upgrade, or passed by
//! systemd, is never changed; and removal is an unlink (which never
//! follows a link) of the file bound, told by device and inode. Such a
//! directory without the sticky bit is one WARN line when a socket is
//! bound in it.

use crate::activation::{self, HandedBy, Inherited};
use crate::Error;
use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::{self, OFlag};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, UnixAddr,
};
use nix::sys::stat::{self, Mode};
use respawn_ipc::{Listener, MAX_LISTENERS};
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
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
    /// The permission bits that file had, to make it again with them if
    /// someone removes it (`restore_socket_files`). A Cell: the public
    /// `set_socket_mode` takes `&self`.
    file_mode: std::cell::Cell<Option<u32>>,
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
/// removed at the end, or given a mode, is the one made, not another bound
/// there since, nor a link put in its place. A guard, not a proof: a file
/// deleted and made again at once may get the same inode number back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// A socket file's mode is permission bits alone: no setuid, setgid or
/// sticky bit (a chmod would set them, and they mean nothing on a socket).
fn check_mode(context: &str, mode: u32) -> Result<(), Error> {
    match mode {
        0..=0o777 => Ok(()),
        _ => Err(Error::io(
            context,
            io::Error::new(io::ErrorKind::InvalidInput, "a socket's mode is 0 to 0777"),
        )),
    }
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

    /// Sets the permission bits of every socket file this process bound
    /// (0660: the owner and the group may connect). Prefer
    /// [`Listeners::bind_all_with_mode`], which gives the file its mode as
    /// it is made: until this is called, a new socket file has the mode the
    /// umask gives.
    ///
    /// Through an fd, never by path: the file at the path must still be the
    /// socket bound (device and inode); a symbolic link or another file put
    /// there since is left as it is, and is an error. Files this process did
    /// not bind are never touched: those of sockets handed over by systemd
    /// (its `SocketMode=` sets them) or kept across an upgrade (the first
    /// master set them; the path may be another user's link by now).
    pub fn set_socket_mode(&self, mode: u32) -> Result<(), Error> {
        check_mode(&format!("setting the mode {mode:04o}"), mode)?;
        let bound = self.list.iter().filter(|l| l.origin == Origin::Bound);
        for listening in bound {
            let Some(file) = &listening.socket_file else {
                continue;
            };
            file.set_mode(mode).map_err(|err| {
                Error::io(
                    format!("setting the mode of {} to {mode:04o}", file.path.display()),
                    err,
                )
            })?;
            listening.file_mode.set(Some(mode));
        }
        Ok(())
    }

    /// [`bind_all`], each Unix socket file made with the permission bits
    /// `mode` (0 to 0777; 0660 lets the owner and the group connect). The
    /// mode is set by the umask while the socket is bound, so the file never
    /// exists with another mode and is never changed by path afterwards (a
    /// chmod by path would follow a link put there meanwhile). Listeners
    /// handed over (systemd's, an upgrade's) are taken as they are, their
    /// files untouched.
    ///
    /// The umask is the process's: call this before starting threads that
    /// create files (the master refuses to run with other threads anyway).
    pub fn bind_all_with_mode(addrs: &[&str], mode: u32) -> Result<Listeners, Error> {
        check_mode(&format!("binding with mode {mode:04o}"), mode)?;
        bind_addresses(addrs, Some(mode))
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
        let file_mode = socket_file.as_ref().and_then(|file| file.mode().ok());
        self.list.push(Listening {
            listener,
            origin,
            socket_file,
            file_mode: std::cell::Cell::new(file_mode),
        });
    }

    /// At a HUP: each Unix socket file this master made that is gone from
    /// its path (someone removed it; a cleaner swept /run) is made again,
    /// as unicorn does: a new socket is bound at the path, with the mode the
    /// old file had, and put at the listener's fd number (dup3), so the
    /// master and the workers forked from now on accept on it, and clients
    /// find it again. Workers forked before keep the old socket, which no
    /// client can reach any more, until the rollout replaces them. A path
    /// that holds something else now is left alone. Returns what to say:
    /// each file made again, or why it could not be.
    pub(crate) fn restore_socket_files(&mut self) -> Vec<Result<String, String>> {
        let several = self.list.len() > 1;
        let mut said = Vec::new();
        for listening in &mut self.list {
            let Some(file) = &listening.socket_file else {
                continue;
            };
            match std::fs::symlink_metadata(&file.path) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                _ => continue,
            }
            let path = file.path.clone();
            let addr = format!("unix:{}", path.display());
            let restored =
                bind_unix_with(&addr, &path, listening.file_mode.get()).and_then(|(new, new_file)| {
                    prepare_one(&new, several)?;
                    // SAFETY: dup3 makes the listener's fd number refer to the
                    // new socket; both fds are ours, and `new`'s own is closed
                    // when it drops. The old socket lives on in the workers
                    // that hold it.
                    let rc = unsafe {
                        libc::dup3(new.as_raw_fd(), listening.listener.as_raw_fd(), libc::O_CLOEXEC)
                    };
                    if rc < 0 {
                        let err = io::Error::last_os_error();
                        let _ = std::fs::remove_file(&path);
                        return Err(Error::io(format!("putting the new socket {addr} in place"), err));
                    }
                    Ok(new_file)
                });
            match restored {
                Ok(new_file) => {
                    listening.socket_file = new_file;
                    let mode = listening
                        .file_mode
                        .get()
                        .map_or(String::new(), |mode| format!(", mode {mode:04o}"));
                    said.push(Ok(format!(
                        "the socket file {} was gone; bound again{mode}: the workers started from now on accept there",
                        path.display()
                    )));
                }
                Err(err) => said.push(Err(format!("the socket file {} was gone: {err}", path.display()))),
            }
        }
        said
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
    bind_addresses(addrs, None)
}

fn bind_addresses(addrs: &[&str], mode: Option<u32>) -> Result<Listeners, Error> {
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
            Some(path) => bind_unix_with(addr, Path::new(path), mode),
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
            Err(err) => last = with_privilege_advice(err, candidate.port()),
        }
    }
    Err(Error::io(format!("binding {addr}"), last))
}

/// EACCES on a low port: what would let the bind succeed. (Another cause,
/// a security module say, has nothing general to suggest.)
fn with_privilege_advice(err: io::Error, port: u16) -> io::Error {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|start| start.trim().parse::<u16>().ok());
    let Some(start) = start.filter(|&start| err.kind() == io::ErrorKind::PermissionDenied && port < start)
    else {
        return err;
    };
    let binary =
        std::env::current_exe().map_or_else(|_| "the binary".to_owned(), |path| path.display().to_string());
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "permission denied; ports below {start} need privilege: run as root, \
             or give the binary the capability (setcap cap_net_bind_service=+ep {binary}), \
             or lower the bound (sysctl net.ipv4.ip_unprivileged_port_start={port})"
        ),
    )
}

/// Binds a Unix socket at `path`, after looking at what is there. Its
/// file has the mode the umask gives.
pub(crate) fn bind_unix(addr: &str, path: &Path) -> Result<(Listener, Option<SocketFile>), Error> {
    bind_unix_with(addr, path, None)
}

fn bind_unix_with(
    addr: &str,
    path: &Path,
    mode: Option<u32>,
) -> Result<(Listener, Option<SocketFile>), Error> {
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
    warn_if_shared(addr, path);
    let fd = unix_listen_on(path, mode).map_err(failed)?;
    // A bind that worked made the file; if it cannot be read back, it is
    // simply not removed at the end.
    let file = socket_file(path).ok();
    if let (Some(file), Some(mode)) = (&file, mode) {
        // A default ACL on the directory overrides the umask: then the
        // mode is given through an fd, on the socket just bound.
        if file.mode().ok() != Some(mode) {
            debug!("{addr}: the umask did not give mode {mode:04o} (a default ACL?); setting it");
            file.set_mode(mode).map_err(|err| {
                Error::io(
                    format!("setting the mode of {} to {mode:04o}", path.display()),
                    err,
                )
            })?;
        }
    }
    Ok((Listener::from(fd), file))
}

/// One line if another user can write in the socket's directory.
fn warn_if_shared(addr: &str, path: &Path) {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let opened: Result<OwnedFd, _> = fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    if let Ok(fd) = opened {
        crate::pidfile::warn_if_others_can_write(&fd, dir, addr, "the socket file");
    }
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

/// Binds and listens at `path`. With a `mode`, under the umask that gives
/// the file that mode as bind makes it (0777 less the umask), restored
/// right after.
fn unix_listen_on(path: &Path, mode: Option<u32>) -> io::Result<UnixListener> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    let bound = match mode {
        Some(mode) => {
            let before = stat::umask(Mode::from_bits_truncate(!mode & 0o777));
            let bound = socket::bind(fd.as_raw_fd(), &addr);
            stat::umask(before);
            bound
        }
        None => socket::bind(fd.as_raw_fd(), &addr),
    };
    bound?;
    socket::listen(&fd, Backlog::new(BACKLOG)?)?;
    Ok(UnixListener::from(fd))
}

/// The socket file at `path`, as it is now (a link is not followed, and is
/// not a socket file).
pub(crate) fn socket_file(path: &Path) -> io::Result<SocketFile> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a socket file"));
    }
    Ok(SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

impl SocketFile {
    /// The permission bits of the file at the path, if it is still this one.
    fn mode(&self) -> io::Result<u32> {
        Ok(self.opened()?.1.permissions().mode() & 0o7777)
    }

    /// Gives this very file `mode`, through an fd: the path is opened
    /// without following a link (O_PATH|O_NOFOLLOW opens a link itself), the
    /// file opened must be this socket (device and inode), and the chmod
    /// goes through /proc/self/fd, which names the inode opened, whatever
    /// the path names by then.
    fn set_mode(&self, mode: u32) -> io::Result<()> {
        let (fd, _) = self.opened()?;
        std::fs::set_permissions(
            format!("/proc/self/fd/{}", fd.as_raw_fd()),
            std::fs::Permissions::from_mode(mode),
        )
    }

    /// The file at the path, opened as an fd that is only a reference to
    /// it (O_PATH), and its metadata; an error unless it is this socket.
    fn opened(&self) -> io::Result<(std::fs::File, std::fs::Metadata)> {
        let fd = fcntl::open(
            &self.path,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let file = std::fs::File::from(fd);
        let meta = file.metadata()?;
        let why = if meta.file_type().is_symlink() {
            "a symbolic link is there now, not the socket this process bound; left as it is"
        } else if !meta.file_type().is_socket() {
            "a file that is not a socket is there now; left as it is"
        } else if (meta.dev(), meta.ino()) != (self.dev, self.ino) {
            "another socket file is there now, not the one this process bound; left as it is"
        } else {
            return Ok((file, meta));
        };
        Err(io::Error::new(io::ErrorKind::InvalidData, why))
    }
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

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    /// A root-owned-like secret beside the socket: a 0600 file a link may
    /// point at.
    fn secret(name: &str) -> PathBuf {
        let path = temp_socket(name).with_extension("secret");
        std::fs::write(&path, "secret\n").expect("writing the secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    #[test]
    fn a_socket_file_has_its_mode_from_the_bind_and_the_umask_is_restored() {
        // In a child: the umask is the process's, and other tests make files.
        let outcome = crate::signals::tests::in_child(|| {
            let path = temp_socket("umask");
            let addr = format!("unix:{}", path.display());
            let before = stat::umask(Mode::from_bits_truncate(0o022));
            let listeners = Listeners::bind_all_with_mode(&[&addr], 0o640).map_err(|e| e.to_string())?;
            let after = stat::umask(before);
            let mode = mode_of(&path);
            remove_socket_files(&listeners.socket_files());
            match (mode, after.bits()) {
                (0o640, 0o022) => Ok(()),
                other => Err(format!("mode {:o}, umask after {:o}", other.0, other.1)),
            }
        });
        assert_eq!(outcome, Ok(()));
        let err = Listeners::bind_all_with_mode(&["unix:/x.sock"], 0o1777)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "binding with mode 1777: a socket's mode is 0 to 0777"
        );
    }

    /// The demo's advice for a low port is every embedder's (README: "the
    /// line says what would help").
    #[test]
    fn a_low_port_refused_says_what_would_let_it_bind() {
        let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .expect("the sysctl")
            .trim()
            .parse()
            .expect("a port");
        let denied = || io::Error::from(io::ErrorKind::PermissionDenied);
        if start > 80 {
            let said = with_privilege_advice(denied(), 80).to_string();
            assert!(
                said.starts_with(&format!(
                    "permission denied; ports below {start} need privilege: "
                )) && said.ends_with("(sysctl net.ipv4.ip_unprivileged_port_start=80)"),
                "{said}"
            );
        }
        let above = with_privilege_advice(denied(), start).to_string();
        assert!(!above.contains("ports below"), "{above}");
        let in_use = with_privilege_advice(io::Error::from(io::ErrorKind::AddrInUse), 80);
        assert_eq!(in_use.kind(), io::ErrorKind::AddrInUse);
        assert!(!in_use.to_string().contains("ports below"));
    }

    #[test]
    fn set_socket_mode_never_follows_a_link_put_in_the_socket_s_place() {
        let path = temp_socket("link");
        let secret = secret("link");
        let addr = format!("unix:{}", path.display());
        let listeners = bind_all(&[&addr]).expect("binding");
        listeners
            .set_socket_mode(0o600)
            .expect("the socket bound takes it");
        assert_eq!(mode_of(&path), 0o600);
        // Permission bits only, as bind_all_with_mode takes them.
        let err = listeners.set_socket_mode(0o7777).unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting the mode 7777: a socket's mode is 0 to 0777"
        );
        assert_eq!(mode_of(&path), 0o600);
        std::fs::remove_file(&path).expect("removing the socket file");
        std::os::unix::fs::symlink(&secret, &path).expect("planting a link");
        let err = listeners.set_socket_mode(0o666).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "setting the mode of {} to 0666: a symbolic link is there now, not the socket \
                 this process bound; left as it is",
                path.display()
            )
        );
        assert_eq!(mode_of(&secret), 0o600, "the link was followed");
        // Nor removed through it, nor as if it were ours.
        remove_socket_files(&listeners.socket_files());
        assert!(
            std::fs::symlink_metadata(&path).is_ok(),
            "the link is not ours to remove"
        );
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "secret\n");
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&secret).unwrap();
    }

    #[test]
    fn another_socket_bound_at_the_path_keeps_its_mode() {
        let path = temp_socket("other");
        let addr = format!("unix:{}", path.display());
        let listeners = bind_all(&[&addr]).expect("binding");
        let moved = path.with_extension("moved");
        std::fs::rename(&path, &moved).expect("moving ours away");
        let theirs = UnixListener::bind(&path).expect("binding another");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = listeners.set_socket_mode(0o666).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("another socket file is there now, not the one this process bound; left as it is"),
            "{err}"
        );
        assert_eq!(mode_of(&path), 0o600);
        drop(theirs);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&moved).unwrap();
    }

    #[test]
    fn a_socket_file_kept_across_an_upgrade_or_passed_by_systemd_is_never_touched() {
        for (name, origin) in [
            ("upgrade", Origin::Upgrade { fd: 3 }),
            (
                "systemd",
                Origin::Systemd {
                    fd: 3,
                    name: String::new(),
                },
            ),
        ] {
            let path = temp_socket(name);
            let secret = secret(name);
            let theirs = UnixListener::bind(&path).expect("binding");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let file = socket_file(&path).ok();
            let mut listeners = Listeners::default();
            listeners.push(Listener::from(theirs), origin, file);
            listeners.set_socket_mode(0o666).expect("nothing to do");
            assert_eq!(mode_of(&path), 0o600, "{name}");
            // The path, a link by now (planted before the new image looked).
            std::fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink(&secret, &path).unwrap();
            assert!(socket_file(&path).is_err(), "a link is taken for a socket file");
            listeners.set_socket_mode(0o666).expect("nothing to do");
            assert_eq!(mode_of(&secret), 0o600, "{name}: the link was followed");
            std::fs::remove_file(&path).unwrap();
            std::fs::remove_file(&secret).unwrap();
        }
    }
}
