//! Python applications as their developers write them, under the real
//! master: a WSGI application served by `respawn.serve_wsgi`, and Flask,
//! installed from the package registry into a virtual environment together
//! with the client as a package (`pip install clients/python`).
//!
//! The plain WSGI application needs only python3 (`require`). The Flask
//! tests install `Flask==3.1.*` once per run of this binary, into cargo's
//! target/tmp; where the install fails they skip with
//! `Skip::Needs(Need::Registry)`, which CI does not allow (docs/testing.md).

use respawn_tests::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A WSGI application with nothing but the standard library: `/` names
/// the worker, `/raise` raises (nothing catches it: the worker hands over),
/// `/sys-exit` calls sys.exit(1) (a SystemExit, which `except Exception`
/// does not catch: handed over the same),
/// `/echo` answers with the body it read, `/sleep/<ms>` touches the file
/// $STARTED (if set), then sleeps.
const WSGI_APP: &str = r#"
import os, sys, time
import respawn

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/":
        body = b"handle by child %d\n" % os.getpid()
    elif path == "/raise":
        raise RuntimeError("raised by GET /raise")
    elif path == "/sys-exit":
        sys.exit(1)
    elif path == "/echo":
        data = environ["wsgi.input"].read()
        body = b"%d bytes: %s\n" % (len(data), data)
    elif path.startswith("/sleep/"):
        if "STARTED" in os.environ:
            open(os.environ["STARTED"], "w").close()
        time.sleep(int(path[len("/sleep/"):]) / 1000)
        body = b"slept in child %d\n" % os.getpid()
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no route\n"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]

sys.exit(respawn.serve_wsgi(app))
"#;

/// A Flask application, importing `respawn` from wherever it is installed.
const FLASK_APP: &str = r#"
import os, sys
import respawn
from flask import Flask

app = Flask(__name__)

@app.get("/")
def index():
    return f"handle by child {os.getpid()}\n"

@app.get("/where")
def where():
    return respawn.__file__

@app.get("/raise")
def fail():
    raise RuntimeError("raised in a Flask route")

@app.get("/exit")
def leave():
    os._exit(1)

if __name__ == "__main__":
    sys.exit(respawn.serve_wsgi(app))
"#;

/// The pinned Flask of these tests.
const FLASK: &str = "Flask==3.1.*";

/// A directory for one test: the application, and `respawn.py` beside it
/// for the plain one (copied from clients/python: what `make test` tests).
struct App {
    dir: TempDir,
    script: PathBuf,
}

impl App {
    fn plain(test: &str) -> App {
        let app = App::write(test, "app.py", WSGI_APP);
        let client = workspace().join("clients/python/respawn.py");
        std::fs::copy(&client, app.dir.join("respawn.py"))
            .unwrap_or_else(|err| panic!("copying {}: {err}", client.display()));
        app
    }

    /// The Flask application alone: `respawn` comes from the venv.
    fn flask(test: &str) -> App {
        App::write(test, "flask_app.py", FLASK_APP)
    }

    fn write(test: &str, name: &str, text: &str) -> App {
        let dir = TempDir::new(&format!("respawn-py-{test}"));
        let script = dir.join(name);
        std::fs::write(&script, text).expect("writing the application");
        App { dir, script }
    }

    fn shown(&self) -> String {
        self.script.display().to_string()
    }
}

/// `respawn FLAGS -- python3 app.py`, for the plain application.
fn start_plain(app: &App, flags: &[&str]) -> Respawn {
    start_python(app, "python3", flags, |_| {})
}

fn start_python(app: &App, python: &str, flags: &[&str], adjust: impl FnOnce(&mut Command)) -> Respawn {
    let script = app.shown();
    let mut args = flags.to_vec();
    args.extend(["--", python, &script]);
    Respawn::start_with(&args, adjust)
}

/// The venv of this run, with Flask and the client installed as a package,
/// made by the first test that asks; `None` (the test skipped) if the
/// install failed.
fn flask_python(test: &str) -> Option<String> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VENV.get_or_init(make_venv) {
        Ok(dir) => Some(dir.join("bin/python").display().to_string()),
        Err(why) => {
            skip(test, Skip::Needs(Need::Registry), why);
            None
        }
    }
}

