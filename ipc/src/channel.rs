//! The worker's end of the conversation.

use crate::scoreboard::RowWriter;
use crate::{Listener, Message};
use nix::errno::Errno;
use std::io;
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
    /// The listening sockets, shared with the master and every other
    /// worker, in the order the master was given them; at least one, at
    /// most [`crate::MAX_LISTENERS`]. One alone is blocking: the worker's
    /// accept sleeps until a connection comes. Several are non-blocking:
    /// the worker waits for any of them (`epoll_wait`), and an accept that
    /// another worker beat it to fails with EAGAIN instead of blocking on
    /// that one socket while connections wait on the others.
    pub listeners: Vec<Listener>,
    /// Where the worker reports to the master.
    pub channel: Channel,
    /// The worker's row in the scoreboard, to stamp around each connection;
    /// None if the master keeps no row for this slot.
    pub scoreboard: Option<RowWriter>,
}

/// The write end of a worker's pipe to its master.
pub struct Channel(OwnedFd);

/// The pipe itself, for a worker that must watch it or write to it in a way
/// `send` does not (the demo's `--demo-bad-ipc` writes a frame of a newer
/// contract, to show what the master does with one).
impl std::os::fd::AsFd for Channel {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HEADER_LEN;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    static INTERRUPTIONS: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn count(_: libc::c_int) {
        INTERRUPTIONS.fetch_add(1, Ordering::SeqCst);
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into a valid array of two.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are new and owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn set_nonblocking(fd: &OwnedFd, on: bool) {
        let flags = if on { libc::O_NONBLOCK } else { 0 };
        // SAFETY: F_SETFL on an fd this test owns.
        assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) }, 0);
    }

    /// Waits until thread `tid` sleeps in syscall `number`.
    fn in_syscall(tid: libc::pid_t, number: libc::c_long) -> bool {
        let path = format!("/proc/self/task/{tid}/syscall");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.split(' ').next() == Some(&number.to_string()) {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    #[test]
    fn send_writes_one_frame() {
        let (read_end, write_end) = pipe();
        let channel = Channel::new(write_end);
        channel.send(&Message::suicide("boom")).expect("sending");
        drop(channel);
        let mut bytes = Vec::new();
        std::fs::File::from(read_end)
            .read_to_end(&mut bytes)
            .expect("reading");
        assert_eq!(bytes, *Message::suicide("boom").encode());
    }

    #[test]
    fn send_fails_with_the_errno_when_the_master_is_gone() {
        let (read_end, write_end) = pipe();
        drop(read_end);
        // Rust ignores SIGPIPE in its programs, tests included: EPIPE.
        let err = Channel::new(write_end)
            .send(&Message::Ready)
            .expect_err("no reader");
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }

    #[test]
    fn send_goes_on_after_a_signal_interrupts_it() {
        // A handler without SA_RESTART: a write blocked on a full pipe
        // fails with EINTR, which send must retry.
        // SAFETY: a zeroed sigaction is valid; the handler only counts.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = count as *const () as usize;
        // SAFETY: installs a handler that touches one atomic.
        assert_eq!(
            unsafe { libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) },
            0
        );

        let (read_end, write_end) = pipe();
        set_nonblocking(&write_end, true);
        let mut filled = 0;
        while let Ok(n) = nix::unistd::write(&write_end, &[0u8; 4096]) {
            filled += n;
        }
        set_nonblocking(&write_end, false);
        let channel = Channel::new(write_end);

        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::gettid() };
        let before = INTERRUPTIONS.load(Ordering::SeqCst);
        let helper = std::thread::spawn(move || {
            assert!(in_syscall(me, libc::SYS_write), "send never blocked");
            // SAFETY: tgkill to a thread of this process.
            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), me, libc::SIGUSR1) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while INTERRUPTIONS.load(Ordering::SeqCst) == before {
                assert!(Instant::now() < deadline, "the signal never came");
                std::thread::yield_now();
            }
            // Blocked again: the interrupted write was retried. Drain it all.
            assert!(in_syscall(me, libc::SYS_write), "send did not retry");
            let mut bytes = Vec::new();
            std::fs::File::from(read_end)
                .read_to_end(&mut bytes)
                .expect("draining");
            bytes
        });
        let sent = channel.send(&Message::Ready);
        drop(channel);
        let bytes = helper.join().expect("helper");
        assert!(sent.is_ok(), "{sent:?}");
        assert_eq!(bytes.len(), filled + HEADER_LEN);
        assert_eq!(bytes[filled..], *Message::Ready.encode());
    }
}
