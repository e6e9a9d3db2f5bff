"""OpenMOLE's side of ``scripts/slurm_smoke.sh``: the batch job a plan's SLURM environment submits, written as
OpenMOLE and gridscale write it, submitted to a real Slurm, its state read as gridscale reads it, and the point's
result parsed by the plan's own parse task.

Sources, at the versions OpenMOLE v22.1 (8d40b1b9af) uses. ``G/`` = openmole/gridscale at 62942ee68b, the commit
``openmole/project/common.scala:16`` pins (``gridscaleVersion = CommitVersion("62942ee68b", "2.63")``); ``OM/`` =
openmole/openmole at v22.1, ``openmole/plugins/org.openmole.plugin.environment.``.

The job script (``G/slurm/src/main/scala/gridscale/slurm/package.scala:34-71`` ``toScript``)
    ``#!/bin/bash``, a blank line, then one ``#SBATCH <flag><value>`` line per parameter that is set, in this order
    (``G/cluster/src/main/scala/gridscale/cluster/Requirement.scala:29-30``): ``-o <id>.out``, ``-e <id>.err``
    (``G/cluster/.../BatchScheduler.scala:32-33``), ``-p <partition>``, ``--mem=<MB>M`` (squants ``toMegabytes``,
    rounded: ``48.gigabytes`` is 48000, ``G/gridscale/.../tools/package.scala:127``), ``--nodes=``, ``--ntasks=``,
    ``--cpus-per-task=``, ``--time=HH:MM:SS`` (``tools/package.scala:109-113``), ``--qos=``, ``-D <job directory>``,
    ``--reservation=``, ``--account=``, ``--wckey=``, ``--exclusive=``; then the gres, all on one line
    (``gres.mkString("#SBATCH --gres=", "--gres=", "")``: two gres would run together), then the constraints,
    a blank line, and the command.
    OpenMOLE fills it in ``OM/slurm/.../SLURMJobService.scala:19-57``: command ``/bin/bash <run script>``,
    ``-D`` the job's directory in the shared storage, ``cpuPerTask`` the environment's (else the runtime setting's
    threads; the line is absent when neither is set).
Submission and state (``G/cluster/.../BatchScheduler.scala:38-67``, ``slurm/package.scala:86-148``)
    ``mkdir -p``, the script written as ``job-<UUID>.slurm``, ``chmod +x``, ``cd '<dir>' && sbatch <file>``, the
    job id the last word of sbatch's output; the state from ``scontrol show job <id>``: the first line holding
    ``JobState=``, split on spaces and ``=`` (``parseState``), then ``translateStatus`` (lines 88-106), which has
    no case for ``OUT_OF_MEMORY`` (nor ``DEADLINE``, ``BOOT_FAIL``...): "Unrecognized state", an exception.
The run script (``OM/ssh/.../SharedStorage.scala:104-156`` ``buildScript``)
    a ``cleanup_work_directory`` function, then, joined with `` ; ``: ``module load <m>`` for each module
    (``apptainer`` and ``singularity`` unless the environment sets ``modules``, line 99), ``export PATH``, ``cd`` to
    the runtime, ``mkdir -p`` a workspace, ``sh run.sh <openMOLEMemory in MB>m <workspace> -s <storage> -p
    envplugins/ -i <job input> -o <result>``, ``RETURNCODE=$?``, ``rm -rf`` the workspace, ``exit $RETURNCODE``.
    (Its first element, ``Seq("trap 'cleanup_work_directory' SIGTERM")``, stands alone on its line before
    ``loadModules ++ Seq(...)``: Scala 3 reads it as a discarded statement, so no trap is in the script.)
    ``openMOLEMemory`` defaults to 1024 MB (``OM/batch/.../BatchEnvironment.scala:97,124-126``).
The runtime (``openmole/bin/org.openmole.runtime/src/main/resources/run.sh``)
    raises the soft address-space and stack limits to unlimited, exports ``MALLOC_ARENA_MAX=1`` and a UTF-8 locale
    (lines 92-117) and starts the JVM (119-122), which runs the job's tasks with its environment. Here
    :func:`runtime_sh` keeps those lines and runs :func:`runtime_main` in place of the JVM: the plan's point task
    (the GPU path's SystemExecTask, or the CPU path's ContainerTask) through :mod:`engine`, inside a TryTask.

What differs from a real cluster: one node that claims more CPUs, memory and a GPU than it has
(``config_overrides``; the GPU is a stand-in device file, so Slurm sets ``CUDA_VISIBLE_DEVICES`` but nothing uses
it), ``apptainer`` is :mod:`engine`'s recording stand-in (a private mount namespace, this checkout's virtual
environment as the image), and the runtime is a Python process (~50 MB) where OpenMOLE's JVM would hold its heap
plus ~0.5 GB beside the point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dsl import Environment, Node, Quantity, Settings, Task, all_tasks, task_nodes
from .engine import STANDIN_LOG, _typed, load_plan, standin_command

TESTS_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODULES = ("apptainer", "singularity")  # OM/ssh/.../SharedStorage.scala:99
DEFAULT_RUNTIME_MEMORY_MB = 1024  # OM/batch/.../BatchEnvironment.scala:97 MemorySizeForRuntime
# scontrol states of a job that has not ended yet (gridscale: Running / Submitted)
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
HOST_ONLY = "OM_SMOKE_HOST_ONLY"  # a variable of the submitting shell, which must not reach the container
HOG_MB = "OM_SMOKE_HOG_MB"


# ------------------------------------------------------------------------------------------------ gridscale

def megabytes(q: Quantity) -> int:
    """squants ``toMegabytes`` rounded (``toMBString``): SI units, a gigabyte is 1000 MB."""
    factor = {"byte": 1e-6, "kilobyte": 1e-3, "megabyte": 1.0, "gigabyte": 1e3, "terabyte": 1e6}[q.unit]
    return max(0, round(q.value * factor))


def hhmmss(q: Quantity) -> str:
    """gridscale ``toHHmmss``: hours (not wrapped at 24), minutes, seconds, from the milliseconds."""
    seconds = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}[q.unit]
    millis = round(q.value * seconds * 1000)
    return f"{millis // 3_600_000:02d}:{millis % 3_600_000 // 60_000:02d}:{millis % 60_000 // 1000:02d}"


def directives(env: Environment, job_directory: str, uniq_id: str) -> list[tuple[str, str]]:
    """The (flag, value) pairs of ``toScript``'s ``core``, in order, for a SLURMEnvironment of the plan."""
    a = env.args
    cpus = a.get("cpuPerTask")
    if cpus is None and a.get("runtimeSetting") is not None:  # SLURMJobService.scala:47
        cpus = getattr(a["runtimeSetting"], "threads", None)
    core = [("-o ", f"{uniq_id}.out"), ("-e ", f"{uniq_id}.err"), ("-p ", a.get("partition")),
            ("--mem=", f"{megabytes(a['memory'])}M" if a.get("memory") is not None else None),
            ("--nodes=", a.get("nodes")), ("--ntasks=", a.get("nTasks")), ("--cpus-per-task=", cpus),
            ("--time=", hhmmss(a["time"]) if a.get("time") is not None else None), ("--qos=", a.get("qos")),
            ("-D ", job_directory), ("--reservation=", a.get("reservation")), ("--account=", a.get("account")),
            ("--wckey=", a.get("wckey")), ("--exclusive=", a.get("exclusive"))]
    return [(flag, str(value)) for flag, value in core if value is not None]


