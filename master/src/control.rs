//! The control socket (docs/control.md): one more event source in the
//! master's one loop.
//!
//! A Unix stream socket, mode 0600. Each connection is a small state machine
//! driven by readiness events, never by waiting: the master greets it,
//! reads one request line (at most 256 bytes, within 5 s), and either
//! answers at once (`status`, `metrics`) or keeps it waiting until what it
//! asked for is done (`scale`, `reload`, `upgrade`, `stop`); the master
//! checks those after every turn of its loop, where it sees state change.
//! Then the answer is written as far as the peer takes it (within 5 s), and
//! the connection closed. Nothing here blocks, and nothing grows without
//! bound: a request is 256 bytes, an answer is what the master wrote, and
//! at most 64 connections are open.
//!
//! This module knows sockets and the protocol; what a request does to the
//! workers is the master's (`act_on_control` in master.rs).

use crate::listen::{self, SocketFile};
use crate::Error;
use log::{debug, info};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::socket::{getsockopt, sockopt};
use respawn_ipc::Listener;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
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
/// How long a request that waits for what it asked (`scale`, `reload`,
/// `upgrade`) may wait: past it, the master answers with the state reached.
pub(crate) const WAIT_BOUND: Duration = Duration::from_secs(120);

/// Is this event the control socket's?
pub(crate) fn owns(token: Token) -> bool {
    token.0 & CONTROL_BIT != 0
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

/// A connection's id, for the master to answer it later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnId(Token);

enum Phase {
    Reading,
    Waiting(Pending),
    /// Writing the answer; closed once it is out.
    Answering,
}

struct Conn {
    stream: UnixStream,
    token: Token,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    phase: Phase,
    /// Reading and answering have one; waiting has none (a reload may take
    /// minutes, and the peer asked to wait).
    deadline: Option<Instant>,
    /// When it began to wait for what it asked.
    waiting_since: Option<Instant>,
}

pub(crate) struct Control {
    listener: UnixListener,
    file: Option<SocketFile>,
    conns: Vec<Conn>,
    next: usize,
    /// The master's effective uid: the peer must be it, or root.
    uid: u32,
}

impl Control {
    /// Binds the socket at `path` (a stale socket file there is replaced, a
    /// live one refused, as for `--listen unix:`), mode 0600, and watches it.
    pub(crate) fn open(path: &Path, registry: &Registry) -> Result<Control, Error> {
        let shown = format!("--control {}", path.display());
        let (listener, file) = listen::bind_unix(&shown, path)?;
        let Listener::Unix(listener) = listener else {
            return Err(Error::io(shown, io::Error::other("not a Unix socket")));
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|err| {
            Error::io(
                format!("setting the mode of the control socket {}", path.display()),
                err,
            )
        })?;
        Control::serve_on(listener, file, path, registry)
    }

    /// After an upgrade's re-execution: the listener the previous image
    /// handed down, at `fd`, for the socket at `path`.
    pub(crate) fn adopt(fd: RawFd, path: &Path, registry: &Registry) -> Result<Control, Error> {
        use std::os::fd::FromRawFd;
        // SAFETY: the previous image left this fd open for us alone (the
        // state naming it is removed from the environment).
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &listener,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Control::serve_on(listener, listen::socket_file(path).ok(), path, registry)
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
        })
    }

    /// The listener's fd, to hand down through an upgrade's exec.
    pub(crate) fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Handles an event of one of its tokens: new connections, request
    /// bytes, room to write. Returns the requests now complete.
    pub(crate) fn on_event(
        &mut self,
        token: Token,
        _closed: bool,
        registry: &Registry,
    ) -> Vec<(ConnId, Request)> {
        if token == LISTENER {
            self.accept_all(registry);
            return Vec::new();
        }
        let Some(i) = self.conns.iter().position(|c| c.token == token) else {
            return Vec::new();
        };
        let mut requests = Vec::new();
        let conn = &mut self.conns[i];
        if matches!(conn.phase, Phase::Reading) {
            match conn.read_request() {
                Ok(Some(line)) => match parse(&line) {
                    Ok(request) => requests.push((ConnId(token), request)),
                    Err(why) => conn.answer(Err(why)),
                },
                Ok(None) => {}
                Err(()) => conn.phase = Phase::Answering,
            }
        }
        self.flush_and_reap(registry);
        requests
    }

    /// Answers a connection: `ok\n` and the body, or `error <why>\n`.
    pub(crate) fn reply(&mut self, id: ConnId, answer: Result<String, String>, registry: &Registry) {
        if let Some(conn) = self.conns.iter_mut().find(|c| c.token == id.0) {
            conn.answer(answer);
        }
        self.flush_and_reap(registry);
    }

    /// Keeps a connection until what it asked for is done.
    pub(crate) fn wait(&mut self, id: ConnId, pending: Pending) {
        if let Some(conn) = self.conns.iter_mut().find(|c| c.token == id.0) {
            conn.phase = Phase::Waiting(pending);
            conn.deadline = None;
            conn.waiting_since = Some(Instant::now());
        }
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

    /// The nearest deadline of a connection: reading or answering, or
    /// waiting past its bound.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .filter_map(|c| c.deadline.or(c.waiting_since.map(|at| at + WAIT_BOUND)))
            .min()
    }

    /// The connections that have waited past their bound.
    pub(crate) fn overdue(&self, now: Instant) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|c| matches!(c.phase, Phase::Waiting(_)))
            .filter(|c| c.waiting_since.is_some_and(|at| at + WAIT_BOUND <= now))
            .map(|c| ConnId(c.token))
            .collect()
    }

    /// Connections past their deadline: a late request gets an error (if it
    /// can still be written), an answer nobody reads is dropped.
    pub(crate) fn expire(&mut self, now: Instant, registry: &Registry) {
        for conn in self
            .conns
            .iter_mut()
            .filter(|c| c.deadline.is_some_and(|at| at <= now))
        {
            match conn.phase {
                Phase::Reading => conn.answer(Err(format!("no request within {} s", PATIENCE.as_secs()))),
                _ => {
                    debug!("control socket: a peer did not read its answer; closing");
                    conn.output.clear();
                    conn.written = 0;
                }
            }
            // Either way, one last try to write, then gone.
            conn.deadline = Some(now);
        }
        self.flush_and_reap(registry);
        let before = self.conns.len();
        self.conns.retain(|c| {
            let keep = c.deadline.is_none_or(|at| at > now);
            if !keep {
                let _ = registry.deregister(&mut SourceFd(&c.stream.as_raw_fd()));
            }
            keep
        });
        if self.conns.len() < before {
            debug!(
                "control socket: {} connections timed out",
                before - self.conns.len()
            );
        }
    }

    /// Every fd of the control socket, for a forked worker to close.
    pub(crate) fn fds(&self) -> Vec<RawFd> {
        std::iter::once(self.listener.as_raw_fd())
            .chain(self.conns.iter().map(|c| c.stream.as_raw_fd()))
            .collect()
    }

    /// At the master's end or before its exec: answers what still waits
    /// (`answer` decides, per pending request) and writes every answer,
    /// waiting for slow peers at most `patience` in all.
    pub(crate) fn finish(&mut self, answer: impl Fn(Pending) -> Result<String, String>, patience: Duration) {
        let deadline = Instant::now() + patience;
        for conn in &mut self.conns {
            if let Phase::Waiting(pending) = conn.phase {
                conn.answer(answer(pending));
            }
        }
        write_within(&mut self.conns, patience);
        let _ = deadline;
        self.conns.clear();
    }

    /// Before the master's exec: the connections that can be carried across
    /// it are returned, to be handed down (handdown.rs): those waiting for
    /// what they asked, and those whose greeting is out and of whose request
    /// nothing is read yet. The others are answered (one still reading is
    /// told to ask again), written within `patience`, and closed. If the
    /// exec fails, the handed-down ones are here still, as they were.
    pub(crate) fn prepare_exec(&mut self, patience: Duration) -> Vec<(RawFd, Option<Pending>)> {
        let mut handed = Vec::new();
        let mut kept = Vec::new();
        let mut others = Vec::new();
        for mut conn in std::mem::take(&mut self.conns) {
            match conn.phase {
                Phase::Waiting(pending) => {
                    handed.push((conn.stream.as_raw_fd(), Some(pending)));
                    kept.push(conn);
                }
                Phase::Reading if conn.input.is_empty() && conn.written >= conn.output.len() => {
                    handed.push((conn.stream.as_raw_fd(), None));
                    kept.push(conn);
                }
                Phase::Reading => {
                    conn.answer(Err("the master re-executes for an upgrade; ask again".to_owned()));
                    others.push(conn);
                }
                Phase::Answering => others.push(conn),
            }
        }
        write_within(&mut others, patience);
        self.conns = kept;
        handed
    }

    /// After the master's exec: the connections the previous image handed
    /// down, reading their request (None) or waiting for what they asked.
    pub(crate) fn adopt_conns(&mut self, conns: Vec<(RawFd, Option<Pending>)>, registry: &Registry) {
        use std::os::fd::FromRawFd;
        for (fd, pending) in conns {
            // SAFETY: the previous image left this fd open for us alone
            // (the state naming it is removed, and names each fd once).
            let stream = unsafe { UnixStream::from_raw_fd(fd) };
            let _ = nix::fcntl::fcntl(
                &stream,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            let _ = stream.set_nonblocking(true);
            let token = Token(CONTROL_BIT | self.next);
            self.next += 1;
            if let Err(err) = registry.register(
                &mut SourceFd(&stream.as_raw_fd()),
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                debug!("control socket: watching a connection handed down: {err}");
                continue;
            }
            let now = Instant::now();
            let (phase, deadline, waiting_since) = match pending {
                None => (Phase::Reading, Some(now + PATIENCE), None),
                Some(pending) => (Phase::Waiting(pending), None, Some(now)),
            };
            self.conns.push(Conn {
                stream,
                token,
                input: Vec::new(),
                output: Vec::new(),
                written: 0,
                phase,
                deadline,
                waiting_since,
            });
        }
    }

    fn accept_all(&mut self, registry: &Registry) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    // Out of fds, say: the peer waits in the backlog, and the
                    // listener is readable again on the next connection.
                    debug!("control socket: accepting: {err}");
                    return;
                }
            };
            let _ = stream.set_nonblocking(true);
            if let Some(refusal) = self.refusal(&stream) {
                info!("control socket: {refusal}");
                let _ = (&stream).write_all(format!("error {refusal}\n").as_bytes());
                continue;
            }
            let token = Token(CONTROL_BIT | self.next);
            self.next += 1;
            if let Err(err) = registry.register(
                &mut SourceFd(&stream.as_raw_fd()),
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                debug!("control socket: watching a connection: {err}");
                continue;
            }
            let mut conn = Conn {
                stream,
                token,
                input: Vec::new(),
                output: format!("respawn-control {VERSION}\n").into_bytes(),
                written: 0,
                phase: Phase::Reading,
                deadline: Some(Instant::now() + PATIENCE),
                waiting_since: None,
            };
            conn.write_some();
            self.conns.push(conn);
        }
    }

    /// Why this peer is not served, if it is not: too many connections, or
    /// a uid that is neither ours nor root's.
    fn refusal(&self, stream: &UnixStream) -> Option<String> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return Some(format!("busy: {MAX_CONNECTIONS} control connections are open"));
        }
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

