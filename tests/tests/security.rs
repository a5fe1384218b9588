//! Nothing root does follows a path another user controls.
//!
//! The master runs as root, the workers as nobody, and the directory of the
//! pid file or of the Unix socket belongs to nobody: what a worker taken
//! over could plant there. Each test plants a symbolic link to a secret, a
//! root-owned 0600 file in a directory only root enters, and checks that
//! the secret keeps its content and its mode, and never reaches the log.
//! The attacker is a real nobody (`setpriv --reuid 65534`), so the links
//! are theirs, made in a directory that is theirs.

use respawn_tests::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The uid and gid of user nobody, who plants the links.
const NOBODY: u32 = 65534;

/// What the secret holds: distinctive, so that any piece of it in the log
/// is found.
const SECRET: &str = "root:$6$respawn-secret-7f3a9c$QUJDREVGR0hJSktMTU5PUFFSU1RVVldY:19000:0:99999:7:::\n";

/// Root, a user nobody of uid and gid 65534, and setpriv to become it; or
/// a skip the harness records (docs/testing.md, skips) and false.
fn root_and_nobody(test: &str) -> bool {
    if !require(test, Need::Root) || !require(test, Need::Nobody) {
        return false;
    }
    let setpriv = Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !setpriv.is_ok_and(|status| status.success()) {
        skip(
            test,
            Skip::Environment,
            "setpriv (util-linux) is needed to act as nobody",
        );
        return false;
    }
    true
}

/// A root-owned 0600 file in a directory only root may enter: what the
/// planted links point at.
struct Secret {
    _dir: TempDir,
    path: PathBuf,
}

impl Secret {
    fn new(test: &str) -> Secret {
        let dir = TempDir::new(&format!("respawn-secret-{test}"));
        std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o700)).expect("chmod 0700");
        let path = dir.join("shadow");
        std::fs::write(&path, SECRET).expect("writing the secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 0600");
        Secret { _dir: dir, path }
    }

    /// Its content, mode and owner are what they were made.
    fn assert_untouched(&self, respawn: &Respawn) {
        let meta = std::fs::metadata(&self.path).expect("the secret");
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o600,
            "the secret's mode was changed\n{}",
            respawn.dump()
        );
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "the secret's owner was changed");
        assert_eq!(
            std::fs::read_to_string(&self.path).expect("reading the secret"),
            SECRET,
            "the secret was written\n{}",
            respawn.dump()
        );
    }
}

