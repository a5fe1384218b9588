//! What `--help`, `--help-all`, `--man` and their `respawn ctl`
//! counterparts print, made from the tables of args.rs: the flags, their
//! ranges, defaults and meanings are written there once, and only laid out
//! here, for a terminal of 80 columns or for roff.

use crate::args::{CtlCommand, Flag, Section, CTL_COMMANDS, CTL_FLAGS, FLAGS};

/// The demo's routes, for the long help and the manual page.
const ROUTES: &[(&str, &str)] = &[
    ("GET /", "which worker answered"),
    (
        "GET /crash",
        "the handler panics: a 500, and the worker is replaced",
    ),
    ("GET /hang", "spins until --timeout kills the worker"),
    ("GET /sleep/MS", "answers after MS milliseconds"),
    ("GET /exit", "the worker exits hard, unanswered"),
    ("GET /version", "which build answers, during an upgrade"),
];

/// What the master does with each signal.
const SIGNALS: &[(&str, &str)] = &[
    ("TERM, QUIT", "stop gracefully"),
    ("INT", "stop at once"),
    ("HUP", "replace every worker, one at a time"),
    ("TTIN, TTOU", "one worker more, one fewer"),
    (
        "USR2",
        "upgrade to the binary now on disk (backs out if it fails)",
    ),
];

/// The exit codes of the master: the code, what it means, and as --help
/// says it.
const EXITS: &[(&str, &str, &str)] = &[
    (
        "0",
        "stopped (TERM, QUIT, INT); also --help and --version",
        "stopped",
    ),
    (
        "1",
        "failed: cannot bind, an unknown --user, a pid file held by a live master...",
        "failed",
    ),
    ("2", "a bad flag", "bad flag"),
    ("3", "gave up: workers kept failing to start", "gave up"),
];

/// The exit codes of `respawn ctl`.
const CTL_EXITS: &[(&str, &str)] = &[
    ("0", "done"),
    ("1", "refused (the reason follows) or unreachable"),
    ("2", "bad usage"),
];

impl Section {
    fn heading(self) -> &'static str {
        match self {
            Section::Master => "The master",
            Section::Command => "Workers in any language",
            Section::Demo => "The demo's, without -- CMD",
            Section::Help => "Help",
        }
    }
}

impl Flag {
    /// What the help says beside the spec: range, meaning, `[default]`.
    fn summary(&self) -> String {
        let range = self.range_text();
        let mut text = if range.is_empty() {
            self.meaning.to_owned()
        } else {
            format!("{range}: {}", self.meaning)
        };
        if !self.default.is_empty() && self.default != "off" {
            text += &format!(" [{}]", self.default);
        }
        text
    }
}

impl CtlCommand {
    /// `status [--json] [--watch]`.
    fn spec(&self) -> String {
        let mut spec = self.spec_bare();
        for id in self.flags {
            if let Some(flag) = CTL_FLAGS.iter().find(|flag| flag.id == *id) {
                spec += &format!(" [{}]", flag.spec());
            }
        }
        spec
    }
}

// ------------------------------------------------------------ the help

/// The help is read in a terminal: this wide at most.
const WIDTH: usize = 80;

const TITLE: &str = "respawn: a prefork supervisor, and a demo HTTP server to watch it heal";

/// The spec of a flag, indented as the help lists it: long-only flags
/// line up with the long names of those that have a short one.
fn listed(flag: &Flag) -> String {
    match (flag.short, flag.long) {
        (None, long) if !long.is_empty() => format!("    {}", flag.spec()),
        _ => flag.spec(),
    }
}

/// Where descriptions start: past the longest spec of the table.
fn column(specs: impl Iterator<Item = String>) -> usize {
    2 + specs.map(|spec| spec.chars().count()).max().unwrap_or(0) + 2
}

/// `text` cut into lines of at most `width` columns, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// One entry: `left` in the margin, `text` wrapped from `column` on.
fn entry(out: &mut Vec<String>, left: &str, text: &str, column: usize) {
    let lines = wrap(text, WIDTH - column);
    let mut lines = lines.iter();
    if 2 + left.chars().count() + 2 > column {
        out.push(format!("  {left}"));
    } else if let Some(first) = lines.next() {
        out.push(format!("  {left:<width$}{first}", width = column - 2));
    }
    for line in lines {
        out.push(format!("{:column$}{line}", ""));
    }
}

