//! The Kubernetes executor: each job runs as a `batch/v1` Job in the site's namespace, created
//! and followed through the API server (kube-rs), from inside the cluster or outside it.
//!
//! - The Job runs one pod, never retried (`backoffLimit: 0`, `restartPolicy: Never`), with the
//!   job's time limit as `activeDeadlineSeconds` and `ttlSecondsAfterFinished` as a backstop for
//!   an agent that cannot delete it. Its image must be on the site's allowlist; its requests and
//!   limits are the job's resources (already checked against the site's caps).
//! - The pod runs as the job's mapped uid:gid with `runAsNonRoot`, no privilege escalation,
//!   every capability dropped and the runtime's default seccomp profile, under the policy's
//!   service account, without its API token unless the policy asks for it. The script runs with
//!   `sh -e -c` in `/work`, an `emptyDir`. The pod shares its process namespace, so the script
//!   is not PID 1 and a SIGTERM stops it.
//! - The job's secret variables are in a Secret named like the Job and owned by it (so it goes
//!   with the Job, also when `ttlSecondsAfterFinished` removes it); the container takes them
//!   with `secretKeyRef`, so their values are not in the Job or pod spec that anyone who may
//!   read pods in the namespace sees. The agent deletes the Secret with the Job.
//! - Jobs, pods and Secrets carry the labels `testbot/agent` (this agent's instance), `testbot/job` and
//!   `testbot/attempt`: a restarted agent re-attaches to its Jobs by them and removes the ones it
//!   no longer knows.
//! - The pod's log (stdout and stderr as one stream: Kubernetes keeps them together) is followed
//!   from the moment the container starts, with the kubelet's timestamps; the timestamp of the
//!   last line the broker acknowledged is where a restarted agent resumes.
//! - Ends map to results with a reason: exit codes, `OOMKilled`, `DeadlineExceeded` (timed out),
//!   image errors and pods the scheduler cannot place (after `max_pending`, with the
//!   scheduler's message). Cancel deletes the Job with foreground propagation and waits until
//!   its pod is gone.
//! - A job that names result files gets a second container that keeps its workspace for the
//!   agent to fetch them from once the script has ended, also at its time limit: see
//!   [`results`].

mod results;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::batch::v1::{Job, JobSpec as KubeJobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, Pod, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, Secret, SecretKeySelector,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use testbot_proto::jobs::{JobId, JobState};
use testbot_proto::logs::Stream;
use testbot_proto::results::FailureCause;
use tokio::time::Instant;
use tokio_util::compat::FuturesAsyncReadCompatExt as _;
use tokio_util::sync::CancellationToken;

use super::container::read_stamped;
use super::records::{JobRecord, JobRecords};
use super::{BoxFuture, Detached, ExecOutcome, Executor, JobContext, LogSink};
use crate::config::KubernetesConnection;
use crate::policy::settings::{KubernetesSettings, PullPolicy};

/// The name of the job's container in its pod.
const CONTAINER: &str = "job";
/// Label keys on every Job (and its pod) this executor creates.
const LABEL_AGENT: &str = "testbot/agent";
const LABEL_JOB: &str = "testbot/job";
const LABEL_ATTEMPT: &str = "testbot/attempt";
/// Waiting reasons of a container that will not start without someone changing something.
const BROKEN_WAITING: [&str; 5] = [
    "ErrImageNeverPull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];
/// How long after the job's time limit the agent stops a Job whose deadline Kubernetes did not
/// enforce (a stalled controller manager).
const DEADLINE_SLACK: Duration = Duration::from_secs(30);
/// The CPU of a `results` container, in thousandths of a core, taken from the job's.
const RESULTS_CPU_MILLIS: u64 = 50;
/// The longest one API call may take (the watches and the log stream excepted).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs jobs as Kubernetes Jobs.
pub struct KubernetesExecutor {
    /// The site policy's `[executors.kubernetes]` table.
    pub settings: KubernetesSettings,
    /// The agent configuration's `[kubernetes]` table: which cluster.
    pub connection: KubernetesConnection,
    /// Identifies this agent's Jobs in a namespace several agents may share: a short hash of the
    /// agent's state directory, stable across restarts.
    pub instance: String,
    /// Where the records of running Jobs are kept (`STATE_DIR/kubernetes`).
    pub records: JobRecords,
    /// The pods' termination grace period.
    pub kill_grace: Duration,
    client: tokio::sync::OnceCell<kube::Client>,
}

impl Executor for KubernetesExecutor {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn prepare<'a>(&'a self) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.connect())
    }

    fn run<'a>(
        &'a self,
        job: &'a JobContext,
        log: LogSink,
        stop: CancellationToken,
    ) -> BoxFuture<'a, anyhow::Result<ExecOutcome>> {
        Box::pin(async move {
            let name = self.start(job, &log).await?;
            self.follow(job, &name, 0, &log, &stop).await
        })
    }

    /// The pod's workspace is an `emptyDir`, gone with the pod: the result files are fetched
    /// from it into this directory before the pod goes.
    fn workspace(&self, job: &JobContext) -> Option<std::path::PathBuf> {
        let dir = fetched_results_dir(job);
        dir.is_dir().then_some(dir)
    }

    fn cleanup<'a>(&'a self, job: &'a JobContext) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let name = self.job_name(job.id, job.attempt);
            self.delete(&name, None).await;
            self.delete_secret(&name).await;
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
                "following Kubernetes Job {}/{} again from where the log left off",
                self.settings.namespace, record.handle
            ))
            .await;
            self.follow(job, &record.handle, record.stdout_pos, &log, &stop)
                .await
        })
    }

    fn abandon<'a>(&'a self, job: &'a Detached) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let name = self.job_name(job.job_id, job.attempt);
            tracing::warn!(job_id = %job.job_id, kubernetes_job = %name, "Deleting a Kubernetes Job whose lease is gone.");
            self.delete(&name, None).await;
            self.delete_secret(&name).await;
            self.records.remove(job.job_id);
            let _ = tokio::fs::remove_dir_all(&job.dir).await;
        })
    }
}