/// A directory of nobody's own, where root makes the pid file or socket.
fn nobodys_dir(test: &str) -> TempDir {
    let dir = TempDir::new(&format!("respawn-nobodys-{test}"));
    std::os::unix::fs::chown(&*dir, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
    dir
}

/// Runs `sh -c script` as nobody, with these variables; fails the test
/// unless it succeeds.
fn as_nobody(script: &str, vars: &[(&str, &Path)]) {
    let output = command_as_nobody("sh")
        .args(["-c", script])
        .envs(vars.iter().map(|&(name, path)| (name, path)))
        .output()
        .expect("running setpriv");
    assert!(
        output.status.success(),
        "as nobody, {script:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Waits until the pid file is a regular file that says `pid`.
fn wait_for_pid_file(respawn: &Respawn, path: &Path) {
    let expected = format!("{}\n", respawn.pid);
    let mut last = None;
    let written = wait_until(PATIENCE, || {
        let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file());
        last = std::fs::read_to_string(path).ok();
        regular && last.as_deref() == Some(expected.as_str())
    });
    assert!(
        written,
        "the pid file holds {last:?}, not {expected:?}\n{}",
        respawn.dump()
    );
}

/// The log says nothing of the secret: not its first 12 characters, not
/// its distinctive middle.
fn assert_not_in_log(respawn: &Respawn) {
    for piece in [&SECRET[..12], "respawn-secret", "QUJDREVG"] {
        let shown: Vec<String> = respawn.log().into_iter().filter(|l| l.contains(piece)).collect();
        assert!(shown.is_empty(), "the secret is in the log: {shown:?}");
    }
}

/// The temporary file the pid file is written through was named after the
/// master's pid, and created following links: nobody, knowing the pid a
/// master will have (here: its shell's, which it execs), planted a link
/// there, and root wrote the pid into whatever it pointed at. The name is
/// random now, and created with O_EXCL|O_NOFOLLOW.
#[test]
fn a_symlink_planted_by_the_workers_user_at_the_temporary_name_is_never_followed_by_root() {
    let test = "a_symlink_planted_by_the_workers_user_at_the_temporary_name_is_never_followed_by_root";
    if !root_and_nobody(test) {
        return;
    }
    let secret = Secret::new("tmp-name");
    let dir = nobodys_dir("tmp-name");
    let pid_file = dir.join("app.pid");
    let shown = pid_file.display().to_string();
    // $$ is the pid the master will have: the shell execs it.
    let plant = "setpriv --reuid 65534 --regid 65534 --clear-groups \
                 ln -s \"$SECRET\" \"$DIR/.app.pid.$$.tmp\" && exec \"$RESPAWN\" \"$@\"";
    let args = [
        "-c",
        plant,
        "sh",
        "--workers",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--pid-file",
        &shown,
    ];
    let respawn = Respawn::start_program(Path::new("/bin/sh"), &args, |command| {
        command
            .env("SECRET", &secret.path)
            .env("DIR", &*dir)
            .env("RESPAWN", binary());
    });
    let planted = dir.join(format!(".app.pid.{}.tmp", respawn.pid));
    assert!(
        std::fs::symlink_metadata(&planted).is_ok_and(|m| m.file_type().is_symlink()),
        "the link was not planted"
    );
    respawn.wait_for_workers(1);
    // Written (the old code wrote through the link, then renamed the link
    // itself to the pid file's name: read through it, it says the pid too).
    let expected = format!("{}\n", respawn.pid);
    let said = wait_until(PATIENCE, || {
        std::fs::read_to_string(&pid_file).is_ok_and(|text| text == expected)
    });
    assert!(said, "the pid file was not written\n{}", respawn.dump());
    secret.assert_untouched(&respawn);
    wait_for_pid_file(&respawn, &pid_file);
    let meta = std::fs::symlink_metadata(&pid_file).expect("the pid file");
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (0, 0o644),
        "{}",
        respawn.dump()
    );
    // The directory is nobody's: said once, at start.
    respawn.wait_for_line(&format!(
        "pid file {shown}: uid {NOBODY} can write in its directory {} (mode 0755, no sticky bit); \
         respawn follows no link there, but that user can remove or replace the file",
        dir.display()
    ));
}

/// The pid file itself made a link to the secret: it was read through the
/// link, and its first 40 characters logged as what the file "holds".
#[test]
fn a_pid_file_replaced_by_a_symlink_is_never_read_through_nor_shown_in_the_log() {
    let test = "a_pid_file_replaced_by_a_symlink_is_never_read_through_nor_shown_in_the_log";
    if !root_and_nobody(test) {
        return;
    }
    let secret = Secret::new("pid-link");
    let dir = nobodys_dir("pid-link");
    let pid_file = dir.join("app.pid");
    let shown = pid_file.display().to_string();
    as_nobody(
        "ln -s \"$SECRET\" \"$DIR/app.pid\"",
        &[("SECRET", &secret.path), ("DIR", &dir)],
    );
    let respawn = Respawn::start(&["--workers", "1", "--pid-file", &shown]);
    respawn.wait_for_workers(1);
    wait_for_pid_file(&respawn, &pid_file);
    assert_not_in_log(&respawn);
    secret.assert_untouched(&respawn);
    respawn.wait_for_line(&format!(
        "pid file {shown}: is a symbolic link, not a pid file; replacing it"
    ));
}

/// nobody runs a program of its own named respawn and writes its pid where
/// root's master keeps its pid file: a process of another user is no
/// master of ours, so the file is stale and replaced, where it kept the
/// master from starting (`held by running master N`, exit 1).
#[test]
fn a_pid_file_naming_another_users_process_called_respawn_is_stale() {
    let test = "a_pid_file_naming_another_users_process_called_respawn_is_stale";
    if !root_and_nobody(test) {
        return;
    }
    let dir = nobodys_dir("pid-impostor");
    let impostor = dir.join("respawn");
    std::fs::copy("/bin/sleep", &impostor).expect("copying sleep");
    std::os::unix::fs::chown(&impostor, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
    let mut command = command_as_nobody(&impostor);
    command.arg("60");
    let sleeper = KilledOnDrop(vec![spawn_tied(command).expect("nobody's respawn")]);
    let pid = sleeper.0[0].id();
    let pid_file = dir.join("app.pid");
    let shown = pid_file.display().to_string();
    let named = wait_until(PATIENCE, || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "respawn")
    });
    assert!(named, "nobody's process is called respawn");
    as_nobody(&format!("echo {pid} > \"$DIR/app.pid\""), &[("DIR", &dir)]);
    let respawn = Respawn::start(&["--workers", "1", "--pid-file", &shown]);
    respawn.wait_for_workers(1);
    wait_for_pid_file(&respawn, &pid_file);
    respawn.wait_for_line(&format!(
        "pid file {shown}: pid {pid} runs as uid 65534, not 0; replacing it"
    ));
    drop(sleeper);
}