/// `label` and the items after it, wrapped with a hanging indent.
fn paragraph(out: &mut Vec<String>, label: &str, items: &[String]) {
    let indent = label.chars().count() + 1;
    for (at, line) in wrap(&items.join("; "), WIDTH - indent).into_iter().enumerate() {
        match at {
            0 => out.push(format!("{label} {line}")),
            _ => out.push(format!("{:indent$}{line}", "")),
        }
    }
}

fn signals() -> Vec<String> {
    SIGNALS
        .iter()
        .map(|(signal, does)| format!("{signal} {does}"))
        .collect()
}

/// `respawn --help`: the common flags, and where the rest are.
pub fn help() -> String {
    let column = column(FLAGS.iter().map(listed));
    let mut out = vec![
        TITLE.to_owned(),
        "usage: respawn [flags] [-- CMD [ARGS...]]   SECS may have a fraction".to_owned(),
        String::new(),
    ];
    for flag in FLAGS.iter().filter(|flag| flag.common) {
        entry(&mut out, &listed(flag), &flag.summary(), column);
    }
    out.push(String::new());
    paragraph(&mut out, "signals:", &signals());
    let exits: Vec<String> = EXITS
        .iter()
        .map(|(code, _, short)| format!("{code} {short}"))
        .collect();
    out.push(format!("exit: {}", exits.join(", ")));
    out.push("more: respawn --help-all (every flag), respawn ctl --help, man respawn".to_owned());
    lines(out)
}

/// `respawn --help-all`: every flag, by section, the demo's routes, the
/// signals and the exit codes.
pub fn help_all() -> String {
    let column = column(FLAGS.iter().map(listed));
    let mut out = vec![
        TITLE.to_owned(),
        "usage: respawn [flags] [-- CMD [ARGS...]]".to_owned(),
        "       respawn ctl PATH COMMAND   (respawn ctl --help)".to_owned(),
        String::new(),
        "Each flag with its range and [default]; SECS may have a fraction.".to_owned(),
    ];
    for section in Section::ALL {
        out.push(String::new());
        out.push(format!("{}:", section.heading()));
        for flag in FLAGS.iter().filter(|flag| flag.section == section) {
            entry(&mut out, &listed(flag), &flag.summary(), column);
        }
        if section == Section::Demo {
            for (route, answer) in ROUTES {
                entry(&mut out, route, answer, column);
            }
        }
    }
    out.push(String::new());
    out.push("Signals to the master:".to_owned());
    for (signal, does) in SIGNALS {
        entry(&mut out, signal, does, column);
    }
    out.push(String::new());
    out.push("Exit codes:".to_owned());
    for (code, long, _) in EXITS {
        entry(&mut out, code, long, column);
    }
    out.push(String::new());
    out.push("RUST_LOG=debug logs more. docs/operations.md says what each flag, signal".to_owned());
    out.push("and log line means; docs/deploy.md, how to run it as a service.".to_owned());
    lines(out)
}

/// `respawn ctl`'s usage: its commands, on as few lines as fit.
pub fn ctl_usage() -> String {
    let start = "usage: respawn ctl PATH ";
    let mut out = Vec::new();
    let mut line = start.to_owned();
    for (at, command) in CTL_COMMANDS.iter().enumerate() {
        let item = match at {
            0 => command.spec(),
            _ => format!(" | {}", command.spec()),
        };
        if line.chars().count() + item.chars().count() > WIDTH {
            out.push(std::mem::take(&mut line));
            line = format!("{:width$}{}", "", item.trim_start(), width = start.len() - 2);
        } else {
            line += &item;
        }
    }
    out.push(line);
    out.join("\n")
}

