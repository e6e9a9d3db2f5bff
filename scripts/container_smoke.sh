#!/usr/bin/env bash
# Container smoke test: build the project's image with podman, then run inside it, exactly as OpenMOLE's
# ContainerTask would, one successful and one failing point of openmole/sweep.oms on a tiny synthetic cohort.
#
#   scripts/container_smoke.sh [--standin] [--ca-bundle FILE] [--workdir DIR] [--keep]
#
# Each point runs the `_run_commands.sh` that OpenMOLE generates for it (rendered by tests/openmole/engine.py
# from the plans and the built image's own Env: the train command, `; _PROCESS_RET_CODE_=$? ; true`, the copy of
# /out into /_result_/<uuid>/, `exit $_PROCESS_RET_CODE_`), with the same binds (/data/shards, /data/splits.json,
# /out, /_result_, /_run_commands.sh), as uid 1234 (not the image's 1000) and with --network none. It checks that
# /out comes back, that the exit code is train's, and that the model is dropped.
#
# Needs: podman (Debian: apt-get install podman runc), and this checkout's .venv (for the cohort and the script).
#   --standin        the base image python:3.11.13-slim-bookworm cannot be pulled here: make a stand-in with
#                    debootstrap (bookworm, python3.11, the official image's /usr/local/bin paths) and tag it with
#                    the base image's name, so the Dockerfile builds unchanged (needs debootstrap).
#   --ca-bundle FILE behind a TLS-intercepting proxy: give pip in the build this CA bundle, mounted for the build
#                    only (nothing of it is baked into the image).
#   --workdir DIR    where the cohort, the rendered scripts and the results go (default: a new temporary folder).
#   --keep           keep the work folder and the image.
# podman runs with runc when it is installed (crun refuses hosts with hybrid cgroups) and with rlimits that fit
# under a container's hard limits.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PY="$REPO/.venv/bin/python"
BASE_IMAGE="docker.io/library/python:3.11.13-slim-bookworm"
IMAGE="python-task:smoke"
RUN_UID="1234:1234"
STANDIN=0
CA_BUNDLE=""
WORK=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --standin) STANDIN=1 ;;
    --ca-bundle) CA_BUNDLE="$2"; shift ;;
    --workdir) WORK="$2"; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "container_smoke: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

command -v podman >/dev/null || { echo "container_smoke: podman not found (apt-get install podman runc)" >&2; exit 2; }
[ -x "$PY" ] || { echo "container_smoke: $PY not found: run the README's set-up command first" >&2; exit 2; }
PODMAN=(podman)
command -v runc >/dev/null && PODMAN+=(--runtime runc)
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
[ -n "$WORK" ] || WORK=$(mktemp -d /tmp/container-smoke.XXXXXX)
mkdir -p "$WORK"
umask 022
say() { printf '\n== %s\n' "$*"; }
cleanup() { if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; "${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------ base image
if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
  if [ "$STANDIN" = 1 ]; then
    say "stand-in for $BASE_IMAGE (debootstrap bookworm)"
    ROOTFS="$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$ROOTFS" >"$WORK/debootstrap.log" 2>&1
    chroot "$ROOTFS" apt-get install -y -qq python3.11 python3.11-venv python3-pip ca-certificates netbase tzdata \
      >>"$WORK/debootstrap.log" 2>&1
    chroot "$ROOTFS" apt-get clean
    for n in python python3 python3.11; do ln -sf /usr/bin/python3.11 "$ROOTFS/usr/local/bin/$n"; done
    ln -sf /usr/bin/pip3 "$ROOTFS/usr/local/bin/pip"
    tar -C "$ROOTFS" -c . | "${PODMAN[@]}" import \
      --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
    rm -rf "$ROOTFS"
  else
    "${PODMAN[@]}" pull "$BASE_IMAGE" || {
      echo "container_smoke: cannot pull $BASE_IMAGE; rerun with --standin to build a stand-in" >&2; exit 1; }
  fi
fi

# ------------------------------------------------------------------------------------------------ build
say "build $IMAGE (plain build: the CPU image, no --build-arg)"
BUILD_MOUNTS=()
if [ -n "$CA_BUNDLE" ]; then
  printf '[global]\ncert = /etc/ssl/host-ca.crt\n' >"$WORK/pip.conf"
  BUILD_MOUNTS=(-v "$(realpath "$CA_BUNDLE"):/etc/ssl/host-ca.crt:ro" -v "$WORK/pip.conf:/etc/pip.conf:ro")
fi
start=$(date +%s)
"${PODMAN[@]}" build --pull=never --network host "${LIMITS[@]}" "${BUILD_MOUNTS[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; echo "container_smoke: build failed (log: $WORK/build.log)" >&2; exit 1; }
echo "built in $(( $(date +%s) - start )) s, $("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Size}}' \
  | awk '{printf "%.2f GB", $1 / 1e9}')"
