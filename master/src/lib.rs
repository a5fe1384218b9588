//! respawn-master: a prefork supervisor that keeps exactly N workers alive.
//!
//! The master binds a listening socket, forks N workers that accept on it,
//! and replaces every worker that dies. A worker that panics says so first
//! (a `Suicide` message, see `respawn-ipc`), so its replacement is forked
//! while it finishes the connection it holds: no moment with one worker
//! short, and no queued connection lost, since the socket stays open in the
//! master and the other workers.
//!
//! The master is one thread and one `mio` loop over a signalfd (SIGCHLD and
//! the control signals) and one pipe per worker; see [`run`] for the loop
//! and `docs/architecture.md` for the walk-through.
//!
//! # Embedding
//!
//! Call [`bind`] for one TCP address or [`bind_all`] for several (TCP
//! `host:port` and Unix `unix:/path`, or whatever systemd's socket
//! activation passed), or bring your own `TcpListener`; then [`run`] from
//! `main`, before any thread is started. `run` forks; in each child it calls your
//! function with the [`Handoff`] and exits with the code it returns. It
//! returns once every worker has stopped after SIGTERM, SIGQUIT or SIGINT.
//! Meanwhile it replaces workers that die (after a backoff if they die
//! young, giving up after too many restarts), kills hung ones, replaces all
//! one at a time on SIGHUP, adds or removes one on SIGTTIN or SIGTTOU, and
//! upgrades to the binary now on disk on SIGUSR2.
//!
//! # Upgrading to new code
//!
//! SIGUSR2 starts the program at the path this process was started from
//! ([`original_exe`]) as new workers, one at a time, each old worker
//! stopping once a new one is Ready (with no worker running, one is started
//! from it first); then, once a new worker proved the binary and no old one
//! accepts, the master executes it in place, keeping its pid, and adopts its
//! workers. If the new workers fail, or the master cannot execute it, the
//! upgrade backs out by itself. Nothing is needed from an embedder but this:
//! bind with [`bind`] (or take [`inherited_listeners`]) and call [`run`]
//! early in `main`, before anything a worker should not do twice: the new
//! program runs the same `main`, in which `bind` takes the listener it was
//! handed and `run` becomes the worker (or the adopting master) it was
//! started as. [`started_as_worker`] says which, before `run`.
//!
//! ```no_run
//! use respawn_master::Conn;
//! use std::io::Write;
//! use std::time::Duration;
//!
//! struct Hello;
//! impl respawn_worker::Service for Hello {
//!     fn serve(&mut self, conn: &mut Conn) {
//!         let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n");
//!     }
//! }
//!
//! fn main() {
//!     let listener = respawn_master::bind("127.0.0.1:8080").unwrap_or_else(|err| {
//!         eprintln!("hello: {err}");
//!         std::process::exit(1);
//!     });
//!     let config = respawn_master::Config::new(4).graceful_timeout(Duration::from_secs(10));
//!     let result = respawn_master::run(listener, config, |handoff| respawn_worker::run(handoff, Hello));
//!     if let Err(err) = result {
//!         eprintln!("hello: {err}");
//!         std::process::exit(1);
//!     }
//! }
//! ```
//!
//! `examples/hello.rs` is this program grown a little (an address from the
//! command line, logging, exit codes):
//! `cargo run -p respawn-master --example hello -- 127.0.0.1:0`.
//!
//! # Logging
//!
//! The library logs through the `log` crate and writes nothing to stderr by
//! itself: the program's logger does. A logger that writes to stderr itself
//! blocks the master when nobody reads stderr (a stalled journald, a full
//! pipe), and a blocked master reaps, replaces and kills nothing. Point the
//! logger at [`log_writer`] instead: each line is queued (at most 256 KiB)
//! and written by the master's loop only when stderr is writable; lines that
//! do not fit are dropped whole, and the next line out says how many. With
//! env_logger:
//! `.target(env_logger::Target::Pipe(Box::new(respawn_master::log_writer())))`.
//! In workers, the same writer writes at once without blocking, and drops.
//!
//! The worker side is any function of a [`Handoff`]; `respawn-worker` is one
//! (a blocking accept loop that survives panics), and this crate does not
//! depend on it.
//!
//! # What the master does to the process
//!
//! - It blocks every signal but KILL, STOP, TSTP and CONT (job control) and
//!   the fault signals (SEGV, BUS, FPE, ILL, TRAP, SYS, ABRT), sets their dispositions to default (an
//!   ignored signal never reaches a signalfd), and reads them from a
//!   signalfd: a signal it has no use for is a log line, never the end of
//!   the service. Dispositions and mask are restored when `run` returns
//!   (signals that arrived after its last turn are read and dropped first),
//!   and in every worker before your function runs, where HUP, TTIN and TTOU
//!   and USR2 are ignored (they steer the master only) and TERM and QUIT stay blocked:
//!   unblock them once your worker handles them (`respawn-worker` does).
//! - It maps a shared-memory scoreboard (a memory file, `memfd_create`)
//!   before the first fork, one row per worker slot that can be in use at
//!   once (8,193 rows, 1.5 MiB of address space, touched only where used),
//!   for the hung-worker check; the mapping stays for the life of the process.
//! - It reads and unsets systemd's variables when it starts: `NOTIFY_SOCKET`,
//!   `WATCHDOG_USEC` and `WATCHDOG_PID` (it keeps one datagram socket to
//!   notify systemd, which workers close), and `LISTEN_FDS`, `LISTEN_PID` and
//!   `LISTEN_FDNAMES` when [`bind`] or [`inherited_listeners`] takes them. A
//!   second `run` in the same process sees none of them.
//! - It sets its process title (`respawn: master, 4 workers, generation 3,
//!   127.0.0.1:8080`, see [`set_title`]) and comm (`respawn master`), and
//!   each worker's (`respawn: worker 2`); argv itself is left untouched.
//!   When `run` returns, comm is what it was; the title stays the last
//!   one shown (`respawn: master, 0 workers, ...`) until [`set_title`]
//!   shows another.
//! - It logs `listening on <address>` for each listener when it starts
//!   (after the pid file is claimed and the control socket bound: a master
//!   refused for either never says it listens), not again after an
//!   upgrade's re-execution.
//! - With [`Config::control`], it serves a control socket (docs/control.md)
//!   from its loop; [`ask_control`] is its client.
//! - On SIGUSR2 it executes a program (see above), passing `RESPAWN_WORKER`,
//!   `RESPAWN_MASTER_STATE`, `RESPAWN_MASTER_PATH`, `RESPAWN_RUN_AS` and `RESPAWN_LISTEN_FDS`
//!   in the environment; each is read and unset by the program it is for.
//! - It makes a single listener blocking (the workers' accept sleeps), and
//!   several non-blocking (the workers wait on all of them at once), and
//!   sets TCP_DEFER_ACCEPT on TCP ones, so connections that send nothing
//!   wake no worker.
//! - It removes the Unix socket files [`bind_all`] made when [`run`]
//!   returns (never on the way to an upgrade's exec, which does not return).
//! - It keeps its own fds (a pipe per worker) at or above one past the
//!   highest fd open when `run` starts; each worker closes them with one
//!   `close_range` and inherits the program's other fds as they are.
//! - It reaps every child of the process (`waitpid(-1)`): do not run other
//!   children of your own beside it. It makes itself the reaper of its
//!   descendants (PR_SET_CHILD_SUBREAPER): a process a worker started and
//!   left behind becomes its child, is said in a line, and is stopped with
//!   the workers. When `run` returns the flag is what it was before.
//! - It refuses to start if the process already runs other threads: `fork`
//!   copies only the calling thread, and a lock held by another thread at
//!   that moment would stay locked forever in the child.

