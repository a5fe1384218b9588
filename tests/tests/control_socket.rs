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

/// Like [`ask`], but whatever came back, even from a connection that
/// failed: for polling a master that may still refuse.
fn ask_lossy(socket: &Path, request: &str) -> String {
    let Ok(mut conn) = UnixStream::connect(socket) else {
        return String::new();
    };
    let _ = conn.set_read_timeout(Some(PATIENCE));
    let _ = conn.write_all(format!("{request}\n").as_bytes());
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// What the master says to a connection that sends nothing: a refusal
/// and a close, or (read up to its newline) the greeting.
fn first_words(socket: &Path) -> String {
    let mut conn = UnixStream::connect(socket).expect("connecting to the control socket");
    conn.set_read_timeout(Some(PATIENCE)).expect("a read timeout");
    let mut said = Vec::new();
    let mut byte = [0u8];
    while !said.ends_with(b"\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
        said.push(byte[0]);
    }
    String::from_utf8_lossy(&said).into_owned()
}

/// A master whose one worker never says Ready (and is never killed for
/// it): a `scale 1` sent to it waits for good.
fn start_unready(dir: &Dir) -> Respawn {
    let socket = dir.socket().display().to_string();
    let respawn = Respawn::start(&[
        "--workers",
        "1",
        "--control",
        socket.as_str(),
        "--demo-hang-start",
        "--start-timeout",
        "0",
    ]);
    assert!(
        wait_until(PATIENCE, || dir.socket().exists()),
        "{}",
        respawn.dump()
    );
    respawn
}

/// `n` connections that each sent `scale 1` and wait for its answer, once
/// the master has acted on every one.
fn hold_waiting(respawn: &Respawn, socket: &Path, n: usize) -> Vec<UnixStream> {
    let before = respawn.count_lines("control socket: scale, 1 worker wanted");
    let held: Vec<UnixStream> = (0..n)
        .map(|_| {
            let mut conn = UnixStream::connect(socket).expect("connecting");
            conn.write_all(b"scale 1\n").expect("sending scale 1");
            conn
        })
        .collect();
    assert!(
        wait_until(PATIENCE, || respawn
            .count_lines("control socket: scale, 1 worker wanted")
            == before + n),
        "{}",
        respawn.dump()
    );
    held
}

/// How many fds the master holds open.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
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
    // A client that shuts down its sending side once its request is out
    // (as socat and `nc -N` do) has not left: it still gets its answer.
    let mut conn = UnixStream::connect(dir.socket()).expect("connecting");
    conn.set_read_timeout(Some(PATIENCE)).expect("a read timeout");
    conn.write_all(b"scale 1\n").expect("sending");
    conn.shutdown(std::net::Shutdown::Write)
        .expect("shutting down the sending side");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("reading the answer");
    assert_eq!(ok(&answer), "{\"target\":1,\"ready\":1}\n");
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
    // A well-behaved client is answered at once, on its first try: the
    // held connections do not lock the operator out (the one idle the
    // longest makes room, and the master goes on accepting).
    let body = ok(&ask(&socket, "status")).to_owned();
    assert!(body.starts_with("{\"protocol\":1,"), "{body}");
    // Meanwhile a crash storm loses no request but its own, and a
    // well-behaved client still gets its answer.
    let load = Load::start(&respawn, 2);
    for _ in 0..20 {
        assert_eq!(respawn.get("/crash").map(|a| a.status).ok(), Some(500));
    }
    let (served, failed) = load.stop();
    assert!(served > 0);
    assert_eq!(failed, Vec::<String>::new(), "{}", respawn.dump());
    // Asked while every hostile connection is still held: they cannot lock
    // the operator out (the oldest idle one makes room).
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
    drop(held);
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
    const TEST: &str = "a_peer_of_another_uid_is_refused";
    if !require(TEST, Need::Python) || !require(TEST, Need::Root) {
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
    // the master to settle (it has slept through 100 ms: on a busy host it
    // may still be finishing the answer's turn well after the client read
    // it), then a window in which nothing should happen.
    let mut before = wakeups();
    let settled = wait_until(PATIENCE, || {
        std::thread::sleep(Duration::from_millis(100));
        let now = wakeups();
        std::mem::replace(&mut before, now) == now
    });
    assert!(settled, "the master never slept 100 ms\n{}", respawn.dump());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(wakeups(), before, "{}", respawn.dump());
}

#[test]
fn peers_that_hang_up_while_waiting_free_their_connections() {
    let dir = Dir::new("hangup");
    let respawn = start_unready(&dir);
    let socket = dir.socket();
    let waiting = hold_waiting(&respawn, &socket, 64);
    // Every connection waits for a command: none to make room with.
    assert_eq!(
        first_words(&socket),
        "error busy: 64 control connections are open, each waiting for its command\n",
        "{}",
        respawn.dump()
    );
    let with_them = open_fds(respawn.pid);
    // As 64 `timeout 0.5 respawn ctl P scale 1` leave them.
    drop(waiting);
    let mut answer = String::new();
    assert!(
        wait_until(PATIENCE, || {
            answer = ask_lossy(&socket, "status");
            answer.starts_with("respawn-control 1\nok\n{\"protocol\":1,")
        }),
        "{answer:?}\n{}",
        respawn.dump()
    );
    assert!(
        wait_until(PATIENCE, || open_fds(respawn.pid) <= with_them - 64),
        "{} fds open, {with_them} with the 64 connections\n{}",
        open_fds(respawn.pid),
        respawn.dump()
    );
    // The lines may come after the fds are closed: through the log's pipe,
    // read by the harness's thread.
    let left = "control socket: a peer left before its answer to scale 1; dropped";
    wait_until(PATIENCE, || respawn.count_lines(left) >= 64);
    assert_eq!(respawn.count_lines(left), 64, "{}", respawn.dump());
}

#[test]
fn at_the_limit_the_oldest_idle_connection_makes_room() {
    let dir = Dir::new("room");
    let respawn = start(&dir, 1, &[]);
    let socket = dir.socket();
    // 64 greeted, each in turn (so in this order), none saying anything.
    let mut idle: Vec<UnixStream> = (0..64)
        .map(|_| {
            let mut conn = UnixStream::connect(&socket).expect("connecting");
            conn.set_read_timeout(Some(PATIENCE)).expect("a timeout");
            let mut greeting = [0u8; 18];
            conn.read_exact(&mut greeting).expect("the greeting");
            assert_eq!(&greeting, b"respawn-control 1\n");
            conn
        })
        .collect();
    let body = ok(&ask(&socket, "status")).to_owned();
    assert!(body.starts_with("{\"protocol\":1,"), "{body}");
    let mut oldest = String::new();
    idle[0]
        .read_to_string(&mut oldest)
        .expect("the oldest's last words");
    assert_eq!(
        oldest,
        "error closed to make room: 64 control connections were open, this one idle the longest\n"
    );
    idle[1].set_nonblocking(true).expect("non-blocking");
    let next = idle[1].read(&mut [0u8; 64]).map_err(|err| err.kind());
    assert_eq!(
        next,
        Err(std::io::ErrorKind::WouldBlock),
        "the next oldest is still open"
    );
    respawn.wait_for_line(
        "control socket: 64 connections are open; closing the one idle the longest to make room",
    );
}

#[test]
fn refusals_are_logged_once_a_second_with_the_count_held_back() {
    let dir = Dir::new("flood");
    let respawn = start_unready(&dir);
    let socket = dir.socket();
    let _waiting = hold_waiting(&respawn, &socket, 64);
    let busy = |l: &str| message(l).starts_with("control socket: busy: ");
    let held_back = |l: &str| -> Option<usize> {
        let (_, count) = l.rsplit_once(" (")?;
        count.strip_suffix(" more since the last line)")?.parse().ok()
    };
    // Refused as fast as one thread reconnects, until a line says how many
    // went unsaid: a second at least.
    let started = Instant::now();
    let mut refused = 0;
    let said = wait_until(PATIENCE, || {
        for _ in 0..50 {
            if first_words(&socket).starts_with("error busy: ") {
                refused += 1;
            }
        }
        respawn.log().iter().any(|l| busy(l) && held_back(l).is_some())
    });
    let elapsed = started.elapsed();
    let lines: Vec<String> = respawn.log().into_iter().filter(|l| busy(l)).collect();
    assert!(said, "{refused} refusals, {} lines: {lines:#?}", lines.len());
    assert!(
        lines.len() as u64 <= elapsed.as_secs() + 2,
        "{} lines in {elapsed:?} for {refused} refusals",
        lines.len()
    );
    let told: usize = lines.iter().map(|l| 1 + held_back(l).unwrap_or(0)).sum();
    assert!(
        lines.len() < told && told <= refused,
        "{told} told of {refused} refusals: {lines:#?}"
    );
}

#[test]
fn a_request_sent_whole_is_carried_out_though_its_client_left() {
    let dir = Dir::new("left");
    let respawn = start(&dir, 1, &[]);
    let socket = dir.socket();
    let before = open_fds(respawn.pid);
    // Each sends its request and closes at once, its greeting unread.
    for request in std::iter::repeat_n("reload\n", 30).chain(["scale 2\n"]) {
        let mut conn = UnixStream::connect(&socket).expect("connecting");
        conn.write_all(request.as_bytes()).expect("sending");
    }
    let reloads = || {
        respawn
            .log()
            .iter()
            .filter(|l| message(l).starts_with("control socket: reload"))
            .count()
    };
    assert!(
        wait_until(PATIENCE, || reloads() == 30),
        "{} of 30 reloads acted on\n{}",
        reloads(),
        respawn.dump()
    );
    respawn.wait_for_line("control socket: scale, 2 workers wanted");
    assert_eq!(field(ok(&ask(&socket, "status")), "target"), Some(2));
    respawn.wait_for_workers(2);
    assert!(
        wait_until(PATIENCE, || open_fds(respawn.pid) == before + 1),
        "{} fds open, {before} before and one more worker's pipe\n{}",
        open_fds(respawn.pid),
        respawn.dump()
    );
}

#[test]
fn the_socket_is_made_0600_and_the_masters_umask_is_left_as_it_was() {
    let dir = Dir::new("mode");
    let socket = dir.socket().display().to_string();
    let respawn = Respawn::start_with(&["--workers", "1", "--control", &socket], |command| {
        // SAFETY: umask(2) cannot fail and is async-signal-safe; it sets
        // the child's mask alone, between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0o002);
                Ok(())
            });
        }
    });
    respawn.wait_for_workers(1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.socket())
        .expect("the socket file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o600, "{mode:o}");
    // The 0177 the bind was made under is not left behind for the files
    // the master makes later (a pid file, the listeners' socket files).
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", respawn.pid)).expect("the master's status");
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(str::trim);
    assert_eq!(umask, Some("0002"), "{status}");
}

