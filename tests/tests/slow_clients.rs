//! Slow clients: a worker serves one connection at a time, so a client that
//! trickles its request must not hold it past the demo's deadline for the
//! whole request head (5 s), and the drop is logged with the peer.

use respawn_tests::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The demo's deadline for a whole request head (http.rs).
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// A trickling client sends its next byte after this much silence: well
/// within any per-read timeout, and its bytes land at 0, 1.5, 3 and 4.5 s,
/// clear of the 5 s deadline (a byte arriving as the worker closes would
/// reset the connection and take the 408 with it).
const TRICKLE_EVERY: Duration = Duration::from_millis(1500);
/// A trickler gives up after this: without the head deadline it would hold
/// its worker for as long as it trickles. Bounds the test when it fails.
const TRICKLE_FOR: Duration = Duration::from_secs(12);

/// A client that sends half a request line, then a byte of its path
/// (`GET /slowlyyyy...`, never complete, never malformed) whenever
/// [`TRICKLE_EVERY`] passes without an answer; returns its local address
/// and, once the server closed, what it answered.
fn trickle(addr: SocketAddr) -> (SocketAddr, JoinHandle<String>) {
    let mut conn = TcpStream::connect_timeout(&addr, PATIENCE).unwrap();
    conn.write_all(b"GET /slowl").unwrap();
    let local = conn.local_addr().unwrap();
    let client = std::thread::spawn(move || {
        let until = Instant::now() + TRICKLE_FOR;
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        conn.set_read_timeout(Some(TRICKLE_EVERY)).unwrap();
        while Instant::now() < until {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if !answer.is_empty() || conn.write_all(b"y").is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    });
    (local, client)
}

#[test]
fn slow_head_is_dropped_within_the_head_deadline() {
    let respawn = Respawn::with_workers(2, &[]);
    let workers = respawn.wait_for_workers(2);
    let opened = Instant::now();
    // Two tricklers, one per worker (accept hands each idle worker one
    // connection), then a GET that has to wait for a worker to be free.
    let tricklers = [trickle(respawn.addr), trickle(respawn.addr)];
    let answer = respawn.get("/").expect("GET / behind two slow clients");
    let waited = opened.elapsed();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        workers.contains(&answer.pid().unwrap_or_default()),
        "{answer:?} from {workers:?}"
    );
    // Served once a slow client was dropped at its deadline: not before (or
    // the tricklers held no worker and this test shows nothing), and not
    // much after. Per-read timeouts would hold each worker for as long as
    // the trickle lasts.
    assert!(
        waited >= HEAD_DEADLINE - Duration::from_millis(500),
        "GET / answered after {waited:?}: the slow clients held no worker"
    );
    assert!(
        waited <= HEAD_DEADLINE + Duration::from_millis(1500),
        "GET / answered after {waited:?}, head deadline {HEAD_DEADLINE:?}\n{}",
        respawn.dump()
    );

    let mut droppers = std::collections::BTreeSet::new();
    for (local, client) in tricklers {
        let answer = client.join().unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n")
                && answer.ends_with("\r\n\r\nno complete request head within 5 s\n"),
            "{local}: {answer:?}"
        );
        let line = respawn.wait_for_log(&format!("the drop of {local}"), |l| {
            l.ends_with(&format!(
                " dropped a slow connection from {local} (no complete request head within 5 s)"
            ))
        });
        let pid = worker_pid(&line).unwrap_or_default();
        assert!(line.contains(&format!(" WARN ] worker {pid} dropped ")), "{line}");
        droppers.insert(pid);
    }
    assert_eq!(droppers, workers, "each worker dropped its own slow client");
    // Dropping a client is no fault of the worker: nobody was replaced.
    assert_eq!(respawn.wait_for_workers(2), workers);
    assert_eq!(respawn.count_log("spawned"), 2);
}

#[test]
fn silent_connections_never_reach_a_worker() {
    let respawn = Respawn::with_workers(2, &[]);
    // Ten connections that send nothing: with TCP_DEFER_ACCEPT the kernel
    // keeps them from accept until data comes, so no worker waits on them.
    let silent: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect_timeout(&respawn.addr, PATIENCE).unwrap())
        .collect();
    let asked = Instant::now();
    let answer = respawn.get("/").expect("GET / beside ten silent connections");
    let waited = asked.elapsed();
    assert_eq!(answer.status, 200);
    // Without it, each worker would wait out the 5 s head deadline on one
    // silent connection after another.
    assert!(waited < Duration::from_secs(1), "GET / answered after {waited:?}");
    drop(silent);
}
