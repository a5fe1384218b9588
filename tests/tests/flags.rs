//! One source for every flag: the table in master/src/bin/respawn/args.rs.
//! What a user reads of it, checked here through the binary: `--help` and
//! `--help-all` list flags the parser takes, the manual pages in the tree
//! (installed by `make install`) are what the binary prints now, and a
//! mistyped flag gets the nearest one named, in two lines. (args.rs's unit
//! tests check the table itself: ranges, defaults, and the flag tables of
//! README.md and docs/operations.md.)

use respawn_tests::*;
use std::collections::BTreeSet;
use std::process::Command;

/// The line after a bad flag's.
const WHERE_THE_FLAGS_ARE: &str = "'respawn --help' lists the common flags, 'respawn --help-all' every one";

/// The long names of the flags a help lists: `--workers` from
/// `  -w, --workers N   ...` and `      --user NAME   ...`, the flag lines
/// only (indented by 2 or 6), not the lines a description wraps onto.
fn listed(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter(|line| line.len() - line.trim_start().len() <= 6)
        .filter_map(|line| {
            let spec = line.trim_start().split("  ").next()?;
            spec.split([' ', ','])
                .find(|word| word.starts_with("--") && word.len() > 2)
                .map(str::to_owned)
        })
        .collect()
}

fn output_of(args: &[&str]) -> String {
    let (status, output) = run_to_exit(args);
    assert_eq!(status.code(), Some(0), "{args:?}: {output}");
    output
}

#[test]
fn help_lists_the_common_flags_and_help_all_every_one() {
    let (help, all) = (output_of(&["--help"]), output_of(&["--help-all"]));
    let (common, every) = (listed(&help), listed(&all));
    assert!(common.len() >= 10, "{common:?}");
    assert!(common.is_subset(&every), "{:?}", common.difference(&every));
    assert!(every.len() > common.len() + 5, "{every:?}");
    for flag in [
        "--ready-on-notify",
        "--ready-on-exec",
        "--demo-bad-ipc",
        "--man",
        "--help-all",
    ] {
        assert!(every.contains(flag), "{flag} not in --help-all:\n{all}");
    }
    assert!(
        help.contains("respawn --help-all"),
        "no pointer to the rest:\n{help}"
    );
}

/// Each flag `--help-all` lists is taken by the parser: followed by a flag
/// that is none, the error is about that one (or, for a flag that takes a
/// value, about its value), never "no such flag" about the listed one.
#[test]
fn every_flag_help_all_lists_is_one_the_binary_takes() {
    let all = output_of(&["--help-all"]);
    for flag in listed(&all) {
        let (status, output) = run_to_exit(&[&flag, "--nonesuch", "--nonesuch"]);
        if ["--help", "--help-all", "--man", "--version"].contains(&flag.as_str()) {
            assert_eq!(status.code(), Some(0), "{flag}: {output}");
            continue;
        }
        assert_eq!(status.code(), Some(2), "{flag}: {output}");
        let first = output.lines().next().unwrap_or_default();
        assert!(
            !first.starts_with(&format!("respawn: {flag}: no such flag")),
            "{first}"
        );
        assert!(
            first == "respawn: --nonesuch: no such flag" || first.starts_with(&format!("respawn: {flag}")),
            "{flag}: {output}"
        );
    }
}

/// `--worker 2` printed an 11-line usage and no hint.
#[test]
fn a_mistyped_flag_names_the_nearest_in_two_lines() {
    for (args, line) in [
        (
            &["--worker", "2"][..],
            "--worker: no such flag; did you mean --workers?",
        ),
        (
            &["--graceful", "5"][..],
            "--graceful: no such flag; did you mean --graceful-timeout?",
        ),
        (
            &["--pidfile", "/x"][..],
            "--pidfile: no such flag; did you mean --pid-file?",
        ),
        (&["--nonesuch"][..], "--nonesuch: no such flag"),
    ] {
        let (status, output) = run_to_exit(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {output}");
        assert_eq!(
            output,
            format!("respawn: {line}\n{WHERE_THE_FLAGS_ARE}\n"),
            "{args:?}"
        );
    }
}

/// docs/man/*.1 are installed by `make install`: they must be what the
/// binary would make of its table now.
#[test]
fn the_manual_pages_in_the_tree_are_what_the_binary_prints() {
    for (args, page) in [
        (&["--man"][..], "docs/man/respawn.1"),
        (&["ctl", "--man"][..], "docs/man/respawn-ctl.1"),
    ] {
        let printed = output_of(args);
        let path = workspace().join(page);
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            printed == kept,
            "{page} is not what `respawn {}` prints: run `make man`, and commit it",
            args.join(" ")
        );
    }
}

/// groff reads them without a warning, and they say what a reader looks
/// for: every section, every flag the help lists.
#[test]
fn the_manual_pages_are_roff_that_groff_reads_without_a_warning() {
    const TEST: &str = "the_manual_pages_are_roff_that_groff_reads_without_a_warning";
    if Command::new("groff").arg("--version").output().is_err() {
        skip(
            TEST,
            Skip::Environment,
            "groff is not installed (apt-get install groff-base)",
        );
        return;
    }
    let all = output_of(&["--help-all"]);
    for (args, sections) in [
        (
            &["--man"][..],
            &[
                "NAME",
                "SYNOPSIS",
                "DESCRIPTION",
                "OPTIONS",
                "SIGNALS",
                "EXIT STATUS",
                "SEE ALSO",
            ][..],
        ),
        (
            &["ctl", "--man"][..],
            &[
                "NAME",
                "SYNOPSIS",
                "COMMANDS",
                "OPTIONS",
                "EXIT STATUS",
                "SEE ALSO",
            ][..],
        ),
    ] {
        let dir = TempDir::new("respawn-man");
        let page = dir.join("page.1");
        std::fs::write(&page, output_of(args)).unwrap();
        let rendered = Command::new("groff")
            .args(["-man", "-ww", "-Tutf8", "-rLL=80n"])
            .arg(&page)
            .env("GROFF_NO_SGR", "1")
            .output()
            .expect("running groff");
        let warnings = String::from_utf8_lossy(&rendered.stderr);
        assert!(
            rendered.status.success() && warnings.is_empty(),
            "{args:?}: {warnings}"
        );
        // Rendered with bold as overstrikes: take them out to read it.
        let text = String::from_utf8_lossy(&rendered.stdout);
        let text: String = {
            let chars: Vec<char> = text.chars().collect();
            let mut plain = String::new();
            let mut at = 0;
            while at < chars.len() {
                if chars.get(at + 1) == Some(&'\u{8}') {
                    at += 2;
                    continue;
                }
                plain.push(chars[at]);
                at += 1;
            }
            plain
        };
        for section in sections {
            assert!(
                text.lines().any(|l| l == *section),
                "{args:?}: no {section}\n{text}"
            );
        }
        if args == ["--man"] {
            for flag in listed(&all) {
                assert!(text.contains(&flag), "{flag} is not in respawn(1)");
            }
        }
    }
}