/// Under a low open-file limit, idle connections held every fd the master
/// had: the replacement of a killed worker found none for its pipe until
/// they timed out, and the accept that failed for lack of fds was never
/// tried again (a full backlog lets no new connection wake the master), so
/// the socket stayed deaf. Connections are held to what the limit leaves
/// beside the pipes of every worker that may live.
#[test]
fn connections_never_take_the_fds_a_replacement_needs() {
    let dir = Dir::new("nofile");
    let socket = dir.socket();
    let respawn = start_with_open_files(&dir, 2, 40);
    let before = respawn.wait_for_workers(2);
    // Five times the limit, each greeted, refused or waiting in the
    // backlog, held.
    let held = hold_idle(&respawn, &socket, 200);
    let victim = *before.iter().next().expect("a worker");
    send(victim, libc::SIGKILL);
    respawn.wait_for_log("the victim's exit", |l| {
        message(l).starts_with(&format!("worker {victim} exited (signal 9)"))
    });
    let after = respawn.wait_for_workers(2);
    assert!(!after.contains(&victim), "{}", respawn.dump());
    assert_eq!(
        respawn.count_log("starting a worker in slot"),
        0,
        "the replacement found no fd\n{}",
        respawn.dump()
    );
    // The idle one of the longest makes room for a new connection.
    let body = ok(&ask(&socket, "status")).to_owned();
    assert!(body.starts_with("{\"protocol\":1,"), "{body}");
    respawn.wait_for_log("the reason connections were closed", |l| {
        message(l).contains(
            "connections are open, as many as the open-file limit leaves beside the workers' pipes; \
             closing the one idle the longest to make room",
        )
    });
    drop(held);
}

