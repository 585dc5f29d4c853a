"""``STUDY_DIR/report.md`` and ``comparison.json`` from whatever the study has finished so far (``study report``)."""
from __future__ import annotations

import time
from pathlib import Path

from nnunetv2_fias import _util
from nnunetv2_fias.study import compare, plots, stats
from nnunetv2_fias.study.finish import load_selection, selection_current
from nnunetv2_fias.study.grid import StudyError
from nnunetv2_fias.study.run import Context
from nnunetv2_fias.study.scores import fold_validation, score_crossval, score_test
from nnunetv2_fias.study.status import job_rows

SOURCES = {"test": "Test set", "crossval": "Cross-validation (each training case predicted by the fold that held "
                                           "it out; selected model or ensemble, after postprocessing)"}


def reference_model(ctx: Context, ref: str | None) -> str:
    names = [m.name for m in ctx.grid.models]
    if ref is None:
        return names[0]
    matches = [n for n in names if n == ref or n == ref.replace(":", "__") or n.split("__")[0] == ref]
    if len(matches) != 1:
        raise StudyError(f"--ref {ref}: expected one of the study's trainers ({', '.join(names)})")
    return matches[0]


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _metric_table(section: dict, metric: str, scale: float) -> list[str]:
    models = list(section["models"])
    rows = [[label] + [f"{_fmt(section['models'][m][label][metric]['mean'], scale)} "
                       f"({_fmt(section['models'][m][label][metric]['median'], scale)})" for m in models]
            for label in section["classes"]]
    return _table(["class"] + [f"{m} mean (median)" for m in models], rows)


def _paired_table(result: dict, metric: str, scale: float) -> list[str]:
    higher = compare.METRICS[metric]
    rows = []
    for label, by_metric in result.items():
        r = by_metric[metric]
        ci = "-" if r["ci95"] is None else f"[{_fmt(r['ci95'][0], scale)}, {_fmt(r['ci95'][1], scale)}]"
        p = "-" if r["wilcoxon_p"] is None else f"{r['wilcoxon_p']:.3g}"
        rows.append([label, str(r["n"]), _fmt(r["mean_difference"], scale), ci, p,
                     f"{r['wins']}/{r['ties']}/{r['losses']}", stats.verdict(r, higher)])
    return _table(["class", "n", "mean difference", "95 % CI", "Wilcoxon p", "wins/ties/losses", "verdict"], rows)


def _section_markdown(key: str, section: dict, plot_files: dict[str, str]) -> list[str]:
    lines = [f"## {SOURCES[key]}: {len(section['cases'])} cases", "",
             "DSC in % (mean and median over cases):", "", *_metric_table(section, "dice", 100),
             "HD95 in mm (cases where both masks are non-empty):", "", *_metric_table(section, "hd95_mm", 1)]
    for model, result in section["paired"].items():
        lines += [f"### {model} against {section['reference']}", "",
                  f"Paired over the same cases, difference = {model} - {section['reference']}; DSC in % points "
                  f"(higher is better), HD95 in mm (lower is better; cases where both masks of both models are "
                  f"non-empty, and for the mean over classes the classes where both models have a value). Where the "
                  f"95 % interval contains 0 the data do not show a difference.", "", "DSC:", "", *_paired_table(result, "dice", 100),
                  "HD95 (mm):", "", *_paired_table(result, "hd95_mm", 1)]
    lines += [f"![{key} {metric}]({name})" for metric, name in plot_files.items()] + [""]
    return lines


def _selection_lines(selections: dict) -> list[str]:
    rows = [[model, " + ".join(s["selected"]), _fmt(s["crossval_dice_pre_pp"], 100),
             _fmt(s["crossval_dice_post_pp"], 100)] for model, s in selections.items()]
    return ["## Model selection (nnUNetv2_find_best_configuration per trainer)", "",
            *_table(["model", "selected configuration(s)", "CV DSC % before pp", "CV DSC % after pp"], rows)]


def _fold_lines(folds: dict) -> list[str]:
    all_folds = sorted({f for cfgs in folds.values() for per in cfgs.values() for f in per}, key=int)
    rows = []
    for model, cfgs in folds.items():
        for cfg, per in cfgs.items():
            values = [per.get(f) for f in all_folds]
            rows.append([model, cfg, *(_fmt(v, 100) for v in values), _fmt(stats.summary(values)["mean"], 100)])
    return ["## Validation DSC per fold (nnU-Net's summary.json, mean over foreground classes, %)", "",
            *_table(["model", "configuration", *(f"fold {f}" for f in all_folds), "mean"], rows)]


