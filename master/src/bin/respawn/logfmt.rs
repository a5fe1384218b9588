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
//!   "role":"master","event":"worker 4321 spawned","fields":{"kind":"spawned",
//!   "worker":4321}}`. `event` is the sentence a person would read; `fields`
//!   holds its facts, read from that sentence by [`facts`] (the library's
//!   lines are sentences, not key-values, and keep that one source): what
//!   kind of line it is, the worker or process it is about, its slot and
//!   generation, an exit's code or signal and reason, how long it lived or
//!   waits, a peer, a signal's name, an address. A fact the sentence does
//!   not hold is absent, never guessed, and none is read from the reason,
//!   a worker's own words. Under journald the JSON lines carry
//!   the priority prefix too.
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
    line.push_str(",\"fields\":{");
    for (i, (key, fact)) in facts(event).iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        push_json_string(&mut line, key);
        line.push(':');
        match fact {
            Fact::Number(n) => line.push_str(n),
            Fact::Text(text) => push_json_string(&mut line, text),
        }
    }
    line.push_str("}}");
    line
}

/// A fact of a log line: a number (written as it is in the sentence) or a
/// text.
#[derive(Debug, PartialEq)]
enum Fact<'a> {
    Number(&'a str),
    Text(&'a str),
}

/// The facts of one of respawn's sentences, in a fixed order. Each is read
/// where the sentence says it (`worker 4321 exited (code 70: why)`), so a
/// line that does not say it has no such field.
fn facts(event: &str) -> Vec<(&'static str, Fact<'_>)> {
    let mut facts = Vec::new();
    if let Some(kind) = kind(event) {
        facts.push(("kind", Fact::Text(kind)));
    }
    // The reason is the worker's own text (a panic's message, a program's
    // words): nothing in it is one of respawn's facts, so the others are
    // read in the line before it and after it only.
    let reason = exit_reason(event);
    let (head, tail) = match reason {
        Some(reason) => {
            let at = reason.as_ptr() as usize - event.as_ptr() as usize;
            (&event[..at], &event[at + reason.len()..])
        }
        None => (event, ""),
    };
    for (key, word) in [
        ("worker", "worker "),
        ("process", "process "),
        ("slot", "slot "),
        ("generation", "generation "),
    ] {
        if let Some(n) = either(head, tail, |part| number_after(part, word)) {
            facts.push((key, Fact::Number(n)));
        }
    }
    if let Some(code) = either(head, tail, |part| leading_number(after(part, " exited (code ")?)) {
        facts.push(("exit_code", Fact::Number(code)));
    }
    if let Some(signal) = either(head, tail, |part| {
        leading_number(after(part, " exited (signal ")?)
    }) {
        facts.push(("signal", Fact::Number(signal)));
    }
    if let Some(reason) = reason {
        facts.push(("reason", Fact::Text(reason)));
    }
    for (key, before, after_number) in [
        ("lived_secs", ") ", " s after it was forked"),
        ("backoff_secs", "respawns in ", " s"),
        ("backoff_secs", " retries in ", " s"),
        ("busy_secs", " hung ", " s"),
    ] {
        let found = either(head, tail, |part| number_between(part, before, after_number));
        if let Some(n) = found.filter(|_| !facts.iter().any(|(k, _)| *k == key)) {
            facts.push((key, Fact::Number(n)));
        }
    }
    let peer = either(head, tail, |part| {
        // A peer as a worker writes it (ipc's Peer): an address, or "unix".
        // Another sentence's "from" ("from now on") is not one.
        let peer = after(part, " from ")?.split([' ', ')', ';']).next()?;
        (peer == "unix" || peer.parse::<std::net::SocketAddr>().is_ok()).then_some(peer)
    });
    if let Some(peer) = peer {
        facts.push(("peer", Fact::Text(peer)));
    }
    if let Some(rest) = event.strip_prefix("received ") {
        let name = rest.split([' ', ',', ';', ':']).next().unwrap_or_default();
        facts.push(("signal_name", Fact::Text(name)));
    }
    if let Some(rest) = event.strip_prefix("listening on ") {
        facts.push(("address", Fact::Text(rest.split(' ').next().unwrap_or_default())));
    }
    facts
}

/// What `read` finds in `head`, else in `tail`: the line either side of a
/// worker's own words.
fn either<'a, T>(head: &'a str, tail: &'a str, read: impl Fn(&'a str) -> Option<T>) -> Option<T> {
    read(head).or_else(|| read(tail))
}

