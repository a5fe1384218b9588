//! Command-line flags: one table, [`FLAGS`], says each flag's name, value,
//! range, default and meaning, and everything else is made from it: the
//! parser here (a name not in the table is no flag, and the error names
//! the nearest one), and in help.rs `--help` (the common ones, at most 24
//! lines), `--help-all`, and the manual page `--man` prints
//! (docs/man/respawn.1, installed by `make install`). [`CTL_COMMANDS`] and
//! [`CTL_FLAGS`] do the same for `respawn ctl`. A test checks the flag
//! tables of README.md and docs/operations.md against this one.
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

/// Which flag a table row is: the parser's `match` on it is exhaustive, so
/// a row the parser does not handle does not compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Id {
    Workers,
    Listen,
    ListenMode,
    GracefulTimeout,
    Timeout,
    StartTimeout,
    MaxRequests,
    MaxRequestsJitter,
    MaxRestarts,
    RestartWindow,
    MinUptime,
    User,
    Group,
    PidFile,
    Control,
    LogFormat,
    Command,
    ReadyOnExec,
    ReadyOnNotify,
    DemoFailStart,
    DemoHangStart,
    DemoBadIpc,
    Help,
    HelpAll,
    Man,
    Version,
    // respawn ctl's
    Json,
    Watch,
    Now,
}

/// What a flag's value may be, as the parser checks it and the help says.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Range {
    /// No bound to state: a switch, a name, a path.
    Any,
    /// A whole number from `.0` to `.1`.
    Whole(u64, u64),
    /// Seconds, fractions allowed, from 0 to `.0`.
    Seconds(u64),
    /// Checked by a function of its own; the forms, in words.
    Words(&'static str),
}

/// Where the long help and the manual page list a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Master,
    Command,
    Demo,
    Help,
}

impl Section {
    pub const ALL: [Section; 4] = [Section::Master, Section::Command, Section::Demo, Section::Help];
}

/// One row of the table.
#[derive(Debug)]
pub struct Flag {
    pub id: Id,
    pub short: Option<char>,
    /// Without its dashes; empty for `--` itself, which ends the flags.
    pub long: &'static str,
    /// The value's name (`N`, `SECS`); empty for a switch.
    pub value: &'static str,
    pub range: Range,
    /// As the help and the docs say it; `off` for a flag that is off
    /// unless given, empty where no default means anything.
    pub default: &'static str,
    /// One line, or two at most in --help-all.
    pub meaning: &'static str,
    /// What the manual page adds to the meaning, if anything.
    pub more: &'static str,
    /// Listed by `--help`, not only by `--help-all`.
    pub common: bool,
    pub section: Section,
}

const DAY: u64 = 24 * 60 * 60;
const WEEK: u64 = 7 * DAY;

