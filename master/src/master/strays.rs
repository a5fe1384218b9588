//! Strays: children of the master that are not its workers.
//!
//! A worker may start processes of its own, and one of them may outlive it:
//! a `-- CMD` program that daemonizes (forks twice, and the middle process
//! exits), a helper a crashed worker left behind. Such an orphan still holds
//! the listening socket and may go on accepting on it, unsupervised: it
//! answers requests nobody watches, survives a stop, and keeps the port
//! bound so that the next start fails with "address already in use".
//!
//! So the master makes itself the reaper of its descendants
//! (PR_SET_CHILD_SUBREAPER): an orphan is reparented to it, not to init.
//! It looks for such children shortly after every reap and every Ready (the
//! moments a worker's descendants are orphaned or started: `SOON` after,
//! so that a replacement forked in that turn runs first, and a burst of
//! them costs one look), at once during a stop, and on any turn of the
//! loop at least a second after it last looked, says each one it finds
//! (a line each, at most one a second: the others are named together when
//! that second is over), reaps them when they exit, and ends them with the
//! workers: a stop sends them SIGTERM, and SIGKILL at the stop's graceful
//! timeout, and the master exits only once they are gone too. One found
//! during a stop has what is left of that timeout, not a timeout of its
//! own: orphaned by a worker killed at the timeout, it is killed at once,
//! so the graceful timeout still bounds the stop.
//!
//! What it cannot see: a descendant whose parent is still alive is not the
//! master's child; it is found once its parent exits. One orphaned while
//! its worker lives (a daemon forked after Ready) is the master's child at
//! once, but nothing tells the master: it is found on the next turn a
//! second after the last look, whatever wakes the master (a request's
//! marks, a control request, a signal, a deadline), and at the latest when
//! its worker exits in a stop. An idle master is not woken to look.

use super::send;
use crate::reap;
use log::{debug, warn};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// Makes this process the reaper of its orphaned descendants. A kernel
/// that refuses (before 3.4) leaves them to init: a debug line.
pub(crate) fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer argument
    // and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        debug!(
            "PR_SET_CHILD_SUBREAPER: {}; orphaned descendants of workers go to init",
            std::io::Error::last_os_error()
        );
    }
}

/// The strays the master knows of, and whether it should look for more.
#[derive(Default)]
pub(crate) struct Strays {
    known: Vec<Stray>,
    /// Something happened (a reap, a Ready) after which one may be found:
    /// when to look.
    look_at: Option<Instant>,
    /// When the master last looked: it also looks on any turn at least a
    /// second after, so that a descendant a worker daemonized while it
    /// serves is found at the next event of any kind (an idle master
    /// still never wakes for it).
    looked: Option<Instant>,
    /// Set by a stop: when every stray is killed, the stop's graceful
    /// timeout (Some), or now (None, SIGINT). One found from then on is
    /// asked to stop by then, or killed if that has passed.
    stopping: Option<Option<Instant>>,
    /// The lines about strays found: at most one a second.
    said: Said,
}

/// The rate limit of the lines that say strays were found.
#[derive(Default)]
struct Said {
    /// When the last line was said.
    at: Option<Instant>,
    /// How many were found since and are not said yet.
    held: usize,
    /// The first few of those, with their names, for the line that says them.
    named: Vec<String>,
}

/// How often the master looks for strays on a turn where nothing else
/// made it look.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// How long after a reap or a Ready the master looks. Not at the end of
/// that turn: the look reads /proc (all the master's children, one file
/// per thread) and would hold up a replacement forked in the same turn,
/// which on a busy host waits for the master to sleep before it runs; and
/// a start or a storm makes thousands of reaps and Readys, each of which
/// would pay for a look over every child.
const SOON: Duration = Duration::from_millis(5);

/// How many held-back strays the line that sums them up names.
const NAMED: usize = 10;

struct Stray {
    pid: Pid,
    kill_at: Option<Instant>,
    killed: bool,
}

