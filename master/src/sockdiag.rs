//! The accept queue of a listening Unix socket, asked of the kernel through
//! NETLINK_SOCK_DIAG (man 7 sock_diag).
//!
//! How many connections wait in a listener's accept queue is the figure that
//! says when to add workers: while it stays above zero every worker is busy
//! and clients wait for one; when it reaches the backlog, new connects block
//! or fail. unicorn's companion raindrops gives it for TCP and for Unix
//! sockets; the control socket's `status` and `metrics` give it here.
//!
//! For TCP one getsockopt answers (TCP_INFO, in status.rs). A Unix socket
//! has no such option, and SIOCINQ refuses a listening one, so we ask the
//! sock_diag netlink family: one SOCK_DIAG_BY_FAMILY request for exactly one
//! socket, named by its inode (fstat of the listener), with
//! UDIAG_SHOW_RQLEN. For a socket in LISTEN state the kernel
//! (net/unix/diag.c, `sk_diag_show_rqlen`) answers with the accept queue's
//! length in `udiag_rqueue` and the listen backlog in `udiag_wqueue`.
//! raindrops reads /proc/net/unix instead, a text walk of every Unix socket
//! of the system; asking for one inode costs the same whatever the machine
//! runs.
//!
//! The master calls this only when a client asks for `status` or `metrics`,
//! from its one loop: the socket is blocking, but with a 100 ms receive
//! timeout so that a kernel that never answers costs a tenth of a second,
//! never the master. Everything the kernel sends is read as untrusted bytes:
//! every length is checked, and anything unexpected gives None (the status
//! then says `null`), never a panic.

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};
use nix::sys::time::TimeVal;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h): the request type of sock_diag,
/// and the type of its answers.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `TCP_LISTEN` (include/net/tcp_states.h): Unix sockets reuse TCP's states.
const TCP_LISTEN: u8 = 10;
/// `UDIAG_SHOW_RQLEN` (linux/unix_diag.h): ask for the queue lengths.
const UDIAG_SHOW_RQLEN: u32 = 0x10;
/// `UNIX_DIAG_RQLEN` (linux/unix_diag.h): the attribute that carries them.
const UNIX_DIAG_RQLEN: u16 = 4;
/// `INET_DIAG_NOCOOKIE` in both halves of the cookie: any socket with this
/// inode, whatever its cookie.
const NO_COOKIE: [u32; 2] = [!0, !0];
/// Our request's sequence number. Each call has a socket of its own, so any
/// number tells our answer from a stray message; this one reads well in strace.
const SEQ: u32 = 0x5d1a6;
/// The guard on a kernel that does not answer; it answers at once.
const RECV_TIMEOUT_USEC: i64 = 100_000;
/// Room for the answer: a header, the message and one 12-byte attribute
/// fit in 48 bytes; man 7 sock_diag's example reads into 8 KiB.
const BUF_LEN: usize = 8192;
/// Signals interrupting the receive (none in the master, which reads them
/// from a signalfd; an embedder may differ) are retried this many times.
const EINTR_RETRIES: usize = 3;

// The structs below mirror linux/netlink.h and linux/unix_diag.h so that
// their sizes can be checked against C's; not every field is read.

/// `struct nlmsghdr` (linux/netlink.h).
#[repr(C)]
#[allow(dead_code)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// `struct unix_diag_req` (linux/unix_diag.h): which sockets, what to show.
#[repr(C)]
#[allow(dead_code)]
struct UnixDiagReq {
    sdiag_family: u8,
    sdiag_protocol: u8,
    pad: u16,
    udiag_states: u32,
    udiag_ino: u32,
    udiag_show: u32,
    udiag_cookie: [u32; 2],
}

