"""Attention modules on channels-last tokens ``(B, *spatial, C)``: multi-scale dilated attention (MSDA) and global
multi-head self-attention. Both learn their dimensionality from ``conv_op`` (``nn.Conv2d``: images, ``nn.Conv3d``:
volumes), as the convolutional blocks do."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..building_blocks.helpers import (channel_permutations, convert_conv_op_to_dim, get_matching_avg_pool,
                                       per_axis)
from .functional import IntOrTuple, fp32_sdpa, neighborhood_attention


def check_heads(dim: int, num_heads: int) -> None:
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} must divide the channel width {dim}")


class MultiScaleDilatedAttention(nn.Module):
    """MSDA: heads split evenly into one group per dilation rate, each group attending to its dilated neighbourhood.

    Args:
        dim: channel width of the tokens.
        num_heads: total heads; must be divisible by ``len(dilations)`` and divide ``dim``.
        dilations: one dilation rate per head group (DilateFormer: 1, 2, 3), each an int or one per axis.
        kernel_size: odd neighbourhood size (DilateFormer: 3), an int or one per axis (e.g. ``(1, 3, 3)``).
        qkv_bias: bias of the q/k/v projection.
        proj_drop: dropout after the output projection.
        conv_op: ``nn.Conv2d`` for image tokens ``(B, H, W, C)``, ``nn.Conv3d`` for volume tokens.
    """

    def __init__(self, dim: int, num_heads: int, dilations: Sequence[IntOrTuple] = (1, 2, 3),
                 kernel_size: IntOrTuple = 3, qkv_bias: bool = True, proj_drop: float = 0.0,
                 conv_op: type[nn.Module] = nn.Conv2d):
        super().__init__()
        ndim = convert_conv_op_to_dim(conv_op)
        if isinstance(dilations, (int, str)) or not dilations:
            raise ValueError(f"dilations must be a non-empty sequence of dilation rates, got {dilations!r}")
        check_heads(dim, num_heads)
        if num_heads % len(dilations) != 0:
            raise ValueError(
                f"num_heads={num_heads} must be divisible by the number of dilation rates {len(dilations)} "
                f"(dilations={tuple(dilations)}): heads are split evenly across dilations")
        self.dilations = tuple(per_axis(d, ndim, "dilations") for d in dilations)
        self.kernel_size = per_axis(kernel_size, ndim, "kernel_size", odd=True)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.to_channels_first, self.to_channels_last = channel_permutations(conv_op)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = len(self.dilations)
        heads_per_group = self.num_heads // groups
        # Channel-first view of the channels-last projection; channel order (q/k/v, group, head, head_dim). One split
        # into 3 * groups parts: its backward is a single concatenation, where indexing each part separately would
        # allocate and zero-fill a full-size gradient per part.
        parts = self.qkv(x).permute(self.to_channels_first).split(x.shape[-1] // groups, dim=1)
        outs = [neighborhood_attention(parts[g], parts[groups + g], parts[2 * groups + g], heads_per_group,
                                       self.kernel_size, dilation, None)
                for g, dilation in enumerate(self.dilations)]
        out = torch.cat(outs, dim=1).permute(self.to_channels_last)
        return self.proj_drop(self.proj(out))


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all positions, through ``scaled_dot_product_attention``.

    Args:
        dim: channel width of the tokens.
        num_heads: heads; must divide ``dim``.
        kv_reduction: keys and values are average-pooled by this factor per axis first (1 = full attention; never
            beyond an axis' size, so thin anisotropic maps keep their keys); keeps attention at fine strides
            affordable.
        qkv_bias: bias of the q/k/v projections.
        proj_drop: dropout after the output projection.
        conv_op: ``nn.Conv2d`` for image tokens ``(B, H, W, C)``, ``nn.Conv3d`` for volume tokens.
    """

    def __init__(self, dim: int, num_heads: int, kv_reduction: int = 1, qkv_bias: bool = True,
                 proj_drop: float = 0.0, conv_op: type[nn.Module] = nn.Conv2d):
        super().__init__()
        check_heads(dim, num_heads)
        if kv_reduction < 1:
            raise ValueError(f"kv_reduction must be >= 1, got {kv_reduction}")
        self.num_heads, self.head_dim, self.kv_reduction = num_heads, dim // num_heads, int(kv_reduction)
        self.avg_pool = get_matching_avg_pool(conv_op)
        self.to_channels_first, self.to_channels_last = channel_permutations(conv_op)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *spatial, c = x.shape
        q = self.q(x).view(b, math.prod(spatial), self.num_heads, self.head_dim).transpose(1, 2)
        kv_src = x
        if self.kv_reduction > 1:
            r = tuple(min(self.kv_reduction, n) for n in spatial)
            # ceil_mode so that borders not divisible by r are still represented.
            kv_src = self.avg_pool(x.permute(self.to_channels_first), r, r, ceil_mode=True)
            kv_src = kv_src.permute(self.to_channels_last)
        n_kv = math.prod(kv_src.shape[1:-1])
        # unbind, not kv[0] / kv[1]: its backward is one stack instead of a zero-filled full-size tensor per index.
        k, v = self.kv(kv_src).view(b, n_kv, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = fp32_sdpa(q, k, v).transpose(1, 2).reshape(b, *spatial, c)
        return self.proj_drop(self.proj(out))
