"""The results of an evaluation: means, summary.json, metrics.csv, summary.md (the papers' table layout), box plots,
and their atomic publication into the output folder.

The output location is checked before any case is scored (:func:`check_output`), and everything is written into a
staged folder that replaces the output in one rename (:func:`publish`), so a failure never leaves a half-written
or mixed output folder.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunetv2_fias._util import atomic_savefig, atomic_write_json, atomic_write_text, staged_directory
from nnunetv2_fias.evaluation.inputs import EvaluationError
from nnunetv2_fias.evaluation.metrics import METRIC_DEFINITIONS, METRICS

# (metric, file, y-axis label) of the box plots.
PLOTS = (("dice", "dice.png", "Dice (%)"),
         ("hd95_mm", "hd95_mm.png", "HD95 (mm)"),
         ("hd95_voxel", "hd95_voxel.png", "HD95 (voxels, TransUNet protocol)"))


# ------------------------------------------------------------------------------------------------ aggregation
def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def aggregate(per_case: dict[str, dict[str, dict]], label_names: Sequence[str]) -> tuple[dict, dict]:
    """Means per label over the cases (missing values left out, counts kept), and the mean over labels."""
    means = {}
    for name in label_names:
        rows = [per_case[c][name] for c in per_case]
        means[name] = {m: _mean(r[m] for r in rows) for m in METRICS}
        means[name]["n_cases"] = len(rows)
        means[name]["n_hd95_mm"] = sum(r["hd95_mm"] is not None for r in rows)
    over_labels = {m: _mean(means[n][m] for n in label_names) for m in METRICS}
    return means, over_labels


def build_summary(scores: dict, labels: dict[str, int], cases: Sequence[str], reference: Path,
                  predictions: dict[str, Path], dataset_json: Path) -> dict:
    """The summary documented in :func:`evaluate_folders` from ``{case: {method: {label_value: metrics}}}``."""
    value_to_name = {v: k for k, v in labels.items()}
    methods = {}
    for method in predictions:
        per_case = {case: {value_to_name[v]: m for v, m in scores[case][method].items()} for case in cases}
        mean, over = aggregate(per_case, list(labels))
        methods[method] = {"per_case": per_case, "mean": mean, "mean_over_labels": over}
    return {
        "methods": methods,
        "labels": dict(labels),
        "cases": list(cases),
        "reference": str(reference),
        "predictions": {n: str(p) for n, p in predictions.items()},
        "dataset_json": str(dataset_json),
        "metrics": dict(METRIC_DEFINITIONS),
    }


# ------------------------------------------------------------------------------------------------ Markdown, CSV
def _format_metric_value(value: float | None, scale: float = 1.0) -> str:
    """A mean for a Markdown table cell: two decimals after ``scale`` (100 for Dice in %), ``n/a`` if missing."""
    return "n/a" if value is None else f"{value * scale:.2f}"


def _best(values: list[float | None], higher_is_better: bool) -> float | None:
    kept = [v for v in values if v is not None]
    if len(kept) < 2:
        return None
    return max(kept) if higher_is_better else min(kept)


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown_table(methods: dict, header: list[str], columns: list[tuple]) -> list[str]:
    """One row per method; ``columns`` are ``(getter, higher_is_better, scale)``; the best of a column in bold."""
    lines = [_markdown_row(["Method"] + header), _markdown_row(["---"] + ["---:"] * len(header))]
    values = [[getter(methods[m]) for m in methods] for getter, _, _ in columns]
    best = [_best(column, higher) for column, (_, higher, _) in zip(values, columns)]
    for i, method in enumerate(methods):
        cells = [_escape(method)]
        for column, column_best, (_, _, scale) in zip(values, best, columns):
            v = column[i]
            text = _format_metric_value(v, scale)
            cells.append(f"**{text}**" if v is not None and column_best is not None and v == column_best else text)
        lines.append(_markdown_row(cells))
    return lines


def format_markdown(summary: dict) -> str:
    """Markdown tables in the papers' layout from a summary returned by :func:`evaluate_folders`.

    The first table has one row per method and the columns mean DSC (%), mean HD95 (voxels, TransUNet protocol),
    mean HD95 (mm), then the DSC (%) of every label; the second gives HD95 (mm) per label. The best value of a
    column is bold when several methods are compared.
    """
    methods = summary["methods"]
    labels = list(summary["labels"])
    lines = [f"Dice (%) and HD95 over {len(summary['cases'])} case(s); HD95 (vox) follows the TransUNet protocol "
             f"(medpy, no spacing), HD95 (mm) uses the true spacing and skips cases where a mask is empty.", ""]
    main_columns = [(lambda s: s["mean_over_labels"]["dice"], True, 100.0),
                    (lambda s: s["mean_over_labels"]["hd95_voxel"], False, 1.0),
                    (lambda s: s["mean_over_labels"]["hd95_mm"], False, 1.0)]
    main_columns += [((lambda s, n=n: s["mean"][n]["dice"]), True, 100.0) for n in labels]
    lines += _markdown_table(methods, ["DSC (%)", "HD95 (vox)", "HD95 (mm)"] + [_escape(n) for n in labels],
                             main_columns)
    lines += ["", "HD95 (mm) per label:", ""]
    hd_columns = [((lambda s, n=n: s["mean"][n]["hd95_mm"]), False, 1.0) for n in labels]
    lines += _markdown_table(methods, [_escape(n) for n in labels], hd_columns)
    return "\n".join(lines) + "\n"


def _csv_cell(value: float | None) -> str:
    """Full precision (``repr``) so that the CSV reproduces summary.json; empty if missing."""
    return "" if value is None else repr(value)


def csv_text(summary: dict) -> str:
    """metrics.csv: one row per method, case (or ``mean``) and label, plus each method's mean over labels."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "case", "label", "value", *METRICS])
    values = summary["labels"]
    for method, result in summary["methods"].items():
        for case, per_label in result["per_case"].items():
            for name, metrics in per_label.items():
                writer.writerow([method, case, name, values[name], *(_csv_cell(metrics[m]) for m in METRICS)])
        for name, metrics in result["mean"].items():
            writer.writerow([method, "mean", name, values[name], *(_csv_cell(metrics[m]) for m in METRICS)])
        writer.writerow([method, "mean", "mean_over_labels", "",
                         *(_csv_cell(result["mean_over_labels"][m]) for m in METRICS)])
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ plots
def plot_metric(summary: dict, metric: str, ylabel: str, path: Path) -> None:
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
    atomic_savefig(fig, path)


