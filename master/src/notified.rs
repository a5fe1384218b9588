//! `--ready-on-notify`: workers that speak systemd's readiness protocol.
//!
//! Many servers already tell systemd when they are up (`sd_notify(3)`:
//! `READY=1` on the datagram socket `$NOTIFY_SOCKET`), and some ping its
//! watchdog (`WATCHDOG=1`). Run under respawn with `--ready-on-notify`,
//! each worker gets a `NOTIFY_SOCKET` of its own: a datagram socket the
//! master binds for that worker alone, in the abstract namespace
//! (`@respawn/<master pid>/<n>`), and reads in its loop like a pipe. So a
//! message is known to be that worker's by the socket it arrives on, and
//! its sender is checked to be the worker or one of its descendants
//! (SO_PASSCRED: the kernel says which pid sent it), since any process on
//! the host could send to an abstract name.
//!
//! - `READY=1`: the worker is Ready, as if it had sent Ready on the channel:
//!   a HUP's rollout goes on only then, and `--start-timeout` is a real
//!   start deadline.
//! - `STATUS=...`: kept, and shown by `respawn ctl status` (at most 200
//!   bytes).
//! - `WATCHDOG=1`: with `--timeout`, a worker that has sent one and then
//!   sends none for the timeout is killed as hung (`WATCHDOG_USEC` tells it
//!   the timeout, `WATCHDOG_PID` its pid, as systemd does). One that never
//!   sends any is not watched: the program may not speak the watchdog.
//!
//! Anything else (`STOPPING=1`, `MAINPID=`, unknown keys) is read and
//! dropped; a datagram is read whole (at most 4 KiB), and at most 64 a
//! turn per worker, so a worker cannot hold the loop. `BARRIER=1` (which
//! `systemd-notify` sends after its message) comes with an fd the sender
//! waits on: the master takes no fds, so the kernel closes it, and the
//! sender goes on.

