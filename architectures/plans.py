"""FIAS from nnU-Net's plans: the keyword arguments for a planned configuration, 2D or 3D alike."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from .building_blocks.helpers import get_matching_conv_op, to_ntuple
from .config import FIAS_PRESETS, NUM_DOWNSAMPLINGS, NUM_STAGES


def _per_axis_list(values: Sequence, ndim: int) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in to_ntuple(ndim)(s)) for s in values]


def fias_strides_from_plan(plan_strides: Sequence, patch_size: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """FIAS's five per-axis downsampling strides from an nnU-Net plan's ``strides`` and ``patch_size``.

    nnU-Net lists one stride per stage, the first (all ones) being the input stage; the entries after it are the
    downsamplings, possibly anisotropic (``[2, 1]``). FIAS takes the first five in order: two for its stems, one
    before each of stages 2-4. A plan with fewer downsamplings (small patches) is completed with 2 along each axis
    whose remaining size is even and 1 elsewhere, so the patch stays divisible and nothing is padded. Square
    power-of-two plans of 128 and more (or 64 with four downsamplings) give the default, 2 along every axis.
    """
    patch = [int(p) for p in patch_size]
    plan = _per_axis_list(plan_strides, len(patch))
    if any(len(s) != len(patch) for s in plan):
        raise ValueError(f"plan strides {list(plan_strides)} do not match the {len(patch)}D patch size {patch}")
    downsamplings = plan[1:] if plan and all(v == 1 for v in plan[0]) else plan
    strides = downsamplings[:NUM_DOWNSAMPLINGS]
    remaining = [p // math.prod(s[a] for s in strides) for a, p in enumerate(patch)]
    while len(strides) < NUM_DOWNSAMPLINGS:
        step = tuple(2 if r % 2 == 0 else 1 for r in remaining)
        remaining = [r // st for r, st in zip(remaining, step)]
        strides.append(step)
    return tuple(strides)


def fias_stage_kernels_from_plan(plan_kernel_sizes: Sequence | None, plan_strides: Sequence | None,
                                 ndim: int = 3) -> tuple[tuple[int, ...], ...]:
    """Per FIAS stage (4), the plan's convolution kernel of the nnU-Net stage at the same resolution.

    FIAS stage ``s`` follows ``s + 2`` downsamplings, as nnU-Net's stage ``s + 2`` does (its first stage, at stride
    1, is stage 0). Stages the plan does not have get 3 along every axis. FIAS uses depthwise kernels of size 1
    along the axes where the plan's kernel is 1 (thick slices, where nnU-Net does not convolve across slices).
    """
    kernels = _per_axis_list(plan_kernel_sizes or [], ndim)
    if plan_strides and not all(v == 1 for v in to_ntuple(ndim)(plan_strides[0])):
        kernels = kernels[:1] + kernels  # no stride-1 input stage: the first listed stage is already downsampled
    return tuple(kernels[s + 2] if s + 2 < len(kernels) else (3,) * ndim for s in range(NUM_STAGES))


def fias_kwargs_from_plan(patch_size: Sequence[int], arch_kwargs: Mapping) -> dict:
    """The keyword arguments of :class:`~nnunetv2_fias.architectures.FIAS` that an nnU-Net configuration fixes.

    ``patch_size`` is the configuration's patch size and ``arch_kwargs`` its U-Net's ``arch_kwargs``
    (``ConfigurationManager.network_arch_init_kwargs``). Returns ``conv_op`` (from the patch's dimensionality),
    ``strides`` (:func:`fias_strides_from_plan`) and ``stage_kernel_sizes`` (:func:`fias_stage_kernels_from_plan`)
    where the plan lists them. The same code serves 2D and 3D plans: a plan whose kernels are 3 along every axis
    gives FIAS's isotropic DMK kernels.

    Example:
        >>> net = FIAS(1, 4, deep_supervision=True, **fias_kwargs_from_plan(cm.patch_size,
        ...                                                                 cm.network_arch_init_kwargs))
    """
    ndim = len(patch_size)
    kwargs: dict = {"conv_op": get_matching_conv_op(ndim)}
    if arch_kwargs.get("strides") is not None:
        kwargs["strides"] = fias_strides_from_plan(arch_kwargs["strides"], patch_size)
    if arch_kwargs.get("kernel_sizes") is not None:
        kwargs["stage_kernel_sizes"] = fias_stage_kernels_from_plan(arch_kwargs["kernel_sizes"],
                                                                    arch_kwargs.get("strides"), ndim)
    return kwargs


# FIAS's size on small plans. FIAS's stages follow ImageNet's layout, where the stride-4 stage has thousands of
# positions and each later stage twice the width on a quarter of them. nnU-Net stops downsampling at about 4 pixels,
# so on a small patch the deep, wide stages keep more positions than that layout assumes and cost more than the whole
# U-Net nnU-Net plans there. The thresholds are positions at FIAS's first stage (after the two stem downsamplings),
# chosen by measurement (one thread, docs/benchmarks.md "FIAS sized by the plan"): from 1024 (a 128x128 patch) the
# preset's step is at most about the U-Net's; below, narrower heads (and below 256 also half the blocks) bring it
# back within 1.2x. The smaller networks scored lower at short budgets, so only FIASTrainer_planSized uses this.
PLAN_SIZE_LEVELS = (
    # (name, minimum positions at stage 1, head dimension (None: the preset's), depth divisor)
    ("preset", 1024, None, 1),
    ("narrow", 256, 16, 1),
    ("small", 0, 8, 2),
)


def fias_stage1_positions(patch_size: Sequence[int], plan_strides: Sequence | None) -> int:
    """Positions of FIAS's first stage (after its two stem downsamplings) for a patch and the plan's strides."""
    patch = [int(p) for p in patch_size]
    strides = fias_strides_from_plan(plan_strides, patch) if plan_strides is not None else \
        ((2,) * len(patch),) * NUM_DOWNSAMPLINGS
    return math.prod(max(1, p // (s0 * s1)) for p, s0, s1 in zip(patch, strides[0], strides[1]))


def fias_size_from_plan(patch_size: Sequence[int], arch_kwargs: Mapping, preset: str = "T") -> tuple[str, dict]:
    """FIAS's size for a planned configuration: the level of :data:`PLAN_SIZE_LEVELS` and the keyword arguments
    (``widths``, ``global_depths``, ``local_depths``; empty for ``"preset"``) that set it.

    The preset's heads per stage are kept and each gets the level's head dimension (a multiple of 8, as GPU attention
    kernels want); depths are divided by the level's divisor, rounding up.
    """
    positions = fias_stage1_positions(patch_size, arch_kwargs.get("strides"))
    name, _, head_dim, divisor = next(level for level in PLAN_SIZE_LEVELS if positions >= level[1])
    if head_dim is None:
        return name, {}
    layout = FIAS_PRESETS[preset]
    return name, {"widths": tuple(h * head_dim for h in layout["num_heads"]),
                  "global_depths": tuple(-(-d // divisor) for d in layout["global_depths"]),
                  "local_depths": tuple(-(-d // divisor) for d in layout["local_depths"])}
