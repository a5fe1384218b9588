//! The process title: what `ps -ef`, `pgrep -f` and `systemctl status` say
//! a process is.
//!
//! Linux keeps two names for a process. `/proc/PID/comm` (15 bytes, what
//! `ps -e`, `top` and `pgrep` without `-f` show) is set with
//! prctl(PR_SET_NAME): the master calls itself `respawn master`, and
//! spawn.rs names each worker `worker 3`. `/proc/PID/cmdline` is longer, and
//! the master shows its state there:
//! `respawn: master, 4 workers, generation 3, 127.0.0.1:8080`, rewritten
//! whenever the number of workers or the generation (one per HUP) changes.
//!
//! # How, and why not the classic way
//!
//! /proc/PID/cmdline is not a copy: the kernel reads it from the process's
//! own memory, between two addresses it keeps (`arg_start`, `arg_end`),
//! which exec points at the argv strings on the new stack. nginx
//! (`ngx_setproctitle`) and PostgreSQL (`ps_status.c`) overwrite those
//! strings, and the environment strings after them to make room. In a Rust
//! program that memory is still in use: glibc hands
//! `std::env::args()` pointers into it, so every later read of the
//! arguments would see the title (and an upgrade that re-executes the
//! binary with its original arguments would pass the title instead), and
//! `getenv` reads the environment strings behind it.
//!
//! Here the original memory is never touched. The title goes into a buffer
//! of our own, and prctl(PR_SET_MM, PR_SET_MM_MAP) tells the kernel that
//! *this* is where the arguments are. /proc/PID/cmdline then reads exactly
//! one NUL-terminated string, the title, as `ps`, `pgrep -f` and systemd
//! expect, and `std::env::args()` still reads the original argv.
//!
//! Why PR_SET_MM_MAP rather than the simpler PR_SET_MM_ARG_START and
//! PR_SET_MM_ARG_END: those need CAP_SYS_RESOURCE, which containers drop
//! even for root (the host this was written on among them), and
//! they move one bound at a time, so a reader could see a range that is
//! neither title. PR_SET_MM_MAP (made for CRIU, in kernels built with
//! CONFIG_CHECKPOINT_RESTORE, which the major distributions are) needs no
//! capability and moves both bounds at once; its cost is that it restates
//! the whole map, the heap's end among them (see `show` for why that is
//! safe in a single-threaded process). Where the kernel refuses,
//! /proc/PID/cmdline stays the command line the program was started with,
//! and comm (`respawn master`) is all that changes.
//!
//! A worker is forked with a copy of the master's buffer, and so with its
//! title until it sets its own (`respawn: worker 2`): a forked worker
//! with the map the master read once before its first fork
//! ([`WorkerTitle`]: no /proc in the child), a worker executed from a new
//! binary with [`set_worker_title`].
//!
//! # The original command line
//!
//! [`original_args`] and [`original_exe`] keep the command line as the
//! program was started, and the path of its binary resolved against the
//! directory it was started in, as nginx and unicorn do to re-execute
//! themselves: an upgrade starts the binary now on disk at that path.
//! `/proc/self/exe` would not do: it still names the old file after a new
//! one was installed over it.

use log::debug;
use nix::sys::prctl;
use nix::sys::socket::{getsockname, SockaddrLike, SockaddrStorage};
use std::ffi::{CStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The longest title, with its NUL; a longer one is cut at a character.
const CAPACITY: usize = 1024;

/// What comm says the master is (at most 15 bytes).
const MASTER_NAME: &CStr = c"respawn master";

/// The command line the process was started with.
struct Original {
    args: Vec<OsString>,
    exe: Option<PathBuf>,
}

static ORIGINAL: OnceLock<Original> = OnceLock::new();

fn original() -> &'static Original {
    ORIGINAL.get_or_init(|| {
        let args: Vec<OsString> = std::env::args_os().collect();
        let exe = args.first().and_then(|argv0| resolve_exe(Path::new(argv0)));
        Original { args, exe }
    })
}

