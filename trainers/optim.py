"""FIASTrainer's optimizer and schedule: AdamW without decay on biases and norms, linear warm-up then poly decay."""
from __future__ import annotations

from typing import Sequence

import torch
from torch.optim.lr_scheduler import _LRScheduler


class WarmupPolyLRScheduler(_LRScheduler):
    """Linear warm-up for ``warmup_epochs`` epochs, then poly decay to 0 at ``num_epochs``.

    Stateless in the epoch (``step(epoch)``), like nnU-Net's ``PolyLRScheduler``, so that resuming from a checkpoint
    needs no scheduler state. Epoch ``e < warmup_epochs`` gets ``lr * (e + 1) / (warmup_epochs + 1)``; from
    ``warmup_epochs`` on, ``lr * (1 - (e - w) / (num_epochs - w)) ** exponent``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float, num_epochs: int, warmup_epochs: int,
                 exponent: float = 0.9):
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        if not 0 <= warmup_epochs < num_epochs:
            raise ValueError(f"warmup_epochs must be in [0, num_epochs={num_epochs}), got {warmup_epochs}")
        self.initial_lr, self.num_epochs = initial_lr, num_epochs
        self.warmup_epochs, self.exponent = warmup_epochs, exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of ``epoch`` (0-based)."""
        w = self.warmup_epochs
        if epoch < w:
            return self.initial_lr * (epoch + 1) / (w + 1)
        progress = min(1.0, (epoch - w) / (self.num_epochs - w))
        return self.initial_lr * (1.0 - progress) ** self.exponent

    def step(self, current_step: int | None = None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


def fias_adamw(parameters, device_type: str, lr: float, weight_decay: float, betas: Sequence[float]
               ) -> torch.optim.AdamW:
    """FIASTrainer's AdamW (its values are ``FIASTrainer.recipe``): no weight decay on biases and normalisation
    weights (1-D tensors), as DilateFormer/timm. The fused kernel (CUDA, and CPU from torch 2.4) is the faster one on
    both (docs/benchmarks.md)."""
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device_type in ("cuda", "cpu"))
