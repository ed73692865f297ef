//! The container executor: each job runs in a container of the Docker engine or of rootful
//! podman, through their command-line clients (one code path for both: the two CLIs take the
//! same options; no daemon API version to negotiate; the engine's own credential helpers and
//! registry configuration apply to pulls).
//!
//! - The image must be one the site policy allows (checked before anything runs); the pull
//!   policy decides whether it is pulled.
//! - The container runs detached, named `testbot-job-ID-ATTEMPT` and labelled with the job id,
//!   attempt and agent, as the job's mapped uid:gid (so it leaves no root-owned files in the job
//!   directory), with every capability dropped, `no-new-privileges`, a process limit, the
//!   network off unless the policy allows `bridge`, CPU and memory limits from the job's
//!   resources, optionally a read-only root file system; the only host path it sees is the
//!   job's workspace (`/work`) and its script (read-only).
//! - Output comes from `logs --follow --timestamps`, stdout and stderr apart. The engine's
//!   timestamps are the positions recorded when the broker acknowledges lines, so a restarted
//!   agent re-attaches to a still-running container and continues the log exactly there.
//! - The exit code comes from `wait`; an OOM kill (`State.OOMKilled`) is reported as such.
//!   Cancel and timeout stop the container (SIGTERM, then SIGKILL after the grace period) and
//!   remove it. At start-up, containers of this agent whose jobs it no longer knows are removed.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use testbot_proto::jobs::JobState;
use testbot_proto::logs::{MAX_LINE_BYTES, Stream};
use testbot_proto::results::FailureCause;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::records::{JobRecord, JobRecords};
use super::{BoxFuture, Detached, ExecOutcome, Executor, JobContext, LogSink};
use crate::policy::settings::{ContainerNetwork, ContainerSettings, PullPolicy};

/// The longest an engine command (other than `logs -f` and `wait`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Processes one job's container may have.
const PIDS_LIMIT: &str = "4096";
/// Label keys on every container this executor starts.
const LABEL_JOB: &str = "testbot.job";
const LABEL_ATTEMPT: &str = "testbot.attempt";
const LABEL_AGENT: &str = "testbot.agent";

/// Which engine's CLI to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

impl Engine {
    pub fn program(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

/// Runs jobs in containers.
#[derive(Debug, Clone)]
pub struct ContainerExecutor {
    pub engine: Engine,
    /// The site policy's `[executors.docker]` / `[executors.podman]` table.
    pub settings: ContainerSettings,
    /// Identifies this agent's containers on a host that may run several agents (and several
    /// brokers' job 1): a short hash of the agent's state directory, stable across restarts.
    pub instance: String,
    /// Where the records of running containers are kept (`STATE_DIR/ENGINE`).
    pub records: JobRecords,
    /// Between SIGTERM and SIGKILL when a job is stopped.
    pub kill_grace: Duration,
}

impl Executor for ContainerExecutor {
    fn name(&self) -> &'static str {
        self.engine.program()
    }

    fn run<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        Box::pin(async move {
            let container = self.start(job, &log).await?;
            self.follow(job, &container, (0, 0), &log, &stop).await
        })
    }

    fn cleanup<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.remove(&self.container_name(job.id, job.attempt)).await;
            self.records.remove(job.id);
            super::remove_job_dir(job).await;
        })
    }

    fn records(&self) -> Option<&JobRecords> {
        Some(&self.records)
    }

    fn reap<'a>(&'a self) -> BoxFuture<'a, ()> {
        Box::pin(self.reap_orphans())
    }

    fn resume<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        Box::pin(async move {
            let record = self.records.load(job.id)?;
            log.system(format!(
                "following container {} again from where the log left off",
                record.handle
            ))
            .await;
            self.follow(
                job,
                &record.handle,
                (record.stdout_pos, record.stderr_pos),
                &log,
                &stop,
            )
            .await
        })
    }

    fn abandon<'a>(&'a self, job: &'a Detached) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let name = self.container_name(job.job_id, job.attempt);
            tracing::warn!(job_id = %job.job_id, container = %name, "Removing a container whose lease is gone.");
            self.remove(&name).await;
            self.records.remove(job.job_id);
            let _ = tokio::fs::remove_dir_all(&job.dir).await;
        })
    }
}

