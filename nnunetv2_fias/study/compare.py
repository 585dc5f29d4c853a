"""``comparison.json``: per model and class the test/cross-validation statistics, and each model paired with the
reference model over the same cases."""
from __future__ import annotations

from nnunetv2_fias.study import stats

# (metric in the evaluation's per-case results, higher is better)
METRICS = {"dice": True, "hd95_mm": False, "hd95_voxel": False}
MEAN = "mean over classes"


def _per_case(section: dict, model: str, label: str, metric: str,
              paired_with: str | None = None) -> dict[str, float | None]:
    """Per-case values of one class, or of the mean over classes. With ``paired_with`` the mean takes only the
    classes where both models have a value (HD95 is undefined where a mask is empty), so both sides of a paired
    difference average the same classes."""
    per_case = section["methods"][model]["per_case"]
    if label != MEAN:
        return {case: per_case[case][label][metric] for case in per_case}
    other = section["methods"][paired_with or model]["per_case"]
    out = {}
    for case, labels in per_case.items():
        values = [v[metric] for name, v in labels.items()
                  if v[metric] is not None and other[case][name][metric] is not None]
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
            label: {metric: stats.paired(_per_case(section, reference, label, metric, paired_with=model),
                                         _per_case(section, model, label, metric, paired_with=reference), higher)
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
