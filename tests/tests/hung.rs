//! Hung workers: found on the shared-memory scoreboard, described, killed
//! and replaced, while the others go on serving; and an idle master that
//! does not wake when there is nothing to watch.

use respawn_tests::*;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn hung_worker_is_killed_and_replaced() {
    let respawn = Respawn::with_workers(2, &["--timeout", "1"]);
    let before = respawn.wait_for_workers(2);

    let addr = respawn.addr;
    let started = Instant::now();
    let hanging = thread::spawn(move || get(addr, "/hang"));
    assert!(wait_until(PATIENCE, || respawn.count_log("serving GET /hang") == 1));
    // The other worker serves on meanwhile.
    let mut answers = 0;
    while respawn.count_log(" hung ") == 0 && started.elapsed() < PATIENCE {
        let answer = respawn.get("/").expect("the other worker answers");
        assert_eq!(answer.status, 200);
        answers += 1;
    }
    let line = respawn.wait_for_log("the hung worker", |l| l.contains(" hung "));
    let hung = worker_pid(&line).unwrap();
    assert!(before.contains(&hung));
    assert!(
        line.contains(" on GET /hang HTTP/1.1 from 127.0.0.1:"),
        "what hung and for whom: {line}"
    );
    assert!(
        line.contains("(running, ") && line.ends_with("% CPU); killing it"),
        "{line}"
    );
    assert!(answers > 0);

    assert!(
        hanging.join().unwrap().is_err(),
        "the hung request is cut, not answered"
    );
    respawn.wait_for_log("its exit", |l| {
        l.contains(&format!("worker {hung} exited (signal 9)"))
    });
    let after = respawn.wait_for_workers(2);
    assert!(!after.contains(&hung));
    eprintln!("hang to replacement ready: {:?}", started.elapsed());
}

/// Voluntary context switches: how often a sleeping process was woken.
fn wakeups(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[test]
fn idle_master_never_wakes_without_timeout() {
    let respawn = Respawn::with_workers(2, &["--timeout", "0"]);
    respawn.wait_for_workers(2);
    let before = wakeups(respawn.pid);
    // A window to observe, not a synchronisation: nothing should happen in it.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        wakeups(respawn.pid),
        before,
        "with no deadline, poll never times out\n{}",
        respawn.dump()
    );
}
