//! systemd's readiness protocol, with the test playing systemd: a datagram
//! socket bound in a fresh directory, named in NOTIFY_SOCKET, that records
//! every message the master sends.

use respawn_tests::*;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The receiving end of NOTIFY_SOCKET, and every datagram it got, with
/// when. Prints them when dropped (`--nocapture` shows them).
struct Systemd {
    socket: UnixDatagram,
    dir: PathBuf,
    seen: Vec<(Instant, String)>,
}

impl Systemd {
    fn new(name: &str) -> Systemd {
        let dir = std::env::temp_dir().join(format!("respawn-systemd-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a directory for the notify socket");
        let socket = UnixDatagram::bind(dir.join("notify")).expect("binding the notify socket");
        Systemd {
            socket,
            dir,
            seen: Vec::new(),
        }
    }

    fn path(&self) -> String {
        self.dir.join("notify").display().to_string()
    }

    /// Starts respawn with NOTIFY_SOCKET naming this socket, and `env`.
    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Respawn {
        let path = self.path();
        Respawn::start_with(args, |command| {
            command.env("NOTIFY_SOCKET", path);
            for (name, value) in env {
                command.env(name, value);
            }
        })
    }

    /// Reads one datagram, waiting until `deadline` at most.
    fn receive(&mut self, deadline: Instant) -> Option<String> {
        let mut buf = [0; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.socket
                .set_read_timeout(Some(left))
                .expect("setting a read timeout");
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push((Instant::now(), message.clone()));
                    return Some(message);
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(err) => panic!("reading the notify socket: {err}"),
            }
        }
    }

    /// Reads datagrams until one matches, and returns it.
    fn wait_for(&mut self, respawn: &Respawn, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        while let Some(message) = self.receive(deadline) {
            if matches(&message) {
                return message;
            }
        }
        panic!(
            "no {what} datagram within {PATIENCE:?}; got {:?}\n{}",
            self.messages(),
            respawn.dump()
        );
    }

    /// Reads whatever arrives for `limit`.
    fn read_for(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.receive(deadline).is_some() {}
    }

    fn messages(&self) -> Vec<String> {
        self.seen.iter().map(|(_, m)| m.clone()).collect()
    }

