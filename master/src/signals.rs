//! Signals as events: blocked, then read from a signalfd in the main loop.
//!
//! No handler runs at an arbitrary point in the master, so there is nothing
//! async-signal-safe to get right: a signal is a readable fd like any other.
//! SIGCHLD coalesces (one pending SIGCHLD may stand for many exits), which is
//! why every SIGCHLD leads to a reap loop, not to one waitpid.
//!
//! Every signal that could kill or stop the master by its default action is
//! taken this way, not only the seven it acts on: a stray USR1 from a
//! logrotate script, a WINCH from a terminal, an ALRM from a forgotten
//! `timeout` are each a log line, never the end of the service. The
//! exceptions are SIGKILL and SIGSTOP, which cannot be caught, and the fault
//! signals (SEGV, BUS, FPE, ILL, TRAP, SYS, ABRT): a master that really
//! faults must die loudly, not log and carry on in a broken state.
//!
//! The set is kept as the kernel's 64-bit mask and set with the raw
//! `rt_sigprocmask`: glibc's wrappers silently refuse signals 32 and 33,
//! which it reserves for its thread library, and whose default action is
//! still to terminate.
//!
//! Blocking is not enough: a signal whose disposition is "ignore" is thrown
//! away when sent, before any signalfd can see it, and an ignored SIGCHLD
//! even makes the kernel reap children itself. A shell starts a background
//! job (`respawn &`) with INT and QUIT ignored, so the dispositions are set
//! to default, *after* the signals are blocked: blocked, the default action
//! never runs, even for a signal sent between the two steps.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A signal number, as the kernel numbers them: 1 to 64.
pub(crate) type Signo = i32;

/// The highest signal number on Linux.
const LAST: Signo = 64;

/// Signals whose default action is the right one even in the master. TSTP
/// and CONT are job control: Ctrl-Z stops the master and its workers
/// together, as it stops any program, and `fg` (CONT) resumes them; taken
/// here, Ctrl-Z would stop the workers and leave the master running, with
/// the terminal never given back. Neither kills.
const UNTOUCHED: [Signo; 11] = [
    libc::SIGKILL,
    libc::SIGSTOP,
    libc::SIGTSTP,
    libc::SIGCONT,
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGILL,
    libc::SIGTRAP,
    libc::SIGSYS,
    libc::SIGABRT,
];

/// A set of signals as the kernel's mask: bit n-1 for signal n.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Mask(u64);

impl Mask {
    /// Every signal the master takes through its signalfd.
    pub(crate) fn taken() -> Mask {
        (1..=LAST).filter(|s| !UNTOUCHED.contains(s)).collect()
    }

    pub(crate) fn contains(self, signal: Signo) -> bool {
        (1..=LAST).contains(&signal) && self.0 & bit(signal) != 0
    }

    fn signals(self) -> impl Iterator<Item = Signo> {
        (1..=LAST).filter(move |&s| self.contains(s))
    }

    fn sigset(self) -> libc::sigset_t {
        // SAFETY: sigset_t is plain bits; all zeroes is the empty set.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: on Linux sigset_t is an array of unsigned longs at least
        // 64 bits long, and the kernel reads signals 1 to 64 from its first
        // 64 bits; writing a u64 at its start is in bounds and aligned.
        unsafe { std::ptr::write(std::ptr::addr_of_mut!(set).cast::<u64>(), self.0) };
        set
    }
}

impl FromIterator<Signo> for Mask {
    fn from_iter<I: IntoIterator<Item = Signo>>(signals: I) -> Mask {
        Mask(
            signals
                .into_iter()
                .filter(|s| (1..=LAST).contains(s))
                .map(bit)
                .fold(0, |a, b| a | b),
        )
    }
}

fn bit(signal: Signo) -> u64 {
    1 << (signal - 1)
}

