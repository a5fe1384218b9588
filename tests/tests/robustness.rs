//! The supervisor never takes the service down: a starved host, stray
//! signals, deaths from outside, clients that hold workers, a busy HUP.
//! Each test is a row of docs/robustness.md.

use respawn_tests::*;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A uid of its own for this test run: RLIMIT_NPROC counts every process of
/// a uid, so two runs at once (CI beside a mutants run) must not share one.
fn own_uid(offset: u32) -> u32 {
    40_000 + (std::process::id() % 10_000) * 2 + offset
}

/// Runs the master as `uid` (no privileges: limits apply) with `resource`
/// lowered to `limit` for it.
fn unprivileged(command: &mut Command, uid: u32, resource: libc::__rlimit_resource_t, limit: u64) {
    command.uid(uid).gid(uid);
    with_limit(command, resource, limit);
}

#[test]
fn failed_fork_keeps_the_workers_and_recovers() {
    // Two workers and the master are all the processes uid 42001 may have:
    // the replacement of a crashed worker cannot be forked until the crashed
    // one has left.
    let uid = own_uid(0);
    let respawn = Respawn::start_with(&["--workers", "2"], |command| {
        unprivileged(command, uid, libc::RLIMIT_NPROC, 3)
    });
    let before = respawn.wait_for_workers(2);
    let mut crashes = 0;
    while respawn.count_log("fork failed") == 0 && crashes < 50 {
        let answer = respawn.get("/crash").expect("GET /crash");
        assert_eq!(answer.status, 500, "{answer:?}");
        crashes += 1;
        // Its exit is said after its Suicide was handled, and so after the
        // fork that failed for it, if one did: only then is the log read.
        // (A crash sent before that line was read could land after the
        // retry had forked again, in a second burst of its own.)
        let crashed = worker_pid(&answer.body).expect("the crashed worker's pid");
        respawn.wait_for_log("the crashed worker's exit", |l| {
            message(l).starts_with(&format!("worker {crashed} exited ("))
        });
    }
    let line = respawn.wait_for_log("the failed fork", |l| l.contains("starting a worker in slot"));
    assert!(
        line.contains(&format!(
            ": fork failed: resource temporarily unavailable (the limit on processes of uid {uid}, \
             RLIMIT_NPROC (ulimit -u), is 3"
        )) && line.contains("of 2 workers running, retrying in"),
        "the line names the limit and its value: {line}"
    );
    // One failed attempt or more: on a busy machine a second crash can
    // land, and its fork fail too, before the first crashed worker leaves.
    let recovery = respawn.wait_for_log("the recovery", |l| {
        message(l).starts_with("forking works again, after ")
    });
    let attempts: Option<u32> = message(&recovery)
        .strip_prefix("forking works again, after ")
        .and_then(|rest| rest.strip_suffix(" failed attempts"))
        .and_then(|n| n.parse().ok());
    assert!(attempts.is_some_and(|n| n >= 1), "{recovery}");
    let after = respawn.wait_for_workers(2);
    assert_eq!(respawn.count_log("forking works again"), 1, "{}", respawn.dump());
    assert!(alive(respawn.pid), "the master goes on\n{}", respawn.dump());
    assert_ne!(before, after);
    assert_eq!(respawn.get("/").unwrap().status, 200);
    assert_eq!(respawn.count_log("giving up"), 0, "{}", respawn.dump());
}

