//! The log path that never blocks the master (issue 8.1).
//!
//! The incident: `respawn 2>&1 | sleep 600`. Nobody reads the pipe; after
//! ~150 crashes its 64 KiB are full, the master blocks in write(2) on stderr
//! inside a log call, and the whole service stalls: no reaping, no respawns.
//! Here log records go through a bounded queue instead. The master's one
//! `mio` loop watches the output for WRITABLE and empties the queue when it
//! can; a record that does not fit is dropped whole and counted, and the next
//! line that gets out says `respawn: 37 log lines dropped: stderr was not
//! being read`. Workers, forked from the master with the same stderr, keep no
//! queue: they write each record directly, non-blocking, and drop it (counted,
//! reported the same way) when the pipe is full.
//!
//! Why reopen `/proc/self/fd/2`: O_NONBLOCK belongs to the open file
//! description, which fd 2 shares with the shell and every process it was
//! inherited by. Setting it on fd 2 would make *their* writes fail with
//! EAGAIN. Opening `/proc/self/fd/2` gives a new description of the same
//! pipe, FIFO or tty, non-blocking for us alone. A socket (journald's stream,
//! a docker log socket) cannot be opened that way (ENXIO): we send(2) to it
//! with MSG_DONTWAIT instead. A regular file never blocks and is written
//! plainly, as is anything else that cannot be reopened (no /proc mounted):
//! on such a stderr a log write can still block.
//!
//! Each record is written with one write(2) of its own, so a line of up to
//! PIPE_BUF (4096 bytes) lands whole in a pipe, never mixed with a worker's;
//! a longer one may be written in parts, and the master keeps the tail until
//! it is out. A record over 256 KiB (the queue's bound) is always dropped.
//!
//! The rule for the loop: the fd is registered edge-triggered, so an event
//! comes only when the output *becomes* writable after a write hit EAGAIN.
//! Always try to write first; wait for WRITABLE only after
//! [`flush_pending`] returned true.
//!
//! What an embedder must know: the library writes nothing to stderr by
//! itself; their logger does. With env_logger, use
//! `.target(env_logger::Target::Pipe(Box::new(respawn_master::log_writer())))`
//! so that lines take this path. A logger that writes to stderr on its own can
//! still block the master.

use nix::errno::Errno;
use nix::sys::socket::{send, MsgFlags};
use nix::sys::stat::{fstat, SFlag};
use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most this many bytes wait in the master's queue, on top of what the
/// pipe holds (64 KiB by default): the `spawned` and `ready` lines of 2,048
/// workers started at once fit, for a reader that falls behind for a moment;
/// a reader that is gone costs at most this much memory.
const CAPACITY: usize = 256 * 1024;

/// Where a logger (env_logger's `Target::Pipe`, say) writes its lines.
/// Each `write` call is one record (a whole line); it never blocks and never
/// fails: a record that cannot be kept is dropped and counted.
pub struct LogWriter;

/// A writer for the process's log lines that never blocks the master.
pub fn log_writer() -> LogWriter {
    LogWriter
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            with_path(|path| path.record(buf));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        with_path(LogPath::drain);
        Ok(())
    }
}

/// The fd the master registers with mio for WRITABLE, edge-triggered; None
/// when writes never wait (a regular file, or the blocking fallback).
pub(crate) fn watch_fd() -> Option<RawFd> {
    with_path(|path| path.watch_fd())
}

/// Writes what the queue holds until it is empty or the output would block.
/// True if bytes remain: then wait for the next WRITABLE event.
pub(crate) fn flush_pending() -> bool {
    with_path(LogPath::drain)
}

/// At the master's exit: waits for the output at most `limit` in all, then
/// drops what is left and says so, if the output takes that one line.
pub(crate) fn flush_before_exit(limit: Duration) {
    with_path(|path| path.flush_before_exit(limit));
}

/// In a freshly forked child: the lines queued in the master are the master's
/// to write, so they are discarded here. The master's fd is not closed (the
/// child closes the master's fds itself, see [`master_fd`]); the worker
/// opens its own on its first record.
pub(crate) fn become_worker() {
    let mut global = GLOBAL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = global.path.take() {
        if let Some(out) = path.out {
            // Closed already, or about to be, by whoever closes the master's
            // fds: closing it here could close an fd number reused since.
            let _ = out.fd.into_raw_fd();
        }
    }
    global.worker = true;
}