/// `python3 -m venv --without-pip` (a second, not the ten ensurepip takes),
/// then the host's pip installs into it: `pip --python VENV install
/// 'Flask==3.1.*' clients/python`, the line of clients/python/README.md. One
/// per run of this binary, in cargo's target/tmp, named by this process's
/// pid; the venvs of runs that are over are removed first.
fn make_venv() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    const PREFIX: &str = "python-apps-venv-";
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
    )?;
    let client = workspace().join("clients/python");
    run_to_end(
        Command::new("python3")
            .args(["-m", "pip", "--python"])
            .arg(dir.join("bin/python"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                FLASK,
            ])
            .arg(&client),
    )?;
    eprintln!(
        "python_apps: {FLASK} and {} installed into {} in {:.1} s",
        client.display(),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(dir)
}

#[test]
fn a_wsgi_app_serves_and_what_escapes_it_is_handed_over() {
    const TEST: &str = "a_wsgi_app_serves_and_what_escapes_it_is_handed_over";
    if !require(TEST, Need::Python) {
        return;
    }
    let app = App::plain(TEST);
    let respawn = start_plain(&app, &["--workers", "2"]);
    let workers = respawn.wait_for_workers(2);
    let answer = respawn.get("/").expect("GET /");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        workers.contains(&answer.pid().expect("a pid")),
        "{answer:?} {workers:?}"
    );

    // A chunked body, decoded for the application.
    let echo = exchange(
        respawn.addr,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    )
    .expect("POST /echo");
    assert!(echo.starts_with("HTTP/1.1 200 OK\r\n"), "{echo:?}");
    assert!(echo.contains("\r\nConnection: close\r\n"), "{echo:?}");
    assert!(echo.ends_with("\r\n\r\n11 bytes: hello world\n"), "{echo:?}");

    // Nothing in a plain WSGI application catches: the worker hands over
    // (Suicide before its exit), answers 500, exits 70.
    let crashed = respawn.get("/raise").expect("GET /raise");
    assert_eq!(crashed.status, 500, "{crashed:?}");
    let victim: i32 = crashed
        .body
        .strip_prefix("worker ")
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {crashed:?}"));
    assert_eq!(
        crashed.body,
        format!("worker {victim} panicked: raised by GET /raise\n")
    );
    let log = |what: &str| format!("worker {victim} {what}");
    respawn.wait_for_line(&log(
        "exited (code 70: uncaught RuntimeError: raised by GET /raise)",
    ));
    let all = respawn.log();
    let suicide = position(&all, |l| {
        says(
            l,
            &log("sent suicide (uncaught RuntimeError: raised by GET /raise); replacing it"),
        )
    });
    let spawned = position(&all, |l| {
        message(l).ends_with(" spawned") && worker_pid(l).is_some_and(|pid| !workers.contains(&pid))
    });
    let exited = position(&all, |l| message(l).starts_with(&log("exited")));
    assert!(
        suicide.is_some() && suicide < spawned && spawned < exited,
        "suicide {suicide:?}, replacement {spawned:?}, exit {exited:?}\n{}",
        respawn.dump()
    );
    assert!(!respawn.wait_for_workers(2).contains(&victim));

    // sys.exit in a view: the request that called it is answered too.
    let exited = respawn.get("/sys-exit").expect("GET /sys-exit is answered");
    assert_eq!(exited.status, 500, "{exited:?}");
    let victim: i32 = exited
        .body
        .strip_prefix("worker ")
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {exited:?}"));
    assert_eq!(exited.body, format!("worker {victim} panicked: 1\n"));
    respawn.wait_for_line(&format!(
        "worker {victim} exited (code 70: uncaught SystemExit: 1)"
    ));
}

