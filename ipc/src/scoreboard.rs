//! The scoreboard: one row of shared memory per worker slot, saying what each
//! worker is doing right now.
//!
//! # What it is for
//!
//! A worker that hangs on one connection (a handler stuck in a loop, a peer
//! that sends one byte a minute) still looks alive to the master: the pipe
//! is open, the process runs. With a `--timeout`, the master reads the rows
//! on a deadline and kills a worker that has been busy with one connection
//! for longer than that. The same rows give a status view for free: which
//! worker serves whom, since when, and how many connections each has
//! finished. Apache's prefork scoreboard is the model.
//!
//! # Why shared memory
//!
//! The worker updates its row twice per connection, so the update must cost
//! next to nothing. Gunicorn's heartbeat is an `fchmod(2)` on a temporary
//! file per request: a syscall each time, and a file to create and clean up.
//! A message on the worker's pipe per request would be a `write(2)` each
//! time, and a master woken for every request it does not care about. Here a
//! worker does plain atomic stores into a mapping it inherited, and reads the
//! clock with `clock_gettime(CLOCK_MONOTONIC)`, which the vDSO answers
//! without entering the kernel: no syscall at all. The master pays only when
//! it looks.
//!
//! The mapping is `MAP_SHARED` of a memory file (`memfd_create`, no path on
//! any file system), made by the master before its first fork, so every
//! worker inherits the same pages. The file, not an anonymous mapping, so
//! that a program the master executes (the new binary of an upgrade, as a
//! worker or as the master itself) can map the same rows through its fd.
//! Atomics work across processes on shared memory as they do across
//! threads.
//!
//! # A row
//!
//! - `busy_since`: `CLOCK_MONOTONIC` nanoseconds when the worker accepted
//!   its current connection, or 0 when it is idle (between connections). A
//!   clock reading of 0 is stored as 1, so 0 always means idle.
//! - `requests`: connections finished in this slot since its last
//!   [`Scoreboard::reset`].
//! - `peer`: the peer's address as text, up to [`PEER_LEN`] bytes,
//!   NUL-padded.
//! - `request`: the first bytes of the request line, up to [`REQUEST_LEN`]
//!   bytes, NUL-padded, as the worker noted it with
//!   [`RowWriter::note_request`].
//!
//! When a connection ends the text is left in place: an idle row still says
//! whom it served last and what was asked, as Apache's does. `begin` of the
//! next connection replaces it.
//!
//! Rows are 64-byte aligned and a multiple of 64 bytes long, so two workers
//! never write the same cache line.
//!
//! # Ordering
//!
//! [`RowWriter::begin`] writes the peer text and clears the request text
//! (relaxed stores), then stores `busy_since` with `Release`.
//! [`Scoreboard::read`] loads `busy_since` with `Acquire` before it reads
//! anything else, so a reader that sees a connection's `busy_since` sees at
//! least that connection's peer, never the one before. [`RowWriter::end`]
//! counts the connection before it stores `busy_since = 0` (`Release`), so a
//! reader that sees a row go idle sees it counted.
//!
//! There is no seqlock: a reader can still see a torn text field, half of
//! one connection's peer and half of the next, if the worker moves on while
//! the master reads, and it can see a request line the worker is halfway
//! through noting. The text is for a log line; `busy_since` is what
//! decisions use, and it is one atomic word, never torn.
//!
//! # Never unmapped
//!
//! The mapping is small (`rows * size_of::<Row>()`, 192 bytes a row) and is
//! never unmapped: dropping a [`Scoreboard`] leaves it in place for the life
//! of the process and of every worker forked from it. That is what makes a
//! [`RowWriter`] (a bare pointer with no lifetime) sound to copy anywhere,
//! a worker's `static` included: the memory it points to cannot go away.

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, MapFlags, ProtFlags};
use nix::sys::stat::fstat;
use nix::unistd::ftruncate;
use std::io::{self, Write};
use std::mem::size_of;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Bytes of the peer address text kept. "[v6 address%scope]:port" can be
/// longer; it is cut.
pub const PEER_LEN: usize = 48;
/// Bytes of the request line kept.
pub const REQUEST_LEN: usize = 80;

