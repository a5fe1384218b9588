//! The control socket's promises (docs/control.md), spoken to raw: answers
//! that come when the thing is done, and hostile peers that cannot block,
//! slow or crash the master. (`respawn ctl`, its client, is tests/ctl.rs.)

use respawn_tests::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A directory for one test's control socket, removed at the end.
struct Dir(TempDir);

impl Dir {
    fn new(name: &str) -> Dir {
        Dir(TempDir::new(&format!("respawn-control-{name}")))
    }

    fn socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }
}

fn start(dir: &Dir, workers: usize, more: &[&str]) -> Respawn {
    let socket = dir.socket().display().to_string();
    let n = workers.to_string();
    let mut args = vec!["--workers", n.as_str(), "--control", socket.as_str()];
    args.extend_from_slice(more);
    let respawn = Respawn::start(&args);
    respawn.wait_for_workers(workers);
    respawn
}

/// One request, the whole answer (greeting included) read until close.
fn ask(socket: &Path, request: &str) -> String {
    let mut conn = UnixStream::connect(socket).expect("connecting to the control socket");
    conn.set_read_timeout(Some(PATIENCE)).expect("a read timeout");
    conn.write_all(format!("{request}\n").as_bytes())
        .expect("sending the request");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("reading the answer");
    answer
}

/// The body of an `ok` answer; panics on anything else.
fn ok(answer: &str) -> &str {
    answer
        .strip_prefix("respawn-control 1\nok\n")
        .unwrap_or_else(|| panic!("not an ok answer: {answer:?}"))
}

