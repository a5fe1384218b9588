//! respawn-ipc: what a master and its workers say to each other.
//!
//! A worker talks to its master over one pipe, in one direction: worker to
//! master. The master talks back with signals only (see `respawn-worker`).
//! This crate holds the few things both sides must agree on:
//!
//! - [`Message`]: what a worker can say (`Ready`, `Suicide { reason }`), and
//!   its wire format, versioned, each frame far below `PIPE_BUF` so that one
//!   `write(2)` is atomic and messages from a dying worker are never torn.
//! - [`Decoder`]: turns any bytes into messages, "need more", or a clear
//!   error. It never panics and never grows: its buffer is one frame long.
//! - [`Handoff`] and [`Channel`]: what a freshly forked worker receives (the
//!   listening sockets, the write end of its pipe, its slot number).
//! - [`Listener`] and [`Conn`]: a listening socket, TCP or Unix, and a
//!   connection accepted on one, which a service reads and writes the same
//!   whatever its kind.
//! - [`scoreboard`]: one row of shared memory per worker slot, written by
//!   the worker around each connection without a syscall, read by the
//!   master to find workers hung on one connection and to show status.
//!
//! The master and the worker crates both depend on this one and on nothing of
//! each other: a master can run workers written without `respawn-worker`, as
//! long as they keep this contract.

#[cfg(not(target_os = "linux"))]
compile_error!(
    "respawn runs on Linux only: it is built on signalfd, epoll, \
     prctl(PR_SET_PDEATHSIG) and /proc, which other systems do not have"
);

mod channel;
mod listener;
mod message;
pub mod scoreboard;

/// How a worker process ends, as its exit code. Part of the contract so that
/// the master's log (`worker 4321 exited (code 70)`) means one thing.
pub mod exit_code {
    /// It was asked to stop, finished what it held, and left.
    pub const STOPPED: i32 = 0;
    /// It could not set itself up (its master was already gone, a signal
    /// could not be armed, the master's pipe was closed), or its listening
    /// socket failed for good.
    pub const SETUP_FAILED: i32 = 3;
    /// It panicked, sent Suicide, and retired. 70 is EX_SOFTWARE.
    pub const PANICKED: i32 = 70;
    /// The host refused it a resource before it could serve: a `-- CMD`
    /// worker whose exec failed with EAGAIN (its user is at RLIMIT_NPROC).
    /// Like a fork the host refuses, it is retried on its slot's backoff and
    /// never counted toward giving up. 75 is EX_TEMPFAIL: try again later.
    pub const HOST_REFUSED: i32 = 75;
}

/// An io::Error as the end of a sentence, for the master's lines and the
/// workers' alike: "address already in use", not "Address already in use
/// (os error 98)".
pub fn describe(err: &std::io::Error) -> String {
    let text = err.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

pub use channel::{Channel, Handoff};
pub use listener::{Conn, Listener, Peer, MAX_LISTENERS};
pub use message::{DecodeError, Decoder, Frame, Message, HEADER_LEN, MAX_FRAME, MAX_REASON, VERSION};
