//! Listeners: Unix sockets, several at once, and sockets handed over open
//! (systemd's socket activation), down to a restart through a held socket
//! that refuses nothing.

use respawn_tests::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A socket path of this test's own, with nothing there yet, in a directory
/// removed at the end: a master the harness kills leaves its file behind.
fn socket_path(name: &str) -> SocketPath {
    let dir = TempDir::new(&format!("respawn-listeners-{name}"));
    let path = dir.join("http.sock");
    SocketPath { _dir: dir, path }
}

struct SocketPath {
    _dir: TempDir,
    path: PathBuf,
}

impl std::ops::Deref for SocketPath {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.path
    }
}

impl AsRef<Path> for SocketPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

fn unix_arg(path: &Path) -> String {
    format!("unix:{}", path.display())
}

/// Asserts that `answer` is `handle by child <pid>` from one of `workers`.
fn from_a_worker(answer: std::io::Result<Response>, workers: &std::collections::BTreeSet<i32>, what: &str) {
    let answer = answer.unwrap_or_else(|err| panic!("{what}: {err}"));
    assert_eq!(answer.status, 200, "{what}: {answer:?}");
    assert!(answer.body.starts_with("handle by child "), "{what}: {answer:?}");
    let pid = answer.pid().expect("a pid in the answer");
    assert!(workers.contains(&pid), "{what}: {pid} is not one of {workers:?}");
}

#[test]
fn a_unix_socket_listener_serves() {
    let path = socket_path("serves");
    let unix = unix_arg(&path);
    // The harness reads the address of the first `listening on` line: the
    // TCP one comes first, and this test speaks only to the Unix one.
    let respawn = Respawn::with_workers(1, &["--listen", "127.0.0.1:0", "--listen", &unix]);
    respawn.wait_for_line(&format!("listening on {unix}"));
    let meta = std::fs::symlink_metadata(&path).expect("the socket file");
    assert!(meta.file_type().is_socket(), "{meta:?}");
    let workers = respawn.workers();
    for round in 0..3 {
        from_a_worker(unix_get(&path, "/"), &workers, &format!("round {round}"));
    }
    // A Unix peer has no address: the scoreboard and the logs say `unix`.
    let answer = unix_get(&path, "/nothing-here").expect("an answer");
    assert_eq!(answer.status, 404, "{answer:?}");
}

#[test]
fn two_listeners_serve_at_once() {
    for workers in [1, 2] {
        let path = socket_path(&format!("two-{workers}"));
        let unix = unix_arg(&path);
        let respawn = Respawn::with_workers(workers, &["--listen", "127.0.0.1:0", "--listen", &unix]);
        let pids = respawn.workers();
        // Clients on both at the same time, several connections each: a
        // worker asleep on one listener only would leave the other's
        // clients waiting until PATIENCE runs out.
        let tcp_addr = respawn.addr;
        let tcp = std::thread::spawn(move || (0..10).map(|_| get(tcp_addr, "/")).collect::<Vec<_>>());
        let unix_path = path.clone();
        let over_unix =
            std::thread::spawn(move || (0..10).map(|_| unix_get(&unix_path, "/")).collect::<Vec<_>>());
        for (i, answer) in tcp.join().expect("TCP client").into_iter().enumerate() {
            from_a_worker(answer, &pids, &format!("{workers} workers, TCP {i}"));
        }
        for (i, answer) in over_unix.join().expect("Unix client").into_iter().enumerate() {
            from_a_worker(answer, &pids, &format!("{workers} workers, Unix {i}"));
        }
        // And one after the other, alternating.
        for i in 0..5 {
            from_a_worker(
                respawn.get("/"),
                &pids,
                &format!("{workers} workers, TCP again {i}"),
            );
            from_a_worker(
                unix_get(&path, "/"),
                &pids,
                &format!("{workers} workers, Unix again {i}"),
            );
        }
    }
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let path = socket_path("stale");
    // A socket file whose server is gone: connecting to it is refused.
    drop(UnixListener::bind(&path).expect("binding"));
    assert!(std::fs::symlink_metadata(&path).is_ok(), "the file stays behind");
    let unix = unix_arg(&path);
    let respawn = Respawn::with_workers(1, &["--listen", "127.0.0.1:0", "--listen", &unix]);
    respawn.wait_for_line(&format!(
        "replacing the stale socket file {}: nothing answers there",
        path.display()
    ));
    let workers = respawn.workers();
    from_a_worker(unix_get(&path, "/"), &workers, "over the replaced file");
}

