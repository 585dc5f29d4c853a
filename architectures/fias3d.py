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

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BatchNorm3d, init_weights
from .fias import (DEFAULT_CHECKPOINT_STAGES, DEFAULT_STRIDES, FIAS, DilateFormerBranch, DMKBranch, DualPathEncoder,
                   MixAttDecoder, _validated_config)

DEFAULT_STRIDES_3D = tuple((2, 2, 2) for _ in DEFAULT_STRIDES)


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


def _anisotropic(kernel_sizes: Sequence[int], stage_kernels: Sequence[Sequence[int]]) -> list[list[tuple]]:
    return [[tuple(1 if p == 1 else int(k) for p in plan) for k in kernel_sizes] for plan in stage_kernels]


class FIAS3d(FIAS):
    """FIAS for 3D patches ``(B, C, D, H, W)`` (nnU-Net's ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``).

    Arguments as :class:`FIAS`, with per-axis triples for ``strides`` (default ``((2, 2, 2),) * 5``), plus:

    Args:
        stage_kernel_sizes: per encoder stage (4), the plan's convolution kernel at that stage's resolution
            (:func:`fias_stage_kernels_from_plan`): the DMK kernels are 1 along the axes where it is 1 (default: 3
            everywhere, i.e. isotropic 3/5/7 kernels).
        norm_op: default :class:`BatchNorm3d`, which also trains at batch 1 on a 1x1x1 stage.

    The input is zero-padded (at the end of each axis) to a multiple of the total stride per axis and every output is
    cropped back; the outputs' sizes are given by :meth:`output_sizes` (exact for nnU-Net's plans).

    Example:
        >>> net = FIAS3d(1, 3, widths=(12, 24, 48, 96), num_heads=(3, 3, 3, 3), deep_supervision=True,
        ...              strides=((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2)))
        >>> [tuple(o.shape[2:]) for o in net(torch.randn(1, 1, 8, 64, 64))]
        [(8, 64, 64), (2, 8, 8), (2, 4, 4), (2, 2, 2)]
    """

    def __init__(self, input_channels: int, num_classes: int, preset: str = "T", deep_supervision: bool = False, *,
                 widths: Sequence[int] | None = None, global_depths: Sequence[int] | None = None,
                 num_heads: Sequence[int] | None = None, local_depths: Sequence[int] | None = None,
                 msda_stages: Sequence[int] = (0, 1), dilations: Sequence[int] = (1, 2, 3), kernel_size: int = 3,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.1,
                 stem_width: int = 16, dmk_kernel_sizes: Sequence[int] = (3, 5, 7), dmk_expansion: float = 2.0,
                 caf_variant: str = "select", caf_reduction: int = 4,
                 decoder_kv_reduction: Sequence[int] = (4, 2, 1), mc_pool_sizes: Sequence[int] = (1, 2, 3),
                 checkpoint_stages: Sequence[int] = DEFAULT_CHECKPOINT_STAGES,
                 strides: Sequence[Sequence[int]] | None = None, full_resolution_decoder: bool = False,
                 stage_kernel_sizes: Sequence[Sequence[int]] | None = None,
                 norm_op: type[nn.Module] = BatchNorm3d, norm_kwargs: dict | None = None,
                 nonlin: type[nn.Module] = nn.GELU):
        nn.Module.__init__(self)  # FIAS.__init__ builds the 2D network; this builds the same layout in 3D
        cfg = _validated_config(input_channels, num_classes, preset, widths, global_depths, num_heads, local_depths,
                                msda_stages, dilations, decoder_kv_reduction, caf_variant, drop_path_rate,
                                stem_width, checkpoint_stages, None)
        strides = DEFAULT_STRIDES_3D if strides is None else tuple(tuple(int(v) for v in s) for s in strides)
        if len(strides) != 5 or any(len(s) != 3 or min(s) < 1 for s in strides):
            raise ValueError("strides needs the per-axis strides (3 values >= 1) of FIAS-3D's five downsamplings (two "
                             f"in the stems, one before each of stages 2-4), got {strides}")
        stage_kernels = ((3, 3, 3),) * 4 if stage_kernel_sizes is None else tuple(
            tuple(int(v) for v in k) for k in stage_kernel_sizes)
        if len(stage_kernels) != 4 or any(len(k) != 3 or min(k) < 1 for k in stage_kernels):
            raise ValueError(f"stage_kernel_sizes needs one kernel size triple (values >= 1) per stage (4), got "
                             f"{stage_kernel_sizes}")
        widths, global_depths, local_depths = cfg["widths"], cfg["global_depths"], cfg["local_depths"]
        self.input_channels, self.num_classes = input_channels, num_classes
        self.preset = preset
        self.stage_kernel_sizes = stage_kernels
        g_rates = torch.linspace(0, drop_path_rate, sum(global_depths)).tolist()
        l_rates = torch.linspace(0, drop_path_rate, sum(local_depths)).tolist()
        global_branch = DilateFormerBranch(input_channels, widths, global_depths, cfg["num_heads"], cfg["msda_stages"],
                                           dilations, kernel_size, mlp_ratio, qkv_bias, g_rates, norm_op, norm_kwargs,
                                           stem_width, cfg["checkpoint_stages"], strides, conv_op=nn.Conv3d)
        local_branch = DMKBranch(input_channels, widths, local_depths, _anisotropic(dmk_kernel_sizes, stage_kernels),
                                 dmk_expansion, l_rates, norm_op, norm_kwargs, nonlin, cfg["checkpoint_stages"],
                                 strides, conv_op=nn.Conv3d, per_stage_kernels=True)
        self.encoder = DualPathEncoder(global_branch, local_branch, widths, caf_variant, caf_reduction, strides)
        self.encoder.stem_skips = full_resolution_decoder
        self.decoder = MixAttDecoder(self.encoder, num_classes, cfg["num_heads"], cfg["decoder_kv_reduction"],
                                     mc_pool_sizes, deep_supervision, norm_op, norm_kwargs, nonlin,
                                     full_resolution_decoder, conv_op=nn.Conv3d)
        self.strides = strides
        self.output_strides = ((1, 1, 1),) + self.encoder.strides[1:]
        self.size_divisor = self.encoder.strides[-1]
        self.apply(init_weights)

    def forward(self, x: torch.Tensor):
        if x.ndim != 5:
            raise ValueError(f"FIAS3d is a 3D network and expects input of shape (B, C, D, H, W), got "
                             f"{tuple(x.shape)}" + (" (a 2D patch: use FIAS)" if x.ndim == 4 else ""))
        if x.shape[1] != self.input_channels:
            raise ValueError(f"expected {self.input_channels} input channels, got {x.shape[1]}")
        size = tuple(x.shape[2:])
        pads = [(-s) % d for s, d in zip(size, self.size_divisor)]
        if any(pads):  # only where the input is not divisible by the strides (never for nnU-Net's plans)
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        outputs = self.decoder(self.encoder(x))
        padded = tuple(s + p for s, p in zip(size, pads))
        if not self.decoder.full_resolution:  # main head at stage 1: upsample its logits to the input
            outputs[0] = F.interpolate(outputs[0], size=padded, mode="trilinear", align_corners=False)
        outputs = [o[:, :, :d, :h, :w] for o, (d, h, w) in zip(outputs, self.output_sizes(size))]
        return outputs if self.decoder.deep_supervision else outputs[0]
