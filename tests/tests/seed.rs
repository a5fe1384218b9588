//! The seed article's program (master/examples/seed.rs), run as a newcomer
//! runs it: it serves from one worker per CPU, a worker killed from outside
//! is replaced ('exit'), and a route that throws is answered while the
//! replacement is forked ('message', suicide), the count never changing.

use respawn_tests::*;
use std::path::PathBuf;

/// The example beside the demo binary of the same build (`cargo test
/// --workspace` builds the examples of the packages it tests).
fn seed() -> PathBuf {
    let demo = binary();
    let examples = demo
        .parent()
        .expect("the target profile directory")
        .join("examples");
    examples.join("seed")
}

#[test]
fn the_seed_articles_program_heals_as_the_article_says() {
    let seed = seed();
    assert!(
        seed.exists(),
        "{} is missing: run 'make test', which builds the examples",
        seed.display()
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let respawn = Respawn::start_program(&seed, &[], |_| {});
    let workers = respawn.wait_for_workers(cpus);
    let answer = respawn.get("/").expect("GET /");
    assert!(answer.body.starts_with("handle by child "), "{answer:?}");
    assert!(workers.contains(&answer.pid().expect("a pid")));

    // taskkill /pid 524 /f: the 'exit' restarts it, the count the same.
    let victim = *workers.iter().next().expect("a worker");
    send(victim, libc::SIGKILL);
    let replaced = wait_until(PATIENCE, || {
        let now = respawn.workers();
        now.len() == cpus && !now.contains(&victim)
    });
    assert!(replaced, "{}", respawn.dump());

    // The hidden bug: answered, the replacement forked before the exit.
    let crash = respawn.get("/crash").expect("GET /crash");
    assert_eq!(crash.status, 500, "{crash:?}");
    assert!(crash.body.contains("panicked: a hidden bug"), "{crash:?}");
    let crashed = worker_pid(&crash.body).expect("the crashed worker's pid");
    respawn.wait_for_line(&format!(
        "worker {crashed} exited (code 70: panicked: a hidden bug, hit by GET /crash)"
    ));
    let log = respawn.log();
    let suicide = position(&log, |l| {
        message(l).starts_with(&format!("worker {crashed} sent suicide"))
    })
    .expect("suicide");
    let exited = position(&log, |l| {
        message(l).starts_with(&format!("worker {crashed} exited"))
    })
    .expect("exit");
    let spawned_between = log[suicide..exited]
        .iter()
        .filter(|l| message(l).ends_with(" spawned"))
        .count();
    assert_eq!(
        spawned_between,
        1,
        "one replacement, before the exit\n{}",
        respawn.dump()
    );
    assert_eq!(respawn.wait_for_workers(cpus).len(), cpus);
}
