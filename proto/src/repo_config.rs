//! `.github/testbot.toml`: the jobs a repository declares for the GitHub App, and when each one
//! runs.
//!
//! The broker reads the file through GitHub's API at a commit it trusts: the pushed commit for a
//! push, the base branch for a pull request (so a fork cannot change what runs, where, or with
//! what resources). A site's agent reads it again itself, at the same trusted commit, and checks
//! that the job it was handed is the one the file declares ([`ConfigJob::spec`]).
//!
//! ```toml
//! [jobs.unit]
//! site = "hpc"                   # or labels = ["slurm"]; default: any site
//! executor = "slurm"
//! timeout = "30m"
//! resources = { cpus = 4, memory = "8G", partition = "short" }
//! env = { OMP_NUM_THREADS = "4" }
//! script = "make test"
//! results = ["build/**/junit*.xml"]
//!
//! [jobs.unit.on]
//! push = { branches = ["main"], paths = ["src/**"] }  # post-merge CI
//! pull_request = { automatic = "writers" }            # default: only when a maintainer asks
//! comment = true                                      # `/testbot run` (the default)
//! label = ["run-on-hpc"]
//! schedule = [{ cron = "0 3 * * *" }]                 # nightly, on the default branch
//! tag = ["v*"]
//! ```
//!
//! Parsing is strict: an unknown key is an error, and every error reads `LINE:COL: message`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::jobs::{JobSpec, Resources};
use crate::toml_errors::FileError;

/// Where the file lives in a repository.
pub const CONFIG_PATH: &str = ".github/testbot.toml";

/// Largest file accepted, in bytes.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// Most jobs one file may declare.
pub const MAX_JOBS: usize = 64;

/// Most runs one trigger may ask for (`repeat`, `/testbot repeat N`).
pub const MAX_REPEAT: u32 = 100;

/// A repository's `.github/testbot.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// The jobs, by name (1–64 characters of `A-Z a-z 0-9 _ -`). Default: none.
    #[serde(default)]
    pub jobs: BTreeMap<String, ConfigJob>,
}

/// One named job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigJob {
    /// The script, run with `bash --noprofile --norc -eo pipefail` in a checkout of the commit.
    pub script: String,
    /// The site to run on. Default: any site that accepts the repository and the labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Labels an agent must all have. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// `shell`, `slurm`, `docker`, `podman` or `kubernetes`. Default: whatever the agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    /// The container image, for container and Kubernetes executors. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Wall-clock limit: `90s`, `30m`, `2h`. Default: the agent's own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Resources to ask for; the site's policy caps them. Default: none asked.
    #[serde(default)]
    pub resources: ConfigResources,
    /// Environment variables (not secrets: the file is public). Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Test result files to collect after the script, as globs relative to the checkout.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<String>,
    /// How to run a chosen few of its tests, with `{tests}` where they go (`pytest {tests}`):
    /// a repeat, a confirmation of a suspected flake, or a bisection step then runs just the
    /// tests in question. Default: none (always the whole script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_tests: Option<String>,
    /// How to list its tests, one per line as `run_tests` names them (`pytest --collect-only
    /// -q`): chosen tests are then patterns matched against the list. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    /// When a run of the job on a push shows a test flaky for the first time, the broker
    /// bisects the commits since it last passed to find the one that made it so (runs of the
    /// job on those commits, of that test alone when `run_tests` is given). Default: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bisect: bool,
    /// Tests known to be flaky on the branch do not fail the job's check run: a run that
    /// failed only in them passes, with them named apart, until 299 clean runs show a test's
    /// failure rate below 1 % (with 95 % confidence). Default: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quarantine: bool,
    /// Keep at least `runs` runs of the job on each of the last `commits` commits of the
    /// default branch that ran it: the broker fills idle capacity with them, so a rare flake
    /// shows up at the commit that brought it. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryFill>,
    /// Runs of the job each trigger starts. Default: 1.
    #[serde(default = "one")]
    pub repeat: u32,
    /// When the job runs. Default: only when a maintainer asks (`/testbot run`).
    #[serde(default)]
    pub on: Triggers,
}

