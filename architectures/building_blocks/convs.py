"""Convolutional blocks: conv-norm-act, the two branches' stems, the depthwise multi-kernel (DMK) block.

Every block takes its operations as arguments (``conv_op``, ``norm_op`` + ``norm_kwargs``, ``nonlin`` +
``nonlin_kwargs``) and learns its dimensionality from ``conv_op``; ``norm_op=None`` is the batch-1-safe BatchNorm
matching ``conv_op``.
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn

from .helpers import DropPath, convert_conv_op_to_dim, to_ntuple
from .norms import get_matching_batchnorm


class ConvNormAct(nn.Sequential):
    """``conv -> norm -> (nonlin)``; ``groups=channels`` gives a depthwise conv. ``kernel_size`` may be per axis;
    the padding keeps the size at stride 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, groups: int = 1,
                 norm_op: Type[nn.Module] | None = None, norm_kwargs: dict | None = None,
                 nonlin: Type[nn.Module] | None = nn.GELU, nonlin_kwargs: dict | None = None, bias: bool = False,
                 conv_op: Type[nn.Module] = nn.Conv2d):
        padding = tuple(k // 2 for k in to_ntuple(convert_conv_op_to_dim(conv_op))(kernel_size))
        norm_op = get_matching_batchnorm(conv_op) if norm_op is None else norm_op
        layers = [conv_op(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding,
                          groups=groups, bias=bias),
                  norm_op(out_channels, **(norm_kwargs or {}))]
        if nonlin is not None:
            layers.append(nonlin(**(nonlin_kwargs or {})))
        super().__init__(*layers)


class OverlapStem(nn.Sequential):
    """DilateFormer's overlapping stem, in its official layout (so ImageNet weights load one to one): 3x3 convs
    without bias at strides 1, ``strides[0]``, 1, ``strides[1]``, widths ``hidden``, ``2 * hidden``, ``4 * hidden``,
    ``out_channels``, norm and activation after all but the last.

    A narrow stem (DilateFormer uses ``hidden = 16`` for every model size) keeps the activations at full and half
    resolution small.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 16, norm_op=None, norm_kwargs=None,
                 nonlin=nn.GELU, nonlin_kwargs=None, strides=(2, 2), conv_op=nn.Conv2d):
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                   conv_op=conv_op)
        super().__init__(
            ConvNormAct(in_channels, hidden, kernel_size=3, stride=1, **ops),
            ConvNormAct(hidden, 2 * hidden, kernel_size=3, stride=strides[0], **ops),
            ConvNormAct(2 * hidden, 4 * hidden, kernel_size=3, stride=1, **ops),
            conv_op(4 * hidden, out_channels, kernel_size=3, stride=strides[1], padding=1, bias=False),
        )
        self.out_channels = (hidden, 2 * hidden, out_channels)

    def forward_with_skips(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem's output, its full-resolution feature and its first half-resolution feature."""
        full = self[0](x)
        half = self[1](full)
        return self[3](self[2](half)), [full, half]


class ConvStem(nn.Sequential):
    """DMK branch stem: two 3x3 convs at ``strides`` with norm and activation."""

    def __init__(self, in_channels: int, out_channels: int, norm_op=None, norm_kwargs=None, nonlin=nn.GELU,
                 nonlin_kwargs=None, strides=(2, 2), conv_op=nn.Conv2d):
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs,
                   conv_op=conv_op)
        hidden = max(out_channels // 2, 1)
        super().__init__(ConvNormAct(in_channels, hidden, kernel_size=3, stride=strides[0], **ops),
                         ConvNormAct(hidden, out_channels, kernel_size=3, stride=strides[1], **ops))


class DMKBlock(nn.Module):
    """Depthwise multi-kernel block: ``y = act(pw(x))``; ``m = sum_k norm(dwconv_k(y))``; ``x + norm(pw(act(m)))``.

    Args:
        channels: input/output width.
        kernel_sizes: the parallel depthwise kernels (default 3, 5, 7); each an int or per axis (``(1, 5, 5)``).
        expansion: hidden width factor of the inverted bottleneck.
        drop_path: stochastic depth rate of the residual branch.
    """

    def __init__(self, channels: int, kernel_sizes: Sequence = (3, 5, 7), expansion: float = 2.0,
                 drop_path: float = 0.0, norm_op=None, norm_kwargs=None, nonlin=nn.GELU, nonlin_kwargs=None,
                 conv_op=nn.Conv2d):
        super().__init__()
        flat = [v for k in kernel_sizes for v in (k if isinstance(k, (tuple, list)) else (k,))]
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in flat):
            raise ValueError(f"dmk_kernel_sizes must be positive odd integers, got {tuple(kernel_sizes)}")
        hidden = max(int(round(channels * expansion)), 1)
        ops = dict(norm_op=norm_op, norm_kwargs=norm_kwargs, conv_op=conv_op)
        self.expand = ConvNormAct(channels, hidden, kernel_size=1, nonlin=nonlin, nonlin_kwargs=nonlin_kwargs, **ops)
        self.dwconvs = nn.ModuleList(ConvNormAct(hidden, hidden, kernel_size=k, groups=hidden, nonlin=None, **ops)
                                     for k in kernel_sizes)
        self.act = nonlin(**(nonlin_kwargs or {}))
        self.project = ConvNormAct(hidden, channels, kernel_size=1, nonlin=None, **ops)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x)
        m = self.dwconvs[0](y)
        for conv in self.dwconvs[1:]:
            m = m + conv(y)
        return x + self.drop_path(self.project(self.act(m)))
