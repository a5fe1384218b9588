//! Signals as events: blocked, then read from a signalfd in the main loop.
//!
//! No handler runs at an arbitrary point in the master, so there is nothing
//! async-signal-safe to get right: a signal is a readable fd like any other.
//! SIGCHLD coalesces (one pending SIGCHLD may stand for many exits), which is
//! why every SIGCHLD leads to a reap loop, not to one waitpid.
//!
//! Blocking is not enough: a signal whose disposition is "ignore" is thrown
//! away when sent, before any signalfd can see it, and an ignored SIGCHLD
//! even makes the kernel reap children itself. A shell starts a background
//! job (`respawn &`) with INT and QUIT ignored, so the dispositions are set
//! to default first; blocked, the default action never runs.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// The signals the master handles. Blocking TTIN and TTOU also keeps their
/// default action (stop the process, for job control) from ever running.
pub(crate) const HANDLED: [Signal; 7] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGQUIT,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

pub(crate) struct Signals {
    fd: SignalFd,
    /// The mask before `block`: restored in every worker, and on drop.
    saved_mask: SigSet,
    /// The dispositions before `block`, restored on drop.
    saved_actions: Vec<(Signal, SigAction)>,
}

impl Signals {
    /// Blocks the handled signals and opens a non-blocking signalfd for them.
    pub(crate) fn block() -> io::Result<Signals> {
        let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        let mut saved_actions = Vec::with_capacity(HANDLED.len());
        for signal in HANDLED {
            // SAFETY: SIG_DFL installs no handler code, so there is nothing
            // that could run at an unsafe moment.
            saved_actions.push((signal, unsafe { sigaction(signal, &default) }?));
        }
        let handled: SigSet = HANDLED.into_iter().collect();
        let mut saved_mask = SigSet::empty();
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled), Some(&mut saved_mask))?;
        let fd = SignalFd::with_flags(&handled, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals {
            fd,
            saved_mask,
            saved_actions,
        })
    }

    /// The next pending signal, or None once all have been read.
    pub(crate) fn next(&self) -> io::Result<Option<Signal>> {
        loop {
            match self.fd.read_signal()? {
                None => return Ok(None),
                Some(info) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(signal) => return Ok(Some(signal)),
                    Err(_) => continue, // not one of ours: cannot happen with our mask
                },
            }
        }
    }

    pub(crate) fn saved_mask(&self) -> &SigSet {
        &self.saved_mask
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        // Give an embedding program its signals back.
        for (signal, action) in &self.saved_actions {
            // SAFETY: these are the dispositions the program had before
            // `block`; putting them back is what it expects.
            let _ = unsafe { sigaction(*signal, action) };
        }
        let _ = self.saved_mask.thread_set_mask();
    }
}
