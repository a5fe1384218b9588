//! fork: the article's `child_process.fork()`, with the hygiene it implies.
//!
//! A forked child starts as a copy of the master: its signal mask (with the
//! master's signals blocked), its dispositions, its fds (the epoll, the
//! signalfd, every other worker's pipe), its privileges, and nothing that
//! ties its life to the master's. There is one way to become a worker, and
//! every worker takes it, whether it runs the master's own code or, during
//! an upgrade, executes the new binary (`ChildSetup::exec`):
//!
//! 1. **The master's fds closed**, in a constant number of system calls
//!    whatever the number of workers: the master keeps its pipes at or
//!    above a floor (`FdFloor`), so `close_range` takes them all (one call
//!    up to the worker's end of its pipe, one after), and the few others
//!    (epoll, signalfd, the log's fd, the control socket) with them, or,
//!    below the floor, one call each. Kept: the
//!    listeners, the worker's end of its pipe, and for an exec the
//!    scoreboard's file. (The kernel still copies and then puts every pipe
//!    at each fork: see docs/benchmarks.md, Start.)
//! 2. **Privileges dropped** (`Config::run_workers_as`), with the ids the
//!    master resolved before the fork: a worker never looks a name up. A
//!    worker that will execute the new binary drops them before the exec,
//!    so the new program's `main` never runs as root in a worker: the user
//!    the workers run as must be allowed to execute it.
//! 3. **Named**, so that `ps` shows `worker 3`, and titled, so that
//!    `ps -ef` shows `respawn: worker 3`, from the memory map the master
//!    read once (`Prepared`): no /proc in the child.
//! 4. **Signals restored**: the dispositions and the mask the program had
//!    before the master took its signals, TERM and QUIT still blocked until
//!    the worker arms its stop handler, HUP, TTIN, TTOU and USR2 ignored.
//!    The child has every taken signal at its default, so only the
//!    dispositions that differ are set.
//! 5. **The last exec**, for a worker of the new binary ([`exec_worker`]
//!    in upgrade.rs): its `main` reaches `run`, which goes straight to 6
//!    ([`after_exec`]) and runs nothing else of the master's.
//! 6. **The parent-death signal armed and checked**: SIGKILL when the
//!    master dies (PR_SET_PDEATHSIG), then a check that the parent is still
//!    the master, since it may have died before. Armed after 2 (a change of
//!    uid clears it) and after 5 (executing a file with capabilities or a
//!    set-id bit clears it too).
//!
//! Nothing before the worker's function asks for the child's pid: the
//! master's comes from `Prepared`, the child's only on the way to a line.
//! Then the worker's function runs. The child never returns into the
//! master's code: everything it runs is inside `catch_unwind`, and it
//! leaves with `_exit`, which runs no atexit handler and flushes no stdio
//! buffer of the master's.

use crate::listen::Listeners;
use crate::logbuf;
use crate::privileges::{self, RunAs};
use crate::signals::Signals;
use crate::title::WorkerTitle;
use crate::upgrade::{self, Program, WorkerEnv};
use log::error;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::{fork, getpid, getppid, pipe2, ForkResult, Pid};
use respawn_ipc::scoreboard::RowWriter;
use respawn_ipc::{exit_code, Channel, Handoff};
use std::ffi::CStr;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

/// What the master keeps of a forked worker.
pub(crate) struct Spawned {
    pub pid: Pid,
    /// The read end of the worker's pipe, non-blocking, at or above the floor.
    pub pipe: OwnedFd,
}

/// A failed spawn: what was being done, and the error.
pub(crate) struct SpawnError {
    pub doing: &'static str,
    pub err: io::Error,
}

/// The lowest fd number the master gives its worker pipes: one above every
/// fd the process had when the master started. Below it are the program's
/// own fds (the listener among them), which workers inherit as they are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FdFloor(pub RawFd);

/// Set once an fd the master lifts stayed below the floor: until then,
/// every pipe is above it, and the master need not look through its table
/// for those it must name to each child (a walk over thousands of workers
/// at each fork, otherwise).
static STAYED_BELOW: AtomicBool = AtomicBool::new(false);

