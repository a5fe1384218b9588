//! The harness for the end-to-end tests: start the real `respawn` binary on
//! an ephemeral port, read its log, find its workers in /proc, speak HTTP to
//! it, and make sure nothing it started outlives the test.
//!
//! What it guarantees, so that a test can fail only for what it tests:
//!
//! - **Deadlines.** Every wait has one ([`PATIENCE`]) and fails with the log
//!   attached; nothing sleeps to synchronise.
//! - **Nothing outlives a test.** Each master runs in its own process group,
//!   and [`Respawn`]'s drop kills the whole group, so a failing test leaves
//!   nothing behind.
//! - **Nothing outlives the test process.** Each master is started with
//!   PR_SET_PDEATHSIG(SIGKILL), from a thread that lives as long as the
//!   test binary (see [`spawn_tied`]): an interrupted `cargo test` takes its
//!   masters with it, and their workers follow by their own PDEATHSIG.
//! - **The binary under test is the one just built.** [`binary`] finds it
//!   beside the test executable (so `CARGO_TARGET_DIR`, `--release` and
//!   cargo-mutants' scratch copies all work), and refuses to run one that is
//!   older than the sources it is built from.
//! - **A skip shows.** A test that cannot run here calls [`skip`] (or
//!   [`require`]): a loud line, a record in `$RESPAWN_SKIPS` that `make
//!   test` sums up, and a failure where `RESPAWN_SKIPS_FATAL` says the
//!   machine has what the test needs (CI).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// How long any one condition may take before the test fails. Generous: the
/// tests must pass on a slow, busy 2-core machine; they are not benchmarks.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The demo binary under test: RESPAWN_BIN if set, else the `respawn`
/// beside this test executable. Panics, saying what to run, if it is
/// missing or older than any of its sources.
pub fn binary() -> PathBuf {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("RESPAWN_BIN") {
            // Chosen by hand: whatever it was built from is not ours to judge.
            return Ok(path.into());
        }
        let path = default_binary();
        check_fresh(&path, &workspace())?;
        Ok(path)
    });
    match found {
        Ok(path) => path.clone(),
        Err(why) => panic!("{why}"),
    }
}

/// The root of the workspace the tests were compiled in (a cargo-mutants
/// scratch copy, when run from one).
pub fn workspace() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

/// Where cargo put the binary of the build this test belongs to. A test
/// executable is `<target>/<profile>/deps/<name>-<hash>`, and the binaries
/// of the same build are in `<target>/<profile>`: that follows
/// CARGO_TARGET_DIR, `--release`, `--target` and scratch copies, which a
/// path fixed at compile time would not.
fn default_binary() -> PathBuf {
    let beside_me = std::env::current_exe().ok().and_then(|exe| {
        let deps = exe.parent()?;
        (deps.file_name()? == "deps").then(|| deps.parent().map(|p| p.join("respawn")))?
    });
    beside_me.unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target"));
        target.join("debug/respawn")
    })
}

const BUILD_IT: &str = "run 'make test', which builds it \
    (or 'cargo build -p respawn-master --features demo --bin respawn'; \
    RESPAWN_BIN=path tests another binary)";

/// Fails, saying what to run, when `bin` is missing or older than one of
/// the workspace sources it is built from.
fn check_fresh(bin: &Path, workspace: &Path) -> Result<(), String> {
    let shown = |path: &Path| path.strip_prefix(workspace).unwrap_or(path).display().to_string();
    let built = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .map_err(|err| format!("{} is missing ({err}): {BUILD_IT}", shown(bin)))?;
    match newest(&sources(bin, workspace)) {
        Some((source, changed)) if changed > built => Err(format!(
            "{} is older than {}: {BUILD_IT}",
            shown(bin),
            shown(&source)
        )),
        _ => Ok(()),
    }
}

