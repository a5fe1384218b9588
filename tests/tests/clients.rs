//! The Node.js and Python worker clients (clients/node/respawn.js,
//! clients/python/respawn.py) and their examples, against a fake master: a
//! listening socket and a pipe, handed over at fd 3 and 4 with the variables
//! of docs/protocol.md, as `respawn -- CMD` hands them over. The test reads
//! every frame the worker writes and checks each against the protocol, so
//! these tests say what the clients promise without the master side.
//!
//! Each behaviour is a function run once per language (a module per
//! behaviour, a test per language). Without node or python3 on the PATH,
//! that language's tests are skipped: loudly, in `make test`'s summary, and
//! as a failure on CI, which has both.

use respawn_tests::*;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

const READY: u8 = 1;
const SUICIDE: u8 = 2;
const BUSY: u8 = 3;
const IDLE: u8 = 4;

#[derive(Clone, Copy, Debug)]
enum Lang {
    Node,
    Python,
}

impl Lang {
    /// `node` and `python3` from the PATH, or the ones RESPAWN_TEST_NODE
    /// and RESPAWN_TEST_PYTHON name (to try the oldest versions supported,
    /// Node 18 and Python 3.8).
    fn interpreter(self) -> String {
        let (variable, default) = match self {
            Lang::Node => ("RESPAWN_TEST_NODE", "node"),
            Lang::Python => ("RESPAWN_TEST_PYTHON", "python3"),
        };
        std::env::var(variable).unwrap_or_else(|_| default.to_owned())
    }

    fn example(self) -> std::path::PathBuf {
        match self {
            Lang::Node => workspace().join("clients/node/example.js"),
            Lang::Python => workspace().join("clients/python/example.py"),
        }
    }

    /// Does one worker serve several requests at once? Node's event loop
    /// does; the Python client serves one at a time (its module docs say why).
    fn concurrent(self) -> bool {
        matches!(self, Lang::Node)
    }

    /// Is the interpreter here? If not, [`skip`]s `test`: it then returns
    /// without testing anything.
    fn present(self, test: &str) -> bool {
        let found = Command::new(self.interpreter())
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            let need = match self {
                Lang::Node => Need::Node,
                Lang::Python => Need::Python,
            };
            skip(
                test,
                Skip::Needs(need),
                &format!(
                    "`{} --version` does not run here, so the {self:?} client is NOT tested",
                    self.interpreter()
                ),
            );
        }
        found
    }
}

/// One frame as the worker wrote it, and when it was read.
#[derive(Clone, Debug)]
struct Frame {
    kind: u8,
    text: String,
    at: Instant,
}

/// What the reader of the pipe has seen: frames, a protocol violation, the
/// end of the pipe.
#[derive(Default)]
struct Channel {
    frames: Vec<Frame>,
    violation: Option<String>,
    closed: bool,
}

/// A worker started by the fake master; dropping it kills and reaps it.
struct Worker {
    child: Child,
    pid: i32,
    /// The listeners' addresses, in the order of their fds.
    addrs: Vec<SocketAddr>,
    channel: Arc<(Mutex<Channel>, Condvar)>,
    stderr: Arc<Mutex<String>>,
    /// Held, as the master holds its listeners, for the worker's whole life.
    _listeners: Vec<TcpListener>,
}

impl Worker {
    /// Starts `lang`'s example with a listener at fd 3 and the channel at
    /// fd 4; `env` adds or overrides variables.
    fn start(lang: Lang, env: &[(&str, &str)]) -> Worker {
        Worker::start_with(lang, 1, env)
    }

