//! The smallest embedding: a master on 127.0.0.1:8080 (or the address given
//! as the first argument) keeping 2 workers that answer "hello".
//!
//! cargo run -p respawn-master --example hello -- 127.0.0.1:0
//! Stop it with Ctrl-C, or gracefully with `kill -TERM <master pid>`.

use respawn_master::Conn;
use std::io::Write;
use std::time::Duration;

struct Hello;

impl respawn_worker::Service for Hello {
    fn serve(&mut self, conn: &mut Conn) {
        let body = format!("hello from worker {}\n", std::process::id());
        answer(conn, "200 OK", &body);
    }

    /// After `serve` panicked: the worker has told the master already (its
    /// replacement is on its way); the client still gets an answer.
    fn recover(&mut self, conn: &mut Conn, panic: &str) {
        answer(conn, "500 Internal Server Error", &format!("{panic}\n"));
    }
}

fn answer(conn: &mut Conn, status: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(format!("{head}{body}").as_bytes());
}

fn main() {
    // The library logs through the `log` crate; show its lines on stderr,
    // through the library's log writer, which never blocks the master (a
    // full stderr pipe drops lines and says how many, instead of stalling).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(respawn_master::log_writer())))
        .init();
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let listener = respawn_master::bind(&addr).unwrap_or_else(|err| {
        eprintln!("hello: {err}");
        std::process::exit(1);
    });
    let config = respawn_master::Config::new(2).graceful_timeout(Duration::from_secs(10));
    match respawn_master::run(listener, config, |handoff| respawn_worker::run(handoff, Hello)) {
        Ok(()) => {}
        // Workers kept failing; the master logged why when it gave up.
        Err(respawn_master::Error::GaveUp { .. }) => std::process::exit(3),
        Err(err) => {
            eprintln!("hello: {err}");
            std::process::exit(1);
        }
    }
}
