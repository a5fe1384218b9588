//! The control socket (docs/control.md): one more event source in the
//! master's one loop.
//!
//! A Unix stream socket, mode 0600 from its bind on. Each connection is a
//! small state machine driven by readiness events, never by waiting: the
//! master greets it, reads one request line (at most 256 bytes, within
//! 5 s), and either answers at once (`status`, `metrics`) or keeps it
//! waiting until what it asked for is done (`scale`, `reload`, `upgrade`,
//! `stop`), at most [`WAIT_BOUND`]; the master checks those after every
//! turn of its loop, where it sees state change. Then the answer is written
//! as far as the peer takes it (within 5 s), and the connection closed.
//!
//! Nothing a peer does can lock the socket: every connection has a
//! deadline in every phase; a waiting one whose peer hangs up is dropped
//! at once; at the limit of 64, the connection idle the longest makes room
//! for a new one (one idle for 0.1 s, unless the new one's request came
//! with it), and only when none can is one refused;
//! each kind of refusal is logged at most once a second. Nothing grows
//! without bound: a request is 256 bytes, an answer is what the master
//! wrote, and at most 64 connections are open.
//!
//! Nor can a peer take what the workers need: under a low open-file limit
//! the limit is lower, what the master sets with [`Control::set_room`]
//! (the fds left once every worker that may live has its pipe), so that
//! connections never cost a replacement its fork. If an accept fails all
//! the same (the system's files), it is tried again 0.1 s later: the peers
//! wait in the backlog, and a full backlog lets no new connection wake the
//! master. At most 64 are accepted in one turn of the loop: a client that
//! connects as fast as it can never holds up a replacement or a signal.
//!
//! This module knows sockets and the protocol; what a request does to the
//! workers, and what to answer, is the master's (`act_on_control` in
//! master.rs).

use crate::error::describe;
use crate::limits;
use crate::listen::{self, SocketFile};
use crate::signals::{RateLimit, Signo};
use crate::Error;
use log::{debug, info, warn};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::socket::{getsockopt, sockopt};
use respawn_ipc::Listener;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// The control socket's tokens have this bit set; worker pipes count up
/// from 2 and never reach it.
const CONTROL_BIT: usize = 1 << (usize::BITS - 2);
const LISTENER: Token = Token(CONTROL_BIT);

/// The protocol's version, in the greeting.
pub(crate) const VERSION: u32 = 1;
/// The longest request line, its `\n` included.
const MAX_REQUEST: usize = 256;
/// How long a peer has to send its request, and to read its answer.
const PATIENCE: Duration = Duration::from_secs(5);
/// The most connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// How soon an accept that failed for lack of fds is tried again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// The most connections accepted in one turn of the master's loop.
const ACCEPTS_PER_TURN: usize = 64;
/// How long a new connection has to send its request before another one
/// that has said nothing yet may close it to make room: a client that
/// floods the socket must not close an operator's connection in the
/// moment between the greeting and the request.
const FIRST_WORDS: Duration = Duration::from_millis(100);
/// The longest a command waits for its answer (`scale`, `reload`,
/// `upgrade`, `stop`). systemd's default for a unit's start and reload
/// (DefaultTimeoutStartSec=90s), which an `ExecReload=respawn ctl ...
/// reload` runs under: longer than the defaults of `--start-timeout` (60 s)
/// and `--graceful-timeout` (30 s), so a command that can complete has
/// done so, and one that cannot (a slot crash-looping below the give-up
/// rate) is said to be stuck while the operator still watches. The command
/// is not cancelled: the answer says what it reached.
pub(crate) const WAIT_BOUND: Duration = Duration::from_secs(90);
/// How long after [`WAIT_BOUND`] a waiting connection the master has not
/// answered is answered here, with no state: nothing waits for good, even
/// if the master forgot it.
const GRACE: Duration = Duration::from_secs(1);
/// At most this much is read and thrown away from a connection before it
/// is closed: a Unix socket closed with unread bytes resets its peer
/// (ECONNRESET), which would lose the answer just written to it.
const DRAIN_AT_CLOSE: usize = 16 << 10;

/// Is this event the control socket's?
pub(crate) fn owns(token: Token) -> bool {
    token.0 & CONTROL_BIT != 0
}

/// Is this event the listener's (new connections)?
pub(crate) fn is_listener(token: Token) -> bool {
    token == LISTENER
}

/// What a peer may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Status,
    Metrics,
    Scale(usize),
    Reload,
    Upgrade,
    Stop { now: bool },
}

/// What a waiting connection waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pending {
    /// This many workers, all Ready.
    Scale(usize),
    /// The rolling restart's end.
    Reload,
    /// The upgrade's end: the master about to re-execute, or a back-out.
    Upgrade,
    /// The master about to exit.
    Stop,
}

impl std::fmt::Display for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pending::Scale(n) => write!(f, "scale {n}"),
            Pending::Reload => f.write_str("reload"),
            Pending::Upgrade => f.write_str("upgrade"),
            Pending::Stop => f.write_str("stop"),
        }
    }
}

/// The error an overdue command is answered with: `not done within 90 s`,
/// then what it reached if the master says (`2 of 3 workers ready`).
pub(crate) fn not_done(reached: Option<&str>) -> String {
    let bound = format!("not done within {} s", WAIT_BOUND.as_secs());
    match reached {
        Some(reached) => format!("{bound}: {reached}"),
        None => bound,
    }
}

/// What a re-executing master answers a connection it cannot hand down.
const REEXEC: &str = "the master re-executes for an upgrade; ask again";

/// A connection's id, for the master to answer it later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnId(Token);

enum Phase {
    Reading,
    Waiting(Pending),
    /// Writing the answer; closed once it is out.
    Answering,
}

/// The kinds of line a peer can cause, each rate-limited on its own
/// ([`RateLimit`] counts per number; these are not signals).
#[derive(Clone, Copy)]
enum Said {
    Busy = 1,
    Stranger = 2,
    MadeRoom = 3,
    AcceptFailed = 4,
}

