//! `testbot action`: what `uses: community-testbot/action@v1` runs inside a GitHub Actions job.
//!
//! The composite action (`action/action.yml`) passes its inputs as `INPUT_*` environment
//! variables. This command:
//!
//! 1. requests the workflow's OIDC token from `ACTIONS_ID_TOKEN_REQUEST_URL` (with
//!    `ACTIONS_ID_TOKEN_REQUEST_TOKEN` and the audience) and masks it; when there is none it says
//!    why in one message: the workflow lacks `permissions: id-token: write`, or this is a pull
//!    request from a fork, which a maintainer must approve instead;
//! 2. submits the job (once per `repeat`, each with a fresh token: a token submits one job);
//! 3. streams the remote log into the step's output live, with the set-up in a `::group::`;
//! 4. writes the outputs (`job-id`, `result`, `exit-code`, `log-url`) and a step summary;
//! 5. exits with the job's exit code. If the workflow is cancelled (SIGINT/SIGTERM), it cancels
//!    the remote job and waits for it to stop.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::SecretString;
use testbot_proto::client::{BrokerClient, ClientError, follow_log};
use testbot_proto::jobs::{Job, JobSpec, JobState, Resources};

use crate::output::LogPrinter;

/// How long the OIDC token request may take.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The action's inputs, from `INPUT_*` variables (GitHub's convention for action inputs).
#[derive(Debug, Default)]
struct Inputs {
    broker_url: String,
    run: String,
    labels: Vec<String>,
    site: Option<String>,
    executor: Option<String>,
    image: Option<String>,
    resources: Resources,
    env: BTreeMap<String, String>,
    /// Names of `env` variables that are secret (the `secret-env` input).
    secret_env: Vec<String>,
    timeout_minutes: Option<u64>,
    repeat: u32,
    /// Result file globs (the `results` input).
    results: Vec<String>,
    /// How to run chosen tests (`run-tests`), how to list them (`list-tests`), and which
    /// (`tests`, one per line).
    run_tests: Option<String>,
    list: Option<String>,
    tests: Vec<String>,
    /// Known-flaky failures do not fail the step (the `quarantine` input).
    quarantine: bool,
    audience: String,
}