/// A typo must not fork-bomb the host.
const WORKERS: Flag = Flag {
    id: Id::Workers,
    short: Some('w'),
    long: "workers",
    value: "N",
    range: Range::Whole(1, 4096),
    default: "one per CPU",
    meaning: "workers to keep alive",
    more: "The default counts the CPUs the process may run on (its affinity). TTIN and TTOU change the \
           number while it runs, and so does `respawn ctl PATH scale N`.",
    common: true,
    section: Section::Master,
};
const LISTEN: Flag = Flag {
    id: Id::Listen,
    short: Some('l'),
    long: "listen",
    value: "ADDR",
    range: Range::Words("port 0 to 65535"),
    default: "127.0.0.1:8080",
    meaning: "HOST:PORT (port 0 picks one) or unix:PATH; repeat it for several",
    more: "IPv4, IPv6 in brackets (`[::1]:8080`) or a host name. A stale Unix socket file nobody \
           answers on is replaced, a live one refused; the files made are removed on a clean stop. \
           Listeners passed by systemd (LISTEN_FDS) are served instead.",
    common: true,
    section: Section::Master,
};
/// 0660: the owner and the group may connect, nobody else. Connecting to a
/// Unix socket needs write permission on its file, so this is the access
/// control; php-fpm's `listen.mode` defaults to the same. 0666 would let
/// every local user in, a choice to make on purpose; the umask alone
/// (usually 022, giving 0755) would let in only the owner, which breaks the
/// usual set-up of a proxy running as another user in the socket's group.
const LISTEN_MODE: Flag = Flag {
    id: Id::ListenMode,
    short: None,
    long: "listen-mode",
    value: "OCTAL",
    range: Range::Words("0 to 0777"),
    default: "0660",
    meaning: "the mode of the Unix socket files made",
    more: "0660 lets the owner and the group connect, as a proxy in the socket's group must; the mode \
           is set by the umask at bind, never by a chmod by path.",
    common: false,
    section: Section::Master,
};
/// A day: longer than any sane request, far from overflowing an Instant.
const GRACEFUL_TIMEOUT: Flag = Flag {
    id: Id::GracefulTimeout,
    short: None,
    long: "graceful-timeout",
    value: "SECS",
    range: Range::Seconds(DAY),
    default: "30",
    meaning: "time to finish when stopping",
    more: "A worker asked to stop, or retiring, that is still alive this long after gets SIGKILL.",
    common: true,
    section: Section::Master,
};
const TIMEOUT: Flag = Flag {
    id: Id::Timeout,
    short: Some('t'),
    long: "timeout",
    value: "SECS",
    range: Range::Seconds(DAY),
    default: "60",
    meaning: "kill a worker busy longer; 0 off",
    more: "Busy means one connection, from the worker's Busy mark to its Idle mark: a worker hung on \
           one request is killed and replaced, and the log says on what request, from whom, and what \
           the process was doing.",
    common: true,
    section: Section::Master,
};
const START_TIMEOUT: Flag = Flag {
    id: Id::StartTimeout,
    short: None,
    long: "start-timeout",
    value: "SECS",
    range: Range::Seconds(DAY),
    default: "60",
    meaning: "kill a worker not Ready this long after its fork; 0 off",
    more: "Such a worker counts as a failed start.",
    common: false,
    section: Section::Master,
};
/// Far beyond any worker's life, far below an overflow of max plus jitter.
const MAX_REQUESTS: Flag = Flag {
    id: Id::MaxRequests,
    short: None,
    long: "max-requests",
    value: "N",
    range: Range::Whole(0, 1_000_000_000_000),
    default: "0",
    meaning: "retire a worker after N; 0 off",
    more: "The replacement is forked first, so no capacity is lost; the retiring worker finishes what \
         it holds.",
    common: true,
    section: Section::Master,
};
/// The same: max plus jitter stays far from u64::MAX.
const MAX_REQUESTS_JITTER: Flag = Flag {
    id: Id::MaxRequestsJitter,
    short: None,
    long: "max-requests-jitter",
    value: "J",
    range: Range::Whole(0, 1_000_000_000_000),
    default: "0",
    meaning: "plus a random 0 to J, drawn per worker",
    more: "",
    common: false,
    section: Section::Master,
};
/// The restart record holds up to this many entries (16 bytes each).
const MAX_RESTARTS: Flag = Flag {
    id: Id::MaxRestarts,
    short: None,
    long: "max-restarts",
    value: "R",
    range: Range::Whole(0, 10_000),
    default: "10",
    meaning: "give up (exit 3) after more than R failed starts...",
    more: "A failed start is a worker that died before it said Ready, or within --min-uptime of its \
           fork. Giving up stops every worker gracefully and exits 3, so that a service manager or an \
           operator can act.",
    common: false,
    section: Section::Master,
};
/// A week: the longest window in which a count of restarts still says
/// something about a crash loop.
const RESTART_WINDOW: Flag = Flag {
    id: Id::RestartWindow,
    short: None,
    long: "restart-window",
    value: "SECS",
    range: Range::Seconds(WEEK),
    default: "60",
    meaning: "...within this many seconds",
    more: "",
    common: false,
    section: Section::Master,
};
const MIN_UPTIME: Flag = Flag {
    id: Id::MinUptime,
    short: None,
    long: "min-uptime",
    value: "SECS",
    range: Range::Seconds(DAY),
    default: "1",
    meaning: "a worker dying sooner failed to start: its slot backs off",
    more: "Its slot waits 0.1 s before it is filled again, doubling up to 10 s, and the death counts \
           toward --max-restarts. A worker that served a request is never counted.",
    common: false,
    section: Section::Master,
};
/// Resolved when the master starts, not here: an unknown name is the
/// host's state (exit 1), like a host name in --listen.
const USER: Flag = Flag {
    id: Id::User,
    short: None,
    long: "user",
    value: "NAME",
    range: Range::Any,
    default: "off",
    meaning: "workers run as NAME and its group; needs root",
    more: "setgroups, setgid and setuid, in that order, before any code of the program runs (a new \
           binary's too); the master stays root to bind, signal, reap and re-execute itself for an \
           upgrade.",
    common: true,
    section: Section::Master,
};
const GROUP: Flag = Flag {
    id: Id::Group,
    short: None,
    long: "group",
    value: "NAME",
    range: Range::Any,
    default: "off",
    meaning: "workers run with group NAME",
    more: "With --user: instead of the user's primary group.",
    common: false,
    section: Section::Master,
};
const PID_FILE: Flag = Flag {
    id: Id::PidFile,
    short: None,
    long: "pid-file",
    value: "PATH",
    range: Range::Any,
    default: "off",
    meaning: "the master's pid, written at start",
    more: "Written before any worker is forked, so that a second respawn started meanwhile is refused; \
           the same across an upgrade (the pid does not change); removed on a clean stop. Never written \
           through a link.",
    common: true,
    section: Section::Master,
};
const CONTROL: Flag = Flag {
    id: Id::Control,
    short: None,
    long: "control",
    value: "PATH",
    range: Range::Any,
    default: "off",
    meaning: "a control socket for `respawn ctl PATH ...`",
    more: "A Unix socket of mode 0600 that answers `respawn ctl PATH` status, metrics, scale N, reload, \
           upgrade and stop, each when done: see respawn-ctl(1).",
    common: true,
    section: Section::Master,
};
const LOG_FORMAT: Flag = Flag {
    id: Id::LogFormat,
    short: None,
    long: "log-format",
    value: "FORMAT",
    range: Range::Words("text, json"),
    default: "text",
    meaning: "json is an object per line",
    more: "Under systemd (JOURNAL_STREAM naming stderr) each line starts with its <N> priority and has \
           no timestamp.",
    common: true,
    section: Section::Master,
};
/// `-- CMD [ARGS...]`: not parsed as a flag (everything after the first
/// `--` is the command), but listed as one.
const COMMAND: Flag = Flag {
    id: Id::Command,
    short: None,
    long: "",
    value: "CMD [ARGS...]",
    range: Range::Any,
    default: "the demo",
    meaning: "workers run CMD (node app.js...), listeners at fd 3 on (LISTEN_FDS)",
    more: "CMD is looked up in PATH. Its channel to the master is at the fd after the listeners; the \
           Node and Python clients speak it. Every flag above applies.",
    common: true,
    section: Section::Command,
};
const READY_ON_EXEC: Flag = Flag {
    id: Id::ReadyOnExec,
    short: None,
    long: "ready-on-exec",
    value: "",
    range: Range::Any,
    default: "off",
    meaning: "CMD does not speak docs/protocol.md: Ready once executed, no handover",
    more: "For a program that knows only LISTEN_FDS: no hung check, so --timeout must be 0, and no \
           --max-requests. A rollout retires an old worker only once its replacement lived \
           --min-uptime.",
    common: false,
    section: Section::Command,
};
const READY_ON_NOTIFY: Flag = Flag {
    id: Id::ReadyOnNotify,
    short: None,
    long: "ready-on-notify",
    value: "",
    range: Range::Any,
    default: "off",
    meaning: "CMD says READY=1 to its own $NOTIFY_SOCKET (sd_notify)",
    more: "Each worker gets a NOTIFY_SOCKET of its own; STATUS= shows in `respawn ctl PATH status`, and \
           with --timeout, WATCHDOG=1 keeps a worker from being killed as hung.",
    common: false,
    section: Section::Command,
};
const DEMO_FAIL_START: Flag = Flag {
    id: Id::DemoFailStart,
    short: None,
    long: "demo-fail-start",
    value: "",
    range: Range::Any,
    default: "off",
    meaning: "every worker panics before Ready: a crash loop",
    more: "",
    common: false,
    section: Section::Demo,
};
const DEMO_HANG_START: Flag = Flag {
    id: Id::DemoHangStart,
    short: None,
    long: "demo-hang-start",
    value: "",
    range: Range::Any,
    default: "off",
    meaning: "every worker hangs before Ready, until --start-timeout",
    more: "",
    common: false,
    section: Section::Demo,
};
const DEMO_BAD_IPC: Flag = Flag {
    id: Id::DemoBadIpc,
    short: None,
    long: "demo-bad-ipc",
    value: "",
    range: Range::Any,
    default: "off",
    meaning: "every worker speaks a newer ipc version: backoff, then giving up",
    more: "",
    common: false,
    section: Section::Demo,
};
const HELP: Flag = Flag {
    id: Id::Help,
    short: Some('h'),
    long: "help",
    value: "",
    range: Range::Any,
    default: "",
    meaning: "the common flags",
    more: "",
    common: true,
    section: Section::Help,
};
const HELP_ALL: Flag = Flag {
    id: Id::HelpAll,
    short: None,
    long: "help-all",
    value: "",
    range: Range::Any,
    default: "",
    meaning: "every flag, the demo's routes and the signals",
    more: "",
    common: true,
    section: Section::Help,
};
const MAN: Flag = Flag {
    id: Id::Man,
    short: None,
    long: "man",
    value: "",
    range: Range::Any,
    default: "",
    meaning: "the manual page, respawn(1), in roff (respawn --man | man -l -)",
    more: "",
    common: false,
    section: Section::Help,
};
const VERSION: Flag = Flag {
    id: Id::Version,
    short: Some('V'),
    long: "version",
    value: "",
    range: Range::Any,
    default: "",
    meaning: "the version",
    more: "",
    common: true,
    section: Section::Help,
};

