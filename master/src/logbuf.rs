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