impl Strays {
    pub(crate) fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Look for new strays `SOON`, or at the end of this turn during a
    /// stop (the master may exit once its workers are gone, and must first
    /// find the strays they left).
    pub(crate) fn look_soon(&mut self) {
        let now = Instant::now();
        let at = match self.stopping {
            Some(_) => now,
            None => now + SOON,
        };
        self.look_at = Some(self.look_at.map_or(at, |earlier| earlier.min(at)));
    }

    pub(crate) fn wants_a_look(&self, now: Instant) -> bool {
        self.look_at.is_some_and(|at| at <= now)
            || self
                .looked
                .is_none_or(|at| now.saturating_duration_since(at) >= LOOK_EVERY)
    }

    /// A child that is not a worker exited.
    pub(crate) fn reaped(&mut self, pid: Pid, status: &WaitStatus) {
        let known = self.known.len();
        self.known.retain(|stray| stray.pid != pid);
        if self.known.len() < known {
            debug!(
                "process {pid}, left by a worker, exited ({})",
                reap::describe(status)
            );
        } else {
            debug!("reaped process {pid}, not a worker ({})", reap::describe(status));
        }
    }

    /// Takes `children` (every child of the master that is not a worker) as
    /// strays; says the new ones, at most one line a second.
    pub(crate) fn found(&mut self, children: impl IntoIterator<Item = Pid>, now: Instant) {
        self.look_at = None;
        self.looked = Some(now);
        for pid in children {
            if self.known.iter().any(|stray| stray.pid == pid) {
                continue;
            }
            self.say_found(pid, now);
            let mut stray = Stray {
                pid,
                kill_at: None,
                killed: false,
            };
            if let Some(kill_at) = self.stopping {
                stray.stop(kill_at, now);
            }
            self.known.push(stray);
        }
    }

    /// A line for `pid`, or, within a second of the last line, a place
    /// among those said together when that second is over.
    fn say_found(&mut self, pid: Pid, now: Instant) {
        self.say_held(now);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim_end();
        let said = &mut self.said;
        if said.at.is_some_and(|at| now < at + Duration::from_secs(1)) {
            said.held += 1;
            if said.named.len() < NAMED {
                said.named.push(format!("{pid} ({comm})"));
            }
            return;
        }
        said.at = Some(now);
        warn!(
            "process {pid} ({comm}) outlived the worker that started it and is now the master's \
             child: it is no worker, it may hold the listening socket, and it is stopped \
             with the workers"
        );
    }

    /// The line for the strays held back, once their second is over, or
    /// at once during a stop (the master may exit before that second).
    fn say_held(&mut self, now: Instant) {
        let Some(due) = self.held_until() else {
            return;
        };
        if now < due {
            return;
        }
        let said = &mut self.said;
        let more = if said.held > said.named.len() { ", ..." } else { "" };
        let (what, each) = match said.held {
            1 => ("process left by a worker was", "it"),
            _ => ("processes left by workers were", "each"),
        };
        warn!(
            "{} more {what} found: {}{more}; {each} is the master's child now, may hold the \
             listening socket, and is stopped with the workers",
            said.held,
            said.named.join(", ")
        );
        said.at = Some(now);
        said.held = 0;
        said.named.clear();
    }

    /// When the strays held back are said, if any are.
    fn held_until(&self) -> Option<Instant> {
        let at = self.said.at.filter(|_| self.said.held > 0)?;
        Some(match self.stopping {
            Some(_) => at,
            None => at + Duration::from_secs(1),
        })
    }

    /// A stop: SIGTERM to every stray, and SIGKILL after `graceful`; with
    /// no graceful timeout (SIGINT), SIGKILL now. A second stop never gives
    /// more time.
    pub(crate) fn stop(&mut self, graceful: Option<Duration>) {
        let now = Instant::now();
        // A look still to come is due now: see look_soon.
        self.look_at = self.look_at.map(|_| now);
        let kill_at = match (self.stopping, graceful) {
            (Some(None), _) | (_, None) => None,
            (Some(Some(earlier)), Some(graceful)) => Some(earlier.min(now + graceful)),
            (None, Some(graceful)) => Some(now + graceful),
        };
        self.stopping = Some(kill_at);
        for stray in &mut self.known {
            stray.stop(kill_at, now);
        }
    }

