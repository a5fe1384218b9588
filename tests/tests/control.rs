//! Live control by signal, the conventions of the field: HUP replaces every
//! worker one at a time, TTIN and TTOU add and remove one, and signals that
//! arrive while stopping do the sensible thing.

use respawn_tests::*;
use std::net::TcpStream;
use std::thread;

#[test]
fn hup_replaces_every_worker_without_failing_a_request() {
    let respawn = Respawn::with_workers(2, &[]);
    let old = respawn.wait_for_workers(2);
    let load = Load::start(&respawn, 4);
    assert!(wait_until(PATIENCE, || respawn.count_log("serving GET /") >= 20));

    respawn.signal(libc::SIGHUP);
    respawn.wait_for_log("the end of the rolling restart", |l| {
        l.contains("rolling restart done")
    });
    let served_before_stop = respawn.count_log("serving GET /");
    assert!(wait_until(PATIENCE, || respawn.count_log("serving GET /")
        >= served_before_stop + 20));
    let (ok, failed) = load.stop();

    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}\n{}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)],
        respawn.dump()
    );
    let new = respawn.wait_for_workers(2);
    assert!(
        new.is_disjoint(&old),
        "every old worker replaced: {old:?} -> {new:?}"
    );
    assert!(old.iter().all(|&pid| !alive(pid)), "old workers gone");
    // Never fewer than N ready: an old worker is asked to stop only once a
    // new one said Ready. Replay the master's view from its whole lines:
    // who is ready, and who has been asked to stop or has exited.
    let mut ready = std::collections::BTreeSet::new();
    let mut stops = 0;
    for line in respawn.log() {
        if let Some(pid) = worker_says(&line, "ready") {
            ready.insert(pid);
        } else if let Some(pid) = message(&line)
            .strip_prefix("rolling restart: stopping worker ")
            .and_then(|rest| rest.strip_suffix(", its replacement is ready"))
        {
            let pid: i32 = pid.parse().expect("a pid");
            assert!(
                ready.len() > 2 && ready.contains(&pid),
                "worker {pid} was asked to stop with {ready:?} ready, not 2 besides it\n{}",
                respawn.dump()
            );
            ready.remove(&pid);
            stops += 1;
        } else if let Some(pid) = exited_pid(&line) {
            ready.remove(&pid);
        }
    }
    assert_eq!(stops, 2, "one stop per old worker\n{}", respawn.dump());
}

/// The pid of a `worker <pid> exited (...)` line, however it goes on.
fn exited_pid(line: &str) -> Option<i32> {
    let rest = message(line).strip_prefix("worker ")?;
    let (pid, how) = rest.split_once(' ')?;
    how.starts_with("exited (").then(|| pid.parse().ok())?
}

#[test]
fn ttin_adds_a_worker() {
    let respawn = Respawn::with_workers(2, &[]);
    let before = respawn.wait_for_workers(2);
    respawn.signal(libc::SIGTTIN);
    respawn.wait_for_log("the TTIN", |l| l.contains("received SIGTTIN, 3 workers wanted"));
    let after = respawn.wait_for_workers(3);
    assert!(
        before.is_subset(&after),
        "the old ones stay: {before:?} -> {after:?}"
    );
}

