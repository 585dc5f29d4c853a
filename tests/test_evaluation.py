"""Tests for `nnunetv2_fias evaluate` (nnunetv2_fias.evaluation).

Expected values are computed here independently of the module: surfaces from explicit face-neighbour checks and
HD95 from brute-force pairwise distances between surface voxel centres in mm (scipy.spatial.distance.cdist).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import cdist

from nnunetv2_fias import evaluation
from nnunetv2_fias.evaluation import EvaluationError, evaluate_folders, hd95

SPACING = (3.0, 0.78125, 1.125)  # array order (z, y, x), anisotropic like CT; exact in float32 (NIfTI)
SHAPE = (10, 18, 20)
LABELS = {"background": 0, "spleen": 1, "liver": 2, "aorta": 3}


# ---------------------------------------------------------------------------------------------------------------
# Independent reference implementation
# ---------------------------------------------------------------------------------------------------------------

def surface_coords(mask: np.ndarray) -> np.ndarray:
    """Voxel indices of foreground voxels with a face neighbour that is background or outside the image."""
    padded = np.pad(mask.astype(bool), 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = np.ones(mask.shape, dtype=bool)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=axis)[inner]
    return np.argwhere(mask.astype(bool) & ~interior)


def brute_hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    a = surface_coords(pred) * np.asarray(spacing, float)
    b = surface_coords(ref) * np.asarray(spacing, float)
    d = cdist(a, b)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


def expected_metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """TransUNet's calculate_metric_percase rules plus HD95 in mm (None when a mask is empty)."""
    p, r = pred.astype(bool), ref.astype(bool)
    if p.sum() > 0 and r.sum() > 0:
        return {"dice": 2.0 * (p & r).sum() / (p.sum() + r.sum()),
                "hd95_voxel": brute_hd95(p, r, (1.0,) * p.ndim),
                "hd95_mm": brute_hd95(p, r, spacing)}
    if p.sum() > 0:
        return {"dice": 1.0, "hd95_voxel": 0.0, "hd95_mm": None}
    return {"dice": 0.0, "hd95_voxel": 0.0, "hd95_mm": None}


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        if value is None:
            assert actual[key] is None, key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------------

def ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def make_reference(rng: np.random.Generator) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    seg[ellipsoid(SHAPE, (4, 5, 5), (3, 4, 4))] = 1
    # Touches the image border (x = 19, z = 0), so image-edge voxels must count as surface.
    seg[ellipsoid(SHAPE, (rng.integers(1, 4), 10 + rng.integers(0, 3), 17), (3, 5, 4))] = 2
    seg[ellipsoid(SHAPE, (6, 14, 8), (2.5, 2, 2))] = 3
    return seg


