//! fork copies only the calling thread; the master refuses to start in a
//! process that runs others. A test binary is one: libtest runs each test
//! on a thread of its own.

#[test]
fn refuses_to_fork_in_a_threaded_process() {
    let listener = respawn_master::bind("127.0.0.1:0").expect("binding an ephemeral port");
    let forked = std::cell::Cell::new(false);
    let result = respawn_master::run(listener, respawn_master::Config::new(2), |_| {
        forked.set(true);
        0
    });
    let err = result.expect_err("run must refuse");
    assert!(
        matches!(err, respawn_master::Error::Threads { count } if count > 1),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("refusing to fork from a process that runs"),
        "{err}"
    );
    assert!(!forked.get(), "no worker was forked");
}