/// A client that connects as fast as it can (two threads here) kept the
/// master accepting, turn after turn of nothing else: a worker killed
/// meanwhile was replaced only once the flood stopped. At most 64 are
/// accepted in a turn; the loop goes on between.
#[test]
fn a_flood_of_connections_never_holds_up_a_replacement() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = Dir::new("flood-turns");
    let respawn = start(&dir, 2, &[]);
    let socket = dir.socket();
    /// Ends the flood however the test ends, a failed wait included.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Stop(Arc::clone(&stop));
    let floods: Vec<_> = (0..2)
        .map(|_| {
            let (socket, stop) = (socket.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut held = std::collections::VecDeque::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(conn) = UnixStream::connect(&socket) {
                        held.push_back(conn);
                    }
                    if held.len() > 200 {
                        held.pop_front();
                    }
                }
            })
        })
        .collect();
    respawn.wait_for_log("the flood", |l| {
        let said = message(l);
        said.contains("connections are open; closing the one idle the longest to make room")
            || said.starts_with("control socket: busy: ")
    });
    let victim = *respawn.workers().iter().next().expect("a worker");
    send(victim, libc::SIGKILL);
    let replaced = wait_until(PATIENCE, || {
        respawn
            .log()
            .iter()
            .any(|l| message(l).starts_with(&format!("worker {victim} exited (signal 9)")))
    });
    // And the operator is answered meanwhile: `respawn ctl status` sends
    // its request at once, and a request sent whole is never closed to
    // make room for an idle connection.
    let status = Command::new(binary())
        .args(["ctl", &socket.display().to_string(), "status"])
        .output()
        .expect("running respawn ctl");
    drop(stopping);
    floods.into_iter().for_each(|t| t.join().expect("a flood"));
    assert!(replaced, "not while the flood went on\n{}", respawn.dump());
    assert_eq!(
        status.status.code(),
        Some(0),
        "ctl status during the flood: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    respawn.wait_for_workers(2);
}

