//! Hung workers: found on the shared-memory scoreboard, described, killed
//! and replaced, while the others go on serving; and an idle master that
//! does not wake when there is nothing to watch.

use respawn_tests::*;
use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn hung_worker_is_killed_and_replaced() {
    let respawn = Respawn::with_workers(2, &["--timeout", "1"]);
    let before = respawn.wait_for_workers(2);
    let started = Instant::now();
    let (line, samples) = hang(&respawn, &before, 1);
    let Some(Hung {
        pid: hung,
        seconds,
        cpu,
    }) = parse_hung(&line)
    else {
        panic!("not a whole hung line: {line}");
    };
    assert!(before.contains(&hung), "{line}");
    assert!(seconds >= 1.0, "hung for at least the timeout: {line}");
    respawn.wait_for_log("its exit", |l| {
        l.contains(&format!("worker {hung} exited (signal 9)"))
    });
    let mut workers = respawn.wait_for_workers(2);
    assert!(!workers.contains(&hung));
    eprintln!("hang to replacement ready: {:?}", started.elapsed());

    // The master sampled the worker at half the timeout and measured its
    // share of a CPU until the kill: it must be what /proc says of the
    // same stretch. Not a fixed floor: a spinning worker on a busy host
    // may get a tenth of a core, and then that is what the line must say.
    // A wrong figure only shows when the worker got a fair share, so on a
    // busy host the judgement waits for a hang that did (a few at most).
    let (mut line, mut cpu, mut seen) = (line, cpu, share(&samples, hung, HALF));
    for round in 2..=6 {
        if seen.is_none_or(|seen| seen >= 30.0) {
            break;
        }
        let samples;
        (line, samples) = hang(&respawn, &workers, round);
        let Some(again) = parse_hung(&line) else {
            panic!("not a whole hung line: {line}");
        };
        (cpu, seen) = (again.cpu, share(&samples, again.pid, HALF));
        workers = respawn.wait_for_workers(2);
    }
    assert!(
        seen.is_some_and(|seen| (f64::from(cpu) - seen).abs() <= 20.0),
        "the line says {cpu}% CPU, /proc said {seen:?} over its last half second: {line}"
    );
    eprintln!("{line}; /proc said {seen:.0?}%");
}

/// Half the timeout of the test above: how long the master measures.
const HALF: Duration = Duration::from_millis(500);

/// Sends `GET /hang` (the `nth` one of the test) and waits for the master
/// to kill the worker that took it, checking on the way that the others
/// serve on and that the hung request is cut. Returns the hung line, and
/// samples of the workers' CPU time (pid, when, ticks) up to the kill.
fn hang(respawn: &Respawn, workers: &BTreeSet<i32>, nth: usize) -> (String, Vec<(i32, Instant, u64)>) {
    let addr = respawn.addr;
    let hanging = thread::spawn(move || get_raw(addr, "/hang"));
    assert!(wait_until(PATIENCE, || respawn.count_log("serving GET /hang") == nth));
    let mut answers = 0;
    let mut samples = Vec::new();
    let started = Instant::now();
    while respawn.count_log(" hung ") < nth && started.elapsed() < PATIENCE {
        for &worker in workers {
            if let Some(ticks) = cpu_ticks(worker) {
                samples.push((worker, Instant::now(), ticks));
            }
        }
        let answer = respawn.get("/").expect("another worker answers");
        assert_eq!(answer.status, 200);
        answers += 1;
    }
    assert!(answers > 0, "another worker served meanwhile");
    let hung: Vec<String> = respawn
        .log()
        .into_iter()
        .filter(|l| l.contains(" hung "))
        .collect();
    let Some(line) = hung.get(nth - 1) else {
        panic!("no hung line for GET /hang number {nth}\n{}", respawn.dump());
    };
    // Killed with SIGKILL, the worker answers nothing: its client sees the
    // connection closed at once, not a wait that runs out.
    let cut = hanging.join().unwrap();
    assert!(
        cut_without_an_answer(&cut),
        "the hung request is cut without an answer, not {cut:?}\n{}",
        respawn.dump()
    );
    (line.clone(), samples)
}

