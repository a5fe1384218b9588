//! Workers in any language: a worker function that executes a program.
//!
//! `respawn -- node server.js` forks each worker as usual (the hygiene of
//! spawn.rs, the parent-death signal, the slot) and then, in the child,
//! executes the program with the contract of docs/protocol.md:
//!
//! - its listeners at fd 3, 4, ..., named by `LISTEN_FDS`, `LISTEN_PID`
//!   and `LISTEN_FDNAMES` as systemd names them, so that a server that
//!   supports socket activation runs unchanged;
//! - the write end of its pipe to the master at the next fd, named by
//!   `RESPAWN_CHANNEL_FD`, for Ready, Suicide, Busy and Idle frames (the
//!   clients in clients/ speak them); `RESPAWN_SLOT` and
//!   `RESPAWN_MAX_REQUESTS` (its share, jitter drawn) beside it;
//! - SIGTERM and SIGQUIT unblocked (the program's stop request); HUP,
//!   TTIN, TTOU and USR2 left ignored (they steer the master).
//!
//! The worker's pid is the pid the master forked: the exec replaces the
//! child, it does not add a process. A program that does not speak the
//! channel ([`Exec::ready_at_exec`]) counts as Ready once it is executed:
//! the child sends Ready itself just before the exec, and the pipe is not
//! passed on.

use crate::upgrade::{self, Program};
use crate::Error;
use respawn_ipc::{describe, Handoff, Message};
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// What an exec's error means for a file that is there: the kernel says
/// "no such file" for a `#!` line naming a missing interpreter, and "exec
/// format error" for a script with no `#!` line.
fn hint(path: &Path, err: &io::Error) -> String {
    let first_line = || {
        let mut head = [0u8; 256];
        let n = std::fs::File::open(path)
            .and_then(|mut file| io::Read::read(&mut file, &mut head))
            .unwrap_or(0);
        let line = head[..n].split(|&b| b == b'\n').next().unwrap_or_default();
        String::from_utf8_lossy(line).into_owned()
    };
    match err.raw_os_error() {
        Some(libc::ENOENT) if path.exists() => match first_line().strip_prefix("#!") {
            Some(line) => match line.split([' ', '\t']).find(|word| !word.is_empty()) {
                // The kernel looks for "/bin/sh\r": a script saved with CRLF.
                Some(interpreter) if interpreter.ends_with('\r') => {
                    " (its #! line ends in a carriage return: the script has CRLF line endings)".to_owned()
                }
                Some(interpreter) => format!(" (its #! line names {interpreter}, which is not there)"),
                None => String::new(),
            },
            None => String::new(),
        },
        Some(libc::ENOEXEC) => {
            " (not a program for this machine, and no #! line: add one, or run it through its \
             interpreter, -- python3 PATH)"
                .to_owned()
        }
        _ => String::new(),
    }
}

/// The program each worker executes, and how.
#[derive(Clone, Debug)]
pub struct Exec {
    program: Program,
    max_requests: u64,
    jitter: u64,
    ready_at_exec: bool,
    ready_on_notify: bool,
}

impl Exec {
    /// `command` (looked up in `PATH` when it has no `/`, as a shell does,
    /// or made absolute against the current directory) with `args`. The
    /// error says what is wrong, at start rather than in a crash loop:
    /// `node: no such file or directory`. Only the name is fixed here: each
    /// worker executes what the path names when it is forked, so a rolling
    /// restart (HUP) after a deploy that flipped a symlink runs the new
    /// release.
    pub fn new(
        command: impl Into<OsString>,
        args: impl IntoIterator<Item = OsString>,
    ) -> Result<Exec, Error> {
        let command = command.into();
        let path = find(Path::new(&command))
            .map_err(|err| Error::io(command.to_string_lossy().into_owned(), err))?;
        let args = std::iter::once(command).chain(args).collect();
        Ok(Exec {
            program: Program { path, args },
            max_requests: 0,
            jitter: 0,
            ready_at_exec: false,
            ready_on_notify: false,
        })
    }

    /// Each worker retires after `max` requests plus a random 0 to `jitter`
    /// (0: never), passed as `RESPAWN_MAX_REQUESTS`: the program counts.
    pub fn max_requests(mut self, max: u64, jitter: u64) -> Exec {
        self.max_requests = max;
        self.jitter = jitter;
        self
    }

