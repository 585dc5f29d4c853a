"""FIAS for volumes ``(B, C, D, H, W)``: the 2D network's design with 3D operations.

The same modules as 2D FIAS (``fias.py``), built with ``conv_op=nn.Conv3d``: 3D multi-scale dilated attention at
stages 1-2, global attention (SDPA over ``D*H*W`` tokens) at stages 3-4, 3D DMK blocks, 3D CAF, MixAtt decoder with
Monte Carlo attention over 3D positions, and optionally the full-resolution convolutional decoder. Per-axis strides
and the DMK kernels' anisotropy come from nnU-Net's 3D plans (``fias_strides_from_plan``,
``fias_stage_kernels_from_plan``).

The defaults are 2D FIAS's (FIAS-T widths, stages 1-2 checkpointed, decoder key/value pooling 4, 2, 1): with them
FIAS-3D keeps well under half of the training activations of nnU-Net's 3D U-Net at its 3d_fullres plans
(docs/benchmarks.md), so nothing 3D-specific is needed there.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .blocks import BatchNorm3d
from .fias import FIAS


def fias_stage_kernels_from_plan(plan_kernel_sizes: Sequence | None, plan_strides: Sequence | None,
                                 ndim: int = 3) -> tuple[tuple[int, ...], ...]:
    """Per FIAS stage (4), the plan's convolution kernel of the nnU-Net stage at the same resolution.

    FIAS stage ``s`` follows ``s + 2`` downsamplings, as nnU-Net's stage ``s + 2`` does (its first stage, at stride
    1, is stage 0). Stages the plan does not have get 3 along every axis. FIAS-3D uses depthwise kernels of size 1
    along the axes where the plan's kernel is 1 (thick slices, where nnU-Net does not convolve across slices).
    """
    kernels = [tuple(int(v) for v in (k if isinstance(k, (list, tuple)) else [k] * ndim))
               for k in (plan_kernel_sizes or [])]
    if plan_strides and not all(v == 1 for v in _as_tuple(plan_strides[0], ndim)):
        kernels = kernels[:1] + kernels  # no stride-1 input stage: the first listed stage is already downsampled
    return tuple(kernels[s + 2] if s + 2 < len(kernels) else (3,) * ndim for s in range(4))


def _as_tuple(value, ndim: int) -> tuple[int, ...]:
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value] * ndim))


class FIAS3d(FIAS):
    """FIAS for 3D patches ``(B, C, D, H, W)`` (nnU-Net's ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``).

    Arguments as :class:`FIAS` (the same constructor and forward pass, with 3D operations), with per-axis triples
    for ``strides`` (default ``((2, 2, 2),) * 5``) and ``stage_kernel_sizes`` (from the plan with
    :func:`fias_stage_kernels_from_plan`: the DMK kernels are 1 along the axes where the plan's kernel is 1; default
    isotropic 3/5/7 kernels); ``norm_op`` defaults to :class:`BatchNorm3d`, which also trains at batch 1 on a 1x1x1
    stage.

    The input is zero-padded (at the end of each axis) to a multiple of the total stride per axis and every output is
    cropped back; the outputs' sizes are given by :meth:`output_sizes` (exact for nnU-Net's plans).

    Example:
        >>> net = FIAS3d(1, 3, widths=(12, 24, 48, 96), num_heads=(3, 3, 3, 3), deep_supervision=True,
        ...              strides=((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)))
        >>> [tuple(o.shape[2:]) for o in net(torch.randn(1, 1, 8, 64, 64))]
        [(8, 64, 64), (2, 8, 8), (2, 4, 4), (2, 2, 2)]
    """

    ndim = 3
    conv_op = nn.Conv3d
    default_norm_op = BatchNorm3d
