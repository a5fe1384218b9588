//! `respawn ctl PATH COMMAND`: the client of the control socket.
//!
//! The protocol is docs/control.md's: one command per connection. The
//! master greets with `respawn-control 1`, the client sends one line, and
//! the master answers `ok` and a body, or `error <reason>`, then closes.
//! This file is that exchange ([`ask`]), the pure functions that judge each
//! part of it ([`check_greeting`], [`parse_answer`]), and what an operator
//! sees of the answers: the `status` table ([`render`]), refreshed every
//! second by `--watch`, and one line for each command that changes
//! something ([`done_line`]).
//!
//! Deadlines, chosen for what each wait means. Connecting and the greeting
//! get 5 s: a master that cannot say hello in 5 s is stuck, and the
//! operator should hear so. `status` and `metrics` are answered at once:
//! 5 s more. `scale`, `reload`, `upgrade` and `stop` answer when they are
//! done, which can take a while (a slow start, a long graceful timeout),
//! and the master bounds that wait itself (90 s, then `error not done
//! within 90 s: ...`), where it can say how far the command got: the
//! client waits 10 s past that, so that a peer that greets and then says
//! nothing (something else listening at the path) never holds it forever.

use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The protocol version this client speaks (docs/control.md).
pub const PROTOCOL: &str = "1";

/// For connecting and the greeting together.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);

/// For the answer to a command the master answers at once.
const AT_ONCE_DEADLINE: Duration = Duration::from_secs(5);

/// For the answer to a command the master answers once it is done: the
/// master's own bound (respawn_master's control WAIT_BOUND, 90 s), and 10 s.
const DONE_DEADLINE: Duration = Duration::from_secs(100);

/// The status table fits a terminal this wide.
pub const WIDTH: usize = 100;

/// A request line is at most 256 bytes; a greeting is far shorter. More
/// than this before a newline is not a respawn master.
const MAX_GREETING: usize = 256;

/// Far beyond any answer (a status of 4096 workers is about 1 MB), but a
/// bound: a peer that streams forever must not fill the client's memory.
const MAX_ANSWER: u64 = 64 << 20;

/// `--watch` refreshes this often.
const REFRESH: Duration = Duration::from_secs(1);

/// Clears a terminal and puts the cursor top left, as `clear` does.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// What `respawn ctl` was asked to do.
#[derive(Debug, PartialEq)]
pub struct Ctl {
    pub path: PathBuf,
    pub command: Command,
}

#[derive(Debug, PartialEq)]
pub enum Command {
    Status { json: bool, watch: bool },
    Metrics,
    Scale(u64),
    Reload,
    Upgrade,
    Stop { now: bool },
}

impl Command {
    /// The request line, without its newline.
    fn request(&self) -> String {
        match self {
            Command::Status { .. } => "status".to_owned(),
            Command::Metrics => "metrics".to_owned(),
            Command::Scale(n) => format!("scale {n}"),
            Command::Reload => "reload".to_owned(),
            Command::Upgrade => "upgrade".to_owned(),
            Command::Stop { now: false } => "stop".to_owned(),
            Command::Stop { now: true } => "stop now".to_owned(),
        }
    }
}

/// Why a command got no answer, or not the one hoped for. Every kind is
/// exit 1; `--watch` tells them apart, as a master that stops while being
/// watched ends the watch normally.
#[derive(Debug, PartialEq)]
pub enum Trouble {
    /// Nobody to connect to: no socket, nobody listening, no room.
    Unreachable(String),
    /// The master answered `error <reason>`.
    Refused(String),
    /// The connection ended before an answer: the master went away.
    Closed(String),
    /// Anything else: another protocol, garbage, an I/O error.
    Broken(String),
}

impl fmt::Display for Trouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trouble::Unreachable(why)
            | Trouble::Refused(why)
            | Trouble::Closed(why)
            | Trouble::Broken(why) => f.write_str(why),
        }
    }
}

/// Runs the command and prints its outcome on stdout. `Err` is the reason
/// it failed (exit 1), to be said on stderr.
pub fn run(ctl: &Ctl) -> Result<(), String> {
    let path = &ctl.path;
    match ctl.command {
        Command::Status { json, watch: true } => watch(path, json),
        Command::Status { json, watch: false } => {
            let body = ask(path, "status").map_err(|t| t.to_string())?;
            write_out(&status_output(&body, json, &HashMap::new())?.0)
        }
        Command::Metrics => write_out(&ask(path, "metrics").map_err(|t| t.to_string())?),
        ref command => {
            let body = ask(path, &command.request()).map_err(|t| t.to_string())?;
            write_out(&format!("{}\n", done_line(command, &body)))
        }
    }
}

/// What `status` prints for one answer, and the CPU samples it read, for
/// the next refresh of `--watch`.
fn status_output(body: &str, json: bool, previous: &Samples) -> Result<(String, Samples), String> {
    let parsed: Value =
        serde_json::from_str(body).map_err(|err| format!("the master's status is not valid JSON: {err}"))?;
    if json {
        // As received: a script gets the master's words, not a re-encoding.
        let line = body.trim_end_matches('\n');
        return Ok((format!("{line}\n"), Samples::new()));
    }
    let status = Status::from_json(&parsed)?;
    let table = render(&status, previous, WIDTH);
    Ok((table, status.samples()))
}

