//! The pid file: where a host without systemd finds the master.
//!
//! An init script, logrotate's `postrotate` or an operator reads it to know
//! which process to signal (`kill -HUP $(cat /run/app.pid)`). So it must
//! name the running master, and only while it runs:
//!
//! - **Written at start** ([`PidFile::claim`]), before any fork, as nginx,
//!   unicorn and gunicorn do: if the file names a live process that runs
//!   this same program, as this user, and is not this process, another
//!   master holds it, and this one refuses to start (`pid file
//!   /run/x.pid: held by running master 1234`). A file that names a dead process, a process running
//!   something else (the pid was reused), or no pid at all is stale: one
//!   line, and it is replaced. Written at the claim, not once the workers
//!   are Ready, so that a second master started while the first one's
//!   workers are still starting finds the file held, and so that the file
//!   is in place before READY=1 goes out.
//! - **Checked once the first workers are Ready** ([`PidFile::write`]): a
//!   file removed or replaced since the start is written again, with a line.
//! - **Removed on a clean stop** ([`PidFile::remove`]), only if it still
//!   holds this master's pid: a master started since, with the file taken
//!   over, keeps it. Also removed when the `PidFile` is dropped in the
//!   process that claimed it (a master that fails after its claim leaves no
//!   file naming a dead pid); never by a forked worker, whose pid differs,
//!   and never by an upgrade, which re-executes the master in place without
//!   running a destructor (the new image claims the file again, finds its
//!   own pid, and leaves it as it is).
//!
//! # Nothing here follows a link
//!
//! The directory may be one another user can write in (the workers' user,
//! say, when it owns `/run/app`), and the master is often root. So:
//!
//! - the file is written to a temporary file beside it whose name nobody can
//!   predict (`.NAME.<random>.tmp`), created with O_CREAT|O_EXCL|O_NOFOLLOW
//!   (a link or a file planted there makes the create fail, never followed),
//!   then given the path's name without replacing anything (see below); a
//!   stale file or link there is first renamed aside, and a rename moves a
//!   symbolic link, it never writes through one;
//! - it is read with O_NOFOLLOW and only if fstat says it is a regular file,
//!   and at most [`MAX_PID_FILE`] bytes of it: what a file that holds no pid
//!   holds is never logged, only its size;
//! - every call works relative to one fd of the directory, opened once per
//!   operation, so the temporary file and the pid file are in the same
//!   directory even if its path changes meanwhile;
//! - a directory that another user than the master's (or root) can write
//!   in, without the sticky bit, is one WARN line at the claim: nothing in
//!   it is followed, but that user can remove or replace the file.
//!
//! # Two masters at once
//!
//! A new file is put in place with renameat2(RENAME_NOREPLACE), or link(2)
//! where the file system refuses that flag: of two masters that both find
//! the path free, one puts its file there and the other finds it held. A
//! stale file is first renamed aside, and the one renamed aside is checked
//! (device and inode) to be the one judged stale; if it is not (another
//! master put its own there meanwhile), it is put back and the file looked
//! at again. What remains: three masters started in the same instant can
//! end with two running, and a file system that can neither rename without
//! replacing nor link falls back to a plain rename, which replaces. A pid
//! file cannot do better: systemd's MAINPID is the way to know the master
//! without one.

use crate::error::describe;
use crate::Error;
use log::{debug, error, warn};
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{self, Mode, SFlag};
use nix::unistd::{self, Pid, UnlinkatFlags};
use std::cell::Cell;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The most a pid file holds: a pid is at most 7 digits on Linux
/// (PID_MAX_LIMIT is 2^22), so anything longer is not one.
const MAX_PID_FILE: usize = 64;

/// How many times the file may change under a claim before it gives up:
/// each turn is another master's file appearing or going.
const ATTEMPTS: usize = 8;

/// A pid file this master has claimed (and written).
#[derive(Debug)]
pub(crate) struct PidFile {
    path: PathBuf,
    /// This master's pid: what the file says.
    pid: Pid,
    /// Removed (or found not to be ours) already: the drop has nothing to do.
    done: Cell<bool>,
    /// The claim of a re-executed image could not make the file ours, and
    /// said so: the `write` that follows says it at DEBUG only.
    refused: Cell<bool>,
}

/// Who a pid file names, as found when looked at.
#[derive(Debug, PartialEq)]
enum Holder {
    /// No file.
    Nobody,
    /// This process (the master re-exec'd itself in place).
    Us,
    /// A live process that runs this program: another master.
    Master(Pid),
    /// Anything else, with why: it will be replaced.
    Stale(String),
}