struct Conn {
    stream: UnixStream,
    token: Token,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    phase: Phase,
    /// Reading and answering: the peer's ([`PATIENCE`]). Waiting: the
    /// master's ([`WAIT_BOUND`]), then [`GRACE`] more before it is
    /// answered here.
    deadline: Instant,
    /// A write failed: the peer can read nothing more. A request it sent
    /// whole is still read and carried out.
    gone: bool,
}

pub(crate) struct Control {
    listener: UnixListener,
    file: Option<SocketFile>,
    conns: Vec<Conn>,
    next: usize,
    /// The master's effective uid: the peer must be it, or root.
    uid: u32,
    /// Lines a peer causes, at most one a second of each kind.
    said: RateLimit,
    /// The most connections the open-file limit leaves room for (at most
    /// [`MAX_CONNECTIONS`]), as the master last said.
    room: usize,
    /// When to accept again, after an accept failed for lack of fds.
    retry_accept: Option<Instant>,
}

impl Control {
    /// Binds the socket at `path` (a stale socket file there is replaced, a
    /// live one refused, as for `--listen unix:`), mode 0600, and watches it.
    pub(crate) fn open(path: &Path, registry: &Registry) -> Result<Control, Error> {
        if path.as_os_str().is_empty() {
            let empty = io::Error::new(io::ErrorKind::InvalidInput, "the path is empty");
            return Err(Error::io("binding the control socket", empty));
        }
        // Named as the pid file is: an embedding program has no --control.
        let shown = format!("control socket {}", path.display());
        // The file is made 0600 by the bind itself: a chmod by path after it
        // would follow whatever is at the path by then (a symlink planted by
        // a user who can write to the directory). umask is the process's,
        // and the master is one thread here (lib.rs refuses to start with
        // others), so no other file is made meanwhile with this mask.
        use nix::sys::stat::{umask, Mode};
        let before = umask(Mode::from_bits_truncate(0o177));
        let bound = listen::bind_unix(&shown, path);
        umask(before);
        let (listener, file) = bound?;
        let Listener::Unix(listener) = listener else {
            return Err(Error::io(shown, io::Error::other("not a Unix socket")));
        };
        Control::serve_on(listener, file, path, registry)
    }

    /// After an upgrade's re-execution: the listener the previous image
    /// handed down, at `fd`, for the socket at `path`, and the connections
    /// it handed down with it (see [`Control::handed_down`]): those it had
    /// greeted and not yet read a byte from, whose requests are read here,
    /// and those waiting for what they asked, answered here when it is
    /// done. An fd in `conns` that is not such a connection is left alone,
    /// with a line.
    pub(crate) fn adopt(
        fd: RawFd,
        conns: &[(RawFd, Option<Pending>)],
        path: &Path,
        registry: &Registry,
    ) -> Result<Control, Error> {
        // SAFETY: the previous image left this fd open for us alone (the
        // state naming it is removed from the environment).
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        let mut control = Control::serve_on(listener, listen::socket_file(path).ok(), path, registry)?;
        let mut seen = vec![fd];
        for &(conn, pending) in conns {
            if seen.contains(&conn) {
                warn!("control socket: fd {conn} was handed down twice; adopted once");
                continue;
            }
            seen.push(conn);
            control.adopt_conn(conn, pending, registry);
        }
        Ok(control)
    }

    /// Watches `listener`, non-blocking, for the loop.
    fn serve_on(
        listener: UnixListener,
        file: Option<SocketFile>,
        path: &Path,
        registry: &Registry,
    ) -> Result<Control, Error> {
        let context = |doing: &str| format!("{doing} the control socket {}", path.display());
        listener
            .set_nonblocking(true)
            .map_err(|err| Error::io(context("making non-blocking"), err))?;
        registry
            .register(&mut SourceFd(&listener.as_raw_fd()), LISTENER, Interest::READABLE)
            .map_err(|err| Error::io(context("watching"), err))?;
        Ok(Control {
            listener,
            file,
            conns: Vec::new(),
            next: 1,
            uid: nix::unistd::geteuid().as_raw(),
            said: RateLimit::default(),
            room: MAX_CONNECTIONS,
            retry_accept: None,
        })
    }

