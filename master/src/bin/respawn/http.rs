//! The demo's HTTP/1.x handler: one request per connection, then close.
//!
//! Closing after each response is the keep-alive policy: a client that wants
//! to keep its connection cannot hold a worker while others wait, because it
//! has to queue on the listener again for its next request like everybody
//! else. (wrk and curl reconnect on `Connection: close`.)

use log::{debug, info, warn};
use respawn_worker::{Conn, Service};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

/// Requests larger than this are refused (431): the demo serves GETs.
const MAX_REQUEST: usize = 8192;
/// The whole request head must be in within this of the accept, however it
/// trickles in: a worker serves one connection at a time, so a client that
/// sends a byte every few seconds must not hold it for longer. One deadline
/// for the head, not one per read, or each byte would buy a new timeout.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// How long sending the answer may take: it fits in the socket buffer, so
/// only a client that reads nothing and a full buffer make this matter.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After refusing a request, the rest of it is read and discarded for at
/// most this long (and this many bytes) before close: closing a socket with
/// unread input sends a reset, and the client may then lose our answer.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
/// At most one `dropped a slow connection` line per this, per worker: a flood
/// of slow clients must not become a flood of log lines.
const SLOW_LOG_EVERY: Duration = Duration::from_secs(1);
/// The longest /sleep, so that a typo cannot hold a worker for hours.
const MAX_SLEEP_MS: u64 = 60_000;

/// What a worker does before it says Ready: the two faults are demos of
/// the restart policy and of the start deadline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Normal,
    /// `--demo-fail-start`: panic, a crash loop.
    Fail,
    /// `--demo-hang-start`: never return, until killed.
    Hang,
}

pub struct Demo {
    pid: u32,
    start: Start,
    slow: SlowLog,
}

impl Demo {
    /// Made in the worker.
    pub fn new(start: Start) -> Demo {
        Demo {
            pid: std::process::id(),
            start,
            slow: SlowLog::default(),
        }
    }
}