/// Every flag of the master, in the order the help and the docs list them.
pub const FLAGS: &[Flag] = &[
    WORKERS,
    LISTEN,
    LISTEN_MODE,
    GRACEFUL_TIMEOUT,
    TIMEOUT,
    START_TIMEOUT,
    MAX_REQUESTS,
    MAX_REQUESTS_JITTER,
    MAX_RESTARTS,
    RESTART_WINDOW,
    MIN_UPTIME,
    USER,
    GROUP,
    PID_FILE,
    CONTROL,
    LOG_FORMAT,
    COMMAND,
    READY_ON_EXEC,
    READY_ON_NOTIFY,
    DEMO_FAIL_START,
    DEMO_HANG_START,
    DEMO_BAD_IPC,
    HELP,
    HELP_ALL,
    MAN,
    VERSION,
];

/// A command of `respawn ctl`, with the flags that go with it.
#[derive(Debug)]
pub struct CtlCommand {
    pub name: &'static str,
    /// `N` for scale; empty for the others.
    pub argument: &'static str,
    pub flags: &'static [Id],
    pub meaning: &'static str,
}

pub const CTL_COMMANDS: &[CtlCommand] = &[
    CtlCommand {
        name: "status",
        argument: "",
        flags: &[Id::Json, Id::Watch],
        meaning: "every worker: its state, requests, CPU, memory, and the request it serves now; \
                  the listen queue",
    },
    CtlCommand {
        name: "metrics",
        argument: "",
        flags: &[],
        meaning: "the Prometheus text format, for a scraper",
    },
    CtlCommand {
        name: "scale",
        argument: "N",
        flags: &[],
        meaning: "keep N workers (0 or more); answers once N are ready",
    },
    CtlCommand {
        name: "reload",
        argument: "",
        flags: &[],
        meaning: "replace every worker, as HUP; answers once all are new",
    },
    CtlCommand {
        name: "upgrade",
        argument: "",
        flags: &[],
        meaning: "upgrade to the binary on disk, as USR2; answers when the new image runs",
    },
    CtlCommand {
        name: "stop",
        argument: "",
        flags: &[Id::Now],
        meaning: "stop gracefully, as TERM; answers once every worker has exited",
    },
];

