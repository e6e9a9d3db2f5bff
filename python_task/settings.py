"""Settings defined once: a dataclass field carries its help, its allowed values and its check.

``lr: float = setting(1e-3, help="learning rate", check=(lambda v: v > 0, "must be a positive number"))``
declares a field. :func:`check_settings` (called from ``__post_init__``) enforces every field's choices and check
and raises :class:`~python_task.errors.ConfigError` naming the field; :func:`settings_of` lists the fields with
their metadata for whoever offers them (the command line builds its options from them, the sweep runner checks
plan keys against them). A field without a :class:`Setting` is not offered.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any

from python_task.errors import ConfigError

METADATA_KEY = "setting"
Check = tuple[Callable[[float], bool], str]  # (predicate on a finite number, what it requires: "must be ...")


@dataclass(frozen=True)
class Setting:
    """How a field is offered and checked.

    ``choices``: the allowed values (listed in the help, refused otherwise). ``check``: a predicate on the
    (finite, numeric) value and the rule it states. ``flag``: the command line's spelling when it is not
    ``--<field-name>``, for a switch that turns a ``True`` default off (``--quiet`` for ``verbose``).
    ``expand``: a ``dict`` field whose keys are the settings of another dataclass, offered one by one
    (``augment_options``).
    """

    help: str
    choices: tuple[str, ...] = ()
    check: Check | None = None
    flag: str | None = None
    expand: type | None = None


def setting(default: Any = MISSING, *, help: str, choices: tuple[str, ...] = (), check: Check | None = None,
            flag: str | None = None, expand: type | None = None) -> Any:
    """A dataclass field with a :class:`Setting`; without ``default`` the field is required."""
    meta = {METADATA_KEY: Setting(help=help, choices=tuple(choices), check=check, flag=flag, expand=expand)}
    if expand is not None:
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class SettingField:
    """One offered field: its name, value type (``int`` for ``int | None``), default and :class:`Setting`."""

    name: str
    kind: type
    default: Any
    required: bool
    setting: Setting


def settings_of(cls: type) -> list[SettingField]:
    """The fields of dataclass ``cls`` that carry a :class:`Setting`, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(METADATA_KEY)
        if meta is None:
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if f.default is MISSING else f.default
        out.append(SettingField(f.name, _value_type(hints[f.name]), default, required, meta))
    return out


def check_settings(obj: Any) -> None:
    """Refuse a value outside its field's choices or failing its check: :class:`ConfigError` naming the field."""
    for f in settings_of(type(obj)):
        value = getattr(obj, f.name)
        rule = f.setting
        if rule.choices and value not in rule.choices:
            raise ConfigError(f.name, f"choose from {', '.join(rule.choices)} (got {value!r})")
        if rule.check is not None and value is not None:
            predicate, requirement = rule.check
            if not (_finite_number(value) and predicate(value)):
                raise ConfigError(f.name, f"{requirement} (got {value!r})")


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _value_type(hint: Any) -> type:
    """``int`` for ``int``, ``int | None`` or ``Optional[int]``; ``dict`` for ``dict[str, float]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _value_type(next(a for a in typing.get_args(hint) if a is not type(None)))
    return typing.get_origin(hint) or hint
