"""FIASTrainer: nnU-Net's trainer with the FIAS network, AdamW with warm-up and poly decay, and CAF monitoring.

Any configuration with a 2D patch trains the 2D FIAS, any with a 3D patch (``3d_fullres``, ``3d_lowres``,
``3d_cascade_fullres``) FIAS-3D, with the same variants. Everything that changes a training is a class attribute or
an attribute set in ``__init__`` (nnU-Net stores only the trainer's class name in checkpoints, so a variant's name
is its configuration, see ``variants.py``).

Defaults and why:

* :attr:`FIASTrainer.recipe` (``initial_lr`` 3e-4, ``weight_decay`` 0.05, ``betas`` (0.9, 0.98),
  ``grad_clip_norm`` 1): nnU-Net's own recipe for attention networks (the Primus trainers). FIAS mixes attention
  and convolutions; nnU-Net's SGD at lr 1e-2 with momentum 0.99 makes attention logits explode in the first epochs.
  The decay is DilateFormer's ImageNet setting, not applied to biases and normalisation weights (1-D tensors), as
  in DilateFormer/timm; beta2 = 0.98 makes the second-moment estimate react faster after the warm-up; a clip norm
  of 1 is the usual transformer value (nnU-Net's CNN default is 12).
* Warm-up: linear over the first ``warmup_fraction`` (5 %, Primus' length) of the epochs, then nnU-Net's poly
  decay (exponent 0.9). Both are functions of the epoch only, stepped where nnU-Net steps its scheduler, so ``--c``
  resumes the schedule exactly.
* Deep supervision: every output the network returns, weights ``1/2**i``, none zeroed, normalised. nnU-Net's
  default gives the coarsest output weight 0; its head would then get no gradient, which breaks
  DistributedDataParallel without ``find_unused_parameters`` (``-num_gpus``).
* Epochs, iterations and batch size stay nnU-Net's (1000 x 250, batch from the plans) so FIAS and nnUNetTrainer
  compare at equal budget. FIAS replaces the plans' network and takes its patch, batch, preprocessing, per-axis
  strides and kernel sizes from the plans. nnU-Net sizes the batch for its own network; where FIAS keeps more
  activations per sample, and more than ``min_activation_budget_mb`` at the planned batch, the batch is lowered in
  proportion, with the reason in the log (``batch_fit.py``).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_fias._util import deep_supervision_weights
from nnunetv2_fias.architectures import FIAS, FIAS_PRESETS, fias_kwargs_from_plan, fias_size_from_plan

from .atomic_checkpoint import AtomicCheckpoints
from .batch_fit import memory_fitted_batch_size
from .caf_monitor import CAFMonitor
from .optim import WarmupPolyLRScheduler, fias_adamw
from .pretrained_weights_arg import check_pretrained_dimensionality, requested_pretrained_weights
from .setup_log import SetupLog


def _require_2d_or_3d(patch_size: Sequence[int], configuration: str, trainer_name: str) -> None:
    if len(patch_size) not in (2, 3):
        raise ValueError(
            f"{trainer_name} trains FIAS on 2D or 3D patches, but configuration '{configuration}' has a "
            f"{len(patch_size)}D patch size {list(patch_size)}. Use -c 2d or -c 3d_fullres.")


class _AutocastOff(nn.Module):
    """Runs the wrapped network in float32 even inside nnU-Net's autocast region (NoAMP validation)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net(x.float())


