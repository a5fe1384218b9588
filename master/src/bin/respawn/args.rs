//! Command-line flags, each with a range.
//!
//! Every flag that takes a number has an upper bound, checked here: a value
//! the parser accepts must never crash the master later (`--graceful-timeout
//! 1e19` would overflow an `Instant` on the first stop; `--max-restarts 10^12`
//! would ask for terabytes up front). A value out of range, or one that does
//! not parse, gets one line that names the flag and its range, and exit 2.

use crate::ctl::{Command, Ctl};
use crate::logfmt::Format;
use lexopt::prelude::*;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub const USAGE: &str = "\
usage: respawn [-w N] [-l HOST:PORT|unix:PATH]... [--listen-mode OCTAL]
       [--graceful-timeout SECS] [-t SECS]
       [--start-timeout SECS] [--max-requests N] [--max-requests-jitter J]
       [--max-restarts R] [--restart-window SECS] [--min-uptime SECS]
       [--user NAME] [--group NAME] [--pid-file PATH] [--control PATH]
       [--log-format text|json] [--ready-on-exec | --ready-on-notify]
       [--demo-fail-start | --demo-hang-start | --demo-bad-ipc]
       [-h|--help] [-V|--version] [-- CMD [ARGS...]]
   or: respawn ctl PATH COMMAND  (respawn ctl --help)";

/// At most 80 columns and 40 lines, so that it reads whole in a terminal
/// (a test checks). The ranges are the constants below (a test checks that
/// too).
pub const HELP: &str = "\
respawn: a prefork supervisor, and a demo HTTP server to watch it heal
usage: respawn [flags] [-- CMD [ARGS...]]   SECS may have a fraction

  -w, --workers N              1 to 4096 workers to keep alive [one per CPU]
  -l, --listen HOST:PORT       port 0 to 65535, 0 picks one [127.0.0.1:8080]
      --listen unix:PATH       a Unix socket; repeat --listen for several
      --listen-mode OCTAL      0 to 0777: the Unix socket files' mode [0660]
      --graceful-timeout SECS  0 to 86400: time to finish when stopping [30]
  -t, --timeout SECS           0 to 86400, 0 off: kill a worker busy longer [60]
      --start-timeout SECS     0 to 86400, 0 off: deadline to say Ready [60]
      --max-requests N         0 to 10^12, 0 off: retire a worker after N [0]
      --max-requests-jitter J  0 to 10^12: plus a random 0 to J [0]
      --max-restarts R         0 to 10000: give up (exit 3) after more than R
      --restart-window SECS    0 to 604800: ...restarts within SECS [10 in 60]
      --min-uptime SECS        0 to 86400: dying sooner backs the slot off [1]
      --user NAME              workers run as NAME (and its group); needs root
      --group NAME             workers run with group NAME
      --pid-file PATH          the master's pid, written at start
      --control PATH           a control socket for `respawn ctl PATH ...`
      --log-format FORMAT      text, or json: one object per line [text]
      --demo-fail-start        every worker panics before Ready: a crash loop
      --demo-hang-start        every worker hangs before Ready (--start-timeout)
      --demo-bad-ipc           every worker speaks a newer ipc version: backoff
      --ready-on-exec          CMD does not speak docs/protocol.md: Ready
                               once executed, no handover
      --ready-on-notify        CMD says READY=1 to its own $NOTIFY_SOCKET
  -h, --help, -V, --version    this help, the version
  -- CMD [ARGS...]             workers run CMD (node app.js...) instead of
                               the demo, listeners at fd 3 (LISTEN_FDS)

defaults in [brackets].  The demo's routes, without -- CMD:
routes: GET /     which worker answered   GET /crash     the handler panics
        GET /hang spins: for --timeout    GET /sleep/MS  answers after MS ms
        GET /version which build answers  GET /exit      exits hard, unanswered
signals: TERM, QUIT stop gracefully, INT at once, HUP replaces every worker,
         TTIN adds a worker, TTOU removes one, USR2 upgrades to the binary
         now on disk (backs out if it fails).  RUST_LOG=debug logs more.
control: respawn ctl PATH status [--json] [--watch] | metrics | scale N
         | reload | upgrade | stop [--now]   ('respawn ctl --help' says more)
exit: 0 stopped, 1 failed (cannot bind...), 2 bad flag, 3 gave up
";