/// In a forked child that is about to execute a program as a worker (an
/// upgrade's new binary): its own way to stderr, opened now if it is not
/// yet, to be handed across the exec. Now, because once the child has
/// dropped its privileges it may not reopen a pipe that belongs to root.
pub(crate) fn worker_out_fd() -> Option<RawFd> {
    with_path(|path| path.out.as_ref().map(|out| out.fd.as_raw_fd()))
}

/// In a worker started by executing a program (an upgrade's new binary):
/// whatever this process logged so far is its own, so it is kept and
/// written now. `handed` is the way to stderr its parent opened for it
/// before the exec ([`worker_out_fd`]), which it now owns.
pub(crate) fn become_worker_after_exec(handed: Option<RawFd>) {
    {
        let mut global = GLOBAL.lock().unwrap_or_else(PoisonError::into_inner);
        global.worker = true;
        let handed = handed.and_then(adopt_out);
        match global.path.as_mut() {
            Some(path) => {
                path.worker = true;
                if let Some(out) = handed {
                    path.out = Some(out);
                }
            }
            None if handed.is_some() => global.path = Some(LogPath::new(handed, true)),
            None => {}
        }
    }
    flush_pending();
}

/// Takes `fd`, handed across an exec, as the way to stderr: its kind is
/// read from the file (a non-blocking description is ours alone).
fn adopt_out(fd: RawFd) -> Option<Out> {
    // SAFETY: the parent handed this fd to us alone across the exec (the
    // variable naming it is removed): nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    let stat = fstat(fd.as_fd()).ok()?;
    let kind = match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFSOCK => Kind::Socket,
        SFlag::S_IFREG => Kind::Blocking,
        _ => {
            let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).ok()?;
            if flags & libc::O_NONBLOCK != 0 {
                Kind::NonBlocking
            } else {
                Kind::Blocking
            }
        }
    };
    Some(Out { fd, kind })
}

/// The master's own fd onto stderr, if it has opened one: a forked child
/// closes it with the master's other fds.
pub(crate) fn master_fd() -> Option<RawFd> {
    let global = GLOBAL.lock().unwrap_or_else(PoisonError::into_inner);
    match &global.path {
        Some(LogPath { out: Some(out), .. }) if !global.worker => Some(out.fd.as_raw_fd()),
        _ => None,
    }
}

/// Process-global: one stderr per process. The master is single-threaded,
/// so the lock is uncontended, and never held across a fork.
struct Global {
    worker: bool,
    path: Option<LogPath>,
}

static GLOBAL: Mutex<Global> = Mutex::new(Global {
    worker: false,
    path: None,
});

fn with_path<R>(f: impl FnOnce(&mut LogPath) -> R) -> R {
    let mut global = GLOBAL.lock().unwrap_or_else(PoisonError::into_inner);
    let worker = global.worker;
    f(global
        .path
        .get_or_insert_with(|| LogPath::new(open_out(io::stderr().as_fd()), worker)))
}

#[derive(Debug, PartialEq)]
enum Kind {
    /// Our own non-blocking open file description of a pipe, FIFO or tty.
    NonBlocking,
    /// A socket, written with send(MSG_DONTWAIT).
    Socket,
    /// A regular file, or the fallback: plain writes that may block.
    Blocking,
}

struct Out {
    fd: OwnedFd,
    kind: Kind,
}

/// Opens our own way to write to `fd` (stderr); None if `fd` is closed.
fn open_out(fd: BorrowedFd) -> Option<Out> {
    let kind = match fstat(fd) {
        Ok(stat) => SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()),
        Err(_) => return None,
    };
    if kind != SFlag::S_IFSOCK && kind != SFlag::S_IFREG {
        let reopened = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NONBLOCK) // std adds O_CLOEXEC
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        if let Ok(file) = reopened {
            return Some(Out {
                fd: file.into(),
                kind: Kind::NonBlocking,
            });
        }
    }
    // A duplicate shares fd 2's description, which we never make
    // non-blocking: owning it spares us from fd 2 being closed under us.
    let dup = fd.try_clone_to_owned().ok()?;
    let kind = if kind == SFlag::S_IFSOCK {
        Kind::Socket
    } else {
        Kind::Blocking
    };
    Some(Out { fd: dup, kind })
}

