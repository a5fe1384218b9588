//! Node programs as their authors write them, under the real master:
//! Express, Fastify and Koa installed from the npm registry at pinned
//! versions, a plain node:http server on kept-alive connections, the client
//! installed as a package, and `respawn.serve` given what it cannot use.
//!
//! The frameworks are installed once per test-binary run into one project
//! cached under the target directory (see [`frameworks`]); a later run
//! reuses it. Without node the tests skip (`Need::Node`); when the install
//! fails they skip with `Need::Registry`, which CI, where the registries are
//! reachable, does not allow.

use respawn_tests::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// What is installed, exactly these versions: the frameworks' majors the
/// recipes of docs/protocol.md are written for.
const PACKAGES: [&str; 3] = ["express@5.3.0", "fastify@5.12.8", "koa@3.3.0"];

/// The client under test, by its path in the workspace.
fn client() -> String {
    workspace().join("clients/node/respawn.js").display().to_string()
}

/// The project holding [`PACKAGES`], installed on first use: `Ok(its
/// node_modules)`, or `Err(why not)` for every test of this run.
///
/// It lives under the target directory (beside this test executable's
/// `deps/`), named after the pinned versions, so a new pin installs anew.
/// npm installs into a directory of this process's own that is renamed into
/// place once complete: an interrupted install is never taken for a cache.
fn frameworks() -> &'static Result<PathBuf, String> {
    static PROJECT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PROJECT.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| format!("this test's path: {e}"))?;
        let profile = exe
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| format!("no target directory above {}", exe.display()))?;
        let name = PACKAGES.join("-").replace(['@', '.'], "");
        let project = profile.join("node-apps").join(name);
        let modules = project.join("node_modules");
        if modules.is_dir() {
            return Ok(modules);
        }
        let scratch = profile
            .join("node-apps")
            .join(format!(".installing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
        std::fs::write(scratch.join("package.json"), "{\"private\": true}\n")
            .map_err(|e| format!("writing package.json: {e}"))?;
        let output = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--save-exact"])
            .args(PACKAGES)
            .current_dir(&scratch)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running npm: {e}"))?;
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(&scratch);
            // npm's first error lines say what failed (`code ECONNREFUSED`,
            // the request); the rest is in its own log.
            let said = String::from_utf8_lossy(&output.stderr);
            let first: Vec<&str> = said
                .lines()
                .filter(|l| l.starts_with("npm error"))
                .take(4)
                .collect();
            return Err(format!(
                "npm install {} failed ({}): {}",
                PACKAGES.join(" "),
                output.status,
                first.join(" / ")
            ));
        }
        std::fs::rename(&scratch, &project)
            .map_err(|e| format!("renaming {} into place: {e}", scratch.display()))?;
        Ok(modules)
    })
}

/// Do node and npm run here? If not, [`skip`]s `test` (`Need::Node`: npm
/// comes with node, and CI has both).
fn node_and_npm(test: &str) -> bool {
    if !require(test, Need::Node) {
        return false;
    }
    let npm = Command::new("npm")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !npm {
        skip(
            test,
            Skip::Needs(Need::Node),
            "`npm --version` does not run here (apt-get install npm)",
        );
    }
    npm
}

/// The frameworks' node_modules, or `None` after skipping `test` (no node
/// or npm: `Need::Node`; no install: `Need::Registry`).
fn installed(test: &str) -> Option<&'static Path> {
    if !node_and_npm(test) {
        return None;
    }
    match frameworks() {
        Ok(modules) => Some(modules),
        Err(why) => {
            skip(test, Skip::Needs(Need::Registry), why);
            None
        }
    }
}

/// Express: a throw in a route, and a rejection of an async route, are
/// Express's to answer (its own 500); a throw in a timer and an unawaited
/// rejection escape it, and are the worker's crash.
const EXPRESS_APP: &str = r#"
const http = require('node:http');
const express = require('express');
const respawn = require(process.env.RESPAWN_CLIENT);
const app = express();
app.get('/', (req, res) => res.send(`handle by child ${process.pid}\n`));
app.get('/throw', () => { throw new Error('thrown in a route'); });
app.get('/reject', async () => { throw new Error('rejected in a route'); });
app.get('/escape/sync', () => { setTimeout(() => { throw new Error('thrown in a timer'); }); });
app.get('/escape/async', () => { Promise.reject(new Error('rejected, unawaited')); });
respawn.serve(http.createServer(app));
"#;