/// The flags of `respawn ctl`.
pub const CTL_FLAGS: &[Flag] = &[
    Flag {
        id: Id::Json,
        short: None,
        long: "json",
        value: "",
        range: Range::Any,
        default: "off",
        meaning: "status: the master's answer as it is, one line of JSON",
        more: "",
        common: true,
        section: Section::Master,
    },
    Flag {
        id: Id::Watch,
        short: None,
        long: "watch",
        value: "",
        range: Range::Any,
        default: "off",
        meaning: "status: again every second, until Ctrl-C",
        more: "",
        common: true,
        section: Section::Master,
    },
    Flag {
        id: Id::Now,
        short: None,
        long: "now",
        value: "",
        range: Range::Any,
        default: "off",
        meaning: "stop: at once, as INT (the workers are killed)",
        more: "",
        common: true,
        section: Section::Master,
    },
    Flag {
        meaning: "this help",
        ..HELP
    },
    Flag {
        meaning: "the manual page, respawn-ctl(1), in roff",
        common: true,
        ..MAN
    },
];

impl Flag {
    /// `-w, --workers N`, `--graceful-timeout SECS`, `-- CMD [ARGS...]`: as
    /// the help and the docs' tables write it.
    pub fn spec(&self) -> String {
        let long = match (self.long, self.value) {
            ("", value) => format!("-- {value}"),
            (long, "") => format!("--{long}"),
            (long, value) => format!("--{long} {value}"),
        };
        match self.short {
            Some(short) => format!("-{short}, {long}"),
            None => long,
        }
    }

    /// The range, as the help, the docs and the errors say it.
    pub fn range_text(&self) -> String {
        match self.range {
            Range::Any => String::new(),
            Range::Whole(min, max) => format!("{min} to {}", shown(max)),
            Range::Seconds(max) => format!("0 to {max}"),
            Range::Words(words) => words.to_owned(),
        }
    }

    fn takes_value(&self) -> bool {
        !self.value.is_empty()
    }

    /// A whole number in the flag's range.
    fn whole(&self, value: &str) -> Result<u64, String> {
        let Range::Whole(min, max) = self.range else {
            return Err(format!("--{}: takes no whole number", self.long));
        };
        match value.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(format!(
                "--{}: {value:?} is not a whole number from {}",
                self.long,
                self.range_text()
            )),
        }
    }

    /// Seconds in the flag's range.
    fn seconds(&self, value: &str) -> Result<Duration, String> {
        let Range::Seconds(max) = self.range else {
            return Err(format!("--{}: takes no seconds", self.long));
        };
        match value.parse::<f64>() {
            // NaN and the infinities fail the range check too.
            Ok(secs) if (0.0..=max as f64).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
            _ => Err(format!(
                "--{}: {value:?} is not a number of seconds from {}",
                self.long,
                self.range_text()
            )),
        }
    }

    /// The default of a flag of seconds, from the table.
    fn default_seconds(&self) -> Duration {
        self.seconds(self.default).unwrap_or_default()
    }

    /// The default of a flag of a whole number, from the table.
    fn default_whole(&self) -> u64 {
        self.whole(self.default).unwrap_or_default()
    }
}

/// A bound as the help writes it: 10^12 rather than thirteen digits.
fn shown(n: u64) -> String {
    match n {
        1_000_000_000_000 => "10^12".to_owned(),
        n => n.to_string(),
    }
}

/// What the master is started with.
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
    HelpAll,
    Man,
    Version,
}

/// A socket address holds a path of at most 107 bytes and a NUL (`sun_path`
/// is 108 bytes on Linux).
const MAX_UNIX_PATH: usize = 107;