/// The workspace files the binary is built from: the list cargo wrote
/// beside it (`respawn.d`, written by `cargo build`), else every `.rs` file
/// of the three crates it links. The list is better: a file not yet in the
/// module tree changes nothing cargo would rebuild for.
fn sources(bin: &Path, workspace: &Path) -> Vec<PathBuf> {
    if let Ok(depinfo) = std::fs::read_to_string(bin.with_extension("d")) {
        let listed: Vec<PathBuf> = depinfo
            .split_once(": ")
            .map(|(_, deps)| deps.replace("\\ ", "\u{0}"))
            .unwrap_or_default()
            .split_whitespace()
            .map(|dep| PathBuf::from(dep.replace('\u{0}', " ")))
            .filter(|dep| dep.starts_with(workspace))
            .collect();
        if !listed.is_empty() {
            return listed;
        }
    }
    let mut found = Vec::new();
    for krate in ["master/src", "worker/src", "ipc/src"] {
        rust_files(&workspace.join(krate), &mut found);
    }
    found
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(|e| Some(e.ok()?.path())) {
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The most recently modified of `paths` (those that exist).
fn newest(paths: &[PathBuf]) -> Option<(PathBuf, SystemTime)> {
    paths
        .iter()
        .filter_map(|p| Some((p.clone(), std::fs::metadata(p).ok()?.modified().ok()?)))
        .max_by_key(|&(_, modified)| modified)
}

/// Spawns `command` tied to the test process: the child gets SIGKILL when
/// the test process dies, however it dies (an interrupted `cargo test`, a
/// SIGKILL), so no master outlives a run.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the
/// process, and libtest runs each test on a thread of its own that ends
/// with the test. So the fork happens on one thread that lives as long as
/// the test binary, and a master started by a test lives until the test
/// drops it, even if the test hands it to another thread.
pub fn spawn_tied(mut command: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for (mut command, reply) in queue {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the thread that spawns masters");
        jobs
    });
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe, as pre_exec requires,
    // and the closure touches no memory but its own copy of `parent`.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test process may have died before the prctl: then no
            // signal will come, and nobody is left to want this process.
            // (An error that allocates nothing: this runs between fork and
            // exec, where another thread may have held the allocator's lock.)
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// A running master, started in its own process group; dropping it kills
/// the group with SIGKILL and reaps the master.
pub struct Respawn {
    child: Child,
    pub pid: i32,
    pub addr: SocketAddr,
    log: Arc<Log>,
    exited: Option<ExitStatus>,
}

#[derive(Default)]
struct Log {
    lines: Mutex<(Vec<String>, bool)>, // the lines, and whether stderr closed
    changed: Condvar,
}

impl Respawn {
    /// Starts `respawn` with these flags, plus `--listen 127.0.0.1:0` unless
    /// they give one, and waits for its `listening on` line.
    pub fn start(args: &[&str]) -> Respawn {
        Respawn::start_with(args, |_| {})
    }

    /// [`Respawn::start`], with the command adjusted before it runs.
    pub fn start_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Respawn {
        Respawn::start_program(&binary(), args, adjust)
    }

    /// [`Respawn::start_with`], running `program` (a copy of the binary, or
    /// a script that executes it) instead of the build's binary.
    pub fn start_program(program: &Path, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Respawn {
        let mut command = Command::new(program);
        adjust(&mut command);
        // Before the test's own: a `-- CMD ...` at their end takes the rest.
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command.args(args);
        command
            .env("RUST_LOG", "debug")
            .env("RUST_LOG_STYLE", "never")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command.process_group(0);
        let mut child = spawn_tied(command).expect("starting the respawn binary");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("stderr is piped");
        let writer = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut lines = writer.lines.lock().unwrap();
                lines.0.push(line);
                writer.changed.notify_all();
            }
            writer.lines.lock().unwrap().1 = true;
            writer.changed.notify_all();
        });
        let pid = child.id() as i32;
        let mut respawn = Respawn {
            child,
            pid,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
            exited: None,
        };
        let line = respawn.wait_for_log("the 'listening on' line", |l| l.contains("listening on "));
        let addr = line.rsplit("listening on ").next().unwrap_or_default();
        respawn.addr = addr
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("cannot parse the address in {line:?}"));
        respawn
    }

    /// Starts `respawn --workers n` and waits until all n are ready.
    pub fn with_workers(n: usize, more: &[&str]) -> Respawn {
        let workers = n.to_string();
        let mut args = vec!["--workers", workers.as_str()];
        args.extend_from_slice(more);
        let respawn = Respawn::start(&args);
        respawn.wait_for_workers(n);
        respawn
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lines.lock().unwrap().0.clone()
    }

    /// The log, for failure messages.
    pub fn dump(&self) -> String {
        let lines = self.log();
        let skip = lines.len().saturating_sub(80);
        format!(
            "--- respawn log (last 80 lines) ---\n{}",
            lines[skip..].join("\n")
        )
    }

    /// Waits for a log line that matches and returns it (the first one).
    pub fn wait_for_log(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut guard = self.log.lines.lock().unwrap();
        loop {
            if let Some(line) = guard.0.iter().find(|l| matches(l)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline || guard.1 {
                drop(guard);
                panic!("no log line for {what} within {PATIENCE:?}\n{}", self.dump());
            }
            guard = self.log.changed.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    /// How many log lines contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// How many log lines say exactly `message` (after the timestamp and
    /// level): whole lines, so that `worker 12 ready` is not also counted
    /// in `rolling restart: stopping worker 12, its replacement is ready`.
    pub fn count_lines(&self, message: &str) -> usize {
        self.log().iter().filter(|l| says(l, message)).count()
    }

    /// Waits for a log line that says exactly `message`, and returns it.
    pub fn wait_for_line(&self, message: &str) -> String {
        self.wait_for_log(&format!("{message:?}"), |l| says(l, message))
    }

    /// The master's live children (zombies excluded), from /proc.
    pub fn workers(&self) -> BTreeSet<i32> {
        children(self.pid)
            .into_iter()
            .filter(|&(_, state)| state != 'Z')
            .map(|(pid, _)| pid)
            .collect()
    }

    /// The master's children that died and are not reaped yet.
    pub fn zombies(&self) -> BTreeSet<i32> {
        children(self.pid)
            .into_iter()
            .filter(|&(_, state)| state == 'Z')
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Waits until the master has exactly `n` live children, each of which
    /// has logged `worker <pid> ready`, and no zombie; returns their pids.
    pub fn wait_for_workers(&self, n: usize) -> BTreeSet<i32> {
        let mut last = BTreeSet::new();
        let settled = wait_until(PATIENCE, || {
            last = self.workers();
            let log = self.log();
            last.len() == n
                && self.zombies().is_empty()
                && last
                    .iter()
                    .all(|&pid| log.iter().any(|l| worker_says(l, "ready") == Some(pid)))
        });
        assert!(
            settled,
            "expected {n} ready workers, found {last:?}\n{}",
            self.dump()
        );
        last
    }

    /// Sends `signal` to the master.
    pub fn signal(&self, signal: i32) {
        send(self.pid, signal);
    }

    /// Sends `signal` to the master's whole process group, as a terminal
    /// does on Ctrl-C.
    pub fn signal_group(&self, signal: i32) {
        send(-self.pid, signal);
    }

    /// Waits for the master to exit and returns how it did.
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(status) = self.exited {
            return status;
        }
        let mut status = None;
        wait_until(PATIENCE, || {
            status = self.child.try_wait().expect("waiting for the master");
            status.is_some()
        });
        let Some(status) = status else {
            panic!("the master did not exit within {PATIENCE:?}\n{}", self.dump());
        };
        self.exited = Some(status);
        // Its last lines may still be in the pipe: read to EOF. (A worker
        // that outlived the master would hold the pipe open; the tests check
        // for those themselves, so this wait is bounded, not asserted.)
        let deadline = Instant::now() + PATIENCE;
        let mut guard = self.log.lines.lock().unwrap();
        while !guard.1 && Instant::now() < deadline {
            guard = self
                .log
                .changed
                .wait_timeout(guard, deadline - Instant::now())
                .unwrap()
                .0;
        }
        status
    }

    /// GET `path` on the master's port.
    pub fn get(&self, path: &str) -> std::io::Result<Response> {
        get(self.addr, path)
    }

    /// [`get_raw`] on the master's port.
    pub fn get_raw(&self, path: &str) -> std::io::Result<Vec<u8>> {
        get_raw(self.addr, path)
    }
}

impl Drop for Respawn {
    fn drop(&mut self) {
        // The whole group: the master and every worker, wherever the test
        // stopped. Workers would also die with the master (PDEATHSIG), but
        // the test must not rely on what it tests.
        send(-self.pid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Clients that GET / in a loop until told to stop; they return how many
/// answers were 200 and what went wrong otherwise.
pub struct Load {
    done: Arc<AtomicBool>,
    clients: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Load {
    pub fn start(respawn: &Respawn, clients: usize) -> Load {
        let done = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                let (addr, done) = (respawn.addr, Arc::clone(&done));
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !done.load(Ordering::SeqCst) {
                        match get(addr, "/") {
                            Ok(answer) if answer.status == 200 => ok += 1,
                            other => failed.push(format!("{other:?}")),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { done, clients }
    }

    pub fn stop(self) -> (usize, Vec<String>) {
        self.done.store(true, Ordering::SeqCst);
        let (mut ok, mut failed) = (0, Vec::new());
        for client in self.clients {
            let (client_ok, client_failed) = client.join().unwrap();
            ok += client_ok;
            failed.extend(client_failed);
        }
        (ok, failed)
    }
}

/// An HTTP answer: the status code and the body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    /// The pid in `handle by child <pid>` (or any body ending in a pid).
    pub fn pid(&self) -> Option<i32> {
        self.body.trim().rsplit(' ').next()?.parse().ok()
    }
}

/// GET `path` on a new connection, the whole answer read until close.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut conn = TcpStream::connect_timeout(&addr, PATIENCE)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    conn.set_write_timeout(Some(PATIENCE))?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    parse_response(&answer)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not HTTP: {answer:?}")))
}

/// GET `path` on a new connection, and every byte that came back until the
/// server closed it: for an answer that is not HTTP. A worker killed while
/// it holds a request (a hung one, say) closes the connection without a
/// byte: `Ok` of nothing, which [`cut_without_an_answer`] checks. A read
/// timeout ([`PATIENCE`]) is an `Err`.
pub fn get_raw(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect_timeout(&addr, PATIENCE)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    conn.set_write_timeout(Some(PATIENCE))?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)?;
    Ok(answer)
}

/// What the client of a worker killed in the middle of its request sees:
/// the connection closed, cleanly, with no answer at all. Not an error
/// page, not a reset, not a wait that ran out.
pub fn cut_without_an_answer(got: &std::io::Result<Vec<u8>>) -> bool {
    matches!(got, Ok(bytes) if bytes.is_empty())
}

/// GET `path` over the Unix socket at `socket`, the whole answer read until
/// close.
pub fn unix_get(socket: &Path, path: &str) -> std::io::Result<Response> {
    let mut conn = std::os::unix::net::UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    conn.set_write_timeout(Some(PATIENCE))?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    match (status, answer.split_once("\r\n\r\n")) {
        (Some(status), Some((_, body))) => Ok(Response {
            status,
            body: body.to_owned(),
        }),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not HTTP: {answer:?}"),
        )),
    }
}

/// Sends raw bytes and returns whatever comes back until close.
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, PATIENCE)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    conn.write_all(bytes)?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

fn parse_response(answer: &str) -> Option<Response> {
    let status = answer.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_owned();
    Some(Response { status, body })
}

/// Polls `condition` every few milliseconds until it holds or `limit`
/// passes; says which.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends a signal; a process already gone is not an error here.
pub fn send(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
}

/// The children of `parent` with their state letter, from /proc/*/stat.
pub fn children(parent: i32) -> Vec<(i32, char)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let (state, ppid) = stat(pid)?;
            (ppid == parent).then_some((pid, state))
        })
        .collect()
}

