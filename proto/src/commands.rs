//! The `/testbot` commands maintainers write in pull request and commit comments.
//!
//! ```text
//! /testbot run [JOB...] [SHA]        run the named jobs (default: all that allow comments)
//! /testbot repeat N [JOB...] [SHA]   N runs of each (statistical runs)
//! /testbot cancel [JOB...]           cancel the named jobs' runs (default: all) on this commit
//! /testbot help                      what this repository enables
//! ```
//!
//! A command is a line of its own that starts with `/testbot` (after at most three spaces, as
//! Markdown allows). Lines in fenced or indented code blocks, in quotes (`>`) and in HTML
//! comments are not commands, so quoting someone's command or showing one in an example does
//! not run anything. A comment may hold several commands. `SHA` is a full 40-character commit
//! id: on a fork's pull request it is the approval of exactly that commit (a shorter prefix could
//! be matched by a brute-forced commit, so it is not accepted as one).
//!
//! The agent parses approval comments with the same function, to check for itself that a
//! comment names the commit it is asked to run.

use std::fmt;

use crate::repo_config::{MAX_REPEAT, validate_job_name};

/// The word that starts every command.
pub const PREFIX: &str = "/testbot";

/// Most commands one comment may hold; later ones are refused.
pub const MAX_COMMANDS: usize = 10;

/// One command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/testbot run`: jobs (empty: every job that allows comments), and the commit it names.
    Run {
        jobs: Vec<String>,
        sha: Option<String>,
    },
    /// `/testbot repeat N`.
    Repeat {
        count: u32,
        jobs: Vec<String>,
        sha: Option<String>,
    },
    /// `/testbot cancel`.
    Cancel { jobs: Vec<String> },
    /// `/testbot help`.
    Help,
}

impl Command {
    /// The full commit id the command names, if any.
    pub fn sha(&self) -> Option<&str> {
        match self {
            Command::Run { sha, .. } | Command::Repeat { sha, .. } => sha.as_deref(),
            Command::Cancel { .. } | Command::Help => None,
        }
    }

    /// Whether the command starts jobs (and so needs write permission and, on a fork, an
    /// approval).
    pub fn starts_jobs(&self) -> bool {
        matches!(self, Command::Run { .. } | Command::Repeat { .. })
    }
}

/// A command line that could not be read, with the line and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// The line as written, trimmed.
    pub line: String,
    pub message: String,
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.line, self.message)
    }
}

/// Every command line of a comment body, in order.
pub fn parse_comment(body: &str) -> Vec<Result<Command, CommandError>> {
    let mut commands = Vec::new();
    for line in command_lines(body) {
        if commands.len() == MAX_COMMANDS {
            commands.push(Err(CommandError {
                line: line.to_string(),
                message: format!("a comment may hold at most {MAX_COMMANDS} commands"),
            }));
            break;
        }
        commands.push(parse_line(line).map_err(|message| CommandError {
            line: line.to_string(),
            message,
        }));
    }
    commands
}

/// Whether `token` is a full commit id (40 hexadecimal digits).
pub fn is_full_sha(token: &str) -> bool {
    token.len() == 40 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `token` looks like an abbreviated commit id (7 to 39 hexadecimal digits).
pub fn is_short_sha(token: &str) -> bool {
    (7..40).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The lines of `body` that are commands, trimmed: outside code blocks, quotes and HTML
/// comments.
fn command_lines(body: &str) -> impl Iterator<Item = &str> {
    let mut fence: Option<(char, usize)> = None;
    let mut in_html_comment = false;
    body.lines().filter_map(move |raw| {
        let line = raw.trim_end();
        let indent = line.len() - line.trim_start().len();
        let text = line.trim_start();
        if in_html_comment {
            if text.contains("-->") {
                in_html_comment = false;
            }
            return None;
        }
        if let Some((ch, len)) = fence {
            let run = text.chars().take_while(|&c| c == ch).count();
            if indent < 4 && run >= len && text[run..].trim().is_empty() {
                fence = None;
            }
            return None;
        }
        if indent < 4 {
            for ch in ['`', '~'] {
                let run = text.chars().take_while(|&c| c == ch).count();
                if run >= 3 {
                    fence = Some((ch, run));
                    return None;
                }
            }
        }
        if text.starts_with("<!--") {
            in_html_comment = !text.contains("-->");
            return None;
        }
        if indent >= 4 || line.starts_with('\t') || text.starts_with('>') {
            return None;
        }
        let rest = text.strip_prefix(PREFIX)?;
        (rest.is_empty() || rest.starts_with(char::is_whitespace)).then_some(text)
    })
}

fn parse_line(line: &str) -> Result<Command, String> {
    let mut words = line.split_whitespace().skip(1);
    let Some(verb) = words.next() else {
        return Err("no command given; write `/testbot help` for the commands".into());
    };
    let words: Vec<&str> = words.collect();
    match verb.to_ascii_lowercase().as_str() {
        "run" => {
            let (jobs, sha) = jobs_and_sha(&words)?;
            Ok(Command::Run { jobs, sha })
        }
        "repeat" => {
            let Some((count, rest)) = words.split_first() else {
                return Err(format!(
                    "say how many runs: `/testbot repeat N` with N from 1 to {MAX_REPEAT}"
                ));
            };
            let count = count
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_REPEAT).contains(n))
                .ok_or_else(|| {
                    format!("{count:?} is not a number of runs from 1 to {MAX_REPEAT}")
                })?;
            let (jobs, sha) = jobs_and_sha(rest)?;
            Ok(Command::Repeat { count, jobs, sha })
        }
        "cancel" => {
            let (jobs, sha) = jobs_and_sha(&words)?;
            if sha.is_some() {
                return Err("`/testbot cancel` takes job names, not a commit".into());
            }
            Ok(Command::Cancel { jobs })
        }
        "help" if words.is_empty() => Ok(Command::Help),
        "help" => Err("`/testbot help` takes no arguments".into()),
        other => Err(format!(
            "unknown command `{other}`; the commands are run, repeat, cancel and help"
        )),
    }
}