use crate::master::strays;
use log::debug;
use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The notification socket tokens have this bit set (apart from the
/// control socket's, above it, and the pipes', below).
const NOTIFY_BIT: usize = 1 << (usize::BITS - 3);
/// The longest STATUS= kept.
const MAX_STATUS: usize = 200;
/// The most datagrams of one worker read in one turn.
const PER_TURN: usize = 64;

/// Is this event a worker's notification socket's?
pub(crate) fn owns(token: mio::Token) -> bool {
    token.0 & NOTIFY_BIT != 0 && !crate::control::owns(token)
}

/// The token of the notification socket of the worker whose pipe has
/// `pipe`, and back.
pub(crate) fn token_of(pipe: mio::Token) -> mio::Token {
    mio::Token(pipe.0 | NOTIFY_BIT)
}

pub(crate) fn pipe_token(notify: mio::Token) -> mio::Token {
    mio::Token(notify.0 & !NOTIFY_BIT)
}

/// One worker's socket, and the name its program is given.
pub(crate) struct WorkerSocket {
    pub socket: UnixDatagram,
    pub name: String,
}

/// Binds a new socket at `@respawn/<master pid>/<n>`, close-on-exec and
/// non-blocking, with SO_PASSCRED so that each datagram says who sent it.
pub(crate) fn open(n: usize) -> io::Result<WorkerSocket> {
    let name = format!("respawn/{}/{n}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let socket = UnixDatagram::bind_addr(&addr)?;
    socket.set_nonblocking(true)?;
    setsockopt(&socket, sockopt::PassCred, &true)?;
    Ok(WorkerSocket {
        socket,
        name: format!("@{name}"),
    })
}

/// Takes a socket handed down across an upgrade's exec.
pub(crate) fn adopt(fd: OwnedFd) -> UnixDatagram {
    let socket = UnixDatagram::from(fd);
    let _ = socket.set_nonblocking(true);
    let _ = nix::fcntl::fcntl(
        &socket,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    socket
}

/// What a worker said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Notice {
    Ready,
    Status(String),
    Watchdog,
}

/// Reads what `socket` holds (at most a turn's worth), keeping what was
/// sent by `worker` or one of its descendants. A sender that has exited
/// by the time it is read (`systemd-notify` sends and exits at once) is in
/// /proc no more, and its descent cannot be checked: its message is kept
/// if its uid is the workers' (`uid`). True in the second field if
/// datagrams are left for the next turn.
pub(crate) fn receive(socket: &UnixDatagram, worker: i32, uid: u32) -> (Vec<Notice>, bool) {
    let mut notices = Vec::new();
    for _ in 0..PER_TURN {
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (len, sender) = match recvmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(msg) => {
                let sender = msg.cmsgs().ok().and_then(|mut cmsgs| {
                    cmsgs.find_map(|c| match c {
                        ControlMessageOwned::ScmCredentials(creds) => Some((creds.pid(), creds.uid())),
                        _ => None,
                    })
                });
                (msg.bytes, sender)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return (notices, false),
        };
        if buf[..len].starts_with(b"BARRIER=1") {
            continue;
        }
        match sender {
            Some((pid, _)) if pid == worker || descends_from(pid, worker) => {
                notices.extend(parse(&buf[..len]));
            }
            Some((pid, from)) if from == uid && strays::parent_of(pid).is_none() => {
                notices.extend(parse(&buf[..len]))
            }
            other => debug!(
                "a notification for worker {worker} from process {other:?}, not one of its own; dropped"
            ),
        }
    }
    (notices, true)
}

/// The `KEY=value` lines of one datagram that mean something here.
pub(crate) fn parse(datagram: &[u8]) -> Vec<Notice> {
    String::from_utf8_lossy(datagram)
        .lines()
        .filter_map(|line| match line.split_once('=') {
            Some(("READY", "1")) => Some(Notice::Ready),
            Some(("WATCHDOG", "1")) => Some(Notice::Watchdog),
            Some(("STATUS", text)) => {
                let mut text = text.to_owned();
                if text.len() > MAX_STATUS {
                    let mut end = MAX_STATUS;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                }
                Some(Notice::Status(text))
            }
            _ => None,
        })
        .collect()
}

/// Is `pid` a descendant of `ancestor`, as far as /proc says (at most 32
/// generations up: a chain that long is not a worker's)?
fn descends_from(pid: i32, ancestor: i32) -> bool {
    let mut at = pid;
    for _ in 0..32 {
        match strays::parent_of(at) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => at = parent,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lines_that_mean_something_are_read_and_the_rest_dropped() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=warming up\n"),
            [Notice::Ready, Notice::Status("warming up".into())]
        );
        assert_eq!(parse(b"WATCHDOG=1"), [Notice::Watchdog]);
        assert_eq!(parse(b"READY=0\nMAINPID=4\nSTOPPING=1\nnonsense"), []);
        // A 3-byte character: byte 200 falls inside one, and is moved back.
        let long = format!("STATUS={}", "€".repeat(300));
        let notices = parse(long.as_bytes());
        let [Notice::Status(text)] = notices.as_slice() else {
            panic!("one status: {notices:?}");
        };
        assert!(
            text.len() <= MAX_STATUS && text.len() > MAX_STATUS - 3,
            "{}",
            text.len()
        );
        assert!(text.chars().all(|c| c == '€'));
    }

    #[test]
    fn a_grandchild_descends_from_its_grandparent_and_no_one_else() {
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("a shell");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(shell.stdout.take().expect("its stdout"))
            .read_line(&mut line)
            .expect("the sleep's pid");
        let sleep: i32 = line.trim().parse().expect("a pid");
        let me = std::process::id() as i32;
        let shell_pid = shell.id() as i32;
        assert!(descends_from(sleep, shell_pid), "its parent");
        assert!(descends_from(sleep, me), "its grandparent");
        assert!(!descends_from(me, sleep), "not the other way");
        assert!(!descends_from(sleep, i32::MAX - 7), "not a stranger");
        assert!(!descends_from(i32::MAX - 7, me), "nor a process that is not");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sleep),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = shell.kill();
        let _ = shell.wait();
    }

    #[test]
    fn a_worker_and_its_descendants_are_heard_and_a_stranger_is_not() {
        let socket = open(usize::MAX).expect("binding");
        let send = |bytes: &[u8]| {
            let client = UnixDatagram::unbound().expect("a socket");
            let name = socket.name.trim_start_matches('@');
            let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("an address");
            client.send_to_addr(bytes, &addr).expect("sending");
        };
        let me = std::process::id() as i32;
        send(b"READY=1\nSTATUS=up");
        let uid = nix::unistd::geteuid().as_raw();
        let (notices, _) = receive(&socket.socket, me, uid);
        assert_eq!(notices, [Notice::Ready, Notice::Status("up".into())]);
        // From this process, taken for another worker's: dropped.
        send(b"READY=1");
        let (notices, _) = receive(&socket.socket, i32::MAX - 5, uid);
        assert_eq!(notices, []);
        // From a child of this process, gone by the time it is read (as
        // systemd-notify is): its uid is the one the workers run as.
        let from_a_child = |message: &str| {
            std::process::Command::new("python3")
                .args([
                    "-c",
                    "import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
                     s.sendto(sys.argv[2].encode(), '\\0' + sys.argv[1][1:])",
                    &socket.name,
                    message,
                ])
                .status()
                .is_ok_and(|s| s.success())
        };
        if from_a_child("WATCHDOG=1") {
            let (notices, _) = receive(&socket.socket, me, uid);
            assert_eq!(notices, [Notice::Watchdog]);
            assert!(from_a_child("READY=1"));
            let (notices, _) = receive(&socket.socket, me, uid + 1);
            assert_eq!(notices, [], "gone, and of another uid than the workers'");
        }
        assert!(owns(token_of(mio::Token(5))));
        assert_eq!(pipe_token(token_of(mio::Token(5))), mio::Token(5));
        assert!(!owns(mio::Token(5)));
    }
}
