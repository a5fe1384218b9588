//! The promise of respawn: exactly N workers, whatever happens to them, and
//! no request lost to a crash but the one that caused it.

use respawn_tests::*;
use std::thread;

#[test]
fn serves_from_n_workers() {
    let respawn = Respawn::with_workers(3, &[]);
    let workers = respawn.wait_for_workers(3);

    // A worker serves one connection at a time, so three slow requests at
    // once must be served by three different workers. Slow enough that a
    // worker the host keeps off the CPU for a moment (a client thread
    // started late, a woken worker not yet run) does not let the first
    // worker finish and take a second one.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let addr = respawn.addr;
            thread::spawn(move || get(addr, "/sleep/2000"))
        })
        .collect();
    let mut served_by = std::collections::BTreeSet::new();
    for client in clients {
        let answer = client.join().unwrap().expect("GET /sleep/2000");
        assert_eq!(answer.status, 200, "{answer:?}");
        served_by.insert(answer.pid().expect("a pid in the body"));
    }
    assert_eq!(
        served_by,
        workers,
        "each worker serves one of the three\n{}",
        respawn.dump()
    );

    let answer = respawn.get("/").expect("GET /");
    assert_eq!(answer.status, 200);
    assert!(answer.body.starts_with("handle by child "), "{answer:?}");
    assert!(
        workers.contains(&answer.pid().unwrap()),
        "{answer:?} from a worker of {workers:?}"
    );
}

#[test]
fn kill_9_worker_is_replaced() {
    // --min-uptime 0: the victim is young, and this is not about backoff.
    let respawn = Respawn::with_workers(2, &["--min-uptime", "0"]);
    let before = respawn.wait_for_workers(2);
    let victim = *before.iter().next().unwrap();

    send(victim, libc::SIGKILL);

    respawn.wait_for_log("the kill", |l| {
        l.ends_with(&format!("worker {victim} exited (signal 9), replacing"))
    });
    let after = respawn.wait_for_workers(2);
    assert!(!after.contains(&victim), "{victim} still counted in {after:?}");
    assert_eq!(
        before.intersection(&after).count(),
        1,
        "only the victim was replaced"
    );
    let answer = respawn.get("/").expect("GET / after the kill");
    assert_eq!(answer.status, 200);
    assert_eq!(
        respawn.count_log(" spawned"),
        3,
        "one replacement\n{}",
        respawn.dump()
    );
}

#[test]
fn panic_answers_500_and_replacement_comes_before_exit() {
    let respawn = Respawn::with_workers(2, &[]);
    respawn.wait_for_workers(2);

    let answer = respawn.get("/crash").expect("GET /crash must be answered");
    assert_eq!(answer.status, 500, "{answer:?}");
    assert!(answer.body.contains("panicked: crash requested"), "{answer:?}");
    let crashed = worker_pid(&answer.body).expect("the crashed worker's pid in the body");

    respawn.wait_for_log("the crashed worker's exit", |l| {
        l.contains(&format!("worker {crashed} exited"))
    });
    let log = respawn.log();
    let panicked = position(&log, |l| l.contains(&format!("worker {crashed} panicked at")));
    let suicide = position(&log, |l| {
        l.contains(&format!("worker {crashed} sent suicide (panicked: crash"))
    });
    let exited = position(&log, |l| l.contains(&format!("worker {crashed} exited")));
    let (Some(panicked), Some(suicide), Some(exited)) = (panicked, suicide, exited) else {
        panic!("missing panic, suicide or exit of {crashed}\n{}", respawn.dump());
    };
    let replacement = log[suicide..]
        .iter()
        .position(|l| l.ends_with(" spawned"))
        .map(|i| i + suicide);
    // The worker sends Suicide before it logs its panic (a blocked stderr
    // must not hold up the handover), so the master's line and the worker's
    // come in either order; the order of send and log is a unit test in
    // respawn-worker (a_panic_hands_over_before_it_is_logged). Both come
    // before the exit.
    assert!(
        panicked < exited && suicide < exited,
        "the panic and the suicide are told before the exit\n{}",
        respawn.dump()
    );
    assert!(
        replacement.is_some_and(|r| r < exited),
        "the replacement is forked before the crashed worker exits\n{}",
        respawn.dump()
    );
    let workers = respawn.wait_for_workers(2);
    assert!(!workers.contains(&crashed));
}

