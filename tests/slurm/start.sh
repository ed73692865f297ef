#!/usr/bin/env bash
# Starts a real single-node Slurm (slurmctld + slurmd, node "localhost") on loopback, idempotently.
#
#   tests/slurm/start.sh [STATE_DIR]        (default STATE_DIR: /var/tmp/testbot-slurm)
#   eval "$(tests/slurm/start.sh)"          (sets SLURM_CONF in the calling shell)
#
# Progress and errors go to stderr; stdout gets exactly one line, the last one:
#   export SLURM_CONF=STATE_DIR/etc/slurm.conf
# Running it again while the daemons run is a no-op (it re-checks that the node is idle).
# Needs root and the packages from install.sh. Stop with stop.sh STATE_DIR.
set -euo pipefail

STATE_DIR=${1:-/var/tmp/testbot-slurm}
WAIT_SECS=${TESTBOT_SLURM_WAIT_SECS:-30}

log() { echo "start.sh: $*" >&2; }
die() { echo "start.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (slurmctld/slurmd run as root here)"
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)
case "$STATE_DIR" in *[[:space:]]*) die "STATE_DIR must not contain whitespace: $STATE_DIR" ;; esac

# Every Slurm command (even `sinfo`, `scontrol -V`) must see SLURM_CONF: without a config file Slurm
# looks controller names up through DNS, which must never happen here.
CONF=$STATE_DIR/etc/slurm.conf
export SLURM_CONF=$CONF

for cmd in slurmctld slurmd sinfo scontrol munged munge unmunge; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] ||
        die "$cmd not found: run tests/slurm/install.sh first"
done
SLURMCTLD=$(command -v slurmctld || echo /usr/sbin/slurmctld)
SLURMD=$(command -v slurmd || echo /usr/sbin/slurmd)
MUNGED=$(command -v munged || echo /usr/sbin/munged)

RUN=$STATE_DIR/run
LOGS=$STATE_DIR/log
# World-readable/traversable: jobs submitted as another user (runuser -u testbot-job -- sbatch)
# must be able to read slurm.conf.
mkdir -p "$STATE_DIR/etc" "$STATE_DIR/spool/ctld" "$STATE_DIR/spool/d" "$RUN" "$LOGS"
chmod 0755 "$STATE_DIR" "$STATE_DIR/etc" "$STATE_DIR/spool" "$RUN" "$LOGS"
chmod 0700 "$STATE_DIR/spool/ctld"
# slurmd keeps each job's batch script under its spool directory; the job's user (not root)
# must be able to reach it, as with Slurm's default /var/spool/slurmd.
chmod 0755 "$STATE_DIR/spool/d"

# pid_alive PIDFILE COMM: prints the PID and succeeds when PIDFILE names a live process whose
# command name is COMM (guards against a stale pid file whose PID was reused).
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    echo "$pid"
}

# ---------------------------------------------------------------- munge
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PIDFILE=/run/munge/munged.pid
MUNGE_OURS=$RUN/munged.started-by-us

if [ ! -s "$MUNGE_KEY" ]; then
    log "creating $MUNGE_KEY"
    install -d -o munge -g munge -m 0700 /etc/munge
    (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
fi

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

if ! munge_ok; then
    if pid=$(pid_alive "$MUNGE_PIDFILE" munged); then
        die "munged (pid $pid) runs but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
    fi
    log "starting munged"
    install -d -o munge -g munge -m 0755 /run/munge
    # --origin: no hostname lookup for the credential's origin address.
    runuser -u munge -- "$MUNGED" --origin=127.0.0.1 ||
        die "munged failed to start; tail of /var/log/munge/munged.log:
$(tail -n 20 /var/log/munge/munged.log 2>&1)"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || die "munged started but 'munge -n | unmunge' fails"
    # Remember that we started it, so that stop.sh stops it (and only then).
    pid_alive "$MUNGE_PIDFILE" munged >"$MUNGE_OURS" || rm -f "$MUNGE_OURS"
fi

# ---------------------------------------------------------------- slurm.conf
NCPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)
# A bit under the machine's memory (slurmd drains a node that has less than RealMemory), capped
# at 4096 MB: tests can ask for --mem up to that; more is refused at submit.
REAL_MEM=$((MEM_MB * 9 / 10))
[ "$REAL_MEM" -gt 4096 ] && REAL_MEM=4096
[ "$REAL_MEM" -lt 100 ] && die "too little memory for a Slurm node: ${MEM_MB} MB"