def job_script(env: Environment, job_directory: str, uniq_id: str, command: str) -> str:
    """``toScript`` (slurm/package.scala:34-71) byte for byte."""
    requirements = "#SBATCH " + "\n#SBATCH ".join(f + v for f, v in directives(env, job_directory, uniq_id))
    gres = list(env.args.get("gres") or [])
    gres_list = "#SBATCH --gres=" + "--gres=".join(gres) if gres else ""
    constraints = list(env.args.get("constraints") or [])
    constraints_list = '#SBATCH --constraint="' + "&".join(constraints) + '"' if constraints else ""
    return f"#!/bin/bash\n\n{requirements}\n{gres_list}\n{constraints_list}\n\n{command}\n"


def parse_state(stdout: str, return_code: int) -> tuple[str, str | None]:
    """``parseState`` (slurm/package.scala:108-123): JobState and Reason of the first line holding JobState=;
    none: ``COMPLETED?``."""
    for line in (raw.strip() for raw in stdout.split("\n")):
        if re.fullmatch(r".*JobState=.*", line):
            parts = {t.split("=")[0]: t.split("=")[1] for t in line.split(" ") if "=" in t}
            return parts["JobState"], parts.get("Reason")
    return "COMPLETED?", None


def translate_status(return_code: int, status: str, reason: str | None) -> str:
    """``translateStatus`` (slurm/package.scala:88-106): gridscale's JobState, or the exception it throws."""
    if status == "COMPLETED":
        return "Done"
    if status == "COMPLETED?":
        return "Done" if return_code == 1 else f"Failed(Return code of scontrol was {return_code})"
    if status in ("RUNNING", "COMPLETING"):
        return "Running"
    if status in ("CONFIGURING", "SUSPENDED"):
        return "Submitted"
    if status == "PENDING":
        return f"Failed(Launch failed: {reason}.)" if reason == "launch_failed_requeued_held" else "Submitted"
    failed = {"CANCELLED": "Job was canceled", "FAILED": "Job has failed",
              "NODE_FAIL": "The node running the job has failed", "PREEMPTED": "Job was preempted",
              "TIMEOUT": "Job exceeded its allocated time"}
    if status in failed:
        return f"Failed({failed[status]})"
    return f"RuntimeException(Unrecognized state {status})"


