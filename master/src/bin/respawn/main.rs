//! `respawn`: the demo. A master on 127.0.0.1:8080 (or every `--listen`,
//! TCP or Unix, or what systemd's socket activation passed) keeping one
//! worker per CPU, each answering HTTP: `GET /` says which worker answered, `/crash`
//! panics in the handler, `/sleep/<ms>` answers after a while.
//!
//! It is the article's example, done with the library: start it, curl it,
//! crash a worker, and watch the log as it heals.
//!
//! Nothing here uses `print!` or `eprintln!`: they panic when the write
//! fails (`respawn --help >/dev/full`), and a failed write must end in the
//! documented exit code, not 101.

mod args;
mod ctl;
mod help;
mod http;
mod logfmt;

use args::{Args, Parsed};
use log::info;
use respawn_master::Listeners;
use std::io::{self, IsTerminal, Write};
use std::process::exit;

/// Exit code when the master stopped for any other reason than a stop
/// signal: it cannot bind, cannot go on, or could not print its help.
const EXIT_FAILED: i32 = 1;
/// Exit code for a bad flag: a service manager can be told not to restart
/// on it (systemd's RestartPreventExitStatus=2), as no retry will fix it.
const EXIT_BAD_FLAG: i32 = 2;
/// The line after a bad flag's.
const BAD_FLAG_HINT: &str = "'respawn --help' lists the common flags, 'respawn --help-all' every one";

/// Exit code when workers kept failing and the master gave up (gunicorn's
/// WORKER_BOOT_ERROR is 3 too).
const EXIT_GAVE_UP: i32 = 3;

fn main() {
    let mut argv = std::env::args_os().skip(1).peekable();
    // A subcommand, before any master flag: `respawn ctl ...` is a client.
    if argv.next_if(|word| word == "ctl").is_some() {
        exit(ctl(argv));
    }
    let args = match args::parse(argv) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => exit(print(&help::help())),
        Ok(Parsed::HelpAll) => exit(print(&help::help_all())),
        Ok(Parsed::Man) => exit(print(&help::man())),
        Ok(Parsed::Version) => exit(print(&format!("respawn {}\n", env!("CARGO_PKG_VERSION")))),
        Err(err) => {
            // What is wrong, and where the flags are: the whole usage
            // would bury the one line that matters.
            say(&format!("respawn: {err}\n{BAD_FLAG_HINT}\n"));
            exit(EXIT_BAD_FLAG);
        }
    };
    init_logging(args.log_format);
    let code = serve(&args);
    // Whatever the log path still holds goes out before the process does.
    log::logger().flush();
    exit(code);
}

/// `respawn ctl PATH COMMAND`: asks a running master (ctl.rs); the exit
/// code: 0 done, 1 refused or unreachable, 2 bad usage.
fn ctl(argv: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    match args::parse_ctl(argv) {
        Ok(args::CtlParsed::Run(ctl)) => match ctl::run(&ctl) {
            Ok(()) => 0,
            Err(reason) => {
                say(&format!("respawn ctl: {reason}\n"));
                EXIT_FAILED
            }
        },
        Ok(args::CtlParsed::Help) => print(&help::ctl_help()),
        Ok(args::CtlParsed::Man) => print(&help::ctl_man()),
        Err(err) => {
            say(&format!(
                "respawn ctl: {err}\n{}\n'respawn ctl --help' says what each command does\n",
                help::ctl_usage()
            ));
            EXIT_BAD_FLAG
        }
    }
}

