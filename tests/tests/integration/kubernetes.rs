//! The Kubernetes executor against a real single-node cluster (`tests/kubernetes/start.sh`, which
//! `scripts/test.sh` runs and which sets `KUBECONFIG`, `TESTBOT_KUBE_AGENT_CONFIG`,
//! `TESTBOT_KUBE_NAMESPACE` and `TESTBOT_KUBECTL`). The agent uses the namespaced, RBAC-limited
//! account of `TESTBOT_KUBE_AGENT_CONFIG`; the tests look at the cluster with the cluster's own
//! `kubectl` as its admin. Job
//! pods run the locally built `localhost/testbot-busybox:1` as the unprivileged account the site
//! policy maps jobs to.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testbot_agent::config::ExecutorKind;
use testbot_agent::executor::ContainerExecutor;
use testbot_e2e::{
    AUDIENCE, Fleet, JOB_ACCOUNT, SIXTEEN_LINES, WAIT, ensure_account, refusal, wait_for,
};
use testbot_proto::jobs::{Job, JobSpec, JobState, Resources};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";
const IMAGE: &str = "localhost/testbot-busybox:1";

struct Cluster {
    /// The agent's own kubeconfig (namespaced rights only).
    agent_kubeconfig: PathBuf,
    namespace: String,
}

/// The cluster's own kubectl (its version), as the admin of `KUBECONFIG`.
fn kubectl_path() -> String {
    std::env::var("TESTBOT_KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// Fails at once, with the fix, when the cluster is not running for the tests.
fn cluster() -> Cluster {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: start the test cluster with `eval \"$(tests/kubernetes/start.sh)\"` (scripts/test.sh does)"
            )
        })
    };
    var("KUBECONFIG");
    var("TESTBOT_KUBECTL");
    Cluster {
        agent_kubeconfig: var("TESTBOT_KUBE_AGENT_CONFIG").into(),
        namespace: var("TESTBOT_KUBE_NAMESPACE"),
    }
}

