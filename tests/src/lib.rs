//! The harness for the end-to-end tests: start the real `respawn` binary on
//! an ephemeral port, read its log, find its workers in /proc, speak HTTP to
//! it, and make sure nothing it started outlives the test.
//!
//! Every wait has a deadline ([`PATIENCE`]) and fails with the log attached;
//! nothing sleeps to synchronise. [`Respawn`]'s drop kills the master's whole
//! process group, so a failing test leaves nothing behind.
//!
//! The binary is `target/debug/respawn`, built by `make test` before the
//! tests run (set RESPAWN_BIN to test another).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long any one condition may take before the test fails. Generous: the
/// tests must pass on a slow, busy 2-core machine; they are not benchmarks.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The demo binary under test.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("RESPAWN_BIN") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/respawn");
    assert!(
        path.exists(),
        "{} is missing: run the tests with 'make test', which builds it first",
        path.display()
    );
    path
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
        let mut command = Command::new(binary());
        adjust(&mut command);
        command.args(args);
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command
            .env("RUST_LOG", "debug")
            .env("RUST_LOG_STYLE", "never")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().expect("starting the respawn binary");
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
                    .all(|pid| log.iter().any(|l| l.ends_with(&format!("worker {pid} ready"))))
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

/// The pid in a log line of the form `... worker <pid> <what>`.
pub fn worker_pid(line: &str) -> Option<i32> {
    let after = &line[line.find("worker ")? + "worker ".len()..];
    after.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// The index of the first log line that matches, if any.
pub fn position(log: &[String], matches: impl Fn(&str) -> bool) -> Option<usize> {
    log.iter().position(|l| matches(l))
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
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().expect("starting the respawn binary");
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
