"""`nnunetv2_fias evaluate`: per-class Dice and HD95 under the paper protocol, tables, plots, trainer comparisons.

nnU-Net's own evaluation reports Dice only, and the papers FIAS is compared against (TransUNet, Swin-Unet, nnFormer,
UNETR++, ...) report Dice and HD95 computed with TransUNet's ``calculate_metric_percase``. This module reproduces
that protocol without depending on medpy, and adds HD95 in millimetres.

Metrics per case and label (label = one integer value of the label map):

* ``dice``: ``2|P & R| / (|P| + |R|)`` on the whole volume.
* ``hd95_voxel``: TransUNet protocol. medpy's ``hd95`` without voxel spacing, i.e. in voxel units: the 95th
  percentile of the surface distances from prediction to reference *and* from reference to prediction, pooled.
  The surface of a mask is the mask minus its erosion by the face-connected (connectivity 1) structuring element,
  voxels outside the image counting as background.
* ``hd95_mm``: the same distance with the reference image's spacing, in millimetres.

Empty masks follow TransUNet's rules so that ``dice`` and ``hd95_voxel`` are comparable with published numbers:
prediction and reference both non-empty -> computed; prediction non-empty and reference empty -> dice 1,
hd95_voxel 0; otherwise (prediction empty) -> dice 0, hd95_voxel 0, including when both are empty. ``hd95_mm``
is only defined when both masks are non-empty and is reported as missing (``null``) otherwise, instead of the
optimistic 0, and left out of its means.

Python API::

    from nnunetv2_fias.evaluation import evaluate_folders
    summary = evaluate_folders("Dataset111_Synapse/labelsTs", ["pred_fias", "pred_nnunet"],
                               labels=["aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
                                       "spleen", "stomach"], output="eval_out")
    summary["methods"]["pred_fias"]["mean_over_labels"]["dice"]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

DEFAULT_FILE_ENDING = ".nii.gz"
METRICS = ("dice", "hd95_voxel", "hd95_mm")
# Relative tolerance on spacing when checking that a prediction has the reference's geometry. NIfTI stores
# spacing as float32, so copies of the same header can differ in the last bits; real mismatches are far larger.
SPACING_RTOL = 1e-4

_METRIC_TEXT = {
    "dice": "Dice 2|P&R|/(|P|+|R|) on the volume; TransUNet empty-mask rules (pred non-empty & ref empty -> 1, "
            "pred empty -> 0)",
    "hd95_voxel": "HD95 as in TransUNet (medpy hd95 without spacing): 95th percentile of both directed surface "
                  "distance sets pooled, in voxels; pred non-empty & ref empty -> 0, pred empty -> 0",
    "hd95_mm": "Same HD95 with the reference spacing, in mm; null (excluded from means) unless both masks are "
               "non-empty",
}


class EvaluationError(Exception):
    """A user-facing problem with the inputs (missing case, geometry mismatch, unknown label, ...)."""


# ----------------------------------------------------------------------------------------------------------------
# Metrics on binary masks
# ----------------------------------------------------------------------------------------------------------------

def dice_coefficient(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient ``2|P & R| / (|P| + |R|)`` of two binary masks.

    Args:
        prediction: Binary mask (any dtype; non-zero is foreground).
        reference: Binary mask of the same shape.

    Returns:
        The Dice coefficient; 0.0 when both masks are empty (TransUNet's rule for that case).
    """
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    return float(2.0 * np.count_nonzero(p & r) / total) if total else 0.0


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Tight bounding box of ``a | b``.

    Surfaces and distance transforms computed inside this box equal the full-image ones: outside it both masks
    are background, which is also how the erosion treats voxels beyond the array edge, and every surface voxel
    of both masks lies inside, so nearest-surface distances never need to leave it.
    """
    return ndimage.find_objects((a | b).astype(np.uint8))[0]


def _surface(mask: np.ndarray) -> np.ndarray:
    # Face connectivity and a zero border: voxels on the image edge are surface, as in medpy.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(prediction: np.ndarray, reference: np.ndarray,
         spacings: Sequence[Sequence[float] | None] = (None,)) -> list[float]:
    """95th percentile Hausdorff distance, with medpy's ``hd95`` semantics, for one or more spacings.

    The surface distances from the prediction's surface to the reference's and from the reference's surface to the
    prediction's are pooled and their 95th percentile (numpy's linear interpolation) is returned.

    Args:
        prediction: Non-empty binary mask.
        reference: Non-empty binary mask of the same shape.
        spacings: One entry per requested result: ``None`` for voxel units (the TransUNet protocol), or the voxel
            spacing per array axis (e.g. mm).

    Returns:
        One HD95 per entry of ``spacings``.

    Raises:
        ValueError: If either mask is empty (HD95 is undefined) or the shapes differ.
    """
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape}, reference {r.shape}")
    if not p.any() or not r.any():
        raise ValueError("HD95 is undefined when a mask is empty")
    box = _union_box(p, r)
    surf_p, surf_r = _surface(p[box]), _surface(r[box])
    results = []
    for spacing in spacings:
        sampling = None if spacing is None else [float(s) for s in spacing]
        d_pr = ndimage.distance_transform_edt(~surf_r, sampling=sampling)[surf_p]
        d_rp = ndimage.distance_transform_edt(~surf_p, sampling=sampling)[surf_r]
        results.append(float(np.percentile(np.concatenate([d_pr, d_rp]), 95)))
    return results


def score_masks(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> dict:
    """Dice, HD95 in voxels (TransUNet protocol) and HD95 in mm for one label of one case.

    Args:
        prediction: Binary prediction mask.
        reference: Binary reference mask of the same shape.
        spacing: Voxel spacing per array axis, for ``hd95_mm``.

    Returns:
        ``{"dice": float, "hd95_voxel": float, "hd95_mm": float | None}`` following the empty-mask rules in the
        module docstring.
    """
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    has_p, has_r = bool(p.any()), bool(r.any())
    if has_p and has_r:
        box = _union_box(p, r)
        hd_vox, hd_mm = hd95(p[box], r[box], (None, spacing))
        return {"dice": dice_coefficient(p[box], r[box]), "hd95_voxel": hd_vox, "hd95_mm": hd_mm}
    if has_p:
        return {"dice": 1.0, "hd95_voxel": 0.0, "hd95_mm": None}
    return {"dice": 0.0, "hd95_voxel": 0.0, "hd95_mm": None}


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking one case (runs in worker processes: keep top-level and picklable)
# ----------------------------------------------------------------------------------------------------------------

def _read_label_map(path: str, case: str, role: str) -> tuple[np.ndarray, tuple[float, ...], tuple]:
    """Read a label map: integer array (array axis order), spacing in the same order, (origin, direction)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(path)
    except RuntimeError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
        raise EvaluationError(f"case {case}: cannot read {role} {path}: {first_line}") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise EvaluationError(
            f"case {case}: {role} {path} must be a 2D or 3D single-channel label map, got a "
            f"{image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} component(s)")
    array = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    placement = (image.GetOrigin(), image.GetDirection())
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise EvaluationError(f"case {case}: {role} {path} contains non-integer values; a label map is "
                                  f"expected")
        array = array.astype(np.int32)
    return array, spacing, placement


