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
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The state letter and user + system ticks of a /proc/PID/stat line.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
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
    let process = cpu(pid).map(|(state, ticks)| {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).ok();
        (state_words(state, wchan.as_deref()), ticks)
    });
    hung_line(pid, row, busy, sample, now, process)
}

/// The line, from what /proc said of the process (None when it could not
/// be read): its state in words and its CPU ticks.
fn hung_line(
    pid: Pid,
    row: &Snapshot,
    busy: Duration,
    sample: Option<Sample>,
    now: Instant,
    process: Option<(String, u64)>,
) -> String {
    let mut line = format!("worker {pid} hung {:.1} s", busy.as_secs_f64());
    if !row.request.is_empty() {
        line += &format!(" on {}", row.request);
    }
    if !row.peer.is_empty() {
        line += &format!(" from {}", row.peer);
    }
    if let Some((state, ticks)) = process {
        line += &format!(" ({state}");
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

/// A state letter in words, with the kernel function a waiting process
/// sleeps in (/proc/PID/wchan), when the kernel names one.
fn state_words(state: char, wchan: Option<&str>) -> String {
    let wchan = wchan.filter(|w| !w.is_empty() && *w != "0");
    let waiting_in = |what: &str| match wchan {
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
    ticks_or_default(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
}

/// sysconf's answer, or Linux's USER_HZ (100) if it has none.
fn ticks_or_default(ticks: libc::c_long) -> f64 {
    match ticks {
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

    #[test]
    fn cpu_time_is_user_plus_system_after_a_name_holding_parentheses() {
        let stat = "4321 (we) (ird) S 1 4321 4321 0 -1 4194560 10 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(parse_stat(stat), Some(('S', 12)));
        assert_eq!(parse_stat("4321 (cut) R 1 2"), None);
        assert_eq!(parse_stat("no parentheses"), None);
    }

    fn hung_row(request: &str, peer: &str) -> Snapshot {
        Snapshot {
            busy_since: Some(5),
            request: request.into(),
            peer: peer.into(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_hang_names_the_request_the_peer_and_the_state_of_this_very_process() {
        let pid = nix::unistd::getpid();
        let row = hung_row("GET /hang", "127.0.0.1:50312");
        let busy = Duration::from_millis(61_240);
        let text = describe(pid, &row, busy, None, Instant::now());
        let prefix = format!("worker {pid} hung 61.2 s on GET /hang from 127.0.0.1:50312 (");
        let state = text.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(')'));
        assert!(
            state.is_some_and(|s| s == "running" || s.starts_with("sleeping")),
            "{text}"
        );
    }

    #[test]
    fn a_hang_without_request_peer_or_proc_entry_is_only_its_duration() {
        let (pid, row) = (Pid::from_raw(7), hung_row("", ""));
        let text = hung_line(pid, &row, 3 * S / 2, None, Instant::now(), None);
        assert_eq!(text, "worker 7 hung 1.5 s");
        let text = hung_line(pid, &row, S, None, Instant::now(), Some(("running".into(), 0)));
        assert_eq!(text, "worker 7 hung 1.0 s (running)");
    }

    #[test]
    fn the_cpu_share_is_the_ticks_since_this_connections_sample_over_the_time() {
        let (pid, row, now) = (Pid::from_raw(7), hung_row("GET /", "10.0.0.1:9"), Instant::now());
        let sample = Sample {
            busy_since: 5,
            at: now - 3 * S,
            cpu_ticks: 100,
        };
        let state = |ticks| Some(("running".to_owned(), ticks));
        // 150 ticks are 1.5 s of CPU in 3 s.
        assert_eq!(
            hung_line(pid, &row, 12 * S, Some(sample), now, state(250)),
            "worker 7 hung 12.0 s on GET / from 10.0.0.1:9 (running, 50% CPU)"
        );
        assert_eq!(
            hung_line(pid, &row, 12 * S, Some(sample), now, state(10_000)),
            "worker 7 hung 12.0 s on GET / from 10.0.0.1:9 (running, 100% CPU)",
            "several threads' CPU is at most 100%"
        );
        let older = Sample {
            busy_since: 4,
            ..sample
        };
        assert_eq!(
            hung_line(pid, &row, 12 * S, Some(older), now, state(250)),
            "worker 7 hung 12.0 s on GET / from 10.0.0.1:9 (running)",
            "a sample of another connection says nothing of this one"
        );
        let just_now = Sample { at: now, ..sample };
        assert_eq!(
            hung_line(pid, &row, 12 * S, Some(just_now), now, state(250)),
            "worker 7 hung 12.0 s on GET / from 10.0.0.1:9 (running)",
            "no time has passed since the sample"
        );
    }

    #[test]
    fn states_are_said_in_words_with_the_kernel_function_a_sleeper_waits_in() {
        assert_eq!(state_words('R', Some("do_wait")), "running");
        assert_eq!(
            state_words('S', Some("do_epoll_wait")),
            "sleeping in do_epoll_wait"
        );
        assert_eq!(state_words('S', Some("0")), "sleeping");
        assert_eq!(state_words('S', Some("")), "sleeping");
        assert_eq!(state_words('S', None), "sleeping");
        assert_eq!(
            state_words('D', Some("io_schedule")),
            "waiting on I/O in io_schedule"
        );
        assert_eq!(state_words('T', None), "stopped");
        assert_eq!(state_words('t', None), "stopped");
        assert_eq!(state_words('Z', None), "state Z");
    }

    #[test]
    fn cpu_ticks_are_counted_in_hundredths_of_a_second() {
        assert_eq!(clock_ticks_per_second(), 100.0, "USER_HZ on Linux");
        assert_eq!(ticks_or_default(250), 250.0);
        assert_eq!(ticks_or_default(0), 100.0, "sysconf has no answer");
        assert_eq!(ticks_or_default(-1), 100.0, "sysconf failed");
    }
}
