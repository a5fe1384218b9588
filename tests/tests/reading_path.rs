//! docs/architecture.md opens with a reading path: the functions that carry
//! the seed article's concepts, file by file, in order. This holds it to the
//! code: every function it names is in the file it names, and the whole
//! path stays short enough to read in one sitting (at most 800 lines).

use respawn_tests::workspace;

/// The `reading-path` block: (file, function), in order.
fn path() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(workspace().join("docs/architecture.md")).expect("architecture.md");
    let block = doc
        .split("```text reading-path\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```text reading-path block in docs/architecture.md");
    block
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut words = line.split_whitespace();
            let file = words.next().expect("a file").to_owned();
            let function = words.next().expect("a function").to_owned();
            (file, function)
        })
        .collect()
}

/// The lines of `fn name` in `source`, signature to closing brace; None if
/// there is no such function.
fn function_lines(source: &str, name: &str) -> Option<usize> {
    let lines: Vec<&str> = source.lines().collect();
    let start = lines.iter().position(|line| {
        line.split("fn ")
            .skip(1)
            .any(|after| after.starts_with(name) && after[name.len()..].starts_with(['(', '<']))
    })?;
    let mut depth = 0i32;
    let mut opened = false;
    for (i, line) in lines[start..].iter().enumerate() {
        for ch in line.chars() {
            match ch {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        if opened && depth == 0 {
            return Some(i + 1);
        }
    }
    None
}

#[test]
fn the_reading_path_names_functions_that_exist_and_reads_in_one_sitting() {
    let path = path();
    assert!(path.len() >= 20, "a path of {} steps", path.len());
    let mut total = 0;
    let mut missing = Vec::new();
    for (file, function) in &path {
        let source = std::fs::read_to_string(workspace().join(file)).unwrap_or_default();
        match function_lines(&source, function) {
            Some(lines) => total += lines,
            None => missing.push(format!("{file}: fn {function}")),
        }
    }
    assert_eq!(
        missing,
        Vec::<String>::new(),
        "named by the reading path, not found"
    );
    assert!(
        total <= 800,
        "the reading path is {total} lines: more than one sitting"
    );
    let doc = std::fs::read_to_string(workspace().join("docs/architecture.md")).expect("architecture.md");
    let said = doc
        .split("(about ")
        .nth(1)
        .and_then(|rest| rest.split(" lines;").next())
        .and_then(|n| n.parse::<usize>().ok())
        .expect("architecture.md says how long the path is: (about N lines;");
    assert!(
        said.abs_diff(total) * 10 <= total,
        "architecture.md says about {said} lines; the path is {total}"
    );
}

/// README.md says how big the whole is, beside the path: "about N lines of
/// Rust outside the tests", counted as the crates' sources (ipc, worker,
/// master with the demo binary) up to their `#[cfg(test)] mod tests`. It
/// stays within 10% of the count, as the path's length does.
#[test]
fn the_readme_says_the_size_of_the_whole_within_ten_percent() {
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display())) {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for krate in ["ipc", "worker", "master"] {
        sources(&workspace().join(krate).join("src"), &mut files);
    }
    let total: usize = files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file).expect("a source file");
            let lines: Vec<&str> = text.lines().collect();
            let tests = lines
                .windows(2)
                .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod tests"));
            tests.unwrap_or(lines.len())
        })
        .sum();
    let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let said = readme
        .split("(about ")
        .nth(1)
        .and_then(|rest| rest.split(" lines of Rust").next())
        .and_then(|n| n.replace(',', "").parse::<usize>().ok())
        .expect("README.md says (about N lines of Rust outside the tests");
    assert!(
        said.abs_diff(total) * 10 <= total,
        "README.md says about {said} lines of Rust outside the tests; there are {total}"
    );
}