/// `respawn ctl --help`.
pub fn ctl_help() -> String {
    let specs = CTL_COMMANDS.iter().map(CtlCommand::spec);
    let column = column(specs.chain(CTL_FLAGS.iter().map(listed)));
    let mut out = vec![
        "respawn ctl: ask a running respawn (started with --control PATH)".to_owned(),
        "usage: respawn ctl PATH COMMAND".to_owned(),
        String::new(),
    ];
    for command in CTL_COMMANDS {
        entry(&mut out, &command.spec(), command.meaning, column);
    }
    out.push(String::new());
    for flag in CTL_FLAGS {
        entry(&mut out, &listed(flag), flag.meaning, column);
    }
    out.push(String::new());
    out.push("The protocol is in docs/control.md.".to_owned());
    let exits: Vec<String> = CTL_EXITS
        .iter()
        .map(|(code, what)| format!("{code} {what}"))
        .collect();
    paragraph(&mut out, "exit:", &[exits.join(", ")]);
    lines(out)
}

fn lines(out: Vec<String>) -> String {
    out.into_iter().map(|line| line + "\n").collect()
}

// ------------------------------------------------------ the manual pages

/// What respawn(1) says before its options.
const DESCRIPTION: &[&str] = &[
    "respawn is a prefork supervisor for Linux. One master process binds the listening sockets, \
     forks N worker processes that accept on them, and keeps exactly N alive. A worker that dies \
     is replaced; a worker whose handler panics tells the master first, so that its replacement \
     is already accepting while it finishes the connection it holds. Workers that keep failing \
     to start back off, and the master gives up (exit 3) rather than fork in a loop.",
    "Without `-- CMD`, each worker serves the demo's HTTP routes (THE DEMO, below). With it, each \
     worker executes CMD, a program in any language, with the listeners at fd 3 on (LISTEN_FDS, \
     as systemd passes them); it says Ready on a pipe to the master as docs/protocol.md says \
     (the Node and Python clients do), or is taken as Ready once executed (`--ready-on-exec`) or \
     on READY=1 (`--ready-on-notify`).",
    "The log goes to stderr, one line per event; docs/operations.md lists every line.",
];

/// The variables respawn(1) reads.
const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "RUST_LOG",
        "the log level: info unless set; debug adds a line per request, warn keeps only what \
         needs a look",
    ),
    (
        "RUST_LOG_STYLE, NO_COLOR",
        "colour on a terminal: none with RUST_LOG_STYLE=never or NO_COLOR set",
    ),
    (
        "LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES",
        "listeners passed by systemd's socket activation: served instead of --listen",
    ),
    (
        "NOTIFY_SOCKET, WATCHDOG_USEC",
        "systemd's readiness protocol and watchdog, spoken by the master",
    ),
    (
        "JOURNAL_STREAM",
        "naming stderr (under systemd): each line starts with its <N> priority, with no timestamp",
    ),
];

/// Text for roff: dashes and backslashes escaped, `code` in bold.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    let mut out = String::new();
    for (at, part) in escaped.split('`').enumerate() {
        match at % 2 {
            0 => out.push_str(part),
            _ => out.push_str(&format!("\\fB{part}\\fR")),
        }
    }
    // A line that starts with a dot or a quote would be a request.
    match out.starts_with(['.', '\'']) {
        true => format!("\\&{out}"),
        false => out,
    }
}

/// A flag's spec for roff: names bold, the value italic.
fn roff_spec(flag: &Flag) -> String {
    let long = match (flag.long, flag.value) {
        ("", value) => format!("\\fB\\-\\-\\fR \\fI{}\\fR", roff(value)),
        (long, "") => format!("\\fB\\-\\-{}\\fR", roff(long)),
        (long, value) => format!("\\fB\\-\\-{}\\fR \\fI{}\\fR", roff(long), roff(value)),
    };
    match flag.short {
        Some(short) => format!("\\fB\\-{short}\\fR, {long}"),
        None => long,
    }
}

/// `.TP` entries: a tag, then its text.
fn roff_entries(out: &mut Vec<String>, entries: impl IntoIterator<Item = (String, String)>) {
    for (tag, text) in entries {
        out.push(".TP".to_owned());
        out.push(tag);
        out.push(text);
    }
}

