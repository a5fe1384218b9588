//! Taking the next connection, from one listener or several, and what to do
//! when `accept(2)` fails.
//!
//! # One listener, or several
//!
//! With **one** listener the worker sleeps in a plain blocking `accept(2)`:
//! the kernel queues sleeping acceptors on the socket as exclusive waiters
//! and wakes one per connection, so an idle pool costs nothing per
//! connection but the accept itself.
//!
//! With **several**, a blocking accept on one of them would leave the
//! worker asleep there while connections queue on the others. So the worker
//! waits for all of them at once, then accepts on one that is readable. The
//! listeners are non-blocking then (the master makes them so, and
//! [`Acceptor::new`] makes sure): a connection another worker took first
//! fails with EAGAIN, and the worker waits again, instead of sleeping in
//! accept on that one socket.
//!
//! The wait is an epoll instance of the worker's own, each listener added
//! with `EPOLLEXCLUSIVE` (Linux 4.5): the kernel then wakes one idle worker
//! per connection, as a blocking accept does on one listener, and not every
//! idle worker, as `poll(2)` on shared sockets does (the thundering herd).
//! A busy worker does not swallow the wakeup: it is not waiting on its
//! instance, so the kernel goes on to the next one that is. Measured with
//! two listeners and an idle pool (`voluntary_ctxt_switches` of every
//! worker over 500 connections one after another): 3.64 wakeups per
//! connection with poll and 4 workers, 7.85 with 8; 1.0 with epoll and
//! `EPOLLEXCLUSIVE`, as with one listener. Where epoll or `EPOLLEXCLUSIVE`
//! is refused (an older kernel), the worker falls back to `poll`, herd and
//! all, and says so once at debug level. Nothing wakes while no connection
//! comes: no timeout, no busy loop. When several listeners are readable at
//! once, the worker starts looking one past the listener it served last, so
//! that a busy listener cannot starve the others.
//!
//! # Failures
//!
//! `accept(2)` fails for three kinds of reason, and a worker must die of
//! none of them:
//!
//! - **The connection, not the listener** (its [`Errors`] section, "Linux
//!   accept() passes already-pending network errors on the new socket as an
//!   error code from accept()"): ENETDOWN, EPROTO, ENOPROTOOPT, EHOSTDOWN,
//!   ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH; ECONNABORTED when the
//!   peer gave up while queued; EINTR. The connection is gone, the next one
//!   may be fine: try again at once.
//! - **Out of fds or memory** (EMFILE, ENFILE, ENOBUFS, ENOMEM): accept
//!   would fail again at once and spin. Pause, from 1 ms doubling to 1 s,
//!   back to 1 ms after the next success: a brief shortage costs almost
//!   nothing, a long one costs one accept a second. (mini-redis pauses 1 s
//!   doubling to 64 s; a worker should be back soon after the fds are.)
//!   One warning every few seconds at most says so.
//! - **EAGAIN on a non-blocking listener**: with several listeners, another
//!   worker took the connection: back to `poll`. With one, the master makes
//!   the listener blocking before it forks, but a listener made
//!   non-blocking some other way must not kill the worker either. It waits
//!   for a connection with `poll(2)` (warning once that every idle worker
//!   now wakes for each connection), then tries again.
//!
//! Anything else (EBADF, ENOTSOCK, EINVAL: the fd is not a listening
//! socket) is for good, and so is the worker's end.
//!
//! The pauses and waits use `poll(2)`, which a stop request interrupts
//! (EINTR, SA_RESTART or not), so the loop sees the request at once.
//!
//! [`Errors`]: https://man7.org/linux/man-pages/man2/accept.2.html#ERRORS

use crate::stop;
use log::{debug, warn};
use respawn_ipc::scoreboard::RowWriter;
use respawn_ipc::{Conn, Listener, MAX_LISTENERS};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// The first pause after running out of fds or memory.
pub const MIN_PAUSE: Duration = Duration::from_millis(1);
/// The longest pause.
pub const MAX_PAUSE: Duration = Duration::from_secs(1);
/// At most one warning about running out in this long.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// What to do after accept failed with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The error was the connection's: try again now.
    Retry,
    /// Out of fds or memory: pause, then try again.
    Pause,
    /// The listener is non-blocking and has nothing queued: wait for it to
    /// be readable, then try again.
    WaitReadable,
    /// The listener is unusable: the worker cannot go on.
    Fail,
}