/// Where the demo listens when no --listen is given.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// 0660: the owner and the group may connect, nobody else. Connecting to a
/// Unix socket needs write permission on its file, so this is the access
/// control; php-fpm's `listen.mode` defaults to the same. 0666 would let
/// every local user in, a choice to make on purpose; the umask alone
/// (usually 022, giving 0755) would let in only the owner, which breaks the
/// usual set-up of a proxy running as another user in the socket's group.
const DEFAULT_LISTEN_MODE: u32 = 0o660;

/// A socket address holds a path of at most 107 bytes and a NUL (`sun_path`
/// is 108 bytes on Linux).
const MAX_UNIX_PATH: usize = 107;

const DAY: u64 = 24 * 60 * 60;
const WEEK: u64 = 7 * DAY;

/// A flag that takes a whole number from `min` to `max`.
struct Whole {
    flag: &'static str,
    min: u64,
    max: u64,
}

/// A flag that takes seconds, fractions allowed, from 0 to `max`.
struct Seconds {
    flag: &'static str,
    max: u64,
}

impl Whole {
    const fn new(flag: &'static str, min: u64, max: u64) -> Whole {
        Whole { flag, min, max }
    }
}

impl Seconds {
    const fn new(flag: &'static str, max: u64) -> Seconds {
        Seconds { flag, max }
    }
}

/// A typo must not fork-bomb the host.
const WORKERS: Whole = Whole::new("--workers", 1, 4096);
/// The restart record holds up to this many entries (16 bytes each).
const MAX_RESTARTS: Whole = Whole::new("--max-restarts", 0, 10_000);
/// Far beyond any worker's life, far below an overflow of max plus jitter.
const MAX_REQUESTS: Whole = Whole::new("--max-requests", 0, 1_000_000_000_000);
/// The same: max plus jitter stays far from u64::MAX.
const MAX_REQUESTS_JITTER: Whole = Whole::new("--max-requests-jitter", 0, 1_000_000_000_000);
/// A day: longer than any sane request, far from overflowing an Instant.
const GRACEFUL_TIMEOUT: Seconds = Seconds::new("--graceful-timeout", DAY);
const TIMEOUT: Seconds = Seconds::new("--timeout", DAY);
const START_TIMEOUT: Seconds = Seconds::new("--start-timeout", DAY);
/// A week: the longest window in which a count of restarts still says
/// something about a crash loop.
const RESTART_WINDOW: Seconds = Seconds::new("--restart-window", WEEK);
const MIN_UPTIME: Seconds = Seconds::new("--min-uptime", DAY);

pub struct Args {
    pub workers: usize,
    /// `host:port` or `unix:/path`, in the order given.
    pub listen: Vec<String>,
    /// The permission bits of the Unix socket files the demo binds.
    pub listen_mode: u32,
    pub graceful_timeout: Duration,
    pub max_restarts: usize,
    pub restart_window: Duration,
    pub min_uptime: Duration,
    pub timeout: Duration,
    pub start_timeout: Duration,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub demo_fail_start: bool,
    pub demo_hang_start: bool,
    pub demo_bad_ipc: bool,
    /// Resolved when the master starts, not here: an unknown name is the
    /// host's state (exit 1), like a host name in --listen.
    pub user: Option<String>,
    pub group: Option<String>,
    pub pid_file: Option<PathBuf>,
    /// The control socket (docs/control.md).
    pub control: Option<PathBuf>,
    /// `-- CMD [ARGS...]`: each worker executes it (docs/protocol.md).
    pub command: Vec<std::ffi::OsString>,
    /// `--ready-on-exec`: CMD does not speak the channel.
    pub ready_on_exec: bool,
    /// `--ready-on-notify`: CMD speaks sd_notify instead of the channel.
    pub ready_on_notify: bool,
    /// `--listen` was given (not the default): said if systemd's
    /// listeners are taken instead.
    pub listen_given: bool,
    pub log_format: Format,
}

// Made once per run and taken apart at once: a Box would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    Run(Args),
    Help,
    Version,
}

pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Parsed, lexopt::Error> {
    // `-- CMD [ARGS...]`: everything after the first `--` is the command
    // each worker runs, its own flags included.
    let mut argv: Vec<OsString> = argv.into_iter().collect();
    let dashes = argv.iter().position(|arg| arg == "--");
    let command = match dashes {
        Some(at) => {
            let command = argv.split_off(at + 1);
            argv.pop();
            command
        }
        None => Vec::new(),
    };
    if dashes.is_some() && command.is_empty() {
        // Without this, `respawn --` would serve the demo on 8080, silently.
        return Err("--: no command after it (respawn [flags] -- CMD [ARGS...])".into());
    }
    let (mut timeout_given, mut max_requests_given) = (false, false);
    let mut args = Args {
        workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        listen: Vec::new(),
        listen_mode: DEFAULT_LISTEN_MODE,
        graceful_timeout: Duration::from_secs(30),
        max_restarts: 10,
        restart_window: Duration::from_secs(60),
        min_uptime: Duration::from_secs(1),
        timeout: Duration::from_secs(60),
        start_timeout: Duration::from_secs(60),
        max_requests: 0,
        max_requests_jitter: 0,
        demo_fail_start: false,
        demo_hang_start: false,
        demo_bad_ipc: false,
        user: None,
        group: None,
        pid_file: None,
        control: None,
        command,
        ready_on_exec: false,
        ready_on_notify: false,
        listen_given: false,
        log_format: Format::Text,
    };
    let mut parser = lexopt::Parser::from_args(argv);
    while let Some(arg) = parser.next()? {
        match arg {
            // Both bounds fit in usize on every target Rust supports.
            Short('w') | Long("workers") => args.workers = WORKERS.parse(&mut parser)? as usize,
            Short('l') | Long("listen") => args.listen.push(listen(&mut parser)?),
            Long("listen-mode") => args.listen_mode = listen_mode(&mut parser)?,
            Long("graceful-timeout") => args.graceful_timeout = GRACEFUL_TIMEOUT.parse(&mut parser)?,
            Long("max-restarts") => args.max_restarts = MAX_RESTARTS.parse(&mut parser)? as usize,
            Long("restart-window") => args.restart_window = RESTART_WINDOW.parse(&mut parser)?,
            Short('t') | Long("timeout") => {
                args.timeout = TIMEOUT.parse(&mut parser)?;
                timeout_given = !args.timeout.is_zero();
            }
            Long("start-timeout") => args.start_timeout = START_TIMEOUT.parse(&mut parser)?,
            Long("max-requests") => {
                args.max_requests = MAX_REQUESTS.parse(&mut parser)?;
                max_requests_given = args.max_requests > 0;
            }
            Long("max-requests-jitter") => {
                args.max_requests_jitter = MAX_REQUESTS_JITTER.parse(&mut parser)?
            }
            Long("min-uptime") => args.min_uptime = MIN_UPTIME.parse(&mut parser)?,
            Long("log-format") => args.log_format = log_format(&mut parser)?,
            Long("demo-fail-start") => args.demo_fail_start = true,
            Long("demo-hang-start") => args.demo_hang_start = true,
            Long("demo-bad-ipc") => args.demo_bad_ipc = true,
            Long("user") => args.user = Some(text(&mut parser, "--user")?),
            Long("group") => args.group = Some(text(&mut parser, "--group")?),
            Long("pid-file") => args.pid_file = Some(parser.value()?.into()),
            Long("control") => args.control = Some(parser.value()?.into()),
            Long("ready-on-exec") => args.ready_on_exec = true,
            Long("ready-on-notify") => args.ready_on_notify = true,
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            _ => return Err(arg.unexpected()),
        }
    }
    args.listen_given = !args.listen.is_empty();
    if args.listen.is_empty() {
        args.listen.push(DEFAULT_LISTEN.to_owned());
    }
    if args.listen.len() > respawn_ipc::MAX_LISTENERS {
        return Err(format!("--listen: at most {} listeners", respawn_ipc::MAX_LISTENERS).into());
    }
    let demos = [args.demo_fail_start, args.demo_hang_start, args.demo_bad_ipc];
    if demos.into_iter().filter(|&on| on).count() > 1 {
        return Err(
            "--demo-fail-start, --demo-hang-start and --demo-bad-ipc exclude each other: pick one".into(),
        );
    }
    if args.ready_on_notify && args.command.is_empty() {
        return Err(
            "--ready-on-notify: only with a command to run (respawn [flags] -- CMD [ARGS...])".into(),
        );
    }
    if args.ready_on_notify && args.ready_on_exec {
        return Err("--ready-on-exec and --ready-on-notify exclude each other: pick one".into());
    }
    if args.ready_on_notify && max_requests_given {
        return Err(
            "--max-requests cannot work with --ready-on-notify: the program sends no Suicide \
                    to hand over after its share (make it speak the channel: docs/protocol.md)"
                .into(),
        );
    }
    if args.ready_on_exec && args.command.is_empty() {
        return Err("--ready-on-exec: only with a command to run (respawn [flags] -- CMD [ARGS...])".into());
    }
    // A program that does not speak the channel sends no Busy or Idle
    // marks and no Suicide: the master could neither see a request hang
    // nor hand over after a share of requests.
    if args.ready_on_exec && timeout_given {
        return Err(
            "--timeout cannot work with --ready-on-exec: the program sends no Busy marks, \
                    so no request is seen to hang (give --timeout 0, or make the program speak \
                    the channel: docs/protocol.md)"
                .into(),
        );
    }
    if args.ready_on_exec && max_requests_given {
        return Err(
            "--max-requests cannot work with --ready-on-exec: the program sends no Suicide \
                    to hand over after its share (make it speak the channel: docs/protocol.md)"
                .into(),
        );
    }
    refuse_shared_paths(&args)?;
    Ok(Parsed::Run(args))
}

