//! respawn-worker: the child side of respawn.
//!
//! A worker is a plain blocking loop:
//!
//! ```text
//! tell the master Ready
//! loop { accept -> catch_unwind(serve one connection) }
//! ```
//!
//! It serves one connection at a time, from whichever of its listeners
//! (TCP or Unix sockets, one or several) has one waiting: a [`Conn`] reads
//! and writes the same whatever the kind. Two things end the loop:
//!
//! - **A stop request** (SIGTERM or SIGQUIT from the master): the worker
//!   finishes the connection in hand and returns 0. How the request can never
//!   be lost, even when it lands just before `accept(2)`, is the subject of
//!   [`stop`].
//! - **A panic** in [`Service::serve`]: the worker stops accepting, tells the
//!   master (`Suicide`, so the replacement starts now), lets
//!   [`Service::recover`] answer the client (a 500, say), only then logs
//!   the panic, and returns non-zero. A process that panicked is not trusted to serve
//!   again. This is Node's `uncaughtException` handler with its `suicide`
//!   message, in [`mod@panic`].
//!
//! An accept that fails is retried, after a pause if the process is out of
//! fds or memory; only a listener that is not one any more ends the worker
//! ([`accept`]).
//!
//! The master side, with fork hygiene (masks, fds, parent-death signal) done
//! before this code runs, is in `respawn-master`; the two meet only through
//! `respawn-ipc`.
//!
//! # What the worker changes in its process
//!
//! [`run`] sets up the process for the worker's whole life:
//!
//! - a panic hook (replacing the one in place, the default or the
//!   program's own) that logs through the `log` crate, or to stderr when no
//!   logger takes error lines, and only after the Suicide is sent (see
//!   [`mod@panic`]; a panic that aborts, one in a Drop while another
//!   unwinds, is said at once);
//! - a handler for SIGTERM and SIGQUIT, with SA_RESTART, that `dup2`s
//!   `/dev/null` over every listener's fd (see [`stop`]); those fds are
//!   never closed, not even when `run` returns;
//! - with several listeners, each made non-blocking (see [`accept`]);
//! - SIGTERM and SIGQUIT unblocked. A master forks each worker with both
//!   **blocked**, so that a stop request sent before the handler exists
//!   waits instead of killing the worker (or dumping its core). A worker
//!   function of your own that does not call [`run`] must unblock them once
//!   it handles them, or it never hears a stop request.
//!
//! ```no_run
//! use respawn_worker::Conn;
//! use std::io::Write;
//!
//! struct Hello;
//!
//! impl respawn_worker::Service for Hello {
//!     fn serve(&mut self, conn: &mut Conn) {
//!         let _ = conn.write_all(b"hello\n");
//!     }
//! }
//!
//! # fn handoff() -> respawn_ipc::Handoff { unimplemented!() }
//! // In the child, with the Handoff the master gave:
//! let code = respawn_worker::run(handoff(), Hello);
//! std::process::exit(code);
//! ```

#[cfg(not(target_os = "linux"))]
compile_error!(
    "respawn runs on Linux only: it is built on signalfd, epoll, \
     prctl(PR_SET_PDEATHSIG) and /proc, which other systems do not have"
);

pub mod accept;
pub mod panic;
pub mod stop;
#[cfg(test)]
mod testkit;

use log::{debug, error};
use respawn_ipc::scoreboard::RowWriter;
use respawn_ipc::{describe, Channel, Handoff, Listener, Message};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};

pub use respawn_ipc::{exit_code, Conn, Peer};

/// What a worker does with each connection.
pub trait Service {
    /// Called once in the new worker, before it tells the master it is
    /// ready: load what the worker needs. A panic here is a failed start:
    /// the worker tells the master why and exits, and the master replaces it
    /// after a backoff (and gives up if starts keep failing).
    fn start(&mut self) {}

    /// Serves one connection, TCP or Unix. Returns when done with it;
    /// dropping it closes it. A panic here is caught: the worker retires
    /// (see the crate docs).
    fn serve(&mut self, conn: &mut Conn);