#[cfg(not(target_os = "linux"))]
compile_error!(
    "respawn runs on Linux only: it is built on signalfd, epoll, \
     prctl(PR_SET_PDEATHSIG) and /proc, which other systems do not have"
);

mod activation;
mod config;
mod control;
mod error;
mod exec;
mod handdown;
mod hung;
mod limits;
mod listen;
mod logbuf;
mod master;
mod notified;
mod notify;
mod pidfile;
mod policy;
mod privileges;
mod reap;
mod signals;
mod sockdiag;
mod spawn;
mod status;
mod table;
mod title;
mod upgrade;

pub use activation::{inherited_listeners, HandedBy, Inherited};
pub use config::Config;
pub use control::ask_control;
pub use error::Error;
pub use exec::Exec;
pub use listen::{bind, bind_all, Listeners, Listening, Origin};
pub use logbuf::{log_writer, LogWriter};
pub use privileges::{RunAs, RunAsError};
pub use respawn_ipc::{Conn, Handoff, Listener, Peer};
pub use title::{original_args, original_exe, set_title, set_worker_title};
pub use upgrade::{started_as_worker, started_by_upgrade};

/// Supervises workers on `listeners` until told to stop: one listener (a
/// `TcpListener`, a `UnixListener`, a [`Listener`]) or several (from
/// [`bind_all`], or a `Vec<Listener>`).
///
/// Forks `config`'s number of workers; each runs `worker(handoff)` and exits
/// with the code it returns. Returns `Ok(())` after a stop (SIGTERM or
/// SIGQUIT: graceful, SIGINT: at once) once every worker is gone. Returns
/// [`Error::GaveUp`], once every worker has stopped, if workers kept failing
/// (see [`Config::restart_limit`]). Returns another error, with every worker
/// killed and reaped, if the master itself cannot go on: it runs in a
/// multi-threaded process, or its epoll or signalfd fails. A fork that fails
/// is not such an error: the master logs it, keeps the workers it has, and
/// retries.
///
/// The Unix socket files [`bind_all`] made are removed when it returns,
/// whatever it returns: no worker is left to answer there.
pub fn run<W>(listeners: impl Into<Listeners>, config: Config, worker: W) -> Result<(), Error>
where
    W: FnMut(Handoff) -> i32,
{
    let listeners = listeners.into();
    match upgrade::take_worker_env() {
        Ok(Some(env)) => run_upgraded_worker(&env, listeners, worker),
        Ok(None) => {}
        Err(why) => {
            return Err(Error::io(
                "starting as an upgraded worker",
                std::io::Error::other(why),
            ))
        }
    }
    let socket_files = listeners.socket_files();
    let looks = Looks::now();
    let mut master = match master::Master::new(listeners, config, worker) {
        Ok(master) => master,
        Err(err) => {
            listen::remove_socket_files(&socket_files);
            looks.restore();
            return Err(err);
        }
    };
    let result = master.run();
    if result.is_err() {
        master.kill_all_and_reap();
    }
    // Only once the loop has returned: an upgrade re-executes from inside
    // it, and the file must stay for the new master. The files as they are
    // now: a HUP may have made one again (a new inode) since the start.
    listen::remove_socket_files(&master.socket_files());
    logbuf::flush_before_exit(LAST_LINES_PATIENCE);
    looks.restore();
    result
}