/// `struct unix_diag_msg` (linux/unix_diag.h): one socket of the answer,
/// followed by its attributes.
#[repr(C)]
#[allow(dead_code)]
struct UnixDiagMsg {
    udiag_family: u8,
    udiag_type: u8,
    udiag_state: u8,
    pad: u8,
    udiag_ino: u32,
    udiag_cookie: [u32; 2],
}

/// `struct nlattr` (linux/netlink.h): an attribute's length (header
/// included) and type, followed by its payload.
#[repr(C)]
#[allow(dead_code)]
struct NlAttr {
    len: u16,
    kind: u16,
}

/// `struct unix_diag_rqlen` (linux/unix_diag.h).
#[repr(C)]
#[allow(dead_code)]
struct UnixDiagRqlen {
    udiag_rqueue: u32,
    udiag_wqueue: u32,
}

// The byte layouts below are written and read by hand, field by field (no
// unsafe casts of kernel bytes); these make sure they agree with C's.
const HDR_LEN: usize = std::mem::size_of::<NlMsgHdr>();
const REQ_LEN: usize = std::mem::size_of::<UnixDiagReq>();
const MSG_LEN: usize = std::mem::size_of::<UnixDiagMsg>();
const NLA_HDR_LEN: usize = std::mem::size_of::<NlAttr>();
const RQLEN_LEN: usize = std::mem::size_of::<UnixDiagRqlen>();
const _: () = assert!(HDR_LEN == 16 && REQ_LEN == 24 && MSG_LEN == 16);
const _: () = assert!(NLA_HDR_LEN == 4 && RQLEN_LEN == 8);

/// A listening Unix socket's accept queue: (connections waiting to be
/// accepted, the listen backlog). None if the socket is not listening, or
/// if the kernel cannot or will not say (no sock_diag, a timeout, an answer
/// that does not parse); the reason is logged at debug level.
pub(crate) fn unix_queue(listener: &UnixListener) -> Option<(u32, u32)> {
    let stat = match nix::sys::stat::fstat(listener.as_fd()) {
        Ok(stat) => stat,
        Err(err) => return failed("fstat of the listener", err),
    };
    // Socket inodes come from get_next_ino(), an unsigned int: they fit.
    let Ok(ino) = u32::try_from(stat.st_ino) else {
        log::debug!("socket inode {} does not fit sock_diag's 32 bits", stat.st_ino);
        return None;
    };
    let diag = match socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    ) {
        Ok(fd) => fd,
        Err(err) => return failed("opening a NETLINK_SOCK_DIAG socket", err),
    };
    let timeout = TimeVal::new(0, RECV_TIMEOUT_USEC);
    if let Err(err) = socket::setsockopt(&diag, socket::sockopt::ReceiveTimeout, &timeout) {
        return failed("setting SO_RCVTIMEO on the sock_diag socket", err);
    }
    let kernel = NetlinkAddr::new(0, 0);
    let request = request(ino);
    if let Err(err) = socket::sendto(diag.as_raw_fd(), &request, &kernel, MsgFlags::empty()) {
        return failed("sending the sock_diag request", err);
    }
    let mut buf = vec![0u8; BUF_LEN];
    let mut tries = 0;
    let len = loop {
        // MSG_TRUNC makes recv say the datagram's real length, so that an
        // answer larger than the buffer is seen, not read half.
        match socket::recv(diag.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
            Ok(len) => break len,
            Err(Errno::EINTR) if tries < EINTR_RETRIES => tries += 1,
            Err(Errno::EAGAIN) => {
                log::debug!("the kernel did not answer the sock_diag request within 100 ms");
                return None;
            }
            Err(err) => return failed("receiving the sock_diag answer", err),
        }
    };
    let Some(answer) = buf.get(..len) else {
        log::debug!("the sock_diag answer ({len} bytes) is larger than the buffer");
        return None;
    };
    let queue = parse(answer, ino);
    if queue.is_none() {
        log::debug!("sock_diag gave no accept queue for socket inode {ino}");
    }
    queue
}

