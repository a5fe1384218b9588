//! Privilege drop: the master stays root, each worker becomes another user.
//!
//! A server started as root can bind port 80, but the code that parses what
//! strangers send should not run as root. So the master binds, then each
//! worker, just after its fork and before any code of the program runs
//! (before it says Ready; a worker of an upgrade, before it executes the
//! new binary: spawn.rs, step 2), gives up root for good:
//!
//! 1. `setgroups([gid])`: the supplementary groups root had (root's own:
//!    `disk`, `adm`...) are not carried over. Only the one group is kept;
//!    the user's other groups from /etc/group are not added (that would be
//!    `initgroups`, a lookup that has no place in a forked child).
//! 2. `setgid(gid)`: real, effective and saved group ids, while the process
//!    still has the privilege to change them;
//! 3. `setuid(uid)`: real, effective and saved user ids, last, because it
//!    takes away the privilege the two steps above need. Going from uid 0 to
//!    another uid also empties the capability sets.
//!
//! Then it checks that root cannot be regained (`setuid(0)` must fail, and
//! every id must read as asked). If any step fails, the worker does not go
//! on as the wrong user: it exits with `exit_code::SETUP_FAILED` and a line
//! naming the step (`worker 123: dropping privileges: setuid(65534):
//! operation not permitted`), which the master counts as a failed start.
//!
//! `--user` alone takes the user's primary group; `--group` alone changes
//! only the group (the worker stays root then, so nothing is "for good").
//!
//! # Names are resolved once, by the master, never in a worker
//!
//! [`RunAs::resolve`] looks the names up (getpwnam_r, getgrnam_r) in the
//! master, before the first fork; every worker takes the numbers, never a
//! name: a lookup may go through NSS (nscd, sssd, LDAP), which opens sockets
//! and files, may take seconds and may fail; in a forked child that is
//! neither async-signal-safe nor a cost to pay at every respawn. And a name
//! that does not exist is then a line at start, not a crash loop of
//! workers. A worker of an upgrade drops to those numbers before it
//! executes the new binary, so that binary's `main`, which runs in it up to
//! `run`, has nothing to look up (the demo's skips its `--user` lookup
//! there: [`crate::started_as_worker`]). The re-executed master runs the
//! program's `main` again, as the master, and resolves the names there
//! again, as at its first start.
//!
//! # What the master keeps, and why
//!
//! The master stays root, as nginx's and unicorn's masters do: it signals
//! and reaps workers of another uid (`kill` needs a matching uid or
//! CAP_KILL), keeps the listening sockets it bound (a port below 1024, a
//! Unix socket in a root-owned directory) for the workers it forks next, and
//! can re-exec the binary for an upgrade (the new image takes the listeners
//! it holds, and binds nothing). It runs none of the program's request
//! handling: all of that happens in workers.
//!
//! A master that is not root cannot change a worker's user or group, so
//! [`RunAs::resolve`] refuses, at start, a user or group other than the
//! master's own; given its own, the workers simply stay as they are.
//!
//! A side effect to know: changing the effective uid clears the worker's
//! parent-death signal and makes it non-dumpable (the kernel's
//! `commit_creds`). So the drop comes before `PR_SET_PDEATHSIG` in
//! spawn.rs (and so does an upgrade's exec, which clears it too for a file
//! with capabilities), and a worker leaves no core dump and cannot be
//! ptraced by other processes of its new user, which protects the memory
//! it copied from the root master.

use crate::error::describe;
use crate::logbuf;
use nix::errno::Errno;
use nix::unistd::{self, Gid, Group, Uid, User};
use std::fmt;
use std::io;

/// Who the workers run as, resolved by name when the master starts.
/// Give it to [`crate::Config::run_workers_as`].
///
/// Each worker, after its fork and before your function runs, calls
/// `setgroups([gid])`, `setgid`, `setuid`, in that order, and checks that
/// root cannot be regained; if a step fails it exits as a failed start,
/// with a line naming the step. The master keeps its own user (root): it
/// must signal and reap workers of another uid, keep the listening sockets
/// it bound for the workers it forks next, and re-exec itself for an
/// upgrade. It runs no request handling itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// None: the workers keep the master's user (`--group` alone).
    uid: Option<Uid>,
    gid: Gid,
}

