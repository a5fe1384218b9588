//! USR2: the upgrade to the binary now on disk, and its back-out.
//!
//! Each test deploys the build's binary at a path of its own (a hard link,
//! so that the file at that path can be replaced without touching the
//! build), starts respawn from that path, and then replaces the file the
//! way a deploy does (a new file renamed over the old one): with a wrapper
//! script that runs the same binary with `RESPAWN_DEMO_TAG` set, which the
//! demo reports at `GET /version` (a second build, as far as a client can
//! tell); with a program that exits 1; with one that never says Ready.
//! Meanwhile clients ask for `/version` in a loop: no request may fail.

use respawn_tests::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// The version line of the build, as `GET /version` says it untagged.
fn untagged() -> String {
    let (_, out) = run_to_exit(&["--version"]);
    out.trim().to_owned()
}

/// An answer's start, and the version line or what went wrong.
type Answer = (Instant, Result<String, String>);

/// Clients asking `GET /version` in a loop on fresh connections; every
/// answer is kept with the moment its request started.
struct Versions {
    done: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    answers: Arc<Mutex<Vec<Answer>>>,
    clients: Vec<JoinHandle<()>>,
}

impl Versions {
    fn start(respawn: &Respawn, clients: usize) -> Versions {
        let done = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|_| {
                let addr = respawn.addr;
                let (done, answered, answers) = (done.clone(), answered.clone(), answers.clone());
                std::thread::spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        let answer = match get(addr, "/version") {
                            Ok(answer) if answer.status == 200 => Ok(answer.body.trim().to_owned()),
                            other => Err(format!("{other:?}")),
                        };
                        answers.lock().unwrap().push((started, answer));
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Versions {
            done,
            answered,
            answers,
            clients,
        }
    }

    /// Lets `more` answers come in from now on (bounded by PATIENCE).
    fn let_answer(&self, more: usize) {
        let goal = self.answered.load(Ordering::SeqCst) + more;
        assert!(
            wait_until(PATIENCE, || self.answered.load(Ordering::SeqCst) >= goal),
            "the clients got no {more} answers"
        );
    }

    fn stop(self) -> Vec<Answer> {
        self.done.store(true, Ordering::SeqCst);
        for client in self.clients {
            client.join().expect("a client thread");
        }
        let answers = self.answers.lock().unwrap();
        answers.clone()
    }
}

/// The answers that were not a version line: there must be none.
fn failures(answers: &[Answer]) -> Vec<String> {
    answers.iter().filter_map(|(_, a)| a.clone().err()).collect()
}

/// Waits for the master to say it re-executed; a back-out instead (one
/// more than the test caused before) fails at once, with its line.
fn wait_for_reexec(respawn: &Respawn) {
    wait_for_reexec_after(respawn, 0);
}

fn wait_for_reexec_after(respawn: &Respawn, backed_out_before: usize) {
    let mut outcome = None;
    let decided = wait_until(PATIENCE, || {
        let log = respawn.log();
        let backed_out: Vec<&String> = log.iter().filter(|l| l.contains("backed out")).collect();
        if backed_out.len() > backed_out_before {
            outcome = Some(Err(backed_out[backed_out_before].clone()));
        } else if log
            .iter()
            .any(|l| message(l).starts_with("master re-executed as "))
        {
            outcome = Some(Ok(()));
        }
        outcome.is_some()
    });
    match outcome {
        Some(Ok(())) => {}
        Some(Err(line)) => panic!("the upgrade backed out: {line}\n{}", respawn.dump()),
        None => panic!(
            "no re-execution within {PATIENCE:?} (decided: {decided})\n{}",
            respawn.dump()
        ),
    }
}

fn log_lines_with(respawn: &Respawn, needle: &str) -> Vec<String> {
    respawn.log().into_iter().filter(|l| l.contains(needle)).collect()
}

#[test]
fn usr2_upgrades_every_worker_and_then_the_master_without_a_failed_request() {
    let deploy = Deploy::new("good");
    let respawn = deploy.start(&["--workers", "2"]);
    let old = respawn.wait_for_workers(2);
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        untagged()
    );
    let versions = Versions::start(&respawn, 2);
    versions.let_answer(20);

    deploy.replace_with_build("v2");
    respawn.signal(libc::SIGUSR2);
    wait_for_reexec(&respawn);
    // The two new workers, and the old ones still finishing a request
    // (none, one or both, as the load has them): adopted with their pids.
    let line = respawn.wait_for_log("the re-executed line", |l| {
        message(l).starts_with("master re-executed as ")
    });
    let expected = format!(
        "master re-executed as {} (pid {} kept), ",
        deploy.shown(),
        respawn.pid
    );
    let adopted = message(&line)
        .strip_prefix(&expected)
        .and_then(|rest| {
            rest.strip_suffix(" workers adopted")
                .or_else(|| rest.strip_suffix(" worker adopted"))
        })
        .and_then(|n| n.parse::<usize>().ok());
    // Exactly the workers alive at the exec: every one spawned and not yet
    // said to have exited when the old image said it re-executes (one that
    // exits during the exec is still its child, adopted and then reaped).
    let log = respawn.log();
    let exec_at =
        position(&log, |l| message(l).starts_with("upgrade: every worker runs ")).expect("the exec line");
    let mut alive_at_exec = std::collections::BTreeSet::new();
    for line in &log[..exec_at] {
        if let Some(pid) = worker_says(line, "spawned") {
            alive_at_exec.insert(pid);
        } else if let Some(pid) = worker_pid(message(line)).filter(|_| message(line).contains(" exited (")) {
            alive_at_exec.remove(&pid);
        }
    }
    assert_eq!(
        adopted,
        Some(alive_at_exec.len()),
        "{line}: alive at the exec {alive_at_exec:?}\n{}",
        respawn.dump()
    );
    let new = respawn.wait_for_workers(2);
    let upgraded_at = Instant::now();
    versions.let_answer(50);
    let answers = versions.stop();

