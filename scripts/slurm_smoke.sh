#!/usr/bin/env bash
# Slurm smoke test: a real single-node Slurm (Debian's slurm-wlm 22.05 and munge) runs the batch jobs that the
# plans' SLURM environments submit, as OpenMOLE v22.1 and gridscale 62942ee68b write them (the #SBATCH script,
# SharedStorage's run script, run.sh's environment; tests/openmole/slurm.py cites each line), around the point's
# real task with a recording `apptainer` stand-in. Everything is read from openmole/*.oms when it runs.
#
#   scripts/slurm_smoke.sh [--keep] [--points gpu,gpu-bounded,gpu-memory,control,cpu] [--timeout S] [-- ARGS]
#
# (ARGS go to `python -m openmole.slurm smoke`, e.g. `--points train-at-bound -- --train-bound-mb 600`.)
# Points (a tiny cohort: 4 patients, 64-px tiles; epochs 1, max_train_tiles 64):
#   gpu          slurm-gpu as the plans have it: directives accepted (-p, --mem, --cpus-per-task, --time, -D,
#                --gres), JobState COMPLETED, CUDA_VISIBLE_DEVICES from Slurm reaches the container, a variable of
#                the submitting shell does not (--cleanenv), exit code 0, metrics.json back, the parse task: ok
#   gpu-bounded  the job's memory scaled down so that the plan's own bound (ulimit -d) is 2 GB: the training fits
#   gpu-memory   the same, plus a stand-in allocation past the job's memory in the point's Python: the point fails
#                by itself (non-zero exit code, a failed row) and the job ends COMPLETED, not OUT_OF_MEMORY
#   control      gpu-memory without the bound: the cgroup's OOM killer fires and the job ends OUT_OF_MEMORY,
#                the state gridscale's translateStatus does not know (so the check above means something)
#   cpu          slurm (the ContainerTask path): directives, COMPLETED, exit code 0, status ok
# One `PASS <check>: <figures>` or `FAIL <check>: <figures>` line per check; exit status 1 if any FAIL, 77 (skipped,
# with a `SKIP` line) when this machine cannot run it: not root, no mount namespaces, slurm-wlm/munge neither
# installed nor installable, or the daemons do not start.
#
# Nothing outside its work folder is changed: munge runs with its own key and socket, Slurm reads its
# configuration from SLURM_CONF (slurm.conf, cgroup.conf and gres.conf in the work folder; /etc/slurm is not read
# or written and is checked unchanged at the end), on free ports, and the daemons it started are stopped by pid.
# Installing the packages (apt-get, when missing) is the only lasting change.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PY="$REPO/.venv/bin/python"
KEEP=0
POINTS=""
TIMEOUT=300
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --points) POINTS="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "slurm_smoke: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

T0=$(date +%s)
skip() { echo "SKIP slurm_smoke: $*"; exit 77; }
say() { printf '== %s (%d s)\n' "$*" "$(( $(date +%s) - T0 ))"; }

[ "$(id -u)" = 0 ] || skip "needs root (munged, slurmd and its cgroups, the stand-in's mount namespaces)"
[ -x "$PY" ] || skip "$PY not found: run the README's set-up command first"
reason=$(PYTHONPATH="$REPO/tests" "$PY" -c 'from openmole.engine import namespaces_available as n; print(n() or "")')
[ -z "$reason" ] || skip "the apptainer stand-in $reason"

# ------------------------------------------------------------------------------------------------ packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || skip "slurm-wlm and munge are not installed, and there is no apt-get"
  say "apt-get install slurm-wlm munge"
  log=$(mktemp /tmp/slurm-smoke-apt.XXXXXX)
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 300 apt-get install -y -q slurm-wlm munge >"$log" 2>&1; then
    timeout 180 apt-get update -q >>"$log" 2>&1 || true
    timeout 300 apt-get install -y -q slurm-wlm munge >>"$log" 2>&1 \
      || { tail -3 "$log"; rm -f "$log"; skip "apt-get install slurm-wlm munge failed (no network?)"; }
  fi
  rm -f "$log"
fi
echo "$(slurmctld -V), $(munged --version 2>&1 | head -1)"