/// A body the application never read is drained after the answer, not
/// reset: close(2) with input unread sends a reset, which fails the
/// client's upload and can destroy the answer on its way.
#[test]
fn a_body_the_app_did_not_read_is_drained_not_reset() {
    const TEST: &str = "a_body_the_app_did_not_read_is_drained_not_reset";
    if !require(TEST, Need::Python) {
        return;
    }
    let app = App::plain(TEST);
    let respawn = start_plain(&app, &["--workers", "1"]);
    respawn.wait_for_workers(1);
    const BODY: usize = 8 << 20;
    let mut conn = TcpStream::connect(respawn.addr).expect("connecting");
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    conn.set_write_timeout(Some(PATIENCE)).unwrap();
    write!(
        conn,
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n"
    )
    .unwrap();
    let sent = conn.write_all(&vec![b'x'; BODY]);
    let mut answer = String::new();
    let read = conn.read_to_string(&mut answer);
    assert!(
        sent.is_ok() && read.is_ok(),
        "upload {sent:?}, answer {read:?}: {answer:?}\n{}",
        respawn.dump()
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(answer.contains("\r\n\r\nhandle by child "), "{answer:?}");
}

#[test]
fn max_requests_recycles_a_wsgi_worker() {
    const TEST: &str = "max_requests_recycles_a_wsgi_worker";
    if !require(TEST, Need::Python) {
        return;
    }
    let app = App::plain(TEST);
    let respawn = start_plain(&app, &["--workers", "1", "--max-requests", "3"]);
    let first = *respawn.wait_for_workers(1).first().expect("a worker");
    for _ in 0..3 {
        let answer = respawn.get("/").expect("GET /");
        assert_eq!(answer.pid(), Some(first), "{answer:?}\n{}", respawn.dump());
    }
    respawn.wait_for_line(&format!(
        "worker {first} sent suicide (served its 3 requests); replacing it"
    ));
    respawn.wait_for_line(&format!("worker {first} exited (code 0: served its 3 requests)"));
    let next = respawn.wait_for_workers(1);
    assert!(!next.contains(&first));
    let answer = respawn.get("/").expect("GET / after the recycle");
    assert!(next.contains(&answer.pid().expect("a pid")), "{answer:?}");
}

#[test]
fn sigterm_mid_request_finishes_a_wsgi_request_then_exits_0() {
    const TEST: &str = "sigterm_mid_request_finishes_a_wsgi_request_then_exits_0";
    if !require(TEST, Need::Python) {
        return;
    }
    let app = App::plain(TEST);
    let started = app.dir.join("started");
    let marker = started.clone();
    let mut respawn = start_python(&app, "python3", &["--workers", "1"], |command| {
        command.env("STARTED", &marker);
    });
    let worker = *respawn.wait_for_workers(1).first().expect("a worker");
    let addr = respawn.addr;
    let request = std::thread::spawn(move || get(addr, "/sleep/1500"));
    assert!(wait_until(PATIENCE, || started.exists()), "{}", respawn.dump());
    respawn.signal(libc::SIGTERM);
    let answer = request.join().unwrap().expect("the request in flight");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, format!("slept in child {worker}\n"));
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert_eq!(
        respawn.count_lines(&format!("worker {worker} exited (code 0)")),
        1,
        "{}",
        respawn.dump()
    );
}

/// serve() given a handler class that cannot work raises at once (before
/// it looks for its listeners), naming serve_wsgi, instead of failing every
/// request with `'_Worker' object has no attribute 'base_environ'`.
#[test]
fn serve_refuses_a_handler_that_cannot_work_and_names_serve_wsgi() {
    const TEST: &str = "serve_refuses_a_handler_that_cannot_work_and_names_serve_wsgi";
    if !require(TEST, Need::Python) {
        return;
    }
    let refusal = |program: &str| {
        let out = Command::new("python3")
            .args(["-c", program])
            .env("PYTHONPATH", workspace().join("clients/python"))
            .stdin(Stdio::null())
            .output()
            .expect("running python3");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        stderr.lines().last().unwrap_or_default().to_owned()
    };
    assert_eq!(
        refusal(
            "import sys, respawn\nfrom wsgiref.simple_server import WSGIRequestHandler\n\
             sys.exit(respawn.serve(WSGIRequestHandler))"
        ),
        "TypeError: respawn.serve(WSGIRequestHandler): wsgiref's WSGIRequestHandler needs a \
         wsgiref server (base_environ, get_app), which a respawn worker is not: serve the \
         application itself with respawn.serve_wsgi(app)"
    );
    assert_eq!(
        refusal(
            "import sys, respawn\nfrom http.server import BaseHTTPRequestHandler\n\
             class Settings(BaseHTTPRequestHandler):\n    def do_GET(self):\n        \
             self.server.settings.get('x')\nsys.exit(respawn.serve(Settings))"
        ),
        "TypeError: respawn.serve(Settings): Settings.do_GET reads self.server.settings, which a \
         respawn worker does not have: a handler's self.server is the respawn worker (pid, slot), \
         not a socketserver server; a WSGI application is served with respawn.serve_wsgi(app)"
    );
    assert_eq!(
        refusal("import sys, respawn\nsys.exit(respawn.serve(lambda environ, start_response: []))"),
        "TypeError: respawn.serve(<lambda>): serve takes a BaseHTTPRequestHandler subclass; a WSGI \
         application (Flask, Django, any app(environ, start_response)) is served with \
         respawn.serve_wsgi(app)"
    );
}

