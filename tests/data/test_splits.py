"""Patient-level folds (``split``) and the leak guard ``load_fold``, on fake shard folders (a manifest.csv and
empty shard files: nothing here opens HDF5)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from python_task.data.splits import FoldAssignment, load_fold, make_splits, read_splits, write_splits
from python_task.errors import TaskError
from python_task.shards.manifest import manifest_digest, read_manifest

COLUMNS = ["slide_id", "patient_id", "diagnosis", "shard", "n_tiles", "n_benign", "n_malignant", "codec",
           "tile_size", "mpp"]


def cohort(n_malignant: int = 5, n_benign: int = 5) -> list[tuple[str, str, int]]:
    """(patient, diagnosis, number of slides): slides cycle 1, 2, 3 so several patients have 2-3 slides."""
    out = []
    for i in range(n_malignant + n_benign):
        out.append((f"P{i + 1:02d}", "malignant" if i < n_malignant else "benign", 1 + i % 3))
    return out


def manifest_rows(patients, with_diagnosis: bool = True) -> list[dict]:
    rows = []
    for p, (patient, diagnosis, n_slides) in enumerate(patients):
        for s in range(n_slides):
            slide = f"{patient}_S{s + 1}"
            benign = 10 + 3 * p + s
            # a malignant patient's first slide has malignant tiles; its others may be benign-only
            malignant = (20 + p) if diagnosis == "malignant" and s == 0 else 0
            rows.append({"slide_id": slide, "patient_id": patient, "diagnosis": diagnosis if with_diagnosis else "",
                         "shard": f"{slide}.h5", "n_tiles": benign + malignant, "n_benign": benign,
                         "n_malignant": malignant, "codec": "jpeg", "tile_size": 256, "mpp": 0.5})
    return rows


def write_manifest(folder: Path, rows: list[dict], touch: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if touch:
        for row in rows:
            (folder / row["shard"]).touch()
    return folder


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_manifest(tmp_path / "shards", manifest_rows(cohort()))


@pytest.fixture
def split_file(shards, tmp_path) -> Path:
    path = tmp_path / "splits.json"
    write_splits(make_splits(shards, 3, seed=0), path)
    return path


def one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def val_assignment(splits: dict) -> dict[str, int]:
    return {p: f["fold"] for f in splits["folds"] for p in f["val_patients"]}


# ------------------------------------------------------------------------------------------------ make_splits

def test_every_patient_in_one_validation_fold_and_slides_follow_patients(shards):
    splits = make_splits(shards, 3, seed=0)
    patients = {p for p, _, _ in cohort()}
    assert splits["n_folds"] == 3 and len(splits["folds"]) == 3 and [f["fold"] for f in splits["folds"]] == [0, 1, 2]
    seen = [p for f in splits["folds"] for p in f["val_patients"]]
    assert sorted(seen) == sorted(patients)  # each patient validated exactly once
    slide_patient = splits["slides"]
    assert set(slide_patient) == {r["slide_id"] for r in manifest_rows(cohort())}
    for f in splits["folds"]:
        assert f["val_patients"] and f["val_slides"]
        assert not set(f["train_patients"]) & set(f["val_patients"])
        assert set(f["train_patients"]) | set(f["tune_patients"]) | set(f["val_patients"]) == patients
        assert not set(f["train_slides"]) & set(f["val_slides"])
        assert set(f["train_slides"]) | set(f["tune_slides"]) | set(f["val_slides"]) == set(slide_patient)
        assert {slide_patient[s] for s in f["val_slides"]} == set(f["val_patients"])
        assert {slide_patient[s] for s in f["train_slides"]} == set(f["train_patients"])
        for key in ("val_patients", "val_slides", "train_patients", "train_slides"):
            assert f[key] == sorted(f[key])


def test_folds_are_stratified(tmp_path):
    folder = write_manifest(tmp_path / "s", manifest_rows(cohort(5, 5)))
    for k in (2, 3, 5):
        splits = make_splits(folder, k, seed=3)
        for f in splits["folds"]:
            diagnoses = [splits["patients"][p] for p in f["val_patients"]]
            assert set(diagnoses) == {"benign", "malignant"}, (k, f)
            assert abs(diagnoses.count("malignant") - diagnoses.count("benign")) <= 1
        assert splits["method"] == "StratifiedGroupKFold" and splits["warnings"] == []


def test_seeded_and_deterministic(shards):
    a, b = make_splits(shards, 3, seed=0), make_splits(shards, 3, seed=0)
    assert a == b
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert val_assignment(make_splits(shards, 3, seed=1)) != val_assignment(a)
    assert make_splits(shards, 3, seed=1)["seed"] == 1


def test_tile_counts_per_side(shards):
    rows = {r["slide_id"]: r for r in manifest_rows(cohort())}
    splits = make_splits(shards, 3, seed=0)
    assert splits["label_names"] == ["benign", "malignant"]
    total = {c: sum(r[f"n_{c}"] for r in rows.values()) for c in ("benign", "malignant")}
    for f in splits["folds"]:
        for side in ("train", "tune", "val"):
            expected = {c: sum(rows[s][f"n_{c}"] for s in f[f"{side}_slides"]) for c in ("benign", "malignant")}
            assert f["tile_counts"][side] == expected
        assert {c: sum(f["tile_counts"][side][c] for side in ("train", "tune", "val")) for c in total} == total
        assert f["tile_counts"]["val"]["malignant"] > 0  # stratified: malignant tiles in every validation set


def test_json_content(shards, tmp_path):
    splits = make_splits(shards, 3, seed=0)
    path = tmp_path / "out" / "splits.json"
    write_splits(splits, path)
    data = json.loads(path.read_text())
    assert {"format_version", "seed", "n_folds", "manifest_digest", "label_names", "patients", "slides",
            "folds"} <= set(data)
    assert data["manifest_digest"] == manifest_digest(shards)
    assert data["patients"] == {p: d for p, d, _ in cohort()}
    for f in data["folds"]:
        assert {"fold", "val_patients", "val_slides", "train_patients", "train_slides", "tile_counts"} <= set(f)
    assert not [p for p in path.parent.iterdir() if p.name != "splits.json"]  # no temporary left behind


def test_diagnosis_derived_from_tiles(tmp_path):
    rows = manifest_rows(cohort(), with_diagnosis=False)
    # P06 is benign by cohort, but one of its slides has malignant tiles: the patient becomes malignant
    for r in rows:
        if r["slide_id"] == "P06_S3":  # not its first slide
            r["n_malignant"], r["n_tiles"] = 4, r["n_tiles"] + 4
    folder = write_manifest(tmp_path / "s", rows)
    patients = make_splits(folder, 3)["patients"]
    expected = {p: d for p, d, _ in cohort()} | {"P06": "malignant"}
    assert patients == expected
    # P02 (malignant) has a benign-only second slide: still malignant
    assert patients["P02"] == "malignant"


def test_given_diagnosis_wins_per_slide_and_is_case_insensitive(tmp_path):
    rows = manifest_rows(cohort(), with_diagnosis=False)
    rows[0]["diagnosis"] = "Malignant"
    for r in rows:
        if r["patient_id"] == "P02":
            r["diagnosis"] = "benign"  # its tiles say malignant, the pathologist says benign
    patients = make_splits(write_manifest(tmp_path / "s", rows), 2)["patients"]
    assert patients["P01"] == "malignant" and patients["P02"] == "benign" and patients["P03"] == "malignant"


def test_unknown_diagnosis_is_refused(tmp_path):
    rows = manifest_rows(cohort())
    rows[3]["diagnosis"] = "CCA"
    folder = write_manifest(tmp_path / "s", rows)
    with pytest.raises(TaskError, match="CCA") as exc:
        make_splits(folder, 3)
    one_line_naming(exc, folder / "manifest.csv")


def test_fold_counts_out_of_range(shards):
    for k in (1, 0, -2):
        with pytest.raises(TaskError, match="at least 2"):
            make_splits(shards, k)
    with pytest.raises(TaskError, match="only 10 patients: cannot make 11") as exc:
        make_splits(shards, 11)
    one_line_naming(exc, shards / "manifest.csv")
    assert len(make_splits(shards, 10)["folds"]) == 10  # leave-one-patient-out works


def test_fewer_patients_of_a_class_than_folds_is_allowed_with_warnings(tmp_path):
    splits = make_splits(write_manifest(tmp_path / "a", manifest_rows(cohort(2, 6))), 3, seed=0)
    val_malignant = [sum(splits["patients"][p] == "malignant" for p in f["val_patients"]) for f in splits["folds"]]
    assert sorted(val_malignant) == [0, 1, 1]
    for f in splits["folds"]:
        assert any(splits["patients"][p] == "malignant" for p in f["train_patients"])  # every fold trainable
    assert len(splits["warnings"]) == 1 and "no malignant patient in validation" in splits["warnings"][0]

    single = make_splits(write_manifest(tmp_path / "b", manifest_rows(cohort(1, 6))), 3, seed=0)
    assert any("no malignant patient in training" in w for w in single["warnings"])


def test_every_class_smaller_than_folds_falls_back_to_round_robin(tmp_path):
    folder = write_manifest(tmp_path / "s", manifest_rows(cohort(3, 3)))
    splits = make_splits(folder, 5, seed=0)
    assert splits["method"].startswith("round-robin")
    assert sorted(p for f in splits["folds"] for p in f["val_patients"]) == sorted(splits["patients"])
    for f in splits["folds"]:
        assert f["val_patients"]
        for diagnosis in ("benign", "malignant"):
            assert sum(splits["patients"][p] == diagnosis for p in f["val_patients"]) <= math.ceil(3 / 5)
    assert make_splits(folder, 5, seed=0) == splits
    assert val_assignment(make_splits(folder, 5, seed=1)) != val_assignment(splits)


def test_manifest_errors_name_the_manifest(tmp_path):
    missing = tmp_path / "none"
    with pytest.raises(TaskError, match="run extract") as exc:
        make_splits(missing, 3)
    one_line_naming(exc, missing / "manifest.csv")
    cases = {
        "no_rows": ",".join(COLUMNS) + "\n",
        "ragged": ",".join(COLUMNS) + "\nS1,P1,benign,S1.h5\n",
        "bad_count": ",".join(COLUMNS) + "\nS1,P1,benign,S1.h5,many,1,0,jpeg,256,0.5\n",
        "no_columns": "a,b\n1,2\n",
        "duplicate": ",".join(COLUMNS) + "\n" + "S1,P1,benign,S1.h5,1,1,0,jpeg,256,0.5\n" * 2,
        "empty_patient": ",".join(COLUMNS) + "\nS1,,benign,S1.h5,1,1,0,jpeg,256,0.5\n",
    }
    for name, text in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.csv").write_text(text)
        with pytest.raises(TaskError) as exc:
            read_manifest(folder)
        one_line_naming(exc, folder / "manifest.csv")


def test_manifest_digest_identifies_the_shard_set(tmp_path):
    rows = manifest_rows(cohort())
    a = manifest_digest(write_manifest(tmp_path / "a", rows))
    assert manifest_digest(write_manifest(tmp_path / "b", list(reversed(rows)))) == a  # order does not matter
    changed = [dict(r) for r in rows]
    changed[0]["n_tiles"] += 1
    assert manifest_digest(write_manifest(tmp_path / "c", changed)) != a
    assert manifest_digest(write_manifest(tmp_path / "d", rows[:-1])) != a


def test_split_command(shards, tmp_path, capsys):
    from python_task.cli import main

    out = tmp_path / "cli.json"
    assert main(["split", "--shards", str(shards), "--folds", "3", "--out", str(out), "--seed", "2"]) == 0
    assert json.loads(out.read_text()) == make_splits(shards, 3, seed=2)
    assert main(["split", "--shards", str(shards), "--folds", "12", "--out", str(tmp_path / "x.json")]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "manifest.csv" in err[0] and not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------------------------ load_fold

def test_load_fold_matches_the_json(shards, split_file):
    data = json.loads(split_file.read_text())
    for k in range(3):
        fold = load_fold(split_file, shards, k)
        f = data["folds"][k]
        assert isinstance(fold, FoldAssignment) and fold.fold == k
        assert fold.val_slides == tuple(f["val_slides"]) and fold.train_slides == tuple(f["train_slides"])
        assert fold.val_patients == tuple(f["val_patients"]) and fold.train_patients == tuple(f["train_patients"])
    with pytest.raises(AttributeError):
        fold.fold = 2  # frozen


def edited(split_file: Path, tmp_path: Path, edit) -> Path:
    data = json.loads(split_file.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def test_leaking_patient_is_refused(shards, split_file, tmp_path):
    data = json.loads(split_file.read_text())
    leaked = data["folds"][1]["val_patients"][0]

    def leak(d):
        d["folds"][1]["train_patients"].append(leaked)

    path = edited(split_file, tmp_path, leak)
    with pytest.raises(TaskError) as exc:
        load_fold(path, shards, 1)
    msg = one_line_naming(exc, path)
    assert f"patient {leaked} is in both training and validation of fold 1: the split leaks" in msg
    load_fold(path, shards, 0)  # other folds of the file are still usable


def test_leaking_slide_is_refused(shards, split_file, tmp_path):
    def move_slide(d):  # a validation slide copied into training, its patient left alone
        f = d["folds"][0]
        f["train_slides"].append(f["val_slides"][0])

    path = edited(split_file, tmp_path, move_slide)
    with pytest.raises(TaskError, match="slide .* in both training and validation of fold 0: the split leaks") as exc:
        load_fold(path, shards, 0)
    one_line_naming(exc, path)

    def split_patient(d):  # a validation slide moved to training: its patient now straddles the fold
        f = d["folds"][0]
        s = f["val_slides"].pop(0)
        f["train_slides"].append(s)

    path = edited(split_file, tmp_path, split_patient)
    with pytest.raises(TaskError, match="its patient P.. is on the other side: the split leaks") as exc:
        load_fold(path, shards, 0)
    one_line_naming(exc, path)


def test_shard_added_or_missing_is_refused(shards, split_file):
    rows = manifest_rows(cohort())
    extra = dict(rows[0], slide_id="P01_S9", shard="P01_S9.h5")
    write_manifest(shards, rows + [extra])
    with pytest.raises(TaskError, match="changed since the split was made: added P01_S9 — run split again") as exc:
        load_fold(split_file, shards, 0)
    one_line_naming(exc, split_file)

    write_manifest(shards, [r for r in rows if r["slide_id"] != "P03_S3"])
    with pytest.raises(TaskError, match="changed since the split was made: missing P03_S3 — run split") as exc:
        load_fold(split_file, shards, 0)
    one_line_naming(exc, split_file)

    write_manifest(shards, [r for r in rows if r["slide_id"] != "P03_S3"] + [extra])
    with pytest.raises(TaskError, match="added P01_S9; missing P03_S3"):
        load_fold(split_file, shards, 0)

    write_manifest(shards, rows)
    load_fold(split_file, shards, 0)  # back as it was: accepted again


def test_changed_tiles_or_patient_is_refused(shards, split_file):
    rows = manifest_rows(cohort())
    changed = [dict(r) for r in rows]
    changed[1]["n_tiles"] += 5
    write_manifest(shards, changed)
    with pytest.raises(TaskError, match=f"changed since the split was made: {rows[1]['slide_id']}") as exc:
        load_fold(split_file, shards, 0)
    one_line_naming(exc, split_file)

    moved = [dict(r) for r in rows]
    moved[0]["patient_id"] = "P99"
    write_manifest(shards, moved)
    with pytest.raises(TaskError, match="slide P01_S1 belongs to patient P99 in .* but to P01 in the split") as exc:
        load_fold(split_file, shards, 0)
    one_line_naming(exc, split_file)


def test_missing_shard_file_is_refused(shards, split_file):
    (shards / "P02_S2.h5").unlink()
    fold = next(k for k in range(3) if "P02_S2" in read_splits(split_file)["folds"][k]["train_slides"])
    with pytest.raises(TaskError, match="P02_S2.*missing") as exc:
        load_fold(split_file, shards, fold)
    one_line_naming(exc, shards / "P02_S2.h5")


@pytest.mark.parametrize("fold", [3, -1, 17])
def test_fold_out_of_range(shards, split_file, fold):
    with pytest.raises(TaskError, match=f"fold {fold} is out of range: this split has 3 folds") as exc:
        load_fold(split_file, shards, fold)
    one_line_naming(exc, split_file)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"folds": [], "slides": {}}',
                                  '{"slides": {"S1": "P1"}, "folds": [{"val_patients": "P1"}]}',
                                  '{"format_version": 99, "slides": {}, "folds": [{}]}'])
def test_garbage_json_is_refused(shards, tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(TaskError) as exc:
        load_fold(path, shards, 0)
    one_line_naming(exc, path)


def test_missing_split_file(shards, tmp_path):
    with pytest.raises(TaskError, match="not found") as exc:
        load_fold(tmp_path / "nope.json", shards, 0)
    one_line_naming(exc, tmp_path / "nope.json")


# ------------------------------------------------------------------------------- tuning and test sets (issue 14)

def test_tuning_set_is_disjoint_from_the_held_out_fold_and_the_test_set(tmp_path):
    folder = write_manifest(tmp_path / "s", manifest_rows(cohort(9, 9)))
    splits = make_splits(folder, 3, seed=4, test_fraction=0.2)
    assert splits["format_version"] == 2 and splits["tune_fraction"] == 0.25
    test = set(splits["test_patients"])
    assert sorted(splits["patients"][p] for p in test) == ["benign", "benign", "malignant", "malignant"]
    assert {splits["slides"][s] for s in splits["test_slides"]} == test
    for f in splits["folds"]:
        tune, val, train = set(f["tune_patients"]), set(f["val_patients"]), set(f["train_patients"])
        assert tune and not tune & val and not tune & test and not tune & train
        assert not test & (val | train) and train | tune | val | test == set(splits["patients"])
        assert {splits["patients"][p] for p in tune} == {"benign", "malignant"}  # stratified
        assert f["selection"] == "tuning set" and f["tune_diagnoses"] == {"benign": 1, "malignant": 1}
        sides = [set(f[k]) for k in ("train_slides", "tune_slides", "val_slides")] + [set(splits["test_slides"])]
        assert sum(map(len, sides)) == len(set().union(*sides)) == len(splits["slides"])
        assert {splits["slides"][s] for s in f["tune_slides"]} == tune
    assert make_splits(folder, 3, seed=4, test_fraction=0.2) == splits  # seeded
    path = tmp_path / "splits.json"
    write_splits(splits, path)
    fold = load_fold(path, folder, 1)
    assert set(fold.tune_patients) == set(splits["folds"][1]["tune_patients"])
    assert fold.test_patients == tuple(splits["test_patients"])
    assert "n_folds" not in json.dumps({k: v for k, v in splits.items() if k != "n_folds"})  # OpenMOLE's regex


@pytest.mark.parametrize("side", ["val_patients", "test_patients"])
def test_a_tuning_patient_on_another_side_is_refused(tmp_path, side):
    folder = write_manifest(tmp_path / "s", manifest_rows(cohort(9, 9)))
    splits = make_splits(folder, 3, seed=4, test_fraction=0.2)
    patient = splits["folds"][0]["tune_patients"][0]
    if side == "test_patients":
        splits["test_patients"].append(patient)
    else:
        splits["folds"][0][side].append(patient)
    path = tmp_path / "leaky.json"
    write_splits(splits, path)
    with pytest.raises(TaskError, match=f"patient {patient} is in both tuning .*the split leaks") as exc:
        load_fold(path, folder, 0)
    one_line_naming(exc, path)


def test_too_few_training_patients_get_no_tuning_set(tmp_path):
    splits = make_splits(write_manifest(tmp_path / "s", manifest_rows(cohort(4, 4))), 2, seed=0)
    for f in splits["folds"]:  # 2 + 2 training patients: a tuning patient would leave 1 of a class to fit on
        assert f["tune_patients"] == [] and f["tune_slides"] == [] and f["selection"] == "fixed"
    assert make_splits(write_manifest(tmp_path / "t", manifest_rows(cohort(4, 4))), 2, tune_fraction=0)[
        "folds"][0]["tune_patients"] == []


def test_a_format_1_split_reads_as_folds_without_tuning_or_test_set(shards, tmp_path):
    data = make_splits(shards, 3, seed=0, tune_fraction=0)
    data["format_version"] = 1
    for key in ("tune_fraction", "test_fraction", "test_patients", "test_slides", "test_diagnoses"):
        del data[key]
    for f in data["folds"]:
        del f["tune_patients"], f["tune_slides"]
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(data))
    fold = load_fold(path, shards, 0)
    assert fold.format_version == 1 and fold.tune_slides == () and fold.test_patients == ()


def test_bad_fractions_are_refused(shards):
    for kw in ({"tune_fraction": 1.0}, {"test_fraction": -0.1}, {"test_fraction": "0.2"}):
        with pytest.raises(TaskError, match=next(iter(kw))):
            make_splits(shards, 3, **kw)


# ------------------------------------------------------------------------------------------------ too few patients

def test_too_few_patients_advice_is_a_setting_that_works(tmp_path):
    """The error's advice (never `--folds` below 2) is checked by following it: the advised values split."""
    folder = write_manifest(tmp_path / "s", manifest_rows(cohort(3, 3)))
    with pytest.raises(TaskError) as exc:
        make_splits(folder, 2, test_fraction=0.99)
    one_line_naming(exc, folder / "manifest.csv")
    cause = exc.value.cause
    assert "`folds` 0" not in cause and "6 held out as the test set" in cause and "`test_fraction` 0.83 or lower" in cause
    assert len(make_splits(folder, 2, test_fraction=0.83)["folds"]) == 2
    with pytest.raises(TaskError):
        make_splits(folder, 2, test_fraction=0.84)  # round(3 * 0.84) = 3 of each diagnosis: none left

    with pytest.raises(TaskError) as exc:  # the smallest test set (one of each diagnosis) leaves 4: no test set
        make_splits(folder, 5, test_fraction=0.3)
    assert "use `folds` 4 or fewer or `test_fraction` 0 (no test set)" in exc.value.cause
    assert len(make_splits(folder, 4, test_fraction=0.3)["folds"]) == 4 and make_splits(folder, 5)


def test_a_single_patient_is_told_cross_validation_needs_two(tmp_path):
    folder = write_manifest(tmp_path / "s", manifest_rows(cohort(1, 0)))
    for kw in ({}, {"test_fraction": 0.5}):
        with pytest.raises(TaskError, match="cross-validation needs at least 2 patients") as exc:
            make_splits(folder, 2, **kw)
        assert "`folds` 1" not in exc.value.cause and "`folds` 0" not in exc.value.cause
        one_line_naming(exc, folder / "manifest.csv")


def test_split_refuses_to_write_over_its_inputs(shards, tmp_path, capsys):
    """`split --out shards/manifest.csv` (or a shard, however spelled) is refused before anything is written."""
    from python_task.cli import main

    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    link = tmp_path / "link.json"
    link.symlink_to(shards / "manifest.csv")
    for out in (shards / "manifest.csv", shards / ".." / shards.name / "P01_S1.h5", link, shards / "extract.json"):
        assert main(["split", "--shards", str(shards), "--folds", "3", "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out}: --out would replace the "), err
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    assert main(["split", "--shards", str(shards), "--folds", "3", "--out", str(shards / "splits.json")]) == 0