/// The arguments the program was started with, `argv[0]` first, as they
/// were then, whatever the title shows now.
///
/// Kept on the first call of this function, of [`original_exe`], or of
/// [`run`](crate::run) (at its start). The master never overwrites the
/// original argv, so `std::env::args()` says the same; this copy is what an
/// upgrade should use, in case some other code in the process does.
pub fn original_args() -> &'static [OsString] {
    &original().args
}

/// The binary the program was started from: `argv[0]` resolved against the
/// directory the process was in at the first call (see [`original_args`]
/// for when that is), or found in `PATH` when it holds no `/`, as the
/// shell found it. It is a path, not a file: once a new binary is installed
/// there, it names the new one, which is what an upgrade must start.
/// `/proc/self/exe` is the last resort (no argv, no `PATH` match); None if
/// even that cannot be read.
///
/// Call it early in `main` if the program changes its directory before
/// [`run`](crate::run).
pub fn original_exe() -> Option<&'static Path> {
    original().exe.as_deref()
}

/// `argv0` as execve would find it from the directory we are in now.
fn resolve_exe(argv0: &Path) -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok();
    let found = if argv0.as_os_str().as_bytes().contains(&b'/') {
        match (&cwd, argv0.is_absolute()) {
            (_, true) => Some(argv0.to_path_buf()),
            (Some(cwd), false) => Some(cwd.join(argv0)),
            (None, false) => None,
        }
    } else {
        search_path(argv0, cwd.as_deref())
    };
    found.or_else(|| std::fs::read_link("/proc/self/exe").ok())
}