/// What kind of line it is, for a shipper to filter on without reading the
/// sentence.
fn kind(event: &str) -> Option<&'static str> {
    let about_a_worker = event
        .strip_prefix("worker ")
        .map(|rest| rest.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start());
    if let Some(what) = about_a_worker {
        let kind = [
            ("spawned", "spawned"),
            ("ready", "ready"),
            ("exited", "exited"),
            ("sent suicide", "suicide"),
            ("hung", "hung"),
            ("sent malformed", "malformed"),
            ("did not stop", "killed"),
            ("did not say ready", "killed"),
            ("sent no WATCHDOG", "killed"),
            ("stopping", "stopping"),
        ]
        .into_iter()
        .find(|(start, _)| what.starts_with(start));
        return kind.map(|(_, kind)| kind);
    }
    [
        ("received ", "signal"),
        ("listening on ", "listening"),
        ("rolling restart done", "rollout_done"),
        ("rolling restart: stopping", "retiring"),
        ("giving up", "gave_up"),
        ("master re-executed", "reexecuted"),
        ("upgrade: every worker runs", "reexecuting"),
        ("upgrade: re-executing", "reexec_failed"),
        ("control socket: ", "control"),
        ("all workers stopped", "stopped"),
        ("stopping gracefully", "stopping"),
        ("process ", "stray"),
        ("the last ", "dying"),
    ]
    .into_iter()
    .find(|(start, _)| event.starts_with(start))
    .map(|(_, kind)| kind)
    .or_else(|| event.contains(" backed out: ").then_some("backed_out"))
}

fn after<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    text.find(word).map(|at| &text[at + word.len()..])
}

/// The digits (and a decimal point) at the start of `text`, if any.
fn leading_number(text: &str) -> Option<&str> {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let number = text[..end].trim_end_matches('.');
    (!number.is_empty() && number.bytes().next().is_some_and(|b| b.is_ascii_digit())).then_some(number)
}

/// The number right after the first `word` that is followed by one.
fn number_after<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let after = &rest[at + word.len()..];
        if let Some(n) = leading_number(after) {
            // A word, not the tail of one (`subprocess 4`): the start, or
            // after a space or an opening parenthesis.
            let start = text.len() - rest.len() + at;
            if start == 0 || text[..start].ends_with([' ', '(']) {
                return Some(n);
            }
        }
        rest = after;
    }
    None
}

/// The number between `before` and `after_number`: `0.43` in `... (code
/// 1) 0.43 s after it was forked`.
fn number_between<'a>(text: &'a str, before: &str, after_number: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(found) = text[from..].find(after_number) {
        let end = from + found;
        let head = &text[..end];
        let start = head
            .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
            .map_or(0, |at| at + 1);
        let number = &head[start..];
        if leading_number(number).is_some_and(|n| n.len() == number.len()) && head[..start].ends_with(before)
        {
            return Some(number);
        }
        from = end + after_number.len();
    }
    None
}

