//! Strays: what a worker leaves behind. A `-- CMD` program that daemonizes
//! (forks twice, and the middle process exits) leaves a grandchild that
//! holds the listening socket and serves on it; the master, the reaper of
//! its descendants, finds it, says it, and ends it with the workers, so
//! nothing serves unseen after a stop and the port is free again. And a
//! worker's last words, however often it says them, are one line.
//!
//! The workers are Python scripts that speak the protocol by hand
//! (docs/protocol.md); without python3 the tests are skipped (`require`).

use respawn_tests::*;
use std::path::{Path, PathBuf};

/// A worker that daemonizes a grandchild serving fd 3, before it says
/// Ready or after (`STRAY_WHEN`), and then only waits for SIGTERM: every
/// answer on the port is the grandchild's, `grandchild <pid>`. The
/// grandchild leaves the session (as daemons do: the master's process
/// group does not reach it), closes the channel and its stdio, ignores SIGTERM if
/// `STRAY_TERM=ignore`, and leaves a file named for its pid in `STRAY_DIR`
/// so that the test can kill it whatever happened (its own SIGALRM ends it
/// in 10 minutes if even that fails).
const DAEMONIZING_WORKER: &str = r#"
import os, signal, socket, struct, sys
ch = int(os.environ["RESPAWN_CHANNEL_FD"])
def frame(kind, text=b""):
    os.write(ch, struct.pack("<BBH", 1, kind, len(text)) + text)

def serve():
    os.setsid()
    os.close(ch)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    signal.alarm(600)
    # Not the worker's handler: SIGTERM ends a daemon by its default.
    term = signal.SIG_IGN if os.environ["STRAY_TERM"] == "ignore" else signal.SIG_DFL
    signal.signal(signal.SIGTERM, term)
    me = os.getpid()
    open(os.path.join(os.environ["STRAY_DIR"], "grandchild.%d" % me), "w").close()
    listener = socket.socket(fileno=3)
    listener.setblocking(True)
    body = b"grandchild %d\n" % me
    while True:
        conn, _ = listener.accept()
        head = b""
        while b"\r\n\r\n" not in head:
            more = conn.recv(4096)
            if not more:
                break
            head += more
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        conn.close()

def daemonize():
    middle = os.fork()
    if middle:
        # Once the middle is gone, the grandchild is an orphan: the
        # master's child, if the master is the reaper of its descendants.
        os.waitpid(middle, 0)
        return
    if os.fork() == 0:
        try:
            serve()
        finally:
            os._exit(1)
    os._exit(0)

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if os.environ["STRAY_WHEN"] == "before":
    daemonize()
    frame(1)
else:
    frame(1)
    daemonize()
while True:
    signal.pause()
"#;

/// A worker that says Ready, and then, the first of its kind only (the one
/// that creates `MARK`), sends 500 Suicide frames and exits 0; the others
/// wait for SIGTERM, so that the replacement does not do it again.
const SUICIDAL_WORKER: &str = r#"
import os, signal, struct, sys
ch = int(os.environ["RESPAWN_CHANNEL_FD"])
def frame(kind, text=b""):
    os.write(ch, struct.pack("<BBH", 1, kind, len(text)) + text)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
