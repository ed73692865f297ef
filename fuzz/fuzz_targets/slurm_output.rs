//! What the executors read back from the tools they drive: `scontrol -o show job` output.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use testbot_agent::executor::slurm::{outcome_of, parse_scontrol};

fuzz_target!(|text: &str| {
    if let Some(status) = parse_scontrol(text) {
        assert!(!status.state.contains(char::is_whitespace));
        assert_ne!(status.reason.as_deref(), Some("None"));
        let _ = outcome_of(&status, Duration::from_secs(60));
    }
});
