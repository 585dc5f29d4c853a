"""``evaluate_folders``: from a reference folder and prediction folders to the summary, in worker processes.

Everything that can be checked without reading the images (folders, output location, process count, dataset.json,
labels, which cases exist) is checked before the first case is scored, so that a mistake costs seconds, not a whole
evaluation. Per-case work runs in spawned processes, as in nnU-Net's own evaluation.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from nnunetv2_fias._util import default_num_processes
from nnunetv2_fias.evaluation.inputs import (EvaluationError, LabelMap, check_input_folders, check_same_geometry,
                                             label_boxes, load_label_setup, method_names, prediction_cases,
                                             read_label_map, reference_cases)
from nnunetv2_fias.evaluation.metrics import ABSENT_SCORES, score_masks
from nnunetv2_fias.evaluation.report import build_summary, check_output, publish


class CaseTask(NamedTuple):
    """One case to score in a worker process (top-level and picklable)."""

    case: str
    reference: str
    predictions: list[tuple[str, str]]  # (method, prediction file)
    label_values: list[int]             # values to score
    declared: list[int]                 # values a label map may hold
    ignore: int | None                  # nnU-Net's ignore label


def _merge_boxes(a, b) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _erase(label_map: LabelMap, region: np.ndarray, declared: Sequence[int]) -> tuple[LabelMap, list]:
    """Set ``region`` to background and recompute the label boxes."""
    array = np.where(region, 0, label_map.array)
    return label_map._replace(array=array), ndimage.find_objects(array, max_label=max(declared))


def _score_labels(prediction: LabelMap, pred_boxes: list, reference: LabelMap, ref_boxes: list,
                  label_values: Sequence[int]) -> dict[int, dict]:
    per_label = {}
    for value in label_values:
        box = _merge_boxes(ref_boxes[value - 1], pred_boxes[value - 1])
        if box is None:  # in neither label map
            per_label[value] = dict(ABSENT_SCORES)
        else:
            per_label[value] = score_masks(prediction.array[box] == value, reference.array[box] == value,
                                           reference.spacing)
    return per_label


def evaluate_case(task: CaseTask) -> tuple[str, dict]:
    """Score every prediction of one case against its reference.

    Returns:
        ``(case, {method: {label_value: metrics}})``.
    """
    case = task.case
    reference = read_label_map(task.reference, case, "reference")
    ref_boxes = label_boxes(reference, task.declared, case, "reference")
    ignore_region = None
    if task.ignore is not None and ref_boxes[task.ignore - 1] is not None:
        # The ignore region is excluded from scoring, as nnU-Net does: erase it from both label maps.
        ignore_region = reference.array == task.ignore
        reference, ref_boxes = _erase(reference, ignore_region, task.declared)
    results = {}
    for method, pred_file in task.predictions:
        prediction = read_label_map(pred_file, case, "prediction")
        check_same_geometry(case, prediction, reference)
        pred_boxes = label_boxes(prediction, task.declared, case, "prediction")
        if ignore_region is not None:
            prediction, pred_boxes = _erase(prediction, ignore_region, task.declared)
        results[method] = _score_labels(prediction, pred_boxes, reference, ref_boxes, task.label_values)
    return case, results


def resolve_num_processes(num_processes: int | None) -> int:
    """``None`` -> :func:`nnunetv2_fias._util.default_num_processes`; otherwise at least 1."""
    if num_processes is None:
        return default_num_processes()
    if int(num_processes) < 1:
        raise EvaluationError(f"-np/--num-processes must be >= 1, got {num_processes}")
    return int(num_processes)


def run_tasks(tasks: Sequence[CaseTask], num_processes: int, progress: bool | None) -> dict:
    """``{case: {method: {label_value: metrics}}}``; ``num_processes`` 1 runs in this process."""
    from tqdm import tqdm

    n = min(num_processes, len(tasks))
    results = {}
    with tqdm(total=len(tasks), desc="evaluating cases", unit="case", file=sys.stderr,
              disable=None if progress is None else not progress) as bar:
        if n == 1:
            for task in tasks:
                case, res = evaluate_case(task)
                results[case] = res
                bar.update()
        else:
            # spawn, like nnU-Net's own evaluation: safe even when the caller has torch threads running.
            with multiprocessing.get_context("spawn").Pool(n) as pool:
                for case, res in pool.imap_unordered(evaluate_case, tasks):
                    results[case] = res
                    bar.update()
    return results


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
        num_processes: Worker processes (default: nnU-Net's ``nnUNet_def_n_proc``, else 8, at most the CPUs
            available); 1 runs in this process.
        overwrite: Replace a non-empty ``output`` folder.
        names: Method names, one per prediction folder. Default: folder names, lengthened to ``parent/name`` where
            two folders share a name.
        plots: Write dice.png, hd95_mm.png and hd95_voxel.png.
        progress: Show a progress bar (default: only on a terminal).

    Returns:
        ``{"methods": {NAME: {"per_case": {CASE: {LABEL: {"dice", "hd95_voxel", "hd95_mm"}}},
        "mean": {LABEL: {"dice", "hd95_voxel", "hd95_mm", "n_cases", "n_hd95_mm"}},
        "mean_over_labels": {"dice", "hd95_voxel", "hd95_mm"}}}, "labels": {LABEL: value}, "cases": [...],
        "reference": str, "predictions": {NAME: str}, "dataset_json": str, "metrics": {metric: definition}}``;
        LABEL is the dataset.json name, missing values are None.

    Raises:
        EvaluationError: On any input problem (missing case, geometry mismatch, undeclared label value, unknown
            label, existing or unwritable output); nothing is written then.
    """
    reference = Path(reference)
    pred_folders = [Path(p) for p in predictions]
    check_input_folders(reference, pred_folders)
    resolved = [p.resolve() for p in pred_folders]
    names = method_names(resolved, names)
    if output is not None:
        check_output(Path(output), overwrite, [reference, *pred_folders])
    n_processes = resolve_num_processes(num_processes)

    setup = load_label_setup(reference, pred_folders, Path(dataset_json) if dataset_json else None, labels)
    ref_cases = reference_cases(reference, setup)
    pred_cases = {name: prediction_cases(folder, ref_cases, reference, setup.file_ending)
                  for name, folder in zip(names, pred_folders)}
    tasks = [CaseTask(case, str(ref_file), [(n, str(pred_cases[n][case])) for n in names],
                      list(setup.selected.values()), setup.declared, setup.ignore)
             for case, ref_file in ref_cases.items()]

    scores = run_tasks(tasks, n_processes, progress)
    summary = build_summary(scores, setup.selected, list(ref_cases), reference.resolve(),
                            dict(zip(names, resolved)), setup.path.resolve())
    if output is not None:
        publish(summary, Path(output), overwrite, plots)
    return summary
