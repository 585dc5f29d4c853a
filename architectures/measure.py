"""Measuring a network: forward FLOPs and the activation memory of a training forward pass.

Activation memory here is the bytes autograd keeps alive between forward and backward. Unlike a peak-memory reading
it does not depend on the allocator or on what else the process holds, so it compares networks directly: it is what
grows with batch and patch size and what activation checkpointing saves. FIASTrainer fits its batch with it and the
benchmark reports it; both work on any ``nn.Module`` (FIAS, nnU-Net's U-Net).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "saved_activation_bytes", "saved_activation_mb", "saved_tensor_bytes",
           "set_deep_supervision"]


def set_deep_supervision(model: nn.Module, enabled: bool) -> bool:
    """Set ``model.decoder.deep_supervision`` where the model has one; return the previous value (False if none)."""
    decoder = getattr(model, "decoder", None)
    previous = bool(getattr(decoder, "deep_supervision", False))
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled
    return previous


def count_flops(model: nn.Module, channels: int, patch: Sequence[int], device="cpu") -> int:
    """Forward FLOPs of one patch (batch 1) in eval mode with deep supervision off.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention (elementwise work is
    not counted). The model's mode and deep-supervision flag are restored afterwards.
    """
    was_training = model.training
    model.eval()
    ds = set_deep_supervision(model, False)
    try:
        x = torch.zeros(1, channels, *patch, device=device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
        set_deep_supervision(model, ds)


def saved_tensor_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs, each storage counted once.

    Storages of the tensors in ``exclude`` (e.g. parameters) are left out. Non-reentrant activation checkpointing
    saves the tensor arguments of a checkpointed region through the saved-tensor hooks active at the call (and keeps
    them until backward), so they are counted; what the region saves inside goes to its own hooks and is recomputed.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    # Holding the tensors (not just their addresses) keeps a counted storage from being freed and its address reused.
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            saved.setdefault(ptr, t)
        return t

    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            out = forward()
        del out
        return sum(t.untyped_storage().nbytes() for t in saved.values())
    finally:
        saved.clear()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors one training forward pass of ``model`` on ``x`` saves for backward.

    The model runs in train mode with deep supervision on (where it has it), in float32 (autocast off), without a
    loss. Each storage is counted once (views share it); storages of the model's parameters and buffers are not
    activations and are left out. The model's mode and deep-supervision flag are restored afterwards.
    """
    was_training = model.training
    model.train()
    ds = set_deep_supervision(model, True)
    try:
        with torch.autocast(x.device.type, enabled=False):
            return saved_tensor_bytes(lambda: model(x), exclude=[*model.parameters(), *model.buffers()])
    finally:
        model.train(was_training)
        set_deep_supervision(model, ds)


def saved_activation_mb(model: nn.Module, x: torch.Tensor) -> float:
    """:func:`saved_activation_bytes` in MB (2**20 bytes)."""
    return saved_activation_bytes(model, x) / 2 ** 20
