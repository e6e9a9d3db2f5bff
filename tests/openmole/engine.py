"""An emulation of the OpenMOLE engine, for running the project's plans here, for real, without OpenMOLE.

It runs a plan evaluated by :mod:`dsl` the way OpenMOLE runs it, and each rule below is taken from OpenMOLE's
source: openmole/openmole at release v22.1 (2026-03-02), the version the project targets (line numbers are
v22.1's; dev f27e8a2c7a, 2026-03-05, agrees on every rule), and the container library openmole/container at
0c33be67ac, the commit OpenMOLE pins (``openmole/project/common.scala:19``). Paths: ``WF/`` =
``openmole/core/org.openmole.core.workflow/src/main/scala/org/openmole/core/workflow/``, ``CT/`` =
``openmole/plugins/org.openmole.plugin.task.container/src/main/scala/org/openmole/plugin/task/container/``,
``EXT/`` = ``openmole/plugins/org.openmole.plugin.task.external/src/main/scala/org/openmole/plugin/task/
external/``, ``SE/`` = ``openmole/plugins/org.openmole.plugin.task.systemexec/src/main/scala/org/openmole/plugin/
task/systemexec/``, ``BATCH/`` = ``openmole/plugins/org.openmole.plugin.environment.batch/src/main/scala/org/
openmole/plugin/environment/batch/``, ``CTX/`` = ``openmole/core/org.openmole.core.context/src/main/scala/org/
openmole/core/context/``, ``container:`` = openmole/container's ``src/main/scala/container/``. Check them again
when OpenMOLE changes (``test_rules.py`` re-reads the key lines where an OpenMOLE repository is at hand).

Data flow
    * A context holds one value per name; ``ctx ++ variables`` keeps the LAST value given for a name
      (``CTX/Context.scala:146,157``).
    * A task runs through ``InputOutputCheck.perform`` (``WF/task/InputOutputCheck.scala:96-111``): defaults
      complete the context it received, a missing input throws ("Input errors have been found in t: Input data
      'x: T' has not been found."), the task's process runs on the WHOLE completed context (not cut down to its
      inputs), its result is ``completed + produced``, a missing output throws ("Output errors in t: Output data
      'x: T' has not been found."), and the result is cut down to the declared outputs (``filterOutput``, 93-94);
      a strained task passes on the context it received as well (``WF/job/Job.scala:98-99``).
    * A transition delivers only the variables that are inputs (or ``:=`` defaults) of the next capsule; a
      strained capsule receives everything (``WF/transition/Transition.scala:82``, ``WF/mole/
      ContextAggregator.scala:31-58``, ``WF/mole/MoleCapsule.scala:131-145``). The first capsule of a mole
      execution is submitted with the whole context it is started with (``WF/mole/MoleExecution.scala:194-221,
      374-391``): :attr:`Ctx.submitted`.
    * A default fills a missing input; a value that arrives wins unless the default overrides
      (``openmole/core/org.openmole.core.argument/src/main/scala/org/openmole/core/argument/DefaultSet.scala:
      46-51``); a task's inputs include the vals of its defaults (``WF/task/Task.scala:213``).
    * DirectSampling is a strained sampler, a strained first task, the evaluation, a last task keeping the
      evaluation's outputs; with an aggregation, its hooks see the aggregated values and the context that reached
      the sampler, without the explored factors (``openmole/plugins/org.openmole.plugin.tool.pattern/src/main/
      scala/org/openmole/plugin/tool/pattern/MapReduce.scala:15-29``). Every sample gets a new ticket
      (``WF/transition/Transition.scala:234``).
    * A hook on a task sees that task's result and ``openmole$experiment``, the ticket
      (``WF/mole/MoleExecution.scala:294``).
    * TryTask: its inputs are the wrapped task's inputs plus its outputs, its defaults the wrapped task's
      (``WF/task/TryTask.scala:40-50``); it runs the wrapped task's PROCESS (no input check or default of its own)
      on the TryTask's whole context, and if that throws, returns that context as the result (57-66).
    * MoleTask (``WF/task/MoleTask.scala``): inputs = the root capsule's inputs, outputs = the last capsule's
      outputs, defaults = the root task's defaults (56-63); its process starts a new mole execution with the
      context it received (153: ``execution.run(Some(context))``), whose root capsule is submitted with that
      whole context (``MoleExecution.scala:391``), on a local environment of one thread whatever ``on env`` the
      inner capsules carry (122-138: no environment is passed); the result is the last capsule's job result
      (140-142, 158: ``JobFinished.context``, ``MoleExecution.scala:367-369``); a task failing inside cancels the
      inner execution, whose ``run`` rethrows (``MoleExecution.scala:359-366, 795-801``): the MoleTask throws.
      Its tickets are the inner execution's (``MoleExecution.scala:728``: the first is 1).
    * A task that throws cancels a local execution (``WF/mole/MoleExecution.scala:359-366``); on a batch
      environment the job is resubmitted with no limit (``BATCH/refresh/GetResultActor.scala:84-88`` ->
      ``BATCH/refresh/JobManager.scala:80-89`` -> ``BATCH/refresh/KillActor.scala:32-37``): here
      :class:`EndlessResubmission` after a few tries.

External tasks' output files (``EXT/External.scala:129-175``, ``External.fetchOutputFiles``), for ContainerTask
(``CT/ContainerTask.scala:618-625``, no work directory) and SystemExecTask (``SE/SystemExecTask.scala:145``, work
directory = the task's temporary folder): :func:`fetch_output_files`
    * The files are the declared output files (``outputFiles +=``) PLUS every File-typed value of the task's
      declared outputs already in the context it received (``contextFiles``, 129-130), distinct (141-143).
    * Every one must exist, else ``Output file <path> (stored in variable <x: T>) doesn't exist, its parent
      directory ...`` (145-153), the context's files too.
    * A file inside a work directory is replaced by its real path (155-157); the result is ``context ++
      files``, so a File the context already held for that name comes LAST and WINS over the file the task
      produced (136); then the outputs' files inside a work directory are moved out of it (137, 161-175).

ContainerTask (``CT/ContainerTask.scala:427-630`` ``process``, ``container:Singularity.scala:250-349``
``executeImage``)
    * Resources are copied (``link = true``: symlinked, an ``EmptyDirectory`` a link to a fresh empty folder)
      under the task's directory, at ``<sha1(destination)>/<destination>`` (``EXT/External.scala:79-120``,
      ``CT/ContainerTask.scala:475-479``); binds are ``hostFiles`` then resources, stably sorted by the depth of
      their destination, then ``/_result_``, then ``/_run_commands.sh`` (``CT/ContainerTask.scala:463-486, 529,
      541-570``; ``container:Singularity.scala:307-316, 343-344``); a relative destination is resolved against the
      image's WORKDIR (``CT/ContainerTask.scala:259-268``).
    * One script, ``/_run_commands.sh``, run with ``sh``: ``export NAME="value"`` for the image's ENV, then the
      task's ``environmentVariables``, then ``HOME=/home/user``; then the command (several joined with `` && ``)
      followed by ``; _PROCESS_RET_CODE_=$? ; true`` (when a return value is kept), ``mkdir -p "/_result_/<uuid>/"``
      and ``cp -ra "<output>" "/_result_/<uuid>/"`` per output file, and ``exit $_PROCESS_RET_CODE_``, joined with
      ``&& \\`` and a newline (``CT/ContainerTask.scala:488-527``, ``container:Singularity.scala:260, 273-289``).
      Singularity runs it with ``--no-home --contain --cleanenv``: no host variable gets in, ``/tmp`` is fresh
      (``container:Singularity.scala:330-347``).
    * A bind whose host path is missing stops Singularity before the script (exit 255).
    * With ``returnValue`` a non-zero exit does not throw; without, it throws ``Process "<command>" exited with an
      error code N (it should equal 0).`` (``CT/ContainerTask.scala:588-605``). Output files: see above.

SystemExecTask (``SE/SystemExecTask.scala:108-152``, ``SE/package.scala:213-223, 277-286, 329-354``)
    * The first command only (``command.find``, 123), as ``bash -c``, in a fresh temporary folder (112), with the
      job's environment plus ``environmentVariables``; resources relative to that folder (113), output files
      relative to it and moved out of it before it is deleted (145). A non-zero exit without ``returnValue``
      throws ``Error executing command:\\nbash -c <command>, return code was not 0 but N``.

CSVHook (``WF/hook/CSVHook.scala:34-44``, ``openmole/core/org.openmole.core.format/.../CSVFormat.scala``)
    * Every variable of the hook's context, columns sorted by name (a TreeMap, ``CTX/Context.scala:34``), values
      by ``toString`` with no quoting (arrays ``"[a,b]"``), ``,`` and ``\\n``; the header only when the file is
      missing or empty; later rows and later executions append. CopyFileHook copies (a folder: merged, links as
      links) to a destination expanded from the context (``openmole/plugins/org.openmole.plugin.hook.file/src/
      main/scala/org/openmole/plugin/hook/file/CopyFileHook.scala:79-95``, tool.file ``package.scala:121-131``).

Where this emulation must differ from a real node it says so: the "image" is this checkout's virtual environment
(``/opt/venv/bin`` of the image's PATH is replaced by it, and ``PYTHONPATH`` points at the checkout), the
container is a private mount namespace (``unshare --mount``, root only) over this machine's root with the binds at
their absolute paths, an empty read-only ``/home`` (the image has no ``/home/user``, and a container runs as the
caller's uid, which cannot create it), and the working folder is a fresh empty one when the host's ``/work`` (the
image's WORKDIR) is not free. The process runs as root here, not as the caller's uid: a write that only root may
make passes here. Not modelled either: the overlay a job's points share (SingularityOverlay(reuse = true)),
proxies, the variables Singularity adds, validation, job states, transfers of files to and from nodes.
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

def _image_stages(dockerfile: Path, variant: str) -> list[list[tuple[str, str]]]:
    """The instructions (word, rest) of the image's stage and of the stages it is built ``FROM``, from the image's
    own stage down to the first one: the CPU image is the Dockerfile's last stage, the GPU image ``runtime-gpu``."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current = last = None
    for instruction in _dockerfile_instructions(dockerfile.read_text()):
        word, _, rest = instruction.partition(" ")
        if word.upper() == "FROM":
            parts = rest.split()
            current = last = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else parts[0]
            stages[current] = (parts[0], [])
        elif current is not None:
            stages[current][1].append((word.upper(), rest))
    chain, stage = [], (last if variant == "cpu" else "runtime-gpu")
    while stage in stages:
        base, instructions = stages[stage]
        chain.append(instructions)
        stage = base
    return chain


