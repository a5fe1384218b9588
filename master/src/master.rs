//! The master: one thread, one loop, one `Master` value.
//!
//! ```text
//! signals ──► signalfd ─┐
//! worker pipes ─────────┤
//! control socket ───────┤
//! stderr writable ──────┼──► poll(until the nearest deadline) ──► handle ──► act
//! deadlines: kill, ─────┘                                   (fork, signal, reap)
//!   start, backoff, hung check, control
//! ```
//!
//! This file is the crash path of the article, in order: a worker is
//! spawned (`spawn_worker`), says Ready or Suicide (`read_worker_messages`),
//! exits and is reaped (`reap_children`, `forget_worker`), and is replaced
//! (`manage_workers`). Handlers record what happened in the worker table
//! and send signals; they never decide that anything is done.
//!
//! Two functions hold the rules, each in one place:
//!
//! - `manage_workers`, the count invariant: fork while fewer workers count
//!   than wanted, retire while more count. It runs at the end of every turn,
//!   and also before the exit of a retiring worker, or of one replaced at
//!   once, is logged, so that the log shows its replacement first (and the
//!   replacement waits for no line).
//! - `settle` (settle.rs), what is owed: whether a rollout or an upgrade is
//!   over, whether READY=1 is due (and the pid file before it), and what
//!   each waiting control client is answered. It runs once, at the end of
//!   every turn, after `manage_workers`, never from inside a handler.
//!
//! The steering verbs (HUP, USR2, the back-out, the re-execution and the
//! adoption that follows it) are in deploy.rs; the control socket's verbs in
//! settle.rs. They reach this file through the worker table and the build
//! the master wants (`Wanted`), nothing else.
//!
//! Nothing the host does can stop the loop but a stop signal: a fork or a
//! pipe that fails is a line naming the limit and a retry on the slot's
//! backoff; a log pipe nobody reads fills a bounded buffer (logbuf.rs),
//! written only when stderr is writable; a stray signal is a line.

mod deploy;
mod settle;
pub(crate) mod strays;

use crate::control::{self, Control, Pending};
use crate::error::describe;
use crate::hung::{self, Sample, Verdict};
use crate::listen::{self, Listeners};
use crate::notify::Notifier;
use crate::pidfile::PidFile;
use crate::policy::{Backoff, Exceeded, RestartLimit};
use crate::signals::{self, Signals, Signo};
use crate::spawn::{self, ChildSetup, FdFloor, SpawnError};
use crate::status::Counters;
use crate::table::{Event, Received, State, Table, Wanted, Worker};
use crate::upgrade::{self, Program, Upgrade};
use crate::{limits, logbuf, notified, reap};
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
/// Control connections a TTIN or a `scale` never takes the fds of: the
/// operator's way back down comes through them.
const CONTROL_FDS_KEPT: usize = 2;