frame(1)
try:
    os.close(os.open(os.environ["MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
except FileExistsError:
    while True:
        signal.pause()
for _ in range(500):
    frame(2, b"enough")
sys.exit(0)
"#;

/// A worker that ignores SIGTERM (so a stop kills it at the graceful
/// timeout) and has a child that ignores it too: an ordinary child, the
/// worker's, which the master cannot see until the worker's death orphans
/// it. The child writes its pid down in `STRAY_DIR` as the grandchildren
/// above do.
const WORKER_WITH_A_CHILD: &str = r#"
import os, signal, struct
ch = int(os.environ["RESPAWN_CHANNEL_FD"])
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.close(ch)
    signal.alarm(600)
    open(os.path.join(os.environ["STRAY_DIR"], "grandchild.%d" % os.getpid()), "w").close()
    while True:
        signal.pause()
os.write(ch, struct.pack("<BBH", 1, 1, 0))
while True:
    signal.pause()
"#;

/// A test's scripts, and the pids its grandchildren wrote down: whatever
/// the test found, every one of them is killed when this is dropped, since
/// neither the master nor the harness's kill of its process group reaches
/// a grandchild that outlived the master in a session of its own.
struct Scripts(TempDir);

impl Scripts {
    fn new(name: &str) -> Scripts {
        Scripts(TempDir::new(&format!("respawn-strays-{name}")))
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("writing a script");
        path.display().to_string()
    }

    fn dir(&self) -> &Path {
        &self.0
    }

    /// The grandchildren that wrote their pid down.
    fn grandchildren(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_prefix("grandchild.")?.parse().ok()
            })
            .collect()
    }
}

impl Drop for Scripts {
    fn drop(&mut self) {
        for pid in self.grandchildren() {
            if alive(pid) {
                send(pid, libc::SIGKILL);
            }
        }
    }
}

/// Starts one daemonizing worker under `respawn` with `flags`, and waits
/// until its grandchild answers on the port; returns the grandchild's pid.
/// A grandchild orphaned before the worker's Ready is then said, with
/// nothing more sent to the master: it looks shortly after the Ready and
/// the middle process's exit on a deadline of its own (strays.rs, SOON).
fn start_daemonizing(scripts: &Scripts, when: &str, term: &str, flags: &[&str]) -> (Respawn, i32) {
    let worker = scripts.write("daemonizing.py", DAEMONIZING_WORKER);
    let mut args = vec!["--workers", "1"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "python3", &worker]);
    let dir: PathBuf = scripts.dir().to_path_buf();
    let respawn = Respawn::start_with(&args, |command| {
        command
            .env("STRAY_WHEN", when)
            .env("STRAY_TERM", term)
            .env("STRAY_DIR", &dir);
    });
    respawn.wait_for_log("the worker's Ready", |l| worker_says(l, "ready").is_some());
    let answer = respawn.get("/").expect("GET / (the grandchild serves it)");
    let grandchild = answer
        .body
        .strip_prefix("grandchild ")
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("not the grandchild's answer: {answer:?}\n{}", respawn.dump()));
    assert_eq!(
        scripts.grandchildren(),
        vec![grandchild],
        "one grandchild, the one that answered"
    );
    if when == "before" {
        respawn.wait_for_line(&found_line(grandchild));
    }
    (respawn, grandchild)
}

/// The lines that say a stray was found (`process <pid> (comm) outlived
/// ...`), each with its pid.
fn stray_lines(respawn: &Respawn) -> Vec<(i32, String)> {
    respawn
        .log()
        .iter()
        .filter_map(|l| {
            let (pid, rest) = message(l).strip_prefix("process ")?.split_once(' ')?;
            if !rest.contains(") outlived the worker that started it") {
                return None;
            }
            Some((pid.parse().ok()?, l.clone()))
        })
        .collect()
}

/// What the master says when it finds `pid`, a `python3`.
fn found_line(pid: i32) -> String {
    format!(
        "process {pid} (python3) outlived the worker that started it and is now the master's \
         child: it is no worker, it may hold the listening socket, and it is stopped with the \
         workers"
    )
}

/// The log line's level, `INFO` in `[2026-11-25T18:39:57.419Z INFO ] ...`.
fn level(line: &str) -> &str {
    line.split_once("] ")
        .and_then(|(head, _)| head.rsplit(' ').find(|word| !word.is_empty()))
        .unwrap_or_default()
}

/// After the master's exit: `pid` is no process at all (the master reaped
/// it, not init after the master was gone), and the port is free.
fn assert_gone_with_the_master(respawn: &Respawn, grandchild: i32) {
    assert!(
        !alive(grandchild),
        "the grandchild {grandchild} outlived the master\n{}",
        respawn.dump()
    );
    assert!(
        !Path::new(&format!("/proc/{grandchild}")).exists(),
        "the grandchild {grandchild} is a zombie nobody reaped\n{}",
        respawn.dump()
    );
    assert!(
        port_is_free(respawn.addr),
        "the port is held after the master exited\n{}",
        respawn.dump()
    );
}