def image_environment(dockerfile: Path = REPO_ROOT / "Dockerfile", variant: str = "cpu") -> list[tuple[str, str]]:
    """The ENV of an image, in order, as its config lists it; ``$PATH`` of the base image is python:3.11-slim's."""
    env: dict[str, str] = {"PATH": OFFICIAL_PYTHON_PATH}
    for instructions in reversed(_image_stages(dockerfile, variant)):
        for word, rest in instructions:
            if word == "ENV":
                for k, v in _env_pairs(rest):
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
    does, before anything runs (exit 255). ``/home`` is an empty read-only folder: the image has no ``/home/user``
    (the ``HOME`` OpenMOLE exports) and a container runs as the caller's uid, which cannot create it in an
    overlay or a read-only SIF; this also keeps the host's ``/home`` out of reach of a process run here as root."""
    tops = {b.destination.strip("/").split("/")[0] for b in binds}
    if cwd is None:  # the image's WORKDIR, unless this machine's /work must stay visible (it may hold the checkout)
        cwd = "/work" if not Path("/work").exists() else "/_workdir_"
        tops.add(cwd.strip("/").split("/")[0])
    private_home = "home" not in tops and _private_home_possible()
    skip = tops | ({"tmp"} if fresh_tmp else set()) | ({"home"} if private_home else set())
    q = shlex.quote
    # this run's own mount point, made here so that only it is removed after (another run's looks empty from
    # outside its namespace too)
    root = Path(subprocess.check_output(["mktemp", "-d", "/tmp/om-root.XXXXXX"], text=True).strip())
    lines = ["set -e", f"root={shlex.quote(str(root))}", 'mount -t tmpfs -o mode=0755 om-root "$root"']
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
    if fresh_tmp:  # container:Singularity.scala:330-347 --contain: /tmp and /var/tmp from a fresh --workdir
        lines.append('mkdir "$root/tmp" && mount -t tmpfs -o mode=1777 om-tmp "$root/tmp"')
        if Path("/var/tmp").is_dir() and "var" not in skip:
            lines.append('mount -t tmpfs -o mode=1777 om-vartmp "$root/var/tmp"')
    if private_home:
        lines.append('mkdir "$root/home" && mount -t tmpfs -o mode=0755,ro om-home "$root/home"')
    lines.append(f'mkdir -p "$root"{q(cwd)}')
    for b in binds:  # in the order given, as Singularity and Apptainer mount their -B binds
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
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()