def _present_values(array: np.ndarray, declared: Sequence[int], case: str, role: str, path: str) -> list:
    """Check that every value of ``array`` is declared; return ``find_objects`` boxes indexed by value - 1."""
    max_declared = max(declared)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > max_declared:
        bad = np.unique(array[(array < 0) | (array > max_declared)])
        raise EvaluationError(
            f"case {case}: {role} {path} contains label values {bad.tolist()[:10]} that dataset.json does not "
            f"declare (declared: {sorted(declared)})")
    boxes = ndimage.find_objects(array, max_label=max_declared) if max_declared > 0 else []
    undeclared = [v for v in range(1, max_declared + 1) if boxes[v - 1] is not None and v not in declared]
    if undeclared:
        raise EvaluationError(
            f"case {case}: {role} {path} contains label values {undeclared[:10]} that dataset.json does not "
            f"declare (declared: {sorted(declared)})")
    return boxes


def _merge_boxes(a, b) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _evaluate_case(task: tuple) -> tuple[str, dict]:
    """Score every prediction of one case against its reference.

    Args:
        task: ``(case, reference_file, [(method, prediction_file), ...], label_values, declared_values,
            ignore_value)``.

    Returns:
        ``(case, {method: {label_value: metrics}})``.
    """
    case, ref_file, predictions, label_values, declared, ignore_value = task
    ref, spacing, ref_placement = _read_label_map(ref_file, case, "reference")
    ref_boxes = _present_values(ref, declared, case, "reference", ref_file)
    ignore = (ref == ignore_value) if ignore_value is not None and ref_boxes[ignore_value - 1] is not None else None
    if ignore is not None:
        ref = np.where(ignore, 0, ref)
        ref_boxes = ndimage.find_objects(ref, max_label=max(declared))
    results = {}
    for method, pred_file in predictions:
        pred, pred_spacing, pred_placement = _read_label_map(pred_file, case, "prediction")
        if pred.shape != ref.shape:
            raise EvaluationError(
                f"case {case}: prediction {pred_file} has shape {pred.shape} but the reference {ref_file} has "
                f"{ref.shape} (array axis order); predictions must be in the reference's geometry")
        if not np.allclose(pred_spacing, spacing, rtol=SPACING_RTOL, atol=1e-6):
            raise EvaluationError(
                f"case {case}: prediction {pred_file} has spacing {pred_spacing} but the reference {ref_file} has "
                f"{spacing} (array axis order); predictions must be in the reference's geometry")
        if not all(np.allclose(a, b, atol=1e-3) for a, b in zip(pred_placement, ref_placement)):
            # Like nnU-Net's dataset check: only a warning, the arrays are still compared voxel by voxel.
            print(f"warning: case {case}: prediction {pred_file} has a different origin or direction than the "
                  f"reference {ref_file}; comparing voxel by voxel", file=sys.stderr)
        pred_boxes = _present_values(pred, declared, case, "prediction", pred_file)
        if ignore is not None:
            # The ignore region is excluded from scoring, as nnU-Net does: erase it from both label maps.
            pred = np.where(ignore, 0, pred)
            pred_boxes = ndimage.find_objects(pred, max_label=max(declared))
        per_label = {}
        for value in label_values:
            box = _merge_boxes(ref_boxes[value - 1], pred_boxes[value - 1])
            if box is None:  # in neither label map
                per_label[value] = {"dice": 0.0, "hd95_voxel": 0.0, "hd95_mm": None}
            else:
                per_label[value] = score_masks(pred[box] == value, ref[box] == value, spacing)
        results[method] = per_label
    return case, results