/// One worker slot's row, as it lies in the shared mapping. All atomics, so
/// the all-zero bytes of a fresh mapping are a valid idle row, and shared
/// references to it are sound while other processes write it.
#[repr(C, align(64))]
struct Row {
    busy_since: AtomicU64,
    requests: AtomicU64,
    peer: [AtomicU8; PEER_LEN],
    request: [AtomicU8; REQUEST_LEN],
}

// Rows must not share cache lines (align(64) makes the size a multiple of 64
// too, but say it where it matters).
const _: () = assert!(std::mem::align_of::<Row>() == 64);
const _: () = assert!(size_of::<Row>() % 64 == 0);

/// The shared mapping. Never unmapped: it stays mapped for the life of the
/// process (and of every forked worker), which is what makes a [`RowWriter`]
/// sound to keep in a static. It is small (`rows * size_of::<Row>()`).
#[derive(Debug)]
pub struct Scoreboard {
    /// The first row; dangling (and never dereferenced) when `rows` is 0.
    ptr: NonNull<Row>,
    rows: usize,
    /// The memory file behind the mapping (None when `rows` is 0): a
    /// program the master executes (the new binary of an upgrade, as a
    /// worker or as the master itself) maps the same rows through it.
    file: Option<OwnedFd>,
}

// SAFETY: a Scoreboard is a pointer to memory that is never unmapped, and
// everything done through it is an atomic operation on that memory. Moving
// it to another thread, or using it from several at once, is no different
// from other processes using the same rows, which is what it is built for.
unsafe impl Send for Scoreboard {}
// SAFETY: as for Send: `&Scoreboard` only gives atomic access to rows.
unsafe impl Sync for Scoreboard {}

impl Scoreboard {
    /// Maps `rows` zeroed rows, shared with every process forked after,
    /// and with any program handed [`Scoreboard::file`]. Errors carry
    /// context: `mapping the scoreboard (N rows): <errno text>`.
    pub fn new(rows: usize) -> io::Result<Scoreboard> {
        let Some(len) = byte_len(rows)? else {
            return Ok(Scoreboard::empty());
        };
        let context = |errno: nix::errno::Errno| {
            io::Error::new(
                io::Error::from(errno).kind(),
                format!("mapping the scoreboard ({rows} rows): {errno}"),
            )
        };
        // A memory file rather than an anonymous mapping: the same pages,
        // shared the same way with forked workers, but also reachable by
        // fd from a program that is executed (see upgrade.rs in the master).
        let file = memfd_create("respawn-scoreboard", MFdFlags::MFD_CLOEXEC).map_err(context)?;
        let size = i64::try_from(len.get()).map_err(|_| context(nix::errno::Errno::EOVERFLOW))?;
        ftruncate(&file, size).map_err(context)?;
        Scoreboard::map(file, rows, len)
    }