    /// One connection handed down: a connected Unix stream socket, or it is
    /// not ours to take (nor to close).
    fn adopt_conn(&mut self, fd: RawFd, pending: Option<Pending>, registry: &Registry) {
        // SAFETY: F_GETFD reads one flag of an fd number; on a number that
        // is not open it fails with EBADF and touches nothing.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            warn!("control socket: fd {fd} handed down is not open; ignored");
            return;
        }
        // SAFETY: the fd is open, and the previous image handed it down for
        // the control socket alone; if it is not a connection it is given
        // back unclosed (into_raw_fd) below.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        let connected = matches!(
            getsockopt(&stream, sockopt::SockType),
            Ok(nix::sys::socket::SockType::Stream)
        ) && matches!(getsockopt(&stream, sockopt::AcceptConn), Ok(false))
            && stream.peer_addr().is_ok();
        if !connected {
            let _ = stream.into_raw_fd();
            warn!("control socket: fd {fd} handed down is not a connection; ignored");
            return;
        }
        let _ = nix::fcntl::fcntl(
            &stream,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        if self.stranger(&stream).is_some() {
            return;
        }
        // Greeted by the previous image: only the request is left to read,
        // or only the answer to write.
        self.serve(stream, Vec::new(), registry);
        if let Some(pending) = pending {
            if let Some(conn) = self.conns.last() {
                let id = ConnId(conn.token);
                self.wait(id, pending);
            }
        }
    }

    /// The listener's fd, to hand down through an upgrade's exec.
    pub(crate) fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The connections to hand down through an upgrade's exec: those
    /// waiting for what they asked (the next image answers them: an
    /// `upgrade` is answered only once the new image runs), and those
    /// greeted and not a byte of their request read yet, so that the next
    /// image reads it whole from the socket. [`Control::finish_for_exec`]
    /// answers every other one and keeps these.
    pub(crate) fn handed_down(&self) -> Vec<(RawFd, Option<Pending>)> {
        self.conns
            .iter()
            .filter(|c| c.can_hand_down())
            .map(|c| {
                let pending = match c.phase {
                    Phase::Waiting(pending) => Some(pending),
                    _ => None,
                };
                (c.stream.as_raw_fd(), pending)
            })
            .collect()
    }

    /// Handles an event of one of its tokens: new connections, request
    /// bytes, room to write, a peer gone. Returns the requests now complete.
    pub(crate) fn on_event(&mut self, token: Token, registry: &Registry) -> Vec<(ConnId, Request)> {
        if token == LISTENER {
            // After an accept that failed for lack of fds, not before its
            // retry: a flood would make each new connection another failure.
            if self.retry_accept.is_none_or(|at| at <= Instant::now()) {
                self.accept_all(registry);
            }
            return Vec::new();
        }
        let Some(i) = self.conns.iter().position(|c| c.token == token) else {
            return Vec::new();
        };
        let mut requests = Vec::new();
        let conn = &mut self.conns[i];
        match conn.phase {
            Phase::Reading => match conn.read_request() {
                Ok(Some(line)) => match parse(&line) {
                    Ok(request) => requests.push((ConnId(token), request)),
                    Err(why) => conn.answer(Err(why), Instant::now()),
                },
                Ok(None) => {}
                // Gone before its request was whole: nothing to carry out.
                Err(()) => conn.close(),
            },
            Phase::Waiting(pending) => {
                if conn.hung_up() {
                    debug!("control socket: a peer left before its answer to {pending}; dropped");
                    conn.close();
                }
            }
            Phase::Answering => {}
        }
        self.flush_and_reap(registry);
        requests
    }

    /// Answers a connection: `ok\n` and the body, or `error <why>\n`.
    pub(crate) fn reply(&mut self, id: ConnId, answer: Result<String, String>, registry: &Registry) {
        if let Some(conn) = self.conns.iter_mut().find(|c| c.token == id.0) {
            conn.answer(answer, Instant::now());
        }
        self.flush_and_reap(registry);
    }

    /// Keeps a connection until what it asked for is done, at most
    /// [`WAIT_BOUND`]; a peer already gone is dropped now (what it asked
    /// for is under way all the same).
    pub(crate) fn wait(&mut self, id: ConnId, pending: Pending) {
        let Some(conn) = self.conns.iter_mut().find(|c| c.token == id.0) else {
            return;
        };
        if conn.gone || conn.hung_up() {
            debug!("control socket: a peer left before its answer to {pending}; dropped");
            // Reaped at the next flush: closed, with nothing left to write.
            conn.close();
            return;
        }
        conn.phase = Phase::Waiting(pending);
        conn.deadline = Instant::now() + WAIT_BOUND;
    }

    /// The connections waiting, and for what.
    pub(crate) fn waiting(&self) -> Vec<(ConnId, Pending)> {
        self.conns
            .iter()
            .filter_map(|c| match c.phase {
                Phase::Waiting(pending) => Some((ConnId(c.token), pending)),
                _ => None,
            })
            .collect()
    }

    /// The connections that have waited [`WAIT_BOUND`] and are still not
    /// answered: the master answers each with [`not_done`] and the state
    /// it reached. One it leaves is answered here [`GRACE`] later.
    pub(crate) fn overdue(&self, now: Instant) -> Vec<(ConnId, Pending)> {
        self.conns
            .iter()
            .filter(|c| c.deadline <= now)
            .filter_map(|c| match c.phase {
                Phase::Waiting(pending) => Some((ConnId(c.token), pending)),
                _ => None,
            })
            .collect()
    }

    /// The nearest deadline of any connection: a peer's to send or read, a
    /// waiting one's bound (or, once that is past, its grace).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        self.conns
            .iter()
            .map(|c| match c.phase {
                Phase::Waiting(_) if c.deadline <= now => c.deadline + GRACE,
                _ => c.deadline,
            })
            .chain(self.retry_accept)
            .min()
    }

    /// Connections past their deadline: a late request gets an error (if it
    /// can still be written), an answer nobody reads is dropped, and a
    /// waiting one the master left unanswered past its grace is answered.
    pub(crate) fn expire(&mut self, now: Instant, registry: &Registry) {
        let mut timed_out = 0;
        for conn in &mut self.conns {
            match conn.phase {
                Phase::Reading if conn.deadline <= now => {
                    conn.answer(Err(format!("no request within {} s", PATIENCE.as_secs())), now);
                    // One try to write it, then gone.
                    conn.write_some();
                    conn.close();
                    timed_out += 1;
                }
                Phase::Answering if conn.deadline <= now => {
                    debug!("control socket: a peer did not read its answer; closing");
                    conn.close();
                    timed_out += 1;
                }
                Phase::Waiting(pending) if conn.deadline + GRACE <= now => {
                    warn!(
                        "control socket: {pending} not answered within {} s; answering it so",
                        WAIT_BOUND.as_secs()
                    );
                    conn.answer(Err(not_done(None)), now);
                }
                _ => {}
            }
        }
        if timed_out > 0 {
            debug!("control socket: {timed_out} connections timed out");
        }
        self.flush_and_reap(registry);
        if self.retry_accept.is_some_and(|at| at <= now) {
            self.retry_accept = None;
            self.accept_all(registry);
        }
    }

    /// How many connections the master's open-file limit leaves room for,
    /// beside the pipes of every worker that may live; at most 64 are
    /// served all the same.
    /// Idle connections beyond it are closed at once: the fds are wanted.
    pub(crate) fn set_room(&mut self, room: usize, registry: &Registry) {
        self.room = room.min(MAX_CONNECTIONS);
        while self.conns.len() > self.room && self.make_room(registry, true) {}
    }

    /// How many connections are open.
    pub(crate) fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Every fd of the control socket, for a forked worker to close.
    pub(crate) fn fds(&self) -> Vec<RawFd> {
        std::iter::once(self.listener.as_raw_fd())
            .chain(self.conns.iter().map(|c| c.stream.as_raw_fd()))
            .collect()
    }

    /// At the master's end: answers what still waits (`answer` decides,
    /// per pending request) and writes every answer, waiting for slow peers
    /// at most `patience` in all; then closes every connection.
    pub(crate) fn finish(&mut self, answer: impl Fn(Pending) -> Result<String, String>, patience: Duration) {
        let now = Instant::now();
        for conn in &mut self.conns {
            if let Phase::Waiting(pending) = conn.phase {
                conn.answer(answer(pending), now);
            }
        }
        write_out(self.conns.iter_mut(), now + patience);
        self.conns.clear();
    }

    /// Before an upgrade's exec: as [`Control::finish`], but the
    /// connections [`Control::handed_down`] names are kept, unanswered, for
    /// the next image (or for this one, if the exec fails); one that had
    /// sent part of its request is answered `error the master re-executes
    /// for an upgrade; ask again`, since its bytes cannot go along.
    pub(crate) fn finish_for_exec(&mut self, patience: Duration, registry: &Registry) {
        let now = Instant::now();
        for conn in self.conns.iter_mut().filter(|c| !c.can_hand_down()) {
            if matches!(conn.phase, Phase::Reading) {
                conn.answer(Err(REEXEC.to_owned()), now);
            }
        }
        write_out(
            self.conns.iter_mut().filter(|c| !c.can_hand_down()),
            now + patience,
        );
        self.conns.retain(|conn| {
            let keep = conn.can_hand_down();
            if !keep {
                let _ = registry.deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
            }
            keep
        });
    }

    fn accept_all(&mut self, registry: &Registry) {
        for _ in 0..ACCEPTS_PER_TURN {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    // Out of fds, say: the peers wait in the backlog, where
                    // a full one lets no new connection wake the master.
                    let why = limits::explain(&err).map_or(String::new(), |limit| format!(" ({limit})"));
                    let what = format!("accepting: {}{why}; trying again in 0.1 s", describe(&err));
                    self.say(Said::AcceptFailed, &what);
                    self.retry_accept = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            };
            let _ = stream.set_nonblocking(true);
            if let Some(refusal) = self.stranger(&stream) {
                self.refuse(stream, Said::Stranger, &refusal);
                continue;
            }
            // Looked at only when full: below the limit it changes nothing.
            let speaks = self.conns.len() >= self.room && request_waits(&stream, &[]);
            if !self.has_room(registry, speaks) {
                let refusal = match self.room {
                    0 => "busy: the open-file limit leaves no fd for a control connection beside \
                          the workers' pipes (raise ulimit -n)"
                        .to_owned(),
                    _ if self.conns.iter().all(|c| matches!(c.phase, Phase::Waiting(_))) => format!(
                        "busy: {}, each waiting for its command",
                        self.how_full("control connections", "are")
                    ),
                    _ => format!(
                        "busy: {}, none idle for {} s yet",
                        self.how_full("control connections", "are"),
                        FIRST_WORDS.as_secs_f64()
                    ),
                };
                self.refuse(stream, Said::Busy, &refusal);
                continue;
            }
            self.serve(
                stream,
                format!("respawn-control {VERSION}\n").into_bytes(),
                registry,
            );
        }
        // More may wait: the rest of the loop (a signal, a worker's pipe)
        // comes first, then the next turn accepts on at once. A client
        // that connects as fast as it can never holds the master here.
        self.retry_accept = Some(Instant::now());
    }

    /// Watches a new connection, reading its request, and writes `output`
    /// (the greeting) to it.
    fn serve(&mut self, stream: UnixStream, output: Vec<u8>, registry: &Registry) {
        let token = Token(CONTROL_BIT | self.next);
        self.next += 1;
        if let Err(err) = registry.register(
            &mut SourceFd(&stream.as_raw_fd()),
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            debug!("control socket: watching a connection: {err}");
            return;
        }
        let mut conn = Conn {
            stream,
            token,
            input: Vec::new(),
            output,
            written: 0,
            phase: Phase::Reading,
            deadline: Instant::now() + PATIENCE,
            gone: false,
        };
        conn.write_some();
        self.conns.push(conn);
    }

    /// Whether a new connection may be served: below the limit, or once
    /// idle ones have made room (more than one if the room shrank). One
    /// whose request `speaks` already may close an idle one of any age.
    fn has_room(&mut self, registry: &Registry, speaks: bool) -> bool {
        while self.conns.len() >= self.room {
            if !self.make_room(registry, speaks) {
                return false;
            }
        }
        true
    }

    /// At the limit: closes the connection idle the longest, one still to
    /// send its request (else one not reading its answer), to let a new one
    /// in. A connection waiting for its command is never closed for room,
    /// nor one whose request waits unread (its event may come after this
    /// round of accepts), nor, unless `any_age`, one not [`FIRST_WORDS`]
    /// old. False if there is none to close.
    fn make_room(&mut self, registry: &Registry, any_age: bool) -> bool {
        let now = Instant::now();
        let reading = |c: &Conn| {
            matches!(c.phase, Phase::Reading)
                && (any_age || c.deadline <= now + PATIENCE - FIRST_WORDS)
                && !request_waits(&c.stream, &c.input)
        };
        let answering = |c: &Conn| matches!(c.phase, Phase::Answering);
        let Some(i) = (self.conns.iter().position(reading)).or_else(|| self.conns.iter().position(answering))
        else {
            return false;
        };
        let (were, are) = (
            self.how_full("control connections", "were"),
            self.how_full("connections", "are"),
        );
        let mut conn = self.conns.remove(i);
        if matches!(conn.phase, Phase::Reading) {
            conn.answer(
                Err(format!("closed to make room: {were}, this one idle the longest")),
                Instant::now(),
            );
            conn.write_some();
        }
        let _ = registry.deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
        self.say(
            Said::MadeRoom,
            &format!("{are}; closing the one idle the longest to make room"),
        );
        true
    }

    /// `64 control connections are open` (`were`, `connections`...), and
    /// why no more when the open-file limit is what holds them.
    fn how_full(&self, what: &str, verb: &str) -> String {
        let open = self.conns.len();
        // `1 control connection was open`
        let what = if open == 1 {
            what.strip_suffix('s').unwrap_or(what)
        } else {
            what
        };
        let verb = match (open, verb) {
            (1, "are") => "is",
            (1, "were") => "was",
            (_, verb) => verb,
        };
        let why = if self.room < MAX_CONNECTIONS {
            ", as many as the open-file limit leaves beside the workers' pipes"
        } else {
            ""
        };
        format!("{open} {what} {verb} open{why}")
    }

    /// Tells the peer why it is not served, and closes.
    fn refuse(&mut self, stream: UnixStream, kind: Said, refusal: &str) {
        self.say(kind, refusal);
        let _ = (&stream).write_all(format!("error {refusal}\n").as_bytes());
        drain(&stream);
    }

    /// `control socket: <what>`, unless a line of this kind was written
    /// less than a second ago; the next one says how many went unsaid.
    fn say(&mut self, kind: Said, what: &str) {
        let Some(unsaid) = self.said.allow(kind as Signo, Instant::now()) else {
            return;
        };
        let more = match unsaid {
            0 => String::new(),
            n => format!(" ({n} more since the last line)"),
        };
        match kind {
            // Not a peer's doing: the host's.
            Said::AcceptFailed => warn!("control socket: {what}{more}"),
            _ => info!("control socket: {what}{more}"),
        }
    }

    /// Why this peer is not served, if its uid is neither ours nor root's.
    fn stranger(&self, stream: &UnixStream) -> Option<String> {
        match getsockopt(stream, sockopt::PeerCredentials) {
            Ok(cred) if cred.uid() == self.uid || cred.uid() == 0 => None,
            Ok(cred) => Some(format!(
                "permission denied: uid {} is neither the master's nor root",
                cred.uid()
            )),
            Err(errno) => Some(format!(
                "permission denied: the peer's credentials are unknown ({errno})"
            )),
        }
    }

    /// Writes what can be written; drops connections that are done (answer
    /// out, or the peer gone).
    fn flush_and_reap(&mut self, registry: &Registry) {
        for conn in &mut self.conns {
            conn.write_some();
        }
        self.conns.retain(|conn| {
            let done = matches!(conn.phase, Phase::Answering) && conn.written >= conn.output.len();
            if done {
                let _ = registry.deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
            }
            !done
        });
    }
}

