//! `/testbot` command comments: anyone who can comment on a pull request writes them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testbot_proto::commands::{Command, MAX_COMMANDS, is_full_sha, parse_comment};

fuzz_target!(|body: &str| {
    let commands = parse_comment(body);
    assert!(
        commands.len() <= MAX_COMMANDS + 1,
        "{} results",
        commands.len()
    );
    for command in commands.iter().flatten() {
        if let Some(sha) = command.sha() {
            assert!(is_full_sha(sha), "a command names {sha:?} as its commit");
            assert!(sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        if let Command::Repeat { count, .. } = command {
            assert!(*count > 0, "repeat 0 was accepted");
        }
    }
    // Only the last result may be the refusal for too many commands.
    let too_many = format!("a comment may hold at most {MAX_COMMANDS} commands");
    for result in commands.iter().take(MAX_COMMANDS) {
        if let Err(err) = result {
            assert_ne!(err.message, too_many, "{err}");
        }
    }
});
