"""FIAS's topology from nnU-Net's plans: the per-axis strides of its five downsamplings."""
from __future__ import annotations

import math
from typing import Sequence


def fias_strides_from_plan(plan_strides: Sequence, patch_size: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """FIAS's five per-axis downsampling strides from an nnU-Net plan's ``strides`` and ``patch_size``.

    nnU-Net lists one stride per stage, the first (all ones) being the input stage; the entries after it are the
    downsamplings, possibly anisotropic (``[2, 1]``). FIAS takes the first five in order: two for its stems, one
    before each of stages 2-4. A plan with fewer downsamplings (small patches) is completed with 2 along each axis
    whose remaining size is even and 1 elsewhere, so the patch stays divisible and nothing is padded. Square
    power-of-two plans of 128 and more (or 64 with four downsamplings) give the default ``((2, 2),) * 5``.
    """
    patch = [int(p) for p in patch_size]
    plan = [tuple(int(v) for v in (s if isinstance(s, (list, tuple)) else [s] * len(patch))) for s in plan_strides]
    if any(len(s) != len(patch) for s in plan):
        raise ValueError(f"plan strides {list(plan_strides)} do not match the {len(patch)}D patch size {patch}")
    downsamplings = plan[1:] if plan and all(v == 1 for v in plan[0]) else plan
    strides = downsamplings[:5]
    remaining = [p // math.prod(s[a] for s in strides) for a, p in enumerate(patch)]
    while len(strides) < 5:
        step = tuple(2 if r % 2 == 0 else 1 for r in remaining)
        remaining = [r // st for r, st in zip(remaining, step)]
        strides.append(step)
    return tuple(strides)