/// One answer on a connection kept alive: the request, then the head and a
/// body of Content-Length bytes (or up to the close). Returns the status
/// and whether the server lets the connection live on.
fn keep_alive_request(conn: &mut BufReader<TcpStream>, addr: SocketAddr) -> std::io::Result<(u16, bool)> {
    conn.get_mut()
        .write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without an answer",
        ));
    }
    let status = line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not HTTP: {line:?}")))?;
    let (mut length, mut close) = (None, false);
    loop {
        line.clear();
        conn.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse::<usize>().ok(),
                "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    match length {
        Some(n) => conn.read_exact(&mut vec![0; n])?,
        None => {
            conn.read_to_end(&mut Vec::new())?;
            close = true;
        }
    }
    Ok((status, !close))
}

/// GET / back to back on a connection kept alive as long as the server
/// lets it, as wrk does: a new one only after an answer that says
/// `Connection: close`, or after a failure. Returns (200s, failures).
fn keep_alive_client(addr: SocketAddr, done: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let (mut ok, mut failed) = (0, Vec::new());
    let mut kept: Option<BufReader<TcpStream>> = None;
    while !done.load(Ordering::SeqCst) {
        let mut conn = match kept.take() {
            Some(conn) => conn,
            None => match TcpStream::connect_timeout(&addr, PATIENCE) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(PATIENCE)).unwrap();
                    BufReader::new(stream)
                }
                Err(err) => {
                    failed.push(format!("connect: {err}"));
                    continue;
                }
            },
        };
        match keep_alive_request(&mut conn, addr) {
            Ok((200, keep)) => {
                ok += 1;
                kept = keep.then_some(conn);
            }
            Ok((status, _)) => failed.push(format!("status {status}")),
            Err(err) => failed.push(err.to_string()),
        }
    }
    (ok, failed)
}

/// Four keep-alive clients and one that opens a connection per request,
/// back to back, beside uncaught exceptions at about 10 a second and a
/// HUP: not one of their requests fails. (The worker closes every
/// connection after its answer and says so; a client kept alive is never
/// left with a request sent into a connection the worker closed.)
#[test]
fn keep_alive_and_fresh_clients_lose_nothing_beside_a_crash_storm_and_a_hup() {
    const TEST: &str = "keep_alive_and_fresh_clients_lose_nothing_beside_a_crash_storm_and_a_hup";
    if !require(TEST, Need::Python) {
        return;
    }
    let app = App::plain(TEST);
    let respawn = start_plain(&app, &["--workers", "2"]);
    respawn.wait_for_workers(2);
    let done = Arc::new(AtomicBool::new(false));
    let kept: Vec<_> = (0..4)
        .map(|_| {
            let (addr, done) = (respawn.addr, Arc::clone(&done));
            std::thread::spawn(move || keep_alive_client(addr, done))
        })
        .collect();
    let fresh = Load::start(&respawn, 1);
    let mut crashes = 0;
    for round in 0..30 {
        if round == 10 {
            respawn.signal(libc::SIGHUP);
        }
        let next = Instant::now() + Duration::from_millis(100);
        let crashed = respawn.get("/raise").map(|a| a.status);
        assert_eq!(
            crashed.as_ref().ok(),
            Some(&500),
            "{crashed:?}\n{}",
            respawn.dump()
        );
        crashes += 1;
        std::thread::sleep(next.saturating_duration_since(Instant::now())); // the storm's pace
    }
    respawn.wait_for_line("rolling restart done: every worker is new");
    done.store(true, Ordering::SeqCst);
    let (mut kept_ok, mut failed) = (0, Vec::new());
    for client in kept {
        let (ok, client_failed) = client.join().unwrap();
        kept_ok += ok;
        failed.extend(client_failed);
    }
    let (fresh_ok, fresh_failed) = fresh.stop();
    failed.extend(fresh_failed);
    eprintln!(
        "{TEST}: {kept_ok} keep-alive and {fresh_ok} fresh GET / answered, {} failed, beside {crashes} crashes and a HUP",
        failed.len()
    );
    assert!(kept_ok > 0 && fresh_ok > 0);
    assert!(
        failed.is_empty(),
        "{} failed, the first: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        respawn.dump()
    );
}

