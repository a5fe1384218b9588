//! What a worker inherits from its master, and what it must not.

use respawn_tests::*;
use std::collections::BTreeMap;

/// Every open fd of a process, with what it points at.
fn fds(pid: i32) -> BTreeMap<i32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|err| panic!("listing /proc/{pid}/fd: {err}"))
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Do two processes hold the same open file description? kcmp(2) says.
fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp only compares kernel objects; no memory is passed.
    let result = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1,
            pid2,
            KCMP_FILE,
            fd1 as libc::c_long,
            fd2 as libc::c_long,
        )
    };
    if result < 0 {
        let err = std::io::Error::last_os_error();
        // The test's own fds come and go (other tests run beside it): one
        // closed between listing and comparing is not shared.
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "kcmp: {err}");
        return false;
    }
    result == 0
}

#[test]
fn worker_holds_only_its_own_fds() {
    let respawn = Respawn::with_workers(3, &[]);
    let workers: Vec<i32> = respawn.wait_for_workers(3).into_iter().collect();
    let master = fds(respawn.pid);
    // The check below is only worth something if the master has what the
    // workers must not: an epoll, a signalfd, a pipe per worker.
    assert!(
        master.values().any(|t| t == "anon_inode:[eventpoll]"),
        "{master:?}"
    );
    assert!(
        master.values().any(|t| t == "anon_inode:[signalfd]"),
        "{master:?}"
    );
    assert!(
        master
            .iter()
            .filter(|(&fd, t)| fd > 2 && t.starts_with("pipe:"))
            .count()
            >= 3,
        "{master:?}"
    );

    // Fds the test itself was started with (from a shell, a CI runner) are
    // inherited by the master and its workers alike: not the master's own.
    let me = std::process::id() as i32;
    let ours = fds(me);
    let inherited = |pid: i32, fd: i32| ours.keys().any(|&mine| same_file(me, mine, pid, fd));

    for &worker in &workers {
        let held: BTreeMap<i32, String> = fds(worker)
            .into_iter()
            .filter(|&(fd, _)| fd <= 2 || !inherited(worker, fd))
            .collect();
        for (&wfd, wtarget) in &held {
            // What it shares with the master: stdio and the listener only.
            for (&mfd, mtarget) in &master {
                if same_file(respawn.pid, mfd, worker, wfd) {
                    assert!(
                        mfd <= 2 || mtarget.starts_with("socket:"),
                        "worker {worker} fd {wfd} is the master's fd {mfd} ({mtarget})"
                    );
                }
            }
            // What it shares with other workers: the same, and no pipe.
            for &other in workers.iter().filter(|&&o| o != worker) {
                for (&ofd, otarget) in &fds(other) {
                    if wfd > 2 && same_file(worker, wfd, other, ofd) {
                        assert!(
                            wtarget.starts_with("socket:"),
                            "worker {worker} fd {wfd} ({wtarget}) is worker {other}'s fd {ofd} ({otarget})"
                        );
                    }
                }
            }
        }
        let pipes = held
            .iter()
            .filter(|(&fd, t)| fd > 2 && t.starts_with("pipe:"))
            .count();
        assert_eq!(pipes, 1, "worker {worker} holds its own pipe only: {held:?}");
    }
}

/// A field of /proc/PID/status.
fn status_field(pid: i32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// Makes this process the reaper of orphans among its descendants (or
/// stops it being one), so that it can see how they end.
fn reap_orphans(on: bool) {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes a plain integer; no memory.
    let done = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, libc::c_ulong::from(on), 0, 0, 0) };
    assert_eq!(done, 0, "prctl: {}", std::io::Error::last_os_error());
}

/// How a child of this process ended, once it has: waits up to
/// [`PATIENCE`]. None if it did not end (or never became a child of ours).
fn wait_for_child(pid: i32) -> Option<libc::c_int> {
    let mut status = 0;
    let ended = wait_until(PATIENCE, || {
        // SAFETY: waitpid writes only into `status`, which outlives the call.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
    });
    ended.then_some(status)
}

#[test]
fn workers_start_clean_named_and_tied_to_the_master() {
    // An orphaned worker is reparented to us rather than to init: we can
    // then reap it and see what killed it.
    reap_orphans(true);
    let mut respawn = Respawn::with_workers(2, &[]);
    let workers = respawn.wait_for_workers(2);
    let mut names = Vec::new();
    for &worker in &workers {
        // The master blocks CHLD, TERM, QUIT and INT for its signalfd; a
        // worker must not inherit that mask.
        assert_eq!(
            status_field(worker, "SigBlk"),
            "0000000000000000",
            "worker {worker}'s blocked signals"
        );
        // It catches TERM (15) and QUIT (3) to stop gracefully.
        let caught = u64::from_str_radix(&status_field(worker, "SigCgt"), 16).unwrap();
        assert_eq!(
            caught & (1 << (15 - 1)),
            1 << (15 - 1),
            "worker {worker} catches SIGTERM"
        );
        assert_eq!(
            caught & (1 << (3 - 1)),
            1 << (3 - 1),
            "worker {worker} catches SIGQUIT"
        );
        names.push(
            std::fs::read_to_string(format!("/proc/{worker}/comm"))
                .unwrap()
                .trim()
                .to_owned(),
        );
    }
    names.sort();
    assert_eq!(names, ["worker 0", "worker 1"]);

    // Tied: when the master dies, the kernel kills each worker with SIGKILL
    // (PR_SET_PDEATHSIG). Not a worker that noticed and left on its own: the
    // signal says who did it.
    respawn.signal(libc::SIGKILL);
    respawn.wait_exit();
    for &worker in &workers {
        let status = wait_for_child(worker);
        assert!(
            status.is_some_and(|s| libc::WIFSIGNALED(s) && libc::WTERMSIG(s) == libc::SIGKILL),
            "worker {worker} killed by SIGKILL when its master died: {status:?}"
        );
    }
    reap_orphans(false);
}
