"""An emulation of the OpenMOLE engine, for running the project's plans here, for real, without OpenMOLE.

It runs a plan evaluated by :mod:`dsl` the way OpenMOLE runs it, and each rule below is taken from OpenMOLE's
source: openmole/openmole at release v22.1 (2026-03-02) and dev f27e8a2c7a (2026-03-05), which agree on all of
them, and the container library openmole/container at 0c33be67ac, the commit OpenMOLE pins
(``openmole/project/common.scala:19``). Paths: ``WF/`` = ``openmole/core/org.openmole.core.workflow/src/main/
scala/org/openmole/core/workflow/``, ``CT/`` = ``openmole/plugins/org.openmole.plugin.task.container/src/main/
scala/org/openmole/plugin/task/container/``, ``EXT/`` = ``openmole/plugins/org.openmole.plugin.task.external/
src/main/scala/org/openmole/plugin/task/external/``, ``SE/`` = ``openmole/plugins/org.openmole.plugin.task.
systemexec/src/main/scala/org/openmole/plugin/task/systemexec/``. Check them again when OpenMOLE changes.

Data flow
    * A task's result is cut down to its declared outputs (``WF/task/InputOutputCheck.scala:93-110``); a strained
      task passes on the context it received as well (``WF/job/Job.scala:98-99``).
    * A transition delivers only the variables that are inputs (or ``:=`` defaults) of the next task; a strained
      task receives everything (``WF/transition/Transition.scala:82``, ``WF/mole/MoleCapsule.scala:131-145``).
    * A default fills a missing input; a value that arrives wins unless the default overrides
      (``openmole/core/org.openmole.core.argument/.../DefaultSet.scala:46-51``). A missing input fails the task
      ("Input data 'x' has not been found").
    * DirectSampling is a strained sampler, a strained first task, the evaluation, a last task keeping the
      evaluation's outputs; with an aggregation, its hooks see the aggregated values and the context that reached
      the sampler, without the explored factors (``openmole/plugins/org.openmole.plugin.tool.pattern/.../
      MapReduce.scala:15-29``). Every sample gets a new ticket (``WF/transition/Transition.scala:234``).
    * A hook on a task sees that task's result and ``openmole$experiment``, the ticket
      (``WF/mole/MoleExecution.scala:294``).
    * TryTask runs the wrapped task and, if it throws, returns its own input context (with defaults) as the
      result (``WF/task/TryTask.scala:40-66``).
    * A task that throws cancels a local execution (``WF/mole/MoleExecution.scala:359-366``); on a batch
      environment the job is resubmitted with no limit (``openmole/plugins/org.openmole.plugin.environment.batch/
      .../refresh/KillActor.scala:32-37``, ``.../JobManager.scala:80-89``): here :class:`EndlessResubmission`
      after a few tries.

ContainerTask (``CT/ContainerTask.scala:410-613``, ``container`` ``Singularity.scala`` ``executeImage``)
    * Resources are copied (``link = true``: symlinked) into the task's directory and bound at their destination;
      ``EmptyDirectory`` is a fresh empty folder bound there; ``hostFiles`` are bound as they are; binds are
      sorted by the depth of their destination (``EXT/External.scala:82-92``, ``CT/ContainerTask.scala:446-469``).
    * One script, ``/_run_commands.sh``, run with ``sh``: ``export NAME="value"`` for the image's ENV, then the
      task's ``environmentVariables``, then ``HOME=/home/user``; then the command followed by
      ``; _PROCESS_RET_CODE_=$? ; true`` (when a return value is kept), ``mkdir -p "/_result_/<uuid>/"`` and
      ``cp -ra "<output>" "/_result_/<uuid>/"`` per output file, and ``exit $_PROCESS_RET_CODE_``, joined with
      ``&& \\`` and a newline. Singularity runs it with ``--contain --cleanenv``: no host variable gets in.
    * A bind whose host path is missing stops Singularity before the script (exit 255).
    * A declared output file that did not come back throws ``Output file ... doesn't exist``
      (``EXT/External.scala:149-153``); with ``returnValue`` a non-zero exit does not throw.

SystemExecTask (``SE/SystemExecTask.scala:108-152``, ``SE/package.scala:213-222``)
    * The first command only (``command.find``), as ``bash -c``, in a fresh temporary folder, with the job's
      environment plus ``environmentVariables``; resources and output files relative to that folder.

CSVHook (``WF/hook/CSVHook.scala``, ``openmole/core/org.openmole.core.format/.../CSVFormat.scala``)
    * Every variable of the hook's context, columns sorted by name, values by ``toString`` with no quoting
      (arrays ``"[a,b]"``), ``,`` and ``\\n``; the header only when the file is missing or empty; later rows and
      later executions append. CopyFileHook copies (a folder: merged) to a destination expanded from the context.

Where this emulation must differ from a real node it says so: the "image" is this checkout's virtual environment
(``/opt/venv/bin`` of the image's PATH is replaced by it, and ``PYTHONPATH`` points at the checkout), the
container is a private mount namespace (``unshare --mount``, root only) with the binds at their absolute paths,
and the working folder is a fresh empty one when the host's ``/work`` (the image's WORKDIR) is not free.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ports
from .dsl import (
    LHS,
    NSGA2,
    REPO_ROOT,
    Chain,
    DirectSampling,
    Factor,
    Hook,
    HostFile,
    Node,
    Plan,
    Product,
    Settings,
    Task,
    Unsupported,
    ValRef,
    scala_str,
)

OFFICIAL_PYTHON_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"  # python:3.11-slim's ENV PATH
CONTAINER_HOME = "/home/user"  # Singularity.executeImage(home = Some("/home/user"))
RUN_SCRIPT = "_run_commands.sh"
RESULT_BIND = "/_result_"
STANDIN_LOG = "OM_TEST_APPTAINER_LOG"


class TaskFailure(Exception):
    """A task threw, as OpenMOLE's task would (UserBadDataError, InternalProcessingError)."""