/// Changes the calling thread's mask; returns the mask before.
fn sigprocmask(how: libc::c_int, mask: Mask) -> io::Result<Mask> {
    let set = mask.sigset();
    let mut old: u64 = 0;
    // SAFETY: the raw syscall reads 8 bytes from `set` (a full sigset_t)
    // and writes 8 bytes to `old`, a u64; both live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            how,
            std::ptr::addr_of!(set),
            std::ptr::addr_of_mut!(old),
            8usize,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Mask(old))
}

/// Sets one signal's disposition; returns the one it had.
fn set_action(signal: Signo, action: &libc::sigaction) -> io::Result<libc::sigaction> {
    let mut old = MaybeUninit::<libc::sigaction>::uninit();
    // SAFETY: both pointers are valid for the call; `action` is either
    // SIG_DFL (no handler code) or a disposition this process had before.
    if unsafe { libc::sigaction(signal, action, old.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sigaction succeeded, so it filled `old`.
    Ok(unsafe { old.assume_init() })
}

fn default_action() -> libc::sigaction {
    // SAFETY: all zeroes is SIG_DFL with no flags and an empty mask.
    unsafe { std::mem::zeroed() }
}

/// SA_RESTORER of <asm/signal.h>, which the libc crate does not name.
const SA_RESTORER: libc::c_int = 0x0400_0000;

/// Is `action` what `default_action` installs? SA_RESTORER is glibc's own
/// flag, which it adds to every action it installs; the mask of a default
/// action is never used.
fn is_default(action: &libc::sigaction) -> bool {
    action.sa_sigaction == libc::SIG_DFL && action.sa_flags & !SA_RESTORER == 0
}

pub(crate) struct Signals {
    fd: OwnedFd,
    /// The mask before `block`: restored in every worker, and on drop.
    saved_mask: Mask,
    /// The dispositions before `block` that were not the default (usually
    /// SIGPIPE, which Rust ignores, and those a shell had its job ignore),
    /// restored in every worker and on drop. The others were the default,
    /// and `block` left them so: a forked worker, which has every taken
    /// signal at its default, puts back only these, not 60-odd defaults
    /// over defaults.
    saved_actions: Vec<(Signo, libc::sigaction)>,
}

impl Signals {
    /// Blocks every taken signal, then sets their dispositions to default,
    /// and opens a non-blocking signalfd for them.
    pub(crate) fn block() -> io::Result<Signals> {
        let taken = Mask::taken();
        let saved_mask = sigprocmask(libc::SIG_BLOCK, taken)?;
        let mut saved_actions = Vec::new();
        for signal in taken.signals() {
            match set_action(signal, &default_action()) {
                Ok(old) if is_default(&old) => {}
                Ok(old) => saved_actions.push((signal, old)),
                // 32 and 33 on some libcs: they refuse; the mask holds them.
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {}
                Err(err) => return Err(err),
            }
        }
        let set = taken.sigset();
        // SAFETY: signalfd with fd -1 creates a new fd from a valid set.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Signals {
            // SAFETY: signalfd just returned this fd; nothing else owns it.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            saved_mask,
            saved_actions,
        })
    }

    /// The mask the program had before `block`, as bits (signal n is bit
    /// n-1): handed down through an upgrade's re-execution.
    pub(crate) fn saved_mask(&self) -> u64 {
        self.saved_mask.0
    }

    /// In a re-executed master, which starts with every taken signal
    /// blocked (the mask survives execve): the program's own mask, as its
    /// first image saw it, is what workers must get back.
    pub(crate) fn set_saved_mask(&mut self, bits: u64) {
        self.saved_mask = Mask(bits);
    }

    /// The next pending signal, or None once all have been read.
    pub(crate) fn next(&self) -> io::Result<Option<Signo>> {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: reads at most `size` bytes into `info`, which holds them.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
            if n == size as isize {
                // SAFETY: the kernel filled the whole struct.
                return Ok(Some(unsafe { info.assume_init() }.ssi_signo as Signo));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                _ if n >= 0 => return Err(io::Error::other(format!("short read of {n} bytes"))),
                Some(libc::EAGAIN) => return Ok(None),
                Some(libc::EINTR) => continue,
                _ => return Err(err),
            }
        }
    }

    /// In a freshly forked worker: the dispositions and the mask the program
    /// had before the master took its signals, except that `ignored` are
    /// ignored whatever they were, and TERM and QUIT stay blocked. A stop
    /// request that comes before the worker has armed its handler then
    /// waits, pending, instead of killing it (TERM) or dumping its core
    /// (QUIT); the worker unblocks them once it handles them.
    ///
    /// The child is the master's copy, so every taken signal is at its
    /// default there (`block` set them so): only the dispositions that
    /// differ are set, usually a handful of system calls, not one per signal.
    pub(crate) fn restore_in_worker(&self, ignored: &[Signo]) -> io::Result<()> {
        for (signal, action) in self.saved_actions.iter().filter(|(s, _)| !ignored.contains(s)) {
            set_action(*signal, action)?;
        }
        let mut ignore = default_action();
        ignore.sa_sigaction = libc::SIG_IGN;
        for &signal in ignored {
            set_action(signal, &ignore)?;
        }
        let stop: Mask = [libc::SIGTERM, libc::SIGQUIT].into_iter().collect();
        sigprocmask(libc::SIG_SETMASK, Mask(self.saved_mask.0 | stop.0))?;
        Ok(())
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Signals {
    /// Gives an embedding program its signals back. What arrived after the
    /// loop's last turn was meant for the master (a second TERM, the CHLD of
    /// the last worker): read and dropped first, so that it does not take
    /// its default action, killing the program, once unblocked.
    fn drop(&mut self) {
        while let Ok(Some(signal)) = self.next() {
            log::debug!("received {} after the master stopped; ignored", name(signal));
        }
        for (signal, action) in &self.saved_actions {
            let _ = set_action(*signal, action);
        }
        let _ = sigprocmask(libc::SIG_SETMASK, self.saved_mask);
    }
}

/// At most one line a second for each signal that means nothing, so that a
/// script sending WINCH in a loop cannot flood the log.
#[derive(Default)]
pub(crate) struct RateLimit {
    /// Per signal: when its last line was written, and how many since.
    seen: std::collections::HashMap<Signo, (std::time::Instant, usize)>,
}

impl RateLimit {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);

    /// Some(how many went unsaid since the last line) if a line may be
    /// written now; None if this one is to go unsaid.
    pub(crate) fn allow(&mut self, signal: Signo, now: std::time::Instant) -> Option<usize> {
        match self.seen.get_mut(&signal) {
            Some((last, unsaid)) if now.saturating_duration_since(*last) < Self::EVERY => {
                *unsaid += 1;
                None
            }
            Some((last, unsaid)) => {
                *last = now;
                Some(std::mem::take(unsaid))
            }
            None => {
                self.seen.insert(signal, (now, 0));
                Some(0)
            }
        }
    }
}