/// The same limit, met at the exec of a `-- CMD` worker: root's fork is
/// not held to RLIMIT_NPROC, the exec after the drop to `--user` is. The
/// worker exits with exit_code::HOST_REFUSED after a line naming the
/// limit, and the master retries its slot on the backoff without counting
/// it, as for a fork; it gave up (exit 3) before, with `--max-restarts 2`
/// after three such deaths. Once the user has room, the program runs.
#[test]
fn an_exec_the_process_limit_refuses_is_retried_never_given_up_on() {
    const TEST: &str = "an_exec_the_process_limit_refuses_is_retried_never_given_up_on";
    if !require(TEST, Need::Root) || !require(TEST, Need::Nobody) {
        return;
    }
    // Room for four processes of nobody's beside those it has already (a
    // daemon of the host's), and five more: over the limit before a
    // worker's setuid, the kernel flags the switch, then refuses the exec.
    let nobodys = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("status")).ok())
        .filter(|status| status.lines().any(|l| l.starts_with("Uid:\t65534\t")))
        .count() as u64;
    let limit = nobodys + 4;
    let sleepers = KilledOnDrop(
        (0..5)
            .map(|_| {
                command_as_nobody("sleep")
                    .arg("60")
                    .spawn()
                    .expect("a process of nobody's")
            })
            .collect(),
    );
    // Each counts once it is nobody's (setpriv switches, then executes).
    let counted = wait_until(PATIENCE, || {
        sleepers.0.iter().all(|child| {
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
            status.lines().any(|l| l == "Name:\tsleep")
                && status.lines().any(|l| l.starts_with("Uid:\t65534\t"))
        })
    });
    assert!(counted, "nobody's sleepers never ran");
    let args = [
        "--workers",
        "1",
        "--user",
        "nobody",
        "--max-restarts",
        "2",
        "--ready-on-exec",
        "--",
        "/bin/sleep",
        "600",
    ];
    let respawn = Respawn::start_with(&args, |command| with_limit(command, libc::RLIMIT_NPROC, limit));

    // Three: one more than --max-restarts allows.
    let refused = wait_until(PATIENCE, || {
        respawn.count_log("code 75 is EX_TEMPFAIL, try again later") >= 3
    });
    assert!(refused, "three refusals\n{}", respawn.dump());
    let line = respawn.wait_for_log("the worker's line", |l| l.contains(": executing /bin/sleep: "));
    assert!(
        line.contains(&format!(
            "resource temporarily unavailable (the limit on processes of uid 65534, RLIMIT_NPROC (ulimit -u), is {limit}"
        )),
        "{line}"
    );
    assert_eq!(respawn.count_log("giving up: "), 0, "{}", respawn.dump());
    assert!(alive(respawn.pid), "{}", respawn.dump());
    drop(sleepers);
    let sleeping = wait_until(PATIENCE, || {
        respawn.workers().iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "sleep")
        })
    });
    assert!(
        sleeping,
        "the program runs once the user has room\n{}",
        respawn.dump()
    );
}

#[test]
fn ttin_past_the_open_file_limit_is_refused_with_a_line() {
    // The program also holds an fd of its own above the limit (fd 40), so
    // the master cannot keep its pipes above every fd it found at start:
    // they stay low, and each worker must still be given none of them.
    let respawn = Respawn::start_with(&["--workers", "2"], |command| {
        // SAFETY: dup2 is async-signal-safe; fd 0 is the /dev/null the
        // harness gives as stdin.
        unsafe {
            command.pre_exec(|| match libc::dup2(0, 40) {
                40 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
        unprivileged(command, own_uid(1), libc::RLIMIT_NOFILE, 32)
    });
    respawn.wait_for_workers(2);
    let mut wanted = 2;
    while respawn.count_log("received SIGTTIN, but") == 0 {
        assert!(wanted < 32, "TTIN never refused\n{}", respawn.dump());
        respawn.signal(libc::SIGTTIN);
        wanted += 1;
        respawn.wait_for_log("the TTIN's answer", |l| {
            l.ends_with(&format!("received SIGTTIN, {wanted} workers wanted"))
                || l.contains("received SIGTTIN, but")
        });
    }
    let most = wanted - 1;
    let line = respawn.wait_for_log("the refusal", |l| l.contains("received SIGTTIN, but"));
    assert!(
        line.contains(&format!("{wanted} workers would be more than the {most}"))
            && line.contains("RLIMIT_NOFILE 32")
            && line.ends_with(&format!("still {most} wanted")),
        "{line}"
    );
    let old = respawn.wait_for_workers(most);
    for &worker in &old {
        assert_eq!(
            read_ends_of_pipes(worker),
            0,
            "worker {worker} holds the master's pipes\n{}",
            respawn.dump()
        );
    }
    // A HUP at the limit still has the fds it needs.
    respawn.signal(libc::SIGHUP);
    respawn.wait_for_log("the rollout", |l| {
        l.ends_with("rolling restart done: every worker is new")
    });
    let new = respawn.wait_for_workers(most);
    assert!(old.is_disjoint(&new), "{}", respawn.dump());
    assert_eq!(respawn.get("/").unwrap().status, 200);
    assert_eq!(
        respawn.count_log("starting a worker in slot"),
        0,
        "{}",
        respawn.dump()
    );
}

/// How many read ends of pipes a process holds: a worker holds none (its
/// own pipe's write end, and stdio), the master one per worker.
fn read_ends_of_pipes(pid: i32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(|entry| entry.ok())
        .filter(|entry| {
            std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("pipe:"))
        })
        .filter(|entry| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                entry.file_name().to_string_lossy()
            ));
            info.ok()
                .and_then(|info| {
                    let flags = info
                        .lines()
                        .find_map(|l| l.strip_prefix("flags:"))?
                        .trim()
                        .to_owned();
                    i32::from_str_radix(&flags, 8).ok()
                })
                .is_some_and(|flags| flags & libc::O_ACCMODE == libc::O_RDONLY)
        })
        .count()
}