/// Is `pid` a live process (not gone, not a zombie)?
pub fn alive(pid: i32) -> bool {
    matches!(stat(pid), Some((state, _)) if state != 'Z')
}

/// A process's state letter and parent pid, from /proc/PID/stat.
fn stat(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold spaces or ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// A log line without its `[timestamp LEVEL] ` prefix: what the master said.
pub fn message(line: &str) -> &str {
    match line.strip_prefix('[') {
        Some(rest) => rest.split_once("] ").map_or(line, |(_, message)| message),
        None => line,
    }
}

/// Does `line` say exactly `expected`?
pub fn says(line: &str, expected: &str) -> bool {
    message(line) == expected
}

/// The pid of a line that says `worker <pid> <rest>` (`rest` ending the
/// line, after one space), as in `worker_says(line, "ready")`.
pub fn worker_says(line: &str, rest: &str) -> Option<i32> {
    let after = message(line).strip_prefix("worker ")?;
    let (pid, tail) = after.split_once(' ')?;
    if tail != rest || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// The pid in a log line of the form `... worker <pid> <what>`.
pub fn worker_pid(line: &str) -> Option<i32> {
    let after = &line[line.find("worker ")? + "worker ".len()..];
    after.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The index of the first log line that matches, if any.
pub fn position(log: &[String], matches: impl Fn(&str) -> bool) -> Option<usize> {
    log.iter().position(|l| matches(l))
}

/// Processes a test started outside the harness's tie, killed and reaped
/// when dropped, on a failed assertion too: a process that changed its uid
/// (setpriv) loses the parent-death signal [`spawn_tied`] gives it.
pub struct KilledOnDrop(pub Vec<Child>);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `program` run as the user nobody (uid and gid 65534, no other group),
/// through setpriv: what a test needs [`Need::Nobody`] for.
pub fn command_as_nobody(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(program)
        .stdin(std::process::Stdio::null());
    command
}

/// Runs the binary with `args` to its exit (killed after [`PATIENCE`]) and
/// returns the exit status and what it wrote to stdout and stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    let mut command = Command::new(binary());
    command.args(args);
    run_command_to_exit(command)
}

/// [`run_to_exit`] for a command built by the caller (another user, say).
pub fn run_command_to_exit(mut command: Command) -> (ExitStatus, String) {
    command
        .env("RUST_LOG", "info")
        .env("RUST_LOG_STYLE", "never")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.process_group(0);
    let mut child = spawn_tied(command).expect("starting the respawn binary");
    let pid = child.id() as i32;
    let mut status = None;
    wait_until(PATIENCE, || {
        status = child.try_wait().expect("waiting for respawn");
        status.is_some()
    });
    send(-pid, libc::SIGKILL);
    let status = status.unwrap_or_else(|| child.wait().expect("reaping respawn"));
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut out);
    }
    (status, out)
}

