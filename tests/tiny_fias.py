"""One tiny-FIAS factory for the network tests, as a fixture parametrised over 2D and 3D.

``tiny_fias(**overrides)`` builds a narrow, shallow FIAS with every component of the real one; in 3D with strides
that keep CPU test volumes small. ``tiny_input(batch, channels)`` is a matching input.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nnunetv2_fias.architectures import FIAS

TINY = dict(widths=(12, 24, 48, 96), global_depths=(1, 1, 1, 1), num_heads=(3, 3, 6, 6), local_depths=(1, 1, 1, 1))
# Total stride 2 x 8 x 16: small volumes reach a 1x1x1 stage (and keep the tests fast on the CPU).
SMALL_3D = ((1, 2, 2), (2, 2, 2), (1, 2, 2), (1, 1, 2), (1, 1, 1))
INPUT_SIZE = {nn.Conv2d: (40, 56), nn.Conv3d: (4, 16, 32)}


def make_tiny(conv_op=nn.Conv2d, input_channels: int = 1, num_classes: int = 3, deep_supervision: bool = True,
              **overrides) -> FIAS:
    kwargs = {**TINY, **({"strides": SMALL_3D} if conv_op is nn.Conv3d else {}), **overrides}
    return FIAS(input_channels, num_classes, deep_supervision=deep_supervision, conv_op=conv_op, **kwargs)


@pytest.fixture(params=[nn.Conv2d, nn.Conv3d], ids=["2d", "3d"])
def conv_op(request):
    return request.param


@pytest.fixture
def tiny_fias(conv_op):
    def factory(**overrides) -> FIAS:
        return make_tiny(conv_op, **overrides)
    factory.conv_op = conv_op
    factory.input = lambda batch=2, channels=1: torch.randn(batch, channels, *INPUT_SIZE[conv_op])
    return factory
