"""openmole/factors.oms: generated from train's options and metrics, and up to date."""

from __future__ import annotations

import pytest

from python_task.experiments import openmole_factors as gen
from python_task.training.config import train_options
from python_task.training.metrics import RESULT_METRICS


def test_the_checked_in_file_is_what_the_generator_writes():
    assert gen.OUTPUT.read_text(encoding="utf-8") == gen.render(), (
        "openmole/factors.oms is out of date: run `python -m python_task.experiments.openmole_factors`")


def test_every_factor_and_metric_is_declared_with_trains_default():
    text = gen.render()
    options = train_options()
    for key in gen.PLAN_FACTORS:
        assert f"val {key} = Val[" in text and f" --{key.replace('_', '-')} " in text, key
        if key != "fold":
            expected = gen.PLAN_DEFAULTS.get(key, options[key].fallback)
            if key in gen.PLUS_JOINED:
                expected = expected.replace(",", "+")
            assert f"  {key} := {gen.scala_literal(expected)}" in text, key
    for metric in RESULT_METRICS:
        assert f"val {metric} = Val[Double]" in text and f'val {metric} = metric("{metric}")' in text
    assert "--augment $(echo ${augment} | tr + ,)" in text, "CSVHook does not quote: '+' in the plans"


def test_a_new_sweepable_option_is_one_key(monkeypatch):
    """The 8 edits a new factor needed in common.oms are one key here: its Val, the list every task passes on, its
    default (train's), the command's flag and the point's id all follow."""
    monkeypatch.setattr(gen, "PLAN_FACTORS", (*gen.PLAN_FACTORS, "balance"))
    text = gen.render()
    assert "val balance = Val[String]" in text and ", seed, balance)" in text
    assert '  balance := "none"' in text and "--balance ${balance} --no-tensorboard" in text
    assert '"balance-" + balance, "fold" + fold).mkString("_")' in text


def test_a_factor_that_is_no_train_option_is_refused(monkeypatch):
    monkeypatch.setattr(gen, "PLAN_FACTORS", (*gen.PLAN_FACTORS, "learning_rate"))
    with pytest.raises(ValueError, match=r"\['learning_rate'\] are not options of train"):
        gen.render()


def test_scala_literals():
    assert gen.scala_literal(0.001) == "0.001" and gen.scala_literal(0.0) == "0.0" and gen.scala_literal(1e-5) == "1e-05"
    assert gen.scala_literal(True) == "true" and gen.scala_literal('a"b') == '"a\\"b"' and gen.scala_literal(3) == "3"
