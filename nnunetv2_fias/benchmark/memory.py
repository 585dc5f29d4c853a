"""Activation memory of a training forward pass: the bytes autograd keeps alive between forward and backward.

Unlike a peak-memory reading this does not depend on the allocator or on what else the process holds, so it
compares networks directly: it is what grows with batch and patch size and what activation checkpointing saves.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator


def _tensors(obj: Any) -> Iterator:
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


@contextlib.contextmanager
def _counting_checkpoint(record):
    """Make ``torch.utils.checkpoint.checkpoint`` pass its tensor arguments to ``record`` first.

    Non-reentrant checkpointing packs the tensors saved inside its region with its own hooks (an outer
    ``saved_tensors_hooks`` never sees them) but keeps the region's inputs alive until backward to recompute it;
    whether those inputs pass through the outer hook depends on the torch version, so they are recorded here
    (the caller removes duplicates by storage). The network looks ``checkpoint`` up at call time, so patching the
    module attribute reaches it.
    """
    import torch.utils.checkpoint as checkpoint_module

    original = checkpoint_module.checkpoint

    def checkpoint(function, *args, **kwargs):
        for t in _tensors((args, kwargs)):
            record(t)
        return original(function, *args, **kwargs)

    checkpoint_module.checkpoint = checkpoint
    try:
        yield
    finally:
        checkpoint_module.checkpoint = original


def saved_tensor_bytes(forward: Callable[[], Any], exclude: Iterable = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``forward()`` runs, each storage counted once.

    Storages of the tensors in ``exclude`` (e.g. parameters) are left out; the tensor inputs of
    activation-checkpointed regions are counted.
    """
    import torch

    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    # Holding the tensors (not just their addresses) keeps a counted storage from being freed and its address reused.
    saved: dict[int, torch.Tensor] = {}

    def record(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            saved.setdefault(ptr, t)

    def pack(t: torch.Tensor) -> torch.Tensor:
        record(t)
        return t

    try:
        with torch.enable_grad(), _counting_checkpoint(record), torch.autograd.graph.saved_tensors_hooks(pack, _same):
            out = forward()
        del out
        return sum(t.untyped_storage().nbytes() for t in saved.values())
    finally:
        saved.clear()


def _same(t):
    return t


def saved_activation_bytes(model, x) -> int:
    """Bytes of the tensors one training forward pass of ``model`` on ``x`` saves for backward.

    The model runs in train mode with deep supervision on (where it has it), in float32 (autocast off), without a
    loss. Each storage is counted once (views share it); storages of the model's parameters and buffers are not
    activations and are left out; the tensor inputs of activation-checkpointed regions are counted. The model's mode
    and deep-supervision flag are restored afterwards.
    """
    import torch

    from nnunetv2_fias._util import set_deep_supervision

    was_training = model.training
    model.train()
    ds = set_deep_supervision(model, True)
    try:
        with torch.autocast(x.device.type, enabled=False):
            return saved_tensor_bytes(lambda: model(x), exclude=[*model.parameters(), *model.buffers()])
    finally:
        model.train(was_training)
        set_deep_supervision(model, ds)


def saved_activation_mb(model, x) -> float:
    """:func:`saved_activation_bytes` in MB (2**20 bytes)."""
    return saved_activation_bytes(model, x) / 2 ** 20