/// `Listeners::set_socket_mode` after nobody replaced the socket file by a
/// link: it chmodded by path, so the secret became 0666.
#[test]
fn set_socket_mode_on_a_socket_file_replaced_by_a_symlink_changes_nothing_and_says_so() {
    let test = "set_socket_mode_on_a_socket_file_replaced_by_a_symlink_changes_nothing_and_says_so";
    if !root_and_nobody(test) {
        return;
    }
    let secret = Secret::new("set-mode");
    let dir = nobodys_dir("set-mode");
    let socket = dir.join("web.sock");
    let addr = format!("unix:{}", socket.display());
    let listeners = respawn_master::bind_all(&[&addr]).expect("binding");
    as_nobody(
        "rm -f \"$DIR/web.sock\" && ln -s \"$SECRET\" \"$DIR/web.sock\"",
        &[("SECRET", &secret.path), ("DIR", &dir)],
    );
    let err = listeners.set_socket_mode(0o666).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "setting the mode of {} to 0666: a symbolic link is there now, not the socket this \
             process bound; left as it is",
            socket.display()
        )
    );
    let meta = std::fs::metadata(&secret.path).expect("the secret");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "the link was followed");
    assert_eq!(std::fs::read_to_string(&secret.path).unwrap(), SECRET);
}

/// Issue 16, item 1: the new image ran the program's main as root on USR2,
/// socket set-up included, and chmodded whatever was at the socket's path
/// by then: a link nobody put there made the secret 0666.
#[test]
fn an_upgrade_never_changes_a_file_a_symlink_at_the_socket_path_points_to() {
    let test = "an_upgrade_never_changes_a_file_a_symlink_at_the_socket_path_points_to";
    if !root_and_nobody(test) {
        return;
    }
    let secret = Secret::new("upgrade");
    let dir = nobodys_dir("upgrade");
    let socket = dir.join("web.sock");
    let unix = format!("unix:{}", socket.display());
    let deploy = Deploy::new("symlink");
    let respawn = deploy.start(&[
        "--workers",
        "1",
        "--user",
        "nobody",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        &unix,
        "--listen-mode",
        "0666",
    ]);
    respawn.wait_for_workers(1);
    let meta = std::fs::symlink_metadata(&socket).expect("the socket file");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o666, "--listen-mode");
    as_nobody(
        "rm -f \"$DIR/web.sock\" && ln -s \"$SECRET\" \"$DIR/web.sock\"",
        &[("SECRET", &secret.path), ("DIR", &dir)],
    );
    deploy.replace_with_build("s");
    respawn.signal(libc::SIGUSR2);
    let mut outcome = None;
    wait_until(PATIENCE, || {
        let log = respawn.log();
        outcome = log
            .iter()
            .find(|l| message(l).starts_with("master re-executed as ") || l.contains("backed out"))
            .cloned();
        outcome.is_some()
    });
    match outcome {
        Some(line) if message(&line).starts_with("master re-executed as ") => {}
        other => panic!("no re-execution, but {other:?}\n{}", respawn.dump()),
    }
    respawn.wait_for_workers(1);
    secret.assert_untouched(&respawn);
    // The directory is nobody's: said once, by the master that bound the
    // socket, not again by the new image, which binds nothing.
    let shared = format!(
        "{unix}: uid {NOBODY} can write in its directory {} (mode 0755, no sticky bit); \
         respawn follows no link there, but that user can remove or replace the socket file",
        dir.display()
    );
    assert_eq!(respawn.count_lines(&shared), 1, "{}", respawn.dump());
    // The upgraded workers serve (on the TCP listener: the Unix socket's
    // name is nobody's link now).
    let answer = respawn.get("/version").expect("GET /version");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.body.trim().ends_with(" s"), "{answer:?}");
}