/// Reads the master's flags. `Err` is one line saying what is wrong (exit 2).
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Parsed, String> {
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
        listen_mode: 0,
        graceful_timeout: GRACEFUL_TIMEOUT.default_seconds(),
        max_restarts: MAX_RESTARTS.default_whole() as usize,
        restart_window: RESTART_WINDOW.default_seconds(),
        min_uptime: MIN_UPTIME.default_seconds(),
        timeout: TIMEOUT.default_seconds(),
        start_timeout: START_TIMEOUT.default_seconds(),
        max_requests: MAX_REQUESTS.default_whole(),
        max_requests_jitter: MAX_REQUESTS_JITTER.default_whole(),
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
    args.listen_mode = listen_mode(LISTEN_MODE.default)?;
    let mut parser = lexopt::Parser::from_args(argv);
    while let Some(arg) = parser.next().map_err(lexopt_error)? {
        if let Value(word) = &arg {
            return Err(format!(
                "{:?} is not a flag: a program for the workers to run goes after -- \
                 (respawn [flags] -- CMD [ARGS...])",
                word.to_string_lossy()
            ));
        }
        let flag = find(FLAGS, &arg)?;
        let raw = match flag.takes_value() {
            true => value(&mut parser, flag)?,
            false => OsString::new(),
        };
        let text = || utf8(&raw, flag);
        match flag.id {
            // Both bounds fit in usize on every target Rust supports.
            Id::Workers => args.workers = flag.whole(text()?)? as usize,
            Id::Listen => args.listen.push(listen(text()?)?),
            Id::ListenMode => args.listen_mode = listen_mode(text()?)?,
            Id::GracefulTimeout => args.graceful_timeout = flag.seconds(text()?)?,
            Id::MaxRestarts => args.max_restarts = flag.whole(text()?)? as usize,
            Id::RestartWindow => args.restart_window = flag.seconds(text()?)?,
            Id::Timeout => {
                args.timeout = flag.seconds(text()?)?;
                timeout_given = !args.timeout.is_zero();
            }
            Id::StartTimeout => args.start_timeout = flag.seconds(text()?)?,
            Id::MaxRequests => {
                args.max_requests = flag.whole(text()?)?;
                max_requests_given = args.max_requests > 0;
            }
            Id::MaxRequestsJitter => args.max_requests_jitter = flag.whole(text()?)?,
            Id::MinUptime => args.min_uptime = flag.seconds(text()?)?,
            Id::LogFormat => args.log_format = log_format(text()?)?,
            Id::DemoFailStart => args.demo_fail_start = true,
            Id::DemoHangStart => args.demo_hang_start = true,
            Id::DemoBadIpc => args.demo_bad_ipc = true,
            Id::User => args.user = Some(text()?.to_owned()),
            Id::Group => args.group = Some(text()?.to_owned()),
            Id::PidFile => args.pid_file = Some(PathBuf::from(&raw)),
            Id::Control => args.control = Some(PathBuf::from(&raw)),
            Id::ReadyOnExec => args.ready_on_exec = true,
            Id::ReadyOnNotify => args.ready_on_notify = true,
            Id::Help => return Ok(Parsed::Help),
            Id::HelpAll => return Ok(Parsed::HelpAll),
            Id::Man => return Ok(Parsed::Man),
            Id::Version => return Ok(Parsed::Version),
            // Not in FLAGS' reach of `find`: `--` was taken off above, and
            // the ctl flags are another table.
            Id::Command | Id::Json | Id::Watch | Id::Now => return Err(unknown(FLAGS, &flag.spec())),
        }
    }
    args.listen_given = !args.listen.is_empty();
    if args.listen.is_empty() {
        args.listen.push(LISTEN.default.to_owned());
    }
    if args.listen.len() > respawn_ipc::MAX_LISTENERS {
        return Err(format!(
            "--listen: at most {} listeners",
            respawn_ipc::MAX_LISTENERS
        ));
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
    // Its Ready says nothing, so only the minimum uptime tells a program
    // that runs from one that dies at its start (a failed start, a rollout
    // that backs out): without it, every death would be replaced at once.
    if args.ready_on_exec && args.min_uptime.is_zero() {
        return Err(
            "--min-uptime 0 cannot work with --ready-on-exec: a worker is Ready at its exec, so only \
             its uptime tells one that cannot start (give --min-uptime 1 or more)"
                .into(),
        );
    }
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

/// The row of `table` that `arg`, a flag, names; an unknown one is an
/// error that names the nearest flag.
fn find(table: &'static [Flag], arg: &lexopt::Arg) -> Result<&'static Flag, String> {
    let (found, given) = match arg {
        Short(short) => (
            table.iter().find(|flag| flag.short == Some(*short)),
            format!("-{short}"),
        ),
        Long(long) => (
            table
                .iter()
                .find(|flag| !flag.long.is_empty() && flag.long == *long),
            format!("--{long}"),
        ),
        Value(word) => (None, word.to_string_lossy().into_owned()),
    };
    found.ok_or_else(|| unknown(table, &given))
}

/// `--worker: no such flag; did you mean --workers?`
fn unknown(table: &[Flag], given: &str) -> String {
    let names = table
        .iter()
        .filter(|flag| !flag.long.is_empty())
        .map(|flag| format!("--{}", flag.long));
    match nearest(given, names) {
        Some(near) => format!("{given}: no such flag; did you mean {near}?"),
        None => format!("{given}: no such flag"),
    }
}

/// Of `candidates`, the one `given` most likely meant: the only one it
/// begins (`--grace` for `--graceful-timeout`), else the closest within a
/// few edits (`--worker`, `--pidfile`, `--max-request`). None if nothing
/// is near enough to be worth saying.
pub fn nearest(given: &str, candidates: impl IntoIterator<Item = String>) -> Option<String> {
    let candidates: Vec<String> = candidates.into_iter().collect();
    let bare = given.trim_start_matches('-');
    if bare.len() >= 3 {
        let mut starting = candidates
            .iter()
            .filter(|c| c.trim_start_matches('-').starts_with(bare));
        if let (Some(only), None) = (starting.next(), starting.next()) {
            return Some(only.clone());
        }
    }
    // A third of the name may be wrong, at least one letter, at most three.
    let allowed = (bare.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|c| (edits(given, c), c))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c.clone())
}

/// The Levenshtein distance: letters inserted, removed or changed.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// lexopt's errors, said as ours are.
fn lexopt_error(err: lexopt::Error) -> String {
    match err {
        lexopt::Error::UnexpectedValue { option, value } => {
            format!("{option} takes no value ({:?} given)", value.to_string_lossy())
        }
        other => other.to_string(),
    }
}

/// A flag's value; the error names the flag and what it takes.
fn value(parser: &mut lexopt::Parser, flag: &Flag) -> Result<OsString, String> {
    parser.value().map_err(|_| {
        let range = flag.range_text();
        match range.is_empty() {
            true => format!("--{} needs a value: {}", flag.long, flag.spec()),
            false => format!("--{} needs a value: {}, {range}", flag.long, flag.spec()),
        }
    })
}

/// A flag's value as text; the error names the flag.
fn utf8<'a>(value: &'a OsString, flag: &Flag) -> Result<&'a str, String> {
    value
        .to_str()
        .ok_or_else(|| format!("--{}: the value is not valid UTF-8", flag.long))
}