/// One queued record, and how many log lines it stands for: 1, or N for a
/// dropped report (lose it and the N lines are counted as dropped again).
struct Entry {
    bytes: Vec<u8>,
    lines: u64,
}

/// The queue and its output, without the global: what the tests drive.
struct LogPath {
    out: Option<Out>,
    /// Worker mode: no queue beyond the tail of a partly written record.
    worker: bool,
    queue: VecDeque<Entry>,
    /// Bytes of the front entry already written.
    written: usize,
    queued: usize,
    /// Lines dropped and not yet reported.
    dropped: u64,
}

impl LogPath {
    fn new(out: Option<Out>, worker: bool) -> LogPath {
        LogPath {
            out,
            worker,
            queue: VecDeque::new(),
            written: 0,
            queued: 0,
            dropped: 0,
        }
    }

    fn watch_fd(&self) -> Option<RawFd> {
        self.out
            .as_ref()
            .filter(|out| out.kind != Kind::Blocking)
            .map(|out| out.fd.as_raw_fd())
    }

    /// Takes one record. The master keeps it whole or drops it whole (a
    /// pending report goes first, so lines never overtake it); a worker
    /// writes it now or drops it.
    fn record(&mut self, record: &[u8]) {
        if self.worker {
            // A stuck tail, or a report that did not get out: this line
            // would land in the wrong place.
            if self.drain() || self.dropped > 0 {
                self.dropped += 1;
                return;
            }
        } else {
            // Make room first: without the loop's WRITABLE events (an
            // embedder logging outside `run`) this is what empties the queue.
            self.drain();
            let report = (self.dropped > 0).then(|| self.report(""));
            let need = record.len() + report.as_ref().map_or(0, Vec::len);
            if self.queued + need > CAPACITY {
                self.dropped += 1;
                return;
            }
            if let Some(report) = report {
                self.enqueue(report, self.dropped);
                self.dropped = 0;
            }
        }
        self.enqueue(record.to_vec(), 1);
        self.drain();
    }

    fn enqueue(&mut self, bytes: Vec<u8>, lines: u64) {
        self.queued += bytes.len();
        self.queue.push_back(Entry { bytes, lines });
    }

    fn report(&self, when: &str) -> Vec<u8> {
        let n = self.dropped;
        let lines = if n == 1 { "line" } else { "lines" };
        let who = if self.worker {
            format!("worker {}", std::process::id())
        } else {
            "respawn".into()
        };
        format!("{who}: {n} log {lines} dropped{when}: stderr was not being read\n").into_bytes()
    }

