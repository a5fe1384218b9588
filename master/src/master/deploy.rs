//! The verbs that change what the workers should run: HUP (a rollout),
//! USR2 (an upgrade, see upgrade.rs for its steps), their back-outs, the
//! master's re-execution, and the adoption of the workers by the new image.
//!
//! Each of them changes only what is wanted (`wanted`, `upgrade`, `reload`), never
//! what a worker runs: a worker's build is fixed at its fork. Then
//! `manage_workers` forks and retires toward what is wanted, and `settle`
//! (settle.rs) decides when it is over; the re-execution is called from
//! there, once per turn, never from a signal's handler.

use super::*;
use crate::handdown::{AdoptedWorker, MasterState};
use crate::notified;
use crate::privileges;
use crate::status;
use std::os::fd::{FromRawFd, OwnedFd};

/// How long a master about to re-execute waits for stderr to take the lines
/// it holds: the new image starts with an empty queue.
const LAST_LINES_BEFORE_EXEC: Duration = Duration::from_secs(1);
/// How long a master about to re-execute waits for control clients that
/// cannot be handed down to take their answers.
const CONTROL_PATIENCE_BEFORE_EXEC: Duration = Duration::from_millis(200);

/// A HUP's rollout: with `-- CMD` it runs the code on disk now, which a
/// deploy may have broken. Set at the first HUP, kept until the rollout is
/// done, or, once it backed out, until the next HUP or USR2.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reload {
    /// What was wanted before the first HUP: wanted again if it backs out.
    before: Wanted,
    /// The generation of the first HUP: its workers are this one's or later.
    since: u64,
    /// A worker of it failed to start, and it backed out.
    pub(super) backed_out: bool,
}

impl<W: FnMut(Handoff) -> i32> Master<W> {
    /// HUP: a rolling restart. Every counted worker becomes outdated;
    /// `manage_workers` replaces them one at a time. `by` says who asked,
    /// to begin its lines: `received SIGHUP`, or `control socket: reload`.
    /// Err: why nothing was done.
    pub(super) fn restart_every_worker(&mut self, by: &str) -> Result<(), String> {
        if self.stopping {
            info!("{by} while stopping; ignored");
            return Err("the master is stopping".to_owned());
        }
        if self.upgrade.is_some() {
            info!("{by} during an upgrade, which replaces every worker already; ignored");
            return Err("an upgrade is under way, which replaces every worker already".to_owned());
        }
        for said in self.listeners.restore_socket_files() {
            match said {
                Ok(line) => info!("{by}: {line}"),
                Err(why) => warn!("{by}: {why}"),
            }
        }
        self.notify.reloading();
        self.owed.reloading = true;
        if self.workers.counted() == 0 {
            // A reload that systemd waits for (notify-reload) ends at once:
            // settle sends READY=1 at the end of this turn.
            info!("{by} with no worker running; nothing to replace");
            return Ok(());
        }
        if self.rolling {
            info!("{by} during a rolling restart; every worker started before now will be replaced");
        } else {
            info!("{by}, replacing every worker, one at a time");
        }
        // A HUP during a rollout goes back, if it must, to before the first;
        // one after a back-out is a new attempt, and any answer the back-out
        // still owed is superseded by this one's.
        if self.reload.is_none_or(|reload| reload.backed_out) {
            self.reload = Some(Reload {
                before: self.wanted,
                since: self.generation + 1,
                backed_out: false,
            });
            self.owed.reload_backed_out = None;
        }
        self.generation += 1;
        self.wanted.since = self.generation;
        self.rolling = true;
        Ok(())
    }

    /// Is this failed start (the caller judged it one) the reload's doing:
    /// a worker forked since its first HUP, during the rollout, or after
    /// it backed out while workers started before it still serve? Once
    /// none serves, failed starts count again: a service that cannot run
    /// at all is given up on.
    pub(super) fn reload_failed(&self, worker: &Worker) -> bool {
        let Some(reload) = self.reload.filter(|_| self.upgrade.is_none()) else {
            return false;
        };
        let serving = self
            .workers
            .iter()
            .any(|w| w.state == State::Ready && w.generation < reload.since);
        worker.image == self.wanted.image
            && worker.generation >= reload.since
            && (!reload.backed_out || serving)
    }