# ------------------------------------------------------------------------------------------------ the engine

@dataclass
class Ctx:
    values: dict[str, Any]
    ticket: int
    # submitted straight to a capsule (the first capsule of a mole execution, ``MoleExecution.scala:391``), not
    # delivered by a transition: the capsule receives all of it, whatever its inputs
    submitted: bool = False


@dataclass
class Event:
    """What happened, for the tests to read: a task run, a failure caught or raised, a hook."""

    kind: str
    task: str
    detail: dict[str, Any] = field(default_factory=dict)


def expand(template: str, values: Mapping[str, Any]) -> str:
    """``ExpandedString``: ``${name}`` -> the value's ``toString`` (core.argument ``ExpandedString.scala:59-116,
    137-147``). Other ``${code}`` would be compiled as Scala: unsupported here."""
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
    empty output folder, through the same output-file rule): the data flow alone, at no cost. ``first_samples``
    and ``select`` cut down the outermost sampling, ``inner_samples`` the nested ones (the folds), to keep a test
    short."""

    def __init__(self, plan: Plan, root: Path, *, dry: bool = False, select: Callable[[dict], bool] | None = None,
                 first_samples: int | None = None, resubmissions: int = 3, job_environ: Mapping[str, str] | None
                 = None, lhs_seed: int = 0, genome: Mapping[str, Any] | None = None,
                 outer_sample: Mapping[str, Any] | None = None, inner_samples: int | None = None) -> None:
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
        self.inner_samples = inner_samples
        self.vals = plan.vals()
        self.events: list[Event] = []
        self._ticket = itertools.count(1)
        self._depth = 0
        self._mole_depth = 0  # > 0 inside a MoleTask's own mole execution

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
        elif self.inner_samples is not None:
            samples = samples[:self.inner_samples]
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
        received = dict(ctx.values) if node.strain or ctx.submitted else {k: v for k, v in ctx.values.items()
                                                                          if k in task.input_names()}
        attempts = 0
        while True:
            try:
                out = self.perform(task, received)
                break
            except TaskFailure as exc:
                attempts += 1
                # inside a MoleTask every capsule runs on the MoleTask's local environment (MoleTask.scala:122-138)
                env = node.environment if self._mole_depth == 0 else None
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
        """``InputOutputCheck.perform`` (``WF/task/InputOutputCheck.scala:96-111``): defaults, input check, the
        task's process on the whole completed context, ``completed + produced``, output check, the outputs."""
        completed = dict(received)
        for d in task.defaults:
            if d.override or d.val.name not in completed:
                completed[d.val.name] = _typed(d.val, d.value)
        missing = [v for v in task.inputs if v.name not in completed]
        if missing:
            errors = ", ".join("Input data '" + val_str(v) + "' has not been found" for v in missing)
            raise TaskFailure(f"Input errors have been found in {task.name}: {errors}.")
        produced = self.process(task, completed)
        merged = {**completed, **produced}
        missing = [v for v in dict((v.name, v) for v in task.outputs).values() if v.name not in merged]
        if missing:
            errors = ", ".join("Output data '" + val_str(v) + "' has not been found" for v in missing)
            raise TaskFailure(f"Output errors in {task.name}: {errors}.")
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
        if task.kind == "TryTask":  # WF/task/TryTask.scala:59-66: the wrapped task's process, on the whole context
            try:
                return self.process(task.wrapped, ctx)
            except TaskFailure as exc:
                self.events.append(Event("caught", task.name, {"error": str(exc)}))
                return {}
        if task.kind == "MoleTask":
            return self.mole_task(task, ctx)
        if self.dry:
            return self.dry_run(task, ctx)
        if task.kind == "ContainerTask":
            return self.container_task(task, ctx)
        if task.kind == "SystemExecTask":
            return self.system_exec_task(task, ctx)
        raise Unsupported(task.kind)

    def mole_task(self, task: Task, ctx: Mapping[str, Any]) -> dict[str, Any]:
        """``MoleTask``'s process (``WF/task/MoleTask.scala:97-158``): a new mole execution started with the whole
        context, its root capsule submitted with all of it, the result the last capsule's job result; a failure
        inside cancels that execution and the MoleTask throws."""
        chain = task.args["mole"]
        saved_ticket, self._ticket = self._ticket, itertools.count(2)  # the inner execution's tickets: 1 is the root's
        self._mole_depth += 1
        try:
            results = self.execute(chain, [Ctx(dict(ctx), 1, submitted=True)])
        except ExecutionCancelled as exc:
            raise TaskFailure(f"{task.name}: {exc}") from exc
        finally:
            self._mole_depth -= 1
            self._ticket = saved_ticket
        if not results:
            raise TaskFailure(f"Last capsule of {task.name} has never been executed.")
        return dict(results[-1].values)

    def dry_run(self, task: Task, ctx: Mapping[str, Any]) -> dict[str, Any]:
        """An external task that records the context it received and produces, for each output file, an empty
        folder; its result goes through the same output-file rule as a real run (:func:`fetch_output_files`)."""
        check_external_arguments(task)
        if task.kind == "ContainerTask":
            positional = task.args.get("positional", [])
            commands = positional[1] if len(positional) > 1 else task.args["command"]
            command = " && ".join(commands) if isinstance(commands, list) else commands
        else:
            command = task.args["command"][0]
        self.events.append(Event("dry", task.name, {"command": expand(command, ctx), "context": dict(ctx)}))
        work = self.root / f"dry-{uuid.uuid4()}"
        file_outputs = []
        for origin, val in task.output_files:
            produced = work / expand(origin, ctx).lstrip("/")
            produced.mkdir(parents=True)
            file_outputs.append((val, produced))
        work_directories = [work] if task.kind == "SystemExecTask" else []
        out = fetch_output_files(task.outputs, file_outputs, ctx, work_directories,
                                 self.root / f"externalresult-{uuid.uuid4()}")
        if isinstance(task.args.get("returnValue"), ValRef):
            out[task.args["returnValue"].name] = 0
        if task.kind == "SystemExecTask":
            shutil.rmtree(work, ignore_errors=True)
        return out

    # -------------------------------------------------------------------------------------------- ContainerTask

    def container_task(self, task: Task, ctx: Mapping[str, Any]) -> dict[str, Any]:
        """``ContainerTask.process`` (``CT/ContainerTask.scala:427-630``) on the whole context it is given."""
        check_external_arguments(task)
        args = task.args
        return_value, std_out, std_err = (args.get(k) for k in ("returnValue", "stdOut", "stdErr"))
        error_on_return = args.get("errorOnReturnValue", True)
        ignore_ret = (not error_on_return) or isinstance(return_value, ValRef)
        execution_dir = self.root / f"task-{uuid.uuid4()}"
        execution_dir.mkdir()
        volumes = [Bind(h.path, h.destination) for h in args.get("hostFiles", []) if isinstance(h, HostFile)]
        volumes += [Bind(*b) for b in self._deploy(task.resources, ctx, execution_dir, container=True)]
        volumes.sort(key=lambda b: _scala_split_length(b.destination, "/"))  # stable, as Scala's sortBy (463-473)
        result_dir = self.root / f"result-{uuid.uuid4()}"
        result_dir.mkdir()
        commands, copies = container_commands(task, ctx, ignore_ret)
        mapping = [(origin, val, result_dir / directory / name) for origin, val, directory, name in copies]
        script = singularity_script(emulated_image_env("cpu") + task_variables(task, ctx) +
                                    [("HOME", CONTAINER_HOME)], commands)
        script_file = execution_dir / RUN_SCRIPT
        script_file.write_text(script)
        binds = [*volumes, Bind(str(result_dir), RESULT_BIND), Bind(str(script_file), "/" + RUN_SCRIPT)]
        shell = ["sh", "-x"] if _container_system(task)[2].get("verbose") else ["sh"]
        proc = run_isolated([*shell, "/" + RUN_SCRIPT], binds, {}, None, fresh_tmp=_fresh_tmp_possible())
        self.events.append(Event("container", task.name, {"script": script, "binds": [b.__dict__ for b in binds],
                                                          "returncode": proc.returncode, "stdout": proc.stdout,
                                                          "stderr": proc.stderr}))
        if error_on_return and not isinstance(return_value, ValRef) and proc.returncode != 0:
            command = " ; ".join(command_values(task, ctx, ignore_ret))  # 597: the command alone, not the copies
            raise TaskFailure(f'Process "{command}" exited with an error code {proc.returncode} (it should equal '
                              f"0).\nThe last lines of the standard output were:\n{_tail(proc)}")
        try:
            out = fetch_output_files(task.outputs, [(val, file) for _, val, file in mapping], ctx, [], result_dir)
        except TaskFailure as exc:  # the emulation adds the container's stderr, to tell why
            raise TaskFailure(f"{exc}\n--- stderr of the container (emulation) ---\n{proc.stderr[-2000:]}") from exc
        if isinstance(return_value, ValRef):
            out[return_value.name] = proc.returncode
        if isinstance(std_out, ValRef):
            out[std_out.name] = proc.stdout
        if isinstance(std_err, ValRef):
            out[std_err.name] = proc.stderr
        return out

    def _deploy(self, resources, ctx: Mapping[str, Any], directory: Path, container: bool) -> list[tuple]:
        """External.deployAndListInputFiles (``EXT/External.scala:79-120``): each resource copied (``realFile.copy``:
        links inside a folder stay links; tool.file ``package.scala:121-131``), or linked to its canonical path,
        under the task's folder; an EmptyDirectory is a link to a fresh empty folder."""
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
                shutil.copytree(Path(r.source).resolve(), deployed, symlinks=True)
            else:
                shutil.copy2(Path(r.source).resolve(), deployed)
            if container:
                out.append((str(deployed), _container_path(destination)))
        return out

    # -------------------------------------------------------------------------------------------- SystemExecTask

    def system_exec_task(self, task: Task, ctx: Mapping[str, Any]) -> dict[str, Any]:
        """``SystemExecTask`` (``SE/SystemExecTask.scala:108-152``) on the whole context it is given."""
        check_external_arguments(task)
        args = task.args
        command = args.get("command") or args["positional"][0]
        return_value, std_out, std_err = (args.get(k) for k in ("returnValue", "stdOut", "stdErr"))
        error_on_return = args.get("errorOnReturnValue", True)
        tmp_dir = self.root / f"systemexec-{uuid.uuid4()}"  # 112: tmpDirectory.withTmpDir
        tmp_dir.mkdir()
        try:
            self._deploy(task.resources, ctx, tmp_dir, container=False)  # 113: relative to the temporary folder
            first = expand(command[0], ctx)  # 123 `command.find`: the first command only; 126: from the context
            env = dict(self.job_environ)  # SE/package.scala:213-221: the job's environment, then the task's
            env.update({expand(k, ctx): expand(v, ctx) for k, v in args.get("environmentVariables", [])})
            proc = subprocess.run(["bash", "-c", first], cwd=tmp_dir, env=env, capture_output=True, text=True,
                                  timeout=900)
            self.events.append(Event("systemexec", task.name, {"command": first, "cwd": str(tmp_dir),
                                                               "returncode": proc.returncode,
                                                               "stdout": proc.stdout, "stderr": proc.stderr}))
            if error_on_return and not isinstance(return_value, ValRef) and proc.returncode != 0:
                raise TaskFailure(f"Error executing command:\nbash -c {first}, return code was not 0 but "
                                  f"{proc.returncode}\n--- stderr (emulation) ---\n{proc.stderr[-2000:]}")
            file_outputs = [(val, tmp_dir / expand(origin, ctx)) for origin, val in task.output_files]
            out = fetch_output_files(task.outputs, file_outputs, ctx, [tmp_dir],
                                     self.root / f"externalresult-{uuid.uuid4()}")  # 145
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(std_out, ValRef):
            out[std_out.name] = proc.stdout
        if isinstance(std_err, ValRef):
            out[std_err.name] = proc.stderr
        if isinstance(return_value, ValRef):
            out[return_value.name] = proc.returncode
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
                # tool.file package.scala:126-131: a folder merged into the destination, links copied as links
                if source.is_dir():
                    shutil.copytree(source, destination, dirs_exist_ok=True, symlinks=True)
                else:
                    shutil.copy2(source, destination, follow_symlinks=False)
            self.events.append(Event("hook", where, {"hook": hook.kind, "values": dict(hook_values)}))