#[test]
fn a_live_socket_file_is_not_replaced() {
    let path = socket_path("live");
    let unix = unix_arg(&path);
    let first = Respawn::with_workers(1, &["--listen", "127.0.0.1:0", "--listen", &unix]);
    let (status, output) = run_to_exit(&["--workers", "1", "--listen", &unix]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output.lines().next(),
        Some(format!("respawn: binding {unix}: a live server answers there").as_str()),
        "{output}"
    );
    // The first one still serves, on the same file.
    from_a_worker(unix_get(&path, "/"), &first.workers(), "the first respawn");

    // Nor is a file that is not a socket.
    let file = socket_path("not-a-socket");
    std::fs::write(&file, "precious").expect("writing a file");
    let (status, output) = run_to_exit(&["--workers", "1", "--listen", &unix_arg(&file)]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output.lines().next(),
        Some(
            format!(
                "respawn: binding {}: a file that is not a socket is there; not replacing it",
                unix_arg(&file)
            )
            .as_str()
        ),
        "{output}"
    );
    assert_eq!(std::fs::read_to_string(&file).expect("reading"), "precious");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_socket_file_is_removed_on_a_clean_stop() {
    let path = socket_path("removed");
    let unix = unix_arg(&path);
    let mut respawn = Respawn::with_workers(2, &["--listen", "127.0.0.1:0", "--listen", &unix]);
    assert!(std::fs::symlink_metadata(&path).is_ok(), "bound");
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "{} is still there after a clean stop",
        path.display()
    );
}

/// Someone removes the socket file (a cleaner sweeping /run, an operator's
/// rm): the workers still accept on the socket, but no client can reach it.
/// A HUP makes the file again, with the mode it had, as unicorn does
/// (test_socket_unlinked_restore): clients connect again, to the new
/// workers. The file made again is this master's, removed on a clean stop
/// like the first.
#[test]
fn hup_makes_a_removed_socket_file_again() {
    let path = socket_path("unlinked");
    let unix = unix_arg(&path);
    let mut respawn = Respawn::with_workers(
        2,
        &[
            "--listen",
            "127.0.0.1:0",
            "--listen",
            &unix,
            "--listen-mode",
            "0640",
        ],
    );
    let old = respawn.workers();
    from_a_worker(unix_get(&path, "/"), &old, "before");
    std::fs::remove_file(&path).expect("removing the socket file");
    assert!(
        unix_get(&path, "/").is_err(),
        "no client reaches a removed socket file"
    );
    respawn.signal(libc::SIGHUP);
    respawn.wait_for_log("the file made again", |l| {
        message(l).contains(&format!(
            "the socket file {} was gone; bound again, mode 0640",
            path.display()
        ))
    });
    let meta = std::fs::symlink_metadata(&path).expect("the socket file, made again");
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "the mode it had");
    respawn.wait_for_line("rolling restart done: every worker is new");
    let new = respawn.wait_for_workers(2);
    assert!(new.is_disjoint(&old), "{new:?} {old:?}");
    for round in 0..3 {
        from_a_worker(
            unix_get(&path, "/"),
            &new,
            &format!("after the HUP, round {round}"),
        );
    }
    // The TCP listener was never touched.
    from_a_worker(respawn.get("/"), &new, "TCP");
    respawn.signal(libc::SIGTERM);
    assert_eq!(respawn.wait_exit().code(), Some(0), "{}", respawn.dump());
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "{}, made again by the HUP, is still there after a clean stop",
        path.display()
    );
}