impl Drop for Control {
    /// The socket file goes with the master (not with an exec, which runs
    /// no destructor: the next image binds it again).
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            listen::remove_socket_files(&[file]);
        }
    }
}

/// Writes each connection's answer, blocking, until `deadline` for all.
fn write_out<'a>(conns: impl Iterator<Item = &'a mut Conn>, deadline: Instant) {
    for conn in conns {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.gone || conn.stream.set_nonblocking(false).is_err() {
            continue;
        }
        let _ = conn.stream.set_write_timeout(Some(left));
        let _ = conn.stream.write_all(&conn.output[conn.written..]);
        conn.written = conn.output.len();
    }
}

/// Reads and throws away what the peer sent and nobody read, at most
/// [`DRAIN_AT_CLOSE`], without waiting: see there.
fn drain(stream: &UnixStream) {
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = [0u8; 4096];
    let mut left = DRAIN_AT_CLOSE;
    while left > 0 {
        match recv(stream.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Whether a whole request line waits for `stream`: in `input`, what was
/// read of it, and what the socket holds unread.
fn request_waits(stream: &UnixStream, input: &[u8]) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = [0u8; MAX_REQUEST];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    let waiting = recv(stream.as_raw_fd(), &mut buf, flags).map_or(&buf[..0], |n| &buf[..n]);
    input.iter().chain(waiting).any(|&b| b == b'\n')
}

impl Drop for Conn {
    fn drop(&mut self) {
        drain(&self.stream);
    }
}

impl Conn {
    /// Reads what the peer sent; the request line once it is whole. Err: the
    /// peer left before it was whole. Too much: the answer is an error.
    fn read_request(&mut self) -> Result<Option<String>, ()> {
        let mut buf = [0u8; MAX_REQUEST];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(()),
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(()),
            }
            if let Some(end) = self.input.iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.input[..end]).trim().to_owned();
                self.input.clear();
                return Ok(Some(line));
            }
            if self.input.len() >= MAX_REQUEST {
                self.answer(
                    Err(format!("request longer than {MAX_REQUEST} bytes")),
                    Instant::now(),
                );
                return Ok(None);
            }
        }
    }

    fn answer(&mut self, answer: Result<String, String>, now: Instant) {
        let text = match answer {
            Ok(body) => format!("ok\n{body}"),
            Err(why) => format!("error {why}\n"),
        };
        if !self.gone {
            self.output.extend_from_slice(text.as_bytes());
        }
        self.phase = Phase::Answering;
        self.deadline = now + PATIENCE;
    }

    /// Nothing more to write: reaped at the next flush.
    fn close(&mut self) {
        self.output.truncate(self.written);
        self.phase = Phase::Answering;
    }

    /// Greeted, and not a byte of its request read: its request can be
    /// read as well by the next image, from the socket.
    fn can_hand_down(&self) -> bool {
        match self.phase {
            Phase::Waiting(_) => !self.gone,
            Phase::Reading => self.input.is_empty() && self.written >= self.output.len() && !self.gone,
            Phase::Answering => false,
        }
    }

    /// Has the peer closed its end, both ways (POLLHUP)? One that only
    /// shut down its sending side (`shutdown(SHUT_WR)`, as `socat` and `nc
    /// -N` do after the request) still reads its answer, and is kept.
    fn hung_up(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call; a zero timeout never
        // waits.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready == 1 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0
    }

    fn write_some(&mut self) {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return,
                Ok(n) => self.written += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // The peer left (EPIPE): nothing more can be written. A
                    // connection still reading keeps reading: a request the
                    // peer sent whole before it left is carried out.
                    self.gone = true;
                    self.output.truncate(self.written);
                    return;
                }
            }
        }
    }
}

