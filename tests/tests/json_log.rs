//! `--log-format json`: one object per line, the sentence kept in `event`
//! and its facts as fields, for a log pipeline (Loki, Elasticsearch,
//! journald's fields) to filter on. Every line of a run with a crash, a HUP,
//! an upgrade and a stop is parsed.

use respawn_tests::*;
use serde_json::Value;
use std::process::{Child, Command, Stdio};

/// The master, killed with its group on drop whatever happens.
struct Master(Child);

impl Drop for Master {
    fn drop(&mut self) {
        // SAFETY-free: kill(2) on our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn lines(log: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}")))
        .collect()
}

fn wait_for(log: &std::path::Path, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    let seen = wait_until(PATIENCE, || {
        found = lines(log).into_iter().find(|l| matches(l));
        found.is_some()
    });
    assert!(
        seen,
        "no {what} line in\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    found.expect("found")
}

fn kind(line: &Value) -> &str {
    line["fields"]["kind"].as_str().unwrap_or_default()
}

#[test]
fn every_json_line_of_a_crash_a_hup_an_upgrade_and_a_stop_carries_its_facts() {
    use std::os::unix::process::CommandExt;
    let deploy = Deploy::new("json-log");
    let log = deploy.dir.join("log.json");
    let mut command = Command::new(&deploy.path);
    command
        .args([
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("the log file"))
        .process_group(0);
    let mut master = Master(spawn_tied(command).expect("starting respawn"));
    let pid = master.0.id() as i32;

    let listening = wait_for(&log, "listening", |l| kind(l) == "listening");
    let addr: std::net::SocketAddr = listening["fields"]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("the address, as a field");
    wait_until(PATIENCE, || {
        lines(&log).iter().filter(|l| kind(l) == "ready").count() >= 2
    });

    let crash = get(addr, "/crash").expect("GET /crash");
    assert_eq!(crash.status, 500);
    let crashed = worker_pid(&crash.body).expect("the crashed worker");
    let exited = wait_for(&log, "the crashed worker's exit", |l| {
        kind(l) == "exited" && l["fields"]["worker"] == crashed
    });
    assert_eq!(exited["fields"]["exit_code"], 70, "{exited}");
    assert!(
        exited["fields"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("crash requested by GET /crash")),
        "{exited}"
    );
    let suicide = wait_for(&log, "the suicide", |l| kind(l) == "suicide");
    assert_eq!(suicide["fields"]["worker"], crashed, "{suicide}");

    send(pid, libc::SIGHUP);
    let hup = wait_for(&log, "the HUP", |l| {
        kind(l) == "signal" && l["fields"]["signal_name"] == "SIGHUP"
    });
    assert_eq!(hup["role"], "master");
    wait_for(&log, "the rollout's end", |l| kind(l) == "rollout_done");

    deploy.replace_with_build("json");
    send(pid, libc::SIGUSR2);
    wait_for(&log, "the re-execution", |l| kind(l) == "reexecuted");

    send(pid, libc::SIGTERM);
    let status = master.0.wait().expect("the master's exit");
    assert_eq!(status.code(), Some(0));
    wait_for(&log, "the stop", |l| kind(l) == "stopped");

    let all = lines(&log);
    assert!(all.len() > 20, "{} lines", all.len());
    for line in &all {
        for key in ["time", "level", "pid", "role", "event"] {
            assert!(!line[key].is_null(), "no {key} in {line}");
        }
        assert!(line["fields"].is_object(), "{line}");
        if ["spawned", "ready", "exited", "suicide"].contains(&kind(line)) {
            assert!(
                line["fields"]["worker"].is_u64(),
                "a worker line without its worker: {line}"
            );
        }
    }
    let kinds: std::collections::BTreeSet<&str> = all.iter().map(kind).collect();
    for expected in [
        "listening",
        "spawned",
        "ready",
        "suicide",
        "exited",
        "signal",
        "retiring",
        "rollout_done",
        "reexecuting",
        "reexecuted",
        "stopped",
    ] {
        assert!(kinds.contains(expected), "no {expected} line among {kinds:?}");
    }
}