fn roff_flag(flag: &Flag) -> (String, String) {
    let mut text = roff(&format!("{}.", capitalised(flag.meaning)));
    if !flag.more.is_empty() {
        text += &format!(" {}", roff(flag.more));
    }
    let range = flag.range_text();
    let facts: Vec<String> = [
        (!range.is_empty()).then(|| format!("range: {range}")),
        (!flag.default.is_empty()).then(|| format!("default: {}", flag.default)),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !facts.is_empty() {
        text += &format!("\n.br\n{}.", roff(&capitalised(&facts.join("; "))));
    }
    (roff_spec(flag), text)
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map_or_else(String::new, |first| first.to_uppercase().chain(chars).collect())
}

fn bold(text: &str) -> String {
    format!("\\fB{}\\fR", roff(text))
}

fn header(name: &str) -> String {
    format!(
        ".\\\" Made by `{} --man`, from the table of flags in \
         master/src/bin/respawn/args.rs: edit that, then run make man.\n\
         .TH {} 1 \"\" \"respawn {}\" \"User Commands\"\n\
         .\\\" Left-aligned, no hyphens: flags and paths must read as typed.\n\
         .ad l\n\
         .nh",
        match name {
            "respawn-ctl" => "respawn ctl",
            _ => "respawn",
        },
        name.to_uppercase(),
        env!("CARGO_PKG_VERSION")
    )
}

/// `respawn --man`: respawn(1), in roff.
pub fn man() -> String {
    let mut out = vec![
        header("respawn"),
        ".SH NAME".to_owned(),
        format!("respawn \\- {}", roff(TITLE.trim_start_matches("respawn: "))),
        ".SH SYNOPSIS".to_owned(),
        ".B respawn".to_owned(),
        "[\\fIflags\\fR] [\\fB\\-\\-\\fR \\fICMD\\fR [\\fIARGS\\fR...]]".to_owned(),
        ".br".to_owned(),
        ".B respawn ctl".to_owned(),
        "\\fIPATH COMMAND\\fR".to_owned(),
        ".SH DESCRIPTION".to_owned(),
    ];
    for (at, paragraph) in DESCRIPTION.iter().enumerate() {
        if at > 0 {
            out.push(".PP".to_owned());
        }
        out.push(roff(paragraph));
    }
    out.push(".SH OPTIONS".to_owned());
    out.push("SECS may have a fraction (0.5).".to_owned());
    for section in Section::ALL {
        out.push(format!(".SS {}", roff(section.heading())));
        roff_entries(
            &mut out,
            FLAGS.iter().filter(|flag| flag.section == section).map(roff_flag),
        );
    }
    out.push(".SH THE DEMO".to_owned());
    out.push(
        "Without \\fB\\-\\-\\fR \\fICMD\\fR, each worker answers HTTP/1.1, one request per connection:"
            .to_owned(),
    );
    roff_entries(
        &mut out,
        ROUTES.iter().map(|(route, answer)| (bold(route), roff(answer))),
    );
    out.push(".SH SIGNALS".to_owned());
    out.push("Sent to the master (its pid is in \\fB\\-\\-pid\\-file\\fR):".to_owned());
    roff_entries(
        &mut out,
        SIGNALS.iter().map(|(signal, does)| (bold(signal), roff(does))),
    );
    out.push(".SH EXIT STATUS".to_owned());
    roff_entries(
        &mut out,
        EXITS.iter().map(|(code, long, _)| (bold(code), roff(long))),
    );
    out.push(".SH ENVIRONMENT".to_owned());
    roff_entries(
        &mut out,
        ENVIRONMENT.iter().map(|(name, what)| (bold(name), roff(what))),
    );
    out.push(".SH SEE ALSO".to_owned());
    out.push(".BR respawn\\-ctl (1),".to_owned());
    out.push(".BR sd_notify (3),".to_owned());
    out.push(".BR systemd.socket (5);".to_owned());
    out.push(roff(
        "README.md and docs/ (operations.md, deploy.md, control.md, protocol.md, security.md), \
         installed by make install in share/doc/respawn.",
    ));
    lines(out)
}

/// `respawn ctl --man`: respawn-ctl(1), in roff.
pub fn ctl_man() -> String {
    let mut out = vec![
        header("respawn-ctl"),
        ".SH NAME".to_owned(),
        "respawn\\-ctl \\- ask a running respawn master, through its control socket".to_owned(),
        ".SH SYNOPSIS".to_owned(),
        ".B respawn ctl".to_owned(),
        "\\fIPATH COMMAND\\fR [\\fIflags\\fR]".to_owned(),
        ".SH DESCRIPTION".to_owned(),
        roff(
            "Connects to the control socket of a master started with `--control PATH`, sends one \
             command and prints its answer. Commands that change something answer once it is \
             done (the master answers within 90 s in any case, saying how far it got; this client \
             waits 5 s for status and metrics, 100 s for the others). Only the master's user and \
             root may connect.",
        ),
        ".SH COMMANDS".to_owned(),
    ];
    roff_entries(
        &mut out,
        CTL_COMMANDS
            .iter()
            .map(|command| (bold(&command.spec()), roff(command.meaning))),
    );
    out.push(".SH OPTIONS".to_owned());
    roff_entries(
        &mut out,
        CTL_FLAGS.iter().map(|flag| (roff_spec(flag), roff(flag.meaning))),
    );
    out.push(".SH EXIT STATUS".to_owned());
    roff_entries(
        &mut out,
        CTL_EXITS.iter().map(|(code, what)| (bold(code), roff(what))),
    );
    out.push(".SH SEE ALSO".to_owned());
    out.push(".BR respawn (1);".to_owned());
    out.push(roff(
        "docs/control.md, the protocol, installed by make install in share/doc/respawn.",
    ));
    lines(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` fits a terminal of this many lines whole, as unicorn's own
    /// test holds its help to.
    const HELP_LINES: usize = 24;

    #[test]
    fn help_states_the_ranges_that_are_checked() {
        let (help, all) = (help(), help_all());
        for flag in FLAGS {
            let range = flag.range_text();
            // The flag's entry: its line and the lines wrapped under it.
            let entry = |text: &str| {
                let lines: Vec<&str> = text.lines().collect();
                let at = lines
                    .iter()
                    .position(|l| l.trim_start().starts_with(&flag.spec()))?;
                let rest = lines[at + 1..].iter().take_while(|l| l.starts_with("     "));
                Some(
                    std::iter::once(lines[at])
                        .chain(rest.copied())
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            };
            let in_all = entry(&all).unwrap_or_else(|| panic!("{} not in --help-all", flag.spec()));
            assert!(in_all.contains(&range), "{in_all:?}: {range}");
            match (flag.common, entry(&help)) {
                (true, Some(line)) => assert!(line.contains(&range), "{line:?}: {range}"),
                (true, None) => panic!("{} is common, and not in --help", flag.spec()),
                (false, Some(line)) => panic!("{line:?} is in --help, and not common"),
                (false, None) => {}
            }
        }
    }

    #[test]
    fn the_help_fits_a_terminal_and_lists_the_common_flags() {
        let help = help();
        assert!(help.lines().count() <= HELP_LINES, "{help}");
        for text in [help.clone(), help_all(), ctl_help(), ctl_usage()] {
            for line in text.lines() {
                assert!(line.chars().count() <= WIDTH, "{line:?}");
            }
        }
        assert!(help.contains("--help-all"), "{help}");
    }

    #[test]
    fn the_manual_pages_have_every_flag_and_command() {
        let (man, ctl) = (man(), ctl_man());
        for flag in FLAGS {
            assert!(man.contains(&roff_spec(flag)), "{}", flag.spec());
        }
        for command in CTL_COMMANDS {
            assert!(ctl.contains(&bold(&command.spec())), "{}", command.name);
        }
        for flag in CTL_FLAGS {
            assert!(ctl.contains(&roff_spec(flag)), "{}", flag.spec());
        }
        assert_eq!(roff(".x -y `z`"), "\\&.x \\-y \\fBz\\fR");
    }

    #[test]
    fn the_help_fits_80_columns() {
        for line in ctl_help().lines().chain(ctl_usage().lines()) {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
    }
}
