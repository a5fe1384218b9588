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
