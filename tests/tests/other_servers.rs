//! Other servers under respawn: gunicorn, uvicorn and waitress, which do
//! not speak respawn's channel, run as each worker's program. Each test
//! holds one row of docs/protocol.md's "Other servers under respawn": the
//! command line that works, what a hard exit in a request does, a HUP under
//! load (no failed request where the server stops gracefully, only cut
//! connections where it does not), and a SIGTERM with a request in flight
//! (answered or cut, as the table says), then a clean exit with nothing left.
//!
//! The servers come from PyPI, at the pinned versions of [`PINS`], into one
//! venv per run of this binary, in cargo's target/tmp (pip's cache beside
//! it). Without python3 the tests skip with `Need::Python`; where the
//! install fails, with `Need::Registry`: CI allows neither
//! (docs/testing.md, skips).

use respawn_tests::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// What is installed, dependencies included (`--no-deps`): the table in
/// docs/protocol.md is true of these versions.
const PINS: &[&str] = &[
    "gunicorn==27.0.1",
    "uvicorn==0.55.0",
    "click==8.5.1",
    "h11==0.16.0",
    "waitress==3.0.2",
];

/// One application for the three: `wsgi` (gunicorn, waitress) and `asgi`
/// (uvicorn). `/` answers `served by <pid>`; `/sleep/MS` touches `busy`
/// beside this file, then answers MS ms later; `/raise` raises, which the
/// server answers 500 itself; `/exit` exits hard, with no answer, as
/// `os._exit(1)` in a route does.
const APP: &str = r#"
import asyncio, os, time
HERE = os.path.dirname(os.path.abspath(__file__))

def pause(path):
    if path == "/exit":
        os._exit(1)
    if path == "/raise":
        raise RuntimeError("a bug in a route")
    if path.startswith("/sleep/"):
        open(os.path.join(HERE, "busy"), "w").close()
        return int(path[len("/sleep/"):]) / 1000
    return 0

def body():
    return b"served by %d\n" % os.getpid()

def wsgi(environ, start_response):
    time.sleep(pause(environ["PATH_INFO"]))
    text = body()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
    return [text]

async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await asyncio.sleep(pause(scope["path"]))
    text = body()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(text))]})
    await send({"type": "http.response.body", "body": text})
"#;

/// waitress has no command-line flag for an inherited socket: its API
/// takes one (docs/protocol.md shows this file).
const WAITRESS: &str = r#"
import socket
import waitress
from app import wsgi
waitress.serve(wsgi, sockets=[socket.socket(fileno=3)])
"#;

/// What a server does on SIGTERM (a stop, or a HUP's rollout).
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// It stops accepting and finishes every connection it took: no
    /// request fails.
    Graceful,
    /// It finishes the requests it has read, but resets a connection it
    /// accepted and has not read yet (uvicorn closes each connection with
    /// no request under way): under load, about one per stopped worker.
    ResetsUnread,
    /// It exits at once (no handler for SIGTERM), cutting what it holds.
    Abrupt,
}

/// What a hard exit in a route does to the respawn worker.
#[derive(Clone, Copy, PartialEq)]
enum HardExit {
    /// The server's own master (gunicorn's arbiter) replaces the process
    /// that exited; respawn's worker lives on.
    Absorbed,
    /// The respawn worker itself exits, and the master replaces it.
    Replaced,
}

struct Server {
    test: &'static str,
    name: &'static str,
    /// respawn's flags before `--`.
    flags: &'static [&'static str],
    /// The program and its arguments, `{venv}` and `{dir}` filled in.
    command: &'static [&'static str],
    hard_exit: HardExit,
    stop: Stop,
    /// Its `STATUS=` (sd_notify), when it speaks the readiness protocol.
    notify_status: Option<&'static str>,
}

#[test]
fn gunicorn_serves_under_respawn_reloads_without_a_failed_request_and_stops_gracefully() {
    serves_under_respawn(&Server {
        test: "gunicorn_serves_under_respawn_reloads_without_a_failed_request_and_stops_gracefully",
        name: "gunicorn",
        flags: &["--ready-on-notify"],
        command: &[
            "{venv}/bin/gunicorn",
            "--workers",
            "1",
            "--no-control-socket",
            "--log-level",
            "warning",
            "--chdir",
            "{dir}",
            "app:wsgi",
        ],
        hard_exit: HardExit::Absorbed,
        stop: Stop::Graceful,
        notify_status: Some("Gunicorn arbiter booted"),
    });
}