impl FdFloor {
    /// Is every fd the master lifted above the floor?
    pub(crate) fn all_lifted() -> bool {
        !STAYED_BELOW.load(Ordering::Relaxed)
    }

    /// One above the highest fd open now (read from /proc/self/fd).
    pub(crate) fn above_open_fds() -> io::Result<FdFloor> {
        let highest = std::fs::read_dir("/proc/self/fd")?
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
            .max()
            .unwrap_or(2);
        Ok(FdFloor(highest + 1))
    }

    /// As `lift`, but keeps `fd` where it is (made close-on-exec) when it
    /// cannot be moved: an fd handed across an exec is never lost.
    pub(crate) fn lift_or_keep(self, fd: OwnedFd) -> OwnedFd {
        if fd.as_raw_fd() >= self.0 {
            return fd;
        }
        match fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(self.0)) {
            // SAFETY: F_DUPFD_CLOEXEC just returned this new fd; we own it.
            Ok(lifted) => unsafe { OwnedFd::from_raw_fd(lifted) },
            Err(_) => {
                STAYED_BELOW.store(true, Ordering::Relaxed);
                let _ = fcntl(&fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
                fd
            }
        }
    }

    /// Moves `fd` to the lowest free number at or above the floor, unless
    /// it is there already: a master started with no hole among its fds
    /// gets its pipes above the floor from pipe2 itself, and spends no
    /// system call lifting them. A floor at or past the open-file limit
    /// (fds inherited above a low `ulimit -n`) leaves it where it is: the
    /// master then closes it in each worker by name, like its other fds
    /// below the floor.
    fn lift(self, fd: OwnedFd) -> io::Result<OwnedFd> {
        if fd.as_raw_fd() >= self.0 {
            return Ok(fd);
        }
        match fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(self.0)) {
            // SAFETY: F_DUPFD_CLOEXEC just returned this new fd; we own it.
            Ok(lifted) => Ok(unsafe { OwnedFd::from_raw_fd(lifted) }),
            Err(nix::errno::Errno::EINVAL) => {
                STAYED_BELOW.store(true, Ordering::Relaxed);
                Ok(fd)
            }
            Err(errno) => Err(errno.into()),
        }
    }
}

/// What every child needs that the master works out once, before its
/// first fork, rather than each child again: its own pid (for the check of
/// step 6) and the map a worker's title needs (title.rs). A child's
/// memory is a copy of the master's, so what the master read of itself
/// holds in the child.
pub(crate) struct Prepared {
    master: Pid,
    title: Option<WorkerTitle>,
}

impl Prepared {
    /// Call it in the master, before its first fork.
    pub(crate) fn now() -> Prepared {
        Prepared {
            master: getpid(),
            title: WorkerTitle::prepare(),
        }
    }
}

/// The signals a worker ignores (step 4). HUP, TTIN, TTOU and USR2 steer
/// the master; to a worker they mean nothing, and by default TTIN and TTOU
/// would stop it for good and HUP kill it. They reach workers through
/// `kill -- -PGID` or `systemctl kill`, which signal every process: ignored
/// there, the master alone acts on them.
const MASTER_CONTROLS: [libc::c_int; 4] = [libc::SIGHUP, libc::SIGTTIN, libc::SIGTTOU, libc::SIGUSR2];