# ------------------------------------------------------------------------------------------------ OpenMOLE

def run_script(runtime: str, workspace: str, memory_mb: int, storage: str, job_input: str, result: str,
               modules: Sequence[str] | None = None, debug: bool = False) -> str:
    """``SharedStorage.buildScript``'s script (SharedStorage.scala:118-146)."""
    load = [f"module load {m}" for m in (DEFAULT_MODULES if modules is None else modules)]
    commands = load + [
        f"export PATH={runtime}/jre/bin/:$PATH",
        f"cd {runtime}",
        f"mkdir -p {workspace}",
        f"sh run.sh {memory_mb}m {workspace} -s {storage} -p envplugins/ -i {job_input} -o {result}"
        + (" --debug" if debug else ""),
        "RETURNCODE=$?",
        f"rm -rf {workspace}",
        "exit $RETURNCODE",
    ]
    return (f"\nfunction cleanup_work_directory(){{\n  sleep 20\n  rm -rf {workspace}\n  exit 15\n}}\n\n"
            f"{' ; '.join(commands)}\n")


def runtime_sh(python: str) -> str:
    """The runtime's ``run.sh``: its arguments and environment (run.sh:22-41, 92-117 at v22.1), then this module's
    :func:`runtime_main` where the JVM would start (119-122), and its exit (124-130)."""
    bootstrap = (f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); from openmole.slurm import runtime_main; "
                 "sys.exit(runtime_main(sys.argv[1:]))")
    return f"""#!/usr/bin/env bash
cd `dirname "$0"`
MEMORY=$1
shift
TMPDIR=$1
shift
mkdir -p "${{TMPDIR}}"
FULL_TMPDIR=`realpath ${{TMPDIR}}`
ARGS=""
while [ "$#" -gt 0 ]; do
  ARGS="$ARGS $1"
  shift
done
echo $ARGS
ulimit -S -v unlimited
ulimit -S -s unlimited
export MALLOC_ARENA_MAX=1
if locale -a | grep -q '^C\\.UTF-8$'; then OM_LOCAL="C.UTF-8"; elif locale -a | grep -q '^C\\.utf8$'; then OM_LOCAL="C.utf8"; fi
if [ -n "$OM_LOCAL" ]; then
  export LC_ALL="$OM_LOCAL"
  export LANG="$OM_LOCAL"
fi
export _JAVA_OPTIONS="-Duser.home=\\"${{FULL_TMPDIR}}\\" -Djava.io.tmpdir=\\"${{FULL_TMPDIR}}\\""
# in place of: java ... -Xmx${{MEMORY}} ... org.openmole.runtime.SimExplorer -- --workspace ... $ARGS
{python} -c {_sh_quote(bootstrap)} --workspace "${{FULL_TMPDIR}}/openmole" --memory "$MEMORY" $ARGS
RETURNCODE=$?
rm -rf "${{TMPDIR}}"
exit $RETURNCODE
"""


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def point_context(plan, sample: Mapping[str, Any]) -> dict[str, Any]:
    """What pointDefaults passes on: the factors' defaults, exitCode -1 and outDir noOutput (the TryTask's
    fallbacks), with the sample's values typed as their Vals."""
    vals = plan.vals()
    ctx = {d.val.name: _typed(d.val, d.value) for d in plan.value("pointDefaults").defaults}
    ctx.update({k: _typed(vals[k], v) for k, v in sample.items()})
    return ctx


def delegated_point(plan, strip_bound: bool = False) -> tuple[Node, list[Task]]:
    """The capsule of the plan's workflow that runs ``on env`` (the job's whole content: ``TryTask(...)``), and the
    point tasks inside it (SystemExecTask, ContainerTask), without their ``ulimit -d`` for the control."""
    delegated = next((n for n in task_nodes(plan.workflow()) if n.environment is not None), None)
    if delegated is None:
        raise SystemExit(f"{plan.name}: no task runs `on` an environment")
    tasks = [t for t in all_tasks(delegated.task) if t.kind in ("SystemExecTask", "ContainerTask")]
    if strip_bound:
        for task in tasks:
            strip_memory_bound(task)
    return delegated, tasks


def task_commands(task: Task) -> list[str]:
    if task.kind == "SystemExecTask":
        return list(task.args.get("command") or task.args["positional"][:1])
    return [task.args["positional"][1]]


def strip_memory_bound(task: Task) -> None:
    """The control: the point's command without its ``ulimit -d N;`` (a plan without a memory bound)."""
    def strip(command: str) -> str:
        return re.sub(r"ulimit -d \d+ *(;|&&) *", "", command)
    if task.kind == "SystemExecTask" and "command" in task.args:
        task.args["command"] = [strip(c) for c in task.args["command"]]
    elif task.kind == "SystemExecTask":
        task.args["positional"] = [strip(c) for c in task.args["positional"]]
    else:
        task.args["positional"][1] = strip(task.args["positional"][1])