/// Which file a name led to (device and inode), to check that the one
/// renamed or removed is the one looked at.
#[derive(Clone, Copy, Debug, PartialEq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// Why the file could not be made this master's.
enum Refusal {
    Held(Pid),
    Reading(io::Error),
    Writing(io::Error),
}

impl Refusal {
    /// As a line begins: `pid file /run/x.pid: held by running master 12`.
    fn said(&self, path: &Path) -> String {
        let shown = path.display();
        match self {
            Refusal::Held(pid) => format!("pid file {shown}: held by running master {pid}"),
            Refusal::Reading(err) => format!("reading pid file {shown}: {}", describe(err)),
            Refusal::Writing(err) => format!("writing pid file {shown}: {}", describe(err)),
        }
    }
}

impl PidFile {
    /// Makes `path` name this master, now: refuses if another live master
    /// holds it, replaces a stale file with a line, and says once if the
    /// directory is one another user can write in.
    ///
    /// `reexecuted`: this is the master's new image after an upgrade. The
    /// file named it already, and the first image said what there was to
    /// say of the directory. Whatever is at the path now (a directory or a
    /// process another user put there, say), the service must not end for
    /// it: an ERROR line, and the master serves on without its pid file
    /// (until a later `write` can make it its own again).
    pub(crate) fn claim(path: &Path, reexecuted: bool) -> Result<PidFile, Error> {
        let pid_file = PidFile {
            path: path.to_owned(),
            pid: unistd::getpid(),
            // Until the file is ours, its drop has nothing to remove.
            done: Cell::new(true),
            refused: Cell::new(false),
        };
        let shown = path.display();
        let writing = |err| {
            Error::io(
                format!("pid file {shown}: writing in {}", pid_file.dir().display()),
                err,
            )
        };
        let dir = pid_file.open_dir().map_err(writing)?;
        // The first master said it already; its new image would say it again
        // at every upgrade.
        if !reexecuted {
            warn_if_others_can_write(&dir, pid_file.dir(), &format!("pid file {shown}"), "the file");
        }
        match pid_file.make_ours(&dir, false) {
            Ok(()) => {
                pid_file.done.set(false);
                Ok(pid_file)
            }
            Err(refusal) if reexecuted => {
                error!(
                    "{}; the master serves on without its pid file",
                    refusal.said(&pid_file.path)
                );
                pid_file.refused.set(true);
                Ok(pid_file)
            }
            Err(refusal) => Err(match refusal {
                Refusal::Held(pid) => Error::io(
                    format!("pid file {shown}"),
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("held by running master {pid}"),
                    ),
                ),
                Refusal::Reading(err) => Error::io(format!("reading pid file {shown}"), err),
                Refusal::Writing(err) => writing(err),
            }),
        }
    }

    /// Once the first workers are Ready: the file still names this master,
    /// or is written again. A failure is a line: the service goes on
    /// without its pid file.
    pub(crate) fn write(&self) {
        let shown = self.path.display();
        let made = self
            .open_dir()
            .map_err(Refusal::Writing)
            .and_then(|dir| self.make_ours(&dir, true));
        let said_by_the_claim = self.refused.replace(false);
        match made {
            Ok(()) => {
                // Ours again (after a claim that could not make it so).
                self.done.set(false);
                debug!("pid file {shown} names this master ({})", self.pid)
            }
            // The claim of this image has just said it.
            Err(refusal) if said_by_the_claim => {
                debug!("{}; not writing it", refusal.said(&self.path))
            }
            Err(refusal) => error!("{}; not writing it", refusal.said(&self.path)),
        }
    }

    /// On a clean stop: removes the file if it still names this master.
    pub(crate) fn remove(&self) {
        if self.done.replace(true) {
            return;
        }
        let shown = self.path.display();
        let removed = self.open_dir().and_then(|dir| match self.look(&dir)? {
            (Holder::Us, Some(id)) => {
                // The name may have been given to another file since it was
                // read; an unlink never follows a link, so the worst is a
                // file another user put there removed, which they could do.
                if self.id_of(&dir, &self.name())? == Some(id) {
                    unistd::unlinkat(&dir, self.name().as_os_str(), UnlinkatFlags::NoRemoveDir)?;
                    return Ok(true);
                }
                Ok(false)
            }
            _ => Ok(false),
        });
        match removed {
            Ok(true) => debug!("pid file {shown} removed"),
            Ok(false) => debug!("pid file {shown} does not name this master; left as it is"),
            Err(err) if err.kind() == io::ErrorKind::NotFound => debug!("pid file {shown} is gone already"),
            Err(err) => error!("removing pid file {shown}: {}", describe(&err)),
        }
    }

    /// Makes the file name this master, unless another live master holds
    /// it. `expected`: the file was ours already, so finding it gone or
    /// replaced is worth a line.
    fn make_ours(&self, dir: &OwnedFd, expected: bool) -> Result<(), Refusal> {
        let shown = self.path.display();
        for _ in 0..ATTEMPTS {
            let (holder, found) = self.look(dir).map_err(Refusal::Reading)?;
            let aside = match holder {
                Holder::Us => return Ok(()),
                Holder::Master(pid) => return Err(Refusal::Held(pid)),
                Holder::Nobody => {
                    if expected {
                        warn!("pid file {shown} was removed; writing it again");
                    }
                    None
                }
                Holder::Stale(why) => {
                    if expected {
                        warn!("pid file {shown} was replaced ({why}); writing it again");
                    } else {
                        warn!("pid file {shown}: {why}; replacing it");
                    }
                    match self.set_aside(dir, found) {
                        Ok(Some(aside)) => Some(aside),
                        // It changed meanwhile: look again.
                        Ok(None) => continue,
                        Err(err) => return Err(Refusal::Writing(err)),
                    }
                }
            };
            let placed = self.put_in_place(dir);
            // Only now: while the stale file is still linked, no new file
            // can get its inode number, so another master that judged it
            // stale cannot take ours for it (see set_aside).
            if let Some(aside) = aside {
                let _ = unistd::unlinkat(dir, aside.as_os_str(), UnlinkatFlags::NoRemoveDir);
            }
            match placed {
                Ok(()) => return Ok(()),
                // Another file got there first: whose, the next look says.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(Refusal::Writing(err)),
            }
        }
        Err(Refusal::Writing(io::Error::other(format!(
            "it changed {ATTEMPTS} times while being written; is another master starting?"
        ))))
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }

    /// The file's name in its directory ("" for a path that has none, which
    /// every call then refuses).
    fn name(&self) -> OsString {
        self.path.file_name().unwrap_or_default().to_owned()
    }

    /// The directory, as an fd for the *at calls (O_PATH: it is only a
    /// place to resolve names from). Opened per operation, not kept: a
    /// forked worker must not inherit it.
    fn open_dir(&self) -> io::Result<OwnedFd> {
        if self.path.file_name().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path names no file",
            ));
        }
        Ok(fcntl::open(
            self.dir(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// Which file `name` is now, without following a link; None: no file.
    fn id_of(&self, dir: &OwnedFd, name: &OsString) -> io::Result<Option<FileId>> {
        match stat::fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileId::of(&st))),
            Err(Errno::ENOENT) => Ok(None),
            Err(errno) => Err(errno.into()),
        }
    }

    /// Who the file names now, and which file it is. Never follows a link,
    /// never opens anything but a regular file for reading (O_NONBLOCK: a
    /// FIFO planted there does not make the open wait), and reads at most
    /// [`MAX_PID_FILE`] bytes.
    fn look(&self, dir: &OwnedFd) -> io::Result<(Holder, Option<FileId>)> {
        let name = self.name();
        let flags =
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let fd = match fcntl::openat(dir, name.as_os_str(), flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok((Holder::Nobody, None)),
            // O_NOFOLLOW on a link.
            Err(Errno::ELOOP) => {
                let found = self.id_of(dir, &name)?;
                return Ok((Holder::Stale("is a symbolic link, not a pid file".into()), found));
            }
            // A socket, or a device with nothing behind it.
            Err(Errno::ENXIO) => {
                let found = self.id_of(dir, &name)?;
                return Ok((Holder::Stale("is not a regular file".into()), found));
            }
            Err(errno) => return Err(errno.into()),
        };
        let st = stat::fstat(&fd)?;
        let found = Some(FileId::of(&st));
        match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFREG => {}
            SFlag::S_IFDIR => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a directory is there, not a pid file",
                ))
            }
            _ => return Ok((Holder::Stale("is not a regular file".into()), found)),
        }
        let mut content = Vec::with_capacity(MAX_PID_FILE + 1);
        std::fs::File::from(fd)
            .take(MAX_PID_FILE as u64 + 1)
            .read_to_end(&mut content)?;
        let Some(pid) = std::str::from_utf8(&content).ok().and_then(parse) else {
            // Its size, not its content: this may be any file another user
            // pointed the path at, and the log is read by others.
            let size = st.st_size.max(content.len() as i64);
            return Ok((Holder::Stale(format!("holds no pid ({size} bytes)")), found));
        };
        if pid == self.pid {
            return Ok((Holder::Us, found));
        }
        if !running(pid) {
            return Ok((Holder::Stale(format!("pid {pid} is not running")), found));
        }
        // A process of another user is no master of ours, whatever its
        // name: in a directory another user can write in (/tmp), that user
        // could otherwise keep this master from starting.
        let uid = unistd::geteuid().as_raw();
        if let Some(theirs) = owner(pid).filter(|&theirs| theirs != uid) {
            return Ok((
                Holder::Stale(format!("pid {pid} runs as uid {theirs}, not {uid}")),
                found,
            ));
        }
        let (ours, theirs) = (names(None), names(Some(pid)));
        // A worker runs this program too, but holds no pid file: spawn.rs
        // names each `worker <slot>` (its comm), and a master is never so
        // named.
        if is_a_worker(pid) {
            return Ok((
                Holder::Stale(format!("pid {pid} is a worker, not a master")),
                found,
            ));
        }
        if theirs.iter().any(|name| ours.contains(name)) {
            return Ok((Holder::Master(pid), found));
        }
        let theirs = theirs.first().map_or("something else", String::as_str);
        let ours = ours.first().map_or("this program", String::as_str);
        Ok((
            Holder::Stale(format!("pid {pid} runs {theirs}, not {ours}")),
            found,
        ))
    }

    /// Who the file names now.
    #[cfg(test)]
    fn holder(&self) -> io::Result<Holder> {
        Ok(self.look(&self.open_dir()?)?.0)
    }

    /// Moves the stale file `found` out of the way: renamed aside, under
    /// the name returned, for the caller to remove once its own file is in
    /// place. None: the file there was not `found` any more (another
    /// master's, put there since), and is left, or put back, where it was.
    /// Which file is which is told by device and inode, which holds as long
    /// as the stale file stays linked: an inode freed may be given to the
    /// next file made.
    fn set_aside(&self, dir: &OwnedFd, found: Option<FileId>) -> io::Result<Option<OsString>> {
        let name = self.name();
        // Judging took a while (the file read, /proc looked at): a master
        // that judged it as well may have replaced it by now. Renaming its
        // file aside and putting it back leaves a moment in which a third
        // can take the name, and the second's file is then lost while it
        // believes it holds it: look again rather than take what is there.
        if found.is_some() && self.id_of(dir, &name)? != found {
            return Ok(None);
        }
        let aside = OsString::from(format!(".{}.{:016x}.stale", name.to_string_lossy(), random()));
        match fcntl::renameat(dir, name.as_os_str(), dir, aside.as_os_str()) {
            Ok(()) => {}
            Err(Errno::ENOENT) => return Ok(None),
            Err(errno) => return Err(errno.into()),
        }
        if found.is_some() && self.id_of(dir, &aside)? == found {
            return Ok(Some(aside));
        }
        if let Err(err) = place_without_replacing(dir, &aside, &name) {
            // A third file took the name meanwhile: the one set aside is
            // lost to its master, which says so at its Ready check.
            debug!("putting back {}: {}", self.path.display(), describe(&err));
        }
        let _ = unistd::unlinkat(dir, aside.as_os_str(), UnlinkatFlags::NoRemoveDir);
        Ok(None)
    }

    /// Writes this master's pid to a new temporary file, then gives it the
    /// file's name, unless a file has it (AlreadyExists).
    fn put_in_place(&self, dir: &OwnedFd) -> io::Result<()> {
        let temporary = self.write_temporary(dir)?;
        let placed = place_without_replacing(dir, &temporary, &self.name());
        // Gone after a rename; after a link, or a failure, still there.
        let _ = unistd::unlinkat(dir, temporary.as_os_str(), UnlinkatFlags::NoRemoveDir);
        placed
    }

    /// A new file beside the pid file (a rename is atomic only within one
    /// file system) holding the pid, mode 0644 whatever the umask; its name
    /// is random, so that nobody can plant something there first.
    fn write_temporary(&self, dir: &OwnedFd) -> io::Result<OsString> {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(0o644);
        let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
        for _ in 0..ATTEMPTS {
            let name = OsString::from(format!(
                ".{}.{:016x}.tmp",
                self.name().to_string_lossy(),
                random()
            ));
            let fd = match fcntl::openat(dir, name.as_os_str(), flags, mode) {
                Ok(fd) => fd,
                Err(Errno::EEXIST) => {
                    last = io::Error::from(Errno::EEXIST);
                    continue;
                }
                Err(errno) => return Err(errno.into()),
            };
            let written = stat::fchmod(&fd, mode)
                .map_err(io::Error::from)
                .and_then(|()| std::fs::File::from(fd).write_all(format!("{}\n", self.pid).as_bytes()));
            if let Err(err) = written {
                let _ = unistd::unlinkat(dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir);
                return Err(err);
            }
            return Ok(name);
        }
        Err(last)
    }
}