    fn count(&self, message: &str) -> usize {
        self.seen.iter().filter(|(_, m)| m == message).count()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        eprintln!("datagrams seen: {:?}", self.messages());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The number of Ready workers a `STATUS=` line gives, if it is one.
fn status_count(message: &str) -> Option<usize> {
    let status = message.lines().find_map(|l| l.strip_prefix("STATUS="))?;
    status.split(' ').next()?.parse().ok()
}

/// CLOCK_MONOTONIC in microseconds: the clock MONOTONIC_USEC is read on.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

#[test]
fn notify_ready_after_the_workers_are_ready() {
    const WORKERS: usize = 8;
    let mut systemd = Systemd::new("ready");
    let mut respawn = systemd.start(&["--workers", &WORKERS.to_string()], &[]);

    let ready = systemd.wait_for(&respawn, "READY=1", |m| m.lines().any(|l| l == "READY=1"));

    assert_eq!(
        ready,
        format!("READY=1\nSTATUS={WORKERS} workers, generation 0"),
        "{:?}",
        systemd.messages()
    );
    // Before it: only the count of Ready workers growing towards all of
    // them. (Eight workers say Ready over several turns of the master, so
    // a READY=1 sent too early shows here: it comes with fewer.)
    let before = &systemd.messages()[..systemd.seen.len() - 1];
    let counts: Vec<Option<usize>> = before.iter().map(|m| status_count(m)).collect();
    assert!(
        counts.iter().all(|c| c.is_some_and(|n| n < WORKERS)) && counts.windows(2).all(|w| w[0] < w[1]),
        "before READY=1, only STATUS= with fewer than {WORKERS} ready: {before:?}"
    );
    // And the log says the same: every worker said ready.
    respawn.wait_for_workers(WORKERS);
    let said_ready = respawn
        .log()
        .iter()
        .filter(|l| worker_says(l, "ready").is_some())
        .count();
    assert_eq!(said_ready, WORKERS, "{}", respawn.dump());

    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    systemd.read_for(Duration::from_millis(200));
    assert_eq!(
        systemd.seen.iter().filter(|(_, m)| m.contains("READY=1")).count(),
        1,
        "READY=1 once: {:?}",
        systemd.messages()
    );
}

#[test]
fn notify_reloading_and_ready_around_hup() {
    let mut systemd = Systemd::new("reload");
    let respawn = systemd.start(&["--workers", "4"], &[]);
    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    let old = respawn.wait_for_workers(4);

    let before = monotonic_usec();
    respawn.signal(libc::SIGHUP);
    let reloading = systemd.wait_for(&respawn, "RELOADING=1", |m| m.starts_with("RELOADING=1"));
    let after = monotonic_usec();
    let stamp: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|usec| usec.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 with a MONOTONIC_USEC: {reloading:?}"));
    assert!(
        (before..=after).contains(&stamp),
        "MONOTONIC_USEC {stamp} is between {before} and {after}"
    );

    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1\n"));
    // Said only once the rollout is done: four new workers run already
    // (each forked only after the one before it said Ready).
    let new: Vec<i32> = respawn.workers().difference(&old).copied().collect();
    assert_eq!(
        new.len(),
        4,
        "READY=1 came with the new workers {new:?}\n{}",
        respawn.dump()
    );
    respawn.wait_for_line("rolling restart done: every worker is new");
    let messages = systemd.messages();
    let status = messages.iter().rev().find(|m| m.starts_with("STATUS="));
    assert_eq!(
        status.map(String::as_str),
        Some("STATUS=4 workers, generation 1"),
        "the new generation: {messages:?}"
    );
}

#[test]
fn notify_stopping_on_term() {
    let mut systemd = Systemd::new("stopping");
    let mut respawn = systemd.start(&["--workers", "2", "--graceful-timeout", "30"], &[]);
    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    // A request in flight keeps the master stopping while a second stop
    // signal comes.
    let addr = respawn.addr;
    let client = std::thread::spawn(move || get(addr, "/sleep/30000"));
    assert!(
        wait_until(PATIENCE, || respawn.count_log("serving GET /sleep/30000") == 1),
        "{}",
        respawn.dump()
    );

    respawn.signal(libc::SIGTERM);
    systemd.wait_for(&respawn, "STOPPING=1", |m| m == "STOPPING=1");
    respawn.signal(libc::SIGINT);

    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert_eq!(
        respawn.count_lines("received SIGINT, stopping now"),
        1,
        "{}",
        respawn.dump()
    );
    let _ = client.join();
    systemd.read_for(Duration::from_millis(200));
    assert_eq!(systemd.count("STOPPING=1"), 1, "once: {:?}", systemd.messages());
    // Then how many workers are left, down to none.
    let messages = systemd.messages();
    let stopping = messages
        .iter()
        .position(|m| m == "STOPPING=1")
        .unwrap_or_default();
    let after = &messages[stopping + 1..];
    assert!(
        after.first().is_some_and(|m| m.starts_with("STATUS=stopping, "))
            && after
                .last()
                .is_some_and(|m| m == "STATUS=stopping, 0 workers left"),
        "{messages:?}"
    );
}

#[test]
fn notify_stopping_and_no_ready_when_workers_never_start() {
    let mut systemd = Systemd::new("giving-up");
    let mut respawn = systemd.start(
        &["--workers", "2", "--demo-fail-start", "--max-restarts", "2"],
        &[],
    );
    systemd.wait_for(&respawn, "STOPPING=1", |m| m == "STOPPING=1");
    assert_eq!(respawn.wait_exit().code(), Some(3), "{}", respawn.dump());
    systemd.read_for(Duration::from_millis(200));
    assert!(
        systemd.seen.iter().all(|(_, m)| !m.contains("READY=1")),
        "no READY=1 from a service that never served: {:?}",
        systemd.messages()
    );
}

#[test]
fn notify_watchdog_at_the_asked_interval() {
    let mut systemd = Systemd::new("watchdog");
    let respawn = systemd.start(&["--workers", "1"], &[("WATCHDOG_USEC", "400000")]);
    systemd.wait_for(&respawn, "the first WATCHDOG=1", |m| m == "WATCHDOG=1");
    let window = Duration::from_secs(5);
    let end = Instant::now() + window;
    let mut pings = 0;
    while let Some(message) = systemd.receive(end) {
        if message == "WATCHDOG=1" {
            pings += 1;
        }
    }
    // The promise: a ping every half of WATCHDOG_USEC, 200 ms, so 25 in the
    // 5 s after the first. Each is timed from the one before, so a busy
    // machine's late wake-ups add up: a third fewer is allowed (an average
    // of 300 ms). A master that pinged only every WATCHDOG_USEC (12), on
    // the very edge of being killed by systemd, fails.
    let promised = (window.as_millis() / 200) as usize;
    assert!(
        pings >= promised * 2 / 3,
        "{pings} WATCHDOG=1 in the {window:?} after the first, not {promised} (one every 200 ms): {:?}\n{}",
        systemd.messages(),
        respawn.dump()
    );
    // Never sooner than due; one more for where the window's edges fall.
    assert!(
        pings <= promised + 1,
        "{pings} WATCHDOG=1 in {window:?} is faster than every 200 ms"
    );
}

#[test]
fn watchdog_pid_of_another_process_is_not_ours() {
    let mut systemd = Systemd::new("watchdog-pid");
    let respawn = systemd.start(
        &["--workers", "1"],
        &[("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")],
    );
    respawn.wait_for_line("WATCHDOG_PID is 1, not this process: no watchdog pings");
    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    // Twenty times the interval it would have pinged at.
    systemd.read_for(Duration::from_secs(1));
    assert_eq!(systemd.count("WATCHDOG=1"), 0, "{:?}", systemd.messages());
}

#[test]
fn a_missing_notify_socket_is_one_line_and_the_master_serves() {
    let dir = std::env::temp_dir().join(format!("respawn-systemd-{}-missing", std::process::id()));
    let path = dir.join("nobody-here");
    let shown = path.display().to_string();
    // Many failing sends: readiness, a watchdog every 10 ms, a rollout, a stop.
    let mut respawn = Respawn::start_with(&["--workers", "2"], |command| {
        command.env("NOTIFY_SOCKET", &path).env("WATCHDOG_USEC", "20000");
    });
    respawn.wait_for_workers(2);
    assert_eq!(respawn.get("/").expect("GET / answers").status, 200);
    respawn.signal(libc::SIGHUP);
    respawn.wait_for_line("rolling restart done: every worker is new");
    assert_eq!(respawn.get("/").expect("GET / answers").status, 200);
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());

    let warned: Vec<String> = respawn
        .log()
        .into_iter()
        .filter(|l| l.contains(&shown) && !l.contains(" DEBUG]"))
        .collect();
    assert_eq!(warned.len(), 1, "one line: {warned:?}\n{}", respawn.dump());
    assert_eq!(
        message(&warned[0]),
        format!(
            "sending STATUS=0 workers, generation 0 to systemd (NOTIFY_SOCKET {shown}): \
             no such file or directory; serving on, and later failures are not logged"
        ),
        "the first send, the first line: {}",
        warned[0]
    );
    assert!(warned[0].contains(" WARN "), "{}", warned[0]);
}

#[test]
fn workers_do_not_inherit_the_notify_socket_or_its_variables() {
    let mut systemd = Systemd::new("workers");
    let respawn = systemd.start(&["--workers", "2"], &[("WATCHDOG_USEC", "60000000")]);
    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    let workers = respawn.wait_for_workers(2);

    // The master holds one Unix datagram socket, the notify socket; no
    // worker does.
    let master = unix_sockets(respawn.pid);
    assert_eq!(master.len(), 1, "the master's notify socket: {master:?}");
    for &worker in &workers {
        let held = unix_sockets(worker);
        assert!(held.is_empty(), "worker {worker} holds {held:?}");
    }
    // The variables are gone from what getenv reads, in the master and in
    // every worker forked from it (so also in what they would exec).
    // Reading another process's memory takes ptrace access, which Yama or a
    // container may deny: then this part cannot run, for any of them. Once
    // the master's can be read, every process's must be.
    let mem = format!("/proc/{}/mem", respawn.pid);
    if let Err(err) = std::fs::File::open(&mem) {
        skip(
            "workers_do_not_inherit_the_notify_socket_or_its_variables (the environment)",
            Skip::Environment,
            &format!("opening {mem}: {err}"),
        );
        return;
    }
    for pid in std::iter::once(respawn.pid).chain(workers) {
        let env = live_environment(pid)
            .unwrap_or_else(|why| panic!("the environment of process {pid}: {why}\n{}", respawn.dump()));
        assert!(
            env.iter().any(|v| v.starts_with("RUST_LOG=")),
            "found the environment: {env:?}"
        );
        let leaked: Vec<&String> = env
            .iter()
            .filter(|v| v.starts_with("NOTIFY_SOCKET=") || v.starts_with("WATCHDOG_"))
            .collect();
        assert!(leaked.is_empty(), "process {pid} still has {leaked:?}");
    }
}

/// The inodes of the Unix datagram sockets a process holds
/// (`/proc/net/unix` lists every Unix socket of the network namespace).
fn unix_sockets(pid: i32) -> Vec<String> {
    let unix = std::fs::read_to_string("/proc/net/unix").expect("reading /proc/net/unix");
    let inodes: Vec<&str> = unix
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|fields| fields.get(4) == Some(&"0002")) // SOCK_DGRAM
        .filter_map(|fields| fields.get(6).copied())
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|err| panic!("listing /proc/{pid}/fd: {err}"))
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.ok()?.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .to_owned();
            inodes.contains(&inode.as_str()).then_some(inode)
        })
        .collect()
}