    /// Called after `serve` panicked, with the connection it was serving and
    /// the panic message: answer the client if the protocol allows (an HTTP
    /// 500, say). A panic here is caught and logged, and changes nothing.
    fn recover(&mut self, conn: &mut Conn, panic: &str) {
        let _ = (conn, panic);
    }
}

/// How a worker behaves beyond its [`Service`].
#[derive(Clone, Debug, Default)]
pub struct Config {
    max_requests: u64,
    max_requests_jitter: u64,
}

impl Config {
    pub fn new() -> Config {
        Config::default()
    }

    /// Retire after `max` connections (0: never), plus a random 0 to
    /// `jitter` more, so that workers started together do not all retire
    /// together. Against slow leaks, as gunicorn's and uWSGI's max-requests.
    /// The worker retires as a panicking one does: its replacement is forked
    /// while it serves its last connection, and nothing queued is reset.
    pub fn max_requests(mut self, max: u64, jitter: u64) -> Config {
        self.max_requests = max;
        self.max_requests_jitter = jitter;
        self
    }

    /// This worker's share of connections, if it has one.
    fn share(&self) -> Option<u64> {
        // random() asks for the pid: only when there is a share to spread.
        match self.max_requests {
            0 => None,
            max => share_of(max, self.max_requests_jitter, random()),
        }
    }
}

/// `max` plus `random` brought into 0..=`jitter`; None when `max` is 0.
/// Any `jitter` is fine, u64::MAX included (where `jitter + 1` overflows).
fn share_of(max: u64, jitter: u64, random: u64) -> Option<u64> {
    if max == 0 {
        return None;
    }
    let extra = match jitter.checked_add(1) {
        Some(choices) => random % choices,
        None => random,
    };
    Some(max.saturating_add(extra))
}

/// Runs the worker loop with the default [`Config`]; see [`run_with`].
pub fn run<S: Service>(handoff: Handoff, service: S) -> i32 {
    run_with(handoff, service, &Config::default())
}

/// Runs the worker loop until a stop request, a panic or the end of its
/// share of connections; returns the exit code for the process (see
/// [`exit_code`]).
///
/// The worker starts with SIGTERM and SIGQUIT blocked (a master forks it so,
/// see [`stop`]); this unblocks them once their handler is installed.
/// The listeners' fds are left open when this returns: a stop request,
/// however late, `dup2`s over their numbers, which must not have been
/// reused.
pub fn run_with<S: Service>(handoff: Handoff, mut service: S, config: &Config) -> i32 {
    let Handoff {
        slot: _,
        listeners,
        channel,
        scoreboard,
    } = handoff;
    let listeners = ManuallyDrop::new(listeners);
    // The pid is asked for (a system call) only on the way to a line that
    // names it: nothing before the first accept needs it.
    if let Err(code) = set_up(&listeners, &channel, scoreboard, &mut service) {
        return code;
    }
    let share = config.share();
    let mut acceptor = accept::Acceptor::new(&listeners, scoreboard);
    let mut accepted: u64 = 0;
    loop {
        let mut conn = match acceptor.accept() {
            Ok(Some(conn)) => conn,
            Ok(None) => {
                debug!("worker {} stopping", std::process::id());
                return exit_code::STOPPED;
            }
            Err(err) => {
                error!("worker {}: accepting: {}", std::process::id(), describe(&err));
                return exit_code::SETUP_FAILED;
            }
        };
        accepted += 1;
        let last = share == Some(accepted);
        if last {
            // Hand over first, so the replacement starts while this
            // connection is served.
            retire(&channel, &format!("served its {accepted} requests"));
        }
        if let Err(panic) = panic::catch(|| service.serve(&mut conn)) {
            if !last {
                retire(&channel, &format!("panicked: {}", panic.message));
            }
            let again = panic::catch(|| service.recover(&mut conn, &panic.message)).err();
            // Answered or not, the connection is finished: `metrics` counts
            // every connection finished, the one that crashed included.
            if let Some(row) = scoreboard {
                row.end();
            }
            // Only now: a log that blocks can hold up neither the handover
            // nor the client's answer.
            panic.log();
            if let Some(again) = again {
                again.log();
            }
            return exit_code::PANICKED;
        }
        if let Some(row) = scoreboard {
            row.end();
        }
        if last {
            return exit_code::STOPPED;
        }
    }
}