    assert_eq!(failures(&answers), Vec::<String>::new(), "{}", respawn.dump());
    let after: Vec<&String> = answers
        .iter()
        .filter(|(at, _)| *at > upgraded_at)
        .filter_map(|(_, a)| a.as_ref().ok())
        .collect();
    let v2 = format!("{} v2", untagged());
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|a| **a == v2),
        "old answers after the upgrade: {after:?}"
    );
    assert!(old.is_disjoint(&new), "old {old:?}, new {new:?}");
    assert!(
        old.iter().all(|&pid| !alive(pid)),
        "an old worker is left: {old:?}"
    );
    // The master is the same process, now running the new program.
    assert!(alive(respawn.pid));
    let environ = std::fs::read(format!("/proc/{}/environ", respawn.pid)).expect("the master's environ");
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|var| var == b"RESPAWN_DEMO_TAG=v2"),
        "the master did not re-execute through the new program"
    );
    assert_eq!(
        log_lines_with(&respawn, "upgrade: every worker runs").len(),
        1,
        "{}",
        respawn.dump()
    );
}

#[test]
fn an_upgraded_master_replaces_workers_stops_cleanly_and_still_finds_hung_ones() {
    let deploy = Deploy::new("after");
    let mut respawn = deploy.start(&["--workers", "2", "--timeout", "1"]);
    respawn.wait_for_workers(2);
    deploy.replace_with_build("v2");
    respawn.signal(libc::SIGUSR2);
    wait_for_reexec(&respawn);
    let upgraded = respawn.wait_for_workers(2);

    // The scoreboard was handed down: a hung worker is still found. Every
    // worker now is one the new image adopted (none was forked by it), so
    // the hung one writes its row into the scoreboard the old image made.
    let hung = respawn.get_raw("/hang");
    assert!(
        cut_without_an_answer(&hung),
        "the hung request is cut without an answer, not {hung:?}\n{}",
        respawn.dump()
    );
    let line = respawn.wait_for_log("the hung worker killed", |l| message(l).contains("hung"));
    let hung_pid = worker_pid(message(&line)).expect("the hung line names its worker");
    assert!(upgraded.contains(&hung_pid), "{line} names an adopted worker");

    // The adopted table is live: a killed worker is replaced.
    let upgraded = respawn.wait_for_workers(2);
    let victim = *upgraded.iter().next().expect("a worker");
    send(victim, libc::SIGKILL);
    respawn.wait_for_log("the replacement", |l| {
        message(l).starts_with(&format!("worker {victim} exited (signal 9)"))
    });
    let replaced = respawn.wait_for_workers(2);
    assert!(!replaced.contains(&victim));
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("{} v2", untagged())
    );

    let workers = respawn.workers();
    respawn.signal(libc::SIGTERM);
    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", respawn.dump());
    assert!(
        workers.iter().all(|&pid| !alive(pid)),
        "a worker outlived the master"
    );
}

#[test]
fn a_new_binary_that_exits_is_backed_out_and_a_later_upgrade_still_works() {
    let deploy = Deploy::new("exits");
    let respawn = deploy.start(&["--workers", "2"]);
    let old = respawn.wait_for_workers(2);
    let versions = Versions::start(&respawn, 2);

    deploy.replace_with("exit 1");
    respawn.signal(libc::SIGUSR2);
    let line = respawn.wait_for_log("the back-out", |l| l.contains("backed out"));
    assert!(line.contains(" WARN"), "{line}");
    let text = message(&line);
    let expected = format!("upgrade to {} backed out: its worker ", deploy.shown());
    assert!(text.starts_with(&expected), "{text}");
    assert!(
        text.contains(" exited (code 1) ")
            && text.ends_with("the running version serves on, and SIGUSR2 may be sent again"),
        "{text}"
    );
    versions.let_answer(20);
    // The old workers were never asked to stop.
    assert_eq!(respawn.wait_for_workers(2), old, "{}", respawn.dump());
    assert_eq!(
        log_lines_with(&respawn, "backed out").len(),
        1,
        "{}",
        respawn.dump()
    );
    assert!(log_lines_with(&respawn, "giving up").is_empty());

    // A good build later goes through.
    deploy.replace_with_build("v3");
    respawn.signal(libc::SIGUSR2);
    wait_for_reexec_after(&respawn, 1);
    respawn.wait_for_workers(2);
    versions.let_answer(20);
    let answers = versions.stop();
    assert_eq!(failures(&answers), Vec::<String>::new(), "{}", respawn.dump());
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("{} v3", untagged())
    );
}

