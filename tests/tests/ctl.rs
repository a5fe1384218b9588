//! `respawn ctl`, the control socket's client, as an operator runs it.
//!
//! Two halves. Against a fake master (a Unix listener in a thread that
//! answers canned bytes), the client's own promises: its exit codes, its
//! messages, the table, `--watch`. Against the real master (`--control
//! PATH`), the issue's promises: answers that come when the work is done,
//! and a status that tells the truth about the master's children. The
//! second half needs the master side of the control socket, and is ignored
//! until it is merged.

use respawn_tests::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

/// A directory of this test's own for a control socket, removed after.
struct Dir(TempDir);

impl Dir {
    fn new() -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        Dir(TempDir::new(&format!("respawn-ctl-{n}")))
    }

    fn socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }

    fn socket_arg(&self) -> String {
        self.socket().display().to_string()
    }
}

/// What a finished `respawn ctl` said.
struct Said {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Said {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Starts `respawn ctl PATH args...`, its output piped.
fn start_ctl(socket: &Path, args: &[&str]) -> Child {
    let mut command = Command::new(binary());
    command
        .arg("ctl")
        .arg(socket)
        .args(args)
        .env("RUST_LOG_STYLE", "never")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn_tied(command).expect("starting respawn ctl")
}

/// Waits for a `respawn ctl` to exit (killed after [`PATIENCE`]) and reads
/// what it said. It returns the moment the client exits: the client exits
/// as soon as it has printed the answer.
fn finish(child: Child) -> Said {
    let pid = child.id() as i32;
    let (done, outcome) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output: Output = match outcome.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("waiting for respawn ctl"),
        Err(_) => {
            send(pid, libc::SIGKILL);
            panic!("respawn ctl did not finish within {PATIENCE:?}");
        }
    };
    Said {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn ctl(socket: &Path, args: &[&str]) -> Said {
    finish(start_ctl(socket, args))
}

/// `respawn ctl` with no path and command of ours: the usage cases.
fn ctl_words(args: &[&str]) -> Said {
    let mut command = Command::new(binary());
    command
        .arg("ctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    finish(spawn_tied(command).expect("starting respawn ctl"))
}

// ---------------------------------------------------------------------------
// Against a fake master.

/// A fake master on `socket`: for each canned answer, one connection, which
/// it greets with `greeting`, reads one request line from, and answers.
/// Then it removes its socket, as a master that stops does. Returns the
/// request lines it heard.
fn fake_master(
    socket: PathBuf,
    greeting: &'static str,
    answers: Vec<String>,
) -> thread::JoinHandle<Vec<String>> {
    let listener = UnixListener::bind(&socket).expect("binding the fake master");
    thread::spawn(move || {
        let mut heard = Vec::new();
        for answer in answers {
            let Ok((mut conn, _)) = listener.accept() else {
                break;
            };
            let _ = conn.write_all(greeting.as_bytes());
            let mut request = Vec::new();
            let mut byte = [0];
            while conn.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
                request.push(byte[0]);
            }
            heard.push(String::from_utf8_lossy(&request).into_owned());
            let _ = conn.write_all(answer.as_bytes());
        }
        let _ = std::fs::remove_file(&socket);
        heard
    })
}

const GREETING: &str = "respawn-control 1\n";

/// A master with two workers, one of them serving `/sleep/2000`; `cpu` is
/// the busy worker's CPU time at `age` seconds old.
fn status_body(cpu: f64, age: f64) -> String {
    format!(
        r#"{{"protocol":1,"pid":4321,"uptime_secs":90.0,"target":2,"generation":1,"stopping":false,"upgrading":false,"restarts_in_window":0,"restart_limit":10,"restart_window_secs":60,"backoff_slots":[],"listeners":[{{"address":"127.0.0.1:8080","queued":0,"backlog":1024}}],"workers":[{{"pid":4330,"slot":0,"generation":1,"state":"ready","age_secs":{age},"requests":17,"busy_secs":1.5,"request":"GET /sleep/2000 HTTP/1.1","peer":"127.0.0.1:50312","cpu_secs":{cpu},"rss_bytes":2621440}},{{"pid":4331,"slot":1,"generation":1,"state":"ready","age_secs":80.0,"requests":3,"busy_secs":null,"request":null,"peer":null,"cpu_secs":0.0,"rss_bytes":2621440}}]}}"#
    )
}

#[test]
fn ctl_without_a_master_says_how_to_start_one() {
    let dir = Dir::new();
    let said = ctl(&dir.socket(), &["status"]);
    assert_eq!(said.code, Some(1), "{said:?}");
    assert_eq!(
        said.stderr,
        format!(
            "respawn ctl: connecting to {0}: no such file or directory \
             (is respawn running with --control {0}?)\n",
            dir.socket_arg()
        )
    );
    assert_eq!(said.stdout, "");
}

#[test]
fn ctl_bad_usage_exits_2_and_never_starts_a_master() {
    for (args, said_first) in [
        (
            &[][..],
            "respawn ctl: a PATH (the master's --control) and a COMMAND are needed",
        ),
        (
            &["/tmp/x.sock", "restart"][..],
            "respawn ctl: \"restart\" is not a command: ",
        ),
        (
            &["/tmp/x.sock", "scale", "lots"][..],
            "respawn ctl: scale: \"lots\" is not a whole number",
        ),
        // A master's flag after ctl is not the master's.
        (&["--workers", "2"][..], "respawn ctl: --workers: no such flag\n"),
        (
            &["/tmp/x.sock", "status", "--jsn"][..],
            "respawn ctl: --jsn: no such flag; did you mean --json?\n",
        ),
        // The request line is `stop now`; the client's word is a flag.
        (
            &["/tmp/x.sock", "stop", "now"][..],
            "respawn ctl: stop: \"now\" is one word too many: an immediate stop is stop --now\n",
        ),
        // lexopt took -1 for a flag: "invalid option '-1'".
        (
            &["/tmp/x.sock", "scale", "-1"][..],
            "respawn ctl: scale: \"-1\" is not a number of workers: N is how many to keep \
             (0 or more), not a change (respawn ctl /tmp/x.sock status says how many are kept now)\n",
        ),
    ] {
        let said = ctl_words(args);
        assert_eq!(said.code, Some(2), "{args:?}: {said:?}");
        assert!(said.stderr.starts_with(said_first), "{args:?}: {said:?}");
        assert!(said.stderr.contains("usage: respawn ctl PATH status"), "{said:?}");
        assert!(
            !said.stderr.contains("listening on"),
            "a master started: {said:?}"
        );
    }
    let said = ctl_words(&["--help"]);
    assert_eq!(said.code, Some(0), "{said:?}");
    assert!(
        said.stdout.starts_with("respawn ctl: ask a running respawn"),
        "{said:?}"
    );
    assert!(said.stdout.lines().all(|l| l.len() <= 80), "{said:?}");
}

#[test]
fn status_prints_a_table_and_json_prints_the_body_as_received() {
    let dir = Dir::new();
    let body = status_body(0.5, 20.0);
    let answers = vec![format!("ok\n{body}"), format!("ok\n{body}\n")];
    let master = fake_master(dir.socket(), GREETING, answers);
    let table = ctl(&dir.socket(), &["status"]);
    let json = ctl(&dir.socket(), &["status", "--json"]);
    assert_eq!(master.join().expect("the fake master"), ["status", "status"]);

    assert_eq!(table.code, Some(0), "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "master 4321  up 1m30s  target 2  generation 1  restarts 0/10 in 60s",
            "workers 2: 2 ready, 1 busy  slots in backoff: none",
            "listen 127.0.0.1:8080  queued 0 / backlog 1024",
            "",
            " PID SLOT GEN STATE   AGE REQS CPU% RSS MiB BUSY NOW",
            "4330    0   1 ready   20s   17  2.5     2.5 1.5s GET /sleep/2000 HTTP/1.1 from 127.0.0.1:50312",
            "4331    1   1 ready 1m20s    3  0.0     2.5    - -",
        ],
        "{table:?}"
    );
    assert_eq!(json.code, Some(0), "{json:?}");
    assert_eq!(json.stdout, format!("{body}\n"));
}

/// Something at the path greets as a master does, reads the request, and
/// says nothing more (another program planted there, a stuck master):
/// `status` gives up after its deadline with a line, where it waited
/// forever.
#[test]
fn a_peer_that_greets_and_never_answers_is_given_up_on() {
    let dir = Dir::new();
    let listener = UnixListener::bind(dir.socket()).expect("binding the silent peer");
    let (done, hold) = mpsc::channel::<()>();
    listener.set_nonblocking(true).expect("a non-blocking listener");
    let peer = thread::spawn(move || {
        // A client that never connects must not hold the test: the accept
        // has the test's deadline.
        let mut conn = None;
        wait_until(PATIENCE, || {
            conn = listener.accept().ok().map(|(conn, _)| conn);
            conn.is_some()
        });
        if let Some(mut conn) = conn {
            let _ = conn.write_all(GREETING.as_bytes());
            // Holds the connection open, silent, until the test is done.
            let _ = hold.recv_timeout(PATIENCE);
        }
    });
    let started = Instant::now();
    let said = ctl(&dir.socket(), &["status"]);
    let _ = done.send(());
    let _ = peer.join();
    assert_eq!(said.code, Some(1), "{said:?}");
    assert_eq!(
        said.stderr,
        format!(
            "respawn ctl: no whole answer from {} within 5 s (is its master stuck, or is something else listening there?)\n",
            dir.socket_arg()
        )
    );
    assert!(started.elapsed() < PATIENCE, "{:?}", started.elapsed());
}

#[test]
fn refusals_other_versions_and_garbage_exit_1_with_the_reason() {
    let dir = Dir::new();
    let master = fake_master(
        dir.socket(),
        GREETING,
        vec![
            "error scale: 5000 is more than the 4096 workers the master can hold\n".to_owned(),
            "ok\n{\"not json".to_owned(),
            "HTTP/1.1 400 Bad Request\r\n\r\n".to_owned(),
        ],
    );
    let refused = ctl(&dir.socket(), &["scale", "5000"]);
    let not_json = ctl(&dir.socket(), &["status", "--json"]);
    let garbage = ctl(&dir.socket(), &["metrics"]);
    assert_eq!(
        master.join().expect("the fake master"),
        ["scale 5000", "status", "metrics"]
    );
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert_eq!(
        refused.stderr,
        "respawn ctl: scale: 5000 is more than the 4096 workers the master can hold\n"
    );
    assert_eq!(not_json.code, Some(1), "{not_json:?}");
    assert!(
        not_json
            .stderr
            .starts_with("respawn ctl: the master's status is not valid JSON: "),
        "{not_json:?}"
    );
    assert_eq!(not_json.stdout, "", "nothing invalid reaches a script");
    assert_eq!(garbage.code, Some(1), "{garbage:?}");
    assert_eq!(
        garbage.stderr,
        "respawn ctl: an answer this client does not understand: \"HTTP/1.1 400 Bad Request?\"\n"
    );

    let dir = Dir::new();
    let master = fake_master(dir.socket(), "respawn-control 2\n", vec![String::new()]);
    let newer = ctl(&dir.socket(), &["status"]);
    let _ = master.join();
    assert_eq!(newer.code, Some(1), "{newer:?}");
    assert_eq!(
        newer.stderr,
        format!(
            "respawn ctl: {} speaks version 2 of the control protocol, this respawn ctl \
             speaks 1: use the respawn binary the master runs\n",
            dir.socket_arg()
        )
    );
}

#[test]
fn commands_print_one_line_when_done() {
    let dir = Dir::new();
    let master = fake_master(
        dir.socket(),
        GREETING,
        vec![
            "ok\n{\"target\":5,\"ready\":5}".to_owned(),
            "ok\n{\"generation\":3,\"ready\":2}".to_owned(),
            "ok\n{\"generation\":4,\"path\":\"/usr/local/bin/respawn\"}".to_owned(),
            "ok\n{\"stopped\":true}".to_owned(),
            "ok\n# TYPE respawn_workers_wanted gauge\nrespawn_workers_wanted 2\n".to_owned(),
        ],
    );
    let said: Vec<Said> = [
        &["scale", "5"][..],
        &["reload"][..],
        &["upgrade"][..],
        &["stop", "--now"][..],
        &["metrics"][..],
    ]
    .iter()
    .map(|args| ctl(&dir.socket(), args))
    .collect();
    assert_eq!(
        master.join().expect("the fake master"),
        ["scale 5", "reload", "upgrade", "stop now", "metrics"]
    );
    let printed: Vec<(Option<i32>, &str)> = said.iter().map(|s| (s.code, s.stdout.as_str())).collect();
    assert_eq!(
        printed,
        [
            (Some(0), "5 workers ready\n"),
            (Some(0), "generation 3: every worker is new (2 ready)\n"),
            (Some(0), "upgraded to /usr/local/bin/respawn, generation 4\n"),
            (Some(0), "stopped\n"),
            (
                Some(0),
                "# TYPE respawn_workers_wanted gauge\nrespawn_workers_wanted 2\n"
            ),
        ],
        "{said:?}"
    );
}

#[test]
fn watch_prints_a_table_a_second_until_the_master_goes_away() {
    let dir = Dir::new();
    // The busy worker uses 0.9 s of CPU in its next second, then 0.1 s.
    let answers = [(0.5, 20.0), (1.4, 21.0), (1.5, 22.0)]
        .iter()
        .map(|&(cpu, age)| format!("ok\n{}", status_body(cpu, age)))
        .collect();
    let master = fake_master(dir.socket(), GREETING, answers);
    let said = ctl(&dir.socket(), &["status", "--watch"]);
    assert_eq!(master.join().expect("the fake master").len(), 3);
    assert_eq!(said.code, Some(0), "{said:?}");
    // Not a terminal: no screen clearing, tables one after the other.
    assert!(!said.stdout.contains('\x1b'), "{said:?}");
    assert!(said.stdout.starts_with("master "), "{said:?}");
    assert_eq!(
        said.stdout.matches("\n\nmaster ").count(),
        2,
        "a blank line between: {said:?}"
    );
    let all = format!("\n{}", said.stdout);
    let tables: Vec<&str> = all.split("\nmaster ").skip(1).collect();
    assert_eq!(tables.len(), 3, "{said:?}");
    let cpu = |table: &str| -> String {
        let row = table.lines().find(|l| l.starts_with("4330")).unwrap_or_default();
        row.split_whitespace().nth(6).unwrap_or_default().to_owned()
    };
    // Its life, then the change over the last interval.
    assert_eq!(
        tables.iter().map(|t| cpu(t)).collect::<Vec<_>>(),
        ["2.5", "90.0", "10.0"],
        "{said:?}"
    );
    assert!(
        said.stdout.ends_with(&format!(
            "\nthe master went away: connecting to {0}: no such file or directory \
             (is respawn running with --control {0}?)\n",
            dir.socket_arg()
        )),
        "{said:?}"
    );
}

// ---------------------------------------------------------------------------
// Against the real master.

/// A master with `workers` ready workers and its control socket open.
fn master_with_control(workers: usize, dir: &Dir) -> Respawn {
    let n = workers.to_string();
    let socket = dir.socket_arg();
    let respawn = Respawn::start(&["--workers", &n, "--control", &socket]);
    respawn.wait_for_workers(workers);
    assert!(
        wait_until(PATIENCE, || dir.socket().exists()),
        "no control socket at {socket}\n{}",
        respawn.dump()
    );
    respawn
}

/// The master's live children at this moment, and whether each has said
/// `worker <pid> ready`. The log reaches the test through a pipe and a
/// thread, a little after the master wrote it: a line the master wrote
/// before it answered is waited for, briefly.
fn children_and_ready(respawn: &Respawn) -> (BTreeSet<i32>, bool) {
    let children = respawn.workers();
    let all_ready = wait_until(PATIENCE, || {
        let log = respawn.log();
        children
            .iter()
            .all(|&pid| log.iter().any(|l| worker_says(l, "ready") == Some(pid)))
    });
    (children, all_ready)
}

fn status_json(respawn: &Respawn, socket: &Path) -> Value {
    let said = ctl(socket, &["status", "--json"]);
    assert_eq!(said.code, Some(0), "{said:?}\n{}", respawn.dump());
    assert_eq!(said.stdout.lines().count(), 1, "one line: {said:?}");
    serde_json::from_str(&said.stdout).unwrap_or_else(|err| panic!("not JSON ({err}): {said:?}"))
}

fn pids(status: &Value) -> BTreeSet<i32> {
    workers(status)
        .iter()
        .filter_map(|w| w["pid"].as_i64())
        .map(|pid| pid as i32)
        .collect()
}

fn workers(status: &Value) -> Vec<Value> {
    status["workers"].as_array().cloned().unwrap_or_default()
}

#[test]
fn status_under_load_shows_busy_workers_and_their_request_lines() {
    let dir = Dir::new();
    let respawn = master_with_control(2, &dir);
    let addr = respawn.addr;
    // Long enough for `respawn ctl` to start and ask on a busy host.
    let clients: Vec<_> = (0..2)
        .map(|_| thread::spawn(move || get(addr, "/sleep/5000")))
        .collect();
    let serving =
        |l: &str| message(l).starts_with("worker ") && message(l).ends_with(" serving GET /sleep/5000");
    assert!(
        wait_until(PATIENCE, || respawn.log().iter().filter(|l| serving(l)).count()
            == 2),
        "both requests in flight\n{}",
        respawn.dump()
    );
    let said = ctl(&dir.socket(), &["status"]);
    for client in clients {
        let answer = client.join().expect("a client");
        assert!(matches!(&answer, Ok(r) if r.status == 200), "{answer:?}");
    }

    assert_eq!(said.code, Some(0), "{said:?}\n{}", respawn.dump());
    for line in said.stdout.lines() {
        assert!(line.len() <= 100, "{} columns: {line:?}", line.len());
    }
    assert!(
        said.stdout.starts_with(&format!("master {}  up ", respawn.pid)),
        "{said:?}"
    );
    assert!(said.stdout.contains("\nworkers 2: 2 ready, 2 busy  "), "{said:?}");
    let rows: Vec<&str> = said
        .stdout
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("PID "))
        .skip(1)
        .collect();
    let shown: BTreeSet<i32> = rows
        .iter()
        .filter_map(|row| row.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(shown, respawn.workers(), "{said:?}");
    for row in rows {
        assert!(
            row.contains(" GET /sleep/5000 HTTP/1.1 from 127.0.0.1:"),
            "a busy worker with its request: {row:?}"
        );
        let busy = row.split_whitespace().nth(8).unwrap_or_default();
        assert!(busy.ends_with('s'), "BUSY is a duration: {row:?}");
    }
}

#[test]
fn status_json_parses_and_its_pids_are_the_masters_children() {
    let dir = Dir::new();
    let respawn = master_with_control(2, &dir);
    let status = status_json(&respawn, &dir.socket());
    assert_eq!(status["target"].as_u64(), Some(2), "{status}");
    assert_eq!(pids(&status), respawn.workers(), "{status}");
    for worker in workers(&status) {
        assert_eq!(worker["state"].as_str(), Some("ready"), "{worker}");
        assert!(worker["slot"].is_u64(), "{worker}");
        assert!(worker["requests"].is_u64(), "{worker}");
    }
}

#[test]
fn scale_answers_once_the_workers_are_ready() {
    let dir = Dir::new();
    let respawn = master_with_control(2, &dir);
    let said = ctl(&dir.socket(), &["scale", "5"]);
    let (children, all_ready) = children_and_ready(&respawn);
    assert_eq!(
        (said.code, said.stdout.as_str()),
        (Some(0), "5 workers ready\n"),
        "{said:?}"
    );
    assert_eq!(
        children.len(),
        5,
        "at the answer: {children:?}\n{}",
        respawn.dump()
    );
    assert!(
        all_ready,
        "at the answer, each of {children:?} is ready\n{}",
        respawn.dump()
    );

    let said = ctl(&dir.socket(), &["scale", "1"]);
    assert_eq!(
        (said.code, said.stdout.as_str()),
        (Some(0), "1 worker ready\n"),
        "{said:?}"
    );
    // No more count; the ones retired may still be finishing their exit.
    assert_eq!(respawn.wait_for_workers(1).len(), 1, "{}", respawn.dump());
}

#[test]
fn two_scales_back_to_back_both_take_effect() {
    let dir = Dir::new();
    let respawn = master_with_control(2, &dir);
    let first = start_ctl(&dir.socket(), &["scale", "3"]);
    // Not waiting for its answer: only for the master to have acted on it
    // (its third worker forked), so that the second is surely second.
    assert!(
        wait_until(PATIENCE, || respawn.workers().len() == 3),
        "scale 3 forks a worker\n{}",
        respawn.dump()
    );
    let second = start_ctl(&dir.socket(), &["scale", "4"]);
    let (first, second) = (finish(first), finish(second));
    let (children, all_ready) = children_and_ready(&respawn);

    assert_eq!(
        (second.code, second.stdout.as_str()),
        (Some(0), "4 workers ready\n"),
        "{second:?}"
    );
    assert_eq!(children.len(), 4, "{children:?}\n{}", respawn.dump());
    assert!(all_ready, "{children:?}\n{}", respawn.dump());
    // The first is done (its third worker Ready before the second came), or
    // was overtaken by the second and told so: either way an answer, never
    // silence, and no other error.
    match first.code {
        Some(0) => assert_eq!(first.stdout, "3 workers ready\n", "{first:?}"),
        Some(1) => assert_eq!(
            (first.stdout.as_str(), first.stderr.as_str()),
            ("", "respawn ctl: superseded: 4 workers are wanted now\n"),
            "{first:?}"
        ),
        _ => panic!("scale 3: {first:?}"),
    }
    assert_eq!(status_json(&respawn, &dir.socket())["target"].as_u64(), Some(4));
}

#[test]
fn reload_answers_with_a_generation_whose_workers_are_all_new() {
    let dir = Dir::new();
    let respawn = master_with_control(2, &dir);
    let old = respawn.workers();
    let said = ctl(&dir.socket(), &["reload"]);
    let status = status_json(&respawn, &dir.socket());

    assert_eq!(said.code, Some(0), "{said:?}\n{}", respawn.dump());
    let generation: u64 = said
        .stdout
        .strip_prefix("generation ")
        .and_then(|rest| rest.strip_suffix(": every worker is new (2 ready)\n"))
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("{said:?}"));
    assert!(generation >= 1, "a reload makes a new generation: {said:?}");
    assert_eq!(status["generation"].as_u64(), Some(generation), "{status}");
    let counted: Vec<Value> = workers(&status)
        .into_iter()
        .filter(|w| w["state"].as_str() != Some("retiring"))
        .collect();
    assert_eq!(counted.len(), 2, "{status}");
    for worker in counted {
        assert_eq!(worker["state"].as_str(), Some("ready"), "{worker}");
        assert_eq!(worker["generation"].as_u64(), Some(generation), "{worker}");
        let pid = worker["pid"].as_i64().unwrap_or_default() as i32;
        assert!(!old.contains(&pid), "{pid} is an old worker: {old:?}");
    }
}

#[test]
fn metrics_is_prometheus_text() {
    let dir = Dir::new();
    let respawn = master_with_control(2, &dir);
    let said = ctl(&dir.socket(), &["metrics"]);
    assert_eq!(said.code, Some(0), "{said:?}\n{}", respawn.dump());
    let mut values = std::collections::BTreeMap::new();
    for line in said.stdout.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        assert!(value.parse::<f64>().is_ok(), "not a value: {line:?}");
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "not a metric name: {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels not in braces: {line:?}"));
            for label in inner.split(',') {
                let (key, quoted) = label.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                assert!(!key.is_empty(), "{line:?}");
                assert!(
                    quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                    "{line:?}"
                );
            }
        }
        values.insert(series.to_owned(), value.to_owned());
    }
    assert_eq!(
        values.get("respawn_workers_wanted").map(String::as_str),
        Some("2"),
        "{said:?}"
    );
    assert_eq!(
        values.get("respawn_workers{state=\"ready\"}").map(String::as_str),
        Some("2"),
        "{said:?}"
    );
    for name in [
        "respawn_generation",
        "respawn_requests_total",
        "respawn_master_uptime_seconds",
    ] {
        assert!(values.contains_key(name), "no {name}: {said:?}");
    }
}