class FIASTrainer(AtomicCheckpoints, CAFMonitor, SetupLog, nnUNetTrainer):
    """nnU-Net trainer for FIAS, 2D or 3D as the configuration's patch
    (``nnUNetv2_train DATASET 2d|3d_fullres FOLD -tr FIASTrainer``).

    Class attributes (set by variants; read at inference too, where nnU-Net calls
    :meth:`build_network_architecture` on the class):

    * ``fias_preset``: network size, ``"T"``, ``"S"`` or ``"B"``.
    * ``fias_plan_sized``: off by default. On (``FIASTrainer_planSized``), plans whose patch leaves FIAS's first
      stage under 1024 positions (smaller than 128x128 in 2D) get narrower heads and fewer blocks than the preset
      (:func:`~nnunetv2_fias.architectures.fias_size_from_plan`) and ``initial_lr`` scaled by the preset's width
      over the network's (Adam moves a narrower network less per step). Faster on small plans, but it scored lower
      at the demo budget (docs/benchmarks.md), so the preset stays the default.
    * ``fias_overrides``: keyword arguments passed on to ``FIAS`` (e.g. ``{"caf_variant": "sigmoid"}``); they win
      over what the plan gives (:func:`~nnunetv2_fias.architectures.fias_kwargs_from_plan`).

    Training attributes set in ``__init__`` (override them in a subclass ``__init__``): ``initial_lr``,
    ``weight_decay``, ``betas``, ``warmup_fraction``, ``grad_clip_norm`` (from :attr:`recipe`), ``use_amp`` and
    nnU-Net's own (``num_epochs``, ``num_iterations_per_epoch``, ``enable_deep_supervision``...). See the module
    docstring for the defaults' rationale.
    """

    fias_preset: str = "T"
    fias_plan_sized: bool = False
    fias_overrides: Mapping = MappingProxyType({})
    # The optimisation recipe (module docstring). nnUNetTrainer.__init__ sets its SGD values on the instance and
    # FIASTrainer.__init__ replaces them with these; the benchmark reads them here.
    recipe: Mapping = MappingProxyType({"initial_lr": 3e-4, "weight_decay": 5e-2, "betas": (0.9, 0.98),
                                        "warmup_fraction": 0.05, "grad_clip_norm": 1.0})
    # Activations FIAS may keep at the planned batch before the batch is lowered to the plans' network's budget: a
    # quarter of the smallest GPU memory nnU-Net plans for (8 GB); a plan whose batch nnU-Net capped for a small
    # dataset leaves that much to spare.
    min_activation_budget_mb: float = 2048.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Checked before nnU-Net creates the output folder, so a wrong -c leaves nothing behind.
        patch = PlansManager(plans).get_configuration(configuration).patch_size
        _require_2d_or_3d(patch, configuration, self.__class__.__name__)
        pretrained = requested_pretrained_weights()
        if pretrained is not None:  # nnU-Net's own check prints a whole tensor, after the folder was written
            check_pretrained_dimensionality(pretrained, patch, configuration, self.__class__.__name__)
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.recipe.items():  # initial_lr, weight_decay, betas, warmup_fraction, grad_clip_norm
            setattr(self, name, value)
        self.initial_lr *= self.plan_size_lr_factor(patch, self.configuration_manager.network_arch_init_kwargs)
        self.use_amp = True
        self._caf_epoch_values: list[np.ndarray] = []
        self._caf_share_values: list[np.ndarray] = []
        self._caf_history: dict[int, list[float]] = {}
        self._caf_share_history: dict[int, list[float]] = {}

    # ------------------------------------------------------------------ network
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """FIAS from the class attributes and the configuration (:func:`fias_kwargs_from_plan`: dimensionality,
        per-axis strides, per-stage kernel sizes). nnU-Net calls this on the instance (training) and on the class
        (inference, with deep supervision off, followed by a strict ``load_state_dict``)."""
        patch = configuration_manager.patch_size
        _require_2d_or_3d(patch, configuration_manager.data_identifier, cls.__name__)
        from_plan = fias_kwargs_from_plan(patch, configuration_manager.network_arch_init_kwargs)
        size = cls.fias_size(patch, configuration_manager.network_arch_init_kwargs)[1]
        return FIAS(num_input_channels, num_output_channels, preset=cls.fias_preset,
                    deep_supervision=enable_deep_supervision, **{**from_plan, **size, **cls.fias_overrides})

    @classmethod
    def plan_size_lr_factor(cls, patch_size: Sequence[int], arch_kwargs: Mapping) -> float:
        """The preset's first-stage width over the plan-sized network's (1 where the preset is kept)."""
        size = cls.fias_size(patch_size, arch_kwargs)[1]
        widths = cls.fias_overrides.get("widths") or size.get("widths")
        return FIAS_PRESETS[cls.fias_preset]["widths"][0] / widths[0] if size and widths else 1.0

    @classmethod
    def fias_size(cls, patch_size: Sequence[int], arch_kwargs: Mapping) -> tuple[str, dict]:
        """The size level and its FIAS arguments for a configuration (``"preset"`` and none where
        ``fias_plan_sized`` is off)."""
        if not cls.fias_plan_sized:
            return "preset", {}
        return fias_size_from_plan(patch_size, arch_kwargs, cls.fias_preset)

    def _fias(self) -> nn.Module:
        """The bare FIAS module behind DDP and torch.compile wrappers."""
        mod = self.network
        if mod is None:
            raise RuntimeError(f"{self.__class__.__name__}: the network is built in initialize(); call it first")
        if isinstance(mod, DDP):
            mod = mod.module
        if isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        return mod

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return self._fias().get_deep_supervision_scales(self.configuration_manager.patch_size)

    def _build_loss(self):
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            loss.weight_factors = tuple(deep_supervision_weights(len(self._get_deep_supervision_scales())))
        return loss

    # --------------------------------------------------------------- batch size
    def _set_batch_size_and_oversample(self):
        planned = self.configuration_manager.batch_size
        if self.is_ddp:
            # Measured once, on rank 0, and used by every rank: all ranks must split the same global batch (and
            # the measurement costs CPU time that the other ranks need not spend).
            result = [memory_fitted_batch_size(self, planned) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(result, src=0, device=self.device if self.device.type == "cuda" else None)
            fitted, reason = result[0]
        else:
            fitted, reason = memory_fitted_batch_size(self, planned)
        if fitted != planned:
            # The ConfigurationManager holds its own copy of the configuration: the plans on disk (and inference)
            # keep the planned batch size; nnU-Net's DDP split below reads this one.
            self.configuration_manager.configuration["batch_size"] = fitted
        self.print_to_log_file(reason)
        super()._set_batch_size_and_oversample()

    # ---------------------------------------------------------------- optimizer
    def _amp_active(self) -> bool:
        return self.use_amp and self.device.type == "cuda"

    def _warmup_epochs(self) -> int:
        if self.num_epochs <= 1:
            return 0
        return min(self.num_epochs - 1, max(1, round(self.warmup_fraction * self.num_epochs)))

    def configure_optimizers(self):
        optimizer = fias_adamw(self.network.parameters(), self.device.type, self.initial_lr, self.weight_decay,
                               self.betas)
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self._warmup_epochs())
        return optimizer, scheduler

    def initialize(self):
        super().initialize()
        if not self._amp_active():
            self.grad_scaler = None

    # ----------------------------------------------------------------- training
    def _autocast(self):
        return torch.autocast(self.device.type, enabled=True) if self._amp_active() else dummy_context()

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.network(data)
            loss = self.loss(output, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.optimizer.step()
        loss_value = loss.detach().cpu().numpy()  # synchronises, so reading the CAF buffers below is free
        net = self._fias()
        self._caf_epoch_values.append(np.asarray(net.caf_global_weights(), dtype=np.float64))
        self._caf_share_values.append(np.asarray(net.caf_global_shares(), dtype=np.float64))
        return {"loss": loss_value}

    def validation_step(self, batch: dict) -> dict:
        if self._amp_active() or self.device.type != "cuda":
            return super().validation_step(batch)
        # nnU-Net's validation step always autocasts on CUDA; without AMP the forward pass must stay float32.
        network = self.network
        self.network = _AutocastOff(network)
        try:
            return super().validation_step(batch)
        finally:
            self.network = network

    # ------------------------------------------------------------------ logging
    def on_train_start(self):
        super().on_train_start()
        self._load_caf_history()
        self._log_setup()

    def on_train_epoch_start(self):
        self._caf_epoch_values, self._caf_share_values = [], []
        super().on_train_epoch_start()

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        loss = self.logger.get_value("train_losses", step=-1)
        if not np.isfinite(loss):
            self.print_to_log_file(
                f"WARNING: the training loss is {loss}. If this persists, train with FIASTrainerNoAMP (float32) or "
                f"a lower initial_lr.")

    def on_epoch_end(self):
        self._record_caf_epoch()
        super().on_epoch_end()
