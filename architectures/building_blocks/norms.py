"""Normalisation: BatchNorm that also trains on a single value per channel."""
from __future__ import annotations

from typing import Type

import torch
import torch.nn.functional as F
from torch import nn

from .helpers import convert_conv_op_to_dim


class _SingleValueSafe:
    """Mixin of the BatchNorm classes below: in training, an input with one value per channel (batch 1 at a 1x1
    or 1x1x1 stage) is normalised with the running statistics, which stay unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class SafeBatchNorm2d(_SingleValueSafe, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that also trains on a single value per channel (batch 1 at a 1x1 stage).

    nnU-Net's ``-num_gpus`` splits the planned batch across processes, so a rank may see one sample; at the coarsest
    stage of a small patch that is one value per channel, where batch statistics do not exist and plain BatchNorm
    raises. Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d`` (nnU-Net's DDP path converts it to
    ``SyncBatchNorm``, whose statistics span all processes).
    """


class SafeBatchNorm3d(_SingleValueSafe, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that also trains on a single value per channel, as :class:`SafeBatchNorm2d`."""


def get_matching_batchnorm(conv_op: Type[nn.Module]) -> Type[nn.Module]:
    """:class:`SafeBatchNorm2d` or :class:`SafeBatchNorm3d`, matching ``conv_op``."""
    return {2: SafeBatchNorm2d, 3: SafeBatchNorm3d}[convert_conv_op_to_dim(conv_op)]
