//! USR2: upgrade to the binary now on disk, with no gap and a way back.
//!
//! HUP re-forks workers from the master's memory, so it never picks up new
//! code. USR2 does, in three steps, each of which can fail without harm:
//!
//! 1. **New workers from the new binary.** The master starts the program at
//!    the path it was started from (argv[0], resolved against the directory
//!    it started in, as nginx and unicorn do; not /proc/self/exe, which
//!    still points at the old file). Each new worker is forked as usual and
//!    then executes that program, which finds in its environment that it is
//!    a worker ([`take_worker_env`]: its slot, its pipe, the scoreboard) and
//!    its listeners (activation.rs), and runs the worker function instead of
//!    a master. This is a rolling restart: each old worker is asked to stop
//!    only once a new one is Ready.
//! 2. **Back out if the new binary is broken.** A new worker that exits, or
//!    is not Ready by the start deadline, before it ever said Ready ends the
//!    upgrade: one line says why, the workers of the new binary are
//!    replaced by forks of the running one, and the old workers, which were
//!    never asked to stop, serve on. Nothing counts toward giving up: a bad
//!    deploy must never take the service down.
//! 3. **The master re-executes itself in place.** Once every worker runs the
//!    new binary, the master executes it too, keeping its pid, its children
//!    and their pipes, the listeners and the scoreboard, all at the fd
//!    numbers they have (nothing is renumbered, so a failed exec leaves the
//!    master as it was). The new image finds its state in its environment
//!    ([`take_master_state`]) and adopts its workers.
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

use crate::master::SCOREBOARD_ROWS;
use crate::table::{State, Worker};
use nix::unistd::Pid;
use respawn_ipc::scoreboard::Scoreboard;
use respawn_ipc::{Channel, Handoff};
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Set in an upgraded worker's environment: `slot=2,pipe=5,scoreboard=6,rows=8193`.
const WORKER_VAR: &str = "RESPAWN_WORKER";
/// Set in the re-executed master's environment: its state (see `MasterState`).
const MASTER_VAR: &str = "RESPAWN_MASTER_STATE";
/// The path the first master was started from, kept across re-executions:
/// an upgrade through a wrapper script must find the wrapper next time too.
const PATH_VAR: &str = "RESPAWN_MASTER_PATH";
/// How often, and how long apart, an exec that finds the new file still open
/// for writing (ETXTBSY) is tried again: at most 0.2 s in all.
const TEXT_BUSY_WAITS: u32 = 20;
const TEXT_BUSY_PAUSE: Duration = Duration::from_millis(10);
/// This version of the state's text; a master that reads another refuses it.
const STATE_VERSION: &str = "v1";

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

/// An upgrade under way: the generation whose workers run the new binary.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Upgrade {
    pub generation: u64,
    pub started: Instant,
}

/// What an upgraded worker finds in its environment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct WorkerEnv {
    pub slot: usize,
    pub pipe: RawFd,
    pub scoreboard: Option<(RawFd, usize)>,
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
    let mut text = format!("slot={},pipe={}", worker.slot, worker.pipe);
    if let Some((fd, rows)) = worker.scoreboard {
        text.push_str(&format!(",scoreboard={fd},rows={rows}"));
    }
    text
}

fn decode_worker(text: &str) -> Option<WorkerEnv> {
    let mut slot = None;
    let mut pipe = None;
    let mut scoreboard = None;
    let mut rows = None;
    for field in text.split(',') {
        let (key, value) = field.split_once('=')?;
        let value: usize = value.parse().ok()?;
        match key {
            "slot" => slot = Some(value),
            "pipe" => pipe = Some(RawFd::try_from(value).ok()?),
            "scoreboard" => scoreboard = Some(RawFd::try_from(value).ok()?),
            "rows" => rows = Some(value),
            _ => return None,
        }
    }
    Some(WorkerEnv {
        slot: slot?,
        pipe: pipe?,
        scoreboard: match (scoreboard, rows) {
            (Some(fd), Some(rows)) => Some((fd, rows)),
            (None, None) => None,
            _ => return None,
        },
    })
}

/// What a master hands to the image it executes: its count, its
/// generation, the scoreboard, and every live worker.
#[derive(Debug, PartialEq)]
pub(crate) struct MasterState {
    pub target: usize,
    pub generation: u64,
    /// The signal mask the program had before the master blocked its
    /// signals: what workers get back (the new image starts with them all
    /// blocked, and would otherwise take that for the program's own).
    pub signal_mask: u64,
    pub scoreboard: Option<(RawFd, usize)>,
    /// The control socket's listener, kept open so that no `respawn ctl`
    /// is refused while the master re-executes.
    pub control: Option<RawFd>,
    pub workers: Vec<AdoptedWorker>,
}