    /// SIGKILL to every stray whose graceful timeout has passed; the line
    /// for those held back, if it is due.
    pub(crate) fn enforce(&mut self, now: Instant) {
        for stray in self.known.iter_mut().filter(|s| !s.killed) {
            if stray.kill_at.is_some_and(|at| at <= now) {
                stray.kill();
            }
        }
        self.say_held(now);
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.known
            .iter()
            .filter_map(|s| s.kill_at)
            .chain(self.held_until())
            .chain(self.look_at)
            .min()
    }

    /// After an error: nothing the master started may outlive it.
    pub(crate) fn kill_all_and_reap(&mut self) {
        for stray in &mut self.known {
            stray.kill();
            reap::wait_for(stray.pid);
        }
        self.known.clear();
    }
}

impl Stray {
    /// SIGTERM, and SIGKILL at `kill_at`; SIGKILL now if that is now or
    /// past (None: SIGINT).
    fn stop(&mut self, kill_at: Option<Instant>, now: Instant) {
        match kill_at {
            _ if self.killed => {}
            Some(at) if at > now => {
                send(self.pid, Signal::SIGTERM);
                self.kill_at = Some(self.kill_at.map_or(at, |earlier| earlier.min(at)));
            }
            _ => self.kill(),
        }
    }

    fn kill(&mut self) {
        send(self.pid, Signal::SIGKILL);
        self.kill_at = None;
        self.killed = true;
    }
}

/// Every child of this process: from /proc/thread-self/children (3.17),
/// one file, since a child belongs to the thread that forked it and the
/// master runs one thread; else from /proc/self/task/*/children (one file
/// per thread), else by scanning /proc for our pid as parent where those
/// files are missing (a kernel without CONFIG_PROC_CHILDREN).
pub(crate) fn children() -> Vec<Pid> {
    if let Ok(text) = std::fs::read_to_string("/proc/thread-self/children") {
        return pids(&text).collect();
    }
    let mut found = None;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                found.get_or_insert_with(Vec::new).extend(pids(&text));
            }
        }
    }
    if let Some(list) = found {
        return list;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| parent_of(pid) == Some(me))
        .map(Pid::from_raw)
        .collect()
}

/// The pids of a `children` file: numbers separated by spaces.
fn pids(text: &str) -> impl Iterator<Item = Pid> + '_ {
    text.split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .map(Pid::from_raw)
}

