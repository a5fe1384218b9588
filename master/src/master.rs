//! The master: one thread, one loop, one `Master` value.
//!
//! ```text
//! signals ──► signalfd ─┐
//! worker pipes ─────────┼──► poll(until the nearest deadline) ──► handle ──► act
//! kill deadlines ───────┘                                   (fork, signal, reap)
//! ```
//!
//! Handlers only record what happened in the worker table; the count
//! invariant is restored by one function, `manage_workers`, at the end
//! of every turn of the loop (and before a retiring worker's exit is logged,
//! so that the log shows its replacement first). The order of events within
//! a turn therefore does not matter: a pipe's EOF before or after its
//! worker's SIGCHLD, a Suicide read before or after the exit, both end in
//! the same table.

use crate::hung::{self, Sample, Verdict};
use crate::policy::{Backoff, Exceeded, RestartLimit};
use crate::reap;
use crate::signals::Signals;
use crate::spawn::{self, ChildSetup};
use crate::table::{Event, Received, State, Table, Worker};
use crate::{Config, Error};
use log::{debug, error, info, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use nix::sys::signal::{self, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use respawn_ipc::scoreboard::{self, Scoreboard};
use respawn_ipc::{Handoff, Message};
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

const SIGNALS: Token = Token(0);

/// Scoreboard rows: slots beyond have no row, so no hung-worker check. The
/// mapping is touched only where rows are used (192 bytes each).
const SCOREBOARD_ROWS: usize = 4096;

pub(crate) struct Master<W> {
    config: Config,
    listener: TcpListener,
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
    /// Why the master gave up, if it did: `run` returns it once all stopped.
    gave_up: Option<String>,
    next_token: usize,
}

impl<W: FnMut(Handoff) -> i32> Master<W> {
    pub(crate) fn new(listener: TcpListener, config: Config, work: W) -> Result<Self, Error> {
        refuse_threads()?;
        let signals = Signals::block().map_err(|err| Error::io("blocking signals for the signalfd", err))?;
        let poll = Poll::new().map_err(|err| Error::io("creating the epoll instance", err))?;
        let scoreboard =
            Scoreboard::new(SCOREBOARD_ROWS).map_err(|err| Error::io("creating the scoreboard", err))?;
        poll.registry()
            .register(&mut SourceFd(&signals.as_raw_fd()), SIGNALS, Interest::READABLE)
            .map_err(|err| Error::io("watching the signalfd", err))?;
        Ok(Master {
            backoff: Backoff::new(config.backoff_initial, config.backoff_cap),
            restarts: RestartLimit::new(config.max_restarts, config.restart_window),
            scoreboard,
            next_hung_check: config.timeout.map(|timeout| Instant::now() + timeout / 2),
            target: config.workers,
            generation: 0,
            config,
            listener,
            work,
            poll,
            signals,
            workers: Table::default(),
            stopping: false,
            gave_up: None,
            next_token: SIGNALS.0 + 1,
        })
    }

    /// The loop. Returns once stopped and every worker is reaped.
    pub(crate) fn run(&mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(64);
        self.manage_workers()?;
        while !(self.stopping && self.workers.is_empty()) {
            self.wait_for_events(&mut events)?;
            for event in events.iter() {
                match event.token() {
                    SIGNALS => self.handle_signals()?,
                    token => self.read_worker_messages(token),
                }
            }
            self.enforce_deadlines();
            self.manage_workers()?;
        }
        info!("all workers stopped, master exiting");
        match self.gave_up.take() {
            Some(reason) => Err(Error::GaveUp { reason }),
            None => Ok(()),
        }
    }

    /// Sleeps until an event or the nearest deadline; with no deadline, until
    /// an event: an idle master does not wake at all.
    fn wait_for_events(&mut self, events: &mut Events) -> Result<(), Error> {
        let now = Instant::now();
        let timeout = [
            self.workers.next_deadline(),
            self.backoff.next_deadline(now),
            self.next_hung_check,
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
                Signal::SIGCHLD => self.reap_children()?,
                Signal::SIGTERM | Signal::SIGQUIT => self.stop_gracefully(Some(signal)),
                Signal::SIGINT => self.stop_now(),
                Signal::SIGHUP => self.restart_every_worker(),
                Signal::SIGTTIN => self.change_target(1),
                Signal::SIGTTOU => self.change_target(-1),
                _ => {}
            }
        }
        Ok(())
    }

    /// 'exit': collect every dead child; one SIGCHLD may stand for many.
    fn reap_children(&mut self) -> Result<(), Error> {
        while let Some((pid, status)) = reap::next_exited() {
            self.forget_worker(pid, &status)?;
        }
        Ok(())
    }

    fn forget_worker(&mut self, pid: Pid, status: &WaitStatus) -> Result<(), Error> {
        let Some(mut worker) = self.workers.remove(pid) else {
            debug!("reaped process {pid}, not a worker ({})", reap::describe(status));
            return Ok(());
        };
        // Its last words: a Suicide written just before it exited may still
        // be in the pipe, and tells why it went.
        drain_pipe(self.poll.registry(), &mut worker, self.config.graceful_timeout);
        close_pipe(self.poll.registry(), &mut worker);
        let how = match &worker.last_words {
            Some(why) => format!("{}: {why}", reap::describe(status)),
            None => reap::describe(status),
        };
        let lived = worker.spawned_at.elapsed();
        if worker.state != State::Starting && lived >= self.config.min_uptime {
            // However it left, it proved its slot can hold a worker.
            self.backoff.lived(worker.slot);
        }
        if !worker.state.counts() || self.stopping {
            // A retiring worker's replacement comes before its exit, even
            // when its Suicide and its SIGCHLD are read in the same turn.
            self.manage_workers()?;
            info!("worker {pid} exited ({how})");
        } else {
            self.plan_replacement(&worker, &how);
        }
        Ok(())
    }

    /// A worker died without warning, or failed to start: count the restart,
    /// give up if there were too many, and delay it if the worker died young.
    fn plan_replacement(&mut self, worker: &Worker, how: &str) {
        let now = Instant::now();
        let (pid, slot) = (worker.pid, worker.slot);
        let lived = now.saturating_duration_since(worker.spawned_at);
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
        if worker.state == State::Starting || lived < self.config.min_uptime {
            let delay = self.backoff.died_young(slot, now);
            warn!(
                "worker {pid} exited ({how}) {:.2} s after it was forked; slot {slot} respawns in {:.1} s",
                lived.as_secs_f64(),
                delay.as_secs_f64()
            );
        } else {
            warn!("worker {pid} exited ({how}), replacing");
        }
    }

    /// 'message': everything a worker's pipe holds now.
    fn read_worker_messages(&mut self, token: Token) {
        // A stale token: the worker was reaped earlier in this turn.
        if let Some(worker) = self.workers.by_token(token) {
            drain_pipe(self.poll.registry(), worker, self.config.graceful_timeout);
        }
    }

    /// TERM, QUIT (or giving up, with no signal): every worker finishes what
    /// it holds and exits; any still alive after the graceful timeout is
    /// killed.
    fn stop_gracefully(&mut self, signal: Option<Signal>) {
        if self.stopping {
            if let Some(signal) = signal {
                info!("received {signal} while stopping; already stopping");
            }
            return;
        }
        let timeout = self.config.graceful_timeout.as_secs_f64();
        match signal {
            Some(signal) => info!("received {signal}, stopping gracefully (graceful timeout {timeout} s)"),
            None => info!("stopping gracefully (graceful timeout {timeout} s)"),
        }
        self.stopping = true;
        for worker in self.workers.iter_mut() {
            ask_to_stop(worker, self.config.graceful_timeout);
        }
    }

    /// INT (Ctrl-C): every worker is killed now; a graceful stop under way
    /// becomes immediate.
    fn stop_now(&mut self) {
        info!("received SIGINT, stopping now");
        self.stopping = true;
        for worker in self.workers.iter_mut() {
            worker.state = worker.state.next(Event::Stop);
            kill(worker);
        }
    }

    /// Kills every retiring worker whose graceful timeout has passed, and
    /// every worker hung on one connection.
    fn enforce_deadlines(&mut self) {
        let now = Instant::now();
        for worker in self.workers.iter_mut() {
            if worker.kill_at.is_some_and(|at| at <= now) {
                warn!(
                    "worker {} did not stop within {} s; killing it",
                    worker.pid,
                    self.config.graceful_timeout.as_secs_f64()
                );
                kill(worker);
            }
        }
        if self.next_hung_check.is_some_and(|at| at <= now) {
            self.kill_hung_workers(now);
        }
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
                    kill(worker);
                }
            }
        }
        self.next_hung_check = Some(next);
    }

    /// HUP: a rolling restart. Every worker of the current generation
    /// becomes outdated; `manage_workers` replaces them one at a time.
    fn restart_every_worker(&mut self) {
        if self.stopping {
            info!("received SIGHUP while stopping; ignored");
            return;
        }
        if self.workers.counted() == 0 {
            info!("received SIGHUP with no worker running; nothing to replace");
        } else if self.workers.outdated(self.generation) > 0 {
            info!(
                "received SIGHUP during a rolling restart; every worker started before now will be replaced"
            );
        } else {
            info!("received SIGHUP, replacing every worker, one at a time");
        }
        self.generation += 1;
    }

    /// TTIN (+1) and TTOU (-1): one worker more or one fewer, never below 0.
    fn change_target(&mut self, change: isize) {
        let name = if change > 0 { "SIGTTIN" } else { "SIGTTOU" };
        if self.stopping {
            info!("received {name} while stopping; ignored");
            return;
        }
        match self.target.checked_add_signed(change) {
            Some(target) => {
                self.target = target;
                let plural = if target == 1 { "" } else { "s" };
                info!("received {name}, {target} worker{plural} wanted");
            }
            None => info!("received {name} with no worker wanted; there is none to remove"),
        }
    }

    /// The count invariant, in one place: fork while fewer workers count
    /// than wanted (except into a slot that waits out its backoff), and
    /// retire while more count. During a rolling restart one more is wanted,
    /// and the surplus is retired only once nothing is starting, so an
    /// outdated worker leaves only when its replacement is Ready.
    fn manage_workers(&mut self) -> Result<(), Error> {
        if self.stopping {
            return Ok(());
        }
        let rolling = self.workers.outdated(self.generation) > 0;
        let wanted = self.target + usize::from(rolling && self.target > 0);
        let waiting: Vec<usize> = self.backoff.waiting(Instant::now()).collect();
        for slot in self.workers.slots_to_fill(wanted, &waiting) {
            self.spawn_worker(slot)?;
        }
        while self.workers.counted() > self.target && !self.workers.any_starting() {
            self.retire_one();
        }
        if rolling && self.workers.outdated(self.generation) == 0 {
            info!("rolling restart done: every worker is new");
        }
        Ok(())
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

    fn spawn_worker(&mut self, slot: usize) -> Result<(), Error> {
        let master_fds = self.master_fds();
        self.scoreboard.reset(slot);
        let setup = ChildSetup {
            slot,
            listener: &self.listener,
            master_fds: &master_fds,
            mask: self.signals.saved_mask(),
            row: self.scoreboard.writer(slot),
        };
        let spawned = spawn::spawn_worker(&setup, &mut self.work)
            .map_err(|err| Error::io(format!("forking worker {slot}"), err))?;
        let token = Token(self.next_token);
        self.next_token += 1;
        let fd = spawned.pipe.as_raw_fd();
        let mut worker = Worker::new(spawned.pid, slot, token, Some(spawned.pipe));
        worker.generation = self.generation;
        self.workers.insert(worker);
        info!("worker {} spawned", spawned.pid);
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
            .map_err(|err| Error::io(format!("watching the pipe of worker {}", spawned.pid), err))
    }

    /// The fds a worker must not inherit: the epoll, the signalfd, and every
    /// worker's pipe.
    fn master_fds(&self) -> Vec<RawFd> {
        let pipes = self
            .workers
            .iter()
            .filter_map(|w| w.pipe.as_ref().map(|p| p.as_raw_fd()));
        [self.poll.as_raw_fd(), self.signals.as_raw_fd()]
            .into_iter()
            .chain(pipes)
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
    }
}

