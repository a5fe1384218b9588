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
//! It looks for such children after every reap and every Ready (the moments
//! a worker's descendants are orphaned or started), says each one it finds
//! in a line, reaps them when they exit, and ends them with the workers: a
//! stop sends them SIGTERM, and SIGKILL after the graceful timeout, and the
//! master exits only once they are gone too.
//!
//! What it cannot see: a descendant whose parent is still alive is not the
//! master's child; it is found once its parent exits.

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
    /// Something happened (a reap, a Ready) after which one may be found.
    look: bool,
    /// Set by a stop: strays found from then on are stopped at once
    /// (Some(graceful)), or killed (None).
    stopping: Option<Option<Duration>>,
    /// Lines said about strays found in the last second, for the rate limit.
    said: Option<(Instant, usize)>,
}

struct Stray {
    pid: Pid,
    kill_at: Option<Instant>,
    killed: bool,
}

impl Strays {
    pub(crate) fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Look for new strays at the end of this turn.
    pub(crate) fn look_soon(&mut self) {
        self.look = true;
    }

    pub(crate) fn wants_a_look(&self) -> bool {
        self.look
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
        self.look = false;
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
            if let Some(graceful) = self.stopping {
                stray.stop(graceful, now);
            }
            self.known.push(stray);
        }
    }

    fn say_found(&mut self, pid: Pid, now: Instant) {
        let (since, count) = self.said.get_or_insert((now, 0));
        if now.saturating_duration_since(*since) >= Duration::from_secs(1) {
            if *count > 1 {
                warn!("{} more processes left by workers were found", *count - 1);
            }
            *since = now;
            *count = 0;
        }
        *count += 1;
        if *count == 1 {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            warn!(
                "process {pid} ({}) outlived the worker that started it and is now the master's \
                 child: it is no worker, it may hold the listening socket, and it is stopped \
                 with the workers",
                comm.trim_end()
            );
        }
    }

    /// A stop: SIGTERM to every stray, and SIGKILL after `graceful`; with
    /// no graceful timeout (SIGINT), SIGKILL now.
    pub(crate) fn stop(&mut self, graceful: Option<Duration>) {
        let now = Instant::now();
        self.stopping = Some(graceful);
        for stray in &mut self.known {
            stray.stop(graceful, now);
        }
    }

    /// SIGKILL to every stray whose graceful timeout has passed.
    pub(crate) fn enforce(&mut self, now: Instant) {
        for stray in self.known.iter_mut().filter(|s| !s.killed) {
            if stray.kill_at.is_some_and(|at| at <= now) {
                stray.kill();
            }
        }
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.known.iter().filter_map(|s| s.kill_at).min()
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
    fn stop(&mut self, graceful: Option<Duration>, now: Instant) {
        match graceful {
            Some(graceful) if !self.killed => {
                send(self.pid, Signal::SIGTERM);
                self.kill_at.get_or_insert(now + graceful);
            }
            Some(_) => {}
            None => self.kill(),
        }
    }

    fn kill(&mut self) {
        send(self.pid, Signal::SIGKILL);
        self.kill_at = None;
        self.killed = true;
    }
}

/// Every child of this process, from /proc/self/task/*/children (one file
/// per thread: a child belongs to the thread that forked it; the master
/// has one), or by scanning /proc for our pid as parent where those files
/// are missing (a kernel without CONFIG_PROC_CHILDREN).
pub(crate) fn children() -> Vec<Pid> {
    let me = std::process::id();
    let mut found = None;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                let list = found.get_or_insert_with(Vec::new);
                list.extend(
                    text.split_whitespace()
                        .filter_map(|pid| pid.parse().ok())
                        .map(Pid::from_raw),
                );
            }
        }
    }
    if let Some(list) = found {
        return list;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| parent_of(pid) == Some(me as i32))
        .map(Pid::from_raw)
        .collect()
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
}