fn jobs_and_sha(words: &[&str]) -> Result<(Vec<String>, Option<String>), String> {
    let mut jobs: Vec<String> = Vec::new();
    let mut sha = None;
    for word in words {
        if is_full_sha(word) {
            if sha.is_some() {
                return Err("name one commit at most".into());
            }
            sha = Some(word.to_ascii_lowercase());
        } else {
            validate_job_name(word)?;
            if !jobs.iter().any(|j| j == word) {
                jobs.push(word.to_string());
            }
        }
    }
    Ok((jobs, sha))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn ok(body: &str) -> Vec<Command> {
        parse_comment(body)
            .into_iter()
            .map(|c| c.expect("parses"))
            .collect()
    }

    fn run(jobs: &[&str], sha: Option<&str>) -> Command {
        Command::Run {
            jobs: jobs.iter().map(|s| s.to_string()).collect(),
            sha: sha.map(str::to_string),
        }
    }

    #[test]
    fn commands_are_lines_of_their_own() {
        assert_eq!(ok("/testbot run"), vec![run(&[], None)]);
        assert_eq!(
            ok("Looks good.\n\n/testbot run unit gpu\n"),
            vec![run(&["unit", "gpu"], None)]
        );
        assert_eq!(ok("  /testbot run unit"), vec![run(&["unit"], None)]);
        assert_eq!(ok("/testbot run unit unit"), vec![run(&["unit"], None)]);
        assert_eq!(ok("/TESTBOT RUN unit").len(), 0, "the prefix is lower case");
        assert_eq!(ok("/testbot RUN unit"), vec![run(&["unit"], None)]);
        assert!(ok("please /testbot run").is_empty());
        assert!(ok("/testbotrun").is_empty());
        assert!(ok("`/testbot run`").is_empty());
        assert!(ok("").is_empty());
    }

    #[test]
    fn several_commands_in_one_comment() {
        assert_eq!(
            ok("/testbot run unit\r\nthanks!\r\n/testbot repeat 20 flaky\n/testbot help"),
            vec![
                run(&["unit"], None),
                Command::Repeat {
                    count: 20,
                    jobs: vec!["flaky".into()],
                    sha: None
                },
                Command::Help
            ]
        );
        let many = "/testbot help\n".repeat(MAX_COMMANDS + 3);
        let parsed = parse_comment(&many);
        assert_eq!(parsed.len(), MAX_COMMANDS + 1);
        assert!(
            parsed[MAX_COMMANDS]
                .as_ref()
                .unwrap_err()
                .message
                .contains("at most")
        );
    }

    #[test]
    fn code_blocks_quotes_and_html_comments_are_not_commands() {
        let body = "\
To run the tests, a maintainer writes:

```
/testbot run unit
```

~~~~markdown
/testbot run gpu
~~~
/testbot run still-in-the-fence
~~~~

    /testbot run indented

\t/testbot run tabbed
> /testbot run quoted
>> /testbot run quoted twice
<!-- /testbot run hidden -->
<!--
/testbot run hidden too
-->
/testbot cancel
";
        assert_eq!(ok(body), vec![Command::Cancel { jobs: vec![] }]);
        // An unclosed fence hides the rest, as GitHub renders it.
        assert!(ok("```\n/testbot run").is_empty());
    }

    #[test]
    fn a_full_sha_is_an_approval_and_a_short_one_is_not() {
        assert_eq!(
            ok(&format!("/testbot run {SHA}")),
            vec![run(&[], Some(SHA))]
        );
        let upper = SHA.to_ascii_uppercase();
        assert_eq!(
            ok(&format!("/testbot run unit {upper}")),
            vec![run(&["unit"], Some(SHA))]
        );
        assert_eq!(ok(&format!("/testbot run {SHA}"))[0].sha(), Some(SHA));
        // A short sha reads as a job name; the broker tells the user what it is.
        assert_eq!(ok("/testbot run 0123456"), vec![run(&["0123456"], None)]);
        assert!(is_short_sha("0123456") && !is_full_sha("0123456"));
        assert!(!is_short_sha("unit"));
        let two = parse_comment(&format!("/testbot run {SHA} {SHA}"));
        assert!(two[0].as_ref().unwrap_err().message.contains("one commit"));
    }

    #[test]
    fn bad_commands_say_what_is_wrong() {
        let cases = [
            ("/testbot", "no command given"),
            ("/testbot rnu", "unknown command `rnu`"),
            ("/testbot repeat", "say how many runs"),
            ("/testbot repeat 0 unit", "\"0\" is not a number of runs"),
            ("/testbot repeat 101", "\"101\" is not a number of runs"),
            ("/testbot repeat many", "\"many\" is not a number"),
            ("/testbot run $(id)", "job name \"$(id)\" is invalid"),
            ("/testbot help me", "takes no arguments"),
            (
                "/testbot cancel 0123456789abcdef0123456789abcdef01234567",
                "takes job names",
            ),
        ];
        for (line, expected) in cases {
            let parsed = parse_comment(line);
            let err = parsed[0].as_ref().unwrap_err();
            assert!(err.message.contains(expected), "{line}: {err}");
            assert_eq!(err.line, line);
        }
    }

    #[test]
    fn what_each_command_asks() {
        assert!(run(&[], None).starts_jobs());
        assert!(!Command::Help.starts_jobs());
        assert!(!Command::Cancel { jobs: vec![] }.starts_jobs());
    }
}