def command_values(task: Task, ctx: Mapping[str, Any], ignore_ret: bool) -> list[str]:
    """``commandValue`` (``CT/ContainerTask.scala:499-504``): each command expanded, trailing empty lines dropped;
    when the return code is kept, all of them joined with `` && `` and followed by ``; _PROCESS_RET_CODE_=$? ;
    true``."""
    command = task.args["positional"][1] if len(task.args.get("positional", [])) > 1 else task.args["command"]
    values = [_drop_trailing_empty_lines(expand(c, ctx)) for c in (command if isinstance(command, list) else
                                                                   [command])]
    return [f"{' && '.join(values)} ; _PROCESS_RET_CODE_=$? ; true"] if ignore_ret else values


def container_commands(task: Task, ctx: Mapping[str, Any], ignore_ret: bool) -> tuple[list[str], list[tuple]]:
    """ContainerTask.process's command list (``CT/ContainerTask.scala:494-527, 566``): the command (with the
    return code kept when ``ignore_ret``), a copy of each output file into ``/_result_/<uuid>/``, the exit; and for
    each output file (origin, Val, uuid, file name)."""
    commands = command_values(task, ctx, ignore_ret)
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
    """``Singularity.executeImage``'s ``_run_commands.sh`` (``container:Singularity.scala:273-289``)."""
    exports = "\n".join(f'export {n}="{v}"' for n, v in variables)
    body = "&& \\\n".join(c for c in commands if c.strip())
    return f"\n{exports}\n{body}\n        "


