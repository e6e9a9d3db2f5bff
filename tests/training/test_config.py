"""Training options are defined once, in TrainConfig: the train parser, sweep plan validation, the error messages
and the OpenMOLE train command all follow it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from python_task import cli
from python_task.errors import ConfigError
from python_task.experiments import sweep
from python_task.settings import setting, settings_of
from python_task.training import config
from python_task.training.config import TrainConfig, config_from_options, train_options
from python_task.transforms.augmentations import AugmentOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"shards": Path("s"), "splits": Path("s.json"), "fold": 0, "arch": "simple_cnn", "out": Path("o")}


def train_help() -> str:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction))  # noqa: SLF001
    return sub.choices["train"].format_help()


def parse_train(*extra: str) -> dict:
    args = cli.build_parser().parse_args(["train", "--shards", "s", "--splits", "s.json", "--fold", "0", "--arch",
                                          "simple_cnn", "--out", "o", *extra])
    return vars(args)


def test_every_setting_is_an_option_of_the_parser_with_the_same_default():
    text = train_help()
    for option in train_options().values():
        assert option.flag in text, option.flag
    assert config_from_options(parse_train()) == TrainConfig(**REQUIRED)  # the parser's defaults are the config's
    cfg = config_from_options(parse_train("--quiet", "--no-tensorboard", "--elastic-alpha", "4", "--batch-size", "8"))
    assert not cfg.verbose and not cfg.tensorboard and cfg.batch_size == 8
    assert cfg.augment_options == {"elastic_alpha": 4.0} and cfg.augment_settings.elastic_alpha == 4.0
    augment_flags = {o.flag for o in train_options().values() if o.group == "augment_options"}
    assert augment_flags == {"--" + f.name.replace("_", "-") for f in settings_of(AugmentOptions)}


def test_checks_name_the_field_and_the_command_line_names_the_flag():
    with pytest.raises(ConfigError) as err:
        TrainConfig(**REQUIRED, batch_size=0)
    assert err.value.setting == "batch_size" and str(err.value) == "batch_size: must be at least 1 (got 0)"
    assert cli.error_line(err.value, cli.option_flags(cli.build_parser())) == \
        "error: --batch-size: must be at least 1 (got 0)"
    for bad, field in (({"lr": float("nan")}, "lr"), ({"optimizer": "rmsprop"}, "optimizer"),
                       ({"augment": "flip,blur"}, "augment"), ({"augment_options": {"hed_sigma": 2.0}}, "hed_sigma"),
                       ({"arch": "vgg99"}, "arch"), ({"stain": "vahadane"}, "stain")):
        with pytest.raises(ConfigError) as err:
            TrainConfig(**{**REQUIRED, **bad})
        assert err.value.setting == field, bad


def test_augment_is_parsed_once_into_typed_values():
    cfg = TrainConfig(**REQUIRED, augment="Flip+rot90,flip", augment_options={"elastic_sigma": 3.0})
    assert cfg.augmentations == ("flip", "rot90")
    assert cfg.augment_settings == AugmentOptions(elastic_sigma=3.0)
    assert cfg.to_json()["augment"] == "Flip+rot90,flip"  # config.json keeps what was asked, as before
    assert "augmentations" not in cfg.to_json() and dataclasses.replace(cfg, augment="none").augmentations == ()


def test_a_new_option_is_one_field(monkeypatch, tmp_path, capsys):
    """A throwaway option added to TrainConfig shows in ``train --help``, parses, is checked with its flag in the
    message, is accepted as a plan key and written into the point's command line."""
    plan = {"shards": "shards", "splits": "splits.json", "factors": {"arch": ["simple_cnn"], "fold": [0]},
            "fixed": {"throwaway_knob": 0.25}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert "--throwaway-knob" not in train_help()
    with pytest.raises(ConfigError, match="not train options: throwaway_knob"):
        sweep.load_plan(path)

    @dataclasses.dataclass(frozen=True)
    class WithKnob(TrainConfig):
        throwaway_knob: float = setting(0.5, help="a knob only this test has",
                                        check=(lambda v: 0 <= v <= 1, "must be in [0, 1]"))

    monkeypatch.setattr(config, "TrainConfig", WithKnob)
    assert re.search(r"--throwaway-knob THROWAWAY_KNOB\s+a knob only this test has \(default 0.5\)", train_help())
    assert config_from_options(parse_train("--throwaway-knob", "0.75")).throwaway_knob == 0.75
    loaded = sweep.load_plan(path)
    command = sweep.train_command(loaded, sweep.expand_points(loaded)[0], tmp_path / "point")
    assert command[command.index("--throwaway-knob") + 1] == "0.25"
    assert cli.main(["train", "--shards", "s", "--splits", "s.json", "--fold", "0", "--arch", "simple_cnn", "--out",
                     str(tmp_path / "o"), "--throwaway-knob", "2"]) == 1
    assert capsys.readouterr().err.strip() == "error: --throwaway-knob: must be in [0, 1] (got 2.0)"


def test_the_openmole_train_command_uses_train_options_only():
    """``trainCommand`` of openmole/factors.oms, read with a plain regex: every ``--flag`` is a train option, every
    ``--x-y ${x_y}`` substitutes the Val named like the option's key, and the required options are there."""
    source = (REPO_ROOT / "openmole" / "factors.oms").read_text(encoding="utf-8")
    match = re.search(r'^val\s+trainCommand\s*=\s*"([^"\n]*)"$', source, re.M)
    assert match, "factors.oms defines trainCommand"
    command = match.group(1)
    assert "python -m python_task train " in command
    by_flag = {o.flag: o for o in train_options().values()}
    used = re.findall(r"(--[a-z][a-z0-9-]*)(?:\s+(\S+))?", command)
    assert used
    for flag, value in used:
        assert flag in by_flag, f"{flag} is not a train option"
        val = re.search(r"\$\{(\w+)\}", value or "")
        if val and by_flag[flag].kind is not bool:
            assert val.group(1) == by_flag[flag].key, f"{flag} is given ${{{val.group(1)}}}"
    required = {o.flag for o in train_options().values() if o.required}
    assert required <= {flag for flag, _ in used}, sorted(required - {flag for flag, _ in used})


def test_every_numeric_option_has_a_range_check():
    """A number the program cannot use is refused when the config is made, naming its flag, not deep in
    training (``--max-train-tiles -5`` was ``error: train: ValueError: negative dimensions are not allowed``)."""
    numeric = [o for o in train_options().values() if o.kind in (int, float) and not o.setting.choices]
    unchecked = [o.flag for o in numeric if o.setting.check is None]
    assert not unchecked, f"numeric train options without a range check: {unchecked}"


@pytest.mark.parametrize(("field", "bad"), [("max_train_tiles", -5), ("max_val_tiles", -1), ("base_filters", 0),
                                            ("workers", 0), ("unfreeze_at", -1), ("input_size", 0), ("seed", -1),
                                            ("seed", 2**32), ("seed", 1.5)])
def test_out_of_range_numbers_are_refused_naming_the_field(field, bad):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**REQUIRED, **{field: bad})
    assert err.value.setting == field and repr(bad) in err.value.cause


def test_a_negative_tile_limit_is_one_line_naming_the_flag(capsys):
    code = cli.main(["train", "--shards", "s", "--splits", "s.json", "--fold", "0", "--arch", "simple_cnn", "--out",
                     "o", "--max-train-tiles", "-5"])
    assert code == 1
    assert capsys.readouterr().err.strip() == "error: --max-train-tiles: must be 0 or more (got -5)"