/// Checks the log of a stop: the stray was said once, by the line a user
/// reads, at WARN (before the stop if `said_before_the_stop`), and the
/// master reaped it (`how`: `signal 15`, ...) before it said it was done.
fn assert_said_and_reaped(respawn: &Respawn, grandchild: i32, how: &str, said_before_the_stop: bool) {
    let log = respawn.log();
    let found = stray_lines(respawn);
    assert_eq!(
        found.iter().map(|(pid, _)| *pid).collect::<Vec<_>>(),
        vec![grandchild],
        "one stray found, the grandchild\n{}",
        respawn.dump()
    );
    let (_, line) = &found[0];
    assert_eq!(message(line), found_line(grandchild));
    assert_eq!(level(line), "WARN", "{line}");
    if said_before_the_stop {
        let said_at = position(&log, |l| l == line);
        let stop_at = position(&log, |l| {
            message(l).starts_with("received SIG") && !message(l).contains("means nothing")
        });
        assert!(
            matches!((said_at, stop_at), (Some(s), Some(t)) if s < t),
            "said soon after the worker's Ready was read, before the stop\n{}",
            respawn.dump()
        );
    }
    let reaped = format!("process {grandchild}, left by a worker, exited ({how})");
    let reaped_at = position(&log, |l| says(l, &reaped));
    let done_at = position(&log, |l| says(l, "all workers stopped, master exiting"));
    assert!(
        matches!((reaped_at, done_at), (Some(r), Some(d)) if r < d),
        "the master reaps the grandchild ({reaped:?}) before it exits\n{}",
        respawn.dump()
    );
}

#[test]
fn a_daemonized_descendant_is_found_said_and_stopped_with_the_workers() {
    const NAME: &str = "a_daemonized_descendant_is_found_said_and_stopped_with_the_workers";
    if !require(NAME, Need::Python) {
        return;
    }
    let scripts = Scripts::new("term");
    let (mut respawn, grandchild) = start_daemonizing(&scripts, "before", "obey", &[]);
    // Checked after the stop, so that a master that is not its reaper
    // fails on what matters more: the grandchild outlives it.
    let adopted = respawn.workers().contains(&grandchild);

    respawn.signal(libc::SIGTERM);
    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(0), "a graceful stop\n{}", respawn.dump());
    assert_gone_with_the_master(&respawn, grandchild);
    assert!(
        adopted,
        "the orphaned grandchild was the master's child\n{}",
        respawn.dump()
    );
    assert_said_and_reaped(&respawn, grandchild, "signal 15", true);
}

#[test]
fn int_kills_a_daemonized_descendant_now() {
    const NAME: &str = "int_kills_a_daemonized_descendant_now";
    if !require(NAME, Need::Python) {
        return;
    }
    let scripts = Scripts::new("int");
    // It ignores SIGTERM, and the graceful timeout is longer than the
    // test's patience: only a SIGKILL sent now ends it in time.
    let (mut respawn, grandchild) =
        start_daemonizing(&scripts, "before", "ignore", &["--graceful-timeout", "600"]);

    respawn.signal(libc::SIGINT);
    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", respawn.dump());
    assert_gone_with_the_master(&respawn, grandchild);
    assert_said_and_reaped(&respawn, grandchild, "signal 9", true);
}

#[test]
fn a_daemonized_descendant_that_ignores_term_is_killed_after_the_graceful_timeout() {
    const NAME: &str = "a_daemonized_descendant_that_ignores_term_is_killed_after_the_graceful_timeout";
    if !require(NAME, Need::Python) {
        return;
    }
    let scripts = Scripts::new("ignore");
    let (mut respawn, grandchild) =
        start_daemonizing(&scripts, "before", "ignore", &["--graceful-timeout", "1"]);

    respawn.signal(libc::SIGTERM);
    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", respawn.dump());
    assert_gone_with_the_master(&respawn, grandchild);
    assert_said_and_reaped(&respawn, grandchild, "signal 9", true);
    // Its worker obeyed the TERM: the KILL was for the grandchild alone.
    assert_eq!(respawn.count_log("did not stop within"), 0, "{}", respawn.dump());
}