fn one() -> u32 {
    1
}

/// `history = { commits = 20, runs = 5 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryFill {
    /// 1 to [`MAX_HISTORY`].
    pub commits: u32,
    /// 1 to [`MAX_HISTORY`].
    pub runs: u32,
}

/// The most commits, and runs a commit, a job's history fill asks for.
pub const MAX_HISTORY: u32 = 100;

fn yes() -> bool {
    true
}

/// Resources as a maintainer writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigResources {
    /// CPU cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory: `512M`, `8G`, or a number of MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Slurm partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Slurm account to charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Slurm quality of service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// Slurm nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Slurm tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntasks: Option<u32>,
    /// Slurm node feature constraint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
}

/// When a job runs. With none of these set, it runs only when a maintainer asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Triggers {
    /// After a push to one of these branches (post-merge CI). Default: not on pushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushTrigger>,
    /// On pull requests without being asked. Default: only on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<PullRequestTrigger>,
    /// Whether `/testbot run` and `/testbot repeat` may start the job. Default: true.
    #[serde(default = "yes")]
    pub comment: bool,
    /// A pull request gets one of these labels added. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label: Vec<String>,
    /// On a schedule. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduleTrigger>,
    /// A tag matching one of these globs is pushed (releases). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag: Vec<String>,
}

impl Default for Triggers {
    fn default() -> Self {
        Triggers {
            push: None,
            pull_request: None,
            comment: true,
            label: Vec::new(),
            schedule: Vec::new(),
            tag: Vec::new(),
        }
    }
}

/// `on.push`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushTrigger {
    /// Branch names or globs (`main`, `release/*`).
    pub branches: Vec<String>,
    /// Only when a changed file matches one of these globs (`src/**`, `*.f90`). Default: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// `on.pull_request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequestTrigger {
    /// Who gets the job run on their pull requests (opened, or pushed to) without asking.
    /// Default: `never`.
    #[serde(default)]
    pub automatic: Automatic,
    /// Only when a changed file matches one of these globs. Default: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// Whose pull requests run a job without being asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Automatic {
    /// Nobody's: a maintainer asks with `/testbot run`.
    #[default]
    Never,
    /// Authors with write permission on the repository (never forks' authors without it).
    Writers,
}

/// One entry of `on.schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleTrigger {
    /// A five-field cron expression in UTC (`0 3 * * *`: every day at 03:00).
    pub cron: String,
    /// The branch whose head runs. Default: the repository's default branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
}

/// What is wrong with a config file. `Display` is `LINE:COL: message`; callers put the file's
/// name in front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub FileError);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConfigError {}