#[test]
fn a_fork_that_keeps_failing_is_one_line_per_burst() {
    // Two processes allowed: the master and one worker. The second worker
    // can never be forked: one WARN line, then quieter retries.
    let mut respawn = Respawn::start_with(&["--workers", "2"], |command| {
        unprivileged(command, own_uid(0) + 20_000, libc::RLIMIT_NPROC, 2)
    });
    assert!(
        wait_until(PATIENCE, || respawn.count_log("fork failed again") >= 3),
        "{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log(": fork failed: "),
        1,
        "one line per burst\n{}",
        respawn.dump()
    );
    assert_eq!(respawn.count_log("forking works again"), 0);
    assert_eq!(respawn.get("/").unwrap().status, 200, "the worker it has serves");
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0));
}

#[test]
fn clients_cannot_pile_up_retiring_workers() {
    // Each worker retires after one connection, and each connection sends
    // half a request and stays: every worker retires holding one.
    let respawn = Respawn::with_workers(3, &["--max-requests", "1"]);
    let mut held = Vec::new();
    let mut most = 0;
    for _ in 0..16 {
        let mut conn = TcpStream::connect(respawn.addr).unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        held.push(conn);
        most = most.max(respawn.workers().len());
    }
    let bound = |l: &str| {
        l.contains("] 7 workers alive, ")
            && l.ends_with(
                "retiring: the most allowed (twice the 3 wanted, plus one); \
                 the next replacement waits for a retiring one to leave",
            )
    };
    respawn.wait_for_log("the bound", bound);
    // Watch the count for a moment: it must never pass 2 x 3 + 1.
    wait_until(Duration::from_millis(500), || {
        most = most.max(respawn.workers().len());
        false
    });
    assert!(
        most <= 7,
        "at most 2 x 3 + 1 workers alive, saw {most}\n{}",
        respawn.dump()
    );
    // Said when the bound is reached, not again at every turn while it holds.
    let said = respawn.log().iter().filter(|l| bound(l)).count();
    assert!(said <= 2, "the bound's line, {said} times\n{}", respawn.dump());
    drop(held);
    respawn.wait_for_workers(3);
    assert_eq!(respawn.get("/").unwrap().status, 200);
}

/// Every catchable signal that has no meaning for respawn: all of 1 to 64
/// but KILL and STOP (uncatchable), TSTP and CONT (job control, which stops
/// and resumes), the fault signals (a faulting master must die), and those
/// the master acts on.
fn meaningless_signals() -> Vec<i32> {
    let meaningful = [
        libc::SIGKILL,
        libc::SIGSTOP,
        libc::SIGTSTP,
        libc::SIGCONT,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGFPE,
        libc::SIGILL,
        libc::SIGTRAP,
        libc::SIGSYS,
        libc::SIGABRT,
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGCHLD,
        libc::SIGTTIN,
        libc::SIGTTOU,
        // The upgrade: tests/tests/upgrade.rs.
        libc::SIGUSR2,
    ];
    (1..=64).filter(|s| !meaningful.contains(s)).collect()
}

