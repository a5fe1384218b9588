//! The harness's own promise: nothing a test starts outlives the test
//! process, however it ends, and nothing is killed before the test is done.

use respawn_tests::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::thread;

/// Set in the environment of the copy of this binary that holds a master.
const HOLD: &str = "RESPAWN_TESTS_HOLD_A_MASTER";

#[test]
fn a_master_dies_with_the_test_process_that_started_it() {
    // Run this test binary again, for `hold_a_master` only: it starts a
    // master, says its pids, and waits. Then kill it as an impatient user
    // or a CI timeout would: SIGKILL, no destructor runs.
    let mut holder = Command::new(std::env::current_exe().expect("this test's executable"))
        .args(["--exact", "hold_a_master", "--nocapture"])
        .env(HOLD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting a copy of this test binary");
    let stdout = holder.stdout.take().expect("stdout is piped");
    // Bounded: the holder exits after PATIENCE at the latest.
    let said = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let pids = line.strip_prefix("holding ")?;
            pids.split(' ')
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<i32>>>()
        });
    send(holder.id() as i32, libc::SIGKILL);
    let _ = holder.wait();
    let Some(pids) = said else {
        panic!("the holder never said which master it holds");
    };
    let (master, workers) = (pids[0], &pids[1..]);
    assert_eq!(workers.len(), 2, "{pids:?}");

    let gone = wait_until(PATIENCE, || pids.iter().all(|&pid| !alive(pid)));
    // Clean up after a failure, so that the failure is the only harm done.
    for &pid in &pids {
        send(pid, libc::SIGKILL);
    }
    assert!(
        gone,
        "master {master} and workers {workers:?} outlived the test process that started them"
    );
}

/// Not a test on its own: the other half of the one above.
#[test]
fn hold_a_master() {
    if std::env::var_os(HOLD).is_none() {
        return;
    }
    let respawn = Respawn::with_workers(2, &[]);
    let workers = respawn.wait_for_workers(2);
    let pids: Vec<String> = std::iter::once(respawn.pid)
        .chain(workers)
        .map(|pid| pid.to_string())
        .collect();
    println!("holding {}", pids.join(" "));
    // Waiting to be killed, not synchronising: the killer has what it needs.
    thread::sleep(PATIENCE);
}

#[test]
fn a_master_outlives_the_thread_that_started_it() {
    // PR_SET_PDEATHSIG fires when the thread that forked ends. A test may
    // start a master on a thread of its own and use it after that thread
    // is gone: the master must still be there.
    let respawn = thread::spawn(|| Respawn::with_workers(1, &[]))
        .join()
        .expect("starting a master on another thread");
    let workers = respawn.wait_for_workers(1);
    assert!(alive(respawn.pid), "the master is alive\n{}", respawn.dump());
    let answer = respawn.get("/").expect("the master serves");
    assert_eq!(answer.status, 200);
    assert_eq!(respawn.wait_for_workers(1), workers, "{}", respawn.dump());
}

/// Set in the environment of the copy of this binary that skips: `root`
/// for `Skip::Needs(Need::Root)`, anything else for `Skip::Environment`.
const SKIP_AS: &str = "RESPAWN_TESTS_SKIP_AS";

#[test]
fn a_skip_is_a_record_and_fails_where_the_machine_has_what_it_needs() {
    let dir = TempDir::new("respawn-harness-skips");
    let file = dir.join("skips.txt");
    // Runs `skip_as_told` in a copy of this binary: did it pass, and what
    // did it print?
    let run = |kind: &str, record: bool, fatal: bool| -> (bool, String) {
        let mut copy = Command::new(std::env::current_exe().expect("this test's executable"));
        copy.args(["--exact", "skip_as_told", "--nocapture"])
            .env(SKIP_AS, kind)
            .env_remove("RESPAWN_SKIPS")
            .env_remove("RESPAWN_SKIPS_FATAL")
            .stdin(Stdio::null());
        if record {
            copy.env("RESPAWN_SKIPS", &file);
        }
        if fatal {
            copy.env("RESPAWN_SKIPS_FATAL", "1");
        }
        let out = copy.output().expect("running a copy of this test binary");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let records = || std::fs::read_to_string(&file).unwrap_or_default();

    // Without RESPAWN_SKIPS (a plain `cargo test`): the loud line only.
    let (passed, said) = run("root", false, false);
    assert!(passed, "{said}");
    assert!(
        said.contains("\n*** SKIPPED harness: skip_as_told (needs root): asked to\tskip ***\n"),
        "{said}"
    );
    assert_eq!(records(), "");

    // With it: one line per skip, the tab in the reason made a space.
    let (passed, said) = run("root", true, false);
    assert!(passed, "{said}");
    let (passed, said) = run("kernel", true, true);
    assert!(passed, "an environment skip is allowed anywhere: {said}");
    assert_eq!(
        records(),
        "needs root\tharness: skip_as_told\tasked to skip\n\
         environment\tharness: skip_as_told\tasked to skip\n"
    );

    // Where the machine has what the test needs (CI), that skip fails,
    // and is still recorded.
    let (passed, said) = run("root", true, true);
    assert!(!passed, "a root skip under RESPAWN_SKIPS_FATAL fails: {said}");
    assert!(
        said.contains("harness: skip_as_told skipped (needs root: asked to\tskip), and RESPAWN_SKIPS_FATAL"),
        "{said}"
    );
    assert_eq!(records().lines().count(), 3, "{}", records());
}

/// Not a test on its own: the other half of the one above.
#[test]
fn skip_as_told() {
    let Some(kind) = std::env::var_os(SKIP_AS) else {
        return;
    };
    let kind = if kind == "root" {
        Skip::Needs(Need::Root)
    } else {
        Skip::Environment
    };
    skip("skip_as_told", kind, "asked to\tskip");
}