/// What the child must know to clean up and become a worker.
pub(crate) struct ChildSetup<'a> {
    pub slot: usize,
    /// Worked out by the master once, for every child.
    pub prepared: &'a Prepared,
    pub listeners: &'a Listeners,
    /// The master's fds that may lie below the floor: epoll, signalfd, log,
    /// and any pipe that could not be lifted.
    pub master_fds: &'a [RawFd],
    pub floor: FdFloor,
    pub signals: &'a Signals,
    /// Its row in the scoreboard, already reset.
    pub row: Option<RowWriter>,
    /// The user and group to become, resolved before the fork.
    pub run_as: Option<&'a RunAs>,
    /// During an upgrade: the new binary, which the child executes as a
    /// worker (step 5), handed the scoreboard's file (fd and rows).
    pub exec: Option<(&'a Program, Option<(RawFd, usize)>)>,
    /// `--ready-on-notify`: the worker's own NOTIFY_SOCKET, and the
    /// watchdog's timeout in microseconds if there is one: set in its
    /// environment (notified.rs).
    pub notify: Option<(&'a str, Option<u128>)>,
}

/// Forks a worker. Returns in the master only; the child runs `work` and
/// exits with the code it returns.
pub(crate) fn spawn_worker<W>(setup: &ChildSetup, work: &mut W) -> Result<Spawned, SpawnError>
where
    W: FnMut(Handoff) -> i32,
{
    let failed = |doing| move |err| SpawnError { doing, err };
    let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC).map_err(|e| failed("pipe")(e.into()))?;
    let read_end = setup.floor.lift(read_end).map_err(failed("pipe"))?;
    // Only the master's end is non-blocking: the worker's writes are tiny
    // and must not fail with EAGAIN.
    fcntl(&read_end, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(|e| failed("pipe")(e.into()))?;
    // Whatever sits in stdout's buffer would be printed again by the child.
    let _ = io::stdout().flush();
    // SAFETY: the master runs one thread (checked when it started, and it
    // starts none), so the child is a consistent copy: no lock is held by a
    // thread that does not exist there, and allocating in the child is sound.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => Ok(Spawned {
            pid: child,
            pipe: read_end,
        }),
        Ok(ForkResult::Child) => {
            // The master's end, never in the table yet: closed with the
            // master's other fds (step 1), by close_range when it is above
            // the floor, as it usually is, or else by name.
            let read_end = read_end.into_raw_fd();
            let code = catch_unwind(AssertUnwindSafe(|| {
                become_worker(setup, read_end, write_end, work)
            }))
            .unwrap_or(exit_code::PANICKED);
            // SAFETY: _exit ends the process at once; nothing of the master's
            // copy in this address space runs (no destructor, no atexit).
            unsafe { libc::_exit(code) }
        }
        Err(errno) => Err(failed("fork")(errno.into())),
    }
}

/// Steps 1 to 6 of the module doc, in order, in the forked child. Nothing
/// here reads /proc or asks for the pid: what the master could work out
/// once it did (`Prepared`), and the pid is asked for only on the way to
/// a line that names it.
fn become_worker<W>(setup: &ChildSetup, read_end: RawFd, write_end: OwnedFd, work: &mut W) -> i32
where
    W: FnMut(Handoff) -> i32,
{
    let master = setup.prepared.master;
    let scoreboard = setup.exec.and_then(|(_, file)| file);
    let kept = [Some(write_end.as_raw_fd()), scoreboard.map(|(fd, _)| fd)];
    close_master_fds(setup, read_end, &kept);
    logbuf::become_worker();
    // Opened before the privileges go: the pipe to stderr may be root's.
    let log = setup.exec.and_then(|_| logbuf::worker_out_fd());
    if let Err(err) = setup.run_as.map_or(Ok(()), privileges::drop_privileges) {
        error!("worker {}: dropping privileges: {err}", std::process::id());
        return exit_code::SETUP_FAILED;
    }
    name_process(setup.slot);
    // Forked with the master's title: `ps -ef` would show two masters.
    if let Some(title) = &setup.prepared.title {
        title.show(setup.slot);
    }
    if let Err(err) = setup.signals.restore_in_worker(&MASTER_CONTROLS) {
        error!("worker {}: restoring the signal mask: {err}", std::process::id());
        return exit_code::SETUP_FAILED;
    }
    if let Some((name, watchdog)) = setup.notify {
        // One thread in this child: nothing reads the environment meanwhile.
        std::env::set_var("NOTIFY_SOCKET", name);
        if let Some(usec) = watchdog {
            std::env::set_var("WATCHDOG_USEC", usec.to_string());
            std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        }
    }
    if let Some((program, scoreboard)) = setup.exec {
        let pid = std::process::id();
        let env = WorkerEnv {
            slot: setup.slot,
            pipe: write_end.as_raw_fd(),
            scoreboard,
            master: master.as_raw(),
            log,
        };
        let err = upgrade::exec_worker(program, &setup.listeners.fds(), &env, pid);
        let who = setup
            .run_as
            .and_then(|run_as| run_as.uid())
            .map_or(String::new(), |uid| format!(" as uid {uid}"));
        error!("worker {pid}: executing {}{who}: {err}", program.path.display());
        return exit_code::SETUP_FAILED;
    }
    if let Err(err) = die_with_master(master) {
        error!("worker {}: {err}", std::process::id());
        return exit_code::SETUP_FAILED;
    }
    // SAFETY: the master's listeners in this address space are never
    // dropped (the child leaves with _exit), so these are the only owners
    // of the fds in the child.
    let listeners = setup
        .listeners
        .listeners()
        .map(|l| unsafe { l.alias() })
        .collect();
    let handoff = Handoff {
        slot: setup.slot,
        listeners,
        channel: Channel::new(write_end),
        scoreboard: setup.row,
    };
    work(handoff)
}

