//! Node's `uncaughtException` handler, in Rust: catch, tell, retire, then log.
//!
//! The article's worker, on an uncaught exception, sends the master a
//! "suicide" message, stops accepting, and exits once its connections are
//! done, so that the master forks the replacement at once instead of waiting
//! for the exit. A respawn worker does the same after `catch_unwind`:
//!
//! 1. stop accepting (the listener fd becomes /dev/null, see [`crate::stop`]);
//!    the socket stays open in the master and the other workers, so no
//!    queued connection is lost;
//! 2. send `Suicide { reason }`: the master marks this worker Retiring and
//!    forks its replacement now;
//! 3. answer the client of the failed request if it can;
//! 4. log `worker 4321 panicked at src/app.rs:76:25: <message>`, and exit.
//!
//! Steps 1 and 2 are `retire` in the crate root, shared with the worker
//! that retires after serving its share (`Config::max_requests`); this
//! module holds what is particular to panics.
//!
//! # Why the log line comes after the Suicide
//!
//! A panic hook runs at the panic point, before the stack unwinds to
//! `catch_unwind`. A hook that logs there writes to stderr before the worker
//! has told anyone it is done; and when stderr is a pipe nobody reads (a
//! stalled journald, `| tee` onto a full disk), that write blocks for good,
//! the Suicide is never sent, and the master never forks the replacement.
//! So while the worker's own code runs a service call ([`catch`]), the hook
//! only records the message and where it was raised, in memory; the worker
//! sends Suicide and answers its client first, and logs the recorded line
//! last. A blocked log can then still hold up the exit of a worker that has
//! handed over (a logger that never blocks is the embedder's to choose),
//! but never the handover or the answer.
//!
//! A panic outside [`catch`] (in code of the embedder's around the worker,
//! say) is logged by the hook at once, as a default hook would.

use log::error;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The longest panic message kept, in bytes: a panic can carry a large
/// formatted value, and a log line that size helps nobody. Longer ones are
/// cut on a character boundary and end with [`CUT_MARK`].
pub const MAX_MESSAGE: usize = 4096;
/// What ends a message cut to [`MAX_MESSAGE`] bytes.
pub const CUT_MARK: &str = " [...]";

thread_local! {
    /// Inside [`catch`]: the hook records instead of logging.
    static DEFERRING: Cell<bool> = const { Cell::new(false) };
    /// The panic the hook recorded inside [`catch`], taken when it returns.
    static RECORDED: RefCell<Option<Panic>> = const { RefCell::new(None) };
}

/// A panic caught by [`catch`]: what it said and where it was raised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Panic {
    /// The panic's text, cut to [`MAX_MESSAGE`] bytes.
    pub message: String,
    /// `file:line:col`, when the hook saw it (it does not when another
    /// hook replaced this crate's).
    pub location: Option<String>,
}

impl Panic {
    /// Logs `worker <pid> panicked at <file:line:col>: <message>`; with no
    /// logger that takes error lines, writes it to stderr, as the default
    /// hook it replaced would have (a panic is never said nowhere).
    pub fn log(&self) {
        if log::log_enabled!(log::Level::Error) {
            error!("worker {} {self}", std::process::id());
        } else {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "worker {} {self}", std::process::id());
        }
    }
}

impl fmt::Display for Panic {
    /// `panicked at <file:line:col>: <message>`, or `panicked: <message>`
    /// without a location.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(at) => write!(f, "panicked at {at}: {}", self.message),
            None => write!(f, "panicked: {}", self.message),
        }
    }
}

/// Replaces the panic hook (the default one prints `thread 'main' panicked`
/// to stderr at once; one of the program's own is replaced too, in the
/// worker) with one that records a panic raised inside [`catch`] and logs
/// any other at once, saying which worker panicked and where.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let panic = Panic {
            message: bounded(message(info.payload())),
            location: info.location().map(|at| at.to_string()),
        };
        if !DEFERRING.get() {
            panic.log();
            return;
        }
        // A second panic while one is recorded is most often one in a Drop
        // while the first unwinds, which aborts the process as soon as this
        // hook returns: both are said now, or never, and whatever follows
        // (std's own word on the abort) at once. (Else the program caught
        // the first itself: the second is the one that reaches `catch`.)
        match RECORDED.replace(Some(panic.clone())) {
            None => {}
            Some(first) => {
                first.log();
                panic.log();
                DEFERRING.set(false);
            }
        }
    }));
}

/// Runs `f`, catching a panic: `Err` holds what the hook recorded (or, if
/// this crate's hook is not installed, what the payload says). Nothing is
/// logged: the caller logs the panic once it has told the master.
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
    let outer = DEFERRING.replace(true);
    RECORDED.take();
    let result = catch_unwind(AssertUnwindSafe(f));
    DEFERRING.set(outer);
    let recorded = RECORDED.take();
    result.map_err(|payload| {
        recorded.unwrap_or_else(|| Panic {
            message: bounded(message(payload.as_ref())),
            location: None,
        })
    })
}

/// The text of a panic payload: what `panic!` was given, when it was text.
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-text panic payload".to_owned()
    }
}

