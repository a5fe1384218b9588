//! What the host shows of respawn: the master's process title in
//! /proc/PID/cmdline, the priority prefixes journald reads, the JSON log
//! lines a shipper reads, and what `make install` puts where.

use respawn_tests::*;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// /proc/PID/cmdline as bytes ("" once the process is gone).
fn cmdline(pid: i32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// /proc/PID/cmdline as it would be if it holds one string: that string.
fn title(pid: i32) -> Option<String> {
    let bytes = cmdline(pid);
    let text = bytes.strip_suffix(b"\0")?;
    if text.contains(&0) {
        return None;
    }
    String::from_utf8(text.to_vec()).ok()
}

/// The line the master logs when the kernel does not let it set a title.
fn title_refused(respawn: &Respawn) -> Option<String> {
    respawn
        .log()
        .into_iter()
        .find(|l| message(l).starts_with("not showing the master's state in /proc/"))
}

/// Waits until the master's title is `expected`.
fn wait_for_title(respawn: &Respawn, expected: &str) {
    let mut last = None;
    let shown = wait_until(PATIENCE, || {
        last = title(respawn.pid);
        last.as_deref() == Some(expected)
    });
    assert!(
        shown,
        "the title is {last:?} (cmdline {:?}), not {expected:?}\n{}",
        String::from_utf8_lossy(&cmdline(respawn.pid)),
        respawn.dump()
    );
}

#[test]
fn the_master_title_shows_workers_and_generation() {
    let respawn = Respawn::with_workers(2, &[]);
    if let Some(line) = title_refused(&respawn) {
        skip(
            "the_master_title_shows_workers_and_generation",
            Skip::Environment,
            &format!("the kernel refused: {}", message(&line)),
        );
        return;
    }
    let addr = respawn.addr;
    wait_for_title(
        &respawn,
        &format!("respawn: master, 2 workers, generation 0, {addr}"),
    );
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", respawn.pid)).unwrap_or_default();
    assert_eq!(comm, "respawn master\n");

    respawn.signal(libc::SIGTTIN);
    let workers = respawn.wait_for_workers(3);
    wait_for_title(
        &respawn,
        &format!("respawn: master, 3 workers, generation 0, {addr}"),
    );
    let mut titles: Vec<String> = workers.iter().filter_map(|&pid| title(pid)).collect();
    titles.sort();
    assert_eq!(
        titles,
        ["respawn: worker 0", "respawn: worker 1", "respawn: worker 2"],
        "each worker's /proc/PID/cmdline names its slot"
    );

    respawn.signal(libc::SIGHUP);
    respawn.wait_for_line("rolling restart done: every worker is new");
    wait_for_title(
        &respawn,
        &format!("respawn: master, 3 workers, generation 1, {addr}"),
    );
}

#[test]
fn cmdline_stays_well_formed() {
    let respawn = Respawn::with_workers(1, &[]);
    if let Some(line) = title_refused(&respawn) {
        skip(
            "cmdline_stays_well_formed",
            Skip::Environment,
            &format!("the kernel refused: {}", message(&line)),
        );
        return;
    }
    let addr = respawn.addr;
    wait_for_title(
        &respawn,
        &format!("respawn: master, 1 worker, generation 0, {addr}"),
    );
    // While the title changes (longer and shorter: 1 worker, 2 workers, 10
    // workers), every read sees one whole string: one of the titles.
    let well_formed = |bytes: &[u8]| -> bool {
        let Some(text) = bytes.strip_suffix(b"\0") else {
            return false;
        };
        let Ok(text) = std::str::from_utf8(text) else {
            return false;
        };
        let Some(rest) = text.strip_prefix("respawn: master, ") else {
            return false;
        };
        let Some((count, rest)) = rest.split_once(' ') else {
            return false;
        };
        let noun = if count == "1" { "worker" } else { "workers" };
        count.parse::<u32>().is_ok()
            && rest
                .strip_prefix(noun)
                .and_then(|r| r.strip_prefix(", generation "))
                .is_some_and(|r| {
                    r.split_once(", ").is_some_and(|(generation, address)| {
                        generation.parse::<u32>().is_ok() && address == addr.to_string()
                    })
                })
    };
    // One signal at a time: a second TTIN sent before the first is read
    // is the same pending signal. Every read in between must be one title.
    let mut reads = 0;
    let mut step = |signal: i32, count: usize| {
        respawn.signal(signal);
        let noun = if count == 1 { "worker" } else { "workers" };
        let expected = format!("respawn: master, {count} {noun},");
        let settled = wait_until(PATIENCE, || {
            let bytes = cmdline(respawn.pid);
            assert!(
                well_formed(&bytes),
                "read {reads}: cmdline {:?}\n{}",
                String::from_utf8_lossy(&bytes),
                respawn.dump()
            );
            reads += 1;
            bytes.starts_with(expected.as_bytes())
        });
        assert!(settled, "never {expected:?}\n{}", respawn.dump());
    };
    for count in 2..=10 {
        step(libc::SIGTTIN, count);
    }
    for count in (1..10).rev() {
        step(libc::SIGTTOU, count);
    }

    // What tools read: ps shows the title; pgrep -f finds the master by it,
    // and nothing else; the environment the master was given is intact.
    if let Ok(out) = Command::new("ps")
        .args(["-o", "args=", "-p", &respawn.pid.to_string()])
        .output()
    {
        let shown = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(shown, format!("respawn: master, 1 worker, generation 0, {addr}"));
    } else {
        skip(
            "cmdline_stays_well_formed (what ps shows)",
            Skip::Environment,
            "ps not found (apt-get install procps)",
        );
    }
    if let Ok(out) = Command::new("pgrep")
        .args(["-f", &format!("^respawn: master, .*, {addr}$")])
        .output()
    {
        let found = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(found, respawn.pid.to_string(), "pgrep -f");
    } else {
        skip(
            "cmdline_stays_well_formed (what pgrep finds)",
            Skip::Environment,
            "pgrep not found (apt-get install procps)",
        );
    }
    let environ = std::fs::read(format!("/proc/{}/environ", respawn.pid)).unwrap_or_default();
    assert!(
        environ.split(|&b| b == 0).any(|var| var == b"RUST_LOG=debug"),
        "/proc/PID/environ lost the environment: {:?}",
        String::from_utf8_lossy(&environ)
    );
}

/// A master whose stderr is a file of the test's, started in its own
/// process group; dropping it kills the group.
struct Logged {
    child: Child,
    pid: i32,
    log: PathBuf,
    addr: SocketAddr,
}

impl Logged {
    /// Starts the binary with `args` and `env`, stderr appended to `log`
    /// (created empty first), and waits for the `listening on` line.
    fn start(args: &[&str], env: &[(&str, String)], log: &Path) -> Logged {
        let file = std::fs::File::create(log).expect("creating the log file");
        let mut command = Command::new(binary());
        command
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "debug")
            .env("RUST_LOG_STYLE", "never")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .process_group(0);
        for (name, value) in env {
            command.env(name, value);
        }
        let child = spawn_tied(command).expect("starting the respawn binary");
        let pid = child.id() as i32;
        let mut logged = Logged {
            child,
            pid,
            log: log.to_path_buf(),
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let line = logged.wait_for("the 'listening on' line", |l| l.contains("listening on "));
        let after = &line[line.find("listening on ").unwrap_or(0) + "listening on ".len()..];
        let addr: String = after
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        logged.addr = addr.parse().unwrap_or_else(|_| panic!("no address in {line:?}"));
        logged
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn dump(&self) -> String {
        format!("--- respawn log ---\n{}", self.lines().join("\n"))
    }

    fn wait_for(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let mut found = None;
        wait_until(PATIENCE, || {
            found = self.lines().into_iter().find(|l| matches(l));
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no {what} within {PATIENCE:?}\n{}", self.dump()))
    }

    /// SIGTERM, and the exit awaited: every line is in the file then.
    fn stop(&mut self) {
        send(self.pid, libc::SIGTERM);
        let exited = wait_until(PATIENCE, || matches!(self.child.try_wait(), Ok(Some(_))));
        assert!(exited, "the master did not stop\n{}", self.dump());
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        send(-self.pid, libc::SIGKILL);
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A scratch path of this test's own.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("respawn-host-{}-{name}", std::process::id()))
}

/// `DEV:INO` of a file, as systemd writes JOURNAL_STREAM.
fn dev_ino(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).expect("stat of the log file");
    (meta.dev(), meta.ino())
}

#[test]
fn journald_lines_carry_priority_prefixes() {
    let log = scratch("journal.log");
    // The file must exist to be stat'ed; start() truncates, not replaces it.
    std::fs::File::create(&log).expect("creating the log file");
    let (dev, ino) = dev_ino(&log);
    let mut respawn = Logged::start(
        &["--workers", "1", "--min-uptime", "0"],
        &[("JOURNAL_STREAM", format!("{dev}:{ino}"))],
        &log,
    );
    let ready = respawn.wait_for("a ready line", |l| l.ends_with(" ready"));
    let worker = worker_pid(&ready).expect("a pid in the ready line");
    // A warning: a mature worker killed (--min-uptime 0: mature once Ready).
    send(worker, libc::SIGKILL);
    respawn.wait_for("the warning", |l| {
        l == format!("<4>[WARN ] worker {worker} exited (signal 9), replacing")
    });
    // An error: a worker's panic, logged by the worker itself.
    let answer = get(respawn.addr, "/crash").expect("GET /crash");
    assert_eq!(answer.status, 500);
    respawn.wait_for("the panic", |l| {
        l.starts_with("<3>[ERROR] worker ") && l.contains(" panicked at ")
    });
    respawn.stop();
    let lines = respawn.lines();
    for (prefix, level) in [("<6>", "INFO "), ("<7>", "DEBUG")] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{prefix}[{level}] "))),
            "no {prefix} line\n{}",
            respawn.dump()
        );
    }
    assert!(
        lines.contains(&"<6>[INFO ] all workers stopped, master exiting".to_owned()),
        "{}",
        respawn.dump()
    );
    // Every line: a priority, then the level, and no timestamp (journald
    // has its own).
    for line in &lines {
        let ok = [
            "<3>[ERROR] ",
            "<4>[WARN ] ",
            "<6>[INFO ] ",
            "<7>[DEBUG] ",
            "<7>[TRACE] ",
        ]
        .iter()
        .any(|p| line.starts_with(p));
        assert!(ok, "{line:?} has no priority prefix\n{}", respawn.dump());
    }
}

#[test]
fn a_journal_stream_that_is_not_stderr_is_ignored() {
    let log = scratch("not-journal.log");
    std::fs::File::create(&log).expect("creating the log file");
    let (dev, ino) = dev_ino(&log);
    // What a child of a journald-logged process sees once its stderr was
    // redirected: the variable, inherited, naming another stream.
    let respawn = Logged::start(
        &["--workers", "1"],
        &[("JOURNAL_STREAM", format!("{dev}:{}", ino + 1))],
        &log,
    );
    let first = respawn.lines().into_iter().next().unwrap_or_default();
    assert!(
        first.starts_with("[20") && first.ends_with(&format!(" INFO ] listening on {}", respawn.addr)),
        "{first:?}"
    );
}

/// Each line checked by python3's json module: one object, the six keys in
/// order, and the values as `kind<TAB>pid<TAB>role<TAB>level<TAB>event`.
const CHECK_JSON: &str = r#"
import json, re, sys
for n, line in enumerate(open(sys.argv[1], encoding="utf-8"), 1):
    try:
        obj = json.loads(line)
    except ValueError as err:
        print(f"bad\t{n}\t{err}: {line!r}")
        continue
    keys = list(obj) if isinstance(obj, dict) else None
    if keys != ["time", "level", "pid", "role", "event", "fields"]:
        print(f"bad\t{n}\tkeys {keys}: {line!r}")
    elif not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["time"]):
        print(f"bad\t{n}\ttime {obj['time']!r}")
    elif not isinstance(obj["fields"], dict) or not isinstance(obj["pid"], int):
        print(f"bad\t{n}\tfields or pid: {line!r}")
    else:
        print("ok\t{}\t{}\t{}\t{}".format(obj["pid"], obj["role"], obj["level"], obj["event"]))
"#;

#[test]
fn json_log_lines_are_one_object_each() {
    // python3's json module parses the lines.
    if !require("json_log_lines_are_one_object_each", Need::Python) {
        return;
    }
    let log = scratch("json.log");
    let mut respawn = Logged::start(&["--workers", "1", "--log-format", "json"], &[], &log);
    let master = respawn.pid;
    respawn.wait_for("a ready line", |l| l.contains(" ready\",\"fields\""));
    let answer = get(respawn.addr, "/crash").expect("GET /crash");
    assert_eq!(answer.status, 500);
    respawn.wait_for("the panic", |l| l.contains(" panicked at "));
    respawn.stop();

    let out = Command::new("python3")
        .args(["-c", CHECK_JSON])
        .arg(&log)
        .output()
        .expect("running python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let checked = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<&str>> = checked.lines().map(|l| l.splitn(5, '\t').collect()).collect();
    assert_eq!(
        rows.len(),
        respawn.lines().len(),
        "one object per line\n{checked}"
    );
    let bad: Vec<_> = rows.iter().filter(|r| r[0] != "ok").collect();
    assert!(bad.is_empty(), "{bad:?}\n{}", respawn.dump());
    let master_pid = master.to_string();
    let said = |role: &str, level: &str, event: &dyn Fn(&str) -> bool| {
        rows.iter().any(|r| {
            r[2] == role && r[3] == level && event(r[4]) && (r[1] == master_pid) == (role == "master")
        })
    };
    assert!(
        said("master", "INFO", &|e| e
            == format!("listening on {}", respawn.addr)),
        "{checked}"
    );
    assert!(
        said("worker", "ERROR", &|e| e.starts_with("worker ")
            && e.contains(" panicked at ")),
        "the worker's panic, from the worker\n{checked}"
    );
    assert!(
        said("master", "INFO", &|e| e == "all workers stopped, master exiting"),
        "{checked}"
    );
    for row in &rows {
        assert!(
            ["master", "worker"].contains(&row[2]) && (row[2] == "master") == (row[1] == master_pid),
            "role and pid disagree: {row:?}"
        );
    }
}

/// `make install-files`, the copying half of `make install`, puts the
/// binary at DESTDIR/PREFIX/bin/respawn, mode 0755, the manual pages in
/// share/man/man1, and the documents in share/doc/respawn, laid out as in
/// the source, so that every link between them leads somewhere (they were
/// all put in one directory, where docs/'s links broke). The other half, a release build, takes minutes on a busy
/// 2-core machine, longer than a test should: this installs the debug
/// binary the other tests run, through the same recipe.
#[test]
fn make_install_puts_an_executable_in_destdir() {
    if Command::new("make").arg("--version").output().is_err() {
        skip(
            "make_install_puts_an_executable_in_destdir",
            Skip::Environment,
            "make not found",
        );
        return;
    }
    let destdir = scratch("destdir");
    let _ = std::fs::remove_dir_all(&destdir);
    let out = Command::new("make")
        .current_dir(workspace())
        .arg("--no-print-directory")
        .arg("install-files")
        .arg(format!("DESTDIR={}", destdir.display()))
        .arg(format!("BIN={}", binary().display()))
        .output()
        .expect("running make");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "make install-files failed:\n{said}");
    let installed = destdir.join("usr/local/bin/respawn");
    let meta =
        std::fs::metadata(&installed).unwrap_or_else(|err| panic!("{}: {err}\n{said}", installed.display()));
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o755,
        "{}",
        installed.display()
    );
    let mut command = Command::new(&installed);
    command.arg("--version");
    let (status, version) = run_command_to_exit(command);
    assert_eq!(status.code(), Some(0), "{version}");
    assert!(version.starts_with("respawn "), "{version}");
    for page in ["respawn.1", "respawn-ctl.1"] {
        let installed = destdir.join("usr/local/share/man/man1").join(page);
        let source = workspace().join("docs/man").join(page);
        assert_eq!(
            std::fs::read(&installed).ok(),
            std::fs::read(&source).ok(),
            "{} is not {}\n{said}",
            installed.display(),
            source.display()
        );
    }
    let docdir = destdir.join("usr/local/share/doc/respawn");
    let mut documents = vec![docdir.join("README.md")];
    for entry in std::fs::read_dir(docdir.join("docs")).expect("docs/ installed") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            documents.push(path);
        }
    }
    assert!(documents.len() > 5, "{documents:?}\n{said}");
    for document in &documents {
        let text = std::fs::read_to_string(document).unwrap();
        for target in relative_links(&text) {
            // The source code is not installed: a link to a .rs file leads
            // to the repository (README.md says so).
            if target.ends_with(".rs") {
                continue;
            }
            let path = document.parent().unwrap().join(&target);
            assert!(
                path.exists(),
                "{}: the link to {target} leads nowhere once installed",
                document.display()
            );
        }
    }
    assert!(docdir.join("deploy/respawn.service").is_file(), "{said}");
    let _ = std::fs::remove_dir_all(&destdir);
}