/// Everything before the first accept: the panic hook, the stop handler,
/// the service's own start, then Ready. Err is the exit code.
fn set_up<S: Service>(
    listeners: &[Listener],
    channel: &Channel,
    scoreboard: Option<RowWriter>,
    service: &mut S,
) -> Result<(), i32> {
    let pid = std::process::id;
    if let Some(row) = scoreboard {
        let _ = ROW.set(row);
    }
    panic::install_hook();
    if listeners.is_empty() {
        error!("worker {}: the master handed over no listener", pid());
        return Err(exit_code::SETUP_FAILED);
    }
    let fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    if let Err(err) = stop::install(&fds) {
        error!(
            "worker {}: installing the stop handler: {}",
            pid(),
            describe(&err)
        );
        return Err(exit_code::SETUP_FAILED);
    }
    if let Err(panic) = panic::catch(|| service.start()) {
        let reason = format!("panicked while starting: {}", panic.message);
        if let Err(err) = channel.send(&Message::suicide(&reason)) {
            error!(
                "worker {}: sending suicide to the master: {}",
                pid(),
                describe(&err)
            );
        }
        panic.log();
        return Err(exit_code::PANICKED);
    }
    if let Err(err) = channel.send(&Message::Ready) {
        error!(
            "worker {}: telling the master it is ready: {}",
            pid(),
            describe(&err)
        );
        return Err(exit_code::SETUP_FAILED);
    }
    Ok(())
}

/// This worker's scoreboard row, for [`note_request`].
static ROW: std::sync::OnceLock<RowWriter> = std::sync::OnceLock::new();

/// Notes what the connection being served asks for (the request line, or
/// its start), so that the master can say what a hung worker was stuck on:
/// `worker 4321 hung 61.2 s on GET /hang from 127.0.0.1:50312`. Costs a
/// copy into shared memory, no syscall; does nothing outside a worker.
pub fn note_request(line: &[u8]) {
    if let Some(row) = ROW.get() {
        row.note_request(line);
    }
}

/// Hands over to a replacement: stop accepting (the listening socket stays
/// open in the master and the other workers, so no queued connection is
/// lost), then tell the master, which forks the replacement at once.
fn retire(channel: &Channel, reason: &str) {
    stop::stop_accepting();
    if let Err(err) = channel.send(&Message::suicide(reason)) {
        // The master will see the exit instead, and replace us then.
        error!(
            "worker {}: sending suicide to the master: {}",
            std::process::id(),
            describe(&err)
        );
    }
}

/// A number that differs between workers: the pid and the clock, mixed.
/// For spreading retirements, not for anything secret.
fn random() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    splitmix64(seed(std::process::id(), nanos))
}

/// The pid in the high half, the clock's nanoseconds (below 2^30) in the
/// low: two workers forked in the same nanosecond still differ.
fn seed(pid: u32, nanos: u64) -> u64 {
    (u64::from(pid) << 32) ^ nanos
}