    /// Writes until the queue is empty or the output would block; true if
    /// bytes remain. Once it is empty, drops not yet reported are reported.
    fn drain(&mut self) -> bool {
        loop {
            let Some(front) = self.queue.front() else {
                if self.dropped == 0 {
                    return false;
                }
                self.enqueue(self.report(""), self.dropped);
                self.dropped = 0;
                continue;
            };
            match self.write_out(&front.bytes[self.written..]) {
                Ok(n) if n > 0 => {
                    self.written += n;
                    if self.written == front.bytes.len() {
                        self.queued -= front.bytes.len();
                        self.queue.pop_front();
                        self.written = 0;
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    // A worker keeps only a half-written record's tail.
                    if self.worker && self.written == 0 {
                        if let Some(entry) = self.queue.pop_front() {
                            self.queued -= entry.bytes.len();
                            self.dropped += entry.lines;
                        }
                    }
                    return !self.queue.is_empty();
                }
                // EPIPE (the reader is gone), EBADF...: nothing gets out.
                _ => {
                    self.discard();
                    return false;
                }
            }
        }
    }

    fn write_out(&self, bytes: &[u8]) -> nix::Result<usize> {
        let out = self.out.as_ref().ok_or(Errno::EBADF)?;
        match out.kind {
            Kind::Socket => send(
                out.fd.as_raw_fd(),
                bytes,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ),
            Kind::NonBlocking | Kind::Blocking => nix::unistd::write(&out.fd, bytes),
        }
    }

    /// Counts what the queue holds as dropped and empties it.
    fn discard(&mut self) {
        self.dropped += self.queue.iter().map(|entry| entry.lines).sum::<u64>();
        self.queue.clear();
        self.queued = 0;
        self.written = 0;
    }

    fn flush_before_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.drain() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.wait_writable(left) {
                break;
            }
        }
        if self.queue.is_empty() {
            return;
        }
        // A half-written line is out already: end it before the report.
        let newline: &[u8] = if self.written > 0 { b"\n" } else { b"" };
        self.discard();
        let report = [newline, &self.report(" at exit")].concat();
        if self.write_out(&report) == Ok(report.len()) {
            self.dropped = 0;
        }
    }

    /// Waits at most `timeout` for the output to take bytes; false if
    /// waiting is not possible.
    fn wait_writable(&self, timeout: Duration) -> bool {
        let Some(out) = &self.out else { return false };
        let mut pollfd = libc::pollfd {
            fd: out.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // Rounded up: a 0 ms timeout with time left would spin.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: pollfd is one valid, initialised struct that outlives the
        // call, and the count passed is 1.
        let ready = unsafe { libc::poll(&mut pollfd, 1, ms) };
        ready >= 0 || Errno::last() == Errno::EINTR
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::unistd::pipe2;
    use std::fs::File;
    use std::io::{Read, Seek};
    use std::os::unix::net::UnixStream;

    /// A path writing to a fresh pipe of one page; returns the read end.
    fn pipe_path(worker: bool) -> (LogPath, File) {
        let (read_end, write_end) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe2");
        fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(4096)).expect("F_SETPIPE_SZ");
        let out = Out {
            fd: write_end,
            kind: Kind::NonBlocking,
        };
        (LogPath::new(Some(out), worker), File::from(read_end))
    }

    /// Fills the pipe with whole `filler` lines, as a reader that stopped.
    fn fill(path: &LogPath) {
        while path.write_out(b"filler\n") == Ok(7) {}
    }

    /// Everything the pipe holds now.
    fn read_bytes(reader: &mut File) -> Vec<u8> {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes); // ends with EAGAIN
        bytes
    }

    /// Whole lines, without the filler.
    fn lines(bytes: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(bytes);
        assert!(text.is_empty() || text.ends_with('\n'), "a line was cut");
        text.lines()
            .filter(|line| *line != "filler")
            .map(String::from)
            .collect()
    }

    fn read_lines(reader: &mut File) -> Vec<String> {
        lines(&read_bytes(reader))
    }

    /// Reads and drains until the queue is empty, within a deadline.
    fn drain_all(path: &mut LogPath, reader: &mut File) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut bytes = read_bytes(reader);
        while path.drain() {
            assert!(Instant::now() < deadline, "the queue never drained");
            bytes.extend(read_bytes(reader));
        }
        bytes.extend(read_bytes(reader));
        lines(&bytes)
    }

    fn report(n: usize) -> String {
        format!("respawn: {n} log lines dropped: stderr was not being read")
    }

    #[test]
    fn lines_come_out_whole_and_in_order() {
        let (mut path, mut reader) = pipe_path(false);
        let expected: Vec<String> = (0..2000).map(|i| format!("line {i}")).collect();
        let mut bytes = Vec::new();
        for line in &expected {
            path.record(format!("{line}\n").as_bytes());
            bytes.extend(read_bytes(&mut reader));
        }
        let mut lines = lines(&bytes);
        lines.extend(drain_all(&mut path, &mut reader));
        assert_eq!(lines, expected);
    }

    #[test]
    fn a_full_pipe_never_blocks_and_drops_whole_lines_counted() {
        let (mut path, _reader) = pipe_path(false);
        fill(&path);
        let record = b"worker 4321 exited (signal 9), replacing\n";
        let started = Instant::now();
        for _ in 0..40_000 {
            path.record(record);
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert!(path.queued <= CAPACITY);
        assert_eq!(
            path.queued,
            path.queue.len() * record.len(),
            "a half line was kept"
        );
        assert_eq!(path.dropped, 40_000 - path.queue.len() as u64);
        assert!(path.dropped > 0 && path.queue.len() > 1000);
    }

    #[test]
    fn the_dropped_report_comes_once_with_the_count_before_later_lines() {
        let (mut path, mut reader) = pipe_path(false);
        fill(&path);
        for i in 0..40_000 {
            path.record(format!("line {i}\n").as_bytes());
        }
        let kept = path.queue.len();
        let dropped = 40_000 - kept;
        let mut lines = drain_all(&mut path, &mut reader);
        path.record(b"after\n");
        lines.extend(drain_all(&mut path, &mut reader));

        let mut expected: Vec<String> = (0..kept).map(|i| format!("line {i}")).collect();
        expected.push(report(dropped));
        expected.push("after".into());
        assert_eq!(lines, expected);
    }

    #[test]
    fn a_line_queued_after_drops_goes_out_behind_its_report() {
        let (mut path, mut reader) = pipe_path(false);
        fill(&path);
        for i in 0..40_000 {
            path.record(format!("line {i}\n").as_bytes());
        }
        let kept = path.queue.len();
        read_lines(&mut reader);
        path.drain(); // some room in the queue, not empty yet
        assert!(!path.queue.is_empty());
        path.record(b"after\n");
        let lines = drain_all(&mut path, &mut reader);
        let tail = &lines[lines.len() - 2..];
        assert_eq!(tail, [report(40_000 - kept), "after".into()]);
    }

    #[test]
    fn a_full_queue_moves_on_the_next_record_without_the_loop() {
        let (mut path, mut reader) = pipe_path(false);
        fill(&path);
        for i in 0..40_000 {
            path.record(format!("line {i}\n").as_bytes());
        }
        read_lines(&mut reader);
        path.record(b"one more\n");
        let lines = read_lines(&mut reader);
        assert_eq!(lines.first().map(String::as_str), Some("line 0"));
    }

    #[test]
    fn a_partial_write_keeps_the_tail_of_the_line() {
        let (mut path, mut reader) = pipe_path(false);
        let long = format!("{}\n", "a".repeat(10_000));
        path.record(long.as_bytes());
        assert!(
            path.written > 0 && path.queue.len() == 1,
            "no partial write happened"
        );
        path.record(b"next\n");
        let lines = drain_all(&mut path, &mut reader);
        let lengths: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lengths, [10_000, 4], "the long line came out cut or glued");
        assert_eq!(lines, [long.trim_end().to_string(), "next".into()]);
    }

    #[test]
    fn a_worker_drops_on_eagain_and_reports_later() {
        let (mut path, mut reader) = pipe_path(true);
        fill(&path);
        path.record(b"w1\n");
        path.record(b"w2\n");
        assert!(path.queue.is_empty(), "a worker queued a line");
        assert_eq!(path.dropped, 2);
        read_lines(&mut reader);
        path.record(b"w3\n");
        let report = format!(
            "worker {}: 2 log lines dropped: stderr was not being read",
            std::process::id()
        );
        assert_eq!(read_lines(&mut reader), [report, "w3".into()]);
    }

    #[test]
    fn flush_before_exit_gives_up_within_its_limit_on_an_unread_pipe() {
        let (mut path, _reader) = pipe_path(false);
        fill(&path);
        for i in 0..5 {
            path.record(format!("line {i}\n").as_bytes());
        }
        let started = Instant::now();
        path.flush_before_exit(Duration::from_millis(200));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(path.queue.is_empty());
        assert_eq!(path.dropped, 5, "the report could not have got out");
    }

    #[test]
    fn flush_before_exit_writes_everything_to_a_reader() {
        let (mut path, mut reader) = pipe_path(false);
        fill(&path);
        path.record(b"last words\n");
        read_lines(&mut reader);
        path.flush_before_exit(Duration::from_secs(5));
        assert_eq!(read_lines(&mut reader), ["last words"]);
    }

    #[test]
    fn stderr_is_reopened_without_making_the_shared_fd_nonblocking() {
        let (_read_end, write_end) = pipe2(OFlag::O_CLOEXEC).expect("pipe2");
        let out = open_out(write_end.as_fd()).expect("open_out");
        assert_eq!(out.kind, Kind::NonBlocking);
        let flags = |fd: &OwnedFd| OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).expect("F_GETFL"));
        assert!(flags(&out.fd).contains(OFlag::O_NONBLOCK));
        assert!(
            !flags(&write_end).contains(OFlag::O_NONBLOCK),
            "O_NONBLOCK leaked"
        );
    }

    #[test]
    fn sockets_are_sent_to_and_regular_files_are_not_watched() {
        let (ours, _theirs) = UnixStream::pair().expect("socketpair");
        let socket = LogPath::new(open_out(ours.as_fd()), false);
        assert_eq!(socket.out.as_ref().map(|out| &out.kind), Some(&Kind::Socket));
        assert!(socket.watch_fd().is_some());

        let file = File::open("/proc/self/exe").expect("a regular file");
        let file = LogPath::new(open_out(file.as_fd()), false);
        assert_eq!(file.out.as_ref().map(|out| &out.kind), Some(&Kind::Blocking));
        assert_eq!(file.watch_fd(), None);
    }

    /// Bytes queued, as `queued` must always say.
    fn queued_bytes(path: &LogPath) -> usize {
        path.queue.iter().map(|entry| entry.bytes.len()).sum()
    }

    #[test]
    fn lines_written_at_once_leave_nothing_queued() {
        let (mut path, mut reader) = pipe_path(false);
        path.record(b"one\n");
        path.record(b"two\n");
        assert_eq!((path.queue.len(), path.queued), (0, 0));
        assert_eq!(read_lines(&mut reader), ["one", "two"]);
    }

    #[test]
    fn a_record_of_exactly_the_capacity_is_kept_and_one_byte_more_dropped() {
        let (mut path, _reader) = pipe_path(false);
        fill(&path);
        path.record(&[b'x'; CAPACITY]);
        assert_eq!((path.queue.len(), path.dropped), (1, 0), "kept");
        let (mut path, _reader) = pipe_path(false);
        fill(&path);
        path.record(&[b'x'; CAPACITY + 1]);
        assert_eq!((path.queue.len(), path.dropped), (0, 1), "dropped");
    }

    #[test]
    fn a_worker_writes_no_line_before_the_report_of_its_drops() {
        let (mut path, mut reader) = pipe_path(true);
        // 10 bytes of room: a short line fits, the report does not.
        let filler = format!("{}\n", "f".repeat(4085));
        assert_eq!(path.write_out(filler.as_bytes()), Ok(4086));
        path.record(b"a line longer than the room\n");
        assert_eq!((path.dropped, path.queued, queued_bytes(&path)), (1, 0, 0));
        path.record(b"w2\n");
        assert_eq!(path.dropped, 2, "w2 would have overtaken the report");
        assert_eq!(queued_bytes(&path), path.queued);
        assert_eq!(read_bytes(&mut reader), filler.as_bytes());
        path.record(b"w3\n");
        let report = format!(
            "worker {}: 2 log lines dropped: stderr was not being read",
            std::process::id()
        );
        assert_eq!(read_lines(&mut reader), [report, "w3".into()]);
    }

    #[test]
    fn a_report_at_exit_starts_a_line_of_its_own_only_after_a_cut_line() {
        let (mut path, mut reader) = pipe_path(false);
        // 100 bytes of room: the report fits, the 4,000-byte line does not.
        let filler = format!("{}\n", "f".repeat(3995));
        assert_eq!(path.write_out(filler.as_bytes()), Ok(3996));
        path.record(format!("{}\n", "a".repeat(3999)).as_bytes());
        assert_eq!((path.queue.len(), path.written), (1, 0), "nothing of it written");
        path.flush_before_exit(Duration::ZERO);
        let mut lines = lines(&read_bytes(&mut reader));
        assert_eq!(lines.remove(0), filler.trim_end());
        assert_eq!(
            lines,
            ["respawn: 1 log line dropped at exit: stderr was not being read"]
        );
    }

    #[test]
    fn flush_before_exit_waits_for_a_slow_reader() {
        let (mut path, reader) = pipe_path(false);
        fill(&path);
        let expected: Vec<String> = (0..20_000).map(|i| format!("line {i}")).collect();
        for line in &expected {
            path.record(format!("{line}\n").as_bytes());
        }
        assert_eq!(path.dropped, 0, "all of it queued");
        fcntl(&reader, FcntlArg::F_SETFL(OFlag::empty())).expect("a blocking reader");
        let reading = std::thread::spawn(move || {
            let mut reader = reader;
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes).map(|_| bytes)
        });
        path.flush_before_exit(Duration::from_secs(10));
        drop(path); // the reader's EOF
        let bytes = reading.join().expect("the reader").expect("reading");
        assert_eq!(lines(&bytes), expected);
    }

    #[test]
    fn a_full_socket_never_blocks_the_master() {
        let (ours, _theirs) = UnixStream::pair().expect("socketpair");
        // Bounds the test should a send ever block.
        ours.set_write_timeout(Some(Duration::from_secs(1)))
            .expect("SO_SNDTIMEO");
        let mut path = LogPath::new(open_out(ours.as_fd()), false);
        let started = Instant::now();
        fill(&path);
        for i in 0..3 {
            path.record(format!("line {i}\n").as_bytes());
        }
        assert_eq!(path.queue.len(), 3, "queued");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "took {took:?}");
    }

    #[test]
    fn a_regular_file_is_appended_to_plainly() {
        let name = format!("respawn-logbuf-test-{}", std::process::id());
        let file_path = std::env::temp_dir().join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&file_path)
            .expect("a file in the temp dir");
        let mut path = LogPath::new(open_out(file.as_fd()), false);
        let _ = std::fs::remove_file(&file_path);
        assert_eq!(path.out.as_ref().map(|out| &out.kind), Some(&Kind::Blocking));
        assert_eq!(path.watch_fd(), None, "writes never wait");
        path.record(b"logged\n");
        let mut text = String::new();
        let mut file = file;
        file.rewind().expect("rewind");
        file.read_to_string(&mut text).expect("read");
        assert_eq!(text, "logged\n");
    }

    #[test]
    fn the_process_log_path_writes_queues_and_turns_worker_on_stderr() {
        let outcome = crate::signals::tests::in_child(|| {
            let (read_end, write_end) =
                pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| e.to_string())?;
            fcntl(&write_end, FcntlArg::F_SETPIPE_SZ(4096)).map_err(|e| e.to_string())?;
            // SAFETY: dup2 onto fd 2 closes this child's stderr, which
            // nothing else in the child holds.
            if unsafe { libc::dup2(write_end.as_raw_fd(), 2) } != 2 {
                return Err(format!("dup2: {}", io::Error::last_os_error()));
            }
            let mut reader = File::from(read_end);
            let fill = || while nix::unistd::write(&write_end, b"filler\n") == Ok(7) {};
            let check = |what: &str, ok: bool| ok.then_some(()).ok_or(what.to_owned());
            let mut writer = log_writer();

            check(
                "a record is taken whole",
                writer.write(b"first\n").ok() == Some(6),
            )?;
            check("an empty one too", writer.write(b"").ok() == Some(0))?;
            check("it is out", read_lines(&mut reader) == ["first"])?;
            let fd = watch_fd().ok_or("no fd to watch")?;
            let target = |fd: RawFd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
            check(
                "the watched fd is our own onto stderr",
                fd != 2 && target(fd) == target(2),
            )?;
            check("the master's fd is that one", master_fd() == Some(fd))?;

            fill();
            let _ = writer.write(b"queued\n");
            check("bytes remain", flush_pending())?;
            check("nothing got out", read_lines(&mut reader).is_empty())?;
            check("the queue is empty", !flush_pending())?;
            check("it got out", read_lines(&mut reader) == ["queued"])?;

            fill();
            let _ = writer.write(b"flushed\n");
            read_lines(&mut reader);
            let _ = writer.flush();
            check("a flush drains", read_lines(&mut reader) == ["flushed"])?;

            fill();
            let _ = writer.write(b"last\n");
            read_lines(&mut reader);
            flush_before_exit(Duration::from_secs(5));
            check("the exit flushes", read_lines(&mut reader) == ["last"])?;

            become_worker();
            fill();
            let _ = writer.write(b"dropped\n");
            check("a worker queues nothing", read_lines(&mut reader).is_empty())?;
            check("a worker has no master fd", master_fd().is_none())?;
            let _ = writer.write(b"after\n");
            let report = format!(
                "worker {}: 1 log line dropped: stderr was not being read",
                std::process::id()
            );
            check(
                "then reports",
                read_lines(&mut reader) == [report, "after".into()],
            )
        });
        assert_eq!(outcome, Ok(()));
    }

    /// CPU time this thread has used.
    fn thread_cpu_time() -> Duration {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `now`.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
        assert_eq!(rc, 0, "clock_gettime");
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }

    #[test]
    fn waiting_for_an_unread_pipe_at_exit_sleeps_rather_than_spins() {
        let (mut path, _reader) = pipe_path(false);
        fill(&path);
        path.record(b"never read\n");
        let cpu = thread_cpu_time();
        path.flush_before_exit(Duration::from_millis(300));
        let used = thread_cpu_time() - cpu;
        assert!(used < Duration::from_millis(100), "{used:?} of CPU in 300 ms");
    }
}