    /// The program does not speak the channel: it counts as Ready as soon
    /// as it is executed, and has no handover (a crash is a death without
    /// warning, replaced at its exit).
    pub fn ready_at_exec(mut self, on: bool) -> Exec {
        self.ready_at_exec = on;
        self
    }

    /// The program speaks systemd's readiness protocol, not the channel: it
    /// is given no pipe, and counts as Ready when it sends READY=1 to the
    /// NOTIFY_SOCKET the master made for it (with
    /// `Config::ready_on_notify`, which the master needs too).
    pub fn ready_on_notify(mut self, on: bool) -> Exec {
        self.ready_on_notify = on;
        self
    }

    /// Where the program was found: absolute, its symlinks not resolved
    /// (each fork's exec follows them as they are then).
    pub fn path(&self) -> &Path {
        &self.program.path
    }

    /// The worker function: in the child the master forked, executes the
    /// program. Returns only if that failed, with the exit code.
    pub fn run(&self, handoff: Handoff) -> i32 {
        let pid = std::process::id();
        let err = self.exec(&handoff, pid);
        let path = self.program.path.display();
        if err.raw_os_error() == Some(libc::EAGAIN) {
            // Root's fork is not held to the limit; the exec, after the
            // drop to --user, is (the kernel checks RLIMIT_NPROC there).
            let limit = crate::limits::explain(&err).unwrap_or_default();
            log::error!("worker {pid}: executing {path}: {} ({limit})", describe(&err));
            return respawn_ipc::exit_code::HOST_REFUSED;
        }
        log::error!(
            "worker {pid}: executing {path}: {}{}",
            describe(&err),
            hint(&self.program.path, &err)
        );
        respawn_ipc::exit_code::SETUP_FAILED
    }

    fn exec(&self, handoff: &Handoff, pid: u32) -> io::Error {
        let listeners: Vec<RawFd> = handoff.listeners.iter().map(AsRawFd::as_raw_fd).collect();
        let channel = handoff.channel.as_fd().as_raw_fd();
        let speaks_channel = !self.ready_at_exec && !self.ready_on_notify;
        let mut sources = listeners.clone();
        if speaks_channel {
            sources.push(channel);
        }
        if let Err(err) = place_from_3(&sources) {
            return err;
        }
        if self.ready_at_exec {
            // The channel stays close-on-exec: the master sees it close.
            if let Err(err) = handoff.channel.send(&Message::Ready) {
                return err;
            }
        }
        if let Err(err) = unblock_stop_signals() {
            return err;
        }
        let n = listeners.len();
        let names = (0..n)
            .map(|i| format!("listener{i}"))
            .collect::<Vec<_>>()
            .join(":");
        let mut ours = vec![
            ("LISTEN_FDS".to_owned(), n.to_string()),
            ("LISTEN_PID".to_owned(), pid.to_string()),
            ("LISTEN_FDNAMES".to_owned(), names),
            ("RESPAWN_SLOT".to_owned(), handoff.slot.to_string()),
        ];
        if speaks_channel {
            ours.push(("RESPAWN_CHANNEL_FD".to_owned(), (3 + n).to_string()));
        }
        if let Some(share) = share(self.max_requests, self.jitter) {
            ours.push(("RESPAWN_MAX_REQUESTS".to_owned(), share.to_string()));
        }
        upgrade::execute(&self.program, &ours)
    }
}

/// Finds `command` as execvp would (a bare name in `PATH`, the search the
/// upgrade's argv[0] uses too), and checks it can be executed. The path is
/// made absolute but never resolved: each fork's exec follows its symlinks
/// then, so that a deploy that flips `current -> release2` and sends HUP
/// runs release2 (canonicalizing here would pin the release of the start).
fn find(command: &Path) -> io::Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let cwd = std::env::current_dir().ok();
    let candidate = if command.as_os_str().as_bytes().contains(&b'/') {
        // Relative to the directory the master started in, which a later
        // chdir (by a program embedding the library) must not change. If
        // that directory cannot be named (removed), the path stays as it
        // is, and the kernel reads it from there all the same.
        match &cwd {
            Some(cwd) => cwd.join(command),
            None => command.to_path_buf(),
        }
    } else {
        crate::title::search_path(command, cwd.as_deref())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?
    };
    nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK)?;
    if !candidate.is_file() {
        return Err(io::Error::other("not a file"));
    }
    // Components drop the `.` of `./server` (for the log's sake); `..` is
    // kept, as the kernel must read it after the symlink before it.
    Ok(candidate.components().collect())
}