#[test]
fn ttou_removes_the_newest_down_to_zero_and_ttin_serves_again() {
    let mut respawn = Respawn::with_workers(2, &[]);
    let log = respawn.log();
    let first = log
        .iter()
        .find(|l| l.ends_with(" spawned"))
        .and_then(|l| worker_pid(l))
        .unwrap();

    respawn.signal(libc::SIGTTOU);
    respawn.wait_for_log("the first TTOU", |l| {
        l.contains("received SIGTTOU, 1 worker wanted")
    });
    let left = respawn.wait_for_workers(1);
    assert_eq!(
        left.into_iter().collect::<Vec<_>>(),
        [first],
        "the newest went, the oldest stays"
    );

    respawn.signal(libc::SIGTTOU);
    respawn.wait_for_log("the second TTOU", |l| {
        l.contains("received SIGTTOU, 0 workers wanted")
    });
    respawn.wait_for_workers(0);
    respawn.signal(libc::SIGTTOU);
    respawn.wait_for_log("a TTOU at zero", |l| l.contains("there is none to remove"));

    // At zero the master keeps the listener: a client waits in the backlog
    // and is served once TTIN brings a worker back.
    let addr = respawn.addr;
    let waiting = thread::spawn(move || get(addr, "/"));
    assert!(
        TcpStream::connect(addr).is_ok(),
        "the port still accepts connections"
    );
    respawn.signal(libc::SIGTTIN);
    let answer = waiting.join().unwrap().expect("the waiting request is served");
    assert_eq!(answer.status, 200);
    respawn.wait_for_workers(1);

    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0));
}

#[test]
fn signals_while_stopping_do_not_restart_anything() {
    let mut respawn = Respawn::with_workers(2, &[]);
    let addr = respawn.addr;
    let client = thread::spawn(move || get(addr, "/sleep/30000"));
    assert!(wait_until(PATIENCE, || respawn
        .count_log("serving GET /sleep/30000")
        == 1));

    respawn.signal(libc::SIGTERM);
    respawn.wait_for_log("the graceful stop", |l| {
        l.contains("received SIGTERM, stopping gracefully")
    });
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGTTIN] {
        respawn.signal(signal);
    }
    respawn.wait_for_log("the ignored TTIN", |l| {
        l.contains("received SIGTTIN while stopping; ignored")
    });
    assert_eq!(
        respawn.count_log("received SIGTERM while stopping; already stopping"),
        1
    );
    assert_eq!(respawn.count_log("received SIGHUP while stopping; ignored"), 1);

    // INT makes the graceful stop immediate: no waiting out the 30 s sleep.
    respawn.signal(libc::SIGINT);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert_eq!(
        respawn.count_log(" spawned"),
        2,
        "nothing was forked while stopping\n{}",
        respawn.dump()
    );
    assert!(client.join().unwrap().is_err(), "the sleeping request was cut");
}

#[test]
fn control_signals_sent_to_every_process_steer_only_the_master() {
    // `kill -- -PGID` and `systemctl kill` signal every process. Workers
    // ignore HUP, TTIN and TTOU, which would otherwise kill or stop them.
    let respawn = Respawn::with_workers(2, &[]);
    let stopped = |pids: &std::collections::BTreeSet<i32>| {
        pids.iter()
            .filter(|&&pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s[s.rfind(')').unwrap() + 2..].starts_with('T'))
            })
            .count()
    };

    respawn.signal_group(libc::SIGTTIN);
    respawn.wait_for_log("the TTIN", |l| l.contains("received SIGTTIN, 3 workers wanted"));
    let workers = respawn.wait_for_workers(3);
    assert_eq!(
        stopped(&workers),
        0,
        "no worker stopped by TTIN\n{}",
        respawn.dump()
    );

    respawn.signal_group(libc::SIGHUP);
    respawn.wait_for_log("the rolling restart", |l| l.contains("rolling restart done"));
    let workers = respawn.wait_for_workers(3);
    assert_eq!(
        respawn.count_log("exited (signal 1)"),
        0,
        "no worker killed by HUP\n{}",
        respawn.dump()
    );

    respawn.signal_group(libc::SIGTTOU);
    respawn.wait_for_log("the TTOU", |l| l.contains("received SIGTTOU, 2 workers wanted"));
    let left = respawn.wait_for_workers(2);
    assert!(left.is_subset(&workers));
    assert_eq!(stopped(&left), 0, "no worker stopped by TTOU\n{}", respawn.dump());
    assert_eq!(respawn.get("/").unwrap().status, 200);
}