/// Two workers and a control socket under an open-file limit of `limit`.
fn start_with_open_files(dir: &Dir, workers: usize, limit: u64) -> Respawn {
    let shown = dir.socket().display().to_string();
    let n = workers.to_string();
    Respawn::start_with(&["--workers", &n, "--control", &shown], |command| {
        with_limit(command, libc::RLIMIT_NOFILE, limit)
    })
}

/// Under a low open-file limit, a `scale` up takes the fds of the idle
/// connections at once (they waited for their 5 s deadline, and every fork
/// meanwhile failed), and leaves a few for the control socket: a scale to
/// the most allowed had taken the last one, and nothing, not even the
/// scale back down, could connect again.
#[test]
fn a_scale_up_takes_idle_connections_fds_and_leaves_the_way_back_down() {
    let dir = Dir::new("nofile-scale");
    let socket = dir.socket();
    let respawn = start_with_open_files(&dir, 2, 40);
    respawn.wait_for_workers(2);
    let refusal = ask(&socket, "scale 4096");
    let most: usize = refusal
        .split("more than the ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the most allowed: {refusal:?}"));
    assert!(most > 2, "{refusal}");
    // Idle connections, each greeted, holding what fds they can.
    let idle = hold_idle(&respawn, &socket, 30);
    // As `respawn ctl` asks: again while busy (the idle connections may
    // all be younger than 0.1 s, and this one may not have spoken when it
    // is accepted).
    let scaled = Command::new(binary())
        .args(["ctl", &socket.display().to_string(), "scale", &most.to_string()])
        .output()
        .expect("running respawn ctl");
    assert_eq!(
        scaled.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&scaled.stderr),
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log("starting a worker in slot"),
        0,
        "a fork found no fd\n{}",
        respawn.dump()
    );
    drop(idle);
    let status = ask(&socket, "status");
    assert!(ok(&status).starts_with("{\"protocol\":1,"), "{status}");
    let down = ask(&socket, "scale 2");
    assert_eq!(ok(&down), "{\"target\":2,\"ready\":2}\n");
}

/// `n` connections that never speak, held, once the master (under an
/// open-file limit of 40) holds 30 fds or more with them.
fn hold_idle(respawn: &Respawn, socket: &Path, n: usize) -> Vec<UnixStream> {
    let held = (0..n)
        .map(|_| UnixStream::connect(socket).expect("connecting"))
        .collect();
    assert!(
        wait_until(PATIENCE, || open_fds(respawn.pid) >= 30),
        "the master took {} fds\n{}",
        open_fds(respawn.pid),
        respawn.dump()
    );
    held
}