/// The first executable file named `name` in `PATH` (an empty entry, or a
/// relative one, is relative to `cwd`, as execvp reads it).
pub(crate) fn search_path(name: &Path, cwd: Option<&Path>) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| {
        let dir = match (dir.is_absolute(), cwd) {
            (true, _) => dir,
            (false, Some(cwd)) => cwd.join(dir),
            (false, None) => return None,
        };
        let candidate = dir.join(name);
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

/// The buffer's two halves: a new title goes into the half the kernel is
/// not reading, and one call moves the kernel to it, so that a reader of
/// /proc/PID/cmdline sees the old title or the new one, never a mix.
const HALVES: usize = 2;

/// Where the title stands in this process.
enum State {
    /// Not tried yet: /proc/PID/cmdline shows the original argv.
    Untried,
    /// The kernel refused: never tried again.
    Refused(nix::errno::Errno),
    /// The kernel reads `half` of our buffer.
    Shown { buffer: &'static mut [u8], half: usize },
}

static STATE: Mutex<State> = Mutex::new(State::Untried);

/// Shows `title` as this process's /proc/PID/cmdline (`ps -ef`, `pgrep -f`,
/// `systemctl status`): one string, cut to 1023 bytes, a NUL in it turned
/// into a space. It never changes what [`original_args`] or
/// `std::env::args()` return.
///
/// Fails, and changes nothing, in a process that runs more than one
/// thread (see below), or where the kernel refuses (built without
/// CONFIG_CHECKPOINT_RESTORE, or a security policy): then later calls fail
/// the same way at once.
pub fn set_title(title: &str) -> io::Result<()> {
    let text = fit(title);
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    match &mut *state {
        State::Refused(errno) => Err(refused(*errno)),
        State::Untried => {
            let mut buffer = vec![0u8; HALVES * CAPACITY].into_boxed_slice();
            match show(&mut buffer, 0, &text) {
                Ok(()) => {
                    // Leaked on purpose: the kernel reads it for as long as
                    // the process lives.
                    *state = State::Shown {
                        buffer: Box::leak(buffer),
                        half: 0,
                    };
                    Ok(())
                }
                Err(Refusal::Kernel(errno)) => {
                    *state = State::Refused(errno);
                    Err(refused(errno))
                }
                Err(Refusal::Other(err)) => Err(err),
            }
        }
        State::Shown { buffer, half } => {
            let next = (*half + 1) % HALVES;
            match show(buffer, next, &text) {
                Ok(()) => {
                    *half = next;
                    Ok(())
                }
                Err(Refusal::Kernel(errno)) => Err(refused(errno)),
                Err(Refusal::Other(err)) => Err(err),
            }
        }
    }
}

/// `respawn: worker 2`: what a worker's /proc/PID/cmdline should say,
/// rather than the master's title it was forked with. Call it first thing
/// in the worker; where titles cannot be set it does nothing (comm still
/// says `worker 2`).
pub fn set_worker_title(slot: usize) {
    let _ = set_title(&format!("respawn: worker {slot}"));
}

/// A forked worker's title, made ready by the master once, before its
/// first fork: the child's memory map is a copy of the master's, so what
/// `set_title` reads from /proc in the process it runs in (the thread
/// count, the map) the master reads once for all its workers. The child
/// then writes its title into a buffer of its own and calls two system
/// calls: brk(0), the heap's end (its own allocations may have moved it),
/// and the prctl.
pub(crate) struct WorkerTitle {
    map: MmMap,
    /// Where a child writes its title: on the heap, since the kernel reads
    /// /proc/PID/cmdline only from anonymous memory (a static in the
    /// binary's data segment reads as empty). Leaked by `prepare`: never
    /// freed, never written in the master; each child writes its own copy.
    buffer: *mut [u8; 64],
}

impl WorkerTitle {
    /// The master's map, if titles can be shown here: the master runs one
    /// thread, and the kernel accepts the map as it is now (restated
    /// unchanged, as a probe). None where it refuses: then workers keep
    /// their comm name only, and spend no system call trying.
    pub(crate) fn prepare() -> Option<WorkerTitle> {
        let threads = std::fs::read_dir("/proc/self/task").ok()?.count();
        if threads != 1 {
            return None;
        }
        let mut map = MmMap::now()?;
        // SAFETY: brk(0) asks for a break below the heap's start, which the
        // kernel refuses, returning the current break; nothing changes.
        map.brk = unsafe { libc::syscall(libc::SYS_brk, 0) } as u64;
        // SAFETY: every field is the value the kernel has now (read just
        // above, nothing allocated since the break was asked), so the
        // kernel records what it already had.
        let rc = unsafe { prctl_mm_map(&map) };
        (rc == 0).then(|| WorkerTitle {
            map,
            buffer: Box::into_raw(Box::new([0; 64])),
        })
    }

    /// In a freshly forked worker: `respawn: worker SLOT` as its
    /// /proc/PID/cmdline. No allocation, no /proc; a refusal changes
    /// nothing (comm still says `worker SLOT`).
    pub(crate) fn show(&self, slot: usize) {
        // SAFETY: see `buffer`: alive for good, and this child's own copy,
        // written once, by its one thread, before the kernel reads it.
        let area = unsafe { &mut *self.buffer };
        let room = area.len() - 1;
        let mut cursor = &mut area[..room];
        let _ = std::io::Write::write_fmt(&mut cursor, format_args!("respawn: worker {slot}"));
        let len = room - cursor.len();
        area[len] = 0;
        let mut map = self.map;
        map.arg_start = area.as_ptr() as u64;
        map.arg_end = map.arg_start + len as u64 + 1;
        // SAFETY: as in `prepare`; nothing is allocated between this and the prctl.
        map.brk = unsafe { libc::syscall(libc::SYS_brk, 0) } as u64;
        // SAFETY: arg_start..arg_end is `buffer`, alive for the process's
        // life; every other field is the child's own map, the
        // master's copied at the fork, the break asked just above.
        let _ = unsafe { prctl_mm_map(&map) };
    }
}

/// prctl(PR_SET_MM, PR_SET_MM_MAP, map): the kernel copies `map` (its
/// exact size is passed) and records the addresses in it.
///
/// # Safety
/// Every address in `map` must be this process's own: arg_start..arg_end
/// memory that outlives the process's use of /proc/PID/cmdline, the rest
/// the values the kernel has now.
unsafe fn prctl_mm_map(map: &MmMap) -> libc::c_int {
    libc::prctl(
        libc::PR_SET_MM,
        libc::PR_SET_MM_MAP as libc::c_ulong,
        map as *const MmMap as libc::c_ulong,
        std::mem::size_of::<MmMap>() as libc::c_ulong,
        0 as libc::c_ulong,
    )
}

/// The title as it will be stored: no NUL inside, at most CAPACITY - 1
/// bytes, cut at a character boundary.
fn fit(title: &str) -> String {
    let mut end = title.len().min(CAPACITY - 1);
    while !title.is_char_boundary(end) {
        end -= 1;
    }
    title[..end].replace('\0', " ")
}

/// The kernel's refusal, as an error that says what was refused.
fn refused(errno: nix::errno::Errno) -> io::Error {
    let err = io::Error::from(errno);
    io::Error::new(
        err.kind(),
        format!("prctl(PR_SET_MM_MAP): {}", crate::error::describe(&err)),
    )
}

enum Refusal {
    /// The kernel said no: it will say no again.
    Kernel(nix::errno::Errno),
    /// Not now: another thread could move the heap's end under us (see
    /// `show`), or /proc could not be read.
    Other(io::Error),
}

/// Writes `text` into `half` of `buffer` and points the kernel at it.
///
/// prctl(PR_SET_MM_MAP) restates the whole map the kernel keeps for /proc
/// (code, data, heap, stack, arguments, environment) in one call: every
/// field but the argument bounds is what /proc/self/stat says now, and the
/// heap's end is asked of the kernel itself, last, with nothing allocated
/// after it. Another thread could grow the heap between that question and
/// the prctl, and the kernel would then keep a stale end (malloc would see
/// its next brk fail, and fall back to mmap): so a process with more than
/// one thread is refused. The master is single-threaded by contract, and so
/// is a freshly forked worker.
fn show(buffer: &mut [u8], half: usize, text: &str) -> Result<(), Refusal> {
    let area = &mut buffer[half * CAPACITY..(half + 1) * CAPACITY];
    area[..text.len()].copy_from_slice(text.as_bytes());
    area[text.len()] = 0;
    let start = area.as_ptr() as u64;
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|err| Refusal::Other(io::Error::new(err.kind(), format!("counting threads: {err}"))))?
        .count();
    if threads != 1 {
        return Err(Refusal::Other(io::Error::other(format!(
            "a process title is set only in a single-threaded process; this one runs {threads} threads"
        ))));
    }
    let mut map = MmMap::now().ok_or_else(|| Refusal::Other(io::Error::other("reading /proc/self/stat")))?;
    map.arg_start = start;
    map.arg_end = start + text.len() as u64 + 1;
    // SAFETY: brk(0) asks for a break below the heap's start, which the
    // kernel refuses, returning the current break; nothing changes.
    map.brk = unsafe { libc::syscall(libc::SYS_brk, 0) } as u64;
    // SAFETY: arg_start..arg_end is our buffer, which is never freed once
    // shown (set_title leaks it), and every other field is the value the
    // kernel has now.
    let rc = unsafe { prctl_mm_map(&map) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Refusal::Kernel(nix::errno::Errno::last()))
    }
}