impl ContainerExecutor {
    fn container_name(&self, job: testbot_proto::jobs::JobId, attempt: u32) -> String {
        format!("testbot-{}-job-{job}-{attempt}", self.instance)
    }

    /// The [`ContainerExecutor::instance`] of an agent whose state lives in `state_dir`.
    pub fn instance_of(state_dir: &std::path::Path) -> String {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            state_dir.as_os_str().as_encoded_bytes(),
        );
        hex::encode(&digest.as_ref()[..5])
    }

    /// The engine's client, with an environment of the agent's own choosing: nothing a job sets
    /// reaches it (a job's `PATH`, `DOCKER_HOST` or `LD_PRELOAD` would otherwise pick the
    /// program, the engine or the libraries of a client that runs as root).
    fn command(&self) -> Command {
        // Looked up in the agent's own PATH; by bare name only if it is not there, so the
        // spawn error names the program.
        let program = super::find_program(self.engine.program())
            .unwrap_or_else(|_| self.engine.program().into());
        let mut command = Command::new(program);
        command.env_clear();
        for (name, value) in std::env::vars_os() {
            if name.to_str().is_some_and(client_env) {
                command.env(name, value);
            }
        }
        command.stdin(Stdio::null()).kill_on_drop(true);
        command
    }

    async fn run_command(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut command = self.command();
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tokio::time::timeout(COMMAND_TIMEOUT, command.output())
            .await
            .map_err(|_| anyhow::anyhow!("{} {} timed out", self.engine.program(), args[0]))?
            .with_context(|| format!("Cannot run {}", self.engine.program()))
    }

    /// Removes a container (stopped or not); a missing one is not an error.
    async fn remove(&self, name: &str) {
        // podman's `rm --force` first stops a running container with a 10 s grace period.
        let args: &[&str] = match self.engine {
            Engine::Docker => &["rm", "--force", name],
            Engine::Podman => &["rm", "--force", "--time=0", name],
        };
        if let Err(err) = self.run_command(args).await {
            tracing::warn!(container = name, ?err, "Cannot remove the container.");
        }
    }

    /// Removes this agent's containers whose jobs it no longer knows (left by a crash).
    pub async fn reap_orphans(&self) {
        let known: Vec<String> = self.records.all().into_iter().map(|r| r.handle).collect();
        let filter = format!("label={LABEL_AGENT}={}", self.instance);
        let listed = match self
            .run_command(&["ps", "--all", "--filter", &filter, "--format", "{{.Names}}"])
            .await
        {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).to_string(),
            Ok(out) => {
                tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr).trim(), "Cannot list containers.");
                return;
            }
            Err(err) => {
                tracing::warn!(?err, "Cannot list containers.");
                return;
            }
        };
        for name in listed.lines().map(str::trim).filter(|n| !n.is_empty()) {
            if !known.iter().any(|k| k == name) {
                tracing::warn!(
                    container = name,
                    "Removing a container of a job this agent no longer knows."
                );
                self.remove(name).await;
            }
        }
    }

    /// Makes sure the image is on the host, as the pull policy says.
    async fn ensure_image(&self, image: &str, log: &LogSink) -> anyhow::Result<()> {
        let present = self
            .run_command(&["image", "inspect", image])
            .await?
            .status
            .success();
        let pull = match self.settings.pull {
            PullPolicy::Never if !present => anyhow::bail!(
                "image {image} is not on this host and the site's pull policy is never"
            ),
            PullPolicy::Never => false,
            PullPolicy::IfNotPresent => !present,
            PullPolicy::Always => true,
        };
        if pull {
            log.system(format!("pulling {image}")).await;
            let out = self.run_command(&["pull", image]).await?;
            anyhow::ensure!(
                out.status.success(),
                "cannot pull {image}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The `run` arguments (after `run --detach`), for tests: nothing a job sets adds an option.
    pub fn run_args(&self, job: &JobContext, image: &str) -> Vec<String> {
        let r = &job.spec.resources;
        let dir = job.dir.display();
        let (uid, gid) = match &job.run_as {
            Some(account) => (account.uid.as_raw(), account.gid.as_raw()),
            None => (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        };
        let mut args = vec![
            format!("--name={}", self.container_name(job.id, job.attempt)),
            format!("--label={LABEL_JOB}={}", job.id),
            format!("--label={LABEL_ATTEMPT}={}", job.attempt),
            format!("--label={LABEL_AGENT}={}", self.instance),
            format!("--user={uid}:{gid}"),
            "--cap-drop=ALL".into(),
            "--security-opt=no-new-privileges".into(),
            format!("--pids-limit={PIDS_LIMIT}"),
            format!(
                "--network={}",
                match self.settings.network {
                    ContainerNetwork::None => "none",
                    ContainerNetwork::Bridge => "bridge",
                }
            ),
            format!("--volume={dir}/workspace:/work"),
            format!("--volume={dir}/script.sh:/testbot/script.sh:ro"),
            "--workdir=/work".into(),
            "--env=HOME=/work".into(),
            "--env=TESTBOT_WORKSPACE=/work".into(),
        ];
        args.extend(
            job.testbot_env()
                .into_iter()
                .map(|(name, value)| format!("--env={name}={value}")),
        );
        if self.settings.read_only_root {
            args.push("--read-only".into());
            args.push("--tmpfs=/tmp".into());
        }
        if let Some(runtime) = &self.settings.runtime {
            args.push(format!("--runtime={runtime}"));
        }
        if let Some(cpus) = r.cpus {
            args.push(format!("--cpus={cpus}"));
        }
        if let Some(memory) = r.memory_mib {
            args.push(format!("--memory={memory}m"));
            // No swap beyond the limit: the limit is the limit.
            args.push(format!("--memory-swap={memory}m"));
        }
        // The job's variables are in a file the container's shell reads before the script
        // (`env_file`): not on a command line, where every user of the host could read them,
        // and not in the client's environment, where they would act on the client.
        args.push(format!("--volume={dir}/{ENV_FILE}:/testbot/{ENV_FILE}:ro"));
        args.push(image.to_string());
        args.extend([
            "/bin/sh".into(),
            "-ec".into(),
            format!(". /testbot/{ENV_FILE}; exec /bin/sh -e /testbot/script.sh"),
        ]);
        args
    }

    /// Prepares the job directory, makes sure of the image, and starts the container.
    async fn start(&self, job: &JobContext, log: &LogSink) -> anyhow::Result<String> {
        let image = job
            .spec
            .image
            .clone()
            .or_else(|| self.settings.default_image.clone())
            .context("the job names no image and the site has no default_image")?;
        testbot_proto::jobs::validate_image(&image).map_err(anyhow::Error::msg)?;
        // The directory is fresh and still the agent's (mode 0700): files are created new, with
        // their own modes, before it is handed to the job's account.
        let workspace = job.dir.join("workspace");
        super::workspace_dir(&workspace)?;
        super::write_new_file(&job.dir.join("script.sh"), job.spec.script.as_bytes())?;
        super::write_new_file(&job.dir.join(ENV_FILE), env_file(&job.spec.env).as_bytes())?;
        if let Some(account) = super::switches_account(job) {
            super::hand_over(&job.dir, account)?;
        }
        self.ensure_image(&image, log).await?;
        let name = self.container_name(job.id, job.attempt);
        // A container of an earlier attempt with this name is stale.
        self.remove(&name).await;
        let args = self.run_args(job, &image);
        let mut command = self.command();
        command
            .arg("run")
            .arg("--detach")
            .args(&args)
            // podman's conmon notes an OOM kill as a file `oom` in the directory podman was
            // started from: keep it in the job directory (see `follow`).
            .current_dir(&job.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
            .await
            .map_err(|_| anyhow::anyhow!("{} run timed out", self.engine.program()))??;
        if !out.status.success() {
            self.remove(&name).await;
            anyhow::bail!(
                "{} could not start the container: {}",
                self.engine.program(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let record = JobRecord::started(name.clone(), job);
        self.records.save(&record)?;
        log.metadata("container", name.clone()).await;
        log.system(format!(
            "started container {name} from {image} with {}",
            self.engine.program()
        ))
        .await;
        Ok(name)
    }

    /// Streams the container's output from the given positions until it exits, is stopped or
    /// times out; then reads how it ended.
    async fn follow(
        &self,
        job: &JobContext,
        name: &str,
        (stdout_after, stderr_after): (u64, u64),
        log: &LogSink,
        stop: &CancellationToken,
    ) -> anyhow::Result<ExecOutcome> {
        let mut logs = self.command();
        logs.args(["logs", "--follow", "--timestamps", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut logs = logs
            .spawn()
            .context("Cannot follow the container's output")?;
        let out = tokio::spawn(read_stamped(
            logs.stdout.take().context("no stdout pipe")?,
            Stream::Stdout,
            stdout_after,
            log.clone(),
        ));
        let err = tokio::spawn(read_stamped(
            logs.stderr.take().context("no stderr pipe")?,
            Stream::Stderr,
            stderr_after,
            log.clone(),
        ));
        let mut wait = self.command();
        wait.args(["wait", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let wait = wait.output();
        let stopped = tokio::select! {
            result = wait => {
                let result = result.context("Cannot wait for the container")?;
                anyhow::ensure!(
                    result.status.success(),
                    "{} wait failed: {}",
                    self.engine.program(),
                    String::from_utf8_lossy(&result.stderr).trim()
                );
                None
            }
            _ = tokio::time::sleep(job.timeout) => {
                log.system(format!("timed out after {}; stopping the container", humantime::format_duration(job.timeout))).await;
                Some(ExecOutcome::TimedOut(job.timeout))
            }
            _ = stop.cancelled() => Some(ExecOutcome::Stopped),
        };
        if stopped.is_some() {
            let grace = self.kill_grace.as_secs().max(1).to_string();
            let _ = self.run_command(&["stop", "--time", &grace, name]).await;
        }
        // `logs --follow` ends when the container does.
        let _ = tokio::time::timeout(Duration::from_secs(10), logs.wait()).await;
        let _ = logs.start_kill();
        let _ = out.await;
        let _ = err.await;
        if let Some(outcome) = stopped {
            return Ok(outcome);
        }
        let inspect = self
            .run_command(&[
                "inspect",
                "--format",
                "{{.State.ExitCode}} {{.State.OOMKilled}}",
                name,
            ])
            .await?;
        let text = String::from_utf8_lossy(&inspect.stdout);
        let mut fields = text.split_whitespace();
        let code: i32 = fields
            .next()
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("unexpected inspect output: {text:?}"))?;
        // docker reports OOM kills in the container's state; podman (4.x) leaves the file
        // `oom` in the directory it was started from.
        // The marker is conmon's (root's) regular file; a link in its place is not believed.
        let oom = fields.next() == Some("true")
            || std::fs::symlink_metadata(job.dir.join("oom")).is_ok_and(|m| m.is_file());
        let limit = job.spec.resources.memory_mib;
        if oom {
            let limit = limit.map(|m| format!(" of {m} MiB")).unwrap_or_default();
            return Ok(ExecOutcome::Failed {
                state: JobState::Failed,
                cause: FailureCause::OutOfMemory,
                reason: format!(
                    "out of memory: the container went over its memory limit{limit} and was killed"
                ),
            });
        }
        // Some engines (podman on cgroup v1) do not report OOM kills; a SIGKILL nobody here
        // sent, under a memory limit, is almost always one.
        if let (137, Some(limit)) = (code, limit) {
            return Ok(ExecOutcome::Failed {
                state: JobState::Failed,
                cause: FailureCause::OutOfMemory,
                reason: format!(
                    "out of memory (probably): the container was killed by SIGKILL under its memory limit of {limit} MiB; {} did not report the cause",
                    self.engine.program()
                ),
            });
        }
        Ok(match code {
            code @ 129..=159 => ExecOutcome::Signalled(code - 128),
            code => ExecOutcome::Exited(code),
        })
    }
}

/// The file in the job directory that holds the job's variables, as `export NAME='VALUE'` lines.
const ENV_FILE: &str = "env.sh";

/// The job's variables as lines the container's `/bin/sh` sources; any value survives the
/// quoting (single quotes, with `'` written as `'\''`). Names are `[A-Za-z_][A-Za-z0-9_]*`
/// (checked with the job).
fn env_file(env: &std::collections::BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(name, value)| format!("export {name}='{}'\n", value.replace('\'', "'\\''")))
        .collect()
}

/// Variables of the agent's own environment the engine's client gets: where the engine and its
/// configuration are, proxies for pulls, locale. Set by the operator, never by a job.
fn client_env(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "LC_ALL",
        "TZ",
        "TMPDIR",
        "XDG_RUNTIME_DIR",
        "XDG_CONFIG_HOME",
        "REGISTRY_AUTH_FILE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    ];
    const PREFIXES: &[&str] = &["DOCKER_", "CONTAINERS_", "CONTAINER_"];
    NAMES.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Reads `logs --timestamps` output (`2026-11-25T13:40:00.123456789Z text`, from container
/// engines and from Kubernetes), skipping lines at or before `after` (ns since the epoch: lines
/// the broker already has). Every later line is passed on in the order read, even one stamped
/// the same as or earlier than the line before it (engines stamp lines when they read them, and
/// podman's stamps can repeat). Returns the latest timestamp read (or `after`).
pub(super) async fn read_stamped(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    after: u64,
    log: LogSink,
) -> u64 {
    let mut latest = after;
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(?err, "Cannot read the container's output.");
                break;
            }
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let (stamp, rest) = text.split_once(' ').unwrap_or((text, ""));
        let Some(ns) = timestamp_ns(stamp) else {
            log.line(stream, text.to_string()).await;
            continue;
        };
        if ns <= after {
            continue;
        }
        latest = latest.max(ns);
        let rest = rest.strip_suffix('\r').unwrap_or(rest);
        let mut rest = rest;
        while rest.len() > MAX_LINE_BYTES {
            let cut = rest.floor_char_boundary(MAX_LINE_BYTES);
            log.file_line(stream, rest[..cut].to_string(), ns).await;
            rest = &rest[cut..];
        }
        log.file_line(stream, rest.to_string(), ns).await;
    }
    latest
}

/// An RFC 3339 timestamp with up to nanoseconds, as nanoseconds since the epoch.
fn timestamp_ns(stamp: &str) -> Option<u64> {
    let time = humantime::parse_rfc3339_weak(stamp.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(stamp))
        .ok()?;
    let ns = time.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    u64::try_from(ns).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stamped_lines_after_the_mark_all_pass_in_the_order_read() {
        let output = "2026-11-25T13:40:00.000000001Z acknowledged\n\
            2026-11-25T13:40:00.000000005Z new\n\
            2026-11-25T13:40:00.000000005Z same stamp\n\
            2026-11-25T13:40:00.000000003Z stamped earlier, read later\n";
        let (sink, mut lines) = LogSink::new(16);
        let after = timestamp_ns("2026-11-25T13:40:00.000000001Z").unwrap();
        let latest = read_stamped(output.as_bytes(), Stream::Stdout, after, sink).await;
        let mut texts = Vec::new();
        while let Ok(line) = lines.try_recv() {
            texts.push(line.text);
        }
        assert_eq!(texts, ["new", "same stamp", "stamped earlier, read later"]);
        assert_eq!(latest, after + 4);
    }

    #[test]
    fn engine_timestamps_parse_to_nanoseconds() {
        let a = timestamp_ns("2026-11-25T13:40:00.000000001Z").unwrap();
        let b = timestamp_ns("2026-11-25T13:40:00.000000002Z").unwrap();
        assert_eq!(b - a, 1);
        assert_eq!(timestamp_ns("hello"), None);
    }
}