# ------------------------------------------------------------------------------------------------ output folder
def write_outputs(summary: dict, folder: Path, plots: bool) -> None:
    atomic_write_json(folder / "summary.json", summary, indent=2, allow_nan=False)
    atomic_write_text(folder / "metrics.csv", csv_text(summary))
    atomic_write_text(folder / "summary.md", format_markdown(summary))
    if plots:
        for metric, filename, ylabel in PLOTS:
            plot_metric(summary, metric, ylabel, folder / filename)


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def check_output(output: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse an output folder that must not or cannot be written, before any case is scored.

    It must not be, contain or lie inside an input folder; an existing one must be a folder, and empty unless
    ``overwrite``; and it must be creatable: its nearest existing ancestor is a folder this process may write.
    """
    out = output.resolve()
    for folder in map(Path.resolve, inputs):
        if out == folder or folder in out.parents or out in folder.parents:
            raise EvaluationError(f"-o/--output {output} must not be, contain or lie inside the input folder "
                                  f"{folder}")
    try:
        if out.exists():
            if not out.is_dir():
                raise EvaluationError(f"-o/--output {output} exists and is not a folder")
            if any(out.iterdir()) and not overwrite:
                raise EvaluationError(f"-o/--output {output} exists and is not empty; pass --overwrite to replace it")
    except OSError as e:
        raise EvaluationError(f"-o/--output {output}: cannot inspect it: {e.strerror or e}") from None
    # The output is staged beside itself and renamed into place, so its parent must be (made) writable.
    ancestor = _nearest_existing(out.parent)
    if not ancestor.is_dir():
        raise EvaluationError(f"-o/--output {output}: cannot create it, {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EvaluationError(f"-o/--output {output}: cannot create it, the folder {ancestor} is not writable")


def publish(summary: dict, output: Path, overwrite: bool, plots: bool) -> None:
    """Write every output into a staged folder beside ``output``, then move it into place in one rename.

    An empty existing ``output`` is replaced as if new; a non-empty one only with ``overwrite``.
    """
    out = output.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        replace = overwrite or (out.is_dir() and not any(out.iterdir()))
    except OSError as e:
        raise EvaluationError(f"-o/--output {output}: cannot create {out.parent}: {e.strerror or e}") from None
    try:
        with staged_directory(out, overwrite=replace) as staged:
            write_outputs(summary, staged, plots)
    except FileExistsError:
        raise EvaluationError(f"-o/--output {output} appeared while evaluating and is not empty; pass --overwrite "
                              f"to replace it") from None
    except OSError as e:
        raise EvaluationError(f"-o/--output {output}: cannot write it: {e.strerror or e}") from None
