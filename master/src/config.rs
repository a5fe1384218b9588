//! What the master is asked to keep up.

use std::time::Duration;

/// How many workers to keep, and how long they have to stop.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) workers: usize,
    pub(crate) graceful_timeout: Duration,
}

impl Config {
    /// `workers` workers, 30 s to stop gracefully.
    pub fn new(workers: usize) -> Config {
        Config {
            workers,
            graceful_timeout: Duration::from_secs(30),
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
        self.graceful_timeout = timeout;
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