#[test]
fn uvicorn_serves_under_respawn_and_finishes_its_requests_when_stopped() {
    serves_under_respawn(&Server {
        test: "uvicorn_serves_under_respawn_and_finishes_its_requests_when_stopped",
        name: "uvicorn",
        flags: &["--ready-on-exec", "--timeout", "0"],
        command: &[
            "{venv}/bin/uvicorn",
            "--fd",
            "3",
            "--log-level",
            "warning",
            "--app-dir",
            "{dir}",
            "app:asgi",
        ],
        hard_exit: HardExit::Replaced,
        stop: Stop::ResetsUnread,
        notify_status: None,
    });
}

#[test]
fn waitress_serves_under_respawn_but_a_stop_cuts_what_it_holds() {
    serves_under_respawn(&Server {
        test: "waitress_serves_under_respawn_but_a_stop_cuts_what_it_holds",
        name: "waitress",
        flags: &["--ready-on-exec", "--timeout", "0"],
        command: &["{venv}/bin/python", "{dir}/serve.py"],
        hard_exit: HardExit::Replaced,
        stop: Stop::Abrupt,
        notify_status: None,
    });
}

fn serves_under_respawn(server: &Server) {
    let Some(venv) = venv(server.test) else {
        return;
    };
    let dir = TempDir::new(&format!("respawn-{}", server.name));
    std::fs::write(dir.join("app.py"), APP).expect("writing the application");
    std::fs::write(dir.join("serve.py"), WAITRESS).expect("writing waitress's launcher");
    let control = dir.join("control.sock");
    let fill = |arg: &str| {
        arg.replace("{venv}", &venv.display().to_string())
            .replace("{dir}", &dir.display().to_string())
    };
    let command: Vec<String> = server.command.iter().map(|arg| fill(arg)).collect();
    let control_arg = control.display().to_string();
    let mut args = vec!["--workers", "2", "--control", &control_arg];
    args.extend_from_slice(server.flags);
    args.push("--");
    args.extend(command.iter().map(String::as_str));
    let mut respawn = Respawn::start(&args);
    let workers = respawn.wait_for_workers(2);

    // It answers, from a process of one of the workers.
    let pid = served_by(&get_close(respawn.addr, "/")).unwrap_or_else(|| panic!("GET /\n{}", respawn.dump()));
    assert!(
        workers.iter().any(|&w| w == pid || descendants(w).contains(&pid)),
        "answered by {pid}, not by a worker {workers:?} or a process of one\n{}",
        respawn.dump()
    );
    if let Some(said) = server.notify_status {
        let shows = wait_until(PATIENCE, || {
            status(&control)["workers"]
                .as_array()
                .is_some_and(|rows| rows.len() == 2 && rows.iter().all(|row| row["notify_status"] == said))
        });
        assert!(shows, "status: {}\n{}", status(&control), respawn.dump());
    }

    an_exception_is_the_server_s_own_500(&respawn);
    hard_exit_in_a_route(&respawn, server.hard_exit);
    hup_under_load(&respawn, server.name, server.stop);

    // SIGTERM with a request in flight: answered by a server that finishes
    // what it has read, cut by one that exits at once; then the master
    // exits 0 and leaves nothing behind.
    let busy = dir.join("busy");
    let _ = std::fs::remove_file(&busy);
    let addr = respawn.addr;
    let slow = std::thread::spawn(move || get_close(addr, "/sleep/1500"));
    assert!(
        wait_until(PATIENCE, || busy.exists()),
        "the request never reached the application\n{}",
        respawn.dump()
    );
    let everything = descendants(respawn.pid);
    respawn.signal(libc::SIGTERM);
    let answer = slow.join().expect("the slow client");
    if server.stop != Stop::Abrupt {
        assert!(
            served_by(&answer).is_some(),
            "the request in flight at the stop got {answer:?}\n{}",
            respawn.dump()
        );
    } else {
        assert!(
            cut(&answer),
            "the request in flight at the stop got {answer:?}: the table says it is cut\n{}",
            respawn.dump()
        );
    }
    let status = respawn.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", respawn.dump());
    let left: Vec<i32> = everything.into_iter().filter(|&pid| alive(pid)).collect();
    assert!(left.is_empty(), "left running: {left:?}\n{}", respawn.dump());
}

/// GET /raise: the server answers 500 itself, and no process exits.
fn an_exception_is_the_server_s_own_500(respawn: &Respawn) {
    let before: BTreeSet<i32> = respawn
        .workers()
        .into_iter()
        .flat_map(|w| descendants(w).into_iter().chain([w]))
        .collect();
    let answer = get_close(respawn.addr, "/raise");
    let head = answer
        .as_ref()
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
    assert!(
        head.as_ref().is_ok_and(|text| text.starts_with("HTTP/1.1 500 ")),
        "GET /raise got {head:?}\n{}",
        respawn.dump()
    );
    assert!(before.iter().all(|&pid| alive(pid)), "{}", respawn.dump());
}