#[test]
fn a_new_binary_that_never_says_ready_is_backed_out_at_the_start_deadline() {
    let deploy = Deploy::new("hangs");
    let respawn = deploy.start(&["--workers", "2", "--start-timeout", "1"]);
    let old = respawn.wait_for_workers(2);
    let versions = Versions::start(&respawn, 2);

    deploy.replace_with(&format!("exec '{}' \"$@\" --demo-hang-start", binary().display()));
    respawn.signal(libc::SIGUSR2);
    respawn.wait_for_log("the new worker hanging", |l| {
        l.contains("hangs before Ready on purpose")
    });
    // A second USR2 while this one is under way changes nothing.
    respawn.signal(libc::SIGUSR2);
    respawn.wait_for_log("the second USR2 refused", |l| {
        says(
            l,
            &format!(
                "received SIGUSR2 during an upgrade to {}; ignored (send it again once this one is done)",
                deploy.shown()
            ),
        )
    });
    let line = respawn.wait_for_log("the back-out", |l| l.contains("backed out"));
    assert!(message(&line).contains(" exited (signal 9) "), "{line}");
    versions.let_answer(20);
    assert_eq!(respawn.wait_for_workers(2), old, "{}", respawn.dump());
    let answers = versions.stop();
    assert_eq!(failures(&answers), Vec::<String>::new(), "{}", respawn.dump());
    let old_version = untagged();
    assert!(answers
        .iter()
        .all(|(_, a)| a.as_deref() == Ok(old_version.as_str())));
}

#[test]
fn usr2_with_nothing_executable_at_the_path_is_one_line() {
    let deploy = Deploy::new("missing");
    let respawn = deploy.start(&["--workers", "1"]);
    let old = respawn.wait_for_workers(1);
    std::fs::remove_file(&deploy.path).expect("removing the program");
    respawn.signal(libc::SIGUSR2);
    respawn.wait_for_log("the refusal", |l| {
        says(
            l,
            &format!(
                "received SIGUSR2, but {} cannot be executed (no such file or directory); \
                 the running version serves on",
                deploy.shown()
            ),
        )
    });
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        untagged()
    );
    assert_eq!(respawn.wait_for_workers(1), old);
}

/// The path a relative argv[0] names is resolved against the directory the
/// master started in, not against wherever it is later.
#[test]
fn the_program_is_found_where_it_was_started_from() {
    let deploy = Deploy::new("relative");
    let respawn = Respawn::start_program(Path::new("./respawn"), &["--workers", "1"], |command| {
        command.current_dir(&deploy.dir);
    });
    respawn.wait_for_workers(1);
    deploy.replace_with_build("rel");
    respawn.signal(libc::SIGUSR2);
    respawn.wait_for_log("the upgrade", |l| {
        says(
            l,
            &format!(
                "received SIGUSR2, upgrading to {}: each old worker stops once a new one is ready",
                deploy.shown()
            ),
        )
    });
    wait_for_reexec(&respawn);
    respawn.wait_for_workers(1);
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("{} rel", untagged())
    );
}

/// `kill -USR2 -- -PGID` and `systemctl kill -s USR2` (without
/// `--kill-whom=main`) signal every process: workers ignore it, as they
/// ignore the master's other controls, and the master upgrades once.
#[test]
fn usr2_to_the_whole_process_group_upgrades_once_and_kills_no_worker() {
    let deploy = Deploy::new("group");
    let respawn = deploy.start(&["--workers", "2"]);
    let old = respawn.wait_for_workers(2);
    deploy.replace_with_build("g");
    respawn.signal_group(libc::SIGUSR2);
    wait_for_reexec(&respawn);
    let new = respawn.wait_for_workers(2);
    assert!(old.is_disjoint(&new));
    assert_eq!(
        log_lines_with(&respawn, "received SIGUSR2").len(),
        1,
        "{}",
        respawn.dump()
    );
    assert!(
        log_lines_with(&respawn, "(signal 12)").is_empty(),
        "{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("{} g", untagged())
    );
}

/// The pid file names the master before and after: it keeps its pid. It
/// is removed on the clean stop that follows.
#[test]
fn the_pid_file_holds_the_same_pid_across_an_upgrade() {
    let deploy = Deploy::new("pidfile");
    let pid_file = deploy.dir.join("respawn.pid");
    let shown = pid_file.display().to_string();
    let mut respawn = deploy.start(&["--workers", "1", "--pid-file", &shown]);
    respawn.wait_for_workers(1);
    let read = || std::fs::read_to_string(&pid_file).unwrap_or_default();
    assert!(
        wait_until(PATIENCE, || read().trim() == respawn.pid.to_string()),
        "{}",
        respawn.dump()
    );
    deploy.replace_with_build("p");
    respawn.signal(libc::SIGUSR2);
    wait_for_reexec(&respawn);
    respawn.wait_for_workers(1);
    assert_eq!(read().trim(), respawn.pid.to_string(), "{}", respawn.dump());
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert!(!pid_file.exists(), "the pid file outlived a clean stop");
}