/// Fastify, served as its users write it for respawn: the instance itself,
/// no ready() (the client calls it). An onClose hook writes a file named
/// after the worker into $CLOSED_DIR.
const FASTIFY_APP: &str = r#"
const fs = require('node:fs');
const path = require('node:path');
const respawn = require(process.env.RESPAWN_CLIENT);
const app = require('fastify')();
const never = () => new Promise(() => {});
app.get('/', async () => `handle by child ${process.pid}\n`);
app.get('/throw', () => { throw new Error('thrown in a route'); });
app.get('/reject', async () => { throw new Error('rejected in a route'); });
app.get('/escape/sync', () => { setTimeout(() => { throw new Error('thrown in a timer'); }); return never(); });
app.get('/escape/async', () => { Promise.reject(new Error('rejected, unawaited')); return never(); });
app.addHook('onClose', async () => {
  if (process.env.CLOSED_DIR) fs.writeFileSync(path.join(process.env.CLOSED_DIR, `closed-${process.pid}`), 'onClose ran\n');
});
respawn.serve(app);
"#;

/// Koa answers what its middleware throws or rejects with its own 500.
const KOA_APP: &str = r#"
const http = require('node:http');
const Koa = require('koa');
const respawn = require(process.env.RESPAWN_CLIENT);
const app = new Koa();
app.silent = true;
const never = () => new Promise(() => {});
app.use(async (ctx) => {
  if (ctx.path === '/') { ctx.body = `handle by child ${process.pid}\n`; return; }
  if (ctx.path === '/throw') throw new Error('thrown in a route');
  if (ctx.path === '/reject') await Promise.reject(new Error('rejected in a route'));
  if (ctx.path === '/escape/sync') { setTimeout(() => { throw new Error('thrown in a timer'); }); return never(); }
  if (ctx.path === '/escape/async') { Promise.reject(new Error('rejected, unawaited')); return never(); }
});
respawn.serve(http.createServer(app.callback()));
"#;

/// A directory for one test's program, removed at the end.
fn program(test: &str, file: &str, text: &str) -> (TempDir, String) {
    let dir = TempDir::new(&format!("respawn-node-apps-{test}"));
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let shown = path.display().to_string();
    (dir, shown)
}

/// `respawn --workers N ... -- node APP`, the frameworks on NODE_PATH and
/// the client in RESPAWN_CLIENT; `env` adds variables.
fn start(modules: &Path, app: &str, args: &[&str], env: &[(&str, &str)]) -> Respawn {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--", "node", app]);
    let (modules, client) = (modules.to_path_buf(), client());
    let env: Vec<(String, String)> = env.iter().map(|&(k, v)| (k.into(), v.into())).collect();
    Respawn::start_with(&all, move |command| {
        command.env("NODE_PATH", modules).env("RESPAWN_CLIENT", client);
        for (name, value) in env {
            command.env(name, value);
        }
    })
}

/// An answer on a connection of its own, which the request asks the server
/// to close after it (the frameworks keep connections alive otherwise).
fn get_closing(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut conn = TcpStream::connect_timeout(&addr, PATIENCE)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut bytes = Vec::new();
    conn.read_to_end(&mut bytes)?;
    let answer = String::from_utf8_lossy(&bytes);
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3)?.parse().ok());
    match (status, answer.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => Ok(Response {
            status,
            body: body.to_owned(),
        }),
        _ => Err(std::io::Error::other(format!("not HTTP: {answer:?}"))),
    }
}