# ----------------------------------------------------------------------------------------------------------------
# Inputs: dataset.json, labels, cases, method names
# ----------------------------------------------------------------------------------------------------------------

def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"cannot read dataset.json {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict) or not data["labels"]:
        raise EvaluationError(f"{path} has no 'labels' mapping; is it an nnU-Net dataset.json?")
    return data


def _resolve_dataset_json(reference: Path, predictions: Sequence[Path], dataset_json: Path | None) -> Path:
    """Pick the dataset.json: explicit, else those next to the predictions and of the reference's dataset."""
    if dataset_json is not None:
        if not dataset_json.is_file():
            raise EvaluationError(f"-j/--dataset-json: {dataset_json} is not a file")
        return dataset_json
    candidates = [p / "dataset.json" for p in predictions]
    candidates += [reference.parent / "dataset.json", reference / "dataset.json"]
    found = [c for c in candidates if c.is_file()]
    if not found:
        raise EvaluationError(
            "no dataset.json found next to the predictions (nnU-Net copies it there) nor in the reference's "
            f"dataset folder {reference.parent}; pass it with -j/--dataset-json")
    first = _load_json(found[0])["labels"]
    for other in found[1:]:
        if _load_json(other)["labels"] != first:
            raise EvaluationError(
                f"the labels of {found[0]} and {other} differ, so label values may mean different things; pass the "
                f"dataset.json that defines the reference labels with -j/--dataset-json")
    return found[0]


def _parse_labels(dataset: dict, path: Path) -> tuple[dict[str, int], int | None]:
    """Foreground labels ``{name: value}`` in dataset.json order, and the ignore label's value (or None)."""
    labels, ignore = {}, None
    for name, value in dataset["labels"].items():
        if isinstance(value, (list, tuple)):
            raise EvaluationError(
                f"{path}: label {name!r} is a region ({value}); region-based datasets are not supported, evaluate "
                f"against per-class label maps instead")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise EvaluationError(f"{path}: label {name!r} has value {value!r}; non-negative integers expected")
        if name == "ignore":
            ignore = value
        elif value != 0:
            labels[name] = value
    if not labels:
        raise EvaluationError(f"{path} declares no foreground label")
    return labels, ignore


