//! respawn-worker: the child side of respawn.
//!
//! A worker is a plain blocking loop:
//!
//! ```text
//! tell the master Ready
//! loop { accept -> catch_unwind(serve one connection) }
//! ```
//!
//! It serves one connection at a time. Two things end the loop:
//!
//! - **A stop request** (SIGTERM or SIGQUIT from the master): the worker
//!   finishes the connection in hand and returns 0. How the request can never
//!   be lost, even when it lands just before `accept(2)`, is the subject of
//!   [`stop`].
//! - **A panic** in [`Service::serve`]: the worker stops accepting, tells the
//!   master (`Suicide`, so the replacement starts now), lets
//!   [`Service::recover`] answer the client (a 500, say), and returns
//!   non-zero. A process that panicked is not trusted to serve again. This is
//!   Node's `uncaughtException` handler with its `suicide` message, in [`mod@panic`].
//!
//! The master side, with fork hygiene (masks, fds, parent-death signal) done
//! before this code runs, is in `respawn-master`; the two meet only through
//! `respawn-ipc`.
//!
//! ```no_run
//! use std::io::Write;
//! use std::net::{TcpListener, TcpStream};
//!
//! struct Hello;
//!
//! impl respawn_worker::Service for Hello {
//!     fn serve(&mut self, conn: &mut TcpStream) {
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

pub mod panic;
pub mod stop;

use log::{debug, error, warn};
use respawn_ipc::scoreboard::RowWriter;
use respawn_ipc::{Channel, Handoff, Message};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

pub use respawn_ipc::exit_code;

/// What a worker does with each connection.
pub trait Service {
    /// Called once in the new worker, before it tells the master it is
    /// ready: load what the worker needs. A panic here is a failed start:
    /// the worker tells the master why and exits, and the master replaces it
    /// after a backoff (and gives up if starts keep failing).
    fn start(&mut self) {}

    /// Serves one connection. Returns when done with it; dropping it closes
    /// it. A panic here is caught: the worker retires (see the crate docs).
    fn serve(&mut self, conn: &mut TcpStream);

    /// Called after `serve` panicked, with the connection it was serving and
    /// the panic message: answer the client if the protocol allows (an HTTP
    /// 500, say). A panic here is caught and ignored.
    fn recover(&mut self, conn: &mut TcpStream, panic: &str) {
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
        if self.max_requests == 0 {
            return None;
        }
        let jitter = match self.max_requests_jitter {
            0 => 0,
            j => random() % (j + 1),
        };
        Some(self.max_requests.saturating_add(jitter))
    }
}

/// Runs the worker loop with the default [`Config`]; see [`run_with`].
pub fn run<S: Service>(handoff: Handoff, service: S) -> i32 {
    run_with(handoff, service, &Config::default())
}

/// Runs the worker loop until a stop request, a panic or the end of its
/// share of connections; returns the exit code for the process (see
/// [`exit_code`]).
pub fn run_with<S: Service>(handoff: Handoff, mut service: S, config: &Config) -> i32 {
    let Handoff {
        slot: _,
        listener,
        channel,
        scoreboard,
    } = handoff;
    let pid = std::process::id();
    if let Err(code) = set_up(&listener, &channel, scoreboard, &mut service) {
        return code;
    }
    let share = config.share();
    let mut accepted: u64 = 0;
    loop {
        let mut conn = match accept_next(&listener, scoreboard) {
            Ok(Some(conn)) => conn,
            Ok(None) => {
                debug!("worker {pid} stopping");
                return exit_code::STOPPED;
            }
            Err(err) => {
                error!("worker {pid}: accepting: {err}");
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
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| service.serve(&mut conn))) {
            let message = panic::message(payload.as_ref());
            if !last {
                retire(&channel, &format!("panicked: {message}"));
            }
            let _ = catch_unwind(AssertUnwindSafe(|| service.recover(&mut conn, &message)));
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
    listener: &TcpListener,
    channel: &Channel,
    scoreboard: Option<RowWriter>,
    service: &mut S,
) -> Result<(), i32> {
    let pid = std::process::id();
    if let Some(row) = scoreboard {
        let _ = ROW.set(row);
    }
    panic::install_hook();
    if let Err(err) = stop::install(listener.as_raw_fd()) {
        error!("worker {pid}: installing the stop handler: {err}");
        return Err(exit_code::SETUP_FAILED);
    }
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| service.start())) {
        let reason = format!("panicked while starting: {}", panic::message(payload.as_ref()));
        let _ = channel.send(&Message::suicide(&reason));
        return Err(exit_code::PANICKED);
    }
    if let Err(err) = channel.send(&Message::Ready) {
        error!("worker {pid}: telling the master it is ready: {err}");
        return Err(exit_code::SETUP_FAILED);
    }
    Ok(())
}

/// The next connection, stamped on the scoreboard; None once a stop was
/// requested (see [`stop`] for why none is ever missed).
fn accept_next(listener: &TcpListener, row: Option<RowWriter>) -> io::Result<Option<TcpStream>> {
    loop {
        if stop::requested() {
            return Ok(None);
        }
        match listener.accept() {
            Ok((conn, peer)) => {
                if let Some(row) = row {
                    row.begin(&peer);
                }
                return Ok(Some(conn));
            }
            // After a stop request the listener fd is /dev/null: ENOTSOCK.
            Err(_) if stop::requested() => return Ok(None),
            Err(err) if is_transient(&err) => {
                warn!("worker {}: accepting: {err}; retrying", std::process::id());
                back_off_after(&err);
            }
            Err(err) => return Err(err),
        }
    }
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
            "worker {}: sending suicide to the master: {err}",
            std::process::id()
        );
    }
}

/// A number that differs between workers: xorshift over the pid and the
/// clock. For spreading retirements, not for anything secret.
fn random() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = (u64::from(std::process::id()) << 32) ^ nanos ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Errors after which accept can be tried again: the peer gave up before we
/// took the connection, or the process or system is out of fds or memory
/// for a moment.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Out of fds or memory, accept would fail again at once: pause briefly so
/// the loop does not spin. A peer that hung up needs no pause.
fn back_off_after(err: &io::Error) {
    if err.raw_os_error() != Some(libc::ECONNABORTED) {
        std::thread::sleep(Duration::from_millis(100));
    }
}