/// Clients that GET / in a loop, each on a connection of its own that the
/// server closes after the answer (the harness's [`Load`] reads until the
/// server closes, which a kept-alive connection never does).
struct ClosingLoad {
    done: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl ClosingLoad {
    fn start(addr: SocketAddr, clients: usize) -> ClosingLoad {
        let done = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let done = Arc::clone(&done);
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !done.load(Ordering::SeqCst) {
                        match get_closing(addr, "/") {
                            Ok(answer) if answer.status == 200 => ok += 1,
                            other => failed.push(format!("{other:?}")),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        ClosingLoad { done, clients }
    }

    /// How many were answered 200, and what went wrong otherwise.
    fn stop(self) -> (usize, Vec<String>) {
        self.done.store(true, Ordering::SeqCst);
        let (mut served, mut failed) = (0, Vec::new());
        for client in self.clients {
            let (ok, lost) = client.join().expect("a load client");
            served += ok;
            failed.extend(lost);
        }
        (served, failed)
    }
}

/// The storm every framework gets: GET / from two clients throughout,
/// beside two rounds of what the framework answers itself (a throw and a
/// rejection in a route: its own 500, no crash) and what escapes it (a
/// throw in a timer, an unawaited rejection: uncaught, each a crash the
/// client hands over). Not one GET / may fail, each crash is one Suicide,
/// and two workers serve after it.
fn crash_storm(test: &str, file: &str, text: &str) {
    let Some(modules) = installed(test) else {
        return;
    };
    let (_dir, app) = program(test, file, text);
    let respawn = start(modules, &app, &["--workers", "2"], &[]);
    respawn.wait_for_workers(2);
    let load = ClosingLoad::start(respawn.addr, 2);
    let rounds = 2;
    for _ in 0..rounds {
        for path in ["/throw", "/reject"] {
            let answer = get_closing(respawn.addr, path);
            assert!(
                matches!(&answer, Ok(a) if a.status == 500 && !a.body.contains("panicked")),
                "{path}: the framework's own 500, not {answer:?}\n{}",
                respawn.dump()
            );
        }
        for (path, thrown) in [
            ("/escape/sync", "thrown in a timer"),
            ("/escape/async", "rejected, unawaited"),
        ] {
            let answer = get_closing(respawn.addr, path);
            assert!(
                matches!(&answer, Ok(a) if a.status == 500 && a.body.contains(&format!("panicked: {thrown}"))),
                "{path}: the client's 500, not {answer:?}\n{}",
                respawn.dump()
            );
        }
    }
    let (served, failed) = load.stop();
    assert!(served > 0, "no GET / was served\n{}", respawn.dump());
    assert_eq!(failed, Vec::<String>::new(), "{}", respawn.dump());
    respawn.wait_for_workers(2);
    let crashes = 2 * rounds;
    let suicides = || respawn.count_log(" sent suicide (uncaught Error: ");
    assert!(
        wait_until(PATIENCE, || suicides() >= crashes),
        "{}",
        respawn.dump()
    );
    assert_eq!(
        suicides(),
        crashes,
        "a Suicide per crash, none for the framework's own 500s\n{}",
        respawn.dump()
    );
    assert_eq!(respawn.count_log("giving up"), 0, "{}", respawn.dump());
}

#[test]
fn express_serves_through_a_crash_storm_with_no_get_lost() {
    crash_storm(
        "express_serves_through_a_crash_storm_with_no_get_lost",
        "express.js",
        EXPRESS_APP,
    );
}

/// Also: a Fastify program that calls no ready() of its own works (without
/// it, every request used to kill its worker).
#[test]
fn fastify_served_as_its_instance_goes_through_a_crash_storm_with_no_get_lost() {
    crash_storm(
        "fastify_served_as_its_instance_goes_through_a_crash_storm_with_no_get_lost",
        "fastify.js",
        FASTIFY_APP,
    );
}

#[test]
fn koa_serves_through_a_crash_storm_with_no_get_lost() {
    crash_storm(
        "koa_serves_through_a_crash_storm_with_no_get_lost",
        "koa.js",
        KOA_APP,
    );
}

/// The client closes the Fastify instance after the worker's last
/// request, so its onClose hooks run: on HUP (the master stops the old
/// worker) and on TERM (the master stops them all).
#[test]
fn fastify_on_close_hooks_run_when_a_worker_is_stopped() {
    const TEST: &str = "fastify_on_close_hooks_run_when_a_worker_is_stopped";
    let Some(modules) = installed(TEST) else {
        return;
    };
    let (dir, app) = program(TEST, "fastify.js", FASTIFY_APP);
    let closed = dir.join("closed");
    std::fs::create_dir(&closed).expect("the directory the hooks write to");
    let shown = closed.display().to_string();
    let mut respawn = start(modules, &app, &["--workers", "1"], &[("CLOSED_DIR", &shown)]);
    let first = respawn.wait_for_workers(1);
    let hook_ran = |pid: &i32| std::fs::read_to_string(closed.join(format!("closed-{pid}"))).ok();
    assert!(first.iter().all(|pid| hook_ran(pid).is_none()));

    respawn.signal(libc::SIGHUP);
    respawn.wait_for_line("rolling restart done: every worker is new");
    for pid in &first {
        assert!(wait_until(PATIENCE, || !alive(*pid)), "{}", respawn.dump());
        assert_eq!(
            hook_ran(pid).as_deref(),
            Some("onClose ran\n"),
            "{}",
            respawn.dump()
        );
    }
    let second = respawn.wait_for_workers(1);
    assert_eq!(get_closing(respawn.addr, "/").expect("GET /").status, 200);

    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    for pid in &second {
        assert_eq!(
            hook_ran(pid).as_deref(),
            Some("onClose ran\n"),
            "{}",
            respawn.dump()
        );
    }
}

/// `respawn.serve(app)` with the Express app (a function) used to be taken
/// silently, and to fail at the first crash and at every stop; a Koa app,
/// an object, a server already listening, likewise. Each is a TypeError at
/// once that says what to pass.
#[test]
fn serve_refuses_what_it_cannot_serve_and_says_what_to_pass() {
    const TEST: &str = "serve_refuses_what_it_cannot_serve_and_says_what_to_pass";
    let Some(modules) = installed(TEST) else {
        return;
    };
    let script = r#"
const http = require('node:http');
const respawn = require(process.env.RESPAWN_CLIENT);
const Koa = require('koa');
const listening = http.createServer().listen(0);
for (const wrong of [new Koa(), { port: 8080 }, listening]) {
  try { respawn.serve(wrong); } catch (err) { console.log(`${err.name}: ${err.message}`); }
}
listening.close();
respawn.serve(require('express')());
"#;
    let output = Command::new("node")
        .args(["-e", script])
        .env("NODE_PATH", modules)
        .env("RESPAWN_CLIENT", client())
        .stdin(Stdio::null())
        .output()
        .expect("running node");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "TypeError: respawn.serve(app): this is a Koa app, not a server: \
             pass respawn.serve(http.createServer(app.callback()))",
            "TypeError: respawn.serve takes an http.Server, https.Server or net.Server that is \
             not listening, or a Fastify instance; it was given an object (Object)",
            "TypeError: respawn.serve(server): the server is listening already (server.listen() \
             was called): respawn hands the worker its listening sockets: call \
             respawn.serve(server) instead of listen()",
        ],
        "{stderr}"
    );
    // Uncaught: the program stops there, before it could serve anything.
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "TypeError: respawn.serve(app): this is an Express app, a request handler, not a \
             server: pass respawn.serve(http.createServer(app))"
        ),
        "{stderr}"
    );
}