def perturb(seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible prediction: shifted organs, flipped voxels, a stray island."""
    pred = np.roll(seg, shift=(int(rng.integers(-1, 2)), int(rng.integers(-2, 3)), 0), axis=(0, 1, 2))
    flip = rng.random(SHAPE) < 0.03
    pred[flip] = rng.integers(0, 4, size=int(flip.sum()))
    pred[0, 0:2, 0:2] = 3
    return pred.astype(np.uint8)


def write(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(image, str(path))


def write_dataset_json(folder: Path, labels=LABELS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dataset.json"
    path.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 0,
                                "file_ending": ".nii.gz"}))
    return path


@pytest.fixture
def dataset(tmp_path):
    """Reference labelsTs inside a dataset folder with dataset.json, plus one perturbed prediction folder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "Dataset001_Test"
    write_dataset_json(root)
    refs, preds = {}, {}
    for case in ("case_00", "case_01", "case_02"):
        refs[case] = make_reference(rng)
        preds[case] = perturb(refs[case], rng)
        write(root / "labelsTs" / f"{case}.nii.gz", refs[case])
        write(tmp_path / "pred_a" / f"{case}.nii.gz", preds[case])
    return {"root": root, "ref": root / "labelsTs", "pred": tmp_path / "pred_a", "refs": refs, "preds": preds,
            "tmp": tmp_path}


# ---------------------------------------------------------------------------------------------------------------
# Metric values
# ---------------------------------------------------------------------------------------------------------------

def test_values_match_independent_computation(dataset):
    summary = evaluate_folders(dataset["ref"], [dataset["pred"]], num_processes=1)
    result = summary["methods"]["pred_a"]
    assert summary["labels"] == {"spleen": 1, "liver": 2, "aorta": 3}
    assert list(result["per_case"]) == ["case_00", "case_01", "case_02"]
    expected = {case: {name: expected_metrics(dataset["preds"][case] == v, dataset["refs"][case] == v, SPACING)
                       for name, v in summary["labels"].items()} for case in dataset["refs"]}
    for case, per_label in expected.items():
        for name, metrics in per_label.items():
            assert_metrics_equal(result["per_case"][case][name], metrics)
    # Spacing matters: anisotropic mm distances differ from voxel distances.
    assert any(m["hd95_mm"] != pytest.approx(m["hd95_voxel"]) for m in expected["case_00"].values())
    for name in summary["labels"]:
        for key in ("dice", "hd95_voxel", "hd95_mm"):
            assert result["mean"][name][key] == pytest.approx(np.mean([expected[c][name][key] for c in expected]))
        assert result["mean"][name]["n_cases"] == 3
    for key in ("dice", "hd95_voxel", "hd95_mm"):
        assert result["mean_over_labels"][key] == pytest.approx(
            np.mean([np.mean([expected[c][n][key] for c in expected]) for n in summary["labels"]]))


def test_hd95_2d_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(3):
        a = ellipsoid((30, 26), rng.uniform(5, 20, 2), rng.uniform(3, 9, 2)) | (rng.random((30, 26)) < 0.02)
        b = ellipsoid((30, 26), rng.uniform(5, 20, 2), rng.uniform(3, 9, 2))
        vox, mm = hd95(a, b, (None, (0.7, 1.9)))
        assert vox == pytest.approx(brute_hd95(a, b, (1.0, 1.0)))
        assert mm == pytest.approx(brute_hd95(a, b, (0.7, 1.9)))
    with pytest.raises(ValueError):
        hd95(np.zeros((4, 4)), np.ones((4, 4)))


def test_empty_mask_rules(tmp_path):
    write_dataset_json(tmp_path)
    ref0 = np.zeros(SHAPE, np.uint8)
    pred0 = np.zeros(SHAPE, np.uint8)
    pred0[2:5, 3:8, 3:8] = 1   # spleen: predicted, absent from the reference -> (1, 0, missing)
    ref0[2:5, 10:14, 3:8] = 2  # liver: in the reference, not predicted     -> (0, 0, missing)
    #                            aorta: in neither                           -> (0, 0, missing)
    ref1 = np.zeros(SHAPE, np.uint8)
    ref1[3:7, 4:9, 4:9] = 1
    pred1 = np.zeros(SHAPE, np.uint8)
    pred1[3:7, 5:10, 4:9] = 1
    for case, ref, pred in (("c0", ref0, pred0), ("c1", ref1, pred1)):
        write(tmp_path / "labelsTs" / f"{case}.nii.gz", ref)
        write(tmp_path / "pred" / f"{case}.nii.gz", pred)
    result = evaluate_folders(tmp_path / "labelsTs", [tmp_path / "pred"], num_processes=1)["methods"]["pred"]
    c0 = result["per_case"]["c0"]
    assert c0["spleen"] == {"dice": 1.0, "hd95_voxel": 0.0, "hd95_mm": None}
    assert c0["liver"] == {"dice": 0.0, "hd95_voxel": 0.0, "hd95_mm": None}
    assert c0["aorta"] == {"dice": 0.0, "hd95_voxel": 0.0, "hd95_mm": None}
    c1 = expected_metrics(pred1 == 1, ref1 == 1, SPACING)
    assert_metrics_equal(result["per_case"]["c1"]["spleen"], c1)
    # hd95_mm means skip the missing cases instead of counting them as 0.
    assert result["mean"]["spleen"]["hd95_mm"] == pytest.approx(c1["hd95_mm"])
    assert result["mean"]["spleen"]["n_hd95_mm"] == 1
    assert result["mean"]["spleen"]["dice"] == pytest.approx((1.0 + c1["dice"]) / 2)
    assert result["mean"]["liver"]["hd95_mm"] is None and result["mean"]["liver"]["n_hd95_mm"] == 0
    assert result["mean_over_labels"]["hd95_mm"] == pytest.approx(c1["hd95_mm"])


def test_ignore_label_region_is_not_scored(tmp_path):
    write_dataset_json(tmp_path, {"background": 0, "organ": 1, "ignore": 2})
    ref = np.zeros(SHAPE, np.uint8)
    ref[2:6, 4:10, 4:10] = 1
    ref[:, 12:, :] = 2
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:6, 4:11, 4:10] = 1
    pred[:, 14:16, 2:6] = 1  # false positives inside the ignore region: must not count
    write(tmp_path / "labelsTs" / "c.nii.gz", ref)
    write(tmp_path / "pred" / "c.nii.gz", pred)
    summary = evaluate_folders(tmp_path / "labelsTs", [tmp_path / "pred"], num_processes=1)
    assert summary["labels"] == {"organ": 1}
    expected = expected_metrics((pred == 1) & (ref != 2), ref == 1, SPACING)
    assert_metrics_equal(summary["methods"]["pred"]["per_case"]["c"]["organ"], expected)