/// A whole number after `"key":` in a JSON text.
fn field(json: &str, key: &str) -> Option<u64> {
    let rest = json.split(&format!("\"{key}\":")).nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// How many of `workers` have said `ready` in the log so far.
fn ready_workers(respawn: &Respawn, workers: &std::collections::BTreeSet<i32>) -> usize {
    let log = respawn.log();
    workers
        .iter()
        .filter(|&&pid| log.iter().any(|l| worker_says(l, "ready") == Some(pid)))
        .count()
}

#[test]
fn status_shows_busy_workers_with_their_request_lines() {
    let dir = Dir::new("status");
    let respawn = start(&dir, 2, &[]);
    let addr = respawn.addr;
    let slow = std::thread::spawn(move || get(addr, "/sleep/1500"));
    let mut body = String::new();
    assert!(
        wait_until(PATIENCE, || {
            body = ok(&ask(&dir.socket(), "status")).to_owned();
            body.contains("\"request\":\"GET /sleep/1500 HTTP/1.1\"")
        }),
        "{body}"
    );
    assert!(body.starts_with("{\"protocol\":1,"), "{body}");
    assert_eq!(field(&body, "target"), Some(2));
    for pid in respawn.workers() {
        assert!(
            body.contains(&format!("\"pid\":{pid},")),
            "worker {pid} in {body}"
        );
    }
    assert!(slow.join().expect("the slow client").is_ok());
}

#[test]
fn scale_answers_once_that_many_workers_are_ready() {
    let dir = Dir::new("scale");
    let respawn = start(&dir, 2, &[]);
    let body = ok(&ask(&dir.socket(), "scale 5")).to_owned();
    // The master's children the moment the answer came: all five are there,
    // and each had said Ready (its line reaches the test a little later,
    // through the log pipe).
    let children = respawn.workers();
    assert_eq!(children.len(), 5, "{body}\n{}", respawn.dump());
    assert!(
        wait_until(PATIENCE, || ready_workers(&respawn, &children) == 5),
        "{body}\n{}",
        respawn.dump()
    );
    assert_eq!(body, "{\"target\":5,\"ready\":5}\n");
    assert_eq!(ok(&ask(&dir.socket(), "scale 1")), "{\"target\":1,\"ready\":1}\n");
    respawn.wait_for_workers(1);
}

#[test]
fn two_scales_back_to_back_both_take_effect() {
    let dir = Dir::new("twice");
    let respawn = start(&dir, 2, &[]);
    // Sent without waiting for either answer: nothing coalesces, the last
    // one wins, and the first is told so.
    let mut first = UnixStream::connect(dir.socket()).expect("connecting");
    let mut second = UnixStream::connect(dir.socket()).expect("connecting");
    first.write_all(b"scale 3\n").expect("sending");
    second.write_all(b"scale 4\n").expect("sending");
    for conn in [&first, &second] {
        conn.set_read_timeout(Some(PATIENCE)).expect("a timeout");
    }
    let mut answers = (String::new(), String::new());
    first.read_to_string(&mut answers.0).expect("the first answer");
    second.read_to_string(&mut answers.1).expect("the second answer");
    assert_eq!(ok(&answers.1), "{\"target\":4,\"ready\":4}\n");
    assert!(
        answers.0.ends_with("ok\n{\"target\":3,\"ready\":3}\n")
            || answers
                .0
                .ends_with("error superseded: 4 workers are wanted now\n"),
        "{:?}",
        answers.0
    );
    assert_eq!(respawn.wait_for_workers(4).len(), 4);
}

#[test]
fn reload_answers_with_a_generation_whose_workers_are_all_new() {
    let dir = Dir::new("reload");
    let respawn = start(&dir, 3, &[]);
    let old = respawn.workers();
    let body = ok(&ask(&dir.socket(), "reload")).to_owned();
    assert_eq!(field(&body, "generation"), Some(1), "{body}");
    let status = ok(&ask(&dir.socket(), "status")).to_owned();
    let counted: Vec<&str> = status
        .split("{\"pid\":")
        .skip(1)
        .filter(|w| !w.contains("\"state\":\"retiring\""))
        .collect();
    assert_eq!(counted.len(), 3, "{status}");
    for worker in counted {
        assert!(
            worker.contains("\"generation\":1,") && worker.contains("\"state\":\"ready\""),
            "{worker}"
        );
        let pid: i32 = worker
            .split(',')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a pid");
        assert!(!old.contains(&pid), "worker {pid} is old");
    }
}

#[test]
fn metrics_are_prometheus_text() {
    let dir = Dir::new("metrics");
    let respawn = start(&dir, 2, &[]);
    assert_eq!(respawn.get("/crash").expect("GET /crash").status, 500);
    respawn.wait_for_log("the crash's exit", |l| l.contains("exited (code 70"));
    // Its replacement Ready too, so that the gauge below is settled.
    respawn.wait_for_workers(2);
    let body = ok(&ask(&dir.socket(), "metrics")).to_owned();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert!(value.parse::<f64>().is_ok(), "{line:?}");
        assert!(name.starts_with("respawn_"), "{line:?}");
    }
    assert!(body.contains("respawn_workers{state=\"ready\"} 2\n"), "{body}");
    assert!(
        body.contains("respawn_worker_exits_total{cause=\"panicked\"} 1\n"),
        "{body}"
    );
    assert!(body.contains("respawn_listen_backlog{listener="), "{body}");
}

#[test]
fn stop_answers_once_every_worker_is_gone_and_the_socket_file_goes_too() {
    let dir = Dir::new("stop");
    let mut respawn = start(&dir, 2, &[]);
    let workers = respawn.workers();
    assert_eq!(ok(&ask(&dir.socket(), "stop")), "{\"stopped\":true}\n");
    assert!(
        workers.iter().all(|&pid| !alive(pid)),
        "a worker outlived the answer"
    );
    assert_eq!(respawn.wait_exit().code(), Some(0));
    assert!(!dir.socket().exists(), "the socket file outlived the master");
}

