"""Activation checkpointing for FIAS: recompute blocks in backward instead of keeping their activations.

FIAS's stride-4 and stride-8 stages hold most of its training activations; recomputing them keeps FIAS within the
memory nnU-Net plans for its own U-Net (docs/benchmarks.md). Two things make it exact and cheap here: BatchNorm
running statistics are not updated a second time by the recomputation, and small feature maps (thin or small plans),
where the activations are small and the recomputation's per-kernel overhead dominates, are not checkpointed.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.utils.checkpoint
from torch import nn

# Feature maps with fewer positions per sample (16x16 in 2D) are not checkpointed.
CHECKPOINT_MIN_POSITIONS = 256


@contextlib.contextmanager
def _running_statistics_kept(module: nn.Module):
    """BatchNorm running statistics inside ``module`` are restored on exit: whatever runs inside updates them in
    vain. (Turning ``track_running_stats`` off instead would change which tensors BatchNorm saves, and checkpointing
    requires the recomputation to save exactly what the forward pass saved.)"""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, saved):
                b.copy_(value)


def _checkpoint_contexts(module: nn.Module):
    # The recomputation in backward is a second training-mode forward pass: without this, every BatchNorm in a
    # checkpointed block would update its running statistics twice per step.
    return contextlib.nullcontext(), _running_statistics_kept(module)


def checkpointed(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``module(*inputs)``, keeping only the inputs for backward and recomputing the rest there (non-reentrant
    checkpointing).

    Under ``torch.compile`` the recomputation is planned by the compiler, which does not replay the BatchNorm
    updates; the context that prevents that in eager mode is then left out (dynamo accepts no custom context_fn).
    """
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(module, *inputs, use_reentrant=False)
    return torch.utils.checkpoint.checkpoint(module, *inputs, use_reentrant=False,
                                             context_fn=partial(_checkpoint_contexts, module))


def worth_checkpointing(enabled: bool, positions: int) -> bool:
    """Whether to recompute a block in backward: when asked for, with gradients, on a feature map of at least
    :data:`CHECKPOINT_MIN_POSITIONS` positions (read at call time)."""
    return enabled and torch.is_grad_enabled() and positions >= CHECKPOINT_MIN_POSITIONS


def run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpoint: bool, positions: int) -> torch.Tensor:
    """``blocks(x)``, recomputing each block in backward where :func:`worth_checkpointing` says so."""
    if not worth_checkpointing(checkpoint, positions):
        return blocks(x)
    for block in blocks:
        x = checkpointed(block, x)
    return x