def memory_bound_kb(command: str) -> int | None:
    m = re.search(r"ulimit -d (\d+)", command)
    return int(m.group(1)) if m else None


def _cgroup_memory_peak() -> dict[str, int]:
    """This job's memory cgroup (v1): the peak usage of the batch step and of the job, and OOM kills so far."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" not in controllers.split(","):
                continue
            step = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            for name, folder in (("step", step), ("job", next((p for p in [step, *step.parents]
                                                              if p.name.startswith("job_")), None))):
                if folder is None:
                    continue
                peak = folder / "memory.max_usage_in_bytes"
                if peak.exists():
                    out[f"{name}_peak_bytes"] = int(peak.read_text())
                limit = folder / "memory.limit_in_bytes"
                if limit.exists():
                    out[f"{name}_limit_bytes"] = int(limit.read_text())
                control = folder / "memory.oom_control"
                if control.exists():
                    m = re.search(r"oom_kill (\d+)", control.read_text())
                    if m:
                        out[f"{name}_oom_kills"] = int(m.group(1))
    except OSError:
        pass
    return out


def runtime_main(argv: Sequence[str]) -> int:
    """The job's runtime: runs the point the job input names (``-i``), as OpenMOLE's runtime runs a delegated
    ``TryTask(train)``, and writes its result (``-o``): the point's values, its ``out`` folder beside, and what
    the job saw (its environment, limits, memory peaks)."""
    p = argparse.ArgumentParser(prog="runtime")
    p.add_argument("--workspace", required=True)
    p.add_argument("--memory")
    p.add_argument("-s")
    p.add_argument("-p")
    p.add_argument("-i", required=True)
    p.add_argument("-o", required=True)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    job = json.loads(Path(args.i).read_text())
    from .engine import Engine

    settings = Settings(work_directory=Path(job["plans"]), environ=job["environ"],
                        edits={k: [tuple(e) for e in v] for k, v in job.get("edits", {}).items()})
    plan = load_plan(job["plan"], settings)
    node, _ = delegated_point(plan, job.get("strip_bound", False))
    ctx = point_context(plan, job["sample"])
    received = {k: v for k, v in ctx.items() if k in node.task.input_names()}  # Transition.scala:82
    workspace = Path(args.workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    engine = Engine(plan, workspace / "mole", job_environ=dict(os.environ))
    started = time.monotonic()
    values = engine.perform(node.task, received)  # the capsule's job: TryTask(...) and what it returns
    seconds = time.monotonic() - started
    caught = next((e.detail.get("error") for e in engine.events if e.kind == "caught"), None)
    result = Path(args.o)
    out_copy = result.with_name(result.name + ".out")
    if Path(values["outDir"]).is_dir():
        shutil.copytree(values["outDir"], out_copy)
    runs = [e.detail for e in engine.events if e.kind in ("systemexec", "container")]
    record = {
        "exitCode": values["exitCode"], "outDir": str(out_copy), "caught": caught, "seconds": seconds,
        "sample": job["sample"],
        "environ": dict(os.environ),
        "rlimits_kb": {name: [None if v == resource.RLIM_INFINITY else v // 1024
                              for v in resource.getrlimit(getattr(resource, name))]
                       for name in ("RLIMIT_DATA", "RLIMIT_AS", "RLIMIT_STACK")},
        "point_max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        "cgroup": _cgroup_memory_peak(),
        "command": runs[-1].get("command") if runs else None,
        "returncode": runs[-1].get("returncode") if runs else None,
        "stderr_tail": (runs[-1].get("stderr") or "")[-3000:] if runs else "",
    }
    result.write_text(json.dumps(record, default=str, indent=1))
    return 0


# ------------------------------------------------------------------------------------------------ the smoke test

HOG_SOURCE = f'''"""The smoke test's stand-in allocation: a point whose Python allocates (and touches) {HOG_MB} MB when it
starts, as a training that needs too much memory would; an allocation that fails ends the process (exit 1)."""
import os
import sys

_want = int(os.environ.get("{HOG_MB}", "0") or 0)
_held = []
_got = 0
try:
    while _got < _want:
        _chunk = bytearray(32 << 20)
        _chunk[::4096] = b"\\x01" * len(range(0, len(_chunk), 4096))
        _held.append(_chunk)
        _got += 32
except MemoryError:
    _held.clear()
    sys.stderr.write(f"stand-in allocation: MemoryError after {{_got}} MB of {{_want}} MB\\n")
    sys.stderr.flush()
    os._exit(1)
if _want:
    sys.stderr.write(f"stand-in allocation: holding {{_got}} MB\\n")
'''


@dataclass
class Point:
    name: str
    env_name: str  # OM_ENV
    sample: dict[str, Any]
    job_memory_mb: int | None = None  # the plan's job memory, scaled down (None: as the plan has it)
    hog_mb: int = 0
    strip_bound: bool = False
    expect: str = "ok"  # ok | bounded | oom
    # filled in
    uniq_id: str = ""
    job_directory: Path = Path()
    script: str = ""
    env: Environment | None = None
    bound_kb: int | None = None
    job_id: str = ""
    sbatch: str = ""
    scontrol: str = ""
    state: str = ""


class Smoke:
    def __init__(self, work: Path, plans: Path, cluster_data: Path, python: str, timeout: float) -> None:
        self.work, self.plans, self.cluster_data, self.python, self.timeout = work, plans, cluster_data, python, timeout
        self.failures = 0
        self.runtime = work / "runtime"
        self.runtime.mkdir(parents=True, exist_ok=True)
        (self.runtime / "run.sh").write_text(runtime_sh(python))
        self.hog = work / "hog"
        self.hog.mkdir(exist_ok=True)
        (self.hog / "sitecustomize.py").write_text(HOG_SOURCE)
        self.standin = standin_command(work / "apptainer.jsonl")  # each job logs to its own STANDIN_LOG
        self.deadline: float | None = None

    def say(self, ok: bool, check: str, figures: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'} {check}: {figures}", flush=True)
        self.failures += not ok

    # -------------------------------------------------------------------------------------------- plans

    def settings(self, point: Point) -> tuple[Settings, dict[str, list[tuple[str, str]]]]:
        environ = {"OM_ENV": point.env_name, "OM_CLUSTER_DATA": str(self.cluster_data)}
        edits: dict[str, list[tuple[str, str]]] = {}
        if point.job_memory_mb is not None:
            edits = {"common.oms": [memory_edit(self.plans / "common.oms", env_val(point.env_name),
                                                point.job_memory_mb)]}
        return Settings(work_directory=self.plans, environ=environ, edits=edits), edits

    def submit(self, point: Point) -> None:
        settings, edits = self.settings(point)
        plan = load_plan("sweep.oms", settings)
        point.env = plan.value("env")
        if point.env.kind != "SLURMEnvironment":
            raise SystemExit(f"OM_ENV={point.env_name}: the plans' env is a {point.env.kind}")
        _, tasks = delegated_point(plan, point.strip_bound)
        point.bound_kb = memory_bound_kb(" ".join(c for t in tasks for c in task_commands(t)))
        point.uniq_id = f"job-{uuid.uuid4()}"  # BatchScheduler.scala:48
        shared = self.work / "shared"
        point.job_directory = shared / "tmp" / point.name
        point.job_directory.mkdir(parents=True)
        job_input = point.job_directory / "job.json"
        job_input.write_text(json.dumps({"plans": str(self.plans), "plan": "sweep.oms", "environ": settings.environ,
                                         "edits": edits, "sample": point.sample, "strip_bound": point.strip_bound}))
        memory = point.env.args.get("openMOLEMemory")
        run = point.job_directory / f"run-{uuid.uuid4()}.sh"
        run.write_text(run_script(str(self.runtime), str(self.work / "workspaces" / f"openmole_{uuid.uuid4()}"),
                                  megabytes(memory) if memory else DEFAULT_RUNTIME_MEMORY_MB, str(shared),
                                  str(job_input), str(point.job_directory / "result.json"),
                                  point.env.args.get("modules")))
        point.script = job_script(point.env, str(point.job_directory), point.uniq_id, f"/bin/bash {run}")
        script_file = point.job_directory / f"{point.uniq_id}.slurm"
        script_file.write_text(point.script)
        script_file.chmod(0o755)
        env = dict(os.environ)
        env.update({"PATH": f"{self.standin}:{env['PATH']}", STANDIN_LOG: str(point.job_directory / "apptainer.jsonl"),
                    HOST_ONLY: "from the submitting shell"})
        if point.hog_mb:
            image_pythonpath = str(TESTS_DIR.parent)  # engine.emulated_image_env: the checkout stands for the image
            env.update({"APPTAINERENV_PYTHONPATH": f"{self.hog}:{image_pythonpath}", f"APPTAINERENV_{HOG_MB}":
                        str(point.hog_mb)})
        proc = subprocess.run(f"cd '{point.job_directory}' && sbatch {script_file.name}", shell=True, env=env,
                              capture_output=True, text=True)
        point.sbatch = (proc.stdout + proc.stderr).strip()
        point.job_id = proc.stdout.strip().split(" ")[-1] if proc.returncode == 0 else ""  # retrieveJobID

    def wait(self, point: Point) -> None:
        """Poll ``scontrol show job`` (gridscale's state command) until the job has ended or the smoke test's time
        is up (one deadline for all the points)."""
        self.deadline = self.deadline or time.monotonic() + self.timeout
        deadline = self.deadline
        while point.job_id:
            proc = subprocess.run(["scontrol", "show", "job", point.job_id], capture_output=True, text=True)
            state, _ = parse_state(proc.stdout, proc.returncode)
            point.scontrol, point.state = proc.stdout, state
            if state not in LIVE_STATES or time.monotonic() > deadline:
                return
            time.sleep(1)

    # -------------------------------------------------------------------------------------------- checks

    def check(self, point: Point) -> None:
        n = point.name
        if not point.job_id:
            self.say(False, f"{n} submitted", f"sbatch refused the job script: {point.sbatch}")
            return
        fields = scontrol_fields(point.scontrol)
        state, reason = parse_state(point.scontrol, 0)
        gridscale = translate_status(0, state, reason)
        job = f"job {point.job_id} JobState={state} ExitCode={fields.get('ExitCode')}"
        result_file = point.job_directory / "result.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else None
        if state in LIVE_STATES:
            self.say(False, f"{n} job ended", f"{job} after {self.timeout:.0f} s")
            return
        job_mb = megabytes(point.env.args["memory"])
        rss = f"point MaxRSS {result['point_max_rss_kb'] // 1024} MB" if result else "no result"
        cgroup = (result or {}).get("cgroup", {})
        oom_kills = cgroup.get("job_oom_kills", 0) + cgroup.get("step_oom_kills", 0)  # the victim's cgroup counts it
        peak = (f", job cgroup peak {cgroup['job_peak_bytes'] // 2**20} MB of {cgroup['job_limit_bytes'] // 2**20} MB"
                f" (OOM kills {oom_kills})" if "job_peak_bytes" in cgroup else "")
        bound = f"ulimit -d {point.bound_kb} ({point.bound_kb // 1024} MB)" if point.bound_kb else "no ulimit -d"
        if point.expect == "oom":
            code = result["exitCode"] if result else None
            self.say(state == "OUT_OF_MEMORY", f"{n}, the same point without its memory bound, ends OUT_OF_MEMORY",
                     f"{job}, gridscale: {gridscale}; --mem={job_mb}M, {bound}, hog {point.hog_mb} MB; point "
                     f"exitCode {code}; {rss}{peak}")
            return
        self.check_directives(point, fields)
        self.say(state == "COMPLETED" and gridscale == "Done", f"{n} job state",
                 f"{job} Reason={reason}, gridscale: {gridscale}")
        if result is None:
            self.say(False, f"{n} point ran", f"no result from the runtime ({result_file}); job stderr: "
                                             f"{tail(point.job_directory / (point.uniq_id + '.err'))}")
            return
        if result["caught"]:
            print(f"  {n}: the TryTask caught: {result['caught'][:600]}", flush=True)
        row = self.parse_row(point, result)
        code = result["exitCode"]
        if point.expect == "ok":
            self.check_environment(point, result)
            metrics = Path(result["outDir"]) / "metrics.json"
            self.say(code == 0, f"{n} exit code comes back", f"point exitCode {code}, {bound}, {rss}{peak}")
            auc = row.get("val_auc")
            self.say(metrics.is_file() and row["status"] == "ok" and auc is not None and 0 <= auc <= 1,
                     f"{n} metrics.json back and parsed",
                     f"status {row['status']!r}, val_auc {auc}, epochs_run {row.get('epochs_run')}, "
                     f"error {row['error']!r}")
        else:
            said = last_error_line(result["stderr_tail"])
            ok = (state == "COMPLETED" and code not in (0, -1) and row["status"] == "failed" and point.bound_kb
                  is not None and point.bound_kb // 1024 < job_mb and not oom_kills)
            allocation = f"hog {point.hog_mb} MB" if point.hog_mb else "the real training"
            self.say(ok, f"{n} over its memory bound is a failed row, not an OUT_OF_MEMORY job",
                     f"{job}; --mem={job_mb}M, {bound}, {allocation}; point exitCode {code}, row status "
                     f"{row['status']!r} error {row['error']!r}; the point said: {said!r}; {rss}{peak}")

    def check_directives(self, point: Point, fields: Mapping[str, str]) -> None:
        a = point.env.args
        lines = [line for line in point.script.splitlines() if line.startswith("#SBATCH")]
        want = {"Partition": a.get("partition"), "TimeLimit": hhmmss(a["time"]) if a.get("time") else None,
                "MinMemoryNode": f"{megabytes(a['memory'])}M" if a.get("memory") else None,
                "CPUs/Task": str(a["cpuPerTask"]) if a.get("cpuPerTask") else None,
                "TresPerNode": ",".join(f"gres:{g}" for g in a.get("gres") or []) or None,
                "WorkDir": str(point.job_directory)}
        got = {k: fields.get(k) for k in want}
        bad = {k: (v, got[k]) for k, v in want.items()
               if v is not None and (slurm_mb(got[k]) != slurm_mb(v) if k == "MinMemoryNode" else got[k] != v)}
        self.say(not bad, f"{point.name} directives accepted",
                 f"job {point.job_id}: {' | '.join(lines)} -> scontrol "
                 + ", ".join(f"{k}={got[k]}" for k, v in want.items() if v is not None)
                 + (f"; differ (wanted, got): {bad}" if bad else ""))

    def check_environment(self, point: Point, result: Mapping[str, Any]) -> None:
        log = point.job_directory / "apptainer.jsonl"
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        job_env = result["environ"]
        if not point.env_name.endswith("-gpu"):
            self.say(HOST_ONLY in job_env and not calls, f"{point.name} CPU path (ContainerTask)",
                     f"no apptainer call; {HOST_ONLY} in the job's environment: {HOST_ONLY in job_env}")
            return
        if not calls:
            self.say(False, f"{point.name} apptainer called", "the stand-in recorded no call")
            return
        inside = calls[-1]["container_env"]
        cuda_job, cuda_in = job_env.get("CUDA_VISIBLE_DEVICES"), inside.get("CUDA_VISIBLE_DEVICES")
        self.say(cuda_job is not None and cuda_in == cuda_job, f"{point.name} CUDA_VISIBLE_DEVICES reaches the point",
                 f"Slurm set {cuda_job!r} in the job (gres {fields_gres(point)}), the container has {cuda_in!r}; "
                 f"flags {' '.join(calls[-1]['flags'])}")
        self.say(HOST_ONLY in job_env and HOST_ONLY not in inside and "SLURM_JOB_ID" not in inside,
                 f"{point.name} --cleanenv keeps the host's variables out",
                 f"{HOST_ONLY} in the job: {HOST_ONLY in job_env}, in the container: {HOST_ONLY in inside}; "
                 f"SLURM_JOB_ID in the container: {'SLURM_JOB_ID' in inside}; container variables: "
                 f"{sorted(inside)}")

    def parse_row(self, point: Point, result: Mapping[str, Any]) -> dict[str, Any]:
        """The plan's parse task on the point's result, on OpenMOLE's side (no ``on``)."""
        from .engine import Engine

        settings, _ = self.settings(point)
        plan = load_plan("sweep.oms", settings)
        ctx = point_context(plan, point.sample)
        out_dir = Path(result["outDir"])
        if not out_dir.is_dir():
            out_dir.mkdir(parents=True)  # noOutput: an empty folder
        ctx.update({"exitCode": int(result["exitCode"]), "outDir": out_dir})
        parse = plan.value("parseMetrics")
        engine = Engine(plan, self.work / "parse")
        return engine.perform(parse, {k: v for k, v in ctx.items() if k in parse.input_names()})


def env_val(env_name: str) -> str:
    return {"slurm": "slurm", "slurm-gpu": "slurmGpu"}[env_name]


def memory_edit(common: Path, env_val_name: str, job_memory_mb: int) -> tuple[str, str]:
    """The edit of common.oms that sets the job memory of ``lazy val <env_val_name> = SLURMEnvironment(...)`` to
    ``job_memory_mb``: the setting its ``memory =`` names (``val X = <MB>`` with ``memory = X.megabytes``), or the
    literal itself (``memory = 48.gigabytes``). Everything derived from it (the point's bound) follows."""
    source = common.read_text()
    block = re.search(rf"lazy val {env_val_name}\s*=\s*SLURMEnvironment\((.*?)\n\)", source, re.S)
    if not block:
        raise SystemExit(f"{common}: no `lazy val {env_val_name} = SLURMEnvironment(...)`")
    memory = re.search(r"\bmemory\s*=\s*([^,\n]+)", block.group(1))
    if not memory:
        raise SystemExit(f"{common}: {env_val_name} sets no memory")
    expression = memory.group(1).strip()
    m = re.fullmatch(r"(\w+)\.megabytes", expression)
    if m and not m.group(1).isdigit():
        setting = re.search(rf"^val {m.group(1)}\s*=\s*\d+\s*$", source, re.M)
        if not setting:
            raise SystemExit(f"{common}: {env_val_name}'s memory is {expression}, and no `val {m.group(1)} = <MB>`")
        return setting.group(0), f"val {m.group(1)} = {job_memory_mb}"
    if re.fullmatch(r"\d+\.(mega|giga)bytes", expression):
        return memory.group(0), memory.group(0).replace(expression, f"{job_memory_mb}.megabytes")
    raise SystemExit(f"{common}: cannot scale {env_val_name}'s memory = {expression}")


def scontrol_fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for token in text.split():
        if "=" in token:
            k, v = token.split("=", 1)
            out.setdefault(k, v)
    return out


def slurm_mb(text: str | None) -> float | None:
    """Slurm's memory figures (``48G``, ``4096M``): in MB (its units are binary: 1G = 1024M)."""
    m = re.fullmatch(r"([\d.]+)([KMGT]?)", text or "")
    return float(m.group(1)) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 ** 2}[m.group(2)] if m else None


