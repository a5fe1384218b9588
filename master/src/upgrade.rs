//! USR2: upgrade to the binary now on disk, with no gap and a way back.
//!
//! HUP re-forks workers from the master's memory, so it never picks up new
//! code. USR2 does, in three steps, each of which can fail without harm:
//!
//! 1. **New workers from the new binary.** The master starts the program at
//!    the path it was started from (argv[0], resolved against the directory
//!    it started in, as nginx and unicorn do; not /proc/self/exe, which
//!    still points at the old file). Each new worker is forked and cleaned
//!    as every worker is (spawn.rs: the master's fds closed, its privileges
//!    dropped), and then executes that program, which finds in its environment that it is
//!    a worker ([`take_worker_env`]: its slot, its pipe, the scoreboard) and
//!    its listeners (activation.rs), and runs the worker function instead of
//!    a master. This is a rolling restart: each old worker is asked to stop
//!    only once a new one is Ready.
//! 2. **Back out if the new binary is broken.** A new worker that exits, or
//!    is not Ready by the start deadline, before it said Ready or younger
//!    than `--min-uptime`, ends the upgrade: one line says why, what was
//!    wanted before is wanted again (deploy.rs: the workers of the new
//!    binary are replaced by forks of the running one), and the old
//!    workers, which were never asked to stop before a new one was Ready,
//!    serve on. Nothing counts toward giving up: a bad deploy must never
//!    take the service down. With no worker running when USR2 comes, one is
//!    started from the new binary first: the master never follows a binary
//!    no worker ran.
//! 3. **The master re-executes itself in place.** Once every worker runs the
//!    new binary, one of them proved it (said Ready), and no old worker still
//!    holds a listener (settle.rs), the master executes it too, keeping its
//!    pid, its children and their pipes, the listeners, the scoreboard and
//!    the control socket's connections, all at the fd numbers they have
//!    (nothing is renumbered, so a failed exec leaves the master as it was,
//!    and backs the upgrade out). The new image finds its state in a sealed
//!    memory file ([`take_master_state`], handdown.rs) and adopts its
//!    workers.
//!
//! Why keep the pid rather than start a new master beside the old one, as
//! nginx and gunicorn do: a new pid breaks whoever watches the old one.
//! Under systemd the service's main process would exit (gunicorn's USR2
//! under systemd kills the new master with the old one's cgroup); in a
//! container the master is PID 1, whose exit ends the container; in a
//! terminal the shell would see the job end. Keeping the pid works the same
//! in all three, with no MAINPID= and no NotifyAccess= to get right. The
//! price: the master's own new code is tried last, after the new workers
//! proved the binary starts and serves; a new binary that fails only as a
//! master is not caught (its workers would have failed too, in practice,
//! since both run the same `main` up to `run`).

use crate::handdown::MasterState;
use crate::master::SCOREBOARD_ROWS;
use crate::table::Wanted;
use respawn_ipc::scoreboard::Scoreboard;
use respawn_ipc::{Channel, Handoff};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Set in an upgraded worker's environment: `slot=2,pipe=5,scoreboard=6,rows=8193`.
const WORKER_VAR: &str = "RESPAWN_WORKER";
/// Set in the re-executed master's environment: the fd of its state (a
/// sealed memory file, see handdown.rs).
const MASTER_VAR: &str = "RESPAWN_MASTER_STATE";
/// The path the first master was started from, kept across re-executions:
/// an upgrade through a wrapper script must find the wrapper next time too.
const PATH_VAR: &str = "RESPAWN_MASTER_PATH";
/// How often, and how long apart, an exec that finds the new file still open
/// for writing (ETXTBSY) is tried again: at most 0.2 s in all.
const TEXT_BUSY_WAITS: u32 = 20;
const TEXT_BUSY_PAUSE: Duration = Duration::from_millis(10);

/// The program to execute for an upgrade: where it lies, and its arguments.
#[derive(Clone, Debug)]
pub(crate) struct Program {
    pub path: PathBuf,
    pub args: Vec<OsString>,
}

impl Program {
    /// This process's own program: what it was started as (see
    /// [`crate::original_exe`]: argv[0] resolved against the directory it
    /// started in), or the path a previous master handed down.
    pub(crate) fn of_this_process() -> Program {
        let args = crate::original_args().to_vec();
        let handed_down = std::env::var_os(PATH_VAR).map(PathBuf::from);
        std::env::remove_var(PATH_VAR);
        let path = handed_down
            .or_else(|| crate::original_exe().map(Path::to_path_buf))
            .unwrap_or_default();
        // Components drop the `.` of `./respawn`, for the log's sake.
        let path = path.components().collect();
        Program { path, args }
    }

