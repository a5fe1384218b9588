//! The pid file: where a host without systemd finds the master.
//!
//! An init script, logrotate's `postrotate` or an operator reads it to know
//! which process to signal (`kill -HUP $(cat /run/app.pid)`). So it must
//! name the running master, and only while it runs:
//!
//! - **Claimed at start**, before any fork ([`PidFile::claim`]): if the file
//!   names a live process that runs this same program and is not this
//!   process, another master holds it, and this one refuses to start
//!   (`pid file /run/x.pid: held by running master 1234`). A file that names
//!   a dead process, a process running something else (the pid was reused),
//!   or no pid at all is stale: one line, and it is replaced.
//! - **Written once the first workers are Ready** ([`PidFile::write`]): a
//!   supervisor that waits for the file waits for a master that serves. It
//!   is written to a temporary file in the same directory and renamed over
//!   the path, so a reader sees the old content or the new, never half.
//! - **Removed on a clean stop** ([`PidFile::remove`]), only if it still
//!   holds this master's pid: a master started since, with the file taken
//!   over, keeps it. It is removed by an explicit call at the end of the
//!   loop, never by a destructor: an upgrade that re-execs the master in
//!   place keeps its pid and must leave the file as it is (the new image
//!   claims it again, finds its own pid, and writes the same content).
//!
//! Two masters started in the same instant can both find the file free;
//! the check is made again just before the write, which narrows that window
//! to the write itself. A pid file cannot do better: systemd's MAINPID is
//! the way to know the master without one.

use crate::error::describe;
use crate::Error;
use log::{debug, error, warn};
use nix::unistd::{self, AccessFlags, Pid};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A pid file this master has claimed.
#[derive(Debug)]
pub(crate) struct PidFile {
    path: PathBuf,
    /// This master's pid: what the file says once written.
    pid: Pid,
}

/// Who a pid file names, as found at a claim.
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

impl PidFile {
    /// Checks that `path` is free for this master, and that its directory
    /// can be written. Says so if a stale file will be replaced.
    pub(crate) fn claim(path: &Path) -> Result<PidFile, Error> {
        let pid_file = PidFile {
            path: path.to_owned(),
            pid: unistd::getpid(),
        };
        let shown = path.display();
        match pid_file.holder() {
            Ok(Holder::Nobody | Holder::Us) => {}
            Ok(Holder::Master(pid)) => {
                return Err(Error::io(
                    format!("pid file {shown}"),
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("held by running master {pid}"),
                    ),
                ))
            }
            Ok(Holder::Stale(why)) => warn!("pid file {shown}: {why}; replacing it"),
            Err(err) => return Err(Error::io(format!("reading pid file {shown}"), err)),
        }
        let dir = pid_file.dir();
        unistd::access(dir, AccessFlags::W_OK)
            .map_err(|errno| Error::io(format!("pid file {shown}: writing in {}", dir.display()), errno))?;
        Ok(pid_file)
    }

    /// Writes this master's pid, atomically. A failure is a line: the
    /// service goes on without its pid file.
    pub(crate) fn write(&self) {
        let shown = self.path.display();
        match self.holder() {
            Ok(Holder::Master(pid)) => {
                error!("pid file {shown}: now held by running master {pid}; not writing it");
                return;
            }
            Ok(_) => {}
            // Unreadable now: the write below says what is wrong.
            Err(err) => debug!("reading pid file {shown}: {}", describe(&err)),
        }
        match self.write_atomically() {
            Ok(()) => debug!("pid file {shown} written: {}", self.pid),
            Err(err) => error!("writing pid file {shown}: {}", describe(&err)),
        }
    }

    /// On a clean stop: removes the file if it still names this master.
    pub(crate) fn remove(&self) {
        let shown = self.path.display();
        match std::fs::read_to_string(&self.path) {
            Ok(text) if parse(&text) == Some(self.pid) => match std::fs::remove_file(&self.path) {
                Ok(()) => debug!("pid file {shown} removed"),
                Err(err) => error!("removing pid file {shown}: {}", describe(&err)),
            },
            Ok(_) => debug!("pid file {shown} does not name this master; left as it is"),
            Err(err) => debug!("reading pid file {shown}: {}", describe(&err)),
        }
    }

    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }

    /// A temporary file beside the path (a rename is atomic only within one
    /// file system), then renamed over it.
    fn write_atomically(&self) -> io::Result<()> {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let temporary = self.dir().join(format!(".{name}.{}.tmp", self.pid));
        let written = std::fs::File::create(&temporary)
            .and_then(|mut file| file.write_all(format!("{}\n", self.pid).as_bytes()))
            .and_then(|()| std::fs::rename(&temporary, &self.path));
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written
    }

    /// Who the file names now.
    fn holder(&self) -> io::Result<Holder> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Holder::Nobody),
            Err(err) => return Err(err),
        };
        let Some(pid) = parse(&text) else {
            let start: String = text.chars().take(40).collect();
            return Ok(Holder::Stale(format!("holds no pid ({start:?})")));
        };
        if pid == self.pid {
            return Ok(Holder::Us);
        }
        if !running(pid) {
            return Ok(Holder::Stale(format!("pid {pid} is not running")));
        }
        let (ours, theirs) = (names(None), names(Some(pid)));
        if theirs.iter().any(|name| ours.contains(name)) {
            return Ok(Holder::Master(pid));
        }
        let theirs = theirs.first().map_or("something else", String::as_str);
        let ours = ours.first().map_or("this program", String::as_str);
        Ok(Holder::Stale(format!("pid {pid} runs {theirs}, not {ours}")))
    }
}

/// A pid file's content: a positive pid, then optional white space.
fn parse(text: &str) -> Option<Pid> {
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|&pid| pid > 0)
        .map(Pid::from_raw)
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
    let file_name = |path: &str| {
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        Path::new(path)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
    };
    let exe = std::fs::read_link(format!("{dir}/exe"))
        .ok()
        .and_then(|path| file_name(&path.to_string_lossy()));
    let argv0 = std::fs::read(format!("{dir}/cmdline")).ok().and_then(|cmdline| {
        let first = cmdline.split(|&b| b == 0).next()?;
        file_name(&String::from_utf8_lossy(first))
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
            }
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
            Holder::Stale(r#"holds no pid ("garbage\n")"#.into())
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
    }

    #[test]
    fn written_whole_and_removed_only_while_it_names_this_master() {
        let scratch = Scratch::new("write");
        let file = scratch.pid_file(4242);
        file.write();
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "4242\n");
        let leftovers: Vec<_> = std::fs::read_dir(&scratch.0).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        std::fs::write(&file.path, "4343\n").unwrap();
        file.remove();
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "4343\n", "not ours");
        std::fs::write(&file.path, "4242\n").unwrap();
        file.remove();
        assert!(!file.path.exists());
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_refused_at_the_claim() {
        let err = PidFile::claim(Path::new("/nonexistent-respawn/x.pid")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pid file /nonexistent-respawn/x.pid: writing in /nonexistent-respawn: \
             no such file or directory"
        );
    }
}