/// `--control`, `--pid-file` and each `--listen unix:` make a file of their
/// own at their path: given one path twice, the one made last would replace
/// the other (the pid file the control socket, say). Compared after a
/// lexical normalisation (`./x`, `x`, `d//x`, `d/../x` are one path);
/// links are not looked at, as the files may not exist yet.
fn refuse_shared_paths(args: &Args) -> Result<(), lexopt::Error> {
    let mut files: Vec<(String, &Path)> = Vec::new();
    if let Some(path) = &args.control {
        files.push((format!("--control {:?}", path.display().to_string()), path));
    }
    if let Some(path) = &args.pid_file {
        files.push((format!("--pid-file {:?}", path.display().to_string()), path));
    }
    for listen in &args.listen {
        if let Some(path) = listen.strip_prefix("unix:") {
            files.push((format!("--listen {listen:?}"), Path::new(path)));
        }
    }
    for (at, (first, path)) in files.iter().enumerate() {
        let same = files[at + 1..]
            .iter()
            .find(|(_, other)| lexical(other) == lexical(path));
        if let Some((second, _)) = same {
            return Err(
                format!("{first} and {second} name the same file: give each a path of its own").into(),
            );
        }
    }
    Ok(())
}

/// `path` made absolute against the current directory, without `.` or
/// empty components, each `..` taking off the component before it.
fn lexical(path: &Path) -> PathBuf {
    let absolute = match std::env::current_dir() {
        Ok(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    };
    let mut normal = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    normal
}

/// A flag's value as text; the error names the flag.
fn text(parser: &mut lexopt::Parser, flag: &str) -> Result<String, lexopt::Error> {
    parser
        .value()?
        .into_string()
        .map_err(|_| format!("{flag}: the value is not valid UTF-8").into())
}

impl Whole {
    fn parse(&self, parser: &mut lexopt::Parser) -> Result<u64, lexopt::Error> {
        let value = text(parser, self.flag)?;
        match value.parse::<u64>() {
            Ok(n) if (self.min..=self.max).contains(&n) => Ok(n),
            _ => Err(format!(
                "{}: {value:?} is not a whole number from {} to {}",
                self.flag,
                self.min,
                shown(self.max)
            )
            .into()),
        }
    }
}

impl Seconds {
    fn parse(&self, parser: &mut lexopt::Parser) -> Result<Duration, lexopt::Error> {
        let value = text(parser, self.flag)?;
        match value.parse::<f64>() {
            // NaN and the infinities fail the range check too.
            Ok(secs) if (0.0..=self.max as f64).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
            _ => Err(format!(
                "{}: {value:?} is not a number of seconds from 0 to {}",
                self.flag, self.max
            )
            .into()),
        }
    }
}

/// A bound as --help writes it: 10^12 rather than thirteen digits.
fn shown(n: u64) -> String {
    match n {
        1_000_000_000_000 => "10^12".to_owned(),
        n => n.to_string(),
    }
}

/// `--listen`: checked for form here, so that a typo is a bad flag (exit 2,
/// which a service manager can be told not to restart on), while a name that
/// does not resolve is left to bind time (exit 1): DNS can fail for a while.
fn listen(parser: &mut lexopt::Parser) -> Result<String, lexopt::Error> {
    let value = text(parser, "--listen")?;
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() || path.len() > MAX_UNIX_PATH {
            return Err(format!(
                "--listen: {value:?} is not unix:PATH with a path of 1 to {MAX_UNIX_PATH} bytes"
            )
            .into());
        }
        return Ok(value);
    }
    if value.parse::<SocketAddr>().is_ok() || is_name_and_port(&value) {
        return Ok(value);
    }
    Err(format!(
        "--listen: {value:?} is not HOST:PORT with a port from 0 to 65535 \
         (127.0.0.1:8080, [::1]:8080, localhost:8080)"
    )
    .into())
}