fn failed(what: &str, err: Errno) -> Option<(u32, u32)> {
    log::debug!("{what}: {}", err.desc());
    None
}

/// The SOCK_DIAG_BY_FAMILY request for the socket with inode `ino`, if it
/// listens: a header and a `unix_diag_req`. No NLM_F_DUMP: one socket, so
/// the kernel answers with one message, or an NLMSG_ERROR.
fn request(ino: u32) -> Vec<u8> {
    let header = NlMsgHdr {
        len: (HDR_LEN + REQ_LEN) as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: libc::NLM_F_REQUEST as u16,
        seq: SEQ,
        pid: 0,
    };
    let req = UnixDiagReq {
        sdiag_family: libc::AF_UNIX as u8,
        sdiag_protocol: 0,
        pad: 0,
        udiag_states: 1 << TCP_LISTEN,
        udiag_ino: ino,
        udiag_show: UDIAG_SHOW_RQLEN,
        udiag_cookie: NO_COOKIE,
    };
    let mut out = Vec::with_capacity(HDR_LEN + REQ_LEN);
    out.extend_from_slice(&header.len.to_ne_bytes());
    out.extend_from_slice(&header.kind.to_ne_bytes());
    out.extend_from_slice(&header.flags.to_ne_bytes());
    out.extend_from_slice(&header.seq.to_ne_bytes());
    out.extend_from_slice(&header.pid.to_ne_bytes());
    out.push(req.sdiag_family);
    out.push(req.sdiag_protocol);
    out.extend_from_slice(&req.pad.to_ne_bytes());
    out.extend_from_slice(&req.udiag_states.to_ne_bytes());
    out.extend_from_slice(&req.udiag_ino.to_ne_bytes());
    out.extend_from_slice(&req.udiag_show.to_ne_bytes());
    out.extend_from_slice(&req.udiag_cookie[0].to_ne_bytes());
    out.extend_from_slice(&req.udiag_cookie[1].to_ne_bytes());
    out
}

/// Walks the netlink messages of one datagram for the answer about `ino`:
/// Some((rqueue, wqueue)) from its UNIX_DIAG_RQLEN if the socket listens;
/// None on an error, NLMSG_DONE, a length that does not add up, or no answer.
fn parse(mut datagram: &[u8], ino: u32) -> Option<(u32, u32)> {
    while datagram.len() >= HDR_LEN {
        let header = NlMsgHdr {
            len: u32_at(datagram, 0)?,
            kind: u16_at(datagram, 4)?,
            flags: u16_at(datagram, 6)?,
            seq: u32_at(datagram, 8)?,
            pid: u32_at(datagram, 12)?,
        };
        let len = usize::try_from(header.len).ok()?;
        if len < HDR_LEN {
            return None;
        }
        let payload = datagram.get(HDR_LEN..len)?;
        match i32::from(header.kind) {
            libc::NLMSG_ERROR => {
                // A struct nlmsgerr: its error first, 0 for an ack (which we
                // did not ask for), else -errno, such as -ENOENT for an
                // inode that is no Unix socket.
                let error = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
                if error != 0 {
                    log::debug!("sock_diag says: {}", Errno::from_raw(-error).desc());
                    return None;
                }
            }
            libc::NLMSG_DONE => return None,
            _ if header.kind == SOCK_DIAG_BY_FAMILY && header.seq == SEQ => {
                return diag_msg(payload, ino);
            }
            // Anything else (NLMSG_NOOP, another sequence) is not for us.
            _ => {}
        }
        // The next message starts at the aligned end of this one; the last
        // one may lack its padding.
        datagram = datagram.get(nlmsg_align(len).min(datagram.len())..)?;
    }
    None
}