class ExecutionCancelled(Exception):
    """A task threw on the local environment: OpenMOLE cancels the whole execution."""


class EndlessResubmission(Exception):
    """A task threw in a batch job: OpenMOLE would resubmit it forever."""


def load_plan(name: str, settings: Settings | None = None) -> Plan:
    return Plan(name, settings, ports.NATIVES)


# ------------------------------------------------------------------------------------------------ the image

def image_environment(dockerfile: Path = REPO_ROOT / "Dockerfile", variant: str = "cpu") -> list[tuple[str, str]]:
    """The ENV of an image, in order, as its config lists it: the CPU image is the Dockerfile's last stage, the
    GPU image its ``runtime-gpu`` stage; ``$PATH`` of the base image is python:3.11-slim's."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current = last = None
    for instruction in _dockerfile_instructions(dockerfile.read_text()):
        word, _, rest = instruction.partition(" ")
        if word.upper() == "FROM":
            parts = rest.split()
            current = last = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else parts[0]
            stages[current] = (parts[0], [])
        elif word.upper() == "ENV" and current is not None:
            stages[current][1].extend(_env_pairs(rest))
    chain, stage = [], (last if variant == "cpu" else "runtime-gpu")
    while stage in stages:
        base, envs = stages[stage]
        chain.append(envs)
        stage = base
    env: dict[str, str] = {"PATH": OFFICIAL_PYTHON_PATH}
    for envs in reversed(chain):
        for k, v in envs:
            env[k] = v.replace("${PATH}", env.get("PATH", "")).replace("$PATH", env.get("PATH", ""))
    return list(env.items())


def _dockerfile_instructions(source: str) -> list[str]:
    out, buf = [], ""
    for line in source.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
        else:
            out.append((buf + stripped).strip())
            buf = ""
    return out


def _env_pairs(rest: str) -> list[tuple[str, str]]:
    return [tuple(token.split("=", 1)) for token in shlex.split(rest) if "=" in token]


def emulated_image_env(variant: str = "cpu") -> list[tuple[str, str]]:
    """The image's ENV with this checkout's virtual environment standing for ``/opt/venv``."""
    venv_bin = str(Path(sys.executable).parent)
    out = []
    for k, v in image_environment(variant=variant):
        if k == "PATH":
            v = v.replace("/opt/venv/bin", venv_bin)
        if k == "KERAS_BACKEND" and v == "jax" and not _importable("jax"):
            v = "tensorflow"  # the GPU image runs Keras on JAX; this checkout has no JAX
        out.append((k, v))
    out.append(("PYTHONPATH", str(REPO_ROOT)))  # the image has this checkout's package installed
    return out


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------------------------------------ isolation

@dataclass
class Bind:
    source: str
    destination: str
    read_only: bool = False


def namespaces_available() -> str | None:
    """None when a private mount namespace can be made here; otherwise why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for `unshare --mount` and bind mounts (CI runs as root)"
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        return "unshare/chroot not found"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare --mount refused: {probe.stderr.decode().strip()}"
    return None