/// Which name could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAsError {
    what: &'static str,
    name: String,
    reason: String,
}

/// Set by a master for the image it re-executes as: the ids it resolved
/// (`65534:65534`, or `-:100` for a group alone). The new image takes them
/// instead of looking the names up again: an NSS source that is down at
/// that moment must not end a service whose workers already run.
pub(crate) const HANDED_DOWN_VAR: &str = "RESPAWN_RUN_AS";

impl RunAs {
    /// Looks up `user` and `group` (either may be None; `user` alone takes
    /// its primary group), and checks that this process may switch to them:
    /// it must be root, unless the user and group are its own.
    ///
    /// In a master re-executed by an upgrade, the ids its previous image
    /// resolved are taken instead, and nothing is looked up.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<RunAs, RunAsError> {
        if let Some(run_as) = take_handed_down() {
            return Ok(run_as);
        }
        let (uid, user_gid) = match user {
            Some(name) => lookup_user(name).map(|(uid, gid)| (Some(uid), Some(gid)))?,
            None => (None, None),
        };
        let group_gid = group.map(lookup_group).transpose()?;
        let Some(gid) = group_gid.or(user_gid) else {
            return Err(RunAsError::new(
                "user",
                "",
                "neither a user nor a group was given",
            ));
        };
        let run_as = RunAs { uid, gid };
        let now = Ids::of_this_process();
        if run_as.may_be_taken_by(&now) {
            return Ok(run_as);
        }
        // Blame the name that differs from what the master is.
        let (what, name) = match (user, group) {
            (Some(name), _) if uid != now.same_uid() => ("user", name),
            (_, Some(name)) => ("group", name),
            (user, None) => ("user", user.unwrap_or_default()),
        };
        Err(RunAsError::new(
            what,
            name,
            format!(
                "the master runs as uid {}, gid {}, not as root: only root can run \
                 workers as another user or group",
                now.euid, now.egid
            ),
        ))
    }

    /// What [`HANDED_DOWN_VAR`] carries.
    pub(crate) fn to_handed_down(&self) -> String {
        let uid = self.uid.map_or("-".to_owned(), |uid| uid.to_string());
        format!("{uid}:{}", self.gid)
    }

    /// The user id the workers take; None: they keep the master's.
    pub fn uid(&self) -> Option<u32> {
        self.uid.map(Uid::as_raw)
    }

    /// The group id the workers take (their only group).
    pub fn gid(&self) -> u32 {
        self.gid.as_raw()
    }

    /// Root may become anyone; any other process only what it already is.
    fn may_be_taken_by(&self, now: &Ids) -> bool {
        now.euid == 0 || self.changes_nothing_for(now)
    }

    /// The process is already this user and group, in every id.
    fn changes_nothing_for(&self, now: &Ids) -> bool {
        let uid_same = self.uid.is_none_or(|uid| now.same_uid() == Some(uid));
        uid_same && now.same_gid() == Some(self.gid)
    }
}

/// The ids of the process, as `drop_privileges` finds them.
struct Ids {
    uid: u32,
    euid: u32,
    gid: u32,
    egid: u32,
}

impl Ids {
    fn of_this_process() -> Ids {
        Ids {
            uid: unistd::getuid().as_raw(),
            euid: unistd::geteuid().as_raw(),
            gid: unistd::getgid().as_raw(),
            egid: unistd::getegid().as_raw(),
        }
    }

    fn same_uid(&self) -> Option<Uid> {
        (self.uid == self.euid).then(|| Uid::from_raw(self.uid))
    }

    fn same_gid(&self) -> Option<Gid> {
        (self.gid == self.egid).then(|| Gid::from_raw(self.gid))
    }
}