impl Drop for PidFile {
    /// Only in the process that claimed the file: a worker forked with a
    /// copy of the master's state has another pid.
    fn drop(&mut self) {
        if unistd::getpid() == self.pid {
            self.remove();
        }
    }
}

impl FileId {
    fn of(st: &stat::FileStat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// Gives `from` the name `to` in `dir`, unless `to` exists (AlreadyExists):
/// renameat2(RENAME_NOREPLACE), or link(2) where the file system does not
/// take the flag (link never replaces either); a file system that can do
/// neither gets a plain rename, which replaces.
fn place_without_replacing(dir: &OwnedFd, from: &OsString, to: &OsString) -> io::Result<()> {
    let (from, to) = (from.as_os_str(), to.as_os_str());
    match fcntl::renameat2(dir, from, dir, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(Errno::EINVAL | Errno::ENOSYS) => {}
        Err(errno) => return Err(errno.into()),
    }
    match unistd::linkat(dir, from, dir, to, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EPERM | Errno::EOPNOTSUPP) => Ok(fcntl::renameat(dir, from, dir, to)?),
        Err(errno) => Err(errno.into()),
    }
}

/// 64 bits nobody can guess, for a temporary name. From the kernel's
/// generator; without waiting for it at early boot (the names are created
/// with O_EXCL, so a guessable one costs a retry, never a followed link).
fn random() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_NONBLOCK) };
    if got == bytes.len() as isize {
        return u64::from_ne_bytes(bytes);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ (u64::from(std::process::id()) << 32)
}

