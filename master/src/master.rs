//! The master: one thread, one loop, one `Master` value.
//!
//! ```text
//! signals ──► signalfd ─┐
//! worker pipes ─────────┤
//! stderr writable ──────┼──► poll(until the nearest deadline) ──► handle ──► act
//! deadlines: kill, ─────┘                                   (fork, signal, reap)
//!   start, backoff, hung check
//! ```
//!
//! Handlers record what happened in the worker table and send signals; they
//! never fork. The count invariant is restored by one function,
//! `manage_workers`, at the end of every turn of the loop, and also before a
//! retiring worker's exit is logged, so that the log shows its replacement
//! first: that is the one place outside the end of a turn where a fork can
//! happen. The order of events within a turn therefore does not matter: a
//! pipe's EOF before or after its worker's SIGCHLD, a Suicide read before or
//! after the exit, both end in the same table.
//!
//! Nothing the host does can stop the loop but a stop signal: a fork or a
//! pipe that fails is a line naming the limit and a retry on the slot's
//! backoff; a log pipe nobody reads fills a bounded buffer (logbuf.rs),
//! written only when stderr is writable; a stray signal is a line.

use crate::control::{self, ConnId, Control, Pending, Request};
use crate::error::describe;
use crate::hung::{self, Sample, Verdict};
use crate::listen::{self, Listeners};
use crate::notify::{self, Notifier};
use crate::pidfile::PidFile;
use crate::policy::{Backoff, Exceeded, RestartLimit};
use crate::signals::{self, Signals, Signo};
use crate::spawn::{self, ChildSetup, FdFloor, SpawnError};
use crate::status::{self, Counters};
use crate::table::{Event, Received, State, Table, Worker};
use crate::upgrade::{self, AdoptedWorker, MasterState, Program, Upgrade};
use crate::{limits, logbuf, reap};
use crate::{Config, Error};
use log::{debug, error, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use nix::sys::signal::{self as nix_signal, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use respawn_ipc::scoreboard::{self, RowWriter, Scoreboard};
use respawn_ipc::{DecodeError, Handoff, Message};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

const SIGNALS: Token = Token(0);
/// How long a master about to re-execute waits for stderr to take the lines
/// it holds: the new image starts with an empty queue.
const LAST_LINES_BEFORE_EXEC: Duration = Duration::from_secs(1);
/// How long a master about to exit or re-execute waits for control-socket
/// peers to take their answers.
const CONTROL_PATIENCE: Duration = Duration::from_millis(500);
/// Stderr became writable: what the log buffer holds can go out.
const LOG: Token = Token(1);

/// The most workers a master keeps. Each has a scoreboard row, and so has
/// every worker that can be alive beside them: at most as many retiring
/// ones again, and one more during a rolling restart.
pub(crate) const MAX_WORKERS: usize = 4096;

/// Scoreboard rows: one per slot that can be in use at once, so that every
/// worker is watched for hangs. The mapping is touched only where rows are
/// used (192 bytes each, 1.5 MiB of address space in all).
pub(crate) const SCOREBOARD_ROWS: usize = 2 * MAX_WORKERS + 1;

// Slots are the lowest free ones, so a slot is always below the number of
// live workers, which `manage_workers` keeps at most twice the target plus
// one: every worker has a row.
const _: () = assert!(SCOREBOARD_ROWS > 2 * MAX_WORKERS);

pub(crate) struct Master<W> {
    config: Config,
    /// What the workers accept on; their fds are what an upgrade hands over
    /// (`listeners.fds()`).
    listeners: Listeners,
    work: W,
    poll: Poll,
    signals: Signals,
    workers: Table,
    /// How many workers to keep: the configured number, then TTIN and TTOU.
    target: usize,
    /// Bumped by each HUP; a counting worker of an older generation is
    /// outdated, and replaced one at a time.
    generation: u64,
    backoff: Backoff,
    restarts: RestartLimit,
    scoreboard: Scoreboard,
    /// When to look for hung workers next; None without a timeout.
    next_hung_check: Option<Instant>,
    /// Set by TERM, QUIT or INT: no more forks, exit once the table is empty.
    stopping: bool,
    /// Set by HUP, cleared with the `rolling restart done` line.
    rolling: bool,
    /// Why the master gave up, if it did: `run` returns it once all stopped.
    gave_up: Option<String>,
    next_token: usize,
    /// The lowest fd number of the worker pipes (see spawn.rs).
    floor: FdFloor,
    /// Forks or pipes that failed in a row: the first is logged, the others
    /// wait for the line that says forking works again.
    failed_forks: usize,
    /// A replacement waits for a retiring worker to leave (logged once).
    waiting_for_room: bool,
    /// Lines about signals that mean nothing, at most one a second each.
    stray_signals: signals::RateLimit,
    /// The program this master runs, for an upgrade to execute it anew.
    program: Program,
    /// Set by USR2 until every worker runs the new binary, or it is backed out.
    upgrade: Option<Upgrade>,
    /// Claimed at start; written when READY=1 would be sent.
    pid_file: Option<PidFile>,
    /// systemd's notification socket (notify.rs).
    notify: Notifier,
    /// READY=1 was sent (and the pid file written) once the first workers
    /// were all Ready.
    ready_announced: bool,
    /// The control socket (control.rs), if `--control` asked for one.
    control: Option<Control>,
    /// Exits by cause and requests served, for `metrics`.
    counters: Counters,
    started: Instant,
}

impl<W: FnMut(Handoff) -> i32> Master<W> {
    pub(crate) fn new(listeners: Listeners, config: Config, work: W) -> Result<Self, Error> {
        refuse_threads()?;
        if config.workers > MAX_WORKERS {
            return Err(Error::io(
                format!("starting {} workers", config.workers),
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("at most {MAX_WORKERS} are supported"),
                ),
            ));
        }
        listen::prepare(&listeners)?;
        let pid_file = config.pid_file.as_deref().map(PidFile::claim).transpose()?;
        let floor =
            FdFloor::above_open_fds().map_err(|err| Error::io("listing open fds in /proc/self/fd", err))?;
        let program = Program::of_this_process();
        let adopted = upgrade::take_master_state().map_err(|why| {
            Error::io(
                "adopting the workers of the previous master",
                io::Error::other(why),
            )
        })?;
        let mut signals =
            Signals::block().map_err(|err| Error::io("blocking signals for the signalfd", err))?;
        if let Some(state) = &adopted {
            signals.set_saved_mask(state.signal_mask);
        }
        let poll = Poll::new().map_err(|err| Error::io("creating the epoll instance", err))?;
        let scoreboard = upgrade::adopt_scoreboard(adopted.as_ref().and_then(|state| state.scoreboard))
            .map_err(|err| Error::io("creating the scoreboard", err))?;
        poll.registry()
            .register(&mut SourceFd(&signals.as_raw_fd()), SIGNALS, Interest::READABLE)
            .map_err(|err| Error::io("watching the signalfd", err))?;
        if let Some(fd) = logbuf::watch_fd() {
            // A file or a terminal that epoll refuses never makes a write wait.
            if let Err(err) = poll
                .registry()
                .register(&mut SourceFd(&fd), LOG, Interest::WRITABLE)
            {
                debug!("not watching stderr for writability: {err}");
            }
        }
        let mut master = Master {
            backoff: Backoff::new(config.backoff_initial, config.backoff_cap),
            restarts: RestartLimit::new(config.max_restarts, config.restart_window),
            scoreboard,
            next_hung_check: config.timeout.map(|timeout| Instant::now() + timeout / 2),
            target: config.workers,
            generation: 0,
            config,
            listeners,
            work,
            poll,
            signals,
            workers: Table::default(),
            stopping: false,
            rolling: false,
            gave_up: None,
            next_token: LOG.0 + 1,
            floor,
            failed_forks: 0,
            waiting_for_room: false,
            stray_signals: signals::RateLimit::default(),
            program,
            upgrade: None,
            pid_file,
            notify: Notifier::from_env(),
            ready_announced: false,
            control: None,
            counters: Counters::default(),
            started: Instant::now(),
        };
        let handed_control = adopted.as_ref().and_then(|state| state.control);
        if let Some(path) = master.config.control.clone() {
            master.control = Some(match handed_control {
                Some(fd) => Control::adopt(fd, &[], &path, master.poll.registry())?,
                None => Control::open(&path, master.poll.registry())?,
            });
        }
        if let Some(state) = adopted {
            master.adopt(state);
        }
        Ok(master)
    }

    /// After an upgrade's re-execution: the workers the previous image
    /// handed down become this one's, with their pipes, states and
    /// deadlines. A pid that is not our child any more (it exited and was
    /// reaped by nobody yet is still our child; this is one that is gone)
    /// is left out.
    fn adopt(&mut self, state: MasterState) {
        self.target = state.target;
        self.generation = state.generation;
        let now = Instant::now();
        let count = state.workers.len();
        for adopted in state.workers {
            let pipe = adopted.pipe.map(|fd| {
                // SAFETY: the previous image left this fd open for us alone
                // (the state naming it is removed from the environment).
                let pipe = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
                let _ = nix::fcntl::fcntl(
                    &pipe,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                pipe
            });
            let token = Token(self.next_token);
            self.next_token += 1;
            let mut worker = adopted.into_worker(token, pipe, now);
            if let Some(pipe) = &worker.pipe {
                if let Err(err) =
                    self.poll
                        .registry()
                        .register(&mut SourceFd(&pipe.as_raw_fd()), token, Interest::READABLE)
                {
                    error!(
                        "watching the pipe of worker {}: {}; killing it",
                        worker.pid,
                        describe(&err)
                    );
                    kill(&mut worker);
                }
            }
            self.workers.insert(worker);
        }
        info!(
            "master re-executed as {} (pid {} kept), {count} workers adopted",
            self.program.path.display(),
            std::process::id()
        );
    }

    /// The loop. Returns once stopped and every worker is reaped.
    pub(crate) fn run(&mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(64);
        // After an upgrade's re-execution: a worker that exited during the
        // exec raised a SIGCHLD that setting its disposition to default
        // discarded (POSIX: a pending signal whose default is to ignore).
        self.reap_children();
        self.manage_workers();
        self.announce_when_ready();
        while !(self.stopping && self.workers.is_empty()) {
            self.write_log();
            self.wait_for_events(&mut events)?;
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.handle_signals()?,
                    LOG => {} // written at the top of every turn
                    token if control::owns(token) => self.serve_control(token),
                    token => self.read_worker_messages(token),
                }
            }
            self.enforce_deadlines();
            self.manage_workers();
            self.announce_when_ready();
            self.answer_control();
        }
        self.pid_file.iter().for_each(PidFile::remove);
        info!("all workers stopped, master exiting");
        self.answer_control_at_exit();
        match self.gave_up.take() {
            Some(reason) => Err(Error::GaveUp { reason }),
            None => Ok(()),
        }
    }

    /// The control requests still waiting when the master exits: a `stop`
    /// is done now; anything else was overtaken by the stop (or a give-up).
    fn answer_control_at_exit(&mut self) {
        let Some(mut control) = self.control.take() else {
            return;
        };
        let gave_up = self.gave_up.clone();
        control.finish(
            |pending| match (pending, &gave_up) {
                (Pending::Stop, None) => Ok("{\"stopped\":true}\n".to_owned()),
                (_, Some(reason)) => Err(format!("the master gave up: {reason}")),
                (_, None) => Err("the master stopped".to_owned()),
            },
            CONTROL_PATIENCE,
        );
    }

    /// Writes what the log buffer holds, as far as stderr takes it now. The
    /// rest waits for the LOG event: stderr is watched edge-triggered, so
    /// the rule is "always try, and wait only after it would block".
    fn write_log(&mut self) {
        logbuf::flush_pending();
    }

    /// Sleeps until an event or the nearest deadline; with no deadline, until
    /// an event: an idle master does not wake at all.
    fn wait_for_events(&mut self, events: &mut Events) -> Result<(), Error> {
        let now = Instant::now();
        let timeout = [
            self.workers.next_deadline(self.config.start_timeout),
            self.backoff.next_deadline(now),
            self.next_hung_check,
            self.notify.next_watchdog(),
            self.control.as_ref().and_then(Control::next_deadline),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now));
        match self.poll.poll(events, timeout) {
            // Every signal we handle is blocked, but one we do not handle
            // (SIGSTOP/SIGCONT from a debugger) can still interrupt.
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {
                events.clear();
                Ok(())
            }
            result => result.map_err(|err| Error::io("waiting for events", err)),
        }
    }

    fn handle_signals(&mut self) -> Result<(), Error> {
        while let Some(signal) = self
            .signals
            .next()
            .map_err(|err| Error::io("reading the signalfd", err))?
        {
            match signal {
                libc::SIGCHLD => self.reap_children(),
                libc::SIGTERM | libc::SIGQUIT => self.stop_gracefully(Some(signal)),
                libc::SIGINT => self.stop_now(),
                libc::SIGHUP => {
                    let _ = self.restart_every_worker("received SIGHUP");
                }
                libc::SIGTTIN => self.change_target(1),
                libc::SIGTTOU => self.change_target(-1),
                libc::SIGUSR2 => {
                    let _ = self.upgrade_to_new_binary("received SIGUSR2");
                }
                other => self.ignore_signal(other),
            }
        }
        Ok(())
    }

    /// Any other signal: a line saying what it means to respawn (at most one
    /// a second per signal), and nothing else.
    fn ignore_signal(&mut self, signal: Signo) {
        let Some(unsaid) = self.stray_signals.allow(signal, Instant::now()) else {
            return;
        };
        let name = signals::name(signal);
        if signal == libc::SIGPIPE {
            // The master's own write to a closed stderr or socket raises it:
            // the write fails with EPIPE, which is all there is to know.
            debug!("received {name}: a pipe or socket has no reader; ignored");
            return;
        }
        let meaning = match signal {
            libc::SIGUSR1 => ": respawn logs to stderr and has no log file to reopen",
            _ => ", which means nothing to respawn",
        };
        let more = match unsaid {
            0 => String::new(),
            n => format!(" ({n} more since the last line)"),
        };
        info!("received {name}{meaning}; ignored{more}");
    }

    /// 'exit': collect every dead child; one SIGCHLD may stand for many.
    fn reap_children(&mut self) {
        while let Some((pid, status)) = reap::next_exited() {
            self.forget_worker(pid, &status);
        }
    }

    fn forget_worker(&mut self, pid: Pid, status: &WaitStatus) {
        let Some(mut worker) = self.workers.remove(pid) else {
            debug!("reaped process {pid}, not a worker ({})", reap::describe(status));
            return;
        };
        // Its last words: a Suicide written just before it exited may still
        // be in the pipe, and tells why it went. It is reaped: whatever the
        // pipe holds, nothing may signal its pid now (it may be reused).
        if let Some(err) = read_messages(
            self.poll.registry(),
            &self.scoreboard,
            &mut worker,
            self.config.graceful_timeout,
        ) {
            debug!("worker {pid} left malformed ipc behind ({err})");
        }
        close_pipe(self.poll.registry(), &mut worker);
        let how = match &worker.last_words {
            Some(why) => format!("{}: {why}", reap::describe(status)),
            None => reap::describe(status),
        };
        let lived = worker.spawned_at.elapsed();
        if worker.was_ready && lived >= self.config.min_uptime {
            // However it left, it proved its slot can hold a worker.
            self.backoff.lived(worker.slot);
        }
        self.count_exit(&worker, lived);
        if !worker.state.counts() || self.stopping {
            // A retiring worker's replacement comes before its exit, even
            // when its Suicide and its SIGCHLD are read in the same turn.
            self.manage_workers();
            info!("worker {pid} exited ({how})");
        } else if self.new_binary_failed(&worker) {
            self.back_out_of_upgrade(&worker, &how);
        } else {
            self.plan_replacement(&worker, &how);
        }
    }

    /// For `metrics`: why it left, and what it served (read from its row
    /// before a new worker takes the slot).
    fn count_exit(&mut self, worker: &Worker, lived: Duration) {
        let requests = self.scoreboard.read(worker.slot).map_or(0, |row| row.requests);
        let c = &mut self.counters;
        c.requests_of_the_gone += requests;
        let panicked = worker
            .last_words
            .as_deref()
            .is_some_and(|why| why.starts_with("panicked"));
        let counter = if worker.hung {
            &mut c.hung
        } else if panicked {
            &mut c.panicked
        } else if !worker.state.counts() {
            &mut c.retired
        } else if !worker.was_ready || lived < self.config.min_uptime {
            &mut c.failed_start
        } else {
            &mut c.died
        };
        *counter += 1;
    }

    /// A worker died without warning, or failed to start. A mature worker
    /// (Ready, and older than the minimum uptime) is replaced at once and
    /// counts for nothing: whatever killed it (the OOM killer, a segfault in
    /// one request), the slot has shown it can serve, and giving up would
    /// turn a partial failure into a total outage. Each slot is refilled at
    /// most once per minimum uptime that way, which bounds the fork rate.
    /// A young death is a failed start: the slot backs off, and the restart
    /// limit counts it.
    fn plan_replacement(&mut self, worker: &Worker, how: &str) {
        let now = Instant::now();
        let (pid, slot) = (worker.pid, worker.slot);
        let lived = now.saturating_duration_since(worker.spawned_at);
        if worker.was_ready && lived >= self.config.min_uptime {
            warn!("worker {pid} exited ({how}), replacing");
            return;
        }
        if let Err(Exceeded { count, span }) = self.restarts.record(now) {
            let reason = format!(
                "{count} restarts in {:.1} s, more than the {} allowed in {} s; \
                 the last: worker {pid} exited ({how}) {:.2} s after it was forked",
                span.as_secs_f64(),
                self.config.max_restarts,
                self.config.restart_window.as_secs_f64(),
                lived.as_secs_f64(),
            );
            error!("giving up: {reason}");
            self.gave_up = Some(reason);
            self.stop_gracefully(None);
            return;
        }
        let delay = self.backoff.died_young(slot, now);
        warn!(
            "worker {pid} exited ({how}) {:.2} s after it was forked; slot {slot} respawns in {:.1} s",
            lived.as_secs_f64(),
            delay.as_secs_f64()
        );
    }

    /// 'message': everything a worker's pipe holds now. A worker that speaks
    /// garbage is stopped; its exit is judged like any death (plan_replacement).
    fn read_worker_messages(&mut self, token: Token) {
        let graceful = self.config.graceful_timeout;
        // A stale token: the worker was reaped earlier in this turn.
        let Some(worker) = self.workers.by_token(token) else {
            return;
        };
        if let Some(err) = read_messages(self.poll.registry(), &self.scoreboard, worker, graceful) {
            match worker.state {
                State::Retiring => debug!("worker {} sent malformed ipc ({err}) while retiring", worker.pid),
                _ => warn!("worker {} sent malformed ipc ({err}); replacing it", worker.pid),
            }
            worker.state = worker.state.next(Event::Malformed);
            terminate(worker, graceful);
        }
    }

    /// TERM, QUIT (or giving up, with no signal): every worker finishes what
    /// it holds and exits; any still alive after the graceful timeout is
    /// killed.
    fn stop_gracefully(&mut self, signal: Option<Signo>) {
        if self.stopping {
            if let Some(signal) = signal {
                info!(
                    "received {} while stopping; already stopping",
                    signals::name(signal)
                );
            }
            return;
        }
        let timeout = self.config.graceful_timeout.as_secs_f64();
        match signal {
            Some(signal) => info!(
                "received {}, stopping gracefully (graceful timeout {timeout} s)",
                signals::name(signal)
            ),
            None => info!("stopping gracefully (graceful timeout {timeout} s)"),
        }
        self.stopping = true;
        self.notify.stopping();
        for worker in self.workers.iter_mut() {
            ask_to_stop(worker, self.config.graceful_timeout);
        }
    }

    /// INT (Ctrl-C): every worker is killed now; a graceful stop under way
    /// becomes immediate.
    fn stop_now(&mut self) {
        info!("received SIGINT, stopping now");
        self.stopping = true;
        self.notify.stopping();
        for worker in self.workers.iter_mut() {
            worker.state = worker.state.next(Event::Stop);
            kill(worker);
        }
    }

    /// Kills every stopping worker whose graceful timeout has passed, every
    /// worker that did not say Ready within the start timeout (its exit is
    /// then a failed start), and every worker hung on one connection.
    fn enforce_deadlines(&mut self) {
        let now = Instant::now();
        if let Some(control) = self.control.as_mut() {
            control.expire(now, self.poll.registry());
        }
        let (graceful, start_timeout) = (self.config.graceful_timeout, self.config.start_timeout);
        for worker in self.workers.iter_mut().filter(|w| !w.killed) {
            if worker.kill_at.is_some_and(|at| at <= now) {
                warn!(
                    "worker {} did not stop within {} s; killing it",
                    worker.pid,
                    graceful.as_secs_f64()
                );
                kill(worker);
            } else if worker.start_deadline(start_timeout).is_some_and(|at| at <= now) {
                warn!(
                    "worker {} did not say ready within {} s; killing it",
                    worker.pid,
                    start_timeout.unwrap_or_default().as_secs_f64()
                );
                kill(worker);
            }
        }
        if self.next_hung_check.is_some_and(|at| at <= now) {
            self.kill_hung_workers(now);
        }
        self.notify.watchdog(now);
    }

    /// Reads the scoreboard: kills a worker busy with one connection for
    /// longer than the timeout (its replacement is forked at once: a hung
    /// request is a request's fault, not a failed worker), samples the CPU
    /// time of one busy for half of it, and sets the next look (hung.rs).
    fn kill_hung_workers(&mut self, now: Instant) {
        let Some(timeout) = self.config.timeout else {
            return;
        };
        let now_ns = scoreboard::now_ns();
        let mut next = now + timeout / 2;
        for worker in self.workers.iter_mut().filter(|w| !w.killed) {
            let Some(row) = self.scoreboard.read(worker.slot) else {
                continue;
            };
            match hung::judge(&row, worker.cpu_sample, timeout, now, now_ns) {
                Verdict::Idle => {}
                Verdict::LookAgainAt(at) => next = next.min(at),
                Verdict::SampleAndLookAgainAt(at) => {
                    worker.cpu_sample = hung::cpu(worker.pid).map(|(_, cpu_ticks)| Sample {
                        busy_since: row.busy_since.unwrap_or_default(),
                        at: now,
                        cpu_ticks,
                    });
                    next = next.min(at);
                }
                Verdict::Hung(busy) => {
                    warn!(
                        "{}; killing it",
                        hung::describe(worker.pid, &row, busy, worker.cpu_sample, now)
                    );
                    worker.state = worker.state.next(Event::Stop);
                    worker.hung = true;
                    kill(worker);
                }
            }
        }
        self.next_hung_check = Some(next);
    }

    /// HUP: a rolling restart. Every worker of the current generation
    /// becomes outdated; `manage_workers` replaces them one at a time.
    /// `by` says who asked, to begin its lines: `received SIGHUP`, or
    /// `control socket: reload`. Err: why nothing was done.
    fn restart_every_worker(&mut self, by: &str) -> Result<(), String> {
        if self.stopping {
            info!("{by} while stopping; ignored");
            return Err("the master is stopping".to_owned());
        }
        if self.upgrade.is_some() {
            info!("{by} during an upgrade, which replaces every worker already; ignored");
            return Err("an upgrade is under way, which replaces every worker already".to_owned());
        }
        if self.workers.counted() == 0 {
            info!("{by} with no worker running; nothing to replace");
            // A reload that systemd waits for (notify-reload) ends at once.
            self.notify.reloading();
            self.notify.ready();
            return Ok(());
        } else if self.rolling {
            info!("{by} during a rolling restart; every worker started before now will be replaced");
        } else {
            info!("{by}, replacing every worker, one at a time");
        }
        self.generation += 1;
        self.rolling = true;
        self.notify.reloading();
        Ok(())
    }

    /// TTIN (+1) and TTOU (-1): one worker more or one fewer, never below 0.
    fn change_target(&mut self, change: isize) {
        let name = if change > 0 { "SIGTTIN" } else { "SIGTTOU" };
        if self.stopping {
            info!("received {name} while stopping; ignored");
            return;
        }
        let most = self.most_workers();
        match self.target.checked_add_signed(change) {
            Some(target) if target > most.0 => info!(
                "received {name}, but {target} workers would be more than {}; still {} wanted",
                most.1, self.target
            ),
            Some(target) => {
                self.target = target;
                let plural = if target == 1 { "" } else { "s" };
                info!("received {name}, {target} worker{plural} wanted");
            }
            None => info!("received {name} with no worker wanted; there is none to remove"),
        }
    }

    /// The most workers TTIN may ask for, and why that many: the scoreboard's
    /// rows, or the master's open-file limit (a pipe per live worker).
    fn most_workers(&self) -> (usize, String) {
        let pipes = self.workers.iter().filter(|w| w.pipe.is_some()).count();
        let fixed = limits::open_fds().saturating_sub(pipes);
        the_most_workers(limits::workers_for_open_files(fixed))
    }

    /// The count invariant, in one place: fork while fewer workers count
    /// than wanted (except into a slot that waits out its backoff), and
    /// retire while more count, until neither changes anything. During a
    /// rolling restart one more is wanted, and the surplus is retired only
    /// once nothing is starting, so an outdated worker leaves only when its
    /// replacement is Ready, and the next replacement is forked at once,
    /// without waiting for the old worker to finish.
    ///
    /// At most twice the target plus one workers live at once: the counted
    /// ones, one more during a rolling restart, and as many retiring ones
    /// as the target. Past that, a replacement waits for a retiring worker
    /// to leave (within the graceful timeout), so that clients who hold
    /// retiring workers (slow requests, --max-requests 1) cannot make the
    /// master fork without bound.
    fn manage_workers(&mut self) {
        if self.stopping {
            return;
        }
        loop {
            self.spawn_missing_workers();
            // A retired worker makes room for the next new one of a rollout.
            if !self.retire_surplus_workers() {
                break;
            }
        }
        if self.rolling && self.workers.outdated(self.generation) == 0 && !self.workers.any_starting() {
            self.rolling = false;
            match self.upgrade.take() {
                Some(upgrade) => self.reexec_as_new_binary(upgrade),
                None => {
                    info!("rolling restart done: every worker is new");
                    self.notify.ready();
                }
            }
        }
    }

    /// Tells systemd the service is up once the first workers asked for
    /// are all Ready (READY=1, once), and the count and generation whenever
    /// they change (STATUS=; while stopping, the workers left). Called at
    /// the end of every turn.
    fn announce_when_ready(&mut self) {
        let ready = self.workers.iter().filter(|w| w.state == State::Ready).count();
        let status = if self.stopping {
            notify::stopping_line(self.workers.iter().count())
        } else {
            notify::status_line(ready, self.generation)
        };
        if !self.ready_announced && !self.stopping && ready >= self.target {
            self.ready_announced = true;
            self.notify.ready_with_status(status);
            self.pid_file.iter().for_each(PidFile::write);
        } else {
            self.notify.status(status);
        }
        crate::title::show_master(
            self.workers.counted(),
            self.generation,
            self.listeners.listeners(),
        );
    }

    /// Forks into the slots to fill now, as far as the room allows.
    fn spawn_missing_workers(&mut self) {
        let rolling = self.workers.outdated(self.generation) > 0;
        let wanted = self.target + usize::from(rolling && self.target > 0);
        let room = (2 * self.target + 1).saturating_sub(self.workers.iter().count());
        let waiting: Vec<usize> = self.backoff.waiting(Instant::now()).collect();
        let slots = self.workers.slots_to_fill(wanted, &waiting, room);
        let short_of_room = self.workers.slots_to_fill(wanted, &waiting, usize::MAX).len() > slots.len();
        for slot in slots {
            self.spawn_worker(slot);
        }
        self.note_waiting_for_room(short_of_room);
    }

    /// Retires counted workers beyond the target; true if it retired any.
    fn retire_surplus_workers(&mut self) -> bool {
        let mut retired = false;
        while self.workers.counted() > self.target && !self.workers.any_starting() {
            self.retire_one();
            retired = true;
        }
        retired
    }

    fn note_waiting_for_room(&mut self, waiting: bool) {
        if waiting && !self.waiting_for_room {
            warn!(
                "{} workers alive, {} of them retiring: the most allowed (twice the {} wanted, plus one); \
                 the next replacement waits for a retiring one to leave",
                self.workers.iter().count(),
                self.workers.retiring(),
                self.target
            );
        }
        self.waiting_for_room = waiting;
    }

    /// Retires the oldest outdated worker if a rolling restart is under
    /// way, else the newest (TTOU: the one with the least warm state).
    fn retire_one(&mut self) {
        let graceful = self.config.graceful_timeout;
        let generation = self.generation;
        if let Some(worker) = self.workers.oldest_outdated(generation) {
            info!(
                "rolling restart: stopping worker {}, its replacement is ready",
                worker.pid
            );
            ask_to_stop(worker, graceful);
        } else if let Some(worker) = self.workers.newest_counted() {
            info!("stopping worker {}: more workers than wanted", worker.pid);
            ask_to_stop(worker, graceful);
        }
    }

    /// Forks a worker into `slot`. If the host refuses, that is logged, and
    /// the slot is retried on its backoff.
    fn spawn_worker(&mut self, slot: usize) {
        let master_fds = self.master_fds();
        self.scoreboard.reset(slot);
        let setup = ChildSetup {
            slot,
            listeners: &self.listeners,
            master_fds: &master_fds,
            floor: self.floor,
            signals: &self.signals,
            row: self.scoreboard.writer(slot),
            run_as: self.config.run_as.as_ref(),
            exec: self.upgrade.map(|_| {
                let file = self
                    .scoreboard
                    .file()
                    .map(|fd| (fd.as_raw_fd(), self.scoreboard.rows()));
                (&self.program, file)
            }),
        };
        let spawned = match spawn::spawn_worker(&setup, &mut self.work) {
            Ok(spawned) => spawned,
            Err(failure) => {
                self.fork_failed(slot, failure);
                return;
            }
        };
        self.fork_works_again();
        let token = Token(self.next_token);
        self.next_token += 1;
        let fd = spawned.pipe.as_raw_fd();
        let mut worker = Worker::new(spawned.pid, slot, token, Some(spawned.pipe));
        worker.generation = self.generation;
        info!("worker {} spawned", spawned.pid);
        if let Err(err) = self
            .poll
            .registry()
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            // Without its pipe it could never say Ready: a failed start.
            error!(
                "watching the pipe of worker {}: {}; killing it",
                spawned.pid,
                describe(&err)
            );
            kill(&mut worker);
        }
        self.workers.insert(worker);
    }

    /// A fork or a pipe failed: the host is out of something. The workers
    /// that run go on serving; the slot is retried on its backoff. One line
    /// per burst, naming the limit.
    fn fork_failed(&mut self, slot: usize, SpawnError { doing, err }: SpawnError) {
        let delay = self.backoff.died_young(slot, Instant::now());
        self.failed_forks += 1;
        if self.failed_forks > 1 {
            debug!(
                "starting a worker in slot {slot}: {doing} failed again: {}",
                describe(&err)
            );
            return;
        }
        let limit = limits::explain(&err).map_or(String::new(), |why| format!(" ({why})"));
        warn!(
            "starting a worker in slot {slot}: {doing} failed: {}{limit}; \
             {} of {} workers running, retrying in {:.1} s",
            describe(&err),
            self.workers.counted(),
            self.target,
            delay.as_secs_f64()
        );
    }

    fn fork_works_again(&mut self) {
        if self.failed_forks > 0 {
            info!("forking works again, after {} failed attempts", self.failed_forks);
            self.failed_forks = 0;
        }
    }

    /// The master's fds that the worker must not inherit and that may lie
    /// below the floor: the epoll, the signalfd, the log's fd, and a pipe
    /// that could not be lifted (a floor at the open-file limit). The other
    /// pipes are at or above the floor, closed in one call.
    fn master_fds(&self) -> Vec<RawFd> {
        let floor = self.floor.0;
        let low_pipes = self
            .workers
            .iter()
            .filter_map(|w| w.pipe.as_ref().map(|p| p.as_raw_fd()))
            .filter(|&fd| fd < floor);
        let scoreboard = self.scoreboard.file().map(|fd| fd.as_raw_fd());
        let control = self.control.as_ref().map_or(Vec::new(), Control::fds);
        [self.poll.as_raw_fd(), self.signals.as_raw_fd()]
            .into_iter()
            .chain(scoreboard)
            .chain(control)
            .chain(logbuf::master_fd())
            .chain(self.notify.fd())
            .chain(low_pipes)
            .collect()
    }

    /// An event of the control socket: connections, requests, room to write.
    fn serve_control(&mut self, token: Token) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        for (conn, request) in control.on_event(token, self.poll.registry()) {
            self.act_on_control(conn, request);
        }
    }

    /// What a control request does: answered now, or kept waiting until
    /// `answer_control` sees it done. Each request is its own: two scales in
    /// a row are two changes, where two quick TTOUs may be read as one.
    fn act_on_control(&mut self, conn: ConnId, request: Request) {
        let answer_now: Option<Result<String, String>> = match request {
            Request::Status => Some(Ok(status::json(&self.status_input()))),
            Request::Metrics => Some(Ok(status::metrics(&self.status_input()))),
            Request::Scale(n) => self.scale_to(n).err().map(Err),
            Request::Reload => self.restart_every_worker("control socket: reload").err().map(Err),
            Request::Upgrade => self
                .upgrade_to_new_binary("control socket: upgrade")
                .err()
                .map(Err),
            Request::Stop { now: true } => {
                info!("control socket: stop now");
                self.stop_now();
                None
            }
            Request::Stop { now: false } => {
                info!("control socket: stop");
                self.stop_gracefully(None);
                None
            }
        };
        let Some(control) = self.control.as_mut() else {
            return;
        };
        match (answer_now, pending_of(request)) {
            (Some(answer), _) => control.reply(conn, answer, self.poll.registry()),
            (None, Some(pending)) => control.wait(conn, pending),
            (None, None) => {}
        }
        // Done already (a scale to the count there is): answered now.
        self.answer_control();
    }

    /// `scale N`: N workers wanted, within what the master can hold.
    fn scale_to(&mut self, n: usize) -> Result<(), String> {
        if self.stopping {
            return Err("the master is stopping".to_owned());
        }
        let (most, why) = self.most_workers();
        if n > most {
            info!("control socket: scale {n} refused: more than {why}");
            return Err(format!("{n} workers would be more than {why}"));
        }
        self.target = n;
        let plural = if n == 1 { "" } else { "s" };
        info!("control socket: scale, {n} worker{plural} wanted");
        Ok(())
    }

    /// Answers the control requests that are now done: a scale whose count
    /// is all Ready, a reload whose rollout is over. Called at the end of
    /// every turn, where changes are seen, never by waiting.
    fn answer_control(&mut self) {
        let Some(control) = self.control.as_ref() else {
            return;
        };
        let waiting = control.waiting();
        if waiting.is_empty() {
            return;
        }
        let overdue = control.overdue(Instant::now());
        let ready = self.workers.iter().filter(|w| w.state == State::Ready).count();
        let settled = ready == self.target && self.workers.counted() == self.target;
        let answers: Vec<(ConnId, Result<String, String>)> = waiting
            .into_iter()
            .filter_map(|(conn, pending)| {
                let answer = match pending {
                    Pending::Scale(n) if self.stopping => {
                        Err(format!("the master is stopping; {n} were wanted"))
                    }
                    Pending::Scale(n) if self.target != n => {
                        Err(format!("superseded: {} workers are wanted now", self.target))
                    }
                    Pending::Scale(n) if settled => Ok(format!("{{\"target\":{n},\"ready\":{ready}}}\n")),
                    Pending::Reload if self.stopping => Err("the master is stopping".to_owned()),
                    Pending::Reload if !self.rolling && settled => Ok(format!(
                        "{{\"generation\":{},\"ready\":{ready}}}\n",
                        self.generation
                    )),
                    Pending::Upgrade if self.stopping => Err("the master is stopping".to_owned()),
                    // Past control::WAIT_BOUND: said, with what was reached.
                    Pending::Stop if overdue.contains(&(conn, pending)) => Err(control::not_done(Some(
                        &format!("{} workers still running", self.workers.iter().count()),
                    ))),
                    _ if overdue.contains(&(conn, pending)) => Err(control::not_done(Some(&format!(
                        "{ready} of {} workers ready",
                        self.target
                    )))),
                    _ => return None,
                };
                Some((conn, answer))
            })
            .collect();
        if let Some(control) = self.control.as_mut() {
            for (conn, answer) in answers {
                control.reply(conn, answer, self.poll.registry());
            }
        }
    }

    /// The master's state, borrowed for a status snapshot.
    fn status_input(&self) -> status::Input<'_> {
        let now = Instant::now();
        status::Input {
            started: self.started,
            target: self.target,
            generation: self.generation,
            stopping: self.stopping,
            upgrading: self.upgrade.is_some(),
            restarts_in_window: self.restarts.in_window(now),
            restart_limit: self.config.max_restarts,
            restart_window: self.config.restart_window,
            backoff_slots: self.backoff.waiting(now).collect(),
            listeners: &self.listeners,
            workers: &self.workers,
            scoreboard: &self.scoreboard,
            counters: &self.counters,
        }
    }

    /// USR2: start the binary now on disk as new workers, one at a time as
    /// in a rolling restart; the master follows once all run it (see
    /// upgrade.rs for the steps and the way back).
    /// `by` as for `restart_every_worker`: `received SIGUSR2`, or
    /// `control socket: upgrade`. Err: why it did not begin.
    fn upgrade_to_new_binary(&mut self, by: &str) -> Result<(), String> {
        let path = self.program.path.display().to_string();
        if self.stopping {
            info!("{by} while stopping; ignored");
            return Err("the master is stopping".to_owned());
        }
        if self.upgrade.is_some() {
            info!("{by} during an upgrade to {path}; ignored (send it again once this one is done)");
            return Err(format!("an upgrade to {path} is under way"));
        }
        if let Err(err) = self.program.check() {
            let why = format!("{path} cannot be executed ({})", describe(&err));
            warn!("{by}, but {why}; the running version serves on");
            return Err(why);
        }
        info!("{by}, upgrading to {path}: each old worker stops once a new one is ready");
        self.notify.reloading();
        self.generation += 1;
        self.rolling = true;
        self.upgrade = Some(Upgrade {
            generation: self.generation,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Did a worker of the new binary die before it proved itself: before
    /// it said Ready, or younger than the minimum uptime?
    fn new_binary_failed(&self, worker: &Worker) -> bool {
        self.upgrade.is_some_and(|upgrade| {
            worker.generation == upgrade.generation
                && (!worker.was_ready || worker.spawned_at.elapsed() < self.config.min_uptime)
        })
    }

    /// The new binary is broken: its workers are replaced by forks of the
    /// running version (which never stopped serving: each old worker is
    /// asked to stop only once a new one is Ready). Nothing counts toward
    /// giving up: a bad deploy must not take the service down.
    fn back_out_of_upgrade(&mut self, failed: &Worker, how: &str) {
        let Some(upgrade) = self.upgrade.take() else {
            return;
        };
        warn!(
            "upgrade to {} backed out: its worker {} exited ({how}) {:.2} s after it was forked; \
             the running version serves on, and SIGUSR2 may be sent again",
            self.program.path.display(),
            failed.pid,
            failed.spawned_at.elapsed().as_secs_f64()
        );
        if let Some(control) = self.control.as_mut() {
            let why = format!(
                "backed out: worker {} of the new binary exited ({how}) before it proved itself",
                failed.pid
            );
            for (conn, pending) in control.waiting() {
                if pending == Pending::Upgrade {
                    control.reply(conn, Err(why.clone()), self.poll.registry());
                }
            }
        }
        // The old workers become current again; those of the new binary are
        // outdated, and replaced one at a time like a rolling restart's.
        let current = self.generation + 1;
        let graceful = self.config.graceful_timeout;
        for worker in self.workers.iter_mut() {
            if worker.generation != upgrade.generation {
                worker.generation = current;
            } else if worker.state == State::Starting {
                // Holding no connection, it has nothing to finish.
                worker.state = worker.state.next(Event::Stop);
                terminate(worker, graceful);
                kill(worker);
            }
        }
        self.generation = current;
        self.rolling = self.workers.outdated(current) > 0;
        if !self.rolling {
            self.notify.ready();
        }
    }

    /// Every worker runs the new binary: the master executes it too, in
    /// place (same pid), handing down its workers. Returns only if that
    /// failed, and then the master goes on as it was.
    fn reexec_as_new_binary(&mut self, upgrade: Upgrade) {
        let path = self.program.path.display().to_string();
        info!(
            "upgrade: every worker runs {path}, {:.2} s after SIGUSR2; \
             the master re-executes itself as it (pid {} kept)",
            upgrade.started.elapsed().as_secs_f64(),
            std::process::id()
        );
        let now = Instant::now();
        let state = MasterState {
            target: self.target,
            generation: self.generation,
            signal_mask: self.signals.saved_mask(),
            scoreboard: self
                .scoreboard
                .file()
                .map(|fd| (fd.as_raw_fd(), self.scoreboard.rows())),
            control: self.control.as_ref().map(Control::listener_fd),
            workers: self
                .workers
                .iter()
                .map(|w| AdoptedWorker::of(w, w.pipe.as_ref().map(|p| p.as_raw_fd()), now))
                .collect(),
        };
        if let Some(control) = self.control.as_mut() {
            // Its connections do not survive the exec (close-on-exec): answer
            // them now; the new image opens the socket again.
            let generation = self.generation;
            control.finish(
                |pending| match pending {
                    Pending::Upgrade => Ok(format!(
                        "{{\"generation\":{generation},\"path\":{}}}\n",
                        status::string(&path)
                    )),
                    _ => Err("the master re-executes for an upgrade; ask again".to_owned()),
                },
                CONTROL_PATIENCE,
            );
        }
        logbuf::flush_before_exit(LAST_LINES_BEFORE_EXEC);
        let systemd = self.notify.for_successor();
        let err = upgrade::reexec_master(&self.program, &state, &self.listeners.fds(), &systemd);
        error!(
            "upgrade: re-executing the master as {path}: {}; its workers serve on under the running master",
            describe(&err)
        );
    }

    /// After an error: no worker may outlive the master or become a zombie.
    pub(crate) fn kill_all_and_reap(&mut self) {
        let pids: Vec<Pid> = self.workers.iter().map(|w| w.pid).collect();
        for pid in pids {
            send(pid, Signal::SIGKILL);
            reap::wait_for(pid);
            self.workers.remove(pid);
        }
    }
}

/// Reads and acts on every message in a worker's pipe, until it would block.
/// Garbage closes the pipe and is returned: the caller decides whether the
/// worker is still there to be signalled.
fn read_messages(
    registry: &Registry,
    board: &Scoreboard,
    worker: &mut Worker,
    graceful: Duration,
) -> Option<DecodeError> {
    loop {
        match worker.receive() {
            Received::Message(message) => on_message(worker, message, graceful, board),
            Received::Nothing => return None,
            Received::Closed => {
                close_pipe(registry, worker);
                return None;
            }
            Received::Malformed(err) => {
                close_pipe(registry, worker);
                return Some(err);
            }
            Received::Failed(err) => {
                error!("reading the pipe of worker {}: {err}", worker.pid);
                close_pipe(registry, worker);
                return None;
            }
        }
    }
}

fn on_message(worker: &mut Worker, message: Message, graceful: Duration, board: &Scoreboard) {
    let pid = worker.pid;
    match message {
        Message::Ready => {
            if worker.state == State::Starting {
                info!("worker {pid} ready");
                worker.was_ready = true;
            }
            worker.state = worker.state.next(Event::Ready);
        }
        Message::Suicide { reason } => {
            match worker.state {
                // Nothing to hand over: its exit is a failed start.
                State::Starting => debug!("worker {pid} failed to start ({reason})"),
                State::Ready => info!("worker {pid} sent suicide ({reason}); replacing it"),
                State::Retiring => info!("worker {pid} sent suicide ({reason})"),
            }
            worker.state = worker.state.next(Event::Suicide);
            worker.last_words = Some(reason);
            // It leaves on its own, but not later than a stopped one would.
            worker.kill_at.get_or_insert(Instant::now() + graceful);
        }
        // A worker that cannot write the scoreboard (another language's)
        // marks its requests; the master writes its row. Each Busy starts a
        // new "current request", so a worker that serves many at once is
        // found hung only when it starts none for the whole timeout: its
        // event loop is stuck, or every request it holds is.
        Message::Busy { what } => {
            if let Some(row) = board.writer(worker.slot) {
                if row.is_busy() {
                    row.end();
                }
                let (request, peer) = what.rsplit_once(" from ").unwrap_or((what.as_str(), ""));
                row.begin(&peer);
                row.note_request(request.as_bytes());
            }
        }
        Message::Idle => {
            if let Some(row) = board.writer(worker.slot).filter(RowWriter::is_busy) {
                row.end();
            }
        }
    }
}

/// The worker stops counting, and is asked to stop (see `terminate`).
fn ask_to_stop(worker: &mut Worker, graceful: Duration) {
    worker.state = worker.state.next(Event::Stop);
    terminate(worker, graceful);
}

/// What a request that is not answered at once waits for.
fn pending_of(request: Request) -> Option<Pending> {
    match request {
        Request::Scale(n) => Some(Pending::Scale(n)),
        Request::Reload => Some(Pending::Reload),
        Request::Upgrade => Some(Pending::Upgrade),
        Request::Stop { .. } => Some(Pending::Stop),
        Request::Status | Request::Metrics => None,
    }
}

/// The lower of the two bounds on the target, and the words for it: what
/// the open-file limit allows (`files`: so many workers, under that limit),
/// and what respawn supports.
fn the_most_workers(files: (usize, Option<u64>)) -> (usize, String) {
    match files {
        (most, Some(limit)) if most < MAX_WORKERS => (
            most,
            format!(
                "the {most} that the master's open-file limit allows \
                 (RLIMIT_NOFILE {limit}: a pipe per worker, and as many again while they are replaced)"
            ),
        ),
        _ => (MAX_WORKERS, format!("the {MAX_WORKERS} respawn supports")),
    }
}

/// SIGTERM, and SIGKILL after `graceful` if it has not gone by then. Its
/// state is the caller's business: a worker stopped for garbage still counts
/// until its exit, which is then judged like any other death.
fn terminate(worker: &mut Worker, graceful: Duration) {
    if worker.killed {
        return;
    }
    worker.kill_at.get_or_insert(Instant::now() + graceful);
    send(worker.pid, Signal::SIGTERM);
}

fn close_pipe(registry: &Registry, worker: &mut Worker) {
    if let Some(pipe) = worker.pipe.take() {
        let _ = registry.deregister(&mut SourceFd(&pipe.as_raw_fd()));
    }
}

/// SIGKILL; from then on only its exit is awaited.
fn kill(worker: &mut Worker) {
    send(worker.pid, Signal::SIGKILL);
    worker.kill_at = None;
    worker.killed = true;
}

fn send(pid: Pid, signal: Signal) {
    // ESRCH: it died already; its SIGCHLD is on the way.
    if let Err(err) = nix_signal::kill(pid, signal) {
        debug!("sending {signal} to worker {pid}: {err}");
    }
}

/// fork copies only the calling thread: any lock another thread holds at
/// that moment (the allocator's, stdout's) stays locked forever in the child.
fn refuse_threads() -> Result<(), Error> {
    let count = std::fs::read_dir("/proc/self/task")
        .map_err(|err| Error::io("counting this process's threads in /proc/self/task", err))?
        .count();
    if count > 1 {
        return Err(Error::Threads { count });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttin_is_bounded_by_open_files_or_by_what_respawn_supports() {
        let (most, why) = the_most_workers((10, Some(32)));
        assert_eq!(most, 10);
        assert!(
            why.starts_with("the 10 that the master's open-file limit allows (RLIMIT_NOFILE 32"),
            "{why}"
        );
        assert_eq!(
            the_most_workers((MAX_WORKERS, Some(100_000))),
            (MAX_WORKERS, "the 4096 respawn supports".to_owned()),
            "at the bound, the bound is what respawn supports"
        );
        assert_eq!(the_most_workers((50_000, Some(100_000))).0, MAX_WORKERS);
        assert_eq!(the_most_workers((usize::MAX, None)).0, MAX_WORKERS, "no limit");
    }
}
