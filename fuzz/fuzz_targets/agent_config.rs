//! The agent's configuration file: written by a site's operator, but read before anything
//! else is checked, so a typo must give an error, never a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testbot_agent::config::AgentConfig;

fuzz_target!(|text: &str| {
    if let Err(message) = AgentConfig::parse(text) {
        assert!(!message.trim().is_empty());
    }
});
