"""Mapping annotation class names to target classes."""

from __future__ import annotations

from pathlib import Path

import pytest
from shapely.geometry import box

from python_task.errors import TaskError
from python_task.wsi.annotations import Region
from python_task.wsi.labels import DEFAULT_LABELS, LabelMap, label_regions, load_label_map
from tests.conftest import cli_line


def _regions(*classes: str) -> list[Region]:
    return [Region(i, c, box(i, 0, i + 1, 1), "qupath") for i, c in enumerate(classes)]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_map() -> None:
    labels = load_label_map(None)
    assert labels.label_names == ("benign", "malignant")
    assert labels.index_of("benign") == 0 and labels.index_of("malignant") == 1
    for target, names in DEFAULT_LABELS.items():
        for name in names:
            assert labels.target_of(name) == target
    assert labels.target_of("Cholangiocarcinoma") == "malignant"
    assert labels.target_of("  bile DUCT   hamartoma ") == "benign"
    assert labels.target_of("cca") == "malignant"
    assert labels.target_of("Tissue") is None
    assert labels.ignored == frozenset()
    with pytest.raises(KeyError):
        labels.index_of("other")


def test_yaml_map_keeps_key_order_and_matches_case_insensitively(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "malignant: [Cholangiocarcinoma, CCA]\n"
                           "benign:\n  - Biliary adenoma\n  - Bile duct hamartoma\n"
                           "Normal: liver\n"
                           "ignore: [Tissue, mark]\n")
    labels = load_label_map(path)
    assert isinstance(labels, LabelMap)
    assert labels.label_names == ("malignant", "benign", "Normal")
    assert labels.target_of("CHOLANGIOCARCINOMA") == "malignant"
    assert labels.target_of("biliary Adenoma") == "benign"
    assert labels.target_of("Liver") == "Normal"  # a single string value
    assert labels.target_of("normal") == "Normal"  # a target matches its own name
    assert labels.target_of("benign") == "benign"
    assert labels.target_of("tissue") is None and labels.target_of("Mark") is None
    assert labels.ignored == frozenset({"tissue", "mark"})
    assert labels.index_of("Normal") == 2
    assert "ignore" not in labels.label_names


def test_label_regions(tmp_path: Path) -> None:
    labels = load_label_map(_yaml(tmp_path, "benign: [Biliary adenoma]\nmalignant: [CCA]\nignore: [Tissue]\n"))
    regions = _regions("CCA", "biliary adenoma", "Tissue", "tissue", "Malignant")
    labelled, skipped = label_regions(regions, labels)
    assert [(lr.region.index, lr.target, lr.label) for lr in labelled] == [
        (0, "malignant", 1), (1, "benign", 0), (4, "malignant", 1)]
    assert skipped == {"ignored": 2}


def test_unknown_names_are_listed(tmp_path: Path) -> None:
    regions = _regions("CCA", "mark", "Tissue", "mark", "", "benign")
    with pytest.raises(TaskError) as excinfo:
        label_regions(regions, load_label_map(None), path="slide.geojson")
    message = str(excinfo.value)
    assert message == ("slide.geojson: unknown class names: '<none>', 'Tissue', 'mark' "
                       "(not in the labels file; use `ignore_unknown` to skip them)")
    assert excinfo.value.path == "slide.geojson"
    assert cli_line(excinfo.value) == ("error: slide.geojson: unknown class names: '<none>', 'Tissue', 'mark' "
                                       "(not in the labels file; use --ignore-unknown to skip them)")


def test_ignore_unknown_counts_per_name() -> None:
    regions = _regions("CCA", "mark", "Tissue", "mark", "", "benign")
    labelled, skipped = label_regions(regions, load_label_map(None), ignore_unknown=True)
    assert [lr.target for lr in labelled] == ["malignant", "benign"]
    assert skipped == {"mark": 2, "Tissue": 1, "<none>": 1}


@pytest.mark.parametrize("text, cause", [
    ("malignant: [CCA]\nbenign: [cca]\n", "'cca' is listed under both 'malignant' and 'benign'"),
    ("malignant: [benign]\nbenign: [x]\n", "listed under both"),
    ("malignant: [CCA]\n", "at least 2 target classes"),
    ("malignant: [CCA]\nignore: [x]\n", "at least 2 target classes"),
    ("- CCA\n- benign\n", "this one is list"),
    ("", "this one is empty"),
    ("just a string\n", "this one is str"),
    ("malignant: [CCA\nbenign: [x]\n", "not valid YAML"),
    ("malignant: {a: 1}\nbenign: [x]\n", "must be a list of names"),
    ("malignant: [yes]\nbenign: [x]\n", "quote it"),
    ("malignant: [CCA]\nbenign: [x]\nignore: [cca]\n", "both ignored and mapped"),
])
def test_malformed_labels_files(tmp_path: Path, text: str, cause: str) -> None:
    path = _yaml(tmp_path, text)
    with pytest.raises(TaskError, match=cause.replace("[", r"\[")) as excinfo:
        load_label_map(path)
    assert excinfo.value.path == str(path)
    assert "\n" not in str(excinfo.value) and "labels.yaml" in str(excinfo.value)


def test_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="file not found"):
        load_label_map(tmp_path / "missing.yaml")


def test_ignored_wins_over_an_alias_in_a_hand_built_map() -> None:
    labels = LabelMap(label_names=("a", "b"), aliases={"a": "a", "b": "b", "x": "a"}, ignored=frozenset({"x"}))
    assert labels.target_of(" X ") is None and labels.target_of("A") == "a"
    assert label_regions(_regions("x", "b"), labels)[1] == {"ignored": 1}
