//! `respawn -- CMD`: workers in any language (docs/protocol.md), under the
//! real master. The clients of clients/ are the workers where they exist;
//! small Python scripts written here play the misbehaving ones. Without
//! python3 or node, the tests that need one are skipped (`require`), which
//! `make test`'s summary lists and CI does not allow.

use respawn_tests::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A directory of scripts for one test, removed at the end.
struct Scripts(TempDir);

impl Scripts {
    fn new(name: &str) -> Scripts {
        Scripts(TempDir::new(&format!("respawn-any-{name}")))
    }

    /// Writes `text` to `name` (a new file renamed into place, as a deploy
    /// does) and returns its path.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let new = self.0.join(format!("{name}.new"));
        std::fs::write(&new, text).expect("writing a script");
        std::fs::rename(&new, &path).expect("renaming it into place");
        path
    }
}

/// Releases side by side, as a deploy lays them out: `<release>/server`
/// for each (executable, a script with a `#!` line), and `current`, a
/// symbolic link to one of them, flipped as deploy tools flip it (a new
/// link renamed over the old one).
struct Releases(Scripts);

impl Releases {
    /// Each (name, text), `current` naming the first.
    fn new(name: &str, releases: &[(&str, String)]) -> Releases {
        use std::os::unix::fs::PermissionsExt;
        let scripts = Scripts::new(name);
        for (release, text) in releases {
            std::fs::create_dir(scripts.0.join(release)).expect("a release directory");
            let server = scripts.write(&format!("{release}/server"), text);
            std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let made = Releases(scripts);
        made.flip_to(releases.first().expect("a release").0);
        made
    }

    fn dir(&self) -> PathBuf {
        self.0 .0.to_path_buf()
    }

    /// Points `current` at `release`.
    fn flip_to(&self, release: &str) {
        let (new, current) = (self.dir().join("current.new"), self.dir().join("current"));
        std::os::unix::fs::symlink(release, &new).expect("current.new -> the release");
        std::fs::rename(&new, &current).expect("flipping current");
    }
}

/// A worker in Python that speaks the protocol by hand, one request at a
/// time: Ready, then Busy and Idle around each request; `/crash` sends
/// Suicide, answers 500 and exits 70; `/hang` spins; `/garbage` writes a
/// frame of version 9.
const PYTHON_WORKER: &str = r#"
import os, socket, struct, sys, signal
assert os.environ["LISTEN_PID"] == str(os.getpid())
ch = int(os.environ["RESPAWN_CHANNEL_FD"])
def frame(kind, text=b""):
    os.write(ch, struct.pack("<BBH", 1, kind, len(text)) + text)
listener = socket.socket(fileno=3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
frame(1)
while True:
    conn, peer = listener.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        more = conn.recv(4096)
        if not more:
            break
        head += more
    line = head.split(b"\r\n")[0]
    frame(3, line + b" from %s:%d" % (peer[0].encode(), peer[1]))
    if line.startswith(b"GET /hang"):
        while True:
            pass
    if line.startswith(b"GET /garbage"):
        os.write(ch, bytes([9, 1, 0, 0]))
    body = b"%s %d\n" % (os.environ.get("TAG", "py").encode(), os.getpid())
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    conn.close()
    frame(4)
"#;

fn python_worker(scripts: &Scripts) -> String {
    scripts.write("worker.py", PYTHON_WORKER).display().to_string()
}

#[test]
fn a_missing_program_is_one_line_and_exit_1() {
    let (status, output) = run_to_exit(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--",
        "no-such-program-anywhere",
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    // The PATH searched follows (cli.rs checks that line whole).
    assert!(
        output.trim().starts_with(
            "respawn: -- no-such-program-anywhere: no such file or directory in any directory of PATH ("
        ),
        "{output}"
    );
    assert_eq!(output.lines().count(), 1, "{output}");
    let (status, output) = run_to_exit(&["--workers", "1", "--listen", "127.0.0.1:0", "--", "/etc/passwd"]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(output.trim(), "respawn: -- /etc/passwd: permission denied");
}

#[test]
fn a_program_that_exits_at_once_backs_off_and_is_given_up_on() {
    let mut respawn = Respawn::start(&[
        "--workers",
        "1",
        "--max-restarts",
        "2",
        "--",
        "/bin/sh",
        "-c",
        "exit 1",
    ]);
    respawn.wait_for_log("a back-off", |l| {
        message(l).contains("after it was forked; slot 0 respawns in")
    });
    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(3), "{}", respawn.dump());
    assert_eq!(respawn.count_log("giving up: "), 1, "{}", respawn.dump());
    // Said once, not per failed start: what such a program must do.
    assert_eq!(
        respawn.count_log("a program run with -- must say Ready on its channel before it serves"),
        1,
        "{}",
        respawn.dump()
    );
}

#[test]
fn a_python_worker_serves_and_its_pid_is_the_forked_one() {
    if !require(
        "a_python_worker_serves_and_its_pid_is_the_forked_one",
        Need::Python,
    ) {
        return;
    }
    let scripts = Scripts::new("serves");
    let worker = python_worker(&scripts);
    let respawn = Respawn::start(&["--workers", "2", "--", "python3", &worker]);
    let workers = respawn.wait_for_workers(2);
    for _ in 0..6 {
        let answer = respawn.get("/").expect("GET /");
        assert_eq!(answer.status, 200);
        let pid = answer.pid().expect("a pid in the answer");
        assert!(
            workers.contains(&pid),
            "{pid} is not a child of the master: {workers:?}"
        );
    }
}

#[test]
fn garbage_on_the_channel_replaces_the_worker() {
    if !require("garbage_on_the_channel_replaces_the_worker", Need::Python) {
        return;
    }
    let scripts = Scripts::new("garbage");
    let worker = python_worker(&scripts);
    let respawn = Respawn::start(&["--workers", "1", "--", "python3", &worker]);
    let before = respawn.wait_for_workers(1);
    let victim = *before.iter().next().expect("a worker");
    let _ = respawn.get("/garbage");
    respawn.wait_for_log("the malformed frame", |l| {
        message(l).starts_with(&format!("worker {victim} sent malformed ipc ("))
            && l.ends_with("; replacing it")
    });
    // Stopped (SIGTERM, which the script obeys), then replaced.
    assert!(wait_until(PATIENCE, || !alive(victim)), "{}", respawn.dump());
    let after = respawn.wait_for_workers(1);
    assert!(!after.contains(&victim), "{}", respawn.dump());
    assert_eq!(respawn.get("/").expect("GET /").status, 200);
}

#[test]
fn busy_marks_let_the_master_find_a_hung_worker_in_another_language() {
    if !require(
        "busy_marks_let_the_master_find_a_hung_worker_in_another_language",
        Need::Python,
    ) {
        return;
    }
    let scripts = Scripts::new("hung");
    let worker = python_worker(&scripts);
    let respawn = Respawn::start(&["--workers", "1", "--timeout", "1", "--", "python3", &worker]);
    let before = respawn.wait_for_workers(1);
    let victim = *before.iter().next().expect("a worker");
    let addr = respawn.addr;
    let hanging = std::thread::spawn(move || get_raw(addr, "/hang"));
    let line = respawn.wait_for_log("the hung worker", |l| {
        message(l).starts_with(&format!("worker {victim} hung "))
    });
    assert!(line.contains("on GET /hang HTTP/1.1 from 127.0.0.1:"), "{line}");
    assert!(wait_until(PATIENCE, || !alive(victim)), "{}", respawn.dump());
    let cut = hanging.join().unwrap();
    assert!(
        cut_without_an_answer(&cut),
        "the hung request is cut without an answer, not {cut:?}\n{}",
        respawn.dump()
    );
    let after = respawn.wait_for_workers(1);
    assert!(!after.contains(&victim));
    assert_eq!(respawn.get("/").expect("GET /").status, 200);
}

#[test]
fn a_program_that_knows_only_listen_fds_runs_with_ready_on_exec() {
    let proxyd = [
        "/lib/systemd/systemd-socket-proxyd",
        "/usr/lib/systemd/systemd-socket-proxyd",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    let Some(proxyd) = proxyd else {
        skip(
            "a_program_that_knows_only_listen_fds_runs_with_ready_on_exec",
            Skip::Environment,
            "systemd-socket-proxyd is not installed (apt-get install systemd)",
        );
        return;
    };
    // The backend it forwards to: a respawn demo on a port of its own.
    let backend = Respawn::with_workers(1, &[]);
    let target = backend.addr.to_string();
    let respawn = Respawn::start(&["--workers", "2", "--ready-on-exec", "--", proxyd, &target]);
    respawn.wait_for_workers(2);
    let answer = respawn.get("/").expect("GET / through the proxy");
    assert_eq!(answer.status, 200);
    assert!(answer.body.starts_with("handle by child "), "{answer:?}");
}

/// A copy of one client and its example in a directory of the test's own,
/// so that the test can change the example as a deploy would.
fn example(scripts: &Scripts, language: &str) -> String {
    let (dir, files, example) = match language {
        "node" => ("clients/node", ["respawn.js", "example.js"], "example.js"),
        _ => ("clients/python", ["respawn.py", "example.py"], "example.py"),
    };
    for file in files {
        let text = std::fs::read_to_string(workspace().join(dir).join(file))
            .unwrap_or_else(|err| panic!("reading {dir}/{file}: {err}"));
        scripts.write(file, &text);
    }
    scripts.0.join(example).display().to_string()
}

/// What a test in `language` needs: CI has both.
fn need(language: &str) -> Need {
    if language == "node" {
        Need::Node
    } else {
        Need::Python
    }
}

fn interpreter(language: &str) -> &'static str {
    if language == "node" {
        "node"
    } else {
        "python3"
    }
}

fn serves_and_hands_over_a_crash(language: &str, test: &str) {
    if !require(test, need(language)) {
        return;
    }
    let scripts = Scripts::new(test);
    let example = example(&scripts, language);
    let respawn = Respawn::start(&["--workers", "2", "--", interpreter(language), &example]);
    let workers = respawn.wait_for_workers(2);
    let answer = respawn.get("/").expect("GET /");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.body.starts_with("handle by child "), "{answer:?}");
    assert!(
        workers.contains(&answer.pid().expect("a pid")),
        "{answer:?} {workers:?}"
    );
    let crashed = respawn.get("/crash").expect("GET /crash");
    assert_eq!(crashed.status, 500, "{crashed:?}");
    let suicide = respawn.wait_for_log("the suicide", |l| l.contains(" sent suicide (uncaught "));
    let victim = worker_pid(&suicide).expect("the crashed worker's pid");
    respawn.wait_for_log("the crashed worker's exit", |l| {
        message(l).starts_with(&format!("worker {victim} exited (code 70: uncaught "))
    });
    // The replacement was forked before the crashed worker left.
    let log = respawn.log();
    let spawned = position(&log, |l| {
        message(l).ends_with(" spawned") && worker_pid(l).is_some_and(|pid| !workers.contains(&pid))
    });
    let exited = position(&log, |l| {
        message(l).starts_with(&format!("worker {victim} exited"))
    });
    assert!(
        spawned < exited,
        "replacement {spawned:?}, exit {exited:?}\n{}",
        respawn.dump()
    );
    respawn.wait_for_workers(2);
}

fn a_crash_storm_loses_no_request(language: &str, test: &str) {
    if !require(test, need(language)) {
        return;
    }
    let scripts = Scripts::new(test);
    let example = example(&scripts, language);
    let respawn = Respawn::start(&[
        "--workers",
        "2",
        "--min-uptime",
        "0",
        "--",
        interpreter(language),
        &example,
    ]);
    respawn.wait_for_workers(2);
    let load = Load::start(&respawn, 2);
    for _ in 0..10 {
        assert_eq!(
            respawn.get("/crash").map(|a| a.status).ok(),
            Some(500),
            "{}",
            respawn.dump()
        );
    }
    let (served, failed) = load.stop();
    assert!(served > 0);
    assert_eq!(failed, Vec::<String>::new(), "{}", respawn.dump());
    assert_eq!(respawn.wait_for_workers(2).len(), 2);
}

fn a_killed_worker_is_replaced_and_hup_runs_new_code(language: &str, test: &str) {
    if !require(test, need(language)) {
        return;
    }
    let scripts = Scripts::new(test);
    let example = example(&scripts, language);
    let respawn = Respawn::start(&["--workers", "2", "--", interpreter(language), &example]);
    let before = respawn.wait_for_workers(2);
    let victim = *before.iter().next().expect("a worker");
    send(victim, libc::SIGKILL);
    respawn.wait_for_log("the replacement", |l| {
        message(l).starts_with(&format!("worker {victim} exited (signal 9)"))
    });
    assert!(!respawn.wait_for_workers(2).contains(&victim));
    // A new version of the script, renamed into place; HUP runs it.
    let file = Path::new(&example)
        .file_name()
        .and_then(|f| f.to_str())
        .expect("its name")
        .to_owned();
    let text = std::fs::read_to_string(&example).expect("reading the example");
    scripts.write(&file, &text.replace("handle by child ", "new code in child "));
    respawn.signal(libc::SIGHUP);
    respawn.wait_for_line("rolling restart done: every worker is new");
    // Once the old workers have left (one may still take a connection in
    // the event-loop turn its stop arrives in), every answer is new code.
    let new = respawn.wait_for_workers(2);
    for _ in 0..4 {
        let answer = respawn.get("/").expect("GET /");
        assert!(
            answer.body.starts_with("new code in child "),
            "{answer:?}\n{}",
            respawn.dump()
        );
        assert!(new.contains(&answer.pid().expect("a pid")), "{answer:?}");
    }
}

#[test]
fn node_worker_serves_and_hands_over_a_crash() {
    serves_and_hands_over_a_crash("node", "node_worker_serves_and_hands_over_a_crash");
}

#[test]
fn python_worker_serves_and_hands_over_a_crash() {
    serves_and_hands_over_a_crash("python", "python_worker_serves_and_hands_over_a_crash");
}

#[test]
fn node_crash_storm_loses_no_request() {
    a_crash_storm_loses_no_request("node", "node_crash_storm_loses_no_request");
}

#[test]
fn python_crash_storm_loses_no_request() {
    a_crash_storm_loses_no_request("python", "python_crash_storm_loses_no_request");
}

#[test]
fn node_killed_worker_is_replaced_and_hup_runs_new_code() {
    a_killed_worker_is_replaced_and_hup_runs_new_code(
        "node",
        "node_killed_worker_is_replaced_and_hup_runs_new_code",
    );
}

#[test]
fn python_killed_worker_is_replaced_and_hup_runs_new_code() {
    a_killed_worker_is_replaced_and_hup_runs_new_code(
        "python",
        "python_killed_worker_is_replaced_and_hup_runs_new_code",
    );
}

/// A deploy as many are done: each release in a directory of its own, a
/// `current` symlink flipped to the new one (a new link renamed over the
/// old, so it always names a release), then HUP. The program is the
/// symlinked file itself (`-- ./current/server`, a script with a `#!`
/// line), so it is respawn that finds it: resolving the path once at
/// start would run release1 at every fork.
#[test]
fn hup_runs_what_the_path_names_now() {
    if !require("hup_runs_what_the_path_names_now", Need::Python) {
        return;
    }
    let tagged = |release: &str| {
        format!("#!/usr/bin/env python3\nimport os\nos.environ['TAG'] = '{release}'{PYTHON_WORKER}")
    };
    let releases = Releases::new(
        "symlinked-release",
        &[("release1", tagged("release1")), ("release2", tagged("release2"))],
    );
    let dir = releases.dir();
    let respawn = Respawn::start_with(&["--workers", "2", "--", "./current/server"], |command| {
        command.current_dir(&dir);
    });
    let old = respawn.wait_for_workers(2);
    for _ in 0..4 {
        let answer = respawn.get("/").expect("GET /");
        assert!(
            answer.body.starts_with("release1 "),
            "{answer:?}\n{}",
            respawn.dump()
        );
    }

    releases.flip_to("release2");
    respawn.signal(libc::SIGHUP);
    respawn.wait_for_line("rolling restart done: every worker is new");
    // Once the old workers have left (one may still take a connection in
    // the turn its stop arrives in), every answer is release2's.
    assert!(
        wait_until(PATIENCE, || old.iter().all(|&pid| !alive(pid))),
        "{}",
        respawn.dump()
    );
    let new = respawn.wait_for_workers(2);
    for _ in 0..8 {
        let answer = respawn.get("/").expect("GET /");
        assert!(
            answer.body.starts_with("release2 "),
            "{answer:?}\n{}",
            respawn.dump()
        );
        assert!(new.contains(&answer.pid().expect("a pid")), "{answer:?} {new:?}");
    }
}

/// A deploy that breaks the program, then a reload: the workers the
/// rollout forks cannot start (release2 exits 1). The rollout backs out as
/// an upgrade does: the workers started before it serve on, `ctl reload`
/// is told why (exit 1), and nothing counts toward giving up, where before
/// the master forked release2 again and again, gave up, and stopped the
/// healthy release1 workers with it.
#[test]
fn a_reload_whose_workers_cannot_start_backs_out_and_the_old_ones_serve_on() {
    const TEST: &str = "a_reload_whose_workers_cannot_start_backs_out_and_the_old_ones_serve_on";
    if !require(TEST, Need::Python) {
        return;
    }
    let release2 = "#!/bin/sh\necho 'release2: SyntaxError' >&2\nexit 1\n".to_owned();
    let (respawn, old) = reload_onto_a_broken_release("broken-release", release2, &["--min-uptime", "10"]);
    // Nothing was forked again: the rollout is over, and no slot is
    // missing (two workers at the start, and the one that failed).
    assert_eq!(respawn.count_log(" spawned"), 3, "{}", respawn.dump());
    assert!(old.iter().all(|&pid| alive(pid)), "{}", respawn.dump());
}

/// A release that says Ready, then dies (an import that fails after the
/// server is up): an old worker is retired for its Ready, so after the
/// back-out a slot is missing, and every fork that fills it runs the broken
/// code on disk. Those failed starts back their slot off and count for
/// nothing while release1 serves: with --max-restarts 2, before, the third
/// made the master give up and stop the last release1 worker.
#[test]
fn a_backed_out_reload_never_gives_up_while_the_old_workers_serve() {
    const TEST: &str = "a_backed_out_reload_never_gives_up_while_the_old_workers_serve";
    if !require(TEST, Need::Python) {
        return;
    }
    // The first worker of it says Ready, and an old worker is retired for
    // it; it dies 0.3 s later. Every other exits at its start, the first of
    // them backing the rollout out while the other old worker serves.
    let release2 = "#!/usr/bin/env python3\n\
        import os, struct, sys, time\n\
        try:\n    \
            os.close(os.open(os.path.join(os.path.dirname(os.path.realpath(__file__)), 'first'), os.O_CREAT | os.O_EXCL))\n\
        except FileExistsError:\n    \
            sys.exit('release2: ImportError')\n\
        os.write(int(os.environ['RESPAWN_CHANNEL_FD']), struct.pack('<BBH', 1, 1, 0))\n\
        time.sleep(0.3)\n\
        sys.exit('release2: ImportError after Ready')\n"
        .to_owned();
    let (respawn, _) = reload_onto_a_broken_release(
        "ready-then-dies",
        release2,
        &["--max-restarts", "2", "--min-uptime", "10"],
    );
    let retried = wait_until(PATIENCE, || {
        respawn.count_log("as the rolling restart that backed out did") >= 3
    });
    assert!(
        retried,
        "three failed starts after the back-out\n{}",
        respawn.dump()
    );
    assert_eq!(respawn.count_log("giving up: "), 0, "{}", respawn.dump());
    let answer = respawn.get("/").expect("GET / from what is left of release1");
    assert!(
        answer.body.starts_with("release1 "),
        "{answer:?}\n{}",
        respawn.dump()
    );
}

/// With `--ready-on-exec` a worker is Ready at its exec, before it could
/// fail: no old worker is retired for a new one until the new one has
/// lived --min-uptime (Config::retire_once_proved), so a release that exits
/// at once backs out with both old workers serving, where before the whole
/// rollout was over in milliseconds and the master gave up after it.
#[test]
fn with_ready_on_exec_a_reload_keeps_the_old_workers_until_the_new_ones_proved_themselves() {
    const TEST: &str =
        "with_ready_on_exec_a_reload_keeps_the_old_workers_until_the_new_ones_proved_themselves";
    if !require(TEST, Need::Python) {
        return;
    }
    // No channel: Ready at its exec; it stops at once on TERM.
    let release1 = "#!/usr/bin/env python3\n\
        import os, socket\n\
        listener = socket.socket(fileno=3)\n\
        while True:\n    \
            conn, _ = listener.accept()\n    \
            head = b''\n    \
            while b'\\r\\n\\r\\n' not in head:\n        \
                more = conn.recv(4096)\n        \
                if not more: break\n        \
                head += more\n    \
            body = b'release1 %d\\n' % os.getpid()\n    \
            conn.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n' % len(body) + body)\n    \
            conn.close()\n"
        .to_owned();
    let release2 = "#!/bin/sh\nexit 1\n".to_owned();
    let (respawn, old) = reload_from_onto(
        "ready-on-exec",
        release1,
        release2,
        &["--ready-on-exec", "--min-uptime", "10"],
    );
    assert!(
        old.iter().all(|&pid| alive(pid)),
        "both old workers serve\n{}",
        respawn.dump()
    );
    assert_eq!(
        respawn.count_log("rolling restart: stopping worker"),
        0,
        "{}",
        respawn.dump()
    );
}

/// Starts 2 workers of release1 (the Python worker of these tests) with
/// `flags` and a control socket, flips `current` to `release2`, and asks
/// for a reload: it must back out, say so to `ctl reload` (exit 1) and in
/// one line, and a worker of release1 must answer, once any it retired has
/// left. Returns the master and release1's workers.
fn reload_onto_a_broken_release(name: &str, release2: String, flags: &[&str]) -> (Respawn, BTreeSet<i32>) {
    let release1 =
        format!("#!/usr/bin/env python3\nimport os\nos.environ['TAG'] = 'release1'{PYTHON_WORKER}");
    reload_from_onto(name, release1, release2, flags)
}

/// As [`reload_onto_a_broken_release`], with a release1 of the caller's.
fn reload_from_onto(
    name: &str,
    release1: String,
    release2: String,
    flags: &[&str],
) -> (Respawn, BTreeSet<i32>) {
    let releases = Releases::new(name, &[("release1", release1), ("release2", release2)]);
    let (dir, socket) = (releases.dir(), releases.dir().join("control.sock"));
    let socket_arg = socket.display().to_string();
    let mut args = vec!["--workers", "2", "--control", &socket_arg];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--", "./current/server"]);
    let respawn = Respawn::start_with(&args, |command| {
        command.current_dir(&dir);
    });
    let old = respawn.wait_for_workers(2);
    // Each has read release1 (an interpreter opens its script by the path
    // it was given, `current/...`, after the exec that made it Ready).
    let mut answered = BTreeSet::new();
    let both = wait_until(PATIENCE, || {
        if let Some(pid) = respawn.get("/").ok().and_then(|answer| answer.pid()) {
            answered.insert(pid);
        }
        answered == old
    });
    assert!(
        both,
        "release1's workers answer: {answered:?}\n{}",
        respawn.dump()
    );
    releases.flip_to("release2");
    let output = std::process::Command::new(binary())
        .args(["ctl".as_ref(), socket.as_os_str(), "reload".as_ref()])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running respawn ctl");
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{said}\n{}", respawn.dump());
    assert!(said.contains("backed out: worker "), "{said}\n{}", respawn.dump());
    respawn.wait_for_log("the back-out", |l| {
        message(l).starts_with("rolling restart backed out: its worker ")
    });
    // A release1 worker retired for a release2 worker's Ready finishes and
    // leaves; the one or two left serve.
    let retired: Vec<i32> = old
        .iter()
        .copied()
        .filter(|&pid| respawn.count_log(&format!("stopping worker {pid}")) > 0)
        .collect();
    assert!(
        wait_until(PATIENCE, || retired.iter().all(|&pid| !alive(pid))),
        "{}",
        respawn.dump()
    );
    for _ in 0..10 {
        let answer = respawn
            .get("/")
            .unwrap_or_else(|err| panic!("GET / after the back-out: {err}\n{}", respawn.dump()));
        assert!(
            answer.body.starts_with("release1 "),
            "{answer:?}\n{}",
            respawn.dump()
        );
        assert!(old.contains(&answer.pid().expect("a pid")), "{answer:?} {old:?}");
    }
    assert_eq!(respawn.count_log("giving up: "), 0, "{}", respawn.dump());
    (respawn, old)
}

/// A program that goes on accepting for a while after its SIGTERM, as a
/// sloppy server does: an upgrade is answered only once no old worker holds
/// the listener (settle's listener check), so no request after the answer
/// reaches the previous build. With the demo, whose workers stop accepting
/// in their signal handler, this window never opens.
#[test]
fn ctl_upgrade_is_answered_only_once_no_old_program_accepts() {
    if require(
        "ctl_upgrade_is_answered_only_once_no_old_program_accepts",
        Need::Python,
    ) {
        no_old_answer_after("upgrade");
    }
}

/// The same for a rolling restart: `ctl reload` is answered only once no
/// old worker accepts.
#[test]
fn ctl_reload_is_answered_only_once_no_old_program_accepts() {
    if require(
        "ctl_reload_is_answered_only_once_no_old_program_accepts",
        Need::Python,
    ) {
        no_old_answer_after("reload");
    }
}

/// `ctl VERB` to a master of two workers of a program that accepts 1.5 s
/// more after its TERM; then no answer may come from the old program.
fn no_old_answer_after(verb: &str) {
    let scripts = Scripts::new(&format!("slow-to-let-go-{verb}"));
    scripts.write("tag", "old\n");
    let server = scripts.write(
        "server.py",
        r#"
import os, socket, struct, sys, signal, time
ch = int(os.environ["RESPAWN_CHANNEL_FD"])
tag = open("tag").read().strip().encode()
listener = socket.socket(fileno=3)
listener.settimeout(0.05)
leave = []
signal.signal(signal.SIGTERM, lambda *_: leave.append(time.monotonic() + 1.5))
os.write(ch, struct.pack("<BBH", 1, 1, 0))
while not leave or time.monotonic() < leave[0]:
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        continue
    conn.settimeout(5)
    head = b""
    while b"\r\n\r\n" not in head:
        more = conn.recv(4096)
        if not more:
            break
        head += more
    body = b"%s %d\n" % (tag, os.getpid())
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    conn.close()
"#,
    );
    let socket = scripts.0.join("control.sock");
    let dir = scripts.0.clone();
    let respawn = Respawn::start_with(
        &[
            "--workers",
            "2",
            "--control",
            &socket.display().to_string(),
            "--",
            "python3",
            &server.display().to_string(),
        ],
        |command| {
            command.current_dir(&dir);
        },
    );
    respawn.wait_for_workers(2);
    let answer = respawn.get("/").expect("GET /");
    assert!(answer.body.starts_with("old "), "{answer:?}\n{}", respawn.dump());
    scripts.write("tag", "new\n");
    let output = std::process::Command::new(binary())
        .arg("ctl")
        .arg(&socket)
        .arg(verb)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running respawn ctl");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        respawn.dump()
    );
    let old: Vec<String> = (0..40)
        .filter_map(|_| respawn.get("/").ok())
        .map(|a| a.body.trim().to_owned())
        .filter(|body| !body.starts_with("new "))
        .collect();
    assert!(
        old.is_empty(),
        "answered by the previous program after ctl {verb} was answered: {old:?}\n{}",
        respawn.dump()
    );
}