/// Can `addr` be bound again (nothing holds the port any more)?
pub fn port_is_free(addr: SocketAddr) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

/// Why a test did not run (or a part of it did not): the kind decides
/// whether a machine may let it skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Something CI has. Where `RESPAWN_SKIPS_FATAL` is set (CI), a skip
    /// of this kind fails the test.
    Needs(Need),
    /// Something no machine is promised: a tool outside CI's image
    /// (systemd-analyze, strace), a kernel or container that refuses
    /// something (a process title, a network namespace, ptrace).
    Environment,
}

/// What CI provides, so that a test that needs it runs there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Root,
    /// A user nobody of uid and gid 65534, as on Debian.
    Nobody,
    /// `node --version` runs.
    Node,
    /// `python3 --version` runs.
    Python,
    /// nginx, on the PATH or at /usr/sbin/nginx.
    Nginx,
    /// The package registries (PyPI, npm), reached by pip and npm: a test
    /// that installs a framework (Flask, say) into a temporary environment
    /// skips with this when the install fails. No cheap check foretells an
    /// install, so [`require`] takes it as met: the install is the check.
    Registry,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skip::Needs(Need::Root) => "needs root",
            Skip::Needs(Need::Nobody) => "needs user nobody",
            Skip::Needs(Need::Node) => "needs node",
            Skip::Needs(Need::Python) => "needs python3",
            Skip::Needs(Need::Nginx) => "needs nginx",
            Skip::Needs(Need::Registry) => "needs the package registries",
            Skip::Environment => "environment",
        })
    }
}

