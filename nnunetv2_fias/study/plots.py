"""The study's figures: every case of every class per model side by side, and the training curves of every fold.

Drawn on :class:`matplotlib.figure.Figure` objects under their own style (no pyplot state, no global style that
another plot in the same process, e.g. nnU-Net's seaborn progress plot, may have set).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunetv2_fias import _util

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "lines.linewidth": 1.2}
LABELS = {"dice": "DSC (%)", "hd95_mm": "HD95 (mm)", "hd95_voxel": "HD95 (voxels)"}
SCALE = {"dice": 100.0}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def cases_plot(section: dict, metric: str, path: Path, title: str) -> None:
    """Per class, one column of points per model (each point a case), the mean as a bar across its column."""
    import matplotlib

    models = list(section["methods"])
    labels = list(section["labels"])
    with matplotlib.rc_context(STYLE):
        fig = _figure(max(5.0, 0.6 * len(labels) * max(1, len(models)) + 1.5), 3.6)
        ax = fig.add_subplot()
        width = 0.8 / len(models)
        rng = np.random.default_rng(0)
        for k, model in enumerate(models):
            colour = f"C{k}"
            for i, label in enumerate(labels):
                values = [r[label][metric] * SCALE.get(metric, 1.0)
                          for r in section["methods"][model]["per_case"].values() if r[label][metric] is not None]
                x = i - 0.4 + width * (k + 0.5)
                ax.scatter(x + rng.uniform(-width / 4, width / 4, len(values)), values, s=9, color=colour,
                           alpha=0.7, label=model if i == 0 else None)
                if values:
                    ax.hlines(np.mean(values), x - width / 2.5, x + width / 2.5, color=colour, linewidth=2)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel(LABELS[metric])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        fig.legend(loc="outside lower center", ncol=min(len(models), 3), frameon=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        _util.atomic_savefig(fig, path)


def _logging(checkpoint: Path) -> dict | None:
    import torch

    try:
        # mmap: only the small logging dict is read, not the weights
        return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("logging")
    except Exception:  # an unreadable checkpoint just has no curve
        return None


def training_curves(curves: dict[str, dict[str, dict]], path: Path, title: str) -> None:
    """``curves[model][fold]`` = nnU-Net's logging dict; losses on top (solid train, dashed validation), the EMA
    pseudo-Dice below, one colour a fold, one legend below the panels (so it covers no curve)."""
    import matplotlib
    from matplotlib.lines import Line2D

    models = list(curves)
    folds = sorted({fold for per in curves.values() for fold in per}, key=str)
    colour = {fold: f"C{k}" for k, fold in enumerate(folds)}
    with matplotlib.rc_context(STYLE):
        fig = _figure(3.2 * len(models) + 0.5, 5.0)
        axes = fig.subplots(2, len(models), squeeze=False, sharex="col")
        for col, model in enumerate(models):
            top, bottom = axes[0][col], axes[1][col]
            for fold, log in sorted(curves[model].items()):
                # markers: a curve of one epoch is a single point
                top.plot(log.get("train_losses", []), color=colour[fold], marker=".")
                top.plot(log.get("val_losses", []), color=colour[fold], marker=".", linestyle="--")
                bottom.plot(log.get("ema_fg_dice", []), color=colour[fold], marker=".")
            top.set_title(model)
            top.set_ylabel("loss (solid: train, dashed: val)")
            bottom.set_ylabel("EMA pseudo-Dice")
            bottom.set_xlabel("epoch")
        handles = [Line2D([], [], color=colour[f], marker=".", label=f"fold {f}") for f in folds]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(folds), 6), frameon=False)
        fig.suptitle(title)
        path.parent.mkdir(parents=True, exist_ok=True)
        _util.atomic_savefig(fig, path)


def collect_curves(fold_folders: dict[str, dict[str, Path]]) -> dict[str, dict[str, dict]]:
    """``{model: {fold: logging}}`` from each fold's final (else latest) checkpoint."""
    out: dict = {}
    for model, folds in fold_folders.items():
        for fold, folder in folds.items():
            for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
                if (folder / name).is_file():
                    log = _logging(folder / name)
                    if log:
                        out.setdefault(model, {})[fold] = log
                    break
    return out