/// What `run` changes of the process beyond its signals: its name (comm)
/// and whether it reaps orphaned descendants. Given back when `run`
/// returns, so that a program that goes on is neither taken for a master
/// (`pgrep -x 'respawn master'`) nor left the parent of strays it never
/// reaps.
struct Looks {
    comm: [u8; 16],
    subreaper: libc::c_int,
}

impl Looks {
    fn now() -> Looks {
        let mut looks = Looks {
            comm: [0; 16],
            subreaper: 0,
        };
        // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into
        // the buffer given; PR_GET_CHILD_SUBREAPER writes one int.
        unsafe {
            libc::prctl(libc::PR_GET_NAME, looks.comm.as_mut_ptr(), 0, 0, 0);
            libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut looks.subreaper, 0, 0, 0);
        }
        looks
    }

    fn restore(&self) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
        // bytes (PR_GET_NAME wrote one); the subreaper flag is an integer.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, self.comm.as_ptr(), 0, 0, 0);
            libc::prctl(
                libc::PR_SET_CHILD_SUBREAPER,
                libc::c_ulong::from(self.subreaper != 0),
                0,
                0,
                0,
            );
        }
    }
}

/// This process is a worker that a master started from a new binary during
/// an upgrade (spawn.rs, step 5): it was forked, cleaned and dropped its
/// privileges before the exec, so all that is left is step 6 (spawn.rs's
/// `after_exec`), then `worker`; it exits with the code it returns.
/// Nothing of the configuration is used: the master resolved and applied
/// it already.
fn run_upgraded_worker<W>(env: &upgrade::WorkerEnv, listeners: Listeners, mut worker: W) -> !
where
    W: FnMut(Handoff) -> i32,
{
    if let Err(err) = spawn::after_exec(env) {
        log::error!("worker {}: {err}", std::process::id());
        log::logger().flush();
        std::process::exit(respawn_ipc::exit_code::SETUP_FAILED);
    }
    let code = worker(upgrade::handoff(env, listeners.into_listeners()));
    log::logger().flush();
    std::process::exit(code)
}

/// How long `run` waits, at its end, for stderr to take the last log lines
/// queued by [`log_writer`]; a reader that never comes does not hold it up.
const LAST_LINES_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);
