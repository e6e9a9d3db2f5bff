"""The data flow of every plan, run by the engine emulation in dry mode: each factor of each sampling and genome
reaches the training point (see :mod:`dataflow`), and the check catches the plans as they were before the fix."""

from __future__ import annotations

import pytest

from .dataflow import check_plan
from .dsl import Settings

# lrFromLog10 as lhs.oms and nsga2.oms used it before it became a Strain (a plain ScalaTask: it passes on its
# declared outputs only).
UNSTRAINED_LR_FROM_LOG10 = '''val lrFromLog10 = ScalaTask("""
  val lr = math.pow(10.0, log10_lr)
""") set (
  (inputs, outputs) += log10_lr,
  outputs += lr
)'''


def _strained_definition(plans) -> str:
    src = (plans / "common.oms").read_text()
    start = src.index("val lrFromLog10 = Strain(")
    end = src.index("\n)\n", start) + 2
    return src[start:end]


@pytest.mark.parametrize("name", ["sweep.oms", "lhs.oms", "nsga2.oms"])
@pytest.mark.parametrize("env", ["local", "slurm-gpu"])
def test_every_factor_reaches_the_point(plans, tmp_path, name, env):
    report = check_plan(name, Settings(work_directory=plans, environ={"OM_ENV": env}), tmp_path / "run")
    assert not report.problems, report.problems
    assert report.received["fold"] == 0
    for factor, value in report.sample.items():
        if factor in report.received:
            assert report.received[factor] == value, factor


def test_lhs_factors_all_differ_from_the_defaults(plans, tmp_path):
    report = check_plan("lhs.oms", Settings(work_directory=plans), tmp_path / "run")
    assert set(report.sample) == {"log10_lr", "weight_decay", "dropout", "elastic_alpha", "arch", "augment"}
    assert report.received["lr"] == pytest.approx(10 ** report.sample["log10_lr"])
    for factor in ("weight_decay", "dropout", "elastic_alpha", "arch", "augment"):
        assert report.received[factor] == report.sample[factor]
    assert f"--dropout {report.sample['dropout']!r}".replace("'", "") in report.command


@pytest.mark.parametrize("name", ["lhs.oms", "nsga2.oms"])
def test_the_check_fails_on_the_unstrained_lr_task(plans, tmp_path, name):
    """lhs.oms and nsga2.oms as shipped before: every factor but log10_lr silently replaced by its default."""
    edits = {"common.oms": [(_strained_definition(plans), UNSTRAINED_LR_FROM_LOG10)]}
    report = check_plan(name, Settings(work_directory=plans, edits=edits), tmp_path / "run")
    dropped = {p.split(":")[0] for p in report.problems}
    expected = {"arch", "augment", "weight_decay", "dropout", "elastic_alpha"} if name == "lhs.oms" else \
        {"arch", "dropout", "augment"}
    assert expected <= dropped, report.problems
    assert all("dropped by lrFromLog10" in p for p in report.problems if p.split(":")[0] in expected)


def test_the_check_fails_on_a_command_value_the_point_does_not_declare(plans, tmp_path):
    """A Val in the train command that is not among `factors`, the inputs of the training task (factors.oms edited
    by hand instead of generated)."""
    edits = {"factors.oms": [("val patience = Val[Int]", "val patience = Val[Int]\nval base_filters = Val[Int]"),
                             ("--patience ${patience}", "--patience ${patience} --base-filters ${base_filters}")]}
    with pytest.raises(Exception, match="base_filters"):
        check_plan("sweep.oms", Settings(work_directory=plans, edits=edits), tmp_path / "run")