/// One live worker, as the next image must know it.
#[derive(Debug, PartialEq)]
pub(crate) struct AdoptedWorker {
    pub pid: i32,
    pub slot: usize,
    pub pipe: Option<RawFd>,
    pub generation: u64,
    pub state: State,
    pub was_ready: bool,
    pub age: Duration,
    /// Time left before it is SIGKILLed, if it is retiring.
    pub kill_in: Option<Duration>,
    pub killed: bool,
}

impl AdoptedWorker {
    pub(crate) fn of(worker: &Worker, pipe: Option<RawFd>, now: Instant) -> AdoptedWorker {
        AdoptedWorker {
            pid: worker.pid.as_raw(),
            slot: worker.slot,
            pipe,
            generation: worker.generation,
            state: worker.state,
            was_ready: worker.was_ready,
            age: now.saturating_duration_since(worker.spawned_at),
            kill_in: worker.kill_at.map(|at| at.saturating_duration_since(now)),
            killed: worker.killed,
        }
    }

    /// The table's record of it again, with `pipe` taken over.
    pub(crate) fn into_worker(self, token: mio::Token, pipe: Option<OwnedFd>, now: Instant) -> Worker {
        let mut worker = Worker::new(Pid::from_raw(self.pid), self.slot, token, pipe);
        worker.generation = self.generation;
        worker.state = self.state;
        worker.was_ready = self.was_ready;
        worker.spawned_at = now.checked_sub(self.age).unwrap_or(now);
        worker.kill_at = self.kill_in.map(|left| now + left);
        worker.killed = self.killed;
        worker
    }
}

impl MasterState {
    fn encode(&self) -> String {
        let scoreboard = match self.scoreboard {
            Some((fd, rows)) => format!("{fd}:{rows}"),
            None => "-".to_owned(),
        };
        let workers: Vec<String> = self.workers.iter().map(encode_adopted).collect();
        let control = self.control.map_or("-".to_owned(), |fd| fd.to_string());
        format!(
            "{STATE_VERSION} target={} generation={} mask={:x} scoreboard={scoreboard} control={control} workers={}",
            self.target,
            self.generation,
            self.signal_mask,
            workers.join(";")
        )
    }

    fn decode(text: &str) -> Option<MasterState> {
        let mut fields = text.split(' ');
        if fields.next()? != STATE_VERSION {
            return None;
        }
        let mut value = |key: &str| fields.next()?.strip_prefix(key)?.strip_prefix('=');
        let target = value("target")?.parse().ok()?;
        let generation = value("generation")?.parse().ok()?;
        let signal_mask = u64::from_str_radix(value("mask")?, 16).ok()?;
        let scoreboard = match value("scoreboard")? {
            "-" => None,
            pair => {
                let (fd, rows) = pair.split_once(':')?;
                Some((fd.parse().ok()?, rows.parse().ok()?))
            }
        };
        let control = match value("control")? {
            "-" => None,
            fd => Some(fd.parse().ok()?),
        };
        let workers = match value("workers")? {
            "" => Vec::new(),
            list => list.split(';').map(decode_adopted).collect::<Option<_>>()?,
        };
        Some(MasterState {
            target,
            generation,
            signal_mask,
            scoreboard,
            control,
            workers,
        })
    }
}

/// `pid/slot/pipe/generation/state/ready/age_ms/kill_ms/killed`, `-` for none.
fn encode_adopted(w: &AdoptedWorker) -> String {
    let state = match w.state {
        State::Starting => "starting",
        State::Ready => "ready",
        State::Retiring => "retiring",
    };
    let pipe = w.pipe.map_or("-".to_owned(), |fd| fd.to_string());
    let kill = w
        .kill_in
        .map_or("-".to_owned(), |left| left.as_millis().to_string());
    format!(
        "{}/{}/{pipe}/{}/{state}/{}/{}/{kill}/{}",
        w.pid,
        w.slot,
        w.generation,
        u8::from(w.was_ready),
        w.age.as_millis(),
        u8::from(w.killed)
    )
}

fn decode_adopted(text: &str) -> Option<AdoptedWorker> {
    let f: Vec<&str> = text.split('/').collect();
    let [pid, slot, pipe, generation, state, ready, age, kill, killed] = f.as_slice() else {
        return None;
    };
    let millis = |text: &str| text.parse().ok().map(Duration::from_millis);
    Some(AdoptedWorker {
        pid: pid.parse().ok().filter(|&pid: &i32| pid > 0)?,
        slot: slot.parse().ok()?,
        pipe: match *pipe {
            "-" => None,
            fd => Some(fd.parse().ok()?),
        },
        generation: generation.parse().ok()?,
        state: match *state {
            "starting" => State::Starting,
            "ready" => State::Ready,
            "retiring" => State::Retiring,
            _ => return None,
        },
        was_ready: *ready == "1",
        age: millis(age)?,
        kill_in: match *kill {
            "-" => None,
            left => Some(millis(left)?),
        },
        killed: *killed == "1",
    })
}