    /// A worker of a HUP's rollout failed to start. The first time, the
    /// rollout backs out, as an upgrade does: what was wanted before is
    /// wanted again, so the workers started before it serve on and are no
    /// longer replaced (the rollout's workers already Ready stay too). Any
    /// fork of the same code after that (a slot to fill, after a retired
    /// or crashed worker left) fails the same way: its slot backs off, and
    /// nothing counts toward giving up, until the next HUP or USR2. A bad
    /// deploy must not take the service down.
    pub(super) fn back_out_of_reload(&mut self, failed: &Worker, how: &str) {
        let superseded = !self.wanted.is_run_by(failed);
        let Some(reload) = self.reload.as_mut() else {
            return;
        };
        let delay = self.backoff.died_young(failed.slot, Instant::now());
        if !reload.backed_out && superseded {
            // Started by a HUP that a later one superseded: the later one
            // decides, with its own workers.
            warn!(
                "worker {} exited ({how}) before it proved itself; a later SIGHUP superseded the \
                 rolling restart that started it: slot {} retries in {:.1} s, not counted toward \
                 giving up",
                failed.pid,
                failed.slot,
                delay.as_secs_f64()
            );
            return;
        }
        if reload.backed_out {
            warn!(
                "worker {} exited ({how}) before it proved itself, as the rolling restart that \
                 backed out did; slot {} retries in {:.1} s, not counted toward giving up \
                 (fix the program, then SIGHUP)",
                failed.pid,
                failed.slot,
                delay.as_secs_f64()
            );
            return;
        }
        reload.backed_out = true;
        self.wanted = reload.before;
        warn!(
            "rolling restart backed out: its worker {} exited ({how}) {:.2} s after it was forked; \
             the workers started before it serve on, and SIGHUP may be sent again",
            failed.pid,
            failed.spawned_at.elapsed().as_secs_f64()
        );
        self.rolling = self.workers.outdated(self.wanted) > 0;
        self.owed.reload_backed_out = Some(format!(
            "backed out: worker {} exited ({how}) before it proved itself; the workers started \
             before the reload serve on",
            failed.pid
        ));
    }

    /// USR2: start the binary now on disk as new workers, one at a time as
    /// in a rolling restart; the master follows once one has proved itself
    /// and no old worker accepts any more (upgrade.rs, settle.rs).
    /// `by` as for `restart_every_worker`. Err: why it did not begin.
    pub(super) fn upgrade_to_new_binary(&mut self, by: &str) -> Result<(), String> {
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
        if self.target == 0 || self.workers.counted() == 0 {
            info!(
                "{by}, upgrading to {path}: no worker runs now, so one is started from it first, \
                 to prove it before the master follows"
            );
        } else {
            info!("{by}, upgrading to {path}: each old worker stops once a new one is ready");
        }
        self.notify.reloading();
        self.owed.reloading = true;
        // A rollout under way goes on if the upgrade backs out (and may
        // back out itself then): it is kept for that. One that backed out
        // is over: the upgrade is a new attempt.
        self.reload = self.reload.filter(|reload| !reload.backed_out);
        self.generation += 1;
        let before = self.wanted;
        self.wanted = Wanted {
            image: self.image + 1,
            since: self.generation,
        };
        self.upgrade = Some(Upgrade {
            image: self.wanted.image,
            before,
            started: Instant::now(),
            proved: false,
        });
        Ok(())
    }

    /// A worker of the new binary said Ready: the binary starts and
    /// serves. From then on the probe (`wanted_count`) is not needed.
    pub(super) fn note_upgrade_proved(&mut self) {
        if let Some(upgrade) = self.upgrade.as_mut() {
            if !upgrade.proved && self.workers.proved(upgrade.image) {
                upgrade.proved = true;
            }
        }
    }

    /// Did a worker of the new binary die before it proved itself: before
    /// it said Ready, or younger than the minimum uptime?
    pub(super) fn new_binary_failed(&self, worker: &Worker) -> bool {
        self.upgrade.is_some_and(|upgrade| {
            worker.image == upgrade.image
                && (!worker.was_ready || worker.spawned_at.elapsed() < self.config.min_uptime)
        })
    }

    /// The new binary is broken: what was wanted before is wanted again.
    /// The old workers never stopped serving (each is asked to stop only
    /// once a new one is Ready); the new binary's starting workers are
    /// stopped now, its Ready ones are outdated and replaced one at a time.
    /// Nothing counts toward giving up: a bad deploy must not take the
    /// service down.
    pub(super) fn back_out_of_upgrade(&mut self, failed: &Worker, how: &str) {
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
        self.return_to(upgrade.before);
        self.owed.upgrade_ended = Some(Err(format!(
            "backed out: worker {} of the new binary exited ({how}) before it proved itself",
            failed.pid
        )));
    }