    /// Maps the rows of a scoreboard whose memory file this process was
    /// handed (an upgrade's new binary). The file must hold `rows` rows.
    pub fn inherit(file: OwnedFd, rows: usize) -> io::Result<Scoreboard> {
        let Some(len) = byte_len(rows)? else {
            return Ok(Scoreboard::empty());
        };
        let size = fstat(&file)
            .map_err(|errno| {
                io::Error::new(
                    io::Error::from(errno).kind(),
                    format!("reading the scoreboard's size: {errno}"),
                )
            })?
            .st_size;
        if usize::try_from(size).map_or(true, |size| size < len.get()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the scoreboard handed over holds {size} bytes, less than {rows} rows"),
            ));
        }
        Scoreboard::map(file, rows, len)
    }

    /// The memory file behind the rows, to hand to a program the master
    /// executes; None when there are no rows.
    pub fn file(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(AsFd::as_fd)
    }

    fn empty() -> Scoreboard {
        // No rows: nothing to map, and nothing will ever be read.
        Scoreboard {
            ptr: NonNull::dangling(),
            rows: 0,
            file: None,
        }
    }

    fn map(file: OwnedFd, rows: usize, len: NonZeroUsize) -> io::Result<Scoreboard> {
        // SAFETY: a fresh shared mapping of a memory file, at an address the
        // kernel picks, overlaps no memory Rust knows about. The file's
        // bytes are zeroes or rows written through the same layout (its
        // only writers are rows of this type), which are valid Rows, and
        // the mapping is page-aligned, which is more than Row's 64.
        let mapped = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }
        .map_err(|errno| {
            io::Error::new(
                io::Error::from(errno).kind(),
                format!("mapping the scoreboard ({rows} rows): {errno}"),
            )
        })?;
        Ok(Scoreboard {
            ptr: mapped.cast::<Row>(),
            rows,
            file: Some(file),
        })
    }

    /// How many rows (worker slots) there are.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Clears a row before a new worker takes it (out of range: no-op).
    /// Call it before forking the worker, not while one writes the row.
    pub fn reset(&self, slot: usize) {
        let Some(row) = self.row(slot) else {
            return;
        };
        row.busy_since.store(0, Ordering::Release);
        row.requests.store(0, Ordering::Relaxed);
        store_text(&row.peer, &[]);
        store_text(&row.request, &[]);
    }

    /// What a row says now; None if out of range. The text fields may be
    /// torn if the worker moves on while this reads (see the module docs).
    pub fn read(&self, slot: usize) -> Option<Snapshot> {
        let row = self.row(slot)?;
        // Acquire first: whatever the worker wrote before this busy_since
        // (the peer of this connection, the count of the last) is visible.
        let busy_since = row.busy_since.load(Ordering::Acquire);
        Some(Snapshot {
            busy_since: (busy_since != 0).then_some(busy_since),
            requests: row.requests.load(Ordering::Relaxed),
            peer: load_text(&row.peer),
            request: load_text(&row.request),
        })
    }

    /// The handle a worker in `slot` writes through; None if out of range.
    pub fn writer(&self, slot: usize) -> Option<RowWriter> {
        self.row(slot)?;
        // SAFETY: slot < rows (checked just above), so the offset stays
        // inside the mapping, whose length rows * size_of::<Row>() fit in a
        // usize and was accepted by mmap.
        let row = unsafe { self.ptr.add(slot) };
        Some(RowWriter { row })
    }

    fn row(&self, slot: usize) -> Option<&Row> {
        if slot >= self.rows {
            return None;
        }
        // SAFETY: slot < rows, so the row lies inside the mapping, which is
        // aligned for Row, initialised (zeroed pages are a valid Row) and
        // never unmapped. Row is all atomics, so a shared reference is sound
        // while other threads and processes write it.
        Some(unsafe { self.ptr.add(slot).as_ref() })
    }
}

/// The mapping's length for `rows` rows; None for none.
fn byte_len(rows: usize) -> io::Result<Option<NonZeroUsize>> {
    match rows.checked_mul(size_of::<Row>()) {
        Some(len) => Ok(NonZeroUsize::new(len)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("mapping the scoreboard ({rows} rows): its size overflows usize"),
        )),
    }
}

/// What one row said when it was read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// CLOCK_MONOTONIC nanoseconds when the current connection was
    /// accepted; None when the worker is idle (between connections).
    pub busy_since: Option<u64>,
    /// Connections finished so far.
    pub requests: u64,
    /// The peer's address as text ("127.0.0.1:50312"), empty if none. When
    /// the worker is idle, the peer of its last connection.
    pub peer: String,
    /// The first bytes of the request line, as the worker noted them
    /// (lossy UTF-8, control characters replaced), empty if not noted.
    /// When the worker is idle, the request of its last connection.
    pub request: String,
}

/// A worker's handle on its row: a pointer, Copy, Send + Sync (it only
/// does atomic operations on memory that is never unmapped).
///
/// Nothing stops two writers on one row; the contract is one worker per
/// slot, as with the slot number in [`crate::Handoff`].
#[derive(Clone, Copy, Debug)]
pub struct RowWriter {
    row: NonNull<Row>,
}

// SAFETY: a RowWriter points into the scoreboard mapping, which is never
// unmapped, and only ever does atomic operations through it. Using it from
// any thread, or from several at once, is as sound as the several processes
// sharing the mapping.
unsafe impl Send for RowWriter {}
// SAFETY: as for Send: `&RowWriter` gives nothing but atomic stores.
unsafe impl Sync for RowWriter {}

