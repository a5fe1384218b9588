//! What a log line looks like, for the reader at the other end of stderr.
//!
//! - A person at a terminal (the default, `--log-format text`):
//!   `[2026-11-26T00:53:54.571Z INFO ] worker 15804 spawned`, env_logger's
//!   own format.
//! - journald: when systemd connects stderr to the journal, it says so in
//!   `JOURNAL_STREAM=DEV:INO`, the device and inode of that stream. The
//!   variable alone is not enough (it is inherited by every child, whose
//!   stderr may have been redirected since), so, as sd-daemon(3) advises,
//!   it counts only when fstat of fd 2 gives the same pair. Then every line
//!   starts with the syslog priority journald reads and strips (`<3>`
//!   error, `<4>` warning, `<6>` info, `<7>` debug and trace), so that
//!   `journalctl -p warning` shows warnings and errors only. The timestamp
//!   is left out: journald stamps each line as it arrives, and a second
//!   time in the text would only be noise in `journalctl`'s output.
//! - A log shipper (`--log-format json`): one JSON object per line,
//!   `{"time":"2026-11-26T03:01:02.123Z","level":"INFO","pid":123,
//!   "role":"master","event":"worker 4321 spawned","fields":{}}`. `event`
//!   is the sentence a person would read; `fields` is always an empty
//!   object for now: the `log` crate's key-values are behind a feature and
//!   no record of respawn carries any, but a shipper's schema can count on
//!   the key. Under journald the JSON lines carry the priority prefix too.
//!
//! The strings are escaped by hand (quote, backslash, control characters,
//! and U+2028/U+2029, which some JavaScript parsers take for line ends):
//! twenty lines, against a JSON crate in the binary for one function.

use log::{Level, Record};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// The value of `--log-format`, if it is one.
    pub fn parse(value: &str) -> Option<Format> {
        match value {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            _ => None,
        }
    }
}

/// How this process writes its lines, decided once at start.
#[derive(Clone, Copy, Debug)]
pub struct Style {
    pub format: Format,
    /// stderr is journald's stream: priority prefixes, no timestamps.
    pub journal: bool,
}

/// The pid of the master, kept before it forks its first worker: a process
/// with another pid is a worker (they are forked from the master, or, in an
/// upgrade, started from the new binary, which records 0 here).
static MASTER_PID: OnceLock<u32> = OnceLock::new();

impl Style {
    /// The style for `format` on the stderr this process has now; remembers
    /// this process as the master.
    pub fn for_stderr(format: Format) -> Style {
        // A worker started from a new binary in an upgrade runs this too,
        // in a process of its own: it is no master. (0 is nobody's pid.)
        let master = if respawn_master::started_as_worker() {
            0
        } else {
            std::process::id()
        };
        let _ = MASTER_PID.set(master);
        Style {
            format,
            journal: stderr_is_journal(),
        }
    }

    /// Is env_logger's own format (timestamps, colour) the one to use?
    pub fn is_plain_text(&self) -> bool {
        self.format == Format::Text && !self.journal
    }

    /// Writes one record as one line.
    pub fn write(
        &self,
        out: &mut impl Write,
        record: &Record,
        time: impl std::fmt::Display,
    ) -> io::Result<()> {
        let message = record.args().to_string();
        let line = match self.format {
            Format::Json => json_line(
                &time.to_string(),
                record.level(),
                std::process::id(),
                role(),
                &message,
            ),
            Format::Text => format!("[{:<5}] {message}", record.level()),
        };
        let line = match self.journal {
            true => journal_line(record.level(), &line),
            false => line,
        };
        writeln!(out, "{line}")
    }
}

/// "master" or "worker".
fn role() -> &'static str {
    match MASTER_PID.get() {
        Some(&master) if master != std::process::id() => "worker",
        _ => "master",
    }
}

/// Does `JOURNAL_STREAM` name the very stream that fd 2 is?
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(parse_stream) else {
        return false;
    };
    // fstat through std, whose dev() and ino() are u64 on every target.
    let stderr = io::stderr().as_fd().try_clone_to_owned().map(std::fs::File::from);
    match stderr.and_then(|file| file.metadata()) {
        Ok(meta) => meta.dev() == dev && meta.ino() == ino,
        Err(_) => false,
    }
}

/// `DEV:INO`, both decimal, as systemd writes it.
fn parse_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The syslog priority journald reads from a `<N>` prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// `line` with the prefix on it, and on each line after a newline inside
/// it: journald takes each line for an entry of its own.
fn journal_line(level: Level, line: &str) -> String {
    let prefix = format!("<{}>", priority(level));
    let mut out = prefix.clone();
    out.push_str(&line.replace('\n', &format!("\n{prefix}")));
    out
}

/// One JSON object, without the newline.
fn json_line(time: &str, level: Level, pid: u32, role: &str, event: &str) -> String {
    let mut line = String::with_capacity(96 + event.len());
    line.push_str("{\"time\":");
    push_json_string(&mut line, time);
    line.push_str(",\"level\":");
    push_json_string(&mut line, level.as_str());
    let _ = write!(line, ",\"pid\":{pid},\"role\":");
    push_json_string(&mut line, role);
    line.push_str(",\"event\":");
    push_json_string(&mut line, event);
    line.push_str(",\"fields\":{}}");
    line
}

/// `text` as a JSON string, quotes included (RFC 8259, section 7).
fn push_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{0}'..='\u{1f}' | '\u{7f}' | '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> String {
        let mut out = String::new();
        push_json_string(&mut out, text);
        out
    }

    #[test]
    fn quotes_and_backslashes_are_escaped() {
        assert_eq!(json(r#"say "hi" \o/"#), r#""say \"hi\" \\o/""#);
    }

    #[test]
    fn newlines_and_tabs_take_their_short_escapes() {
        assert_eq!(json("a\nb\r\nc\td"), r#""a\nb\r\nc\td""#);
    }

    #[test]
    fn other_control_characters_become_u00xx() {
        assert_eq!(
            json("\u{0}\u{1}\u{1b}[31m\u{1f}\u{7f}"),
            r#""\u0000\u0001\u001b[31m\u001f\u007f""#
        );
    }

    #[test]
    fn non_ascii_passes_through_as_utf8() {
        assert_eq!(json("café ✓ 日本 🦀"), "\"café ✓ 日本 🦀\"");
        assert_eq!(json("a\u{2028}b\u{2029}"), r#""a\u2028b\u2029""#);
    }

    #[test]
    fn a_json_line_has_every_key_in_order() {
        assert_eq!(
            json_line(
                "2026-11-26T03:01:02.123Z",
                Level::Warn,
                123,
                "worker",
                "worker 4321 \"x\""
            ),
            r#"{"time":"2026-11-26T03:01:02.123Z","level":"WARN","pid":123,"role":"worker","event":"worker 4321 \"x\"","fields":{}}"#
        );
    }

    #[test]
    fn journal_lines_carry_the_priority_on_every_line() {
        assert_eq!(journal_line(Level::Error, "[ERROR] a\nb"), "<3>[ERROR] a\n<3>b");
        assert_eq!(journal_line(Level::Warn, "w"), "<4>w");
        assert_eq!(journal_line(Level::Info, "i"), "<6>i");
        assert_eq!(journal_line(Level::Debug, "d"), "<7>d");
        assert_eq!(journal_line(Level::Trace, "t"), "<7>t");
    }

    #[test]
    fn journal_stream_is_dev_colon_ino() {
        assert_eq!(parse_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_stream("8:"), None);
        assert_eq!(parse_stream("8"), None);
        assert_eq!(parse_stream("x:1"), None);
    }
}