#[test]
fn listen_mode_sets_the_socket_files_permissions() {
    for (flags, mode) in [(&[][..], 0o660), (&["--listen-mode", "0600"][..], 0o600)] {
        let path = socket_path(&format!("mode-{mode:o}"));
        let unix = unix_arg(&path);
        let mut args = vec!["--listen", "127.0.0.1:0", "--listen", unix.as_str()];
        args.extend_from_slice(flags);
        let respawn = Respawn::with_workers(1, &args);
        let meta = std::fs::symlink_metadata(&path).expect("the socket file");
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{flags:?}");
        from_a_worker(unix_get(&path, "/"), &respawn.workers(), "root may connect");
    }
}

/// The log lines read so far, whether stderr has closed, and a way to wait
/// for more.
type Log = Arc<(Mutex<(Vec<String>, bool)>, Condvar)>;

/// A respawn started the way systemd starts a socket-activated service:
/// `listener` at fd 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES`, and `LISTEN_PID`
/// set to its own pid, which only the process itself can know: the test
/// execs it through `sh`, which sets `LISTEN_PID=$$` and execs the binary
/// in the same process. Its log is read on a thread; dropping it kills its
/// process group.
struct Activated {
    child: Child,
    pid: i32,
    log: Log,
}

impl Activated {
    fn start(listener: RawFd, name: &str, args: &[&str]) -> Activated {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
            .arg(binary())
            .args(args)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", name)
            .env("RUST_LOG", "debug")
            .env("RUST_LOG_STYLE", "never")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: dup2 and fcntl are async-signal-safe, as pre_exec
        // requires, and the closure touches nothing but its copy of an int.
        unsafe {
            command.pre_exec(move || {
                if listener != 3 && libc::dup2(listener, 3) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 clears close-on-exec on the copy, but not when the
                // socket was at fd 3 already.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = spawn_tied(command).expect("starting sh and the respawn binary");
        let log: Log = Arc::default();
        let stderr = child.stderr.take().expect("stderr is piped");
        let writer = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                writer.0.lock().unwrap().0.push(line);
                writer.1.notify_all();
            }
            writer.0.lock().unwrap().1 = true;
            writer.1.notify_all();
        });
        let pid = child.id() as i32;
        Activated { child, pid, log }
    }

    fn dump(&self) -> String {
        format!("--- respawn log ---\n{}", self.log.0.lock().unwrap().0.join("\n"))
    }

