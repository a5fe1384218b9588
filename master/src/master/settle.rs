//! What is owed, decided in one place: `settle`, once at the end of every
//! turn of the loop, after `manage_workers`, never from a handler.
//!
//! Handlers only record: a signal or a control request changes what is
//! wanted (deploy.rs), a worker's message or exit changes the table. Here,
//! with the turn's changes all in, one function asks:
//!
//! 1. Is the transition over? Every counted worker runs the build wanted,
//!    none is starting, an upgrade has a worker of the new binary that
//!    proved itself, and no retiring worker still holds a listener (it
//!    stopped accepting: `old_workers_accepting`, read from /proc). Only
//!    then is a rollout done, or the master re-executes for an upgrade.
//! 2. Is READY=1 due? Once the first workers asked for are Ready (the pid
//!    file written just before), and after RELOADING=1 when what began it
//!    has ended: a rollout done or backed out, an upgrade done (said by the
//!    new image), backed out or failed.
//! 3. What is each waiting control client answered? Every answer, those
//!    decided by a handler included, leaves from `send_replies`.
//!
//! So what a client or systemd is told is true when it is read: a reload
//! is answered once no old worker accepts any more, not when the last one
//! was signalled.

use super::*;
use crate::control::{ConnId, Request};
use crate::notify;
use crate::status;

/// While something waits for old workers to stop accepting, how soon to
/// look again: they give their listener up when they are signalled, so
/// this is the time a signal takes to be handled.
const RECHECK: Duration = Duration::from_millis(5);

/// How long a master about to exit waits for control clients to take
/// their answers.
const CONTROL_PATIENCE: Duration = Duration::from_millis(500);

/// What `settle` owes and has said.
#[derive(Default)]
pub(crate) struct Owed {
    /// READY=1 was sent once the first workers were all Ready.
    pub announced: bool,
    /// RELOADING=1 was sent: READY=1 is owed when what began it ends.
    pub reloading: bool,
    /// How the upgrade ended, once it has (a back-out, a failed exec, or
    /// the new image's adoption): for systemd and the clients that asked.
    pub upgrade_ended: Option<Result<String, String>>,
    /// Why a HUP's rollout backed out, once it has: for systemd and the
    /// clients that asked for the reload.
    pub reload_backed_out: Option<String>,
    /// Answers decided by a handler (status, refusals), sent by settle.
    replies: Vec<(ConnId, Result<String, String>)>,
    /// Old workers still held a listener: look again then.
    recheck_at: Option<Instant>,
}

impl Owed {
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.recheck_at
    }
}

impl<W: FnMut(Handoff) -> i32> Master<W> {
    /// The one place that decides what is owed (see the module doc).
    pub(super) fn settle(&mut self) {
        let now = Instant::now();
        self.owed.recheck_at = None;
        let mut quiet = self.owes_something() && self.transition_over(now);
        if quiet {
            if let Some(upgrade) = self.upgrade.take() {
                // Returns only if the exec failed, backing out: what is
                // wanted changed, and the workers follow it now.
                self.reexec_as_new_binary(upgrade);
                self.manage_workers();
                quiet = self.transition_over(now);
            }
        }
        if quiet && self.rolling {
            self.rolling = false;
            // Done: nothing of it to go back to (one that backed out stays,
            // until the next HUP or USR2).
            self.reload = self.reload.filter(|reload| reload.backed_out);
            info!("rolling restart done: every worker is new");
        }
        self.announce(quiet);
        self.answer_control(quiet, now);
    }

    /// Whether anything waits on the transition being over: only then are
    /// the workers' fds looked at.
    fn owes_something(&self) -> bool {
        self.upgrade.is_some()
            || self.rolling
            || self.owed.reloading
            || self.owed.upgrade_ended.is_some()
            || self.control.as_ref().is_some_and(|c| !c.waiting().is_empty())
    }

    /// Every counted worker runs the build wanted, none is starting, an
    /// upgrade's binary has proved itself, and no retiring worker accepts.
    fn transition_over(&mut self, now: Instant) -> bool {
        !self.stopping
            && self.workers.outdated(self.wanted) == 0
            && !self.workers.any_starting()
            && self.upgrade.is_none_or(|upgrade| upgrade.proved)
            && !self.old_workers_accepting(now)
    }