impl RepoConfig {
    /// Parses and checks the file's text.
    pub fn parse(text: &str) -> Result<RepoConfig, ConfigError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError(FileError {
                position: None,
                message: format!(
                    "the file is {} bytes; the limit is {MAX_CONFIG_BYTES} bytes",
                    text.len()
                ),
            }));
        }
        let config: RepoConfig =
            toml::from_str(text).map_err(|e| ConfigError(FileError::from_toml(text, &e)))?;
        config
            .validate()
            .map_err(|(path, message)| ConfigError(FileError::at_path(text, &path, message)))?;
        Ok(config)
    }

    /// The job called `name`, if the file declares it.
    pub fn job(&self, name: &str) -> Option<&ConfigJob> {
        self.jobs.get(name)
    }

    /// Checks what serde cannot; the error names the dotted path of the value at fault.
    fn validate(&self) -> Result<(), (String, String)> {
        if self.jobs.len() > MAX_JOBS {
            return Err((
                "jobs".into(),
                format!(
                    "{} jobs are declared; the limit is {MAX_JOBS}",
                    self.jobs.len()
                ),
            ));
        }
        for (name, job) in &self.jobs {
            let at = |field: &str| format!("jobs.{name}.{field}");
            validate_job_name(name).map_err(|m| (format!("jobs.{name}"), m))?;
            if let Some(site) = &job.site {
                crate::jobs::validate_word("site", site).map_err(|m| (at("site"), m))?;
            }
            if let Some(timeout) = &job.timeout {
                parse_timeout(timeout).map_err(|m| (at("timeout"), m))?;
            }
            if let Some(memory) = &job.resources.memory {
                crate::units::parse_memory_mib(memory).map_err(|m| (at("resources.memory"), m))?;
            }
            if job.repeat == 0 || job.repeat > MAX_REPEAT {
                return Err((
                    at("repeat"),
                    format!("repeat is {}; write 1 to {MAX_REPEAT}", job.repeat),
                ));
            }
            for (i, pattern) in job.results.iter().enumerate() {
                crate::results::validate_result_patterns(std::slice::from_ref(pattern))
                    .map_err(|m| (at(&format!("results.{i}")), m))?;
            }
            crate::results::validate_result_patterns(&job.results)
                .map_err(|m| (at("results"), m))?;
            crate::jobs::validate_selection(job.run_tests.as_deref(), &[])
                .map_err(|m| (at("run_tests"), m))?;
            crate::jobs::validate_list(job.list.as_deref()).map_err(|m| (at("list"), m))?;
            if job.list.is_some() && job.run_tests.is_none() {
                return Err((
                    at("list"),
                    "a list command is for choosing tests, and the job has no run_tests to run them with".into(),
                ));
            }
            if let Some(fill) = &job.history {
                for (field, n) in [("commits", fill.commits), ("runs", fill.runs)] {
                    if n == 0 || n > MAX_HISTORY {
                        return Err((
                            at(&format!("history.{field}")),
                            format!("{field} is {n}; write 1 to {MAX_HISTORY}"),
                        ));
                    }
                }
            }
            let spec = job.spec(name).map_err(|m| (format!("jobs.{name}"), m))?;
            spec.validate()
                .map_err(|m| (spec_error_path(name, &m), m))?;
            job.on
                .validate()
                .map_err(|(path, m)| (at(&format!("on.{path}")), m))?;
        }
        Ok(())
    }
}

/// The path of the field a [`JobSpec::validate`] message names, when it names one.
fn spec_error_path(job: &str, message: &str) -> String {
    let field = message.split([' ', ':']).next().unwrap_or_default();
    let known = [
        "script",
        "labels",
        "label",
        "env",
        "executor",
        "image",
        "resources",
    ];
    match known.iter().find(|k| field.starts_with(*k)) {
        Some(&"label") => format!("jobs.{job}.labels"),
        Some(k) => format!("jobs.{job}.{k}"),
        None => format!("jobs.{job}"),
    }
}

impl Triggers {
    fn validate(&self) -> Result<(), (String, String)> {
        if let Some(push) = &self.push {
            if push.branches.is_empty() {
                return Err((
                    "push.branches".into(),
                    "name at least one branch (or a glob such as \"release/*\")".into(),
                ));
            }
            for (i, branch) in push.branches.iter().enumerate() {
                validate_ref_glob(branch).map_err(|m| (format!("push.branches.{i}"), m))?;
            }
            for (i, path) in push.paths.iter().enumerate() {
                validate_relative_glob(path).map_err(|m| (format!("push.paths.{i}"), m))?;
            }
        }
        if let Some(pr) = &self.pull_request {
            for (i, path) in pr.paths.iter().enumerate() {
                validate_relative_glob(path).map_err(|m| (format!("pull_request.paths.{i}"), m))?;
            }
        }
        for (i, label) in self.label.iter().enumerate() {
            if label.trim().is_empty() || label.len() > 50 {
                return Err((
                    format!("label.{i}"),
                    "a label name has 1 to 50 characters".into(),
                ));
            }
        }
        for (i, schedule) in self.schedule.iter().enumerate() {
            parse_cron(&schedule.cron).map_err(|m| (format!("schedule.{i}.cron"), m))?;
            if let Some(branch) = &schedule.branch {
                validate_ref_glob(branch).map_err(|m| (format!("schedule.{i}.branch"), m))?;
                if branch.contains(['*', '?']) {
                    return Err((
                        format!("schedule.{i}.branch"),
                        "a scheduled job runs one branch: name it, without a glob".into(),
                    ));
                }
            }
        }
        for (i, tag) in self.tag.iter().enumerate() {
            validate_ref_glob(tag).map_err(|m| (format!("tag.{i}"), m))?;
        }
        Ok(())
    }

