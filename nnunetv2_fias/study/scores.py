"""Scoring what a study produced with the project's evaluation (DSC, HD95 in mm and in voxels per class and case).

Two sources: the test set (each model's postprocessed predictions of ``imagesTs`` against ``labelsTs``) and the
cross-validation (each training case predicted once, by the fold that held it out, as the selected model or
ensemble after its postprocessing, against nnU-Net's ``gt_segmentations``), so a dataset without a test set still
gets a comparison.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nnunetv2_fias.evaluation import evaluate_folders
from nnunetv2_fias.study.finish import load_selection, predictions_current, selection_current
from nnunetv2_fias.study.grid import Model
from nnunetv2_fias.study.run import Context


def _file_ending(ctx: Context) -> str:
    return json.loads((ctx.paths.raw / "dataset.json").read_text())["file_ending"]


def _score(ctx: Context, reference: Path, folders: dict[str, Path]) -> dict:
    return evaluate_folders(reference, list(folders.values()), dataset_json=ctx.paths.raw / "dataset.json",
                            num_processes=ctx.options.num_processes, names=list(folders), plots=False,
                            progress=False)


def score_test(ctx: Context) -> tuple[dict | None, str | None]:
    labels = ctx.paths.raw / "labelsTs"
    if not labels.is_dir() or not any(labels.iterdir()):
        return None, f"no labelsTs in {ctx.paths.raw}: the test set is not scored"
    folders = {m.name: ctx.paths.predictions(m) for m in ctx.grid.models
               if selection_current(ctx, m) and predictions_current(ctx, m)}
    if not folders:
        return None, "no model has test predictions yet"
    return _score(ctx, labels, folders), None


def crossval_folder(ctx: Context, model: Model) -> Path:
    """The selected model's (or ensemble's) cross-validation predictions after postprocessing (find_best's)."""
    best = load_selection(ctx, model)["best_model_or_ensemble"]
    return Path(best["postprocessing_file"]).parent / "postprocessed"


def score_crossval(ctx: Context) -> tuple[dict | None, str | None]:
    from nnunetv2_fias.study.finish import model_trained

    folders = {m.name: crossval_folder(ctx, m) for m in ctx.grid.models
               if model_trained(ctx, m) and selection_current(ctx, m)}
    folders = {k: v for k, v in folders.items() if v.is_dir()}
    if not folders:
        return None, "no model has a selection yet: the cross-validation is not scored"
    ending = _file_ending(ctx)
    common = set.intersection(*({p.name[:-len(ending)] for p in f.glob(f"*{ending}")} for f in folders.values()))
    gt = ctx.paths.preprocessed / "gt_segmentations"
    # a reference folder of exactly the cases every model predicted (the folds of the grid)
    reference = ctx.paths.evaluation / "crossval_reference"
    if reference.exists():
        shutil.rmtree(reference)
    reference.mkdir(parents=True)
    for case in sorted(common):
        source = gt / f"{case}{ending}"
        try:
            os.symlink(source, reference / source.name)
        except OSError:
            shutil.copy2(source, reference / source.name)
    return _score(ctx, reference, folders), None


def fold_validation(ctx: Context) -> dict:
    """``{model: {configuration: {fold: mean foreground Dice}}}`` from nnU-Net's per-fold validation summaries."""
    out: dict = {}
    for job in ctx.grid.train_jobs():
        summary = ctx.paths.fold_folder(job) / "validation" / "summary.json"
        if summary.is_file():
            dice = json.loads(summary.read_text())["foreground_mean"]["Dice"]
            out.setdefault(job.model.name, {}).setdefault(job.configuration, {})[str(job.fold)] = dice
    return out