pub(crate) struct Master<W> {
    config: Config,
    /// What the workers accept on; their fds are what an upgrade hands over
    /// (`listeners.fds()`).
    listeners: Listeners,
    work: W,
    poll: Poll,
    signals: Signals,
    workers: Table,
    /// How many workers to keep: the configured number, then TTIN, TTOU
    /// and `scale`.
    target: usize,
    /// The program image this master runs: 0 at the first start, one more
    /// at each re-execution. A worker forked by this image runs it; one
    /// forked during an upgrade runs the next.
    image: u32,
    /// Bumped by each HUP and USR2: the generation of the workers forked
    /// from then on.
    generation: u64,
    /// The build every counted worker should run; the others are outdated
    /// and replaced one at a time (`manage_workers`).
    wanted: Wanted,
    backoff: Backoff,
    restarts: RestartLimit,
    scoreboard: Scoreboard,
    /// When to look for hung workers next; None without a timeout.
    next_hung_check: Option<Instant>,
    /// Set by TERM, QUIT or INT: no more forks, exit once the table is empty.
    stopping: bool,
    /// A rollout (HUP, or the way back from an upgrade) is under way, and
    /// its `rolling restart done` line is still to be said.
    rolling: bool,
    /// A HUP's rollout under way, or one that backed out (deploy.rs).
    reload: Option<deploy::Reload>,
    /// Why the master gave up, if it did: `run` returns it once all stopped.
    gave_up: Option<String>,
    next_token: usize,
    /// The lowest fd number of the worker pipes (see spawn.rs).
    floor: FdFloor,
    /// What every forked child needs, worked out once (spawn.rs).
    prepared: spawn::Prepared,
    /// Forks or pipes that failed in a row: the first is logged, the others
    /// wait for the line that says forking works again.
    failed_forks: usize,
    /// A replacement waits for a retiring worker to leave (logged once).
    waiting_for_room: bool,
    /// Lines that a peer or a worker can cause, at most one a second each.
    noisy: signals::RateLimit,
    /// The program this master runs, for an upgrade to execute it anew.
    program: Program,
    /// Set by USR2 until the master re-executes, or the upgrade ends.
    upgrade: Option<Upgrade>,
    /// Claimed (and written) at start; checked, and written again if it
    /// was removed, before READY=1.
    pid_file: Option<PidFile>,
    /// systemd's notification socket (notify.rs).
    notify: Notifier,
    /// What settle.rs owes and has said (READY=1, control answers).
    owed: settle::Owed,
    /// The control socket (control.rs), if `--control` asked for one.
    control: Option<Control>,
    /// Processes that are the master's children but not its workers: a
    /// worker's descendants, orphaned to the master (strays.rs).
    strays: strays::Strays,
    /// Exits by cause and requests served, for `metrics`.
    counters: Counters,
    /// Workers that died in their first request, one after another.
    first_request_deaths: FirstRequestDeaths,
    /// Pipes with frames left after their turn's budget (read_messages).
    unfinished_pipes: Vec<Token>,
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
        let handed_down = upgrade::take_master_state();
        // The new image of an upgrade. A state refused (forged, unreadable)
        // is a fresh start: refused by a pid file another master holds.
        let reexecuted = matches!(handed_down, Ok(Some(_)));
        let pid_file = match &config.pid_file {
            Some(path) => Some(PidFile::claim(path, reexecuted)?),
            None => None,
        };
        // Said once the pid file is claimed and the control socket bound,
        // so that a master refused for either never said it listens; not by
        // a re-executed image, whose first image said it already.
        let listening: Vec<String> = match reexecuted {
            false => listeners.iter().map(ToString::to_string).collect(),
            true => Vec::new(),
        };
        let floor =
            FdFloor::above_open_fds().map_err(|err| Error::io("listing open fds in /proc/self/fd", err))?;
        let program = Program::of_this_process();
        let mut signals =
            Signals::block().map_err(|err| Error::io("blocking signals for the signalfd", err))?;
        let poll = Poll::new().map_err(|err| Error::io("creating the epoll instance", err))?;
        let mut adopted = deploy::read_handed_down(handed_down, &listeners.fds());
        if let Some(state) = &adopted {
            signals.set_saved_mask(state.signal_mask);
        }
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
        let handed_control = adopted.as_mut().and_then(|state| {
            let conns = std::mem::take(&mut state.conns);
            state.control.map(|fd| (fd, conns))
        });
        let control = match (config.control.clone(), handed_control) {
            (Some(path), Some((fd, conns))) => Some(Control::adopt(fd, &conns, &path, poll.registry())?),
            (Some(path), None) => Some(Control::open(&path, poll.registry())?),
            (None, handed) => {
                // Handed down, but this image serves no control socket:
                // closed, so that no worker inherits them.
                if let Some((fd, conns)) = handed {
                    [fd].into_iter()
                        .chain(conns.into_iter().map(|(fd, _)| fd))
                        .for_each(close_handed_down);
                }
                None
            }
        };
        for address in &listening {
            info!("listening on {address}");
        }
        // Orphaned descendants of workers become the master's children,
        // not init's: the master reaps them and ends them at a stop.
        strays::become_subreaper();
        let mut master = Master {
            backoff: Backoff::new(config.backoff_initial, config.backoff_cap),
            restarts: RestartLimit::new(config.max_restarts, config.restart_window),
            scoreboard,
            next_hung_check: config.timeout.map(|timeout| Instant::now() + timeout / 2),
            target: config.workers,
            image: 0,
            generation: 0,
            wanted: Wanted { image: 0, since: 0 },
            config,
            listeners,
            work,
            poll,
            signals,
            workers: Table::default(),
            stopping: false,
            rolling: false,
            reload: None,
            gave_up: None,
            next_token: LOG.0 + 1,
            floor,
            prepared: spawn::Prepared::now(),
            failed_forks: 0,
            waiting_for_room: false,
            noisy: signals::RateLimit::default(),
            program,
            upgrade: None,
            pid_file,
            notify: Notifier::from_env(),
            owed: settle::Owed::default(),
            control,
            strays: strays::Strays::default(),
            counters: Counters::default(),
            first_request_deaths: FirstRequestDeaths::default(),
            unfinished_pipes: Vec::new(),
            started: Instant::now(),
        };
        if let Some(state) = adopted {
            master.adopt(state);
        }
        Ok(master)
    }

    /// The loop. Returns once stopped and every worker is reaped.
    pub(crate) fn run(&mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(64);
        // After an upgrade's re-execution: a worker that exited during the
        // exec raised a SIGCHLD that setting its disposition to default
        // discarded (POSIX: a pending signal whose default is to ignore).
        self.reap_children();
        self.manage_workers();
        self.settle();
        while !(self.stopping && self.workers.is_empty() && self.strays.is_empty()) {
            self.write_log();
            self.wait_for_events(&mut events)?;
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.handle_signals()?,
                    LOG => {} // written at the top of every turn
                    token if control::owns(token) => self.serve_control(token),
                    token if notified::owns(token) => self.read_notices(token),
                    token => self.read_worker_messages(token),
                }
            }
            self.read_unfinished_pipes();
            self.enforce_deadlines();
            self.manage_workers();
            self.look_for_strays();
            self.settle();
        }
        self.pid_file.iter().for_each(PidFile::remove);
        info!("all workers stopped, master exiting");
        self.answer_control_at_exit();
        match self.gave_up.take() {
            Some(reason) => Err(Error::GaveUp { reason }),
            None => Ok(()),
        }
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
            self.workers
                .next_deadline(self.config.start_timeout, self.watchdog()),
            self.backoff.next_deadline(now),
            self.next_hung_check,
            self.notify.next_watchdog(),
            self.control.as_ref().and_then(Control::next_deadline),
            self.owed.next_deadline(),
            self.strays.next_deadline(),
            self.unproven_until(),
            // Frames left to read: look at the other sources, without waiting.
            (!self.unfinished_pipes.is_empty()).then_some(now),
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

    /// One handler per signal, named for what it does; none of them decides
    /// that anything is done (that is `settle`'s).
    fn handle_signals(&mut self) -> Result<(), Error> {
        while let Some(signal) = self
            .signals
            .next()
            .map_err(|err| Error::io("reading the signalfd", err))?
        {
            match signal {
                libc::SIGCHLD => self.reap_children(),
                libc::SIGTERM | libc::SIGQUIT => {
                    self.stop_gracefully(Some(&format!("received {}", signals::name(signal))))
                }
                libc::SIGINT => self.stop_now("received SIGINT"),
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
        let Some(unsaid) = self.noisy.allow(signal, Instant::now()) else {
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
        info!("received {name}{meaning}; ignored{}", signals::unsaid(unsaid));
    }

    /// 'exit': collect every dead child; one SIGCHLD may stand for many.
    fn reap_children(&mut self) {
        let mut reaped = false;
        while let Some((pid, status)) = reap::next_exited() {
            self.forget_worker(pid, &status);
            reaped = true;
        }
        if reaped {
            // A worker's orphans are reparented to the master before its
            // SIGCHLD is sent: they are the master's children by now.
            self.strays.look_soon();
        }
    }

    fn forget_worker(&mut self, pid: Pid, status: &WaitStatus) {
        let Some(mut worker) = self.workers.remove(pid) else {
            self.strays.reaped(pid, status);
            return;
        };
        // Its last words: a Suicide written just before it exited may still
        // be in the pipe, and tells why it went. It is reaped: whatever the
        // pipe holds, nothing may signal its pid now (it may be reused).
        // A pipe of a process that is gone holds what it wrote, at most a
        // pipe's capacity: read to its end.
        if let Drained::Garbage(err) = read_messages(
            self.poll.registry(),
            &self.scoreboard,
            &mut worker,
            self.config.graceful_timeout,
            usize::MAX,
        ) {
            debug!("worker {pid} left malformed ipc behind ({err})");
        }
        close_pipe(self.poll.registry(), &mut worker);
        let how = match &worker.last_words {
            Some(why) => format!("{}: {why}", reap::describe(status)),
            None => reap::describe(status),
        };
        let lived = worker.spawned_at.elapsed();
        let death = self.judge_death(&worker, lived);
        if death == Death::Proved {
            // However it left, it proved its slot can hold a worker.
            self.backoff.lived(worker.slot);
        }
        self.count_exit(&worker, death);
        if !worker.state.counts() || self.stopping {
            // A retiring worker's replacement comes before its exit, even
            // when its Suicide and its SIGCHLD are read in the same turn.
            self.manage_workers();
            info!("worker {pid} exited ({how})");
        } else if self.new_binary_failed(&worker) {
            self.back_out_of_upgrade(&worker, &how);
        } else if death == Death::FailedStart && self.reload_failed(&worker) {
            // Before a refusal (exit 75): a release that exits 75 at every
            // start would otherwise never back out.
            self.back_out_of_reload(&worker, &how);
        } else if death == Death::FailedStart && refused_by_the_host(status) {
            self.retry_refused(&worker, &how);
        } else {
            self.plan_replacement(&worker, &how, death, lived);
        }
    }

    /// What a death says of the worker's slot, from what it served (its
    /// scoreboard row, which its Busy and Idle marks write for a worker in
    /// another language): a worker that completed a request, or that was
    /// Ready past the minimum uptime, proved itself; one that died in its
    /// first request was killed by that request; any other is a failed
    /// start.
    fn judge_death(&self, worker: &Worker, lived: Duration) -> Death {
        let row = self.scoreboard.read(worker.slot).unwrap_or_default();
        if worker.was_ready && (row.requests > 0 || lived >= self.config.min_uptime) {
            Death::Proved
        } else if worker.was_ready && row.busy_since.is_some() {
            Death::InFirstRequest
        } else {
            Death::FailedStart
        }
    }

    /// For `metrics`: why it left, and what it served (read from its row
    /// before a new worker takes the slot).
    fn count_exit(&mut self, worker: &Worker, death: Death) {
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
        } else {
            match death {
                Death::Proved => &mut c.died,
                Death::InFirstRequest => &mut c.in_first_request,
                Death::FailedStart => &mut c.failed_start,
            }
        };
        *counter += 1;
    }

    /// A worker died without warning, or failed to start:
    ///
    /// - It proved itself (it completed a request, or was Ready past the
    ///   minimum uptime): it is replaced at once and counts for nothing.
    ///   Whatever killed it (`process.exit` in a route, the OOM killer, a
    ///   segfault in one request), the slot has shown it can serve, and
    ///   giving up would turn a partial failure into a total outage. Each
    ///   slot is refilled at most once per request served (or per minimum
    ///   uptime), which bounds the fork rate.
    /// - It died in its first request: that request killed it, not its
    ///   start. The slot backs off (the fork rate stays bounded), but it
    ///   does not count toward giving up: a program that dies on every
    ///   request is said, loudly and at most every 10 s, not given up on.
    /// - Otherwise it failed to start: the slot backs off, and the restart
    ///   limit counts it.
    fn plan_replacement(&mut self, worker: &Worker, how: &str, death: Death, lived: Duration) {
        let now = Instant::now();
        let (pid, slot) = (worker.pid, worker.slot);
        if death != Death::InFirstRequest {
            self.first_request_deaths.broken();
        }
        match death {
            Death::Proved => {
                // Replaced before its exit is said: the line costs the
                // replacement nothing.
                self.manage_workers();
                warn!("worker {pid} exited ({how}), replacing");
                return;
            }
            Death::InFirstRequest => {
                let delay = self.backoff.died_young(slot, now);
                warn!(
                    "worker {pid} exited ({how}) during its first request; slot {slot} respawns in {:.1} s",
                    delay.as_secs_f64()
                );
                self.first_request_deaths.one_more(pid, how, now);
                return;
            }
            Death::FailedStart => {}
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
        if !worker.was_ready {
            self.advise_on_start();
        }
    }

    /// Once: what a worker must do to be Ready (`Config::start_advice`).
    fn advise_on_start(&mut self) {
        if let Some(advice) = self.config.start_advice.take() {
            warn!("{advice}");
        }
    }

    /// Takes the master's children that are not workers as strays
    /// (strays.rs), after a reap or a Ready (the moments a worker's
    /// descendants are orphaned or started), and on any turn a second
    /// after the last look.
    fn look_for_strays(&mut self) {
        let now = Instant::now();
        if !self.strays.wants_a_look(now) {
            return;
        }
        let workers: std::collections::HashSet<Pid> = self.workers.iter().map(|w| w.pid).collect();
        let children: Vec<Pid> = strays::children()
            .into_iter()
            .filter(|pid| !workers.contains(pid))
            .collect();
        self.strays.found(children, now);
    }

    /// The pipes whose turn's budget ran out: read on, after what this turn
    /// brought.
    fn read_unfinished_pipes(&mut self) {
        for token in std::mem::take(&mut self.unfinished_pipes) {
            if notified::owns(token) {
                self.read_notices(token);
            } else {
                self.read_worker_messages(token);
            }
        }
    }

    /// What a worker said on its own NOTIFY_SOCKET (`--ready-on-notify`,
    /// notified.rs): READY=1 is its Ready, STATUS= is kept for `status`,
    /// WATCHDOG=1 puts off its hung deadline.
    fn read_notices(&mut self, token: Token) {
        let graceful = self.config.graceful_timeout;
        let Some(worker) = self.workers.by_token(notified::pipe_token(token)) else {
            return;
        };
        let Some(socket) = &worker.notify else {
            return;
        };
        let uid = self
            .config
            .run_as
            .as_ref()
            .and_then(|run_as| run_as.uid())
            .unwrap_or_else(|| nix::unistd::geteuid().as_raw());
        let (notices, more) = notified::receive(socket, worker.pid.as_raw(), uid);
        let was_ready = worker.was_ready;
        for notice in notices {
            match notice {
                notified::Notice::Ready => on_message(worker, Message::Ready, graceful, &self.scoreboard),
                notified::Notice::Status(text) => worker.notify_status = Some(text),
                notified::Notice::Watchdog => worker.watchdog_at = Some(Instant::now()),
            }
        }
        if worker.was_ready != was_ready {
            self.strays.look_soon();
        }
        if more {
            self.unfinished_pipes.push(token);
        }
    }

    /// The watchdog's timeout: `--timeout`, for workers that notify.
    fn watchdog(&self) -> Option<Duration> {
        self.config.timeout.filter(|_| self.config.ready_on_notify)
    }

    /// 'message': what a worker's pipe holds now, up to a turn's budget.
    fn read_worker_messages(&mut self, token: Token) {
        let graceful = self.config.graceful_timeout;
        // A stale token: the worker was reaped earlier in this turn.
        let Some(worker) = self.workers.by_token(token) else {
            return;
        };
        let was_ready = worker.was_ready;
        let drained = read_messages(
            self.poll.registry(),
            &self.scoreboard,
            worker,
            graceful,
            MESSAGES_PER_TURN,
        );
        if worker.was_ready != was_ready {
            self.strays.look_soon();
        }
        match drained {
            Drained::Empty => {}
            // Edge-triggered: no event will come for what is left.
            Drained::Budget => self.unfinished_pipes.push(token),
            Drained::Garbage(err) => self.stop_for_garbage(token, err),
        }
    }

    /// A worker that spoke garbage is stopped; its exit is judged like any
    /// death (plan_replacement).
    fn stop_for_garbage(&mut self, token: Token, err: DecodeError) {
        let graceful = self.config.graceful_timeout;
        let Some(worker) = self.workers.by_token(token) else {
            return;
        };
        match worker.state {
            State::Retiring => debug!("worker {} sent malformed ipc ({err}) while retiring", worker.pid),
            _ => warn!("worker {} sent malformed ipc ({err}); replacing it", worker.pid),
        }
        worker.state = worker.state.next(Event::Malformed);
        terminate(worker, graceful);
    }

    /// TERM, QUIT, a `stop` on the control socket (or giving up: `by` is
    /// None, the reason was said): every worker finishes what it holds and
    /// exits; any still alive after the graceful timeout is killed. The
    /// workers' orphaned descendants are asked to stop too. `by` says who
    /// asked, as for `restart_every_worker`.
    fn stop_gracefully(&mut self, by: Option<&str>) {
        if self.stopping {
            if let Some(by) = by {
                info!("{by} while stopping; already stopping");
            }
            return;
        }
        let timeout = self.config.graceful_timeout.as_secs_f64();
        match by {
            Some(by) => info!("{by}, stopping gracefully (graceful timeout {timeout} s)"),
            None => info!("stopping gracefully (graceful timeout {timeout} s)"),
        }
        self.stopping = true;
        self.notify.stopping();
        for worker in self.workers.iter_mut() {
            ask_to_stop(worker, self.config.graceful_timeout);
        }
        self.strays.stop(Some(self.config.graceful_timeout));
    }

    /// INT (Ctrl-C), or `stop now` on the control socket (`by` says which):
    /// every worker is killed now; a graceful stop under way becomes
    /// immediate.
    fn stop_now(&mut self, by: &str) {
        info!("{by}, stopping now");
        self.stopping = true;
        self.notify.stopping();
        for worker in self.workers.iter_mut() {
            worker.state = worker.state.next(Event::Stop);
            kill(worker);
        }
        self.strays.stop(None);
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
        let watchdog = self.watchdog();
        let mut advise = false;
        for worker in self.workers.iter_mut().filter(|w| !w.killed) {
            if worker.kill_at.is_some_and(|at| at <= now) {
                warn!(
                    "worker {} did not stop within {} s; killing it",
                    worker.pid,
                    graceful.as_secs_f64()
                );
                kill(worker);
            } else if worker.watchdog_deadline(watchdog).is_some_and(|at| at <= now) {
                warn!(
                    "worker {} sent no WATCHDOG=1 for {} s; killing it as hung",
                    worker.pid,
                    watchdog.unwrap_or_default().as_secs_f64()
                );
                worker.state = worker.state.next(Event::Stop);
                worker.hung = true;
                kill(worker);
            } else if worker.start_deadline(start_timeout).is_some_and(|at| at <= now) {
                warn!(
                    "worker {} did not say ready within {} s; killing it",
                    worker.pid,
                    start_timeout.unwrap_or_default().as_secs_f64()
                );
                kill(worker);
                advise = true;
            }
        }
        if advise {
            self.advise_on_start();
        }
        self.strays.enforce(now);
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
                self.fit_control_to_room();
            }
            None => info!("received {name} with no worker wanted; there is none to remove"),
        }
    }

    /// The most workers TTIN may ask for, and why that many: the scoreboard's
    /// rows, or the master's open-file limit (a pipe per live worker).
    fn most_workers(&self) -> (usize, String) {
        // Control connections make room for workers, but a few are kept:
        // the scale back down comes through them.
        let kept = if self.control.is_some() {
            CONTROL_FDS_KEPT
        } else {
            0
        };
        the_most_workers(limits::workers_for_open_files(self.fixed_fds() + kept))
    }

    /// Holds the control socket's connections to what the open-file limit
    /// leaves beside the pipes of every worker that may live, closing idle
    /// ones beyond it at once (control.rs): after the target changed, and
    /// before each round of accepts.
    pub(super) fn fit_control_to_room(&mut self) {
        if self.control.is_none() {
            return;
        }
        let pipes = self.pipes().max(2 * self.target + 1);
        let room = limits::control_connections_for_open_files(self.fixed_fds(), pipes);
        if let Some(control) = self.control.as_mut() {
            control.set_room(room, self.poll.registry());
        }
    }

    /// The fds the master holds besides worker pipes and control
    /// connections (which make room for workers: control.rs).
    fn fixed_fds(&self) -> usize {
        let conns = self.control.as_ref().map_or(0, Control::connections);
        limits::open_fds().saturating_sub(self.pipes() + conns)
    }

    /// How many worker pipes are open.
    fn pipes(&self) -> usize {
        self.workers.iter().filter(|w| w.pipe.is_some()).count()
    }

    /// The count invariant, in one place: fork while fewer workers count
    /// than wanted (except into a slot that waits out its backoff), and
    /// retire while more count, until neither changes anything. During a
    /// rollout one more is wanted, and the surplus is retired only once
    /// nothing is starting, so an outdated worker leaves only when its
    /// replacement is Ready, and the next replacement is forked at once,
    /// without waiting for the old worker to finish.
    ///
    /// At most twice the target plus one workers live at once: the counted
    /// ones, one more during a rollout, and as many retiring ones as the
    /// target. Past that, a replacement waits for a retiring worker to leave
    /// (within the graceful timeout), so that clients who hold retiring
    /// workers (slow requests, --max-requests 1) cannot make the master fork
    /// without bound.
    fn manage_workers(&mut self) {
        if self.stopping {
            return;
        }
        self.note_upgrade_proved();
        loop {
            self.spawn_missing_workers();
            // A retired worker makes room for the next new one of a rollout.
            if !self.retire_surplus_workers() {
                break;
            }
        }
    }

    /// How many workers to fork up to: the target, one more while a rollout
    /// replaces outdated ones, and one at least while an upgrade has no
    /// worker of the new binary that proved itself (deploy.rs): the master
    /// never follows a binary no worker ran.
    fn wanted_count(&self) -> usize {
        let rolling = self.workers.outdated(self.wanted) > 0 && self.target > 0;
        let unproven = self.upgrade.is_some_and(|upgrade| !upgrade.proved);
        self.target + usize::from(rolling || unproven)
    }

    /// Forks into the slots to fill now, as far as the room allows.
    fn spawn_missing_workers(&mut self) {
        let wanted = self.wanted_count();
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
        while self.workers.counted() > self.target
            && !self.workers.any_starting()
            && self.unproven_until().is_none()
        {
            self.retire_one();
            retired = true;
        }
        retired
    }

    /// With `Config::retire_once_proved`, while a worker waits to be
    /// retired: when the first Ready worker that has served nothing yet
    /// will have lived the minimum uptime. Until no such worker is left,
    /// none is retired (the loop wakes then). None: there is none, nothing
    /// to retire, or the config does not ask (the loop keeps no deadline
    /// for it after an ordinary replacement).
    fn unproven_until(&self) -> Option<Instant> {
        if !self.config.retire_once_proved || self.workers.counted() <= self.target {
            return None;
        }
        let min_uptime = self.config.min_uptime;
        self.workers
            .iter()
            .filter(|w| w.state == State::Ready && w.spawned_at.elapsed() < min_uptime)
            .filter(|w| self.scoreboard.read(w.slot).is_none_or(|row| row.requests == 0))
            .map(|w| w.spawned_at + min_uptime)
            .min()
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

    /// Retires the oldest outdated worker if a rollout is under way, else
    /// the newest (TTOU: the one with the least warm state).
    fn retire_one(&mut self) {
        let graceful = self.config.graceful_timeout;
        if let Some(worker) = self.workers.oldest_outdated(self.wanted) {
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

    /// Forks a worker into `slot`, of the build wanted: a fork of this
    /// image, or, during an upgrade, a fork that executes the new binary
    /// (spawn.rs: the same steps either way). If the host refuses, that is
    /// logged, and the slot is retried on its backoff.
    fn spawn_worker(&mut self, slot: usize) {
        let notify = match self.open_notify_socket() {
            Ok(notify) => notify,
            Err(err) => {
                self.fork_failed(
                    slot,
                    SpawnError {
                        doing: "its notification socket",
                        err,
                    },
                );
                return;
            }
        };
        let master_fds = self.master_fds();
        self.scoreboard.reset(slot);
        let new_binary = self.wanted.image != self.image;
        let watchdog = self.watchdog().map(|timeout| timeout.as_micros());
        let setup = ChildSetup {
            slot,
            prepared: &self.prepared,
            listeners: &self.listeners,
            master_fds: &master_fds,
            floor: self.floor,
            signals: &self.signals,
            row: self.scoreboard.writer(slot),
            run_as: self.config.run_as.as_ref(),
            exec: new_binary.then(|| {
                let file = self
                    .scoreboard
                    .file()
                    .map(|fd| (fd.as_raw_fd(), self.scoreboard.rows()));
                (&self.program, file)
            }),
            notify: notify.as_ref().map(|n| (n.name.as_str(), watchdog)),
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
        let mut worker = Worker::new(spawned.pid, slot, token, Some(spawned.pipe));
        worker.image = self.wanted.image;
        worker.generation = self.generation;
        worker.notify = notify.map(|n| n.socket);
        info!("worker {} spawned", spawned.pid);
        self.watch_worker(&mut worker);
        self.workers.insert(worker);
    }

    /// With `--ready-on-notify`, the worker's own NOTIFY_SOCKET, made
    /// before its fork and lifted above the fd floor (the child closes it
    /// with the pipes).
    fn open_notify_socket(&mut self) -> io::Result<Option<notified::WorkerSocket>> {
        if !self.config.ready_on_notify {
            return Ok(None);
        }
        let notified::WorkerSocket { socket, name } = notified::open(self.next_token)?;
        let socket = self.floor.lift_or_keep(socket.into());
        Ok(Some(notified::WorkerSocket {
            socket: socket.into(),
            name,
        }))
    }

    /// Watches a worker's pipe and, with `--ready-on-notify`, its
    /// NOTIFY_SOCKET. Without either it could never say Ready: a failed
    /// start, so it is killed.
    fn watch_worker(&mut self, worker: &mut Worker) {
        let sources = [
            ("pipe", worker.pipe.as_ref().map(|p| p.as_raw_fd()), worker.token),
            (
                "notification socket",
                worker.notify.as_ref().map(|s| s.as_raw_fd()),
                notified::token_of(worker.token),
            ),
        ];
        for (what, fd, token) in sources {
            let Some(fd) = fd else { continue };
            let registered = self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), token, Interest::READABLE);
            if let Err(err) = registered {
                error!(
                    "watching the {what} of worker {}: {}; killing it",
                    worker.pid,
                    describe(&err)
                );
                kill(worker);
                return;
            }
        }
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

    /// A worker that exited 75 before it served (`exit_code::HOST_REFUSED`:
    /// respawn's exec refused at RLIMIT_NPROC, whose own line named the
    /// limit, or the program's own EX_TEMPFAIL): as for a fork the host
    /// refuses, the slot waits out its backoff, and nothing counts toward
    /// giving up.
    fn retry_refused(&mut self, worker: &Worker, how: &str) {
        let delay = self.backoff.died_young(worker.slot, Instant::now());
        warn!(
            "worker {} exited ({how}) before it served; code 75 is EX_TEMPFAIL, try again later: \
             {} of {} workers running, slot {} retries in {:.1} s, not counted toward giving up",
            worker.pid,
            self.workers.counted(),
            self.target,
            worker.slot,
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
        let low_pipes = (!FdFloor::all_lifted())
            .then(|| self.workers.iter())
            .into_iter()
            .flatten()
            .flat_map(|w| {
                let pipe = w.pipe.as_ref().map(|p| p.as_raw_fd());
                let notify = w.notify.as_ref().map(|n| n.as_raw_fd());
                [pipe, notify]
            })
            .flatten()
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

    /// After an error: no worker may outlive the master or become a zombie.
    pub(crate) fn kill_all_and_reap(&mut self) {
        let pids: Vec<Pid> = self.workers.iter().map(|w| w.pid).collect();
        for pid in pids {
            send(pid, Signal::SIGKILL);
            reap::wait_for(pid);
            self.workers.remove(pid);
        }
        self.strays.kill_all_and_reap();
    }

    /// The Unix socket files this master made and holds now, to remove when
    /// it stops.
    pub(crate) fn socket_files(&self) -> Vec<listen::SocketFile> {
        self.listeners.socket_files()
    }
}

/// Did the worker exit with respawn's code for a refusal of the host?
fn refused_by_the_host(status: &WaitStatus) -> bool {
    matches!(status, WaitStatus::Exited(_, code) if *code == respawn_ipc::exit_code::HOST_REFUSED)
}

/// How a worker that was not handing over died (`judge_death`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Death {
    /// It completed a request, or was Ready past the minimum uptime.
    Proved,
    /// It was Ready, and died in the first request it took.
    InFirstRequest,
    /// It died before it was Ready, or young and before any request.
    FailedStart,
}

/// Workers that died in their first request, one after another: a program
/// that fails on every request it gets (Fastify served before `ready()`).
/// Not given up on, but said at once and then at most every 10 s.
#[derive(Default)]
pub(crate) struct FirstRequestDeaths {
    /// How many in a row, with no other kind of death between.
    in_a_row: u64,
    said: Option<Instant>,
}

impl FirstRequestDeaths {
    const EVERY: Duration = Duration::from_secs(10);
    /// Fewer in a row is a bad request or two, not a broken program.
    const SAY_FROM: u64 = 3;

    fn one_more(&mut self, pid: Pid, how: &str, now: Instant) {
        self.in_a_row += 1;
        let due = self
            .said
            .is_none_or(|at| now.saturating_duration_since(at) >= Self::EVERY);
        if self.in_a_row >= Self::SAY_FROM && due {
            self.said = Some(now);
            error!(
                "the last {} workers each died during their first request (the last: worker {pid} \
                 exited ({how})): the program fails on the requests it gets; each slot is refilled \
                 on its backoff, and this is not counted toward giving up",
                self.in_a_row
            );
        }
    }

    /// A worker died another way: the run is over.
    fn broken(&mut self) {
        self.in_a_row = 0;
        self.said = None;
    }

    /// For `status`: how many in a row now.
    pub(crate) fn in_a_row(&self) -> u64 {
        self.in_a_row
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
    budget: usize,
) -> Drained {
    for _ in 0..budget {
        match worker.receive() {
            Received::Message(message) => on_message(worker, message, graceful, board),
            Received::Nothing => return Drained::Empty,
            Received::Closed => {
                close_pipe(registry, worker);
                return Drained::Empty;
            }
            Received::Malformed(err) => {
                close_pipe(registry, worker);
                return Drained::Garbage(err);
            }
            Received::Failed(err) => {
                error!("reading the pipe of worker {}: {err}", worker.pid);
                close_pipe(registry, worker);
                return Drained::Empty;
            }
        }
    }
    Drained::Budget
}

/// What reading a worker's pipe came to.
enum Drained {
    /// Nothing more to read now (or the pipe is closed).
    Empty,
    /// Bytes that are not a message: the pipe is closed.
    Garbage(DecodeError),
    /// The turn's budget was spent with frames still to read.
    Budget,
}

/// How many messages of one worker a turn reads, so that a worker writing
/// frames as fast as it can (its pipe never empties) cannot hold the loop:
/// the rest are read next turn, after the signals and the other pipes.
const MESSAGES_PER_TURN: usize = 512;

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
                // A second Suicide says nothing new: a worker that sends
                // them by the hundred must not fill the log.
                State::Retiring if worker.last_words.is_some() => {
                    debug!("worker {pid} sent suicide again ({reason})")
                }
                State::Retiring => info!("worker {pid} sent suicide ({reason})"),
            }
            worker.state = worker.state.next(Event::Suicide);
            worker.last_words.get_or_insert(reason);
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

/// Closes an fd the previous image handed down that this one has no use for.
fn close_handed_down(fd: RawFd) {
    // SAFETY: the previous image left this fd open for us alone (the state
    // naming it is removed, and names each fd once); nothing else owns it.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
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
    fn a_pipe_that_never_empties_is_read_a_budget_at_a_time() {
        let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).expect("a pipe");
        let idle = respawn_ipc::Message::Idle.encode();
        let frames = 3 * MESSAGES_PER_TURN / 2;
        let mut written = 0;
        while written < frames {
            match nix::unistd::write(&write_end, &idle[..]) {
                Ok(_) => written += 1,
                Err(err) => panic!("writing frame {written}: {err}"),
            }
        }
        let poll = Poll::new().expect("a poll");
        let board = Scoreboard::new(1).expect("a scoreboard");
        let mut worker = Worker::new(Pid::from_raw(1), 0, Token(7), Some(read_end));
        let graceful = Duration::from_secs(1);
        let first = read_messages(poll.registry(), &board, &mut worker, graceful, MESSAGES_PER_TURN);
        assert!(
            matches!(first, Drained::Budget),
            "one turn's budget, and more left"
        );
        let second = read_messages(poll.registry(), &board, &mut worker, graceful, MESSAGES_PER_TURN);
        assert!(matches!(second, Drained::Empty), "the rest, the next turn");
        assert!(worker.pipe.is_some(), "still open: the worker writes on");
    }

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
