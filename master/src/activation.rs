//! Inherited listeners: sockets bound by someone else and handed over open.
//!
//! Two hand-overs use the same path:
//!
//! - **systemd's socket activation** (`sd_listen_fds(3)`): the service
//!   manager binds, starts us with the sockets at fds 3, 4, ..., and says
//!   so in `LISTEN_FDS` (how many), `LISTEN_PID` (for whom: a child that
//!   inherits the environment must not take them for its own) and
//!   `LISTEN_FDNAMES` (`:`-separated names, from the socket unit). As the
//!   socket stays open in systemd across `systemctl restart`, connections
//!   made meanwhile wait in the kernel's queue instead of being refused.
//! - **respawn's own upgrade** (upgrade.rs): the master starts the new
//!   binary, as workers and then as itself, with the listeners open at the
//!   fd numbers they already have, listed in `RESPAWN_LISTEN_FDS`
//!   (`3,7`), also checked against `LISTEN_PID`. Renumbering them to 3, 4,
//!   ... would close whatever has those numbers, which a master that
//!   re-executes itself cannot undo if the exec then fails.
//!
//! Either way the variables are removed once read, and the fds are made
//! close-on-exec again, so that nothing started later takes them too.
//! Removing a variable takes it out of what programs started later get, but
//! not out of `/proc/PID/environ` (what `ps e` shows): that is the block of
//! text the kernel copied in at exec, which `unsetenv` does not touch and
//! every forked worker inherits. So the text is blanked there too, and no
//! worker looks as if systemd had passed the fds to it.

use crate::Error;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// systemd's first passed fd (`SD_LISTEN_FDS_START`).
const FIRST: RawFd = 3;
/// A bound on LISTEN_FDS, far above any real socket unit, so that a
/// garbage value cannot make us claim every fd number.
const MOST: usize = 1024;

/// Set once the variables have been read: the fds have one owner.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// A socket handed over open, and the name it was given (systemd's
/// `FileDescriptorName=`, or empty).
#[derive(Debug)]
pub struct Inherited {
    pub fd: OwnedFd,
    pub name: String,
    /// Who handed it over.
    pub by: HandedBy,
}

/// Who handed a listener over: it decides who owns a Unix socket's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandedBy {
    /// systemd (`LISTEN_FDS`): the socket unit owns the file
    /// (`RemoveOnStop=`), so respawn never removes it.
    Systemd,
    /// respawn's own upgrade (`RESPAWN_LISTEN_FDS`): the listeners of the
    /// master this process replaces.
    Upgrade,
}

/// The listeners handed to this process, if any: from `LISTEN_FDS` when
/// `LISTEN_PID` is this process, or from a respawn upgrade. The variables are
/// removed, so the first call takes them and later calls return nothing.
/// Call it before any thread is started (it changes the environment).
///
/// Errors: a `LISTEN_FDS` or `RESPAWN_LISTEN_FDS` that does not parse,
/// that names an fd that is not open, or one twice, is a clear error rather
/// than a guess.
pub fn inherited_listeners() -> Result<Vec<Inherited>, Error> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let listed = std::env::var("RESPAWN_LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let block = initial_environment();
    for var in ["LISTEN_PID", "LISTEN_FDS", "RESPAWN_LISTEN_FDS", "LISTEN_FDNAMES"] {
        remove_and_blank(var, block);
    }
    let ours = pid.as_deref().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    if !ours {
        // Unset or for another process (our parent's, inherited by mistake).
        return Ok(Vec::new());
    }
    let (fds, by) = match (listed, count) {
        (Some(listed), _) => (parse_list(&listed)?, HandedBy::Upgrade),
        (None, Some(count)) => (parse_count(&count)?, HandedBy::Systemd),
        (None, None) => return Ok(Vec::new()),
    };
    let names: Vec<&str> = names.as_deref().map_or(Vec::new(), |n| n.split(':').collect());
    let mut inherited = Vec::with_capacity(fds.len());
    for (i, fd) in fds.into_iter().enumerate() {
        set_cloexec(fd).map_err(|err| Error::io(format!("taking inherited fd {fd}"), err))?;
        // SAFETY: the protocol hands these fds to this process (LISTEN_PID
        // is ours), they are open (checked just above), and the variables
        // that name them are gone: nothing else takes ownership of them.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = names.get(i).copied().unwrap_or("").to_owned();
        inherited.push(Inherited { fd, name, by });
    }
    Ok(inherited)
}

/// Where the environment the process started with lies in its memory
/// (`env_start` and `env_end`, fields 50 and 51 of /proc/self/stat): the
/// text /proc/PID/environ shows. None if /proc does not say (it shows 0 to
/// a reader without the right).
fn initial_environment() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The name, field 2, is in parentheses and may hold spaces: count from
    // after it, where field 3 begins.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect();
    let start: usize = fields.get(50 - 3)?.parse().ok()?;
    let end: usize = fields.get(51 - 3)?.parse().ok()?;
    (start < end).then_some((start, end))
}