/// The targets of the relative links of a markdown text, `[text](target)`,
/// without their `#anchor`.
fn relative_links(text: &str) -> Vec<String> {
    text.match_indices("](")
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            let target = &rest[..rest.find(')')?];
            let target = target.split('#').next()?;
            let absolute = target.contains("://") || target.starts_with("mailto:");
            (!target.is_empty() && !absolute).then(|| target.to_owned())
        })
        .collect()
}

/// The binary's relative relocations are packed (DT_RELR, master/build.rs)
/// wherever the C library loads such a binary (glibc 2.36 and later): the
/// master then keeps no 67 kB relocation table that only ld.so read at its
/// exec (docs/benchmarks.md, "Memory").
#[test]
fn the_binary_packs_its_relocations_where_glibc_loads_them() {
    const TEST: &str = "the_binary_packs_its_relocations_where_glibc_loads_them";
    if std::env::var_os("RESPAWN_RELR").is_some_and(|v| v == "0") {
        skip(TEST, Skip::Environment, "RESPAWN_RELR=0 builds without DT_RELR");
        return;
    }
    let version = glibc_version();
    let binary = binary();
    let image = std::fs::read(&binary).unwrap_or_else(|err| panic!("{}: {err}", binary.display()));
    let tags = dynamic_tags(&image).unwrap_or_else(|| panic!("{}: no dynamic section", binary.display()));
    const DT_RELR: u64 = 36;
    let packed = tags.contains(&DT_RELR);
    if version >= (2, 36) {
        assert!(
            packed,
            "{} has no DT_RELR though glibc is {version:?}: master/build.rs's probe failed",
            binary.display()
        );
    } else {
        assert!(
            !packed,
            "{} has DT_RELR, which glibc {version:?} cannot load",
            binary.display()
        );
    }
}

/// The running C library's version, (major, minor).
fn glibc_version() -> (u32, u32) {
    // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
    let text = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    let text = text.to_str().expect("glibc's version is ASCII");
    let mut parts = text.split('.').map(|part| part.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The tags of an ELF64 little-endian image's dynamic section, read from
/// its PT_DYNAMIC program header.
fn dynamic_tags(image: &[u8]) -> Option<Vec<u64>> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(image.get(at..at + 8)?.try_into().ok()?));
    if image.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let (table, size, count) = (u64_at(0x20)? as usize, u16_at(0x36)? as usize, u16_at(0x38)?);
    const PT_DYNAMIC: u32 = 2;
    let header = (0..count as usize)
        .map(|i| table + i * size)
        .find(|&at| u32_at(at) == Some(PT_DYNAMIC))?;
    let (offset, length) = (u64_at(header + 8)? as usize, u64_at(header + 32)? as usize);
    Some(
        (offset..offset + length)
            .step_by(16)
            .map_while(u64_at)
            .take_while(|&tag| tag != 0)
            .collect(),
    )
}