    /// Can it be executed now? The error is said in the refusal line.
    pub(crate) fn check(&self) -> io::Result<()> {
        nix::unistd::access(&self.path, nix::unistd::AccessFlags::X_OK).map_err(io::Error::from)
    }
}

/// An upgrade under way.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Upgrade {
    /// The image its workers run: the new binary.
    pub image: u32,
    /// What was wanted before: what a back-out returns to.
    pub before: Wanted,
    pub started: Instant,
    /// A worker of the new binary said Ready: the binary starts and serves,
    /// and the master may follow it.
    pub proved: bool,
}

/// What an upgraded worker finds in its environment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct WorkerEnv {
    pub slot: usize,
    pub pipe: RawFd,
    pub scoreboard: Option<(RawFd, usize)>,
    /// The master's pid: the parent-death signal is armed again after the
    /// exec, and the parent checked to be it.
    pub master: i32,
    /// The worker's own non-blocking way to stderr, opened before it
    /// dropped its privileges (logbuf.rs).
    pub log: Option<RawFd>,
}

/// In a forked child: executes `program` as a worker in `slot`, handing it
/// the listeners, its pipe's write end and the scoreboard at the fd numbers
/// they have. Returns only if the exec failed.
pub(crate) fn exec_worker(program: &Program, listeners: &[RawFd], worker: &WorkerEnv, pid: u32) -> io::Error {
    let scoreboard = worker.scoreboard.map(|(fd, _)| fd);
    let kept: Vec<RawFd> = listeners
        .iter()
        .copied()
        .chain([worker.pipe])
        .chain(scoreboard)
        .chain(worker.log)
        .collect();
    if let Err(err) = set_inherited(&kept, true) {
        return err;
    }
    let mut ours = vec![
        ("LISTEN_PID".to_owned(), pid.to_string()),
        ("RESPAWN_LISTEN_FDS".to_owned(), join(listeners)),
        (WORKER_VAR.to_owned(), encode_worker(worker)),
    ];
    ours.retain(|(_, value)| !value.is_empty());
    execute(program, &ours)
}

/// Was this process started by a master as a worker of an upgrade? True
/// until `run` takes the variable.
pub fn started_as_worker() -> bool {
    std::env::var_os(WORKER_VAR).is_some()
}

/// Was this process started by a master's upgrade (SIGUSR2), as a worker
/// or as the master's new image? True until `run` takes the variables.
pub fn started_by_upgrade() -> bool {
    started_as_worker() || std::env::var_os(MASTER_VAR).is_some()
}

/// In a program started by [`exec_worker`]: its slot, pipe and scoreboard,
/// if it is such a worker. The variable is removed, so that what it starts
/// does not take it for its own.
pub(crate) fn take_worker_env() -> Result<Option<WorkerEnv>, String> {
    let Some(value) = std::env::var_os(WORKER_VAR) else {
        return Ok(None);
    };
    std::env::remove_var(WORKER_VAR);
    let value = value.to_string_lossy();
    decode_worker(&value)
        .map(Some)
        .ok_or_else(|| format!("reading {WORKER_VAR}={value:?}: not what a respawn master writes"))
}

/// The worker's handoff, from its environment and the listeners it was given.
pub(crate) fn handoff(env: &WorkerEnv, listeners: Vec<respawn_ipc::Listener>) -> Handoff {
    // SAFETY: the master that executed us left this fd open for us alone
    // (WORKER_VAR names it, and is removed): nothing else owns it.
    let pipe = unsafe { OwnedFd::from_raw_fd(env.pipe) };
    // Inherited without close-on-exec, for this exec alone: a program the
    // worker runs must not hold the master's pipe open.
    let _ = set_inherited(&[env.pipe], false);
    let channel = Channel::new(pipe);
    let scoreboard = env.scoreboard.and_then(|(fd, rows)| {
        // SAFETY: as for the pipe: handed to us alone.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        // The mapping outlives the Scoreboard (never unmapped); the file
        // is closed when it drops, as a worker needs only the mapping.
        Scoreboard::inherit(file, rows).ok()?.writer(env.slot)
    });
    Handoff {
        slot: env.slot,
        listeners,
        channel,
        scoreboard,
    }
}

fn encode_worker(worker: &WorkerEnv) -> String {
    let mut text = format!(
        "slot={},pipe={},master={}",
        worker.slot, worker.pipe, worker.master
    );
    if let Some((fd, rows)) = worker.scoreboard {
        text.push_str(&format!(",scoreboard={fd},rows={rows}"));
    }
    if let Some(fd) = worker.log {
        text.push_str(&format!(",log={fd}"));
    }
    text
}

