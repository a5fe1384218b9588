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

    #[test]
    fn the_worker_budget_leaves_room_for_a_pipe_each_twice_over() {
        let (most, limit) = workers_for_open_files(10);
        if let Some(limit) = limit {
            let most = most as u64;
            assert!(10 + 3 + 2 * most < limit, "{most} workers within {limit} fds");
            assert!(10 + 3 + 2 * (most + 1) + 1 > limit, "{most} is the most");
        }
    }
}