def fields_gres(point: Point) -> str:
    return ",".join(point.env.args.get("gres") or []) or "none"


def tail(path: Path, n: int = 400) -> str:
    return path.read_text()[-n:].strip() if path.exists() else f"({path.name} missing)"


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("I0000", "WARNING: All"))]
    return lines[-1][:300] if lines else ""


def smoke_main(argv: Sequence[str]) -> int:
    """python -m openmole.slurm smoke --work DIR --plans DIR --cluster-data DIR [--timeout S] [--points a,b]

    Submits the points to the running Slurm (SLURM_CONF), waits for them, prints one PASS/FAIL line per check.
    Returns the number of FAILs (capped at 100)."""
    p = argparse.ArgumentParser(prog="smoke")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--plans", type=Path, required=True)
    p.add_argument("--cluster-data", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--scaled-job-mb", type=int, default=0,
                   help="the job memory of the memory points (default: the plan's margin + 2048 MB)")
    p.add_argument("--train-bound-mb", type=int, default=700,
                   help="train-at-bound (not run unless named in --points): the real tiny training under this bound")
    p.add_argument("--points", default="gpu,gpu-bounded,gpu-memory,control,cpu")
    args = p.parse_args(argv)
    smoke = Smoke(args.work, args.plans, args.cluster_data, sys.executable, args.timeout)
    tiny = {"fold": 0, "epochs": 1, "max_train_tiles": 64}
    # The memory points scale the job down to a size this machine can fill: the job's memory such that the
    # plan's bound (job memory minus the plan's margin) is 2 GB, the stand-in allocation past the job's memory.
    plan = load_plan("sweep.oms", Settings(work_directory=args.plans, environ={
        "OM_ENV": "slurm-gpu", "OM_CLUSTER_DATA": str(args.cluster_data)}))
    job_mb = megabytes(plan.value("slurmGpu").args["memory"])
    bound_kb = memory_bound_kb(" ".join(c for t in delegated_point(plan)[1] for c in task_commands(t)))
    margin = job_mb - bound_kb // 1024 if bound_kb else 2048
    scaled = args.scaled_job_mb or margin + 2048
    print(f"plans: slurmGpu --mem={job_mb}M, point bound {f'ulimit -d {bound_kb}' if bound_kb else 'none'} "
          f"(margin {margin} MB); memory points scaled to --mem={scaled}M", flush=True)
    points = {
        "gpu": Point("gpu", "slurm-gpu", tiny),
        "gpu-bounded": Point("gpu-bounded", "slurm-gpu", tiny, job_memory_mb=scaled),
        "gpu-memory": Point("gpu-memory", "slurm-gpu", tiny, job_memory_mb=scaled, hog_mb=scaled + 512,
                            expect="bounded"),
        "control": Point("control", "slurm-gpu", tiny, job_memory_mb=scaled, hog_mb=scaled + 512, strip_bound=True,
                         expect="oom"),
        "cpu": Point("cpu", "slurm", tiny),
        # what the real training does at its bound: how it fails varies with where the bound is reached (see the
        # script's header); not among the default points
        "train-at-bound": Point("train-at-bound", "slurm-gpu", tiny, job_memory_mb=margin + args.train_bound_mb,
                                expect="bounded"),
    }
    chosen = [points[n] for n in args.points.split(",")]
    started = time.monotonic()
    try:
        for point in chosen:
            smoke.submit(point)
            print(f"submitted {point.name}: {point.sbatch}", flush=True)
        for point in chosen:
            smoke.wait(point)
        print(f"all jobs ended after {time.monotonic() - started:.0f} s", flush=True)
        for point in chosen:
            if point.name == "gpu-bounded":
                result_file = point.job_directory / "result.json"
                result = json.loads(result_file.read_text()) if result_file.exists() else {}
                row = smoke.parse_row(point, result) if result else {"status": "no result", "error": ""}
                state, _ = parse_state(point.scontrol, 0)
                smoke.say(state == "COMPLETED" and row["status"] == "ok",
                          f"{point.name} the tiny training trains under the plan's bound",
                          f"job {point.job_id} JobState={state}; --mem={megabytes(point.env.args['memory'])}M, "
                          f"ulimit -d {point.bound_kb}; point exitCode {result.get('exitCode')}, status "
                          f"{row['status']!r} {row['error']!r}; point MaxRSS "
                          f"{result.get('point_max_rss_kb', 0) // 1024} MB")
            else:
                smoke.check(point)
    finally:
        shutil.rmtree(smoke.standin, ignore_errors=True)
    return min(smoke.failures, 100)


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "smoke":
        return smoke_main(argv[1:])
    if argv and argv[0] == "runtime":
        return runtime_main(argv[1:])
    print("usage: python -m openmole.slurm smoke|runtime ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