# ------------------------------------------------------------------------------------------------ work folder
snapshot() { for d in /etc/slurm /etc/munge; do [ -e "$d" ] && find "$d" -xdev -printf '%p %m %u %s %T@\n'; done | sort; }
ETC_BEFORE=$(snapshot)
WORK=$(mktemp -d /tmp/slurm-smoke.XXXXXX)
chmod 755 "$WORK"  # munged runs as munge and must reach its folder
mkdir -p "$WORK"/{etc,log,state,spool,munge,dev,plans,"cluster data"}
CGROUPS_BEFORE=$(ls -d /sys/fs/cgroup/*/slurm 2>/dev/null || true)

stop_pid() {  # stop_pid PID: SIGTERM, then SIGKILL after 15 s
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT
  set +e +o pipefail  # clean up whatever fails
  if [ -f "$WORK/etc/slurm.conf" ] && [ -f "$WORK/slurmctld.pid" ]; then
    SLURM_CONF="$WORK/etc/slurm.conf" timeout 20 squeue -h -o %i 2>/dev/null \
      | xargs -r env SLURM_CONF="$WORK/etc/slurm.conf" timeout 20 scancel 2>/dev/null || true
  fi
  for f in "$WORK/slurmd.pid" "$WORK/slurmctld.pid" "$WORK/munge/munged.pid"; do
    [ -s "$f" ] && stop_pid "$(cat "$f")"
  done
  # a cancelled job's emulated container may leave its launcher behind (engine.run_isolated)
  grep -l -F "$WORK" /tmp/om-launch.* 2>/dev/null | xargs -r rm -f || true
  # the cgroups slurmd made (cgroup/v1: <controller>/slurm/uid_0/...), when there were none before
  for c in /sys/fs/cgroup/*/slurm; do
    [ -d "$c" ] || continue
    grep -qxF "$c" <<<"$CGROUPS_BEFORE" && continue
    find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  if [ "$(snapshot)" = "$ETC_BEFORE" ]; then echo "PASS /etc/slurm and /etc/munge unchanged"
  else echo "FAIL /etc/slurm or /etc/munge changed:"; diff <(echo "$ETC_BEFORE") <(snapshot) || true; rc=1; fi
  if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
  echo "slurm_smoke: $(( $(date +%s) - T0 )) s, exit $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail_start() {  # fail_start WHAT: the daemons cannot run here: show why, skip
  echo "--- logs"; tail -5 "$WORK"/log/*.log "$WORK/munge/munged.log" 2>/dev/null || true
  exit 77
}

# ------------------------------------------------------------------------------------------------ munge
say "munged (own key and socket)"
chown munge: "$WORK/munge"
chmod 755 "$WORK/munge"  # munged: the socket's folder must be searchable by all
if command -v mungekey >/dev/null; then
  runuser -u munge -- mungekey --create --keyfile="$WORK/munge/munge.key"
else
  dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
  chown munge: "$WORK/munge/munge.key"
  chmod 400 "$WORK/munge/munge.key"
fi
SOCKET="$WORK/munge/munge.socket.2"
runuser -u munge -- /usr/sbin/munged --socket="$SOCKET" --key-file="$WORK/munge/munge.key" \
  --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" --seed-file="$WORK/munge/munged.seed" \
  || { echo "SKIP slurm_smoke: munged did not start"; fail_start; }
munge -n -S "$SOCKET" | unmunge -S "$SOCKET" | grep -q 'STATUS: *Success' \
  || { echo "SKIP slurm_smoke: munge -n | unmunge failed"; fail_start; }

# ------------------------------------------------------------------------------------------------ slurm
say "slurmctld and slurmd (SLURM_CONF=$WORK/etc/slurm.conf)"
HOST=$(hostname -s)
read -r CTLD_PORT SLURMD_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
GPU_DEVICE="$WORK/dev/nvidia0"  # a stand-in device file: Slurm sets CUDA_VISIBLE_DEVICES for --gres=gpu:1
mknod "$GPU_DEVICE" c 195 0 2>/dev/null || GPU_DEVICE=/dev/tty0
export SLURM_CONF="$WORK/etc/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=smoke
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
JobAcctGatherType=jobacct_gather/cgroup
JobAcctGatherParams=NoOverMemoryKill
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
FirstJobId=$(( (RANDOM << 4) + 1000 ))
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=32 RealMemory=128000 Gres=gpu:1 State=UNKNOWN
PartitionName=gpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
cat >"$WORK/etc/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
ConstrainRAMSpace=yes
ConstrainSwapSpace=yes
AllowedSwapSpace=0
EOF
echo "NodeName=$HOST Name=gpu File=$GPU_DEVICE" >"$WORK/etc/gres.conf"
/usr/sbin/slurmctld -i || { echo "SKIP slurm_smoke: slurmctld did not start"; fail_start; }
/usr/sbin/slurmd || { echo "SKIP slurm_smoke: slurmd did not start"; fail_start; }
for _ in $(seq 60); do
  [ "$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1)" = idle ] && break
  sleep 0.5
done
[ "$(sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1)" = idle ] \
  || { echo "SKIP slurm_smoke: the node is not idle: $(sinfo 2>&1 | tail -2)"; fail_start; }
sinfo -o '%P %t %c %m %G' | sed 's/^/  /'

# ------------------------------------------------------------------------------------------------ the cohort
say "tiny cohort (synth, extract, split) and the plans"
{
  "$PY" -m python_task synth --out "$WORK/cohort" --patients 4 --slide-size 2048 --seed 11
  "$PY" -m python_task extract --cohort "$WORK/cohort/cohort.csv" --out "$WORK/cluster data/shards" \
    --tile-size 64 --mpp 1.0
  "$PY" -m python_task split --shards "$WORK/cluster data/shards" --folds 2 --out "$WORK/plans/splits.json"
} >"$WORK/log/data.log" 2>&1 || { tail -5 "$WORK/log/data.log"; echo "FAIL cohort: see above"; exit 1; }
cp openmole/*.oms "$WORK/plans/"
echo "a SIF stands here" >"$WORK/cluster data/python-task-gpu.sif"

# ------------------------------------------------------------------------------------------------ the points
say "points"
args=(smoke --work "$WORK" --plans "$WORK/plans" --cluster-data "$WORK/cluster data" --timeout "$TIMEOUT")
[ -z "$POINTS" ] || args+=(--points "$POINTS")
args+=("${EXTRA[@]}")
fails=0
KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$REPO/tests" "$PY" -m openmole.slurm "${args[@]}" \
  || fails=$?
[ "$fails" = 0 ] || { echo "--- slurmd log"; grep -E 'error|oom|OOM' "$WORK/log/slurmd.log" | tail -5 || true; exit 1; }