/// A statically linked glibc cannot load the NSS modules that
/// /etc/nsswitch.conf may name (systemd, sss, ldap): asked for a name the
/// files do not hold, its getpwnam crashed (SIGSEGV, glibc 2.36, `passwd:
/// files systemd`). A static build reads /etc/passwd and /etc/group itself,
/// and knows only the names they list.
const STATIC: bool = cfg!(target_feature = "crt-static");

fn lookup_user(name: &str) -> Result<(Uid, Gid), RunAsError> {
    if STATIC {
        return match from_file("/etc/passwd", name) {
            Ok(Some(fields)) => match (id_field(&fields, 2), id_field(&fields, 3)) {
                (Some(uid), Some(gid)) => Ok((Uid::from_raw(uid), Gid::from_raw(gid))),
                _ => Err(RunAsError::new(
                    "user",
                    name,
                    "its line in /etc/passwd does not parse",
                )),
            },
            Ok(None) => Err(RunAsError::new("user", name, "no such user in /etc/passwd")),
            Err(err) => Err(RunAsError::new(
                "user",
                name,
                format!("reading /etc/passwd: {}", describe(&err)),
            )),
        };
    }
    match User::from_name(name) {
        Ok(Some(user)) => Ok((user.uid, user.gid)),
        // getpwnam_r says "not found" with a null result, but some NSS
        // modules return one of these instead (getpwnam(3)).
        Ok(None) | Err(Errno::ENOENT | Errno::ESRCH) => Err(RunAsError::new("user", name, "no such user")),
        Err(errno) => Err(RunAsError::new(
            "user",
            name,
            format!("looking it up: {}", describe(&io::Error::from(errno))),
        )),
    }
}

fn lookup_group(name: &str) -> Result<Gid, RunAsError> {
    if STATIC {
        return match from_file("/etc/group", name) {
            Ok(Some(fields)) => id_field(&fields, 2)
                .map(Gid::from_raw)
                .ok_or_else(|| RunAsError::new("group", name, "its line in /etc/group does not parse")),
            Ok(None) => Err(RunAsError::new("group", name, "no such group in /etc/group")),
            Err(err) => Err(RunAsError::new(
                "group",
                name,
                format!("reading /etc/group: {}", describe(&err)),
            )),
        };
    }
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) | Err(Errno::ENOENT | Errno::ESRCH) => Err(RunAsError::new("group", name, "no such group")),
        Err(errno) => Err(RunAsError::new(
            "group",
            name,
            format!("looking it up: {}", describe(&io::Error::from(errno))),
        )),
    }
}

/// The `:`-separated fields of the line of `path` whose first field is
/// `name` (the format of passwd(5) and group(5)).
fn from_file(path: &str, name: &str) -> io::Result<Option<Vec<String>>> {
    Ok(find_entry(&std::fs::read_to_string(path)?, name))
}

fn find_entry(text: &str, name: &str) -> Option<Vec<String>> {
    text.lines()
        .map(|line| line.split(':').map(str::to_owned).collect::<Vec<_>>())
        .find(|fields| fields.first().map(String::as_str) == Some(name))
}

fn id_field(fields: &[String], index: usize) -> Option<u32> {
    fields.get(index)?.parse().ok()
}

impl RunAsError {
    fn new(what: &'static str, name: &str, reason: impl Into<String>) -> RunAsError {
        RunAsError {
            what,
            name: name.to_owned(),
            reason: reason.into(),
        }
    }

    /// `"user"` or `"group"`: which of the two names it is about.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// The name as it was given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why it cannot be used: `no such user`, or why this master may not.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for RunAsError {
    /// `user nosuchuser: no such user`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.what, self.name, self.reason)
    }
}

impl std::error::Error for RunAsError {}

/// The ids a previous image handed down, in a master re-executed by an
/// upgrade; the variable is removed either way (workers must not see it).
pub(crate) fn take_handed_down() -> Option<RunAs> {
    let value = std::env::var(HANDED_DOWN_VAR).ok();
    std::env::remove_var(HANDED_DOWN_VAR);
    if !crate::started_by_upgrade() {
        return None;
    }
    let (uid, gid) = value?
        .split_once(':')
        .map(|(u, g)| (u.to_owned(), g.to_owned()))?;
    let uid = match uid.as_str() {
        "-" => None,
        uid => Some(Uid::from_raw(uid.parse().ok()?)),
    };
    Some(RunAs {
        uid,
        gid: Gid::from_raw(gid.parse().ok()?),
    })
}