/// Removes `var` from the environment, and blanks its `NAME=value` text
/// with NULs if it lies in the block the process started with (`block`).
/// Text that `setenv` put elsewhere is the C library's, and left alone.
fn remove_and_blank(var: &str, block: Option<(usize, usize)>) {
    let Ok(name) = std::ffi::CString::new(var) else {
        return;
    };
    // SAFETY: getenv reads the environment, which nothing changes
    // meanwhile: this runs before any thread is started (see
    // inherited_listeners).
    let value = unsafe { libc::getenv(name.as_ptr()) };
    std::env::remove_var(var);
    let Some((start, end)) = block.filter(|_| !value.is_null()) else {
        return;
    };
    // SAFETY: `value` is a NUL-terminated string (getenv's promise).
    let value_len = unsafe { libc::strlen(value) };
    let entry = (value as usize).wrapping_sub(var.len() + 1);
    let len = var.len() + 1 + value_len;
    if entry < start || entry.saturating_add(len) > end {
        return;
    }
    let entry = value.cast::<u8>().wrapping_sub(var.len() + 1);
    // SAFETY: `entry..entry + len` lies inside the block the kernel
    // copied the environment into at exec (checked just above): memory of
    // this process's own stack, readable and writable, owned by no Rust
    // value. The environment no longer points at it (remove_var just took
    // the entry out), and the C library never reuses that block, so
    // nothing reads the bytes but /proc.
    let text = unsafe { std::slice::from_raw_parts_mut(entry, len) };
    if text.starts_with(var.as_bytes()) && text.get(var.len()) == Some(&b'=') {
        text.fill(0);
    }
}

/// `LISTEN_FDS=N`: fds 3 to 3+N-1.
fn parse_count(count: &str) -> Result<Vec<RawFd>, Error> {
    match count.parse::<usize>() {
        Ok(n) if n <= MOST => Ok((0..n).map(|i| FIRST + i as RawFd).collect()),
        _ => Err(bad("LISTEN_FDS", count)),
    }
}

/// `RESPAWN_LISTEN_FDS=3,7`: those fds, each once. An fd listed twice would
/// become two `OwnedFd`s of one number: the first dropped closes it under
/// the other, which then closes whatever the number is given to next.
fn parse_list(list: &str) -> Result<Vec<RawFd>, Error> {
    let fds: Option<Vec<RawFd>> = list
        .split(',')
        .map(|fd| fd.parse::<RawFd>().ok().filter(|&fd| fd >= FIRST))
        .collect();
    let fds = match fds {
        Some(fds) if !fds.is_empty() && fds.len() <= MOST => fds,
        _ => return Err(bad("RESPAWN_LISTEN_FDS", list)),
    };
    let mut seen = std::collections::HashSet::with_capacity(fds.len());
    if let Some(twice) = fds.iter().find(|&&fd| !seen.insert(fd)) {
        return Err(refused(
            "RESPAWN_LISTEN_FDS",
            list,
            format!("fd {twice} is listed twice"),
        ));
    }
    Ok(fds)
}

fn bad(var: &str, value: &str) -> Error {
    refused(var, value, "not a list of fds this process holds".to_owned())
}

fn refused(var: &str, value: &str, why: String) -> Error {
    Error::io(
        format!("reading {var}={value:?}"),
        io::Error::new(io::ErrorKind::InvalidInput, why),
    )
}

/// Close-on-exec, which also proves the fd is open (EBADF if not).
fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on a number we do not own yet only changes its flag,
    // and fails with EBADF if nothing is open there.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_lists_parse_or_say_what_was_wrong() {
        assert_eq!(parse_count("2").ok(), Some(vec![3, 4]));
        assert_eq!(parse_count("0").ok(), Some(vec![]));
        assert!(parse_count("-1").is_err());
        assert!(parse_count("99999").is_err());
        assert_eq!(parse_list("3,7").ok(), Some(vec![3, 7]));
        assert!(parse_list("").is_err());
        assert!(parse_list("2").is_err(), "stderr is not a listener");
        let err = parse_list("x").map(|_| ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reading RESPAWN_LISTEN_FDS=\"x\": not a list of fds this process holds"
        );
    }

    #[test]
    fn an_fd_listed_twice_is_refused_not_owned_twice() {
        let err = parse_list("3,3").map(|_| ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reading RESPAWN_LISTEN_FDS=\"3,3\": fd 3 is listed twice"
        );
        let err = parse_list("3,7,4,7").map(|_| ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "reading RESPAWN_LISTEN_FDS=\"3,7,4,7\": fd 7 is listed twice"
        );
        assert_eq!(parse_list("7,3,4").ok(), Some(vec![7, 3, 4]));
    }
}
