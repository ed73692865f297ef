//! `testbot`: the command-line client for the broker, and `testbot up`, a one-machine fleet.
//!
//! Layout: this file parses flags and dispatches; [`output`] renders jobs and logs;
//! [`up`] runs a broker and a local agent in one process; [`gha`] is what the GitHub Action
//! runs.

mod gha;
mod output;
#[cfg(feature = "up")]
mod up;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use testbot_proto::batches::BatchId;
use testbot_proto::client::{BrokerClient, follow_log};
use testbot_proto::jobs::{JobId, JobListQuery, JobSpec, JobState, Resources};
use testbot_proto::repos::RepoRegistration;

use crate::output::LogPrinter;

/// testbot: run CI jobs on the machines where research software really runs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Opts {
    /// The broker's URL.
    #[arg(
        long,
        global = true,
        env = "TESTBOT_URL",
        default_value = "http://127.0.0.1:8471"
    )]
    url: String,
    /// The bearer token for the broker: an operator token, a workflow's GitHub OIDC token, or
    /// (for `repo register`) a GitHub user token.
    #[arg(long, global = true, env = "TESTBOT_TOKEN", hide_env_values = true)]
    token: Option<SecretString>,
    /// Print machine-readable JSON instead of human text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submit a job, follow its log live and exit with its exit code (Ctrl-C cancels it).
    Run {
        #[command(flatten)]
        job: JobArgs,
        /// Show each log line's timestamp.
        #[arg(long)]
        timestamps: bool,
        /// Run the job this many times, in parallel on every agent that takes it, as one batch:
        /// a line per run as it ends and a summary instead of the logs. Exits non-zero if any
        /// run failed (3 if only the fleet failed runs).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        repeat: u32,
        /// Run as a batch until its runs show, with this confidence (e.g. 0.95), whether the
        /// job fails less often than --max-rate; the runs not needed are then cancelled. With
        /// --repeat N, at most N runs (default: three times the runs it takes without a
        /// failure, at most 1000). Exits 0 for below, 1 for above, 2 if the runs could not say.
        #[arg(long, requires = "max_rate", value_name = "CONFIDENCE")]
        until_confidence: Option<f64>,
        /// The failure rate --until-confidence tests against, e.g. 0.01.
        #[arg(long, requires = "until_confidence", value_name = "RATE")]
        max_rate: Option<f64>,
    },
    /// Show a job's test results (its result files and what was read from them), or with
    /// --batch every test across a batch's runs: which are flaky, which broken.
    Results {
        /// The job.
        #[arg(required_unless_present = "batch", conflicts_with = "batch")]
        job: Option<JobId>,
        /// A batch instead of a job.
        #[arg(long)]
        batch: Option<BatchId>,
        /// List every test, not only those that did not pass.
        #[arg(long)]
        all: bool,
    },
    /// The tests of a repository that failed at least once recently, across its history: which
    /// are flaky (passed and failed at one commit), which broken (failing at the latest
    /// commit), with failure rates. Exits 1 when there are such tests.
    Flaky {
        /// The repository, OWNER/NAME as GitHub spells it.
        repository: String,
        /// Only this branch (main) or ref (refs/pull/7/merge). Default: every ref.
        #[arg(long)]
        branch: Option<String>,
        /// Only jobs submitted within this long, e.g. 7d, 12h.
        #[arg(long, default_value = "30d")]
        since: String,
        /// At most this many tests.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One test's record across a repository's history: per job that ran it, its verdict,
    /// where it ran, and its runs and failures at each commit. Only tests that failed in the
    /// window are on record.
    History {
        /// The repository, OWNER/NAME.
        repository: String,
        /// The test, as `testbot flaky` names it: 'suite > Class.name'.
        test: String,
        /// Only this branch (main) or ref. Default: every ref.
        #[arg(long)]
        branch: Option<String>,
        /// Only jobs submitted within this long, e.g. 7d.
        #[arg(long, default_value = "30d")]
        since: String,
    },
    /// Find the commit where a test started failing: runs it on the commits between --good
    /// and --bad, as often at each as its failure rate needs, and follows the bisection until
    /// it names the commit (exit 0) or cannot (exit 1). Needs the broker's GitHub App. With
    /// --follow ID, follows a bisection already started (the broker starts them on new flakes).
    Bisect {
        /// The repository, OWNER/NAME.
        #[arg(required_unless_present_any = ["follow", "list"])]
        repository: Option<String>,
        /// The test, as `testbot flaky` names it: 'suite > Class.name'.
        #[arg(required_unless_present_any = ["follow", "list"])]
        test: Option<String>,
        /// A commit (full id) where the test passed.
        #[arg(long, required_unless_present_any = ["follow", "list"])]
        good: Option<String>,
        /// A later commit (full id) where it fails.
        #[arg(long, required_unless_present_any = ["follow", "list"])]
        bad: Option<String>,
        /// The config's job that runs it. Default: the job whose history has the test.
        #[arg(long)]
        job: Option<String>,
        /// The branch both commits are on. Default: the repository's default branch.
        #[arg(long)]
        branch: Option<String>,
        /// What the job's run_tests gets for {tests}. Default: the test's name (with the job's
        /// list command: the listed tests whose names end with it).
        #[arg(long)]
        select: Option<String>,
        /// Confidence that the commit before the one named is good. Default 0.95.
        #[arg(long)]
        confidence: Option<f64>,
        /// Follow the bisection with this id instead of starting one.
        #[arg(long, conflicts_with_all = ["repository", "test", "good", "bad", "list"])]
        follow: Option<i64>,
        /// List the bisections of this repository.
        #[arg(long, value_name = "REPOSITORY", conflicts_with_all = ["repository", "test", "good", "bad"])]
        list: Option<String>,
    },
    /// Show a batch: each run's result and the totals; with --cancel, cancel its runs first.
    Batch {
        batch: BatchId,
        /// Cancel every run that has not ended.
        #[arg(long)]
        cancel: bool,
    },
    /// Submit a job and print its id.
    Submit {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Print a job's log; with -f, follow it until the job ends.
    Logs {
        job: JobId,
        /// Follow the log live until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// Show each log line's timestamp.
        #[arg(long)]
        timestamps: bool,
    },
    /// Cancel a job: a queued job ends at once, a running one is stopped by its agent.
    Cancel { job: JobId },
    /// Show one job.
    Status { job: JobId },
    /// List jobs, newest first.
    Jobs {
        /// Only jobs in this state (queued, assigned, running, succeeded, failed, cancelled, error).
        #[arg(long)]
        state: Option<JobState>,
        /// Only jobs meant for this site or run at it.
        #[arg(long)]
        site: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Run a one-machine fleet in the foreground: a broker on SQLite and a local shell agent.
    #[cfg(feature = "up")]
    Up(up::UpOpts),
    /// Register GitHub repositories whose workflows may submit jobs.
    #[command(subcommand)]
    Repo(RepoCommand),
    /// Run inside a GitHub Actions job, as `uses: community-testbot/action@v1` does: inputs
    /// from INPUT_* variables, the workflow's OIDC token, outputs and a step summary.
    #[command(hide = true)]
    Action {
        /// Cancel the remote jobs this action left running (the workflow was cancelled).
        #[arg(long)]
        cancel: bool,
        /// Wait for process PID to end, then cancel the remote jobs it left running.
        #[arg(long, value_name = "PID")]
        watch: Option<i32>,
    },
    /// Sites and their enrollment tokens (operator).
    #[command(subcommand)]
    Site(SiteCommand),
    /// Enrolled agents (operator).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// A repository's `.github/testbot.toml` (the GitHub App's jobs and when they run).
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a `.github/testbot.toml` without a broker: prints each job and when it runs, or
    /// `FILE:LINE:COL: message` and exits 1.
    Check {
        /// The file. Default: `.github/testbot.toml` in the current directory.
        #[arg(default_value = testbot_proto::repo_config::CONFIG_PATH)]
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum SiteCommand {
    /// Create a site: one place that runs jobs under one policy.
    Create { name: String },
    /// List sites.
    List,
    /// Issue an enrollment token for a site; give it to the site's agents
    /// (`enrollment_token_file` in their configuration).
    Token {
        site: String,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it stays valid, e.g. 1h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Revoke a site: its agents are refused from their next request on.
    Revoke { site: String },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// List enrolled agents.
    List,
    /// Revoke an agent: it is refused from its next request on.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Register a repository, or replace its settings. Proof that you control it: the operator
    /// token, a GitHub user token (`ghp_...`) with admin permission on it, or an OIDC token from
    /// one of its workflows, given as --token / TESTBOT_TOKEN.
    Register {
        /// owner/name
        repo: String,
        /// A site its jobs may run on (repeatable). Default: any site that accepts them.
        #[arg(long = "site")]
        sites: Vec<String>,
        /// A workflow event whose jobs are accepted (repeatable). Default: push,
        /// workflow_dispatch, schedule, pull_request.
        #[arg(long = "event")]
        events: Vec<String>,
        /// A ref glob whose jobs are accepted, e.g. refs/heads/main (repeatable). Default: all.
        #[arg(long = "ref")]
        refs: Vec<String>,
    },
    /// List registered repositories.
    List,
    /// Show one registration.
    Show { repo: String },
    /// Remove a registration: the repository's workflows can no longer submit jobs.
    Remove { repo: String },
}

/// What to run, for `run` and `submit`.
#[derive(Debug, Args)]
struct JobArgs {
    /// Read the script from this file instead of the command line.
    #[arg(short, long, conflicts_with = "script")]
    file: Option<PathBuf>,
    /// Run only at this site (one of `testbot site list`).
    #[arg(long)]
    site: Option<String>,
    /// A label the agent must have (repeatable).
    #[arg(short, long = "label")]
    labels: Vec<String>,
    /// An environment variable for the job, NAME=VALUE (repeatable).
    #[arg(short, long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// A secret environment variable for the job, NAME=VALUE (repeatable): shown as *** by the
    /// broker and masked in the log. A value on the command line is seen by every user of this
    /// machine (`ps`); prefer --secret-env.
    #[arg(long = "secret", value_parser = parse_env, value_name = "NAME=VALUE")]
    secrets: Vec<(String, String)>,
    /// A secret environment variable for the job whose value is taken from this command's own
    /// environment variable NAME (repeatable), so it never appears on a command line.
    #[arg(long = "secret-env", value_name = "NAME")]
    secret_env: Vec<String>,
    /// Time limit, e.g. 90s, 10m, 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Test result files to collect from the workspace when the script ends, as a glob
    /// relative to it, e.g. 'build/**/junit*.xml' (repeatable). JUnit XML is read into test
    /// results (`testbot results JOB`).
    #[arg(long = "results", value_name = "GLOB")]
    results: Vec<String>,
    /// How to run chosen tests: a command with {tests} where they go, e.g. 'pytest {tests}'.
    #[arg(long = "run-tests", value_name = "COMMAND")]
    run_tests: Option<String>,
    /// How to list the job's tests, one per line as --run-tests names them, e.g. 'pytest
    /// --collect-only -q'. With it, each --tests is a pattern (* any text, ? one character)
    /// matched against the list in the job, and --run-tests gets the listed tests that match.
    #[arg(long = "list-tests", value_name = "COMMAND", requires = "run_tests")]
    list_tests: Option<String>,
    /// Run this test instead of the whole script, with --run-tests (repeatable): e.g. --tests
    /// tests/test_io.py::test_wobbly, or --tests '*wobbly*' with --list-tests. Each is one
    /// shell word to the command.
    #[arg(long = "tests", value_name = "TEST", requires = "run_tests")]
    tests: Vec<String>,
    /// A short name shown in listings.
    #[arg(long)]
    name: Option<String>,
    /// The executor to run on (shell, slurm, docker, podman, kubernetes). Default: the agent's.
    #[arg(long)]
    executor: Option<String>,
    /// The container image (container and Kubernetes executors).
    #[arg(long)]
    image: Option<String>,
    /// CPU cores.
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory, e.g. 512M, 4G (MiB without a suffix).
    #[arg(long, value_parser = testbot_proto::units::parse_memory_mib)]
    memory: Option<u64>,
    /// GPUs.
    #[arg(long)]
    gpus: Option<u32>,
    /// Slurm partition.
    #[arg(long)]
    partition: Option<String>,
    /// Slurm account.
    #[arg(long)]
    account: Option<String>,
    /// The script (words are joined with spaces), run with bash -eo pipefail.
    #[arg(last = true)]
    script: Vec<String>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    Ok((name.to_string(), value.to_string()))
}

impl JobArgs {
    fn into_spec(self) -> anyhow::Result<JobSpec> {
        let JobArgs {
            file,
            site,
            mut labels,
            env,
            secrets,
            secret_env,
            timeout,
            results,
            run_tests,
            list_tests,
            tests,
            name,
            executor,
            image,
            cpus,
            memory,
            gpus,
            partition,
            account,
            script,
        } = self;
        let script = match file {
            Some(path) => std::fs::read_to_string(&path)
                .with_context(|| format!("Cannot read {}", path.display()))?,
            None if script.is_empty() => {
                anyhow::bail!(
                    "give the script after --, e.g. testbot run -- 'make test', or use --file"
                )
            }
            None => script.join(" "),
        };
        // The same routing label as the Action's `site` input.
        if let Some(site) = site {
            labels.push(format!("site:{site}"));
        }
        let mut env = env.into_iter().collect::<BTreeMap<_, _>>();
        let mut secret_names = Vec::new();
        for (name, value) in secrets {
            env.insert(name.clone(), value);
            secret_names.push(name);
        }
        for name in secret_env {
            let value = std::env::var(&name).with_context(|| {
                format!(
                    "--secret-env {name}: this command's environment has no variable {name} (set it, e.g. `read -rs {name}; export {name}`)"
                )
            })?;
            env.insert(name.clone(), value);
            secret_names.push(name);
        }
        let spec = JobSpec {
            script,
            name,
            labels,
            env,
            secret_env: secret_names,
            timeout_secs: timeout.map(|t| t.as_secs().max(1)),
            executor,
            image,
            resources: Resources {
                cpus,
                memory_mib: memory,
                gpus,
                partition,
                account,
                ..Resources::default()
            },
            results,
            run_tests,
            list: list_tests,
            tests,
            quarantine: false,
        };
        spec.validate()
            .map_err(|e| anyhow::anyhow!("invalid job: {e}"))?;
        Ok(spec)
    }
}

fn main() -> ExitCode {
    testbot_proto::init_tracing("warn");
    let opts = Opts::parse();
    // A client command makes a few requests one after another: a runtime on this thread starts
    // in microseconds. `testbot up` serves a fleet and gets every core.
    #[cfg(feature = "up")]
    let serves = matches!(opts.command, Command::Up(_));
    #[cfg(not(feature = "up"))]
    let serves = false;
    let runtime = if serves {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("testbot: error: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(try_main(opts)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("testbot: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn client(url: &str, token: Option<SecretString>) -> anyhow::Result<BrokerClient> {
    let token = token.context(
        "no token: set TESTBOT_TOKEN (for `testbot up`, it is in DATA_DIR/admin.token) or pass --token",
    )?;
    Ok(BrokerClient::new(url, token)?)
}

/// Runs the command; returns the process exit code.
async fn try_main(opts: Opts) -> anyhow::Result<i32> {
    let Opts {
        url,
        token,
        json,
        command,
    } = opts;
    match command {
        #[cfg(feature = "up")]
        Command::Up(up) => up::run(up).await.map(|()| 0),
        Command::Action {
            watch: Some(parent),
            ..
        } => gha::watch(parent).await,
        Command::Action { cancel: true, .. } => gha::cancel().await,
        Command::Action { .. } => gha::run().await,
        Command::Run {
            job,
            timestamps,
            repeat,
            until_confidence,
            max_rate,
        } => {
            let client = client(&url, token)?;
            let until = match (until_confidence, max_rate) {
                (Some(confidence), Some(max_rate)) => {
                    let until = testbot_proto::batches::Until {
                        confidence,
                        max_rate,
                    };
                    until.validate().map_err(anyhow::Error::msg)?;
                    Some(until)
                }
                _ => None,
            };
            if let Some(until) = until {
                let runs = if repeat > 1 {
                    repeat
                } else {
                    until
                        .runs_without_failure()
                        .saturating_mul(3)
                        .min(testbot_proto::batches::MAX_RUNS)
                };
                return run_batch(&client, job.into_spec()?, runs, Some(until), json).await;
            }
            if repeat > 1 {
                return run_batch(&client, job.into_spec()?, repeat, None, json).await;
            }
            run_job(&client, job.into_spec()?, json, timestamps).await
        }
        Command::Results { job, batch, all } => {
            let client = client(&url, token)?;
            match (job, batch) {
                (_, Some(batch)) => {
                    let results = client.batch_results(batch).await?;
                    if json {
                        output::print_json(&results)?;
                    } else {
                        output::print_batch_results(&results, all);
                    }
                    // Scripts can tell at once whether a batch found flaky or broken tests.
                    Ok(i32::from(
                        results.tests.iter().any(|t| t.is_flaky() || t.is_broken()),
                    ))
                }
                (Some(job), None) => {
                    let results = client.job_results(job).await?;
                    if json {
                        output::print_json(&results)?;
                    } else {
                        output::print_job_results(&results, all);
                    }
                    Ok(i32::from(results.totals.failed + results.totals.errors > 0))
                }
                (None, None) => unreachable!("clap requires a job or --batch"),
            }
        }
        Command::Flaky {
            repository,
            branch,
            since,
            limit,
        } => {
            let client = client(&url, token)?;
            let query = testbot_proto::test_results::FlakyQuery {
                branch,
                since: Some(since),
                limit: Some(limit),
            };
            let report = client.flaky_tests(&repository, &query).await?;
            if json {
                output::print_json(&report)?;
            } else {
                output::print_flaky(&report);
            }
            Ok(i32::from(!report.tests.is_empty()))
        }
        Command::History {
            repository,
            test,
            branch,
            since,
        } => {
            let client = client(&url, token)?;
            let query = testbot_proto::test_results::HistoryQuery {
                test,
                branch,
                since: Some(since),
            };
            let record = client.test_history(&repository, &query).await?;
            if json {
                output::print_json(&record)?;
            } else {
                output::print_test_record(&record, &query.test);
            }
            Ok(i32::from(record.jobs.is_empty()))
        }
        Command::Bisect {
            repository,
            test,
            good,
            bad,
            job,
            branch,
            select,
            confidence,
            follow,
            list,
        } => {
            let client = client(&url, token)?;
            if let Some(repository) = list {
                let bisections = client.bisections(&repository).await?;
                if json {
                    output::print_json(&bisections)?;
                } else {
                    for b in &bisections {
                        println!(
                            "{} {}: {}",
                            b.id,
                            b.state.as_str(),
                            output::sanitize(&b.describe())
                        );
                    }
                }
                return Ok(0);
            }
            let id = match follow {
                Some(id) => id,
                None => {
                    let request = testbot_proto::bisect::BisectRequest {
                        test: test.unwrap_or_default(),
                        job,
                        good: good.unwrap_or_default(),
                        bad: bad.unwrap_or_default(),
                        branch,
                        select,
                        confidence,
                    };
                    let repository = repository.unwrap_or_default();
                    let started = client.start_bisection(&repository, &request).await?;
                    if !json {
                        eprintln!(
                            "testbot: bisection {} of {} in {repository}: {} commits from good to bad",
                            started.id,
                            output::sanitize(&started.test_id()),
                            started.commits.len() - 1
                        );
                    }
                    started.id
                }
            };
            follow_bisection(&client, id, json).await
        }
        Command::Batch { batch, cancel } => {
            let client = client(&url, token)?;
            let batch = if cancel {
                client.cancel_batch(batch).await?
            } else {
                client.batch(batch).await?
            };
            if json {
                output::print_json(&batch)?;
            } else {
                output::print_batch(&batch);
            }
            Ok(0)
        }
        Command::Submit { job } => {
            let client = client(&url, token)?;
            let job = client.submit(&job.into_spec()?).await?;
            if json {
                output::print_json(&job)?;
            } else {
                println!("{}", job.id);
            }
            Ok(0)
        }
        Command::Logs {
            job,
            follow,
            timestamps,
        } => {
            let client = client(&url, token)?;
            let mut printer = LogPrinter::new(timestamps, false);
            if follow {
                let job = follow_log(&client, job, 0, |bytes| printer.write(bytes)).await?;
                printer.finish();
                output::note_log_cut(&job);
                return Ok(job.cli_exit_code());
            }
            use futures_util::StreamExt as _;
            let stream = client.log_stream(job, 0, false).await?;
            let mut stream = std::pin::pin!(stream);
            while let Some(bytes) = stream.next().await {
                printer.write(&bytes?);
            }
            printer.finish();
            if let Ok(job) = client.job(job).await {
                output::note_log_cut(&job);
            }
            Ok(0)
        }
        Command::Cancel { job } => {
            let client = client(&url, token)?;
            let job = client.cancel(job).await?;
            if json {
                output::print_json(&job)?;
            } else if job.state.is_terminal() {
                println!("job {} is {}", job.id, output::describe_state(&job));
            } else {
                println!("job {}: cancel requested; its agent will stop it", job.id);
            }
            Ok(0)
        }
        Command::Status { job } => {
            let client = client(&url, token)?;
            let job = client.job(job).await?;
            if json {
                output::print_json(&job)?;
            } else {
                output::print_job(&job);
            }
            Ok(0)
        }
        Command::Jobs { state, site, limit } => {
            let client = client(&url, token)?;
            let list = client
                .jobs(&JobListQuery {
                    state,
                    site,
                    limit: Some(limit),
                })
                .await?;
            if json {
                output::print_json(&list)?;
            } else {
                output::print_jobs(&list.jobs);
            }
            Ok(0)
        }
        Command::Repo(command) => {
            let client = client(&url, token)?;
            repo_command(&client, command, json).await.map(|()| 0)
        }
        Command::Site(command) => {
            let client = client(&url, token)?;
            site_command(&client, command, json).await.map(|()| 0)
        }
        Command::Agent(command) => {
            let client = client(&url, token)?;
            agent_command(&client, command, json).await.map(|()| 0)
        }
        Command::Config(ConfigCommand::Check { file }) => config_check(&file, json),
    }
}

/// `testbot config check`: 0 when the file is valid, 1 (with the error on stderr) when not.
fn config_check(file: &std::path::Path, json: bool) -> anyhow::Result<i32> {
    use testbot_proto::repo_config::RepoConfig;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("Cannot read {}", file.display()))?;
    let config = match RepoConfig::parse(&text) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{}:{err}", file.display());
            return Ok(1);
        }
    };
    if json {
        output::print_json(&config)?;
    } else {
        output::print_repo_config(file, &config);
    }
    Ok(0)
}

async fn repo_command(
    client: &BrokerClient,
    command: RepoCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        RepoCommand::Register {
            repo,
            sites,
            events,
            refs,
        } => {
            let mut registration = RepoRegistration {
                name: repo,
                sites,
                ..RepoRegistration::default()
            };
            if !events.is_empty() {
                registration.events = events;
            }
            if !refs.is_empty() {
                registration.refs = refs;
            }
            let repo = client.register_repo(&registration).await?;
            if json {
                output::print_json(&repo)?;
            } else {
                println!("registered {}", repo.name);
                output::print_repo(&repo);
            }
        }
        RepoCommand::List => {
            let list = client.repos().await?;
            if json {
                output::print_json(&list)?;
            } else if list.repos.is_empty() {
                println!("no repositories registered");
            } else {
                for repo in &list.repos {
                    output::print_repo(repo);
                }
            }
        }
        RepoCommand::Show { repo } => {
            let repo = client.repo(&repo).await?;
            if json {
                output::print_json(&repo)?;
            } else {
                output::print_repo(&repo);
            }
        }
        RepoCommand::Remove { repo } => {
            client.remove_repo(&repo).await?;
            if !json {
                println!("removed {repo}");
            }
        }
    }
    Ok(())
}

async fn site_command(
    client: &BrokerClient,
    command: SiteCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        SiteCommand::Create { name } => {
            let site = client.create_site(&name).await?;
            if json {
                output::print_json(&site)?;
            } else {
                println!("created site {}", site.name);
                println!("next: testbot site token {} --uses N", site.name);
            }
        }
        SiteCommand::List => {
            let list = client.sites().await?;
            if json {
                output::print_json(&list)?;
            } else {
                for site in &list.sites {
                    let state = match site.revoked_at_ms {
                        Some(at) => format!("revoked {}", testbot_proto::format_ms(at)),
                        None => "active".into(),
                    };
                    println!("{}  {state}", site.name);
                }
            }
        }
        SiteCommand::Token { site, uses, ttl } => {
            let token = client
                .create_enrollment_token(
                    &site,
                    &testbot_proto::sites::EnrollmentTokenRequest {
                        uses,
                        ttl_secs: ttl.as_secs().max(1),
                    },
                )
                .await?;
            if json {
                output::print_json(&token)?;
            } else {
                // The token alone on stdout, so it can be piped into a file.
                println!("{}", token.token);
                eprintln!(
                    "enrollment token for site {}: {} use(s), valid until {}; it is shown only once",
                    token.site,
                    token.uses,
                    testbot_proto::format_ms(token.expires_at_ms)
                );
            }
        }
        SiteCommand::Revoke { site } => {
            let site = client.revoke_site(&site).await?;
            if json {
                output::print_json(&site)?;
            } else {
                println!(
                    "revoked site {}: its agents are refused from now on",
                    site.name
                );
            }
        }
    }
    Ok(())
}

async fn agent_command(
    client: &BrokerClient,
    command: AgentCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        AgentCommand::List => {
            let list = client.agents().await?;
            if json {
                output::print_json(&list)?;
            } else {
                for agent in &list.agents {
                    let seen = agent
                        .last_seen_ms
                        .map_or("never".to_string(), testbot_proto::format_ms);
                    let state = if agent.revoked_at_ms.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    let policy = if agent.policy.is_some() {
                        "site policy"
                    } else {
                        "no policy"
                    };
                    println!(
                        "{}  {}/{}  {state}  {policy}  last seen {seen}",
                        agent.id, agent.site, agent.name
                    );
                }
            }
        }
        AgentCommand::Revoke { id } => {
            let agent = client.revoke_agent(&id).await?;
            if json {
                output::print_json(&agent)?;
            } else {
                println!(
                    "revoked agent {}/{} ({}): it is refused from its next request on",
                    agent.site, agent.name, agent.id
                );
            }
        }
    }
    Ok(())
}

/// How often `testbot bisect` asks how its bisection stands.
const BISECT_POLL: Duration = Duration::from_secs(1);

/// Prints a line each time the bisection moves, until it ends: 0 when it names the commit.
async fn follow_bisection(client: &BrokerClient, id: i64, json: bool) -> anyhow::Result<i32> {
    use testbot_proto::bisect::BisectionState;
    let mut last = String::new();
    loop {
        let bisection = client.bisection(id).await?;
        let line = bisection.describe();
        if !json && line != last {
            println!("{}", output::sanitize(&line));
            last = line;
        }
        match bisection.state {
            BisectionState::Running => tokio::time::sleep(BISECT_POLL).await,
            BisectionState::Found => {
                if json {
                    output::print_json(&bisection)?;
                } else if let Some(culprit) = &bisection.culprit {
                    println!("first bad commit: {}", output::sanitize(culprit));
                }
                return Ok(0);
            }
            BisectionState::Failed => {
                if json {
                    output::print_json(&bisection)?;
                }
                return Ok(1);
            }
        }
    }
}

/// Submits, follows the log live, and returns the job's exit code. The first Ctrl-C cancels the
/// remote job (and keeps following until it ends); a second one exits at once.
/// A job still queued this long after `testbot run` submitted it gets a line saying why it
/// waits (the broker's `waiting`).
const QUEUED_NOTICE_AFTER: Duration = Duration::from_secs(3);

/// How often `run --repeat` asks how its batch stands.
const BATCH_POLL: Duration = Duration::from_millis(500);

/// `run --repeat N`: queues the batch, prints a line for each run as it ends, then the totals
/// and the runs that did not succeed. Ctrl-C cancels the batch.
async fn run_batch(
    client: &BrokerClient,
    spec: JobSpec,
    runs: u32,
    until: Option<testbot_proto::batches::Until>,
    json: bool,
) -> anyhow::Result<i32> {
    let batch = client.submit_batch(&spec, runs, until).await?;
    let id = batch.id;
    if !json {
        eprintln!(
            "testbot: batch {id}: {runs} runs queued at {} (jobs {}-{})",
            client.base_url(),
            batch.jobs.first().map_or(0, |j| j.id.0),
            batch.jobs.last().map_or(0, |j| j.id.0),
        );
        if let Some(until) = until {
            eprintln!(
                "testbot: running until the runs show, with confidence {}, whether the job fails less often than {} ({} runs without a failure would)",
                until.confidence,
                until.max_rate,
                until.runs_without_failure()
            );
        }
    }
    let mut reported = std::collections::HashSet::new();
    let mut interrupts = 0;
    let batch = loop {
        let batch = client.batch(id).await?;
        if !json {
            for job in batch.jobs.iter().filter(|j| j.state.is_terminal()) {
                if reported.insert(job.id) {
                    println!("{}", output::describe_run(job, runs));
                }
            }
        }
        if batch.is_finished() {
            break batch;
        }
        tokio::select! {
            _ = tokio::time::sleep(BATCH_POLL) => {}
            _ = tokio::signal::ctrl_c() => {
                interrupts += 1;
                if interrupts > 1 {
                    eprintln!("testbot: not waiting for batch {id} to stop");
                    return Ok(130);
                }
                eprintln!("testbot: cancelling batch {id} (Ctrl-C again to stop waiting)");
                if let Err(err) = client.cancel_batch(id).await {
                    eprintln!("testbot: cannot cancel batch {id}: {err}");
                }
            }
        }
    };
    if json {
        output::print_json(&batch)?;
    } else {
        output::print_batch_summary(&batch);
    }
    Ok(batch.cli_exit_code())
}

async fn run_job(
    client: &BrokerClient,
    spec: JobSpec,
    json: bool,
    timestamps: bool,
) -> anyhow::Result<i32> {
    let job = client.submit(&spec).await?;
    let id = job.id;
    if !json {
        eprintln!("testbot: job {id} queued at {}", client.base_url());
    }
    let mut printer = LogPrinter::new(timestamps, json);
    let follow = follow_log(client, id, 0, |bytes| printer.write(bytes));
    let mut follow = Box::pin(follow);
    let mut interrupts = 0;
    let notice = tokio::time::sleep(QUEUED_NOTICE_AFTER);
    tokio::pin!(notice);
    let mut noticed = json;
    let job = loop {
        tokio::select! {
            job = &mut follow => break job?,
            _ = &mut notice, if !noticed => {
                noticed = true;
                if let Ok(job) = client.job(id).await
                    && job.state == JobState::Queued
                    && let Some(waiting) = &job.waiting
                {
                    eprintln!("testbot: job {id} is still queued ({waiting})");
                }
            }
            _ = tokio::signal::ctrl_c() => {
                interrupts += 1;
                if interrupts > 1 {
                    eprintln!("testbot: not waiting for job {id} to stop");
                    return Ok(130);
                }
                eprintln!("testbot: cancelling job {id} (Ctrl-C again to stop waiting)");
                if let Err(err) = client.cancel(id).await {
                    eprintln!("testbot: cannot cancel job {id}: {err}");
                }
            }
        }
    };
    drop(follow);
    printer.finish();
    output::note_log_cut(&job);
    // The log's last line already says how a job that did not succeed ended.
    if json {
        output::print_json(&job)?;
    }
    Ok(job.cli_exit_code())
}
