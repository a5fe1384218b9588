//! Telling systemd how the service is doing (sd_notify), without libsystemd.
//!
//! Under a unit with `Type=notify` or `Type=notify-reload`, systemd puts the
//! address of a datagram socket in `$NOTIFY_SOCKET`: a path, or `@name` for
//! a socket in the abstract namespace. A message is one datagram of
//! `KEY=value` lines (`man sd_notify`). The master sends:
//!
//! - `READY=1` with `STATUS=4 workers, generation 0`, once the first workers
//!   it was asked for have all said Ready: `systemctl start` returns then,
//!   and units ordered after this one start against a service that answers;
//! - `STATUS=` again whenever the number of Ready workers or the generation
//!   changes, and during a stop the number of workers left (`systemctl
//!   status` shows it);
//! - `RELOADING=1` with `MONOTONIC_USEC=` when a HUP rollout or a USR2
//!   upgrade begins, and `READY=1` when it is over (settle.rs decides: a
//!   rollout done; an upgrade done, said by the re-executed master, or
//!   backed out or failed, said with `STATUS=upgrade failed: <why>`), which
//!   is what `Type=notify-reload` waits for (systemd checks that the
//!   timestamp is not older than its own signal);
//! - `STOPPING=1` once, when a stop begins;
//! - `WATCHDOG=1` from the loop, every half of `$WATCHDOG_USEC` (systemd's
//!   advice), so that systemd restarts a master that stopped turning.
//!
//! The variables are read once, when the master starts, and removed from
//! the environment before the first fork. A worker, or a program it execs,
//! that found `NOTIFY_SOCKET` would take itself for the service: its
//! `READY=1` (accepted under `NotifyAccess=all`) would tell systemd the
//! service is up before the master thinks so, and a library in it that pings
//! the watchdog would keep a hung master alive. `Master::new` has made sure
//! the process runs one thread, so nothing reads the environment while it
//! changes. Whoever must pass them on (a new binary in an upgrade) gets them
//! from [`Notifier::for_successor`].
//!
//! Nothing here can stop the master from serving. The socket is opened
//! unbound (no connect: systemd may not be listening yet, or any more), and
//! each datagram is sent with MSG_DONTWAIT, so a systemd that is slow to
//! read drops a message instead of stalling the loop. A send that fails (no
//! such socket, nobody listening, a full queue) is one warning line, the
//! first time only: later sends are still tried, silently, since a full
//! queue drains and a watchdog line every few hundred milliseconds would
//! drown the log.

