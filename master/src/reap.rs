//! 'exit': collect dead children, and say how they died.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The next child that has exited, or None when none is left to collect.
/// SIGCHLD coalesces, so the caller loops on this until None.
pub(crate) fn next_exited() -> Option<(Pid, WaitStatus)> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return None,
            Ok(status) => match status.pid() {
                Some(pid) => return Some((pid, status)),
                None => return None,
            },
            Err(Errno::EINTR) => continue,
            // ECHILD: no children at all.
            Err(_) => return None,
        }
    }
}

/// Waits for one specific child; used only when the master is shutting down
/// after an error, once the child has been sent SIGKILL.
pub(crate) fn wait_for(pid: Pid) {
    while let Err(Errno::EINTR) = waitpid(pid, None) {}
}

/// How a child ended, the way the log says it: "code 1", "signal 9".
pub(crate) fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("code {code}"),
        WaitStatus::Signaled(_, signal, core) => {
            let core = if *core { ", core dumped" } else { "" };
            format!("signal {}{core}", *signal as i32)
        }
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exits_are_described_as_code_or_signal() {
        let pid = Pid::from_raw(4321);
        assert_eq!(describe(&WaitStatus::Exited(pid, 1)), "code 1");
        assert_eq!(
            describe(&WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            "signal 9"
        );
    }
}