/// Someone who can write in the pid file's directory (the workers' user,
/// when it owns it) puts a directory where the file was, then an upgrade:
/// the new image cannot make the file its own, and before this it exited 1,
/// taking every worker with it. It says so and serves on; the directory's
/// WARN line is said once, by the first image, not again at each upgrade.
#[test]
fn a_pid_file_taken_before_an_upgrade_never_ends_the_service() {
    let deploy = Deploy::new("pidfile-taken");
    let dir = deploy.dir.join("open");
    std::fs::create_dir(&dir).expect("a directory");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod 0777");
    let pid_file = dir.join("respawn.pid");
    let shown = pid_file.display().to_string();
    let mut respawn = deploy.start(&["--workers", "1", "--pid-file", &shown]);
    respawn.wait_for_workers(1);
    std::fs::remove_file(&pid_file).expect("removing the pid file");
    std::fs::create_dir(&pid_file).expect("a directory at the pid file's path");
    for (n, tag) in ["a", "b"].into_iter().enumerate() {
        deploy.replace_with_build(tag);
        respawn.signal(libc::SIGUSR2);
        let reexecuted = wait_until(PATIENCE, || respawn.count_log("master re-executed as ") > n);
        assert!(reexecuted, "{}", respawn.dump());
        let answer = respawn.get("/version").expect("GET /version after the upgrade");
        assert_eq!(
            answer.body.trim(),
            format!("{} {tag}", untagged()),
            "{}",
            respawn.dump()
        );
    }
    let said = respawn.count_lines(&format!(
        "reading pid file {shown}: a directory is there, not a pid file; the master serves on without its pid file"
    ));
    assert_eq!(said, 2, "one line at each upgrade\n{}", respawn.dump());
    assert_eq!(
        respawn.count_log("can write in its directory"),
        1,
        "the directory said once\n{}",
        respawn.dump()
    );
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert!(pid_file.is_dir(), "what another user put there is left as it is");
}

/// Workers started from the new binary drop to `--user` too, as forked
/// ones do: before their exec (spawn.rs, step 2), so that the new program's
/// `main` never runs as root in a worker.
#[test]
fn upgraded_workers_run_as_the_user_asked() {
    const TEST: &str = "upgraded_workers_run_as_the_user_asked";
    if !require(TEST, Need::Root) || !require(TEST, Need::Nobody) {
        return;
    }
    let deploy = Deploy::new("user");
    let respawn = deploy.start(&["--workers", "1", "--user", "nobody"]);
    respawn.wait_for_workers(1);
    deploy.replace_with_build("u");
    respawn.signal(libc::SIGUSR2);
    wait_for_reexec(&respawn);
    let workers = respawn.wait_for_workers(1);
    let worker = *workers.iter().next().expect("a worker");
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).expect("its status");
    let ids = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|rest| rest.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let nobody = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines()
                .find(|l| l.starts_with("nobody:"))
                .map(|l| l.split(':').nth(2).unwrap_or("").to_owned())
        })
        .unwrap_or_default();
    assert_eq!(ids("Uid:"), vec![nobody.clone(); 4], "{status}");
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("{} u", untagged())
    );
}

/// A worker started from the new binary holds what a forked one holds
/// (stdio, the listener, its own pipe, what the worker crate opens, and
/// what the test process itself passed down), not the scoreboard's memory
/// file (it keeps the mapping) nor anything else of the master's.
#[test]
fn an_upgraded_worker_holds_only_what_a_forked_one_holds() {
    let deploy = Deploy::new("fds");
    // One worker, which has served once (and so opened its way to the
    // log, which a worker does on its first line), before and after.
    let respawn = deploy.start(&["--workers", "1"]);
    let forked = *respawn.wait_for_workers(1).iter().next().expect("a worker");
    assert_eq!(respawn.get("/").expect("GET /").pid(), Some(forked));
    let before = fd_kinds(forked);
    deploy.replace_with_build("f");
    respawn.signal(libc::SIGUSR2);
    wait_for_reexec(&respawn);
    let upgraded = *respawn.wait_for_workers(1).iter().next().expect("a worker");
    assert_eq!(respawn.get("/").expect("GET /").pid(), Some(upgraded));
    assert_eq!(
        fd_kinds(upgraded),
        before,
        "worker {upgraded}, from the new binary, against worker {forked}, forked"
    );
    let master_only = ["memfd", "eventpoll", "signalfd"];
    assert!(
        !before.iter().any(|k| master_only.iter().any(|m| k.contains(m))),
        "{before:?}"
    );
}

/// What a process's fds point at, by kind (`socket`, `pipe`, `/dev/null`),
/// sorted: the numbers and inodes differ between processes.
fn fd_kinds(pid: i32) -> Vec<String> {
    let mut kinds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("listing its fds")
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.ok()?.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            Some(target.split(":[").next().unwrap_or("").to_owned())
        })
        .collect();
    kinds.sort();
    kinds
}

/// Every listener goes across: a TCP port and a Unix socket both answer
/// from the new build, the socket file is not removed by the upgrade, and
/// the clean stop after it removes it.
#[test]
fn an_upgrade_keeps_every_listener_and_the_socket_file() {
    let deploy = Deploy::new("listeners");
    let socket = deploy.dir.join("web.sock");
    let unix = format!("unix:{}", socket.display());
    let mut respawn = deploy.start(&["--workers", "2", "--listen", "127.0.0.1:0", "--listen", &unix]);
    respawn.wait_for_workers(2);
    let version = |answer: std::io::Result<Response>| answer.expect("an answer").body.trim().to_owned();
    assert_eq!(version(unix_get(&socket, "/version")), untagged());
    deploy.replace_with_build("l");
    respawn.signal(libc::SIGUSR2);
    wait_for_reexec(&respawn);
    respawn.wait_for_workers(2);
    let new = format!("{} l", untagged());
    for _ in 0..5 {
        assert_eq!(version(unix_get(&socket, "/version")), new, "{}", respawn.dump());
        assert_eq!(version(respawn.get("/version")), new, "{}", respawn.dump());
    }
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert!(!socket.exists(), "the socket file outlived a clean stop");
}