/// One output of Vigna's SplitMix64 from state `seed`: nearby seeds (pids
/// one apart, clocks a few ns apart) land far apart over the whole range,
/// so `% (jitter + 1)` is spread whatever the jitter.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{
        global, in_syscall, logged, logged_lines, mark, pipe_bytes, signal_thread, tid, watch, Watchdog,
        DEADLINE,
    };
    use respawn_ipc::scoreboard::Scoreboard;
    use respawn_ipc::Decoder;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::time::Duration;

    /// A service that does what each test needs, and says so to its client.
    #[derive(Default)]
    struct Script {
        /// `start` panics with this.
        start_panics: Option<&'static str>,
        /// `serve` panics on this connection (1-based), with `boom <n>`.
        panic_on: Option<u64>,
        recover_panics: bool,
        /// `serve` raises SIGTERM on this connection, then answers it.
        stop_on: Option<u64>,
        /// Closed in `serve` of the first connection: the master is gone.
        close_in_serve: Option<OwnedFd>,
        /// `start` closes the door without a stop request.
        break_listener: bool,
        /// Each answer says how many bytes of messages were in this pipe.
        pipe: RawFd,
        served: u64,
    }

    impl Service for Script {
        fn start(&mut self) {
            if self.break_listener {
                stop::stop_accepting();
            }
            if let Some(why) = self.start_panics {
                panic!("{why}");
            }
        }

        fn serve(&mut self, conn: &mut Conn) {
            self.served += 1;
            let n = self.served;
            note_request(format!("GET /{n} HTTP/1.1\r\nHost: x\r\n").as_bytes());
            drop(self.close_in_serve.take());
            if self.stop_on == Some(n) {
                // SAFETY: this thread; the stop handler is installed.
                unsafe { libc::raise(libc::SIGTERM) };
            }
            if self.panic_on == Some(n) {
                panic!("boom {n}");
            }
            let pipe = pipe_bytes(self.pipe);
            let _ = write!(conn, "served {n} (pipe {pipe})");
        }

        fn recover(&mut self, conn: &mut Conn, panic: &str) {
            let _ = write!(conn, "recovered from {panic}");
            mark();
            if self.recover_panics {
                panic!("again");
            }
        }
    }

    /// What a run of the worker loop did.
    #[derive(Debug)]
    struct Ran {
        code: i32,
        messages: Vec<Message>,
        /// What each client read, in order.
        answers: Vec<String>,
    }

    fn handoff(listener: TcpListener, write_end: OwnedFd, row: Option<RowWriter>) -> Handoff {
        Handoff {
            slot: 0,
            listeners: vec![Listener::from(listener)],
            channel: Channel::new(write_end),
            scoreboard: row,
        }
    }

    /// Runs `script` as a worker on this thread; a client thread makes
    /// `connections` one after another, reading each to its end, then asks
    /// the worker to stop if `stop` (once it sleeps in accept again).
    fn run_script(
        mut script: Script,
        config: &Config,
        connections: usize,
        stop: bool,
        row: Option<RowWriter>,
    ) -> Ran {
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        script.pipe = read_end.as_raw_fd();
        watch(read_end.as_raw_fd());
        let (code, answers) = serve_clients(script, config, connections, stop, row, write_end);
        watch(-1);
        Ran {
            code,
            messages: read_messages(read_end),
            answers,
        }
    }

    /// [`run_script`] with the write end of a pipe of the test's own.
    /// Returns the exit code and the answers.
    fn serve_clients(
        script: Script,
        config: &Config,
        connections: usize,
        stop: bool,
        row: Option<RowWriter>,
        channel: OwnedFd,
    ) -> (i32, Vec<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("address");
        let fd = listener.as_raw_fd();
        let me = tid();
        // Whatever goes wrong, a stop request and a connection end accept.
        let watchdog = Watchdog::new(DEADLINE, move || {
            signal_thread(me, libc::SIGTERM);
            let _ = std::net::TcpStream::connect(addr);
        });
        let client = std::thread::spawn(move || client(addr, connections, stop.then_some(me)));
        let code = run_with(handoff(listener, channel, row), script, config);
        drop(watchdog);
        // The worker left the listener open; close it, so that a client
        // still waiting (the worker returned early) is refused at once. The
        // handler forgets the fd number first: nothing may dup2 over it once
        // it is reused.
        stop::reset();
        // SAFETY: run_with left this fd open and holds it no more.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        let answers = client.join().expect("client thread");
        (code, answers)
    }

    fn client(addr: SocketAddr, connections: usize, stop: Option<libc::pid_t>) -> Vec<String> {
        let mut answers = Vec::new();
        for _ in 0..connections {
            let mut answer = String::new();
            if let Ok(mut conn) = std::net::TcpStream::connect(addr) {
                let _ = conn.set_read_timeout(Some(DEADLINE));
                let _ = conn.read_to_string(&mut answer);
            }
            answers.push(answer);
        }
        if let Some(worker) = stop {
            let asleep = in_syscall(worker, &[libc::SYS_accept4, libc::SYS_accept], DEADLINE);
            assert_eq!(asleep, Ok(()));
            signal_thread(worker, libc::SIGTERM);
        }
        answers
    }

    fn read_messages(read_end: OwnedFd) -> Vec<Message> {
        let mut pipe = std::fs::File::from(read_end);
        let mut decoder = Decoder::new();
        let mut messages = Vec::new();
        loop {
            let n = pipe.read(decoder.spare()).expect("reading the pipe");
            if n == 0 {
                return messages;
            }
            decoder.filled(n);
            while let Some(message) = decoder.next().expect("a well-formed frame") {
                messages.push(message);
                assert!(messages.len() < 1000, "messages out of nothing");
            }
        }
    }

    fn pid() -> u32 {
        std::process::id()
    }

    fn frame_len(message: &Message) -> usize {
        message.encode().len()
    }

    #[test]
    fn serves_one_connection_after_another_until_asked_to_stop() {
        let _global = global();
        let board = Scoreboard::new(1).expect("scoreboard");
        let ran = run_script(Script::default(), &Config::new(), 3, true, board.writer(0));
        assert_eq!(ran.code, exit_code::STOPPED);
        assert_eq!(ran.messages, [Message::Ready]);
        assert_eq!(
            ran.answers,
            ["served 1 (pipe 4)", "served 2 (pipe 4)", "served 3 (pipe 4)"]
        );
        let row = board.read(0).expect("row 0");
        assert_eq!((row.busy_since, row.requests), (None, 3), "{row:?}");
        assert_eq!(row.request, "GET /3 HTTP/1.1", "note_request writes the row");
        assert!(row.peer.starts_with("127.0.0.1:"), "{row:?}");
        assert_eq!(logged(), [format!("DEBUG worker {} stopping", pid())]);
    }

    #[test]
    fn a_stop_request_during_a_connection_lets_it_finish() {
        let _global = global();
        let script = Script {
            stop_on: Some(2),
            ..Script::default()
        };
        let ran = run_script(script, &Config::new(), 3, false, None);
        assert_eq!(ran.code, exit_code::STOPPED);
        assert_eq!(ran.messages, [Message::Ready]);
        assert_eq!(ran.answers, ["served 1 (pipe 4)", "served 2 (pipe 4)", ""]);
    }

    #[test]
    fn a_panic_hands_over_before_it_is_logged() {
        let _global = global();
        let script = Script {
            panic_on: Some(2),
            ..Script::default()
        };
        let ran = run_script(script, &Config::new(), 2, false, None);
        assert_eq!(ran.code, exit_code::PANICKED);
        let suicide = Message::suicide("panicked: boom 2");
        assert_eq!(ran.messages, [Message::Ready, suicide.clone()]);
        assert_eq!(ran.answers, ["served 1 (pipe 4)", "recovered from boom 2"]);
        let lines = logged_lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        let at = format!("ERROR worker {} panicked at {}:", pid(), file!());
        assert!(
            line.text.starts_with(&at) && line.text.ends_with(": boom 2"),
            "{line:?}"
        );
        assert_eq!(
            line.waiting,
            frame_len(&Message::Ready) + frame_len(&suicide),
            "the Suicide was in the pipe when the panic was logged"
        );
        assert_eq!(
            line.marks, 1,
            "the client was answered before the panic was logged"
        );
    }

    #[test]
    fn a_panic_in_start_is_a_failed_start_told_before_it_is_logged() {
        let _global = global();
        let script = Script {
            start_panics: Some("no config"),
            ..Script::default()
        };
        let ran = run_script(script, &Config::new(), 0, false, None);
        assert_eq!(ran.code, exit_code::PANICKED);
        let suicide = Message::suicide("panicked while starting: no config");
        assert_eq!(ran.messages, std::slice::from_ref(&suicide), "no Ready");
        let lines = logged_lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        let at = format!("ERROR worker {} panicked at {}:", pid(), file!());
        assert!(
            line.text.starts_with(&at) && line.text.ends_with(": no config"),
            "{line:?}"
        );
        assert_eq!(
            line.waiting,
            frame_len(&suicide),
            "the Suicide was in the pipe when the panic was logged"
        );
    }

    #[test]
    fn a_share_of_requests_hands_over_before_its_last_connection() {
        let _global = global();
        let ran = run_script(
            Script::default(),
            &Config::new().max_requests(2, 0),
            2,
            false,
            None,
        );
        assert_eq!(ran.code, exit_code::STOPPED);
        let suicide = Message::suicide("served its 2 requests");
        assert_eq!(ran.messages, [Message::Ready, suicide.clone()]);
        let handed_over = frame_len(&Message::Ready) + frame_len(&suicide);
        assert_eq!(
            ran.answers,
            [
                "served 1 (pipe 4)".to_owned(),
                format!("served 2 (pipe {handed_over})")
            ]
        );
    }

    #[test]
    fn a_panic_on_the_last_connection_sends_one_suicide() {
        let _global = global();
        let script = Script {
            panic_on: Some(1),
            ..Script::default()
        };
        let ran = run_script(script, &Config::new().max_requests(1, 0), 1, false, None);
        assert_eq!(ran.code, exit_code::PANICKED);
        assert_eq!(
            ran.messages,
            [Message::Ready, Message::suicide("served its 1 requests")]
        );
        assert_eq!(ran.answers, ["recovered from boom 1"]);
    }

    #[test]
    fn a_panic_in_recover_is_logged_and_changes_nothing() {
        let _global = global();
        let script = Script {
            panic_on: Some(1),
            recover_panics: true,
            ..Script::default()
        };
        let ran = run_script(script, &Config::new(), 1, false, None);
        assert_eq!(ran.code, exit_code::PANICKED);
        assert_eq!(
            ran.messages,
            [Message::Ready, Message::suicide("panicked: boom 1")]
        );
        assert_eq!(ran.answers, ["recovered from boom 1"]);
        let lines = logged();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].ends_with(": boom 1") && lines[1].ends_with(": again"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_master_gone_before_ready_is_a_setup_failure() {
        let _global = global();
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        drop(read_end);
        let (code, _) = serve_clients(Script::default(), &Config::new(), 0, false, None, write_end);
        assert_eq!(code, exit_code::SETUP_FAILED);
        assert_eq!(
            logged(),
            [format!(
                "ERROR worker {}: telling the master it is ready: broken pipe",
                pid()
            )]
        );
    }

    #[test]
    fn a_master_gone_before_a_suicide_still_ends_in_70() {
        let _global = global();
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let script = Script {
            panic_on: Some(1),
            close_in_serve: Some(read_end),
            ..Script::default()
        };
        let (code, answers) = serve_clients(script, &Config::new(), 1, false, None, write_end);
        assert_eq!(code, exit_code::PANICKED);
        assert_eq!(answers, ["recovered from boom 1"]);
        let lines = logged();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            format!(
                "ERROR worker {}: sending suicide to the master: broken pipe",
                pid()
            )
        );
        assert!(lines[1].ends_with(": boom 1"), "{lines:?}");
    }

    #[test]
    fn a_master_gone_before_a_failed_start_still_ends_in_70() {
        let _global = global();
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        drop(read_end);
        let script = Script {
            start_panics: Some("early"),
            ..Script::default()
        };
        let (code, _) = serve_clients(script, &Config::new(), 0, false, None, write_end);
        assert_eq!(code, exit_code::PANICKED);
        let lines = logged();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            format!(
                "ERROR worker {}: sending suicide to the master: broken pipe",
                pid()
            )
        );
        assert!(lines[1].ends_with(": early"), "{lines:?}");
    }

    #[test]
    fn a_listener_that_fails_for_good_exits_3() {
        let _global = global();
        let script = Script {
            break_listener: true,
            ..Script::default()
        };
        let ran = run_script(script, &Config::new(), 0, false, None);
        assert_eq!(ran.code, exit_code::SETUP_FAILED);
        assert_eq!(ran.messages, [Message::Ready]);
        assert_eq!(
            logged(),
            [format!(
                "ERROR worker {}: accepting: socket operation on non-socket",
                pid()
            )]
        );
    }

    /// What an fd number refers to now (device and inode), if it is open.
    fn identity(fd: RawFd) -> Option<(u64, u64)> {
        // SAFETY: fstat writes one struct stat, to a valid one.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; a closed fd number is an error, not UB.
        let rc = unsafe { libc::fstat(fd, &mut stat) };
        (rc == 0).then_some((stat.st_dev, stat.st_ino))
    }

    #[test]
    fn the_listener_fd_stays_open_after_the_worker_returns() {
        let _global = global();
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let fd = listener.as_raw_fd();
        let before = identity(fd);
        let addr = listener.local_addr().expect("address");
        let me = tid();
        // Should the worker not return at once, this ends its accept loop.
        let watchdog = Watchdog::new(DEADLINE, move || {
            signal_thread(me, libc::SIGTERM);
            let _ = std::net::TcpStream::connect(addr);
        });
        let script = Script {
            start_panics: Some("early"),
            ..Script::default()
        };
        assert_eq!(
            run(handoff(listener, write_end, None), script),
            exit_code::PANICKED
        );
        drop(watchdog);
        drop(read_end);
        let after = identity(fd);
        assert!(before.is_some());
        assert_eq!(
            after, before,
            "fd {fd} was closed (or reused): a late stop request would dup2 over its next owner"
        );
        stop::reset();
        // SAFETY: the worker left the fd open (checked above), and nothing
        // else owns it: the test takes it back to close it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }

    #[test]
    fn the_share_is_max_plus_up_to_jitter() {
        assert_eq!(share_of(0, 0, 123), None, "0 means never");
        assert_eq!(share_of(0, 99, 123), None);
        assert_eq!(share_of(10, 0, u64::MAX), Some(10));
        assert_eq!(share_of(10, 5, 0), Some(10));
        assert_eq!(share_of(10, 5, 5), Some(15));
        assert_eq!(share_of(10, 5, 6), Some(10));
        assert_eq!(share_of(10, 5, 11), Some(15));
        for random in 0..100 {
            let share = share_of(1000, 7, random).expect("a share");
            assert!((1000..=1007).contains(&share), "{share}");
        }
    }

    #[test]
    fn the_largest_jitter_does_not_overflow() {
        assert_eq!(share_of(5, u64::MAX, 0), Some(5));
        assert_eq!(share_of(5, u64::MAX, 7), Some(12));
        assert_eq!(share_of(5, u64::MAX, u64::MAX), Some(u64::MAX), "saturates");
        assert_eq!(share_of(u64::MAX, 3, 3), Some(u64::MAX));
        let share = Config::new().max_requests(5, u64::MAX).share();
        assert!(share.is_some_and(|s| s >= 5), "{share:?}");
        assert_eq!(Config::new().share(), None);
        assert_eq!(Config::new().max_requests(9, 0).share(), Some(9));
    }

    #[test]
    fn splitmix64_is_vignas() {
        // The first outputs of SplitMix64 seeded with 0 (its reference code).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(0x9e37_79b9_7f4a_7c15), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn the_seed_keeps_the_pid_and_the_clock_apart() {
        assert_eq!(seed(1, 0), 1 << 32);
        assert_eq!(seed(0, 999_999_999), 999_999_999);
        assert_eq!(
            seed(u32::MAX, 999_999_999),
            (u64::from(u32::MAX) << 32) | 999_999_999
        );
    }

    #[test]
    fn random_numbers_differ_from_call_to_call() {
        let mut seen: Vec<u64> = (0..64)
            .map(|_| {
                let start = std::time::Instant::now();
                while start.elapsed() < Duration::from_micros(2) {}
                random()
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() > 32, "{} distinct of 64", seen.len());
        // Spread over the range, not bunched in the low bits.
        assert!(seen.iter().any(|&r| r > u64::MAX / 2));
        assert!(seen.iter().any(|&r| r < u64::MAX / 2));
    }
}
