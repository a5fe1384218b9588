//! Stopping: gracefully on TERM, at once on INT, with the master's death,
//! and never a stop request lost.

use respawn_tests::*;
use std::thread;
use std::time::Duration;

/// Waits until the worker logs that it is serving `path`: the request is
/// in flight, accepted by a worker, not just waiting in the backlog.
fn wait_in_flight(respawn: &Respawn, path: &str, count: usize) {
    let needle = format!("serving GET {path}");
    assert!(
        wait_until(PATIENCE, || respawn.count_log(&needle) >= count),
        "{count} x {path} never reached a worker\n{}",
        respawn.dump()
    );
}

#[test]
fn term_lets_in_flight_requests_finish() {
    let mut respawn = Respawn::with_workers(2, &[]);
    let workers = respawn.wait_for_workers(2);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let addr = respawn.addr;
            thread::spawn(move || get(addr, "/sleep/1500"))
        })
        .collect();
    wait_in_flight(&respawn, "/sleep/1500", 2);

    respawn.signal(libc::SIGTERM);

    for client in clients {
        let answer = client.join().unwrap().expect("an in-flight request is answered");
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(answer.body.starts_with("slept 1500 ms"), "{answer:?}");
    }
    let status = respawn.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "a graceful stop exits 0\n{}",
        respawn.dump()
    );
    assert!(respawn.count_log("received SIGTERM, stopping gracefully") == 1);
    assert!(respawn.count_log("all workers stopped") == 1);
    assert!(
        respawn.count_log("replacing") == 0,
        "nothing is respawned while stopping\n{}",
        respawn.dump()
    );
    assert!(
        workers.iter().all(|&pid| !alive(pid)),
        "workers left: {workers:?}"
    );
    // A graceful stop is a clean exit for each worker too: code 0, not a
    // worker that fell out of accept() with an error (code 3).
    for pid in &workers {
        assert_eq!(
            respawn.count_lines(&format!("worker {pid} exited (code 0)")),
            1,
            "worker {pid} stopped cleanly\n{}",
            respawn.dump()
        );
    }
    assert!(port_is_free(respawn.addr), "the port is free again");
}

#[test]
fn graceful_timeout_kills_what_is_still_busy() {
    let mut respawn = Respawn::with_workers(2, &["--graceful-timeout", "0.5"]);
    let workers = respawn.wait_for_workers(2);
    let addr = respawn.addr;
    let client = std::thread::spawn(move || get(addr, "/sleep/30000"));
    wait_in_flight(&respawn, "/sleep/30000", 1);

    respawn.signal(libc::SIGQUIT);

    let busy = respawn.wait_for_log("the kill at the deadline", |l| {
        l.contains("did not stop within 0.5 s; killing it")
    });
    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", respawn.dump());
    assert_eq!(respawn.count_log("received SIGQUIT, stopping gracefully"), 1);
    let killed = worker_pid(&busy).unwrap();
    assert!(workers.contains(&killed), "{busy}");
    assert_eq!(
        respawn.count_log(&format!("worker {killed} exited (signal 9)")),
        1,
        "{}",
        respawn.dump()
    );
    assert!(workers.iter().all(|&pid| !alive(pid)));
    assert!(
        client.join().unwrap().is_err(),
        "the killed request got no answer"
    );
}

#[test]
fn int_stops_at_once_leaving_nothing() {
    let mut respawn = Respawn::with_workers(2, &[]);
    let workers = respawn.wait_for_workers(2);
    let addr = respawn.addr;
    let client = thread::spawn(move || get(addr, "/sleep/30000"));
    wait_in_flight(&respawn, "/sleep/30000", 1);

    // As a terminal does on Ctrl-C: to the whole process group.
    respawn.signal_group(libc::SIGINT);

    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", respawn.dump());
    assert_eq!(
        respawn.count_log("received SIGINT, stopping now"),
        1,
        "{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log("spawned"),
        2,
        "nothing is respawned while stopping\n{}",
        respawn.dump()
    );
    assert!(
        workers.iter().all(|&pid| !alive(pid)),
        "workers left: {workers:?}"
    );
    assert!(port_is_free(addr), "the port is free again");
    // The 30 s request was cut, not waited for.
    let answer = client.join().unwrap();
    assert!(answer.is_err(), "the sleeping request was cut: {answer:?}");
}