fn decode_worker(text: &str) -> Option<WorkerEnv> {
    let mut slot = None;
    let mut pipe = None;
    let mut master = None;
    let mut scoreboard = None;
    let mut rows = None;
    let mut log = None;
    let fd = |value: usize| RawFd::try_from(value).ok().filter(|&fd| fd > 2);
    for field in text.split(',') {
        let (key, value) = field.split_once('=')?;
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let value: usize = value.parse().ok()?;
        match key {
            "slot" if value < SCOREBOARD_ROWS => slot = Some(value),
            "pipe" => pipe = Some(fd(value)?),
            "master" => master = Some(i32::try_from(value).ok().filter(|&pid| pid > 0)?),
            "scoreboard" => scoreboard = Some(fd(value)?),
            "rows" => rows = Some(value),
            "log" => log = Some(fd(value)?),
            _ => return None,
        }
    }
    let mut fds = [pipe?]
        .into_iter()
        .chain(scoreboard)
        .chain(log)
        .collect::<Vec<_>>();
    let count = fds.len();
    fds.sort_unstable();
    fds.dedup();
    if fds.len() != count {
        return None; // one fd named twice would have two owners
    }
    Some(WorkerEnv {
        slot: slot?,
        pipe: pipe?,
        master: master?,
        scoreboard: match (scoreboard, rows) {
            (Some(fd), Some(rows)) => Some((fd, rows)),
            (None, None) => None,
            _ => return None,
        },
        log,
    })
}

/// Executes `program` in place of this master, handing it `state` (in a
/// sealed memory file, handdown.rs) and keeping `kept` open at the fd
/// numbers they have: the listeners, the worker pipes, the scoreboard and
/// the control socket's fds. Returns only if the exec failed, with every fd
/// as it was. `more` is added to the environment (systemd's variables,
/// which the master took out of its own).
pub(crate) fn reexec_master(
    program: &Program,
    state: &MasterState,
    listeners: &[RawFd],
    kept: &[RawFd],
    more: &[(&str, OsString)],
) -> io::Error {
    let file = match state.to_memfd() {
        Ok(file) => file,
        Err(err) => return io::Error::new(err.kind(), format!("writing the state to hand down: {err}")),
    };
    let kept: Vec<RawFd> = listeners
        .iter()
        .chain(kept)
        .copied()
        .chain([file.as_raw_fd()])
        .collect();
    if let Err(err) = set_inherited(&kept, true) {
        let _ = set_inherited(&kept, false);
        return err;
    }
    let mut ours = vec![
        ("LISTEN_PID".to_owned(), std::process::id().to_string()),
        ("RESPAWN_LISTEN_FDS".to_owned(), join(listeners)),
        (MASTER_VAR.to_owned(), file.as_raw_fd().to_string()),
        (PATH_VAR.to_owned(), program.path.to_string_lossy().into_owned()),
    ];
    ours.extend(
        more.iter()
            .map(|(name, value)| ((*name).to_owned(), value.to_string_lossy().into_owned())),
    );
    let err = execute(program, &ours);
    let _ = set_inherited(&kept, false);
    err
}

/// In a re-executed master: the state its previous image handed down, if
/// it is one (None: a first start). The variable is removed (workers must
/// not see it), and the memory file closed once read. Err: it names an fd
/// that is not a sealed state, or the state does not parse (handdown.rs).
pub(crate) fn take_master_state() -> Result<Option<MasterState>, String> {
    // Taken by RunAs::resolve if the program called it; not for workers.
    let _ = crate::privileges::take_handed_down();
    let Some(text) = std::env::var_os(MASTER_VAR) else {
        return Ok(None);
    };
    std::env::remove_var(MASTER_VAR);
    let text = text.to_string_lossy();
    let fd: RawFd = text
        .parse()
        .ok()
        .filter(|&fd| fd > 2)
        .ok_or_else(|| format!("{MASTER_VAR}={text:?} is not an fd"))?;
    // Only a sealed memory file is taken, and closed once read: a forged
    // number that names one of the program's own fds (its listener) must
    // be refused without closing it.
    // SAFETY: F_GETFD and F_GET_SEALS only read the fd's flags and seals.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{MASTER_VAR}={fd}: no such fd is open"));
    }
    // SAFETY: as above.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 || seals & libc::F_SEAL_WRITE == 0 {
        return Err(format!(
            "{MASTER_VAR}={fd}: not a sealed memory file (left open: it is not the state's)"
        ));
    }
    // SAFETY: the previous image left this sealed file open for us alone
    // (the variable naming it is removed); we close it once read.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    MasterState::from_memfd(&file)
        .map(Some)
        .map_err(|why| format!("the state in fd {fd}: {why}"))
}

