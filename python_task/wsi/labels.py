"""Annotation class names (as pathologists wrote them) to the target classes a model learns.

A labels file is YAML, one key per target class in index order, each listing the annotation class names that
mean it, plus an optional ``ignore`` list of names to skip silently::

    benign: [Biliary adenoma, Bile duct hamartoma]
    malignant: [Cholangiocarcinoma, CCA]
    ignore: [Tissue, mark]

Names match case-insensitively with surrounding (and repeated inner) whitespace ignored; each target also
matches its own name.

A QuPath derived class (``Cholangiocarcinoma: Grade 2``, the class ``Grade 2`` derived from ``Cholangiocarcinoma``)
matches its full name first, then its parent's (``Cholangiocarcinoma``), and so on down to its base class: a labels
file may list the derived class (to map or ignore it alone) or only its base (to map every class derived from it).
Spaces around the ``:`` do not matter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from python_task.errors import AnnotationError
from python_task.wsi.annotations import Region

DEFAULT_LABELS: dict[str, list[str]] = {
    "benign": ["benign", "Biliary adenoma", "Bile duct hamartoma", "Bile duct adenoma"],
    "malignant": ["malignant", "Cholangiocarcinoma", "CCA", "Intrahepatic cholangiocarcinoma"],
}
DEFAULT_CLASSES = tuple(DEFAULT_LABELS)  # the target classes without a labels file: benign, malignant
IGNORE_KEY = "ignore"
NO_CLASS = "<none>"
_MAX_LISTED = 20


_DERIVED = re.compile(r"\s*:\s*")


def normalize(name: str) -> str:
    """The key names are compared by: casefolded, whitespace trimmed and collapsed, ``A:B`` spelt ``a: b``."""
    return _DERIVED.sub(": ", " ".join(str(name).split())).casefold()


@dataclass(frozen=True)
class LabelMap:
    label_names: tuple[str, ...]
    aliases: Mapping[str, str]
    ignored: frozenset[str] = frozenset()

    def target_of(self, class_name: str, parts: Sequence[str] = ()) -> str | None:
        """The target class of an annotation class (its name, or the parts of a derived class, base first); None
        when it is unknown or ignored."""
        return self.resolve(class_name, parts)[1]

    def is_ignored(self, class_name: str, parts: Sequence[str] = ()) -> bool:
        return self.resolve(class_name, parts)[0] == "ignored"

    def resolve(self, class_name: str, parts: Sequence[str] = ()) -> tuple[str, str | None]:
        """``("mapped", target)``, ``("ignored", None)`` or ``("unknown", None)`` for an annotation class: the most
        specific of its names the labels file lists decides (the full derived name, then its parents')."""
        for key in _candidates(class_name, parts):
            if key in self.ignored:
                return "ignored", None
            if key in self.aliases:
                return "mapped", self.aliases[key]
        return "unknown", None

    def index_of(self, target: str) -> int:
        """Index of a target class in ``label_names``; KeyError when it is not one."""
        try:
            return self.label_names.index(target)
        except ValueError:
            raise KeyError(f"{target!r} is not a target class (one of {', '.join(self.label_names)})") from None


@dataclass(frozen=True)
class LabelledRegion:
    region: Region
    label: int
    target: str


def build_label_map(targets: Mapping[str, Sequence[str] | str | None], ignore: Sequence[str] | str = (),
                    path: str | Path | None = None) -> LabelMap:
    """Check and build a :class:`LabelMap` from ``{target: [class names]}``; AnnotationError(path, ...) when wrong."""
    if len(targets) < 2:
        found = ", ".join(repr(t) for t in targets) or "none"
        raise AnnotationError(path, f"needs at least 2 target classes, found {len(targets)}: {found}")
    aliases: dict[str, str] = {}
    for target, names in targets.items():
        target = _name(target, path, "target class")
        for name in [target, *_names(names, path, target)]:
            key = normalize(name)
            if not key:
                raise AnnotationError(path, f"an empty class name is listed under {target!r}")
            other = aliases.setdefault(key, target)
            if other != target:
                raise AnnotationError(path, f"class name {name!r} is listed under both {other!r} and {target!r}")
    ignored = set()
    for name in _names(ignore, path, IGNORE_KEY):
        key = normalize(name)
        if key in aliases:
            raise AnnotationError(path, f"class name {name!r} is both ignored and mapped to {aliases[key]!r}")
        ignored.add(key)
    label_names = tuple(_name(t, path, "target class") for t in targets)
    return LabelMap(label_names=label_names, aliases=aliases, ignored=frozenset(ignored))


def load_label_map(path: str | Path | None) -> LabelMap:
    """The labels YAML at ``path``, or :data:`DEFAULT_LABELS` when ``path`` is None."""
    if path is None:
        return build_label_map(DEFAULT_LABELS)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(path, "file not found") from None
    except UnicodeDecodeError:
        raise AnnotationError(path, "not a labels YAML file (not UTF-8 text)") from None
    except OSError as exc:
        raise AnnotationError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise AnnotationError(path, f"not valid YAML: {problem}{where}") from None
    if not isinstance(doc, dict):
        kind = "empty" if doc is None else type(doc).__name__
        raise AnnotationError(path, f"a labels file maps target classes to lists of annotation class names; "
                              f"this one is {kind} (e.g. 'malignant: [Cholangiocarcinoma, CCA]')")
    ignore: Any = ()
    targets: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(key, str) and key.strip().casefold() == IGNORE_KEY:
            ignore = value if value is not None else ()
        else:
            targets[_name(key, path, "target class")] = value
    return build_label_map(targets, ignore, path)


def label_regions(regions: Sequence[Region], label_map: LabelMap, *, ignore_unknown: bool = False,
                  path: str | Path | None = None) -> tuple[list[LabelledRegion], dict[str, int]]:
    """Attach a target class to every region.

    Returns the labelled regions and a count of the regions skipped: ``"ignored"`` for names in the labels
    file's ignore list, and one entry per unknown class name (``"<none>"`` for regions without a class) when
    ``ignore_unknown``; only non-zero counts appear. Without ``ignore_unknown`` any unknown name raises
    ``AnnotationError(path, ...)`` listing them all.
    """
    labelled: list[LabelledRegion] = []
    skipped: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for region in regions:
        status, target = label_map.resolve(region.class_name, region.class_path)
        if status == "ignored":
            skipped["ignored"] = skipped.get("ignored", 0) + 1
            continue
        if target is None:
            name = region.class_name.strip() or NO_CLASS
            unknown[name] = unknown.get(name, 0) + 1
            continue
        labelled.append(LabelledRegion(region=region, label=label_map.index_of(target), target=target))
    if unknown and not ignore_unknown:
        names = sorted(unknown)
        listed = ", ".join(f"'{n}'" for n in names[:_MAX_LISTED])
        if len(names) > _MAX_LISTED:
            listed += f" and {len(names) - _MAX_LISTED} more"
        raise AnnotationError(path, f"unknown class names: {listed} "
                              "(not in the labels file; use `ignore_unknown` to skip them)")
    for name, count in unknown.items():
        skipped[name] = skipped.get(name, 0) + count
    return labelled, skipped


def _candidates(class_name: str, parts: Sequence[str]) -> list[str]:
    """The normalised names an annotation class may be listed under, most specific first: ``a: b: c``, ``a: b``,
    ``a`` for a derived class given by its parts; the name alone otherwise."""
    keys = [normalize(class_name)]
    for k in range(len(parts) - 1, 0, -1):
        key = normalize(": ".join(parts[:k]))
        if key not in keys:
            keys.append(key)
    return keys


def _name(value: Any, path: str | Path | None, what: str) -> str:
    """A class name from YAML: strings as they are, numbers as written; booleans and nulls are refused
    because YAML reads unquoted ``yes``/``no``/``null`` as those."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise AnnotationError(path, f"{what} {value!r} is not a name (quote it in the YAML file)")


def _names(value: Any, path: str | Path | None, target: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return [_name(value, path, f"a class name under {target!r},")]
    if isinstance(value, list | tuple):
        return [_name(v, path, f"a class name under {target!r},") for v in value]
    raise AnnotationError(path, f"the class names under {target!r} must be a list of names, "
                          f"not {type(value).__name__}")