#[test]
fn crash_storm_keeps_exactly_n() {
    const CRASHES: usize = 30;
    let respawn = Respawn::with_workers(2, &[]);
    respawn.wait_for_workers(2);

    for i in 0..CRASHES {
        let answer = respawn
            .get("/crash")
            .unwrap_or_else(|err| panic!("crash {i}: {err}\n{}", respawn.dump()));
        assert_eq!(answer.status, 500, "crash {i}: {answer:?}");
    }

    respawn.wait_for_workers(2);
    // Every crashed worker exited with the panic's code and said why; each
    // counted once, by whole lines.
    let crashed = || {
        respawn
            .log()
            .iter()
            .filter_map(|l| worker_says(l, "exited (code 70: panicked: crash requested by GET /crash)"))
            .collect::<std::collections::BTreeSet<i32>>()
    };
    assert!(
        wait_until(PATIENCE, || crashed().len() >= CRASHES),
        "{} of {CRASHES} crashed workers exited with code 70\n{}",
        crashed().len(),
        respawn.dump()
    );
    assert_eq!(crashed().len(), CRASHES, "{}", respawn.dump());
    // The article's master replaced a worker on its suicide *and* on its
    // exit: 2 + 2 x 30 forks, and a pool that grows with every crash.
    assert_eq!(
        respawn.count_log(" spawned"),
        2 + CRASHES,
        "one fork per crash, no more\n{}",
        respawn.dump()
    );
    assert!(respawn.zombies().is_empty(), "zombies: {:?}", respawn.zombies());
    assert_eq!(respawn.workers().len(), 2);
}

#[test]
fn crash_storm_loses_no_request() {
    const CLIENTS: usize = 4;
    const CRASHES: usize = 30;
    let respawn = Respawn::with_workers(2, &[]);
    respawn.wait_for_workers(2);

    let load = Load::start(&respawn, CLIENTS);
    let mut crash_answers = Vec::new();
    for _ in 0..CRASHES {
        crash_answers.push(get(respawn.addr, "/crash").map(|a| a.status));
    }
    let (ok, failed) = load.stop();
    assert!(
        failed.is_empty(),
        "{} of {} requests to / failed: {:?}\n{}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)],
        respawn.dump()
    );
    assert!(ok >= CLIENTS, "the clients got answers ({ok})");
    assert!(
        crash_answers.iter().all(|a| matches!(a, Ok(500))),
        "every /crash is answered 500: {crash_answers:?}"
    );
    respawn.wait_for_workers(2);
}

/// The pipes a process holds: (fd, pipe inode, whether it is the write end).
fn pipes(pid: i32) -> Vec<(i32, u64, bool)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|err| panic!("listing /proc/{pid}/fd: {err}"));
    fds.filter_map(|entry| {
        let entry = entry.ok()?;
        let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
        let target = std::fs::read_link(entry.path()).ok()?;
        let inode = target
            .to_str()?
            .strip_prefix("pipe:[")?
            .strip_suffix(']')?
            .parse()
            .ok()?;
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?.trim();
        let flags = u32::from_str_radix(flags, 8).ok()?;
        Some((fd, inode, flags & libc::O_ACCMODE as u32 == libc::O_WRONLY as u32))
    })
    .collect()
}