/// GET /exit: the process that takes it exits at once, with no answer.
/// gunicorn's arbiter replaces its own worker, so respawn's worker lives
/// on; uvicorn and waitress are the worker, and the master replaces it.
fn hard_exit_in_a_route(respawn: &Respawn, expected: HardExit) {
    let before = respawn.workers();
    let tree: Vec<(i32, BTreeSet<i32>)> = before.iter().map(|&w| (w, descendants(w))).collect();
    let answer = get_close(respawn.addr, "/exit");
    assert!(cut(&answer), "GET /exit got {answer:?}\n{}", respawn.dump());
    match expected {
        HardExit::Absorbed => {
            // The arbiter whose worker exited gets a new one, and is itself
            // still the same respawn worker.
            let refilled = wait_until(PATIENCE, || {
                tree.iter().any(|(worker, children)| {
                    let now = descendants(*worker);
                    !children.iter().all(|c| now.contains(c)) && now.len() == children.len()
                })
            });
            assert!(refilled, "no gunicorn worker was replaced\n{}", respawn.dump());
            assert_eq!(respawn.workers(), before, "{}", respawn.dump());
        }
        HardExit::Replaced => {
            let line = respawn.wait_for_log("a worker's hard exit", |l| {
                message(l).starts_with("worker ") && message(l).contains(" exited (code 1)")
            });
            let dead = worker_pid(&line).expect("a pid");
            assert!(before.contains(&dead), "{line}\n{}", respawn.dump());
            let after = respawn.wait_for_workers(2);
            assert!(!after.contains(&dead), "{}", respawn.dump());
        }
    }
    assert!(
        served_by(&get_close(respawn.addr, "/")).is_some(),
        "{}",
        respawn.dump()
    );
}

/// HUP while 3 clients send GET / on new connections: every worker is
/// replaced, and answers come from the new ones. A server that stops
/// gracefully fails no request; one that does not may cut the connections
/// it holds (no byte of an answer, part of one, or a reset), and nothing else: no
/// refusal, no error answer.
fn hup_under_load(respawn: &Respawn, name: &str, stop: Stop) {
    let old: BTreeSet<i32> = respawn
        .workers()
        .into_iter()
        .flat_map(|w| descendants(w).into_iter().chain([w]))
        .collect();
    let load = CloseLoad::start(respawn.addr, 3);
    respawn.signal(libc::SIGHUP);
    respawn.wait_for_line("rolling restart done: every worker is new");
    let new = respawn.wait_for_workers(2);
    assert!(new.is_disjoint(&old), "{new:?} {old:?}\n{}", respawn.dump());
    let gone = wait_until(PATIENCE, || old.iter().all(|&pid| !alive(pid)));
    assert!(gone, "an old process is still alive\n{}", respawn.dump());
    // From here on only new processes answer.
    let goal = load.answered.load(Ordering::SeqCst) + 20;
    let answered = wait_until(PATIENCE, || load.answered.load(Ordering::SeqCst) >= goal);
    let (ok, cut, other) = load.stop();
    assert!(answered, "the new workers do not answer\n{}", respawn.dump());
    eprintln!(
        "{name}: HUP under load: {ok} answered, {cut} cut, {} other failures",
        other.len()
    );
    assert!(other.is_empty(), "{other:?}\n{}", respawn.dump());
    if stop == Stop::Graceful {
        assert_eq!(cut, 0, "{}", respawn.dump());
    }
}

/// Clients that GET / on a new connection each time, saying
/// `Connection: close` (the servers keep a connection alive otherwise).
struct CloseLoad {
    done: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<std::io::Result<Vec<u8>>>>>,
    clients: Vec<std::thread::JoinHandle<()>>,
}

impl CloseLoad {
    fn start(addr: SocketAddr, clients: usize) -> CloseLoad {
        let done = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let clients = (0..clients)
            .map(|_| {
                let (done, answered, failed) = (done.clone(), answered.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        let got = get_close(addr, "/");
                        if served_by(&got).is_some() {
                            answered.fetch_add(1, Ordering::SeqCst);
                        } else {
                            failed.lock().unwrap().push(got);
                        }
                    }
                })
            })
            .collect();
        CloseLoad {
            done,
            answered,
            failed,
            clients,
        }
    }

    /// Stops the clients: how many were answered, how many cut, and the
    /// other failures, shown.
    fn stop(self) -> (usize, usize, Vec<String>) {
        self.done.store(true, Ordering::SeqCst);
        for client in self.clients {
            client.join().expect("a client");
        }
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        let cuts = failed.iter().filter(|got| cut(got)).count();
        let other = failed
            .iter()
            .filter(|got| !cut(got))
            .map(|got| match got {
                Ok(bytes) => format!("answered {:?}", String::from_utf8_lossy(bytes)),
                Err(err) => format!("{err}"),
            })
            .collect();
        (self.answered.load(Ordering::SeqCst), cuts, other)
    }
}