/// `message` cut to at most [`MAX_MESSAGE`] bytes, mark included, on a
/// character boundary.
fn bounded(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let room = MAX_MESSAGE - CUT_MARK.len();
    let end = (0..=room).rev().find(|&end| message.is_char_boundary(end));
    message.truncate(end.unwrap_or(0));
    message.push_str(CUT_MARK);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{global, logged};

    #[test]
    fn a_panic_inside_catch_is_recorded_with_its_location_not_logged() {
        let _global = global();
        install_hook();
        let line = line!() + 1;
        let caught = catch(|| -> u8 { panic!("boom {}", 42) }).expect_err("it panicked");
        assert_eq!(caught.message, "boom 42");
        assert_eq!(caught.location, Some(format!("{}:{line}:39", file!())));
        assert_eq!(
            logged(),
            Vec::<String>::new(),
            "nothing logged before the caller says"
        );
        caught.log();
        assert_eq!(
            logged(),
            [format!(
                "ERROR worker {} panicked at {}:{line}:39: boom 42",
                std::process::id(),
                file!()
            )]
        );
    }

    /// A panic in a Drop while another unwinds aborts the process when the
    /// hook returns: both are said by then. (Here the first is caught by
    /// the closure itself, which also makes a second panic under `catch`.)
    #[test]
    fn a_second_panic_inside_catch_says_both_at_once() {
        let _global = global();
        install_hook();
        let caught = catch(|| {
            let _ = catch_unwind(|| panic!("first"));
            assert_eq!(logged(), Vec::<String>::new(), "one panic: deferred");
            panic!("second")
        })
        .expect_err("it panicked");
        assert_eq!(caught.message, "second");
        let said: Vec<String> = logged()
            .iter()
            .map(|l| l.rsplit(": ").next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(said, ["first", "second"]);
    }

    #[test]
    fn catch_returns_what_the_closure_returns_and_records_nothing() {
        let _global = global();
        install_hook();
        assert_eq!(catch(|| 7), Ok(7));
        // A value left over from an earlier panic would be taken as this one's.
        let first = catch(|| panic!("first")).expect_err("first");
        let second = catch(|| panic!("second")).expect_err("second");
        assert_eq!(
            (first.message.as_str(), second.message.as_str()),
            ("first", "second")
        );
    }

    #[test]
    fn a_panic_outside_catch_is_logged_at_once() {
        let _global = global();
        install_hook();
        // Outer catch_unwind only keeps the test alive; it records nothing.
        let line = line!() + 1;
        let result = catch_unwind(|| panic!("not deferred"));
        assert!(result.is_err());
        assert_eq!(
            logged(),
            [format!(
                "ERROR worker {} panicked at {}:{line}:38: not deferred",
                std::process::id(),
                file!()
            )]
        );
        // And it does not linger to be taken by the next catch.
        let next = catch(|| panic!("next")).expect_err("next");
        assert_eq!(next.message, "next");
    }

    #[test]
    fn catch_restores_logging_at_once_after_it_returns() {
        let _global = global();
        install_hook();
        let _ = catch(|| ());
        let _ = catch(|| panic!("inside"));
        let _ = catch_unwind(|| panic!("after"));
        let lines = logged();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].ends_with(": after"), "{lines:?}");
    }

    #[test]
    fn without_this_hook_the_payload_still_gives_the_message() {
        let _global = global();
        // The default hook prints to stderr; any hook but ours will do.
        std::panic::set_hook(Box::new(|_| {}));
        let caught = catch(|| panic!("{}", String::from("formatted"))).expect_err("panicked");
        install_hook();
        assert_eq!(
            caught,
            Panic {
                message: "formatted".to_owned(),
                location: None
            }
        );
        assert_eq!(caught.to_string(), "panicked: formatted");
    }

    #[test]
    fn long_messages_are_bounded_on_a_character_boundary() {
        let _global = global();
        install_hook();
        // Three bytes each: the room left for text is not a multiple of 3.
        let huge = "€".repeat(MAX_MESSAGE);
        assert_ne!((MAX_MESSAGE - CUT_MARK.len()) % 3, 0);
        let caught = catch(|| panic!("{huge}")).expect_err("panicked");
        let kept = caught.message.strip_suffix(CUT_MARK).expect("marked as cut");
        assert_eq!(kept.len(), (MAX_MESSAGE - CUT_MARK.len()) / 3 * 3);
        assert!(huge.starts_with(kept));

        let exact = "x".repeat(MAX_MESSAGE);
        assert_eq!(bounded(exact.clone()), exact, "a message that fits is kept whole");
        let over = bounded("x".repeat(MAX_MESSAGE + 1));
        assert_eq!(over.len(), MAX_MESSAGE);
        assert!(over.ends_with(CUT_MARK));
    }

    #[test]
    fn payloads_give_their_text() {
        assert_eq!(message(&"static"), "static");
        assert_eq!(message(&String::from("owned")), "owned");
        assert_eq!(message(&42u32), "non-text panic payload");
    }
}