/// Issue 16: an upgraded worker was executed as root and ran the new
/// program's `main` (socket set-up included) before it dropped to `--user`.
/// Now it drops before its exec (spawn.rs, step 2): the new program, here a
/// wrapper that writes down who runs it before anything else, runs as root
/// only in the master's re-execution, and in each worker as nobody from
/// its first line, with no group but nobody's.
#[test]
fn the_new_binary_runs_as_root_only_in_the_master_and_as_the_workers_user_from_its_first_line() {
    const TEST: &str =
        "the_new_binary_runs_as_root_only_in_the_master_and_as_the_workers_user_from_its_first_line";
    if !root_and_nobody(TEST) {
        return;
    }
    let deploy = Deploy::new("first-line");
    std::fs::set_permissions(&*deploy.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    let who = deploy.dir.join("who");
    std::fs::write(&who, "").expect("the record");
    std::fs::set_permissions(&who, std::fs::Permissions::from_mode(0o666)).expect("chmod 0666");
    let respawn = deploy.start(&["--workers", "2", "--user", "nobody"]);
    respawn.wait_for_workers(2);
    deploy.replace_with(&format!(
        "if [ -n \"$RESPAWN_WORKER\" ]; then role=worker; else role=master; fi\n\
         echo \"$role uid $(id -u) gid $(id -g) groups $(id -G)\" >> '{}'\n\
         RESPAWN_DEMO_TAG=f exec '{}' \"$@\"",
        who.display(),
        binary().display()
    ));
    respawn.signal(libc::SIGUSR2);
    respawn.wait_for_log("the re-execution", |l| {
        message(l).starts_with("master re-executed as ") || l.contains("backed out")
    });
    respawn.wait_for_workers(2);
    let record = std::fs::read_to_string(&who).expect("reading the record");
    let lines: Vec<&str> = record.lines().collect();
    let workers: Vec<&&str> = lines.iter().filter(|l| l.starts_with("worker ")).collect();
    let masters: Vec<&&str> = lines.iter().filter(|l| l.starts_with("master ")).collect();
    assert!(
        workers.len() >= 2,
        "the new workers ran the wrapper: {record:?}\n{}",
        respawn.dump()
    );
    for line in &workers {
        assert_eq!(
            **line,
            format!("worker uid {NOBODY} gid {NOBODY} groups {NOBODY}"),
            "{record:?}"
        );
    }
    assert_eq!(masters.len(), 1, "{record:?}\n{}", respawn.dump());
    assert!(masters[0].starts_with("master uid 0 "), "{record:?}");
    let answer = respawn.get("/version").expect("GET /version");
    assert!(answer.body.trim().ends_with(" f"), "{answer:?}");
}

/// The control socket is made by root, so its path gets the care the pid
/// file's does: a link planted there is refused at start, never followed
/// (nor replaced: it is not a stale socket), and a directory another user
/// can write in is said, once. The file is root's, mode 0600 from its bind.
#[test]
fn a_link_at_the_control_socket_path_is_refused_and_its_directory_is_said() {
    const TEST: &str = "a_link_at_the_control_socket_path_is_refused_and_its_directory_is_said";
    if !root_and_nobody(TEST) {
        return;
    }
    let secret = Secret::new("control");
    let dir = nobodys_dir("control");
    let control = dir.join("control.sock");
    let shown = control.display().to_string();
    as_nobody(
        "ln -s \"$SECRET\" \"$DIR/control.sock\"",
        &[("SECRET", &secret.path), ("DIR", &dir)],
    );
    let (status, out) = run_to_exit(&["--workers", "1", "--listen", "127.0.0.1:0", "--control", &shown]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.lines().any(|l| l
            == format!(
                "respawn: binding control socket {shown}: a file that is not a socket is there; \
                 not replacing it"
            )),
        "{out}"
    );
    let link = std::fs::symlink_metadata(&control).expect("the link");
    assert!(link.file_type().is_symlink(), "the link was replaced");
    let meta = std::fs::metadata(&secret.path).expect("the secret");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "the link was followed");
    assert_eq!(std::fs::read_to_string(&secret.path).expect("the secret"), SECRET);

    as_nobody("rm \"$DIR/control.sock\"", &[("DIR", &dir)]);
    let respawn = Respawn::start(&["--workers", "1", "--control", &shown]);
    respawn.wait_for_workers(1);
    let meta = std::fs::symlink_metadata(&control).expect("the control socket");
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o7777),
        (0, 0o600),
        "{}",
        respawn.dump()
    );
    let said = format!(
        "control socket {shown}: uid {NOBODY} can write in its directory {} (mode 0755, no sticky \
         bit); respawn follows no link there, but that user can remove or replace the socket file",
        dir.display()
    );
    assert_eq!(respawn.count_lines(&said), 1, "{}", respawn.dump());
    secret.assert_untouched(&respawn);
}