/// `--log-format text|json`.
fn log_format(parser: &mut lexopt::Parser) -> Result<Format, lexopt::Error> {
    let value = text(parser, "--log-format")?;
    Format::parse(&value).ok_or_else(|| format!("--log-format: {value:?} is not text or json").into())
}

/// `--listen-mode`: octal permission bits, 0 to 0777 (no setuid, setgid or
/// sticky bit: they mean nothing on a socket).
fn listen_mode(parser: &mut lexopt::Parser) -> Result<u32, lexopt::Error> {
    let value = text(parser, "--listen-mode")?;
    match u32::from_str_radix(value.strip_prefix("0o").unwrap_or(&value), 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("--listen-mode: {value:?} is not an octal mode from 0 to 0777 (0660, 0600)").into()),
    }
}

/// `name:port`, where name is a host name (an IPv6 address needs brackets,
/// and `SocketAddr` has taken those already).
fn is_name_and_port(value: &str) -> bool {
    let Some((host, port)) = value.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok() && is_host_name(host)
}

/// RFC 1123 labels (plus `_`, which resolvers pass through). A name whose
/// last label is all digits must be an IPv4 address: no top-level domain is
/// numeric, so `999.1.1.1` is a typo, not a name.
fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let labels_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    let numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && (!numeric || host.parse::<Ipv4Addr>().is_ok())
}

/// What `respawn ctl ...` asks for.
#[derive(Debug, PartialEq)]
pub enum CtlParsed {
    Run(Ctl),
    Help,
}

