"""``comparison.json``: per model and class the test/cross-validation statistics, and each model paired with the
reference model over the same cases."""
from __future__ import annotations

from nnunetv2_fias.study import stats

# (metric in the evaluation's per-case results, higher is better)
METRICS = {"dice": True, "hd95_mm": False, "hd95_voxel": False}
MEAN = "mean over classes"


def _per_case(section: dict, model: str, label: str, metric: str) -> dict[str, float | None]:
    per_case = section["methods"][model]["per_case"]
    if label != MEAN:
        return {case: per_case[case][label][metric] for case in per_case}
    out = {}
    for case, labels in per_case.items():
        values = [v[metric] for v in labels.values() if v[metric] is not None]
        out[case] = sum(values) / len(values) if values else None
    return out


def compare_section(section: dict, reference: str) -> dict:
    """Statistics of one evaluation summary (``evaluate_folders``'s) with ``reference`` as the paired baseline."""
    labels = [*section["labels"], MEAN]
    models = list(section["methods"])
    out = {"cases": section["cases"], "classes": labels, "reference": reference if reference in models else None,
           "models": {}, "paired": {}}
    for model in models:
        out["models"][model] = {label: {metric: stats.summary(list(_per_case(section, model, label, metric).values()))
                                        for metric in METRICS} for label in labels}
    if out["reference"] is None:
        return out
    for model in models:
        if model == reference:
            continue
        out["paired"][model] = {
            label: {metric: stats.paired(_per_case(section, reference, label, metric),
                                         _per_case(section, model, label, metric), higher)
                    for metric, higher in METRICS.items()}
            for label in labels}
    return out


def build(grid_json: dict, reference: str, test: dict | None, crossval: dict | None, folds: dict,
          selections: dict, notes: list[str]) -> dict:
    return {
        "grid": grid_json,
        "reference": reference,
        "statistics": {"bootstrap_samples": stats.BOOTSTRAP_SAMPLES, "bootstrap_seed": stats.BOOTSTRAP_SEED,
                       "confidence": 0.95, "test": "two-sided Wilcoxon signed-rank (scipy), zero differences "
                       "dropped", "difference": "model - reference, per case", "tie_tolerance": stats.TIE_TOLERANCE},
        "test": compare_section(test, reference) if test else None,
        "crossval": compare_section(crossval, reference) if crossval else None,
        "fold_validation_dice": folds,
        "selection": selections,
        "notes": notes,
    }
