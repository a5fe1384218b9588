//! Marks never block a worker (docs/protocol.md, "When the master does not
//! read"). The Node and Python clients write a Busy and an Idle mark to
//! their pipe around each request; a master that stops reading (a re-exec
//! pauses it up to 1.5 s, a SIGSTOP for as long as it lasts) lets the pipe
//! fill. These tests stop the real master for at least 2 s while clients
//! send 5,000 requests through one worker of each language, and count what
//! the worker answers while the master is stopped: more than a worker
//! whose marks blocked could, since its pipe would have been full first.
//! Without node or python3, that language's test says SKIPPED, loudly.

use respawn_tests::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requests the clients send, in all.
const REQUESTS: usize = 5_000;
/// Clients sending them, each one request at a time.
const CLIENTS: usize = 4;
/// How long the master stays stopped, at least: longer than a re-exec's
/// pause.
const STALL: Duration = Duration::from_secs(2);
/// Linux's default pipe size: what a worker's marks fill before a blocking
/// write waits for the master. (The master keeps the default; a user over
/// fs.pipe-user-pages-soft gets smaller pipes, which only lowers the
/// bound below.)
const PIPE_BYTES: usize = 65_536;
/// The fewest bytes of marks one `GET /` writes: its Busy frame, a 4-byte
/// header and `GET / HTTP/1.1 from 127.0.0.1:` with a port of 4 digits or
/// more. Idle is not counted: Node sends one only when nothing is in flight.
const MARK_BYTES_PER_REQUEST: usize = 4 + "GET / HTTP/1.1 from 127.0.0.1:".len() + 4;
/// More answers than a worker whose marks block could give while the
/// master reads nothing: one per request that fits in the pipe, plus the
/// requests in flight when the master stopped (their Busy already read).
const MORE_THAN_A_BLOCKED_WORKER: usize = PIPE_BYTES / MARK_BYTES_PER_REQUEST + CLIENTS + 1;

/// The master stopped with SIGSTOP; dropping it sends SIGCONT, so a test
/// that fails while the master is stopped leaves no stopped process (the
/// harness then kills the master's group as usual).
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        send(pid, libc::SIGSTOP);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        send(self.0, libc::SIGCONT);
    }
}

/// The state letter of `pid` in /proc/PID/stat (`T` when stopped).
fn state(pid: i32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 2..].chars().next()
}

/// Whether `tool` runs here; a skip the summary shows if not.
fn have(tool: &str, test: &str) -> bool {
    let need = if tool == "node" { Need::Node } else { Need::Python };
    require(test, need)
}

/// What the clients have seen so far.
#[derive(Default)]
struct Tally {
    answered: AtomicUsize,
    failed: Mutex<Vec<String>>,
}

impl Tally {
    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    fn any_failed(&self) -> bool {
        !self.failed.lock().unwrap().is_empty()
    }
}