fn policy(issuer: &str, namespace: &str) -> String {
    format!(
        r#"
max_concurrent_jobs = 4
max_runtime = "10m"
env_allow = ["GREETING"]

[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[executors.kubernetes]
max_cpus = 64
default_cpus = 1
max_memory = "256M"
max_time = "5m"
namespace = "{namespace}"
service_account = "testbot-job"
images = ["localhost/testbot-busybox:*", "localhost/testbot-absent:*"]
pull = "never"
max_pending = "6s"

[identity]
default_account = "{JOB_ACCOUNT}"

[[rules]]
name = "lab"
repositories = ["hpc-lab/*"]
refs = ["refs/heads/main"]
events = ["push"]
executors = ["kubernetes"]
"#
    )
}

async fn kubernetes_fleet() -> (Fleet, Cluster, PathBuf) {
    let cluster = cluster();
    ensure_account(JOB_ACCOUNT);
    let fleet = Fleet::start_oidc(|config| {
        config.settings.lease_ttl = Duration::from_secs(20);
        config.settings.heartbeat_interval = Duration::from_millis(500);
    })
    .await;
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    let policy_path = fleet.dir.path().join("policy.toml");
    std::fs::write(
        &policy_path,
        policy(&fleet.issuer().url, &cluster.namespace),
    )
    .unwrap();
    (fleet, cluster, policy_path)
}

fn add_agent(fleet: &mut Fleet, cluster: &Cluster, policy: &Path, name: &str) {
    let mut config = fleet.agent_config(name);
    config.executor = ExecutorKind::Kubernetes;
    config.policy = Some(policy.to_path_buf());
    config.kill_grace = Duration::from_secs(1);
    config.kubernetes.kubeconfig = Some(cluster.agent_kubeconfig.clone());
    fleet.add_agent(config);
}

/// The label value that marks the Jobs of the fleet's agent `name`.
fn instance(fleet: &Fleet, name: &str) -> String {
    ContainerExecutor::instance_of(&testbot_e2e::state_dir_beside(
        &fleet.dir.path().join(format!("agent-{name}")),
    ))
}

fn job(script: &str) -> JobSpec {
    JobSpec {
        script: script.into(),
        executor: Some("kubernetes".into()),
        image: Some(IMAGE.into()),
        ..Default::default()
    }
}

/// `kubectl` as the cluster's admin; its stdout.
/// Runs kubectl, giving each try 30 s: on this single-node cluster an `exec` stream
/// sometimes never ends, which would otherwise hold the test until its global timeout. Every
/// call here is one that may be repeated (reads, `exec touch`, deletes).
fn kubectl(args: &[&str]) -> String {
    use std::io::Read as _;
    const TRY: std::time::Duration = std::time::Duration::from_secs(30);
    for attempt in 1..=3 {
        let mut child = std::process::Command::new(kubectl_path())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl (tests/kubernetes/install.sh installs it)");
        // Read as it writes, so that a large answer cannot fill the pipe and stall kubectl.
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        };
        let stdout = drain(Box::new(child.stdout.take().expect("piped")));
        let stderr = drain(Box::new(child.stderr.take().expect("piped")));
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("kubectl's status") {
                break Some(status);
            }
            if started.elapsed() > TRY {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let (out, err) = (stdout.join().unwrap(), stderr.join().unwrap());
        let Some(status) = status else {
            eprintln!("kubectl {args:?} did not end within {TRY:?} (try {attempt} of 3)");
            continue;
        };
        assert!(status.success(), "kubectl {args:?}: {status}: {out}{err}");
        return out.trim().to_string();
    }
    panic!("kubectl {args:?} did not end in three tries of {TRY:?}");
}

/// The names of the Jobs and pods in `namespace` carrying `selector`.
fn objects(namespace: &str, selector: &str) -> String {
    kubectl(&[
        "get",
        "jobs,pods",
        "--namespace",
        namespace,
        "--selector",
        selector,
        "--output",
        "name",
    ])
}

/// The agent deletes a job's Kubernetes Job (and with it its pod) after reporting its result.
/// (Every test's broker numbers its jobs from 1: the agent's instance tells them apart.)
async fn nothing_left(cluster: &Cluster, fleet: &Fleet, job: &Job) {
    let selector = format!(
        "testbot/agent={},testbot/job={}",
        instance(fleet, "k8s1"),
        job.id
    );
    wait_for(
        "the job's Kubernetes Job and pod to be deleted",
        WAIT,
        || async {
            objects(&cluster.namespace, &selector)
                .is_empty()
                .then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_jobs_run_confined_stream_live_and_report_exit_codes() {
    let (mut fleet, cluster, policy) = kubernetes_fleet().await;
    add_agent(&mut fleet, &cluster, &policy, "k8s1");
    fleet.wait_policy_agents(1).await;
    let uid = nix::unistd::User::from_name(JOB_ACCOUNT)
        .unwrap()
        .unwrap()
        .uid;

    // Success: live output, the mapped uid, no privileges, no API token, a writable workspace.
    let mut ok = job("echo first; id -u; echo \"$GREETING\"; \
         grep -E '^(NoNewPrivs|CapEff)' /proc/self/status | tr -s '\\t ' ' '; \
         if ls /var/run/secrets/kubernetes.io >/dev/null 2>&1; then echo token; else echo no token; fi; \
         pwd; echo made > made; ls -n made | awk '{print \"owner \" $3}'; \
         echo to-stderr >&2; \
         i=0; while [ ! -e /work/go ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; \
         echo last");
    ok.env
        .insert("GREETING".into(), "hello from the pod".into());
    ok.resources = Resources {
        cpus: Some(1),
        memory_mib: Some(64),
        ..Resources::default()
    };
    let submitted = fleet.workflow(REPO).submit(&ok).await.unwrap();
    // The first line arrives while the pod still runs (it waits for a file that appears later).
    let pod = wait_for("the first line while the pod runs", WAIT, || async {
        let job = fleet.client().job(submitted.id).await.unwrap();
        let log = fleet.log(submitted.id).await;
        (log.contains(" O first\n") && job.state == JobState::Running)
            .then(|| job.metadata.get("kubernetes_pod").cloned())
            .flatten()
    })
    .await;
    // The Job as the agent created it.
    let name = format!("testbot-{}-{}-1", instance(&fleet, "k8s1"), submitted.id);
    let spec = kubectl(&[
        "get",
        "job",
        &name,
        "--namespace",
        &cluster.namespace,
        "--output",
        "jsonpath={.spec.backoffLimit} {.spec.activeDeadlineSeconds} \
         {.spec.template.spec.serviceAccountName} {.spec.template.spec.securityContext.runAsNonRoot} \
         {.spec.template.spec.containers[0].resources.limits.cpu} \
         {.spec.template.spec.containers[0].resources.requests.memory}",
    ]);
    assert_eq!(spec, "0 300 testbot-job true 1 64Mi", "{name}");
    kubectl(&[
        "exec",
        "--namespace",
        &cluster.namespace,
        &pod,
        "--",
        "touch",
        "/work/go",
    ]);
    let (done, log) = fleet.finished(&submitted).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    // Kubernetes keeps a pod's stdout and stderr in one log, both as standard output; the
    // engine reads the two pipes apart, so a stderr line may come before stdout lines printed
    // earlier.
    let mut out = testbot_e2e::stdout_lines(&log);
    let stderr_at = out.iter().position(|l| l == "to-stderr");
    assert!(stderr_at.is_some(), "{log}");
    out.remove(stderr_at.unwrap());
    assert_eq!(
        out,
        [
            "first".to_string(),
            uid.to_string(),
            "hello from the pod".into(),
            "CapEff: 0000000000000000".into(),
            "NoNewPrivs: 1".into(),
            "no token".into(),
            "/work".into(),
            format!("owner {uid}"),
            "last".into(),
        ],
        "{log}"
    );
    assert_eq!(
        done.metadata.get("kubernetes_job").map(String::as_str),
        Some(format!("{}/{name}", cluster.namespace).as_str()),
        "{:?}",
        done.metadata
    );
    nothing_left(&cluster, &fleet, &done).await;

    // Failure: the exit code.
    let failing = fleet
        .workflow(REPO)
        .submit(&job("echo failing; exit 3"))
        .await
        .unwrap();
    let (done, log) = fleet.finished(&failing).await;
    assert_eq!(
        (done.state, done.exit_code),
        (JobState::Failed, Some(3)),
        "{log}"
    );
    assert!(log.contains(" O failing\n"), "{log}");

    // Refused before any API call: an image the site does not allow, more CPUs than its cap.
    let mut evil = job("true");
    evil.image = Some("docker.io/library/evil:latest".into());
    let (status, message) = refusal(fleet.workflow(REPO).submit(&evil).await);
    assert_eq!(status, 422);
    assert!(
        message.contains("image docker.io/library/evil:latest is not in allowed images"),
        "{message}"
    );
    let mut greedy = job("true");
    greedy.resources.cpus = Some(65);
    let (status, message) = refusal(fleet.workflow(REPO).submit(&greedy).await);
    assert_eq!(status, 422);
    assert!(
        message.ends_with("resources.cpus 65 is over the cap of 64 for executor kubernetes"),
        "{message}"
    );

    // Cancel: the Job and its pod are deleted.
    let long = fleet
        .workflow(REPO)
        .submit(&job("echo started; sleep 300"))
        .await
        .unwrap();
    wait_for("the long job to print", WAIT, || async {
        fleet
            .log(long.id)
            .await
            .contains(" O started\n")
            .then_some(())
    })
    .await;
    fleet.client().cancel(long.id).await.unwrap();
    let (done, log) = fleet.finished(&long).await;
    assert_eq!(done.state, JobState::Cancelled, "{log}");
    nothing_left(&cluster, &fleet, &done).await;

    // Nothing of the refused jobs ever reached the cluster: only the three that ran had Jobs.
    let selector = format!("testbot/agent={}", instance(&fleet, "k8s1"));
    assert_eq!(objects(&cluster.namespace, &selector), "");
    fleet.stop().await;
}

/// A cap limits every job, not only those that ask: a pod of a job that asks for nothing
/// carries the site's default CPUs and its memory cap as limits.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_that_asks_for_nothing_is_limited_by_the_site_caps() {
    let (mut fleet, cluster, policy) = kubernetes_fleet().await;
    add_agent(&mut fleet, &cluster, &policy, "k8s1");
    fleet.wait_policy_agents(1).await;
    let submitted = fleet
        .workflow(REPO)
        .submit(&job(
            "echo waiting; i=0; while [ ! -e /work/go ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done",
        ))
        .await
        .unwrap();
    let pod = wait_for("the pod to run", WAIT, || async {
        let job = fleet.client().job(submitted.id).await.unwrap();
        let log = fleet.log(submitted.id).await;
        log.contains(" O waiting\n")
            .then(|| job.metadata.get("kubernetes_pod").cloned())
            .flatten()
    })
    .await;
    let resources = kubectl(&[
        "get",
        "pod",
        &pod,
        "--namespace",
        &cluster.namespace,
        "--output",
        "jsonpath={.spec.containers[0].resources.limits.cpu} \
         {.spec.containers[0].resources.limits.memory} \
         {.spec.containers[0].resources.requests.memory}",
    ]);
    kubectl(&[
        "exec",
        "--namespace",
        &cluster.namespace,
        &pod,
        "--",
        "touch",
        "/work/go",
    ]);
    assert_eq!(resources, "1 256Mi 256Mi", "{pod}");
    let (done, log) = fleet.finished(&submitted).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    nothing_left(&cluster, &fleet, &done).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_deadlines_missing_images_unschedulable_pods_and_oom_are_reported() {
    let (mut fleet, cluster, policy) = kubernetes_fleet().await;
    add_agent(&mut fleet, &cluster, &policy, "k8s1");
    fleet.wait_policy_agents(1).await;

    // activeDeadlineSeconds: Kubernetes stops the Job; the result says it timed out.
    let slow = JobSpec {
        timeout_secs: Some(4),
        ..job("echo sleeping; sleep 120")
    };
    let slow = fleet.workflow(REPO).submit(&slow).await.unwrap();
    // An image the site allows but the node does not have (pull policy never).
    let mut absent = job("true");
    absent.image = Some("localhost/testbot-absent:1".into());
    let absent = fleet.workflow(REPO).submit(&absent).await.unwrap();
    // More CPUs than the node has: the scheduler cannot place the pod.
    let mut huge = job("true");
    huge.resources.cpus = Some(64);
    let huge = fleet.workflow(REPO).submit(&huge).await.unwrap();
    // Over the memory limit.
    let hog = JobSpec {
        resources: Resources {
            memory_mib: Some(32),
            ..Resources::default()
        },
        ..job("echo allocating; x=$(head -c 209715200 /dev/zero | tr '\\0' a); echo survived ${#x}")
    };
    let hog = fleet.workflow(REPO).submit(&hog).await.unwrap();

    let (done, log) = fleet.finished(&slow).await;
    assert_eq!(done.state, JobState::Failed, "{log}");
    assert_eq!(done.reason.as_deref(), Some("timed out after 4s"), "{log}");
    assert!(log.contains("DeadlineExceeded"), "{log}");
    assert_eq!(done.cli_exit_code(), 124);

    let (done, log) = fleet.finished(&absent).await;
    assert_eq!(done.state, JobState::Error, "{log}");
    let reason = done.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("ErrImageNeverPull") && reason.contains("localhost/testbot-absent:1"),
        "{reason}\n{log}"
    );

    let (done, log) = fleet.finished(&huge).await;
    assert_eq!(done.state, JobState::Error, "{log}");
    let reason = done.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("did not start within 6s") && reason.contains("Insufficient cpu"),
        "{reason}\n{log}"
    );
    assert!(log.contains("pod waiting: Unschedulable"), "{log}");

    let (done, log) = fleet.finished(&hog).await;
    assert_eq!(done.state, JobState::Failed, "{log}");
    let reason = done.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("out of memory") && reason.contains("memory limit of 32 MiB"),
        "{reason}\n{log}"
    );
    assert!(!log.contains("survived"), "{log}");

    for job in [&slow, &absent, &huge, &hog] {
        nothing_left(&cluster, &fleet, job).await;
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_kubernetes_agent_re_attaches_and_reaps_jobs_it_no_longer_knows() {
    let (fleet, cluster, policy) = kubernetes_fleet().await;
    let instance = instance(&fleet, "k8s1");
    // A Job this agent left behind, for a job it has no record of.
    let stray = format!("testbot-{instance}-999-1");
    let manifest = fleet.dir.path().join("stray.json");
    std::fs::write(
        &manifest,
        serde_json::json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": stray,
                "namespace": cluster.namespace,
                "labels": {"testbot/agent": instance, "testbot/job": "999", "testbot/attempt": "1"},
            },
            "spec": {
                "backoffLimit": 0,
                "template": {"spec": {
                    "restartPolicy": "Never",
                    // As the agent's own pods: a stop takes a second, not the default 30 s.
                    "terminationGracePeriodSeconds": 1,
                    "shareProcessNamespace": true,
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 1000},
                    "containers": [{
                        "name": "job", "image": IMAGE, "imagePullPolicy": "Never",
                        "command": ["sleep", "300"],
                    }],
                }},
            },
        })
        .to_string(),
    )
    .unwrap();
    kubectl(&["create", "--filename", manifest.to_str().unwrap()]);

    let extra = format!(
        "executor = \"kubernetes\"\npolicy = \"{}\"\n[kubernetes]\nkubeconfig = \"{}\"\n",
        policy.display(),
        cluster.agent_kubeconfig.display()
    );
    let mut agent = fleet.spawn_agent("k8s1", &extra);
    // Deleted by the agent: gone, or going (a foreground deletion waits for the pod, which may
    // take the kubelet a while for a pod that was still being created).
    wait_for("the agent to delete the stray Job", WAIT, || async {
        let deleting = kubectl(&[
            "get",
            "jobs",
            "--namespace",
            &cluster.namespace,
            "--selector",
            &format!("testbot/job=999,testbot/agent={instance}"),
            "--output",
            "jsonpath={range .items[*]}{.metadata.name}={.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ]);
        deleting
            .lines()
            .all(|line| !line.ends_with('='))
            .then_some(())
    })
    .await;

    fleet.wait_policy_agents(1).await;
    let submitted = fleet
        .workflow(REPO)
        .submit(&job(SIXTEEN_LINES))
        .await
        .unwrap();
    let (done, _agent) = fleet
        .kill_agent_and_check_reattach(&mut agent, "k8s1", &extra, &submitted)
        .await;
    nothing_left(&cluster, &fleet, &done).await;
    fleet.stop().await;
}

/// Removes what a test put in the cluster or the engine, even when it fails.
struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for command in &self.0 {
            let _ = std::process::Command::new(&command[0])
                .args(&command[1..])
                .output();
        }
    }
}