fn input(name: &str) -> Option<String> {
    std::env::var(format!("INPUT_{}", name.to_uppercase().replace(' ', "_")))
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// An input that lists words, separated by commas or whitespace.
fn input_list(name: &str) -> Vec<String> {
    input(name)
        .map(|l| {
            l.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn number<T: std::str::FromStr>(name: &str) -> anyhow::Result<Option<T>> {
    input(name)
        .map(|v| {
            v.parse()
                .map_err(|_| anyhow::anyhow!("input {name} must be a whole number, not {v:?}"))
        })
        .transpose()
}

impl Inputs {
    fn read() -> anyhow::Result<Inputs> {
        let broker_url = input("broker-url")
            .context("input broker-url is required: the URL of the testbot broker")?;
        let run = std::env::var("INPUT_RUN").unwrap_or_default();
        anyhow::ensure!(
            !run.trim().is_empty(),
            "input run is required: the script to run on the remote machine"
        );
        let labels = input_list("labels");
        let mut env = BTreeMap::new();
        for line in input("env").unwrap_or_default().lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line
                .split_once('=')
                .with_context(|| format!("input env: {line:?} is not NAME=value"))?;
            env.insert(name.trim().to_string(), value.to_string());
        }
        // A secret's value comes from the `env` input or, better, from the step's own `env:`
        // (`TOKEN: ${{ secrets.TOKEN }}`), so it is not written into the action's inputs.
        let secret_env = input_list("secret-env");
        for name in &secret_env {
            if !env.contains_key(name) {
                let value = std::env::var(name).map_err(|_| {
                    anyhow::anyhow!(
                        "input secret-env names {name}, which is neither in input env nor in the step's environment: add `{name}: ${{{{ secrets.{name} }}}}` to the step's env"
                    )
                })?;
                env.insert(name.clone(), value);
            }
            // GitHub masks what it knows as a secret already; a value built in the workflow it
            // does not, so say so for every line of it.
            for line in env[name].lines().filter(|l| !l.trim().is_empty()) {
                println!("::add-mask::{line}");
            }
        }
        let memory_mib = input("memory")
            .map(|m| testbot_proto::units::parse_memory_mib(&m).map_err(anyhow::Error::msg))
            .transpose()?;
        let time_minutes: Option<u64> = match input("time") {
            None => None,
            Some(t) => Some(
                humantime::parse_duration(&t)
                    .map(|d| d.as_secs().div_ceil(60))
                    .or_else(|_| t.parse::<u64>())
                    .map_err(|_| {
                        anyhow::anyhow!("input time must be minutes or a duration like 90m")
                    })?,
            ),
        };
        let audience = input("audience").unwrap_or_else(|| broker_url.clone());
        Ok(Inputs {
            run,
            labels,
            site: input("site"),
            executor: input("executor"),
            image: input("image"),
            resources: Resources {
                cpus: number("cpus")?,
                memory_mib,
                gpus: number("gpus")?,
                partition: input("partition"),
                account: input("account"),
                ..Resources::default()
            },
            env,
            secret_env,
            timeout_minutes: number("timeout-minutes")?.or(time_minutes),
            repeat: number("repeat")?.unwrap_or(1).max(1),
            results: input_list("results"),
            run_tests: input("run-tests"),
            list: input("list-tests"),
            quarantine: input("quarantine").is_some_and(|q| q == "true"),
            // One per line: a test's name may hold commas and spaces (`test_io[a, b]`).
            tests: input("tests")
                .map(|t| {
                    t.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            audience,
            broker_url,
        })
    }

    fn spec(&self, attempt: u32) -> anyhow::Result<JobSpec> {
        let mut labels = self.labels.clone();
        if let Some(site) = &self.site {
            labels.push(format!("site:{site}"));
        }
        let name = std::env::var("GITHUB_JOB")
            .ok()
            .map(|job| match self.repeat {
                1 => job,
                n => format!("{job} ({attempt}/{n})"),
            });
        let spec = JobSpec {
            script: self.run.clone(),
            name,
            labels,
            env: self.env.clone(),
            secret_env: self.secret_env.clone(),
            timeout_secs: self.timeout_minutes.map(|m| m * 60),
            executor: self.executor.clone(),
            image: self.image.clone(),
            resources: self.resources.clone(),
            results: self.results.clone(),
            run_tests: self.run_tests.clone(),
            list: self.list.clone(),
            tests: self.tests.clone(),
            quarantine: self.quarantine,
        };
        spec.validate()
            .map_err(|e| anyhow::anyhow!("invalid job: {e}"))?;
        Ok(spec)
    }
}

/// Why there is no OIDC token, in the words a maintainer needs.
fn missing_token_message() -> String {
    if is_fork_pull_request() {
        return "this is a pull request from a fork: GitHub gives fork pull requests no OIDC \
                token, so it cannot run on testbot sites by itself. A maintainer with write \
                access approves this exact commit on the pull request (comment `/testbot run`)."
            .into();
    }
    "the workflow has no OIDC token: give the job `permissions: id-token: write` (and \
     `contents: read`) so the action can prove to the broker which repository and commit it runs"
        .into()
}

/// Whether the event is a pull request whose head is in another repository.
fn is_fork_pull_request() -> bool {
    let event = std::env::var("GITHUB_EVENT_NAME").unwrap_or_default();
    if !event.starts_with("pull_request") {
        return false;
    }
    let Ok(path) = std::env::var("GITHUB_EVENT_PATH") else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(payload) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let head = &payload["pull_request"]["head"]["repo"];
    let base = &payload["pull_request"]["base"]["repo"];
    head["fork"].as_bool() == Some(true) || head["full_name"] != base["full_name"]
}

/// Asks the Actions runtime for an OIDC token minted for `audience`.
async fn request_token(audience: &str) -> anyhow::Result<SecretString> {
    let (Ok(url), Ok(request_token)) = (
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL"),
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) else {
        anyhow::bail!(missing_token_message());
    };
    testbot_proto::client::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(TOKEN_TIMEOUT)
        .build()
        .context("Cannot build an HTTP client")?;
    let response = http
        .get(&url)
        .query(&[("audience", audience)])
        .bearer_auth(&request_token)
        .header("Accept", "application/json")
        .send()
        .await
        .context("Cannot reach the Actions token service")?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "the Actions token service refused the token request ({status})"
    );
    #[derive(serde::Deserialize)]
    struct TokenAnswer {
        value: String,
    }
    let answer: TokenAnswer = response
        .json()
        .await
        .context("the Actions token service's answer has no token")?;
    // Never let the token appear in the log.
    println!("::add-mask::{}", answer.value);
    Ok(SecretString::from(answer.value))
}

/// Appends `name=value` lines to a file GitHub names in an environment variable.
fn append_to(variable: &str, text: &str) -> anyhow::Result<()> {
    let Ok(path) = std::env::var(variable) else {
        return Ok(());
    };
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .with_context(|| format!("Cannot write {variable} ({path})"))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("Cannot write {variable} ({path})"))
}

fn result_word(job: &Job) -> &'static str {
    match job.state {
        JobState::Succeeded => "success",
        JobState::Failed => "failure",
        JobState::Cancelled => "cancelled",
        _ => "error",
    }
}

/// Most tests the step summary lists by name; the job's page lists them all.
const SUMMARY_TESTS: usize = 20;

/// A job-made name as inline code in the step summary's Markdown: it cannot form a link, an
/// image, HTML or a table cell of its own.
fn code_span(text: &str) -> String {
    let text: String = text
        .chars()
        .map(|c| match c {
            '`' => '\'',
            '|' => '/',
            c if c.is_control() => ' ',
            c => c,
        })
        .take(200)
        .collect();
    format!("`{text}`")
}

/// The step summary's test section: totals, then the tests that failed or passed only on a
/// rerun (flaky), apart.
fn tests_summary(results: &testbot_proto::test_results::JobResults) -> String {
    let t = &results.totals;
    let mut out = format!("| tests | {t} |\n\n");
    let (_, flaky) = testbot_proto::test_results::failed_and_flaky(&results.cases);
    let (new, known) = results.new_and_known_failures();
    for (title, cases) in [
        ("Failed", new),
        ("Failed, known to be flaky", known),
        ("Flaky (failed, then passed on a rerun)", flaky),
    ] {
        if cases.is_empty() {
            continue;
        }
        out.push_str(&format!("**{title}: {}**\n\n", cases.len()));
        for case in cases.iter().take(SUMMARY_TESTS) {
            out.push_str(&format!("- {}\n", code_span(&case.test_id())));
        }
        if cases.len() > SUMMARY_TESTS {
            out.push_str(&format!(
                "- and {} more (see the job's page)\n",
                cases.len() - SUMMARY_TESTS
            ));
        }
        out.push('\n');
    }
    out
}

fn summary(
    job: &Job,
    log_url: &str,
    results: Option<&testbot_proto::test_results::JobResults>,
) -> String {
    let duration = match (job.started_at_ms, job.finished_at_ms) {
        (Some(start), Some(end)) => humantime::format_duration(Duration::from_millis(
            (end - start).max(0) as u64 / 1000 * 1000,
        ))
        .to_string(),
        _ => "-".into(),
    };
    let agent = job.agent.clone().unwrap_or_else(|| "-".into());
    let (site, agent_name) = agent.split_once('/').unwrap_or(("-", &agent));
    let scheduler = job
        .metadata
        .get("slurm_job_id")
        .map(|id| format!("Slurm job {id}"))
        .unwrap_or_else(|| "-".into());
    let result = match (&job.reason, job.exit_code) {
        (Some(reason), _) => format!("{} ({reason})", result_word(job)),
        (None, Some(code)) => format!("{} (exit code {code})", result_word(job)),
        _ => result_word(job).to_string(),
    };
    let mut text = format!(
        "### testbot job {id}: {word}\n\n\
         | | |\n|---|---|\n\
         | site | {site} |\n| agent | {agent_name} |\n| scheduler job | {scheduler} |\n\
         | duration | {duration} |\n| result | {result} |\n| log | [{log_url}]({log_url}) |\n",
        id = job.id,
        word = result_word(job),
    );
    match results {
        Some(results) => text.push_str(&tests_summary(results)),
        None => text.push('\n'),
    }
    text
}

/// Where the ids of running remote jobs are kept, so a cancelled workflow can cancel them.
fn active_jobs_file() -> std::path::PathBuf {
    let dir = std::env::var_os("RUNNER_TEMP").unwrap_or_else(|| "/tmp".into());
    let run = std::env::var("GITHUB_RUN_ID").unwrap_or_default();
    std::path::Path::new(&dir).join(format!("testbot-active-jobs-{run}"))
}

fn active_jobs() -> Vec<i64> {
    std::fs::read_to_string(active_jobs_file())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn set_active_jobs(ids: &[i64]) -> anyhow::Result<()> {
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(active_jobs_file(), text).context("Cannot record the running remote job")
}

/// The step that runs when the workflow is cancelled (the runner kills the main step): cancels
/// the remote jobs the action had running.
pub async fn cancel() -> anyhow::Result<i32> {
    let ids = active_jobs();
    if ids.is_empty() {
        println!("testbot: no remote job to cancel");
        return Ok(0);
    }
    let broker_url = input("broker-url").context("input broker-url is required")?;
    let audience = input("audience").unwrap_or_else(|| broker_url.clone());
    let client = BrokerClient::new(&broker_url, request_token(&audience).await?)?;
    for id in ids {
        match client.cancel(testbot_proto::jobs::JobId(id)).await {
            Ok(job) => println!(
                "testbot: the workflow was cancelled; cancelled remote job {}",
                job.id
            ),
            Err(err) => println!("::warning::cannot cancel remote job {id}: {err}"),
        }
    }
    set_active_jobs(&[])?;
    Ok(0)
}

/// How often the watchdog checks that the step's process is still alive.
const WATCHDOG_INTERVAL: Duration = Duration::from_millis(200);

/// Starts a watchdog in its own session: some runners (nektos act, and GitHub's after its grace
/// period) kill the step's process outright when the workflow is cancelled, leaving no chance
/// to cancel the remote job. The watchdog outlives the kill, sees the jobs still recorded as
/// running, and cancels them.
fn start_watchdog() {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let spawned = std::process::Command::new(exe)
        .args(["action", "--watch", &std::process::id().to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(err) = spawned {
        eprintln!(
            "testbot: cannot start the cancel watchdog ({err}); a killed step will leave its remote job running"
        );
    }
}

/// The watchdog: waits for process `parent` to end; if it ended with remote jobs still
/// recorded as running, it was killed, so cancel them.
pub async fn watch(parent: i32) -> anyhow::Result<i32> {
    let pid = nix::unistd::Pid::from_raw(parent);
    while nix::sys::signal::kill(pid, None).is_ok() {
        tokio::time::sleep(WATCHDOG_INTERVAL).await;
    }
    cancel().await
}

/// Runs the action; returns the exit code of the step. A failure is reported as an error
/// annotation on stdout (the runner shows it at the top of the run; stderr can be lost when the
/// step ends at once).
pub async fn run() -> anyhow::Result<i32> {
    match run_all().await {
        Ok(code) => Ok(code),
        Err(err) => {
            println!(
                "::error title=testbot::{}",
                format!("{err:#}").replace('\n', " ")
            );
            Ok(1)
        }
    }
}

async fn run_all() -> anyhow::Result<i32> {
    let inputs = Inputs::read()?;
    start_watchdog();
    if inputs.repeat > 1 {
        return run_batch(&inputs).await;
    }
    run_once(&inputs, 1).await
}

/// How often a batch's progress is read.
const BATCH_POLL: Duration = Duration::from_secs(1);

/// `repeat: N`: one batch of N runs, in parallel on the agents that take them. A line per run
/// as it ends (not N interleaved logs), then the totals and every test across the runs in the
/// step summary; fails if any run failed.
async fn run_batch(inputs: &Inputs) -> anyhow::Result<i32> {
    let mut spec = inputs.spec(1)?;
    spec.name = std::env::var("GITHUB_JOB").ok();
    println!(
        "::group::testbot: submitting {} runs to {}",
        inputs.repeat, inputs.broker_url
    );
    let token = request_token(&inputs.audience).await?;
    let client = BrokerClient::new(&inputs.broker_url, token)?;
    let batch = match client.submit_batch(&spec, inputs.repeat, None).await {
        Ok(batch) => batch,
        Err(ClientError::Api { message, .. }) => {
            println!("::endgroup::");
            anyhow::bail!("the broker refused the batch: {message}");
        }
        Err(err) => {
            println!("::endgroup::");
            return Err(err.into());
        }
    };
    let id = batch.id;
    let ids: Vec<i64> = batch.jobs.iter().map(|j| j.id.0).collect();
    let base = inputs.broker_url.trim_end_matches('/').to_string();
    println!(
        "batch {id}: {} runs queued (jobs {}-{}); each run's log: {base}/jobs/JOB",
        batch.runs,
        ids.first().unwrap_or(&0),
        ids.last().unwrap_or(&0)
    );
    println!("::endgroup::");
    let mut running = active_jobs();
    running.extend(&ids);
    set_active_jobs(&running)?;
    append_to(
        "GITHUB_OUTPUT",
        &format!(
            "batch-id={id}
"
        ),
    )?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut cancelled = false;
    let mut reported = std::collections::HashSet::new();
    let batch = loop {
        let now = client.batch(id).await?;
        for job in now.jobs.iter().filter(|j| j.state.is_terminal()) {
            if reported.insert(job.id) {
                let line = crate::output::describe_run(job, now.runs);
                println!("{}", crate::output::sanitize(&line));
            }
        }
        if now.is_finished() {
            break now;
        }
        tokio::select! {
            _ = tokio::time::sleep(BATCH_POLL) => continue,
            _ = term.recv(), if !cancelled => {}
            _ = int.recv(), if !cancelled => {}
        }
        cancelled = true;
        eprintln!("testbot: the workflow was cancelled; cancelling batch {id}");
        let cancel = async {
            let fresh = request_token(&inputs.audience).await?;
            BrokerClient::new(&inputs.broker_url, fresh)?
                .cancel_batch(id)
                .await
                .map_err(anyhow::Error::from)
        };
        if let Err(err) = cancel.await {
            eprintln!("testbot: cannot cancel batch {id}: {err}");
        }
    };
    set_active_jobs(
        &active_jobs()
            .into_iter()
            .filter(|other| !ids.contains(other))
            .collect::<Vec<_>>(),
    )?;
    let code = batch.cli_exit_code();
    let word = match code {
        0 => "success",
        130 => "cancelled",
        _ => "failure",
    };
    append_to(
        "GITHUB_OUTPUT",
        &format!("result={word}\nexit-code={code}\n"),
    )?;
    let tests = if inputs.results.is_empty() {
        None
    } else {
        match client.batch_results(id).await {
            Ok(results) => Some(results),
            Err(err) => {
                eprintln!("testbot: cannot read batch {id}'s test results: {err}");
                None
            }
        }
    };
    append_to(
        "GITHUB_STEP_SUMMARY",
        &batch_summary(&batch, &base, tests.as_ref()),
    )?;
    if code != 0 {
        println!(
            "::error title=testbot batch {id}::{}",
            crate::output::sanitize(&batch.totals.to_string())
        );
    }
    Ok(code)
}

/// A batch's step summary: its totals, each run that did not succeed, and the tests that were
/// flaky or broken across its runs.
fn batch_summary(
    batch: &testbot_proto::batches::Batch,
    base: &str,
    tests: Option<&testbot_proto::test_results::BatchResults>,
) -> String {
    let mut text = format!(
        "### testbot batch {}: {} runs\n\n{}\n\n",
        batch.id, batch.runs, batch.totals
    );
    for job in batch.jobs.iter().filter(|j| j.state != JobState::Succeeded) {
        text.push_str(&format!(
            "- run {}: [job {}]({base}/jobs/{}) {}\n",
            job.batch.map_or(0, |p| p.run),
            job.id,
            job.id,
            result_word(job)
        ));
    }
    if let Some(tests) = tests {
        let listed: Vec<_> = tests
            .tests
            .iter()
            .filter(|t| t.is_flaky() || t.is_broken())
            .take(SUMMARY_TESTS)
            .collect();
        text.push_str(&format!(
            "\n{} tests across {} runs with results\n\n",
            tests.tests.len(),
            tests.runs_with_results
        ));
        for test in listed {
            let verdict = if test.is_flaky() { "flaky" } else { "broken" };
            let rate = test
                .failure_rate()
                .map(|(rate, low, high)| {
                    format!(", rate {rate:.2} (95% interval {low:.2} to {high:.2})")
                })
                .unwrap_or_default();
            text.push_str(&format!(
                "- {verdict}: {}: failed in {} of {} runs{rate}\n",
                code_span(&test.test_id()),
                test.failed,
                test.runs
            ));
        }
    }
    text.push('\n');
    text
}

/// Stops GitHub from processing workflow commands until dropped (`::stop-commands::TOKEN`,
/// then `::TOKEN::`), with a random token a job cannot guess to resume them early.
struct RelayGuard {
    token: String,
}

impl RelayGuard {
    fn start() -> RelayGuard {
        let token = testbot_proto::signing::random_hex(16);
        println!("::stop-commands::{token}");
        RelayGuard { token }
    }
}

impl Drop for RelayGuard {
    fn drop(&mut self) {
        use std::io::Write as _;
        let _ = std::io::stderr().flush();
        println!("::{}::", self.token);
    }
}

async fn run_once(inputs: &Inputs, attempt: u32) -> anyhow::Result<i32> {
    let spec = inputs.spec(attempt)?;
    println!("::group::testbot: submitting to {}", inputs.broker_url);
    let token = request_token(&inputs.audience).await?;
    let client = BrokerClient::new(&inputs.broker_url, token)?;
    let job = match client.submit(&spec).await {
        Ok(job) => job,
        Err(ClientError::Api { message, .. }) => {
            println!("::endgroup::");
            anyhow::bail!("the broker refused the job: {message}");
        }
        Err(err) => {
            println!("::endgroup::");
            return Err(err.into());
        }
    };
    let id = job.id;
    let log_url = format!("{}/jobs/{id}", inputs.broker_url.trim_end_matches('/'));
    println!("job {id} queued; log: {log_url}");
    println!("::endgroup::");
    let mut running = active_jobs();
    running.push(id.0);
    set_active_jobs(&running)?;
    append_to(
        "GITHUB_OUTPUT",
        &format!("job-id={id}\nlog-url={log_url}\n"),
    )?;

    // The remote log is someone else's text: GitHub must not run workflow commands found in it
    // (`::add-mask::`, `::error::`, `::stop-commands::`...). Commands stay off until a token
    // nobody else has seen is printed.
    let relay = RelayGuard::start();
    let mut printer = LogPrinter::new(false, false);
    let follow = follow_log(&client, id, 0, |bytes| printer.write(bytes));
    let mut follow = Box::pin(follow);
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut cancelled = false;
    let job = loop {
        tokio::select! {
            job = &mut follow => break job?,
            _ = term.recv(), if !cancelled => cancelled = true,
            _ = int.recv(), if !cancelled => cancelled = true,
        }
        eprintln!("testbot: the workflow was cancelled; cancelling job {id}");
        // The token that submitted the job went to the agents that claimed it, so the broker
        // does not let it cancel anything: cancel with a fresh one.
        let cancelled = async {
            let fresh = request_token(&inputs.audience).await?;
            BrokerClient::new(&inputs.broker_url, fresh)?
                .cancel(id)
                .await
                .map_err(anyhow::Error::from)
        };
        if let Err(err) = cancelled.await {
            eprintln!("testbot: cannot cancel job {id}: {err}");
        }
    };
    drop(follow);
    printer.finish();
    drop(relay);
    set_active_jobs(
        &active_jobs()
            .into_iter()
            .filter(|&other| other != id.0)
            .collect::<Vec<_>>(),
    )?;
    let code = job.cli_exit_code();
    append_to(
        "GITHUB_OUTPUT",
        &format!("result={}\nexit-code={code}\n", result_word(&job)),
    )?;
    // The token that submitted the job may read it, and so its test results.
    let results = if inputs.results.is_empty() {
        None
    } else {
        match client.job_results(id).await {
            Ok(results) => Some(results),
            Err(err) => {
                eprintln!("testbot: cannot read job {id}'s test results: {err}");
                None
            }
        }
    };
    append_to(
        "GITHUB_STEP_SUMMARY",
        &summary(&job, &log_url, results.as_ref()),
    )?;
    if let Some(known) = results
        .as_ref()
        .filter(|_| inputs.quarantine && passes_in_quarantine(&job, results.as_ref()))
        .map(|r| r.known_flaky.join(", "))
    {
        let known = crate::output::sanitize(&known).into_owned();
        println!(
            "::warning title=testbot job {id}::failed only in tests known to be flaky (in quarantine): {known}"
        );
        return Ok(0);
    }
    if job.state != JobState::Succeeded {
        let why = job
            .reason
            .clone()
            .unwrap_or_else(|| format!("exit code {code}"));
        // One line, whatever the agent put into the reason.
        let why = crate::output::sanitize(&why).into_owned();
        println!("::error title=testbot job {id}::{why}");
    }
    Ok(code)
}

/// The job failed by its tests, and every test that failed is known to be flaky.
fn passes_in_quarantine(
    job: &Job,
    results: Option<&testbot_proto::test_results::JobResults>,
) -> bool {
    let Some(results) = results else {
        return false;
    };
    let (new, known) = results.new_and_known_failures();
    job.state == JobState::Failed
        && job.cause == Some(testbot_proto::results::FailureCause::TestFailure)
        && new.is_empty()
        && !known.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_name_site_agent_scheduler_job_and_result() {
        let job = Job {
            id: testbot_proto::jobs::JobId(12),
            spec: JobSpec::default(),
            state: JobState::Failed,
            reason: None,
            exit_code: Some(3),
            signal: None,
            cause: Some(testbot_proto::results::FailureCause::TestFailure),
            batch: None,
            attempts: 1,
            agent: Some("hpc/login1".into()),
            cancel_requested: false,
            log_bytes: 10,
            repository: Some("o/r".into()),
            submitted_by: None,
            metadata: BTreeMap::from([("slurm_job_id".to_string(), "77".to_string())]),
            created_at_ms: 0,
            started_at_ms: Some(1_000),
            finished_at_ms: Some(63_000),
            waiting: None,
        };
        let text = summary(&job, "https://b/jobs/12", None);
        assert!(text.starts_with("### testbot job 12: failure\n"), "{text}");
        for row in [
            "| site | hpc |",
            "| agent | login1 |",
            "| scheduler job | Slurm job 77 |",
            "| duration | 1m 2s |",
            "| result | failure (exit code 3) |",
        ] {
            assert!(text.contains(row), "{row} in {text}");
        }
    }

    #[test]
    fn the_summary_lists_failed_and_flaky_tests_apart_and_as_code() {
        use testbot_proto::junit::TestOutcome::{Failed, Passed};
        use testbot_proto::test_results::{AttemptResult, CaseResult, CaseTotals, JobResults};
        let case = |name: &str, outcomes: &[testbot_proto::junit::TestOutcome]| CaseResult {
            file: "junit.xml".into(),
            suite: "pkg".into(),
            classname: None,
            name: name.into(),
            attempts: outcomes
                .iter()
                .map(|&outcome| AttemptResult {
                    outcome,
                    duration_ms: None,
                    message: None,
                })
                .collect(),
        };
        let cases = vec![
            case("ok", &[Passed]),
            case("[x](https://evil.example) | `y`", &[Failed]),
            case("retried", &[Failed, Passed]),
            case("known", &[Failed]),
        ];
        let results = JobResults {
            job: testbot_proto::jobs::JobId(1),
            files: vec![],
            totals: CaseTotals::of(&cases),
            cases,
            known_flaky: vec!["pkg > known".into()],
        };
        let text = tests_summary(&results);
        assert!(
            text.starts_with("| tests | 2 passed, 2 failed, 0 errors, 0 skipped, 1 flaky |"),
            "{text}"
        );
        assert!(
            text.contains("**Failed: 1**\n\n- `pkg > [x](https://evil.example) / 'y'`\n"),
            "{text}"
        );
        assert!(
            text.contains("**Flaky (failed, then passed on a rerun): 1**\n\n- `pkg > retried`"),
            "{text}"
        );
        assert!(
            text.contains("**Failed, known to be flaky: 1**\n\n- `pkg > known`"),
            "{text}"
        );
    }
}