    /// Whether a push of `branch` runs the job (paths are checked apart, with the changed
    /// files).
    pub fn runs_on_push(&self, branch: &str) -> bool {
        self.push
            .as_ref()
            .is_some_and(|push| crate::glob::any_match(&push.branches, branch))
    }

    /// When the job runs, in words, one item per trigger (for `testbot config check` and
    /// `/testbot help`).
    pub fn describe(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if let Some(push) = &self.push {
            let mut part = format!("push to {}", push.branches.join(", "));
            if !push.paths.is_empty() {
                part += &format!(" (changing {})", push.paths.join(", "));
            }
            parts.push(part);
        }
        if let Some(pr) = &self.pull_request
            && pr.automatic == Automatic::Writers
        {
            let mut part = "pull requests by authors with write permission".to_string();
            if !pr.paths.is_empty() {
                part += &format!(" (changing {})", pr.paths.join(", "));
            }
            parts.push(part);
        }
        if self.comment {
            parts.push("`/testbot run`".into());
        }
        for label in &self.label {
            parts.push(format!("label `{label}`"));
        }
        for schedule in &self.schedule {
            let branch = schedule.branch.as_deref().unwrap_or("the default branch");
            parts.push(format!("schedule `{}` (UTC) on {branch}", schedule.cron));
        }
        if !self.tag.is_empty() {
            parts.push(format!("tags {}", self.tag.join(", ")));
        }
        if parts.is_empty() {
            parts.push("never (no trigger is set and `comment = false`)".into());
        }
        parts
    }

    /// Whether a push of the tag `tag` runs the job.
    pub fn runs_on_tag(&self, tag: &str) -> bool {
        crate::glob::any_match(&self.tag, tag)
    }
}

/// Whether any of `changed` (paths in the repository) matches any of `patterns`; true when
/// there are no patterns.
pub fn paths_match(patterns: &[String], changed: &[String]) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let mut set = globset::GlobSetBuilder::new();
    for pattern in patterns {
        // Checked when the file was parsed.
        if let Ok(glob) = path_glob(pattern) {
            set.add(glob);
        }
    }
    let Ok(set) = set.build() else {
        return false;
    };
    changed.iter().any(|path| set.is_match(path))
}

fn path_glob(pattern: &str) -> Result<globset::Glob, globset::Error> {
    globset::GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
}

impl ConfigJob {
    /// Where and how the job runs, in words: site, labels, executor, image, resources, timeout.
    pub fn describe_placement(&self) -> String {
        let mut parts = Vec::new();
        parts.push(match &self.site {
            Some(site) => format!("site {site}"),
            None => "any site".to_string(),
        });
        if !self.labels.is_empty() {
            parts.push(format!("labels {}", self.labels.join(", ")));
        }
        if let Some(executor) = &self.executor {
            parts.push(format!("executor {executor}"));
        }
        if let Some(image) = &self.image {
            parts.push(format!("image {image}"));
        }
        let r = &self.resources;
        if let Some(cpus) = r.cpus {
            parts.push(format!("{cpus} CPU{}", if cpus == 1 { "" } else { "s" }));
        }
        if let Some(memory) = &r.memory {
            parts.push(format!("memory {memory}"));
        }
        if let Some(gpus) = r.gpus {
            parts.push(format!("{gpus} GPU{}", if gpus == 1 { "" } else { "s" }));
        }
        if let Some(partition) = &r.partition {
            parts.push(format!("partition {partition}"));
        }
        if let Some(timeout) = &self.timeout {
            parts.push(format!("timeout {timeout}"));
        }
        if self.repeat > 1 {
            parts.push(format!("{} runs each time", self.repeat));
        }
        parts.join("; ")
    }