/// The environment as getenv sees it now. /proc/PID/environ cannot say: it
/// shows the strings as they were at exec, and unsetenv only takes a
/// pointer out of the `environ` array. So this reads that array, where exec
/// put it: on the stack, right after argc and the argv pointers. (It would
/// miss a change made after a setenv moved the array to the heap; nothing
/// in the master calls setenv.) Err says which step failed.
fn live_environment(pid: i32) -> Result<Vec<String>, String> {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{what}"))
            .map_err(|err| format!("reading /proc/{pid}/{what}: {err}"))
    };
    let stat = read("stat")?;
    // Fields from the state on (field 3); env_start and env_end are fields
    // 50 and 51. Not arg_start (48): the process title (title.rs) points
    // it at a buffer of its own, away from where exec put the arguments.
    let fields: Vec<u64> = stat[stat.rfind(')').ok_or("no ')' in stat")? + 2..]
        .split(' ')
        .map(|f| f.trim().parse().unwrap_or(0))
        .collect();
    let (env_start, env_end) = match (fields.get(47), fields.get(48)) {
        (Some(&start), Some(&end)) if start < end => (start, end),
        _ => return Err(format!("no env_start and env_end in {stat:?}")),
    };
    let maps = read("maps")?;
    let (low, high) = maps
        .lines()
        .find(|l| l.ends_with("[stack]"))
        .and_then(|stack| stack.split(' ').next()?.split_once('-'))
        .and_then(|(low, high)| {
            Some((
                u64::from_str_radix(low, 16).ok()?,
                u64::from_str_radix(high, 16).ok()?,
            ))
        })
        .ok_or_else(|| format!("no [stack] in /proc/{pid}/maps"))?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|err| format!("opening /proc/{pid}/mem: {err}"))?;
    let mut bytes = vec![0; usize::try_from(high - low).map_err(|err| err.to_string())?];
    mem.read_exact_at(&mut bytes, low)
        .map_err(|err| format!("reading the stack from /proc/{pid}/mem: {err}"))?;
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()))
        .collect();
    // argc, then argc pointers into the argument strings (on the stack,
    // right below the environment's), then NULL: then the environment's
    // pointers, into env_start..env_end, to NULL.
    let strings = |range: std::ops::Range<u64>, from: usize| {
        words[from..]
            .iter()
            .take_while(|&&p| p != 0)
            .all(|p| range.contains(p))
    };
    let argv = (1..words.len())
        .find(|&i| {
            let argc = words[i - 1] as usize;
            (1..4096).contains(&argc)
                && words.get(i + argc) == Some(&0)
                && words[i..i + argc].iter().all(|&p| (low..env_start).contains(&p))
                && words
                    .get(i + argc + 1)
                    .is_some_and(|p| (env_start..env_end).contains(p))
                && strings(env_start..env_end, i + argc + 1)
        })
        .ok_or_else(|| format!("no argc, argv and environment pointers on the stack of {pid}"))?;
    let argc = words[argv - 1] as usize;
    let mut env = Vec::new();
    for &pointer in words[argv + argc + 1..].iter().take_while(|&&p| p != 0) {
        let mut text = vec![0; 4096];
        let n = mem
            .read_at(&mut text, pointer)
            .map_err(|err| format!("reading a variable at {pointer:#x}: {err}"))?;
        let end = text[..n].iter().position(|&b| b == 0).unwrap_or(n);
        env.push(String::from_utf8_lossy(&text[..end]).into_owned());
    }
    Ok(env)
}

