"""Dimension helpers: everything a block needs to know about 2D or 3D is derived from its ``conv_op``.

As in dynamic-network-architectures, a block takes ``conv_op`` (``nn.Conv2d`` or ``nn.Conv3d``) and asks these
helpers for the matching operations, so one code path serves images ``(B, C, H, W)`` and volumes ``(B, C, D, H, W)``.
Also here: scalar-or-per-axis arguments, weight initialisation and the CPU memory-format policy.
"""
from __future__ import annotations

import operator
import warnings
from typing import Callable, Type

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    # timm's import applies torch.jit.interface, which torch 2.14 deprecates with a FutureWarning that every command
    # importing FIAS would print first; nothing here uses TorchScript.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.* is deprecated", category=FutureWarning)
    from timm.layers import DropPath, Mlp, to_ntuple, trunc_normal_

__all__ = ["DropPath", "Mlp", "to_ntuple", "trunc_normal_", "convert_conv_op_to_dim", "get_matching_conv_op",
           "get_matching_interpolation", "get_matching_avg_pool", "channel_permutations", "per_axis",
           "init_weights", "conv_memory_format"]

_CONV_OPS = {2: nn.Conv2d, 3: nn.Conv3d}


def convert_conv_op_to_dim(conv_op: Type[nn.Module]) -> int:
    """Spatial dimensionality of a convolution class (``nn.Conv2d`` -> 2, ``nn.Conv3d`` -> 3)."""
    for dim, op in _CONV_OPS.items():
        if isinstance(conv_op, type) and issubclass(conv_op, op):
            return dim
    raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op!r}")


def get_matching_conv_op(ndim: int) -> Type[nn.Module]:
    """``nn.Conv2d`` for 2 spatial axes, ``nn.Conv3d`` for 3."""
    if ndim not in _CONV_OPS:
        raise ValueError(f"FIAS works on 2 or 3 spatial axes, got {ndim}")
    return _CONV_OPS[ndim]


def get_matching_interpolation(conv_op: Type[nn.Module]) -> str:
    """The linear ``F.interpolate`` mode on ``conv_op``'s maps: ``bilinear`` or ``trilinear``."""
    return {2: "bilinear", 3: "trilinear"}[convert_conv_op_to_dim(conv_op)]


def get_matching_avg_pool(conv_op: Type[nn.Module]) -> Callable[..., torch.Tensor]:
    """``F.avg_pool2d`` or ``F.avg_pool3d``, matching ``conv_op``."""
    return {2: F.avg_pool2d, 3: F.avg_pool3d}[convert_conv_op_to_dim(conv_op)]


def channel_permutations(conv_op: Type[nn.Module]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(to_channels_first, to_channels_last)`` permutations of a batch of ``conv_op``'s maps (``(0, 3, 1, 2)`` and
    ``(0, 2, 3, 1)`` in 2D). The transformer parts work on channels-last tokens, the convolutions channels-first."""
    ndim = convert_conv_op_to_dim(conv_op)
    return (0, ndim + 1, *range(1, ndim + 1)), (0, *range(2, ndim + 2), 1)


def per_axis(value, ndim: int, name: str, odd: bool = False) -> tuple[int, ...]:
    """``value`` (an int or one int per axis) as an ``ndim``-tuple of ints >= 1 (odd ones with ``odd``); a
    ValueError naming ``name`` otherwise."""
    expected = (f"a positive odd int or a {ndim}-tuple of them" if odd else
                f"an int >= 1 or a {ndim}-tuple of them")
    items = value if isinstance(value, (tuple, list, torch.Size)) else to_ntuple(ndim)(value)
    try:
        if len(items) != ndim or any(isinstance(v, bool) for v in items):
            raise TypeError
        out = tuple(operator.index(v) for v in items)
    except TypeError:
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if any(v < 1 or (odd and v % 2 == 0) for v in out):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return out


def init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) for Linear, He (fan-out) for convolutions, unit norms, zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                             nn.modules.instancenorm._InstanceNorm)):
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def conv_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Memory format in which convolutions on ``x`` run fastest here.

    On CPU (oneDNN), 2D maps of at least 16x16 run channels-last (depthwise and dense convolutions are faster there,
    small maps are much slower; docs/benchmarks.md); other devices keep the layout they get. Volumes stay in the
    layout they come in (no copy).
    """
    if x.ndim == 5:
        return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else \
            torch.contiguous_format
    if x.device.type != "cpu":  # the layout it has (``contiguous`` on the meta device refuses preserve_format)
        return torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
    return torch.channels_last if x.shape[-2] * x.shape[-1] >= 256 else torch.contiguous_format
