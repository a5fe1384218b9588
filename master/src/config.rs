//! What the master is asked to keep up, and how patiently.

use crate::privileges::RunAs;
use std::path::PathBuf;
use std::time::Duration;

/// The longest any of the durations is taken to be: ten years, as good as
/// forever, and far enough from the end of `Instant` that no deadline
/// computed from it overflows (`Duration::MAX`, a common "forever", would
/// panic the master at its first stop). A timeout this long or longer is
/// no timeout at all.
pub(crate) const LONGEST: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How many workers to keep, how long they have to stop, and when to stop
/// replacing workers that keep failing. Each duration is at most ten years
/// (longer is taken as ten years, a timeout that long as none).
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) workers: usize,
    pub(crate) graceful_timeout: Duration,
    pub(crate) min_uptime: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) max_restarts: usize,
    pub(crate) restart_window: Duration,
    pub(crate) timeout: Option<Duration>,
    pub(crate) start_timeout: Option<Duration>,
    pub(crate) run_as: Option<RunAs>,
    pub(crate) pid_file: Option<PathBuf>,
    pub(crate) control: Option<PathBuf>,
    pub(crate) start_advice: Option<String>,
    pub(crate) ready_on_notify: bool,
    pub(crate) retire_once_proved: bool,
}

impl Config {
    /// `workers` workers; 30 s to stop gracefully; a worker that dies within
    /// 1 s is replaced after a delay doubling from 100 ms to 10 s; more than
    /// 10 restarts in 60 s and the master gives up; a worker busy with one
    /// connection for 60 s is killed.
    pub fn new(workers: usize) -> Config {
        Config {
            workers,
            graceful_timeout: Duration::from_secs(30),
            min_uptime: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(10),
            max_restarts: 10,
            restart_window: Duration::from_secs(60),
            timeout: Some(Duration::from_secs(60)),
            start_timeout: Some(Duration::from_secs(60)),
            run_as: None,
            pid_file: None,
            control: None,
            start_advice: None,
            ready_on_notify: false,
            retire_once_proved: false,
        }
    }

    /// How many workers the master keeps alive.
    pub fn workers(mut self, workers: usize) -> Config {
        self.workers = workers;
        self
    }

    /// How long a worker asked to stop may take to finish what it holds
    /// before the master sends SIGKILL.
    pub fn graceful_timeout(mut self, timeout: Duration) -> Config {
        self.graceful_timeout = timeout.min(LONGEST);
        self
    }

    /// A worker that dies sooner than this after it was forked "died young":
    /// its replacement waits out a backoff.
    pub fn min_uptime(mut self, uptime: Duration) -> Config {
        self.min_uptime = uptime.min(LONGEST);
        self
    }

    /// The backoff after a young death: `initial`, doubling each time the
    /// slot's worker dies young again, up to `cap`.
    pub fn backoff(mut self, initial: Duration, cap: Duration) -> Config {
        self.backoff_initial = initial.min(LONGEST);
        self.backoff_cap = cap.min(LONGEST);
        self
    }

    /// More than `max` restarts within `window` and the master gives up:
    /// it stops the workers and `run` returns [`crate::Error::GaveUp`].
    pub fn restart_limit(mut self, max: usize, window: Duration) -> Config {
        self.max_restarts = max;
        self.restart_window = window.min(LONGEST);
        self
    }
}

impl Config {
    /// A worker busy with one connection for longer than `timeout` is hung:
    /// the master kills and replaces it. None, zero or ten years and more:
    /// never (and then the master keeps no deadline for it: an idle
    /// master does not wake at all).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Config {
        self.timeout = timeout.filter(|t| !t.is_zero() && *t < LONGEST);
        self
    }
}

impl Config {
    /// A worker that has not said Ready this long after its fork is killed,
    /// and counts as a failed start (backoff, restart limit). None, zero or
    /// ten years and more: never.
    pub fn start_timeout(mut self, timeout: Option<Duration>) -> Config {
        self.start_timeout = timeout.filter(|t| !t.is_zero() && *t < LONGEST);
        self
    }
}