/// USR2 under `Type=notify-reload`: RELOADING=1 when it begins, READY=1
/// from the re-executed master (the same pid, which systemd keeps as the
/// main one) once its workers are Ready; the watchdog goes on after it.
#[test]
fn notify_reloading_and_ready_around_an_upgrade_and_the_watchdog_goes_on() {
    let mut systemd = Systemd::new("upgrade");
    let deploy = Deploy::new("notify");
    let path = systemd.path();
    let respawn = deploy.start_with(&["--workers", "2"], |command| {
        command.env("NOTIFY_SOCKET", &path).env("WATCHDOG_USEC", "400000");
    });
    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    respawn.wait_for_workers(2);

    deploy.replace_with_build("n");
    respawn.signal(libc::SIGUSR2);
    systemd.wait_for(&respawn, "RELOADING=1", |m| {
        m.starts_with("RELOADING=1\nMONOTONIC_USEC=")
    });
    let ready = systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    respawn.wait_for_log("the master re-executing", |l| {
        message(l).starts_with("master re-executed as ")
    });
    assert!(ready.contains("STATUS=2 workers"), "{ready:?}");
    let pings = systemd.count("WATCHDOG=1");
    systemd.wait_for(&respawn, "a WATCHDOG=1 after the upgrade", |m| m == "WATCHDOG=1");
    assert!(systemd.count("WATCHDOG=1") > pings);
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("respawn {} n", env!("CARGO_PKG_VERSION"))
    );
}

