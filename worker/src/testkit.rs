//! What the unit tests share: a lock on the process-wide state a worker
//! keeps (its stop handler, flag and listener; its panic hook), a logger
//! that keeps each test thread's lines, and ways to signal a thread once it
//! sleeps in a given syscall.
//!
//! A worker is a process of its own; here its code runs inside the test
//! process, one test at a time for what is process-wide. Signals are sent
//! to the test's thread (tgkill), never to the process.

use log::{LevelFilter, Log, Metadata, Record};
use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static GLOBAL: Mutex<()> = Mutex::new(());

thread_local! {
    /// This thread's log lines.
    static LINES: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    /// How many times the code under test called [`mark`].
    static MARKS: Cell<u32> = const { Cell::new(0) };
    /// The read end of a pipe whose unread bytes each line notes.
    static WATCHED: Cell<RawFd> = const { Cell::new(-1) };
}

struct ThreadLogger;

impl Log for ThreadLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let line = format!("{} {}", record.level(), record.args());
        let waiting = pipe_bytes(WATCHED.get());
        // Shown with the output of a test that fails.
        eprintln!("{line}");
        LINES.with_borrow_mut(|lines| {
            lines.push(Line {
                text: line,
                waiting,
                marks: MARKS.get(),
            })
        });
    }

    fn flush(&self) {}
}

/// Bytes waiting to be read in a pipe (0 for no pipe).
pub fn pipe_bytes(fd: RawFd) -> usize {
    if fd < 0 {
        return 0;
    }
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, to a valid one.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc == 0 {
        usize::try_from(n).unwrap_or(0)
    } else {
        0
    }
}

/// A log line as the test logger kept it.
#[derive(Clone, Debug)]
pub struct Line {
    /// `LEVEL message`.
    pub text: String,
    /// Bytes waiting in the pipe [`watch`] named when it was logged.
    pub waiting: usize,
    /// [`mark`]s made on this thread before it was logged.
    pub marks: u32,
}

/// Notes that something happened, so that a test can tell whether a line
/// was logged before or after it.
pub fn mark() {
    MARKS.set(MARKS.get() + 1);
}

static LOGGER: Once = Once::new();

/// The process-wide worker state, held by one test at a time.
pub struct Global {
    // Dropped in this order: the watchdog first, then the lock.
    _watchdog: Watchdog,
    _guard: MutexGuard<'static, ()>,
}

/// Holds the process-wide worker state for one test: the stop flag is
/// cleared, the listener forgotten, this thread's log emptied. A test that
/// holds it for more than 20 s aborts the test process: the stop handler
/// ignores SIGTERM, so a hung test binary would outlive whoever tries to
/// stop it that way (cargo-mutants' timeout does).
pub fn global() -> Global {
    let guard = GLOBAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    init_logger();
    crate::stop::reset();
    LINES.with_borrow_mut(Vec::clear);
    MARKS.set(0);
    Global {
        _watchdog: Watchdog::new(Duration::from_secs(20), || {}),
        _guard: guard,
    }
}

fn init_logger() {
    LOGGER.call_once(|| {
        let _ = log::set_logger(&ThreadLogger);
        log::set_max_level(LevelFilter::Trace);
    });
}

/// The lines this thread logged (`ERROR worker 4321 ...`).
pub fn logged() -> Vec<String> {
    LINES.with_borrow(|lines| lines.iter().map(|line| line.text.clone()).collect())
}

/// The lines this thread logged, with what was true when each was.
pub fn logged_lines() -> Vec<Line> {
    LINES.with_borrow(Clone::clone)
}

/// From now on, note how many bytes wait in the pipe `fd` with each line.
pub fn watch(fd: RawFd) {
    init_logger();
    WATCHED.set(fd);
}

/// This thread's id, for [`signal_thread`] and [`in_syscall`].
pub fn tid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Sends `signal` to thread `tid` of this process.
pub fn signal_thread(tid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: tgkill with this process's pid and one of its threads.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signal) };
}

/// Waits until thread `tid` sleeps in one of the syscalls `numbers`, as
/// `/proc/self/task/<tid>/syscall` shows it, or says it never did.
pub fn in_syscall(tid: libc::pid_t, numbers: &[libc::c_long], within: Duration) -> Result<(), String> {
    let path = format!("/proc/self/task/{tid}/syscall");
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        last = std::fs::read_to_string(&path).unwrap_or_default();
        let number = last.split(' ').next().and_then(|n| n.trim().parse().ok());
        if number.is_some_and(|n| numbers.contains(&n)) {
            return Ok(());
        }
        std::thread::yield_now();
    }
    Err(format!(
        "thread {tid} never slept in syscall {numbers:?}; last seen: {last:?}"
    ))
}

/// What ends a test's blocking call when the code under test does not: if
/// not dropped within its deadline, it runs its action, again every 100 ms
/// for 2 s, and then aborts the test process with a line on stderr, so
/// that no test hangs, whatever the code does.
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// How long tests wait for what takes microseconds when the code works.
pub const DEADLINE: Duration = Duration::from_secs(3);

impl Watchdog {
    pub fn new(deadline: Duration, mut action: impl FnMut() + Send + 'static) -> Watchdog {
        let (disarm, disarmed) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut wait = deadline;
            for _ in 0..20 {
                match disarmed.recv_timeout(wait) {
                    Err(mpsc::RecvTimeoutError::Timeout) => action(),
                    _ => return,
                }
                wait = Duration::from_millis(100);
            }
            if let Err(mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(wait) {
                eprintln!("watchdog: a test is still stuck {deadline:?} after its deadline; aborting");
                std::process::abort();
            }
        });
        Watchdog {
            disarm: Some(disarm),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