/// Says loudly that `test` (or the part of it `test` names) did not run,
/// and why; then returns, and the caller returns or goes on without that
/// part. With `RESPAWN_SKIPS` naming a file (`make test` sets it), the skip
/// is also a line there, `kind<TAB>binary: test<TAB>why`, for the summary.
/// With `RESPAWN_SKIPS_FATAL` set (CI does), a skip of kind
/// [`Skip::Needs`] fails the test: that machine has what it needs.
pub fn skip(test: &str, kind: Skip, why: &str) {
    let name = format!("{}: {test}", test_binary());
    eprintln!("\n*** SKIPPED {name} ({kind}): {why} ***\n");
    if let Some(path) = std::env::var_os("RESPAWN_SKIPS") {
        let path = PathBuf::from(path);
        if let Err(err) = record_skip(&path, kind, &name, why) {
            // Better a failed test than a skip nobody sees.
            panic!("recording the skip of {name} in {}: {err}", path.display());
        }
    }
    if matches!(kind, Skip::Needs(_)) && std::env::var_os("RESPAWN_SKIPS_FATAL").is_some() {
        panic!(
            "{name} skipped ({kind}: {why}), and RESPAWN_SKIPS_FATAL says this machine has \
             what it needs: install it, or run as root (docs/testing.md, skips)"
        );
    }
}

