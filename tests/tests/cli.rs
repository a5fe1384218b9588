//! Bad input at the command line gets one clear line and a failing exit
//! code, and forks nothing.

use respawn_tests::*;

#[test]
fn bad_flags_and_port_in_use_fail_clearly() {
    for (args, expected) in [
        (&["--bogus"][..], "invalid option '--bogus'"),
        (&["--workers", "many"][..], "many"),
        (&["--workers", "0"][..], "--workers must be between 1 and"),
        (&["--workers"][..], "missing argument"),
        (&["--graceful-timeout", "-3"][..], "--graceful-timeout"),
    ] {
        let (status, output) = run_to_exit(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        assert!(
            output.contains(expected),
            "{args:?} should say {expected:?}: {output}"
        );
        assert!(output.contains("usage: respawn"), "{args:?}: {output}");
    }

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, output) = run_to_exit(&["--workers", "2", "--listen", &addr]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains(&format!("binding {addr}: address already in use")),
        "{output}"
    );
    assert!(!output.contains("spawned"), "no worker is forked: {output}");

    // An address this host does not have.
    let (status, output) = run_to_exit(&["--listen", "192.0.2.1:0"]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("binding 192.0.2.1:0: cannot assign requested address"),
        "{output}"
    );

    let (status, output) = run_to_exit(&["--listen", "no-such-host.invalid:80"]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(output.contains("resolving no-such-host.invalid:80"), "{output}");
}

#[test]
fn missing_permission_is_said_clearly() {
    // Ports below ip_unprivileged_port_start need privilege. As root, run
    // as nobody (uid 65534) to lack it.
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    if start <= 1 {
        eprintln!("every port is unprivileged on this host: nothing to deny");
        return;
    }
    let mut command = std::process::Command::new(binary());
    let dir = std::env::temp_dir().join(format!("respawn-permission-{}", std::process::id()));
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        // nobody may not reach the build tree (a clone under /root, say):
        // give it a copy of the binary in a place it can reach.
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("respawn");
        std::fs::copy(binary(), &copy).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        command = std::process::Command::new(&copy);
        std::os::unix::process::CommandExt::uid(&mut command, 65534);
        std::os::unix::process::CommandExt::gid(&mut command, 65534);
    }
    command.args(["--listen", "127.0.0.1:1"]);
    let (status, output) = run_command_to_exit(command);
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("respawn-permission-{}", std::process::id())),
    );
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("binding 127.0.0.1:1: permission denied"),
        "{output}"
    );
    assert!(!output.contains("spawned"), "{output}");
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
    let answer = exchange(respawn.addr, &[b'a'; 9000]).unwrap_or_default();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer:?}"
    );
    // Bad requests are the client's fault: the same worker still serves.
    let answer = respawn.get("/").unwrap();
    assert_eq!(answer.pid(), Some(worker));
    assert_eq!(respawn.count_log("spawned"), 1);
}