/// Puts `sources[i]` at fd 3 + i, without close-on-exec. Each is first
/// lifted above the targets, so that placing one never overwrites another
/// still to be placed.
fn place_from_3(sources: &[RawFd]) -> io::Result<()> {
    let above = 3 + sources.len() as RawFd;
    let mut lifted = Vec::with_capacity(sources.len());
    for &fd in sources {
        // SAFETY: F_DUPFD_CLOEXEC makes a new fd; nothing else is touched.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        if new < 0 {
            return Err(io::Error::last_os_error());
        }
        lifted.push(new);
    }
    for (i, &fd) in lifted.iter().enumerate() {
        // SAFETY: dup2 onto a number we are about to hand to the program;
        // whatever was there is the child's (about to exec) and is replaced.
        // The new fd has no close-on-exec, which is the point.
        if unsafe { libc::dup2(fd, 3 + i as RawFd) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is our own duplicate, made above, used by no one.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// The master forks workers with TERM and QUIT blocked until they handle
/// them; a program of another language installs its handlers after its
/// exec, and a blocked signal stays blocked across exec.
fn unblock_stop_signals() -> io::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGQUIT);
    set.thread_unblock().map_err(io::Error::from)
}

/// `max` plus a random 0 to `jitter`; None when `max` is 0.
fn share(max: u64, jitter: u64) -> Option<u64> {
    if max == 0 {
        return None;
    }
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let random = hasher.finish();
    let extra = jitter.checked_add(1).map_or(random, |choices| random % choices);
    Some(max.saturating_add(extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_error_of_a_file_that_is_there_says_what_it_means() {
        let dir = std::env::temp_dir().join(format!("respawn-exec-hint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (shebang, plain, crlf) = (dir.join("bad.py"), dir.join("plain.py"), dir.join("crlf.sh"));
        std::fs::write(&shebang, "#!/usr/bin/no-such-python -u\nprint(1)\n").unwrap();
        std::fs::write(&plain, "print(1)\n").unwrap();
        std::fs::write(&crlf, "#!/bin/sh\r\necho 1\r\n").unwrap();
        let enoent = io::Error::from_raw_os_error(libc::ENOENT);
        let enoexec = io::Error::from_raw_os_error(libc::ENOEXEC);
        assert_eq!(
            hint(&shebang, &enoent),
            " (its #! line names /usr/bin/no-such-python, which is not there)"
        );
        assert!(hint(&plain, &enoexec).contains("no #! line"));
        assert!(
            hint(&crlf, &enoent).contains("CRLF line endings"),
            "{}",
            hint(&crlf, &enoent)
        );
        assert_eq!(hint(&dir.join("gone"), &enoent), "");
        assert_eq!(hint(&plain, &io::Error::from_raw_os_error(libc::EPERM)), "");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_command_is_found_in_path_or_said_missing() {
        let sh = find(Path::new("sh")).expect("sh is in PATH");
        assert!(sh.is_absolute(), "{sh:?}");
        let err = find(Path::new("no-such-program-here")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        let err = Exec::new("/etc/passwd", []).map(|_| ()).unwrap_err();
        assert_eq!(err.to_string(), "/etc/passwd: permission denied");
    }

    #[test]
    fn a_path_through_a_symlink_is_kept_for_each_exec_to_follow() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("respawn-exec-find-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("release1")).unwrap();
        let server = dir.join("release1/server");
        std::fs::write(&server, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o755)).unwrap();
        symlink("release1", dir.join("current")).unwrap();
        let through = dir.join("current/./server");
        let found = find(&through);
        let missing = find(&dir.join("current/none")).map_err(|err| err.kind());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.ok(), Some(dir.join("current/server")));
        assert_eq!(missing, Err(io::ErrorKind::NotFound));
    }

    #[test]
    fn a_share_is_at_least_max_and_at_most_max_plus_jitter() {
        assert_eq!(share(0, 5), None);
        assert_eq!(share(10, 0), Some(10));
        for _ in 0..100 {
            let got = share(10, 5).expect("a share");
            assert!((10..=15).contains(&got), "{got}");
        }
        assert!(share(u64::MAX, u64::MAX).is_some());
    }
}