#[test]
fn every_stray_signal_is_a_line_and_changes_nothing() {
    let respawn = Respawn::with_workers(2, &[]);
    let before = respawn.wait_for_workers(2);
    let signals = meaningless_signals();
    for &signal in &signals {
        // One at a time, each awaited: the test is that each has its line.
        let lines = respawn.count_log("; ignored");
        respawn.signal(signal);
        assert!(
            wait_until(PATIENCE, || respawn.count_log("; ignored") > lines),
            "no line for signal {signal}\n{}",
            respawn.dump()
        );
    }
    assert_eq!(
        respawn.count_log("; ignored"),
        signals.len(),
        "{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log("received SIGUSR1: respawn logs to stderr and has no log file to reopen; ignored"),
        1
    );
    assert!(alive(respawn.pid));
    assert_eq!(respawn.workers(), before, "the same workers\n{}", respawn.dump());
    assert_eq!(respawn.get("/").unwrap().status, 200);
}

/// Waits until one of the workers has lived `age`, and returns it.
fn a_worker_older_than(respawn: &Respawn, seen: &mut Vec<(i32, Instant)>, age: Duration) -> i32 {
    let mut found = None;
    let ok = wait_until(PATIENCE, || {
        let now = Instant::now();
        for pid in respawn.workers() {
            if !seen.iter().any(|&(p, _)| p == pid) {
                seen.push((pid, now));
            }
        }
        found = seen
            .iter()
            .find(|&&(pid, since)| alive(pid) && now - since >= age)
            .map(|&(pid, _)| pid);
        found.is_some()
    });
    assert!(ok, "no worker lived {age:?}\n{}", respawn.dump());
    found.unwrap_or_default()
}

#[test]
fn mature_deaths_never_make_it_give_up() {
    // Default flags: more than 10 restarts in 60 s gives up, but only for
    // workers that die young. These lived past the 1 s minimum uptime.
    let respawn = Respawn::with_workers(2, &[]);
    let mut seen = Vec::new();
    let kills = 12;
    for i in 0..kills {
        let pid = a_worker_older_than(&respawn, &mut seen, Duration::from_millis(1200));
        let signal = if i == kills - 1 {
            libc::SIGSEGV
        } else {
            libc::SIGKILL
        };
        // Rust's stack-overflow handler takes the first SEGV that is not a
        // fault and puts the default back; the next one kills.
        assert!(wait_until(PATIENCE, || {
            send(pid, signal);
            !alive(pid)
        }));
        respawn.wait_for_log("the replacement", |l| {
            l.contains(&format!("worker {pid} exited (signal {signal}")) && l.ends_with("), replacing")
        });
        respawn.wait_for_workers(2);
    }
    assert!(alive(respawn.pid), "{}", respawn.dump());
    assert_eq!(respawn.count_log("giving up"), 0, "{}", respawn.dump());
    assert_eq!(respawn.get("/").unwrap().status, 200);
}

#[test]
fn hup_with_busy_workers_rolls_without_waiting_for_them() {
    let respawn = Respawn::with_workers(3, &["--graceful-timeout", "30"]);
    let old = respawn.wait_for_workers(3);
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (addr, answered) = (respawn.addr, Arc::clone(&answered));
            thread::spawn(move || {
                let answer = get(addr, "/sleep/8000");
                answered.fetch_add(1, Ordering::SeqCst);
                answer
            })
        })
        .collect();
    assert!(wait_until(PATIENCE, || respawn
        .count_log("serving GET /sleep/8000")
        == 3));

    respawn.signal(libc::SIGHUP);
    respawn.wait_for_log("the end of the rollout", |l| {
        l.ends_with("rolling restart done: every worker is new")
    });
    let done_while_busy = answered.load(Ordering::SeqCst);
    let new: BTreeSet<i32> = respawn.workers().difference(&old).copied().collect();
    assert_eq!(
        new.len(),
        3,
        "3 new workers beside the 3 busy old ones\n{}",
        respawn.dump()
    );
    let answer = respawn.get("/").unwrap();
    assert!(
        new.contains(&answer.pid().unwrap_or_default()),
        "a new worker answers"
    );
    assert_eq!(
        done_while_busy,
        0,
        "the rollout finished before the old workers' requests did\n{}",
        respawn.dump()
    );
    for client in clients {
        assert_eq!(
            client.join().unwrap().unwrap().status,
            200,
            "the old workers finish their requests"
        );
    }
    assert_eq!(respawn.wait_for_workers(3), new);
}

