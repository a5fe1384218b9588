//! Hung workers: found on the scoreboard, described from /proc, killed.
//!
//! A worker stamps its scoreboard row when it accepts a connection and when
//! it is done with it (shared memory, no syscall). The master does not learn
//! when a worker becomes busy, so it looks on a deadline: a worker seen busy
//! for half the timeout is sampled (its CPU time, from /proc), and one busy
//! for the whole timeout is killed. The next look is at the nearest of those
//! moments, or half a timeout from now when nobody is busy: a worker that
//! becomes busy later cannot be half-way sooner. So an idle master with a
//! 60 s timeout wakes every 30 s, and with no timeout never.
//!
//! What gunicorn's users keep asking after a bare `WORKER TIMEOUT` is *what*
//! hung. The kill says it in one line: the request line and the peer from
//! the scoreboard, and the process state from /proc/PID/stat and wchan:
//! `worker 4321 hung 61.2 s on GET /hang from 127.0.0.1:50312 (running,
//! 100% CPU); killing it`.

use nix::unistd::Pid;
use respawn_ipc::scoreboard::Snapshot;
use std::time::{Duration, Instant};

/// A worker's CPU time, read while it was busy with one connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    /// The busy_since of the connection it was taken on.
    pub busy_since: u64,
    pub at: Instant,
    pub cpu_ticks: u64,
}

/// What to do about one worker's row at a check.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Idle: nothing to watch.
    Idle,
    /// Busy, not for long yet: look again at this moment.
    LookAgainAt(Instant),
    /// Busy for half the timeout: take a CPU sample, then look again then.
    SampleAndLookAgainAt(Instant),
    /// Busy for longer than the timeout, this long.
    Hung(Duration),
}

/// Judges one row. `now_ns` is the scoreboard clock at `now`.
pub(crate) fn judge(
    row: &Snapshot,
    sample: Option<Sample>,
    timeout: Duration,
    now: Instant,
    now_ns: u64,
) -> Verdict {
    let Some(since) = row.busy_since else {
        return Verdict::Idle;
    };
    let busy = Duration::from_nanos(now_ns.saturating_sub(since));
    if busy >= timeout {
        return Verdict::Hung(busy);
    }
    let sampled = sample.is_some_and(|s| s.busy_since == since);
    let half = timeout / 2;
    if busy >= half && !sampled {
        Verdict::SampleAndLookAgainAt(now + (timeout - busy))
    } else if busy >= half {
        Verdict::LookAgainAt(now + (timeout - busy))
    } else {
        Verdict::LookAgainAt(now + (half - busy))
    }
}

/// A process's state letter and CPU time (user + system, in clock ticks),
/// from /proc/PID/stat.
pub(crate) fn cpu(pid: Pid) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold anything: fields after it.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

/// The line that says what hung, up to "; killing it".
pub(crate) fn describe(
    pid: Pid,
    row: &Snapshot,
    busy: Duration,
    sample: Option<Sample>,
    now: Instant,
) -> String {
    let mut line = format!("worker {pid} hung {:.1} s", busy.as_secs_f64());
    if !row.request.is_empty() {
        line += &format!(" on {}", row.request);
    }
    if !row.peer.is_empty() {
        line += &format!(" from {}", row.peer);
    }
    if let Some((state, ticks)) = cpu(pid) {
        line += &format!(" ({}", state_words(state, pid));
        if let Some(sample) = sample.filter(|s| Some(s.busy_since) == row.busy_since) {
            let seconds = now.saturating_duration_since(sample.at).as_secs_f64();
            let cpu = ticks.saturating_sub(sample.cpu_ticks) as f64 / clock_ticks_per_second();
            if seconds > 0.0 {
                line += &format!(", {:.0}% CPU", (100.0 * cpu / seconds).min(100.0));
            }
        }
        line += ")";
    }
    line
}

fn state_words(state: char, pid: Pid) -> String {
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan"))
        .ok()
        .filter(|w| !w.is_empty() && w != "0");
    let waiting_in = |what: &str| match &wchan {
        Some(function) => format!("{what} in {function}"),
        None => what.to_owned(),
    };
    match state {
        'R' => "running".to_owned(),
        'S' => waiting_in("sleeping"),
        'D' => waiting_in("waiting on I/O"),
        'T' | 't' => "stopped".to_owned(),
        other => format!("state {other}"),
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        ticks if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn busy_for(busy: Duration, now_ns: u64) -> Snapshot {
        Snapshot {
            busy_since: Some(now_ns - busy.as_nanos() as u64),
            ..Snapshot::default()
        }
    }

    #[test]
    fn rows_are_judged_by_how_long_they_have_been_busy() {
        let (now, now_ns, timeout) = (Instant::now(), 1_000_000_000_000, 10 * S);
        assert_eq!(
            judge(&Snapshot::default(), None, timeout, now, now_ns),
            Verdict::Idle
        );
        assert_eq!(
            judge(&busy_for(2 * S, now_ns), None, timeout, now, now_ns),
            Verdict::LookAgainAt(now + 3 * S)
        );
        assert_eq!(
            judge(&busy_for(6 * S, now_ns), None, timeout, now, now_ns),
            Verdict::SampleAndLookAgainAt(now + 4 * S)
        );
        assert_eq!(
            judge(&busy_for(11 * S, now_ns), None, timeout, now, now_ns),
            Verdict::Hung(11 * S)
        );
    }

    #[test]
    fn a_sample_is_taken_once_per_connection() {
        let (now, now_ns, timeout) = (Instant::now(), 1_000_000_000_000, 10 * S);
        let row = busy_for(6 * S, now_ns);
        let this = Sample {
            busy_since: row.busy_since.unwrap(),
            at: now,
            cpu_ticks: 0,
        };
        assert_eq!(
            judge(&row, Some(this), timeout, now, now_ns),
            Verdict::LookAgainAt(now + 4 * S)
        );
        let older = Sample {
            busy_since: 1,
            ..this
        };
        assert_eq!(
            judge(&row, Some(older), timeout, now, now_ns),
            Verdict::SampleAndLookAgainAt(now + 4 * S)
        );
    }

    #[test]
    fn this_process_has_a_state_and_cpu_time() {
        // The main thread of a test binary waits while tests run.
        let (state, _) = cpu(nix::unistd::getpid()).expect("/proc/self/stat");
        assert!(matches!(state, 'R' | 'S'), "{state}");
    }
}