/// The end of a rate-limited line: ` (3 more since the last line)`, or
/// nothing when none went unsaid.
pub(crate) fn unsaid(count: usize) -> String {
    match count {
        0 => String::new(),
        n => format!(" ({n} more since the last line)"),
    }
}

/// A signal's name as the log says it: `SIGUSR1`, `SIGRTMIN+3`, `signal 32`.
pub(crate) fn name(signal: Signo) -> String {
    let rtmin = libc::SIGRTMIN();
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(known) => known.as_str().to_owned(),
        Err(_) if signal >= rtmin && signal <= libc::SIGRTMAX() => match signal - rtmin {
            0 => "SIGRTMIN".to_owned(),
            n => format!("SIGRTMIN+{n}"),
        },
        Err(_) => format!("signal {signal}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_master_takes_every_signal_but_kill_stop_and_the_faults() {
        let taken = Mask::taken();
        for signal in [
            libc::SIGKILL,
            libc::SIGSTOP,
            libc::SIGSEGV,
            libc::SIGABRT,
            libc::SIGBUS,
        ] {
            assert!(!taken.contains(signal), "{}", name(signal));
        }
        for signal in [
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
            libc::SIGWINCH,
            32,
            33,
            64,
        ] {
            assert!(taken.contains(signal), "{}", name(signal));
        }
        assert_eq!(taken.signals().count(), 64 - UNTOUCHED.len());
        assert!(!taken.contains(0) && !taken.contains(65));
    }

    #[test]
    fn stray_signal_lines_are_rate_limited_per_signal() {
        let mut limit = RateLimit::default();
        let now = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        assert_eq!(limit.allow(libc::SIGWINCH, now), Some(0));
        assert_eq!(limit.allow(libc::SIGWINCH, now + ms(10)), None);
        assert_eq!(limit.allow(libc::SIGWINCH, now + ms(999)), None);
        assert_eq!(
            limit.allow(libc::SIGUSR1, now + ms(999)),
            Some(0),
            "another signal"
        );
        assert_eq!(limit.allow(libc::SIGWINCH, now + ms(1000)), Some(2));
        assert_eq!(limit.allow(libc::SIGWINCH, now + ms(2500)), Some(0));
    }

    #[test]
    fn signals_are_named_as_the_log_says_them() {
        assert_eq!(name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(name(libc::SIGRTMIN()), "SIGRTMIN");
        assert_eq!(name(libc::SIGRTMIN() + 3), "SIGRTMIN+3");
        assert_eq!(name(32), "signal 32");
    }

    #[test]
    fn a_mask_holds_each_signal_once_and_nothing_out_of_range() {
        let mask: Mask = [libc::SIGTERM, libc::SIGHUP, libc::SIGTERM, 0, 65]
            .into_iter()
            .collect();
        assert_eq!(mask.signals().collect::<Vec<_>>(), [libc::SIGHUP, libc::SIGTERM]);
        assert_eq!(mask, Mask(1 << (libc::SIGHUP - 1) | 1 << (libc::SIGTERM - 1)));
    }

    /// The calling thread's mask as the kernel states it.
    fn blocked() -> Result<Mask, String> {
        let status = std::fs::read_to_string("/proc/thread-self/status").map_err(|e| e.to_string())?;
        let hex = status.lines().find_map(|line| line.strip_prefix("SigBlk:"));
        let hex = hex.ok_or("no SigBlk line")?.trim();
        u64::from_str_radix(hex, 16).map(Mask).map_err(|e| e.to_string())
    }

    #[test]
    fn the_raw_mask_blocks_what_glibc_would_refuse_and_returns_the_one_before() {
        // A thread of its own: the mask is per thread, and this one ends here.
        let outcome = std::thread::spawn(|| -> Result<(), String> {
            let more: Mask = [libc::SIGUSR2, 32, 33].into_iter().collect();
            let before = sigprocmask(libc::SIG_BLOCK, more).map_err(|e| e.to_string())?;
            let after = sigprocmask(libc::SIG_BLOCK, Mask::default()).map_err(|e| e.to_string())?;
            if after != Mask(before.0 | more.0) || blocked()? != after {
                return Err(format!(
                    "{after:?} blocked after {before:?}, kernel: {:?}",
                    blocked()
                ));
            }
            if sigprocmask(99, more).is_ok() {
                return Err("an invalid `how` was accepted".into());
            }
            sigprocmask(libc::SIG_SETMASK, before).map_err(|e| e.to_string())?;
            Ok(())
        })
        .join();
        assert_eq!(outcome.expect("the thread panicked"), Ok(()));
    }

    #[test]
    fn a_disposition_is_set_and_the_old_one_returned_or_refused_with_an_error() {
        let current = disposition(libc::SIGURG);
        let mut same = default_action();
        same.sa_sigaction = current;
        let old = set_action(libc::SIGURG, &same).expect("SIGURG as it was");
        assert_eq!(old.sa_sigaction, current);
        let err = set_action(65, &default_action()).map(|_| ()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    /// A signal's disposition in this process: SIG_DFL, SIG_IGN or a handler.
    fn disposition(signal: Signo) -> libc::sighandler_t {
        let mut old = MaybeUninit::<libc::sigaction>::uninit();
        // SAFETY: a null new action only reads the current one into `old`.
        let rc = unsafe { libc::sigaction(signal, std::ptr::null(), old.as_mut_ptr()) };
        assert_eq!(rc, 0, "sigaction({signal})");
        // SAFETY: sigaction succeeded, so it filled `old`.
        unsafe { old.assume_init() }.sa_sigaction
    }

    fn ignore(signal: Signo) -> Result<(), String> {
        let mut ignored = default_action();
        ignored.sa_sigaction = libc::SIG_IGN;
        set_action(signal, &ignored)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn send(signal: Signo) {
        // SAFETY: kill has no memory preconditions; the signal is blocked.
        unsafe { libc::kill(libc::getpid(), signal) };
    }

    fn check(what: &str, ok: bool) -> Result<(), String> {
        ok.then_some(()).ok_or_else(|| format!("{what}: {:?}", blocked()))
    }

    /// Runs `check` in a forked child, so that what it does to the process
    /// (its signal mask and dispositions, its stderr) stays there: it
    /// returns a verdict on a pipe. The child is killed if it says nothing
    /// within 10 s.
    pub(crate) fn in_child(check: fn() -> Result<(), String>) -> Result<(), String> {
        use nix::sys::wait::{waitpid, WaitStatus};
        use nix::unistd::{fork, pipe2, ForkResult};
        let (read_end, write_end) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
        // SAFETY: the child (a copy of this thread alone) runs `check`, which
        // allocates (glibc's malloc is fork-safe) but prints nothing; the
        // locks it takes (the log path's, a test logger's) are only ever
        // taken in such children, so no other thread holds one at the fork.
        // It leaves with _exit.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                drop(read_end);
                let verdict = std::panic::catch_unwind(check);
                let text = match verdict {
                    Ok(Ok(())) => "ok".to_owned(),
                    Ok(Err(err)) => err,
                    Err(_) => "panicked".to_owned(),
                };
                let _ = nix::unistd::write(&write_end, text.as_bytes());
                // SAFETY: _exit ends the child without running the parent's
                // atexit handlers or destructors.
                unsafe { libc::_exit(0) }
            }
            ForkResult::Parent { child } => {
                drop(write_end);
                // Not to EOF: a child another test forks meanwhile holds a
                // copy of the write end. The verdict is one write, smaller
                // than PIPE_BUF, so it arrives whole.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                let mut text = None;
                while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                    let mut pollfd = libc::pollfd {
                        fd: read_end.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    let ms = left.as_millis().max(1) as libc::c_int;
                    // SAFETY: one valid pollfd that outlives the call.
                    if unsafe { libc::poll(&mut pollfd, 1, ms) } == 1 {
                        let mut verdict = [0u8; 4096];
                        let n = nix::unistd::read(&read_end, &mut verdict).unwrap_or(0);
                        text = Some(String::from_utf8_lossy(&verdict[..n]).into_owned());
                        break;
                    }
                }
                let text = text.unwrap_or_else(|| {
                    let _ = nix::sys::signal::kill(child, nix::sys::signal::SIGKILL);
                    "no verdict within 10 s".into()
                });
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, 0)) if text == "ok" => Ok(()),
                    other => Err(format!("{text}; the child ended: {other:?}")),
                }
            }
        }
    }

    #[test]
    fn the_master_reads_its_signals_from_the_signalfd_and_a_worker_gets_them_back() {
        let outcome = in_child(|| {
            // As a shell leaves a background job: USR1 ignored. And TERM
            // blocked, which a worker must keep blocked too.
            let before: Mask = [libc::SIGUSR2, libc::SIGTERM].into_iter().collect();
            sigprocmask(libc::SIG_SETMASK, before).map_err(|e| e.to_string())?;
            ignore(libc::SIGUSR1)?;
            let signals = Signals::block().map_err(|e| format!("block: {e}"))?;
            check("every taken signal is blocked", blocked()? == Mask::taken())?;
            check(
                "USR1 takes its default action again",
                disposition(libc::SIGUSR1) == libc::SIG_DFL,
            )?;
            let fd = signals.as_raw_fd();
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|e| e.to_string())?;
            check(
                "the fd is a signalfd",
                link.as_os_str() == "anon_inode:[signalfd]",
            )?;
            let flags = nix::fcntl::fcntl(&signals.fd, nix::fcntl::FcntlArg::F_GETFL).unwrap_or(0);
            check("the signalfd is non-blocking", flags & libc::O_NONBLOCK != 0)?;
            let fd_flags = nix::fcntl::fcntl(&signals.fd, nix::fcntl::FcntlArg::F_GETFD).unwrap_or(0);
            check("the signalfd is closed on exec", fd_flags & libc::FD_CLOEXEC != 0)?;
            check("nothing pending", matches!(signals.next(), Ok(None)))?;
            for signal in [libc::SIGUSR1, 33, libc::SIGCHLD] {
                send(signal);
                let got = signals.next().map_err(|e| e.to_string())?;
                check(&format!("{signal} read as {got:?}"), got == Some(signal))?;
            }
            check("all read", matches!(signals.next(), Ok(None)))?;
            signals
                .restore_in_worker(&[libc::SIGHUP])
                .map_err(|e| format!("restore: {e}"))?;
            let stop: Mask = [libc::SIGTERM, libc::SIGQUIT].into_iter().collect();
            check(
                "a worker's mask is the one before, and TERM and QUIT",
                blocked()? == Mask(before.0 | stop.0),
            )?;
            check(
                "a worker ignores USR1 again",
                disposition(libc::SIGUSR1) == libc::SIG_IGN,
            )?;
            check(
                "a worker ignores what it is told to",
                disposition(libc::SIGHUP) == libc::SIG_IGN,
            )?;
            check(
                "the others are at their default",
                disposition(libc::SIGUSR2) == libc::SIG_DFL && disposition(libc::SIGWINCH) == libc::SIG_DFL,
            )?;
            Ok(())
        });
        assert_eq!(outcome, Ok(()));
    }

    #[test]
    fn dropped_the_signals_are_given_back_and_late_ones_are_not_fatal() {
        let outcome = in_child(|| {
            // As nohup leaves a program: HUP ignored.
            let before: Mask = [libc::SIGUSR2].into_iter().collect();
            sigprocmask(libc::SIG_SETMASK, before).map_err(|e| e.to_string())?;
            ignore(libc::SIGHUP)?;
            let signals = Signals::block().map_err(|e| format!("block: {e}"))?;
            check("HUP is taken", disposition(libc::SIGHUP) == libc::SIG_DFL)?;
            // Arrives after the last turn: its default action would kill.
            send(libc::SIGUSR1);
            drop(signals);
            check("the mask is the one before", blocked()? == before)?;
            check("HUP is ignored again", disposition(libc::SIGHUP) == libc::SIG_IGN)?;
            Ok(())
        });
        assert_eq!(outcome, Ok(()));
    }

    #[test]
    fn a_master_whose_stdin_is_closed_gets_its_signalfd_as_fd_0() {
        let outcome = in_child(|| {
            // SAFETY: nothing in this child uses fd 0.
            unsafe { libc::close(0) };
            let signals = Signals::block().map_err(|e| format!("block: {e}"))?;
            check("fd 0 is the signalfd", signals.as_raw_fd() == 0)?;
            send(libc::SIGUSR1);
            let got = signals.next().map_err(|e| e.to_string())?;
            check(&format!("USR1 read as {got:?}"), got == Some(libc::SIGUSR1))
        });
        assert_eq!(outcome, Ok(()));
    }
}
