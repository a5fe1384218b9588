//! Bad input at the command line gets one clear line that names the flag
//! and its range, a failing exit code, and forks nothing; failures to bind
//! say what to do; the help fits a terminal; a failed write to stdout or
//! stderr ends in the documented exit code, never a panic.

use respawn_tests::*;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};

/// The first line of the output, which for a bad flag is the one that says
/// what is wrong (where the flags are listed follows).
fn first_line(output: &str) -> &str {
    output.lines().next().unwrap_or_default()
}

/// The line after a bad flag's.
const WHERE_THE_FLAGS_ARE: &str = "'respawn --help' lists the common flags, 'respawn --help-all' every one";

#[test]
fn every_flag_out_of_range_exits_2_naming_the_flag_and_its_range() {
    for (args, line) in [
        (
            &["--workers", "0"][..],
            r#"--workers: "0" is not a whole number from 1 to 4096"#,
        ),
        (
            &["-w", "4097"][..],
            r#"--workers: "4097" is not a whole number from 1 to 4096"#,
        ),
        (
            &["--max-restarts", "1000000000000"][..],
            r#"--max-restarts: "1000000000000" is not a whole number from 0 to 10000"#,
        ),
        (
            &["--max-requests", "1000000000001"][..],
            r#"--max-requests: "1000000000001" is not a whole number from 0 to 10^12"#,
        ),
        (
            &["--max-requests-jitter", "18446744073709551615"][..],
            r#"--max-requests-jitter: "18446744073709551615" is not a whole number from 0 to 10^12"#,
        ),
        (
            &["--graceful-timeout", "1e19"][..],
            r#"--graceful-timeout: "1e19" is not a number of seconds from 0 to 86400"#,
        ),
        (
            &["--graceful-timeout", "-3"][..],
            r#"--graceful-timeout: "-3" is not a number of seconds from 0 to 86400"#,
        ),
        (
            &["-t", "86401"][..],
            r#"--timeout: "86401" is not a number of seconds from 0 to 86400"#,
        ),
        (
            &["--start-timeout", "inf"][..],
            r#"--start-timeout: "inf" is not a number of seconds from 0 to 86400"#,
        ),
        (
            &["--restart-window", "604801"][..],
            r#"--restart-window: "604801" is not a number of seconds from 0 to 604800"#,
        ),
        (
            &["--min-uptime", "NaN"][..],
            r#"--min-uptime: "NaN" is not a number of seconds from 0 to 86400"#,
        ),
    ] {
        let (status, output) = run_to_exit(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        // The line that says what is wrong, and one that says where the
        // flags are: not a usage that buries it.
        assert_eq!(
            output,
            format!("respawn: {line}\n{WHERE_THE_FLAGS_ARE}\n"),
            "{args:?}"
        );
    }
}

#[test]
fn a_value_that_does_not_parse_names_its_flag() {
    let (status, output) = run_to_exit(&["--workers", "abc"]);
    assert_eq!(status.code(), Some(2), "{output}");
    assert_eq!(
        first_line(&output),
        r#"respawn: --workers: "abc" is not a whole number from 1 to 4096"#
    );
    let (status, output) = run_to_exit(&["--timeout", "soon"]);
    assert_eq!(status.code(), Some(2), "{output}");
    assert_eq!(
        first_line(&output),
        r#"respawn: --timeout: "soon" is not a number of seconds from 0 to 86400"#
    );
    for (args, expected) in [
        (&["--bogus"][..], "respawn: --bogus: no such flag"),
        (
            &["--workers"][..],
            "respawn: --workers needs a value: -w, --workers N, 1 to 4096",
        ),
        (
            &["--demo-fail-start", "--demo-hang-start"][..],
            "respawn: --demo-fail-start, --demo-hang-start and --demo-bad-ipc exclude each other: pick one",
        ),
    ] {
        let (status, output) = run_to_exit(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        assert_eq!(first_line(&output), expected, "{args:?}");
    }
}

/// Given one path, the file made last would replace the other: the pid
/// file was written over the control socket.
#[test]
fn one_path_for_the_control_socket_the_pid_file_or_a_unix_listener_is_a_bad_flag() {
    let dir = TempDir::new("respawn-cli-one-path");
    let path = dir.join("x").display().to_string();
    let dotted = dir.join(".").join("x").display().to_string();
    let unix = format!("unix:{path}");
    for (args, expected) in [
        (
            vec!["--control", &path, "--pid-file", &path],
            format!("respawn: --control {path:?} and --pid-file {path:?} name the same file"),
        ),
        (
            vec!["--pid-file", &dotted, "--listen", &unix],
            format!("respawn: --pid-file {dotted:?} and --listen {unix:?} name the same file"),
        ),
    ] {
        let (status, output) = run_to_exit(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        assert_eq!(
            first_line(&output),
            format!("{expected}: give each a path of its own"),
            "{args:?}"
        );
        assert!(!output.contains("spawned"), "{args:?}: {output}");
        let made: Vec<_> = std::fs::read_dir(&*dir).unwrap().collect();
        assert!(made.is_empty(), "{args:?}: files made {made:?}");
    }
}

/// Misuse is said, not silent: `respawn --` with no command served the demo
/// on 8080; `--ready-on-exec` with `--timeout` or `--max-requests` ran, with
/// both silently doing nothing.
#[test]
fn a_command_line_that_cannot_do_what_it_says_is_a_bad_flag() {
    for (args, expected) in [
        (
            vec!["--"],
            "respawn: --: no command after it (respawn [flags] -- CMD [ARGS...])",
        ),
        (
            vec!["--ready-on-exec", "--timeout", "5", "--", "true"],
            "respawn: --timeout cannot work with --ready-on-exec: the program sends no Busy marks, \
             so no request is seen to hang (give --timeout 0, or make the program speak the channel: \
             docs/protocol.md)",
        ),
        (
            vec!["--ready-on-exec", "--min-uptime", "0", "--", "true"],
            "respawn: --min-uptime 0 cannot work with --ready-on-exec: a worker is Ready at its exec, \
             so only its uptime tells one that cannot start (give --min-uptime 1 or more)",
        ),
        (
            vec!["--ready-on-exec", "--max-requests", "100", "--", "true"],
            "respawn: --max-requests cannot work with --ready-on-exec: the program sends no Suicide \
             to hand over after its share (make it speak the channel: docs/protocol.md)",
        ),
    ] {
        let (status, output) = run_to_exit(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        assert_eq!(first_line(&output), expected, "{args:?}");
        assert!(!output.contains("spawned"), "{args:?}: {output}");
    }
    // --timeout 0 says there is no timeout: nothing that cannot work.
    let (status, output) = run_to_exit(&["--ready-on-exec", "--timeout", "0", "--", "no-such-program-here"]);
    assert_eq!(status.code(), Some(1), "{output}");
}

/// A bare name is looked up in PATH, as a shell does: when it is not
/// there, the line says where it was looked for, and how to name a program
/// elsewhere (it said only "no such file or directory").
#[test]
fn a_program_not_found_in_path_says_where_it_was_looked_for() {
    let mut command = Command::new(binary());
    command
        .args(["--", "no-such-program-here"])
        .env("PATH", "/usr/bin:/bin");
    let (status, output) = run_command_to_exit(command);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output,
        "respawn: -- no-such-program-here: no such file or directory in any directory of \
         PATH (/usr/bin:/bin); give a path for a program elsewhere (./no-such-program-here)\n"
    );
    // A path is not looked up: the file alone is named.
    let (status, output) = run_to_exit(&["--", "./no-such-program-here"]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output,
        "respawn: -- ./no-such-program-here: no such file or directory\n"
    );
}

/// A start refused for a pid file held by a live master says so, and
/// nothing else: it first said `listening on 127.0.0.1:<port>` (the demo
/// binds, and logs the line, before the library claims the pid file).
/// Ignored until the `listening on` lines are said after the claim, in
/// `Master::new` (master.rs, the lead's).
#[test]
fn a_held_pid_file_is_refused_before_any_listening_line() {
    let dir = TempDir::new("respawn-cli-held-pid-file");
    let pid_file = dir.join("respawn.pid").display().to_string();
    let first = Respawn::with_workers(1, &["--pid-file", &pid_file]);
    assert!(
        wait_until(PATIENCE, || std::fs::read_to_string(&pid_file)
            .is_ok_and(|text| text.trim() == first.pid.to_string())),
        "{}",
        first.dump()
    );
    let (status, output) = run_to_exit(&[
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--pid-file",
        &pid_file,
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output,
        format!(
            "respawn: pid file {pid_file}: held by running master {}\n",
            first.pid
        )
    );
}

#[test]
fn a_malformed_listen_is_a_bad_flag() {
    for bad in ["nonsense", "1.2.3.4", "1.2.3.4:65536", "::1:80"] {
        let (status, output) = run_to_exit(&["--listen", bad]);
        assert_eq!(status.code(), Some(2), "{bad}: {output}");
        assert_eq!(
            first_line(&output),
            format!(
                "respawn: --listen: {bad:?} is not HOST:PORT with a port from 0 to 65535 \
                 (127.0.0.1:8080, [::1]:8080, localhost:8080)"
            )
        );
    }
    // A name that does not resolve is well formed: it fails at bind time
    // (exit 1), as DNS may be back on the next try.
    let (status, output) = run_to_exit(&["--listen", "no-such-host.invalid:80"]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.starts_with("respawn: resolving no-such-host.invalid:80: "),
        "{output}"
    );
    // And a name that resolves is served on.
    let respawn = Respawn::start(&["--workers", "1", "--listen", "localhost:0"]);
    assert!(respawn.addr.ip().is_loopback(), "{}", respawn.addr);
    respawn.wait_for_workers(1);
    assert_eq!(respawn.get("/").unwrap().status, 200);
}

#[test]
fn a_busy_port_says_to_choose_another_with_listen() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let (status, output) = run_to_exit(&["--workers", "2", "--listen", &addr.to_string()]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output,
        format!(
            "respawn: binding {addr}: address already in use; is another respawn running? \
             choose another port with --listen (under make: make run ARGS='--listen 127.0.0.1:{}')\n",
            addr.port() + 1
        )
    );

    // An address this host does not have.
    let (status, output) = run_to_exit(&["--listen", "192.0.2.1:0"]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output,
        "respawn: binding 192.0.2.1:0: cannot assign requested address\n"
    );
}

/// The copy of the binary that user nobody runs, removed even if the test
/// fails. (nobody may not reach the build tree: a clone under /root, say.)
struct NobodysCopy(std::path::PathBuf);

impl NobodysCopy {
    fn new() -> NobodysCopy {
        let dir = std::env::temp_dir().join(format!("respawn-permission-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A link where it can be (see privileges.rs: a fresh copy can be
        // "text file busy" while another test thread forks).
        if std::fs::hard_link(binary(), dir.join("respawn")).is_err() {
            std::fs::copy(binary(), dir.join("respawn")).unwrap();
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        NobodysCopy(dir)
    }
}

impl Drop for NobodysCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes `command` run as nobody (uid and gid 65534), in a network
/// namespace of its own if `new_netns`: there the low-port bound is the
/// kernel's default, 1024, whatever the host (or container) set.
fn as_nobody(command: &mut Command, new_netns: bool) {
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls (unshare, setgroups, setgid,
    // setuid), touching no lock or allocation. It does the uid change itself
    // because std's uid() would come before it, and unshare needs root.
    unsafe {
        command.pre_exec(move || {
            if new_netns && libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

#[test]
fn a_privileged_port_says_what_would_allow_it() {
    const TEST: &str = "a_privileged_port_says_what_would_allow_it";
    // It runs respawn as uid 65534, which takes root.
    if !require(TEST, Need::Root) {
        return;
    }
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    // Ports from `start` up need no privilege. If every port does (Docker
    // sets the bound to 0), use a network namespace of our own, where it is
    // 1024 again.
    let new_netns = start <= 1;
    let port = if new_netns { 80 } else { (start - 1).min(80) };
    if new_netns {
        let mut probe = Command::new("/bin/true");
        as_nobody(&mut probe, true);
        if let Err(err) = probe.status() {
            skip(
                TEST,
                Skip::Environment,
                &format!(
                    "every port is unprivileged here (ip_unprivileged_port_start = {start}) \
                     and no network namespace can be made ({err})"
                ),
            );
            return;
        }
    }
    let copy = NobodysCopy::new();
    let binary = copy.0.join("respawn");
    let mut command = Command::new(&binary);
    as_nobody(&mut command, new_netns);
    let listen = format!("127.0.0.1:{port}");
    command.args(["--listen", &listen]);
    let (status, output) = run_command_to_exit(command);
    assert_eq!(status.code(), Some(1), "{output}");
    let bound = if new_netns { 1024 } else { start };
    assert_eq!(
        output,
        format!(
            "respawn: binding {listen}: permission denied; ports below {bound} need privilege: \
             run as root, or give the binary the capability (setcap cap_net_bind_service=+ep {}), \
             or lower the bound (sysctl net.ipv4.ip_unprivileged_port_start={port})\n",
            binary.display()
        )
    );
}

#[test]
fn help_and_version_exit_zero() {
    let (status, output) = run_to_exit(&["--help"]);
    assert_eq!(status.code(), Some(0));
    assert!(output.contains("--graceful-timeout"), "{output}");
    let (status, output) = run_to_exit(&["-V"]);
    assert_eq!(status.code(), Some(0));
    assert!(output.starts_with("respawn "), "{output}");
}

/// unicorn's own test holds its help to 24 lines of 80 columns: the common
/// flags, with their ranges, and where the rest are. `--help-all` has
/// every flag, each with its range.
#[test]
fn help_fits_80_columns_and_24_lines_with_every_range() {
    let (status, help) = run_to_exit(&["--help"]);
    assert_eq!(status.code(), Some(0), "{help}");
    let (status, all) = run_to_exit(&["--help-all"]);
    assert_eq!(status.code(), Some(0), "{all}");
    let lines: Vec<&str> = help.lines().collect();
    assert!(lines.len() <= 24, "{} lines:\n{help}", lines.len());
    for line in help.lines().chain(all.lines()) {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line:?}",
            line.chars().count()
        );
        assert!(
            !line.contains('\t'),
            "a tab's width depends on the terminal: {line:?}"
        );
    }
    // Each flag's line: the descriptions start in one column, and every flag
    // that takes a value states its range there.
    // Indented by 2 (`-w, --workers`) or 6 (`--graceful-timeout`): the
    // lines a description wraps onto start further right.
    let flag_lines = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.len() - l.trim_start().len() <= 6 && l.trim_start().starts_with('-'))
            .map(str::to_owned)
            .collect()
    };
    let (common, every) = (flag_lines(&help), flag_lines(&all));
    for flags in [&common, &every] {
        let columns: std::collections::BTreeSet<_> = flags.iter().map(|l| description_column(l)).collect();
        assert_eq!(
            columns.len(),
            1,
            "descriptions not aligned:\n{}",
            flags.join("\n")
        );
    }
    let find = |flags: &[String], flag: &str| {
        flags
            .iter()
            .find(|l| l.contains(&format!(" {flag} ")))
            .cloned()
            .unwrap_or_else(|| panic!("{flag} is not in:\n{}", flags.join("\n")))
    };
    for flag in [
        "--workers N",
        "--listen ADDR",
        "--graceful-timeout SECS",
        "--timeout SECS",
        "--max-requests N",
    ] {
        assert!(find(&common, flag).contains(" to "), "{flag} states no range");
        assert!(find(&every, flag).contains(" to "), "{flag} states no range");
    }
    for flag in [
        "--start-timeout SECS",
        "--max-requests-jitter J",
        "--max-restarts R",
        "--restart-window SECS",
        "--min-uptime SECS",
        "--listen-mode OCTAL",
    ] {
        assert!(find(&every, flag).contains(" to "), "{flag} states no range");
    }
    for switch in ["--help", "--help-all", "--version"] {
        assert!(help.contains(switch), "{switch} is not in the help:\n{help}");
    }
    for switch in [
        "--demo-fail-start",
        "--demo-hang-start",
        "--demo-bad-ipc",
        "--ready-on-exec",
        "--ready-on-notify",
        "--man",
    ] {
        assert!(all.contains(switch), "{switch} is not in --help-all:\n{all}");
    }
}

/// Where the description starts in a flag's line of the help: after the
/// flag and the run of spaces (two or more) that follows it.
fn description_column(line: &str) -> Option<usize> {
    let flag = line.len() - line.trim_start().len();
    let gap = flag + line[flag..].find("  ")?;
    Some(line.len() - line[gap..].trim_start().len())
}

/// Runs the binary with stdout or stderr on /dev/full (the other piped
/// away), to its exit or [`PATIENCE`]; the exit status.
fn run_with_full(args: &[&str], full_stdout: bool) -> ExitStatus {
    let full = || std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let (stdout, stderr) = if full_stdout {
        (Stdio::from(full()), Stdio::null())
    } else {
        (Stdio::null(), Stdio::from(full()))
    };
    let mut child = Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .expect("starting the respawn binary");
    let mut status = None;
    wait_until(PATIENCE, || {
        status = child.try_wait().expect("waiting for respawn");
        status.is_some()
    });
    send(-(child.id() as i32), libc::SIGKILL);
    status.unwrap_or_else(|| panic!("respawn {args:?} did not exit within {PATIENCE:?}"))
}

#[test]
fn a_failed_write_ends_in_the_documented_exit_code_not_a_panic() {
    // Nothing can be printed, so the help "fails" (1); never 101.
    assert_eq!(run_with_full(&["--help"], true).code(), Some(1));
    assert_eq!(run_with_full(&["--version"], true).code(), Some(1));
    // A bad flag is a bad flag (2), even when saying so fails.
    assert_eq!(run_with_full(&["--workers", "abc"], false).code(), Some(2));
    assert_eq!(run_with_full(&["--bogus"], false).code(), Some(2));
}

#[test]
fn malformed_requests_get_400_and_the_worker_serves_on() {
    let respawn = Respawn::with_workers(1, &[]);
    let worker = *respawn.wait_for_workers(1).iter().next().unwrap();
    let answer = exchange(respawn.addr, b"\x16\x03\x01 not http\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    let answer = exchange(respawn.addr, b"GET /sleep/99999999 HTTP/1.1\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    let answer = exchange(respawn.addr, b"GET /nowhere HTTP/1.1\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer:?}");
    // More than the worker reads: it answers, then reads the rest before it
    // closes, so that its close does not reset the connection and take the
    // answer with it.
    let answer = exchange(respawn.addr, &[b'a'; 9000]).expect("the 431 answer, not a reset");
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer:?}"
    );
    // Bad requests are the client's fault: the same worker still serves.
    let answer = respawn.get("/").unwrap();
    assert_eq!(answer.pid(), Some(worker));
    assert_eq!(respawn.count_log("spawned"), 1);
}

#[test]
fn a_worker_that_hangs_before_ready_is_killed_and_the_master_gives_up() {
    // One slot, a 1 s start deadline, give up after more than 2 restarts:
    // the 3rd worker killed for not starting is one too many.
    let mut respawn = Respawn::start(&[
        "--workers",
        "1",
        "--demo-hang-start",
        "--start-timeout",
        "1",
        "--max-restarts",
        "2",
        "--graceful-timeout",
        "1",
    ]);
    let started = std::time::Instant::now();
    let status = respawn.wait_exit();
    let took = started.elapsed();
    assert_eq!(status.code(), Some(3), "{}", respawn.dump());
    let log = respawn.log();
    let hung: Vec<i32> = log
        .iter()
        .filter(|l| l.ends_with(" hangs before Ready on purpose (--demo-hang-start)"))
        .filter_map(|l| worker_pid(l))
        .collect();
    assert!(hung.len() >= 3, "{}", respawn.dump());
    for pid in &hung {
        assert!(
            !alive(*pid),
            "worker {pid} outlived the master\n{}",
            respawn.dump()
        );
    }
    // Each of the first three was killed by the deadline, not by anything
    // else: SIGKILL, at least 1 s after its fork, so giving up took 3 s.
    for pid in &hung[..3] {
        let deadline = format!("] worker {pid} did not say ready within 1 s; killing it");
        // The third one's exit is told in the giving-up line.
        let exit = format!("worker {pid} exited (signal 9) 1.");
        assert!(
            log.iter().any(|l| l.ends_with(&deadline)) && log.iter().any(|l| l.contains(&exit)),
            "no {deadline:?} or {exit:?}\n{}",
            respawn.dump()
        );
    }
    assert!(
        took >= std::time::Duration::from_secs(3),
        "gave up after {took:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("] giving up: 3 restarts in ")),
        "{}",
        respawn.dump()
    );
}