def _select_labels(available: dict[str, int], requested: Sequence[str] | None) -> dict[str, int]:
    """Resolve ``--labels`` (names, case-insensitive names, or integer values) in the order given."""
    if not requested:
        return dict(available)
    by_lower: dict[str, list[str]] = {}
    for name in available:
        by_lower.setdefault(name.lower(), []).append(name)
    by_value = {v: n for n, v in available.items()}
    chosen: dict[str, int] = {}
    for token in requested:
        token = str(token)
        if token in available:
            name = token
        elif len(by_lower.get(token.lower(), [])) == 1:
            name = by_lower[token.lower()][0]
        elif token.lstrip("-").isdigit() and int(token) in by_value:
            name = by_value[int(token)]
        else:
            listing = ", ".join(f"{n} ({v})" for n, v in available.items())
            raise EvaluationError(f"--labels: unknown label {token!r}; available: {listing}")
        if name in chosen:
            raise EvaluationError(f"--labels: label {name!r} is selected twice")
        chosen[name] = available[name]
    return chosen


def _list_cases(folder: Path, file_ending: str) -> dict[str, Path]:
    return {p.name[: -len(file_ending)]: p for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(file_ending) and len(p.name) > len(file_ending)}


def _method_names(folders: Sequence[Path]) -> list[str]:
    """Folder names, lengthened to ``parent/name`` (and further) only where two folders share a name."""
    depth = [1] * len(folders)
    while True:
        names = ["/".join(f.parts[-d:]) for f, d in zip(folders, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        grown = False
        for i, n in enumerate(names):
            if n in clashes and depth[i] < len(folders[i].parts):
                depth[i] += 1
                grown = True
        if not grown:
            raise EvaluationError(f"cannot tell prediction folders apart: {sorted(clashes)}")


def _default_num_processes() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------

def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _aggregate(per_case: dict[str, dict[str, dict]], label_names: Sequence[str]) -> tuple[dict, dict]:
    means = {}
    for name in label_names:
        rows = [per_case[c][name] for c in per_case]
        means[name] = {m: _mean(r[m] for r in rows) for m in METRICS}
        means[name]["n_cases"] = len(rows)
        means[name]["n_hd95_mm"] = sum(r["hd95_mm"] is not None for r in rows)
    over_labels = {m: _mean(means[n][m] for n in label_names) for m in METRICS}
    return means, over_labels


# ----------------------------------------------------------------------------------------------------------------
# Reports: Markdown, CSV, plots
# ----------------------------------------------------------------------------------------------------------------

def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}"


def _best(values: list[float | None], higher_is_better: bool) -> float | None:
    kept = [v for v in values if v is not None]
    if len(kept) < 2:
        return None
    return max(kept) if higher_is_better else min(kept)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_markdown(summary: dict) -> str:
    """Markdown tables in the papers' layout from a summary returned by :func:`evaluate_folders`.

    The first table has one row per method and the columns mean DSC (%), mean HD95 (voxels, TransUNet protocol),
    mean HD95 (mm), then the DSC (%) of every label; the second gives HD95 (mm) per label. The best value of a
    column is bold when several methods are compared.
    """
    methods = summary["methods"]
    labels = list(summary["labels"])
    n_cases = len(summary["cases"])
    lines = [f"Dice (%) and HD95 over {n_cases} case(s); HD95 (vox) follows the TransUNet protocol (medpy, no "
             f"spacing), HD95 (mm) uses the true spacing and skips cases where a mask is empty.", ""]

    def table(header: list[str], columns: list[tuple]) -> list[str]:
        out = [_row(["Method"] + header), _row(["---"] + ["---:"] * len(header))]
        values = {key: [getter(methods[m]) for m in methods] for key, getter, _, _ in columns}
        best = {key: _best(values[key], hib) for key, _, hib, _ in columns}
        for i, method in enumerate(methods):
            cells = [method.replace("|", "\\|")]
            for key, _, _, scale in columns:
                v = values[key][i]
                text = _fmt(v, scale)
                cells.append(f"**{text}**" if v is not None and best[key] is not None and v == best[key] else text)
            out.append(_row(cells))
        return out

    main_columns = [("dsc", lambda s: s["mean_over_labels"]["dice"], True, 100.0),
                    ("hdv", lambda s: s["mean_over_labels"]["hd95_voxel"], False, 1.0),
                    ("hdm", lambda s: s["mean_over_labels"]["hd95_mm"], False, 1.0)]
    main_columns += [(f"d:{n}", (lambda s, n=n: s["mean"][n]["dice"]), True, 100.0) for n in labels]
    lines += table(["DSC (%)", "HD95 (vox)", "HD95 (mm)"] + [n.replace("|", "\\|") for n in labels], main_columns)
    lines += ["", "HD95 (mm) per label:", ""]
    hd_columns = [(f"h:{n}", (lambda s, n=n: s["mean"][n]["hd95_mm"]), False, 1.0) for n in labels]
    lines += table([n.replace("|", "\\|") for n in labels], hd_columns)
    return "\n".join(lines) + "\n"


def _csv_text(summary: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "case", "label", "value", *METRICS])
    values = summary["labels"]

    def cell(v):
        return "" if v is None else repr(v)

    for method, result in summary["methods"].items():
        for case, per_label in result["per_case"].items():
            for name, metrics in per_label.items():
                writer.writerow([method, case, name, values[name], *(cell(metrics[m]) for m in METRICS)])
        for name, metrics in result["mean"].items():
            writer.writerow([method, "mean", name, values[name], *(cell(metrics[m]) for m in METRICS)])
        writer.writerow([method, "mean", "mean_over_labels", "",
                         *(cell(result["mean_over_labels"][m]) for m in METRICS)])
    return buffer.getvalue()