/// `-- CMD` is executed by each worker after it dropped to `--user`: the
/// program at that path (which whoever deploys it can write) never runs as
/// root, from its first line.
#[test]
fn a_cmd_worker_runs_as_the_workers_user_from_its_first_line() {
    const TEST: &str = "a_cmd_worker_runs_as_the_workers_user_from_its_first_line";
    if !root_and_nobody(TEST) {
        return;
    }
    let dir = TempDir::new("respawn-cmd-user");
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    let who = dir.join("who");
    std::fs::write(&who, "").expect("the record");
    std::fs::set_permissions(&who, std::fs::Permissions::from_mode(0o666)).expect("chmod 0666");
    let script = format!(
        "echo \"uid $(id -u) gid $(id -g) groups $(id -G)\" >> '{}'; exec sleep 600",
        who.display()
    );
    let respawn = Respawn::start(&[
        "--workers",
        "2",
        "--user",
        "nobody",
        "--ready-on-exec",
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    respawn.wait_for_workers(2);
    let mut record = String::new();
    let written = wait_until(PATIENCE, || {
        record = std::fs::read_to_string(&who).unwrap_or_default();
        record.lines().count() >= 2
    });
    assert!(written, "{record:?}\n{}", respawn.dump());
    for line in record.lines() {
        assert_eq!(
            line,
            format!("uid {NOBODY} gid {NOBODY} groups {NOBODY}"),
            "{record:?}"
        );
    }
}

/// A worker taken over must not reach the control socket through an fd it
/// inherited: the master closes the control socket's listener (and its
/// connections) in each worker with its other fds (spawn.rs, step 1).
#[test]
fn no_worker_holds_the_control_socket() {
    let dir = TempDir::new("respawn-control-fds");
    let control = dir.join("control.sock");
    let shown = control.display().to_string();
    let respawn = Respawn::start(&["--workers", "2", "--control", &shown]);
    let workers = respawn.wait_for_workers(2);
    // The listener's inode, from the kernel's table of Unix sockets.
    let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    let inode = table
        .lines()
        .find(|l| l.split_whitespace().nth(7) == Some(shown.as_str()))
        .and_then(|l| l.split_whitespace().nth(6))
        .unwrap_or_else(|| panic!("{shown} is not in /proc/net/unix"))
        .to_owned();
    let target = format!("socket:[{inode}]");
    let holds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .any(|t| t.to_string_lossy() == target)
            })
            .unwrap_or(false)
    };
    assert!(holds(respawn.pid), "the master holds {target}");
    for worker in workers {
        assert!(
            !holds(worker),
            "worker {worker} holds the control socket {target}"
        );
    }
}