#[test]
fn signals_ignored_at_start_are_still_handled() {
    // A shell starts a background job (`respawn &`) with INT and QUIT
    // ignored, and an ignored signal never reaches a signalfd; an ignored
    // CHLD would even have the kernel reap the workers behind our back.
    let ignore = |command: &mut std::process::Command| {
        // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(command, || {
                for signal in [libc::SIGINT, libc::SIGQUIT, libc::SIGCHLD] {
                    libc::signal(signal, libc::SIG_IGN);
                }
                Ok(())
            });
        }
    };
    let mut respawn = Respawn::start_with(&["--workers", "2", "--min-uptime", "0"], ignore);
    let workers = respawn.wait_for_workers(2);
    let victim = *workers.iter().next().unwrap();

    send(victim, libc::SIGKILL);
    respawn.wait_for_log("the kill", |l| {
        l.ends_with(&format!("worker {victim} exited (signal 9), replacing"))
    });
    respawn.wait_for_workers(2);

    respawn.signal(libc::SIGINT);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert_eq!(respawn.count_log("received SIGINT"), 1);
}

#[test]
fn master_death_takes_workers_down() {
    let mut respawn = Respawn::with_workers(2, &[]);
    let workers = respawn.wait_for_workers(2);

    respawn.signal(libc::SIGKILL);
    respawn.wait_exit();

    // Nobody is left to supervise them: PR_SET_PDEATHSIG kills them.
    let gone = wait_until(PATIENCE, || workers.iter().all(|&pid| !alive(pid)));
    assert!(gone, "workers outlived their master: {workers:?}");
    assert!(port_is_free(respawn.addr), "no orphan holds the port");
}

/// A small deterministic generator: the "random moments" are the same on
/// every run, so a failure can be replayed.
struct Moments(u64);

impl Moments {
    fn next_micros(&mut self, max: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_micros(self.0 % max)
    }
}

#[test]
fn stop_is_never_lost() {
    // Each stop request lands at a different moment of a worker's life: as
    // it starts, as it says Ready, on its way into accept(), asleep in it.
    // A worker that missed its stop would sleep in accept() until the next
    // connection; none comes here, so it would never exit.
    // Every stop here is a worker dying without the master's say: a restart,
    // of a young worker. Neither backoff nor the limit is the subject.
    let respawn = Respawn::with_workers(
        2,
        &[
            "--graceful-timeout",
            "60",
            "--min-uptime",
            "0",
            "--max-restarts",
            "1000",
        ],
    );
    let mut moments = Moments(0x9e37_79b9_7f4a_7c15);
    let mut seen = respawn.wait_for_workers(2);
    for round in 0..40 {
        let current = respawn.workers();
        let Some(&target) = current
            .iter()
            .find(|pid| !seen.contains(pid))
            .or(current.iter().next())
        else {
            panic!("no worker to stop\n{}", respawn.dump());
        };
        seen.insert(target);
        // Not a synchronisation: the point is to hit a random moment.
        thread::sleep(moments.next_micros(3000));
        send(target, libc::SIGTERM);
        assert!(
            wait_until(PATIENCE, || !alive(target)),
            "round {round}: worker {target} did not stop\n{}",
            respawn.dump()
        );
        // Wait for the replacement to be forked, and stop it next, early.
        assert!(wait_until(PATIENCE, || respawn
            .workers()
            .iter()
            .any(|p| !seen.contains(p))));
    }
    respawn.wait_for_workers(2);

    // And the same for the master itself, stopped at random moments of its
    // start: it exits 0 leaving nothing. A TERM that lands before the master
    // has blocked its signals kills it, as it would any process; signals are
    // blocked before the first fork, so then no worker exists to be left.
    for round in 0..10 {
        let mut respawn = Respawn::start(&["--workers", "2"]);
        thread::sleep(moments.next_micros(20_000));
        respawn.signal(libc::SIGTERM);
        let status = respawn.wait_exit();
        let killed_early = std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGTERM)
            && respawn.count_log("spawned") == 0;
        assert!(
            status.code() == Some(0) || killed_early,
            "round {round}: {status}\n{}",
            respawn.dump()
        );
        assert!(
            respawn.workers().is_empty() && respawn.zombies().is_empty(),
            "round {round}"
        );
    }
}