    /// Waits for a line that says exactly `message`.
    fn wait_for_line(&self, message: &str) {
        let deadline = Instant::now() + PATIENCE;
        let mut guard = self.log.0.lock().unwrap();
        loop {
            if guard.0.iter().any(|l| says(l, message)) {
                return;
            }
            let now = Instant::now();
            if now >= deadline || guard.1 {
                drop(guard);
                panic!("no line {message:?} within {PATIENCE:?}\n{}", self.dump());
            }
            guard = self.log.1.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    /// Waits until `n` workers have said they are ready; returns their pids.
    fn wait_for_workers(&self, n: usize) -> Vec<i32> {
        let mut ready = Vec::new();
        let settled = wait_until(PATIENCE, || {
            let lines = self.log.0.lock().unwrap().0.clone();
            ready = children(self.pid)
                .into_iter()
                .filter(|&(pid, state)| {
                    state != 'Z' && lines.iter().any(|l| worker_says(l, "ready") == Some(pid))
                })
                .map(|(pid, _)| pid)
                .collect();
            ready.len() == n
        });
        assert!(
            settled,
            "expected {n} ready workers, found {ready:?}\n{}",
            self.dump()
        );
        ready
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until(PATIENCE, || {
            status = self.child.try_wait().expect("waiting for respawn");
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("respawn did not exit within {PATIENCE:?}\n{}", self.dump()))
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        send(-self.pid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A `--listen` that cannot be bound: a respawn that serves did not use it.
const UNUSABLE: &str = "unix:/nonexistent-directory/respawn.sock";

#[test]
fn socket_activation_uses_the_inherited_listener() {
    let held = TcpListener::bind("127.0.0.1:0").expect("binding the socket systemd would hold");
    let addr = held.local_addr().expect("its address");
    let respawn = Activated::start(held.as_raw_fd(), "web", &["--workers", "2", "--listen", UNUSABLE]);
    respawn.wait_for_line(&format!(
        "listening on {addr} (fd 3, passed by systemd as \"web\")"
    ));
    // The --listen given is not bound, and that is said.
    respawn.wait_for_line(&format!(
        "--listen {UNUSABLE} not bound: systemd passed the listeners (LISTEN_FDS), and those are served"
    ));
    let workers: std::collections::BTreeSet<i32> = respawn.wait_for_workers(2).into_iter().collect();
    for round in 0..4 {
        from_a_worker(get(addr, "/"), &workers, &format!("round {round}"));
    }
}

#[test]
fn workers_do_not_see_listen_variables() {
    let held = TcpListener::bind("127.0.0.1:0").expect("binding");
    let respawn = Activated::start(held.as_raw_fd(), "web", &["--workers", "2", "--listen", UNUSABLE]);
    let workers = respawn.wait_for_workers(2);
    for pid in workers.iter().copied().chain([respawn.pid]) {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("reading environ");
        let vars: Vec<String> = environ
            .split(|&b| b == 0)
            .map(|var| String::from_utf8_lossy(var).into_owned())
            .filter(|var| var.starts_with("LISTEN_"))
            .collect();
        assert!(
            vars.is_empty(),
            "process {pid} shows {vars:?}\n{}",
            respawn.dump()
        );
        // The rest of the environment is untouched.
        assert!(
            environ.split(|&b| b == 0).any(|var| var == b"RUST_LOG=debug"),
            "process {pid}"
        );
    }
}

/// Clients that GET / in a loop on fresh connections until told to stop,
/// noting every failure and the longest wait for an answer.
struct Clients {
    done: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(usize, Vec<String>, Duration)>>,
    answered: Arc<AtomicUsize>,
}

impl Clients {
    fn start(addr: SocketAddr, count: usize) -> Clients {
        let done = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let threads = (0..count)
            .map(|_| {
                let (done, answered) = (Arc::clone(&done), Arc::clone(&answered));
                std::thread::spawn(move || {
                    let (mut ok, mut failed, mut longest) = (0, Vec::new(), Duration::ZERO);
                    while !done.load(Ordering::SeqCst) {
                        let start = Instant::now();
                        match get(addr, "/") {
                            Ok(answer) if answer.status == 200 => {
                                ok += 1;
                                answered.fetch_add(1, Ordering::SeqCst);
                            }
                            other => failed.push(format!("{other:?}")),
                        }
                        longest = longest.max(start.elapsed());
                    }
                    (ok, failed, longest)
                })
            })
            .collect();
        Clients {
            done,
            threads,
            answered,
        }
    }

    /// Waits until `more` answers beyond those so far have come.
    fn wait_for_answers(&self, more: usize) {
        let target = self.answered.load(Ordering::SeqCst) + more;
        let came = wait_until(PATIENCE, || self.answered.load(Ordering::SeqCst) >= target);
        assert!(came, "fewer than {more} answers within {PATIENCE:?}");
    }

    fn stop(self) -> (usize, Vec<String>, Duration) {
        self.done.store(true, Ordering::SeqCst);
        let (mut ok, mut failed, mut longest) = (0, Vec::new(), Duration::ZERO);
        for thread in self.threads {
            let (o, f, l) = thread.join().expect("client thread");
            ok += o;
            failed.extend(f);
            longest = longest.max(l);
        }
        (ok, failed, longest)
    }
}

#[test]
fn a_restart_through_the_held_socket_refuses_nothing() {
    // The test holds the socket, as systemd does for a socket unit: it
    // stays open (and listening) while one respawn stops and the next
    // starts, so connections made in between wait in its queue.
    let held = TcpListener::bind("127.0.0.1:0").expect("binding the held socket");
    let addr = held.local_addr().expect("its address");
    let args = ["--workers", "2", "--listen", UNUSABLE];
    let mut first = Activated::start(held.as_raw_fd(), "web", &args);
    first.wait_for_workers(2);
    let clients = Clients::start(addr, 4);
    clients.wait_for_answers(50);

    let restart = Instant::now();
    send(first.pid, libc::SIGTERM);
    assert_eq!(first.wait_exit().code(), Some(0), "{}", first.dump());
    let second = Activated::start(held.as_raw_fd(), "web", &args);
    second.wait_for_workers(2);
    let restarted_in = restart.elapsed();
    clients.wait_for_answers(50);

    let (ok, failed, longest) = clients.stop();
    eprintln!(
        "restart through the held socket: {ok} requests answered, {} failed, \
         the longest wait {longest:?}, TERM to the new workers ready in {restarted_in:?}",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        second.dump()
    );
    assert!(ok >= 100, "{ok}");
}

/// How many times `pid` has gone to sleep (voluntary context switches):
/// for an idle worker, how many times it was woken since.
fn sleeps(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Is `pid` asleep waiting for a connection (in epoll_wait or accept)?
fn waiting(pid: i32) -> bool {
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let number: Option<libc::c_long> = syscall.split(' ').next().and_then(|n| n.trim().parse().ok());
    number.is_some_and(|n| {
        [
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_accept4,
            libc::SYS_accept,
        ]
        .contains(&n)
    })
}

/// GET / with the whole request in one write, so that the worker finds it
/// all there when it accepts (TCP_DEFER_ACCEPT): a request written in
/// pieces could make it sleep in read, a wakeup that is not the herd's.
fn get_in_one_write(addr: SocketAddr) -> std::io::Result<Response> {
    let mut conn = std::net::TcpStream::connect_timeout(&addr, PATIENCE)?;
    conn.set_read_timeout(Some(PATIENCE))?;
    conn.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200 ") => Ok(Response {
            status: 200,
            body: body.to_owned(),
        }),
        _ => Err(std::io::Error::other(format!("not a 200: {answer:?}"))),
    }
}

#[test]
fn several_listeners_wake_one_idle_worker_per_connection() {
    let path = socket_path("herd");
    let unix = unix_arg(&path);
    let respawn = Respawn::with_workers(4, &["--listen", "127.0.0.1:0", "--listen", &unix]);
    let workers = respawn.workers();
    let idle = || {
        let all = wait_until(PATIENCE, || workers.iter().all(|&pid| waiting(pid)));
        assert!(
            all,
            "workers not all waiting for a connection\n{}",
            respawn.dump()
        );
    };
    idle();
    let before: u64 = workers.iter().map(|&pid| sleeps(pid)).sum();
    let rounds = 50;
    for round in 0..rounds {
        from_a_worker(
            get_in_one_write(respawn.addr),
            &workers,
            &format!("round {round}"),
        );
        idle();
    }
    let woken = workers.iter().map(|&pid| sleeps(pid)).sum::<u64>() - before;
    // One per connection (50) on a quiet host; a busy one (the other tests)
    // adds a few. poll(2) on the listeners wakes all 4 idle workers for
    // each: 200 or more, as does an epoll without EPOLLEXCLUSIVE.
    assert!(
        woken < rounds * 2,
        "{woken} wakeups of 4 idle workers for {rounds} connections"
    );
}