/// The client installed as a package into a venv (`pip install
/// clients/python`), beside Flask from the registry: Flask answers its
/// routes' exceptions with its own 500, which is no crash: no Suicide, and
/// the same worker serves on.
#[test]
fn flask_from_the_registry_answers_its_own_500s_and_serves_on() {
    const TEST: &str = "flask_from_the_registry_answers_its_own_500s_and_serves_on";
    if !require(TEST, Need::Python) {
        return;
    }
    let Some(python) = flask_python(TEST) else {
        return;
    };
    let app = App::flask(TEST);
    let respawn = start_python(&app, &python, &["--workers", "1"], |_| {});
    let worker = *respawn.wait_for_workers(1).first().expect("a worker");
    let venv = Path::new(&python)
        .parent()
        .and_then(Path::parent)
        .expect("the venv");
    let whence = respawn.get("/where").expect("GET /where");
    assert!(
        whence.body.starts_with(&venv.join("lib").display().to_string())
            && whence.body.ends_with("/site-packages/respawn.py"),
        "respawn imported from {:?}, not the venv {}",
        whence.body,
        venv.display()
    );

    let failed = respawn.get("/raise").expect("GET /raise");
    assert_eq!(failed.status, 500, "{failed:?}");
    assert!(
        failed.body.contains("<title>500 Internal Server Error</title>"),
        "{failed:?}"
    );
    respawn.wait_for_log("Flask's own line", |l| {
        l.ends_with("ERROR in app: Exception on /raise [GET]")
    });
    let answer = respawn.get("/").expect("GET / after the 500");
    assert_eq!(answer.pid(), Some(worker), "{answer:?}\n{}", respawn.dump());
    assert_eq!(respawn.count_log(" sent suicide "), 0, "{}", respawn.dump());
}

/// A Flask route that calls `os._exit(1)`, five times, each in a worker
/// that served first: each is replaced at once, and none counts toward
/// giving up, though `--max-restarts 2` and `--min-uptime 30` would make
/// every one of them a failed start if a served request did not count.
#[test]
fn flask_routes_that_exit_hard_are_replaced_and_never_given_up_on() {
    const TEST: &str = "flask_routes_that_exit_hard_are_replaced_and_never_given_up_on";
    if !require(TEST, Need::Python) {
        return;
    }
    let Some(python) = flask_python(TEST) else {
        return;
    };
    let app = App::flask(TEST);
    let flags = ["--workers", "1", "--max-restarts", "2", "--min-uptime", "30"];
    let respawn = start_python(&app, &python, &flags, |_| {});
    let mut worker = *respawn.wait_for_workers(1).first().expect("a worker");
    for _ in 0..5 {
        let answer = respawn.get("/").expect("GET /");
        assert_eq!(answer.pid(), Some(worker), "{answer:?}\n{}", respawn.dump());
        let cut = respawn.get_raw("/exit");
        assert!(cut_without_an_answer(&cut), "{cut:?}");
        respawn.wait_for_line(&format!("worker {worker} exited (code 1), replacing"));
        let next = respawn.wait_for_workers(1);
        assert!(!next.contains(&worker), "{}", respawn.dump());
        worker = *next.first().expect("a worker");
    }
    assert_eq!(respawn.count_log("giving up"), 0, "{}", respawn.dump());
    assert!(alive(respawn.pid), "{}", respawn.dump());
    assert_eq!(respawn.get("/").expect("GET /").pid(), Some(worker));
}