/// The /proc path of `worker`'s end of its pipe to `master`: the pipe the
/// worker writes and the master reads. A pipe inherited from whoever
/// started the test (cargo's jobserver, say) is held by the master and the
/// worker as well, but by this process too, so it is left out; and the
/// answer must be unique, or the test would pick one at random.
fn pipe_to_master(worker: i32, master: i32) -> std::path::PathBuf {
    let ours: Vec<u64> = pipes(std::process::id() as i32).iter().map(|p| p.1).collect();
    let masters = pipes(master);
    let candidates: Vec<i32> = pipes(worker)
        .into_iter()
        .filter(|&(_, inode, writes)| {
            writes
                && !ours.contains(&inode)
                && masters.iter().any(|&(_, m, m_writes)| m == inode && !m_writes)
        })
        .map(|(fd, _, _)| fd)
        .collect();
    assert_eq!(
        candidates.len(),
        1,
        "worker {worker} writes exactly one pipe that master {master} reads: {:?} / {masters:?}",
        pipes(worker)
    );
    format!("/proc/{worker}/fd/{}", candidates[0]).into()
}

#[test]
fn malformed_ipc_replaces_the_worker() {
    let respawn = Respawn::with_workers(2, &[]);
    let before = respawn.wait_for_workers(2);
    let victim = *before.iter().next().unwrap();

    // Write garbage into the victim's pipe to the master, through the pipe's
    // entry in /proc: to the master it looks as if the worker wrote it.
    let pipe = pipe_to_master(victim, respawn.pid);
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&pipe)
        .unwrap_or_else(|err| panic!("opening {}: {err}", pipe.display()));
    std::io::Write::write_all(&mut writer, b"GET / HTTP/1.1\r\n").unwrap();
    drop(writer);

    respawn.wait_for_log("the malformed message", |l| {
        l.contains(&format!(
            "worker {victim} sent malformed ipc (unknown protocol version 71"
        )) && l.ends_with("replacing it")
    });
    respawn.wait_for_log("the victim's exit", |l| {
        l.contains(&format!("worker {victim} exited"))
    });
    let after = respawn.wait_for_workers(2);
    assert!(!after.contains(&victim));
    assert_eq!(respawn.get("/").expect("still serving").status, 200);
}

#[test]
fn crash_loop_backs_off_then_gives_up() {
    // Every worker panics before Ready. Each slot waits 0.1 s, then 0.2 s,
    // ... and the sixth restart within 60 s is one too many.
    let mut respawn = Respawn::start(&[
        "--workers",
        "2",
        "--demo-fail-start",
        "--max-restarts",
        "5",
        "--restart-window",
        "60",
    ]);
    let status = respawn.wait_exit();

    assert_eq!(
        status.code(),
        Some(3),
        "the documented give-up code\n{}",
        respawn.dump()
    );
    let log = respawn.log();
    let forked: Vec<i32> = log
        .iter()
        .filter(|l| l.ends_with(" spawned"))
        .filter_map(|l| worker_pid(l))
        .collect();
    assert!(
        forked.len() <= 2 + 5 + 1,
        "{} forks\n{}",
        forked.len(),
        respawn.dump()
    );
    assert!(forked.iter().all(|&pid| !alive(pid)), "nothing left running");
    let giving_up: Vec<&String> = log.iter().filter(|l| l.contains("giving up: ")).collect();
    assert_eq!(giving_up.len(), 1, "one line says why\n{}", respawn.dump());
    assert!(giving_up[0].contains("6 restarts in"), "{}", giving_up[0]);
    assert!(
        giving_up[0].contains("more than the 5 allowed in 60 s"),
        "{}",
        giving_up[0]
    );
    assert!(
        giving_up[0].contains("panicked while starting: --demo-fail-start"),
        "{}",
        giving_up[0]
    );
    for delay in ["slot 0 respawns in 0.1 s", "slot 0 respawns in 0.2 s"] {
        assert_eq!(
            respawn.count_log(delay),
            1,
            "the backoff doubles: {delay}\n{}",
            respawn.dump()
        );
    }
}