/// A grandchild orphaned after the worker's Ready, while the worker lives:
/// nothing tells the master it has a new child (the middle's exit is the
/// worker's SIGCHLD, not the master's), so it is found on the first turn a
/// second after the master last looked: here a stray signal makes the turn
/// (an idle master still never wakes for it). It is said while the workers
/// serve, and ends with them.
#[test]
fn a_descendant_daemonized_after_ready_is_found_at_the_next_turn_and_stopped_with_the_workers() {
    const NAME: &str =
        "a_descendant_daemonized_after_ready_is_found_at_the_next_turn_and_stopped_with_the_workers";
    if !require(NAME, Need::Python) {
        return;
    }
    let scripts = Scripts::new("after");
    let (mut respawn, grandchild) = start_daemonizing(&scripts, "after", "obey", &[]);
    let found = wait_until(PATIENCE, || {
        if stray_lines(&respawn).iter().any(|(pid, _)| *pid == grandchild) {
            return true;
        }
        // A turn of the loop, with nothing else to do.
        respawn.signal(libc::SIGWINCH);
        std::thread::sleep(std::time::Duration::from_millis(200));
        false
    });
    assert!(
        found,
        "the grandchild was not said while the workers serve\n{}",
        respawn.dump()
    );

    respawn.signal(libc::SIGTERM);
    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", respawn.dump());
    assert_gone_with_the_master(&respawn, grandchild);
    assert_said_and_reaped(&respawn, grandchild, "signal 15", true);
}

#[test]
fn a_worker_that_sends_suicide_repeatedly_is_one_line() {
    const NAME: &str = "a_worker_that_sends_suicide_repeatedly_is_one_line";
    if !require(NAME, Need::Python) {
        return;
    }
    let scripts = Scripts::new("suicide");
    let worker = scripts.write("suicidal.py", SUICIDAL_WORKER);
    let mark = scripts.dir().join("said-it");
    let respawn = Respawn::start_with(&["--workers", "1", "--", "python3", &worker], |command| {
        command.env("MARK", &mark);
    });
    let line = respawn.wait_for_log("the first Suicide", |l| {
        message(l).contains(" sent suicide (enough)")
    });
    let pid = worker_pid(&line).expect("a pid in the line");
    // Every frame is read by the time its exit is said (the pipe is read
    // to its end at the reap).
    respawn.wait_for_line(&format!("worker {pid} exited (code 0: enough)"));
    let replacement = respawn.wait_for_workers(1);
    assert!(!replacement.contains(&pid));

    let log = respawn.log();
    let said: Vec<&String> = log
        .iter()
        .filter(|l| message(l).starts_with(&format!("worker {pid} sent suicide")))
        .collect();
    let info: Vec<&&String> = said.iter().filter(|l| level(l) != "DEBUG").collect();
    assert_eq!(
        info.len(),
        1,
        "one line above DEBUG for 500 Suicide frames, not {}; the first two: {:?}",
        info.len(),
        &info[..info.len().min(2)]
    );
    assert_eq!(
        message(info[0]),
        format!("worker {pid} sent suicide (enough); replacing it")
    );
    assert_eq!(level(info[0]), "INFO", "{}", info[0]);
    let again = format!("worker {pid} sent suicide again (enough)");
    assert_eq!(
        said.iter().filter(|l| says(l, &again)).count(),
        499,
        "the master read every frame, and said the others at DEBUG\n{}",
        respawn.dump()
    );
}

/// Three workers that each leave a grandchild within the same second: the
/// lines are rate-limited, but none goes unsaid. Each grandchild is named,
/// in a line of its own or in the one that sums up the others, while the
/// master serves (not only at a stop, which may be days later).
#[test]
fn the_descendants_of_several_workers_are_each_said() {
    const NAME: &str = "the_descendants_of_several_workers_are_each_said";
    if !require(NAME, Need::Python) {
        return;
    }
    let scripts = Scripts::new("several");
    let worker = scripts.write("daemonizing.py", DAEMONIZING_WORKER);
    let dir = scripts.dir().to_path_buf();
    let mut respawn = Respawn::start_with(&["--workers", "3", "--", "python3", &worker], |command| {
        command
            .env("STRAY_WHEN", "before")
            .env("STRAY_TERM", "obey")
            .env("STRAY_DIR", &dir);
    });
    let mut grandchildren = Vec::new();
    assert!(
        wait_until(PATIENCE, || {
            grandchildren = scripts.grandchildren();
            grandchildren.len() == 3
        }),
        "three grandchildren, not {grandchildren:?}\n{}",
        respawn.dump()
    );
    for &pid in &grandchildren {
        respawn.wait_for_log(&format!("a WARN line naming {pid}"), |l| {
            level(l) == "WARN" && names_a_stray(message(l), pid)
        });
    }
    assert_eq!(
        respawn.count_log("received SIG"),
        0,
        "said while serving, before any stop"
    );

    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    for &pid in &grandchildren {
        assert_gone_with_the_master(&respawn, pid);
    }
}