/// How accept(2)'s errors are handled (see the module docs).
pub fn classify(err: &io::Error) -> Action {
    match err.raw_os_error() {
        Some(
            libc::ENETDOWN
            | libc::EPROTO
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ECONNABORTED
            | libc::EINTR,
        ) => Action::Retry,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => Action::Pause,
        // EWOULDBLOCK is EAGAIN on Linux.
        Some(libc::EAGAIN) => Action::WaitReadable,
        _ => Action::Fail,
    }
}

/// The pause after each failure in a row of fd or memory shortages:
/// [`MIN_PAUSE`], doubling up to [`MAX_PAUSE`], until [`AcceptBackoff::reset`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next: MIN_PAUSE }
    }
}

impl AcceptBackoff {
    pub fn new() -> AcceptBackoff {
        AcceptBackoff::default()
    }

    /// How long to pause after this failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(MAX_PAUSE);
        delay
    }

    /// An accept succeeded: the next shortage starts short again.
    pub fn reset(&mut self) {
        self.next = MIN_PAUSE;
    }
}

/// Lets one line through every `every`, and counts the ones held back.
#[derive(Clone, Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    pub fn new(every: Duration) -> RateLimit {
        RateLimit {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)` if a line may be written at `now`, `n` being how many were
    /// held back since the last one; None if this one is held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let due = match self.last {
            None => true,
            Some(last) => now.saturating_duration_since(last) >= self.every,
        };
        if !due {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// A worker's accept loop, with what it remembers between failures.
pub struct Acceptor<'a> {
    listeners: &'a [Listener],
    /// With several listeners: how the worker waits for any of them.
    wait: Option<Wait>,
    /// With several listeners: where the next look for a readable one
    /// starts, one past the last served.
    next: usize,
    row: Option<RowWriter>,
    backoff: AcceptBackoff,
    warnings: RateLimit,
    warned_nonblocking: bool,
}

/// How a worker with several listeners waits for a connection on any.
enum Wait {
    /// Its own epoll instance, every listener added with EPOLLEXCLUSIVE:
    /// one idle worker wakes per connection. Kept open for the life of the
    /// process, as the listeners are: the stop handler `dup2`s over it.
    Epoll(RawFd),
    /// `poll(2)` on every listener: every idle worker wakes.
    Poll(Vec<libc::pollfd>),
}

impl<'a> Acceptor<'a> {
    /// An accept loop over `listeners` (one or more). With several, each is
    /// made non-blocking (see the module docs); that flag belongs to the
    /// socket, shared with the master and the other workers, which all wait
    /// on it the same way. With several, call it after [`stop::install`]:
    /// the epoll fd joins the fds a stop request closes.
    pub fn new(listeners: &'a [Listener], row: Option<RowWriter>) -> Acceptor<'a> {
        let mut wait = None;
        if listeners.len() > 1 {
            for listener in listeners {
                if let Err(err) = listener.set_nonblocking(true) {
                    // accept says what is wrong with it, when it is readable.
                    debug!("making {} non-blocking: {err}", listener.local());
                }
            }
            wait = Some(match exclusive_epoll(listeners) {
                Ok(epoll) => Wait::Epoll(epoll),
                Err(err) => {
                    debug!(
                        "worker {}: waiting on several listeners with poll(2), which wakes every idle \
                         worker: epoll with EPOLLEXCLUSIVE failed ({err})",
                        std::process::id()
                    );
                    Wait::Poll(
                        listeners
                            .iter()
                            .map(|listener| libc::pollfd {
                                fd: listener.as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            })
                            .collect(),
                    )
                }
            });
        }
        Acceptor {
            listeners,
            wait,
            next: 0,
            row,
            backoff: AcceptBackoff::new(),
            warnings: RateLimit::new(WARN_EVERY),
            warned_nonblocking: false,
        }
    }

    /// The next connection, stamped on the scoreboard; None once a stop was
    /// requested (see [`crate::stop`] for why none is ever missed); Err if
    /// a listener cannot be used.
    pub fn accept(&mut self) -> io::Result<Option<Conn>> {
        let several = self.listeners.len() > 1;
        loop {
            if stop::requested() {
                return Ok(None);
            }
            let accepted = match self.listeners {
                [one] => one.accept(),
                _ => self.accept_any(),
            };
            let err = match accepted {
                Ok(conn) => {
                    self.backoff.reset();
                    if let Some(row) = self.row {
                        row.begin(&conn.peer());
                    }
                    return Ok(Some(conn));
                }
                Err(err) => err,
            };
            // After a stop request the listener fds are /dev/null: ENOTSOCK
            // (EINVAL from epoll_wait, whose fd is /dev/null too).
            if stop::requested() {
                return Ok(None);
            }
            // getpid is a system call: only on the way to a log line, never
            // per connection.
            match classify(&err) {
                // Another worker took the connection the wait announced.
                Action::WaitReadable if several => {}
                Action::Retry => debug!("worker {}: accepting: {err}; retrying", std::process::id()),
                Action::Pause => {
                    let delay = self.backoff.next_delay();
                    if let Some(held_back) = self.warnings.allow(Instant::now()) {
                        warn!("{}", shortage_line(std::process::id(), &err, delay, held_back));
                    }
                    pause(delay);
                }
                Action::WaitReadable => {
                    if !std::mem::replace(&mut self.warned_nonblocking, true) {
                        warn!(
                            "worker {}: the listening socket is non-blocking; \
                             waiting for connections with poll(2), which wakes every idle worker",
                            std::process::id()
                        );
                    }
                    if let [one] = self.listeners {
                        wait_readable(one.as_raw_fd());
                    }
                }
                Action::Fail => return Err(err),
            }
        }
    }

    /// Waits with poll(2), as where epoll's EPOLLEXCLUSIVE is refused.
    #[cfg(test)]
    fn wait_with_poll(&mut self) {
        let pollfds = self
            .listeners
            .iter()
            .map(|listener| libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        self.wait = Some(Wait::Poll(pollfds));
    }

    /// Several listeners: sleeps until one is readable, then accepts on the
    /// first readable one from `next` on. EAGAIN when other workers took
    /// every connection the wait saw; EINTR when a signal (a stop request)
    /// ended the wait.
    fn accept_any(&mut self) -> io::Result<Conn> {
        let n = self.listeners.len();
        let mut ready = [false; MAX_LISTENERS];
        match &mut self.wait {
            Some(Wait::Epoll(epoll)) => {
                let mut events = [libc::epoll_event { events: 0, u64: 0 }; MAX_LISTENERS];
                // SAFETY: epoll_wait writes at most MAX_LISTENERS events
                // into an array of that many, and reads nothing else.
                let rc = unsafe { libc::epoll_wait(*epoll, events.as_mut_ptr(), MAX_LISTENERS as i32, -1) };
                if rc == -1 {
                    return Err(io::Error::last_os_error());
                }
                for event in &events[..rc as usize] {
                    if let Some(slot) = usize::try_from(event.u64).ok().and_then(|i| ready.get_mut(i)) {
                        *slot = true;
                    }
                }
            }
            Some(Wait::Poll(pollfds)) => {
                let count = pollfds.len() as libc::nfds_t;
                // SAFETY: `pollfds` holds `count` valid pollfd entries, which
                // poll may write (their revents) while it runs.
                let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), count, -1) };
                if rc == -1 {
                    return Err(io::Error::last_os_error());
                }
                for (slot, pollfd) in ready.iter_mut().zip(pollfds.iter()) {
                    *slot = pollfd.revents != 0;
                }
            }
            None => ready[0] = true,
        }
        for i in (0..n).map(|k| (self.next + k) % n) {
            if !ready[i] {
                continue;
            }
            match self.listeners[i].accept() {
                Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => continue,
                result => {
                    self.next = (i + 1) % n;
                    return result;
                }
            }
        }
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }
}

/// An epoll instance watching every listener for a connection, each with
/// EPOLLEXCLUSIVE, the listener's index as its data. Its fd joins those the
/// stop handler closes: a wait that has not started yet then fails at once
/// (EINVAL: not an epoll fd), as an accept does on a closed listener.
fn exclusive_epoll(listeners: &[Listener]) -> io::Result<RawFd> {
    // SAFETY: epoll_create1 takes a flag and returns a new fd or -1.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll == -1 {
        return Err(io::Error::last_os_error());
    }
    let close = |err: io::Error| {
        // SAFETY: the fd was just created here, and nothing else has it.
        unsafe { libc::close(epoll) };
        err
    };
    for (i, listener) in listeners.iter().enumerate() {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            u64: i as u64,
        };
        // SAFETY: epoll_ctl reads one epoll_event, which lives for the call.
        let rc = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, listener.as_raw_fd(), &mut event) };
        if rc == -1 {
            return Err(close(io::Error::last_os_error()));
        }
    }
    stop::close_on_stop(epoll).map_err(close)?;
    Ok(epoll)
}

/// `worker 4321 cannot accept: Too many open files (os error 24); retrying
/// in 8 ms (12 more like it not logged)`.
fn shortage_line(pid: u32, err: &io::Error, delay: Duration, held_back: u64) -> String {
    let mut line = format!(
        "worker {pid} cannot accept: {err}; retrying in {} ms",
        delay.as_millis()
    );
    if held_back > 0 {
        line.push_str(&format!(" ({held_back} more like it not logged)"));
    }
    line
}

