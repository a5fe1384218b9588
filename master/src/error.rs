//! Errors that stop the master, each saying what it was doing.

use std::{fmt, io};

/// Why the master could not start or go on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed; `context` says what the master was doing,
    /// as in "binding 127.0.0.1:80" or "creating the epoll instance".
    Io { context: String, source: io::Error },
    /// The process already runs other threads, and fork would copy one.
    Threads { count: usize },
    /// Workers kept failing: more restarts than the limit allows in its
    /// window. `reason` says how many, how fast, and how the last one died.
    GaveUp { reason: String },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: impl Into<io::Error>) -> Error {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {}", describe(source)),
            Error::Threads { count } => write!(
                f,
                "refusing to fork from a process that runs {count} threads: \
                 call respawn_master::run before starting any thread"
            ),
            Error::GaveUp { reason } => write!(f, "giving up: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Threads { .. } | Error::GaveUp { .. } => None,
        }
    }
}

pub(crate) use respawn_ipc::describe;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_one_sentence() {
        let err = Error::io(
            "binding 127.0.0.1:8080",
            io::Error::from_raw_os_error(libc::EADDRINUSE),
        );
        assert_eq!(err.to_string(), "binding 127.0.0.1:8080: address already in use");
        let err = Error::io("binding 0.0.0.0:80", io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(err.to_string(), "binding 0.0.0.0:80: permission denied");
    }

    #[test]
    fn each_error_says_what_to_do_about_it() {
        let threads = Error::Threads { count: 3 };
        assert_eq!(
            threads.to_string(),
            "refusing to fork from a process that runs 3 threads: \
             call respawn_master::run before starting any thread"
        );
        let gave_up = Error::GaveUp {
            reason: "11 restarts in 2.0 s".into(),
        };
        assert_eq!(gave_up.to_string(), "giving up: 11 restarts in 2.0 s");
    }

    #[test]
    fn only_a_failed_system_call_has_a_source() {
        use std::error::Error as _;
        let err = Error::io("forking worker 3", io::Error::from_raw_os_error(libc::EAGAIN));
        let source = err.source().and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(source.and_then(io::Error::raw_os_error), Some(libc::EAGAIN));
        assert!(Error::Threads { count: 2 }.source().is_none());
        assert!(Error::GaveUp {
            reason: String::new()
        }
        .source()
        .is_none());
    }

    #[test]
    fn an_error_without_an_errno_reads_as_it_is_said() {
        assert_eq!(describe(&io::Error::other("Short read")), "short read");
        assert_eq!(describe(&io::Error::other("")), "");
    }
}