impl RowWriter {
    /// A connection from `peer` (an address, or `unix`) was accepted: writes
    /// the peer text, clears the request text, then stores busy_since = now
    /// (Release), in that order, so a reader that sees busy_since sees this
    /// connection's peer.
    ///
    /// No allocation, no syscall: the address is formatted on the stack
    /// (cut to [`PEER_LEN`] bytes) and the clock is read through the vDSO.
    pub fn begin(&self, peer: &impl std::fmt::Display) {
        let row = self.row();
        let mut text = [0u8; PEER_LEN];
        let mut rest = &mut text[..];
        // An error here only means the text did not fit: what did fit is
        // written, and a cut address is fine for a log line.
        let _ = write!(rest, "{peer}");
        let written = PEER_LEN - rest.len();
        store_text(&row.peer, &text[..written]);
        store_text(&row.request, &[]);
        row.busy_since.store(now_ns().max(1), Ordering::Release);
    }

    /// The request line (or its start): keeps up to REQUEST_LEN bytes,
    /// stopping at the first '\r' or '\n'. ASCII control bytes (NUL
    /// included) are stored as '?', so the text is safe for a log line and
    /// a NUL cannot end it early.
    pub fn note_request(&self, line: &[u8]) {
        let end = line
            .iter()
            .position(|&b| b == b'\r' || b == b'\n')
            .unwrap_or(line.len())
            .min(REQUEST_LEN);
        let mut text = [0u8; REQUEST_LEN];
        for (to, &from) in text.iter_mut().zip(&line[..end]) {
            *to = if from.is_ascii_control() { b'?' } else { from };
        }
        store_text(&self.row().request, &text[..end]);
    }

    /// The connection is finished: busy_since = 0, requests += 1. The count
    /// goes first, so a reader that sees the row idle sees it counted.
    pub fn end(&self) {
        let row = self.row();
        row.requests.fetch_add(1, Ordering::Relaxed);
        row.busy_since.store(0, Ordering::Release);
    }

    /// Is a connection under way (begun and not ended)? One atomic load.
    pub fn is_busy(&self) -> bool {
        self.row().busy_since.load(Ordering::Acquire) != 0
    }

