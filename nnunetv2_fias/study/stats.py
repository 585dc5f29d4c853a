"""Paired statistics of one model against a reference over the same cases.

For each case both models predicted, the difference ``model - reference`` of a metric; its mean with a 95 %
percentile-bootstrap confidence interval (cases resampled with replacement, a fixed seed so a report is
reproducible), the two-sided Wilcoxon signed-rank p-value (scipy; zero differences dropped, as Wilcoxon's test
does), and wins/ties/losses counted from the model's side (for HD95 lower is better).
"""
from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np

BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_SEED = 0
TIE_TOLERANCE = 1e-6  # differences this small are ties (identical predictions give exactly 0)


def summary(values: list[float | None]) -> dict:
    kept = np.array([v for v in values if v is not None], dtype=float)
    if kept.size == 0:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": float(kept.mean()), "median": float(np.median(kept)), "n": int(kept.size)}


def bootstrap_ci(differences: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = differences.size
    means = np.empty(samples)
    # in chunks so that a large cross-validation does not allocate samples x n indices at once
    for start in range(0, samples, 1000):
        stop = min(samples, start + 1000)
        means[start:stop] = differences[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def wilcoxon_p(differences: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    if not np.any(np.abs(differences) > 0):
        return 1.0  # identical results: no evidence of a difference (scipy refuses all-zero input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small samples with ties: scipy's note that it falls back to approximate
        return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def paired(reference: Mapping[str, float | None], model: Mapping[str, float | None],
           higher_is_better: bool) -> dict:
    """Paired comparison over the cases where both have a value (HD95 is undefined for an empty mask)."""
    cases = sorted(c for c in reference if c in model and reference[c] is not None and model[c] is not None)
    d = np.array([model[c] - reference[c] for c in cases], dtype=float)
    if d.size == 0:
        return {"n": 0, "mean_difference": None, "ci95": None, "wilcoxon_p": None, "wins": 0, "ties": 0,
                "losses": 0, "ci_contains_zero": None}
    better = d > TIE_TOLERANCE if higher_is_better else d < -TIE_TOLERANCE
    worse = d < -TIE_TOLERANCE if higher_is_better else d > TIE_TOLERANCE
    lo, hi = bootstrap_ci(d)
    p = wilcoxon_p(d)
    return {"n": int(d.size), "mean_difference": float(d.mean()), "ci95": [lo, hi], "wilcoxon_p": p if np.isfinite(p) else None,
            "wins": int(better.sum()), "ties": int(d.size - better.sum() - worse.sum()), "losses": int(worse.sum()),
            "ci_contains_zero": bool(lo <= 0 <= hi)}


def verdict(result: dict, higher_is_better: bool) -> str:
    """One plain sentence about a paired result; a difference is called real only when the bootstrap interval
    excludes 0 and the Wilcoxon test agrees (p < 0.05): with few cases the bootstrap interval alone is too narrow."""
    n = result["n"]
    if not n:
        return "no cases to compare"
    if result["ci_contains_zero"]:
        return "no evidence of a difference (the 95 % CI contains 0)"
    side = "better" if (result["mean_difference"] > 0) == higher_is_better else "worse"
    if result["wilcoxon_p"] is not None and result["wilcoxon_p"] < 0.05:
        return f"{side} than the reference (the 95 % CI excludes 0, Wilcoxon p < 0.05)"
    small = f"; with {n} cases no two-sided Wilcoxon p can be below 0.05" if n < 6 else ""
    return f"inconclusive: {side} by the 95 % CI, but Wilcoxon p >= 0.05{small}"
