//! Node's `uncaughtException` handler, in Rust: catch, tell, retire.
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
//! 3. answer the client of the failed request if it can, and exit.
//!
//! Steps 1 and 2 are `retire` in the crate root, shared with the worker
//! that retires after serving its share (`Config::max_requests`); this
//! module holds what is particular to panics.

use log::error;
use std::any::Any;

/// Replaces the default panic hook (which prints `thread 'main' panicked`)
/// with a log line that says which worker panicked and where.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = message(info.payload());
        let pid = std::process::id();
        match info.location() {
            Some(at) => error!("worker {pid} panicked at {at}: {message}"),
            None => error!("worker {pid} panicked: {message}"),
        }
    }));
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