    /// Does a retiring worker still hold one of the listeners? A worker
    /// asked to stop gives its listener up at once (respawn-worker dup2s
    /// /dev/null over it; the Node and Python clients close it), so until it
    /// has, it may still accept a connection, and the rollout is not over.
    fn old_workers_accepting(&mut self, now: Instant) -> bool {
        let inodes = listener_inodes(&self.listeners);
        let accepting = self
            .workers
            .iter()
            .filter(|w| w.state == State::Retiring && !w.killed)
            .any(|w| holds_a_socket(w.pid, &inodes));
        if accepting {
            self.owed.recheck_at = Some(now + RECHECK);
        }
        accepting
    }

    /// Tells systemd the service is up once the first workers asked for are
    /// all Ready (the pid file written first, so that a script that reads
    /// it on readiness finds this master), and again after RELOADING=1 once
    /// what began it is over; the count and generation whenever they change
    /// (STATUS=; while stopping, the workers left). Sets the title.
    fn announce(&mut self, quiet: bool) {
        let ready = self.workers.iter().filter(|w| w.state == State::Ready).count();
        let status = if self.stopping {
            notify::stopping_line(self.workers.iter().count())
        } else {
            notify::status_line(ready, self.generation)
        };
        let ended = self.owed.upgrade_ended.is_some() || self.owed.reload_backed_out.is_some();
        let reload_over = self.owed.reloading && (quiet || ended);
        if !self.stopping && !self.owed.announced && ready >= self.target {
            self.owed.announced = true;
            self.owed.reloading = false;
            self.pid_file.iter().for_each(PidFile::write);
            self.notify.ready_with_status(status);
        } else if !self.stopping && self.owed.announced && reload_over {
            self.owed.reloading = false;
            let status = match (&self.owed.upgrade_ended, &self.owed.reload_backed_out) {
                (Some(Err(why)), _) => format!("upgrade failed: {why}"),
                (_, Some(why)) => format!("reload failed: {why}"),
                _ => status,
            };
            self.pid_file.iter().for_each(PidFile::write);
            self.notify.ready_with_status(status);
        } else {
            self.notify.status(status);
        }
        crate::title::show_master(
            self.workers.counted(),
            self.generation,
            self.listeners.listeners(),
        );
    }

    /// Answers the control requests that are now done: a scale whose count
    /// is all Ready, a reload whose rollout is over or backed out, an
    /// upgrade that ended;
    /// anything the master's stop overtook; and any past its bound, with
    /// the state it reached. Then sends every answer.
    fn answer_control(&mut self, quiet: bool, now: Instant) {
        let ended = self.owed.upgrade_ended.take();
        let reload_backed_out = self.owed.reload_backed_out.take();
        if let Some(control) = self.control.as_ref() {
            let ready = self.workers.iter().filter(|w| w.state == State::Ready).count();
            let counted = self.workers.counted();
            for (conn, pending) in control.waiting() {
                let answer = match pending {
                    // Answered when the master exits.
                    Pending::Stop => continue,
                    _ if self.stopping => Err("the master is stopping".to_owned()),
                    Pending::Scale(n) if self.target != n => {
                        Err(format!("superseded: {} workers are wanted now", self.target))
                    }
                    Pending::Scale(n) if quiet && ready == n && counted == n => {
                        Ok(format!("{{\"target\":{n},\"ready\":{ready}}}\n"))
                    }
                    Pending::Reload if reload_backed_out.is_some() => {
                        Err(reload_backed_out.clone().unwrap_or_default())
                    }
                    Pending::Reload if quiet => Ok(format!(
                        "{{\"generation\":{},\"ready\":{ready}}}\n",
                        self.generation
                    )),
                    Pending::Upgrade if ended.is_some() => {
                        ended.clone().unwrap_or_else(|| Err(String::new()))
                    }
                    _ => continue,
                };
                self.owed.replies.push((conn, answer));
            }
            for (conn, pending) in control.overdue(now) {
                if !self.owed.replies.iter().any(|(c, _)| *c == conn) {
                    let reached = match pending {
                        Pending::Stop => format!("{} workers still running", self.workers.iter().count()),
                        _ => self.progress(),
                    };
                    self.owed
                        .replies
                        .push((conn, Err(control::not_done(Some(&reached)))));
                }
            }
        }
        self.send_replies();
    }