/// How a followed Job ended, before it becomes an [`ExecOutcome`].
enum End {
    /// The container terminated.
    Terminated { code: i32, reason: Option<String> },
    /// Kubernetes stopped it at `activeDeadlineSeconds` (or the agent did, a little later).
    Deadline,
    /// The agent stopped the job container at the job's time limit and it has ended; the pod
    /// is still there, with the workspace (a job with result files).
    StoppedAtLimit,
    /// It could not run: an image error, no node for it, an evicted pod.
    Broken(String),
    /// The agent was told to stop it.
    Stopped,
}

/// How far the agent has got in stopping a job with result files at its time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    No,
    Terminated,
    Killed,
}

impl KubernetesExecutor {
    pub fn new(
        settings: KubernetesSettings,
        connection: KubernetesConnection,
        instance: String,
        records: JobRecords,
        kill_grace: Duration,
    ) -> KubernetesExecutor {
        KubernetesExecutor {
            settings,
            connection,
            instance,
            records,
            kill_grace,
            client: tokio::sync::OnceCell::new(),
        }
    }

    /// Connects to the cluster and checks that the agent may list Jobs in the namespace.
    async fn connect(&self) -> anyhow::Result<()> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let config = self.kube_config().await?;
                kube::Client::try_from(config).context("Cannot create the Kubernetes client")
            })
            .await?;
        let ns = &self.settings.namespace;
        let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
        tokio::time::timeout(CALL_TIMEOUT, jobs.list(&ListParams::default().limit(1)))
            .await
            .map_err(|_| anyhow::anyhow!("the Kubernetes API server did not answer within {CALL_TIMEOUT:?}"))?
            .map_err(|err| {
                anyhow::anyhow!(
                    "Cannot list Jobs in Kubernetes namespace {ns}: {}; the agent's account needs create, get, list, watch and delete on jobs.batch, get, list and watch on pods and pods/log, and create on pods/exec there",
                    describe(&err)
                )
            })?;
        tracing::info!(namespace = %ns, "Connected to Kubernetes.");
        Ok(())
    }

    async fn kube_config(&self) -> anyhow::Result<kube::Config> {
        let options = kube::config::KubeConfigOptions {
            context: self.connection.context.clone(),
            ..Default::default()
        };
        match &self.connection.kubeconfig {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("Cannot read kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .with_context(|| format!("Cannot use kubeconfig {}", path.display()))
            }
            None if self.connection.context.is_some() => {
                kube::Config::from_kubeconfig(&options)
                    .await
                    .context("Cannot use the kubeconfig")
            }
            None => kube::Config::infer().await.context(
                "Cannot find a Kubernetes cluster: set [kubernetes] kubeconfig in the agent's configuration, set KUBECONFIG, or run the agent in a pod",
            ),
        }
    }

    fn client(&self) -> anyhow::Result<kube::Client> {
        self.client
            .get()
            .cloned()
            .context("not connected to Kubernetes (the executor was not prepared)")
    }

    fn jobs(&self) -> anyhow::Result<Api<Job>> {
        Ok(Api::namespaced(self.client()?, &self.settings.namespace))
    }

    fn pods(&self) -> anyhow::Result<Api<Pod>> {
        Ok(Api::namespaced(self.client()?, &self.settings.namespace))
    }

    fn secrets(&self) -> anyhow::Result<Api<Secret>> {
        Ok(Api::namespaced(self.client()?, &self.settings.namespace))
    }

    /// The Secret that holds the job's secret variables, named like its Job; `None` when the job
    /// has none.
    pub fn secret_object(&self, job: &JobContext) -> Option<Secret> {
        let values: BTreeMap<String, String> = job
            .spec
            .secret_values()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        if values.is_empty() {
            return None;
        }
        Some(Secret {
            metadata: ObjectMeta {
                name: Some(self.job_name(job.id, job.attempt)),
                namespace: Some(self.settings.namespace.clone()),
                labels: Some(self.labels(job)),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            string_data: Some(values),
            ..Default::default()
        })
    }

    /// Creates the job's Secret, replacing one an earlier agent left under its name.
    async fn create_secret(&self, secret: &Secret, log: &LogSink) -> anyhow::Result<()> {
        let secrets = self.secrets()?;
        let name = secret.metadata.name.clone().unwrap_or_default();
        let ns = &self.settings.namespace;
        let mut created = call(secrets.create(&PostParams::default(), secret)).await;
        if let Err(kube::Error::Api(status)) = &created
            && status.is_already_exists()
        {
            log.system(format!("removing a stale Kubernetes Secret {ns}/{name}"))
                .await;
            self.delete_secret(&name).await;
            created = call(secrets.create(&PostParams::default(), secret)).await;
        }
        created.map_err(|err| {
            anyhow::anyhow!(
                "Kubernetes refused to create Secret {ns}/{name} for the job's secret variables: {}; the agent's account needs create, patch, delete and list on secrets in the namespace",
                describe(&err)
            )
        })?;
        Ok(())
    }

    /// Makes the Job the owner of its Secret, so Kubernetes removes the Secret with the Job even
    /// when the agent does not (the agent deletes it itself too).
    async fn own_secret(&self, name: &str, job: &Job) {
        let (Ok(secrets), Some(uid)) = (self.secrets(), job.metadata.uid.clone()) else {
            return;
        };
        let patch = serde_json::json!({
            "metadata": {
                "ownerReferences": [{
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": name,
                    "uid": uid,
                }]
            }
        });
        if let Err(err) =
            call(secrets.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await
        {
            tracing::warn!(kubernetes_secret = name, err = %describe(&err), "Cannot make the Kubernetes Job the owner of its Secret; the agent deletes it with the Job.");
        }
    }

    /// Deletes the job's Secret `name`, if there is one.
    async fn delete_secret(&self, name: &str) {
        let Ok(secrets) = self.secrets() else { return };
        match call(secrets.delete(name, &DeleteParams::default())).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(err) => {
                tracing::warn!(kubernetes_secret = name, err = %describe(&err), "Cannot delete the Kubernetes Secret of a job.");
            }
        }
    }

    /// The Job's name: `testbot-INSTANCE-JOB-ATTEMPT` (at most 52 characters, a DNS label).
    fn job_name(&self, job: JobId, attempt: u32) -> String {
        format!("testbot-{}-{job}-{attempt}", self.instance)
    }

    fn labels(&self, job: &JobContext) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_AGENT.to_string(), self.instance.clone()),
            (LABEL_JOB.to_string(), job.id.to_string()),
            (LABEL_ATTEMPT.to_string(), job.attempt.to_string()),
        ])
    }

    /// The Job for `job`, running `image` (for tests: nothing a job sets but its resources,
    /// variables and script reaches the object).
    pub fn job_object(&self, job: &JobContext, image: &str) -> anyhow::Result<Job> {
        let (uid, gid) = match &job.run_as {
            Some(account) => (account.uid.as_raw(), account.gid.as_raw()),
            None => (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        };
        anyhow::ensure!(
            uid != 0,
            "Kubernetes jobs run as a non-root user, but this job would run as root: map jobs to an unprivileged account in the site policy's [identity] table"
        );
        let r = &job.spec.resources;
        let collects = !job.spec.results.is_empty();
        let mut quantities = BTreeMap::new();
        if let Some(cpus) = r.cpus {
            // The `results` container's CPU comes out of the job's: the pod asks for what the
            // job asked for, and fits where it would have.
            let cpu = match collects {
                true => format!(
                    "{}m",
                    (u64::from(cpus) * 1000).saturating_sub(RESULTS_CPU_MILLIS)
                ),
                false => cpus.to_string(),
            };
            quantities.insert("cpu".to_string(), Quantity(cpu));
        }
        if let Some(memory) = r.memory_mib {
            quantities.insert("memory".to_string(), Quantity(format!("{memory}Mi")));
        }
        if let Some(gpus) = r.gpus.filter(|g| *g > 0) {
            quantities.insert(
                self.settings.gpu_resource.clone(),
                Quantity(gpus.to_string()),
            );
        }
        let resources = (!quantities.is_empty()).then(|| ResourceRequirements {
            requests: Some(quantities.clone()),
            limits: Some(quantities),
            ..Default::default()
        });
        let var = |name: &str, value: String| EnvVar {
            name: name.to_string(),
            value: Some(value),
            value_from: None,
        };
        let mut env = vec![
            var("HOME", "/work".into()),
            var("TESTBOT_WORKSPACE", "/work".into()),
        ];
        env.extend(
            job.testbot_env()
                .into_iter()
                .map(|(name, value)| var(name, value)),
        );
        // Secret values stay out of the spec: the container reads them from the job's Secret.
        let secret_name = self.job_name(job.id, job.attempt);
        env.extend(job.spec.env.iter().map(|(name, value)| {
            if job.spec.secret_env.contains(name) {
                EnvVar {
                    name: name.clone(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret_name.clone(),
                            key: name.clone(),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    }),
                }
            } else {
                var(name, value.clone())
            }
        }));
        let container = Container {
            name: CONTAINER.to_string(),
            image: Some(image.to_string()),
            image_pull_policy: Some(
                match self.settings.pull {
                    PullPolicy::Never => "Never",
                    PullPolicy::IfNotPresent => "IfNotPresent",
                    PullPolicy::Always => "Always",
                }
                .to_string(),
            ),
            command: Some(vec![
                "/bin/sh".into(),
                "-e".into(),
                "-c".into(),
                job.spec.script.clone(),
            ]),
            working_dir: Some("/work".into()),
            env: Some(env),
            resources,
            volume_mounts: Some(vec![VolumeMount {
                name: "work".into(),
                mount_path: "/work".into(),
                ..Default::default()
            }]),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                privileged: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    add: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut containers = vec![container];
        if collects {
            containers.push(results_container(&containers[0]));
        }
        let labels = self.labels(job);
        let pod = PodSpec {
            containers,
            restart_policy: Some("Never".into()),
            service_account_name: self.settings.service_account.clone(),
            automount_service_account_token: Some(self.settings.automount_service_account_token),
            enable_service_links: Some(false),
            share_process_namespace: Some(true),
            termination_grace_period_seconds: Some(self.kill_grace.as_secs().max(1) as i64),
            node_selector: (!self.settings.node_selector.is_empty())
                .then(|| self.settings.node_selector.clone()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(i64::from(uid)),
                run_as_group: Some(i64::from(gid)),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            volumes: Some(vec![Volume {
                name: "work".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        Ok(Job {
            metadata: ObjectMeta {
                name: Some(self.job_name(job.id, job.attempt)),
                namespace: Some(self.settings.namespace.clone()),
                labels: Some(labels.clone()),
                annotations: Some(BTreeMap::from([(
                    "testbot/agent-name".to_string(),
                    job.agent.clone(),
                )])),
                ..Default::default()
            },
            spec: Some(KubeJobSpec {
                backoff_limit: Some(0),
                // With a `results` container the agent stops the job at its limit itself, so
                // that the workspace is still there; Kubernetes' deadline is the backstop.
                active_deadline_seconds: Some(
                    (job.timeout
                        + if collects {
                            self.kill_grace + results::DEADLINE_ALLOWANCE
                        } else {
                            Duration::ZERO
                        })
                    .as_secs()
                    .max(1) as i64,
                ),
                ttl_seconds_after_finished: Some(
                    i32::try_from(self.settings.ttl_after_finished.as_secs()).unwrap_or(i32::MAX),
                ),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..Default::default()
                    }),
                    spec: Some(pod),
                },
                ..Default::default()
            }),
            status: None,
        })
    }

    /// Creates the Job; returns its name.
    async fn start(&self, job: &JobContext, log: &LogSink) -> anyhow::Result<String> {
        let image = job
            .spec
            .image
            .clone()
            .or_else(|| self.settings.default_image.clone())
            .context("the job names no image and the site has no default_image")?;
        testbot_proto::jobs::validate_image(&image).map_err(anyhow::Error::msg)?;
        // The site gate has checked this already; the executor does not rely on it.
        anyhow::ensure!(
            testbot_proto::glob::any_match(&self.settings.images, &image),
            "image {image} is not in the site's allowed images"
        );
        let object = self.job_object(job, &image)?;
        let name = self.job_name(job.id, job.attempt);
        let ns = &self.settings.namespace;
        let jobs = self.jobs()?;
        // The Secret first: a pod that started before it existed would fail to start.
        let secret = self.secret_object(job);
        if let Some(secret) = &secret {
            self.create_secret(secret, log).await?;
        }
        let mut created = call(jobs.create(&PostParams::default(), &object)).await;
        if let Err(kube::Error::Api(status)) = &created
            && status.is_already_exists()
        {
            // Left by an agent that stopped between creating the Job and recording it.
            log.system(format!("removing a stale Kubernetes Job {ns}/{name}"))
                .await;
            self.delete(&name, Some(self.kill_grace + CALL_TIMEOUT))
                .await;
            created = call(jobs.create(&PostParams::default(), &object)).await;
        }
        let created = match created {
            Ok(created) => created,
            Err(err) => {
                if secret.is_some() {
                    self.delete_secret(&name).await;
                }
                anyhow::bail!(
                    "Kubernetes refused to create Job {ns}/{name}: {}",
                    describe(&err)
                );
            }
        };
        if secret.is_some() {
            self.own_secret(&name, &created).await;
        }
        self.records.save(&JobRecord::started(name.clone(), job))?;
        log.metadata("kubernetes_job", format!("{ns}/{name}")).await;
        log.system(format!("created Kubernetes Job {ns}/{name} from {image}"))
            .await;
        Ok(name)
    }

    /// Follows the Job `name` to its end, streaming its pod's log after `after_ns` (the
    /// timestamp of the last line the broker has).
    async fn follow(
        &self,
        job: &JobContext,
        name: &str,
        after_ns: u64,
        log: &LogSink,
        stop: &CancellationToken,
    ) -> anyhow::Result<ExecOutcome> {
        let (jobs, pods) = (self.jobs()?, self.pods()?);
        let ns = &self.settings.namespace;
        let Some(object) = call(jobs.get_opt(name)).await? else {
            anyhow::bail!("Kubernetes Job {ns}/{name} is gone");
        };
        // A job with result files is stopped at its limit by the agent (see `results`), from
        // when its Job started: also after a restart of the agent.
        let collects = !job.spec.results.is_empty();
        let ran_for = object
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| {
                let since = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
                Duration::from_secs(since.as_secs().max(0) as u64)
            })
            .unwrap_or_default();
        let limit = tokio::time::sleep(job.timeout.saturating_sub(ran_for));
        tokio::pin!(limit);
        let mut stopping = Stopping::No;
        let mut limit_reached = false;
        let mut pod_name: Option<String> = None;
        let selector = format!(
            "{LABEL_AGENT}={},{LABEL_JOB}={},{LABEL_ATTEMPT}={}",
            self.instance, job.id, job.attempt
        );
        let mut pod_events = watcher(pods.clone(), watcher::Config::default().labels(&selector))
            .default_backoff()
            .applied_objects()
            .boxed();
        let mut job_events = watcher(
            jobs.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .default_backoff()
        .applied_objects()
        .boxed();
        let waiting_since = Instant::now();
        let mut waiting_for: Option<String> = None;
        let mut follower: Option<tokio::task::JoinHandle<()>> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let backstop = tokio::time::sleep(
            job.timeout
                + DEADLINE_SLACK
                + if collects {
                    2 * self.kill_grace + DEADLINE_SLACK
                } else {
                    Duration::ZERO
                },
        );
        tokio::pin!(backstop);
        let end = loop {
            tokio::select! {
                event = pod_events.next() => {
                    let pod = match event {
                        Some(Ok(pod)) => pod,
                        Some(Err(err)) => {
                            tracing::warn!(%err, "Watching the job's pod failed; retrying.");
                            continue;
                        }
                        None => anyhow::bail!("the watch on the pod of Job {ns}/{name} ended"),
                    };
                    let view = PodView::of(&pod);
                    if matches!(view, PodView::Running | PodView::Terminated { .. })
                        && follower.is_none()
                    {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        pod_name = Some(name.clone());
                        log.metadata("kubernetes_pod", name.clone()).await;
                        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                            log.metadata("kubernetes_node", node).await;
                        }
                        follower = Some(tokio::spawn(stream_log(
                            pods.clone(),
                            name,
                            after_ns,
                            log.clone(),
                        )));
                    }
                    match view {
                        PodView::Waiting(why) => {
                            if waiting_for.as_ref() != Some(&why) {
                                log.system(format!("pod waiting: {why}")).await;
                                waiting_for = Some(why);
                            }
                        }
                        PodView::Running => {}
                        PodView::Terminated { code, reason } => {
                            break End::Terminated { code, reason };
                        }
                        PodView::Broken(why) => break End::Broken(why),
                    }
                }
                event = job_events.next() => {
                    if let Some(Ok(object)) = event
                        && failed_reason(&object).as_deref() == Some("DeadlineExceeded")
                    {
                        break End::Deadline;
                    }
                }
                _ = tick.tick(), if follower.is_none() => {
                    if waiting_since.elapsed() > self.settings.max_pending {
                        break End::Broken(format!(
                            "the pod did not start within {} (max_pending): {}",
                            humantime::format_duration(self.settings.max_pending),
                            waiting_for.as_deref().unwrap_or("no reason given"),
                        ));
                    }
                }
                _ = &mut limit, if collects => {
                    // TERM, then KILL after the grace period, then the Job is deleted.
                    limit_reached = true;
                    let (signal, next) = match stopping {
                        Stopping::No => ("TERM", Stopping::Terminated),
                        Stopping::Terminated => ("KILL", Stopping::Killed),
                        Stopping::Killed => break End::Deadline,
                    };
                    let Some(pod) = pod_name.as_deref() else { break End::Deadline };
                    if let Err(err) = results::signal_job(&pods, pod, signal).await {
                        log.system(format!(
                            "cannot stop the job's container at its time limit from the {} container: {err:#}; the agent deletes the Job",
                            results::CONTAINER
                        ))
                        .await;
                        break End::Deadline;
                    }
                    stopping = next;
                    limit.as_mut().reset(Instant::now() + self.kill_grace);
                }
                _ = stop.cancelled() => break End::Stopped,
                _ = &mut backstop => break End::Deadline,
            }
        };
        drop(pod_events);
        drop(job_events);

        // A container killed at the deadline terminates before the Job's condition says why.
        let end = match end {
            End::Terminated { .. } if stopping != Stopping::No => End::StoppedAtLimit,
            End::Terminated { code, .. } if code != 0 && self.past_deadline(name).await => {
                End::Deadline
            }
            end => end,
        };
        if matches!(end, End::Stopped | End::Deadline | End::Broken(_)) {
            // Foreground: the Job goes once its pod has; the result waits for that.
            self.delete(name, Some(self.kill_grace + CALL_TIMEOUT))
                .await;
        }
        if let Some(follower) = follower {
            // The log stream ends when the container does.
            let abort = follower.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), follower)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        if collects {
            self.fetch_results(job, &pods, pod_name.as_deref(), &end, log)
                .await;
        }
        Ok(match end {
            End::Stopped => ExecOutcome::Stopped,
            End::StoppedAtLimit => {
                log.system(format!(
                    "timed out after {}: the agent stopped the job's container",
                    humantime::format_duration(job.timeout)
                ))
                .await;
                ExecOutcome::TimedOut(job.timeout)
            }
            End::Deadline => {
                let by = if limit_reached {
                    "the agent deleted the Job"
                } else {
                    "Kubernetes stopped the Job (DeadlineExceeded)"
                };
                log.system(format!(
                    "timed out after {}: {by}",
                    humantime::format_duration(job.timeout)
                ))
                .await;
                ExecOutcome::TimedOut(job.timeout)
            }
            End::Broken(reason) => ExecOutcome::Failed {
                state: JobState::Error,
                cause: FailureCause::Infrastructure,
                reason,
            },
            End::Terminated { code, reason } if reason.as_deref() == Some("OOMKilled") => {
                let limit = job
                    .spec
                    .resources
                    .memory_mib
                    .map(|m| format!(" of {m} MiB"))
                    .unwrap_or_default();
                ExecOutcome::Failed {
                    state: JobState::Failed,
                    cause: FailureCause::OutOfMemory,
                    reason: format!(
                        "out of memory: the pod went over its memory limit{limit} and was killed (exit code {code})"
                    ),
                }
            }
            End::Terminated { code, .. } => match code {
                129..=159 => ExecOutcome::Signalled(code - 128),
                code => ExecOutcome::Exited(code),
            },
        })
    }

    /// Fetches the job's result files from its pod, whose job container has ended, into
    /// [`fetched_results_dir`]; says in the log why not when it cannot.
    async fn fetch_results(
        &self,
        job: &JobContext,
        pods: &Api<Pod>,
        pod: Option<&str>,
        end: &End,
        log: &LogSink,
    ) {
        let pod = match (end, pod) {
            (End::Terminated { .. } | End::StoppedAtLimit, Some(pod)) => pod,
            _ => {
                log.system(
                    "results: the pod went before its script ended; no result files can be fetched from it",
                )
                .await;
                return;
            }
        };
        let limits = crate::results::CollectLimits::uploaded();
        let dest = fetched_results_dir(job);
        match results::fetch(pods, pod, &job.spec.results, &dest, &limits).await {
            Ok(notes) => {
                for note in notes {
                    log.system(note).await;
                }
            }
            Err(err) => {
                let _ = tokio::fs::remove_dir_all(&dest).await;
                log.system(format!(
                    "results: cannot fetch the result files from pod {}/{pod}: {err:#}",
                    self.settings.namespace
                ))
                .await;
            }
        }
    }

    /// Whether Job `name` has failed with `DeadlineExceeded` or has run past its deadline.
    async fn past_deadline(&self, name: &str) -> bool {
        let Ok(jobs) = self.jobs() else { return false };
        let Ok(Some(object)) = call(jobs.get_opt(name)).await else {
            return false;
        };
        if failed_reason(&object).as_deref() == Some("DeadlineExceeded") {
            return true;
        }
        let started = object
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .map(|t| t.0);
        let deadline = object.spec.as_ref().and_then(|s| s.active_deadline_seconds);
        match (started, deadline) {
            (Some(started), Some(deadline)) => {
                k8s_openapi::jiff::Timestamp::now()
                    .duration_since(started)
                    .as_secs()
                    >= deadline
            }
            _ => false,
        }
    }

    /// Deletes Job `name` and its pod (foreground propagation); with `wait`, waits up to that
    /// long until both are gone. A missing Job is not an error.
    async fn delete(&self, name: &str, wait: Option<Duration>) {
        let Ok(jobs) = self.jobs() else { return };
        let deleted = match call(jobs.delete(name, &DeleteParams::foreground())).await {
            Ok(deleted) => deleted,
            Err(kube::Error::Api(status)) if status.is_not_found() => return,
            Err(err) => {
                tracing::warn!(kubernetes_job = name, err = %describe(&err), "Cannot delete the Kubernetes Job.");
                return;
            }
        };
        let (Some(wait), Some(uid)) = (wait, deleted.left().and_then(|j| j.metadata.uid)) else {
            return;
        };
        let gone = kube::runtime::wait::await_condition(
            jobs,
            name,
            kube::runtime::wait::conditions::is_deleted(&uid),
        );
        match tokio::time::timeout(wait, gone).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                tracing::warn!(kubernetes_job = name, %err, "Cannot watch the Kubernetes Job go.")
            }
            Err(_) => {
                tracing::warn!(
                    kubernetes_job = name,
                    ?wait,
                    "The Kubernetes Job is still there."
                )
            }
        }
    }

    /// Deletes this agent's Jobs whose jobs it no longer knows (left by a crash).
    pub async fn reap_orphans(&self) {
        let Ok(jobs) = self.jobs() else { return };
        let known: Vec<String> = self.records.all().into_iter().map(|r| r.handle).collect();
        let params = ListParams::default().labels(&format!("{LABEL_AGENT}={}", self.instance));
        let listed = match call(jobs.list(&params)).await {
            Ok(listed) => listed,
            Err(err) => {
                tracing::warn!(err = %describe(&err), "Cannot list this agent's Kubernetes Jobs.");
                return;
            }
        };
        for object in listed {
            let Some(name) = object.metadata.name else {
                continue;
            };
            if !known.contains(&name) {
                tracing::warn!(
                    kubernetes_job = %name,
                    "Deleting a Kubernetes Job of a job this agent no longer knows."
                );
                self.delete(&name, None).await;
            }
        }
        // A Secret whose Job was never created, or is gone.
        let Ok(secrets) = self.secrets() else { return };
        let listed = match call(secrets.list(&params)).await {
            Ok(listed) => listed,
            Err(err) => {
                tracing::warn!(err = %describe(&err), "Cannot list this agent's Kubernetes Secrets.");
                return;
            }
        };
        for object in listed {
            if let Some(name) = object.metadata.name
                && !known.contains(&name)
            {
                self.delete_secret(&name).await;
            }
        }
    }
}