def _selections(ctx: Context) -> dict:
    out = {}
    for model in ctx.grid.models:
        if selection_current(ctx, model):
            best = load_selection(ctx, model)["best_model_or_ensemble"]
            out[model.name] = {"selected": [m["configuration"] for m in best["selected_model_or_models"]],
                               "crossval_dice_pre_pp": best["result_on_crossval_pre_pp"],
                               "crossval_dice_post_pp": best["result_on_crossval_post_pp"]}
    return out


def _write_plots(ctx: Context, sections: dict) -> dict[str, dict[str, str]]:
    folder = ctx.paths.study / "plots"
    files: dict[str, dict[str, str]] = {}
    for key, section in sections.items():
        if section is None:
            continue
        for metric in ("dice", "hd95_mm"):
            name = f"plots/{key}_{metric}.png"
            plots.cases_plot(section, metric, ctx.paths.study / name, f"{SOURCES[key].split(' (')[0]}: "
                                                                      f"{plots.LABELS[metric]} per case")
            files.setdefault(key, {})[metric] = name
    for configuration in ctx.grid.configurations:
        folds = {m.name: {str(j.fold): ctx.paths.fold_folder(j) for j in ctx.grid.train_jobs()
                          if j.model == m and j.configuration == configuration} for m in ctx.grid.models}
        curves = plots.collect_curves(folds)
        if curves:
            name = f"plots/training_{configuration}.png"
            plots.training_curves(curves, folder / f"training_{configuration}.png", f"Training, {configuration}")
            files.setdefault("training", {})[configuration] = name
    return files


def write_report(ctx: Context, ref: str | None = None) -> Path:
    """Score, compare, plot and write; every file is replaced atomically, so a report is never half written."""
    reference = reference_model(ctx, ref)
    test, test_note = score_test(ctx)
    crossval, cv_note = score_crossval(ctx)
    rows = job_rows(ctx)
    notes = [n for n in (test_note, cv_note) if n]
    notes += [f"{r.job}: {r.state}" + (f" ({r.detail})" if r.detail else "") for r in rows if r.state != "done"
              and r.state != "skipped"]
    comparison = compare.build(ctx.grid.to_json(), reference, test, crossval, fold_validation(ctx),
                               _selections(ctx), notes)
    ctx.paths.evaluation.mkdir(parents=True, exist_ok=True)
    for key, section in (("test", test), ("crossval", crossval)):
        if section is not None:
            _util.atomic_write_json(ctx.paths.evaluation / f"{key}.json", section)
    _util.atomic_write_json(ctx.paths.study / "comparison.json", comparison, allow_nan=False)
    files = _write_plots(ctx, {"test": test, "crossval": crossval})
    _util.atomic_write_text(ctx.paths.study / "report.md", markdown(ctx, comparison, files))
    return ctx.paths.study / "report.md"


def markdown(ctx: Context, comparison: dict, files: dict[str, dict[str, str]]) -> str:
    grid = ctx.grid
    lines = [f"# Study: {grid.dataset}", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} by `nnunetv2_fias study report`. Configurations "
             f"{', '.join(grid.configurations)}; folds {', '.join(map(str, grid.folds))}; models "
             f"{', '.join(m.name for m in grid.models)}; reference {comparison['reference']}.", ""]
    if comparison["notes"]:
        lines += ["**Notes (what is missing or not done):**", "", *(f"- {n}" for n in comparison["notes"]), ""]
    if comparison["selection"]:
        lines += _selection_lines(comparison["selection"])
    for key in ("test", "crossval"):
        if comparison[key] is not None:
            lines += _section_markdown(key, comparison[key], files.get(key, {}))
    if comparison["fold_validation_dice"]:
        lines += _fold_lines(comparison["fold_validation_dice"])
    lines += [f"![training {c}]({name})" for c, name in files.get("training", {}).items()] + [""]
    lines += ["Statistics: paired per case, model minus reference; 95 % percentile-bootstrap interval of the mean "
              f"difference ({stats.BOOTSTRAP_SAMPLES} resamples, seed {stats.BOOTSTRAP_SEED}); two-sided Wilcoxon "
              "signed-rank test (zero differences dropped); a win is a case where the model is better by more than "
              f"{stats.TIE_TOLERANCE:g}. Per-case values: evaluation/test.json and evaluation/crossval.json; all "
              "numbers: comparison.json.", ""]
    return "\n".join(lines)