/// `struct prctl_mm_map` of <linux/prctl.h>.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct MmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    /// Null with `auxv_size` 0: the auxiliary vector stays as it is.
    auxv: *mut u64,
    auxv_size: u32,
    /// -1: /proc/PID/exe stays as it is.
    exe_fd: u32,
}

impl MmMap {
    /// The map as /proc/self/stat shows it now (fields 26 to 28 and 45 to
    /// 51), with `brk` left at 0 for the caller to ask for last.
    fn now() -> Option<MmMap> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name is in parentheses and may itself hold spaces or
        // ')'; the fields after it start with the third.
        let after_name = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(MmMap {
            start_code: field(26)?,
            end_code: field(27)?,
            start_stack: field(28)?,
            start_data: field(45)?,
            end_data: field(46)?,
            start_brk: field(47)?,
            brk: 0,
            arg_start: field(48)?,
            arg_end: field(49)?,
            env_start: field(50)?,
            env_end: field(51)?,
            auxv: std::ptr::null_mut(),
            auxv_size: 0,
            exe_fd: u32::MAX,
        })
    }
}

/// The last (workers, generation) the master's title showed.
static MASTER_SHOWN: Mutex<Option<(usize, u64)>> = Mutex::new(None);

/// The master's title, set when the number of workers or the generation
/// changed since the last call; the first call also names the process
/// `respawn master` and keeps the original command line.
pub(crate) fn show_master<'a, L: AsFd + 'a>(
    workers: usize,
    generation: u64,
    listeners: impl IntoIterator<Item = &'a L>,
) {
    let mut shown = MASTER_SHOWN.lock().unwrap_or_else(PoisonError::into_inner);
    if *shown == Some((workers, generation)) {
        return;
    }
    let first = shown.is_none();
    if first {
        original();
        if let Err(err) = prctl::set_name(MASTER_NAME) {
            debug!("naming the master process: {err}");
        }
    }
    *shown = Some((workers, generation));
    let title = master_title(workers, generation, &addresses(listeners));
    match set_title(&title) {
        Ok(()) => {}
        // Said once: later calls fail the same way.
        Err(err) if first => debug!(
            "not showing the master's state in /proc/{}/cmdline: {}; \
             ps -e shows it as 'respawn master'",
            std::process::id(),
            crate::error::describe(&err)
        ),
        Err(_) => {}
    }
}