/// `upgrade` on the control socket answers when the upgrade is done (by the
/// new image, once it has adopted the workers: the connection is handed
/// down across the exec), or with the back-out's reason; the socket itself
/// survives the exec.
#[test]
fn the_control_socket_answers_an_upgrade_when_done_and_a_back_out_with_its_reason() {
    use std::io::{Read, Write};
    let deploy = Deploy::new("control");
    let socket = deploy.dir.join("control.sock");
    let shown = socket.display().to_string();
    let respawn = deploy.start(&["--workers", "2", "--control", &shown]);
    respawn.wait_for_workers(2);
    let ask = |request: &str| {
        let mut conn = std::os::unix::net::UnixStream::connect(&socket).expect("connecting");
        conn.set_read_timeout(Some(PATIENCE)).expect("a timeout");
        conn.write_all(format!("{request}\n").as_bytes()).expect("asking");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).expect("the answer");
        answer
    };
    deploy.replace_with("exit 1");
    let answer = ask("upgrade");
    assert!(
        answer.starts_with("respawn-control 1\nerror backed out: worker ") && answer.contains("(code 1)"),
        "{answer:?}"
    );
    deploy.replace_with_build("c");
    let answer = ask("upgrade");
    assert_eq!(
        answer,
        format!(
            "respawn-control 1\nok\n{{\"generation\":2,\"path\":\"{}\"}}\n",
            deploy.shown()
        ),
        "{}",
        respawn.dump()
    );
    wait_for_reexec_after(&respawn, 1);
    // The same socket, served by the new image.
    let status = ask("status");
    // Two upgrades began; the back-out changed what is wanted, not the
    // generation of any worker.
    assert!(status.contains("\"generation\":2,"), "{status}");
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("{} c", untagged())
    );
}

