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

    #[test]
    fn a_core_dump_and_other_statuses_are_said_too() {
        let pid = Pid::from_raw(4321);
        assert_eq!(
            describe(&WaitStatus::Signaled(pid, Signal::SIGABRT, true)),
            "signal 6, core dumped"
        );
        assert_eq!(
            describe(&WaitStatus::Stopped(pid, Signal::SIGSTOP)),
            "Stopped(Pid(4321), SIGSTOP)"
        );
    }

    /// Forks a child that leaves with `code` at once, or waits to be killed
    /// (at the latest when its parent ends).
    fn child(code: Option<i32>) -> Result<Pid, String> {
        let parent = nix::unistd::getpid();
        // SAFETY: the child only calls prctl, getppid, pause and _exit.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => loop {
                // SAFETY: PR_SET_PDEATHSIG takes a signal number; getppid,
                // pause and _exit have no preconditions.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if let Some(code) = code {
                        libc::_exit(code);
                    }
                    if libc::getppid() != parent.as_raw() {
                        libc::_exit(1);
                    }
                    libc::pause();
                }
            },
            Ok(nix::unistd::ForkResult::Parent { child }) => Ok(child),
            Err(err) => Err(format!("fork: {err}")),
        }
    }

    #[test]
    fn exited_children_are_collected_one_by_one_and_then_none() {
        // In a child of its own: it reaps any child, another test's too.
        let outcome = crate::signals::tests::in_child(|| {
            if let Some(found) = next_exited() {
                return Err(format!("{found:?} with no child"));
            }
            let alive = child(None)?;
            let exiting = child(Some(3))?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let collected = loop {
                match next_exited() {
                    Some(found) => break found,
                    None if std::time::Instant::now() < deadline => std::thread::yield_now(),
                    None => return Err("the exit was never collected".into()),
                }
            };
            if collected != (exiting, WaitStatus::Exited(exiting, 3)) {
                return Err(format!("collected {collected:?}"));
            }
            if let Some(found) = next_exited() {
                return Err(format!("{found:?} while {alive} lives"));
            }
            let _ = nix::sys::signal::kill(alive, Signal::SIGKILL);
            wait_for(alive);
            match waitpid(alive, Some(WaitPidFlag::WNOHANG)) {
                Err(Errno::ECHILD) => Ok(()),
                other => Err(format!("{alive} was not reaped: {other:?}")),
            }
        });
        assert_eq!(outcome, Ok(()));
    }
}