/// An image holding the `testbot-agent` binary, the libraries it links, the host's CA
/// certificates and account database (the site policy maps jobs to a local account), imported
/// into the test engine.
fn agent_image(dir: &Path, tag: &str) {
    let rootfs = dir.join("agent-image");
    let copy = |from: &Path| {
        let to = rootfs.join(from.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    let binary = testbot_e2e::bin_path("testbot-agent");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::copy(&binary, rootfs.join("testbot-agent")).unwrap();
    let ldd = std::process::Command::new("ldd")
        .arg(&binary)
        .output()
        .unwrap();
    for library in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|word| word.starts_with('/'))
    {
        copy(Path::new(library));
    }
    // The HTTP client loads the system's CA certificates, whatever the broker's URL.
    for file in [
        "/etc/passwd",
        "/etc/group",
        "/etc/nsswitch.conf",
        "/etc/ssl/certs/ca-certificates.crt",
    ] {
        copy(Path::new(file));
    }
    std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
    let tar = dir.join("agent-image.tar");
    let packed = std::process::Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(packed.success());
    let imported = std::process::Command::new("docker")
        .args(["import", "--change", "ENTRYPOINT [\"/testbot-agent\"]"])
        .arg(&tar)
        .arg(tag)
        .output()
        .unwrap();
    assert!(imported.status.success(), "{imported:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_in_a_pod_runs_jobs_with_its_service_account() {
    let (fleet, cluster, policy) = kubernetes_fleet().await;
    let dir = fleet.dir.path();
    let tag = format!("localhost/testbot-agent-test:{}", std::process::id());
    let pod = format!("testbot-agent-test-{}", std::process::id());
    let _cleanup = Cleanup(vec![
        vec![
            kubectl_path(),
            "delete".into(),
            "pod".into(),
            pod.clone(),
            "--namespace".into(),
            cluster.namespace.clone(),
            "--grace-period=5".into(),
            "--wait=true".into(),
            "--ignore-not-found".into(),
        ],
        vec!["docker".into(), "rmi".into(), "--force".into(), tag.clone()],
    ]);
    agent_image(dir, &tag);
    let token_file = dir.join("enrollment.token");
    {
        use secrecy::ExposeSecret as _;
        std::fs::write(&token_file, fleet.enrollment_token.expose_secret()).unwrap();
    }
    // No [kubernetes] table and no kubeconfig in the pod: the agent finds the cluster from the
    // pod's own service account (in-cluster configuration).
    let config = dir.join("agent-pod.toml");
    std::fs::write(
        &config,
        format!(
            "broker_url = \"{}\"\nenrollment_token_file = \"{}\"\nname = \"k8s-pod\"\nwork_dir = \"{}\"\nstate_dir = \"{}\"\npoll_wait = \"5s\"\nkill_grace = \"1s\"\nexecutor = \"kubernetes\"\npolicy = \"{}\"\n",
            fleet.url,
            token_file.display(),
            dir.join("agent-k8s-pod").display(),
            dir.join("agent-k8s-pod-state").display(),
            policy.display()
        ),
    )
    .unwrap();
    let manifest = dir.join("agent-pod.json");
    let path = dir.display().to_string();
    std::fs::write(
        &manifest,
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": cluster.namespace},
            "spec": {
                "serviceAccountName": "testbot-agent",
                "restartPolicy": "Never",
                // The broker and the token issuer listen on the host's loopback; the API server
                // too, and pods here have no cluster network to reach its service address.
                "hostNetwork": true,
                "containers": [{
                    "name": "agent",
                    "image": tag,
                    "imagePullPolicy": "Never",
                    "args": ["run", "--config", config.to_str().unwrap()],
                    "env": [
                        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                        {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
                        {"name": "RUST_LOG", "value": "info"},
                    ],
                    "volumeMounts": [{"name": "fleet", "mountPath": path}],
                }],
                "volumes": [{"name": "fleet", "hostPath": {"path": path, "type": "Directory"}}],
            },
        })
        .to_string(),
    )
    .unwrap();
    kubectl(&["create", "--filename", manifest.to_str().unwrap()]);
    let agent_log = || {
        std::process::Command::new(kubectl_path())
            .args(["logs", "--namespace", &cluster.namespace, &pod])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).to_string())
            .unwrap_or_default()
    };
    let enrolled = tokio::time::timeout(WAIT, fleet.wait_policy_agents(1)).await;
    assert!(
        enrolled.is_ok(),
        "the agent in the pod did not enroll:\n{}",
        agent_log()
    );

    let submitted = fleet
        .workflow(REPO)
        .submit(&job("echo hello from a job of an agent in a pod; id -u"))
        .await
        .unwrap();
    let (done, log) = fleet.finished(&submitted).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}\n{}", agent_log());
    let uid = nix::unistd::User::from_name(JOB_ACCOUNT)
        .unwrap()
        .unwrap()
        .uid;
    assert_eq!(
        testbot_e2e::stdout_lines(&log),
        [
            "hello from a job of an agent in a pod".to_string(),
            uid.to_string()
        ],
        "{log}"
    );
    assert!(
        agent_log().contains("Connected to Kubernetes"),
        "{}",
        agent_log()
    );
    let selector = format!("testbot/agent={}", instance(&fleet, "k8s-pod"));
    wait_for("the agent in the pod to delete its Job", WAIT, || async {
        objects(&cluster.namespace, &selector)
            .is_empty()
            .then_some(())
    })
    .await;
    fleet.stop().await;
}

