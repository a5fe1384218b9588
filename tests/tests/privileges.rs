//! `--user` and `--group`: the master stays root, each worker drops to the
//! user before it says Ready, for good; a name that does not exist, or a
//! master that cannot switch, stops the master at start with one line.

use respawn_tests::*;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// The uid and gid the tests expect of user nobody.
const NOBODY: u32 = 65534;
/// linux/capability.h; the libc crate does not have it.
const CAP_SETUID: libc::c_ulong = 7;

/// Root and a user nobody of uid and gid 65534, or a skip (CI has both)
/// and false.
fn root_and_nobody(test: &str) -> bool {
    require(test, Need::Root) && require(test, Need::Nobody)
}

/// A line of /proc/PID/status, without its name: `Uid:\t0\t0\t0\t0` gives
/// `0\t0\t0\t0`.
fn status(pid: i32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

#[test]
fn user_nobody_gives_workers_uid_and_gid_65534_for_good() {
    if !root_and_nobody("user_nobody_gives_workers_uid_and_gid_65534_for_good") {
        return;
    }
    // The master gets supplementary groups (root's own, and adm), which the
    // workers must not keep.
    let respawn = Respawn::start_with(&["--workers", "2", "--user", "nobody"], |command| {
        // SAFETY: setgroups is async-signal-safe; the closure reads only
        // its own array.
        unsafe {
            command.pre_exec(|| {
                let groups: [libc::gid_t; 2] = [0, 4];
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    assert_eq!(status(respawn.pid, "Groups"), "0 4");
    let workers = respawn.wait_for_workers(2);
    for &worker in &workers {
        // Real, effective, saved and file-system ids: with a saved uid of 0
        // the worker could switch back.
        assert_eq!(status(worker, "Uid"), "65534\t65534\t65534\t65534", "{worker}");
        assert_eq!(status(worker, "Gid"), "65534\t65534\t65534\t65534", "{worker}");
        let groups = status(worker, "Groups");
        assert!(
            groups.is_empty() || groups == "65534",
            "root's groups kept: {groups:?}"
        );
        // No capability left, not even one it could raise again.
        assert_eq!(status(worker, "CapEff"), "0000000000000000", "{worker}");
        assert_eq!(status(worker, "CapPrm"), "0000000000000000", "{worker}");
    }
    // The master keeps root: it signals and reaps workers of another uid.
    assert_eq!(status(respawn.pid, "Uid"), "0\t0\t0\t0");
    let answer = respawn.get("/").expect("GET / answers");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        answer.pid().is_some_and(|pid| workers.contains(&pid)),
        "{answer:?} from one of {workers:?}"
    );
}

#[test]
fn a_worker_run_as_nobody_still_dies_with_its_master() {
    // A change of uid clears PR_SET_PDEATHSIG: the worker must ask for it
    // after the drop, or it outlives a killed master, serving unsupervised.
    if !root_and_nobody("a_worker_run_as_nobody_still_dies_with_its_master") {
        return;
    }
    let respawn = Respawn::with_workers(2, &["--user", "nobody"]);
    let workers = respawn.wait_for_workers(2);
    send(respawn.pid, libc::SIGKILL);
    let gone = wait_until(PATIENCE, || workers.iter().all(|&pid| !alive(pid)));
    assert!(
        gone,
        "workers {workers:?} outlived their master\n{}",
        respawn.dump()
    );
}

#[test]
fn a_worker_run_as_nobody_writes_its_log_without_blocking() {
    // The worker opens its own non-blocking way to stderr through
    // /proc/self/fd/2; as nobody it could not reopen root's pipe, and would
    // fall back to writes that block when nobody reads the log.
    if !root_and_nobody("a_worker_run_as_nobody_writes_its_log_without_blocking") {
        return;
    }
    let respawn = Respawn::with_workers(1, &["--user", "nobody"]);
    let worker = *respawn.wait_for_workers(1).first().unwrap();
    // It logs `worker <pid> serving GET /` (RUST_LOG=debug): its log path
    // is open once that line is out.
    assert_eq!(respawn.get("/").map(|r| r.status).ok(), Some(200));
    respawn.wait_for_line(&format!("worker {worker} serving GET /"));
    let stderr = std::fs::read_link(format!("/proc/{worker}/fd/2")).unwrap();
    let own: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .filter_map(|entry| {
            let fd = entry.ok()?.file_name().into_string().ok()?;
            let target = std::fs::read_link(format!("/proc/{worker}/fd/{fd}")).ok()?;
            (target == stderr && fd != "1" && fd != "2").then_some(fd)
        })
        .map(|fd| {
            let info = std::fs::read_to_string(format!("/proc/{worker}/fdinfo/{fd}")).unwrap();
            (
                fd,
                info.lines()
                    .find(|l| l.starts_with("flags:"))
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect();
    let nonblocking = |flags: &str| {
        let octal = flags.trim_start_matches("flags:").trim();
        i32::from_str_radix(octal, 8).is_ok_and(|bits| bits & libc::O_NONBLOCK != 0)
    };
    assert!(
        own.iter().any(|(_, flags)| nonblocking(flags)),
        "no non-blocking fd onto stderr ({}) in worker {worker}: {own:?}",
        stderr.display()
    );
}

#[test]
fn an_unknown_user_stops_the_master_at_start() {
    let (status, output) = run_to_exit(&["--user", "no-such-user-respawn", "--listen", "127.0.0.1:0"]);
    assert_eq!(status.code(), Some(1), "{output}");
    // Before it binds: no `listening on` line, nothing forked.
    assert_eq!(output, "respawn: --user no-such-user-respawn: no such user\n");
}

#[test]
fn an_unknown_group_stops_the_master_at_start() {
    let (status, output) = run_to_exit(&["--group", "no-such-group-respawn", "--listen", "127.0.0.1:0"]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(output, "respawn: --group no-such-group-respawn: no such group\n");
}

/// The copy of the binary that user nobody runs, removed even if the test
/// fails (nobody may not reach the build tree: a clone under /root, say).
struct NobodysCopy(PathBuf);

impl NobodysCopy {
    fn new(test: &str) -> NobodysCopy {
        let dir = std::env::temp_dir().join(format!("respawn-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A link, not a copy, where it can be: a file just written is held
        // open for writing by any child another test thread forks meanwhile,
        // and executing it then fails with "text file busy".
        if std::fs::hard_link(binary(), dir.join("respawn")).is_err() {
            std::fs::copy(binary(), dir.join("respawn")).unwrap();
        }
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        NobodysCopy(dir)
    }

    /// The binary, to be run as nobody.
    fn command(&self) -> Command {
        let mut command = Command::new(self.0.join("respawn"));
        // As root, std also empties the supplementary groups before setuid.
        command.uid(NOBODY).gid(NOBODY);
        command
    }
}

impl Drop for NobodysCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_master_that_is_not_root_runs_workers_only_as_itself() {
    if !root_and_nobody("a_master_that_is_not_root_runs_workers_only_as_itself") {
        return;
    }
    let copy = NobodysCopy::new("not-root");
    let mut command = copy.command();
    command.args(["--user", "root", "--listen", "127.0.0.1:0"]);
    let (status, output) = run_command_to_exit(command);
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        output,
        "respawn: --user root: the master runs as uid 65534, gid 65534, not as root: \
         only root can run workers as another user or group\n"
    );

    // As itself, it has nothing to drop and goes on: its worker runs the
    // program (here, a start that fails on purpose, so that it exits).
    let mut command = copy.command();
    command.args([
        "--user",
        "nobody",
        "--workers",
        "1",
        "--demo-fail-start",
        "--max-restarts",
        "0",
        "--listen",
        "127.0.0.1:0",
    ]);
    let (status, output) = run_command_to_exit(command);
    assert_eq!(status.code(), Some(3), "{output}");
    assert!(
        output.contains("--demo-fail-start: failing before Ready on purpose"),
        "{output}"
    );
    assert!(!output.contains("dropping privileges"), "{output}");
}

#[test]
fn a_worker_that_cannot_drop_privileges_never_serves() {
    // A root master in a container without CAP_SETUID (`docker run
    // --cap-drop SETUID`): it passes the check at start, and each worker
    // then fails at setuid. It must not go on as root.
    if !root_and_nobody("a_worker_that_cannot_drop_privileges_never_serves") {
        return;
    }
    let mut command = Command::new(binary());
    command.args([
        "--user",
        "nobody",
        "--workers",
        "1",
        "--max-restarts",
        "0",
        "--listen",
        "127.0.0.1:0",
    ]);
    // SAFETY: prctl is async-signal-safe, and the closure touches nothing
    // but constants. Dropped from the bounding set, CAP_SETUID is not given
    // back to root by the exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SETUID, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (status, output) = run_command_to_exit(command);
    assert_eq!(status.code(), Some(3), "gave up on the failed start\n{output}");
    let refused: Vec<&str> = output
        .lines()
        .map(message)
        .filter(|line| line.ends_with(": dropping privileges: setuid(65534): operation not permitted"))
        .collect();
    assert_eq!(refused.len(), 1, "{output}");
    let pid = worker_pid(refused[0]).unwrap_or_else(|| panic!("no pid in {:?}", refused[0]));
    assert_eq!(
        refused[0],
        format!("worker {pid}: dropping privileges: setuid(65534): operation not permitted")
    );
    assert!(!output.contains(" ready\n"), "no worker said ready\n{output}");
}