/// Is `need` met here? If not, [`skip`]s `test` with `Skip::Needs(need)`,
/// saying what is missing, and returns false: `if !require(TEST,
/// Need::Root) { return; }`.
pub fn require(test: &str, need: Need) -> bool {
    let why = match need {
        Need::Root if !is_root() => "it needs root",
        Need::Nobody if !nobody_is_65534() => "there is no user nobody of uid and gid 65534",
        Need::Node if !runs("node") => "`node --version` does not run here",
        Need::Python if !runs("python3") => "`python3 --version` does not run here",
        Need::Nginx if nginx().is_none() => "nginx is not installed (apt-get install nginx-light)",
        _ => return true,
    };
    skip(test, Skip::Needs(need), why);
    false
}

/// Is this process root?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Does user nobody exist with uid and gid 65534?
fn nobody_is_65534() -> bool {
    // SAFETY: an all-zero passwd is a valid value to be written over.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r (not getpwnam: other test threads may look users
    // up too) writes only into `entry`, `buf` (whose length it is given)
    // and `found`, all alive for the call.
    let err = unsafe {
        libc::getpwnam_r(
            c"nobody".as_ptr(),
            &mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    err == 0 && !found.is_null() && (entry.pw_uid, entry.pw_gid) == (65534, 65534)
}

/// Does `program --version` run and succeed?
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// nginx, from the PATH or where Debian puts it (/usr/sbin, which is not
/// on every user's PATH).
pub fn nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

/// The test binary's name without cargo's hash: `privileges` for
/// `target/debug/deps/privileges-5d48af8f59360c36`.
fn test_binary() -> String {
    let exe = std::env::current_exe().unwrap_or_default();
    let stem = exe.file_stem().unwrap_or_default().to_string_lossy().into_owned();
    match stem.rsplit_once('-') {
        Some((name, hash)) if !hash.is_empty() && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_owned()
        }
        _ => stem,
    }
}

/// Appends one line for a skip to `path`. libtest runs a binary's tests on
/// parallel threads: the file is opened O_APPEND and the line goes in one
/// write(2), so that lines from different tests never interleave.
fn record_skip(path: &Path, kind: Skip, name: &str, why: &str) -> std::io::Result<()> {
    let flat = |text: &str| text.replace(['\t', '\n', '\r'], " ");
    let line = format!("{kind}\t{}\t{}\n", flat(name), flat(why));
    let mut file = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
    let written = file.write(line.as_bytes())?;
    if written != line.len() {
        return Err(std::io::Error::other(format!(
            "wrote {written} of {} bytes",
            line.len()
        )));
    }
    Ok(())
}

/// A directory of a test's own under the system's temp dir (`name` and this
/// process's pid in its name), made empty, and removed when dropped, the
/// test failed or not. It derefs to its path.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory holding the program respawn is started from, for the
/// upgrade (SIGUSR2): a hard link to the build's binary, which a test then
/// replaces as a deploy does (a new file renamed over it).
pub struct Deploy {
    pub dir: TempDir,
    pub path: PathBuf,
}

impl Deploy {
    pub fn new(name: &str) -> Deploy {
        let dir = TempDir::new(&format!("respawn-upgrade-{name}"));
        let path = dir.join("respawn");
        if std::fs::hard_link(binary(), &path).is_err() {
            std::fs::copy(binary(), &path).expect("copying the binary");
        }
        Deploy { dir, path }
    }

    /// Replaces the program with a script, atomically, as a deploy would.
    pub fn replace_with(&self, script: &str) {
        use std::os::unix::fs::PermissionsExt;
        let new = self.dir.join("respawn.new");
        std::fs::write(&new, format!("#!/bin/sh\n{script}\n")).expect("writing the new program");
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&new, &self.path).expect("renaming the new program into place");
    }

    /// The build's binary, tagged: what `/version` calls a new build.
    pub fn replace_with_build(&self, tag: &str) {
        self.replace_with(&format!(
            "RESPAWN_DEMO_TAG={tag} exec '{}' \"$@\"",
            binary().display()
        ));
    }

    pub fn start(&self, args: &[&str]) -> Respawn {
        Respawn::start_program(&self.path, args, |_| {})
    }

    /// [`Deploy::start`], with the command adjusted before it runs.
    pub fn start_with(&self, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Respawn {
        Respawn::start_program(&self.path, args, adjust)
    }

    pub fn shown(&self) -> String {
        self.path.display().to_string()
    }
}

/// Runs `command` to its end (an install, a venv): Err has the command
/// and its last lines.
pub fn run_to_end(command: &mut Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("{shown}: {err}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let last = lines[lines.len().saturating_sub(6)..].join(" | ");
    Err(format!("{shown} failed ({}): {last}", out.status))
}

/// Lowers `resource` (RLIMIT_NOFILE, RLIMIT_NPROC...) to `limit` in the
/// process `command` starts, before its exec.
pub fn with_limit(command: &mut Command, resource: libc::__rlimit_resource_t, limit: u64) {
    // SAFETY: setrlimit is async-signal-safe, and the closure touches
    // nothing but its copied arguments.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            match libc::setrlimit(resource, &rlimit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn a_message_is_the_line_without_timestamp_and_level() {
        let line = "[2026-11-25T18:39:57.419Z INFO ] worker 1239 ready";
        assert_eq!(message(line), "worker 1239 ready");
        assert!(says(line, "worker 1239 ready"));
        assert_eq!(worker_says(line, "ready"), Some(1239));
        let stopping = "[2026-11-25T18:39:57.419Z INFO ] rolling restart: stopping worker \
                        1239, its replacement is ready";
        assert_eq!(worker_says(stopping, "ready"), None);
        assert_eq!(worker_says("[t INFO ] worker 12 ready now", "ready"), None);
        assert_eq!(worker_says("[t INFO ] worker x12 ready", "ready"), None);
        assert_eq!(message("no prefix"), "no prefix");
    }

    /// An empty scratch workspace of this test's own.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("respawn-tests-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("master/src")).unwrap();
        dir
    }

    fn file_at(path: &Path, seconds_ago: u64) {
        let file = File::create(path).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(seconds_ago))
            .unwrap();
    }

    #[test]
    fn a_binary_older_than_a_source_is_refused_by_name() {
        let dir = scratch("stale");
        let bin = dir.join("target/debug/respawn");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        file_at(&dir.join("master/src/old.rs"), 100);
        file_at(&bin, 50);
        assert_eq!(check_fresh(&bin, &dir), Ok(()));

        file_at(&dir.join("master/src/new.rs"), 10);
        let err = check_fresh(&bin, &dir).unwrap_err();
        assert!(
            err.starts_with("target/debug/respawn is older than master/src/new.rs: run 'make test'"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cargo_s_list_of_sources_wins_over_the_directories() {
        let dir = scratch("depinfo");
        let bin = dir.join("target/debug/respawn");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        file_at(&dir.join("master/src/lib.rs"), 100);
        // Not in the module tree yet: cargo would not rebuild for it.
        file_at(&dir.join("master/src/draft.rs"), 10);
        file_at(&bin, 50);
        let lib = dir.join("master/src/lib.rs");
        std::fs::write(
            bin.with_extension("d"),
            format!("{}: {} /elsewhere/registry/x.rs\n", bin.display(), lib.display()),
        )
        .unwrap();
        assert_eq!(check_fresh(&bin, &dir), Ok(()));

        file_at(&lib, 0);
        let err = check_fresh(&bin, &dir).unwrap_err();
        assert!(err.contains("older than master/src/lib.rs"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn skips_from_parallel_threads_are_whole_lines() {
        let dir = scratch("skips");
        let path = dir.join("skips.txt");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for n in 0..50 {
                        let kind = if n % 2 == 0 {
                            Skip::Needs(Need::Root)
                        } else {
                            Skip::Environment
                        };
                        let why = format!("reason {t} {n}\twith a tab\nand a newline {}", "x".repeat(300));
                        record_skip(&path, kind, &format!("bin: test_{t}_{n}"), &why).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 400);
        lines.sort();
        for line in &lines {
            let fields: Vec<&str> = line.split('\t').collect();
            let [kind, name, why] = fields[..] else {
                panic!("not three fields: {line:?}");
            };
            let (t, n) = name
                .strip_prefix("bin: test_")
                .and_then(|rest| rest.split_once('_'))
                .unwrap_or_else(|| panic!("{line:?}"));
            let expected_kind = if n.parse::<u32>().unwrap() % 2 == 0 {
                "needs root"
            } else {
                "environment"
            };
            assert_eq!(kind, expected_kind, "{line:?}");
            assert_eq!(
                why,
                format!("reason {t} {n} with a tab and a newline {}", "x".repeat(300)),
                "{line:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_test_binary_is_named_without_its_hash() {
        // This very binary: target/debug/deps/respawn_tests-<hash>.
        assert_eq!(test_binary(), "respawn_tests");
    }

    #[test]
    fn a_missing_binary_says_what_to_run() {
        let dir = scratch("missing");
        let err = check_fresh(&dir.join("target/debug/respawn"), &dir).unwrap_err();
        assert!(err.starts_with("target/debug/respawn is missing ("), "{err}");
        assert!(err.contains("run 'make test'"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