/// The reason of an exit or a Suicide: `why` in `exited (code 70: why)`,
/// `sent suicide (why)`.
fn exit_reason(text: &str) -> Option<&str> {
    let inner = if let Some(rest) = after(text, " exited (") {
        // `code 70: why` or `signal 6, core dumped: why`, and nothing else
        // before the colon: respawn's own words after the parenthesis are
        // no reason.
        let (how, why) = rest.split_once(": ")?;
        let number = how
            .strip_prefix("code ")
            .or_else(|| how.strip_prefix("signal "))?;
        let number = number.strip_suffix(", core dumped").unwrap_or(number);
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        why
    } else {
        after(text, " sent suicide (")?
    };
    // To the parenthesis that closes the one opened before it.
    let mut depth = 1;
    for (i, c) in inner.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&inner[..i]);
                }
            }
            _ => {}
        }
    }
    None
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
            r#"{"time":"2026-11-26T03:01:02.123Z","level":"WARN","pid":123,"role":"worker","event":"worker 4321 \"x\"","fields":{"worker":4321}}"#
        );
    }

    #[test]
    fn the_facts_of_a_line_are_read_from_its_sentence() {
        use Fact::{Number as N, Text as T};
        assert_eq!(
            facts("worker 4321 spawned"),
            [("kind", T("spawned")), ("worker", N("4321"))]
        );
        assert_eq!(
            facts("worker 15805 exited (code 70: panicked: crash requested by GET /crash (x))"),
            [
                ("kind", T("exited")),
                ("worker", N("15805")),
                ("exit_code", N("70")),
                ("reason", T("panicked: crash requested by GET /crash (x)")),
            ]
        );
        assert_eq!(
            facts("worker 7 exited (signal 9) 0.43 s after it was forked; slot 2 respawns in 0.8 s"),
            [
                ("kind", T("exited")),
                ("worker", N("7")),
                ("slot", N("2")),
                ("signal", N("9")),
                ("lived_secs", N("0.43")),
                ("backoff_secs", N("0.8")),
            ]
        );
        assert_eq!(
            facts("worker 9 sent suicide (panicked: boom); replacing it"),
            [
                ("kind", T("suicide")),
                ("worker", N("9")),
                ("reason", T("panicked: boom"))
            ]
        );
        assert_eq!(
            facts("worker 12 hung 61.2 s on GET /hang from 127.0.0.1:50312 (running, 100% CPU); killing it"),
            [
                ("kind", T("hung")),
                ("worker", N("12")),
                ("busy_secs", N("61.2")),
                ("peer", T("127.0.0.1:50312")),
            ]
        );
        assert_eq!(
            facts("received SIGHUP, replacing every worker, one at a time"),
            [("kind", T("signal")), ("signal_name", T("SIGHUP"))]
        );
        assert_eq!(
            facts("listening on 127.0.0.1:8080"),
            [("kind", T("listening")), ("address", T("127.0.0.1:8080"))]
        );
        // Words the sentence holds that are not the fact: "from now on" is
        // no peer, and the colon after a signal's name is not part of it.
        assert_eq!(
            facts("received SIGHUP: the socket file /run/a.sock was gone; bound again, mode 0660: the workers started from now on accept there"),
            [("kind", T("signal")), ("signal_name", T("SIGHUP"))]
        );
        assert_eq!(
            facts("worker 7 dropped a slow connection from unix (no request in 5 s)"),
            [("worker", N("7")), ("peer", T("unix"))]
        );
        // The line a worker that exited 75 gets: no reason in it.
        assert_eq!(
            facts(
                "worker 8 exited (code 75) before it served; code 75 is EX_TEMPFAIL, try again later: \
                 1 of 2 workers running, slot 1 retries in 0.4 s, not counted toward giving up"
            ),
            [
                ("kind", T("exited")),
                ("worker", N("8")),
                ("slot", N("1")),
                ("exit_code", N("75")),
                ("backoff_secs", N("0.4")),
            ]
        );
        // A worker's own words hold no fact of respawn's, whatever they say.
        assert_eq!(
            facts(
                "worker 12 exited (code 70: uncaught Error: connection refused from 10.9.8.7:5432 \
                 (slot 7, generation 99)) 0.45 s after it was forked; slot 0 respawns in 0.1 s"
            ),
            [
                ("kind", T("exited")),
                ("worker", N("12")),
                ("slot", N("0")),
                ("exit_code", N("70")),
                (
                    "reason",
                    T("uncaught Error: connection refused from 10.9.8.7:5432 (slot 7, generation 99)")
                ),
                ("lived_secs", N("0.45")),
                ("backoff_secs", N("0.1")),
            ]
        );
        assert_eq!(facts("nothing to say here"), []);
        assert_eq!(facts("a subprocess 4 is not a process"), []);
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
