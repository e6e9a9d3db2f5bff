"""``TrainConfig``: every setting of one training run, defined once.

Each field carries its help, its allowed values and its check (:func:`python_task.settings.setting`). From that
one definition come the checks run when a config is built (errors name the field, e.g. ``batch_size``), the
``train`` command's options (:func:`train_options`: the command line builds its parser from them, the sweep
runner checks plan keys and writes command lines with them) and ``config.json``. Adding an option is one field
here, plus the code that uses it.

The ``augment`` string is parsed once, here, into :attr:`TrainConfig.augmentations` (method names) and
:attr:`TrainConfig.augment_settings` (their ranges); the rest of training reads those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from python_task.data.sampling import BALANCE_MODES
from python_task.errors import ConfigError
from python_task.settings import Setting, check_settings, setting, settings_of
from python_task.training.architectures import ARCHITECTURES, INPUT_SCALINGS
from python_task.training.calibration import CALIBRATIONS
from python_task.training.metrics import AGGREGATIONS
from python_task.transforms.augmentations import AUGMENT_ENGINES, AugmentOptions, as_options, parse_augment
from python_task.transforms.stain import STAIN_METHODS

OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISION_MODES = ("auto", "on", "off")
# Settings that may change between a killed run and its resumption without invalidating the checkpoint.
RESUME_FREE_FIELDS = frozenset({"workers", "verbose", "tensorboard"})

_POSITIVE = (lambda v: v > 0, "must be a positive number")
_AT_LEAST_ONE = (lambda v: v >= 1, "must be at least 1")
_NOT_NEGATIVE = (lambda v: v >= 0, "must be 0 or more")
# NumPy's and Keras's seeding take 0 to 2**32 - 1; training derives more seeds by adding up to a few thousand
MAX_SEED = 2**31 - 1
_SEED = (lambda v: float(v).is_integer() and 0 <= v <= MAX_SEED, f"must be a whole number from 0 to {MAX_SEED}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run; written to ``config.json``."""

    shards: Path = setting(help="folder of shards with manifest.csv")
    splits: Path = setting(help="splits JSON from `split`")
    fold: int = setting(help="validation fold", check=_NOT_NEGATIVE)
    arch: str = setting(help="architecture", choices=tuple(ARCHITECTURES))
    out: Path = setting(help="output folder (re-running resumes it)")
    lr: float = setting(1e-3, help="learning rate", check=_POSITIVE)
    batch_size: int = setting(32, help="batch size", check=_AT_LEAST_ONE)
    epochs: int = setting(10, help="maximum epochs", check=_AT_LEAST_ONE)
    optimizer: str = setting("adam", help="optimiser", choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, help="weight decay", check=_NOT_NEGATIVE)
    dropout: float = setting(0.3, help="dropout before the classifier", check=(lambda v: 0 <= v < 1,
                                                                                "must be in [0, 1)"))
    augment: str = setting("flip,rot90", help="comma-separated augmentations, e.g. flip,rot90,elastic,hed; none for "
                           "none")
    augment_on: str = setting("auto", choices=AUGMENT_ENGINES,
                              help="where augmentation runs: pipeline = OpenCV in the reader threads, fast on a CPU; "
                                   "model = Keras layers on the backend's device; auto = model with a GPU, else "
                                   "pipeline")
    stain: str = setting("none", help="stain normalisation", choices=STAIN_METHODS)
    stain_reference: Path | None = setting(None, help="reference tile (image or .npy) for stain normalisation")
    aggregation: str = setting("mean", choices=AGGREGATIONS,
                               help="tiles -> slide and patient score: mean probability, median, q90 = 90th "
                                    "percentile, top10 = mean of the highest tenth, smoothed_max = highest 3 x 3 "
                                    "neighbourhood mean; predict and evaluate use the run's")
    calibration: str = setting("platt", choices=CALIBRATIONS,
                               help="tile probabilities calibrated on patients the model did not fit on: platt = "
                                    "Platt scaling (the heat-map's colours mean the same on every slide), none = "
                                    "the network's own")
    calibration_folds: int = setting(2, check=(lambda v: v == 0 or v >= 2, "must be 0 or at least 2"),
                                     help="inner cross-fitting folds over the training patients: their out-of-fold "
                                          "predictions, with the tuning patients', set the slide threshold (costs "
                                          "about calibration_folds - 1 more trainings); 0 = the tuning patients "
                                          "alone")
    seed: int = setting(0, help="random seed", check=_SEED)
    weights: Path | None = setting(None, help="pretrained weights from a local file (never downloaded)")
    freeze_backbone: bool = setting(False, help="train only the head")
    unfreeze_at: int = setting(0, help="epoch at which a frozen backbone is fine-tuned, 0 = never",
                               check=_NOT_NEGATIVE)
    input_size: int | None = setting(None, help="resize tiles to this size inside the model (default: tile size)",
                                     check=_AT_LEAST_ONE)
    input_scaling: str = setting("auto", choices=INPUT_SCALINGS,
                                 help="input scaling inside the model: grey = each tile to grey and standardised "
                                      "(the slide's stain, hue, intensity and contrast, cannot be a shortcut); "
                                      "tile = each tile standardised per channel (keeps hue); architecture = the "
                                      "backbone's own (ImageNet) scaling; auto = architecture for a "
                                      "keras.applications backbone given `weights`, else grey")
    balance: str = setting("none", help="class balancing of training batches", choices=BALANCE_MODES)
    class_weights: bool = setting(False, help="weight the loss by inverse class frequency")
    patience: int = setting(5, help="early-stopping patience in epochs, 0 = off", check=_NOT_NEGATIVE)
    mixed_precision: str = setting("auto", help="mixed float16, auto: on when a GPU is present",
                                   choices=PRECISION_MODES)
    max_train_tiles: int = setting(0, help="seeded random subset of training tiles, 0 = all", check=_NOT_NEGATIVE)
    max_val_tiles: int = setting(0, help="seeded random subset of validation tiles, 0 = all", check=_NOT_NEGATIVE)
    base_filters: int = setting(32, help="width of simple_cnn / unet_encoder", check=_AT_LEAST_ONE)
    workers: int = setting(2, help="threads reading tiles", check=_AT_LEAST_ONE)
    tensorboard: bool = setting(True, help="do not write TensorBoard logs", flag="--no-tensorboard")
    verbose: bool = setting(True, help="no progress output", flag="--quiet")
    augment_options: dict[str, float] = setting(help="ranges of the augmentations", expand=AugmentOptions)
    # derived in __post_init__, not settings of their own: ``augment`` parsed, ``augment_options`` checked
    augmentations: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False, default=())
    augment_settings: AugmentOptions = dataclasses.field(init=False, repr=False, compare=False,
                                                         default=AugmentOptions())

    def __post_init__(self) -> None:
        check_settings(self)
        # parsed once: the rest of training reads these typed values, never the strings
        object.__setattr__(self, "augmentations", parse_augment(self.augment))
        object.__setattr__(self, "augment_settings", as_options(dict(self.augment_options)))
        if self.weights is not None and not Path(self.weights).exists():
            raise ConfigError("weights", "weights file not found", path=self.weights)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d = {k: (str(v) if isinstance(v, Path) else dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
        return d

    def comparable(self) -> dict[str, Any]:
        """The settings a resumed or finished run must share with this one (see :data:`RESUME_FREE_FIELDS`)."""
        return comparable_settings(self.to_json())


def comparable_settings(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a saved ``config.json`` (or :meth:`TrainConfig.to_json`) that identifies a run."""
    names = {f.name for f in dataclasses.fields(TrainConfig) if f.init}
    return {k: v for k, v in saved.items() if k in names and k not in RESUME_FREE_FIELDS}


# --------------------------------------------------------------------------------------------- the train options

@dataclass(frozen=True)
class TrainOption:
    """One option of the ``train`` command: ``key`` is how a sweep plan names it (and the parser's ``dest``),
    ``flag`` how the command line spells it; it sets ``field`` of :class:`TrainConfig` (an entry of
    ``augment_options`` when ``group`` is set). ``default`` is the option's value when not given, ``fallback``
    the setting's value then (they differ for the augmentation ranges, unset unless given)."""

    key: str
    flag: str
    field: str
    kind: type
    default: Any
    required: bool
    setting: Setting
    group: str | None = None
    fallback: Any = None


def train_options() -> dict[str, TrainOption]:
    """Every option of ``train``, by key, generated from :class:`TrainConfig` (and :class:`AugmentOptions` for
    the augmentation ranges, which default to unset: the :class:`AugmentOptions` default applies)."""
    out: dict[str, TrainOption] = {}
    for f in settings_of(TrainConfig):
        if f.setting.expand is not None:
            for sub in settings_of(f.setting.expand):
                out[sub.name] = TrainOption(sub.name, _flag(sub.name), sub.name, sub.kind, None, False, sub.setting,
                                            group=f.name, fallback=sub.default)
            continue
        flag = f.setting.flag or _flag(f.name)
        key = flag[2:].replace("-", "_")
        default = False if f.setting.flag else f.default  # a switch that turns a default off is off by default
        out[key] = TrainOption(key, flag, f.name, f.kind, default, f.required, f.setting, fallback=default)
    return out


def config_from_options(values: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from option values by key (as the parser gives them): switches that turn a default
    off are inverted, the augmentation ranges given are gathered into ``augment_options``."""
    fields: dict[str, Any] = {}
    for key, option in train_options().items():
        if key not in values:
            continue
        value = values[key]
        if option.group is not None:
            if value is not None:
                fields.setdefault(option.group, {})[option.field] = value
        elif option.setting.flag is not None and option.kind is bool:
            fields[option.field] = not value
        else:
            fields[option.field] = value
    return TrainConfig(**fields)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