# ---------------------------------------------------------------------------------------------------------------
# Command line: comparison of several folders, outputs
# ---------------------------------------------------------------------------------------------------------------

def test_cli_compares_folders_and_writes_outputs(dataset, capsys):
    tmp = dataset["tmp"]
    # Two folders with the same basename and a perfect prediction (a copy of the reference).
    shutil.copytree(dataset["pred"], tmp / "runs" / "fias" / "pred")
    rng = np.random.default_rng(7)
    for case, ref in dataset["refs"].items():
        write(tmp / "runs" / "nnunet" / "pred" / f"{case}.nii.gz", perturb(ref, rng))
    shutil.copytree(dataset["ref"], tmp / "perfect")
    out = tmp / "eval"
    preds = [tmp / "runs" / "fias" / "pred", tmp / "runs" / "nnunet" / "pred", tmp / "perfect"]
    rc = evaluation.main(["-r", str(dataset["ref"]), "-p", *map(str, preds), "--labels", "Liver", "1",
                          "-o", str(out), "-np", "2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["fias/pred", "nnunet/pred", "perfect"]
    assert list(summary["labels"]) == ["liver", "spleen"]
    perfect = summary["methods"]["perfect"]
    for per_label in perfect["per_case"].values():
        assert list(per_label) == ["liver", "spleen"]
        for m in per_label.values():
            assert m == {"dice": 1.0, "hd95_voxel": 0.0, "hd95_mm": 0.0}
    # The same numbers as a single-process API call on the same folder.
    single = evaluate_folders(dataset["ref"], [dataset["pred"]], labels=["liver", "spleen"], num_processes=1)
    assert summary["methods"]["fias/pred"]["per_case"] == single["methods"]["pred_a"]["per_case"]
    assert summary["methods"]["fias/pred"]["per_case"] != summary["methods"]["nnunet/pred"]["per_case"]

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * (3 * 2 + 2 + 1)
    row = next(r for r in rows if r["method"] == "nnunet/pred" and r["case"] == "case_01" and r["label"] == "liver")
    expected_dice = summary["methods"]["nnunet/pred"]["per_case"]["case_01"]["liver"]["dice"]
    assert float(row["dice"]) == pytest.approx(expected_dice)
    table = (out / "summary.md").read_text().splitlines()
    assert sum(line.startswith("| perfect |") for line in table) == 2
    for png in ("dice.png", "hd95_mm.png", "hd95_voxel.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".eval")) == []


def test_existing_output_requires_overwrite(dataset):
    out = dataset["tmp"] / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["-r", str(dataset["ref"]), "-p", str(dataset["pred"]), "-o", str(out), "-np", "1", "--no-plots"]
    assert evaluation.main(args) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert evaluation.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "summary.json", "summary.md"]
    assert [p.name for p in dataset["tmp"].iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------------------
# Errors: clear message naming the case, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------------------------

def _break_missing(d):
    (d["pred"] / "case_01.nii.gz").unlink()


def _break_shape(d):
    write(d["pred"] / "case_01.nii.gz", np.zeros((10, 18, 21), np.uint8))


def _break_spacing(d):
    write(d["pred"] / "case_01.nii.gz", d["preds"]["case_01"], spacing=(3.0, 0.78125, 1.25))


def _break_label_value(d):
    pred = d["preds"]["case_01"].copy()
    pred[5, 5, 5] = 7
    write(d["pred"] / "case_01.nii.gz", pred)


@pytest.mark.parametrize("breaker", [_break_missing, _break_shape, _break_spacing, _break_label_value])
def test_input_errors_name_the_case_and_write_nothing(dataset, breaker, capsys):
    breaker(dataset)
    out = dataset["tmp"] / "eval"
    rc = evaluation.main(["-r", str(dataset["ref"]), "-p", str(dataset["pred"]), "-o", str(out), "-np", "1"])
    assert rc == 1
    assert "case_01" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in dataset["tmp"].iterdir() if p.name.startswith(".")] == []


def test_undeclared_value_in_reference_is_an_error(dataset):
    ref = dataset["refs"]["case_02"].copy()
    ref[0, 0, 0] = 4
    write(dataset["ref"] / "case_02.nii.gz", ref)
    with pytest.raises(EvaluationError, match="case_02"):
        evaluate_folders(dataset["ref"], [dataset["pred"]], num_processes=1)


def test_unknown_label_lists_available_names(dataset):
    with pytest.raises(EvaluationError, match=r"pancreas.*spleen \(1\), liver \(2\), aorta \(3\)"):
        evaluate_folders(dataset["ref"], [dataset["pred"]], labels=["pancreas"], num_processes=1)
    with pytest.raises(EvaluationError, match="twice"):
        evaluate_folders(dataset["ref"], [dataset["pred"]], labels=["liver", "2"], num_processes=1)


def test_dataset_json_resolution(dataset):
    ref, pred, root = dataset["ref"], dataset["pred"], dataset["root"]
    # A prediction folder's dataset.json that disagrees with the reference's dataset is refused...
    write_dataset_json(pred, {"background": 0, "a": 1, "b": 2, "c": 3})
    with pytest.raises(EvaluationError, match="differ"):
        evaluate_folders(ref, [pred], num_processes=1)
    # ...unless -j says which one holds.
    summary = evaluate_folders(ref, [pred], dataset_json=root / "dataset.json", labels=["aorta"], num_processes=1)
    assert list(summary["labels"]) == ["aorta"]
    (pred / "dataset.json").unlink()
    (root / "dataset.json").unlink()
    with pytest.raises(EvaluationError, match="dataset-json"):
        evaluate_folders(ref, [pred], num_processes=1)
    regions = write_dataset_json(dataset["tmp"] / "regions", {"background": 0, "whole": [1, 2, 3], "core": [2, 3]})
    with pytest.raises(EvaluationError, match="region"):
        evaluate_folders(ref, [pred], dataset_json=regions, num_processes=1)


def test_cli_usage_errors_exit_nonzero(dataset, tmp_path):
    assert evaluation.main(["-r", str(tmp_path / "nope"), "-p", str(dataset["pred"]), "-o",
                            str(tmp_path / "o")]) == 1
    assert evaluation.main(["-r", str(dataset["ref"]), "-p", str(dataset["pred"]), "-o",
                            str(dataset["pred"] / "eval")]) == 1
    with pytest.raises(SystemExit) as e:
        evaluation.main(["-r", str(dataset["ref"])])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists() and not (dataset["pred"] / "eval").exists()


def test_float_label_maps_and_origin_mismatch(dataset, capsys):
    pred = dataset["preds"]["case_00"].astype(np.float32)
    image = sitk.GetImageFromArray(pred)
    image.SetSpacing(tuple(float(s) for s in SPACING[::-1]))
    image.SetOrigin((10.0, 0.0, 0.0))
    sitk.WriteImage(image, str(dataset["pred"] / "case_00.nii.gz"))
    # Integral floats are label maps; a shifted origin only warns (nnU-Net's own check does the same).
    summary = evaluate_folders(dataset["ref"], [dataset["pred"]], labels=["spleen"], num_processes=1)
    expected = expected_metrics(pred == 1, dataset["refs"]["case_00"] == 1, SPACING)
    assert_metrics_equal(summary["methods"]["pred_a"]["per_case"]["case_00"]["spleen"], expected)
    assert "case_00" in capsys.readouterr().err
    pred[1, 1, 1] = 0.5
    write(dataset["pred"] / "case_00.nii.gz", pred)
    with pytest.raises(EvaluationError, match="case_00.*non-integer"):
        evaluate_folders(dataset["ref"], [dataset["pred"]], num_processes=1)


# ---------------------------------------------------------------------------------------------------------------
# Output location and exit status
# ---------------------------------------------------------------------------------------------------------------

def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_output_under_a_file_fails_before_scoring(dataset, capsys):
    blocker = dataset["tmp"] / "results.txt"
    blocker.write_text("not a folder")
    out = blocker / "eval" / "run1"
    # A broken case would stop scoring with an error naming case_01: the output must be refused before that.
    _break_shape(dataset)
    rc = evaluation.main(["-r", str(dataset["ref"]), "-p", str(dataset["pred"]), "-o", str(out), "-np", "1"])
    assert rc == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1
    assert str(out) in lines[0] and str(blocker) in lines[0] and "case_01" not in lines[0]
    assert blocker.read_text() == "not a folder"
    assert [p.name for p in dataset["tmp"].iterdir() if p.name.startswith(".")] == []


def test_output_in_unwritable_folder_fails_before_scoring(dataset, capsys, monkeypatch):
    locked = dataset["tmp"] / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    out = locked / "new" / "eval"
    _break_shape(dataset)
    try:
        rc = evaluation.main(["-r", str(dataset["ref"]), "-p", str(dataset["pred"]), "-o", str(out), "-np", "1"])
    finally:
        locked.chmod(0o755)
    assert rc == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1 and str(out) in lines[0] and "not writable" in lines[0] and "case_01" not in lines[0]
    assert list(locked.iterdir()) == []


def test_output_folder_is_created_with_its_parents(dataset):
    out = dataset["tmp"] / "new" / "deeper" / "eval"
    rc = evaluation.main(["-r", str(dataset["ref"]), "-p", str(dataset["pred"]), "-o", str(out), "-np", "1",
                          "--no-plots"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "summary.json", "summary.md"]
    assert json.loads((out / "summary.json").read_text())["cases"] == ["case_00", "case_01", "case_02"]
    # An existing empty folder is used as if new, without --overwrite.
    empty = dataset["tmp"] / "empty"
    empty.mkdir()
    assert evaluation.main(["-r", str(dataset["ref"]), "-p", str(dataset["pred"]), "-o", str(empty), "-np", "1",
                            "--no-plots"]) == 0
    assert (empty / "summary.json").is_file()
    assert [p.name for p in dataset["tmp"].iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("extra", [["-np", "0"], ["-np", "two"], ["--no-such-option"]])
def test_usage_errors_exit_2(dataset, tmp_path, extra):
    with pytest.raises(SystemExit) as e:
        evaluation.main(["-r", str(dataset["ref"]), "-p", str(dataset["pred"]), "-o", str(tmp_path / "o"), *extra])
    assert e.value.code == 2
    assert not (tmp_path / "o").exists()


def test_api_rejects_bad_process_count_before_scoring(dataset):
    with pytest.raises(EvaluationError, match="num-processes"):
        evaluate_folders(dataset["ref"], [dataset["pred"]], num_processes=0, output=dataset["tmp"] / "o")
    assert not (dataset["tmp"] / "o").exists()


def test_console_command_dispatches_to_the_package(dataset, tmp_path, capsys):
    from nnunetv2_fias.cli import main as console_main

    assert console_main(["evaluate", "-r", str(tmp_path / "nope"), "-p", str(dataset["pred"]), "-o",
                         str(tmp_path / "o")]) == 1
    assert _error_lines(capsys) == [f"nnunetv2_fias evaluate: error: -r/--reference {tmp_path / 'nope'} is not a "
                                    f"folder"]


@pytest.mark.parametrize("labels, message", [
    ({"organ": 1}, "Background"),                                 # nnU-Net requires background = 0
    ({"background": 0, "organ": 1, "ignore": 1}, "ignore"),      # the ignore label must be the highest value
    ({"background": 0, "organ": 1.5}, "non-negative integers"),
])
def test_labels_nnunet_rejects_are_errors(dataset, labels, message):
    path = write_dataset_json(dataset["tmp"] / "bad", labels)
    with pytest.raises(EvaluationError, match=message) as e:
        evaluate_folders(dataset["ref"], [dataset["pred"]], dataset_json=path, num_processes=1)
    assert str(path) in str(e.value)


def test_python_dash_m_runs_the_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nnunetv2_fias.evaluation", "-r", str(tmp_path / "nope"), "-p",
                             str(tmp_path), "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"nnunetv2_fias evaluate: error: -r/--reference "
                                                  f"{tmp_path / 'nope'} is not a folder"]