impl Service for Demo {
    fn start(&mut self) {
        match self.start {
            // A slow start, for the tests of what happens during a rollout
            // (a reload or an upgrade under way): RESPAWN_DEMO_START_MS, like
            // RESPAWN_DEMO_TAG, is a knob of the demo, not of respawn.
            Start::Normal => {
                let ms = std::env::var("RESPAWN_DEMO_START_MS")
                    .ok()
                    .and_then(|ms| ms.parse().ok());
                if let Some(ms) = ms {
                    std::thread::sleep(Duration::from_millis(ms).min(Duration::from_millis(MAX_SLEEP_MS)));
                }
            }
            Start::Fail => panic!("--demo-fail-start: failing before Ready on purpose"),
            Start::Hang => {
                info!(
                    "worker {} hangs before Ready on purpose (--demo-hang-start)",
                    self.pid
                );
                loop {
                    // Asleep, not spinning: a stuck start costs no CPU. std
                    // resumes the sleep after the stop handler runs, so only
                    // the master's SIGKILL ends it.
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
    }

    fn serve(&mut self, conn: &mut Conn) {
        let deadline = Instant::now() + HEAD_DEADLINE;
        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
        let response = match read_head(conn, deadline) {
            Head::Request(request) => {
                debug!(
                    "worker {} serving {} {}",
                    self.pid, request.method, request.target
                );
                let response = self.route(&request.target);
                Response {
                    head_only: request.method == "HEAD",
                    ..response
                }
            }
            Head::Gone => return,
            Head::TooSlow { received } => {
                self.dropped_slow(conn, received);
                // A client that sent part of a request may be a real one on
                // a bad link: tell it why. One that sent nothing gets nothing.
                if received > 0 {
                    let why = format!("no complete request head within {} s\n", HEAD_DEADLINE.as_secs());
                    let _ = Response::text(408, why).send(conn);
                }
                return;
            }
            Head::Refused(status, why) => {
                let _ = Response::text(status, why).send(conn);
                linger(conn);
                return;
            }
        };
        let _ = response.send(conn);
    }

    fn recover(&mut self, conn: &mut Conn, panic: &str) {
        let body = format!("worker {} panicked: {panic}\n", self.pid);
        let _ = Response::text(500, body).send(conn);
    }
}

impl Demo {
    fn route(&self, target: &str) -> Response {
        let path = target.split('?').next().unwrap_or(target);
        match path {
            "/" => Response::text(200, format!("handle by child {}\n", self.pid)),
            "/version" => Response::text(200, version()),
            "/crash" => panic!("crash requested by GET /crash"),
            // A hard exit in the middle of a request, as `process.exit` in a
            // Node route, a segfault or the OOM killer end a worker: no
            // Suicide, no answer. The master judges it by what the worker
            // served before (master.rs, `judge_death`).
            "/exit" => {
                log::logger().flush();
                std::process::exit(1)
            }
            "/hang" => loop {
                // A handler stuck for good, burning CPU: what --timeout is for.
                std::hint::spin_loop();
            },
            _ => match path.strip_prefix("/sleep/") {
                Some(ms) => sleep(ms),
                None => Response::text(404, format!("no route for {path}\n")),
            },
        }
    }

    /// Says, at warn (an operator must see that clients are holding
    /// workers), that a slow connection was dropped, unless a line went out
    /// less than [`SLOW_LOG_EVERY`] ago; the next line counts those.
    fn dropped_slow(&mut self, conn: &Conn, received: usize) {
        let Some(unlogged) = self.slow.note(Instant::now()) else {
            return;
        };
        let peer = conn.peer();
        let secs = HEAD_DEADLINE.as_secs();
        let what = match received {
            0 => format!("nothing received within {secs} s"),
            _ => format!("no complete request head within {secs} s"),
        };
        let more = match unlogged {
            0 => String::new(),
            n => format!("; {n} more since the last line"),
        };
        warn!(
            "worker {} dropped a slow connection from {peer} ({what}{more})",
            self.pid
        );
    }
}

/// The rate limit of the slow-connection line.
#[derive(Default)]
struct SlowLog {
    last_line: Option<Instant>,
    unlogged: u64,
}

impl SlowLog {
    /// A drop at `now`: Some(how many went unlogged before it) if it is to
    /// be logged, None if it is only counted.
    fn note(&mut self, now: Instant) -> Option<u64> {
        match self.last_line {
            Some(last) if now.saturating_duration_since(last) < SLOW_LOG_EVERY => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last_line = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

/// `GET /version`: which build answers, to watch an upgrade (SIGUSR2) take
/// effect. `RESPAWN_DEMO_TAG`, if set, is added: a wrapper script that sets
/// it makes a second build out of the same binary.
fn version() -> String {
    let tag = std::env::var("RESPAWN_DEMO_TAG").map_or(String::new(), |tag| format!(" {tag}"));
    format!("respawn {}{tag}\n", env!("CARGO_PKG_VERSION"))
}

fn sleep(ms: &str) -> Response {
    match ms.parse::<u64>() {
        Ok(ms) if ms <= MAX_SLEEP_MS => {
            // std retries the sleep after a signal, so a graceful stop lets
            // it finish: it is a request in flight.
            std::thread::sleep(Duration::from_millis(ms));
            Response::text(200, format!("slept {ms} ms in child {}\n", std::process::id()))
        }
        _ => Response::text(400, format!("/sleep takes milliseconds, 0 to {MAX_SLEEP_MS}\n")),
    }
}

/// What the demo needs of a request.
struct Request {
    method: String,
    target: String,
}

/// How reading a request head ended.
enum Head {
    /// A whole head, of a request the demo serves.
    Request(Request),
    /// The client closed, or the connection failed, first.
    Gone,
    /// The deadline passed with `received` bytes of a head in.
    TooSlow { received: usize },
    /// A head the demo refuses: the status and the body that says why.
    Refused(u16, String),
}

/// Reads one request head, all of it before `deadline`.
fn read_head(conn: &mut Conn, deadline: Instant) -> Head {
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let Some(left) = time_left(deadline) else {
            return Head::TooSlow { received: len };
        };
        if conn.set_read_timeout(Some(left)).is_err() {
            return Head::Gone;
        }
        match conn.read(&mut buf[len..]) {
            Ok(0) => return Head::Gone,
            Ok(n) => len += n,
            // The stop handler is SA_RESTART, but a read with a timeout
            // (SO_RCVTIMEO) is never restarted: it fails with EINTR, and the
            // request in flight is still to be served. A timeout (EAGAIN) is checked
            // against the deadline above, as the kernel's timer may round.
            Err(err) if is_retry(&err) => continue,
            Err(_) => return Head::Gone,
        }
        if let Some(head) = parse_head(&buf[..len], len == buf.len()) {
            return head;
        }
    }
}

/// The head in `bytes`, or None if more is to come. `full`: no room left.
fn parse_head(bytes: &[u8], full: bool) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            respawn_worker::note_request(bytes);
            let method = request.method.unwrap_or("");
            let target = request.path.unwrap_or("/");
            if method != "GET" && method != "HEAD" {
                let why = format!("method {method} not allowed: the demo serves GET and HEAD\n");
                return Some(Head::Refused(405, why));
            }
            Some(Head::Request(Request {
                method: method.to_owned(),
                target: target.to_owned(),
            }))
        }
        Ok(httparse::Status::Partial) if full => Some(Head::Refused(
            431,
            format!("request head larger than {MAX_REQUEST} bytes\n"),
        )),
        Ok(httparse::Status::Partial) => None,
        Err(err) => Some(Head::Refused(400, format!("malformed request: {err}\n"))),
    }
}

/// What is left before `deadline`, if anything.
fn time_left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
}

/// Interrupted by a signal, or out of time for this read (SO_RCVTIMEO
/// reports EAGAIN): the caller checks its deadline and reads again.
fn is_retry(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// After an answer to a refused request: say we are done (FIN), then read
/// and discard what the client still sends, within bounds, so that the
/// close does not reset the connection before the client reads the answer
/// (a reset makes its kernel drop what it had not read yet).
fn linger(conn: &mut Conn) {
    if conn.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let Some(left) = time_left(deadline) else { return };
        if conn.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match conn.read(&mut sink) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(err) if is_retry(&err) => continue,
            Err(_) => return,
        }
    }
}