/// Says, once, that another user can write in `dir`, where `what` (a pid
/// file, a socket) is made: nothing there is followed, but that user can
/// remove or replace `thing`. Quiet for a directory with the sticky bit
/// (/tmp), where only a file's owner can remove or rename it.
pub(crate) fn warn_if_others_can_write(dir: &impl std::os::fd::AsFd, shown: &Path, what: &str, thing: &str) {
    let Ok(st) = stat::fstat(dir.as_fd()) else {
        return;
    };
    let me = (unistd::geteuid().as_raw(), unistd::getegid().as_raw());
    if let Some(who) = other_writers(st.st_uid, st.st_gid, st.st_mode, me) {
        warn!(
            "{what}: {who} can write in its directory {} (mode {:04o}, no sticky bit); \
             respawn follows no link there, but that user can remove or replace {thing}",
            shown.display(),
            st.st_mode & 0o7777
        );
    }
}

/// Who, besides `me` (uid, gid) and root, can create, rename and remove
/// names in a directory of this owner, group and mode; None when nobody
/// can, or when the sticky bit keeps them off files that are not theirs.
fn other_writers(owner: u32, group: u32, mode: u32, me: (u32, u32)) -> Option<String> {
    if mode & libc::S_ISVTX != 0 {
        return None;
    }
    if owner != 0 && owner != me.0 {
        return Some(format!("uid {owner}"));
    }
    if mode & 0o020 != 0 && group != 0 && group != me.1 {
        return Some(format!("group {group}"));
    }
    if mode & 0o002 != 0 {
        return Some("every user".to_owned());
    }
    None
}