    /// Where the workers are, for an answer that cannot wait any longer:
    /// `2 of 3 workers ready, 1 outdated, slot 1 waits out a backoff`.
    fn progress(&self) -> String {
        let now = Instant::now();
        let ready = self.workers.iter().filter(|w| w.state == State::Ready).count();
        let mut parts = vec![format!("{ready} of {} workers ready", self.target)];
        let outdated = self.workers.outdated(self.wanted);
        if outdated > 0 {
            parts.push(format!("{outdated} outdated"));
        }
        let starting = self.workers.iter().filter(|w| w.state == State::Starting).count();
        if starting > 0 {
            parts.push(format!("{starting} starting"));
        }
        let waiting: Vec<String> = self.backoff.waiting(now).map(|slot| slot.to_string()).collect();
        match waiting.as_slice() {
            [] => {}
            [one] => parts.push(format!("slot {one} waits out a backoff")),
            many => parts.push(format!("slots {} wait out a backoff", many.join(", "))),
        }
        if self.workers.retiring() > 0 {
            parts.push(format!("{} retiring", self.workers.retiring()));
        }
        parts.join(", ")
    }

    /// Every control answer leaves from here.
    pub(super) fn send_replies(&mut self) {
        if self.owed.replies.is_empty() {
            return;
        }
        let replies = std::mem::take(&mut self.owed.replies);
        if let Some(control) = self.control.as_mut() {
            for (conn, answer) in replies {
                control.reply(conn, answer, self.poll.registry());
            }
        }
    }

    /// The control requests still waiting when the master exits: a `stop`
    /// is done now; anything else was overtaken by the stop (or a give-up).
    pub(super) fn answer_control_at_exit(&mut self) {
        self.send_replies();
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

    /// An event of the control socket: connections, requests, room to write.
    pub(super) fn serve_control(&mut self, token: Token) {
        // Read before each round of accepts: what the workers leave.
        if control::is_listener(token) {
            self.fit_control_to_room();
        }
        let Some(control) = self.control.as_mut() else {
            return;
        };
        for (conn, request) in control.on_event(token, self.poll.registry()) {
            self.act_on_control(conn, request);
        }
    }

    /// What a control request does: answered at the end of the turn, or
    /// kept waiting until `settle` sees it done. Each request is its own:
    /// two scales in a row are two changes, where two quick TTOUs may be
    /// read as one.
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
                self.stop_now("control socket: stop now");
                None
            }
            Request::Stop { now: false } => {
                self.stop_gracefully(Some("control socket: stop"));
                None
            }
        };
        match (answer_now, pending_of(request)) {
            (Some(answer), _) => self.owed.replies.push((conn, answer)),
            (None, Some(pending)) => {
                if let Some(control) = self.control.as_mut() {
                    control.wait(conn, pending);
                }
            }
            (None, None) => {}
        }
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
        self.fit_control_to_room();
        Ok(())
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
            died_in_first_request_in_a_row: self.first_request_deaths.in_a_row(),
            listeners: &self.listeners,
            workers: &self.workers,
            scoreboard: &self.scoreboard,
            counters: &self.counters,
        }
    }
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

/// The inode numbers of the listening sockets, as /proc/PID/fd shows them
/// (`socket:[12345]`).
fn listener_inodes(listeners: &Listeners) -> Vec<u64> {
    listeners
        .listeners()
        .filter_map(|listener| nix::sys::stat::fstat(listener).ok())
        .map(|stat| stat.st_ino)
        .collect()
}

/// Does `pid` hold an fd onto one of the sockets `inodes`? A process gone,
/// or a zombie, holds none.
fn holds_a_socket(pid: Pid, inodes: &[u64]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .any(|inode: u64| inodes.contains(&inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_holding_a_listener_is_found_and_one_without_is_not() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
        let listeners = Listeners::from(tcp);
        let inodes = listener_inodes(&listeners);
        assert_eq!(inodes.len(), 1);
        let me = Pid::this();
        assert!(holds_a_socket(me, &inodes), "this process holds it");
        assert!(!holds_a_socket(me, &[inodes[0] + 1]), "not another socket");
        assert!(
            !holds_a_socket(Pid::from_raw(i32::MAX), &inodes),
            "no such process"
        );
    }
}