#[test]
fn hostile_peers_never_hold_up_the_master() {
    let dir = Dir::new("hostile");
    let respawn = start(&dir, 2, &["--min-uptime", "0"]);
    let socket = dir.socket();
    // Garbage, a 1 MB line, a request that never ends, one that never
    // reads its answer, and many connections at once, all held open.
    let mut held = Vec::new();
    let mut garbage = UnixStream::connect(&socket).expect("connecting");
    garbage.write_all(b"\x00\xff\x01 nonsense\n").expect("garbage");
    held.push(garbage);
    let mut huge = UnixStream::connect(&socket).expect("connecting");
    huge.set_nonblocking(true).expect("non-blocking");
    let _ = huge.write(&vec![b'x'; 1 << 20]);
    held.push(huge);
    let mut unfinished = UnixStream::connect(&socket).expect("connecting");
    unfinished.write_all(b"stat").expect("half a request");
    held.push(unfinished);
    let mut deaf = UnixStream::connect(&socket).expect("connecting");
    deaf.write_all(b"metrics\n").expect("a request never read");
    held.push(deaf);
    for _ in 0..1000 {
        match UnixStream::connect(&socket) {
            Ok(conn) => held.push(conn),
            Err(_) => break, // the backlog is full: the kernel refuses, not the master
        }
    }
    // Meanwhile a crash storm loses no request but its own, and a
    // well-behaved client still gets its answer.
    let load = Load::start(&respawn, 2);
    for _ in 0..20 {
        assert_eq!(respawn.get("/crash").map(|a| a.status).ok(), Some(500));
    }
    let (served, failed) = load.stop();
    assert!(served > 0);
    assert_eq!(failed, Vec::<String>::new(), "{}", respawn.dump());
    drop(held);
    let mut body = String::new();
    assert!(
        wait_until(PATIENCE, || {
            let Ok(mut conn) = UnixStream::connect(&socket) else {
                return false;
            };
            let _ = conn.set_read_timeout(Some(PATIENCE));
            let _ = conn.write_all(b"status\n");
            body.clear();
            conn.read_to_string(&mut body).is_ok() && body.contains("\nok\n{\"protocol\":1")
        }),
        "{body}\n{}",
        respawn.dump()
    );
    assert!(alive(respawn.pid));
    respawn.wait_for_workers(2);
}

#[test]
fn the_answer_to_garbage_is_an_error_and_a_close() {
    let dir = Dir::new("garbage");
    let _respawn = start(&dir, 1, &[]);
    let answer = ask(&dir.socket(), "scale lots");
    assert_eq!(
        answer,
        "respawn-control 1\nerror scale: \"lots\" is not a whole number of workers\n"
    );
    let mut conn = UnixStream::connect(dir.socket()).expect("connecting");
    conn.set_read_timeout(Some(PATIENCE)).expect("a timeout");
    let _ = conn.write_all(&[b'x'; 300]);
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert_eq!(answer, "respawn-control 1\nerror request longer than 256 bytes\n");
}

#[test]
fn a_peer_of_another_uid_is_refused() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("\n*** SKIPPED a_peer_of_another_uid_is_refused: python3 is needed as the other user's client ***\n");
        return;
    }
    // SAFETY-free check: only root can run a client as another user.
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    if !root {
        eprintln!(
            "\n*** SKIPPED a_peer_of_another_uid_is_refused: needs root to run a client as uid 65534 ***\n"
        );
        return;
    }
    let dir = Dir::new("uid");
    let _respawn = start(&dir, 1, &[]);
    let socket = dir.socket();
    use std::os::unix::fs::PermissionsExt;
    let client = |socket: &Path| {
        let script = "import socket,sys\n\
                      s=socket.socket(socket.AF_UNIX)\n\
                      try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('connect:', e.strerror); sys.exit(0)\n\
                      try:\n s.sendall(b'status\\n')\nexcept OSError: pass\nout=b''\nwhile True:\n try: d=s.recv(4096)\n except OSError: break\n if not d: break\n out+=d\n\
                      print(out.decode(), end='')\n";
        let out = Command::new("python3")
            .args(["-c", script])
            .arg(socket)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("running the client as uid 65534");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Mode 0600: the file itself keeps it out.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod the directory");
    assert_eq!(client(&socket).trim(), "connect: Permission denied");
    // Opened up by mistake: the master still asks the kernel who it is.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod the socket");
    assert_eq!(
        client(&socket),
        "error permission denied: uid 65534 is neither the master's nor root\n"
    );
}

#[test]
fn an_idle_master_with_a_control_socket_never_wakes() {
    let dir = Dir::new("idle");
    let respawn = start(&dir, 2, &["--timeout", "0"]);
    let _ = ask(&dir.socket(), "status");
    let wakeups = || {
        std::fs::read_to_string(format!("/proc/{}/status", respawn.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .expect("the master's status")
    };
    // The connection's 5 s deadline is gone once it is answered: wait for
    // the master to settle, then a window in which nothing should happen.
    let settled = Instant::now() + Duration::from_millis(200);
    while Instant::now() < settled {
        std::thread::yield_now();
    }
    let before = wakeups();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(wakeups(), before, "{}", respawn.dump());
}
