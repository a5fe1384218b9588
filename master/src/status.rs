//! What the master can say about itself: one snapshot, written as the
//! control socket's `status` (JSON) and `metrics` (Prometheus text).
//!
//! Everything here reads: the worker table, the scoreboard's rows, /proc for
//! each worker's CPU time and memory, TCP_INFO or sock_diag (sockdiag.rs)
//! for each listener's accept queue. Nothing is sampled in the background:
//! an idle master keeps no timer for this, and a snapshot costs a few reads
//! of /proc per worker, made only when someone asks.

use crate::listen::Listeners;
use crate::table::{State, Table};
use respawn_ipc::scoreboard::Scoreboard;
use respawn_ipc::Listener;
use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Exits since the master started, by cause, and the requests served by
/// workers that are gone (the live ones' are in their scoreboard rows).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Counters {
    pub failed_start: u64,
    pub died: u64,
    /// Ready, and died in its first request (not counted toward giving up).
    pub in_first_request: u64,
    pub panicked: u64,
    pub retired: u64,
    pub hung: u64,
    pub requests_of_the_gone: u64,
}

/// What a snapshot is made from: the master's state, borrowed.
pub(crate) struct Input<'a> {
    pub started: Instant,
    pub target: usize,
    pub generation: u64,
    pub stopping: bool,
    pub upgrading: bool,
    pub restarts_in_window: usize,
    pub restart_limit: usize,
    pub restart_window: Duration,
    pub backoff_slots: Vec<usize>,
    /// Workers that died in their first request, one after another.
    pub died_in_first_request_in_a_row: u64,
    pub listeners: &'a Listeners,
    pub workers: &'a Table,
    pub scoreboard: &'a Scoreboard,
    pub counters: &'a Counters,
}

/// One worker, as `status` shows it.
struct WorkerView {
    pid: i32,
    slot: usize,
    generation: u64,
    state: &'static str,
    age: f64,
    requests: u64,
    busy: Option<f64>,
    request: Option<String>,
    peer: Option<String>,
    cpu_secs: Option<f64>,
    rss_bytes: Option<u64>,
    /// The last STATUS= it sent (`--ready-on-notify`).
    notify_status: Option<String>,
}

fn workers(input: &Input, now: Instant) -> Vec<WorkerView> {
    let mono_now = monotonic_nanos();
    let mut views: Vec<WorkerView> = input
        .workers
        .iter()
        .map(|w| {
            let row = input.scoreboard.read(w.slot).unwrap_or_default();
            let busy = row
                .busy_since
                .map(|since| mono_now.saturating_sub(since) as f64 / 1e9);
            let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            WorkerView {
                pid: w.pid.as_raw(),
                slot: w.slot,
                generation: w.generation,
                state: state_name(w.state),
                age: now.saturating_duration_since(w.spawned_at).as_secs_f64(),
                requests: row.requests,
                busy,
                request: busy.and_then(|_| text(&row.request)),
                peer: busy.and_then(|_| text(&row.peer)),
                cpu_secs: cpu_secs(w.pid.as_raw()),
                rss_bytes: rss_bytes(w.pid.as_raw()),
                notify_status: w.notify_status.clone(),
            }
        })
        .collect();
    views.sort_by_key(|w| w.slot);
    views
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::Ready => "ready",
        State::Retiring => "retiring",
    }
}

/// The `status` body: one JSON object on one line (docs/control.md).
pub(crate) fn json(input: &Input) -> String {
    let now = Instant::now();
    let mut out = String::with_capacity(512);
    let _ = write!(
        out,
        "{{\"protocol\":1,\"pid\":{},\"uptime_secs\":{:.3},\"target\":{},\"generation\":{},\
         \"stopping\":{},\"upgrading\":{},\"restarts_in_window\":{},\"restart_limit\":{},\
         \"restart_window_secs\":{:.3},\"backoff_slots\":[{}],\"died_in_first_request_in_a_row\":{},\
         \"listeners\":[",
        std::process::id(),
        now.saturating_duration_since(input.started).as_secs_f64(),
        input.target,
        input.generation,
        input.stopping,
        input.upgrading,
        input.restarts_in_window,
        input.restart_limit,
        input.restart_window.as_secs_f64(),
        input
            .backoff_slots
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        input.died_in_first_request_in_a_row,
    );
    for (i, listening) in input.listeners.iter().enumerate() {
        let (queued, backlog) = queue(listening.listener()).unzip();
        let _ = write!(
            out,
            "{}{{\"address\":{},\"queued\":{},\"backlog\":{}}}",
            if i > 0 { "," } else { "" },
            string(&listening.listener().local()),
            number(queued),
            number(backlog),
        );
    }
    out.push_str("],\"workers\":[");
    for (i, w) in workers(input, now).iter().enumerate() {
        let _ = write!(
            out,
            "{}{{\"pid\":{},\"slot\":{},\"generation\":{},\"state\":\"{}\",\"age_secs\":{:.3},\
             \"requests\":{},\"busy_secs\":{},\"request\":{},\"peer\":{},\"cpu_secs\":{},\"rss_bytes\":{},\
             \"notify_status\":{}}}",
            if i > 0 { "," } else { "" },
            w.pid,
            w.slot,
            w.generation,
            w.state,
            w.age,
            w.requests,
            w.busy.map_or("null".to_owned(), |b| format!("{b:.3}")),
            w.request.as_deref().map_or("null".to_owned(), string),
            w.peer.as_deref().map_or("null".to_owned(), string),
            w.cpu_secs.map_or("null".to_owned(), |c| format!("{c:.2}")),
            number(w.rss_bytes),
            w.notify_status.as_deref().map_or("null".to_owned(), string),
        );
    }
    out.push_str("]}\n");
    out
}

