"""The demo's outputs for people: ``report.md`` and an overlay PNG (CT, reference and predictions of one test slice).

Both are written atomically, so an interrupted run never leaves a truncated report or image behind.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
from pathlib import Path

from nnunetv2_fias._util import atomic_savefig, atomic_write_text, available_cpus
from nnunetv2_fias.demo.settings import (COMPARE_NOTE, DATASET_NAME, FOLD, METHOD_NAMES, Budget,
                                         DemoError)


def format_duration(seconds: float) -> str:
    """``12.3 s`` below a minute, else ``m:ss``."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}" if m else f"{seconds:.1f} s"


def _pick_slice(reference: Path, file_ending: str) -> tuple[str, int]:
    """Test case and slice showing the most organs (ties: most organ pixels)."""
    import numpy as np
    import SimpleITK as sitk

    best = None
    for f in sorted(reference.glob("*" + file_ending)):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        for z in range(lab.shape[0]):
            s = lab[z]
            key = (len(np.unique(s)), int((s > 0).sum()))
            if best is None or key > best[0]:
                best = (key, f.name[: -len(file_ending)], z)
    if best is None:
        raise DemoError(f"no reference label files (*{file_ending}) in {reference}")
    return best[1], best[2]


def write_overlay(raw_dataset: Path, predictions: dict[str, Path], png: Path) -> tuple[str, int]:
    """PNG of one test slice: CT (abdomen window), reference and each method's prediction as colour overlays.

    Returns:
        The case name and slice index shown.
    """
    import numpy as np
    import SimpleITK as sitk
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    dataset = json.loads((raw_dataset / "dataset.json").read_text())
    ending = dataset["file_ending"]
    names = {int(v): k for k, v in dataset["labels"].items() if int(v) > 0}
    case, z = _pick_slice(raw_dataset / "labelsTs", ending)

    def read_slice(path: Path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[z]

    image = read_slice(raw_dataset / "imagesTs" / f"{case}_0000{ending}")
    panels = [("reference", read_slice(raw_dataset / "labelsTs" / f"{case}{ending}"))]
    panels += [(method, read_slice(folder / f"{case}{ending}")) for method, folder in predictions.items()]

    n_labels = max(names) if names else 1
    # tab10 without its grey (invisible on CT), then tab20's lighter shades for datasets with more labels.
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    palette += [c for i, c in enumerate(colormaps["tab20"].colors) if i % 2 == 1 and i != 15]
    colours = np.array([palette[i % len(palette)] for i in range(n_labels)])
    cmap = ListedColormap(colours)
    window = np.clip((image.astype(np.float32) + 125) / 400, 0, 1)  # TransUNet's [-125, 275] HU window

    fig = Figure(figsize=(3.2 * (len(panels) + 1), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    axes[0].imshow(window, cmap="gray", interpolation="nearest")
    axes[0].set_title(f"{case}, slice {z}\nCT [-125, 275] HU", fontsize=9)
    for ax, (title, seg) in zip(axes[1:], panels):
        ax.imshow(window, cmap="gray", interpolation="nearest")
        masked = np.ma.masked_where(seg == 0, seg - 1)
        ax.imshow(masked, cmap=cmap, vmin=0, vmax=n_labels - 1, alpha=0.55, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    handles = [Patch(color=colours[v - 1], label=name) for v, name in sorted(names.items())]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    png.parent.mkdir(parents=True, exist_ok=True)
    atomic_savefig(fig, png)
    return case, z


def _training_budget(fold_dir: Path) -> str:
    """Epochs, iterations and batch size as nnU-Net recorded them in the fold's debug.json."""
    try:
        d = json.loads((fold_dir / "debug.json").read_text())
        mirroring = "off" if d.get("inference_allowed_mirroring_axes") == "None" else "on"
        return (f"{d['num_epochs']} epochs x {d['num_iterations_per_epoch']} iterations, batch size "
                f"{d['batch_size']}, test-time mirroring {mirroring}")
    except (OSError, ValueError, KeyError):
        return "budget not readable from debug.json"


def write_report(out: Path, args: argparse.Namespace, device: str, budget: Budget, trainers: dict[str, str],
                 step_times: list[tuple[str, float, float]], overlay: tuple[str, int], total: float) -> Path:
    """``out/report.md``: what ran, the test-set table, where every file is, and the time of each step.

    Args:
        args: the parsed command line (``argv``, ``budget`` and ``seed`` are quoted).
        trainers: ``{"fias": trainer class, ["baseline": trainer class]}``.
        step_times: ``(step title, wall seconds, CPU seconds)`` per step.
        overlay: case and slice shown in ``overlay.png``.
        total: wall time of the whole run in seconds.
    """
    eval_dir = out / "evaluation"
    table = (eval_dir / "summary.md").read_text().strip()
    summary = json.loads((eval_dir / "summary.json").read_text())
    means = {m: v["mean_over_labels"]["dice"] for m, v in summary["methods"].items()}
    results = out / "nnUNet_results" / DATASET_NAME
    fold_dirs = {key: results / f"{trainer}__nnUNetPlans__{args.configuration}" / f"fold_{FOLD}"
                 for key, trainer in trainers.items()}
    lines = [
        "# nnunetv2_fias demo report", "",
        f"- Command: `{shlex.join(['nnunetv2_fias', 'demo', *args.argv])}`",
        f"- Finished: {_dt.datetime.now().isoformat(timespec='seconds')}; total wall time {format_duration(total)} on "
        f"device `{device}`",
        f"- Budget `{args.budget}`: {budget.description}",
        f"- Data: synthetic phantoms (seed {args.seed}) in the Synapse layout, converted with the TransUNet protocol "
        f"(18 training cases, 12 test cases, 8 organs). **These are phantoms: the numbers say nothing about "
        f"performance on real CT.**",
        f"- Training: nnU-Net configuration `{args.configuration}`, fold {FOLD} only (nnU-Net's 5-fold split of the 18 "
        f"training cases: 14 train / 4 validation); not a 5-fold cross-validation.",
    ]
    lines += [f"- {METHOD_NAMES[key]}: `{trainers[key]}`, {_training_budget(d)}" for key, d in fold_dirs.items()]
    lines += ["- Test: the 12 held-out cases, predicted with `nnUNetv2_predict` from `checkpoint_final.pth`.", ""]
    if "baseline" in trainers:
        lines += [COMPARE_NOTE, ""]
    lines += [
        "## Test-set results", "",
        "Mean Dice over the 8 organs: " + ", ".join(f"{m} **{100 * d:.2f} %**" if d is not None else f"{m} n/a"
                                                    for m, d in means.items()), "",
        table, "",
        "## Files", "",
        f"- Table and metrics: `{eval_dir / 'summary.md'}`, `{eval_dir / 'summary.json'}`, "
        f"`{eval_dir / 'metrics.csv'}`",
        f"- Plots: `{eval_dir / 'dice.png'}`, `{eval_dir / 'hd95_mm.png'}`, `{eval_dir / 'hd95_voxel.png'}`",
        f"- Overlay of test case {overlay[0]}, slice {overlay[1]} (CT, reference, predictions): "
        f"`{out / 'overlay.png'}`",
    ]
    for key, fold_dir in fold_dirs.items():
        extra = f", CAF balance `{fold_dir / 'caf_balance.png'}`" if key == "fias" else ""
        lines.append(f"- {METHOD_NAMES[key]}: training curves `{fold_dir / 'progress.png'}`{extra}, "
                     f"predictions `{out / 'predictions' / trainers[key]}`")
    cpu_total = sum(c for _, _, c in step_times)
    lines += [f"- Logs of every step: `{out / 'logs'}`", "", "## Steps", "",
              f"CPU time counts every process of a step (user + system), so on an otherwise idle machine a step "
              f"takes at least its CPU time divided by the cores it can use ({available_cpus()} here).", "",
              "| step | wall time | CPU time |", "|---|---:|---:|"]
    lines += [f"| {title} | {format_duration(dt)} | {format_duration(cpu)} |" for title, dt, cpu in step_times]
    lines += [f"| total | {format_duration(total)} | {format_duration(cpu_total)} |", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report