/// `respawn ctl PATH COMMAND [N] [FLAGS]`: the words after `ctl`. It is a
/// subcommand, parsed before the master's flags (main.rs looks at the first
/// word), so `respawn ctl ...` never starts a master. Flags may come
/// anywhere, but only with the command they belong to.
pub fn parse_ctl(argv: impl IntoIterator<Item = OsString>) -> Result<CtlParsed, lexopt::Error> {
    let mut words = Vec::new();
    let (mut json, mut watch, mut now) = (false, false, false);
    let mut parser = lexopt::Parser::from_args(argv);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('h') | Long("help") => return Ok(CtlParsed::Help),
            Long("json") => json = true,
            Long("watch") => watch = true,
            Long("now") => now = true,
            Value(word) => words.push(word),
            _ => return Err(arg.unexpected()),
        }
    }
    let mut words = words.into_iter();
    let (Some(path), Some(command)) = (words.next(), words.next()) else {
        return Err("a PATH (the master's --control) and a COMMAND are needed".into());
    };
    let command = command.to_string_lossy().into_owned();
    let argument = words.next().map(|word| word.to_string_lossy().into_owned());
    if let Some(extra) = words.next() {
        return Err(format!("{:?}: one word too many", extra.to_string_lossy()).into());
    }
    let command = match (command.as_str(), argument) {
        ("status", None) => Command::Status { json, watch },
        ("scale", Some(n)) => match n.parse::<u64>() {
            Ok(n) => Command::Scale(n),
            Err(_) => return Err(format!("scale: {n:?} is not a whole number of workers").into()),
        },
        ("scale", None) => return Err("scale: how many workers? (scale N)".into()),
        ("metrics", None) => Command::Metrics,
        ("reload", None) => Command::Reload,
        ("upgrade", None) => Command::Upgrade,
        ("stop", None) => Command::Stop { now },
        ("status" | "metrics" | "reload" | "upgrade" | "stop", Some(extra)) => {
            return Err(format!("{command}: {extra:?} is one word too many").into())
        }
        _ => {
            return Err(format!(
                "{command:?} is not a command: status, metrics, scale N, reload, upgrade, stop"
            )
            .into())
        }
    };
    let status = matches!(command, Command::Status { .. });
    if (json || watch) && !status {
        let flag = if json { "--json" } else { "--watch" };
        return Err(format!("{flag} goes with status only").into());
    }
    if now && !matches!(command, Command::Stop { .. }) {
        return Err("--now goes with stop only".into());
    }
    Ok(CtlParsed::Run(Ctl {
        path: path.into(),
        command,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Parsed, String> {
        parse(args.iter().map(OsString::from)).map_err(|e| e.to_string())
    }

    fn err(args: &[&str]) -> String {
        parse_strs(args).err().unwrap_or_default()
    }

    #[test]
    fn log_format_is_text_or_json() {
        let format = |argv: &[&str]| match parse_strs(argv) {
            Ok(Parsed::Run(args)) => Some(args.log_format),
            _ => None,
        };
        assert_eq!(format(&[]), Some(Format::Text));
        assert_eq!(format(&["--log-format", "json"]), Some(Format::Json));
        assert_eq!(format(&["--log-format=text"]), Some(Format::Text));
        assert_eq!(
            err(&["--log-format", "JSON"]),
            r#"--log-format: "JSON" is not text or json"#
        );
    }

    #[test]
    fn flags_set_what_they_name() {
        let Ok(Parsed::Run(args)) = parse_strs(&[
            "--workers",
            "3",
            "--listen",
            "[::1]:0",
            "--graceful-timeout",
            "2.5",
            "--start-timeout",
            "0",
            "--demo-hang-start",
            "--max-requests",
            "1000000000000",
            "--restart-window",
            "604800",
        ]) else {
            panic!("flags rejected")
        };
        assert_eq!(args.workers, 3);
        assert_eq!(args.listen, ["[::1]:0"]);
        assert_eq!(args.listen_mode, 0o660);
        assert_eq!(args.graceful_timeout, Duration::from_millis(2500));
        assert_eq!(args.start_timeout, Duration::ZERO);
        assert!(args.demo_hang_start);
        assert_eq!(args.max_requests, 1_000_000_000_000);
        assert_eq!(args.restart_window, Duration::from_secs(WEEK));
        assert_eq!((args.user, args.group, args.pid_file), (None, None, None));
        let Ok(Parsed::Run(args)) = parse_strs(&[
            "--user",
            "nobody",
            "--group",
            "nogroup",
            "--pid-file",
            "/run/x.pid",
        ]) else {
            panic!("flags rejected")
        };
        assert_eq!(args.user.as_deref(), Some("nobody"));
        assert_eq!(args.group.as_deref(), Some("nogroup"));
        assert_eq!(args.pid_file, Some(PathBuf::from("/run/x.pid")));
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        assert!(err(&["--bogus"]).contains("--bogus"));
        assert_eq!(
            err(&["--workers", "many"]),
            r#"--workers: "many" is not a whole number from 1 to 4096"#
        );
        assert_eq!(
            err(&["-w", "0"]),
            r#"--workers: "0" is not a whole number from 1 to 4096"#
        );
        assert!(err(&["--workers"]).contains("missing"));
        assert_eq!(
            err(&["--graceful-timeout", "-1"]),
            r#"--graceful-timeout: "-1" is not a number of seconds from 0 to 86400"#
        );
        assert!(err(&["extra"]).contains("extra"));
        assert!(err(&["--demo-fail-start", "--demo-hang-start"]).contains("exclude each other"));
    }

    #[test]
    fn one_path_for_two_files_is_refused() {
        for (args, expected) in [
            (
                &["--control", "/run/x", "--pid-file", "/run/x"][..],
                r#"--control "/run/x" and --pid-file "/run/x" name the same file"#,
            ),
            (
                &["--pid-file", "/run//app/./x", "--control", "/run/app/x/"][..],
                r#"--control "/run/app/x/" and --pid-file "/run//app/./x" name the same file"#,
            ),
            (
                &["--listen", "unix:/run/x", "--pid-file", "/run/d/../x"][..],
                r#"--pid-file "/run/d/../x" and --listen "unix:/run/x" name the same file"#,
            ),
            (
                &["--control", "x.sock", "--listen", "unix:./x.sock"][..],
                r#"--control "x.sock" and --listen "unix:./x.sock" name the same file"#,
            ),
        ] {
            assert_eq!(
                err(args),
                format!("{expected}: give each a path of its own"),
                "{args:?}"
            );
        }
        let distinct = parse_strs(&[
            "--control",
            "/run/x.sock",
            "--pid-file",
            "/run/x.pid",
            "--listen",
            "unix:/run/y",
        ]);
        assert!(distinct.is_ok(), "{:?}", distinct.err());
    }

    #[test]
    fn every_number_has_an_upper_bound() {
        for (flag, too_big, range) in [
            ("--workers", "4097", "from 1 to 4096"),
            ("--max-restarts", "1000000000000", "from 0 to 10000"),
            ("--max-requests", "1000000000001", "from 0 to 10^12"),
            ("--max-requests-jitter", "18446744073709551615", "from 0 to 10^12"),
            ("--graceful-timeout", "1e19", "from 0 to 86400"),
            ("--timeout", "86400.5", "from 0 to 86400"),
            ("--start-timeout", "inf", "from 0 to 86400"),
            ("--restart-window", "604801", "from 0 to 604800"),
            ("--min-uptime", "NaN", "from 0 to 86400"),
        ] {
            let message = err(&[flag, too_big]);
            assert!(
                message.starts_with(&format!("{flag}: \"{too_big}\" is not ")),
                "{message}"
            );
            assert!(message.ends_with(range), "{message}");
        }
    }

    #[test]
    fn help_states_the_ranges_that_are_checked() {
        let line = |flag: &str| {
            HELP.lines()
                .find(|l| l.contains(&format!("{flag} ")))
                .unwrap_or_else(|| panic!("no help line for {flag}"))
        };
        for whole in [&WORKERS, &MAX_RESTARTS, &MAX_REQUESTS, &MAX_REQUESTS_JITTER] {
            let range = format!("{} to {}", whole.min, shown(whole.max));
            assert!(line(whole.flag).contains(&range), "{}: {range}", whole.flag);
        }
        for secs in [
            &GRACEFUL_TIMEOUT,
            &TIMEOUT,
            &START_TIMEOUT,
            &RESTART_WINDOW,
            &MIN_UPTIME,
        ] {
            let range = format!("0 to {}", secs.max);
            assert!(line(secs.flag).contains(&range), "{}: {range}", secs.flag);
        }
    }

    #[test]
    fn listen_takes_host_and_port_in_any_form() {
        for good in [
            "127.0.0.1:8080",
            "0.0.0.0:0",
            "[::1]:8080",
            "[::]:65535",
            "localhost:8080",
            "my-host.example.com.:80",
            "host_1:80",
        ] {
            assert!(
                matches!(parse_strs(&["--listen", good]), Ok(Parsed::Run(_))),
                "{good}"
            );
        }
        for bad in [
            "nonsense",
            "1.2.3.4",
            "1.2.3.4:",
            "1.2.3.4:65536",
            "999.1.1.1:80",
            ":80",
            "::1:80",
            "[::1]",
            "local host:80",
            "a..b:80",
        ] {
            assert!(
                err(&["--listen", bad]).starts_with(&format!("--listen: {bad:?} is not HOST:PORT")),
                "{bad}"
            );
        }
    }

    #[test]
    fn listen_repeats_and_takes_unix_paths_and_a_mode() {
        let Ok(Parsed::Run(args)) = parse_strs(&[
            "--listen",
            "127.0.0.1:0",
            "-l",
            "unix:/run/app.sock",
            "--listen-mode",
            "0600",
        ]) else {
            panic!("flags rejected")
        };
        assert_eq!(args.listen, ["127.0.0.1:0", "unix:/run/app.sock"]);
        assert_eq!(args.listen_mode, 0o600);
        let Ok(Parsed::Run(args)) = parse_strs(&[]) else {
            panic!("no flags rejected")
        };
        assert_eq!(args.listen, [DEFAULT_LISTEN]);
        for bad in ["unix:", &format!("unix:/{}", "x".repeat(MAX_UNIX_PATH))] {
            assert_eq!(
                err(&["--listen", bad]),
                format!("--listen: {bad:?} is not unix:PATH with a path of 1 to 107 bytes")
            );
        }
        assert!(matches!(
            parse_strs(&["--listen", &format!("unix:{}", "x".repeat(MAX_UNIX_PATH))]),
            Ok(Parsed::Run(_))
        ));
        for bad in ["888", "1000", "rw", "", "-1"] {
            assert_eq!(
                err(&["--listen-mode", bad]),
                format!("--listen-mode: {bad:?} is not an octal mode from 0 to 0777 (0660, 0600)")
            );
        }
        for (good, mode) in [("0", 0), ("666", 0o666), ("0777", 0o777), ("0o640", 0o640)] {
            let Ok(Parsed::Run(args)) = parse_strs(&["--listen-mode", good]) else {
                panic!("{good} rejected")
            };
            assert_eq!(args.listen_mode, mode, "{good}");
        }
        let many: Vec<String> = (0..=respawn_ipc::MAX_LISTENERS)
            .map(|i| format!("unix:/x{i}"))
            .collect();
        let mut argv: Vec<&str> = Vec::new();
        for one in &many {
            argv.extend(["--listen", one]);
        }
        assert_eq!(err(&argv), "--listen: at most 64 listeners");
    }
}

#[cfg(test)]
mod ctl_tests {
    use super::*;

    fn ctl(args: &[&str]) -> Result<CtlParsed, String> {
        parse_ctl(args.iter().map(OsString::from)).map_err(|e| e.to_string())
    }

    fn run(path: &str, command: Command) -> Result<CtlParsed, String> {
        Ok(CtlParsed::Run(Ctl {
            path: path.into(),
            command,
        }))
    }

    #[test]
    fn every_command_parses_with_its_flags() {
        let status = |json, watch| Command::Status { json, watch };
        assert_eq!(
            ctl(&["/run/r.ctl", "status"]),
            run("/run/r.ctl", status(false, false))
        );
        assert_eq!(ctl(&["p", "status", "--json"]), run("p", status(true, false)));
        assert_eq!(ctl(&["--watch", "p", "status"]), run("p", status(false, true)));
        assert_eq!(ctl(&["p", "metrics"]), run("p", Command::Metrics));
        assert_eq!(ctl(&["p", "scale", "5"]), run("p", Command::Scale(5)));
        assert_eq!(ctl(&["p", "scale", "0"]), run("p", Command::Scale(0)));
        assert_eq!(ctl(&["p", "reload"]), run("p", Command::Reload));
        assert_eq!(ctl(&["p", "upgrade"]), run("p", Command::Upgrade));
        assert_eq!(ctl(&["p", "stop"]), run("p", Command::Stop { now: false }));
        assert_eq!(
            ctl(&["p", "stop", "--now"]),
            run("p", Command::Stop { now: true })
        );
        assert_eq!(ctl(&["--help"]), Ok(CtlParsed::Help));
        assert_eq!(ctl(&["p", "status", "-h"]), Ok(CtlParsed::Help));
    }

    #[test]
    fn bad_usage_says_what_is_wrong() {
        for (args, said) in [
            (
                &[][..],
                "a PATH (the master's --control) and a COMMAND are needed",
            ),
            (
                &["p"][..],
                "a PATH (the master's --control) and a COMMAND are needed",
            ),
            (
                &["p", "restart"][..],
                "\"restart\" is not a command: status, metrics, scale N, reload, upgrade, stop",
            ),
            (&["p", "scale"][..], "scale: how many workers? (scale N)"),
            (&["p", "scale", "-1"][..], "invalid option '-1'"),
            (
                &["p", "scale", "five"][..],
                "scale: \"five\" is not a whole number of workers",
            ),
            (&["p", "scale", "5", "6"][..], "\"6\": one word too many"),
            (
                &["p", "reload", "now"][..],
                "reload: \"now\" is one word too many",
            ),
            (&["p", "metrics", "--json"][..], "--json goes with status only"),
            (&["p", "stop", "--watch"][..], "--watch goes with status only"),
            (&["p", "reload", "--now"][..], "--now goes with stop only"),
            (&["p", "status", "--all"][..], "invalid option '--all'"),
        ] {
            assert_eq!(ctl(args).err().as_deref(), Some(said), "{args:?}");
        }
    }

    #[test]
    fn the_help_fits_80_columns() {
        for line in crate::ctl::HELP.lines().chain(crate::ctl::USAGE.lines()) {
            assert!(line.len() <= 80, "{line:?}");
        }
    }
}