/// In a new worker, before the program's code: become `run_as`, for good.
/// The error names the step that failed: `setuid(65534): operation not
/// permitted`. Nothing here allocates but the error.
pub(crate) fn drop_privileges(run_as: &RunAs) -> Result<(), String> {
    let before = Ids::of_this_process();
    if run_as.changes_nothing_for(&before) && before.euid != 0 {
        // A master that is not root, given its own user: nothing to drop,
        // and setgroups would fail without CAP_SETGID.
        return Ok(());
    }
    // Open the worker's own non-blocking way to stderr now: reopening
    // /proc/self/fd/2 needs access to the pipe, which belongs to root.
    logbuf::flush_pending();
    let gid = run_as.gid;
    step(format_args!("setgroups([{gid}])"), unistd::setgroups(&[gid]))?;
    step(format_args!("setgid({gid})"), unistd::setgid(gid))?;
    let Some(uid) = run_as.uid else {
        return check_ids(&Ids::of_this_process(), before.uid, gid.as_raw());
    };
    step(format_args!("setuid({uid})"), unistd::setuid(uid))?;
    let after = Ids::of_this_process();
    check_ids(&after, uid.as_raw(), gid.as_raw())?;
    if before.euid == 0 && !uid.is_root() && unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(format!(
            "setuid(0) worked after setuid({uid}): root could be regained"
        ));
    }
    Ok(())
}

fn step(what: fmt::Arguments, result: nix::Result<()>) -> Result<(), String> {
    result.map_err(|errno| format!("{what}: {}", describe(&io::Error::from(errno))))
}

