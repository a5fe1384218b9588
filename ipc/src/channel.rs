//! The worker's end of the conversation.

use crate::scoreboard::RowWriter;
use crate::Message;
use nix::errno::Errno;
use std::io;
use std::net::TcpListener;
use std::os::fd::OwnedFd;

/// What a freshly forked worker receives from its master.
///
/// The worker process starts with SIGTERM and SIGQUIT **blocked**: a master
/// forks it so, so that a stop request sent before the worker can handle
/// one is held pending rather than killing it (TERM's default action) or
/// dumping its core (QUIT's). `respawn_worker::run` installs its handler and
/// then unblocks both; a worker function of your own must do the same once
/// it handles them (`SigSet::thread_unblock` in nix, `pthread_sigmask`),
/// or it never hears a stop request and is killed at the graceful timeout.
pub struct Handoff {
    /// The worker's slot, 0-based: a small stable number for logs and the
    /// process name ("worker 3"). A replacement takes a free slot.
    pub slot: usize,
    /// The listening socket, shared with the master and every other worker.
    /// It is blocking: the worker's accept sleeps until a connection comes.
    pub listener: TcpListener,
    /// Where the worker reports to the master.
    pub channel: Channel,
    /// The worker's row in the scoreboard, to stamp around each connection;
    /// None if the master keeps no row for this slot.
    pub scoreboard: Option<RowWriter>,
}

/// The write end of a worker's pipe to its master.
pub struct Channel(OwnedFd);

impl Channel {
    /// Wraps the write end of the pipe whose read end the master watches.
    pub fn new(fd: OwnedFd) -> Channel {
        Channel(fd)
    }

    /// Sends one message in one `write(2)`. A frame is smaller than
    /// `PIPE_BUF`, so the write is atomic: all of it or an error.
    pub fn send(&self, message: &Message) -> io::Result<()> {
        let frame = message.encode();
        loop {
            match nix::unistd::write(&self.0, &frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "short write of {n} of {} bytes to the master's pipe",
                        frame.len()
                    )))
                }
                // A signal (the master's stop request, say) landed first.
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}
