"""The setup lines FIASTrainer writes to the training log at the start of a fold: network size and why, FLOPs,
optimizer, AMP, deep supervision."""
from __future__ import annotations

import torch.distributed as dist
from torch import nn

from nnunetv2_fias.architectures import fias_size_from_plan, fias_stage1_positions
from nnunetv2_fias.architectures.measure import count_flops


class SetupLog:
    """Mixin of :class:`~nnunetv2_fias.trainers.FIASTrainer`; reads the trainer's attributes only."""

    def _log_setup(self) -> None:
        net = self._fias()
        n_params = sum(p.numel() for p in net.parameters())
        patch = list(self.configuration_manager.patch_size)
        flops = self._count_flops(net, patch)
        overrides = dict(self.fias_overrides)
        self.print_to_log_file(self._size_line(net, patch))
        self.print_to_log_file(
            f"FIAS preset {self.fias_preset}" + (f" with overrides {overrides}" if overrides else "")
            + f": {n_params / 1e6:.2f} M parameters, "
            + (f"{flops / 1e9:.2f} GFLOPs" if flops is not None else "FLOPs not countable")
            + f" per forward pass of one {'x'.join(map(str, patch))} patch "
              f"({self.num_input_channels} input channel(s), {self.label_manager.num_segmentation_heads} outputs)")
        self.print_to_log_file(
            f"Optimizer: AdamW lr {self.initial_lr:g}, betas {tuple(self.betas)}, weight decay {self.weight_decay:g} "
            f"(not on biases/norms), linear warm-up {self._warmup_epochs()} of {self.num_epochs} epochs then poly "
            f"0.9, gradient clipping at norm {self.grad_clip_norm:g}; batch size {self.batch_size}"
            + (f" per process ({self.configuration_manager.batch_size} over {dist.get_world_size()} processes)"
               if self.is_ddp else "")
            + f", {self.num_iterations_per_epoch} iterations per epoch")
        if self._amp_active():
            amp = "on (float16 autocast + GradScaler)"
        elif self.device.type != "cuda":
            amp = f"off (device {self.device.type}: nnU-Net autocasts on CUDA only)"
        else:
            amp = "off (use_amp = False: float32 training)"
        self.print_to_log_file(f"AMP: {amp}")
        if self.enable_deep_supervision:
            scales = self._get_deep_supervision_scales()
            self.print_to_log_file(
                f"Deep supervision: {len(scales)} outputs at scales {[[round(s, 4) for s in sc] for sc in scales]}, "
                f"loss weights {[round(w, 4) for w in self.loss.weight_factors]}")
        else:
            self.print_to_log_file("Deep supervision: off (main output only)")

    def _size_line(self, net: nn.Module, patch: list[int]) -> str:
        arch = self.configuration_manager.network_arch_init_kwargs
        positions = fias_stage1_positions(patch, arch.get("strides"))
        level, _ = fias_size_from_plan(patch, arch, self.fias_preset)
        layout = (f"widths {list(net.config.widths)}, global blocks {list(net.config.global_depths)}, local blocks "
                  f"{list(net.config.local_depths)}")
        if not self.fias_plan_sized:
            hint = "" if level == "preset" else \
                f"; FIASTrainer_planSized would build the {level} size (faster, lower accuracy at short budgets)"
            return f"FIAS size: the preset's ({layout}); FIAS's first stage has {positions} positions here{hint}"
        return (f"FIAS size by the plan: {level} ({layout}); FIAS's first stage has {positions} positions for this "
                f"patch (preset from 1024, narrow heads from 256, small below); initial lr scaled by "
                f"{self.plan_size_lr_factor(patch, arch):g} for the width")

    def _count_flops(self, net: nn.Module, patch: list[int]) -> float | None:
        try:
            return float(count_flops(net, self.num_input_channels, patch, self.device))
        except Exception as e:  # FLOPs are informative only; never fail a training over them
            self.print_to_log_file(f"Could not count FLOPs: {type(e).__name__}: {e}")
            return None