/// `respawn: master, 4 workers, generation 3, 127.0.0.1:8080`.
fn master_title(workers: usize, generation: u64, addresses: &[String]) -> String {
    let plural = if workers == 1 { "" } else { "s" };
    let mut title = format!("respawn: master, {workers} worker{plural}, generation {generation}");
    for address in addresses {
        title.push_str(", ");
        title.push_str(address);
    }
    title
}

/// Each listener's address as `--listen` takes it: `127.0.0.1:8080`,
/// `[::1]:8080`, `unix:/run/app.sock`.
fn addresses<'a, L: AsFd + 'a>(listeners: impl IntoIterator<Item = &'a L>) -> Vec<String> {
    listeners
        .into_iter()
        .map(|listener| {
            let fd = listener.as_fd().as_raw_fd();
            match getsockname::<SockaddrStorage>(fd) {
                Ok(addr) => address(&addr),
                Err(err) => format!("(address unknown: {err})"),
            }
        })
        .collect()
}

fn address(addr: &SockaddrStorage) -> String {
    if let Some(v4) = addr.as_sockaddr_in() {
        return v4.to_string();
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return v6.to_string();
    }
    if let Some(unix) = addr.as_unix_addr() {
        if let Some(path) = unix.path() {
            return format!("unix:{}", path.display());
        }
        if let Some(name) = unix.as_abstract() {
            return format!("unix:@{}", String::from_utf8_lossy(name));
        }
        return "unix:(unnamed)".to_owned();
    }
    format!("(address family {:?})", addr.family())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_title_names_count_generation_and_addresses() {
        assert_eq!(
            master_title(4, 3, &["127.0.0.1:8080".to_owned()]),
            "respawn: master, 4 workers, generation 3, 127.0.0.1:8080"
        );
        assert_eq!(
            master_title(1, 0, &["[::1]:80".to_owned(), "unix:/run/a.sock".to_owned()]),
            "respawn: master, 1 worker, generation 0, [::1]:80, unix:/run/a.sock"
        );
    }

    #[test]
    fn a_title_is_cut_at_a_character_and_holds_no_nul() {
        assert_eq!(fit("a\0b"), "a b");
        let long = "é".repeat(CAPACITY);
        let cut = fit(&long);
        assert!(cut.len() < CAPACITY && cut.len() >= CAPACITY - 2, "{}", cut.len());
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn addresses_read_as_listen_takes_them() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let port = tcp.local_addr().expect("local_addr").port();
        assert_eq!(addresses([&tcp]), [format!("127.0.0.1:{port}")]);
        let dir = std::env::temp_dir().join(format!("respawn-title-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("a.sock");
        let _ = std::fs::remove_file(&path);
        let unix = std::os::unix::net::UnixListener::bind(&path).expect("binding a unix socket");
        assert_eq!(addresses([&unix]), [format!("unix:{}", path.display())]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn argv0_is_resolved_against_the_directory_or_path() {
        let cwd = std::env::current_dir().expect("current_dir");
        assert_eq!(resolve_exe(Path::new("target/x")), Some(cwd.join("target/x")));
        assert_eq!(
            resolve_exe(Path::new("/usr/bin/x")),
            Some(PathBuf::from("/usr/bin/x"))
        );
        // sh is in PATH on any Linux that runs these tests.
        let sh = resolve_exe(Path::new("sh")).expect("sh is found");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
    }

    /// Held by the tests that take STATE's lock: a fork while another test
    /// thread holds it would leave the child waiting for it forever.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// In a forked child (single-threaded, as set_title asks), the title
    /// is all /proc/self/cmdline says, and the arguments read as before.
    #[test]
    fn a_title_replaces_cmdline_but_not_the_arguments() {
        let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let outcome = crate::signals::tests::in_child(|| {
            let before: Vec<OsString> = std::env::args_os().collect();
            let kept = original_args().to_vec();
            let cmdline = || std::fs::read("/proc/self/cmdline").map_err(|e| e.to_string());
            if let Err(err) = set_title("respawn: a title, longer than the next") {
                // A kernel without CONFIG_CHECKPOINT_RESTORE: said by the
                // parent (the child prints nothing, see in_child).
                return Err(format!("SKIPPED: {err}"));
            }
            let first = cmdline()?;
            set_title("respawn: shorter").map_err(|e| e.to_string())?;
            let second = cmdline()?;
            let after: Vec<OsString> = std::env::args_os().collect();
            match () {
                _ if first != b"respawn: a title, longer than the next\0" => Err(format!("{first:?}")),
                _ if second != b"respawn: shorter\0" => Err(format!("{second:?}")),
                _ if after != before || kept != before => Err(format!("{before:?} {kept:?} {after:?}")),
                _ => Ok(()),
            }
        });
        if let Err(Some(why)) = outcome.as_ref().map_err(|e| e.strip_prefix("SKIPPED: ")) {
            eprintln!("SKIPPED a_title_replaces_cmdline_but_not_the_arguments: {why}");
            return;
        }
        assert_eq!(outcome, Ok(()));
    }

    /// What the master prepares once shows a worker's title without /proc,
    /// and a process with threads prepares nothing.
    #[test]
    fn a_worker_title_is_shown_from_the_map_the_master_read() {
        let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(WorkerTitle::prepare().is_none(), "the test runner has threads");
        let outcome = crate::signals::tests::in_child(|| {
            let before: Vec<OsString> = std::env::args_os().collect();
            let Some(title) = WorkerTitle::prepare() else {
                return Err("SKIPPED: the kernel refuses PR_SET_MM_MAP".to_owned());
            };
            // The heap moves after the map was read: the break is asked anew.
            let grown = vec![0u8; 1 << 20];
            title.show(12);
            drop(grown);
            let cmdline = std::fs::read("/proc/self/cmdline").map_err(|e| e.to_string())?;
            let after: Vec<OsString> = std::env::args_os().collect();
            match () {
                _ if cmdline != b"respawn: worker 12\0" => Err(format!("{cmdline:?}")),
                _ if after != before => Err(format!("{before:?} {after:?}")),
                _ => Ok(()),
            }
        });
        if let Err(Some(why)) = outcome.as_ref().map_err(|e| e.strip_prefix("SKIPPED: ")) {
            eprintln!("SKIPPED a_worker_title_is_shown_from_the_map_the_master_read: {why}");
            return;
        }
        assert_eq!(outcome, Ok(()));
    }

    /// Another thread could grow the heap while the map is restated: the
    /// title is refused, and cmdline stays as it was.
    #[test]
    fn a_process_with_threads_keeps_its_cmdline() {
        let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        let (_keep, parked) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || parked.recv());
        let before = std::fs::read("/proc/self/cmdline").expect("reading /proc/self/cmdline");
        let err = set_title("respawn: not here").expect_err("a title with two threads");
        assert!(err.to_string().contains("single-threaded"), "{err}");
        assert_eq!(std::fs::read("/proc/self/cmdline").ok(), Some(before));
        drop(_keep);
        let _ = other.join();
    }

    #[test]
    fn the_map_is_read_from_proc_in_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<MmMap>(), 104, "sizeof(struct prctl_mm_map)");
        let map = MmMap::now().expect("/proc/self/stat");
        assert!(map.start_code < map.end_code, "{map:?}");
        assert!(
            map.arg_start < map.arg_end && map.arg_end <= map.env_start,
            "{map:?}"
        );
        assert!(map.env_start < map.env_end, "{map:?}");
    }
}