/// A back-out is the end of the reload too: READY=1 once the old version
/// serves alone again, so that `systemctl reload` does not hang.
#[test]
fn notify_ready_after_a_backed_out_upgrade() {
    let mut systemd = Systemd::new("backout");
    let deploy = Deploy::new("notify-backout");
    let path = systemd.path();
    let respawn = deploy.start_with(&["--workers", "2"], |command| {
        command.env("NOTIFY_SOCKET", &path);
    });
    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    respawn.wait_for_workers(2);
    deploy.replace_with("exit 1");
    respawn.signal(libc::SIGUSR2);
    systemd.wait_for(&respawn, "RELOADING=1", |m| m.starts_with("RELOADING=1"));
    let ready = systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1\n"));
    // The reload systemd waits for ends with why: the new binary failed.
    assert!(
        ready.starts_with("READY=1\nSTATUS=upgrade failed: backed out: worker ")
            && ready.contains("(code 1)"),
        "{ready:?}"
    );
    respawn.wait_for_log("the back-out", |l| l.contains("backed out"));
}

/// A new binary whose workers start but which the master cannot execute
/// (it removed its own execute bit): the reload systemd waits for ends, with
/// READY=1 and a STATUS= that says why, and the same master serves on.
#[test]
fn notify_ready_with_the_reason_after_a_failed_reexec() {
    let mut systemd = Systemd::new("failed-exec");
    let deploy = Deploy::new("notify-noexec");
    let path = systemd.path();
    let respawn = deploy.start_with(&["--workers", "1"], |command| {
        command.env("NOTIFY_SOCKET", &path);
    });
    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    respawn.wait_for_workers(1);
    deploy.replace_with(&format!("chmod a-x \"$0\"\nexec '{}' \"$@\"", binary().display()));
    respawn.signal(libc::SIGUSR2);
    systemd.wait_for(&respawn, "RELOADING=1", |m| m.starts_with("RELOADING=1"));
    let ready = systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1\n"));
    assert!(
        ready.starts_with("READY=1\nSTATUS=upgrade failed: re-executing the master as ")
            && ready.contains("permission denied"),
        "{ready:?}\n{}",
        respawn.dump()
    );
    assert!(alive(respawn.pid));
    respawn.wait_for_line("rolling restart done: every worker is new");
}

/// A watchdog that systemd keeps for another process (WATCHDOG_PID names
/// it) stays that process's across an upgrade: the re-executed master,
/// though it is the same pid, neither pings it nor says it is its own.
#[test]
fn watchdog_pid_of_another_process_is_not_claimed_by_an_upgrade() {
    let mut systemd = Systemd::new("watchdog-pid-upgrade");
    let deploy = Deploy::new("watchdog-pid");
    let path = systemd.path();
    let respawn = deploy.start_with(&["--workers", "1"], |command| {
        command
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "100000")
            .env("WATCHDOG_PID", "1");
    });
    let not_ours = "WATCHDOG_PID is 1, not this process: no watchdog pings";
    respawn.wait_for_line(not_ours);
    systemd.wait_for(&respawn, "READY=1", |m| m.starts_with("READY=1"));
    respawn.wait_for_workers(1);

    deploy.replace_with_build("n");
    respawn.signal(libc::SIGUSR2);
    respawn.wait_for_log("the master re-executing", |l| {
        message(l).starts_with("master re-executed as ")
    });
    systemd.wait_for(&respawn, "READY=1 after the upgrade", |m| {
        m.starts_with("READY=1")
    });
    // Twenty times the interval it would have pinged at.
    systemd.read_for(Duration::from_secs(1));
    assert_eq!(systemd.count("WATCHDOG=1"), 0, "{:?}", systemd.messages());
    // The new image read the variables again, and found the watchdog is
    // still another's.
    assert!(
        wait_until(PATIENCE, || respawn.count_lines(not_ours) == 2),
        "{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("respawn {} n", env!("CARGO_PKG_VERSION"))
    );
}