/// `status --watch`: the table every second, like top, until Ctrl-C (the
/// default SIGINT ends the process: there is nothing to restore, as the
/// screen is only cleared, not switched) or until the master goes away.
fn watch(path: &Path, json: bool) -> Result<(), String> {
    let terminal = io::stdout().is_terminal();
    let mut previous = Samples::new();
    let mut seen = false;
    let mut next = Instant::now();
    loop {
        let body = match ask(path, "status") {
            Ok(body) => body,
            Err(Trouble::Unreachable(why) | Trouble::Closed(why)) if seen => {
                return write_out(&format!("\nthe master went away: {why}\n"));
            }
            Err(trouble) => return Err(trouble.to_string()),
        };
        let (text, samples) = status_output(&body, json, &previous)?;
        previous = samples;
        let screen = match (terminal && !json, seen) {
            (true, _) => format!("{CLEAR_SCREEN}{text}"),
            // One table per second, a blank line between them; JSON is
            // one object per line already.
            (false, true) if !json => format!("\n{text}"),
            _ => text,
        };
        write_out(&screen)?;
        seen = true;
        // Paced from a fixed start, so that slow answers do not drift the
        // refreshes; one that came later than the next tick waits a whole
        // second rather than firing twice.
        next += REFRESH;
        let now = Instant::now();
        if next <= now {
            next = now + REFRESH;
        }
        std::thread::sleep(next - now);
    }
}

fn write_out(text: &str) -> Result<(), String> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|err| format!("writing to stdout: {}", crate::describe(&err)))
}

/// One command, one connection: connect, check the greeting, send the
/// request line, and read the answer to the end. The body on `ok`.
///
/// `status` and `metrics`, which change nothing, are sent before the
/// greeting is read: a request already whole when the master accepts the
/// connection is never closed to make room, so a client that floods the
/// socket with idle connections cannot crowd them out. A command that
/// changes something waits for the greeting, so that it is only ever sent
/// to a respawn master.
///
/// A `busy` refusal (the connections at their limit, none to close) is
/// asked again every 0.1 s until the greeting's deadline: the refused
/// connection was never read, so nothing was carried out.
pub fn ask(path: &Path, request: &str) -> Result<String, Trouble> {
    let deadline = Instant::now() + HELLO_DEADLINE;
    loop {
        match ask_once(path, request, deadline) {
            Err(Trouble::Refused(why))
                if why.starts_with("busy: ") && Instant::now() + BUSY_RETRY < deadline =>
            {
                std::thread::sleep(BUSY_RETRY);
            }
            answer => return answer,
        }
    }
}

/// How soon a `busy` refusal is asked again.
const BUSY_RETRY: Duration = Duration::from_millis(100);

fn ask_once(path: &Path, request: &str, deadline: Instant) -> Result<String, Trouble> {
    let stream = connect(path, deadline)?;
    let mut conn = Connection {
        stream,
        buffered: Vec::new(),
    };
    let at_once = ["status", "metrics"].contains(&request.split_whitespace().next().unwrap_or_default());
    let early = at_once.then(|| conn.send(request));
    let greeting = conn.read_greeting(path, deadline)?;
    check_greeting(path, &greeting)?;
    let sent = early.unwrap_or_else(|| conn.send(request));
    let wait = if at_once { AT_ONCE_DEADLINE } else { DONE_DEADLINE };
    let answer = conn.read_answer(Instant::now() + wait);
    match (sent, answer) {
        (_, Ok(answer)) if !answer.is_empty() => parse_answer(&answer),
        // Nothing came back: if the request could not even be sent, that
        // is the better reason.
        (Err(err), _) => Err(Trouble::Closed(format!(
            "sending {request:?} to {}: {}",
            path.display(),
            crate::describe(&err)
        ))),
        (Ok(()), Ok(answer)) => parse_answer(&answer),
        (Ok(()), Err(err)) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(Trouble::Broken(format!(
                "no whole answer from {} within {} s (is its master stuck, or is something else listening there?)",
                path.display(),
                wait.as_secs()
            )))
        }
        (Ok(()), Err(err)) => Err(Trouble::Broken(format!(
            "reading the answer from {}: {}",
            path.display(),
            crate::describe(&err)
        ))),
    }
}

/// Connects within the deadline. A Unix stream connect blocks while the
/// listener's queue is full, for as long as the socket's send timeout: so
/// the socket is made by hand, to set that timeout first (std's
/// UnixStream::connect has no deadline).
fn connect(path: &Path, deadline: Instant) -> Result<UnixStream, Trouble> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    use nix::sys::time::{TimeVal, TimeValLike};
    let failed = |errno: nix::errno::Errno| {
        let hint = match errno {
            nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED => {
                format!(" (is respawn running with --control {}?)", path.display())
            }
            nix::errno::Errno::EACCES => " (only the master's user and root may connect)".to_owned(),
            nix::errno::Errno::EAGAIN => {
                return Trouble::Unreachable(format!(
                    "connecting to {}: no room within {} s: the master is not accepting (is it stuck?)",
                    path.display(),
                    HELLO_DEADLINE.as_secs()
                ))
            }
            _ => String::new(),
        };
        Trouble::Unreachable(format!(
            "connecting to {}: {}{hint}",
            path.display(),
            crate::describe(&io::Error::from(errno))
        ))
    };
    let addr = UnixAddr::new(path).map_err(failed)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(failed)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let timeout = TimeVal::milliseconds(left.as_millis().try_into().unwrap_or(i64::MAX));
    setsockopt(&fd, sockopt::SendTimeout, &timeout).map_err(failed)?;
    connect(fd.as_raw_fd(), &addr).map_err(failed)?;
    Ok(UnixStream::from(fd))
}

struct Connection {
    stream: UnixStream,
    /// What came after the greeting's newline (an answer the master sent
    /// at once, such as a refusal that follows no greeting).
    buffered: Vec<u8>,
}