def _drop_trailing_empty_lines(s: str) -> str:
    lines = s.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _container_path(path: str, image_workdir: str | None = None) -> str:
    """``ContainerTask.pathResolver`` (``CT/ContainerTask.scala:259-268``): absolute as is, relative to the image's
    WORKDIR otherwise (``/`` when the image has none)."""
    workdir = image_workdir if image_workdir is not None else image_working_directory()
    return path if path.startswith("/") else f"{(workdir or '/').rstrip('/')}/{path}"


def image_working_directory(dockerfile: Path = REPO_ROOT / "Dockerfile", variant: str = "cpu") -> str:
    """The image's WorkingDir: the last ``WORKDIR`` of its stage or the stages it is built ``FROM`` ("" if none)."""
    for instructions in _image_stages(dockerfile, variant):
        workdirs = [rest.strip() for word, rest in instructions if word == "WORKDIR"]
        if workdirs:
            return workdirs[-1]
    return ""


def val_str(val: ValRef) -> str:
    """``Val.toString`` (``CTX/Val.scala:329``): ``name: type``, the type as its manifest prints it."""
    java = {"String": "java.lang.String", "File": "java.io.File"}
    return f"{val.name}: {java.get(val.type, val.type)}"


def _scala_split_length(s: str, sep: str) -> int:
    """``s.split(sep).length`` in Java: trailing empty strings are dropped."""
    parts = s.split(sep)
    while parts and parts[-1] == "":
        parts.pop()
    return len(parts)