/// GET `path` on a new connection with `Connection: close`, and every byte
/// until the server closes it.
fn get_close(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect_timeout(&addr, PATIENCE)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    conn.set_write_timeout(Some(PATIENCE))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)?;
    Ok(answer)
}

/// The pid of a 200 answer `served by <pid>`.
fn served_by(got: &std::io::Result<Vec<u8>>) -> Option<i32> {
    let text = std::str::from_utf8(got.as_ref().ok()?).ok()?;
    if !text.starts_with("HTTP/1.1 200 ") {
        return None;
    }
    text.split_once("\r\n\r\n")?
        .1
        .trim()
        .strip_prefix("served by ")?
        .parse()
        .ok()
}

/// Closed without a byte of an answer or before its end, or reset: what a
/// client of a process that exits (or closes a connection it has not read)
/// sees. An exit between the head and the body leaves the head alone.
fn cut(got: &std::io::Result<Vec<u8>>) -> bool {
    match got {
        Ok(bytes) => bytes.is_empty() || cut_short(bytes),
        Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// An answer that ends before its head does, or before the length it
/// announces.
fn cut_short(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return true;
    };
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .is_some_and(|length| body.len() < length)
}

/// Every live process under `root`: its children, theirs, and so on.
fn descendants(root: i32) -> BTreeSet<i32> {
    let mut found = BTreeSet::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for (child, state) in children(pid) {
            if state != 'Z' && found.insert(child) {
                queue.push(child);
            }
        }
    }
    found
}

fn status(socket: &Path) -> serde_json::Value {
    let output = Command::new(binary())
        .args(["ctl", &socket.display().to_string(), "status", "--json"])
        .output()
        .expect("respawn ctl status --json");
    serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null)
}

/// The venv of this run, made by the first test that asks; `None` (the
/// test skipped, saying why) if python3 is missing or the install failed.
fn venv(test: &str) -> Option<PathBuf> {
    if !require(test, Need::Python) {
        return None;
    }
    static VENV: OnceLock<Result<PathBuf, (Need, String)>> = OnceLock::new();
    match VENV.get_or_init(make_venv) {
        Ok(dir) => Some(dir.clone()),
        Err((need, why)) => {
            skip(test, Skip::Needs(*need), why);
            None
        }
    }
}

/// `python3 -m venv --without-pip`, then the host's pip installs [`PINS`]
/// into it, wheels only. One venv per run of this binary, in cargo's
/// target/tmp, named by this process's pid; those of runs that are over
/// are removed first. pip's cache is kept beside them, so a second run
/// downloads nothing (it still asks the registry for the versions).
fn make_venv() -> Result<PathBuf, (Need, String)> {
    const PREFIX: &str = "other-servers-venv-";
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let over = name
                .strip_prefix(PREFIX)
                .and_then(|pid| pid.parse::<i32>().ok())
                .is_some_and(|pid| !alive(pid));
            if over {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let started = Instant::now();
    run_to_end(
        Command::new("python3")
            .args(["-m", "venv", "--without-pip"])
            .arg(&dir),
    )
    .map_err(|why| (Need::Python, format!("{why} (apt-get install python3-venv)")))?;
    run_to_end(
        Command::new("python3")
            .args(["-m", "pip", "--python"])
            .arg(dir.join("bin/python"))
            .env("PIP_CACHE_DIR", root.join("pip-cache"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                "--no-deps",
                "--only-binary",
                ":all:",
            ])
            .args(PINS),
    )
    .map_err(|why| (Need::Registry, why))?;
    eprintln!(
        "other_servers: {} installed into {} in {:.1} s",
        PINS.join(" "),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// What `hup_under_load` counts as cut: nothing, a head alone (the exit
/// came between head and body), a body shorter than announced, a reset;
/// not a whole answer.
#[test]
fn a_partial_answer_counts_as_cut_and_a_whole_one_does_not() {
    let ok = |s: &str| Ok::<Vec<u8>, std::io::Error>(s.as_bytes().to_vec());
    let head = "HTTP/1.1 200 OK\r\nContent-Length: 15\r\nConnection: close\r\n\r\n";
    assert!(cut(&ok("")));
    assert!(cut(&ok(head)));
    assert!(cut(&ok(&format!("{head}served by"))));
    assert!(cut(&ok("HTTP/1.1 200 OK\r\nContent-Le")));
    assert!(cut(&Err(std::io::ErrorKind::ConnectionReset.into())));
    assert!(!cut(&ok(&format!("{head}served by 4242\n"))));
    assert!(!cut(&Err(std::io::ErrorKind::ConnectionRefused.into())));
}