    /// Wants `before` again, after an upgrade that failed.
    fn return_to(&mut self, before: Wanted) {
        self.wanted = before;
        let graceful = self.config.graceful_timeout;
        for worker in self.workers.iter_mut() {
            if !before.is_run_by(worker) && worker.state == State::Starting {
                // Holding no connection, it has nothing to finish.
                ask_to_stop(worker, graceful);
                kill(worker);
            }
        }
        self.rolling |= self.workers.outdated(self.wanted) > 0;
    }

    /// Every worker runs the new binary, and no old one accepts: the master
    /// executes it too, in place (same pid), handing down everything it
    /// knows (handdown.rs). Returns only if that failed: then the upgrade
    /// is backed out, and every party that asked is told (settle.rs).
    pub(super) fn reexec_as_new_binary(&mut self, upgrade: Upgrade) {
        let path = self.program.path.display().to_string();
        info!(
            "upgrade: every worker runs {path}, {:.2} s after it began; \
             the master re-executes itself as it (pid {} kept)",
            upgrade.started.elapsed().as_secs_f64(),
            std::process::id()
        );
        // Answers decided this turn go out first: their requests are read,
        // and a connection handed down is one still to send its request.
        self.send_replies();
        let conns = match self.control.as_mut() {
            Some(control) => {
                control.finish_for_exec(CONTROL_PATIENCE_BEFORE_EXEC, self.poll.registry());
                control.handed_down()
            }
            None => Vec::new(),
        };
        let state = self.state_to_hand_down(upgrade, &conns);
        let kept: Vec<RawFd> = state
            .workers
            .iter()
            .flat_map(|w| [w.pipe, w.notify])
            .flatten()
            .chain(state.scoreboard.map(|(fd, _)| fd))
            .chain(state.control)
            .chain(conns.iter().map(|(fd, _)| *fd))
            .collect();
        logbuf::flush_before_exit(LAST_LINES_BEFORE_EXEC);
        let mut more = self.notify.for_successor();
        if let Some(run_as) = &self.config.run_as {
            more.push((privileges::HANDED_DOWN_VAR, run_as.to_handed_down().into()));
        }
        let err = upgrade::reexec_master(&self.program, &state, &self.listeners.fds(), &kept, &more);
        let why = format!("re-executing the master as {path}: {}", describe(&err));
        error!(
            "upgrade: {why}; backed out: the running version serves on, \
             and replaces the new binary's workers one at a time"
        );
        self.return_to(upgrade.before);
        self.owed.upgrade_ended = Some(Err(format!("{why}; the running version serves on")));
    }

    /// What the next image must know; `conns` are the control connections
    /// kept open across the exec.
    fn state_to_hand_down(&self, upgrade: Upgrade, conns: &[(RawFd, Option<Pending>)]) -> MasterState {
        MasterState {
            image: upgrade.image,
            target: self.target,
            generation: self.generation,
            since: self.wanted.since,
            signal_mask: self.signals.saved_mask(),
            scoreboard: self
                .scoreboard
                .file()
                .map(|fd| (fd.as_raw_fd(), self.scoreboard.rows())),
            control: self.control.as_ref().map(Control::listener_fd),
            conns: conns.to_vec(),
            started: self.started,
            counters: self.counters.clone(),
            backoff: self.backoff.slots().collect(),
            restarts: self.restarts.history().collect(),
            reloading: self.owed.reloading,
            announced: self.owed.announced,
            workers: self
                .workers
                .iter()
                .map(|w| AdoptedWorker {
                    pid: w.pid.as_raw(),
                    slot: w.slot,
                    pipe: w.pipe.as_ref().map(AsRawFd::as_raw_fd),
                    image: w.image,
                    generation: w.generation,
                    state: w.state,
                    was_ready: w.was_ready,
                    spawned_at: w.spawned_at,
                    kill_at: w.kill_at,
                    killed: w.killed,
                    hung: w.hung,
                    notify: w.notify.as_ref().map(AsRawFd::as_raw_fd),
                })
                .collect(),
        }
    }