/// One `unix_diag_msg` and its attributes: the queue lengths, if this is
/// the listening socket we asked about.
fn diag_msg(payload: &[u8], ino: u32) -> Option<(u32, u32)> {
    let msg = UnixDiagMsg {
        udiag_family: *payload.first()?,
        udiag_type: *payload.get(1)?,
        udiag_state: *payload.get(2)?,
        pad: *payload.get(3)?,
        udiag_ino: u32_at(payload, 4)?,
        udiag_cookie: [u32_at(payload, 8)?, u32_at(payload, 12)?],
    };
    // The lengths mean "accept queue, backlog" only for a listening socket;
    // for any other they are bytes in flight, which is not what we report.
    if i32::from(msg.udiag_family) != libc::AF_UNIX || msg.udiag_state != TCP_LISTEN || msg.udiag_ino != ino {
        return None;
    }
    let mut attrs = payload.get(nlmsg_align(MSG_LEN).min(payload.len())..)?;
    while attrs.len() >= NLA_HDR_LEN {
        let attr = NlAttr {
            len: u16_at(attrs, 0)?,
            kind: u16_at(attrs, 2)?,
        };
        let len = usize::from(attr.len);
        let data = attrs.get(NLA_HDR_LEN..len)?;
        if (i32::from(attr.kind) & libc::NLA_TYPE_MASK) == i32::from(UNIX_DIAG_RQLEN) {
            let rqlen = UnixDiagRqlen {
                udiag_rqueue: u32_at(data, 0)?,
                udiag_wqueue: u32_at(data, 4)?,
            };
            return Some((rqlen.udiag_rqueue, rqlen.udiag_wqueue));
        }
        attrs = attrs.get(nla_align(len).min(attrs.len())..)?;
    }
    None
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// NLMSG_ALIGN: messages start on 4-byte boundaries.
fn nlmsg_align(len: usize) -> usize {
    len.saturating_add(3) & !3
}

/// NLA_ALIGN: so do attributes (NLA_ALIGNTO is 4).
fn nla_align(len: usize) -> usize {
    let to = libc::NLA_ALIGNTO as usize;
    len.saturating_add(to - 1) & !(to - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("respawn-sockdiag-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("creating the scratch directory");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_unix_listener_says_its_waiting_connections_and_backlog() {
        let dir = Scratch::new("queue");
        let path = dir.0.join("s.sock");
        let listener = UnixListener::bind(&path).expect("binding");
        // std listens with its own default backlog; listening again sets
        // one we know.
        socket::listen(&listener, socket::Backlog::new(7).expect("backlog")).expect("listen");
        assert_eq!(unix_queue(&listener), Some((0, 7)), "nothing waits yet");
        let waiting: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&path).expect("connecting"))
            .collect();
        assert_eq!(unix_queue(&listener), Some((3, 7)), "three connections wait");
        let (_accepted, _) = listener.accept().expect("accepting");
        assert_eq!(unix_queue(&listener), Some((2, 7)), "one was accepted");
        drop(waiting);
    }

    #[test]
    fn std_default_backlog_is_reported_as_the_kernel_caps_it() {
        let dir = Scratch::new("default");
        let listener = UnixListener::bind(dir.0.join("s.sock")).expect("binding");
        let (waiting, backlog) = unix_queue(&listener).expect("a listening socket's queue");
        assert_eq!(waiting, 0);
        // std asks for 128 or for SOMAXCONN (-1), and the kernel caps either
        // at net.core.somaxconn.
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("reading somaxconn")
            .trim()
            .parse()
            .expect("a number");
        assert!(
            backlog == 128.min(somaxconn) || backlog == somaxconn,
            "backlog {backlog}"
        );
    }

    #[test]
    fn a_socket_that_does_not_listen_has_no_queue() {
        // A connected stream socket dressed as a listener: the kernel's
        // lengths for it would be bytes, not connections.
        let (one, _other) = UnixStream::pair().expect("socketpair");
        let not_listening = UnixListener::from(OwnedFd::from(one));
        assert_eq!(unix_queue(&not_listening), None);
    }

    /// An answer as the kernel writes it, for the parser's tests.
    fn answer(state: u8, ino: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![libc::AF_UNIX as u8, libc::SOCK_STREAM as u8, state, 0];
        body.extend_from_slice(&ino.to_ne_bytes());
        body.extend_from_slice(&[0xff; 8]);
        for (kind, data) in attrs {
            body.extend_from_slice(&((NLA_HDR_LEN + data.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(data);
            body.resize(nla_align(body.len()), 0);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&((HDR_LEN + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&SEQ.to_ne_bytes());
        out.extend_from_slice(&1234u32.to_ne_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn rqlen(rqueue: u32, wqueue: u32) -> Vec<u8> {
        [rqueue.to_ne_bytes(), wqueue.to_ne_bytes()].concat()
    }

    #[test]
    fn the_parser_finds_rqlen_after_other_attributes() {
        let name: &[u8] = b"/run/x.sock\0"; // 12 bytes; an odd one pads
        let odd: &[u8] = b"abc";
        let bytes = answer(
            TCP_LISTEN,
            42,
            &[(0, name), (3, odd), (UNIX_DIAG_RQLEN, &rqlen(5, 1024))],
        );
        assert_eq!(parse(&bytes, 42), Some((5, 1024)));
        assert_eq!(parse(&bytes, 43), None, "another socket's answer");
        let established = answer(1, 42, &[(UNIX_DIAG_RQLEN, &rqlen(5, 1024))]);
        assert_eq!(parse(&established, 42), None, "not listening");
    }

    #[test]
    fn the_parser_refuses_what_does_not_add_up() {
        let good = answer(TCP_LISTEN, 42, &[(UNIX_DIAG_RQLEN, &rqlen(5, 1024))]);
        // Every truncation, and every header length from 0 to past the end.
        for cut in 0..good.len() {
            assert_eq!(parse(&good[..cut], 42), None, "cut at {cut}");
        }
        for claimed in (0..good.len() as u32 + 8).filter(|&n| n as usize != good.len()) {
            let mut bad = good.clone();
            bad[..4].copy_from_slice(&claimed.to_ne_bytes());
            assert_eq!(parse(&bad, 42), None, "claimed {claimed}");
        }
        // An attribute claiming more than there is, or less than its header.
        for attr_len in [0u16, 3, 13, 0xffff] {
            let mut bad = good.clone();
            bad[HDR_LEN + MSG_LEN..HDR_LEN + MSG_LEN + 2].copy_from_slice(&attr_len.to_ne_bytes());
            assert_eq!(parse(&bad, 42), None, "attribute length {attr_len}");
        }
        // A short RQLEN payload.
        let short = answer(TCP_LISTEN, 42, &[(UNIX_DIAG_RQLEN, &[1, 2, 3, 4])]);
        assert_eq!(parse(&short, 42), None);
    }

    #[test]
    fn the_parser_stops_at_an_error_or_done() {
        let mut error = Vec::new();
        error.extend_from_slice(&((HDR_LEN + 4 + HDR_LEN) as u32).to_ne_bytes());
        error.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        error.extend_from_slice(&[0; 10]);
        error.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        error.extend_from_slice(&[0; HDR_LEN]);
        assert_eq!(parse(&error, 42), None);
        let mut done = Vec::new();
        done.extend_from_slice(&(HDR_LEN as u32 + 4).to_ne_bytes());
        done.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        let after = answer(TCP_LISTEN, 42, &[(UNIX_DIAG_RQLEN, &rqlen(5, 1024))]);
        assert_eq!(
            parse(&[done.clone(), after.clone()].concat(), 42),
            None,
            "done ends the answer"
        );
        // An ack (error 0) is passed over.
        let mut ack = error.clone();
        ack[HDR_LEN..HDR_LEN + 4].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(parse(&[ack, after].concat(), 42), Some((5, 1024)));
    }
}
