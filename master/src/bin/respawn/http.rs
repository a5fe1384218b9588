//! The demo's HTTP/1.x handler: one request per connection, then close.
//!
//! Closing after each response is the keep-alive policy: a client that wants
//! to keep its connection cannot hold a worker while others wait, because it
//! has to queue on the listener again for its next request like everybody
//! else. (wrk and curl reconnect on `Connection: close`.)

use respawn_worker::Service;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Requests larger than this are refused (431): the demo serves GETs.
const MAX_REQUEST: usize = 8192;
/// A client that sends nothing does not hold a worker for longer than this.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest /sleep, so that a typo cannot hold a worker for hours.
const MAX_SLEEP_MS: u64 = 60_000;

pub struct Demo {
    pid: u32,
    fail_start: bool,
}

impl Demo {
    /// Made in the worker. `fail_start`: panic before Ready, to show what
    /// the master does with a crash loop.
    pub fn new(fail_start: bool) -> Demo {
        Demo {
            pid: std::process::id(),
            fail_start,
        }
    }
}

impl Service for Demo {
    fn start(&mut self) {
        if self.fail_start {
            panic!("--demo-fail-start: failing before Ready on purpose");
        }
    }

    fn serve(&mut self, conn: &mut TcpStream) {
        let _ = conn.set_read_timeout(Some(READ_TIMEOUT));
        let response = match read_request(conn) {
            Ok(Some(request)) => {
                log::debug!(
                    "worker {} serving {} {}",
                    self.pid,
                    request.method,
                    request.target
                );
                let response = self.route(&request.target);
                Response {
                    head_only: request.method == "HEAD",
                    ..response
                }
            }
            Ok(None) => return,
            Err(Bad(status, why)) => Response::text(status, why),
        };
        let _ = response.send(conn);
    }

    fn recover(&mut self, conn: &mut TcpStream, panic: &str) {
        let body = format!("worker {} panicked: {panic}\n", self.pid);
        let _ = Response::text(500, body).send(conn);
    }
}

impl Demo {
    fn route(&self, target: &str) -> Response {
        let path = target.split('?').next().unwrap_or(target);
        match path {
            "/" => Response::text(200, format!("handle by child {}\n", self.pid)),
            "/crash" => panic!("crash requested by GET /crash"),
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

/// Why a request cannot be served: the status and the body that says why.
struct Bad(u16, String);

/// What the demo needs of a request.
struct Request {
    method: String,
    target: String,
}

/// Reads one request head, or None if the client closed (or went silent)
/// before sending one.
fn read_request(conn: &mut TcpStream) -> Result<Option<Request>, Bad> {
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let n = match conn.read(&mut buf[len..]) {
            Ok(n) => n,
            // The stop handler interrupts reads (no SA_RESTART); the request
            // in flight is still to be served.
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Ok(None),
        };
        if n == 0 {
            return Ok(None);
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                respawn_worker::note_request(&buf[..len]);
                let method = request.method.unwrap_or("");
                let target = request.path.unwrap_or("/");
                if method != "GET" && method != "HEAD" {
                    return Err(Bad(
                        405,
                        format!("method {method} not allowed: the demo serves GET\n"),
                    ));
                }
                return Ok(Some(Request {
                    method: method.to_owned(),
                    target: target.to_owned(),
                }));
            }
            Ok(httparse::Status::Partial) if len == buf.len() => {
                return Err(Bad(
                    431,
                    format!("request head larger than {MAX_REQUEST} bytes\n"),
                ));
            }
            Ok(httparse::Status::Partial) => continue,
            Err(err) => return Err(Bad(400, format!("malformed request: {err}\n"))),
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
    fn send(&self, conn: &mut TcpStream) -> io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            _ => "Internal Server Error",
        };
        let body = if self.head_only { "" } else { &self.body };
        let message = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.status,
            self.body.len(),
        );
        conn.write_all(message.as_bytes())
    }
}