    /// After an upgrade's re-execution: this image takes over what the
    /// previous one handed down. A worker that is no longer this process's
    /// child (a wrapper script run during the exec may have reaped it) is
    /// not adopted, and said in a line: its slot is filled again.
    pub(super) fn adopt(&mut self, state: MasterState) {
        self.image = state.image;
        self.target = state.target;
        self.generation = state.generation;
        self.wanted = Wanted {
            image: state.image,
            since: state.since,
        };
        self.started = state.started;
        self.counters = state.counters;
        for (slot, delay, until) in state.backoff {
            self.backoff.restore(slot, delay, until);
        }
        self.restarts.restore(state.restarts);
        self.owed.reloading = state.reloading;
        self.owed.announced = state.announced;
        let path = self.program.path.display().to_string();
        self.owed.upgrade_ended = Some(Ok(format!(
            "{{\"generation\":{},\"path\":{}}}\n",
            self.generation,
            status::string(&path)
        )));
        let children = strays::children();
        let mut adopted = 0;
        for handed in state.workers {
            // SAFETY: the previous image left this fd open for us alone
            // (the state naming it is removed, and names each fd once).
            let pipe = handed.pipe.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
            // SAFETY: as for the pipe.
            let notify = handed.notify.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
            let pid = Pid::from_raw(handed.pid);
            if !children.contains(&pid) {
                say_gone_during_the_exec(pid, handed.state);
                continue; // its pipe is closed as it drops
            }
            // Above the floor again, close-on-exec: closed in each fork
            // with one close_range, not one by one.
            let pipe = pipe.map(|pipe| self.floor.lift_or_keep(pipe));
            let notify = notify.map(|fd| notified::adopt(self.floor.lift_or_keep(fd)));
            self.adopt_worker(handed, pipe, notify);
            adopted += 1;
        }
        info!(
            "master re-executed as {path} (pid {} kept), {adopted} worker{} adopted",
            std::process::id(),
            if adopted == 1 { "" } else { "s" }
        );
    }

    fn adopt_worker(
        &mut self,
        handed: AdoptedWorker,
        pipe: Option<OwnedFd>,
        notify: Option<std::os::unix::net::UnixDatagram>,
    ) {
        let token = Token(self.next_token);
        self.next_token += 1;
        let mut worker = Worker::new(Pid::from_raw(handed.pid), handed.slot, token, pipe);
        worker.image = handed.image;
        worker.generation = handed.generation;
        worker.state = handed.state;
        worker.was_ready = handed.was_ready;
        worker.spawned_at = handed.spawned_at;
        worker.kill_at = handed.kill_at;
        worker.killed = handed.killed;
        worker.hung = handed.hung;
        worker.notify = notify;
        self.watch_worker(&mut worker);
        self.workers.insert(worker);
    }
}

/// A worker handed down that is no longer this process's child: it died
/// during the exec, and what ran before this image (a wrapper script, say)
/// reaped it, so its status is not known. A counted one's slot is filled
/// again by the next turn; a retiring one was leaving anyway.
fn say_gone_during_the_exec(pid: Pid, state: State) {
    let why = "status unknown: reaped by what ran before this image, a wrapper script?";
    if state.counts() {
        warn!("worker {pid} exited during the re-exec ({why}), replacing");
    } else {
        info!("worker {pid} exited during the re-exec ({why}); it was retiring");
    }
}

/// The state the previous image handed down, if this is a re-executed
/// master. An unreadable one, or one that names a listener's fd as one of
/// its own (two owners of one fd), is refused whole: one line, every child
/// of this process killed (nothing could supervise them) and reaped, and a
/// fresh start.
pub(super) fn read_handed_down(
    handed: Result<Option<MasterState>, String>,
    listeners: &[RawFd],
) -> Option<MasterState> {
    let handed = handed.and_then(|state| match state {
        Some(state) => {
            let shared = state.fds().find(|fd| listeners.contains(fd));
            match shared {
                Some(fd) => Err(format!("it names fd {fd}, which is a listener")),
                None => Ok(Some(state)),
            }
        }
        None => Ok(None),
    });
    match handed {
        Ok(state) => state,
        Err(why) => {
            let children = strays::children();
            error!(
                "adopting the workers of the previous master: {why}; killing its {} children \
                 and starting afresh",
                children.len()
            );
            for pid in children {
                send(pid, Signal::SIGKILL);
                reap::wait_for(pid);
            }
            None
        }
    }
}