new_conf=$(cat <<EOF
# Written by tests/slurm/start.sh: a single-node Slurm on loopback for testbot's tests.
ClusterName=testbot
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/spool/ctld
SlurmdSpoolDir=$STATE_DIR/spool/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$NCPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=batch Nodes=localhost Default=NO MaxTime=10 State=UP
EOF
)

conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    conf_changed=1
    printf '%s\n' "$new_conf" >"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
fi

# ---------------------------------------------------------------- daemons
ctld_pid=$(pid_alive "$RUN/slurmctld.pid" slurmctld || true)
d_pid=$(pid_alive "$RUN/slurmd.pid" slurmd || true)

if [ -n "$ctld_pid" ] && [ -n "$d_pid" ] && [ "$conf_changed" = 1 ]; then
    log "WARNING: slurm.conf changed while the daemons run; restart with stop.sh + start.sh"
fi

# Ports taken by anything but our own daemons (another Slurm, another state dir): say so.
port_owner() { # PORT -> the listener line from ss, if any (without ss: nothing; the daemon's own
    # "Address already in use" error then shows in the log tail)
    command -v ss >/dev/null 2>&1 || return 0
    ss -Hltnp "sport = :$1" 2>/dev/null | head -n 1 || true
}
check_port() { # PORT NAME OURPID
    local line
    line=$(port_owner "$1")
    [ -z "$line" ] && return 0
    if [ -n "$3" ] && printf '%s' "$line" | grep -q "pid=$3,"; then return 0; fi
    die "port $1 ($2) is already in use, probably by another Slurm (another STATE_DIR or a system
slurm). Stop it first (its own stop.sh / pid file). Listener: $line"
}
[ -n "$ctld_pid" ] || check_port 6817 slurmctld ""
[ -n "$d_pid" ] || check_port 6818 slurmd ""

logtail() {
    local f
    for f in "$LOGS/slurmctld.log" "$LOGS/slurmd.log"; do
        echo "---- tail of $f:"
        tail -n 25 "$f" 2>/dev/null || echo "(missing)"
    done
}

# wait_pid PIDFILE COMM WHAT: waits (bounded) for the daemon's pid file.
wait_pid() {
    for _ in $(seq 100); do
        pid_alive "$1" "$2" >/dev/null && return 0
        sleep 0.1
    done
    die "$3 did not start (no live pid in $1)
$(logtail)"
}

if [ -z "$ctld_pid" ]; then
    log "starting slurmctld"
    rm -f "$RUN/slurmctld.pid"
    "$SLURMCTLD" -f "$CONF" >>"$LOGS/slurmctld.stdout" 2>&1 ||
        die "slurmctld exited with status $?
$(tail -n 20 "$LOGS/slurmctld.stdout" 2>/dev/null)
$(logtail)"
    wait_pid "$RUN/slurmctld.pid" slurmctld slurmctld
fi
if [ -z "$d_pid" ]; then
    log "starting slurmd"
    rm -f "$RUN/slurmd.pid"
    # The node is called "localhost", not the machine's hostname: name it.
    "$SLURMD" -f "$CONF" -N localhost >>"$LOGS/slurmd.stdout" 2>&1 ||
        die "slurmd exited with status $?
$(tail -n 20 "$LOGS/slurmd.stdout" 2>/dev/null)
$(logtail)"
    wait_pid "$RUN/slurmd.pid" slurmd slurmd
fi

# ---------------------------------------------------------------- wait for an idle node
deadline=$((SECONDS + WAIT_SECS))
state=""
while :; do
    # One line per partition; all must say idle (mixed/allocated are fine too on a re-run with
    # jobs, but a fresh start must reach idle).
    state=$(sinfo -h -o %T 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ $//') || true
    case "$state" in
        idle|mixed|allocated) break ;;
    esac
    if [ "$SECONDS" -ge "$deadline" ]; then
        die "Slurm node not idle after ${WAIT_SECS}s (sinfo state: '${state:-no answer}')
$(logtail)"
    fi
    sleep 0.2
done
[ "$state" = idle ] || log "node state: $state (jobs running)"

echo "export SLURM_CONF=$CONF"