fn serve(args: &Args) -> i32 {
    // Before binding and forking: an unknown name stops the master at once.
    // A worker of an upgrade runs this main too, as the user it already
    // became: the master resolved the names, and it looks nothing up (an
    // NSS source that is down must not fail every upgraded worker).
    let run_as = match (&args.user, &args.group) {
        _ if respawn_master::started_as_worker() => None,
        (None, None) => None,
        (user, group) => match respawn_master::RunAs::resolve(user.as_deref(), group.as_deref()) {
            Ok(run_as) => Some(run_as),
            Err(err) => {
                say(&format!(
                    "respawn: --{} {}: {}
",
                    err.what(),
                    err.name(),
                    err.reason()
                ));
                return EXIT_FAILED;
            }
        },
    };
    // A program that cannot run is said now, not found out in a crash loop.
    let exec = match args.command.split_first() {
        None => None,
        Some((command, rest)) => match respawn_master::Exec::new(command, rest.iter().cloned()) {
            Ok(exec) => Some(
                exec.max_requests(args.max_requests, args.max_requests_jitter)
                    .ready_at_exec(args.ready_on_exec)
                    .ready_on_notify(args.ready_on_notify),
            ),
            Err(err) => {
                say(&format!("respawn: -- {err}{}\n", not_on_path(command, &err)));
                return EXIT_FAILED;
            }
        },
    };
    let listeners = match bind(&args.listen, args.listen_mode) {
        Ok(listeners) => listeners,
        Err(code) => return code,
    };
    let from_systemd = listeners
        .iter()
        .any(|l| matches!(l.origin(), respawn_master::Origin::Systemd { .. }));
    if args.listen_given && from_systemd {
        info!(
            "--listen {} not bound: systemd passed the listeners (LISTEN_FDS), and those are served",
            args.listen.join(" --listen ")
        );
    }
    let config = respawn_master::Config::new(args.workers)
        .graceful_timeout(args.graceful_timeout)
        .restart_limit(args.max_restarts, args.restart_window)
        .min_uptime(args.min_uptime)
        .timeout(Some(args.timeout))
        .start_timeout(Some(args.start_timeout));
    let config = match run_as {
        Some(run_as) => config.run_workers_as(run_as),
        None => config,
    };
    let config = match &args.pid_file {
        Some(path) => config.pid_file(path),
        None => config,
    };
    let config = match &args.control {
        Some(path) => config.control(path),
        None => config,
    };
    let config = config
        .ready_on_notify(args.ready_on_notify)
        .retire_once_proved(args.ready_on_exec);
    let config = if args.ready_on_notify {
        config.start_advice(
            "a program run with --ready-on-notify must send READY=1 to the socket its \
             NOTIFY_SOCKET names (sd_notify(3), systemd-notify --ready) before it serves",
        )
    } else if exec.is_some() && !args.ready_on_exec {
        config.start_advice(
            "a program run with -- must say Ready on its channel before it serves: run a Node server \
             through respawn.serve (clients/node/respawn.js), a Python one through respawn.serve or \
             respawn.serve_wsgi (clients/python/respawn.py), or one that speaks neither with \
             --ready-on-exec (docs/protocol.md)",
        )
    } else {
        config
    };
    let worker = respawn_worker::Config::new().max_requests(args.max_requests, args.max_requests_jitter);
    let start = match (args.demo_fail_start, args.demo_hang_start) {
        (true, _) => http::Start::Fail,
        (_, true) => http::Start::Hang,
        _ => http::Start::Normal,
    };
    let bad_ipc = args.demo_bad_ipc;
    let demo = |handoff: respawn_master::Handoff| {
        if let Some(exec) = &exec {
            return exec.run(handoff);
        }
        if bad_ipc {
            speak_a_newer_contract(&handoff);
        }
        respawn_worker::run_with(handoff, http::Demo::new(start), &worker)
    };
    match respawn_master::run(listeners, config, demo) {
        Ok(()) => 0,
        // The master logged why when it decided; say nothing twice.
        Err(respawn_master::Error::GaveUp { .. }) => EXIT_GAVE_UP,
        Err(err) => {
            log::logger().flush();
            say(&format!("respawn: {err}\n"));
            EXIT_FAILED
        }
    }
}

/// A bare name (no `/`) not found is looked up in PATH: say where it was
/// looked for, and how to name a program elsewhere.
fn not_on_path(command: &std::ffi::OsStr, err: &respawn_master::Error) -> String {
    use std::os::unix::ffi::OsStrExt;
    let not_found = matches!(err, respawn_master::Error::Io { source, .. }
        if source.kind() == io::ErrorKind::NotFound);
    if !not_found || command.as_bytes().contains(&b'/') {
        return String::new();
    }
    match std::env::var_os("PATH") {
        Some(path) => format!(
            " in any directory of PATH ({}); give a path for a program elsewhere (./{})",
            path.to_string_lossy(),
            command.to_string_lossy()
        ),
        None => format!(
            ": PATH is not set, so a bare name is found nowhere; give its path (./{})",
            command.to_string_lossy()
        ),
    }
}

