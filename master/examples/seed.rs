//! The seed: the program of the Node.js article respawn grew from ("Node如何
//! 自动重启进程", shared/seed/), written with the library. Each construct of
//! the article is named beside what does its work here.
//!
//! ```text
//! cargo run -p respawn-master --example seed            # 127.0.0.1:8080
//! curl localhost:8080/        # handle by child 4242
//! curl localhost:8080/crash   # 500: the worker panicked; its replacement is already up
//! ```
//!
//! The article's master.js and worker.js, and where they went:
//!
//! | the article (Node)                              | here (Rust)                                  |
//! |-------------------------------------------------|----------------------------------------------|
//! | `net.createServer().listen(8080)`               | `respawn_master::bind`                       |
//! | `for (... cpus.length) createWorker()`          | `Config::default()`: one worker per CPU      |
//! | `fork('./worker.js')`                           | `respawn_master::run` forks (spawn.rs)       |
//! | `worker.send('server', server)`                 | the child inherits the listener (`Handoff`)  |
//! | `worker.on('exit', () => createWorker())`       | the master reaps and replaces (master.rs)    |
//! | `worker.on('message', m => m.act === 'suicide' && createWorker())` | `Message::Suicide`: the replacement is forked at once |
//! | `http.createServer((req, res) => ...)`          | `impl Service for Worker`                    |
//! | `process.on('uncaughtException', ...)`          | `respawn_worker::run` catches the panic      |
//! | `process.send({act: 'suicide'})`                | ... sends Suicide first,                     |
//! | `worker.close(() => process.exit(1))`           | ... stops accepting, finishes, exits         |
//!
//! What the article's code leaves out, the library does: its master forks a
//! worker on 'suicide' and again on 'exit' (every crash adds a worker; here
//! a worker that said Suicide no longer counts, so its exit replaces
//! nothing), never stops forking a worker that cannot start (here: a
//! backoff, and a give-up), and lets workers outlive it (here: they die
//! with it).

use respawn_master::Conn;
use std::io::{BufRead, BufReader, Write};

/// worker.js: `http.createServer((req, res) => res.end('handle by child'))`,
/// with a route that throws, as the article's hidden bug does.
struct Worker;

impl respawn_worker::Service for Worker {
    fn serve(&mut self, conn: &mut Conn) {
        // The request's head, to its blank line: what is left unread when
        // a socket closes makes the kernel reset the connection.
        let mut reader = BufReader::new(&mut *conn);
        let mut request_line = String::new();
        let _ = reader.read_line(&mut request_line);
        let mut header = String::new();
        while reader.read_line(&mut header).is_ok_and(|n| n > 0) && !header.trim_end().is_empty() {
            header.clear();
        }
        if request_line.starts_with("GET /crash ") {
            // An uncaught exception: caught by respawn_worker::run, which
            // sends Suicide, stops accepting, and answers below.
            panic!("a hidden bug, hit by GET /crash");
        }
        let body = format!("handle by child {}\n", std::process::id());
        let _ = conn.write_all(response(200, &body).as_bytes());
    }

    /// After the panic: the client that hit the bug gets an answer.
    fn recover(&mut self, conn: &mut Conn, panic: &str) {
        let body = format!("worker {} panicked: {panic}\n", std::process::id());
        let _ = conn.write_all(response(500, &body).as_bytes());
    }
}

fn response(status: u16, body: &str) -> String {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Internal Server Error" },
        body.len()
    )
}

/// master.js.
fn main() {
    // console.log, through the library's log path (it never blocks the
    // master on a stderr nobody reads).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(respawn_master::log_writer())))
        .init();
    // server.listen(8080); `--listen ADDR` or `ADDR` picks another.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = match args.as_slice() {
        [flag, addr, ..] if flag == "--listen" => addr.clone(),
        [addr, ..] => addr.clone(),
        [] => "127.0.0.1:8080".to_owned(),
    };
    let listener = respawn_master::bind(&addr).unwrap_or_else(|err| {
        eprintln!("seed: {err}");
        std::process::exit(1);
    });
    // for (let i = 0; i < cpus.length; i++) createWorker(), and every
    // 'exit' and 'message' of the article: the library's loop.
    let config = respawn_master::Config::default();
    if let Err(err) = respawn_master::run(listener, config, |handoff| respawn_worker::run(handoff, Worker)) {
        eprintln!("seed: {err}");
        std::process::exit(1);
    }
}