/// `CLIENTS` threads that send `requests` GET / between them, each answer
/// expected to be a 200 from `worker`. All stop at the first failure: a
/// worker that blocks fails each request only after the read timeout.
fn clients(
    addr: std::net::SocketAddr,
    worker: i32,
    requests: usize,
    tally: &Arc<Tally>,
) -> Vec<std::thread::JoinHandle<()>> {
    let next = Arc::new(AtomicUsize::new(0));
    (0..CLIENTS)
        .map(|_| {
            let (next, tally) = (Arc::clone(&next), Arc::clone(tally));
            std::thread::spawn(move || {
                while !tally.any_failed() && next.fetch_add(1, Ordering::SeqCst) < requests {
                    match get(addr, "/") {
                        Ok(answer) if answer.status == 200 && answer.pid() == Some(worker) => {
                            tally.answered.fetch_add(1, Ordering::SeqCst);
                        }
                        other => tally.failed.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            })
        })
        .collect()
}

/// The master's row for `worker`, from `respawn ctl SOCKET status --json`.
fn row(respawn: &Respawn, socket: &std::path::Path, worker: i32) -> Value {
    let output = Command::new(binary())
        .arg("ctl")
        .arg(socket)
        .args(["status", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("running respawn ctl");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", respawn.dump());
    let status: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|err| panic!("not JSON ({err}): {stdout:?}"));
    status["workers"]
        .as_array()
        .and_then(|rows| rows.iter().find(|w| w["pid"].as_i64() == Some(worker.into())))
        .cloned()
        .unwrap_or_else(|| panic!("no row for worker {worker}: {status}"))
}

fn a_stalled_master_never_blocks_a_worker_that_marks_requests(interpreter: &str, example: &str, test: &str) {
    if !have(interpreter, test) {
        return;
    }
    let example = workspace().join(example).display().to_string();
    let respawn = Respawn::start(&["--workers", "1", "--", interpreter, &example]);
    let worker = *respawn.wait_for_workers(1).iter().next().expect("a worker");
    let tally = Arc::new(Tally::default());
    let clients = clients(respawn.addr, worker, REQUESTS, &tally);
    assert!(
        wait_until(PATIENCE, || tally.answered() >= 100),
        "the first 100 answers\n{}",
        respawn.dump()
    );

    let stopped = Stopped::new(respawn.pid);
    assert!(
        wait_until(PATIENCE, || state(respawn.pid) == Some('T')),
        "the master did not stop"
    );
    let (at_stop, stop_at) = (tally.answered(), Instant::now());
    // Slow machines serve slowly: the deadline is generous, and a failed
    // request ends the wait at once.
    wait_until(3 * PATIENCE, || {
        tally.any_failed()
            || (stop_at.elapsed() >= STALL
                && (tally.answered() - at_stop >= MORE_THAN_A_BLOCKED_WORKER || tally.answered() == REQUESTS))
    });
    let while_stopped = tally.answered() - at_stop;
    assert_eq!(state(respawn.pid), Some('T'), "the master ran again");
    drop(stopped);
    assert!(
        while_stopped >= MORE_THAN_A_BLOCKED_WORKER,
        "while the master was stopped ({:.1} s), the worker answered {while_stopped} requests, \
         no more than its pipe holds the marks of ({MORE_THAN_A_BLOCKED_WORKER}): its marks blocked it\n\
         failed: {:?}\n{}",
        stop_at.elapsed().as_secs_f64(),
        tally.failed.lock().unwrap().first(),
        respawn.dump()
    );

    for client in clients {
        client.join().expect("a client thread");
    }
    let failed = tally.failed.lock().unwrap().clone();
    assert_eq!(failed, Vec::<String>::new(), "{}", respawn.dump());
    assert_eq!(tally.answered(), REQUESTS);

    // The pipe was full, so marks were dropped, and the worker says how many.
    let line = respawn.wait_for_log("the worker's count of dropped marks", |l| {
        l.starts_with(&format!("worker {worker}: "))
            && l.ends_with(" dropped: the master was not reading its pipe")
    });
    let dropped: usize = line
        .split(' ')
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    assert!(dropped > 0, "{line}");
    // The same worker, never replaced, still answers.
    assert_eq!(
        respawn.wait_for_workers(1).into_iter().collect::<Vec<_>>(),
        [worker]
    );
    assert_eq!(respawn.get("/").expect("GET / after the stall").status, 200);
}

#[test]
fn a_stalled_master_never_blocks_a_node_worker_that_marks_requests() {
    a_stalled_master_never_blocks_a_worker_that_marks_requests(
        "node",
        "clients/node/example.js",
        "a_stalled_master_never_blocks_a_node_worker_that_marks_requests",
    );
}

#[test]
fn a_stalled_master_never_blocks_a_python_worker_that_marks_requests() {
    a_stalled_master_never_blocks_a_worker_that_marks_requests(
        "python3",
        "clients/python/example.py",
        "a_stalled_master_never_blocks_a_python_worker_that_marks_requests",
    );
}

/// A worker that crashes while its pipe is full still tells the master:
/// its Suicide waits for room (the worker answers its 500 meanwhile, and
/// stays until the Suicide is out), and reaches the master once it reads
/// again, before the worker's exit.
fn a_suicide_that_meets_a_full_pipe_reaches_the_master_once_it_reads(
    interpreter: &str,
    example: &str,
    test: &str,
) {
    if !have(interpreter, test) {
        return;
    }
    let example = workspace().join(example).display().to_string();
    let respawn = Respawn::start(&["--workers", "1", "--min-uptime", "0", "--", interpreter, &example]);
    let worker = *respawn.wait_for_workers(1).iter().next().expect("a worker");

    let stopped = Stopped::new(respawn.pid);
    assert!(
        wait_until(PATIENCE, || state(respawn.pid) == Some('T')),
        "the master did not stop"
    );
    // More requests than the pipe holds the marks of: it is full, and the
    // Suicide, longer than a Busy it refused, cannot fit.
    let tally = Arc::new(Tally::default());
    for client in clients(respawn.addr, worker, MORE_THAN_A_BLOCKED_WORKER, &tally) {
        client.join().expect("a client thread");
    }
    let failed = tally.failed.lock().unwrap().clone();
    assert_eq!(failed, Vec::<String>::new(), "{}", respawn.dump());
    let crashed = respawn
        .get("/crash")
        .expect("GET /crash while the master is stopped");
    assert_eq!(crashed.status, 500, "{crashed:?}");
    // The worker owes the master its Suicide: it does not exit while the
    // master stays stopped as long as a re-exec would pause it.
    assert!(
        !wait_until(STALL, || !alive(worker)),
        "worker {worker} exited with its Suicide unsaid\n{}",
        respawn.dump()
    );
    assert_eq!(state(respawn.pid), Some('T'), "the master ran again");
    drop(stopped);

    let suicide = respawn.wait_for_line(&format!(
        "worker {worker} sent suicide (uncaught {}: crash requested by GET /crash); replacing it",
        if interpreter == "node" {
            "Error"
        } else {
            "RuntimeError"
        }
    ));
    let exited = respawn.wait_for_log("the crashed worker's exit", |l| {
        message(l).starts_with(&format!("worker {worker} exited (code 70: uncaught "))
    });
    let log = respawn.log();
    assert!(
        position(&log, |l| l == suicide) < position(&log, |l| l == exited),
        "the Suicide came after the exit\n{}",
        respawn.dump()
    );
    let after = respawn.wait_for_workers(1);
    assert!(!after.contains(&worker), "{}", respawn.dump());
}

#[test]
fn a_suicide_that_meets_a_full_pipe_reaches_a_master_that_reads_again_from_node() {
    a_suicide_that_meets_a_full_pipe_reaches_the_master_once_it_reads(
        "node",
        "clients/node/example.js",
        "a_suicide_that_meets_a_full_pipe_reaches_a_master_that_reads_again_from_node",
    );
}

#[test]
fn a_suicide_that_meets_a_full_pipe_reaches_a_master_that_reads_again_from_python() {
    a_suicide_that_meets_a_full_pipe_reaches_the_master_once_it_reads(
        "python3",
        "clients/python/example.py",
        "a_suicide_that_meets_a_full_pipe_reaches_a_master_that_reads_again_from_python",
    );
}

/// Does `pid` hold the server side of the TCP connection from local port
/// `port` (found by inode in /proc/net/tcp)? Only once the worker accepted
/// it: before, the socket sits in the listener's queue, held by nobody.
fn holds_connection_from(pid: i32, port: u16) -> bool {
    // Every entry whose remote port is ours: a TIME_WAIT one of an earlier
    // connection may share it (loopback reuses them), with inode 0.
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(fields.get(2)?.rsplit(':').next()?, 16).ok()?;
            let inode = fields.get(9)?;
            (remote_port == port && *inode != "0").then(|| format!("socket:[{inode}]"))
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .any(|target| target.to_str().is_some_and(|t| sockets.iter().any(|s| s == t)))
    })
}

/// The newest mark is kept, not dropped: a request that starts while the
/// pipe is full shows in `status` once the master reads again, while it is
/// still in flight. Node only: its event loop writes the kept mark as soon
/// as the pipe has room, where a Python worker writes it between requests
/// (docs/protocol.md says so), after this one.
#[test]
fn a_request_started_while_the_pipe_is_full_shows_in_status_once_the_master_reads() {
    let test = "a_request_started_while_the_pipe_is_full_shows_in_status_once_the_master_reads";
    if !have("node", test) {
        return;
    }
    let dir = TempDir::new("respawn-marks-status");
    let socket = dir.join("control.sock");
    let example = workspace().join("clients/node/example.js").display().to_string();
    let control = socket.display().to_string();
    let respawn = Respawn::start(&["--workers", "1", "--control", &control, "--", "node", &example]);
    let worker = *respawn.wait_for_workers(1).iter().next().expect("a worker");
    assert!(
        wait_until(PATIENCE, || socket.exists()),
        "no control socket\n{}",
        respawn.dump()
    );

    let stopped = Stopped::new(respawn.pid);
    assert!(
        wait_until(PATIENCE, || state(respawn.pid) == Some('T')),
        "the master did not stop"
    );
    let tally = Arc::new(Tally::default());
    for client in clients(respawn.addr, worker, MORE_THAN_A_BLOCKED_WORKER, &tally) {
        client.join().expect("a client thread");
    }
    let failed = tally.failed.lock().unwrap().clone();
    assert_eq!(failed, Vec::<String>::new(), "{}", respawn.dump());
    // A long request in flight, then a short one beside it: the short
    // one's Busy is the newest mark, refused by the full pipe (the long
    // one keeps the worker busy: no Idle follows).
    let mut conn = std::net::TcpStream::connect(respawn.addr).expect("connecting for GET /sleep/15000");
    let local = conn.local_addr().expect("its address");
    conn.write_all(b"GET /sleep/15000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("sending GET /sleep/15000");
    let sleeper = std::thread::spawn(move || {
        conn.set_read_timeout(Some(PATIENCE))?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        Ok::<_, std::io::Error>(text)
    });
    assert!(
        wait_until(PATIENCE, || holds_connection_from(worker, local.port())),
        "the worker did not accept GET /sleep/15000"
    );
    let version = respawn.get("/version").expect("GET /version");
    assert_eq!(version.status, 200, "{version:?}");
    assert_eq!(state(respawn.pid), Some('T'), "the master ran again");
    drop(stopped);

    let mut last = Value::Null;
    let shown = wait_until(PATIENCE, || {
        last = row(&respawn, &socket, worker);
        last["request"] == "GET /version HTTP/1.1" || sleeper.is_finished()
    });
    assert!(
        shown && !sleeper.is_finished() && !last["busy_secs"].is_null(),
        "while GET /sleep/15000 was in flight, the master showed {last}\n{}",
        respawn.dump()
    );
    let slept = sleeper.join().expect("the GET /sleep/15000 thread");
    assert!(
        matches!(&slept, Ok(answer) if answer.starts_with("HTTP/1.1 200")),
        "{slept:?}"
    );
    assert!(
        wait_until(PATIENCE, || {
            last = row(&respawn, &socket, worker);
            last["busy_secs"].is_null()
        }),
        "the master still shows worker {worker} busy: {last}\n{}",
        respawn.dump()
    );
}