    /// The job as the broker submits it and as the agent expects to be handed it: the same
    /// function on both sides, so the agent can compare what it was given with what the file
    /// says.
    pub fn spec(&self, name: &str) -> Result<JobSpec, String> {
        let timeout_secs = self.timeout.as_deref().map(parse_timeout).transpose()?;
        let memory_mib = self
            .resources
            .memory
            .as_deref()
            .map(crate::units::parse_memory_mib)
            .transpose()?;
        let r = &self.resources;
        Ok(JobSpec {
            script: self.script.clone(),
            name: Some(name.to_string()),
            labels: self.labels.clone(),
            env: self.env.clone(),
            secret_env: Vec::new(),
            timeout_secs,
            executor: self.executor.clone(),
            image: self.image.clone(),
            resources: Resources {
                cpus: r.cpus,
                memory_mib,
                gpus: r.gpus,
                partition: r.partition.clone(),
                account: r.account.clone(),
                qos: r.qos.clone(),
                nodes: r.nodes,
                ntasks: r.ntasks,
                constraint: r.constraint.clone(),
            },
            results: self.results.clone(),
            run_tests: self.run_tests.clone(),
            list: self.list.clone(),
            tests: Vec::new(),
            quarantine: self.quarantine,
        })
    }
}

/// A job name: 1–64 characters of `A-Z a-z 0-9 _ -`, not starting with `-` (so it can follow
/// `/testbot run` on a comment line unambiguously).
pub fn validate_job_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "job name {name:?} is invalid: use 1-64 characters of A-Z a-z 0-9 _ - (not starting with -)"
        ))
    }
}

/// `90s`, `30m`, `2h`, `1h 30m` → seconds (at least one).
pub fn parse_timeout(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write e.g. \"30m\" or \"2h\""))?;
    match duration.as_secs() {
        0 => Err(format!("{text:?} is under a second")),
        secs => Ok(secs),
    }
}

/// A cron expression with five fields (minute hour day-of-month month day-of-week), in UTC.
pub fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    let fields = text.split_whitespace().count();
    if fields != 5 {
        return Err(format!(
            "{text:?} has {fields} fields; write five: minute hour day-of-month month day-of-week (e.g. \"0 3 * * *\")"
        ));
    }
    text.parse::<croner::Cron>()
        .map_err(|e| format!("{text:?} is not a cron expression: {e}"))
}

/// A branch or tag name, or a glob of them, as git allows them.
fn validate_ref_glob(pattern: &str) -> Result<(), String> {
    let bad = pattern.is_empty()
        || pattern.len() > 255
        || pattern.starts_with('/')
        || pattern.starts_with("refs/")
        || pattern.ends_with('/')
        || pattern.contains("..")
        || pattern
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "~^:\\[".contains(c));
    if bad {
        Err(format!(
            "{pattern:?} is not a branch or tag name (write \"main\" or \"release/*\", without refs/)"
        ))
    } else {
        Ok(())
    }
}

/// A glob of paths relative to the repository's root, that cannot leave it.
fn validate_relative_glob(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() || pattern.starts_with('/') || pattern.split('/').any(|p| p == "..") {
        return Err(format!(
            "{pattern:?} must be a path relative to the repository, without \"..\""
        ));
    }
    path_glob(pattern)
        .map(|_| ())
        .map_err(|e| format!("{pattern:?} is not a glob: {}", e.kind()))
}

#[cfg(test)]
mod tests;