/// Asks the master whose control socket is at `path` (see
/// [`crate::Config::control`]) and returns the body of its answer: what
/// `respawn ctl` does, for a program that serves the status from an admin
/// endpoint of its own. It blocks its caller (a worker, say) until the
/// answer comes, which for `scale`, `reload`, `upgrade` and `stop` is when
/// that is done; `timeout` bounds each read and write (None or zero: no
/// bound). An `error` answer is an `Err` whose text is the master's
/// reason; a request that is not one line of at most 255 bytes is refused
/// here.
pub fn ask_control(path: impl AsRef<Path>, request: &str, timeout: Option<Duration>) -> io::Result<String> {
    let path = path.as_ref();
    let request = request.trim();
    if request.contains('\n') || request.len() >= MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a request is one line of at most {} bytes", MAX_REQUEST - 1),
        ));
    }
    let mut conn = UnixStream::connect(path).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("connecting to {}: {}", path.display(), describe(&err)),
        )
    })?;
    let timeout = timeout.filter(|t| !t.is_zero());
    conn.set_read_timeout(timeout)?;
    conn.set_write_timeout(timeout)?;
    conn.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let greeting = format!("respawn-control {VERSION}\n");
    let Some(rest) = answer.strip_prefix(&greeting) else {
        let first = answer.lines().next().unwrap_or("");
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the control socket greeted {first:?}, not {:?}", greeting.trim()),
        ));
    };
    if let Some(body) = rest.strip_prefix("ok\n") {
        return Ok(body.to_owned());
    }
    let why = rest.strip_prefix("error ").unwrap_or(rest).trim();
    Err(io::Error::other(why.to_owned()))
}

