//! A stop request that is never lost, with a plainly blocking `accept(2)`.
//!
//! The worker sleeps in `accept(2)`. The master asks it to stop with SIGTERM
//! (or SIGQUIT). The naive design, a handler that sets a flag checked before
//! each accept, has a hole: if the signal lands after the check and before
//! the worker enters `accept`, the worker sleeps until the next connection
//! comes, which may be never.
//!
//! The hole is closed with unicorn's trick, adapted: the handler sets the flag
//! *and* `dup2`s `/dev/null` over the listener's fd number (both are
//! async-signal-safe). Whenever the signal lands:
//!
//! - before the flag check: the loop sees the flag and returns;
//! - between the check and `accept`: `accept` on `/dev/null` fails at once
//!   with ENOTSOCK, and the loop sees the flag;
//! - during `accept`: the handler is installed without SA_RESTART, so the
//!   call fails with EINTR; std retries it, on `/dev/null` now: ENOTSOCK;
//! - while serving a connection: the connection is finished, then the flag
//!   is seen.
//!
//! The cost per connection is nothing: no extra syscall, and `accept` stays
//! the call that wakes exactly one sleeping worker per connection (the
//! kernel's exclusive wait on a listening socket), where a `poll` on the
//! listener plus a stop fd would wake every idle worker (a thundering herd).
//!
//! Replacing the fd rather than closing it also keeps the fd number taken,
//! so it cannot be reused by an accepted connection that a late second
//! `dup2` would then clobber. The listening socket itself stays open in the
//! master and the other workers: no queued connection is lost.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::io;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static LISTENER: AtomicI32 = AtomicI32::new(-1);
static DEV_NULL: AtomicI32 = AtomicI32::new(-1);

/// The signals that ask a worker to finish what it holds and exit.
pub const STOP_SIGNALS: [Signal; 2] = [Signal::SIGTERM, Signal::SIGQUIT];

/// Has the master asked this worker to stop?
pub fn requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Stops accepting: from now on `accept` on the listener fd fails at once.
/// Idempotent, and async-signal-safe (atomics and `dup2` only).
pub fn stop_accepting() {
    let listener = LISTENER.load(Ordering::SeqCst);
    let dev_null = DEV_NULL.load(Ordering::SeqCst);
    if listener >= 0 && dev_null >= 0 {
        // SAFETY: dup2 on two fds this process owns: /dev/null, opened in
        // `install` and never closed, and the listener's fd number, which
        // the worker never closes itself. dup2 is async-signal-safe.
        unsafe { libc::dup2(dev_null, listener) };
    }
}

extern "C" fn on_stop_signal(_: libc::c_int) {
    // A handler may run between a syscall and the read of its errno: keep
    // errno as the interrupted code left it.
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    let errno = unsafe { *libc::__errno_location() };
    STOP.store(true, Ordering::SeqCst);
    stop_accepting();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Arms the stop request for a worker whose listening socket is `listener`.
pub fn install(listener: RawFd) -> io::Result<()> {
    let dev_null = std::fs::OpenOptions::new().read(true).open("/dev/null")?;
    // Kept open for the life of the worker: the handler dup2s from it.
    DEV_NULL.store(dev_null.into_raw_fd(), Ordering::SeqCst);
    LISTENER.store(listener, Ordering::SeqCst);
    // No SA_RESTART: a blocked accept must return EINTR, not sleep on. Both
    // stop signals are masked while the handler runs, so it never nests.
    let mask: SigSet = STOP_SIGNALS.into_iter().collect();
    let action = SigAction::new(SigHandler::Handler(on_stop_signal), SaFlags::empty(), mask);
    for signal in STOP_SIGNALS {
        // SAFETY: the handler only touches atomics and calls dup2, all
        // async-signal-safe; it replaces the default disposition, which
        // would kill the worker in the middle of a connection.
        unsafe { sigaction(signal, &action) }?;
    }
    // The master blocks these signals for its signalfd and the fork copies
    // its mask; the master's spawn code restores the mask before calling
    // the worker, but unblock them here too so a worker that is started some
    // other way cannot sleep through its stop request.
    mask.thread_unblock()?;
    Ok(())
}