#[test]
fn max_requests_recycles_workers_without_losing_a_request() {
    const CLIENTS: usize = 4;
    const REQUESTS: usize = 300;
    let respawn = Respawn::with_workers(2, &["--max-requests", "5"]);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = respawn.addr;
            thread::spawn(move || {
                (0..REQUESTS / CLIENTS)
                    .map(|_| get(addr, "/").map(|a| a.status))
                    .filter(|answer| !matches!(answer, Ok(200)))
                    .map(|answer| format!("{answer:?}"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let failed: Vec<String> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();

    assert!(
        failed.is_empty(),
        "{} of {REQUESTS} failed: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        respawn.dump()
    );
    let recycled = respawn.count_log("sent suicide (served its 5 requests); replacing it");
    assert!(
        recycled >= REQUESTS / 5 - 2,
        "{recycled} workers recycled\n{}",
        respawn.dump()
    );
    assert_eq!(respawn.count_log("giving up"), 0, "recycling is not a failure");
    respawn.wait_for_workers(2);
}

#[test]
fn a_good_life_resets_the_slots_backoff() {
    // Two young deaths double the slot's delay; a worker that then lives
    // past --min-uptime proves the slot sound, and the next young death
    // starts again from 0.1 s.
    let respawn = Respawn::with_workers(1, &["--min-uptime", "3"]);
    let mut worker = *respawn.wait_for_workers(1).iter().next().unwrap();
    let kill_and_replace = |pid: i32| {
        send(pid, libc::SIGKILL);
        assert!(wait_until(PATIENCE, || !alive(pid)));
        respawn.wait_for_log("the exit", |l| {
            l.contains(&format!("worker {pid} exited (signal 9"))
        });
        let next = respawn.wait_for_workers(1);
        *next.iter().next().unwrap()
    };
    worker = kill_and_replace(worker);
    worker = kill_and_replace(worker);
    assert_eq!(
        respawn.count_log("slot 0 respawns in 0.1 s"),
        1,
        "{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log("slot 0 respawns in 0.2 s"),
        1,
        "{}",
        respawn.dump()
    );
    let ready = std::time::Instant::now();
    assert!(!wait_until(std::time::Duration::from_millis(3200), || !alive(
        worker
    )));
    assert!(ready.elapsed() >= std::time::Duration::from_millis(3200));
    let mature = worker;
    worker = kill_and_replace(worker);
    assert!(
        respawn
            .log()
            .iter()
            .any(|l| l.ends_with(&format!("worker {mature} exited (signal 9), replacing"))),
        "a mature death is replaced at once\n{}",
        respawn.dump()
    );
    kill_and_replace(worker);
    assert_eq!(
        respawn.count_log("slot 0 respawns in 0.1 s"),
        2,
        "the delay starts over after a good life\n{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log("slot 0 respawns in 0.4 s"),
        0,
        "{}",
        respawn.dump()
    );
}

/// A worker that served a request and then exits hard (`process.exit` in a
/// route, a segfault, the OOM killer: no Suicide) proved itself, however
/// young: it is replaced at once and never counts toward giving up. Here
/// the minimum uptime is a minute, so only what it served can prove it,
/// and one restart is all the limit allows.
#[test]
fn a_worker_that_served_and_exits_hard_is_replaced_and_never_counted() {
    let respawn = Respawn::with_workers(
        1,
        &[
            "--min-uptime",
            "60",
            "--max-restarts",
            "1",
            "--restart-window",
            "60",
        ],
    );
    for round in 0..5 {
        let worker = *respawn.wait_for_workers(1).iter().next().expect("a worker");
        let served = respawn.get("/").expect("GET /");
        assert_eq!(served.pid(), Some(worker), "round {round}");
        let cut = respawn.get_raw("/exit");
        assert!(cut_without_an_answer(&cut), "round {round}: {cut:?}");
        respawn.wait_for_line(&format!("worker {worker} exited (code 1), replacing"));
    }
    let gave_up = respawn
        .log()
        .iter()
        .filter(|l| message(l).starts_with("giving up"))
        .count();
    assert_eq!(gave_up, 0, "{}", respawn.dump());
    assert_eq!(
        respawn.count_log("respawns in"),
        0,
        "no backoff\n{}",
        respawn.dump()
    );
    respawn.wait_for_workers(1);
    assert_eq!(respawn.get("/").expect("GET /").status, 200);
}

/// A program that dies in the first request it gets, every time (Fastify
/// served before its `ready()`): that is the request's doing, not a start
/// that cannot succeed, so it is never given up on; but it is said, as an
/// ERROR line and in `ctl status`, and each slot is refilled on its backoff
/// so the fork rate stays bounded.
#[test]
fn workers_that_die_in_their_first_request_are_said_and_not_given_up_on() {
    let dir = TempDir::new("respawn-first-request");
    let socket = dir.join("control.sock");
    let respawn = Respawn::with_workers(
        1,
        &[
            "--min-uptime",
            "60",
            "--max-restarts",
            "1",
            "--restart-window",
            "60",
            "--control",
            &socket.display().to_string(),
        ],
    );
    for round in 0..4 {
        let worker = *respawn.wait_for_workers(1).iter().next().expect("a worker");
        respawn.wait_for_line(&format!("worker {worker} ready"));
        let cut = respawn.get_raw("/exit");
        assert!(cut_without_an_answer(&cut), "round {round}: {cut:?}");
        respawn.wait_for_log("its death", |l| {
            message(l).starts_with(&format!(
                "worker {worker} exited (code 1) during its first request; slot 0 respawns in "
            ))
        });
    }
    let line = respawn.wait_for_log("the ERROR line", |l| {
        message(l).starts_with("the last 3 workers each died during their first request")
    });
    assert!(line.contains("ERROR"), "{line}");
    let gave_up = respawn
        .log()
        .iter()
        .filter(|l| message(l).starts_with("giving up"))
        .count();
    assert_eq!(gave_up, 0, "{}", respawn.dump());
    let status = std::process::Command::new(binary())
        .args(["ctl", &socket.display().to_string(), "status"])
        .output()
        .expect("respawn ctl status");
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        table.contains("DYING: the last 4 workers each died during their first request"),
        "{table}"
    );
    // A worker that serves ends the run.
    respawn.wait_for_workers(1);
    let ready = wait_until(PATIENCE, || respawn.get("/").is_ok_and(|a| a.status == 200));
    assert!(ready, "{}", respawn.dump());
}

/// README.md and docs/ show the demo's panic lines as a newcomer sees them
/// (`worker 15805 panicked at master/src/bin/respawn/http.rs:140:25: ...`):
/// every location they quote is one the demo logs now, for GET /crash or
/// for --demo-fail-start, so the sample does not drift from the code.
#[test]
fn the_docs_quote_the_panic_locations_the_demo_logs() {
    const AT: &str = " panicked at ";
    let location = |line: &str| {
        let rest = &line[line.find(AT).expect("a panic line") + AT.len()..];
        rest.split(": ").next().unwrap_or_default().to_owned()
    };
    let respawn = Respawn::with_workers(1, &[]);
    respawn.wait_for_workers(1);
    let answer = respawn.get("/crash").expect("GET /crash must be answered");
    assert_eq!(answer.status, 500, "{answer:?}");
    let crash = location(&respawn.wait_for_log("the panic's line", |l| {
        l.contains(AT) && l.ends_with(": crash requested by GET /crash")
    }));
    let (_, output) = run_to_exit(&["--workers", "1", "--demo-fail-start", "--max-restarts", "0"]);
    let fail_start = output
        .lines()
        .find(|l| l.contains(AT) && l.contains("--demo-fail-start: failing before Ready"))
        .map(location)
        .unwrap_or_else(|| panic!("no panic line from --demo-fail-start:\n{output}"));
    let root = workspace();
    let mut documents = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("an entry of docs/").path();
        if path.extension().is_some_and(|e| e == "md") {
            documents.push(path);
        }
    }
    let mut quoted = 0;
    for document in &documents {
        let text = std::fs::read_to_string(document).expect("a document");
        for (at, _) in text.match_indices("master/src/bin/respawn/http.rs:") {
            let end = text[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || "/._:".contains(c)))
                .map_or(text.len(), |n| at + n);
            let shown = text[at..end].trim_end_matches(':');
            assert!(
                shown == crash || shown == fail_start,
                "{} quotes {shown}; the demo logs {crash} (GET /crash) and {fail_start} (--demo-fail-start)",
                document.display()
            );
            quoted += 1;
        }
    }
    assert!(quoted >= 2, "README.md shows both panic lines: {quoted} found");
}