/// A request line: `status`, `metrics`, `scale N`, `reload`, `upgrade`,
/// `stop`, `stop now`.
fn parse(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["status"] => Ok(Request::Status),
        ["metrics"] => Ok(Request::Metrics),
        ["reload"] => Ok(Request::Reload),
        ["upgrade"] => Ok(Request::Upgrade),
        ["stop"] => Ok(Request::Stop { now: false }),
        ["stop", "now"] => Ok(Request::Stop { now: true }),
        ["scale", n] => n
            .parse()
            .map(Request::Scale)
            .map_err(|_| format!("scale: {n:?} is not a whole number of workers")),
        _ => {
            let shown: String = line.chars().take(40).collect();
            Err(format!(
                "unknown request {shown:?}: status, metrics, scale N, reload, upgrade, stop or stop now"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_what_is_understood() {
        assert_eq!(parse("status"), Ok(Request::Status));
        assert_eq!(parse("  scale 5 "), Ok(Request::Scale(5)));
        assert_eq!(parse("stop now"), Ok(Request::Stop { now: true }));
        assert_eq!(
            parse("scale -1"),
            Err("scale: \"-1\" is not a whole number of workers".to_owned())
        );
        let err = parse("rm -rf /").unwrap_err();
        assert!(
            err.starts_with("unknown request \"rm -rf /\": status, metrics"),
            "{err}"
        );
        assert!(parse("").is_err());
    }

    #[test]
    fn ask_control_takes_the_body_or_the_reason() {
        let dir = std::env::temp_dir().join(format!("respawn-ask-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("s");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("binding");
        let server = std::thread::spawn(move || {
            for answer in [
                "respawn-control 1\nok\n{}\n",
                "respawn-control 1\nerror no\n",
                "hello\n",
            ] {
                let (mut conn, _) = listener.accept().expect("accepting");
                let mut line = [0u8; 16];
                let _ = conn.read(&mut line);
                conn.write_all(answer.as_bytes()).expect("answering");
            }
        });
        let timeout = Some(Duration::from_secs(5));
        assert_eq!(
            ask_control(&path, "status", timeout).expect("an ok answer"),
            "{}\n"
        );
        assert_eq!(
            ask_control(&path, "reload", timeout).unwrap_err().to_string(),
            "no"
        );
        let err = ask_control(&path, "status", timeout).unwrap_err().to_string();
        assert_eq!(
            err,
            "the control socket greeted \"hello\", not \"respawn-control 1\""
        );
        server.join().expect("the server");
        // Refused here, before any connection: a second line would be
        // dropped unread, a long one reset.
        for request in ["status\nstop", &"x".repeat(256)] {
            let err = ask_control(&path, request, timeout).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(err.to_string(), "a request is one line of at most 255 bytes");
        }
        let gone = dir.join("gone");
        let err = ask_control(&gone, "status", None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("connecting to {}: no such file or directory", gone.display())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A control socket served as the master serves it, minus the master:
    /// a test drives its loop by hand.
    struct Rig {
        dir: std::path::PathBuf,
        path: std::path::PathBuf,
        poll: mio::Poll,
        control: Control,
    }

    impl Rig {
        fn new(name: &str) -> Rig {
            let dir = std::env::temp_dir().join(format!("respawn-control-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("a directory");
            let path = dir.join("s");
            let listener = UnixListener::bind(&path).expect("binding");
            let poll = mio::Poll::new().expect("a poll");
            let control = Control::serve_on(listener, None, &path, poll.registry()).expect("serving");
            Rig {
                dir,
                path,
                poll,
                control,
            }
        }

        /// A client, its greeting read.
        fn greeted(&mut self) -> UnixStream {
            self.greeted_with(b"")
        }

        /// A client that sent `first` before it was accepted (as `respawn
        /// ctl status` does), its greeting read.
        fn greeted_with(&mut self, first: &[u8]) -> UnixStream {
            let mut client = UnixStream::connect(&self.path).expect("connecting");
            client.write_all(first).expect("sending");
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("a timeout");
            let accepted = self.control.next;
            self.turn_until(|rig| rig.control.next > accepted);
            let mut greeting = [0u8; 18];
            client.read_exact(&mut greeting).expect("the greeting");
            assert_eq!(&greeting, b"respawn-control 1\n");
            client
        }

        /// Turns of the loop until `done` holds (within 5 s); the requests
        /// read meanwhile.
        fn turn_until(&mut self, done: impl Fn(&Rig) -> bool) -> Vec<(ConnId, Request)> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut events = mio::Events::with_capacity(64);
            let mut requests = Vec::new();
            while !done(self) {
                assert!(Instant::now() < deadline, "not within 5 s");
                self.poll
                    .poll(&mut events, Some(Duration::from_millis(100)))
                    .expect("polling");
                for event in &events {
                    requests.extend(self.control.on_event(event.token(), self.poll.registry()));
                }
            }
            requests
        }

        /// Turns until one request is read, and returns it.
        fn request(&mut self) -> (ConnId, Request) {
            let got = std::cell::RefCell::new(Vec::new());
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut events = mio::Events::with_capacity(64);
            while got.borrow().is_empty() {
                assert!(Instant::now() < deadline, "no request within 5 s");
                self.poll
                    .poll(&mut events, Some(Duration::from_millis(100)))
                    .expect("polling");
                for event in &events {
                    got.borrow_mut()
                        .extend(self.control.on_event(event.token(), self.poll.registry()));
                }
            }
            let mut got = got.into_inner();
            assert_eq!(got.len(), 1, "{got:?}");
            got.remove(0)
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn read_all(mut client: &UnixStream) -> String {
        let mut said = String::new();
        client.read_to_string(&mut said).expect("reading to the close");
        said
    }

    #[test]
    fn an_empty_path_is_refused_in_the_words_of_a_library() {
        let poll = mio::Poll::new().expect("a poll");
        let err = Control::open(Path::new(""), poll.registry())
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("binding the control socket: the path is empty")
        );
    }

    #[test]
    fn an_accept_that_failed_is_tried_again_with_no_new_connection() {
        let mut rig = Rig::new("retry");
        // As after EMFILE: the peer waits in the backlog, and its one event
        // was spent on the failed accept.
        let client = UnixStream::connect(&rig.path).expect("connecting");
        let failed = Instant::now();
        rig.control.retry_accept = Some(failed + ACCEPT_RETRY);
        assert_eq!(rig.control.next_deadline(), Some(failed + ACCEPT_RETRY));
        rig.control.expire(failed, rig.poll.registry());
        assert_eq!(rig.control.conns.len(), 0, "not before its time");
        rig.control.expire(failed + ACCEPT_RETRY, rig.poll.registry());
        assert_eq!(rig.control.conns.len(), 1, "accepted without an event");
        assert_eq!(
            rig.control.next_deadline().map(|at| at > failed + ACCEPT_RETRY),
            Some(true)
        );
        drop(client);
    }

    #[test]
    fn connections_are_held_to_the_room_the_master_leaves() {
        let mut rig = Rig::new("fdroom");
        rig.control.set_room(2, rig.poll.registry());
        let mut first = rig.greeted();
        let _second = rig.greeted();
        // A third: the idle one of the longest makes room, with the reason.
        let _third = rig.greeted_with(b"status\n");
        assert_eq!(rig.control.conns.len(), 2);
        rig.request();
        let mut said = String::new();
        first.read_to_string(&mut said).expect("its last words");
        assert_eq!(
            said,
            "error closed to make room: 2 control connections were open, as many as the \
             open-file limit leaves beside the workers' pipes, this one idle the longest\n"
        );
        // No room at all: the idle are closed at once, a new one refused
        // and told what to raise.
        rig.control.set_room(0, rig.poll.registry());
        assert_eq!(rig.control.conns.len(), 0);
        let mut refused = UnixStream::connect(&rig.path).expect("connecting");
        refused
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a timeout");
        let told = |_: &Rig| {
            use nix::sys::socket::{recv, MsgFlags};
            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            recv(refused.as_raw_fd(), &mut [0u8; 1], flags).is_ok_and(|n| n > 0)
        };
        rig.turn_until(told);
        let mut said = String::new();
        refused.read_to_string(&mut said).expect("the refusal");
        assert_eq!(
            said,
            "error busy: the open-file limit leaves no fd for a control connection beside \
             the workers' pipes (raise ulimit -n)\n"
        );
        assert_eq!(rig.control.connections(), 0);
        rig.control.set_room(1000, rig.poll.registry());
        assert_eq!(rig.control.room, MAX_CONNECTIONS, "never more than 64");
    }

    #[test]
    fn a_waiting_command_is_answered_within_its_bound() {
        let mut rig = Rig::new("bound");
        let mut client = rig.greeted();
        client.write_all(b"scale 3\n").expect("sending");
        let (id, request) = rig.request();
        assert_eq!(request, Request::Scale(3));
        rig.control.wait(id, Pending::Scale(3));
        let now = Instant::now();
        // The master's poll wakes for the bound.
        let next = rig.control.next_deadline().expect("a deadline");
        assert!(
            next > now + WAIT_BOUND - Duration::from_secs(1) && next <= now + WAIT_BOUND,
            "{next:?}"
        );
        assert_eq!(rig.control.overdue(now), []);
        assert_eq!(rig.control.overdue(now + WAIT_BOUND), [(id, Pending::Scale(3))]);
        // The master has its grace to answer with the state it reached...
        rig.control.expire(now + WAIT_BOUND, rig.poll.registry());
        assert_eq!(rig.control.waiting(), [(id, Pending::Scale(3))]);
        // ...and if it does not, the answer is given here.
        rig.control.expire(now + WAIT_BOUND + GRACE, rig.poll.registry());
        assert_eq!(rig.control.waiting(), []);
        assert_eq!(read_all(&client), "error not done within 90 s\n");
        assert_eq!(rig.control.conns.len(), 0);
        assert_eq!(
            not_done(Some("2 of 3 workers ready")),
            "not done within 90 s: 2 of 3 workers ready"
        );
    }

    #[test]
    fn a_waiting_peer_that_hangs_up_is_dropped_and_one_that_half_closes_is_kept() {
        let mut rig = Rig::new("hangup");
        let mut stays = rig.greeted();
        stays.write_all(b"reload\n").expect("sending");
        let (kept, _) = rig.request();
        rig.control.wait(kept, Pending::Reload);
        let mut leaves = rig.greeted();
        leaves.write_all(b"reload\n").expect("sending");
        let (left, _) = rig.request();
        rig.control.wait(left, Pending::Reload);
        // Done sending: shutdown(SHUT_WR), as socat does; still reading.
        stays.shutdown(std::net::Shutdown::Write).expect("shutting down");
        drop(leaves);
        rig.turn_until(|rig| rig.control.conns.len() == 1);
        assert_eq!(rig.control.waiting(), [(kept, Pending::Reload)]);
        rig.control
            .reply(kept, Ok("{}\n".to_owned()), rig.poll.registry());
        assert_eq!(read_all(&stays), "ok\n{}\n");
    }

    #[test]
    fn a_request_sent_whole_is_read_though_its_peer_left_before_the_greeting() {
        let mut rig = Rig::new("left");
        let mut client = UnixStream::connect(&rig.path).expect("connecting");
        client.write_all(b"reload\n").expect("sending");
        drop(client);
        // Accepted only now: the greeting's write fails (EPIPE).
        let (id, request) = rig.request();
        assert_eq!(request, Request::Reload);
        // Nobody to answer: dropped at once, the reload carried out all the same.
        rig.control.wait(id, Pending::Reload);
        assert_eq!(rig.control.waiting(), []);
        rig.control.flush_and_reap(rig.poll.registry());
        assert_eq!(rig.control.conns.len(), 0);
    }

    #[test]
    fn at_the_limit_the_idle_make_room_and_the_waiting_never_do() {
        let mut rig = Rig::new("limit");
        let mut clients = Vec::new();
        let mut waiting = Vec::new();
        for _ in 0..MAX_CONNECTIONS - 1 {
            let mut client = rig.greeted();
            client.write_all(b"stop\n").expect("sending");
            let (id, _) = rig.request();
            rig.control.wait(id, Pending::Stop);
            waiting.push(id);
            clients.push(client);
        }
        let idle = rig.greeted();
        assert_eq!(rig.control.conns.len(), MAX_CONNECTIONS);
        // A newcomer that says nothing yet may not close a connection not
        // 0.1 s old...
        let quiet = UnixStream::connect(&rig.path).expect("connecting");
        quiet
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a timeout");
        assert_eq!(rig.control.on_event(LISTENER, rig.poll.registry()), []);
        assert_eq!(
            read_all(&quiet),
            "error busy: 64 control connections are open, none idle for 0.1 s yet\n"
        );
        // ...one whose request came with it may.
        let _last = rig.greeted_with(b"stop\n");
        assert_eq!(
            read_all(&idle),
            "error closed to make room: 64 control connections were open, this one idle the longest\n"
        );
        let (id, _) = rig.request();
        rig.control.wait(id, Pending::Stop);
        waiting.push(id);
        // Every one waits for its command: the next is refused, none closed.
        let refused = UnixStream::connect(&rig.path).expect("connecting");
        refused
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("a timeout");
        // A Unix connect returns once the connection is in the listener's
        // queue: the accept takes it now.
        assert_eq!(rig.control.on_event(LISTENER, rig.poll.registry()), []);
        assert_eq!(
            read_all(&refused),
            "error busy: 64 control connections are open, each waiting for its command\n"
        );
        assert_eq!(
            rig.control
                .waiting()
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<_>>(),
            waiting
        );
    }

    #[test]
    fn connections_greeted_and_unread_or_waiting_go_through_an_exec() {
        let mut old = Rig::new("exec");
        let idle = old.greeted();
        let mut partial = old.greeted();
        partial.write_all(b"stat").expect("half a request");
        old.turn_until(|rig| rig.control.conns.iter().any(|c| !c.input.is_empty()));
        let mut waiting = old.greeted();
        waiting.write_all(b"upgrade\n").expect("sending");
        let (id, _) = old.request();
        old.control.wait(id, Pending::Upgrade);
        let handed = old.control.handed_down();
        assert_eq!(handed.len(), 2, "the idle one and the waiting one: {handed:?}");
        assert_eq!(handed[1].1, Some(Pending::Upgrade));
        old.control
            .finish_for_exec(Duration::from_secs(5), old.poll.registry());
        assert_eq!(
            read_all(&partial),
            "error the master re-executes for an upgrade; ask again\n"
        );
        assert_eq!(old.control.handed_down(), handed, "kept for the next image");

        // The exec, as far as these sockets see it: the next image has the
        // same sockets at other numbers, and this one is gone.
        let listener = old.control.listener.try_clone().expect("dup").into_raw_fd();
        assert_eq!(old.control.conns[0].stream.as_raw_fd(), handed[0].0);
        let conn = old.control.conns[0]
            .stream
            .try_clone()
            .expect("dup")
            .into_raw_fd();
        let waits = old.control.conns[1]
            .stream
            .try_clone()
            .expect("dup")
            .into_raw_fd();
        let not_a_socket = std::fs::File::open("/dev/null").expect("opening /dev/null");
        let path = old.path.clone();
        let new_poll = mio::Poll::new().expect("a poll");
        let fds = [
            (conn, None),
            (conn, None),
            (not_a_socket.as_raw_fd(), None),
            (waits, Some(Pending::Upgrade)),
        ];
        let adopted = Control::adopt(listener, &fds, &path, new_poll.registry()).expect("adopting");
        drop(std::mem::replace(&mut old.control, adopted));
        old.poll = new_poll;
        assert_eq!(old.control.conns.len(), 2);
        // Not ours: left open.
        assert!(nix::fcntl::fcntl(&not_a_socket, nix::fcntl::FcntlArg::F_GETFD).is_ok());
        // The waiting one is answered by the new image, when it is done.
        let (id, pending) = old.control.waiting()[0];
        assert_eq!(pending, Pending::Upgrade);
        old.control
            .reply(id, Ok("{\"upgraded\":1}\n".to_owned()), old.poll.registry());
        assert_eq!(read_all(&waiting), "ok\n{\"upgraded\":1}\n");

        (&idle)
            .write_all(b"status\n")
            .expect("the request, after the exec");
        let (id, request) = old.request();
        assert_eq!(request, Request::Status);
        old.control.reply(id, Ok("{}\n".to_owned()), old.poll.registry());
        assert_eq!(read_all(&idle), "ok\n{}\n");
        // And the listener serves on.
        let mut again = old.greeted();
        again.write_all(b"metrics\n").expect("sending");
        assert_eq!(old.request().1, Request::Metrics);
    }

    #[test]
    fn control_tokens_are_apart_from_worker_tokens() {
        assert!(owns(LISTENER));
        assert!(owns(Token(CONTROL_BIT | 7)));
        assert!(!owns(Token(2)));
        assert!(!owns(Token(1 << 40)));
    }
}
