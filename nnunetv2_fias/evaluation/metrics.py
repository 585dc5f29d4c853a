"""Dice and HD95 of binary masks under the paper protocol, without depending on medpy.

The papers FIAS is compared against (TransUNet, Swin-Unet, nnFormer, UNETR++, ...) report Dice and HD95 computed
with TransUNet's ``calculate_metric_percase``. These functions reproduce that protocol and add HD95 in millimetres.

Metrics per case and label (label = one integer value of the label map):

* ``dice``: ``2|P & R| / (|P| + |R|)`` on the whole volume.
* ``hd95_voxel``: TransUNet protocol. medpy's ``hd95`` without voxel spacing, i.e. in voxel units: the 95th
  percentile of the surface distances from prediction to reference *and* from reference to prediction, pooled.
  The surface of a mask is the mask minus its erosion by the face-connected (connectivity 1) structuring element,
  voxels outside the image counting as background.
* ``hd95_mm``: the same distance with the reference image's spacing, in millimetres.

Empty masks follow TransUNet's rules so that ``dice`` and ``hd95_voxel`` are comparable with published numbers:
prediction and reference both non-empty -> computed; prediction non-empty and reference empty -> dice 1,
hd95_voxel 0; otherwise (prediction empty) -> dice 0, hd95_voxel 0, including when both are empty. ``hd95_mm``
is only defined when both masks are non-empty and is reported as missing (``None``) otherwise, instead of the
optimistic 0, and left out of its means.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

METRICS = ("dice", "hd95_voxel", "hd95_mm")

# Written into summary.json so that a result file says how its numbers were computed.
METRIC_DEFINITIONS = {
    "dice": "Dice 2|P&R|/(|P|+|R|) on the volume; TransUNet empty-mask rules (pred non-empty & ref empty -> 1, "
            "pred empty -> 0)",
    "hd95_voxel": "HD95 as in TransUNet (medpy hd95 without spacing): 95th percentile of both directed surface "
                  "distance sets pooled, in voxels; pred non-empty & ref empty -> 0, pred empty -> 0",
    "hd95_mm": "Same HD95 with the reference spacing, in mm; null (excluded from means) unless both masks are "
               "non-empty",
}

# Scores of a label that is in neither the prediction nor the reference (TransUNet: prediction empty -> 0, 0).
ABSENT_SCORES = {"dice": 0.0, "hd95_voxel": 0.0, "hd95_mm": None}


def dice_coefficient(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient ``2|P & R| / (|P| + |R|)`` of two binary masks.

    Args:
        prediction: Binary mask (any dtype; non-zero is foreground).
        reference: Binary mask of the same shape.

    Returns:
        The Dice coefficient; 0.0 when both masks are empty (TransUNet's rule for that case).
    """
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    return float(2.0 * np.count_nonzero(p & r) / total) if total else 0.0


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Tight bounding box of ``a | b``.

    Surfaces and distance transforms computed inside this box equal the full-image ones: outside it both masks
    are background, which is also how the erosion treats voxels beyond the array edge, and every surface voxel
    of both masks lies inside, so nearest-surface distances never need to leave it.
    """
    return ndimage.find_objects((a | b).astype(np.uint8))[0]


def _surface(mask: np.ndarray) -> np.ndarray:
    # Face connectivity and a zero border: voxels on the image edge are surface, as in medpy.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(prediction: np.ndarray, reference: np.ndarray,
         spacings: Sequence[Sequence[float] | None] = (None,)) -> list[float]:
    """95th percentile Hausdorff distance, with medpy's ``hd95`` semantics, for one or more spacings.

    The surface distances from the prediction's surface to the reference's and from the reference's surface to the
    prediction's are pooled and their 95th percentile (numpy's linear interpolation) is returned.

    Args:
        prediction: Non-empty binary mask.
        reference: Non-empty binary mask of the same shape.
        spacings: One entry per requested result: ``None`` for voxel units (the TransUNet protocol), or the voxel
            spacing per array axis (e.g. mm).

    Returns:
        One HD95 per entry of ``spacings``.

    Raises:
        ValueError: If either mask is empty (HD95 is undefined) or the shapes differ.
    """
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    if p.shape != r.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape}, reference {r.shape}")
    if not p.any() or not r.any():
        raise ValueError("HD95 is undefined when a mask is empty")
    box = _union_box(p, r)
    surf_p, surf_r = _surface(p[box]), _surface(r[box])
    results = []
    for spacing in spacings:
        sampling = None if spacing is None else [float(s) for s in spacing]
        d_pr = ndimage.distance_transform_edt(~surf_r, sampling=sampling)[surf_p]
        d_rp = ndimage.distance_transform_edt(~surf_p, sampling=sampling)[surf_r]
        results.append(float(np.percentile(np.concatenate([d_pr, d_rp]), 95)))
    return results


def score_masks(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> dict:
    """Dice, HD95 in voxels (TransUNet protocol) and HD95 in mm for one label of one case.

    Args:
        prediction: Binary prediction mask.
        reference: Binary reference mask of the same shape.
        spacing: Voxel spacing per array axis, for ``hd95_mm``.

    Returns:
        ``{"dice": float, "hd95_voxel": float, "hd95_mm": float | None}`` following the empty-mask rules in the
        module docstring.
    """
    p = np.asarray(prediction, dtype=bool)
    r = np.asarray(reference, dtype=bool)
    has_p, has_r = bool(p.any()), bool(r.any())
    if has_p and has_r:
        box = _union_box(p, r)
        hd_vox, hd_mm = hd95(p[box], r[box], (None, spacing))
        return {"dice": dice_coefficient(p[box], r[box]), "hd95_voxel": hd_vox, "hd95_mm": hd_mm}
    if has_p:
        return {"dice": 1.0, "hd95_voxel": 0.0, "hd95_mm": None}
    return dict(ABSENT_SCORES)