/// The parent pid of `pid`, from /proc/PID/stat (after the name, which is
/// in parentheses and may itself hold them: state, then ppid).
pub(crate) fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_found_among_the_children_and_its_parent_is_us() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("starting sleep");
        let pid = Pid::from_raw(child.id() as i32);
        assert!(children().contains(&pid), "{:?}", children());
        assert_eq!(parent_of(pid.as_raw()), Some(std::process::id() as i32));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!children().contains(&pid));
    }

    #[test]
    fn a_look_is_due_soon_after_a_reap_and_at_once_during_a_stop() {
        let mut strays = Strays::default();
        let now = Instant::now();
        strays.found([], now);
        assert!(!strays.wants_a_look(now), "just looked");
        strays.look_soon();
        let due = strays.next_deadline().expect("a look to come");
        assert!(due > now && due <= Instant::now() + SOON, "{:?}", due - now);
        assert!(
            !strays.wants_a_look(now),
            "not in this turn: a fork may wait on it"
        );
        assert!(strays.wants_a_look(due));
        strays.look_soon();
        assert_eq!(strays.next_deadline(), Some(due), "a burst is one look");
        strays.stop(Some(Duration::from_secs(3)));
        assert!(strays.wants_a_look(Instant::now()), "the master may exit next");
        strays.found([], Instant::now());
        strays.look_soon();
        assert!(strays.wants_a_look(Instant::now()), "during a stop, at once");
    }

    #[test]
    fn strays_found_while_stopping_are_stopped_and_gone_once_reaped() {
        let mut strays = Strays::default();
        let now = Instant::now();
        let pid = Pid::from_raw(i32::MAX - 1); // no such process: signals fail quietly
        strays.found([pid], now);
        assert!(!strays.is_empty());
        assert_eq!(strays.next_deadline(), None, "not stopping: no deadline");
        strays.stop(Some(Duration::from_secs(3)));
        let deadline = strays.next_deadline().expect("a kill deadline");
        assert!(deadline > now);
        let other = Pid::from_raw(i32::MAX - 2);
        strays.found([pid, other], now);
        assert_eq!(strays.known.len(), 2, "known ones are not added twice");
        assert!(strays.known[1].kill_at.is_some(), "stopped as soon as found");
        strays.enforce(deadline + Duration::from_secs(1));
        assert!(strays.known.iter().all(|s| s.killed));
        strays.reaped(pid, &WaitStatus::Exited(pid, 0));
        strays.reaped(other, &WaitStatus::Exited(other, 0));
        assert!(strays.is_empty());
    }

    #[test]
    fn a_stray_found_after_the_stop_s_deadline_is_killed_at_once() {
        let mut strays = Strays::default();
        strays.stop(Some(Duration::from_secs(3)));
        let deadline = Instant::now() + Duration::from_secs(3);
        let early = Pid::from_raw(i32::MAX - 1);
        strays.found([early], Instant::now());
        let kill_at = strays.known[0].kill_at.expect("asked to stop, with a deadline");
        assert!(kill_at <= deadline, "the stop's deadline, not one of its own");
        let late = Pid::from_raw(i32::MAX - 2);
        strays.found([late], deadline + Duration::from_secs(1));
        assert!(strays.known[1].killed, "past the stop's deadline: killed");
        assert_eq!(strays.known[1].kill_at, None);
    }

    #[test]
    fn a_second_stop_never_gives_more_time() {
        let mut strays = Strays::default();
        strays.found([Pid::from_raw(i32::MAX - 1)], Instant::now());
        strays.stop(Some(Duration::from_secs(3)));
        let first = strays.next_deadline().expect("a kill deadline");
        strays.stop(Some(Duration::from_secs(60)));
        assert_eq!(strays.next_deadline(), Some(first));
        strays.stop(None);
        assert!(strays.known[0].killed);
        strays.stop(Some(Duration::from_secs(60)));
        assert_eq!(strays.stopping, Some(None), "INT then TERM: still killing");
    }

    #[test]
    fn strays_found_within_a_second_are_held_and_said_when_it_is_over() {
        let mut strays = Strays::default();
        let t0 = Instant::now();
        strays.found([Pid::from_raw(i32::MAX - 1)], t0);
        assert_eq!(strays.said.held, 0, "the first is said at once");
        assert_eq!(strays.next_deadline(), None);
        let half = t0 + Duration::from_millis(500);
        let more: Vec<Pid> = (2..15).map(|n| Pid::from_raw(i32::MAX - n)).collect();
        strays.found(more, half);
        assert_eq!(strays.said.held, 13);
        assert_eq!(strays.said.named.len(), NAMED, "a bounded list of names");
        let due = t0 + Duration::from_secs(1);
        assert_eq!(strays.next_deadline(), Some(due), "the master wakes to say them");
        strays.enforce(half);
        assert_eq!(strays.said.held, 13, "not before their second is over");
        strays.enforce(due);
        assert_eq!(strays.said.held, 0);
        assert!(strays.said.named.is_empty());
        assert_eq!(strays.next_deadline(), None);
    }

    #[test]
    fn during_a_stop_held_strays_are_said_at_once() {
        let mut strays = Strays::default();
        let t0 = Instant::now();
        strays.found([Pid::from_raw(i32::MAX - 1)], t0);
        strays.found([Pid::from_raw(i32::MAX - 2)], t0);
        assert_eq!(strays.said.held, 1);
        strays.stop(Some(Duration::from_secs(30)));
        assert_eq!(
            strays.next_deadline(),
            Some(t0),
            "due now: the master may exit soon"
        );
        strays.enforce(t0);
        assert_eq!(strays.said.held, 0);
    }
}
