"""FIAS's dual-path encoder: a DilateFormer (global) and a DMK (local) branch, fused per stage by CAF.

Each branch and the encoder publish their topology (``output_channels``, per-axis ``strides``), from which the
decoder is built.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .building_blocks.convs import ConvNormAct, ConvStem, DMKBlock, OverlapStem
from .building_blocks.fusion import ContextAwareFusion
from .building_blocks.helpers import channel_permutations, conv_memory_format
from .building_blocks.transformer import LN_EPS, DilateBlock
from .checkpointing import run_blocks


def _downsamplings(widths: Sequence[int], strides: Sequence, **conv_kwargs) -> nn.ModuleList:
    """Nothing before stage 1, a 3x3 strided ``ConvNormAct`` without activation before each later stage."""
    return nn.ModuleList([nn.Identity()] + [
        ConvNormAct(widths[s - 1], widths[s], kernel_size=3, stride=strides[s + 1], nonlin=None, **conv_kwargs)
        for s in range(1, len(widths))])


class DilateFormerBranch(nn.Module):
    """Global branch: overlapping stem, then per stage (a downsampling for stages 2-4 and) DilateFormer blocks.

    Stages in ``msda_stages`` use multi-scale dilated attention, the others global self-attention. The layout follows
    the official DilateFormer (stem, biased downsampling convolutions, LayerNorm epsilon) so that its ImageNet weights
    load one to one. Blocks of the stages in ``checkpoint_stages`` are recomputed in backward. ``strides`` are the
    five per-axis downsampling strides (two in the stem), ``drop_path_rates`` one rate per block.
    """

    def __init__(self, in_channels: int, *, widths: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 msda_stages: Sequence[int], dilations: Sequence, kernel_size, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rates: Sequence[float], strides: Sequence, stem_width: int = 16,
                 checkpoint_stages: Sequence[int] = (), norm_op=None, norm_kwargs=None, conv_op=nn.Conv2d):
        super().__init__()
        self.stem = OverlapStem(in_channels, widths[0], hidden=stem_width, norm_op=norm_op, norm_kwargs=norm_kwargs,
                                strides=strides[:2], conv_op=conv_op)
        self.downsamples = _downsamplings(widths, strides, norm_op=norm_op, norm_kwargs=norm_kwargs, bias=True,
                                          conv_op=conv_op)
        self.checkpoint_stages = frozenset(checkpoint_stages)
        self.to_channels_first, self.to_channels_last = channel_permutations(conv_op)
        rates = iter(drop_path_rates)
        self.stages = nn.ModuleList(
            nn.Sequential(*[DilateBlock(widths[s], num_heads[s], attention="msda" if s in msda_stages else "global",
                                        dilations=dilations, kernel_size=kernel_size, mlp_ratio=mlp_ratio,
                                        qkv_bias=qkv_bias, drop_path=next(rates), conv_op=conv_op)
                            for _ in range(depths[s])])
            for s in range(len(widths)))
        self.norms = nn.ModuleList(nn.LayerNorm(w, eps=LN_EPS) for w in widths)
        self.output_channels = tuple(widths)

    def forward(self, x: torch.Tensor, stem_skips: bool = False) -> list[torch.Tensor]:
        """Stage features (channels-first), preceded by the stem's full- and half-resolution features when
        ``stem_skips``."""
        if stem_skips:
            x, features = self.stem.forward_with_skips(x)
        else:
            x, features = self.stem(x), []
        for s, (down, stage, norm) in enumerate(zip(self.downsamples, self.stages, self.norms)):
            x = down(x.contiguous(memory_format=conv_memory_format(x)))
            x = run_blocks(stage, x.permute(self.to_channels_last), self.training and s in self.checkpoint_stages,
                           math.prod(x.shape[2:]))
            x = norm(x).permute(self.to_channels_first)
            features.append(x)
        return features


class DMKBranch(nn.Module):
    """Local branch: conv stem, then per stage (a downsampling for stages 2-4 and) depthwise multi-kernel blocks.

    ``kernel_sizes`` holds the DMK kernels of each stage (anisotropic where the plan does not convolve along an axis).
    """

    def __init__(self, in_channels: int, *, widths: Sequence[int], depths: Sequence[int], kernel_sizes: Sequence,
                 expansion: float, drop_path_rates: Sequence[float], strides: Sequence,
                 checkpoint_stages: Sequence[int] = (), norm_op=None, norm_kwargs=None, nonlin=nn.GELU,
                 conv_op=nn.Conv2d):
        super().__init__()
        self.checkpoint_stages = frozenset(checkpoint_stages)
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, conv_op=conv_op)
        self.stem = ConvStem(in_channels, widths[0], nonlin=nonlin, strides=strides[:2], **ops)
        self.downsamples = _downsamplings(widths, strides, **ops)
        rates = iter(drop_path_rates)
        self.stages = nn.ModuleList(
            nn.Sequential(*[DMKBlock(widths[s], kernel_sizes=kernel_sizes[s], expansion=expansion,
                                     drop_path=next(rates), nonlin=nonlin, **ops)
                            for _ in range(depths[s])])
            for s in range(len(widths)))
        self.output_channels = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for s, (down, stage) in enumerate(zip(self.downsamples, self.stages)):
            x = down(x)
            x = run_blocks(stage, x.contiguous(memory_format=conv_memory_format(x)),
                           self.training and s in self.checkpoint_stages, math.prod(x.shape[2:]))
            features.append(x)
        return features


class DualPathEncoder(nn.Module):
    """DilateFormer (global) and DMK (local) branches fused per stage by Context-Aware Fusion.

    Publishes its topology for the decoder: ``output_channels`` and ``strides`` (per-axis, w.r.t. the input) of the
    stage features, and ``stem_channels`` / ``stem_strides`` of the global stem's full- and half-resolution
    features, which the forward pass returns first when ``stem_skips`` is set.
    """

    def __init__(self, global_branch: DilateFormerBranch, local_branch: DMKBranch, *, strides: Sequence,
                 caf_variant: str = "select", caf_reduction: int = 4, conv_op=nn.Conv2d):
        super().__init__()
        if global_branch.output_channels != local_branch.output_channels:
            raise ValueError(f"the branches' widths differ: {global_branch.output_channels} (global) and "
                             f"{local_branch.output_channels} (local)")
        self.global_branch, self.local_branch = global_branch, local_branch
        self.fusions = nn.ModuleList(ContextAwareFusion(w, variant=caf_variant, reduction=caf_reduction,
                                                        conv_op=conv_op)
                                     for w in global_branch.output_channels)
        ndim = len(strides[0])
        cumulative = [tuple(math.prod(s[a] for s in strides[:n]) for a in range(ndim))
                      for n in range(len(strides) + 1)]
        self.output_channels = global_branch.output_channels
        self.strides = tuple(cumulative[2:])
        self.stem_channels = global_branch.stem.out_channels[:2]
        self.stem_strides = tuple(cumulative[:2])
        self.stem_skips = False

    def fuse(self, global_features: list[torch.Tensor], local_features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The branches' outputs to what :meth:`forward` returns: the global stem's skips (when present), then
        each stage's CAF fusion of the two branches."""
        n = len(self.fusions)
        skips, stages = global_features[:len(global_features) - n], global_features[len(global_features) - n:]
        return skips + [caf(g, loc) for caf, g, loc in zip(self.fusions, stages, local_features)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.fuse(self.global_branch(x, self.stem_skips), self.local_branch(x))