/// A pid file's content: a positive pid, then optional white space.
fn parse(text: &str) -> Option<Pid> {
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|&pid| pid > 0)
        .map(Pid::from_raw)
}

/// The effective uid a process runs as (`Uid:` in /proc/PID/status; not
/// the owner of /proc/PID, which is root for a process that is not
/// dumpable). None: it could not be read.
fn owner(pid: Pid) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// Is its name (comm, which spawn.rs sets) `worker <slot>`?
fn is_a_worker(pid: Pid) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    comm.trim_end_matches('\n')
        .strip_prefix("worker ")
        .is_some_and(|slot| !slot.is_empty() && slot.bytes().all(|b| b.is_ascii_digit()))
}

/// Alive and not a zombie (a master that died and is not reaped yet).
fn running(pid: Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the name, which is in parentheses and may
    // itself hold ')'.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].trim_start().chars().next());
    !matches!(state, None | Some('Z' | 'X'))
}

/// What a process runs, by every name /proc gives, so that a changed
/// process title or an unreadable exe link (another user's process) still
/// leaves one to compare: the file name of its executable, of its argv[0],
/// and its comm. None: this process.
fn names(pid: Option<Pid>) -> Vec<String> {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |pid| format!("/proc/{pid}"));
    let file_name = |path: &[u8]| {
        let path = path.strip_suffix(b" (deleted)").unwrap_or(path);
        Path::new(std::ffi::OsStr::from_bytes(path))
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
    };
    let exe = std::fs::read_link(format!("{dir}/exe"))
        .ok()
        .and_then(|path| file_name(path.as_os_str().as_bytes()));
    let argv0 = std::fs::read(format!("{dir}/cmdline")).ok().and_then(|cmdline| {
        let first = cmdline.split(|&b| b == 0).next()?;
        file_name(first)
    });
    let comm = std::fs::read_to_string(format!("{dir}/comm"))
        .ok()
        .map(|comm| comm.trim_end_matches('\n').to_owned());
    [exe, argv0, comm]
        .into_iter()
        .flatten()
        .filter(|name| !name.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A pid file in a directory of this test's own, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("respawn-pidfile-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn pid_file(&self, pid: i32) -> PidFile {
            PidFile {
                path: self.0.join("x.pid"),
                pid: Pid::from_raw(pid),
                // Not this process's: its drop must not remove anything.
                done: Cell::new(true),
                refused: Cell::new(false),
            }
        }

        fn files(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_pid_file_is_read_as_a_positive_pid() {
        assert_eq!(parse("1234\n"), Some(Pid::from_raw(1234)));
        assert_eq!(parse(" 1234 "), Some(Pid::from_raw(1234)));
        for bad in ["", "\n", "0", "-5", "12 34", "garbage", "99999999999"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_holder_is_nobody_us_or_stale_with_why() {
        let scratch = Scratch::new("holder");
        let me = std::process::id() as i32;
        let file = scratch.pid_file(me);
        assert_eq!(file.holder().unwrap(), Holder::Nobody);
        std::fs::write(&file.path, format!("{me}\n")).unwrap();
        assert_eq!(file.holder().unwrap(), Holder::Us);
        std::fs::write(&file.path, "garbage\n").unwrap();
        assert_eq!(
            file.holder().unwrap(),
            Holder::Stale("holds no pid (8 bytes)".into())
        );
        // A child of ours, reaped: a pid that is certainly not running now.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(&file.path, format!("{dead}\n")).unwrap();
        assert_eq!(
            file.holder().unwrap(),
            Holder::Stale(format!("pid {dead} is not running"))
        );
        // Our parent (cargo, a shell) runs something else than this test.
        let parent = unistd::getppid();
        std::fs::write(&file.path, format!("{parent}\n")).unwrap();
        let Holder::Stale(why) = file.holder().unwrap() else {
            panic!("our parent taken for a master");
        };
        assert!(why.starts_with(&format!("pid {parent} runs ")), "{why}");
    }

    #[test]
    fn a_live_process_running_this_program_holds_it() {
        let scratch = Scratch::new("held");
        // The file as another instance of this very test binary would see
        // it: it names us, and we run the same program.
        let other = scratch.pid_file(1);
        std::fs::write(&other.path, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(
            other.holder().unwrap(),
            Holder::Master(Pid::from_raw(std::process::id() as i32))
        );
        // Claimed by it: refused, and the file is left as it was.
        let file = scratch.pid_file(4242);
        assert!(matches!(
            file.make_ours(&file.open_dir().unwrap(), false),
            Err(Refusal::Held(_))
        ));
        assert_eq!(
            std::fs::read_to_string(&other.path).unwrap(),
            format!("{}\n", std::process::id())
        );
    }

    #[test]
    fn what_is_not_a_pid_file_is_never_read_and_never_shown() {
        let scratch = Scratch::new("not-a-pid-file");
        let file = scratch.pid_file(4242);
        let secret = scratch.0.join("secret");
        std::fs::write(&secret, "root:$6$saltsalt$hashhashhash:19000:0:99999:7:::\n").unwrap();
        std::os::unix::fs::symlink(&secret, &file.path).unwrap();
        assert_eq!(
            file.holder().unwrap(),
            Holder::Stale("is a symbolic link, not a pid file".into())
        );
        std::fs::remove_file(&file.path).unwrap();
        // Longer than any pid: its size alone.
        std::fs::write(&file.path, "1".repeat(MAX_PID_FILE * 4)).unwrap();
        assert_eq!(
            file.holder().unwrap(),
            Holder::Stale("holds no pid (256 bytes)".into())
        );
        std::fs::remove_file(&file.path).unwrap();
        // A FIFO: the open does not wait for a writer.
        nix::unistd::mkfifo(&file.path, Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(
            file.holder().unwrap(),
            Holder::Stale("is not a regular file".into())
        );
        std::fs::remove_file(&file.path).unwrap();
        std::fs::create_dir(&file.path).unwrap();
        let err = file.holder().unwrap_err();
        assert_eq!(describe(&err), "a directory is there, not a pid file");
    }

    #[test]
    fn a_planted_link_is_replaced_never_written_through() {
        let scratch = Scratch::new("link");
        let file = scratch.pid_file(4242);
        let secret = scratch.0.join("secret");
        std::fs::write(&secret, "secret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&secret, &file.path).unwrap();
        file.write();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "secret\n");
        let meta = std::fs::symlink_metadata(&file.path).unwrap();
        assert!(meta.file_type().is_file(), "the link is replaced by a file");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "4242\n");
        assert_eq!(scratch.files(), ["secret", "x.pid"], "nothing else is left");
    }

    #[test]
    fn written_whole_and_removed_only_while_it_names_this_master() {
        let scratch = Scratch::new("write");
        let file = scratch.pid_file(4242);
        file.write();
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "4242\n");
        assert_eq!(scratch.files(), ["x.pid"], "no temporary file is left behind");
        std::fs::write(&file.path, "4343\n").unwrap();
        file.done.set(false);
        file.remove();
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "4343\n", "not ours");
        std::fs::write(&file.path, "4242\n").unwrap();
        file.done.set(false);
        file.remove();
        assert!(!file.path.exists());
    }

    #[test]
    fn a_new_file_never_replaces_one_put_there_first() {
        let scratch = Scratch::new("noreplace");
        let file = scratch.pid_file(4242);
        let dir = file.open_dir().unwrap();
        std::fs::write(&file.path, "4343\n").unwrap();
        let err = file.put_in_place(&dir).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "4343\n");
        assert_eq!(scratch.files(), ["x.pid"], "the temporary file is removed");
    }

    #[test]
    fn a_stale_file_replaced_meanwhile_is_put_back_not_removed() {
        let scratch = Scratch::new("aside");
        let file = scratch.pid_file(4242);
        let dir = file.open_dir().unwrap();
        std::fs::write(&file.path, "garbage\n").unwrap();
        let (_, judged) = file.look(&dir).unwrap();
        // Another master's file, put there between the look and the rename
        // (the stale one kept elsewhere, so that its inode is not reused).
        std::fs::rename(&file.path, scratch.0.join("kept")).unwrap();
        std::fs::write(scratch.0.join("other"), "4343\n").unwrap();
        std::fs::rename(scratch.0.join("other"), &file.path).unwrap();
        assert_eq!(file.set_aside(&dir, judged).unwrap(), None);
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "4343\n");
        assert_eq!(scratch.files(), ["kept", "x.pid"]);
        std::fs::remove_file(scratch.0.join("kept")).unwrap();
        // The one judged stale: set aside, still linked, for the caller.
        let (_, judged) = file.look(&dir).unwrap();
        let aside = file.set_aside(&dir, judged).unwrap().expect("set aside");
        assert_eq!(scratch.files(), [aside.to_string_lossy().into_owned()]);
    }

    /// Masters started in the same instant: each a process of this test
    /// binary (so each takes the others for masters of this program), all
    /// claiming one path as soon as a barrier opens, and alive until every
    /// one has tried. Exactly one may hold the file. With a rename that
    /// replaces, two or more found it free (or stale) and each took it for
    /// its own.
    #[test]
    fn of_masters_claiming_at_once_exactly_one_holds_the_file() {
        use nix::sys::wait::waitpid;
        use nix::unistd::{fork, pipe, ForkResult};
        const MASTERS: usize = 6;
        let scratch = Scratch::new("race");
        let path = scratch.0.join("x.pid");
        for round in 0..20 {
            // No file, or a stale one, which each sets aside before its own.
            let _ = std::fs::remove_file(&path);
            if round % 2 == 1 {
                std::fs::write(&path, "garbage\n").unwrap();
            }
            let (go_read, go_write) = pipe().expect("pipe");
            let (done_read, done_write) = pipe().expect("pipe");
            let (said_read, said_write) = pipe().expect("pipe");
            let mut children = Vec::new();
            for _ in 0..MASTERS {
                // SAFETY: the child claims, writes one line and waits, then
                // leaves with _exit; the log has no logger in unit tests, so
                // it takes no lock another thread may hold.
                match unsafe { fork() }.expect("fork") {
                    ForkResult::Child => {
                        drop(go_write);
                        drop(done_write);
                        let mut byte = [0u8; 1];
                        // EOF once every copy of the write end is closed.
                        let _ = nix::unistd::read(&go_read, &mut byte);
                        let said = match PidFile::claim(&path, false) {
                            Ok(file) => {
                                std::mem::forget(file);
                                "ok"
                            }
                            Err(err) if err.to_string().contains("held by running master") => "held",
                            Err(_) => "error",
                        };
                        let line = format!("{} {said}\n", std::process::id());
                        let _ = nix::unistd::write(&said_write, line.as_bytes());
                        let _ = nix::unistd::read(&done_read, &mut byte);
                        // SAFETY: ends the child without the parent's
                        // destructors or atexit handlers.
                        unsafe { libc::_exit(0) }
                    }
                    ForkResult::Parent { child } => children.push(child),
                }
            }
            drop(said_write);
            drop(go_write);
            let mut said = String::new();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while said.lines().count() < MASTERS && std::time::Instant::now() < deadline {
                let mut buf = [0u8; 512];
                match nix::unistd::read(&said_read, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => said.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            drop(done_write);
            for child in children {
                let _ = waitpid(child, None);
            }
            let winners: Vec<&str> = said.lines().filter(|l| l.ends_with(" ok")).collect();
            assert_eq!(winners.len(), 1, "round {round}: {said}");
            assert_eq!(said.lines().count(), MASTERS, "round {round}: {said}");
            let holder = winners[0].split(' ').next().unwrap_or_default();
            assert_eq!(
                std::fs::read_to_string(&path).unwrap_or_default(),
                format!("{holder}\n"),
                "round {round}"
            );
        }
    }

    /// A first start is refused what a re-executed image serves on
    /// without: a directory another user put at the path, say. Nothing is
    /// removed, then or at the drop.
    #[test]
    fn a_re_executed_master_serves_on_without_a_pid_file_it_cannot_claim() {
        let scratch = Scratch::new("reexecuted");
        let path = scratch.0.join("x.pid");
        std::fs::create_dir(&path).unwrap();
        let Err(err) = PidFile::claim(&path, false) else {
            panic!("a first start is refused");
        };
        assert!(
            err.to_string().ends_with("a directory is there, not a pid file"),
            "{err}"
        );
        let pid_file = PidFile::claim(&path, true).expect("an upgrade's image serves on");
        pid_file.remove();
        drop(pid_file);
        assert!(path.is_dir());
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_refused_at_the_claim() {
        let err = PidFile::claim(Path::new("/nonexistent-respawn/x.pid"), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pid file /nonexistent-respawn/x.pid: writing in /nonexistent-respawn: \
             no such file or directory"
        );
    }

    #[test]
    fn a_directory_is_shared_when_another_user_can_write_in_it_without_the_sticky_bit() {
        let me = (1000, 1000);
        for (owner, group, mode, expected) in [
            (1000, 1000, 0o40755, None),
            (0, 0, 0o40755, None),
            (0, 1000, 0o40775, None),
            (65534, 65534, 0o40755, Some("uid 65534")),
            (0, 33, 0o40775, Some("group 33")),
            (0, 0, 0o40777, Some("every user")),
            (0, 0, 0o41777, None),
            (65534, 65534, 0o41777, None),
        ] {
            assert_eq!(
                other_writers(owner, group, mode, me).as_deref(),
                expected,
                "{owner}:{group} {mode:o}"
            );
        }
    }
}
