//! `--pid-file`: the master's pid, written at start (before any worker is
//! Ready), removed on a clean stop, never taken from another live master,
//! even one whose workers are still starting. What root does with the file
//! in a directory another user can write is in security.rs.

use respawn_tests::*;
use std::path::PathBuf;

/// A directory of this test's own for its pid file, removed even if the
/// test fails (a master killed by the harness leaves its file behind).
struct Scratch(TempDir);

impl Scratch {
    fn new(test: &str) -> Scratch {
        Scratch(TempDir::new(&format!("respawn-{test}")))
    }

    fn pid_file(&self) -> PathBuf {
        self.0.join("respawn.pid")
    }

    fn pid_file_arg(&self) -> String {
        self.pid_file().display().to_string()
    }
}

/// Waits until the pid file says `pid` (and a newline: a reader must
/// never see half a write); fails with the log if it does not.
fn wait_for_pid_file(respawn: &Respawn, scratch: &Scratch, pid: i32) {
    let expected = format!("{pid}\n");
    let mut last = None;
    let written = wait_until(PATIENCE, || {
        last = std::fs::read_to_string(scratch.pid_file()).ok();
        last.as_deref() == Some(expected.as_str())
    });
    assert!(
        written,
        "the pid file holds {last:?}, not {expected:?}\n{}",
        respawn.dump()
    );
}

#[test]
fn the_pid_file_is_written_at_start_and_removed_on_stop() {
    let scratch = Scratch::new("pidfile-written");
    let pid_file = scratch.pid_file_arg();
    let mut respawn = Respawn::with_workers(2, &["--pid-file", &pid_file]);
    wait_for_pid_file(&respawn, &scratch, respawn.pid);
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert!(
        !scratch.pid_file().exists(),
        "the pid file is left after a clean stop"
    );
    let left: Vec<_> = std::fs::read_dir(&scratch.0).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// Workers that never say Ready (and are never killed for it): the pid file
/// names the master all the same, and a second master started meanwhile is
/// refused, as nginx, unicorn and gunicorn refuse it. Written only at Ready,
/// the file was free, and the second master ran on without one.
#[test]
fn a_second_master_started_before_the_first_is_ready_is_refused() {
    let scratch = Scratch::new("pidfile-not-ready");
    let pid_file = scratch.pid_file_arg();
    let first = Respawn::start(&[
        "--workers",
        "1",
        "--demo-hang-start",
        "--start-timeout",
        "0",
        "--pid-file",
        &pid_file,
    ]);
    first.wait_for_log("the worker's hang", |l| {
        l.ends_with("hangs before Ready on purpose (--demo-hang-start)")
    });
    wait_for_pid_file(&first, &scratch, first.pid);
    assert!(
        !first.log().iter().any(|l| worker_says(l, "ready").is_some()),
        "a worker said Ready\n{}",
        first.dump()
    );

    let (status, output) = run_to_exit(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--pid-file",
        &pid_file,
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output.lines().last(),
        Some(
            format!(
                "respawn: pid file {pid_file}: held by running master {}",
                first.pid
            )
            .as_str()
        ),
        "{output}"
    );
    assert!(!output.contains(" spawned"), "the second master forked\n{output}");
    assert_eq!(
        std::fs::read_to_string(scratch.pid_file()).ok(),
        Some(format!("{}\n", first.pid))
    );
}

#[test]
fn a_pid_file_held_by_a_live_master_is_not_overwritten() {
    let scratch = Scratch::new("pidfile-held");
    let pid_file = scratch.pid_file_arg();
    let first = Respawn::with_workers(1, &["--pid-file", &pid_file]);
    wait_for_pid_file(&first, &scratch, first.pid);

    let (status, output) = run_to_exit(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--pid-file",
        &pid_file,
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output.lines().last(),
        Some(
            format!(
                "respawn: pid file {pid_file}: held by running master {}",
                first.pid
            )
            .as_str()
        ),
        "{output}"
    );
    assert!(!output.contains(" spawned"), "the second master forked\n{output}");

    // The first one still serves, and still owns the file.
    assert_eq!(first.get("/").map(|r| r.status).ok(), Some(200));
    assert_eq!(
        std::fs::read_to_string(scratch.pid_file()).ok(),
        Some(format!("{}\n", first.pid))
    );
}

#[test]
fn a_stale_pid_file_is_replaced() {
    let scratch = Scratch::new("pidfile-stale");
    let pid_file = scratch.pid_file_arg();
    // A child of ours, reaped: its pid is free.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    // A live process that is not a respawn master: this test.
    let me = std::process::id();
    let my_name = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.file_name()?.to_string_lossy().into_owned()))
        .unwrap();
    // A worker of another master: it runs respawn, but is no master.
    let other = Respawn::with_workers(1, &[]);
    let worker = *other.wait_for_workers(1).iter().next().expect("a worker");
    for (content, why) in [
        (format!("{dead}\n"), format!("pid {dead} is not running")),
        // Its size, never its content: the log is no way to read a file.
        ("garbage".to_owned(), "holds no pid (7 bytes)".to_owned()),
        (format!("{me}\n"), format!("pid {me} runs {my_name}, not respawn")),
        (
            format!("{worker}\n"),
            format!("pid {worker} is a worker, not a master"),
        ),
    ] {
        std::fs::write(scratch.pid_file(), &content).unwrap();
        let respawn = Respawn::with_workers(1, &["--pid-file", &pid_file]);
        respawn.wait_for_line(&format!("pid file {pid_file}: {why}; replacing it"));
        wait_for_pid_file(&respawn, &scratch, respawn.pid);
    }
}

/// Written at the claim, the file must go with a master that fails after
/// it (here: its control socket cannot be bound), or it names a dead pid
/// that a script would signal.
#[test]
fn a_master_that_fails_after_its_claim_leaves_no_pid_file() {
    let scratch = Scratch::new("pidfile-failed");
    let pid_file = scratch.pid_file_arg();
    let control = scratch.0.join("no-such-dir").join("control.sock");
    let control = control.display().to_string();
    let (status, output) = run_to_exit(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--pid-file",
        &pid_file,
        "--control",
        &control,
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output
            .lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("respawn: binding control socket {control}: "))),
        "{output}"
    );
    // Nor did it say it listens: nobody was ever served.
    assert!(!output.contains("listening on"), "{output}");
    let left: Vec<_> = std::fs::read_dir(&scratch.0).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}\n{output}");
}