impl Config {
    /// Each worker becomes this user and group after its fork, before your
    /// function runs, and cannot become root again; a worker that cannot
    /// is a failed start. The master stays as it is (see [`RunAs`]).
    pub fn run_workers_as(mut self, run_as: RunAs) -> Config {
        self.run_as = Some(run_as);
        self
    }

    /// Claims `path` at start (refusing to start while another live master
    /// holds it), writes the master's pid there once the first workers are
    /// Ready, and removes it on a clean stop.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Config {
        self.pid_file = Some(path.into());
        self
    }

    /// Opens the control socket at `path` (docs/control.md): `status`,
    /// `metrics`, and `scale`, `reload`, `upgrade` and `stop`, each answered
    /// when done. Mode 0600; peers of another uid than the master's and
    /// root's are refused. Removed when `run` returns.
    pub fn control(mut self, path: impl Into<PathBuf>) -> Config {
        self.control = Some(path.into());
        self
    }
}

impl Config {
    /// What a worker must do to be Ready, said once, the first time one
    /// exits before it said Ready or is killed at the start deadline: a
    /// program of another language that never speaks the channel otherwise
    /// crash-loops with no word of why.
    pub fn start_advice(mut self, advice: impl Into<String>) -> Config {
        self.start_advice = Some(advice.into());
        self
    }
}

impl Config {
    /// Each worker gets a `NOTIFY_SOCKET` of its own (`sd_notify(3)`), and
    /// counts as Ready when it sends `READY=1` there; `STATUS=` shows in
    /// `status`, and with a timeout, `WATCHDOG=1` keeps it from being
    /// killed as hung once it has sent one (notified.rs). For programs
    /// that speak systemd's protocol rather than respawn's channel.
    pub fn ready_on_notify(mut self, on: bool) -> Config {
        self.ready_on_notify = on;
        self
    }
}

impl Config {
    /// A worker's Ready says nothing of whether its program runs (a program
    /// counted Ready at its exec, `--ready-on-exec`): no worker is retired
    /// for a new one (a rollout, an upgrade, a scale down) until that one
    /// has proved itself, by a request served or by living the minimum
    /// uptime. A release that fails in that time then backs out with the
    /// old workers still serving, where they would all be gone already.
    pub fn retire_once_proved(mut self, on: bool) -> Config {
        self.retire_once_proved = on;
        self
    }
}

impl Default for Config {
    /// One worker per CPU the process may run on.
    fn default() -> Config {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Config::new(cpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// `Duration::MAX` is a common "forever": every deadline the master
    /// computes from a duration must be representable, or it panics.
    #[test]
    fn forever_is_ten_years_and_a_timeout_that_long_is_none() {
        let config = Config::new(1)
            .graceful_timeout(Duration::MAX)
            .min_uptime(Duration::MAX)
            .backoff(Duration::MAX, Duration::MAX)
            .restart_limit(usize::MAX, Duration::MAX)
            .timeout(Some(Duration::MAX))
            .start_timeout(Some(Duration::from_secs(u64::MAX)));
        let now = Instant::now();
        for d in [
            config.graceful_timeout,
            config.min_uptime,
            config.backoff_initial,
            config.backoff_cap,
            config.restart_window,
        ] {
            assert_eq!(d, LONGEST);
            assert!(now.checked_add(d * 2).is_some(), "{d:?}");
        }
        assert_eq!((config.timeout, config.start_timeout), (None, None));
        let config = config.timeout(Some(LONGEST - Duration::from_secs(1)));
        assert_eq!(config.timeout, Some(LONGEST - Duration::from_secs(1)));
        let _ = crate::policy::RestartLimit::new(usize::MAX, Duration::MAX);
    }
}