/// `--control`, `--pid-file` and each `--listen unix:` make a file of their
/// own at their path: given one path twice, the one made last would replace
/// the other (the pid file the control socket, say). Compared after a
/// lexical normalisation (`./x`, `x`, `d//x`, `d/../x` are one path);
/// links are not looked at, as the files may not exist yet.
fn refuse_shared_paths(args: &Args) -> Result<(), String> {
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
            return Err(format!(
                "{first} and {second} name the same file: give each a path of its own"
            ));
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

/// `--listen`: checked for form here, so that a typo is a bad flag (exit 2,
/// which a service manager can be told not to restart on), while a name that
/// does not resolve is left to bind time (exit 1): DNS can fail for a while.
fn listen(value: &str) -> Result<String, String> {
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() || path.len() > MAX_UNIX_PATH {
            return Err(format!(
                "--listen: {value:?} is not unix:PATH with a path of 1 to {MAX_UNIX_PATH} bytes"
            ));
        }
        return Ok(value.to_owned());
    }
    if value.parse::<SocketAddr>().is_ok() || is_name_and_port(value) {
        return Ok(value.to_owned());
    }
    Err(format!(
        "--listen: {value:?} is not HOST:PORT with a port from 0 to 65535 \
         (127.0.0.1:8080, [::1]:8080, localhost:8080)"
    ))
}

/// `--log-format text|json`.
fn log_format(value: &str) -> Result<Format, String> {
    Format::parse(value).ok_or_else(|| format!("--log-format: {value:?} is not text or json"))
}

/// `--listen-mode`: octal permission bits, 0 to 0777 (no setuid, setgid or
/// sticky bit: they mean nothing on a socket).
fn listen_mode(value: &str) -> Result<u32, String> {
    match u32::from_str_radix(value.strip_prefix("0o").unwrap_or(value), 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "--listen-mode: {value:?} is not an octal mode from 0 to 0777 (0660, 0600)"
        )),
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
    Man,
}