/// A cluster started by an older `tests/kubernetes/start.sh` gave the agent no rights on
/// Secrets; this grants the rights the current one gives (create, patch, delete and list on
/// secrets in the namespace), as their own Role, when the agent lacks them.
fn grant_secret_rights(cluster: &Cluster) {
    let can = std::process::Command::new(kubectl_path())
        .args(["auth", "can-i", "patch", "secrets", "--as", "testbot-agent"])
        .args(["--namespace", &cluster.namespace])
        .output()
        .unwrap();
    if String::from_utf8_lossy(&can.stdout).trim() == "yes" {
        return;
    }
    let ns = &cluster.namespace;
    let manifest = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "testbot-agent-secrets", "namespace": ns},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch", "delete", "list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "testbot-agent-secrets", "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "testbot-agent-secrets"},
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "testbot-agent"},
                    {"kind": "ServiceAccount", "name": "testbot-agent", "namespace": ns},
                ],
            },
        ],
    });
    let file =
        std::env::temp_dir().join(format!("testbot-secret-rights-{}.json", std::process::id()));
    std::fs::write(&file, manifest.to_string()).unwrap();
    kubectl(&["apply", "--filename", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
}

/// A secret variable reaches the pod's script, but not the Job or pod spec (which anyone who may
/// read pods in the namespace sees) nor the log; the Secret that carries it goes with the Job.
#[tokio::test(flavor = "multi_thread")]
async fn a_kubernetes_job_receives_its_secret_which_stays_out_of_the_pod_spec_and_log() {
    const VALUE: &str = "hello-secret-5b81";
    let (mut fleet, cluster, policy) = kubernetes_fleet().await;
    grant_secret_rights(&cluster);
    add_agent(&mut fleet, &cluster, &policy, "k8s1");
    fleet.wait_policy_agents(1).await;
    let mut spec = job(&format!(
        "echo \"$GREETING\"; echo \"got:$GREETING:end\"; {}; \
         i=0; while [ ! -e /work/go ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done",
        testbot_e2e::check_value("GREETING", VALUE)
    ));
    spec.env.insert("GREETING".into(), VALUE.into());
    spec.secret_env.push("GREETING".into());
    let submitted = fleet.workflow(REPO).submit(&spec).await.unwrap();
    let pod = wait_for("the job to print while its pod runs", WAIT, || async {
        let job = fleet.client().job(submitted.id).await.unwrap();
        let log = fleet.log(submitted.id).await;
        log.contains(" O received whole\n")
            .then(|| job.metadata.get("kubernetes_pod").cloned())
            .flatten()
    })
    .await;
    let name = format!("testbot-{}-{}-1", instance(&fleet, "k8s1"), submitted.id);
    for (kind, object) in [("pod", pod.as_str()), ("job", name.as_str())] {
        let read_back = kubectl(&[
            "get",
            kind,
            object,
            "--namespace",
            &cluster.namespace,
            "--output",
            "json",
        ]);
        assert!(read_back.contains("GREETING"), "{read_back}");
        assert!(!read_back.contains(VALUE), "{kind} {object}: {read_back}");
    }
    kubectl(&[
        "exec",
        "--namespace",
        &cluster.namespace,
        &pod,
        "--",
        "touch",
        "/work/go",
    ]);
    let (done, log) = fleet.finished(&submitted).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    assert_eq!(
        testbot_e2e::stdout_lines(&log),
        ["***", "got:***:end", "received whole"],
        "{log}"
    );
    assert!(!log.contains(VALUE), "{log}");
    nothing_left(&cluster, &fleet, &done).await;
    let selector = format!(
        "testbot/agent={},testbot/job={}",
        instance(&fleet, "k8s1"),
        done.id
    );
    wait_for("the job's Secret to be deleted", WAIT, || async {
        kubectl(&[
            "get",
            "secrets",
            "--namespace",
            &cluster.namespace,
            "--selector",
            &selector,
            "--output",
            "name",
        ])
        .is_empty()
        .then_some(())
    })
    .await;
    fleet.stop().await;
}

/// A JUnit file with one passing and one failing test, written by a job's script to `path`.
fn write_junit(path: &str) -> String {
    format!(
        "mkdir -p \"$(dirname {path})\" && cat > {path} <<'XML'\n\
         <testsuite name=\"pkg\"><testcase classname=\"T\" name=\"ok\"/>\
         <testcase classname=\"T\" name=\"bad\"><failure message=\"no\"/></testcase></testsuite>\n\
         XML"
    )
}

/// A pod's workspace goes with the pod: the result files are fetched from it before, from a job
/// that failed and from one that ran into its time limit, which the agent enforces itself for
/// such a job (here past a script that ignores SIGTERM) so that the workspace is still there.
#[tokio::test(flavor = "multi_thread")]
async fn result_files_are_fetched_from_a_pod_that_failed_and_from_one_stopped_at_its_limit() {
    let (mut fleet, cluster, policy) = kubernetes_fleet().await;
    add_agent(&mut fleet, &cluster, &policy, "k8s1");
    fleet.wait_policy_agents(1).await;

    let failing = JobSpec {
        results: vec!["out/**/*.xml".into(), "coverage/*.xml".into()],
        ..job(&format!(
            "{}\nln -s /etc/passwd out/stolen.xml; echo not-a-result > out/notes.txt; exit 3",
            write_junit("out/unit/junit.xml")
        ))
    };
    // The limit counts from the Job's start, as `activeDeadlineSeconds` does: long enough for
    // the pod to start (the policy's `max_pending` is 6 s) on a busy node.
    let slow = JobSpec {
        timeout_secs: Some(12),
        results: vec!["out/*.xml".into()],
        ..job(&format!(
            "{}\ntrap '' TERM; echo written; sleep 120; echo survived",
            write_junit("out/junit.xml")
        ))
    };
    // One after the other: the single node's two CPUs are shared with the other tests' pods.
    let failing = fleet.workflow(REPO).submit(&failing).await.unwrap();
    let (done, log) = fleet.finished(&failing).await;
    assert_eq!(done.state, JobState::Failed, "{log}");
    assert_eq!(done.exit_code, Some(3), "{log}");
    assert!(log.contains("results: out/unit/junit.xml ("), "{log}");
    assert!(log.contains("2 tests: 1 passed, 1 failed"), "{log}");
    assert!(
        log.contains("results: \"coverage/*.xml\" matched no file"),
        "{log}"
    );
    let results = fleet.client().job_results(failing.id).await.unwrap();
    let paths: Vec<&str> = results.files.iter().map(|f| f.path.as_str()).collect();
    // The link is not a regular file in the pod: not fetched, so never read.
    assert_eq!(paths, ["out/unit/junit.xml"], "{log}");
    assert_eq!((results.totals.cases, results.totals.failed), (2, 1));

    let slow = fleet.workflow(REPO).submit(&slow).await.unwrap();
    let (done, log) = fleet.finished(&slow).await;
    assert_eq!(done.state, JobState::Failed, "{log}");
    assert_eq!(done.reason.as_deref(), Some("timed out after 12s"), "{log}");
    assert!(
        log.contains("timed out after 12s: the agent stopped the job's container"),
        "{log}"
    );
    assert!(
        log.contains("written") && !log.contains("survived"),
        "{log}"
    );
    let results = fleet.client().job_results(slow.id).await.unwrap();
    let paths: Vec<&str> = results.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["out/junit.xml"], "{log}");
    assert_eq!((results.totals.cases, results.totals.failed), (2, 1));

    for job in [&failing, &slow] {
        nothing_left(&cluster, &fleet, job).await;
    }
    fleet.stop().await;
}