/// `--demo-bad-ipc`: before Ready, a frame whose version byte is one this
/// master does not speak, as a worker built against a newer contract would
/// send. The master stops the worker, and since it never was Ready, its exit
/// is a failed start: the slot backs off, and the master gives up in the end.
fn speak_a_newer_contract(handoff: &respawn_master::Handoff) {
    use std::os::fd::AsFd;
    let frame = [respawn_ipc::VERSION + 1, 1, 0, 0];
    let _ = nix::unistd::write(handoff.channel.as_fd(), &frame);
}

/// Binds every `--listen`, the Unix socket files made with `--listen-mode`
/// (by the umask at bind: no chmod by path, which would follow a link put
/// there), or takes the listeners systemd (or an upgrade) passed instead,
/// their files untouched. A failure is said with what would fix it, and is
/// the exit code.
fn bind(listen: &[String], mode: u32) -> Result<Listeners, i32> {
    let addrs: Vec<&str> = listen.iter().map(String::as_str).collect();
    Listeners::bind_all_with_mode(&addrs, mode).map_err(|err| {
        let advice = match &err {
            respawn_master::Error::Io { context, source } => {
                // The address that failed is the one the context names.
                let failed = addrs.iter().find(|a| context.ends_with(*a)).copied();
                failed.map_or_else(String::new, |addr| advice(addr, source.kind()))
            }
            _ => String::new(),
        };
        say(&format!("respawn: {err}{advice}\n"));
        EXIT_FAILED
    })
}

/// What to do about a port in use, the failure a newcomer meets first.
fn advice(listen: &str, kind: io::ErrorKind) -> String {
    if listen.starts_with("unix:") {
        // The error says it all: a live server there, or a file in the way.
        return String::new();
    }
    let (host, port) = listen.rsplit_once(':').unwrap_or(("127.0.0.1", "8080"));
    let port: u16 = port.parse().unwrap_or(8080);
    match kind {
        io::ErrorKind::AddrInUse => {
            let other = format!("{host}:{}", port.checked_add(1).unwrap_or(8081));
            format!(
                "; is another respawn running? choose another port with --listen \
                 (under make: make run ARGS='--listen {other}')"
            )
        }
        // A low port's advice is the library's (listen.rs), for every embedder.
        _ => String::new(),
    }
}

/// Writes to stdout; the exit code: 0 if it got out, 1 if not. (With
/// stdout on /dev/full nothing can be printed, but the code still says.)
fn print(text: &str) -> i32 {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(err) => {
            say(&format!("respawn: writing to stdout: {}\n", describe(&err)));
            EXIT_FAILED
        }
    }
}

/// An io::Error as the end of a sentence: "no space left on device".
fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    chars
        .next()
        .map_or_else(String::new, |first| first.to_lowercase().chain(chars).collect())
}

/// Writes to stderr. If that fails there is nowhere left to say so: the
/// exit code that follows is the only report.
fn say(text: &str) {
    let _ = io::stderr().write_all(text.as_bytes());
}

/// Log lines on stderr, info and up unless RUST_LOG says otherwise, with
/// milliseconds: a respawn takes a few of them. They go through the
/// library's log path, which never blocks the master on a full pipe. Under
/// journald, or with `--log-format json`, logfmt.rs writes them instead.
fn init_logging(format: logfmt::Format) {
    let style = logfmt::Style::for_stderr(format);
    let mut builder = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder
        .format_target(false)
        .target(env_logger::Target::Pipe(Box::new(respawn_master::log_writer())));
    if style.is_plain_text() {
        builder.format_timestamp_millis();
        // env_logger colours a terminal it writes to itself, but cannot see
        // one through a pipe target: decide here, as it would have.
        if colour_wanted() {
            builder.write_style(env_logger::WriteStyle::Always);
        }
    } else {
        builder.format(move |buf, record| {
            let time = buf.timestamp_millis();
            style.write(buf, record, time)
        });
    }
    builder.init();
}

/// RUST_LOG_STYLE unset or `auto`, NO_COLOR unset or empty, and stderr is a
/// terminal.
fn colour_wanted() -> bool {
    let auto = std::env::var("RUST_LOG_STYLE").map_or(true, |style| style == "auto");
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    auto && !no_color && io::stderr().is_terminal()
}