/// `respawn ctl PATH COMMAND [N] [FLAGS]`: the words after `ctl`. It is a
/// subcommand, parsed before the master's flags (main.rs looks at the first
/// word), so `respawn ctl ...` never starts a master. Flags may come
/// anywhere, but only with the command they belong to.
pub fn parse_ctl(argv: impl IntoIterator<Item = OsString>) -> Result<CtlParsed, String> {
    let argv: Vec<OsString> = argv.into_iter().collect();
    // lexopt would take `-1` for a flag, and say only that it is not one.
    if let Some(at) = argv.iter().position(|word| word == "scale") {
        if let Some(n) = argv.get(at + 1).and_then(|n| n.to_str()) {
            if n.strip_prefix('-').is_some_and(|n| n.parse::<u64>().is_ok()) {
                let path = argv.first().map_or("PATH".into(), |path| path.to_string_lossy());
                return Err(format!(
                    "scale: {n:?} is not a number of workers: N is how many to keep (0 or more), \
                     not a change (respawn ctl {path} status says how many are kept now)"
                ));
            }
        }
    }
    let mut words = Vec::new();
    let (mut json, mut watch, mut now) = (false, false, false);
    let mut parser = lexopt::Parser::from_args(argv);
    while let Some(arg) = parser.next().map_err(lexopt_error)? {
        if let Value(word) = arg {
            words.push(word);
            continue;
        }
        let flag = find(CTL_FLAGS, &arg)?;
        match flag.id {
            Id::Help => return Ok(CtlParsed::Help),
            Id::Man => return Ok(CtlParsed::Man),
            Id::Json => json = true,
            Id::Watch => watch = true,
            Id::Now => now = true,
            _ => return Err(unknown(CTL_FLAGS, &flag.spec())),
        }
    }
    let mut words = words.into_iter();
    let (Some(path), Some(command)) = (words.next(), words.next()) else {
        return Err("a PATH (the master's --control) and a COMMAND are needed".into());
    };
    let command = command.to_string_lossy().into_owned();
    let argument = words.next().map(|word| word.to_string_lossy().into_owned());
    if let Some(extra) = words.next() {
        return Err(format!("{:?}: one word too many", extra.to_string_lossy()));
    }
    let command = match (command.as_str(), argument) {
        ("status", None) => Command::Status { json, watch },
        ("scale", Some(n)) => match n.parse::<u64>() {
            Ok(n) => Command::Scale(n),
            Err(_) => return Err(format!("scale: {n:?} is not a whole number of workers")),
        },
        ("scale", None) => return Err("scale: how many workers? (scale N)".into()),
        ("metrics", None) => Command::Metrics,
        ("reload", None) => Command::Reload,
        ("upgrade", None) => Command::Upgrade,
        ("stop", None) => Command::Stop { now },
        // The request line the master reads is `stop now` (control.md);
        // the client's word for it is a flag.
        ("stop", Some(extra)) if extra == "now" => {
            return Err("stop: \"now\" is one word too many: an immediate stop is stop --now".into())
        }
        ("status" | "metrics" | "reload" | "upgrade" | "stop", Some(extra)) => {
            return Err(format!("{command}: {extra:?} is one word too many"))
        }
        _ => {
            let list: Vec<String> = CTL_COMMANDS.iter().map(CtlCommand::spec_bare).collect();
            let near = nearest(&command, CTL_COMMANDS.iter().map(|c| c.name.to_owned()));
            return Err(match near {
                Some(near) => format!(
                    "{command:?} is not a command: {}; did you mean {near}?",
                    list.join(", ")
                ),
                None => format!("{command:?} is not a command: {}", list.join(", ")),
            });
        }
    };
    let status = matches!(command, Command::Status { .. });
    if (json || watch) && !status {
        let flag = if json { "--json" } else { "--watch" };
        return Err(format!("{flag} goes with status only"));
    }
    if now && !matches!(command, Command::Stop { .. }) {
        return Err("--now goes with stop only".into());
    }
    Ok(CtlParsed::Run(Ctl {
        path: path.into(),
        command,
    }))
}

impl CtlCommand {
    /// `scale N`.
    pub fn spec_bare(&self) -> String {
        match self.argument {
            "" => self.name.to_owned(),
            argument => format!("{} {argument}", self.name),
        }
    }
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
        assert_eq!(
            err(&["--workers"]),
            "--workers needs a value: -w, --workers N, 1 to 4096"
        );
        assert_eq!(
            err(&["--demo-bad-ipc=1"]),
            r#"--demo-bad-ipc takes no value ("1" given)"#
        );
        assert_eq!(
            err(&["--graceful-timeout", "-1"]),
            r#"--graceful-timeout: "-1" is not a number of seconds from 0 to 86400"#
        );
        assert_eq!(
            err(&["extra"]),
            "\"extra\" is not a flag: a program for the workers to run goes after -- \
             (respawn [flags] -- CMD [ARGS...])"
        );
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

    /// Each number flag of the table: its largest value is taken, the next
    /// one refused with the range the help states.
    #[test]
    fn every_number_flag_takes_its_range_and_no_more() {
        let mut checked = 0;
        for flag in FLAGS {
            let (max, beyond) = match flag.range {
                Range::Whole(_, max) => (max.to_string(), (max + 1).to_string()),
                Range::Seconds(max) => (max.to_string(), format!("{max}.001")),
                _ => continue,
            };
            let name = format!("--{}", flag.long);
            assert!(parse_strs(&[&name, &max]).is_ok(), "{name} {max}");
            let message = err(&[&name, &beyond]);
            assert!(
                message.starts_with(&format!("{name}: {beyond:?} is not ")),
                "{message}"
            );
            assert!(
                message.ends_with(&format!(" from {}", flag.range_text())),
                "{message}"
            );
            checked += 1;
        }
        assert_eq!(checked, 9, "a number flag lost its range");
    }