/// A plain node:http server whose answers keep the connection alive, with
/// a grace long enough for a slow machine (the default is 200 ms).
const KEEP_ALIVE_APP: &str = r#"
const http = require('node:http');
const respawn = require(process.env.RESPAWN_CLIENT);
const server = http.createServer((req, res) => res.end(`handle by child ${process.pid}\n`));
respawn.serve(server, { keepAliveGraceMs: 2000 });
"#;

/// One answer read off a kept-alive connection: the status line and
/// headers, and the body (Content-Length long).
fn read_answer(conn: &mut TcpStream) -> std::io::Result<(String, String)> {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Err(std::io::Error::other(format!(
                "closed after {:?}",
                String::from_utf8_lossy(&bytes)
            )));
        }
        bytes.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&bytes).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| std::io::Error::other(format!("no Content-Length in {head:?}")))?;
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    Ok((head, String::from_utf8_lossy(&body).into_owned()))
}

/// The listening socket a worker holds at fd 3 (`socket:[inode]`), if it
/// still holds it: a Node worker closes it when it stops accepting.
fn listener_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/fd/3")).ok()
}

/// A worker that stops does not cut a kept-alive connection between
/// requests: a request that arrives on it after the stop is answered, with
/// `Connection: close`, and the connection then ends; one on which nothing
/// comes is closed after the grace, and the worker exits. (The client used
/// to destroy such a connection the moment it stopped, resetting a request
/// already on its way.)
#[test]
fn a_stopping_worker_answers_a_request_on_a_kept_alive_connection_then_closes_it() {
    const TEST: &str = "a_stopping_worker_answers_a_request_on_a_kept_alive_connection_then_closes_it";
    if !require(TEST, Need::Node) {
        return;
    }
    let (_dir, app) = program(TEST, "keepalive.js", KEEP_ALIVE_APP);
    let mut respawn = Respawn::start_with(&["--workers", "1", "--", "node", &app], |command| {
        command.env("RESPAWN_CLIENT", client());
    });
    let worker = *respawn.wait_for_workers(1).iter().next().expect("a worker");
    let addr = respawn.addr;
    let connect = || {
        let conn = TcpStream::connect_timeout(&addr, PATIENCE).expect("connecting");
        conn.set_read_timeout(Some(PATIENCE)).expect("a read timeout");
        conn
    };
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let (mut busy, mut idle) = (connect(), connect());
    for conn in [&mut busy, &mut idle] {
        conn.write_all(request.as_bytes()).expect("a first request");
        let (head, body) = read_answer(conn).expect("the first answer");
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(head.contains("Connection: keep-alive\r\n"), "{head}");
        assert_eq!(body, format!("handle by child {worker}\n"));
    }
    let listener = listener_of(worker).expect("the worker's listener at fd 3");

    respawn.signal(libc::SIGTERM);
    assert!(
        wait_until(PATIENCE, || listener_of(worker) != Some(listener.clone())),
        "the worker never stopped accepting\n{}",
        respawn.dump()
    );
    busy.write_all(request.as_bytes())
        .expect("a request after the stop");
    let answer = read_answer(&mut busy);
    let Ok((head, body)) = &answer else {
        panic!(
            "the request after the stop was lost: {answer:?}\n{}",
            respawn.dump()
        );
    };
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("Connection: close\r\n"), "{head}");
    assert_eq!(body, &format!("handle by child {worker}\n"));
    let mut rest = Vec::new();
    assert_eq!(
        busy.read_to_end(&mut rest).ok(),
        Some(0),
        "closed after its answer: {rest:?}"
    );
    // Nothing was sent on the other: closed once the grace ran out.
    assert_eq!(
        idle.read_to_end(&mut rest).ok(),
        Some(0),
        "closed, not reset: {rest:?}"
    );
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert_eq!(
        respawn.count_lines(&format!("worker {worker} exited (code 0)")),
        1,
        "{}",
        respawn.dump()
    );
}

