//! `--ready-on-notify`: workers that speak systemd's readiness protocol
//! (sd_notify) rather than respawn's channel. Each worker is given a
//! NOTIFY_SOCKET of its own; `READY=1` there is its Ready, `STATUS=` shows
//! in `status`, and `WATCHDOG=1` with `--timeout` keeps it from being
//! killed as hung. The worker here is what a real deployment runs: a shell
//! script that calls `systemd-notify --ready`, then executes a server that
//! takes its listener from LISTEN_FDS (fd 3).

use respawn_tests::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A server on fd 3: each connection gets `served by <pid>`. On SIGTERM
/// it finishes the connection it holds and exits, as real servers do: it
/// waits in select on the listener and a pipe the signal writes to, so a
/// stop never lands between an accept and its answer.
const SERVER: &str = r#"
import os, select, signal, socket
listener = socket.socket(fileno=3)
listener.setblocking(False)  # every worker waits in select, then takes one
stop_r, stop_w = os.pipe()
os.set_blocking(stop_w, False)
signal.set_wakeup_fd(stop_w)
signal.signal(signal.SIGTERM, lambda *_: None)
while True:
    ready, _, _ = select.select([listener, stop_r], [], [])
    if stop_r in ready:
        break
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        continue
    conn.setblocking(True)
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            more = conn.recv(4096)
            if not more:
                break
            head += more
        body = ("served by %d\n" % os.getpid()).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
"#;

/// The worker: a start that takes a while, READY=1 (and a STATUS=), then
/// the server, in the same process.
fn worker_script(dir: &Path, before_ready: &str) -> PathBuf {
    let server = dir.join("server.py");
    std::fs::write(&server, SERVER).expect("writing the server");
    let script = dir.join("worker.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nsleep 0.3\n{before_ready}\nsystemd-notify --ready --status=\"serving on fd 3\"\nexec python3 {}\n",
            server.display()
        ),
    )
    .expect("writing the worker");
    script
}

fn have_systemd_notify(test: &str) -> bool {
    if !require(test, Need::Python) {
        return false;
    }
    let found = std::process::Command::new("systemd-notify")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip(
            test,
            Skip::Environment,
            "systemd-notify is not installed (apt-get install systemd)",
        );
    }
    found
}

fn status(socket: &Path) -> Value {
    let output = std::process::Command::new(binary())
        .args(["ctl", &socket.display().to_string(), "status", "--json"])
        .output()
        .expect("respawn ctl status --json");
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

#[test]
fn ready_on_notify_counts_a_worker_ready_when_it_says_so_and_a_hup_waits_for_it() {
    const TEST: &str = "ready_on_notify_counts_a_worker_ready_when_it_says_so_and_a_hup_waits_for_it";
    if !have_systemd_notify(TEST) {
        return;
    }
    let dir = TempDir::new("respawn-ready-on-notify");
    let script = worker_script(&dir, "");
    let control = dir.join("control.sock");
    let respawn = Respawn::start(&[
        "--workers",
        "2",
        "--control",
        &control.display().to_string(),
        "--ready-on-notify",
        "--",
        "/bin/sh",
        &script.display().to_string(),
    ]);
    let ready = wait_until(PATIENCE, || respawn.count_log(" ready") >= 2);
    assert!(ready, "{}", respawn.dump());
    let old = respawn.wait_for_workers(2);
    let answer = respawn.get("/").expect("GET /");
    assert!(answer.body.starts_with("served by "), "{answer:?}");
    let shows = wait_until(PATIENCE, || {
        status(&control)["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["notify_status"] == "serving on fd 3"))
    });
    assert!(shows, "status: {}", status(&control));

    // A HUP under load: each old worker stops only once a new one said
    // READY=1, so no request fails, and the rollout is done only then.
    let done = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (addr, done, answered, failed) =
                (respawn.addr, done.clone(), answered.clone(), failed.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    match get(addr, "/") {
                        Ok(a) if a.status == 200 => {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        other => failed.lock().unwrap().push(format!("{other:?}")),
                    }
                }
            })
        })
        .collect();
    respawn.signal(libc::SIGHUP);
    respawn.wait_for_line("rolling restart done: every worker is new");
    let goal = answered.load(Ordering::SeqCst) + 20;
    assert!(wait_until(PATIENCE, || answered.load(Ordering::SeqCst) >= goal));
    done.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().expect("a client");
    }
    assert_eq!(
        failed.lock().unwrap().clone(),
        Vec::<String>::new(),
        "{}",
        respawn.dump()
    );
    let log = respawn.log();
    let done_at = position(&log, |l| says(l, "rolling restart done: every worker is new")).expect("done");
    let new = respawn.wait_for_workers(2);
    assert!(new.is_disjoint(&old));
    for pid in &new {
        let ready_at = position(&log, |l| says(l, &format!("worker {pid} ready")));
        assert!(
            ready_at.is_some_and(|at| at < done_at),
            "worker {pid}'s READY=1 came after the rollout was said done\n{}",
            respawn.dump()
        );
    }
}

#[test]
fn a_worker_that_stops_pinging_the_watchdog_is_killed_as_hung() {
    const TEST: &str = "a_worker_that_stops_pinging_the_watchdog_is_killed_as_hung";
    if !have_systemd_notify(TEST) {
        return;
    }
    let dir = TempDir::new("respawn-notify-watchdog");
    // One ping, and the WATCHDOG_USEC it was given said: then silence.
    let script = worker_script(
        &dir,
        "systemd-notify WATCHDOG=1 \"STATUS=watchdog $WATCHDOG_USEC\"",
    );
    let respawn = Respawn::start(&[
        "--workers",
        "1",
        "--timeout",
        "1",
        "--ready-on-notify",
        "--",
        "/bin/sh",
        &script.display().to_string(),
    ]);
    let first = *respawn.wait_for_workers(1).iter().next().expect("a worker");
    respawn.wait_for_line(&format!("worker {first} ready"));
    respawn.wait_for_line(&format!(
        "worker {first} sent no WATCHDOG=1 for 1 s; killing it as hung"
    ));
    let replaced = wait_until(PATIENCE, || {
        let now = respawn.workers();
        now.len() == 1 && !now.contains(&first)
    });
    assert!(replaced, "{}", respawn.dump());
}

/// A program that never says READY=1 is killed at the start deadline, and
/// one line says what it must do.
#[test]
fn a_program_that_never_notifies_is_said_what_to_do() {
    const TEST: &str = "a_program_that_never_notifies_is_said_what_to_do";
    if !require(TEST, Need::Python) {
        return;
    }
    let respawn = Respawn::start(&[
        "--workers",
        "1",
        "--start-timeout",
        "1",
        "--ready-on-notify",
        "--",
        "python3",
        "-c",
        "import time; time.sleep(60)",
    ]);
    respawn.wait_for_log("the advice", |l| {
        message(l).starts_with("a program run with --ready-on-notify must send READY=1")
    });
}