/// Sleeps `delay`, or less if a signal (a stop request) comes.
pub fn pause(delay: Duration) {
    let ms = libc::c_int::try_from(delay.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll with no fds (a null pointer and a count of 0) only sleeps;
    // nothing is read or written.
    unsafe { libc::poll(std::ptr::null_mut(), 0, ms) };
}

/// Waits until `fd` is readable (a connection is queued on a listener), or
/// a signal (a stop request) comes. An error, as EINTR, just returns: the
/// caller tries accept again, which says what is wrong.
pub fn wait_readable(fd: RawFd) {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and a count of 1.
    unsafe { libc::poll(&mut pollfd, 1, -1) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{global, in_syscall, logged, signal_thread, tid, Watchdog, DEADLINE};
    use respawn_ipc::scoreboard::Scoreboard;
    use respawn_ipc::Peer;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::{UnixListener, UnixStream};

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn errors_of_the_connection_are_retried_at_once() {
        for errno in [
            libc::ENETDOWN,
            libc::EPROTO,
            libc::ENOPROTOOPT,
            libc::EHOSTDOWN,
            libc::ENONET,
            libc::EHOSTUNREACH,
            libc::EOPNOTSUPP,
            libc::ENETUNREACH,
            libc::ECONNABORTED,
            libc::EINTR,
        ] {
            assert_eq!(classify(&os(errno)), Action::Retry, "{}", os(errno));
        }
    }

    #[test]
    fn shortages_pause_nonblocking_waits_the_rest_fails() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(classify(&os(errno)), Action::Pause, "{}", os(errno));
        }
        assert_eq!(classify(&os(libc::EAGAIN)), Action::WaitReadable);
        assert_eq!(classify(&os(libc::EWOULDBLOCK)), Action::WaitReadable);
        for errno in [libc::EBADF, libc::ENOTSOCK, libc::EINVAL, libc::EFAULT] {
            assert_eq!(classify(&os(errno)), Action::Fail, "{}", os(errno));
        }
        assert_eq!(classify(&io::Error::other("not from the OS")), Action::Fail);
    }

    #[test]
    fn the_backoff_doubles_from_short_to_long_and_resets() {
        let mut backoff = AcceptBackoff::new();
        let delays: Vec<u128> = (0..13).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), MIN_PAUSE);
        assert_eq!(backoff.next_delay(), 2 * MIN_PAUSE);
        assert_eq!(AcceptBackoff::default(), AcceptBackoff::new());
    }

    #[test]
    fn warnings_are_rate_limited_and_count_what_they_held_back() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut limit = RateLimit::new(Duration::from_secs(10));
        assert_eq!(limit.allow(at(0)), Some(0));
        assert_eq!(limit.allow(at(1)), None);
        assert_eq!(limit.allow(at(9_999)), None);
        assert_eq!(limit.allow(at(10_000)), Some(2));
        assert_eq!(limit.allow(at(10_001)), None);
        assert_eq!(limit.allow(at(25_000)), Some(1));
        assert_eq!(limit.allow(at(35_000)), Some(0));
        // A clock read out of order holds the line back, never panics.
        assert_eq!(limit.allow(at(0)), None);
    }

    #[test]
    fn the_shortage_line_says_what_and_how_long() {
        let err = os(libc::EMFILE);
        assert_eq!(
            shortage_line(4321, &err, Duration::from_millis(8), 0),
            format!("worker 4321 cannot accept: {err}; retrying in 8 ms")
        );
        assert_eq!(
            shortage_line(4321, &err, MAX_PAUSE, 12),
            format!("worker 4321 cannot accept: {err}; retrying in 1000 ms (12 more like it not logged)")
        );
    }

    #[test]
    fn pause_sleeps_about_as_long_as_asked() {
        let start = Instant::now();
        pause(Duration::from_millis(20));
        let slept = start.elapsed();
        assert!(
            slept >= Duration::from_millis(20) && slept < Duration::from_secs(5),
            "{slept:?}"
        );
    }

    #[test]
    fn a_stop_request_ends_a_pause_and_a_wait() {
        let _global = global();
        let me = tid();
        type Wait = fn(RawFd);
        let waits: [(&str, Wait); 2] = [
            ("pause", |_| pause(2 * DEADLINE)),
            ("wait_readable", wait_readable),
        ];
        for (what, wait) in waits {
            crate::stop::reset();
            let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
            let addr = listener.local_addr().expect("address");
            stop::install(&[listener.as_raw_fd()]).expect("installing");
            // If the signal did not end the wait, a connection will.
            let _watchdog = Watchdog::new(DEADLINE, move || {
                let _ = TcpStream::connect(addr);
            });
            let signaller = std::thread::spawn(move || {
                in_syscall(me, &[libc::SYS_poll, libc::SYS_ppoll], DEADLINE)?;
                signal_thread(me, libc::SIGTERM);
                Ok::<(), String>(())
            });
            let start = Instant::now();
            wait(listener.as_raw_fd());
            let waited = start.elapsed();
            signaller.join().expect("signaller").expect(what);
            assert!(stop::requested(), "{what}");
            assert!(waited < DEADLINE, "{what}: {waited:?}");
            std::mem::forget(listener);
        }
    }

    #[test]
    fn wait_readable_sleeps_until_a_connection_comes() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address");
        let me = tid();
        let quiet = Duration::from_millis(50);
        let _watchdog = Watchdog::new(DEADLINE, move || {
            let _ = TcpStream::connect(addr);
        });
        let client = std::thread::spawn(move || {
            in_syscall(me, &[libc::SYS_poll, libc::SYS_ppoll], DEADLINE)?;
            // Measured, not waited for: wait_readable must still sleep.
            std::thread::sleep(quiet);
            TcpStream::connect(addr).map_err(|err| err.to_string())
        });
        let start = Instant::now();
        wait_readable(listener.as_raw_fd());
        let waited = start.elapsed();
        let _conn = client.join().expect("client").expect("connected");
        assert!(waited >= quiet && waited < DEADLINE, "{waited:?}");
    }

    #[test]
    fn wait_readable_returns_when_a_connection_is_queued() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let _client = TcpStream::connect(listener.local_addr().expect("address")).expect("connecting");
        let start = Instant::now();
        wait_readable(listener.as_raw_fd());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_nonblocking_listener_is_waited_on_with_one_warning() {
        let _global = global();
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("address");
        stop::install(&[listener.as_raw_fd()]).expect("installing");
        let board = Scoreboard::new(1).expect("scoreboard");
        let listeners = [Listener::from(listener)];
        let mut acceptor = Acceptor::new(&listeners, board.writer(0));
        let me = tid();
        // If no connection ends a wait, a stop request will.
        let _watchdog = Watchdog::new(DEADLINE, move || signal_thread(me, libc::SIGTERM));
        for round in 0..3 {
            let client = std::thread::spawn(move || {
                in_syscall(me, &[libc::SYS_poll, libc::SYS_ppoll], DEADLINE)?;
                TcpStream::connect(addr).map_err(|err| err.to_string())
            });
            let conn = acceptor.accept().expect("accepting").expect("a connection");
            let client = client.join().expect("client").expect("connected");
            assert_eq!(
                conn.peer().to_string(),
                client.local_addr().expect("address").to_string(),
                "round {round}"
            );
            let row = board.read(0).expect("row 0");
            assert_eq!(row.peer, client.local_addr().expect("client address").to_string());
            assert!(row.busy_since.is_some());
        }
        let warnings: Vec<String> = logged().into_iter().filter(|l| l.starts_with("WARN")).collect();
        let expected = format!(
            "WARN worker {}: the listening socket is non-blocking; \
             waiting for connections with poll(2), which wakes every idle worker",
            std::process::id()
        );
        assert_eq!(warnings, [expected]);
        std::mem::forget(listeners);
    }

    #[test]
    fn a_stop_request_ends_the_loop_and_a_dead_listener_fails_it() {
        let _global = global();
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address");
        stop::install(&[listener.as_raw_fd()]).expect("installing");
        let listeners = [Listener::from(listener)];
        let mut acceptor = Acceptor::new(&listeners, None);
        // If the door stays open, a connection ends the accept.
        let _watchdog = Watchdog::new(DEADLINE, move || {
            let _ = TcpStream::connect(addr);
        });
        // The door closed, but no request: the listener is unusable.
        stop::stop_accepting();
        let err = acceptor.accept().expect_err("ENOTSOCK is for good");
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
        // With a request, the same error is the way out.
        // SAFETY: this thread; the stop handler is installed.
        unsafe { libc::raise(libc::SIGTERM) };
        assert!(acceptor.accept().expect("stopping").is_none());
        std::mem::forget(listeners);
    }

    /// Where a worker with several listeners sleeps.
    const WAITS: &[libc::c_long] = &[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ];

    /// A TCP listener and a Unix one, as a master with two `--listen` hands
    /// them over, and where to reach each.
    fn tcp_and_unix(name: &str) -> ([Listener; 2], std::net::SocketAddr, std::path::PathBuf) {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = tcp.local_addr().expect("address");
        let path = std::env::temp_dir().join(format!("respawn-accept-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path).expect("binding a Unix socket");
        ([Listener::from(tcp), Listener::from(unix)], addr, path)
    }

    /// Waits until `fd` has a connection queued (a TCP handshake may end
    /// a moment after connect returns).
    fn queued(fd: RawFd) {
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = DEADLINE.as_millis() as libc::c_int;
        // SAFETY: one valid pollfd, and a count of 1.
        assert_eq!(
            unsafe { libc::poll(&mut pollfd, 1, ms) },
            1,
            "nothing queued on fd {fd}"
        );
    }

    fn kind(conn: &Conn) -> &'static str {
        match conn.peer() {
            Peer::Tcp(_) => "tcp",
            Peer::Unix => "unix",
        }
    }

    #[test]
    fn several_listeners_are_made_nonblocking_and_taken_in_turn() {
        let _global = global();
        let (listeners, addr, path) = tcp_and_unix("turns");
        let fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        stop::install(&fds).expect("installing");
        let board = Scoreboard::new(1).expect("scoreboard");
        let mut acceptor = Acceptor::new(&listeners, board.writer(0));
        for listener in &listeners {
            let flags = nix::fcntl::fcntl(listener, nix::fcntl::FcntlArg::F_GETFL).expect("F_GETFL");
            assert_ne!(
                flags & libc::O_NONBLOCK,
                0,
                "{} is non-blocking",
                listener.local()
            );
        }
        // Two connections wait on each: the worker alternates, where
        // always starting from the first listener would serve both TCP
        // connections before either Unix one.
        let _clients = (
            TcpStream::connect(addr).expect("connecting"),
            TcpStream::connect(addr).expect("connecting"),
            UnixStream::connect(&path).expect("connecting"),
            UnixStream::connect(&path).expect("connecting"),
        );
        queued(fds[0]);
        queued(fds[1]);
        let mut kinds = Vec::new();
        for _ in 0..4 {
            let conn = acceptor.accept().expect("accepting").expect("a connection");
            kinds.push(kind(&conn));
            if kind(&conn) == "unix" {
                assert_eq!(board.read(0).expect("row 0").peer, "unix");
            }
        }
        assert_eq!(kinds, ["tcp", "unix", "tcp", "unix"]);
        let _ = std::fs::remove_file(&path);
        std::mem::forget(listeners);
    }

    #[test]
    fn a_worker_waiting_on_several_listeners_sleeps_until_one_has_a_connection() {
        let _global = global();
        let (listeners, addr, path) = tcp_and_unix("sleeps");
        let fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        stop::install(&fds).expect("installing");
        let mut acceptor = Acceptor::new(&listeners, None);
        let me = tid();
        let _watchdog = Watchdog::new(DEADLINE, move || {
            let _ = TcpStream::connect(addr);
        });
        for round in 1..=2 {
            let path = path.clone();
            let client = std::thread::spawn(move || {
                // Asleep in poll, not spinning; then a connection on the
                // second listener, which the first must not hide.
                in_syscall(me, WAITS, DEADLINE)?;
                UnixStream::connect(&path).map_err(|err| err.to_string())
            });
            let conn = acceptor.accept().expect("accepting").expect("a connection");
            let _client = client.join().expect("client").expect("connected");
            assert_eq!(kind(&conn), "unix", "round {round}");
        }
        let _ = std::fs::remove_file(&path);
        std::mem::forget(listeners);
    }

    #[test]
    fn a_stop_request_wakes_a_worker_waiting_on_several_listeners_and_closes_every_door() {
        let _global = global();
        let (listeners, addr, path) = tcp_and_unix("stop");
        let fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        stop::install(&fds).expect("installing");
        let mut acceptor = Acceptor::new(&listeners, None);
        let me = tid();
        // If the request does not end the poll, a connection will.
        let _watchdog = Watchdog::new(DEADLINE, move || {
            let _ = TcpStream::connect(addr);
        });
        let signaller = std::thread::spawn(move || {
            in_syscall(me, WAITS, DEADLINE)?;
            signal_thread(me, libc::SIGTERM);
            Ok::<(), String>(())
        });
        assert!(acceptor.accept().expect("stopping").is_none(), "stopped");
        signaller
            .join()
            .expect("signaller")
            .expect("the worker slept in poll");
        // Both fd numbers are /dev/null now: a poll that starts late returns
        // at once, and accept on either fails for good.
        for listener in &listeners {
            let err = listener.accept().expect_err("closed");
            assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
        }
        // A request that lands before the poll: the loop ends without
        // sleeping (the flag), and so does the poll itself (/dev/null).
        let start = Instant::now();
        assert!(acceptor.accept().expect("stopping").is_none());
        // The epoll fd is /dev/null too: EINVAL, not a wait.
        let waited = acceptor.accept_any().map(|_| ()).map_err(|e| e.raw_os_error());
        assert_eq!(waited, Err(Some(libc::EINVAL)));
        acceptor.wait_with_poll();
        let waited = acceptor.accept_any().map(|_| ()).map_err(|e| e.raw_os_error());
        assert_eq!(
            waited,
            Err(Some(libc::ENOTSOCK)),
            "poll on /dev/null returns at once"
        );
        assert!(start.elapsed() < DEADLINE);
        let _ = std::fs::remove_file(&path);
        std::mem::forget(listeners);
    }

    /// This thread's voluntary context switches: how often it went to
    /// sleep, which for an idle acceptor is how often it was woken since.
    fn sleeps(tid: libc::pid_t) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `workers` acceptors on a TCP and a Unix listener, as worker
    /// processes would be (each its own epoll instance), serve `rounds`
    /// connections one after another, alternating listeners; returns how
    /// many times the workers were woken in all.
    fn serve_in_turn(workers: usize, rounds: usize, poll: bool) -> u64 {
        let (listeners, addr, path) = tcp_and_unix(&format!("herd-{poll}"));
        let listeners = std::sync::Arc::new(listeners);
        let (tx, rx) = std::sync::mpsc::channel::<Result<&'static str, libc::pid_t>>();
        let threads: Vec<_> = (0..workers)
            .map(|_| {
                let (listeners, tx) = (std::sync::Arc::clone(&listeners), tx.clone());
                std::thread::spawn(move || {
                    let mut acceptor = Acceptor::new(&listeners[..], None);
                    if poll {
                        acceptor.wait_with_poll();
                    }
                    let _ = tx.send(Err(tid()));
                    while let Ok(Some(conn)) = acceptor.accept() {
                        if tx.send(Ok(kind(&conn))).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        let tids: Vec<libc::pid_t> = (0..workers)
            .map(|_| match rx.recv_timeout(DEADLINE) {
                Ok(Err(tid)) => tid,
                other => panic!("a worker did not start: {other:?}"),
            })
            .collect();
        let idle = || {
            for &worker in &tids {
                in_syscall(worker, WAITS, DEADLINE).expect("every worker idle");
            }
        };
        idle();
        let before: u64 = tids.iter().map(|&t| sleeps(t)).sum();
        let mut seen = Vec::new();
        for round in 0..rounds {
            if round % 2 == 0 {
                drop(TcpStream::connect(addr).expect("connecting"));
            } else {
                drop(UnixStream::connect(&path).expect("connecting"));
            }
            let served = rx.recv_timeout(DEADLINE).expect("served in time");
            seen.push(served.expect("a connection"));
            // Every worker idle again before the next connection.
            idle();
        }
        let woken = tids.iter().map(|&t| sleeps(t)).sum::<u64>() - before;
        assert_eq!(seen.iter().filter(|&&k| k == "tcp").count(), rounds / 2);
        assert_eq!(seen.iter().filter(|&&k| k == "unix").count(), rounds / 2);
        assert!(
            rx.recv_timeout(Duration::from_millis(50)).is_err(),
            "a connection served twice"
        );
        // The workers are still in their loops, asleep: each ends with the
        // next connection it takes, when it cannot report it.
        drop(rx);
        for _ in 0..workers {
            drop(TcpStream::connect(addr).expect("connecting"));
        }
        for thread in threads {
            thread.join().expect("worker thread");
        }
        let _ = std::fs::remove_file(&path);
        woken
    }

    #[test]
    fn one_idle_worker_wakes_per_connection_on_several_listeners() {
        // Each connection wakes one worker (EPOLLEXCLUSIVE), which takes
        // it; none fails or spins. With poll(2) every idle worker wakes,
        // as it would with a plain epoll.
        let _global = global();
        let (workers, rounds) = (4, 40);
        let woken = serve_in_turn(workers, rounds, false);
        eprintln!("epoll with EPOLLEXCLUSIVE: {woken} wakeups for {rounds} connections, {workers} workers");
        // One per connection on a quiet host; a busy one adds some. Every
        // idle worker would be 4 per connection.
        assert!(
            woken < rounds as u64 * 2,
            "{woken} wakeups for {rounds} connections"
        );
        let woken = serve_in_turn(workers, rounds, true);
        eprintln!("poll: {woken} wakeups for {rounds} connections, {workers} workers");
        assert!(
            woken >= 2 * rounds as u64,
            "the herd: {woken} wakeups for {rounds} connections"
        );
    }
}