def _tail(proc: subprocess.CompletedProcess, size: int = 10000) -> str:
    """The last lines of the output (``CT/ContainerTask.scala:590-595``; here stdout then stderr, not interleaved)."""
    text = (proc.stdout + proc.stderr)[-size:]
    lines = text.split("\n")[1:] if len(text) >= size else text.split("\n")
    return "\n".join(f"|{line}" for line in lines)


def context_files(outputs: Sequence[ValRef], context: Mapping[str, Any]) -> list[tuple[str, Path]]:
    """``External.contextFiles`` (``EXT/External.scala:129-130``): the File values, in the context, of the declared
    outputs (a Context is a TreeMap: in the order of their names)."""
    names = {v.name for v in outputs if v.type == "File" and v.name in context}
    return [(name, Path(context[name])) for name in sorted(names)]


def _is_a_parent_of(directory: Path, file: Path) -> bool:
    """``isAParentOf`` (openmole tool.file ``package.scala:486``): a prefix of the canonical paths' strings."""
    return os.path.realpath(file).startswith(os.path.realpath(directory))


def _absolute(path: Path) -> str:
    return str(path if path.is_absolute() else Path.cwd() / path)  # Java's getAbsolutePath: not normalised


def fetch_output_files(outputs: Sequence[ValRef], file_outputs: Sequence[tuple[ValRef, Path]],
                       context: Mapping[str, Any], work_directories: Sequence[Path],
                       result_directory: Path) -> dict[str, Any]:
    """``External.fetchOutputFiles`` (``EXT/External.scala:132-175``), for ContainerTask (no work directory) and
    SystemExecTask (its temporary folder): the declared output files (``file_outputs``: the Val and the file it
    resolves to) and the File values of ``outputs`` already in ``context``, distinct, must all exist; the result is
    ``context ++ files`` (the context's own File comes last, and wins), with the outputs' files inside a work
    directory moved out of it into ``result_directory``."""
    files = list(dict.fromkeys([(v.name, Path(f)) for v, f in file_outputs] + context_files(outputs, context)))
    for name, file in files:  # 145-153
        if not file.exists():
            parent = Path(_absolute(file)).parent
            if parent.exists():
                where = f"its parent directory {parent} contains [{', '.join(os.listdir(parent))}]"
            else:
                where = f"its parent directory {parent} doesn't exist either"
            type_of = next((v for v in outputs if v.name == name), ValRef(name, "File"))
            raise TaskFailure(f"Output file {_absolute(file)} (stored in variable {val_str(type_of)}) doesn't "
                              f"exist, {where}")
    fetched = [(name, file.resolve(strict=True) if any(_is_a_parent_of(w, file) for w in work_directories)
                else file) for name, file in files]  # 155-157: realFile
    output_context = dict(context)
    for name, file in fetched:  # 136: Context ++ keeps the last value of a name (CTX/Context.scala:157)
        output_context[name] = file
    moved = {}
    for name, file in context_files(outputs, output_context):  # 137, 161-175
        if any(_is_a_parent_of(w, file) for w in work_directories):
            new_dir = result_directory / f"outputFile{uuid.uuid4()}"
            new_dir.mkdir(parents=True)
            shutil.move(str(file), new_dir / file.name)
            moved[name] = new_dir / file.name
    return {**output_context, **moved}