/// A stop's graceful timeout bounds the whole stop: a process that a
/// worker killed at that timeout leaves behind is killed at once, not
/// given a graceful timeout of its own (which would double the stop, past
/// the `TimeoutStopSec` that deploy.md sets 10 s above the graceful
/// timeout).
#[test]
fn a_child_orphaned_at_the_graceful_timeout_is_killed_at_once() {
    const NAME: &str = "a_child_orphaned_at_the_graceful_timeout_is_killed_at_once";
    if !require(NAME, Need::Python) {
        return;
    }
    const GRACEFUL: u64 = 3;
    let scripts = Scripts::new("orphaned-at-timeout");
    let worker = scripts.write("with-a-child.py", WORKER_WITH_A_CHILD);
    let dir = scripts.dir().to_path_buf();
    let graceful = GRACEFUL.to_string();
    let mut respawn = Respawn::start_with(
        &[
            "--workers",
            "1",
            "--graceful-timeout",
            &graceful,
            "--",
            "python3",
            &worker,
        ],
        |command| {
            command.env("STRAY_DIR", &dir);
        },
    );
    let mut children = Vec::new();
    assert!(
        wait_until(PATIENCE, || {
            children = scripts.grandchildren();
            children.len() == 1
        }),
        "the worker's child, not {children:?}\n{}",
        respawn.dump()
    );
    let child = children[0];
    respawn.wait_for_log("the worker's Ready", |l| worker_says(l, "ready").is_some());

    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert_gone_with_the_master(&respawn, child);
    assert_said_and_reaped(&respawn, child, "signal 9", false);
    // Measured from the log's own clock: the child is reaped well within
    // a graceful timeout of its worker's kill, where the kill of a child
    // given a timeout of its own could not come before it.
    let log = respawn.log();
    let killed = log
        .iter()
        .find(|l| message(l).ends_with(&format!("did not stop within {GRACEFUL} s; killing it")))
        .unwrap_or_else(|| panic!("the worker is killed at the timeout\n{}", respawn.dump()));
    let reaped = log
        .iter()
        .find(|l| {
            says(
                l,
                &format!("process {child}, left by a worker, exited (signal 9)"),
            )
        })
        .expect("checked above");
    let waited = millis(reaped) - millis(killed);
    assert!(
        waited < GRACEFUL as i64 * 1000,
        "the orphan was killed {waited} ms after its worker, a graceful timeout later\n{}",
        respawn.dump()
    );
}

/// Does `said` name `pid` as a stray, in a line of its own or in the line
/// that sums up several?
fn names_a_stray(said: &str, pid: i32) -> bool {
    said.starts_with(&format!("process {pid} (python3) outlived the worker"))
        || (said.contains(" more process")
            && said.contains(" found: ")
            && said.contains(&format!(" {pid} (python3)")))
}

/// The time of day of a log line, in ms: `[2026-11-25T18:39:57.419Z ...`.
fn millis(line: &str) -> i64 {
    let time = line
        .split_once('T')
        .and_then(|(_, rest)| rest.split_once('Z'))
        .map(|(time, _)| time)
        .unwrap_or_else(|| panic!("no time in {line:?}"));
    let parts: Vec<f64> = time.split(':').filter_map(|p| p.parse().ok()).collect();
    let [h, m, s] = parts[..] else {
        panic!("no time in {line:?}");
    };
    ((h * 3600.0 + m * 60.0 + s) * 1000.0).round() as i64
}