/// Reads and acts on every message in a worker's pipe, until it would block.
fn drain_pipe(registry: &Registry, worker: &mut Worker, graceful: Duration) {
    loop {
        match worker.receive() {
            Received::Message(message) => on_message(worker, message, graceful),
            Received::Nothing => return,
            Received::Closed => return close_pipe(registry, worker),
            Received::Malformed(err) => {
                if worker.state.counts() {
                    warn!("worker {} sent malformed ipc ({err}); replacing it", worker.pid);
                }
                worker.state = worker.state.next(Event::Malformed);
                ask_to_stop(worker, graceful);
                return close_pipe(registry, worker);
            }
            Received::Failed(err) => {
                error!("reading the pipe of worker {}: {err}", worker.pid);
                return close_pipe(registry, worker);
            }
        }
    }
}

fn on_message(worker: &mut Worker, message: Message, graceful: Duration) {
    let pid = worker.pid;
    match message {
        Message::Ready => {
            if worker.state == State::Starting {
                info!("worker {pid} ready");
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
    }
}

/// SIGTERM, and SIGKILL after `graceful` if it has not gone by then.
fn ask_to_stop(worker: &mut Worker, graceful: Duration) {
    worker.state = worker.state.next(Event::Stop);
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
    if let Err(err) = signal::kill(pid, signal) {
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