    /// The defaults the help and the docs state are the ones a run gets.
    #[test]
    fn the_defaults_are_the_tables() {
        let Ok(Parsed::Run(args)) = parse_strs(&[]) else {
            panic!("no flags rejected")
        };
        let seconds = |flag: &Flag| flag.seconds(flag.default).expect(flag.long);
        let whole = |flag: &Flag| flag.whole(flag.default).expect(flag.long);
        assert_eq!(args.graceful_timeout, seconds(&GRACEFUL_TIMEOUT));
        assert_eq!(args.timeout, seconds(&TIMEOUT));
        assert_eq!(args.start_timeout, seconds(&START_TIMEOUT));
        assert_eq!(args.restart_window, seconds(&RESTART_WINDOW));
        assert_eq!(args.min_uptime, seconds(&MIN_UPTIME));
        assert_eq!(args.max_restarts as u64, whole(&MAX_RESTARTS));
        assert_eq!(args.max_requests, whole(&MAX_REQUESTS));
        assert_eq!(args.max_requests_jitter, whole(&MAX_REQUESTS_JITTER));
        assert_eq!(args.listen, [LISTEN.default]);
        assert_eq!(args.listen_mode, listen_mode(LISTEN_MODE.default).unwrap());
        assert_eq!(Some(args.log_format), Format::parse(LOG_FORMAT.default));
        assert_eq!(
            args.workers,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        assert_eq!(WORKERS.default, "one per CPU");
        // Every number a default names is one its flag takes.
        assert_eq!(
            (seconds(&GRACEFUL_TIMEOUT), whole(&MAX_RESTARTS)),
            (Duration::from_secs(30), 10)
        );
        let (user, group, pid_file, control) = (args.user, args.group, args.pid_file, args.control);
        assert!(user.is_none() && group.is_none() && pid_file.is_none() && control.is_none());
        assert!(!(args.ready_on_exec || args.ready_on_notify || args.demo_fail_start));
    }

    #[test]
    fn every_flag_of_the_table_is_one_the_parser_takes() {
        for flag in FLAGS.iter().filter(|flag| !flag.long.is_empty()) {
            let name = format!("--{}", flag.long);
            let said = err(&[&name]);
            assert!(!said.contains("no such flag"), "{name}: {said}");
            if let Some(short) = flag.short {
                let said = err(&[&format!("-{short}")]);
                assert!(!said.contains("no such flag"), "-{short}: {said}");
            }
        }
        let mut names: Vec<&str> = FLAGS.iter().map(|f| f.long).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FLAGS.len(), "a name twice in the table");
    }

    #[test]
    fn an_unknown_flag_names_the_nearest() {
        for (given, said) in [
            ("--worker", "--worker: no such flag; did you mean --workers?"),
            ("--workrs", "--workrs: no such flag; did you mean --workers?"),
            ("--pidfile", "--pidfile: no such flag; did you mean --pid-file?"),
            (
                "--max-request",
                "--max-request: no such flag; did you mean --max-requests?",
            ),
            (
                "--grace",
                "--grace: no such flag; did you mean --graceful-timeout?",
            ),
            ("--time-out", "--time-out: no such flag; did you mean --timeout?"),
            (
                "--ready-on-exe",
                "--ready-on-exe: no such flag; did you mean --ready-on-exec?",
            ),
            ("--helpall", "--helpall: no such flag; did you mean --help-all?"),
            ("--bogus", "--bogus: no such flag"),
            ("--json", "--json: no such flag"),
            ("-x", "-x: no such flag"),
        ] {
            assert_eq!(err(&[given, "2"]), said, "{given}");
        }
    }

    /// README.md and docs/operations.md each have a table of the flags,
    /// with more to say about each than the help: it lists the table's
    /// flags, in its order, with its ranges and defaults.
    #[test]
    fn the_docs_tables_are_the_flags() {
        for doc in ["README.md", "docs/operations.md"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(doc);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{doc}: {e}"));
            let rows = table_rows(&text, "| flag | meaning | range | default |");
            let specs: Vec<&str> = rows.iter().map(|row| row[0].as_str()).collect();
            let expected: Vec<String> = FLAGS.iter().map(Flag::spec).collect();
            assert_eq!(
                specs, expected,
                "{doc}: the flags, in the order of args.rs's FLAGS"
            );
            for (row, flag) in rows.iter().zip(FLAGS) {
                assert_eq!(
                    (row[2].as_str(), row[3].as_str()),
                    (flag.range_text().as_str(), flag.default),
                    "{doc}: the range and default of {}",
                    flag.spec()
                );
            }
        }
    }

    /// The rows of the markdown table under `header`, each cell without
    /// its backticks. A `\|` inside a cell is not a column.
    fn table_rows(text: &str, header: &str) -> Vec<Vec<String>> {
        let at = text.find(header).unwrap_or_else(|| panic!("no table {header:?}"));
        text[at..]
            .lines()
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .map(|line| {
                let line = line.replace("\\|", "\u{0}");
                let cells = line.trim().trim_matches('|').split('|');
                cells
                    .map(|cell| cell.replace('\u{0}', "|").replace('`', "").trim().to_owned())
                    .collect()
            })
            .collect()
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
        assert_eq!(args.listen, [LISTEN.default]);
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
        assert_eq!(ctl(&["--man"]), Ok(CtlParsed::Man));
        // Every command of the table is one the parser takes.
        for command in CTL_COMMANDS {
            let argument = (!command.argument.is_empty()).then_some("3");
            let words: Vec<&str> = ["p", command.name].into_iter().chain(argument).collect();
            assert!(ctl(&words).is_ok(), "{words:?}");
        }
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
            (
                &["p", "scale", "-1"][..],
                "scale: \"-1\" is not a number of workers: N is how many to keep (0 or more), \
                 not a change (respawn ctl p status says how many are kept now)",
            ),
            (
                &["p", "stop", "now"][..],
                "stop: \"now\" is one word too many: an immediate stop is stop --now",
            ),
            (
                &["p", "relaod"][..],
                "\"relaod\" is not a command: status, metrics, scale N, reload, upgrade, stop; \
                 did you mean reload?",
            ),
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
            (&["p", "status", "--all"][..], "--all: no such flag"),
            (
                &["p", "status", "--jsn"][..],
                "--jsn: no such flag; did you mean --json?",
            ),
        ] {
            assert_eq!(ctl(args).err().as_deref(), Some(said), "{args:?}");
        }
    }
}
