//! Command-line flags.

use lexopt::prelude::*;
use std::ffi::OsString;
use std::time::Duration;

pub const USAGE: &str = "usage: respawn [--workers N] [--listen ADDR] [--graceful-timeout SECS] \
                         [--max-restarts R] [--restart-window SECS] [--min-uptime SECS] \
                         [--timeout SECS] [--max-requests N] [--max-requests-jitter J] [--demo-fail-start] \
                         [-h|--help] [-V|--version]";

pub const HELP: &str = "\
respawn: a prefork supervisor, and a demo HTTP server to watch it heal

usage: respawn [flags]

  -w, --workers N            workers to keep alive (default: one per CPU)
  -l, --listen ADDR          host:port to listen on, IPv4 or IPv6; port 0
                             picks a free port (default: 127.0.0.1:8080)
      --graceful-timeout SECS  how long a stopping worker may finish what it
                             holds before it is killed (default: 30)
      --max-restarts R       give up (exit 3) after more than R restarts
      --restart-window SECS  within this many seconds (defaults: 10 in 60)
      --min-uptime SECS      a worker that dies sooner died young: its slot
                             waits 0.1 s, doubling to 10 s (default: 1)
  -t, --timeout SECS         a worker busy with one connection for longer
                             is killed and replaced (default: 60; 0: never)
      --max-requests N       a worker retires after N connections, its
                             replacement forked first (default: 0, never)
      --max-requests-jitter J  plus a random 0 to J, so workers started
                             together do not retire together (default: 0)
      --demo-fail-start      every worker panics before Ready: a crash loop
  -h, --help                 this help
  -V, --version              the version

routes: GET /            which worker answered (\"handle by child <pid>\")
        GET /crash       the handler panics: 500, and the worker is replaced
        GET /sleep/<ms>  answers after <ms> milliseconds (at most 60000)
        GET /hang        spins forever: a hung worker, for --timeout

signals to the master: TERM or QUIT stop gracefully, INT stops at once,
HUP replaces every worker one at a time, TTIN and TTOU add and remove one.
exit codes: 0 stopped, 1 failed (cannot bind, ...), 2 bad flag, 3 gave up.
RUST_LOG sets the log level (default: info).
";

/// The most workers the flag accepts: a typo must not fork-bomb the host.
const MAX_WORKERS: usize = 4096;

pub struct Args {
    pub workers: usize,
    pub listen: String,
    pub graceful_timeout: Duration,
    pub max_restarts: usize,
    pub restart_window: Duration,
    pub min_uptime: Duration,
    pub timeout: Duration,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub demo_fail_start: bool,
}

pub enum Parsed {
    Run(Args),
    Help,
    Version,
}

pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Parsed, lexopt::Error> {
    let mut args = Args {
        workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        listen: "127.0.0.1:8080".to_owned(),
        graceful_timeout: Duration::from_secs(30),
        max_restarts: 10,
        restart_window: Duration::from_secs(60),
        min_uptime: Duration::from_secs(1),
        timeout: Duration::from_secs(60),
        max_requests: 0,
        max_requests_jitter: 0,
        demo_fail_start: false,
    };
    let mut parser = lexopt::Parser::from_args(argv);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('w') | Long("workers") => {
                args.workers = parser.value()?.parse()?;
                if !(1..=MAX_WORKERS).contains(&args.workers) {
                    return Err(format!("--workers must be between 1 and {MAX_WORKERS}").into());
                }
            }
            Short('l') | Long("listen") => args.listen = parser.value()?.string()?,
            Long("graceful-timeout") => args.graceful_timeout = seconds(&mut parser, "--graceful-timeout")?,
            Long("max-restarts") => args.max_restarts = parser.value()?.parse()?,
            Long("restart-window") => args.restart_window = seconds(&mut parser, "--restart-window")?,
            Short('t') | Long("timeout") => args.timeout = seconds(&mut parser, "--timeout")?,
            Long("max-requests") => args.max_requests = parser.value()?.parse()?,
            Long("max-requests-jitter") => args.max_requests_jitter = parser.value()?.parse()?,
            Long("min-uptime") => args.min_uptime = seconds(&mut parser, "--min-uptime")?,
            Long("demo-fail-start") => args.demo_fail_start = true,
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Parsed::Run(args))
}

/// The value of a flag that takes seconds, fractions allowed.
fn seconds(parser: &mut lexopt::Parser, flag: &str) -> Result<Duration, lexopt::Error> {
    let secs: f64 = parser.value()?.parse()?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{flag} must be a number of seconds, not {secs}").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Parsed, String> {
        parse(args.iter().map(OsString::from)).map_err(|e| e.to_string())
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
        ]) else {
            panic!("flags rejected")
        };
        assert_eq!(args.workers, 3);
        assert_eq!(args.listen, "[::1]:0");
        assert_eq!(args.graceful_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        let err = |args: &[&str]| parse_strs(args).err().unwrap_or_default();
        assert!(err(&["--bogus"]).contains("--bogus"));
        assert!(err(&["--workers", "many"]).contains("many"));
        assert!(err(&["--workers", "0"]).contains("between 1 and"));
        assert!(err(&["--workers"]).contains("missing"));
        assert!(err(&["--graceful-timeout", "-1"]).contains("seconds"));
        assert!(err(&["extra"]).contains("extra"));
    }
}