    fn row(&self) -> &Row {
        // SAFETY: the pointer came from Scoreboard::writer, in range of a
        // mapping that is never unmapped, aligned and initialised; Row is
        // all atomics, so a shared reference is sound under concurrent
        // writes from other threads and processes.
        unsafe { self.row.as_ref() }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock busy_since uses).
///
/// Answered by the vDSO, without a syscall. clock_gettime cannot fail for
/// CLOCK_MONOTONIC with a valid pointer; if it somehow did, this says 0.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    // Both are non-negative for CLOCK_MONOTONIC; the casts cannot wrap.
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Writes `bytes` (at most the field's length) into a text field and zeroes
/// the rest, so the field is NUL-padded.
fn store_text(field: &[AtomicU8], bytes: &[u8]) {
    let mut bytes = bytes.iter();
    for cell in field {
        cell.store(bytes.next().copied().unwrap_or(0), Ordering::Relaxed);
    }
}

/// Reads a NUL-padded text field: lossy UTF-8, control characters
/// (including C1 ones that valid UTF-8 can carry) replaced by '?'.
fn load_text(field: &[AtomicU8]) -> String {
    let mut bytes = [0u8; REQUEST_LEN];
    let mut len = 0;
    for (to, cell) in bytes.iter_mut().zip(field) {
        let byte = cell.load(Ordering::Relaxed);
        if byte == 0 {
            break;
        }
        *to = byte;
        len += 1;
    }
    String::from_utf8_lossy(&bytes[..len])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

// load_text's buffer holds the longest field.
const _: () = assert!(REQUEST_LEN >= PEER_LEN);

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    fn mapped(rows: usize) -> Scoreboard {
        Scoreboard::new(rows).expect("mapping a test scoreboard")
    }

    #[test]
    fn a_fresh_board_is_idle_and_empty() {
        let board = mapped(4);
        assert_eq!(board.rows(), 4);
        for slot in 0..4 {
            assert_eq!(board.read(slot), Some(Snapshot::default()));
        }
    }

    #[test]
    fn a_connection_round_trips() {
        let board = mapped(2);
        let writer = board.writer(1).expect("slot 1");
        let before = now_ns();
        writer.begin(&addr("127.0.0.1:50312"));
        let after = now_ns();

        let busy = board.read(1).expect("slot 1");
        let since = busy.busy_since.expect("busy after begin");
        assert!(
            before <= since && since <= after,
            "{before} <= {since} <= {after}"
        );
        assert_eq!(busy.peer, "127.0.0.1:50312");
        assert_eq!(busy.request, "");
        assert_eq!(busy.requests, 0);

        writer.note_request(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(board.read(1).expect("slot 1").request, "GET /slow HTTP/1.1");

        writer.end();
        let idle = board.read(1).expect("slot 1");
        assert_eq!(idle.busy_since, None);
        assert_eq!(idle.requests, 1);
        // The last connection's text stays, for a status view.
        assert_eq!(idle.peer, "127.0.0.1:50312");
        assert_eq!(idle.request, "GET /slow HTTP/1.1");

        writer.begin(&addr("[::1]:8080"));
        let next = board.read(1).expect("slot 1");
        assert!(next.busy_since.is_some());
        assert_eq!(next.peer, "[::1]:8080");
        assert_eq!(next.request, "", "begin clears the last request");
        writer.end();
        assert_eq!(board.read(1).expect("slot 1").requests, 2);
        assert_eq!(board.read(0), Some(Snapshot::default()));
    }

    #[test]
    fn now_ns_keeps_time_with_std_monotonic_clock() {
        // Instant is CLOCK_MONOTONIC too, read another way: over a wait it
        // measures, now_ns must advance by as much, within the reads.
        let wait = std::time::Duration::from_millis(20);
        let outer = std::time::Instant::now();
        let first = now_ns();
        let inner = std::time::Instant::now();
        while inner.elapsed() < wait {}
        let waited = inner.elapsed();
        let last = now_ns();
        let bound = outer.elapsed();
        let advanced = last.checked_sub(first).expect("now_ns went backwards");
        assert!(
            advanced >= waited.as_nanos() as u64 && advanced <= bound.as_nanos() as u64,
            "now_ns advanced {advanced} ns over a wait of {waited:?} (all reads within {bound:?})"
        );
        // It counts from boot: far above 0, which a row reserves for idle,
        // and far below overflowing.
        assert!(first > 1_000_000 && first < u64::MAX / 2, "{first}");
    }

    #[test]
    fn request_lines_are_cut_and_cleaned() {
        let board = mapped(1);
        let writer = board.writer(0).expect("slot 0");
        let read = || board.read(0).expect("slot 0").request;

        writer.note_request(b"GET / HTTP/1.1\nHost: x");
        assert_eq!(read(), "GET / HTTP/1.1");

        let long = [b'a'; 3 * REQUEST_LEN];
        writer.note_request(&long);
        assert_eq!(read(), "a".repeat(REQUEST_LEN));

        // A shorter line after a longer one leaves nothing of the longer.
        writer.note_request(b"HEAD /\r\n");
        assert_eq!(read(), "HEAD /");

        writer.note_request(b"GET /\x1b[31m\x00x\t\x7f HTTP/1.1\r\n");
        assert_eq!(read(), "GET /?[31m?x?? HTTP/1.1");

        // C1 controls (valid UTF-8) and invalid UTF-8 are made harmless too.
        writer.note_request("GET /\u{85}é\u{9b} ".as_bytes());
        assert_eq!(read(), "GET /?é? ");
        writer.note_request(b"GET /\xff\xfe");
        assert_eq!(read(), "GET /\u{fffd}\u{fffd}");

        writer.note_request(b"\r\nGET /");
        assert_eq!(read(), "");
    }

    #[test]
    fn a_long_ipv6_peer_is_cut_without_panic() {
        let peer = SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0xfe80, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff),
            65535,
            0,
            u32::MAX,
        ));
        let full = peer.to_string();
        assert!(full.len() > PEER_LEN, "{full} should not fit");

        let board = mapped(1);
        let writer = board.writer(0).expect("slot 0");
        writer.begin(&peer);
        let snapshot = board.read(0).expect("slot 0");
        assert!(snapshot.busy_since.is_some());
        assert_eq!(snapshot.peer, full[..PEER_LEN]);

        // A short peer after it leaves nothing of the long one.
        writer.begin(&addr("[2001:db8::1]:443"));
        assert_eq!(board.read(0).expect("slot 0").peer, "[2001:db8::1]:443");
    }