def run_isolated(argv: Sequence[str], binds: Sequence[Bind], env: Mapping[str, str], cwd: str | None,
                 fresh_tmp: bool, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``argv`` in a private mount namespace whose root is this machine's, with ``binds`` at their absolute
    paths (the top folders they create are fresh, as in a container image), an empty environment plus ``env``,
    and optionally a fresh ``/tmp`` (Singularity's ``--contain``). A missing bind source fails as Singularity
    does, before anything runs (exit 255)."""
    tops = {b.destination.strip("/").split("/")[0] for b in binds}
    if cwd is None:  # the image's WORKDIR, unless this machine's /work must stay visible (it may hold the checkout)
        cwd = "/work" if not Path("/work").exists() else "/_workdir_"
        tops.add(cwd.strip("/").split("/")[0])
    skip = tops | ({"tmp"} if fresh_tmp else set())
    q = shlex.quote
    lines = ["set -e", 'root=$(mktemp -d /tmp/om-root.XXXXXX)', 'mount -t tmpfs -o mode=0755 om-root "$root"']
    for b in binds:
        lines.append(f"[ -e {q(b.source)} ] || {{ echo {q(f'FATAL: container creation failed: mount {b.source}->{b.destination} error: mount source {b.source} does not exist')} >&2; exit 255; }}")
    for entry in sorted(os.listdir("/")):
        if entry in skip:
            continue
        path = Path("/") / entry
        if path.is_symlink():
            lines.append(f'ln -s {q(os.readlink(path))} "$root"/{q(entry)}')
        elif path.is_dir():
            lines.append(f'mkdir "$root"/{q(entry)} && mount --rbind {q(str(path))} "$root"/{q(entry)}')
    if fresh_tmp:
        lines.append('mkdir "$root/tmp" && mount -t tmpfs -o mode=1777 om-tmp "$root/tmp"')
    lines.append(f'mkdir -p "$root"{q(cwd)}')
    for b in sorted(binds, key=lambda b: len(b.destination.split("/"))):
        target = '"$root"' + q(b.destination)
        if Path(b.source).is_dir():
            lines.append(f"mkdir -p {target}")
        else:
            lines.append(f"mkdir -p \"$(dirname {target})\" && touch {target}")
        lines.append(f"mount --bind {q(b.source)} {target}")
        if b.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    env_args = " ".join(q(f"{k}={v}") for k, v in env.items())
    inner = " ".join(q(a) for a in argv)
    lines.append(f"exec chroot \"$root\" /usr/bin/env -i {env_args} /bin/sh -c 'cd \"$0\" && exec \"$@\"' "
                 f"{q(cwd)} {inner}")
    launcher = Path(subprocess.check_output(["mktemp", "/tmp/om-launch.XXXXXX"], text=True).strip())
    try:
        launcher.write_text("\n".join(lines) + "\n")
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", str(launcher)],
                              capture_output=True, text=True, timeout=timeout)
    finally:
        launcher.unlink(missing_ok=True)
        for leftover in Path("/tmp").glob("om-root.*"):
            if leftover.is_dir() and not any(leftover.iterdir()):
                leftover.rmdir()


# ------------------------------------------------------------------------------------------------ the engine

@dataclass
class Ctx:
    values: dict[str, Any]
    ticket: int


@dataclass
class Event:
    """What happened, for the tests to read: a task run, a failure caught or raised, a hook."""

    kind: str
    task: str
    detail: dict[str, Any] = field(default_factory=dict)


def expand(template: str, values: Mapping[str, Any]) -> str:
    """``ExpandedString``: ``${name}`` -> the value's ``toString`` (core.argument ``ExpandedString.scala:127-135``).
    Other ``${code}`` would be compiled as Scala: unsupported here."""
    out, i = [], 0
    while True:
        j = template.find("${", i)
        if j < 0:
            out.append(template[i:])
            return "".join(out)
        depth, k = 1, j + 2
        while depth and k < len(template):
            depth += {"{": 1, "}": -1}.get(template[k], 0)
            k += 1
        code = template[j + 2:k - 1]
        if code not in values:
            raise Unsupported(f"${{{code}}}: not a variable of the context ({sorted(values)[:12]}...)")
        out.append(template[i:j] + scala_str(values[code]))
        i = k


def csv_cell(value: Any) -> str:
    """CSVFormat: ``toString`` of a scalar, unquoted; an array quoted as ``"[a,b]"``; null as ``null``."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return '"[' + ",".join(csv_cell(v) for v in value) + ']"'
    return scala_str(value)


def write_csv_hook(path: Path, values: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(values)
    line = ",".join(csv_cell(values[n]) for n in names) + "\n"
    if not path.exists() or path.stat().st_size == 0:
        path.write_text(",".join(names) + "\n" + line)
    else:
        with path.open("a") as fh:
            fh.write(line)


class Engine:
    """Runs a plan. ``dry`` replaces the two external tasks by a record of what they received (exit 0 and an
    empty output folder): the data flow alone, at no cost."""

    def __init__(self, plan: Plan, root: Path, *, dry: bool = False, select: Callable[[dict], bool] | None = None,
                 first_samples: int | None = None, resubmissions: int = 3, job_environ: Mapping[str, str] | None
                 = None, lhs_seed: int = 0, genome: Mapping[str, Any] | None = None,
                 outer_sample: Mapping[str, Any] | None = None) -> None:
        self.plan = plan
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dry = dry
        self.select = select
        self.first_samples = first_samples
        self.resubmissions = resubmissions
        self.job_environ = dict(os.environ if job_environ is None else job_environ)
        self.lhs_seed = lhs_seed
        self.genome = dict(genome or {})
        self.outer_sample = dict(outer_sample) if outer_sample is not None else None
        self.vals = plan.vals()
        self.events: list[Event] = []
        self._ticket = itertools.count(1)
        self._depth = 0

    # -------------------------------------------------------------------------------------------- driving

    def run(self) -> list[Ctx]:
        return self.execute(self.plan.workflow(), [Ctx({}, 0)])

    def execute(self, item: Any, contexts: list[Ctx]) -> list[Ctx]:
        if isinstance(item, Node):
            return [self.run_node(item, c) for c in contexts]
        if isinstance(item, Task):
            return [self.run_node(Node(item), c) for c in contexts]
        if isinstance(item, Chain):
            for part in item.parts:
                contexts = self.execute(part, contexts)
            for c in contexts:
                self.run_hooks(item.hooks, c.values, c.ticket, "chain")
            return contexts
        if isinstance(item, DirectSampling):
            return [out for c in contexts for out in self.direct_sampling(item, c)]
        if isinstance(item, NSGA2):
            return [out for c in contexts for out in self.nsga2_one_evaluation(item, c)]
        raise Unsupported(f"cannot run {type(item).__name__}")

    def direct_sampling(self, ds: DirectSampling, ctx: Ctx) -> list[Ctx]:
        samples = self.samples(ds.sampling)
        if self._depth == 0 and self.outer_sample is not None:
            samples = [dict(self.outer_sample)]  # one configuration of the plan, as SingleRun would give it
        if self._depth == 0:
            if self.select is not None:
                samples = [s for s in samples if self.select(s)]
            if self.first_samples is not None:
                samples = samples[:self.first_samples]
        explored = {name for s in samples for name in s}
        out_names = evaluation_outputs(ds.evaluation)
        results = []
        self._depth += 1
        try:
            for sample in samples:
                ticket = next(self._ticket)
                for r in self.execute(ds.evaluation, [Ctx({**ctx.values, **sample}, ticket)]):
                    kept = r.values if out_names is None else {k: v for k, v in r.values.items() if k in out_names}
                    results.append((sample, Ctx(dict(kept), r.ticket)))
        finally:
            self._depth -= 1
        if not ds.aggregation:
            outs = []
            for sample, r in results:
                values = {**ctx.values, **sample, **r.values}
                self.run_hooks(ds.hooks, values, r.ticket, "DirectSampling")
                outs.append(Ctx(values, r.ticket))
            return outs
        aggregated = {}
        for agg in ds.aggregation:
            column = [r.values[agg.val.name] for _, r in results]
            if self.dry:
                column = [v if isinstance(v, (int, float)) else math.nan for v in column]
            function = self.plan.natives.get(agg.function)
            if function is None:
                raise Unsupported(f"aggregation function {agg.function}")
            aggregated[(agg.output or agg.val).name] = function(column)
        values = {k: v for k, v in ctx.values.items() if k not in explored and k not in aggregated}
        values.update(aggregated)
        self.run_hooks(ds.hooks, values, ctx.ticket, "DirectSampling")
        return [Ctx(values, ctx.ticket)]

    def nsga2_one_evaluation(self, evo: NSGA2, ctx: Ctx) -> list[Ctx]:
        """One evaluation of one genome (``genome``, else the first of each factor's values and the middle of its
        bounds), as the evolution's strained first task receives it (method.evolution ``EvolutionDSL.scala:
        175-224``, ``ScalingGenomeTask.scala:29-32``)."""
        genome = {}
        for f in evo.genome:
            genome[f.val.name] = (f.values[0] if f.values else _typed(f.val, (f.bounds[0] + f.bounds[1]) / 2))
        genome.update(self.genome)
        self._depth += 1
        try:
            results = self.execute(evo.evaluation, [Ctx({**ctx.values, **genome}, next(self._ticket))])
        finally:
            self._depth -= 1
        for r in results:
            missing = [o.name for o in evo.objective if o.name not in r.values]
            if missing:
                raise TaskFailure(f"objective(s) {missing} are not outputs of the evaluation")
        return results

    def samples(self, sampling: Any) -> list[dict[str, Any]]:
        if isinstance(sampling, Factor):
            if sampling.values is None:
                raise Unsupported(f"{sampling.val.name}: bounds outside an LHS or a genome")
            return [{sampling.val.name: _typed(sampling.val, v)} for v in sampling.values]
        if isinstance(sampling, Product):
            out = [{}]
            for part in sampling.parts:
                out = [{**a, **b} for a in out for b in self.samples(part)]
            return out
        if isinstance(sampling, LHS):
            rng = random.Random(self.lhs_seed)
            columns = {}
            for f in sampling.factors:
                lo, hi = f.bounds
                strata = list(range(sampling.sample))
                rng.shuffle(strata)
                columns[f.val.name] = [_typed(f.val, lo + (s + rng.random()) / sampling.sample * (hi - lo))
                                       for s in strata]
            return [{k: v[i] for k, v in columns.items()} for i in range(sampling.sample)]
        raise Unsupported(f"sampling {type(sampling).__name__}")

    # -------------------------------------------------------------------------------------------- tasks

    def run_node(self, node: Node, ctx: Ctx) -> Ctx:
        task = node.task
        received = dict(ctx.values) if node.strain else {k: v for k, v in ctx.values.items()
                                                           if k in task.input_names()}
        attempts = 0
        while True:
            try:
                out = self.perform(task, received)
                break
            except TaskFailure as exc:
                attempts += 1
                env = node.environment
                self.events.append(Event("failure", task.name, {"error": str(exc), "attempt": attempts}))
                if env is not None and env.batch:
                    if attempts > self.resubmissions:
                        raise EndlessResubmission(f"{task.name}: resubmitted {attempts - 1} times on "
                                                  f"{env.kind}, OpenMOLE has no limit: {exc}") from exc
                    continue
                raise ExecutionCancelled(f"{task.name}: {exc}") from exc
        result = {**received, **out} if node.strain else out
        self.events.append(Event("task", task.name, {"received": sorted(received), "result": dict(result)}))
        self.run_hooks(node.hooks, result, ctx.ticket, task.name)
        return Ctx(result, ctx.ticket)

    def perform(self, task: Task, received: Mapping[str, Any]) -> dict[str, Any]:
        """``InputOutputCheck.perform``: defaults, input check, the task, the outputs."""
        completed = dict(received)
        for d in task.defaults:
            if d.override or d.val.name not in completed:
                completed[d.val.name] = _typed(d.val, d.value)
        missing = [v.name for v in task.inputs if v.name not in completed]
        if missing:
            raise TaskFailure(f"Input data '{missing[0]}' has not been found (task {task.name})")
        produced = self.process(task, completed)
        merged = {**completed, **produced}
        missing = [o for o in task.output_names() if o not in merged]
        if missing:
            raise TaskFailure(f"Variable {missing[0]} not found in the output of {task.name}")
        return {o: merged[o] for o in task.output_names()}

    def process(self, task: Task, ctx: Mapping[str, Any]) -> dict[str, Any]:
        if task.kind == "EmptyTask":
            return {}
        if task.kind == "ScalaTask":
            try:
                port = ports.scala_task_port(task.args["code"])
            except ports.PortMismatch:
                if not self.dry:
                    raise
                # the data flow alone: an unported task's outputs are placeholders
                return {o: ctx.get(o, f"<{o} of {task.name}>") for o in task.output_names()}
            return port(task.args["code"], ctx, scala_str)
        if task.kind == "TryTask":
            try:
                return self.process(task.wrapped, ctx)
            except TaskFailure as exc:
                self.events.append(Event("caught", task.name, {"error": str(exc)}))
                return {}
        if self.dry:
            return self.dry_run(task, ctx)
        if task.kind == "ContainerTask":
            return self.container_task(task, ctx)
        if task.kind == "SystemExecTask":
            return self.system_exec_task(task, ctx)
        raise Unsupported(task.kind)

    def dry_run(self, task: Task, ctx: Mapping[str, Any]) -> dict[str, Any]:
        command = task.args["positional"][1] if task.kind == "ContainerTask" else task.args["command"][0]
        self.events.append(Event("dry", task.name, {"command": expand(command, ctx), "context": dict(ctx)}))
        out = {}
        for _, val in task.output_files:
            folder = self.root / f"dry-{uuid.uuid4()}"
            folder.mkdir()
            out[val.name] = folder
        if isinstance(task.args.get("returnValue"), ValRef):
            out[task.args["returnValue"].name] = 0
        return out

    # -------------------------------------------------------------------------------------------- ContainerTask

    def container_task(self, task: Task, ctx: Mapping[str, Any]) -> dict[str, Any]:
        args = task.args
        return_value = args.get("returnValue")
        error_on_return = args.get("errorOnReturnValue", True)
        ignore_ret = (not error_on_return) or isinstance(return_value, ValRef)
        execution_dir = self.root / f"task-{uuid.uuid4()}"
        execution_dir.mkdir()
        binds = [Bind(*b) for b in self._deploy(task.resources, ctx, execution_dir, container=True)]
        binds += [Bind(h.path, h.destination) for h in args.get("hostFiles", []) if isinstance(h, HostFile)]
        result_dir = self.root / f"result-{uuid.uuid4()}"
        result_dir.mkdir()
        commands, copies = container_commands(task, ctx, ignore_ret)
        mapping = [(origin, val, result_dir / directory / name) for origin, val, directory, name in copies]
        script = singularity_script(emulated_image_env("cpu") + task_variables(task, ctx) +
                                    [("HOME", CONTAINER_HOME)], commands)
        script_file = execution_dir / RUN_SCRIPT
        script_file.write_text(script)
        binds += [Bind(str(result_dir), RESULT_BIND), Bind(str(script_file), "/" + RUN_SCRIPT)]
        proc = run_isolated(["sh", "/" + RUN_SCRIPT], binds, {}, None, fresh_tmp=_fresh_tmp_possible())
        self.events.append(Event("container", task.name, {"script": script, "binds": [b.__dict__ for b in binds],
                                                          "returncode": proc.returncode, "stdout": proc.stdout,
                                                          "stderr": proc.stderr}))
        if error_on_return and not isinstance(return_value, ValRef) and proc.returncode != 0:
            raise TaskFailure(f'Process "{" ; ".join(commands)}" exited with an error code {proc.returncode} '
                              f"(it should equal 0).")
        out: dict[str, Any] = {}
        for _origin, val, file in mapping:
            if not file.exists():
                parent = file.parent
                where = (f"its parent directory {parent} contains [{', '.join(p.name for p in parent.iterdir())}]"
                         if parent.exists() else f"its parent directory {parent} doesn't exist either")
                raise TaskFailure(f"Output file {file} (stored in variable {val.name}: java.io.File) doesn't "
                                  f"exist, {where}\n--- stderr of the container ---\n{proc.stderr[-2000:]}")
            out[val.name] = file
        if isinstance(return_value, ValRef):
            out[return_value.name] = proc.returncode
        return out

    def _deploy(self, resources, ctx: Mapping[str, Any], directory: Path, container: bool) -> list[tuple]:
        """External.deployAndListInputFiles: each resource copied (or linked) under the task's folder."""
        out = []
        for r in resources:
            destination = expand(r.destination, ctx)
            if container:
                deployed = directory / hashlib.sha1(destination.encode()).hexdigest() / destination.lstrip("/")
            else:
                deployed = directory / destination
            deployed.parent.mkdir(parents=True, exist_ok=True)
            if r.source is None:
                empty = self.root / f"empty-{uuid.uuid4()}"
                empty.mkdir()
                deployed.symlink_to(empty)
            elif r.link:
                deployed.symlink_to(Path(r.source).resolve())
            elif Path(r.source).is_dir():
                shutil.copytree(r.source, deployed, symlinks=False)
            else:
                shutil.copy2(r.source, deployed)
            if container:
                out.append((str(deployed), _container_path(destination)))
        return out

    # -------------------------------------------------------------------------------------------- SystemExecTask

    def system_exec_task(self, task: Task, ctx: Mapping[str, Any]) -> dict[str, Any]:
        args = task.args
        command = args.get("command") or args["positional"][0]
        return_value = args.get("returnValue")
        error_on_return = args.get("errorOnReturnValue", True)
        tmp_dir = self.root / f"systemexec-{uuid.uuid4()}"
        tmp_dir.mkdir()
        self._deploy(task.resources, ctx, tmp_dir, container=False)
        first = command[0]  # SE/SystemExecTask.scala:123 `command.find`: the first command only
        env = dict(self.job_environ)
        env.update({expand(k, ctx): expand(v, ctx) for k, v in args.get("environmentVariables", [])})
        proc = subprocess.run(["bash", "-c", expand(first, ctx)], cwd=tmp_dir, env=env, capture_output=True,
                              text=True, timeout=900)
        self.events.append(Event("systemexec", task.name, {"command": expand(first, ctx), "cwd": str(tmp_dir),
                                                           "returncode": proc.returncode, "stdout": proc.stdout,
                                                           "stderr": proc.stderr}))
        if error_on_return and not isinstance(return_value, ValRef) and proc.returncode != 0:
            raise TaskFailure(f"Error executing command:\nbash -c {first}, return code was not 0 but "
                              f"{proc.returncode}\n{proc.stderr[-2000:]}")
        out: dict[str, Any] = {}
        for origin, val in task.output_files:
            file = tmp_dir / expand(origin, ctx)
            if not file.exists():
                raise TaskFailure(f"Output file {file} (stored in variable {val.name}: java.io.File) doesn't exist")
            kept = self.root / f"output-{uuid.uuid4()}"
            kept.mkdir()
            shutil.move(str(file), kept / file.name)
            out[val.name] = kept / file.name
        if isinstance(return_value, ValRef):
            out[return_value.name] = proc.returncode
        shutil.rmtree(tmp_dir, ignore_errors=True)  # TmpDirectory.withTmpDir
        return out

    # -------------------------------------------------------------------------------------------- hooks

    def run_hooks(self, hooks: Iterable[Hook], values: Mapping[str, Any], ticket: int, where: str) -> None:
        hook_values = {**values, "openmole$experiment": ticket}
        for hook in hooks:
            positional = hook.args.get("positional", [])
            if hook.kind == "CSVHook":
                path = Path(expand(str(positional[0]), hook_values))
                write_csv_hook(path, hook_values)
            elif hook.kind == "CopyFileHook":
                source = Path(values[positional[0].name])
                destination = Path(expand(str(positional[1]), hook_values))
                destination.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, destination, dirs_exist_ok=True)
                else:
                    shutil.copy2(source, destination)
            self.events.append(Event("hook", where, {"hook": hook.kind, "values": dict(hook_values)}))


def container_commands(task: Task, ctx: Mapping[str, Any], ignore_ret: bool) -> tuple[list[str], list[tuple]]:
    """ContainerTask.process's command list (``CT/ContainerTask.scala:482-510``): the command (with the return code
    kept when ``ignore_ret``), a copy of each output file into ``/_result_/<uuid>/``, the exit; and for each output
    file (origin, Val, uuid, file name)."""
    value = _drop_trailing_empty_lines(expand(task.args["positional"][1], ctx))
    commands = [f"{value} ; _PROCESS_RET_CODE_=$? ; true"] if ignore_ret else [value]
    copies = []
    for origin, val in task.output_files:
        directory = str(uuid.uuid4())
        resolved = _container_path(expand(origin, ctx))
        copies.append((origin, val, directory, Path(resolved).name))
        commands += [f'mkdir -p "{RESULT_BIND}/{directory}/"', f'cp -ra "{resolved}" "{RESULT_BIND}/{directory}/"']
    if ignore_ret:
        commands.append("exit $_PROCESS_RET_CODE_")
    return commands, copies


def task_variables(task: Task, ctx: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(expand(k, ctx), expand(v, ctx)) for k, v in task.args.get("environmentVariables", [])]


def singularity_script(variables: Sequence[tuple[str, str]], commands: Sequence[str]) -> str:
    """``Singularity.executeImage``'s ``_run_commands.sh`` (container ``Singularity.scala:277-288``)."""
    exports = "\n".join(f'export {n}="{v}"' for n, v in variables)
    body = "&& \\\n".join(c for c in commands if c.strip())
    return f"\n{exports}\n{body}\n        "


def _drop_trailing_empty_lines(s: str) -> str:
    lines = s.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _container_path(path: str, image_workdir: str = "/work") -> str:
    """``ContainerTask.pathResolver``: absolute as is, relative to the image's WORKDIR otherwise."""
    return path if path.startswith("/") else f"{image_workdir.rstrip('/')}/{path}"


def _fresh_tmp_possible() -> bool:
    """Singularity's --contain gives a fresh /tmp; not possible here when this checkout lives under /tmp."""
    return not (str(REPO_ROOT).startswith("/tmp/") or sys.prefix.startswith("/tmp/"))


def _typed(val: ValRef, value: Any) -> Any:
    if isinstance(value, Path) or val.type == "File":
        return Path(value)
    if val.type == "Double":
        return float(value)
    if val.type in ("Int", "Long"):
        if isinstance(value, float) and not value.is_integer():
            raise TaskFailure(f"{val.name}: {value} is not an Int")
        return int(value)
    if val.type == "Boolean":
        return bool(value)
    return value


def evaluation_outputs(item: Any) -> set[str] | None:
    """The names an evaluation passes on: its last task's declared outputs, or None (everything) when its last
    capsule is strained: a strained task or a nested sampling, whose output task is a Strain
    (``MapReduce.scala``: ``Strain(output)``; ``wrap``: ``lastEvaluation`` keeps ``evaluation.outputs``)."""
    if isinstance(item, Node):
        return None if item.strain else set(item.task.output_names())
    if isinstance(item, Task):
        return set(item.output_names())
    if isinstance(item, Chain):
        return evaluation_outputs(item.parts[-1])
    if isinstance(item, (DirectSampling, NSGA2)):
        return None
    raise Unsupported(f"outputs of {type(item).__name__}")


# ------------------------------------------------------------------------------------------------ the stand-in

def standin_command(log: Path) -> Path:
    """A folder holding an ``apptainer`` that records its arguments (one JSON line each, in ``log``) and runs the
    command in a private mount namespace with its ``-B`` binds, as Apptainer would."""
    folder = Path(subprocess.check_output(["mktemp", "-d", "/tmp/om-standin.XXXXXX"], text=True).strip())
    script = folder / "apptainer"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
                      f"from openmole.engine import apptainer_standin\nsys.exit(apptainer_standin(sys.argv[1:]))\n")
    script.chmod(0o755)
    return folder


def parse_apptainer_exec(argv: Sequence[str]) -> dict[str, Any]:
    """``apptainer exec [options] IMAGE COMMAND...``: the options the GPU path uses."""
    if not argv or argv[0] != "exec":
        raise SystemExit(f"stand-in: only `apptainer exec` is emulated, got {list(argv)[:3]}")
    flags, env, binds, i = [], {}, [], 1
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if a in ("-B", "--bind", "--env"):
            value = argv[i + 1]
            i += 2
        elif a.startswith(("--bind=", "--env=")):
            a, value = a.split("=", 1)
            i += 1
        else:
            flags.append(a)
            i += 1
            continue
        if a == "--env":
            k, v = value.split("=", 1)
            env[k] = v
        else:
            parts = value.split(":")
            binds.append({"source": parts[0], "destination": parts[1] if len(parts) > 1 else parts[0],
                          "options": parts[2] if len(parts) > 2 else ""})
    return {"flags": flags, "env": env, "binds": binds, "image": argv[i], "command": list(argv[i + 1:])}


def apptainer_standin(argv: Sequence[str]) -> int:
    parsed = parse_apptainer_exec(argv)
    host = dict(os.environ)
    image = Path(parsed["image"])
    if not image.is_file():
        print(f"FATAL:   could not open image {image}: failed to retrieve path for {image}: lstat {image}: no such "
              f"file or directory", file=sys.stderr)
        return 255
    env: dict[str, str] = {} if "--cleanenv" in parsed["flags"] else dict(host)
    env.update(emulated_image_env("gpu"))
    env.update({k[len("APPTAINERENV_"):]: v for k, v in host.items() if k.startswith("APPTAINERENV_")})
    env.update(parsed["env"])
    env.setdefault("HOME", host.get("HOME", "/root"))
    record = {**parsed, "argv": list(argv), "container_env": env}
    log = host.get(STANDIN_LOG)
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    binds = [Bind(b["source"], b["destination"], "ro" in b["options"].split(",")) for b in parsed["binds"]]
    proc = run_isolated(parsed["command"], binds, env, os.getcwd(), fresh_tmp=False)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


# ------------------------------------------------------------------------------------------------ rendering

def render_point(plan_name: str, settings: Settings, sample: Mapping[str, Any], root: Path,
                 image_env: Sequence[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The ContainerTask script and binds OpenMOLE would use for one point of a plan, for the container smoke
    test, which runs them in the real image: ``sample`` gives the explored values (defaults fill the rest),
    ``image_env`` the image config's Env (the Dockerfile's ENV when not given)."""
    plan = load_plan(plan_name, settings)
    engine = Engine(plan, root, dry=True)
    ctx = {d.val.name: _typed(d.val, d.value) for d in plan.value("pointDefaults").defaults}
    ctx.update(sample)
    task = plan.value("trainInContainer")
    commands, copies = container_commands(task, ctx, ignore_ret=True)
    variables = list(image_env if image_env is not None else image_environment(variant="cpu"))
    script = singularity_script(variables + task_variables(task, ctx) + [("HOME", CONTAINER_HOME)], commands)
    root.mkdir(parents=True, exist_ok=True)
    binds = engine._deploy(task.resources, ctx, root / "deployed", container=True)
    binds += [(h.path, h.destination) for h in task.args.get("hostFiles", [])]
    return {"script": script, "binds": binds, "result_directory": copies[0][2]}


def main(argv: Sequence[str]) -> int:
    """python -m openmole.engine render PLAN PLANS_DIR ROOT [--image-env FILE] NAME=VALUE...

    Writes ROOT/_run_commands.sh, the script OpenMOLE's ContainerTask runs for that point of PLAN (the plans in
    PLANS_DIR, settings from the OM_* variables), and prints its binds, `host<TAB>container` one a line, then
    `result<TAB><uuid>`. --image-env: a JSON list of "NAME=value" (`podman image inspect --format
    '{{json .Config.Env}}'`)."""
    args = list(argv)
    if len(args) < 4 or args[0] != "render":
        print(main.__doc__, file=sys.stderr)
        return 2
    image_env = None
    if "--image-env" in args:
        i = args.index("--image-env")
        image_env = [tuple(e.split("=", 1)) for e in json.loads(Path(args[i + 1]).read_text())]
        del args[i:i + 2]
    plan_name, workdir, root = args[1], Path(args[2]), Path(args[3])
    settings = Settings(work_directory=workdir, environ={k: v for k, v in os.environ.items() if k.startswith("OM_")})
    vals = load_plan(plan_name, settings).vals()
    sample = {}
    for item in args[4:]:
        k, v = item.split("=", 1)
        sample[k] = _typed(vals[k], v if vals[k].type == "String" else json.loads(v))
    rendered = render_point(plan_name, settings, sample, root, image_env)
    (root / RUN_SCRIPT).write_text(rendered["script"])
    for host, container in rendered["binds"]:
        print(f"{os.path.realpath(host)}\t{container}")
    print(f"result\t{rendered['result_directory']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
