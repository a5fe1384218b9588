//! The host's limits, as the log names them.
//!
//! A fork or a pipe that fails at run time is almost always a limit: the
//! user's processes (RLIMIT_NPROC), the process's open files
//! (RLIMIT_NOFILE), the system's files, or memory. The bare errno says
//! "resource temporarily unavailable"; an operator needs to know which
//! limit, its value, and whose it is, to raise the right one.

use std::io;

/// Says which limit `err` most likely hit and its value, as the end of a
/// sentence: `the limit on processes of uid 1000, RLIMIT_NPROC (ulimit -u), is 64`.
pub(crate) fn explain(err: &io::Error) -> Option<String> {
    // SAFETY: getuid cannot fail and has no preconditions.
    let uid = unsafe { libc::getuid() };
    match err.raw_os_error()? {
        libc::EAGAIN => Some(format!(
            "the limit on processes of uid {uid}, RLIMIT_NPROC (ulimit -u), is {} \
             (or the cgroup's pids.max, or kernel.threads-max, was reached)",
            soft_limit(libc::RLIMIT_NPROC)
        )),
        libc::EMFILE => Some(format!(
            "the limit on the master's open files, RLIMIT_NOFILE (ulimit -n), is {}",
            soft_limit(libc::RLIMIT_NOFILE)
        )),
        libc::ENFILE => Some(format!(
            "the system's limit on open files, fs.file-max, is {}",
            std::fs::read_to_string("/proc/sys/fs/file-max")
                .map_or("unknown".into(), |v| v.trim().to_owned())
        )),
        libc::ENOMEM => Some("the host is out of memory (or the process hit RLIMIT_AS)".to_owned()),
        _ => None,
    }
}

/// A soft limit as text: a number or `unlimited`.
fn soft_limit(resource: libc::__rlimit_resource_t) -> String {
    match soft(resource) {
        Some(value) => value.to_string(),
        None => "unlimited".to_owned(),
    }
}

/// A soft limit, None when unlimited (or unknown).
fn soft(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`, which holds it.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(limit.rlim_cur)
}

/// The most workers the master's open-file limit allows, and the limit:
/// each live worker (counted or retiring, up to twice the target plus one)
/// costs the master one pipe fd, and a fork two more for a moment.
/// `fixed` is how many fds the master holds besides worker pipes.
pub(crate) fn workers_for_open_files(fixed: usize) -> (usize, Option<u64>) {
    match soft(libc::RLIMIT_NOFILE) {
        Some(limit) => {
            let spare = (limit as usize).saturating_sub(fixed + 3);
            (spare.saturating_sub(1) / 2, Some(limit))
        }
        None => (usize::MAX, None),
    }
}

/// How many control connections the master's open-file limit leaves room
/// for, beside `fixed` fds and `pipes` worker pipes (the most that may be
/// open: twice the target plus one, or more while retiring workers of a
/// higher target still live), with the same spare as
/// [`workers_for_open_files`]: a peer's connections never cost a
/// replacement its fork.
pub(crate) fn control_connections_for_open_files(fixed: usize, pipes: usize) -> usize {
    match soft(libc::RLIMIT_NOFILE) {
        Some(limit) => (limit as usize).saturating_sub(fixed + 3 + pipes),
        None => usize::MAX,
    }
}

/// How many fds the process has open now.
pub(crate) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_named_by_their_errno() {
        let nproc = explain(&io::Error::from_raw_os_error(libc::EAGAIN)).unwrap_or_default();
        assert!(nproc.contains("RLIMIT_NPROC (ulimit -u)"), "{nproc}");
        let nofile = explain(&io::Error::from_raw_os_error(libc::EMFILE)).unwrap_or_default();
        assert!(nofile.contains("RLIMIT_NOFILE (ulimit -n), is "), "{nofile}");
        assert!(explain(&io::Error::from_raw_os_error(libc::ENOMEM)).is_some());
        assert_eq!(explain(&io::Error::from_raw_os_error(libc::EPERM)), None);
    }

    /// A soft limit as /proc/self/limits states it: a number or `unlimited`.
    fn stated(name: &str) -> String {
        let table = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
        let row = table.lines().find(|row| row.starts_with(name)).expect(name);
        let soft = row[name.len()..].split_whitespace().next();
        soft.expect("a soft limit").to_owned()
    }

    #[test]
    fn soft_limits_read_as_proc_self_limits_states_them() {
        for (resource, name) in [
            (libc::RLIMIT_NOFILE, "Max open files"),
            (libc::RLIMIT_NPROC, "Max processes"),
            (libc::RLIMIT_CPU, "Max cpu time"),
            (libc::RLIMIT_AS, "Max address space"),
            (libc::RLIMIT_CORE, "Max core file size"),
        ] {
            assert_eq!(soft_limit(resource), stated(name), "{name}");
        }
        assert_ne!(stated("Max open files"), "unlimited", "the kernel caps it");
        assert_eq!(soft(libc::RLIMIT_NOFILE), stated("Max open files").parse().ok());
        assert_eq!(soft(9999), None, "no such resource: unknown");
    }

    #[test]
    fn each_limit_is_explained_with_its_value() {
        let explain = |errno| explain(&io::Error::from_raw_os_error(errno));
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"));
        let uid = uids.and_then(|ids| ids.split_whitespace().next()).expect("a uid");
        let nproc = stated("Max processes");
        assert_eq!(
            explain(libc::EAGAIN),
            Some(format!(
                "the limit on processes of uid {uid}, RLIMIT_NPROC (ulimit -u), is {nproc} \
                 (or the cgroup's pids.max, or kernel.threads-max, was reached)"
            ))
        );
        let nofile = stated("Max open files");
        assert_eq!(
            explain(libc::EMFILE),
            Some(format!(
                "the limit on the master's open files, RLIMIT_NOFILE (ulimit -n), is {nofile}"
            ))
        );
        let file_max = std::fs::read_to_string("/proc/sys/fs/file-max").expect("fs.file-max");
        assert_eq!(
            explain(libc::ENFILE),
            Some(format!(
                "the system's limit on open files, fs.file-max, is {}",
                file_max.trim()
            ))
        );
    }

    #[test]
    fn the_worker_budget_leaves_room_for_a_pipe_each_twice_over() {
        let (most, limit) = workers_for_open_files(10);
        let limit = limit.expect("RLIMIT_NOFILE is never unlimited");
        assert_eq!(limit.to_string(), stated("Max open files"));
        let most = most as u64;
        assert!(10 + 3 + 2 * most < limit, "{most} workers within {limit} fds");
        assert!(10 + 3 + 2 * (most + 1) + 1 > limit, "{most} is the most");
    }

    #[test]
    fn open_fds_counts_what_this_process_holds() {
        let files: Vec<std::fs::File> = (0..32)
            .map(|_| std::fs::File::open("/dev/null").expect("/dev/null"))
            .collect();
        let open = open_fds();
        assert!(open >= 3 + files.len(), "{open} fds open");
    }
}