    #[test]
    fn reset_clears_a_row() {
        let board = mapped(2);
        let writer = board.writer(0).expect("slot 0");
        writer.begin(&addr("10.0.0.1:1"));
        writer.note_request(b"GET /");
        writer.end();
        writer.begin(&addr("10.0.0.2:2"));
        assert_ne!(board.read(0), Some(Snapshot::default()));
        board.reset(0);
        assert_eq!(board.read(0), Some(Snapshot::default()));
    }

    #[test]
    fn out_of_range_slots_give_none() {
        let board = mapped(2);
        assert_eq!(board.read(2), None);
        assert!(board.writer(2).is_none());
        assert!(board.writer(usize::MAX).is_none());
        board.reset(2);
        board.reset(usize::MAX);

        let empty = mapped(0);
        assert_eq!(empty.rows(), 0);
        assert_eq!(empty.read(0), None);
        assert!(empty.writer(0).is_none());
        empty.reset(0);
    }

    #[test]
    fn sizes_that_cannot_be_mapped_are_errors_with_context() {
        let err = Scoreboard::new(usize::MAX).expect_err("overflow");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(
            err.to_string()
                .starts_with(&format!("mapping the scoreboard ({} rows): ", usize::MAX)),
            "{err}"
        );

        // Fits in a usize, but is far larger than any address space.
        let rows = 1usize << 50;
        let err = Scoreboard::new(rows).expect_err("too large to map");
        assert!(
            err.to_string()
                .starts_with(&format!("mapping the scoreboard ({rows} rows): ")),
            "{err}"
        );
    }

    #[test]
    fn rows_do_not_share_cache_lines() {
        assert_eq!(size_of::<Row>() % 64, 0);
        assert_eq!(std::mem::align_of::<Row>(), 64);
        let board = mapped(5);
        for slot in 0..5 {
            let writer = board.writer(slot).expect("in range");
            assert_eq!(writer.row.as_ptr() as usize % 64, 0, "row {slot}");
        }
    }

    #[test]
    fn writers_on_different_rows_do_not_disturb_each_other() {
        let board = mapped(2);
        let (a, b) = (board.writer(0).expect("0"), board.writer(1).expect("1"));
        a.begin(&addr("192.0.2.1:1000"));
        b.begin(&addr("[2001:db8::2]:2000"));
        a.note_request(b"GET /a HTTP/1.1\r\n");
        b.note_request(b"POST /b HTTP/1.1\r\n");
        b.end();

        let (ra, rb) = (board.read(0).expect("0"), board.read(1).expect("1"));
        assert!(ra.busy_since.is_some());
        assert_eq!((ra.requests, ra.peer.as_str()), (0, "192.0.2.1:1000"));
        assert_eq!(ra.request, "GET /a HTTP/1.1");
        assert_eq!(rb.busy_since, None);
        assert_eq!((rb.requests, rb.peer.as_str()), (1, "[2001:db8::2]:2000"));
        assert_eq!(rb.request, "POST /b HTTP/1.1");
    }

    #[test]
    fn reading_a_row_being_written_never_panics() {
        const ROUNDS: u64 = 10_000;
        let board = mapped(1);
        let writer = board.writer(0).expect("slot 0");
        let peers = [addr("127.0.0.1:1"), addr("[fe80::1:2:3:4%7]:65535")];
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                for round in 0..ROUNDS {
                    writer.begin(&peers[(round % 2) as usize]);
                    writer.note_request(b"GET /busy HTTP/1.1\r\n");
                    writer.end();
                }
            });
            let mut last = 0;
            while !worker.is_finished() {
                let snapshot = board.read(0).expect("slot 0");
                // One location read again and again never goes backwards.
                assert!(snapshot.requests >= last && snapshot.requests <= ROUNDS);
                last = snapshot.requests;
                // Torn text is allowed, but it is still bounded and clean.
                assert!(snapshot.peer.len() <= PEER_LEN);
                assert!(snapshot.request.len() <= REQUEST_LEN);
                assert!(!snapshot.peer.chars().any(char::is_control));
            }
        });
        let done = board.read(0).expect("slot 0");
        assert_eq!(done.busy_since, None);
        assert_eq!(done.requests, ROUNDS);
        assert_eq!(done.request, "GET /busy HTTP/1.1");
    }
}
