#!/usr/bin/env bash
# Checks a cluster from start.sh the way the CI agent uses it, with kubectl as testbot-agent:
# a Job's logs stream live, its failure and exit code show, RBAC stops the agent elsewhere,
# unschedulable / deadline / missing-image Jobs report as expected, and a foreground delete
# removes the pods. Leaves nothing behind in the namespace. Takes about 20-30 s.
#
#   eval "$(tests/kubernetes/start.sh)" && tests/kubernetes/smoke-test.sh
#
# Needs the variables start.sh exports and the image localhost/testbot-busybox:1 from
# tests/containers/start.sh.
set -euo pipefail

CACHE_DIR=${TESTBOT_KUBERNETES_CACHE_DIR:-/var/cache/testbot-kubernetes}
KUBECTL=$CACHE_DIR/v1.20.2/bin/kubectl
IMAGE=localhost/testbot-busybox:1
: "${TESTBOT_KUBE_AGENT_CONFIG:?run eval \"\$(tests/kubernetes/start.sh)\" first}"
: "${TESTBOT_KUBE_NAMESPACE:?run eval \"\$(tests/kubernetes/start.sh)\" first}"
NS=$TESTBOT_KUBE_NAMESPACE

log() { echo "smoke-test.sh: [${SECONDS}s] $*" >&2; }
fail() { echo "smoke-test.sh: FAILED: $*" >&2; exit 1; }
agent() { "$KUBECTL" --kubeconfig "$TESTBOT_KUBE_AGENT_CONFIG" --request-timeout=20s "$@"; }

# job NAME SCRIPT [JOB-SPEC-LINES] [CONTAINER-LINES] [IMAGE]: a Job manifest the way the agent
# makes one (non-root, no privilege escalation, no API token, local image only).
job() {
    cat <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: $1
  labels: {app: testbot-smoke}
spec:
  backoffLimit: 0
${3:-}
  template:
    metadata:
      labels: {app: testbot-smoke}
    spec:
      restartPolicy: Never
      serviceAccountName: testbot-job
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: 2
      securityContext: {runAsNonRoot: true, runAsUser: 1000, runAsGroup: 1000}
      containers:
      - name: job
        image: ${5:-$IMAGE}
        imagePullPolicy: Never
        command: [sh, -c, '$2']
        securityContext: {allowPrivilegeEscalation: false}
${4:-}
EOF
}

# until_true SECS WHAT COMMAND...: runs COMMAND (a function: it is run again each time) until it
# succeeds.
until_true() {
    local end=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        [ "$SECONDS" -lt "$end" ] || fail "timed out waiting for $what"
        sleep 0.3
    done
}
# get KIND NAME-OR-SELECTOR JSONPATH: prints one field (empty when missing).
get() {
    case "$2" in
        *=*) agent -n "$NS" get "$1" -l "$2" -o "jsonpath={.items[0]$3}" 2>/dev/null || true ;;
        *) agent -n "$NS" get "$1" "$2" -o "jsonpath={$3}" 2>/dev/null || true ;;
    esac
}
# is KIND NAME-OR-SELECTOR JSONPATH VALUE
is() { [ "$(get "$1" "$2" "$3")" = "$4" ]; }
none_left() { [ -z "$(agent -n "$NS" get jobs,pods -l app=testbot-smoke -o name 2>/dev/null)" ]; }
started() { # SELECTOR: the pod's container runs or ran
    [ -n "$(get pods "$1" '.status.containerStatuses[0].state.running')$(get pods "$1" '.status.containerStatuses[0].state.terminated')" ]
}

cleanup() { agent -n "$NS" delete jobs -l app=testbot-smoke --cascade=foreground --wait=false >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
until_true 30 "the previous smoke jobs to go" none_left

# 1. logs follow live; the Job fails; the exit code shows.
# shellcheck disable=SC2016 # $i belongs to the job's shell
job smoke-exit3 'sleep 2; for i in 1 2 3; do echo line $i; sleep 1; done; exit 3' | agent -n "$NS" create -f - >/dev/null
t0=$EPOCHREALTIME
stamps=()
until_true 30 "the pod of smoke-exit3 to start" started job-name=smoke-exit3
while IFS= read -r line; do
    stamps+=("$(awk -v a="$EPOCHREALTIME" -v b="$t0" 'BEGIN { printf "%.2f", a - b }'):$line")
done < <(agent -n "$NS" logs -f job/smoke-exit3)
[ "${#stamps[@]}" = 3 ] || fail "expected 3 log lines, got: ${stamps[*]}"
spread=$(awk -v a="${stamps[0]%%:*}" -v b="${stamps[2]%%:*}" 'BEGIN { print (b - a >= 1.5) ? "live" : "batched" }')
[ "$spread" = live ] || fail "log lines did not stream live: ${stamps[*]}"
log "ok: logs -f streamed live (${stamps[*]})"
until_true 30 "smoke-exit3 to fail" is job smoke-exit3 '.status.conditions[?(@.type=="Failed")].status' True
code=$(get pods job-name=smoke-exit3 '.status.containerStatuses[0].state.terminated.exitCode')
[ "$code" = 3 ] || fail "exit code $code, expected 3"
log "ok: Job failed (reason $(get job smoke-exit3 '.status.conditions[?(@.type=="Failed")].reason')), container exit code 3"

# 2. RBAC: nothing cluster-wide, nothing in another namespace, no pods of its own.
forbidden() { # WHAT COMMAND...
    local out
    if out=$("${@:2}" 2>&1); then fail "agent could $1"; fi
    grep -q Forbidden <<<"$out" || fail "$1: expected Forbidden, got: $out"
}
forbidden "list nodes" agent get nodes
forbidden "create a Job in default" agent -n default create -f <(job smoke-elsewhere true)
forbidden "create a pod" agent -n "$NS" run smoke-pod --image="$IMAGE" --restart=Never
forbidden "read secrets" agent -n "$NS" get secrets
log "ok: RBAC forbids nodes, other namespaces, pods and secrets"

# 3. unschedulable, 4. deadline, 5. missing image.
job smoke-big true '' '        resources: {requests: {cpu: "64"}}' | agent -n "$NS" create -f - >/dev/null
job smoke-deadline 'sleep 60' '  activeDeadlineSeconds: 2' | agent -n "$NS" create -f - >/dev/null
job smoke-noimage true '' '' localhost/testbot-does-not-exist:1 | agent -n "$NS" create -f - >/dev/null
until_true 30 "smoke-big's pod to be unschedulable" \
    is pods job-name=smoke-big '.status.conditions[?(@.type=="PodScheduled")].reason' Unschedulable
log "ok: unschedulable: $(get pods job-name=smoke-big '.status.conditions[?(@.type=="PodScheduled")].message')"
until_true 30 "smoke-deadline to fail with DeadlineExceeded" \
    is job smoke-deadline '.status.conditions[?(@.type=="Failed")].reason' DeadlineExceeded
log "ok: activeDeadlineSeconds: Job failed with reason DeadlineExceeded"
until_true 30 "smoke-noimage to report ErrImageNeverPull" \
    is pods job-name=smoke-noimage '.status.containerStatuses[0].state.waiting.reason' ErrImageNeverPull
log "ok: missing image: waiting reason ErrImageNeverPull"

# 6. foreground delete removes the pods before the Job.
agent -n "$NS" delete jobs -l app=testbot-smoke --cascade=foreground >/dev/null
until_true 30 "the smoke pods to go" none_left
log "ok: foreground delete removed the Jobs and their pods"
log "all checks passed"