def _plot(summary: dict, metric: str, ylabel: str, path: Path) -> None:
    """Grouped box plots: one group per label, one colour per method, mean as a white diamond."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    methods = list(summary["methods"])
    labels = list(summary["labels"])
    n = len(methods)
    width = 0.8 / n
    fig = Figure(figsize=(max(6.0, 0.9 * len(labels) * max(1, n) ** 0.5 + 2), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(n)]
    for i, method in enumerate(methods):
        per_case = summary["methods"][method]["per_case"]
        for j, name in enumerate(labels):
            data = [per_case[c][name][metric] for c in per_case]
            data = [v * (100.0 if metric == "dice" else 1.0) for v in data if v is not None]
            if not data:
                continue
            x = j - 0.4 + width * (i + 0.5)
            box = ax.boxplot([data], positions=[x], widths=width * 0.85, patch_artist=True, showfliers=True,
                             medianprops={"color": "black"}, flierprops={"markersize": 3})
            for patch in box["boxes"]:
                patch.set_facecolor(colours[i])
                patch.set_alpha(0.75)
            ax.plot([x], [float(np.mean(data))], marker="D", color="white", markeredgecolor="black",
                    markersize=4, zorder=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per label, {len(summary['cases'])} case(s)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=[Patch(facecolor=colours[i], alpha=0.75, label=m) for i, m in enumerate(methods)],
              fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)


def _write_outputs(summary: dict, folder: Path, plots: bool) -> None:
    with open(folder / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    (folder / "metrics.csv").write_text(_csv_text(summary))
    (folder / "summary.md").write_text(format_markdown(summary))
    if plots:
        _plot(summary, "dice", "Dice (%)", folder / "dice.png")
        _plot(summary, "hd95_mm", "HD95 (mm)", folder / "hd95_mm.png")
        _plot(summary, "hd95_voxel", "HD95 (voxels, TransUNet protocol)", folder / "hd95_voxel.png")


def _check_output(output: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    out = output.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise EvaluationError(f"-o/--output {output} must not be, contain or lie inside the input folder "
                                  f"{folder}")
    if out.exists():
        if not out.is_dir():
            raise EvaluationError(f"-o/--output {output} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise EvaluationError(f"-o/--output {output} exists and is not empty; pass --overwrite to replace it")


def _publish(summary: dict, output: Path, overwrite: bool, plots: bool) -> None:
    """Write everything into a temporary sibling folder, then move it into place in one rename."""
    out = output.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # mkdtemp creates the folder private (0700); give OUT the permissions a plain mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _write_outputs(summary, tmp, plots)
        if out.exists():
            if any(out.iterdir()):
                if not overwrite:
                    raise EvaluationError(f"-o/--output {output} appeared while evaluating and is not empty; "
                                          f"pass --overwrite to replace it")
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
                return
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------------

def evaluate_folders(reference: str | os.PathLike, predictions: Sequence[str | os.PathLike],
                     dataset_json: str | os.PathLike | None = None, labels: Sequence[str | int] | None = None,
                     output: str | os.PathLike | None = None, num_processes: int | None = None,
                     overwrite: bool = False, names: Sequence[str] | None = None, plots: bool = True,
                     progress: bool | None = None) -> dict:
    """Score one or more prediction folders against a reference folder.

    Args:
        reference: Folder of reference label maps (e.g. ``labelsTs``), one file per case named ``CASE<file_ending>``.
        predictions: Prediction folders (e.g. the ``-o`` folders of ``nnUNetv2_predict``); each becomes one method.
        dataset_json: nnU-Net dataset.json for label names/values and ``file_ending``. Default: the one nnU-Net
            copies next to the predictions, else ``reference/../dataset.json``; all found must agree on labels.
        labels: Labels to score, as names from dataset.json (case-insensitive) or integer values, in the order
            wanted for the tables. Default: every foreground label.
        output: Folder for summary.json, metrics.csv, summary.md and PNG plots; written atomically. None: write
            nothing.
        num_processes: Worker processes (default ``min(#CPUs, 8)``); 1 runs in this process.
        overwrite: Replace a non-empty ``output`` folder.
        names: Method names, one per prediction folder. Default: folder names, lengthened to ``parent/name`` where
            two folders share a name.
        plots: Write dice.png, hd95_mm.png and hd95_voxel.png.
        progress: Show a progress bar (default: only on a terminal).

    Returns:
        ``{"methods": {NAME: {"per_case": {CASE: {LABEL: {"dice", "hd95_voxel", "hd95_mm"}}},
        "mean": {LABEL: {"dice", "hd95_voxel", "hd95_mm", "n_cases", "n_hd95_mm"}},
        "mean_over_labels": {"dice", "hd95_voxel", "hd95_mm"}}}, "labels": {LABEL: value}, "cases": [...],
        "reference": str, "dataset_json": str, "metrics": {metric: definition}}``; LABEL is the dataset.json name,
        missing values are None.

    Raises:
        EvaluationError: On any input problem (missing case, geometry mismatch, undeclared label value, unknown
            label, existing output); nothing is written then.
    """
    reference = Path(reference)
    if not reference.is_dir():
        raise EvaluationError(f"-r/--reference {reference} is not a folder")
    if not predictions:
        raise EvaluationError("-p/--predictions: give at least one prediction folder")
    pred_folders = [Path(p) for p in predictions]
    for p in pred_folders:
        if not p.is_dir():
            raise EvaluationError(f"-p/--predictions: {p} is not a folder")
    resolved = [p.resolve() for p in pred_folders]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise EvaluationError(f"-p/--predictions: {pred_folders[i]} is given twice")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(pred_folders):
            raise EvaluationError(f"--names: {len(names)} name(s) for {len(pred_folders)} prediction folder(s)")
        if len(set(names)) != len(names):
            raise EvaluationError(f"--names: names must be unique, got {names}")
    else:
        names = _method_names(resolved)
    if output is not None:
        _check_output(Path(output), overwrite, [reference, *pred_folders])

    json_path = _resolve_dataset_json(reference, pred_folders, Path(dataset_json) if dataset_json else None)
    dataset = _load_json(json_path)
    available, ignore_value = _parse_labels(dataset, json_path)
    selected = _select_labels(available, [str(x) for x in labels] if labels else None)
    declared = sorted({0, *available.values(), *([ignore_value] if ignore_value is not None else [])})
    file_ending = dataset.get("file_ending", DEFAULT_FILE_ENDING)

    ref_cases = _list_cases(reference, file_ending)
    if not ref_cases:
        raise EvaluationError(f"-r/--reference {reference} holds no *{file_ending} file (file_ending from {json_path})")
    pred_cases = {}
    for name, folder in zip(names, pred_folders):
        cases = _list_cases(folder, file_ending)
        missing = sorted(set(ref_cases) - set(cases))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise EvaluationError(f"prediction folder {folder} lacks case(s) {shown} (expected "
                                  f"{{case}}{file_ending} for every case of {reference})")
        extra = sorted(set(cases) - set(ref_cases))
        if extra:
            print(f"note: {folder}: {len(extra)} prediction(s) without reference ignored (e.g. {extra[0]})",
                  file=sys.stderr)
        pred_cases[name] = cases

    tasks = [(case, str(ref_file), [(n, str(pred_cases[n][case])) for n in names], list(selected.values()),
              declared, ignore_value) for case, ref_file in ref_cases.items()]
    raw = _run_tasks(tasks, num_processes, progress)

    value_to_name = {v: k for k, v in selected.items()}
    summary_methods = {}
    for name in names:
        per_case = {case: {value_to_name[v]: m for v, m in raw[case][name].items()} for case in ref_cases}
        mean, over = _aggregate(per_case, list(selected))
        summary_methods[name] = {"per_case": per_case, "mean": mean, "mean_over_labels": over}
    summary = {
        "methods": summary_methods,
        "labels": dict(selected),
        "cases": list(ref_cases),
        "reference": str(reference.resolve()),
        "predictions": {n: str(p) for n, p in zip(names, resolved)},
        "dataset_json": str(json_path.resolve()),
        "metrics": dict(_METRIC_TEXT),
    }
    if output is not None:
        _publish(summary, Path(output), overwrite, plots)
    return summary


def _run_tasks(tasks: list, num_processes: int | None, progress: bool | None) -> dict:
    from tqdm import tqdm

    n = _default_num_processes() if num_processes is None else int(num_processes)
    if n < 1:
        raise EvaluationError(f"-np/--num-processes must be >= 1, got {n}")
    n = min(n, len(tasks))
    disable = None if progress is None else not progress
    results = {}
    with tqdm(total=len(tasks), desc="evaluating cases", unit="case", disable=disable, file=sys.stderr) as bar:
        if n == 1:
            for task in tasks:
                case, res = _evaluate_case(task)
                results[case] = res
                bar.update()
        else:
            # spawn, like nnU-Net's own evaluation: safe even when the caller has torch threads running.
            with multiprocessing.get_context("spawn").Pool(n) as pool:
                for case, res in pool.imap_unordered(_evaluate_case, tasks):
                    results[case] = res
                    bar.update()
    return results


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_fias evaluate",
        description="Per-class Dice and HD95 (TransUNet protocol in voxels, and in mm) of one or more prediction "
                    "folders against a reference folder; writes summary.json, metrics.csv, summary.md (paper "
                    "layout) and PNG plots to OUT, and prints the Markdown table.")
    parser.add_argument("-r", "--reference", required=True, metavar="REF",
                        help="folder of reference label maps, e.g. nnUNet_raw/DatasetXXX/labelsTs")
    parser.add_argument("-p", "--predictions", required=True, nargs="+", metavar="PRED",
                        help="prediction folders; each is one row of the table, named by its folder name")
    parser.add_argument("-j", "--dataset-json", metavar="JSON",
                        help="dataset.json with label names and file_ending (default: the one next to the "
                             "predictions, else REF/../dataset.json)")
    parser.add_argument("--labels", nargs="+", metavar="NAME",
                        help="labels to score, by name or integer value, in table order (default: all foreground "
                             "labels), e.g. TransUNet's 8 organs of a 13-label Synapse dataset: --labels aorta "
                             "gallbladder kidney_left kidney_right liver pancreas spleen stomach")
    parser.add_argument("--names", nargs="+", metavar="NAME",
                        help="method names for the table, one per prediction folder (default: folder names)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (must be new or empty)")
    parser.add_argument("-np", "--num-processes", type=int, default=None, metavar="N",
                        help=f"worker processes (default: min(#CPUs, 8) = {_default_num_processes()} here)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of ``nnunetv2_fias evaluate``; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        summary = evaluate_folders(args.reference, args.predictions, dataset_json=args.dataset_json,
                                   labels=args.labels, output=args.output, num_processes=args.num_processes,
                                   overwrite=args.overwrite, names=args.names, plots=not args.no_plots)
    except EvaluationError as e:
        print(f"nnunetv2_fias evaluate: error: {e}", file=sys.stderr)
        return 1
    print(format_markdown(summary))
    print(f"Written to {Path(args.output).resolve()}: summary.json, metrics.csv, summary.md"
          + ("" if args.no_plots else ", dice.png, hd95_mm.png, hd95_voxel.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