_CONTAINER_ARGUMENTS = {"positional", "command", "containerSystem", "hostFiles", "environmentVariables",
                        "errorOnReturnValue", "returnValue", "stdOut", "stdErr", "clearCache"}
_SYSTEM_EXEC_ARGUMENTS = {"positional", "command", "errorOnReturnValue", "returnValue", "stdOut", "stdErr",
                          "environmentVariables"}


def _container_system(task: Task) -> tuple[str, list, dict]:
    system = task.args.get("containerSystem")
    return system if system is not None else ("SingularityOverlay", [], {})  # CT/ContainerTask.scala:133


def check_external_arguments(task: Task) -> None:
    """An argument of an external task that this emulation does not model is an error, not ignored."""
    allowed = _CONTAINER_ARGUMENTS if task.kind == "ContainerTask" else _SYSTEM_EXEC_ARGUMENTS
    unknown = sorted(set(task.args) - allowed)
    if unknown:
        raise Unsupported(f"{task.kind} {task.name}: argument(s) {unknown} not modelled by the emulation")
    if task.kind == "ContainerTask":
        kind, positional, named = _container_system(task)
        if kind not in ("SingularityOverlay", "SingularityMemory") or positional:
            raise Unsupported(f"{task.name}: containerSystem {kind}{positional or ''} not modelled")
        embeds = named.get("embedResources", True)  # CT/ContainerSystem.scala:24-25: true unless said otherwise
        if embeds and any(r.source is not None for r in task.resources):
            raise Unsupported(f"{task.name}: embedResources = true (the default) copies file resources into the "
                              f"image and links them (CT/ContainerTask.scala:114-122, 494-497): not modelled")


def _private_home_possible() -> bool:
    """The emulated container's /home is an empty one unless this checkout or its Python live under /home."""
    return not (str(REPO_ROOT).startswith("/home/") or sys.prefix.startswith("/home/")
                or str(Path(sys.executable).resolve()).startswith("/home/"))


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
    binds = [(h.path, h.destination) for h in task.args.get("hostFiles", [])]  # CT/ContainerTask.scala:463-473
    binds += engine._deploy(task.resources, ctx, root / "deployed", container=True)
    binds.sort(key=lambda b: _scala_split_length(b[1], "/"))
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