/// What a whole hung line says.
struct Hung {
    pid: i32,
    seconds: f64,
    cpu: u32,
}

/// `worker <pid> hung <s> s on GET /hang HTTP/1.1 from 127.0.0.1:<port>
/// (running, <n>% CPU); killing it`, and nothing else.
fn parse_hung(line: &str) -> Option<Hung> {
    let rest = message(line).strip_prefix("worker ")?;
    let (pid, rest) = rest.split_once(" hung ")?;
    let (seconds, rest) = rest.split_once(" s on GET /hang HTTP/1.1 from 127.0.0.1:")?;
    let (port, rest) = rest.split_once(" (running, ")?;
    let cpu = rest.strip_suffix("% CPU); killing it")?;
    port.parse::<u16>().ok()?;
    Some(Hung {
        pid: pid.parse().ok()?,
        seconds: seconds.parse().ok()?,
        cpu: cpu.parse().ok()?,
    })
}

/// A process's CPU time so far (user + system, in clock ticks).
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ').skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// `pid`'s share of one CPU, in percent, over the last `window` of the
/// samples taken of it.
fn share(samples: &[(i32, Instant, u64)], pid: i32, window: Duration) -> Option<f64> {
    let own: Vec<(Instant, u64)> = samples
        .iter()
        .filter(|s| s.0 == pid)
        .map(|s| (s.1, s.2))
        .collect();
    let &(end, end_ticks) = own.last()?;
    let &(start, start_ticks) = own.iter().rev().find(|s| end - s.0 >= window)?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (end_ticks - start_ticks) as f64 / per_second;
    Some(100.0 * cpu / (end - start).as_secs_f64())
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
    // The start's own deadlines come first: the look for strays 5 ms after
    // each Ready (strays.rs). Once the master has slept through 100 ms, it
    // has none left.
    let mut before = wakeups(respawn.pid);
    let settled = wait_until(PATIENCE, || {
        thread::sleep(Duration::from_millis(100));
        let now = wakeups(respawn.pid);
        std::mem::replace(&mut before, now) == now
    });
    assert!(settled, "the master never slept 100 ms\n{}", respawn.dump());
    // A window to observe, not a synchronisation: nothing should happen in it.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        wakeups(respawn.pid),
        before,
        "with no deadline, poll never times out\n{}",
        respawn.dump()
    );
}

#[test]
fn idle_workers_are_never_killed_with_a_timeout() {
    let respawn = Respawn::with_workers(2, &["--timeout", "1"]);
    let workers = respawn.wait_for_workers(2);
    // Two slow requests at once: each worker is busy once, then idle again.
    // (Shorter than --timeout, so a pair may be served by one worker on a
    // busy host, one request after the other: then another pair.)
    let mut served_by = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let addr = respawn.addr;
                thread::spawn(move || get(addr, "/sleep/200"))
            })
            .collect();
        for client in clients {
            let answer = client.join().unwrap().expect("GET /sleep/200");
            served_by.insert(answer.pid().expect("a pid in the body"));
        }
        if served_by == workers {
            break;
        }
    }
    assert_eq!(served_by, workers, "both workers served\n{}", respawn.dump());

    // A window to observe, not a synchronisation: three timeouts in which
    // idle workers must be left alone.
    thread::sleep(Duration::from_millis(3000));
    assert_eq!(
        respawn.workers(),
        workers,
        "the same workers, alive\n{}",
        respawn.dump()
    );
    assert_eq!(respawn.count_log(" hung "), 0, "{}", respawn.dump());
    assert_eq!(respawn.count_log(" spawned"), 2, "{}", respawn.dump());
    assert_eq!(respawn.get("/").expect("GET /").status, 200);
}
