//! `.github/testbot.toml`: written by anyone who can open a pull request against a repository
//! that uses the App.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testbot_proto::repo_config::{MAX_JOBS, RepoConfig, paths_match, validate_job_name};

fuzz_target!(|text: &str| {
    let Ok(config) = RepoConfig::parse(text) else {
        return;
    };
    assert!(config.jobs.len() <= MAX_JOBS);
    // Paths to match the globs against: the file's own words, as a changed-files list.
    let changed: Vec<String> = text
        .split_whitespace()
        .take(16)
        .map(str::to_string)
        .collect();
    for (name, job) in &config.jobs {
        assert!(
            validate_job_name(name).is_ok(),
            "job name {name:?} was accepted"
        );
        assert!(config.job(name).is_some());
        if let Ok(spec) = job.spec(name) {
            let _ = spec.validate();
            assert_eq!(spec.name.as_deref(), Some(name.as_str()));
        }
        let _ = job.describe_placement();
        let _ = job.on.describe();
        if let Some(push) = &job.on.push {
            let _ = paths_match(&push.paths, &changed);
            for branch in &changed {
                let _ = job.on.runs_on_push(branch);
            }
        }
        if let Some(pull_request) = &job.on.pull_request {
            let _ = paths_match(&pull_request.paths, &changed);
        }
        for tag in &changed {
            let _ = job.on.runs_on_tag(tag);
        }
    }
});