/// What a pod's state means for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PodView {
    /// Not started yet, and why (scheduling, pulling, creating).
    Waiting(String),
    Running,
    Terminated {
        code: i32,
        reason: Option<String>,
    },
    /// Will not run.
    Broken(String),
}

impl PodView {
    fn of(pod: &Pod) -> PodView {
        let Some(status) = &pod.status else {
            return PodView::Waiting("no status yet".into());
        };
        let container = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.name == CONTAINER);
        if let Some(state) = container.and_then(|c| c.state.as_ref()) {
            if let Some(done) = &state.terminated {
                return PodView::Terminated {
                    code: done.exit_code,
                    reason: done.reason.clone(),
                };
            }
            if state.running.is_some() {
                return PodView::Running;
            }
            if let Some(waiting) = &state.waiting {
                let reason = waiting.reason.clone().unwrap_or_default();
                let text = match &waiting.message {
                    Some(message) => format!("{reason}: {message}"),
                    None => reason.clone(),
                };
                if BROKEN_WAITING.contains(&reason.as_str()) {
                    return PodView::Broken(format!("the container cannot start: {text}"));
                }
                return PodView::Waiting(text);
            }
        }
        if status.phase.as_deref() == Some("Failed") {
            return PodView::Broken(format!(
                "the pod failed: {}: {}",
                status.reason.as_deref().unwrap_or("no reason"),
                status.message.as_deref().unwrap_or("no message")
            ));
        }
        let unscheduled = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False");
        if let Some(condition) = unscheduled {
            return PodView::Waiting(format!(
                "{}: {}",
                condition.reason.as_deref().unwrap_or("not scheduled"),
                condition.message.as_deref().unwrap_or("no message")
            ));
        }
        PodView::Waiting(
            status
                .phase
                .clone()
                .unwrap_or_else(|| "pending".to_string()),
        )
    }
}