#[test]
fn stop_answers_once_every_worker_has_exited() {
    let dir = Dir::new();
    let mut respawn = master_with_control(2, &dir);
    let workers = respawn.workers();
    let said = ctl(&dir.socket(), &["stop"]);
    let left: Vec<i32> = workers.iter().copied().filter(|&pid| alive(pid)).collect();
    assert_eq!(
        (said.code, said.stdout.as_str()),
        (Some(0), "stopped\n"),
        "{said:?}"
    );
    assert!(
        left.is_empty(),
        "at the answer, still alive: {left:?}\n{}",
        respawn.dump()
    );
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
}

/// A stop asked on the control socket is logged as one: `stop --now` was
/// logged as `received SIGINT, stopping now`, though no signal was sent.
#[test]
fn a_stop_through_the_control_socket_is_logged_naming_it_not_a_signal() {
    for (args, line) in [
        (
            &["stop"][..],
            "control socket: stop, stopping gracefully (graceful timeout 30 s)",
        ),
        (&["stop", "--now"][..], "control socket: stop now, stopping now"),
    ] {
        let dir = Dir::new();
        let mut respawn = master_with_control(1, &dir);
        let said = ctl(&dir.socket(), args);
        assert_eq!(
            (said.code, said.stdout.as_str()),
            (Some(0), "stopped\n"),
            "{args:?}: {said:?}"
        );
        assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
        assert_eq!(
            respawn.count_lines(line),
            1,
            "{args:?}: no {line:?}\n{}",
            respawn.dump()
        );
        assert_eq!(
            respawn.count_log("received SIG"),
            0,
            "{args:?}: a signal named\n{}",
            respawn.dump()
        );
    }
}

/// An upgrade asked on the control socket is logged as one, from its first
/// line (`... upgrading to <path>`) to the master's re-execution: no line
/// names a signal that was never sent.
#[test]
fn an_upgrade_through_the_control_socket_is_logged_naming_it_not_a_signal() {
    let deploy = Deploy::new("ctl-logged");
    let socket = deploy.dir.join("control.sock");
    let respawn = deploy.start(&["--workers", "1", "--control", &socket.display().to_string()]);
    respawn.wait_for_workers(1);
    deploy.replace_with_build("n");
    let said = ctl(&socket, &["upgrade"]);
    assert_eq!(said.code, Some(0), "{said:?}\n{}", respawn.dump());
    let first = format!(
        "control socket: upgrade, upgrading to {}: each old worker stops once a new one is ready",
        deploy.shown()
    );
    respawn.wait_for_line(&first);
    assert_eq!(respawn.count_lines(&first), 1, "{}", respawn.dump());
    respawn.wait_for_log("the re-execution", |l| {
        message(l).starts_with("master re-executed as ")
    });
    assert_eq!(
        respawn.count_log("received SIG"),
        0,
        "a signal named\n{}",
        respawn.dump()
    );
}