"${PODMAN[@]}" image inspect "$IMAGE" --format '{{json .Config.Env}}' >"$WORK/image-env.json"
echo "image user: $("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Config.User}}'), workdir: \
$("${PODMAN[@]}" image inspect "$IMAGE" --format '{{.Config.WorkingDir}}')"

# ------------------------------------------------------------------------------------------------ data
say "tiny cohort: synth, extract, split (as this user, umask 022)"
"$PY" -m python_task synth --out "$WORK/cohort" --patients 4 --slide-size 2048 --seed 11 >"$WORK/data.log" 2>&1
"$PY" -m python_task extract --cohort "$WORK/cohort/cohort.csv" --out "$WORK/plans/shards" --tile-size 64 \
  --mpp 1.0 >>"$WORK/data.log" 2>&1
"$PY" -m python_task split --shards "$WORK/plans/shards" --folds 2 --out "$WORK/plans/splits.json" >>"$WORK/data.log" 2>&1
cp openmole/*.oms "$WORK/plans/"
stat -c '%A %U:%G %n' "$WORK/plans/splits.json" "$WORK/plans/shards/manifest.csv" "$WORK/plans/shards/"*.h5 | head -3

# ------------------------------------------------------------------------------------------------ points
run_point() {  # name expected_code KEY=VALUE...
  local name=$1 expected=$2; shift 2
  local root="$WORK/point-$name"
  mkdir -p "$root"
  local binds
  binds=$(PYTHONPATH="$REPO/tests" "$PY" -m openmole.engine render sweep.oms "$WORK/plans" "$root" \
    --image-env "$WORK/image-env.json" "$@")
  local volumes=() uuid="" host container
  while IFS=$'\t' read -r host container; do
    if [ "$host" = result ]; then uuid=$container; continue; fi
    volumes+=(-v "$host:$container")
  done <<<"$binds"
  mkdir -p "$root/result"
  # OpenMOLE creates the folders it binds as the user it runs as, which is the user the container runs as.
  chown -R "$RUN_UID" "$root/result" "$root"/empty-*
  local code=0
  "${PODMAN[@]}" run --rm --network none -u "$RUN_UID" "${LIMITS[@]}" "${volumes[@]}" \
    -v "$root/result:/_result_" -v "$root/_run_commands.sh:/_run_commands.sh:ro" \
    "$IMAGE" sh /_run_commands.sh >"$root/stdout.log" 2>"$root/stderr.log" || code=$?
  local out="$root/result/$uuid/out"
  echo "point $name: exit code $code (expected $expected); /out came back: $([ -d "$out" ] && echo yes || echo NO);" \
    "files: $(ls "$out" 2>/dev/null | tr '\n' ' ')"
  [ "$code" = "$expected" ] || { tail -20 "$root/stderr.log"; echo "FAIL: exit code" >&2; return 1; }
  [ -d "$out" ] || { echo "FAIL: /out did not come back" >&2; return 1; }
  [ ! -e "$out/model.keras" ] || { echo "FAIL: model.keras came back (KEEP_MODEL=false)" >&2; return 1; }
  if [ "$expected" = 0 ]; then
    [ -s "$out/metrics.json" ] || { echo "FAIL: no metrics.json" >&2; return 1; }
    "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print('  metrics:', {k: m[k] for k in ('val_auc','val_patient_auc','epochs_run','n_train_tiles')})" "$out/metrics.json"
    echo "  owner of the outputs: $(stat -c '%u:%g %a' "$out/metrics.json")"
  else
    echo "  train said: $(grep -m1 'error' "$root/stderr.log" || tail -1 "$root/stderr.log")"
  fi
}

say "successful point (fold 0, simple_cnn, 1 epoch, 64 tiles)"
run_point ok 0 fold=0 epochs=1 max_train_tiles=64
say "failing point (fold 7 of a 2-fold split: train refuses it)"
run_point failing 1 fold=7 epochs=1 max_train_tiles=64

say "container smoke test passed"