/// The scoreboard handed down, or a new one if there was none or it cannot
/// be mapped (then adopted workers write to rows nobody reads, which only
/// costs their hung check until they are replaced).
pub(crate) fn adopt_scoreboard(handed: Option<(RawFd, usize)>) -> io::Result<Scoreboard> {
    if let Some((fd, rows)) = handed {
        // SAFETY: the previous image left this fd open for us alone (the
        // state naming it is removed, and names each fd once): nothing else
        // owns it. Unused, it is closed when `file` drops.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        // It was handed down without close-on-exec: a program a worker
        // executes must not inherit it.
        let _ = set_inherited(&[fd], false);
        if rows == SCOREBOARD_ROWS {
            match Scoreboard::inherit(file, rows) {
                Ok(scoreboard) => return Ok(scoreboard),
                Err(err) => {
                    log::warn!("the scoreboard handed over cannot be mapped ({err}); starting a new one")
                }
            }
        }
    }
    Scoreboard::new(SCOREBOARD_ROWS)
}

/// Clears (`true`) or sets back close-on-exec on `fds`.
fn set_inherited(fds: &[RawFd], inherit: bool) -> io::Result<()> {
    let flag = if inherit { 0 } else { libc::FD_CLOEXEC };
    for &fd in fds {
        // SAFETY: F_SETFD changes one flag of an fd this process holds.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flag) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn join(fds: &[RawFd]) -> String {
    fds.iter().map(RawFd::to_string).collect::<Vec<_>>().join(",")
}

/// execve(2) with this process's environment, `ours` replacing any
/// variable of the same name. Returns only on failure.
pub(crate) fn execute(program: &Program, ours: &[(String, String)]) -> io::Error {
    let Some(path) = c_string(program.path.as_os_str()) else {
        return io::Error::new(io::ErrorKind::InvalidInput, "the program's path holds a NUL byte");
    };
    let args: Option<Vec<CString>> = program.args.iter().map(|arg| c_string(arg)).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(name, _)| !ours.iter().any(|(ours, _)| name.as_bytes() == ours.as_bytes()))
        .filter_map(|(name, value)| {
            let mut pair = name.into_vec();
            pair.push(b'=');
            pair.extend(value.into_vec());
            CString::new(pair).ok()
        })
        .collect();
    env.extend(
        ours.iter()
            .filter_map(|(name, value)| CString::new(format!("{name}={value}")).ok()),
    );
    let Some(args) = args else {
        return io::Error::new(io::ErrorKind::InvalidInput, "an argument holds a NUL byte");
    };
    // ETXTBSY: someone still holds the new file open for writing. A deploy
    // that has just written it, or any process that forked while it was
    // open (the child holds the fd until its own exec), lets go within
    // moments: wait for that, briefly, rather than back out.
    let mut waits = 0;
    loop {
        match nix::unistd::execve(&path, &args, &env) {
            Ok(never) => match never {},
            Err(nix::errno::Errno::ETXTBSY) if waits < TEXT_BUSY_WAITS => {
                waits += 1;
                std::thread::sleep(TEXT_BUSY_PAUSE);
            }
            Err(errno) => return errno.into(),
        }
    }
}

fn c_string(text: &OsStr) -> Option<CString> {
    CString::new(text.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_variable_round_trips_and_refuses_garbage() {
        let worker = WorkerEnv {
            slot: 3,
            pipe: 9,
            scoreboard: Some((10, 8193)),
            master: 4321,
            log: Some(11),
        };
        assert_eq!(decode_worker(&encode_worker(&worker)), Some(worker));
        let bare = WorkerEnv {
            slot: 0,
            pipe: 4,
            scoreboard: None,
            master: 1,
            log: None,
        };
        assert_eq!(decode_worker(&encode_worker(&bare)), Some(bare));
        for garbage in [
            "",
            "slot=1",
            "slot=1,pipe=4",
            "slot=x,pipe=4,master=2",
            "slot=1,pipe=4,master=2,rows=3",
            "slot=1,pipe=4,master=2,what=2",
            "slot=1,pipe=4,master=0",
            "slot=1,pipe=2,master=5",
            "slot=1,pipe=4,master=5,log=4",
            "slot=1,pipe=4,master=5,scoreboard=4,rows=3",
            "slot=99999,pipe=4,master=5",
            "slot=1,pipe=+4,master=5",
        ] {
            assert_eq!(decode_worker(garbage), None, "{garbage:?}");
        }
    }
}
