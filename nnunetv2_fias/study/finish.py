"""After training, per model (trainer with plans): nnU-Net's model selection, then the test-set inference it prescribes.

``nnUNetv2_find_best_configuration`` runs over the model's trained configurations (ensembling them when that wins
on the cross-validation) and writes ``inference_information.json`` into the dataset's results folder, which the
next model's selection overwrites; the study keeps each model's copy in ``STUDY_DIR/selection/MODEL/``. The test
predictions are made in a hidden work folder and renamed to ``STUDY_DIR/predictions/MODEL`` when complete, so a
killed inference never leaves a half folder that looks finished.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from nnunetv2_fias import _util
from nnunetv2_fias.study import commands, execute
from nnunetv2_fias.study.grid import Model
from nnunetv2_fias.study.layout import FoldState, read_job_record, write_job_record
from nnunetv2_fias.study.run import Context


def model_trained(ctx: Context, model: Model) -> bool:
    return all(ctx.state(j) is FoldState.DONE for j in ctx.grid.train_jobs() if j.model == model)


def _newest_checkpoint(ctx: Context, model: Model) -> float:
    return max((ctx.paths.fold_folder(j) / "checkpoint_final.pth").stat().st_mtime
               for j in ctx.grid.train_jobs() if j.model == model)


def selection_current(ctx: Context, model: Model) -> bool:
    target = ctx.paths.selection(model)
    return target.is_file() and target.stat().st_mtime >= _newest_checkpoint(ctx, model)


def load_selection(ctx: Context, model: Model) -> dict:
    return json.loads(ctx.paths.selection(model).read_text())


def select(ctx: Context, model: Model) -> bool:
    """find_best over the model's configurations; True when its selection is current afterwards."""
    key = f"select__{model.name}"
    if selection_current(ctx, model):
        return True
    command = commands.find_best_command(ctx.grid, model, ctx.options)
    print(f"[select] {model.name}: {commands.show(command)}", flush=True)
    write_job_record(ctx.paths, key, "running", command=commands.show(command))
    code = execute.run_sequence([command], ctx.env, ctx.paths.log(key), key)
    written = ctx.paths.results / "inference_information.json"
    if code == 0:
        info = json.loads(written.read_text())
        considered = {(m["trainer"], m["plans"]) for m in info["considered_models"]}
        if considered != {(model.trainer, model.plans)}:
            code = -1  # another find_best (the user's?) wrote the file in between
    if code != 0:
        write_job_record(ctx.paths, key, "failed", returncode=code)
        print(f"  {model.name}: selection FAILED (exit status {code}); see {ctx.paths.log(key)}", flush=True)
        return False
    target = ctx.paths.selection(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    instructions = ctx.paths.results / "inference_instructions.txt"
    if instructions.is_file():
        _util.atomic_write_text(target.with_name("inference_instructions.txt"), instructions.read_text())
    _util.atomic_write_json(target, info)
    write_job_record(ctx.paths, key, "done", returncode=0)
    best = info["best_model_or_ensemble"]
    chosen = " + ".join(m["configuration"] for m in best["selected_model_or_models"])
    print(f"  {model.name}: {chosen} (cross-validation Dice {best['result_on_crossval_post_pp']:.4f} after "
          f"postprocessing)", flush=True)
    return True


def test_images(ctx: Context) -> Path | None:
    folder = ctx.paths.raw / "imagesTs"
    return folder if folder.is_dir() and any(folder.iterdir()) else None


def predictions_current(ctx: Context, model: Model) -> bool:
    record = read_job_record(ctx.paths, f"predict__{model.name}")
    return (ctx.paths.predictions(model).is_dir() and record is not None and record.get("status") == "done"
            and record.get("selection_mtime") == ctx.paths.selection(model).stat().st_mtime)


def predict(ctx: Context, model: Model) -> bool:
    """The selected model or ensemble on imagesTs, postprocessed; True when the predictions are current."""
    key = f"predict__{model.name}"
    images = test_images(ctx)
    if images is None or predictions_current(ctx, model):
        return True
    final = ctx.paths.predictions(model)
    work = final.with_name(f".{final.name}.partial")
    if work.exists():
        print(f"  removing the unfinished predictions of an interrupted run: {work}", flush=True)
        shutil.rmtree(work)
    cmds = commands.inference_commands(ctx.grid, load_selection(ctx, model), images, work, ctx.options)
    print(f"[predict] {model.name}: {len(cmds)} commands (log {ctx.paths.log(key)})", flush=True)
    write_job_record(ctx.paths, key, "running", command=" && ".join(map(commands.show, cmds)))
    code = execute.run_sequence(cmds, ctx.env, ctx.paths.log(key), key)
    if code != 0:
        write_job_record(ctx.paths, key, "failed", returncode=code)
        print(f"  {model.name}: inference FAILED (exit status {code}); see {ctx.paths.log(key)}", flush=True)
        return False
    if final.exists():
        shutil.rmtree(final)
    (work / "postprocessed").rename(final)
    shutil.rmtree(work)
    write_job_record(ctx.paths, key, "done", returncode=0,
                     selection_mtime=ctx.paths.selection(model).stat().st_mtime)
    return True


def finish(ctx: Context) -> list[str]:
    """Selection and inference for every fully trained model; returns what could not be done, one line each."""
    problems = []
    for model in ctx.grid.models:
        if not model_trained(ctx, model):
            problems.append(f"{model.name}: not all folds are trained; no selection or test predictions")
            continue
        if not select(ctx, model):
            problems.append(f"{model.name}: selection failed ({ctx.paths.log('select__' + model.name)})")
        elif not predict(ctx, model):
            problems.append(f"{model.name}: test inference failed ({ctx.paths.log('predict__' + model.name)})")
    return problems

