"""Run the OpenMOLE plans, as OpenMOLE would, in the emulation of ``tests/openmole/engine.py``, and print the rows.

    .venv/bin/python scripts/openmole_emulated_runs.py [--plans-rev REV] [--work DIR]

On a synthetic cohort of 10 patients (2 folds, 64-px tiles at 1 µm/px) with the plans' defaults made small
(``epochs := 1``, ``max_train_tiles := 64``, the edit a user makes for a smoke run), it runs:

1. sweep.oms, one configuration, the shards folder missing on the host: every point a recorded failure (-1);
2. the same plan again, shards in place: both folds trained, rows appended, ``runs/<point_id>/`` filled;
3. lhs.oms, one configuration (simple_cnn): the sampled factors reach train;
4. nsga2.oms, one genome (simple_cnn): its folds, then the objectives;
5. sweep.oms on the GPU path (``local-gpu``, a recording stand-in for ``apptainer``).

``--plans-rev REV`` takes the plans from git revision REV instead of the working tree (e.g. the plans before the
output-file fix, to see every successful point recorded as failed). Needs root (private mount namespaces), as the
tests of ``tests/openmole`` do.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.openmole.dsl import Settings  # noqa: E402 - the checkout's test package, after its path
from tests.openmole.engine import (  # noqa: E402
    STANDIN_LOG,
    Engine,
    ExecutionCancelled,
    load_plan,
    namespaces_available,
    standin_command,
)

SHOWN = ("fold", "exitCode", "status", "error", "val_auc", "val_patient_auc")


def make_cohort(root: Path) -> tuple[Path, Path]:
    from python_task.data.splits import make_splits, write_splits
    from python_task.shards.extract import extract_cohort
    from python_task.shards.params import ExtractParams
    from python_task.synth.cohort import generate_cohort
    from python_task.synth.config import SynthConfig
    from python_task.wsi.cohort import read_cohort

    cohort = generate_cohort(root / "cohort", SynthConfig(patients=10, seed=5, slide_size=2048))
    shards = root / "shards"
    extract_cohort(read_cohort(cohort), shards, ExtractParams(tile_size=64, mpp=1.0), progress=False)
    splits = root / "splits.json"
    write_splits(make_splits(shards, 2, seed=0), splits)
    return shards, splits


def copy_plans(folder: Path, rev: str | None, splits: Path, shards: Path) -> None:
    folder.mkdir(parents=True)
    if rev is None:
        for script in (REPO / "openmole").glob("*.oms"):
            shutil.copy(script, folder / script.name)
    else:
        names = subprocess.check_output(["git", "-C", str(REPO), "ls-tree", "--name-only", rev, "openmole/"],
                                        text=True).split()
        for name in (n for n in names if n.endswith(".oms")):
            (folder / Path(name).name).write_text(subprocess.check_output(
                ["git", "-C", str(REPO), "show", f"{rev}:{name}"], text=True))
    shutil.copy(splits, folder / "splits.json")
    (folder / "shards").symlink_to(shards)


def small_defaults(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """The defaults edited where they are declared (factors.oms, or common.oms in older plans)."""
    home = "factors.oms" if (folder / "factors.oms").exists() else "common.oms"
    return {home: [("epochs := 10", "epochs := 1"), ("max_train_tiles := 0", "max_train_tiles := 64")]}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def show(title: str, table: Path, first: int = 0, keys: tuple[str, ...] = SHOWN) -> list[dict[str, str]]:
    print(f"== {title}")
    if not table.exists():
        print(f"   {table.name}: not written")
        return []
    found = rows(table)
    for row in found[first:]:
        print("  ", {k: row[k] for k in keys if k in row})
    return found


def engine(folder: Path, plan: str, root: Path, **kwargs) -> Engine:
    environ = kwargs.pop("environ", {})
    settings = Settings(work_directory=folder, environ=environ, edits=small_defaults(folder))
    return Engine(load_plan(plan, settings), root, first_samples=1, **kwargs)


def run(folder: Path, plan: str, root: Path, **kwargs) -> Engine:
    e = engine(folder, plan, root, **kwargs)
    try:
        e.run()
    except ExecutionCancelled as exc:
        print(f"   execution cancelled: {str(exc).splitlines()[0][:200]}")
    return e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans-rev", help="git revision to take openmole/*.oms from (default: the working tree)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    reason = namespaces_available()
    if reason:
        print(f"openmole_emulated_runs: the ContainerTask emulation {reason}", file=sys.stderr)
        return 2
    if args.plans_rev is not None and subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--quiet", "--verify", f"{args.plans_rev}^{{commit}}"],
            capture_output=True).returncode != 0:
        print(f"error: --plans-rev: {args.plans_rev!r} is not a commit of {REPO}", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="om-emulated-"))
    print(f"plans: {args.plans_rev or 'working tree'}; work folder: {work}")
    shards, splits = make_cohort(work / "data")
    folder = work / "my plans"
    copy_plans(folder, args.plans_rev, splits, shards)
    results = folder / "results"

    (folder / "shards").rename(folder / "shards.away")
    run(folder, "sweep.oms", work / "mole1")
    show("sweep.oms, run 1: the shards folder missing on the host", results / "points.csv")
    (folder / "shards.away").rename(folder / "shards")
    run(folder, "sweep.oms", work / "mole2")
    found = show("sweep.oms, run 2 (same plan, same results folder): shards in place", results / "points.csv", 2)
    for row in found[2:]:
        files = sorted(p.name for p in (results / row["out_dir"]).iterdir()) if "out_dir" in row else []
        print(f"   runs/<point_id> of fold {row['fold']}: {files}")
    show("sweep.oms, configs.csv", results / "configs.csv",
         keys=("arch", "lr", "folds_ok", "mean_val_auc", "mean_val_patient_auc"))

    run(folder, "lhs.oms", work / "mole3", select=lambda s: s.get("arch") == "simple_cnn")
    show("lhs.oms, one configuration (simple_cnn)", results / "lhs_points.csv")

    e = run(folder, "nsga2.oms", work / "mole4", genome={"arch": "simple_cnn"})
    show("nsga2.oms, one genome (simple_cnn): its folds", results / "nsga2_points.csv")
    objectives = [ev.detail["result"] for ev in e.events if ev.kind == "task" and ev.task == "objectives"]
    for result in objectives:
        print("   objectives:", {k: result[k] for k in ("mean_val_patient_auc", "neg_mean_val_patient_auc",
                                                       "model_params") if k in result})

    shutil.rmtree(results)
    (folder / "python-task-gpu.sif").write_bytes(b"a SIF stands here")
    log = work / "apptainer.jsonl"
    standin = standin_command(log)
    try:
        job_environ = {**os.environ, "PATH": f"{standin}:{os.environ['PATH']}", STANDIN_LOG: str(log),
                       "CUDA_VISIBLE_DEVICES": "0"}
        run(folder, "sweep.oms", work / "mole5", environ={"OM_ENV": "local-gpu"}, job_environ=job_environ)
    finally:
        shutil.rmtree(standin)
    found = show("sweep.oms on the GPU path (local-gpu, apptainer stand-in)", results / "points.csv")
    for row in found:
        files = sorted(p.name for p in (results / row["out_dir"]).iterdir()) if "out_dir" in row else []
        print(f"   runs/<point_id> of fold {row['fold']}: {files}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