struct Response {
    status: u16,
    body: String,
    /// An answer to HEAD: the head says how long the body is, but no body.
    head_only: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            body: body.into(),
            head_only: false,
        }
    }

    /// One write for head and body, then the connection is closed.
    fn send(&self, conn: &mut Conn) -> io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            _ => "Internal Server Error",
        };
        let body = if self.head_only { "" } else { &self.body };
        // A 405 says which methods are served (RFC 9110, 15.5.6).
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let message = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
            self.status,
            self.body.len(),
        );
        conn.write_all(message.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;

    /// A connected pair on loopback: (the client's end, the server's end).
    fn pair() -> (TcpStream, Conn) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (client, Conn::from(listener.accept().unwrap()))
    }

    #[test]
    fn a_trickled_head_gets_one_deadline_not_one_per_read() {
        let (mut client, mut server) = pair();
        let trickle = std::thread::spawn(move || {
            client.write_all(b"GET /slo").unwrap();
            // A byte of the path every 100 ms: each read succeeds long
            // before its own timeout would, and the head is never complete
            // nor malformed, so only a deadline for the whole head stops it.
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(100));
                if client.write_all(b"w").is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let head = read_head(&mut server, started + Duration::from_millis(400));
        let took = started.elapsed();
        assert!(matches!(head, Head::TooSlow { received } if received >= 8));
        assert!(took < Duration::from_millis(900), "held for {took:?}");
        drop(server);
        trickle.join().unwrap();
    }

    #[test]
    fn a_silent_connection_is_too_slow_with_nothing_received() {
        let (_client, mut server) = pair();
        let head = read_head(&mut server, Instant::now() + Duration::from_millis(100));
        assert!(matches!(head, Head::TooSlow { received: 0 }));
    }

    #[test]
    fn a_whole_head_is_a_request() {
        let (mut client, mut server) = pair();
        client
            .write_all(b"HEAD /sleep/1?x HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let Head::Request(request) = read_head(&mut server, Instant::now() + HEAD_DEADLINE) else {
            panic!("not a request");
        };
        assert_eq!(
            (request.method.as_str(), request.target.as_str()),
            ("HEAD", "/sleep/1?x")
        );
    }

    #[test]
    fn another_method_is_refused_with_the_methods_served() {
        let (mut client, mut server) = pair();
        client.write_all(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let Head::Refused(status, why) = read_head(&mut server, Instant::now() + HEAD_DEADLINE) else {
            panic!("not refused");
        };
        assert_eq!(status, 405);
        Response::text(status, why).send(&mut server).unwrap();
        drop(server);
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{answer}"
        );
        assert!(answer.contains("\r\nAllow: GET, HEAD\r\n"), "{answer}");
        assert!(
            answer.ends_with("method POST not allowed: the demo serves GET and HEAD\n"),
            "{answer}"
        );
    }

    #[test]
    fn slow_connection_lines_are_one_a_second_and_count_the_rest() {
        let mut slow = SlowLog::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(slow.note(at(0)), Some(0));
        assert_eq!(slow.note(at(500)), None);
        assert_eq!(slow.note(at(999)), None);
        assert_eq!(slow.note(at(1000)), Some(2));
        assert_eq!(slow.note(at(1999)), None);
        assert_eq!(slow.note(at(5000)), Some(1));
        assert_eq!(slow.note(at(6000)), Some(0));
    }

    #[test]
    fn the_deadline_holds_on_a_unix_connection_too() {
        let (client, server) = UnixStream::pair().unwrap();
        let mut server = Conn::from(server);
        let started = Instant::now();
        let head = read_head(&mut server, started + Duration::from_millis(100));
        assert!(matches!(head, Head::TooSlow { received: 0 }));
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(client);
    }
}