/// Step 6 for a worker that executed the new binary (called by `run`
/// before anything else): its log, its name, and the parent-death signal
/// armed again and checked. Steps 1 to 4 were taken before the exec, in
/// the forked child; close-on-exec has closed nothing more.
pub(crate) fn after_exec(env: &WorkerEnv) -> Result<(), String> {
    logbuf::become_worker_after_exec(env.log);
    name_process(env.slot);
    crate::title::set_worker_title(env.slot);
    die_with_master(Pid::from_raw(env.master)).map_err(|err| err.to_string())
}

/// Closes the master's fds: everything from the floor up but `keep` (the
/// worker's end of its pipe, and for an exec the scoreboard's file), and
/// by name those the master names (epoll, signalfd, log, control) and
/// `read_end` where they lie below it. Most lie above and go with the
/// rest: two calls, up to the worker's end of its pipe and after, and a
/// call for each below (the demo's child makes four in all).
fn close_master_fds(setup: &ChildSetup, read_end: RawFd, keep: &[Option<RawFd>; 2]) {
    let floor = setup.floor.0;
    // A call each for the few below the floor: no allocation in the child.
    for fd in setup.master_fds.iter().copied().chain([read_end]) {
        if fd < floor && !keep.contains(&Some(fd)) {
            close_range(fd, fd);
        }
    }
    let mut above = keep.map(|fd| fd.filter(|&fd| fd >= floor).unwrap_or(RawFd::MAX));
    above.sort_unstable();
    let mut from = floor;
    for fd in above.into_iter().filter(|&fd| fd != RawFd::MAX) {
        close_range(from, fd - 1);
        from = fd + 1;
    }
    close_range(from, RawFd::MAX);
}

/// close_range(2), Linux 5.9: closes every open fd from `first` to `last`
/// in one call. They belong to the master's Poll, signalfd, log and pipes,
/// whose owners live on in this copy of the address space but are never
/// dropped here (the child leaves with _exit): nothing closes them twice
/// or uses them after.
fn close_range(first: RawFd, last: RawFd) {
    if first > last {
        return;
    }
    // SAFETY: closes fds only; see above for why none is used again.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0,
        )
    };
    if rc != 0 {
        // An older kernel: close what /proc says is open in the range.
        let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
            .filter(|fd| (first..=last).contains(fd))
            .collect();
        for fd in open {
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
    }
}

/// A worker must never outlive its master: an orphan would go on accepting
/// on the port with nobody to supervise it.
pub(crate) fn die_with_master(master: Pid) -> io::Result<()> {
    prctl::set_pdeathsig(Signal::SIGKILL)?;
    // If the master died between fork and prctl, no signal will ever come:
    // the child has already been reparented.
    if getppid() != master {
        return Err(io::Error::other("master exited before the worker started"));
    }
    Ok(())
}

/// `ps -e` and `top` show the name (at most 15 bytes): `worker 3`.
pub(crate) fn name_process(slot: usize) {
    // Written on the stack: a forked child need not allocate for it.
    let mut name = [0u8; 32];
    let mut cursor = &mut name[..31];
    let _ = write!(cursor, "worker {slot}");
    let len = 31 - cursor.len();
    if let Ok(name) = CStr::from_bytes_with_nul(&name[..=len]) {
        let _ = prctl::set_name(name);
    }
}