/// The `metrics` body: the Prometheus text format, version 0.0.4.
pub(crate) fn metrics(input: &Input) -> String {
    let now = Instant::now();
    let views = workers(input, now);
    let c = input.counters;
    let mut out = String::with_capacity(2048);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let by_state: Vec<(String, String)> = ["starting", "ready", "retiring"]
        .iter()
        .map(|state| {
            let count = views.iter().filter(|w| w.state == *state).count();
            (format!("{{state=\"{state}\"}}"), count.to_string())
        })
        .collect();
    family("respawn_workers", "gauge", "Live workers by state.", &by_state);
    let plain = |value: String| vec![(String::new(), value)];
    family(
        "respawn_workers_wanted",
        "gauge",
        "The number of workers wanted.",
        &plain(input.target.to_string()),
    );
    family(
        "respawn_generation",
        "gauge",
        "Bumped by each reload and upgrade.",
        &plain(input.generation.to_string()),
    );
    let exits: Vec<(String, String)> = [
        ("failed_start", c.failed_start),
        ("died", c.died),
        ("in_first_request", c.in_first_request),
        ("panicked", c.panicked),
        ("retired", c.retired),
        ("hung", c.hung),
    ]
    .iter()
    .map(|(cause, count)| (format!("{{cause=\"{cause}\"}}"), count.to_string()))
    .collect();
    family(
        "respawn_worker_exits_total",
        "counter",
        "Worker exits since the master started, by cause.",
        &exits,
    );
    let live_requests: u64 = views.iter().map(|w| w.requests).sum();
    family(
        "respawn_requests_total",
        "counter",
        "Connections finished by every worker since the master started.",
        &plain((c.requests_of_the_gone + live_requests).to_string()),
    );
    let queues: Vec<(String, (u32, u32))> = input
        .listeners
        .iter()
        .filter_map(|l| Some((l.listener().local(), queue(l.listener())?)))
        .collect();
    let per_listener = |pick: fn(&(u32, u32)) -> u32| -> Vec<(String, String)> {
        queues
            .iter()
            .map(|(address, q)| (format!("{{listener={}}}", label(address)), pick(q).to_string()))
            .collect()
    };
    family(
        "respawn_listen_queue",
        "gauge",
        "Connections waiting in the accept queue.",
        &per_listener(|q| q.0),
    );
    family(
        "respawn_listen_backlog",
        "gauge",
        "The accept queue's length (the listen backlog).",
        &per_listener(|q| q.1),
    );
    family(
        "respawn_master_uptime_seconds",
        "gauge",
        "Seconds since the master started.",
        &plain(format!(
            "{:.3}",
            now.saturating_duration_since(input.started).as_secs_f64()
        )),
    );
    out
}

/// A listener's accept queue: waiting now, and its length. For a TCP
/// socket in LISTEN state, TCP_INFO's `unacked` is the queue and `sacked`
/// the backlog; a Unix socket's come from sock_diag. None if the kernel
/// refuses.
fn queue(listener: &Listener) -> Option<(u32, u32)> {
    let tcp = match listener {
        Listener::Tcp(tcp) => tcp,
        Listener::Unix(unix) => return crate::sockdiag::unix_queue(unix),
    };
    // SAFETY: all zeroes is a valid tcp_info (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which
    // lives for the call.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info.tcpi_unacked, info.tcpi_sacked))
}

/// User and system CPU time of a process, from /proc/PID/stat.
fn cpu_secs(pid: i32) -> Option<f64> {
    let (_, ticks) = crate::hung::cpu(nix::unistd::Pid::from_raw(pid))?;
    // SAFETY: sysconf reads a constant of the system.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_sec > 0).then(|| ticks as f64 / per_sec as f64)
}

/// Resident memory of a process, from /proc/PID/statm.
fn rss_bytes(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split(' ').nth(1)?.parse().ok()?;
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// CLOCK_MONOTONIC in nanoseconds: the scoreboard's clock.
fn monotonic_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64).saturating_mul(1_000_000_000) + now.tv_nsec as u64
}

fn number<T: ToString>(value: Option<T>) -> String {
    value.map_or("null".to_owned(), |v| v.to_string())
}

/// A JSON string: quotes, backslashes and control characters escaped.
pub(crate) fn string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Prometheus label value: quoted, with `\`, `"` and newlines escaped.
fn label(text: &str) -> String {
    let escaped = text
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_for_json_and_labels() {
        assert_eq!(string("GET /a\"b\\c\n\u{1}é"), "\"GET /a\\\"b\\\\c\\n\\u0001é\"");
        assert_eq!(label("unix:/run/a\"b"), "\"unix:/run/a\\\"b\"");
    }

    #[test]
    fn a_tcp_listener_says_its_queue_and_backlog() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = tcp.local_addr().expect("address");
        let listener = Listener::Tcp(tcp);
        let _waiting = std::net::TcpStream::connect(addr).expect("connecting");
        let (queued, backlog) = queue(&listener).expect("TCP_INFO");
        assert_eq!(queued, 1, "one connection waits to be accepted");
        assert!(backlog >= 128, "{backlog}");
    }

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id() as i32;
        assert!(cpu_secs(me).is_some());
        assert!(rss_bytes(me).is_some_and(|rss| rss > 0));
    }
}
