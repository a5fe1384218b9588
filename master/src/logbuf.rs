//! The bounded, non-blocking log path (stub: replaced by the real module).

use std::io::{self, Write};

/// Where a logger (env_logger's `Target::Pipe`, say) writes its lines.
pub struct LogWriter;

/// A writer for the process's log lines that never blocks the master.
pub fn log_writer() -> LogWriter {
    LogWriter
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// The fd to watch for WRITABLE (stub).
pub(crate) fn watch_fd() -> Option<std::os::fd::RawFd> {
    None
}

/// Writes what is queued; true if bytes remain (stub).
pub(crate) fn flush_pending() -> bool {
    false
}

/// At exit (stub).
pub(crate) fn flush_before_exit(_limit: std::time::Duration) {}

/// In a forked child (stub).
pub(crate) fn become_worker() {}

/// The master's own fd, if open (stub).
pub(crate) fn master_fd() -> Option<std::os::fd::RawFd> {
    None
}