/// `respawn ctl PATH ARGS...`: its exit code, stdout and stderr.
fn ctl(socket: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(binary())
        .arg("ctl")
        .arg(socket)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running respawn ctl");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// With no worker counted (scaled to 0 here; every slot waiting out a
/// backoff is the same case), nothing has proved the new binary: the
/// master starts one worker from it first, and follows only if it says
/// Ready. A new file that exits is backed out, and the master serves on
/// on the same listener; a good one is followed, and the probe retired.
#[test]
fn usr2_with_no_worker_running_proves_the_new_binary_first() {
    let deploy = Deploy::new("probe");
    let socket = deploy.dir.join("control.sock");
    let respawn = deploy.start(&["--workers", "1", "--control", &socket.display().to_string()]);
    respawn.wait_for_workers(1);
    let (code, _, err) = ctl(&socket, &["scale", "0"]);
    assert_eq!(code, Some(0), "{err}");
    respawn.wait_for_workers(0);

    deploy.replace_with("exit 1");
    let (code, _, err) = ctl(&socket, &["upgrade"]);
    assert_eq!(
        code,
        Some(1),
        "a broken binary is refused: {err}\n{}",
        respawn.dump()
    );
    assert!(err.contains("backed out: worker "), "{err}");
    assert_eq!(
        log_lines_with(&respawn, "master re-executed").len(),
        0,
        "the master followed a binary no worker ran\n{}",
        respawn.dump()
    );
    assert!(alive(respawn.pid));
    let (code, _, err) = ctl(&socket, &["scale", "1"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        respawn
            .get("/version")
            .expect("the running version serves on")
            .body
            .trim(),
        untagged()
    );

    let (code, _, err) = ctl(&socket, &["scale", "0"]);
    assert_eq!(code, Some(0), "{err}");
    respawn.wait_for_workers(0);
    deploy.replace_with_build("p");
    let (code, out, err) = ctl(&socket, &["upgrade"]);
    assert_eq!(code, Some(0), "{err}\n{}", respawn.dump());
    assert!(out.contains("upgraded"), "{out}");
    respawn.wait_for_log("the re-execution", |l| {
        message(l).starts_with("master re-executed as ")
    });
    assert!(
        respawn.count_log("one is started from it first") >= 1,
        "{}",
        respawn.dump()
    );
    respawn.wait_for_workers(0);
    let (code, _, err) = ctl(&socket, &["scale", "1"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("{} p", untagged())
    );
}

/// A new binary whose workers start but which cannot be executed by the
/// master (it removed its own execute bit): the upgrade is backed out and
/// said to every party that asked: the control client gets an error (exit
/// 1), the log an ERROR line; the old master serves on, with the same pid.
#[test]
fn a_failed_reexec_is_said_to_the_client_and_the_running_master_serves_on() {
    let deploy = Deploy::new("noexec");
    let socket = deploy.dir.join("control.sock");
    let respawn = deploy.start(&["--workers", "1", "--control", &socket.display().to_string()]);
    let old = respawn.wait_for_workers(1);
    deploy.replace_with(&format!(
        "chmod a-x \"$0\"\nRESPAWN_DEMO_TAG=x exec '{}' \"$@\"",
        binary().display()
    ));
    let (code, out, err) = ctl(&socket, &["upgrade"]);
    assert_eq!(
        code,
        Some(1),
        "ok was said for an exec that failed: {out}\n{}",
        respawn.dump()
    );
    assert!(
        err.contains("re-executing the master as ") && err.contains("permission denied"),
        "{err}"
    );
    respawn.wait_for_log("the ERROR line", |l| {
        l.contains("ERROR") && message(l).starts_with("upgrade: re-executing the master as ")
    });
    // Backed out: the new binary's worker is replaced by the running
    // version's, and the same master serves.
    let replaced = wait_until(PATIENCE, || {
        let now = respawn.workers();
        now.len() == 1 && now.is_disjoint(&old) && respawn.count_log("rolling restart done") == 1
    });
    assert!(
        replaced,
        "the new binary's worker is replaced: {:?}\n{}",
        respawn.workers(),
        respawn.dump()
    );
    let version = respawn.get("/version").expect("GET /version");
    assert_eq!(version.body.trim(), untagged(), "the running version serves on");
    assert!(alive(respawn.pid));
    let (code, _, err) = ctl(&socket, &["status"]);
    assert_eq!(code, Some(0), "the control socket is still served: {err}");
}

/// A reload under way when an upgrade backs out goes on: the back-out
/// changes what is wanted, not what a worker ran, so a worker started
/// before the reload is still replaced, and the reload is answered only
/// when none is left.
#[test]
fn a_back_out_during_a_reload_lets_the_reload_finish() {
    let deploy = Deploy::new("reload-backout");
    let socket = deploy.dir.join("control.sock");
    let respawn = deploy.start_with(
        &["--workers", "3", "--control", &socket.display().to_string()],
        |command| {
            command.env("RESPAWN_DEMO_START_MS", "700");
        },
    );
    let before = respawn.wait_for_workers(3);
    let wait = wait_until(PATIENCE, || respawn.count_log(" ready") >= 3);
    assert!(wait, "{}", respawn.dump());
    let reload = {
        let socket = socket.clone();
        std::thread::spawn(move || ctl(&socket, &["reload"]))
    };
    respawn.wait_for_log("the reload", |l| message(l).starts_with("control socket: reload"));
    deploy.replace_with("exit 1");
    respawn.signal(libc::SIGUSR2);
    respawn.wait_for_log("the back-out", |l| l.contains("backed out"));
    let (code, out, err) = reload.join().expect("the reload's client");
    assert_eq!(code, Some(0), "{out}{err}\n{}", respawn.dump());
    // A worker started before the reload may still be on its way out when
    // the answer comes, but it no longer accepts: its stop handler has put
    // /dev/null over the listener, and it holds no connection here.
    let accepting: Vec<i32> = respawn
        .workers()
        .intersection(&before)
        .copied()
        .filter(|&pid| holds_a_socket(pid))
        .collect();
    assert!(
        accepting.is_empty(),
        "the reload was answered ({out:?}) while {accepting:?}, started before it, still holds the listener\n{}",
        respawn.dump()
    );
}

/// Whether process `pid` has a socket among its fds (false once it is gone).
fn holds_a_socket(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        })
}

/// Once `ctl upgrade` has answered, every request is answered by the new
/// build: the old workers had stopped accepting before the master
/// re-executed, and the answer comes from the new image.
/// (The demo's workers stop accepting in their signal handler, so the
/// window this guards never opens here; any_language.rs's
/// `ctl_upgrade_is_answered_only_once_no_old_program_accepts` opens it
/// with a program that goes on accepting after its TERM.)
#[test]
fn after_ctl_upgrade_answers_only_the_new_build_answers() {
    let deploy = Deploy::new("answered");
    let socket = deploy.dir.join("control.sock");
    let respawn = deploy.start(&["--workers", "3", "--control", &socket.display().to_string()]);
    respawn.wait_for_workers(3);
    let versions = Versions::start(&respawn, 2);
    versions.let_answer(20);
    deploy.replace_with_build("n");
    let (code, out, err) = ctl(&socket, &["upgrade"]);
    assert_eq!(code, Some(0), "{out}{err}\n{}", respawn.dump());
    let new = format!("{} n", untagged());
    let old: Vec<String> = (0..60)
        .filter_map(|_| respawn.get("/version").ok())
        .map(|a| a.body.trim().to_owned())
        .filter(|v| *v != new)
        .collect();
    assert!(
        old.is_empty(),
        "answered by the previous build after the answer: {old:?}"
    );
    let answers = versions.stop();
    assert_eq!(failures(&answers), Vec::<String>::new());
}

/// What `metrics` counts and the uptime `status` shows are the master's,
/// not its image's: they go on across the re-execution.
#[test]
fn counters_uptime_and_restart_history_survive_the_reexec() {
    let deploy = Deploy::new("counters");
    let socket = deploy.dir.join("control.sock");
    let respawn = deploy.start(&["--workers", "1", "--control", &socket.display().to_string()]);
    respawn.wait_for_workers(1);
    for _ in 0..20 {
        respawn.get("/").expect("GET /");
    }
    let _ = respawn.get("/crash");
    respawn.wait_for_workers(1);
    let metric = |name: &str| -> f64 {
        let (_, out, _) = ctl(&socket, &["metrics"]);
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {out}"))
    };
    let requests = metric("respawn_requests_total");
    let uptime = metric("respawn_master_uptime_seconds");
    assert!(requests >= 21.0, "{requests}");
    deploy.replace_with_build("c");
    let (code, _, err) = ctl(&socket, &["upgrade"]);
    assert_eq!(code, Some(0), "{err}\n{}", respawn.dump());
    assert!(
        metric("respawn_requests_total") >= requests,
        "the request count was reset"
    );
    assert!(
        metric("respawn_master_uptime_seconds") >= uptime,
        "the uptime was reset"
    );
}

/// The new binary is a wrapper that sleeps before its exec, as a shell
/// script does: a worker that dies meanwhile is reaped by the shell, and
/// is no longer the master's child when the new image starts. It is not
/// adopted (one line says so), its slot is filled again, and a stop ends.
#[test]
fn a_worker_reaped_during_the_exec_is_not_adopted_and_is_replaced() {
    let deploy = Deploy::new("wrapper");
    let mut respawn = deploy.start(&["--workers", "2"]);
    let old = respawn.wait_for_workers(2);
    deploy.replace_with(&format!(
        "[ -n \"$RESPAWN_MASTER_STATE\" ] && sleep 1\nRESPAWN_DEMO_TAG=w exec '{}' \"$@\"",
        binary().display()
    ));
    respawn.signal(libc::SIGUSR2);
    respawn.wait_for_log("the master's exec", |l| {
        message(l).starts_with("upgrade: every worker runs ")
    });
    // A new worker: the last old one may still be finishing its stop, and
    // one that was retiring is not replaced.
    let victim = *respawn
        .workers()
        .difference(&old)
        .next()
        .expect("a worker of the new release");
    send(victim, libc::SIGKILL);
    wait_for_reexec(&respawn);
    respawn.wait_for_log("the line for the worker gone", |l| {
        message(l).starts_with(&format!(
            "worker {victim} exited during the re-exec (status unknown: reaped by what ran before this image"
        )) && message(l).ends_with("), replacing")
    });
    let now = respawn.wait_for_workers(2);
    assert!(!now.contains(&victim));
    assert_eq!(
        respawn.get("/version").expect("GET /version").body.trim(),
        format!("{} w", untagged())
    );
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
}

/// A new binary with file capabilities (`setcap cap_net_bind_service=+ep`,
/// which respawn advises for ports below 1024), under a master that is not
/// root: executing it raises the workers' capabilities, which clears their
/// parent-death signal. Every worker arms it again after its exec, so a
/// master killed with SIGKILL takes its upgraded workers with it.
#[test]
fn upgraded_workers_die_with_the_master_even_from_a_binary_with_file_capabilities() {
    const TEST: &str = "upgraded_workers_die_with_the_master_even_from_a_binary_with_file_capabilities";
    if !require(TEST, Need::Root) || !require(TEST, Need::Nobody) {
        return;
    }
    let setcap = ["/usr/sbin/setcap", "/sbin/setcap"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(setcap) = setcap else {
        skip(
            TEST,
            Skip::Environment,
            "setcap is not installed (apt-get install libcap2-bin)",
        );
        return;
    };
    let deploy = Deploy::new("fcaps");
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&deploy.dir.0, std::fs::Permissions::from_mode(0o755));
    let mut respawn = deploy.start_with(&["--workers", "2"], |command| {
        use std::os::unix::process::CommandExt;
        command.uid(65534).gid(65534);
    });
    respawn.wait_for_workers(2);
    let new = deploy.dir.join("respawn.caps");
    std::fs::copy(binary(), &new).expect("copying the binary");
    let (status, out) = run_command_to_exit({
        let mut command = std::process::Command::new(setcap);
        command.arg("cap_net_bind_service=+ep").arg(&new);
        command
    });
    if !status.success() {
        skip(TEST, Skip::Environment, &format!("setcap refused here: {out}"));
        return;
    }
    std::fs::rename(&new, &deploy.path).expect("renaming the new binary into place");
    respawn.signal(libc::SIGUSR2);
    wait_for_reexec(&respawn);
    let workers = respawn.wait_for_workers(2);
    respawn.signal(libc::SIGKILL);
    respawn.wait_exit();
    let orphans_gone = wait_until(PATIENCE, || workers.iter().all(|&pid| !alive(pid)));
    assert!(
        orphans_gone,
        "upgraded workers outlived their master: {:?}\n{}",
        workers.iter().filter(|&&pid| alive(pid)).collect::<Vec<_>>(),
        respawn.dump()
    );
}

/// A `RESPAWN_MASTER_STATE` that a master did not write (garbage, an fd
/// that is not open, an fd that is not a sealed memory file) is refused
/// whole: one ERROR line saying why, and a fresh start that serves; never a
/// panic, never an fd of the program's taken as the state's.
#[test]
fn a_forged_master_state_is_one_line_and_a_fresh_start() {
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    for (value, why) in [
        ("abc", "RESPAWN_MASTER_STATE=\"abc\" is not an fd"),
        ("987", "RESPAWN_MASTER_STATE=987: no such fd is open"),
        ("0", "RESPAWN_MASTER_STATE=\"0\" is not an fd"),
    ] {
        let dir = TempDir::new("respawn-forged-state");
        let socket = dir.join("web.sock");
        let log = dir.join("log");
        let mut command = std::process::Command::new(binary());
        command
            .args([
                "--workers",
                "1",
                "--listen",
                &format!("unix:{}", socket.display()),
            ])
            .env("RESPAWN_MASTER_STATE", value)
            .env("RUST_LOG_STYLE", "never")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the log file"));
        let _master = Killed(spawn_tied(command).expect("starting respawn"));
        let said = |needle: &str| std::fs::read_to_string(&log).unwrap_or_default().contains(needle);
        assert!(
            wait_until(PATIENCE, || said(" ready")),
            "no worker ready with {value:?}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let line = text
            .lines()
            .find(|l| l.contains("adopting the workers of the previous master"))
            .unwrap_or_else(|| panic!("no line for {value:?}: {text}"));
        assert!(line.contains("ERROR") && line.contains(why), "{line}");
        assert!(line.contains("starting afresh"), "{line}");
        assert!(!text.contains("panicked"), "{text}");
        let answer = unix_get(&socket, "/").expect("GET / on the fresh start");
        assert_eq!(answer.status, 200);
    }
}

/// Repeated upgrades with a control socket and a pid file together: a
/// client polling `status` on fresh connections all along gets every
/// answer (a connection still sending its request at an exec is handed
/// down and read by the new image), the pid file names the same master
/// throughout, and a worker forked by the re-executed master serves the
/// new build.
#[test]
fn status_and_the_pid_file_hold_across_repeated_upgrades() {
    use std::io::{Read, Write};
    let deploy = Deploy::new("repeated");
    let socket = deploy.dir.join("control.sock");
    let pid_file = deploy.dir.join("respawn.pid");
    let respawn = deploy.start(&[
        "--workers",
        "2",
        "--control",
        &socket.display().to_string(),
        "--pid-file",
        &pid_file.display().to_string(),
    ]);
    respawn.wait_for_workers(2);
    let done = Arc::new(AtomicBool::new(false));
    let (asked, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let poller = {
        let (socket, done, asked, failed) = (socket.clone(), done.clone(), asked.clone(), failed.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let answer = std::os::unix::net::UnixStream::connect(&socket).and_then(|mut conn| {
                    conn.set_read_timeout(Some(PATIENCE))?;
                    conn.write_all(b"status\n")?;
                    let mut answer = String::new();
                    conn.read_to_string(&mut answer)?;
                    Ok(answer)
                });
                match answer {
                    Ok(answer) if answer.starts_with("respawn-control 1\nok\n{") => {}
                    // Asked while the old image wrote its last answers:
                    // told to ask again, which is an answer.
                    Ok(answer) if answer.contains("ask again") => {}
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
                asked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    for (round, tag) in ["a", "b", "c"].into_iter().enumerate() {
        deploy.replace_with_build(tag);
        let (code, out, err) = ctl(&socket, &["upgrade"]);
        assert_eq!(code, Some(0), "round {round}: {out}{err}\n{}", respawn.dump());
        let pid = std::fs::read_to_string(&pid_file).expect("the pid file");
        assert_eq!(pid.trim(), respawn.pid.to_string(), "round {round}");
    }
    let goal = asked.load(Ordering::SeqCst) + 20;
    assert!(wait_until(PATIENCE, || asked.load(Ordering::SeqCst) >= goal));
    done.store(true, Ordering::SeqCst);
    poller.join().expect("the poller");
    let failed = failed.lock().unwrap().clone();
    assert_eq!(
        failed,
        Vec::<String>::new(),
        "{} asked\n{}",
        asked.load(Ordering::SeqCst),
        respawn.dump()
    );

    // A worker forked by the re-executed master serves the new build.
    let adopted = respawn.wait_for_workers(2);
    let victim = *adopted.iter().next().expect("a worker");
    send(victim, libc::SIGKILL);
    let forked = wait_until(PATIENCE, || {
        let now = respawn.workers();
        now.len() == 2 && !now.contains(&victim)
    });
    assert!(forked, "{}", respawn.dump());
    let fresh: Vec<i32> = respawn.workers().difference(&adopted).copied().collect();
    let served = wait_until(PATIENCE, || {
        respawn.get("/").is_ok_and(|a| a.pid() == fresh.first().copied())
    });
    // It is a fork of the new image: the environment it was born with is
    // the one the wrapper gave the re-executed master.
    let environ = std::fs::read(format!("/proc/{}/environ", fresh[0])).unwrap_or_default();
    assert!(
        environ.split(|&b| b == 0).any(|var| var == b"RESPAWN_DEMO_TAG=c"),
        "the worker {fresh:?} is not a fork of the last image"
    );
    assert!(
        served,
        "the worker {fresh:?} the new image forked did not serve the new build\n{}",
        respawn.dump()
    );
}

/// A forged RESPAWN_MASTER_STATE naming an fd the program holds (its
/// listener, at fd 3 here) is refused without closing that fd: the master
/// starts afresh and serves on it.
#[test]
fn a_forged_master_state_naming_the_listener_closes_nothing() {
    let dir = TempDir::new("respawn-forged-listener");
    let socket = dir.join("web.sock");
    let log = dir.join("log");
    let mut command = std::process::Command::new(binary());
    command
        .args([
            "--workers",
            "1",
            "--listen",
            &format!("unix:{}", socket.display()),
        ])
        .env("RESPAWN_MASTER_STATE", "3")
        .env("RUST_LOG_STYLE", "never")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("the log file"));
    let mut master = spawn_tied(command).expect("starting respawn");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = wait_until(PATIENCE, || text().contains(" ready"));
    let answer = unix_get(&socket, "/");
    let _ = master.kill();
    let _ = master.wait();
    assert!(ready, "{}", text());
    assert!(
        text().contains("RESPAWN_MASTER_STATE=3: not a sealed memory file"),
        "{}",
        text()
    );
    assert!(
        answer.as_ref().is_ok_and(|a| a.status == 200),
        "{answer:?}\n{}",
        text()
    );
}