/// clients/node is a package: `npm install <path>` puts respawn-worker in a
/// project's node_modules (a copy, as from the registry: --install-links,
/// so its `files` are what is installed), and a program that requires it by
/// name serves under respawn. The install reads nothing from the registry.
#[test]
fn the_node_client_installs_with_npm_and_serves_under_respawn() {
    const TEST: &str = "the_node_client_installs_with_npm_and_serves_under_respawn";
    if !node_and_npm(TEST) {
        return;
    }
    let project = TempDir::new("respawn-node-package");
    std::fs::write(project.join("package.json"), "{\"private\": true}\n").expect("package.json");
    let package = workspace().join("clients/node");
    let output = Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--offline",
            "--install-links",
        ])
        .arg(&package)
        .current_dir(&*project)
        .stdin(Stdio::null())
        .output()
        .expect("running npm");
    assert!(
        output.status.success(),
        "npm install {}: {}",
        package.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let installed = project.join("node_modules/respawn-worker");
    let mut files: Vec<String> = std::fs::read_dir(&installed)
        .expect("node_modules/respawn-worker")
        .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["package.json", "respawn.js"]);

    let app = project.join("app.js");
    std::fs::write(
        &app,
        "const http = require('node:http');\n\
         const respawn = require('respawn-worker');\n\
         respawn.serve(http.createServer((req, res) => res.end(`packaged ${process.pid}\\n`)));\n",
    )
    .expect("app.js");
    let respawn = Respawn::start(&["--workers", "1", "--", "node", &app.display().to_string()]);
    let workers = respawn.wait_for_workers(1);
    let answer = get_closing(respawn.addr, "/").expect("GET /");
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        format!("packaged {}\n", workers.iter().next().expect("a worker"))
    );
}