impl Conn {
    /// Reads what the peer sent; the request line once it is whole. Err: the
    /// peer left, or sent too much (then the answer is an error).
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
                self.answer(Err(format!("request longer than {MAX_REQUEST} bytes")));
                return Ok(None);
            }
        }
    }

    fn answer(&mut self, answer: Result<String, String>) {
        let text = match answer {
            Ok(body) => format!("ok\n{body}"),
            Err(why) => format!("error {why}\n"),
        };
        self.output.extend_from_slice(text.as_bytes());
        self.phase = Phase::Answering;
        self.deadline = Some(Instant::now() + PATIENCE);
    }

    fn write_some(&mut self) {
        while self.written < self.output.len() {
            match self.stream.write(&self.output[self.written..]) {
                Ok(0) => return,
                Ok(n) => self.written += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // The peer left: nothing more to write.
                    self.written = self.output.len();
                    self.phase = Phase::Answering;
                    return;
                }
            }
        }
    }
}

/// Writes what each connection has left to write, blocking, waiting for
/// slow peers at most `patience` in all.
fn write_within(conns: &mut [Conn], patience: Duration) {
    let deadline = Instant::now() + patience;
    for conn in conns {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.stream.set_nonblocking(false).is_err() {
            break;
        }
        let _ = conn.stream.set_write_timeout(Some(left));
        let _ = conn.stream.write_all(&conn.output[conn.written..]);
    }
}

/// Asks the master whose control socket is at `path` (see
/// [`crate::Config::control`]) and returns the body of its answer: what
/// `respawn ctl` does, for a program that serves the status from an admin
/// endpoint of its own. It blocks its caller (a worker, say) until the
/// answer comes, which for `scale`, `reload`, `upgrade` and `stop` is when
/// that is done; `timeout` bounds each read and write. An `error` answer
/// is an `Err` whose text is the master's reason.
pub fn ask_control(path: &Path, request: &str, timeout: Option<Duration>) -> io::Result<String> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(timeout)?;
    conn.set_write_timeout(timeout)?;
    conn.write_all(format!("{}\n", request.trim()).as_bytes())?;
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
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn control_tokens_are_apart_from_worker_tokens() {
        assert!(owns(LISTENER));
        assert!(owns(Token(CONTROL_BIT | 7)));
        assert!(!owns(Token(2)));
        assert!(!owns(Token(1 << 40)));
    }
}