/// Real and effective ids both as asked. (setuid and setgid from root set
/// the saved ids too; a saved uid of 0 would show as setuid(0) working.)
fn check_ids(now: &Ids, uid: u32, gid: u32) -> Result<(), String> {
    if (now.uid, now.euid, now.gid, now.egid) != (uid, uid, gid, gid) {
        return Err(format!(
            "ids are uid {}, euid {}, gid {}, egid {} after the change, not uid {uid}, gid {gid}",
            now.uid, now.euid, now.gid, now.egid
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_re_executed_master_takes_the_ids_handed_down_and_looks_nothing_up() {
        let outcome = crate::signals::tests::in_child(|| {
            // A name no source knows: looked up, it fails.
            let unknown = "respawn-no-such-user-anywhere";
            if RunAs::resolve(Some(unknown), None).is_ok() {
                return Err("an unknown name was resolved".into());
            }
            std::env::set_var(HANDED_DOWN_VAR, "65534:65533");
            if RunAs::resolve(Some(unknown), None).is_ok() {
                return Err("ids taken from the environment of a first start".into());
            }
            if std::env::var_os(HANDED_DOWN_VAR).is_some() {
                return Err("the variable was left for the workers".into());
            }
            std::env::set_var("RESPAWN_MASTER_STATE", "9");
            std::env::set_var(HANDED_DOWN_VAR, "65534:65533");
            let taken = RunAs::resolve(Some(unknown), None).map_err(|e| e.to_string())?;
            if (taken.uid(), taken.gid()) != (Some(65534), 65533) {
                return Err(format!("took {taken:?}"));
            }
            let round = RunAs {
                uid: None,
                gid: Gid::from_raw(100),
            }
            .to_handed_down();
            if round != "-:100" {
                return Err(round);
            }
            Ok(())
        });
        assert_eq!(outcome, Ok(()));
    }
    use super::*;

    fn ids(uid: u32, gid: u32) -> Ids {
        Ids {
            uid,
            euid: uid,
            gid,
            egid: gid,
        }
    }

    #[test]
    fn an_unknown_name_is_refused_with_what_it_is() {
        let err = RunAs::resolve(Some("no-such-user-respawn"), None).unwrap_err();
        assert_eq!(err.to_string(), "user no-such-user-respawn: no such user");
        assert_eq!((err.what(), err.name()), ("user", "no-such-user-respawn"));
        let err = RunAs::resolve(None, Some("no-such-group-respawn")).unwrap_err();
        assert_eq!(err.to_string(), "group no-such-group-respawn: no such group");
        // A NUL cannot be in a name: not found, not a panic.
        let err = RunAs::resolve(Some("a\0b"), None).unwrap_err();
        assert_eq!(err.reason(), "no such user");
    }

    #[test]
    fn root_may_become_anyone_others_only_themselves() {
        let nobody = RunAs {
            uid: Some(Uid::from_raw(65534)),
            gid: Gid::from_raw(65534),
        };
        assert!(nobody.may_be_taken_by(&ids(0, 0)));
        assert!(nobody.may_be_taken_by(&ids(65534, 65534)));
        assert!(!nobody.may_be_taken_by(&ids(1000, 1000)));
        assert!(!nobody.may_be_taken_by(&ids(65534, 1000)), "another group");
        let group_only = RunAs {
            uid: None,
            gid: Gid::from_raw(1000),
        };
        assert!(group_only.may_be_taken_by(&ids(1000, 1000)));
        assert!(!group_only.may_be_taken_by(&ids(1000, 1001)));
        // A setuid binary (real 1000, effective 0) is root enough; the
        // reverse is not itself.
        let setuid_root = Ids {
            uid: 1000,
            euid: 0,
            gid: 1000,
            egid: 1000,
        };
        assert!(nobody.may_be_taken_by(&setuid_root));
        let me = RunAs {
            uid: Some(Uid::from_raw(1000)),
            gid: Gid::from_raw(1000),
        };
        assert!(!me.changes_nothing_for(&setuid_root));
    }

    #[test]
    fn a_static_build_finds_names_in_the_files_themselves() {
        let passwd =
            "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
        let nobody = find_entry(passwd, "nobody").expect("nobody's line");
        assert_eq!(
            (id_field(&nobody, 2), id_field(&nobody, 3)),
            (Some(65534), Some(65534))
        );
        assert_eq!(find_entry(passwd, "nobod"), None, "a whole name, not a prefix");
        assert_eq!(find_entry(passwd, "missing"), None);
        let broken = find_entry("odd:x:abc\n", "odd").expect("the line");
        assert_eq!(id_field(&broken, 2), None);
        assert_eq!(id_field(&broken, 3), None);
    }

    #[test]
    fn a_user_alone_takes_its_primary_group_a_group_alone_keeps_the_user() {
        // root exists everywhere, and any process may resolve to itself.
        let Ok(Some(root)) = User::from_name("root") else {
            panic!("no root user");
        };
        let now = Ids::of_this_process();
        if now.euid == 0 {
            let run_as = RunAs::resolve(Some("root"), None).unwrap();
            assert_eq!((run_as.uid(), run_as.gid()), (Some(0), root.gid.as_raw()));
        } else {
            let err = RunAs::resolve(Some("root"), None).unwrap_err();
            assert!(
                err.to_string().starts_with("user root: the master runs as uid "),
                "{err}"
            );
        }
        if let Ok(Some(group)) = Group::from_gid(unistd::getegid()) {
            let run_as = RunAs::resolve(None, Some(&group.name)).unwrap();
            assert_eq!((run_as.uid(), run_as.gid()), (None, group.gid.as_raw()));
        }
    }

    #[test]
    fn ids_that_did_not_all_change_are_an_error() {
        assert_eq!(check_ids(&ids(65534, 65534), 65534, 65534), Ok(()));
        let half = Ids {
            uid: 0,
            euid: 65534,
            gid: 65534,
            egid: 65534,
        };
        assert_eq!(
            check_ids(&half, 65534, 65534),
            Err(
                "ids are uid 0, euid 65534, gid 65534, egid 65534 after the change, \
                 not uid 65534, gid 65534"
                    .into()
            )
        );
    }
}