#[test]
fn rolling_restart_done_even_when_the_old_workers_die_on_their_own() {
    let respawn = Respawn::with_workers(2, &[]);
    let old = respawn.wait_for_workers(2);
    // Stopped, the master reads the HUP and both deaths in one turn: the
    // last outdated workers leave by themselves, not by the rollout.
    respawn.signal(libc::SIGSTOP);
    respawn.signal(libc::SIGHUP);
    for &pid in &old {
        send(pid, libc::SIGKILL);
    }
    assert!(wait_until(PATIENCE, || old.iter().all(|&pid| !alive(pid))));
    respawn.signal(libc::SIGCONT);
    respawn.wait_for_log("the end of the rollout", |l| {
        l.ends_with("rolling restart done: every worker is new")
    });
    let new = respawn.wait_for_workers(2);
    assert!(new.is_disjoint(&old));
}

/// A master whose stderr is a pipe that nobody reads until the test says
/// so; the whole process group is killed on drop.
struct Unread {
    child: std::process::Child,
}

impl Drop for Unread {
    fn drop(&mut self) {
        send(-(self.child.id() as i32), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn a_log_pipe_nobody_reads_never_stalls_the_service() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut command = Command::new(binary());
    command
        .args(["--workers", "2", "--listen", &addr.to_string()])
        .env("RUST_LOG", "debug")
        .env("RUST_LOG_STYLE", "never")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    let mut master = Unread {
        child: spawn_tied(command).expect("starting respawn"),
    };
    let pid = master.child.id() as i32;
    assert!(wait_until(PATIENCE, || get(addr, "/").is_ok_and(|r| r.status == 200)));

    // About 5 log lines a crash and 2 a request, 100 bytes each: ten times
    // what the pipe (64 KiB) and the master's buffer (256 KiB) hold.
    for i in 0..1000 {
        let crash = get(addr, "/crash").map(|r| r.status);
        let plain = get(addr, "/").map(|r| r.status);
        assert!(
            matches!((&crash, &plain), (Ok(500), Ok(200))),
            "round {i}: /crash {crash:?}, / {plain:?}"
        );
    }
    let settled = wait_until(PATIENCE, || {
        children(pid).iter().filter(|&&(_, state)| state != 'Z').count() == 2
    });
    assert!(settled, "exactly 2 workers: {:?}", children(pid));

    // Now read: the lines that were kept, then the count of those that were
    // not, then the log goes on.
    let stderr = master.child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + PATIENCE;
    let mut dropped = None;
    let mut seen_after = false;
    while Instant::now() < deadline && !seen_after {
        let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if let Some(count) = line
            .strip_prefix("respawn: ")
            .and_then(|rest| rest.strip_suffix(" log lines dropped: stderr was not being read"))
        {
            dropped = count.parse::<u64>().ok();
            // The pipe is being read now: a new line gets out.
            send(pid, libc::SIGTTIN);
        }
        seen_after = dropped.is_some() && line.ends_with("received SIGTTIN, 3 workers wanted");
    }
    assert!(
        dropped.is_some_and(|n| n > 0),
        "a line says how many were dropped"
    );
    assert!(
        seen_after,
        "the log resumes after the count ({dropped:?} dropped)"
    );
}

#[test]
fn a_worker_speaking_a_newer_contract_backs_off_and_gives_up() {
    // Its first frame has a version byte this master does not speak: the
    // master stops it, and since it never said Ready, its exit is a failed
    // start, like a crash loop's, not a handover replaced at once forever.
    let mut respawn = Respawn::start(&["--workers", "1", "--demo-bad-ipc", "--max-restarts", "3"]);
    assert_eq!(respawn.wait_exit().code(), Some(3), "{}", respawn.dump());
    assert_eq!(
        respawn.count_log(" spawned"),
        4,
        "1 start and 3 restarts\n{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log(
            "sent malformed ipc (unknown protocol version 2 (this master speaks 1)); replacing it"
        ),
        4,
        "{}",
        respawn.dump()
    );
    for delay in ["respawns in 0.1 s", "respawns in 0.2 s", "respawns in 0.4 s"] {
        assert_eq!(respawn.count_log(delay), 1, "{delay}\n{}", respawn.dump());
    }
    assert_eq!(
        respawn.count_log("] giving up: 4 restarts in "),
        1,
        "{}",
        respawn.dump()
    );
}
