//! fork: the article's `child_process.fork()`, with the hygiene it implies.
//!
//! A forked child starts as a copy of the master: its signal mask (with the
//! master's signals blocked), its fds (the epoll, the signalfd, every other
//! worker's pipe), and nothing that ties its life to the master's. Before
//! the worker's code runs, the child undoes each of these:
//!
//! 1. close every fd that belongs to the master;
//! 2. ask for SIGKILL when the master dies (PR_SET_PDEATHSIG), then check the
//!    master did not die before that request was made;
//! 3. take a name that `ps` shows: `worker 3`;
//! 4. restore the signal mask the master had before it blocked its signals.

use log::error;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::prctl;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::{fork, getpid, getppid, pipe2, ForkResult, Pid};
use respawn_ipc::scoreboard::RowWriter;
use respawn_ipc::{exit_code, Channel, Handoff};
use std::ffi::CString;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What the master keeps of a forked worker.
pub(crate) struct Spawned {
    pub pid: Pid,
    /// The read end of the worker's pipe, non-blocking.
    pub pipe: OwnedFd,
}

/// What the child must know to clean up and become a worker.
pub(crate) struct ChildSetup<'a> {
    pub slot: usize,
    pub listener: &'a TcpListener,
    /// Every fd of the master's that the worker must not hold.
    pub master_fds: &'a [RawFd],
    pub mask: &'a SigSet,
    /// Its row in the scoreboard, already reset.
    pub row: Option<RowWriter>,
}

/// Forks a worker. Returns in the master only; the child runs `work` and
/// exits with the code it returns.
pub(crate) fn spawn_worker<W>(setup: &ChildSetup, work: &mut W) -> io::Result<Spawned>
where
    W: FnMut(Handoff) -> i32,
{
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC)?;
    // Only the master's end is non-blocking: the worker's writes are tiny
    // and must not fail with EAGAIN.
    fcntl(&read_end, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let master = getpid();
    // Whatever sits in stdout's buffer would be printed again by the child.
    let _ = io::stdout().flush();
    // SAFETY: the master runs one thread (checked before the first fork), so
    // the child is a consistent copy: no lock is held by a thread that does
    // not exist there, and allocating in the child is sound.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => Ok(Spawned {
            pid: child,
            pipe: read_end,
        }),
        ForkResult::Child => {
            drop(read_end);
            become_worker(setup, master, write_end, work)
        }
    }
}

fn become_worker<W>(setup: &ChildSetup, master: Pid, write_end: OwnedFd, work: &mut W) -> !
where
    W: FnMut(Handoff) -> i32,
{
    for &fd in setup.master_fds {
        // SAFETY: these fds belong to the master's Poll, SignalFd and worker
        // pipes, whose owners live on in this copy of the address space but
        // are never dropped here: this function never returns, and exit runs
        // no destructors. So nothing closes them twice or uses them after.
        unsafe { libc::close(fd) };
    }
    if let Err(err) = die_with_master(master) {
        error!("worker {}: {err}", std::process::id());
        std::process::exit(exit_code::SETUP_FAILED);
    }
    name_process(setup.slot);
    ignore_master_controls();
    if let Err(err) = setup.mask.thread_set_mask() {
        error!("worker {}: restoring the signal mask: {err}", std::process::id());
        std::process::exit(exit_code::SETUP_FAILED);
    }
    // SAFETY: as above, the master's TcpListener in this address space is
    // never dropped, so this one is the only owner of the fd in the child.
    let listener = unsafe { TcpListener::from_raw_fd(setup.listener.as_raw_fd()) };
    let handoff = Handoff {
        slot: setup.slot,
        listener,
        channel: Channel::new(write_end),
        scoreboard: setup.row,
    };
    let code = catch_unwind(AssertUnwindSafe(|| work(handoff))).unwrap_or(exit_code::PANICKED);
    std::process::exit(code)
}

/// A worker must never outlive its master: an orphan would go on accepting
/// on the port with nobody to supervise it.
fn die_with_master(master: Pid) -> io::Result<()> {
    prctl::set_pdeathsig(Signal::SIGKILL)?;
    // If the master died between fork and prctl, no signal will ever come:
    // the child has already been reparented.
    if getppid() != master {
        return Err(io::Error::other("master exited before the worker started"));
    }
    Ok(())
}

/// HUP, TTIN and TTOU steer the master; to a worker they mean nothing, and
/// by default TTIN and TTOU would stop it for good and HUP kill it. They
/// reach workers through `kill -- -PGID` or `systemctl kill`, which signal
/// every process: ignored here, the master alone acts on them.
fn ignore_master_controls() {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { sigaction(signal, &ignore) };
    }
}

/// `ps -e` and `top` show the name (at most 15 bytes): `worker 3`.
fn name_process(slot: usize) {
    if let Ok(name) = CString::new(format!("worker {slot}")) {
        let _ = prctl::set_name(&name);
    }
}