use crate::error::describe;
use log::{debug, warn};
use nix::sys::socket::{sendto, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::unistd::getpid;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// The master's side of the notification socket.
pub(crate) struct Notifier {
    /// None: notifications are off (no NOTIFY_SOCKET, or a useless one).
    socket: Option<Socket>,
    /// A send failed once and was logged; later failures are not.
    failed: bool,
    /// STOPPING=1 was sent: a second stop signal sends nothing.
    stopping: bool,
    /// The last STATUS= sent, so that an unchanged one is not sent again.
    status: String,
    /// Half of WATCHDOG_USEC, if the watchdog is ours.
    watchdog: Option<Duration>,
    next_watchdog: Option<Instant>,
    /// The variables as they were, for a successor.
    inherited: Vec<(&'static str, OsString)>,
}

struct Socket {
    fd: OwnedFd,
    addr: UnixAddr,
    /// NOTIFY_SOCKET as given, for log lines.
    shown: String,
}

/// Where NOTIFY_SOCKET points.
#[derive(Debug, PartialEq, Eq)]
enum Address {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// What WATCHDOG_USEC and WATCHDOG_PID ask of this process.
#[derive(Debug, PartialEq, Eq)]
enum Watchdog {
    Off,
    /// The watchdog belongs to another process (this pid).
    NotOurs(i32),
    /// Ping this often: half the time systemd waits.
    Every(Duration),
}

impl Notifier {
    /// Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, removes them
    /// from the environment, and opens the socket. Call it before any fork,
    /// from a process that runs one thread (see the module's docs).
    pub(crate) fn from_env() -> Notifier {
        let inherited: Vec<(&'static str, OsString)> = [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID]
            .into_iter()
            .filter_map(|name| Some((name, std::env::var_os(name)?)))
            .collect();
        for (name, _) in &inherited {
            std::env::remove_var(name);
        }
        let get = |wanted: &str| {
            inherited
                .iter()
                .find(|(name, _)| *name == wanted)
                .map(|(_, value)| value.as_os_str())
        };
        let Some(value) = get(NOTIFY_SOCKET) else {
            debug!("NOTIFY_SOCKET is not set: no systemd notifications");
            return Notifier::off(inherited);
        };
        let shown = value.to_string_lossy().into_owned();
        let address = match parse_address(value) {
            Ok(Some(address)) => address,
            Ok(None) => {
                debug!("NOTIFY_SOCKET is empty: no systemd notifications");
                return Notifier::off(inherited);
            }
            Err(why) => {
                warn!("{why}; no systemd notifications");
                return Notifier::off(inherited);
            }
        };
        let watchdog = match parse_watchdog(get(WATCHDOG_USEC), get(WATCHDOG_PID), getpid().as_raw()) {
            Ok(watchdog) => watchdog,
            Err(why) => {
                warn!("{why}; no watchdog pings");
                Watchdog::Off
            }
        };
        let mut notifier = match open(&address, shown) {
            Ok(socket) => Notifier::to(socket, watchdog),
            Err(err) => {
                warn!("{err}; no systemd notifications");
                Notifier::off(Vec::new())
            }
        };
        notifier.inherited = inherited;
        notifier
    }

    fn off(inherited: Vec<(&'static str, OsString)>) -> Notifier {
        Notifier {
            socket: None,
            failed: false,
            stopping: false,
            status: String::new(),
            watchdog: None,
            next_watchdog: None,
            inherited,
        }
    }

    fn to(socket: Socket, watchdog: Watchdog) -> Notifier {
        debug!("notifying systemd at {}", socket.shown);
        let watchdog = match watchdog {
            Watchdog::Every(every) => {
                debug!("sending WATCHDOG=1 every {} ms", every.as_millis());
                Some(every)
            }
            Watchdog::NotOurs(pid) => {
                debug!("WATCHDOG_PID is {pid}, not this process: no watchdog pings");
                None
            }
            Watchdog::Off => None,
        };
        Notifier {
            socket: Some(socket),
            next_watchdog: watchdog.map(|every| Instant::now() + every),
            watchdog,
            ..Notifier::off(Vec::new())
        }
    }

    /// The socket's fd, which workers must close.
    pub(crate) fn fd(&self) -> Option<RawFd> {
        self.socket.as_ref().map(|s| s.fd.as_raw_fd())
    }

    /// `READY=1` and the status, in one datagram: the first readiness, and
    /// again after a reload or an upgrade.
    pub(crate) fn ready_with_status(&mut self, status: String) {
        self.send(&format!("READY=1\nSTATUS={status}"));
        self.status = status;
    }

    /// `STATUS=`, if it says something new.
    pub(crate) fn status(&mut self, status: String) {
        if status != self.status {
            self.send(&format!("STATUS={status}"));
            self.status = status;
        }
    }

    /// `RELOADING=1`, stamped with CLOCK_MONOTONIC: a reload begins, and
    /// [`Notifier::ready`] ends it.
    pub(crate) fn reloading(&mut self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// `STOPPING=1`, once.
    pub(crate) fn stopping(&mut self) {
        if !self.stopping {
            self.stopping = true;
            self.send("STOPPING=1");
        }
    }

    /// The variables this process was started with, for a program that
    /// takes the service over in the same pid (an upgrade that execs), so
    /// that it reads them as this process did: the same socket, and a
    /// watchdog that is its own exactly when it was this process's. Each
    /// goes down as it came. A WATCHDOG_PID that named another process
    /// still names it (claiming it would make the successor ping a watchdog
    /// systemd keeps for someone else), and one that was garbage is still
    /// refused. Only a watchdog meant for whoever reads it (WATCHDOG_USEC
    /// without WATCHDOG_PID) is pinned to this pid, the successor's too, so
    /// that nothing else the successor starts could take it for its own.
    pub(crate) fn for_successor(&self) -> Vec<(&'static str, OsString)> {
        let mut env = self.inherited.clone();
        let has = |wanted: &str| env.iter().any(|(name, _)| *name == wanted);
        if has(WATCHDOG_USEC) && !has(WATCHDOG_PID) {
            env.push((WATCHDOG_PID, getpid().to_string().into()));
        }
        env
    }

    /// When the next watchdog ping is due, if there is a watchdog.
    pub(crate) fn next_watchdog(&self) -> Option<Instant> {
        self.next_watchdog
    }

    /// Pings the watchdog if it is due: the loop has turned in time.
    pub(crate) fn watchdog(&mut self, now: Instant) {
        let (Some(every), Some(due)) = (self.watchdog, self.next_watchdog) else {
            return;
        };
        if due <= now {
            self.send("WATCHDOG=1");
            self.next_watchdog = Some(now + every);
        }
    }

    fn send(&mut self, message: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match sendto(socket.fd.as_raw_fd(), message.as_bytes(), &socket.addr, flags) {
            Ok(_) => {}
            Err(errno) if !self.failed => {
                self.failed = true;
                let first = message.lines().next().unwrap_or_default();
                warn!(
                    "sending {first} to systemd (NOTIFY_SOCKET {}): {}; serving on, \
                     and later failures are not logged",
                    socket.shown,
                    describe(&io::Error::from(errno))
                );
            }
            Err(_) => {}
        }
    }
}

/// The words of `STATUS=`: `4 workers, generation 0`.
pub(crate) fn status_line(ready: usize, generation: u64) -> String {
    let plural = if ready == 1 { "" } else { "s" };
    format!("{ready} worker{plural}, generation {generation}")
}

/// The words of `STATUS=` once a stop began: `stopping, 2 workers left`.
pub(crate) fn stopping_line(left: usize) -> String {
    let plural = if left == 1 { "" } else { "s" };
    format!("stopping, {left} worker{plural} left")
}

/// NOTIFY_SOCKET: an absolute path, or `@name` in the abstract namespace;
/// empty means none. Anything else (a relative path, systemd's `vsock:`
/// addresses) is refused with the sentence to log.
fn parse_address(value: &OsStr) -> Result<Option<Address>, String> {
    let bytes = value.as_bytes();
    match bytes.first() {
        None => Ok(None),
        Some(b'/') => Ok(Some(Address::Path(PathBuf::from(value)))),
        Some(b'@') if bytes.len() > 1 => Ok(Some(Address::Abstract(bytes[1..].to_vec()))),
        Some(_) => Err(format!(
            "NOTIFY_SOCKET is {value:?}, neither an absolute path nor an @abstract socket name"
        )),
    }
}

/// WATCHDOG_USEC (microseconds; 0 or unset: none), and WATCHDOG_PID, which
/// if set must be `ours`: otherwise the watchdog is another process's, and
/// this one neither pings it nor hands it down as its own
/// (`sd_watchdog_enabled(3)`). Garbage in either, a pid of 0 or below
/// included, is refused with the sentence to log.
fn parse_watchdog(usec: Option<&OsStr>, pid: Option<&OsStr>, ours: i32) -> Result<Watchdog, String> {
    let Some(usec) = usec else {
        return Ok(Watchdog::Off);
    };
    let usec: u64 = usec
        .to_str()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| format!("WATCHDOG_USEC is {usec:?}, not a number of microseconds"))?;
    if let Some(pid) = pid {
        let pid: i32 = pid
            .to_str()
            .and_then(|text| text.parse().ok())
            .filter(|&pid| pid > 0)
            .ok_or_else(|| format!("WATCHDOG_PID is {pid:?}, not a process id"))?;
        if pid != ours {
            return Ok(Watchdog::NotOurs(pid));
        }
    }
    if usec == 0 {
        return Ok(Watchdog::Off);
    }
    // At least a millisecond, so that a tiny value cannot make the loop spin.
    Ok(Watchdog::Every(
        Duration::from_micros(usec / 2).max(Duration::from_millis(1)),
    ))
}

fn open(address: &Address, shown: String) -> Result<Socket, String> {
    let addr = match address {
        Address::Path(path) => UnixAddr::new(path),
        Address::Abstract(name) => UnixAddr::new_abstract(name),
    }
    .map_err(|errno| format!("NOTIFY_SOCKET {shown}: {}", describe(&io::Error::from(errno))))?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| {
        format!(
            "opening a socket for NOTIFY_SOCKET {shown}: {}",
            describe(&io::Error::from(errno))
        )
    })?;
    Ok(Socket { fd, addr, shown })
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares with its own.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn os(text: &str) -> Option<&OsStr> {
        Some(OsStr::new(text))
    }

    #[test]
    fn notify_socket_is_a_path_an_abstract_name_or_nothing() {
        assert_eq!(
            parse_address(OsStr::new("/run/systemd/notify")),
            Ok(Some(Address::Path("/run/systemd/notify".into())))
        );
        assert_eq!(
            parse_address(OsStr::new("@/org/freedesktop/systemd1/notify/42")),
            Ok(Some(Address::Abstract(
                b"/org/freedesktop/systemd1/notify/42".to_vec()
            )))
        );
        assert_eq!(parse_address(OsStr::new("")), Ok(None));
        for refused in ["@", "relative/path", "vsock:2:1234"] {
            let err = parse_address(OsStr::new(refused)).unwrap_err();
            assert!(err.starts_with("NOTIFY_SOCKET is \""), "{err}");
        }
    }

    #[test]
    fn watchdog_pings_at_half_the_interval_for_its_own_pid_only() {
        assert_eq!(parse_watchdog(None, None, 7), Ok(Watchdog::Off));
        assert_eq!(
            parse_watchdog(os("400000"), None, 7),
            Ok(Watchdog::Every(Duration::from_millis(200)))
        );
        assert_eq!(
            parse_watchdog(os("400000"), os("7"), 7),
            Ok(Watchdog::Every(Duration::from_millis(200)))
        );
        assert_eq!(parse_watchdog(os("400000"), os("8"), 7), Ok(Watchdog::NotOurs(8)));
        assert_eq!(parse_watchdog(os("0"), None, 7), Ok(Watchdog::Off));
        assert_eq!(
            parse_watchdog(os("1"), None, 7),
            Ok(Watchdog::Every(Duration::from_millis(1))),
            "never a loop that spins"
        );
    }

    #[test]
    fn watchdog_garbage_is_a_sentence_not_a_panic() {
        assert_eq!(
            parse_watchdog(os("soon"), None, 7),
            Err("WATCHDOG_USEC is \"soon\", not a number of microseconds".to_owned())
        );
        assert!(parse_watchdog(os("-5"), None, 7).is_err());
        assert!(parse_watchdog(os("99999999999999999999999"), None, 7).is_err());
        assert_eq!(
            parse_watchdog(os("400000"), os("me"), 7),
            Err("WATCHDOG_PID is \"me\", not a process id".to_owned())
        );
        assert!(parse_watchdog(os("400000"), os("0"), 7).is_err(), "no process");
        assert!(parse_watchdog(os("400000"), os("-7"), 7).is_err(), "a group");
    }

    #[test]
    fn status_names_the_ready_workers_and_the_generation() {
        assert_eq!(status_line(4, 0), "4 workers, generation 0");
        assert_eq!(status_line(1, 3), "1 worker, generation 3");
        assert_eq!(stopping_line(2), "stopping, 2 workers left");
        assert_eq!(stopping_line(1), "stopping, 1 worker left");
    }

    /// A notifier sending to a socket bound in a fresh directory, and that
    /// socket, to read what it sent.
    fn pair(name: &str, watchdog: Watchdog) -> (Notifier, UnixDatagram, PathBuf) {
        let dir = std::env::temp_dir().join(format!("respawn-notify-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        let socket = open(&Address::Path(path.clone()), path.display().to_string()).unwrap();
        (Notifier::to(socket, watchdog), receiver, dir)
    }

    fn received(receiver: &UnixDatagram) -> Vec<String> {
        let mut buf = [0; 4096];
        let mut all = Vec::new();
        while let Ok(n) = receiver.recv(&mut buf) {
            all.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        all
    }

    #[test]
    fn each_message_is_one_datagram_and_repeats_are_not_sent() {
        let (mut notifier, receiver, dir) = pair("messages", Watchdog::Off);
        notifier.status(status_line(0, 0));
        notifier.ready_with_status(status_line(2, 0));
        notifier.status(status_line(2, 0));
        notifier.stopping();
        notifier.stopping();
        assert_eq!(
            received(&receiver),
            [
                "STATUS=0 workers, generation 0",
                "READY=1\nSTATUS=2 workers, generation 0",
                "STOPPING=1"
            ]
        );
        notifier.reloading();
        let got = received(&receiver);
        let stamp: u64 = got[0]
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|usec| usec.parse().ok())
            .unwrap_or_else(|| panic!("{got:?}"));
        assert!(monotonic_usec() - stamp < 10_000_000, "{stamp} is now");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_watchdog_is_pinged_only_when_due() {
        let every = Duration::from_millis(200);
        let (mut notifier, receiver, dir) = pair("watchdog", Watchdog::Every(every));
        let due = notifier.next_watchdog().unwrap();
        notifier.watchdog(due - Duration::from_millis(1));
        assert!(received(&receiver).is_empty());
        notifier.watchdog(due);
        assert_eq!(received(&receiver), ["WATCHDOG=1"]);
        assert_eq!(notifier.next_watchdog(), Some(due + every));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_broken_socket_fails_quietly_after_the_first_time() {
        let (mut notifier, receiver, dir) = pair("broken", Watchdog::Off);
        drop(receiver);
        std::fs::remove_dir_all(&dir).unwrap();
        notifier.ready_with_status(String::new());
        assert!(notifier.failed, "the failure is noted");
        notifier.ready_with_status(String::new());
        assert!(notifier.failed);
    }

    /// What a process started with `env` makes of the watchdog, in pid `me`.
    fn watchdog_of(env: &[(&'static str, OsString)], me: i32) -> Result<Watchdog, String> {
        let get = |wanted: &str| {
            env.iter()
                .find(|(name, _)| *name == wanted)
                .map(|(_, value)| value.as_os_str())
        };
        parse_watchdog(get(WATCHDOG_USEC), get(WATCHDOG_PID), me)
    }

    #[test]
    fn a_successor_gets_the_socket_and_reads_the_watchdog_as_this_process_did() {
        let me = getpid().as_raw();
        let other = (me + 1).to_string();
        let cases: [&[(&'static str, &str)]; 8] = [
            &[],
            &[(NOTIFY_SOCKET, "/run/notify")],
            &[(NOTIFY_SOCKET, "/run/notify"), (WATCHDOG_USEC, "400000")],
            &[
                (NOTIFY_SOCKET, "@notify"),
                (WATCHDOG_USEC, "400000"),
                (WATCHDOG_PID, &other),
            ],
            &[
                (NOTIFY_SOCKET, "/run/notify"),
                (WATCHDOG_USEC, "400000"),
                (WATCHDOG_PID, "1"),
            ],
            &[
                (NOTIFY_SOCKET, "/run/notify"),
                (WATCHDOG_USEC, "400000"),
                (WATCHDOG_PID, "me"),
            ],
            &[
                (NOTIFY_SOCKET, "/run/notify"),
                (WATCHDOG_USEC, "400000"),
                (WATCHDOG_PID, "0"),
            ],
            &[(WATCHDOG_PID, "1")],
        ];
        for case in cases {
            let inherited: Vec<(&'static str, OsString)> =
                case.iter().map(|&(name, value)| (name, value.into())).collect();
            let handed = Notifier::off(inherited.clone()).for_successor();
            assert_eq!(
                watchdog_of(&handed, me),
                watchdog_of(&inherited, me),
                "{case:?} handed down as {handed:?}"
            );
            let socket = |env: &[(&str, OsString)]| {
                env.iter()
                    .find(|(name, _)| *name == NOTIFY_SOCKET)
                    .map(|(_, value)| value.clone())
            };
            assert_eq!(socket(&handed), socket(&inherited), "{case:?}");
        }
    }

    #[test]
    fn a_watchdog_of_another_process_is_not_claimed_for_the_successor() {
        let notifier = Notifier::off(vec![
            (NOTIFY_SOCKET, "/run/notify".into()),
            (WATCHDOG_USEC, "400000".into()),
            (WATCHDOG_PID, "1".into()),
        ]);
        assert_eq!(
            notifier.for_successor(),
            [
                (NOTIFY_SOCKET, OsString::from("/run/notify")),
                (WATCHDOG_USEC, "400000".into()),
                (WATCHDOG_PID, "1".into())
            ]
        );
        // Meant for whoever reads it: pinned to this pid, the successor's.
        let notifier = Notifier::off(vec![(WATCHDOG_USEC, "400000".into())]);
        let me = getpid().to_string();
        assert_eq!(
            notifier.for_successor(),
            [
                (WATCHDOG_USEC, OsString::from("400000")),
                (WATCHDOG_PID, me.into())
            ]
        );
    }
}