impl Connection {
    /// The first line, without its newline, read within the deadline.
    fn read_greeting(&mut self, path: &Path, deadline: Instant) -> Result<Vec<u8>, Trouble> {
        let broken = |what: String| Trouble::Broken(format!("{}: {what}", path.display()));
        let closed = || {
            Trouble::Closed(format!(
                "{} closed the connection without a greeting (is its master stopping?)",
                path.display()
            ))
        };
        let mut line = Vec::new();
        let mut chunk = [0; MAX_GREETING];
        loop {
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                self.buffered = line.split_off(end + 1);
                line.pop();
                return Ok(line);
            }
            if line.len() > MAX_GREETING {
                return Err(broken(
                    "no greeting line: not a respawn control socket".to_owned(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(broken(format!(
                    "no greeting within {} s (is its master stuck?)",
                    HELLO_DEADLINE.as_secs()
                )));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|err| broken(format!("setting a read timeout: {}", crate::describe(&err))))?;
            match self.stream.read(&mut chunk) {
                // The master closed without a greeting line: what it did
                // say, if anything, is the reason (a refusal ends in a
                // newline; a cut one still says why). A request sent before
                // the greeting and never read makes that close a reset.
                Ok(0) if line.is_empty() => return Err(closed()),
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset && line.is_empty() => {
                    return Err(closed())
                }
                Ok(0) => return Ok(line),
                Ok(n) => line.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                // The timeout: the deadline check above says so.
                Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(err) => return Err(broken(format!("reading the greeting: {}", crate::describe(&err)))),
            }
        }
    }

    fn send(&mut self, request: &str) -> io::Result<()> {
        self.stream.set_write_timeout(Some(HELLO_DEADLINE))?;
        self.stream.write_all(format!("{request}\n").as_bytes())
    }

    /// The answer, to the master's close, within `deadline`.
    fn read_answer(&mut self, deadline: Instant) -> io::Result<Vec<u8>> {
        let mut answer = std::mem::take(&mut self.buffered);
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(answer),
                Ok(n) if answer.len() + n > MAX_ANSWER as usize => {
                    answer.extend_from_slice(&chunk[..MAX_ANSWER as usize - answer.len()]);
                    return Ok(answer);
                }
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                // A master that closes with our request unread resets the
                // connection, after what it wrote: that is still its answer.
                Err(err) if err.kind() == io::ErrorKind::ConnectionReset && !answer.is_empty() => {
                    return Ok(answer)
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Is the first line `respawn-control 1`? A refusal (`error ...`) comes in
/// its place: a peer of another uid, or too many connections.
pub fn check_greeting(path: &Path, line: &[u8]) -> Result<(), Trouble> {
    let line = String::from_utf8_lossy(line);
    let line = line.trim_end_matches('\r');
    if let Some(version) = line.strip_prefix("respawn-control ") {
        if version == PROTOCOL {
            return Ok(());
        }
        return Err(Trouble::Broken(format!(
            "{} speaks version {} of the control protocol, this respawn ctl speaks {PROTOCOL}: \
             use the respawn binary the master runs",
            path.display(),
            printable(version, 20)
        )));
    }
    if let Some(reason) = line.strip_prefix("error ") {
        return Err(Trouble::Refused(printable(reason, 200)));
    }
    Err(Trouble::Broken(format!(
        "{} is not a respawn control socket: it greeted with {:?}",
        path.display(),
        printable(line, 60)
    )))
}

/// `ok\n<body>` is the body; `error <reason>\n` the reason.
pub fn parse_answer(answer: &[u8]) -> Result<String, Trouble> {
    if let Some(body) = answer.strip_prefix(b"ok\n") {
        return String::from_utf8(body.to_vec())
            .map_err(|_| Trouble::Broken("the master's answer is not UTF-8".to_owned()));
    }
    if let Some(reason) = answer.strip_prefix(b"error ") {
        let reason = String::from_utf8_lossy(reason);
        return Err(Trouble::Refused(printable(reason.trim_end(), 200)));
    }
    if answer.is_empty() {
        return Err(Trouble::Closed(
            "the master closed the connection without an answer (did it stop?)".to_owned(),
        ));
    }
    let first = String::from_utf8_lossy(answer.split(|&b| b == b'\n').next().unwrap_or_default());
    Err(Trouble::Broken(format!(
        "an answer this client does not understand: {:?}",
        printable(&first, 60)
    )))
}

/// The one line a command that changes something prints when it is done.
pub fn done_line(command: &Command, body: &str) -> String {
    let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let uint = |key: &str| json.get(key).and_then(Value::as_u64);
    let line = match command {
        Command::Scale(_) => uint("ready").map(|n| format!("{n} {} ready", plural(n, "worker", "workers"))),
        Command::Reload => uint("generation").map(|g| match uint("ready") {
            Some(n) => format!("generation {g}: every worker is new ({n} ready)"),
            None => format!("generation {g}: every worker is new"),
        }),
        Command::Upgrade => match (json.get("path").and_then(Value::as_str), uint("generation")) {
            (Some(path), Some(g)) => Some(format!("upgraded to {}, generation {g}", printable(path, 200))),
            _ => None,
        },
        Command::Stop { .. } => Some("stopped".to_owned()),
        Command::Status { .. } | Command::Metrics => None,
    };
    // The master said ok: it is done, even if its body is not the one
    // documented (a newer master, say). Show what it said.
    line.unwrap_or_else(|| format!("done: {}", printable(body.trim_end(), 200)))
}

fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// The master's status, as the table needs it. Every field but `workers`
/// may be missing or null (shown as `-`): a newer master may drop one, and
/// a worker that just died has no /proc to read.
#[derive(Debug, Default)]
pub struct Status {
    pub pid: Option<u64>,
    pub uptime_secs: Option<f64>,
    pub target: Option<u64>,
    pub generation: Option<u64>,
    pub stopping: bool,
    pub upgrading: bool,
    pub restarts_in_window: Option<u64>,
    pub restart_limit: Option<u64>,
    pub restart_window_secs: Option<f64>,
    pub backoff_slots: Vec<Value>,
    /// Workers that died in their first request, one after another (a
    /// program that fails on every request it gets).
    pub died_in_first_request_in_a_row: Option<u64>,
    pub listeners: Vec<Listener>,
    pub workers: Vec<Worker>,
}

#[derive(Debug, Default)]
pub struct Listener {
    pub address: String,
    pub queued: Option<u64>,
    pub backlog: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct Worker {
    pub pid: Option<u64>,
    pub slot: Option<u64>,
    pub generation: Option<u64>,
    pub state: String,
    pub age_secs: Option<f64>,
    pub requests: Option<u64>,
    pub busy_secs: Option<f64>,
    pub request: Option<String>,
    pub peer: Option<String>,
    pub cpu_secs: Option<f64>,
    pub rss_bytes: Option<u64>,
    /// The last STATUS= the worker sent (`--ready-on-notify`).
    pub notify_status: Option<String>,
}

/// A worker's CPU time and age at one refresh, by pid.
pub type Samples = HashMap<u64, Sample>;

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub cpu_secs: f64,
    pub age_secs: f64,
}

impl Status {
    pub fn from_json(json: &Value) -> Result<Status, String> {
        let Some(workers) = json.get("workers").and_then(Value::as_array) else {
            return Err("the master's status has no \"workers\" array".to_owned());
        };
        let uint = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64);
        let float = |v: &Value, key: &str| v.get(key).and_then(Value::as_f64);
        let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let flag = |key: &str| json.get(key).and_then(Value::as_bool).unwrap_or(false);
        let array = |key: &str| {
            json.get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        Ok(Status {
            pid: uint(json, "pid"),
            uptime_secs: float(json, "uptime_secs"),
            target: uint(json, "target"),
            generation: uint(json, "generation"),
            stopping: flag("stopping"),
            upgrading: flag("upgrading"),
            restarts_in_window: uint(json, "restarts_in_window"),
            restart_limit: uint(json, "restart_limit"),
            restart_window_secs: float(json, "restart_window_secs"),
            backoff_slots: array("backoff_slots"),
            died_in_first_request_in_a_row: uint(json, "died_in_first_request_in_a_row"),
            listeners: array("listeners")
                .iter()
                .map(|l| Listener {
                    address: text(l, "address").unwrap_or_else(|| "?".to_owned()),
                    queued: uint(l, "queued"),
                    backlog: uint(l, "backlog"),
                })
                .collect(),
            workers: workers
                .iter()
                .map(|w| Worker {
                    pid: uint(w, "pid"),
                    slot: uint(w, "slot"),
                    generation: uint(w, "generation"),
                    state: text(w, "state").unwrap_or_else(|| "-".to_owned()),
                    age_secs: float(w, "age_secs"),
                    requests: uint(w, "requests"),
                    busy_secs: float(w, "busy_secs"),
                    request: text(w, "request"),
                    peer: text(w, "peer"),
                    cpu_secs: float(w, "cpu_secs"),
                    rss_bytes: uint(w, "rss_bytes"),
                    notify_status: text(w, "notify_status"),
                })
                .collect(),
        })
    }

    /// The CPU samples of this status, for the next refresh.
    pub fn samples(&self) -> Samples {
        self.workers
            .iter()
            .filter_map(|w| {
                let sample = Sample {
                    cpu_secs: w.cpu_secs?,
                    age_secs: w.age_secs?,
                };
                Some((w.pid?, sample))
            })
            .collect()
    }
}

/// A worker's CPU use in percent of one CPU: over the time since the last
/// refresh when there was one for this pid, else over its whole life. The
/// interval is the change in the worker's age, measured by the master when
/// it read the CPU time: the client's own clock would add the answer's
/// delays to it.
pub fn cpu_percent(worker: &Worker, previous: &Samples) -> Option<f64> {
    let (cpu, age) = (worker.cpu_secs?, worker.age_secs?);
    if let Some(before) = worker.pid.and_then(|pid| previous.get(&pid)) {
        let (used, elapsed) = (cpu - before.cpu_secs, age - before.age_secs);
        if elapsed > 0.0 && used >= 0.0 {
            return Some(100.0 * used / elapsed);
        }
    }
    (age > 0.0).then(|| 100.0 * cpu / age)
}

/// The `status` table: the master, its listeners, and a row per worker,
/// each line at most `width` columns.
pub fn render(status: &Status, previous: &Samples, width: usize) -> String {
    let mut lines = vec![master_line(status), workers_line(status)];
    if let Some(n) = status.died_in_first_request_in_a_row.filter(|&n| n > 0) {
        // The one state the table must not hide: the program fails on the
        // requests it gets, and the master refills on backoff, forever.
        lines.push(format!(
            "DYING: the last {n} workers each died during their first request"
        ));
    }
    let address_width = status
        .listeners
        .iter()
        .map(|l| printable(&l.address, width).len())
        .max();
    for listener in &status.listeners {
        lines.push(format!(
            "listen {:<w$}  queued {} / backlog {}",
            printable(&listener.address, width),
            or_dash(listener.queued),
            or_dash(listener.backlog),
            w = address_width.unwrap_or(0)
        ));
    }
    lines.push(String::new());
    lines.extend(worker_table(status, previous, width));
    let mut text = String::new();
    for line in lines {
        text.push_str(&cut(&line, width));
        text.push('\n');
    }
    text
}

/// The master's pid, age and counters, with what it is busy with first
/// where an operator's eye starts: a stop or an upgrade in progress.
fn master_line(status: &Status) -> String {
    let mut line = format!("master {}", or_dash(status.pid));
    if status.stopping {
        line.push_str(" STOPPING");
    }
    if status.upgrading {
        line.push_str(" UPGRADING");
    }
    let window = match status.restart_window_secs {
        // The window as configured: `60s` reads better than `1m00s`.
        Some(secs) if secs < 3600.0 && secs.fract() == 0.0 => format!("{secs}s"),
        Some(secs) => duration(secs),
        None => "-".to_owned(),
    };
    line.push_str(&format!(
        "  up {}  target {}  generation {}  restarts {}/{} in {window}",
        status.uptime_secs.map_or_else(|| "-".to_owned(), duration),
        or_dash(status.target),
        or_dash(status.generation),
        or_dash(status.restarts_in_window),
        or_dash(status.restart_limit),
    ));
    line
}

/// How many workers in each state, how many serve a request now, and the
/// slots waiting out a backoff before their next fork.
fn workers_line(status: &Status) -> String {
    let busy = status.workers.iter().filter(|w| w.request.is_some()).count();
    let mut states: Vec<(&str, usize)> = Vec::new();
    for worker in &status.workers {
        match states.iter_mut().find(|(state, _)| *state == worker.state) {
            Some((_, count)) => *count += 1,
            None => states.push((&worker.state, 1)),
        }
    }
    let states: Vec<String> = states
        .iter()
        .map(|(state, n)| format!("{n} {}", printable(state, 12)))
        .collect();
    let backoff = if status.backoff_slots.is_empty() {
        "none".to_owned()
    } else {
        let slots: Vec<String> = status
            .backoff_slots
            .iter()
            .map(|slot| printable(&slot.to_string(), 20))
            .collect();
        slots.join(", ")
    };
    format!(
        "workers {}{}{}, {busy} busy  slots in backoff: {backoff}",
        status.workers.len(),
        if states.is_empty() { "" } else { ": " },
        states.join(", ")
    )
}

/// Which way a column's cells lean.
#[derive(Clone, Copy, PartialEq)]
enum Align {
    Left,
    Right,
}

const COLUMNS: [(&str, Align); 9] = [
    ("PID", Align::Right),
    ("SLOT", Align::Right),
    ("GEN", Align::Right),
    ("STATE", Align::Left),
    ("AGE", Align::Right),
    ("REQS", Align::Right),
    ("CPU%", Align::Right),
    ("RSS MiB", Align::Right),
    ("BUSY", Align::Right),
];

/// The worker rows under their header. Each column is as wide as its
/// widest cell; what the worker does now takes what is left of the width.
fn worker_table(status: &Status, previous: &Samples, width: usize) -> Vec<String> {
    let mut workers: Vec<&Worker> = status.workers.iter().collect();
    workers.sort_by_key(|w| (w.slot, w.pid));
    let rows: Vec<([String; 9], &Worker)> = workers
        .iter()
        .map(|&w| {
            let cells = [
                or_dash(w.pid),
                or_dash(w.slot),
                or_dash(w.generation),
                printable(&w.state, 12),
                w.age_secs.map_or_else(|| "-".to_owned(), duration),
                or_dash(w.requests),
                cpu_percent(w, previous).map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.1}")),
                w.rss_bytes
                    .map_or_else(|| "-".to_owned(), |rss| format!("{:.1}", rss as f64 / 1048576.0)),
                w.busy_secs.map_or_else(|| "-".to_owned(), duration),
            ];
            (cells, w)
        })
        .collect();
    let mut widths = COLUMNS.map(|(title, _)| title.len());
    for (cells, _) in &rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: [&str; 9]| {
        let mut line = String::new();
        for ((cell, (_, align)), width) in cells.iter().zip(COLUMNS).zip(widths) {
            match align {
                Align::Left => line.push_str(&format!("{cell:<width$} ")),
                Align::Right => line.push_str(&format!("{cell:>width$} ")),
            }
        }
        line
    };
    let mut lines = vec![format!("{}NOW", line(COLUMNS.map(|(title, _)| title)))];
    for (cells, worker) in &rows {
        let start = line([0, 1, 2, 3, 4, 5, 6, 7, 8].map(|i| cells[i].as_str()));
        let room = width.saturating_sub(start.len());
        lines.push(format!("{start}{}", doing(worker, room)));
    }
    if rows.is_empty() {
        lines.push("(no workers)".to_owned());
    }
    lines
}

/// What a worker is doing now, in `room` columns: the request line it
/// serves and for whom, or `-` when idle. When that is too long, the HTTP
/// version goes first (it rarely tells requests apart), then the request
/// line is cut at its end, keeping the peer whole while there is room for
/// it and some of the request (the method and path come first).
fn doing(worker: &Worker, room: usize) -> String {
    let Some(request) = &worker.request else {
        // Idle: what the program last said of itself (STATUS=), if it did.
        return match &worker.notify_status {
            Some(status) => cut(&format!("[{}]", printable(status, 4096)), room),
            None => cut("-", room),
        };
    };
    let request = printable(request, 4096);
    let suffix = match &worker.peer {
        Some(peer) => format!(" from {}", printable(peer, 100)),
        None => String::new(),
    };
    if request.len() + suffix.len() <= room {
        return format!("{request}{suffix}");
    }
    let request = match request.rsplit_once(" HTTP/") {
        Some((method_and_target, _)) => method_and_target.to_owned(),
        None => request,
    };
    if request.len() + suffix.len() <= room {
        return format!("{request}{suffix}");
    }
    // Keep at least this much of the request before giving up the peer.
    const SOME_REQUEST: usize = 12;
    if room >= suffix.len() + SOME_REQUEST {
        return format!("{}{suffix}", cut(&request, room - suffix.len()));
    }
    cut(&request, room)
}

/// `text` in at most `width` columns, ending in `...` when cut. The text is
/// ASCII (see [`printable`]), so a byte is a column.
fn cut(text: &str, width: usize) -> String {
    if text.len() <= width {
        return text.to_owned();
    }
    if width <= 3 {
        return text[..width].to_owned();
    }
    format!("{}...", &text[..width - 3])
}

/// What the master reports is shown on the operator's terminal: a request
/// line comes from anyone who can connect, and an escape sequence in it
/// must not reach the terminal. Anything but printable ASCII becomes `?`,
/// which also keeps one byte one column wide. At most `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

fn or_dash(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// A duration in at most 6 columns, precise where it matters: `0.4s`,
/// `42s`, `12m05s`, `3h02m`, `2d03h`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".to_owned();
    }
    if secs < 10.0 {
        // Floored, not rounded: 9.96 s is not yet "10.0s".
        return format!("{:.1}s", (secs * 10.0).floor() / 10.0);
    }
    let whole = secs as u64;
    match whole {
        0..=59 => format!("{whole}s"),
        60..=3599 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..=86399 => format!("{}h{:02}m", whole / 3600, whole % 3600 / 60),
        _ => format!("{}d{:02}h", whole / 86400, whole % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const BUSY: &str = r#"{"protocol":1,"pid":4321,"uptime_secs":3723.5,"target":3,"generation":2,
        "stopping":false,"upgrading":false,
        "restarts_in_window":1,"restart_limit":10,"restart_window_secs":60,
        "backoff_slots":[],
        "listeners":[{"address":"127.0.0.1:8080","queued":3,"backlog":1024},
                     {"address":"unix:/run/app.sock","queued":null,"backlog":null}],
        "workers":[
          {"pid":4331,"slot":1,"generation":2,"state":"ready","age_secs":125.0,
           "requests":1017,"busy_secs":null,"request":null,"peer":null,
           "cpu_secs":2.5,"rss_bytes":3145728},
          {"pid":4330,"slot":0,"generation":2,"state":"ready","age_secs":20.0,
           "requests":17,"busy_secs":1.25,"request":"GET /sleep/2000 HTTP/1.1",
           "peer":"127.0.0.1:50312","cpu_secs":0.5,"rss_bytes":2621440},
          {"pid":4340,"slot":2,"generation":2,"state":"starting","age_secs":0.0,
           "requests":0,"busy_secs":null,"request":null,"peer":null,
           "cpu_secs":null,"rss_bytes":null}]}"#;

    fn status(json: &str) -> Status {
        Status::from_json(&serde_json::from_str(json).expect("canned JSON")).expect("a status")
    }

    fn path() -> PathBuf {
        PathBuf::from("/run/respawn.ctl")
    }

    #[test]
    fn the_table_shows_the_master_its_listeners_and_every_worker_by_slot() {
        let table = render(&status(BUSY), &Samples::new(), WIDTH);
        let expected = "\
master 4321  up 1h02m  target 3  generation 2  restarts 1/10 in 60s
workers 3: 2 ready, 1 starting, 1 busy  slots in backoff: none
listen 127.0.0.1:8080      queued 3 / backlog 1024
listen unix:/run/app.sock  queued - / backlog -

 PID SLOT GEN STATE      AGE REQS CPU% RSS MiB BUSY NOW
4330    0   2 ready      20s   17  2.5     2.5 1.2s GET /sleep/2000 HTTP/1.1 from 127.0.0.1:50312
4331    1   2 ready    2m05s 1017  2.0     3.0    - -
4340    2   2 starting  0.0s    0    -       -    - -
";
        assert_eq!(table, expected, "\n{table}");
    }

    #[test]
    fn every_line_fits_the_width_and_a_long_request_is_cut_at_its_end_keeping_the_peer() {
        let long = BUSY.replace("/sleep/2000", &format!("/search?q={}", "x".repeat(200)));
        let table = render(&status(&long), &Samples::new(), WIDTH);
        for line in table.lines() {
            assert!(line.len() <= WIDTH, "{} columns: {line:?}", line.len());
        }
        let row = table
            .lines()
            .find(|l| l.starts_with("4330"))
            .expect("the busy row");
        assert_eq!(row.len(), WIDTH, "{row:?}");
        assert!(row.ends_with("... from 127.0.0.1:50312"), "{row:?}");
        assert!(row.contains(" GET /search?q=xxx"), "{row:?}");
        let busy = |request: &str, peer: Option<&str>| Worker {
            request: Some(request.to_owned()),
            peer: peer.map(str::to_owned),
            ..Worker::default()
        };
        // Too long: the version goes first, then the end of the target.
        assert_eq!(
            doing(&busy("GET /a HTTP/1.1", Some("[::1]:5")), 24),
            "GET /a from [::1]:5"
        );
        assert_eq!(
            doing(&busy("GET /abcdefghijklmnop HTTP/1.1", None), 20),
            "GET /abcdefghijkl..."
        );
        assert_eq!(
            doing(&busy("GET /abcdefghijklmnop HTTP/1.1", Some("[::1]:5")), 32),
            "GET /abcdefghijk... from [::1]:5"
        );
        // Too narrow for the peer and some of the request: the request.
        assert_eq!(doing(&busy("GET / HTTP/1.1", Some("[::1]:50312")), 20), "GET /");
        assert_eq!(
            doing(&busy("GET / HTTP/1.1", Some("[::1]:5")), 30),
            "GET / HTTP/1.1 from [::1]:5"
        );
        assert_eq!(doing(&Worker::default(), 20), "-");
    }

    #[test]
    fn the_master_line_says_backoff_stopping_and_upgrading() {
        let json = BUSY
            .replace(r#""backoff_slots":[]"#, r#""backoff_slots":[1,3]"#)
            .replace(r#""stopping":false"#, r#""stopping":true"#)
            .replace(r#""upgrading":false"#, r#""upgrading":true"#);
        let table = render(&status(&json), &Samples::new(), WIDTH);
        let mut lines = table.lines();
        let first = lines.next().unwrap_or_default();
        assert!(
            first.starts_with("master 4321 STOPPING UPGRADING  up 1h02m"),
            "{first}"
        );
        let second = lines.next().unwrap_or_default();
        assert!(second.ends_with("  slots in backoff: 1, 3"), "{second}");
    }

    #[test]
    fn null_and_missing_fields_are_dashes_and_only_workers_is_required() {
        let table = render(
            &status(r#"{"workers":[{"pid":7,"state":"ready"}],"listeners":[{"address":"x"}]}"#),
            &Samples::new(),
            WIDTH,
        );
        assert_eq!(
            table,
            "\
master -  up -  target -  generation -  restarts -/- in -
workers 1: 1 ready, 0 busy  slots in backoff: none
listen x  queued - / backlog -

PID SLOT GEN STATE AGE REQS CPU% RSS MiB BUSY NOW
  7    -   - ready   -    -    -       -    - -
"
        );
        let empty = render(&status(r#"{"workers":[]}"#), &Samples::new(), WIDTH);
        assert!(empty.contains("workers 0, 0 busy  slots"), "{empty}");
        assert!(empty.ends_with("NOW\n(no workers)\n"), "{empty}");
        let no_workers = Status::from_json(&serde_json::json!({"target": 2}));
        assert_eq!(
            no_workers.err().as_deref(),
            Some("the master's status has no \"workers\" array")
        );
    }

    #[test]
    fn cpu_is_over_the_life_for_one_sample_and_over_the_interval_when_watching() {
        let worker = |pid, cpu_secs, age_secs| Worker {
            pid: Some(pid),
            cpu_secs: Some(cpu_secs),
            age_secs: Some(age_secs),
            ..Worker::default()
        };
        let none = Samples::new();
        assert_eq!(cpu_percent(&worker(1, 0.5, 20.0), &none), Some(2.5));
        assert_eq!(cpu_percent(&worker(1, 0.0, 0.0), &none), None, "no age yet");
        let before: Samples = [(
            1,
            Sample {
                cpu_secs: 0.5,
                age_secs: 20.0,
            },
        )]
        .into();
        // 0.9 s of CPU in the last 1.0 s: 90%, not its lifetime's 6.7%.
        let now = worker(1, 1.4, 21.0);
        assert!((cpu_percent(&now, &before).unwrap() - 90.0).abs() < 1e-9);
        // Another pid (a replacement): its own life.
        assert_eq!(cpu_percent(&worker(2, 1.0, 10.0), &before), Some(10.0));
        // The same age twice (no time passed): the life, not a division by 0.
        assert_eq!(cpu_percent(&worker(1, 0.5, 20.0), &before), Some(2.5));
        assert_eq!(cpu_percent(&Worker::default(), &before), None);
        // From the parsed status: samples by pid, and the table uses them.
        let busy = status(BUSY);
        let samples = busy.samples();
        assert_eq!(samples.len(), 2, "a worker without a CPU time is not sampled");
        let later = BUSY
            .replace(r#""age_secs":20.0"#, r#""age_secs":22.0"#)
            .replace(r#""cpu_secs":0.5"#, r#""cpu_secs":1.5"#);
        let table = render(&status(&later), &samples, WIDTH);
        let row = table.lines().find(|l| l.starts_with("4330")).expect("the row");
        assert!(row.contains(" 50.0 "), "1 s of CPU in 2 s: {row}");
    }

    #[test]
    fn durations_fit_six_columns() {
        for (secs, shown) in [
            (0.0, "0.0s"),
            (0.44, "0.4s"),
            (9.96, "9.9s"),
            (42.7, "42s"),
            (725.0, "12m05s"),
            (10_920.0, "3h02m"),
            (183_600.0, "2d03h"),
            (-1.0, "-"),
            (f64::NAN, "-"),
            (f64::INFINITY, "-"),
        ] {
            assert_eq!(duration(secs), shown, "{secs}");
        }
    }

    #[test]
    fn a_request_line_cannot_reach_the_terminal_as_escapes() {
        let json = BUSY.replace("GET /sleep/2000", r"GET /\u001b[2J\u00e9");
        let table = render(&status(&json), &Samples::new(), WIDTH);
        assert!(!table.contains('\x1b'), "{table:?}");
        assert!(table.contains("GET /?[2J? HTTP/1.1"), "{table}");
    }

    #[test]
    fn answers_are_ok_with_a_body_or_error_with_a_reason() {
        assert_eq!(parse_answer(b"ok\n{\"a\":1}\n"), Ok("{\"a\":1}\n".to_owned()));
        assert_eq!(parse_answer(b"ok\n"), Ok(String::new()));
        assert_eq!(
            parse_answer(b"error scale: 5000 is more than the 4096 workers the master can hold\n"),
            Err(Trouble::Refused(
                "scale: 5000 is more than the 4096 workers the master can hold".to_owned()
            ))
        );
        assert!(matches!(parse_answer(b""), Err(Trouble::Closed(_))));
        assert_eq!(
            parse_answer(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
            Err(Trouble::Broken(
                "an answer this client does not understand: \"HTTP/1.1 400 Bad Request?\"".to_owned()
            ))
        );
        assert!(
            matches!(parse_answer(b"ok"), Err(Trouble::Broken(_))),
            "cut short"
        );
        assert!(matches!(parse_answer(b"ok\n\xff"), Err(Trouble::Broken(_))));
    }

    #[test]
    fn the_greeting_must_be_version_1() {
        assert_eq!(check_greeting(&path(), b"respawn-control 1"), Ok(()));
        assert_eq!(
            check_greeting(&path(), b"respawn-control 2"),
            Err(Trouble::Broken(
                "/run/respawn.ctl speaks version 2 of the control protocol, this respawn ctl \
                 speaks 1: use the respawn binary the master runs"
                    .to_owned()
            ))
        );
        assert_eq!(
            check_greeting(&path(), b"error busy: 64 control connections are open"),
            Err(Trouble::Refused(
                "busy: 64 control connections are open".to_owned()
            ))
        );
        assert_eq!(
            check_greeting(&path(), b"SSH-2.0-OpenSSH_9.6"),
            Err(Trouble::Broken(
                "/run/respawn.ctl is not a respawn control socket: it greeted with \"SSH-2.0-OpenSSH_9.6\""
                    .to_owned()
            ))
        );
    }

    #[test]
    fn done_lines_say_what_the_master_did() {
        assert_eq!(
            done_line(&Command::Scale(5), r#"{"target":5,"ready":5}"#),
            "5 workers ready"
        );
        assert_eq!(
            done_line(&Command::Scale(1), r#"{"target":1,"ready":1}"#),
            "1 worker ready"
        );
        assert_eq!(
            done_line(&Command::Reload, r#"{"generation":3,"ready":2}"#),
            "generation 3: every worker is new (2 ready)"
        );
        assert_eq!(
            done_line(
                &Command::Upgrade,
                r#"{"generation":4,"path":"/usr/local/bin/respawn"}"#
            ),
            "upgraded to /usr/local/bin/respawn, generation 4"
        );
        assert_eq!(
            done_line(&Command::Stop { now: true }, r#"{"stopped":true}"#),
            "stopped"
        );
        assert_eq!(done_line(&Command::Reload, "{\"new\":1}\n"), "done: {\"new\":1}");
        assert_eq!(Command::Stop { now: true }.request(), "stop now");
        assert_eq!(Command::Scale(0).request(), "scale 0");
    }

    /// A fake master: serves one connection by writing `says` (after
    /// reading one line, if `reads`), then closing; returns what it read.
    fn fake_master(says: &'static [&'static [u8]]) -> (tempdir::Dir, std::thread::JoinHandle<String>) {
        let dir = tempdir::Dir::new();
        let listener = UnixListener::bind(dir.socket()).expect("binding the fake master");
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accepting");
            let mut heard = String::new();
            for (i, part) in says.iter().enumerate() {
                if i == 1 {
                    // After the greeting: the request line.
                    let mut byte = [0];
                    while conn.read(&mut byte).unwrap_or(0) == 1 {
                        heard.push(byte[0] as char);
                        if byte[0] == b'\n' {
                            break;
                        }
                    }
                }
                let _ = conn.write_all(part);
            }
            heard
        });
        (dir, server)
    }

    /// A directory of its own for each fake master's socket, removed after.
    mod tempdir {
        use std::path::PathBuf;
        pub struct Dir(PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                let n = NEXT.fetch_add(1, Ordering::SeqCst);
                let dir = std::env::temp_dir().join(format!("respawn-ctl-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&dir).expect("making a directory");
                Dir(dir)
            }
            pub fn socket(&self) -> PathBuf {
                self.0.join("ctl.sock")
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn ask_sends_one_line_and_returns_the_body() {
        let (dir, server) = fake_master(&[b"respawn-control 1\n", b"ok\n", b"{\"target\":5,\"ready\":5}"]);
        assert_eq!(
            ask(&dir.socket(), "scale 5"),
            Ok("{\"target\":5,\"ready\":5}".to_owned())
        );
        assert_eq!(server.join().expect("the fake master"), "scale 5\n");
    }

    #[test]
    fn ask_reports_refusals_other_versions_and_silence() {
        let (dir, _server) =
            fake_master(&[b"error permission denied: uid 1000 is neither the master's nor root\n"]);
        assert_eq!(
            ask(&dir.socket(), "status"),
            Err(Trouble::Refused(
                "permission denied: uid 1000 is neither the master's nor root".to_owned()
            ))
        );
        let (dir, _server) = fake_master(&[b"respawn-control 2\n"]);
        assert!(
            matches!(ask(&dir.socket(), "status"), Err(Trouble::Broken(why)) if why.contains("version 2")),
        );
        // Greets, reads the request, and closes without an answer.
        let (dir, _server) = fake_master(&[b"respawn-control 1\n", b""]);
        assert!(matches!(ask(&dir.socket(), "reload"), Err(Trouble::Closed(_))));
        let (dir, _server) =
            fake_master(&[b"respawn-control 1\n", b"error reload: the master is stopping\n"]);
        assert_eq!(
            ask(&dir.socket(), "reload"),
            Err(Trouble::Refused("reload: the master is stopping".to_owned()))
        );
        let (dir, _server) = fake_master(&[]);
        assert!(matches!(ask(&dir.socket(), "status"), Err(Trouble::Closed(_))));
    }

    #[test]
    fn a_missing_socket_says_how_to_open_one() {
        let dir = tempdir::Dir::new();
        let socket = dir.socket();
        assert_eq!(
            ask(&socket, "status"),
            Err(Trouble::Unreachable(format!(
                "connecting to {0}: no such file or directory (is respawn running with --control {0}?)",
                socket.display()
            )))
        );
    }

    #[test]
    fn a_silent_peer_gets_the_greeting_deadline() {
        let dir = tempdir::Dir::new();
        // Listening, never accepting: the kernel completes the connection
        // (the backlog has room), and nothing is ever said.
        let _listener = UnixListener::bind(dir.socket()).expect("binding");
        let started = Instant::now();
        let answer = ask(&dir.socket(), "status");
        let waited = started.elapsed();
        assert!(
            matches!(&answer, Err(Trouble::Broken(why)) if why.ends_with("no greeting within 5 s (is its master stuck?)")),
            "{answer:?}"
        );
        assert!(
            waited >= HELLO_DEADLINE && waited < HELLO_DEADLINE * 2,
            "{waited:?}"
        );
    }
}