    /// Starts `lang`'s example with `listeners` listeners at fd 3 onward
    /// (at most 8) and the channel after them.
    fn start_with(lang: Lang, listeners: usize, env: &[(&str, &str)]) -> Worker {
        let bound: Vec<TcpListener> = (0..listeners)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a listener"))
            .collect();
        let addrs = bound
            .iter()
            .map(|l| l.local_addr().expect("the listener's address"))
            .collect();
        let (read_end, write_end) = pipe();
        let channel_at = 3 + listeners as i32;
        let mut command = Command::new("sh");
        // LISTEN_PID is the worker's own pid: the shell's, which exec keeps.
        command
            .args(["-c", r#"LISTEN_PID=$$ exec "$0" "$@""#, &lang.interpreter()])
            .arg(lang.example())
            .env("LISTEN_FDS", listeners.to_string())
            .env("LISTEN_FDNAMES", vec!["http"; listeners].join(":"))
            .env("RESPAWN_CHANNEL_FD", channel_at.to_string())
            .env("RESPAWN_SLOT", "0")
            .env_remove("RESPAWN_MAX_REQUESTS")
            .env_remove("RESPAWN_DEMO_TAG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        // The fds to hand over, in order: listeners, then the channel.
        let mut sources = [-1; 9];
        for (slot, fd) in sources.iter_mut().zip(bound.iter().map(AsRawFd::as_raw_fd)) {
            *slot = fd;
        }
        sources[listeners] = write_end.as_raw_fd();
        let count = listeners + 1;
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made (signal, fcntl, dup2), on fds the closure copied into an
        // array of its own; nothing allocates.
        unsafe {
            command.pre_exec(move || {
                // As the master starts workers: what steers it, ignored.
                for signal in [libc::SIGHUP, libc::SIGTTIN, libc::SIGTTOU, libc::SIGUSR2] {
                    libc::signal(signal, libc::SIG_IGN);
                }
                // All move far up first (close-on-exec there), so that no
                // dup2 below can overwrite another's source, and a source
                // already at its target still loses close-on-exec (dup2 of
                // an fd onto itself would keep it).
                let mut high = [-1; 9];
                for i in 0..count {
                    high[i] = libc::fcntl(sources[i], libc::F_DUPFD_CLOEXEC, 100);
                    if high[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &fd) in high.iter().take(count).enumerate() {
                    if libc::dup2(fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = spawn_tied(command).expect("starting the worker");
        // Only the worker may hold the write end: the pipe's end is then
        // the worker's.
        drop(write_end);
        let pid = child.id() as i32;

        let channel = Arc::new((Mutex::new(Channel::default()), Condvar::new()));
        let reader = Arc::clone(&channel);
        std::thread::spawn(move || read_frames(std::fs::File::from(read_end), &reader));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("the worker's stderr");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Worker {
            child,
            pid,
            addrs,
            channel,
            stderr,
            _listeners: bound,
        }
    }

    /// The first listener's address (fd 3).
    fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Everything known, for a failure message.
    fn dump(&self) -> String {
        let channel = self.channel.0.lock().unwrap();
        let frames: Vec<String> = channel
            .frames
            .iter()
            .map(|f| format!("{} {:?}", kind_name(f.kind), f.text))
            .collect();
        format!(
            "frames: {frames:?}\nviolation: {:?}\nstderr:\n{}",
            channel.violation,
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for the first frame that matches, and returns it.
    fn wait_frame(&self, what: &str, matches: impl Fn(&Frame) -> bool) -> Frame {
        let (lock, changed) = &*self.channel;
        let deadline = Instant::now() + PATIENCE;
        let mut channel = lock.lock().unwrap();
        loop {
            if let Some(found) = channel.frames.iter().find(|f| matches(f)) {
                return found.clone();
            }
            let now = Instant::now();
            if channel.closed || channel.violation.is_some() || now >= deadline {
                drop(channel);
                panic!("no {what} frame\n{}", self.dump());
            }
            channel = changed.wait_timeout(channel, deadline - now).unwrap().0;
        }
    }

    /// The frames so far, as (kind, text), after checking that none broke
    /// the protocol.
    fn frames(&self) -> Vec<(u8, String)> {
        let channel = self.channel.0.lock().unwrap();
        if let Some(violation) = &channel.violation {
            panic!("{violation}");
        }
        channel.frames.iter().map(|f| (f.kind, f.text.clone())).collect()
    }

    /// The frames once the worker has closed the pipe (it exited).
    fn all_frames(&self) -> Vec<(u8, String)> {
        let (lock, changed) = &*self.channel;
        let deadline = Instant::now() + PATIENCE;
        let mut channel = lock.lock().unwrap();
        while !channel.closed && Instant::now() < deadline {
            channel = changed
                .wait_timeout(channel, deadline - Instant::now())
                .unwrap()
                .0;
        }
        assert!(channel.closed, "the worker still holds its channel open");
        drop(channel);
        self.frames()
    }

    fn wait_ready(&self) {
        self.wait_frame("Ready", |f| f.kind == READY);
        assert_eq!(self.frames()[0], (READY, String::new()), "Ready comes first");
    }

    /// Waits for the worker to exit, within PATIENCE.
    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until(PATIENCE, || {
            status = self.child.try_wait().expect("waiting for the worker");
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("the worker did not exit\n{}", self.dump()))
    }

    /// GET `path` on a thread; its answer and when it came.
    fn get_in_background(&self, path: &'static str) -> std::thread::JoinHandle<(Response, Instant)> {
        let addr = self.addr();
        std::thread::spawn(move || {
            let answer = get(addr, path).unwrap_or_else(|err| panic!("GET {path}: {err}"));
            (answer, Instant::now())
        })
    }

    /// Waits until the worker has closed its listener (fd 3) while it still
    /// holds its channel (fd 4): it stopped accepting before it exited.
    fn wait_listener_closed(&self) {
        let fd = |n: i32| std::path::Path::new(&format!("/proc/{}/fd/{n}", self.pid)).exists();
        assert!(
            wait_until(PATIENCE, || !fd(3) && fd(4)),
            "the worker did not close its listener before it exited\n{}",
            self.dump()
        );
    }

    /// Waits for the Busy frame of `GET path`.
    fn wait_busy(&self, path: &str) -> Frame {
        let line = format!("GET {path} HTTP/1.1 from 127.0.0.1:");
        self.wait_frame(&format!("Busy for GET {path}"), |f| {
            f.kind == BUSY && f.text.starts_with(&line)
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        send(self.pid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array it is given, which has
    // room for them; on success both are ours alone.
    let result = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(result, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened and nothing else owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        READY => "Ready",
        SUICIDE => "Suicide",
        BUSY => "Busy",
        IDLE => "Idle",
        _ => "unknown",
    }
}

/// Reads frames until the pipe ends, checking each as the master would:
/// version 1, a known kind, at most 240 bytes of UTF-8, empty for Ready and
/// Idle. The first violation ends the reading.
fn read_frames(mut pipe: std::fs::File, channel: &(Mutex<Channel>, Condvar)) {
    let (lock, changed) = channel;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = pipe.read(&mut chunk).unwrap_or(0);
        let mut state = lock.lock().unwrap();
        if n == 0 {
            if !buf.is_empty() && state.violation.is_none() {
                state.violation = Some(format!("the channel ended inside a frame: {buf:?}"));
            }
            state.closed = true;
            changed.notify_all();
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 4 && state.violation.is_none() {
            let (version, kind) = (buf[0], buf[1]);
            let len = u16::from_le_bytes([buf[2], buf[3]]) as usize;
            let violation = if version != 1 {
                Some(format!("version {version}, not 1"))
            } else if !(READY..=IDLE).contains(&kind) {
                Some(format!("unknown kind {kind}"))
            } else if len > 240 {
                Some(format!("a payload of {len} bytes, over 240"))
            } else {
                None
            };
            if let Some(violation) = violation {
                state.violation = Some(violation);
                break;
            }
            if buf.len() < 4 + len {
                break;
            }
            let payload: Vec<u8> = buf.drain(..4 + len).skip(4).collect();
            match String::from_utf8(payload) {
                Ok(text) if (kind == READY || kind == IDLE) && !text.is_empty() => {
                    state.violation = Some(format!("{} with a payload: {text:?}", kind_name(kind)));
                }
                Ok(text) => state.frames.push(Frame {
                    kind,
                    text,
                    at: Instant::now(),
                }),
                Err(err) => state.violation = Some(format!("a payload that is not UTF-8: {err}")),
            }
        }
        changed.notify_all();
    }
}

macro_rules! in_both_languages {
    ($($behaviour:ident),* $(,)?) => {$(
        mod $behaviour {
            #[test]
            fn node() {
                if super::Lang::Node.present(concat!(stringify!($behaviour), "::node")) {
                    super::$behaviour(super::Lang::Node);
                }
            }
            #[test]
            fn python() {
                if super::Lang::Python.present(concat!(stringify!($behaviour), "::python")) {
                    super::$behaviour(super::Lang::Python);
                }
            }
        }
    )*};
}

in_both_languages!(
    serves_with_ready_then_busy_and_idle_per_request,
    crash_answers_500_says_suicide_and_finishes_what_is_in_flight,
    sigterm_finishes_the_request_in_flight_then_exits_0,
    max_requests_says_suicide_after_its_share_then_exits_0,
    the_signals_that_steer_the_master_do_not_touch_the_worker,
    not_started_by_respawn_exits_3_and_says_so,
    a_long_busy_line_is_cut_to_240_bytes_on_a_character_boundary,
    serves_every_listener_handed_over,
    an_empty_frame_is_four_bytes,
    a_listener_that_is_not_a_socket_exits_3,
);

fn a_listener_that_is_not_a_socket_exits_3(lang: Lang) {
    let output = Command::new("sh")
        .args([
            "-c",
            r#"exec 3</dev/null; LISTEN_PID=$$ exec "$0" "$@""#,
            &lang.interpreter(),
        ])
        .arg(lang.example())
        .env("LISTEN_FDS", "1")
        .stdin(Stdio::null())
        .output()
        .expect("running the example");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(": listening on fd 3: "), "{stderr}");
}

fn serves_every_listener_handed_over(lang: Lang) {
    let mut worker = Worker::start_with(lang, 3, &[]);
    worker.wait_ready();
    for &addr in &worker.addrs {
        let answer = get(addr, "/").unwrap_or_else(|err| panic!("GET / on {addr}: {err}\n{}", worker.dump()));
        assert_eq!(
            answer.body,
            format!("handle by child {}\n", worker.pid),
            "on {addr}"
        );
    }
    // A throw on a connection of another listener is answered as well.
    let crashed = get(worker.addrs[2], "/crash").expect("GET /crash");
    assert_eq!(crashed.status, 500, "{crashed:?}");
    assert_eq!(worker.wait_exit().code(), Some(70), "{}", worker.dump());
}

fn serves_with_ready_then_busy_and_idle_per_request(lang: Lang) {
    let mut worker = Worker::start(lang, &[]);
    worker.wait_ready();

    for (i, path) in ["/", "/version", "/nope"].into_iter().enumerate() {
        let answer =
            get(worker.addr(), path).unwrap_or_else(|err| panic!("GET {path}: {err}\n{}", worker.dump()));
        match path {
            "/" => {
                assert_eq!(answer.status, 200);
                assert_eq!(answer.body, format!("handle by child {}\n", worker.pid));
            }
            "/version" => {
                assert_eq!(answer.status, 200);
                assert!(answer.body.starts_with("example "), "{answer:?}");
            }
            _ => assert_eq!(
                (answer.status, answer.body.as_str()),
                (404, "no route for /nope\n")
            ),
        }
        // The Idle of this request, before the next one starts (counted:
        // the last frame read may still be the previous request's Idle).
        wait_until(PATIENCE, || {
            worker.frames().iter().filter(|f| f.0 == IDLE).count() == i + 1
        });
    }
    let frames = worker.frames();
    let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
    assert_eq!(
        kinds,
        [READY, BUSY, IDLE, BUSY, IDLE, BUSY, IDLE],
        "{}",
        worker.dump()
    );
    let first = &frames[1].1;
    assert!(first.starts_with("GET / HTTP/1.1 from 127.0.0.1:"), "{first:?}");

    send(worker.pid, libc::SIGTERM);
    assert_eq!(worker.wait_exit().code(), Some(0), "{}", worker.dump());
}

fn crash_answers_500_says_suicide_and_finishes_what_is_in_flight(lang: Lang) {
    let mut worker = Worker::start(lang, &[]);
    worker.wait_ready();
    let sleeper = worker.get_in_background("/sleep/300");
    worker.wait_busy("/sleep/300");

    // Node serves it beside the sleep; Python after it, from the queue.
    let crashed = get(worker.addr(), "/crash").expect("GET /crash");
    if lang.concurrent() {
        worker.wait_listener_closed();
    }
    assert_eq!(crashed.status, 500, "{crashed:?}");
    assert_eq!(
        crashed.body,
        format!("worker {} panicked: crash requested by GET /crash\n", worker.pid)
    );
    let (slept, answered_at) = sleeper.join().expect("the GET /sleep/300 thread");
    assert_eq!(slept.status, 200, "{slept:?}");
    assert_eq!(slept.body, format!("slept 300 ms in child {}\n", worker.pid));

    assert_eq!(worker.wait_exit().code(), Some(70), "{}", worker.dump());
    let suicide = worker.wait_frame("Suicide", |f| f.kind == SUICIDE);
    assert!(
        suicide.text.contains("crash requested by GET /crash"),
        "{suicide:?}"
    );
    if lang.concurrent() {
        // The handover before the end of what was in flight: the master
        // can fork the replacement while the sleep still runs.
        assert!(suicide.at < answered_at, "Suicide came after the sleep's answer");
    }
    let frames = worker.all_frames();
    assert_eq!(frames.iter().filter(|f| f.0 == SUICIDE).count(), 1, "{frames:?}");
    assert_eq!(frames.last().map(|f| f.0), Some(IDLE), "{frames:?}");
}

fn sigterm_finishes_the_request_in_flight_then_exits_0(lang: Lang) {
    let mut worker = Worker::start(lang, &[]);
    worker.wait_ready();
    let sleeper = worker.get_in_background("/sleep/300");
    worker.wait_busy("/sleep/300");

    send(worker.pid, libc::SIGTERM);
    if lang.concurrent() {
        worker.wait_listener_closed();
    }
    let (slept, _) = sleeper.join().expect("the GET /sleep/300 thread");
    assert_eq!(slept.status, 200, "{slept:?}");
    assert_eq!(slept.body, format!("slept 300 ms in child {}\n", worker.pid));
    assert_eq!(worker.wait_exit().code(), Some(0), "{}", worker.dump());
    let kinds: Vec<u8> = worker.all_frames().iter().map(|f| f.0).collect();
    assert_eq!(kinds, [READY, BUSY, IDLE], "a stop is no suicide");
}

fn max_requests_says_suicide_after_its_share_then_exits_0(lang: Lang) {
    let mut worker = Worker::start(lang, &[("RESPAWN_MAX_REQUESTS", "2")]);
    worker.wait_ready();
    let first = get(worker.addr(), "/").expect("the first GET /");
    assert_eq!(first.status, 200);
    wait_until(PATIENCE, || worker.frames().last().is_some_and(|f| f.0 == IDLE));
    assert!(
        !worker.frames().iter().any(|f| f.0 == SUICIDE),
        "Suicide after 1 of 2 requests: {}",
        worker.dump()
    );
    let second = get(worker.addr(), "/").expect("the second GET /");
    assert_eq!(second.body, format!("handle by child {}\n", worker.pid));

    assert_eq!(worker.wait_exit().code(), Some(0), "{}", worker.dump());
    let frames = worker.all_frames();
    let suicides: Vec<&str> = frames
        .iter()
        .filter(|f| f.0 == SUICIDE)
        .map(|f| f.1.as_str())
        .collect();
    assert_eq!(suicides, ["served its 2 requests"]);
    assert_eq!(frames.iter().filter(|f| f.0 == BUSY).count(), 2, "{frames:?}");
}

fn the_signals_that_steer_the_master_do_not_touch_the_worker(lang: Lang) {
    let worker = Worker::start(lang, &[]);
    worker.wait_ready();
    // Sent to the worker as a shell's kill to the process group would.
    for signal in [libc::SIGHUP, libc::SIGTTIN, libc::SIGTTOU, libc::SIGUSR2] {
        send(worker.pid, signal);
    }
    // Signals are delivered before the worker runs again, so an answer
    // means it took them (a stopped worker would not answer at all).
    let answer = get(worker.addr(), "/").expect("GET / after the signals");
    assert_eq!(answer.body, format!("handle by child {}\n", worker.pid));
    assert!(alive(worker.pid), "{}", worker.dump());
}

fn not_started_by_respawn_exits_3_and_says_so(lang: Lang) {
    // No LISTEN_FDS; then LISTEN_FDS meant for another process (pid 1), as
    // a program the worker starts would see them if they were left set.
    for listen_pid in [None, Some("1")] {
        let mut command = Command::new(lang.interpreter());
        command
            .arg(lang.example())
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID");
        if let Some(pid) = listen_pid {
            command.env("LISTEN_FDS", "1").env("LISTEN_PID", pid);
        }
        let output = command
            .stdin(Stdio::null())
            .output()
            .expect("running the example");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{stderr}");
        assert!(
            stderr.contains("not started by respawn (no LISTEN_FDS for pid ")
                && stderr.contains("run it as: respawn -- "),
            "{stderr}"
        );
    }
}

fn a_long_busy_line_is_cut_to_240_bytes_on_a_character_boundary(lang: Lang) {
    // 1 + 2 * 200 bytes: cut at 240 would split the 120th 'é'; 239 does not.
    let text = format!("a{}", "é".repeat(200));
    let frame = frame_of(lang, BUSY, &text);
    assert_eq!(&frame[..4], [1, BUSY, 239, 0], "{frame:?}");
    assert_eq!(frame.len(), 4 + 239);
    let payload = std::str::from_utf8(&frame[4..]).expect("UTF-8");
    assert!(text.starts_with(payload));
}

fn an_empty_frame_is_four_bytes(lang: Lang) {
    assert_eq!(frame_of(lang, READY, ""), [1, READY, 0, 0]);
    assert_eq!(frame_of(lang, SUICIDE, "é"), [1, SUICIDE, 2, 0, 0xc3, 0xa9]);
}

/// The bytes of the frame the client's own `frame(kind, text)` makes.
fn frame_of(lang: Lang, kind: u8, text: &str) -> Vec<u8> {
    let (flag, script, module) = match lang {
        Lang::Node => (
            "-e",
            "process.stdout.write(require(process.argv[1]).frame(Number(process.argv[2]), process.argv[3]))",
            "clients/node/respawn.js",
        ),
        Lang::Python => (
            "-c",
            "import sys, importlib.util as u; s = u.spec_from_file_location('respawn', sys.argv[1]); \
             m = u.module_from_spec(s); s.loader.exec_module(m); \
             sys.stdout.buffer.write(m.frame(int(sys.argv[2]), sys.argv[3]))",
            "clients/python/respawn.py",
        ),
    };
    let mut command = Command::new(lang.interpreter());
    command.arg(flag).arg(script);
    if let Lang::Node = lang {
        command.arg("--");
    }
    let output = command
        .arg(workspace().join(module))
        .arg(kind.to_string())
        .arg(text)
        .output()
        .expect("running the client");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    output.stdout
}