/// Where the agent puts the result files fetched from the job's pod.
fn fetched_results_dir(job: &JobContext) -> std::path::PathBuf {
    job.dir.join("pod-results")
}

/// The `results` container beside `job` (the job's container): the same image, workspace and
/// confinement, none of the job's variables (its secrets least of all), and a small share of
/// the pod's resources, since all it does is sleep and, at the end, run `find` and `tar`:
/// [`RESULTS_CPU_MILLIS`] of the job's CPU, and 32 MiB of memory of its own (requests equal to
/// limits, like the job's, so the pod keeps the Guaranteed QoS class).
fn results_container(job: &Container) -> Container {
    let quantities = BTreeMap::from([
        (
            "cpu".to_string(),
            Quantity(format!("{RESULTS_CPU_MILLIS}m")),
        ),
        ("memory".to_string(), Quantity("32Mi".into())),
    ]);
    Container {
        name: results::CONTAINER.to_string(),
        image: job.image.clone(),
        image_pull_policy: job.image_pull_policy.clone(),
        command: Some(results::COMMAND.map(String::from).into()),
        working_dir: job.working_dir.clone(),
        volume_mounts: job.volume_mounts.clone(),
        security_context: job.security_context.clone(),
        resources: Some(ResourceRequirements {
            requests: Some(quantities.clone()),
            limits: Some(quantities),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The reason of a Job's `Failed` condition, if it has one.
fn failed_reason(job: &Job) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .map(|c| c.reason.clone().unwrap_or_default())
}

/// Streams the job container's log from after `after` (ns since the epoch) until the container
/// has terminated and its last line is read, reconnecting if the stream breaks before that.
async fn stream_log(pods: Api<Pod>, pod: String, mut after: u64, log: LogSink) {
    let mut last_pass = false;
    loop {
        let params = LogParams {
            container: Some(CONTAINER.to_string()),
            follow: true,
            timestamps: true,
            // Whole seconds: lines of that second the broker has are skipped by timestamp.
            since_time: (after > 0)
                .then(|| {
                    k8s_openapi::jiff::Timestamp::from_second((after / 1_000_000_000) as i64).ok()
                })
                .flatten(),
            ..Default::default()
        };
        match pods.log_stream(&pod, &params).await {
            Ok(stream) => {
                after = read_stamped(stream.compat(), Stream::Stdout, after, log.clone()).await
            }
            Err(kube::Error::Api(status)) if status.is_not_found() => return,
            Err(err) => {
                tracing::warn!(err = %describe(&err), "Cannot read the pod's log; retrying.")
            }
        }
        if last_pass {
            return;
        }
        match call(pods.get_opt(&pod)).await {
            Ok(None) => return,
            // Read once more: lines written between the break and the end.
            Ok(Some(p)) if matches!(PodView::of(&p), PodView::Terminated { .. }) => {
                last_pass = true
            }
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(err) => {
                tracing::warn!(err = %describe(&err), "Cannot read the pod's state; retrying.");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// An API call bounded by [`CALL_TIMEOUT`].
async fn call<T>(request: impl Future<Output = Result<T, kube::Error>>) -> Result<T, kube::Error> {
    match tokio::time::timeout(CALL_TIMEOUT, request).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(
            format!("no answer from the Kubernetes API server within {CALL_TIMEOUT:?}").into(),
        )),
    }
}

/// An API error as a sentence: the server's own message where it gave one.
fn describe(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => format!("{other:#}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use nix::unistd::{Gid, Uid};
    use testbot_proto::jobs::{JobSpec, Resources};

    use super::*;
    use crate::identity::LocalAccount;

    fn executor() -> KubernetesExecutor {
        let settings: crate::policy::SitePolicy = crate::policy::SitePolicy::parse(
            "[oidc]\naudience = \"a\"\n[executors.kubernetes]\nnamespace = \"ci\"\nservice_account = \"runner\"\nimages = [\"ghcr.io/o/*\"]\nnode_selector = { pool = \"ci\" }\n[[rules]]\nname = \"r\"\nrepositories = [\"o/r\"]\n",
        )
        .unwrap();
        KubernetesExecutor::new(
            settings.executors().kubernetes.clone().unwrap(),
            KubernetesConnection::default(),
            "0123456789".into(),
            JobRecords::new(PathBuf::from("/nonexistent")),
            Duration::from_secs(10),
        )
    }

    fn context(run_as: Option<u32>) -> JobContext {
        JobContext {
            id: JobId(7),
            attempt: 2,
            agent: "k8s1".into(),
            spec: JobSpec {
                script: "make test".into(),
                env: [("GREETING".to_string(), "hi".to_string())].into(),
                resources: Resources {
                    cpus: Some(2),
                    memory_mib: Some(512),
                    gpus: Some(1),
                    ..Resources::default()
                },
                ..Default::default()
            },
            timeout: Duration::from_secs(90),
            dir: PathBuf::from("/work/jobs/job-7-2"),
            run_as: run_as.map(|uid| LocalAccount {
                name: "ci".into(),
                uid: Uid::from_raw(uid),
                gid: Gid::from_raw(uid + 1),
                home: PathBuf::from("/home/ci"),
            }),
            keep_dir: false,
            lease: "l".into(),
            heartbeat_interval_ms: 1000,
            batch: None,
        }
    }

    #[test]
    fn the_job_object_is_confined_and_carries_the_jobs_resources() {
        let object = executor()
            .job_object(&context(Some(1500)), "ghcr.io/o/ci:1")
            .unwrap();
        let json = serde_json::to_value(&object).unwrap();
        let spec = &json["spec"];
        assert_eq!(json["metadata"]["name"], "testbot-0123456789-7-2");
        assert_eq!(json["metadata"]["labels"]["testbot/job"], "7");
        assert_eq!(spec["backoffLimit"], 0);
        assert_eq!(spec["activeDeadlineSeconds"], 90);
        assert_eq!(spec["ttlSecondsAfterFinished"], 3600);
        let pod = &spec["template"]["spec"];
        assert_eq!(
            spec["template"]["metadata"]["labels"]["testbot/attempt"],
            "2"
        );
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["serviceAccountName"], "runner");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["nodeSelector"]["pool"], "ci");
        assert_eq!(pod["terminationGracePeriodSeconds"], 10);
        let security = &pod["securityContext"];
        assert_eq!(security["runAsNonRoot"], true);
        assert_eq!(security["runAsUser"], 1500);
        assert_eq!(security["runAsGroup"], 1501);
        assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
        let container = &pod["containers"][0];
        assert_eq!(container["image"], "ghcr.io/o/ci:1");
        assert_eq!(container["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            container["command"],
            serde_json::json!(["/bin/sh", "-e", "-c", "make test"])
        );
        assert_eq!(
            container["securityContext"]["allowPrivilegeEscalation"],
            false
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["drop"],
            serde_json::json!(["ALL"])
        );
        for side in ["requests", "limits"] {
            let r = &container["resources"][side];
            assert_eq!(
                (&r["cpu"], &r["memory"], &r["nvidia.com/gpu"]),
                (
                    &serde_json::json!("2"),
                    &serde_json::json!("512Mi"),
                    &serde_json::json!("1")
                )
            );
        }
        let env = container["env"].as_array().unwrap();
        assert!(env.contains(&serde_json::json!({"name": "GREETING", "value": "hi"})));
        assert!(env.contains(&serde_json::json!({"name": "TESTBOT_JOB_ID", "value": "7"})));
    }

    #[test]
    fn a_job_with_result_files_gets_a_confined_results_container_without_its_variables() {
        let executor = executor();
        let mut job = context(Some(1500));
        let json =
            serde_json::to_value(executor.job_object(&job, "ghcr.io/o/ci:1").unwrap()).unwrap();
        assert_eq!(
            json["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            1
        );

        job.spec.results = vec!["out/*.xml".into()];
        job.spec.env.insert("TOKEN".into(), "s3cr3t-value".into());
        job.spec.secret_env.push("TOKEN".into());
        let json =
            serde_json::to_value(executor.job_object(&job, "ghcr.io/o/ci:1").unwrap()).unwrap();
        // The agent stops the job at 90 s; Kubernetes only after the grace and the fetch.
        assert_eq!(json["spec"]["activeDeadlineSeconds"], 90 + 10 + 300);
        let containers = json["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        let (job_container, results) = (&containers[0], &containers[1]);
        assert_eq!(results["name"], "results");
        assert_eq!(results["image"], "ghcr.io/o/ci:1");
        assert_eq!(
            results["command"],
            serde_json::json!(["sleep", "2147483647"])
        );
        assert_eq!(results["securityContext"], job_container["securityContext"]);
        assert_eq!(results["volumeMounts"], job_container["volumeMounts"]);
        assert!(results.get("env").is_none(), "{results}");
        assert_eq!(results["resources"]["limits"]["memory"], "32Mi");
        // Its CPU is the job's: the pod asks for the 2 cores the job asked for.
        assert_eq!(results["resources"]["requests"]["cpu"], "50m");
        assert_eq!(job_container["resources"]["requests"]["cpu"], "1950m");
        assert_eq!(job_container["resources"]["limits"]["cpu"], "1950m");
    }

    #[test]
    fn secret_values_are_in_the_jobs_secret_and_not_in_its_pod_spec() {
        let executor = executor();
        let mut job = context(Some(1500));
        assert!(executor.secret_object(&job).is_none());
        job.spec.env.insert("TOKEN".into(), "s3cr3t-value".into());
        job.spec.secret_env.push("TOKEN".into());
        let object =
            serde_json::to_string(&executor.job_object(&job, "ghcr.io/o/ci:1").unwrap()).unwrap();
        assert!(!object.contains("s3cr3t-value"), "{object}");
        assert!(object.contains(r#"{"name":"TOKEN","valueFrom":{"secretKeyRef":{"key":"TOKEN","name":"testbot-0123456789-7-2","optional":false}}}"#), "{object}");
        // A plain variable keeps its value in the spec.
        assert!(
            object.contains(r#"{"name":"GREETING","value":"hi"}"#),
            "{object}"
        );
        let secret = executor.secret_object(&job).unwrap();
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some("testbot-0123456789-7-2")
        );
        assert_eq!(
            secret.string_data,
            Some(BTreeMap::from([(
                "TOKEN".to_string(),
                "s3cr3t-value".to_string()
            )]))
        );
        assert_eq!(secret.metadata.labels, Some(executor.labels(&job)));
    }

    #[test]
    fn a_job_that_would_run_as_root_is_refused() {
        let err = executor()
            .job_object(&context(Some(0)), "ghcr.io/o/ci:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("non-root"), "{err}");
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": status}))
            .unwrap()
    }

    #[test]
    fn pod_states_map_to_what_they_mean_for_the_job() {
        let unschedulable = pod(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient cpu."}],
        }));
        assert_eq!(
            PodView::of(&unschedulable),
            PodView::Waiting("Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.".into())
        );
        let waiting = |reason: &str| {
            pod(
                serde_json::json!({"phase": "Pending", "containerStatuses": [{
                    "name": "job", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": reason, "message": "details"}},
                }]}),
            )
        };
        assert_eq!(
            PodView::of(&waiting("ContainerCreating")),
            PodView::Waiting("ContainerCreating: details".into())
        );
        assert_eq!(
            PodView::of(&waiting("ErrImageNeverPull")),
            PodView::Broken("the container cannot start: ErrImageNeverPull: details".into())
        );
        let terminated = pod(
            serde_json::json!({"phase": "Failed", "containerStatuses": [{
                "name": "job", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            }]}),
        );
        assert_eq!(
            PodView::of(&terminated),
            PodView::Terminated {
                code: 137,
                reason: Some("OOMKilled".into())
            }
        );
        let evicted = pod(serde_json::json!({"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."}));
        assert_eq!(
            PodView::of(&evicted),
            PodView::Broken(
                "the pod failed: Evicted: The node was low on resource: memory.".into()
            )
        );
    }
}