/// Executes `program` in place of this master, handing it `state` and the
/// listeners at the fd numbers they have. Returns only if the exec failed,
/// with every fd as it was.
/// `more` is added to the environment (systemd's variables, which the
/// master took out of its own).
pub(crate) fn reexec_master(
    program: &Program,
    state: &MasterState,
    listeners: &[RawFd],
    more: &[(&str, OsString)],
) -> io::Error {
    let kept: Vec<RawFd> = listeners
        .iter()
        .copied()
        .chain(state.workers.iter().filter_map(|w| w.pipe))
        .chain(state.scoreboard.map(|(fd, _)| fd))
        .chain(state.control)
        .collect();
    if let Err(err) = set_inherited(&kept, true) {
        let _ = set_inherited(&kept, false);
        return err;
    }
    let mut ours = vec![
        ("LISTEN_PID".to_owned(), std::process::id().to_string()),
        ("RESPAWN_LISTEN_FDS".to_owned(), join(listeners)),
        (MASTER_VAR.to_owned(), state.encode()),
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
/// it is one. The variable is removed (workers must not see it).
pub(crate) fn take_master_state() -> Result<Option<MasterState>, String> {
    let Some(text) = std::env::var_os(MASTER_VAR) else {
        return Ok(None);
    };
    std::env::remove_var(MASTER_VAR);
    let text = text.to_string_lossy();
    MasterState::decode(&text)
        .map(Some)
        .ok_or_else(|| format!("reading {MASTER_VAR}: not a state this version of respawn can adopt"))
}

/// The scoreboard handed down, or a new one if there was none or it cannot
/// be mapped (then adopted workers write to rows nobody reads, which only
/// costs their hung check until they are replaced).
pub(crate) fn adopt_scoreboard(handed: Option<(RawFd, usize)>) -> io::Result<Scoreboard> {
    if let Some((fd, rows)) = handed {
        if rows == SCOREBOARD_ROWS {
            // SAFETY: the previous image left this fd open for us alone
            // (the variable naming it is removed): nothing else owns it.
            let file = unsafe { OwnedFd::from_raw_fd(fd) };
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
        };
        assert_eq!(decode_worker(&encode_worker(&worker)), Some(worker));
        let bare = WorkerEnv {
            slot: 0,
            pipe: 4,
            scoreboard: None,
        };
        assert_eq!(decode_worker(&encode_worker(&bare)), Some(bare));
        for garbage in [
            "",
            "slot=1",
            "slot=x,pipe=4",
            "slot=1,pipe=4,rows=3",
            "slot=1,pipe=4,what=2",
        ] {
            assert_eq!(decode_worker(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn the_master_state_round_trips_and_refuses_garbage() {
        let state = MasterState {
            target: 4,
            generation: 7,
            signal_mask: 0x4002,
            scoreboard: Some((6, 8193)),
            control: Some(9),
            workers: vec![
                AdoptedWorker {
                    pid: 1234,
                    slot: 0,
                    pipe: Some(11),
                    generation: 7,
                    state: State::Ready,
                    was_ready: true,
                    age: Duration::from_millis(2500),
                    kill_in: None,
                    killed: false,
                },
                AdoptedWorker {
                    pid: 1200,
                    slot: 5,
                    pipe: None,
                    generation: 6,
                    state: State::Retiring,
                    was_ready: true,
                    age: Duration::from_millis(90_000),
                    kill_in: Some(Duration::from_millis(29_000)),
                    killed: false,
                },
            ],
        };
        assert_eq!(MasterState::decode(&state.encode()), Some(state));
        let none = MasterState {
            target: 0,
            generation: 0,
            signal_mask: 0,
            scoreboard: None,
            control: None,
            workers: Vec::new(),
        };
        assert_eq!(MasterState::decode(&none.encode()), Some(none));
        for garbage in [
            "",
            "v2 target=1 generation=0 mask=0 scoreboard=- control=- workers=",
            "v1 target=x generation=0 mask=0 scoreboard=- control=- workers=",
            "v1 target=1 generation=0 mask=0 scoreboard=- control=- workers=1/2/3",
            "v1 target=1 generation=0 mask=0 scoreboard=- control=x workers=",
        ] {
            assert_eq!(MasterState::decode(garbage), None, "{garbage:?}");
        }
    }
}
