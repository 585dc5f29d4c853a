"""FIASTrainer: nnU-Net's trainer with the FIAS network, AdamW with warm-up and poly decay, and CAF monitoring.

The configuration picks the network: ``2d`` trains the 2D FIAS, the 3D configurations (``3d_fullres``,
``3d_lowres``, ``3d_cascade_fullres``: any configuration with a 3D patch) train FIAS-3D with the same variants.

Everything that changes a training is a class attribute or an attribute set in ``__init__`` (nnU-Net stores only
the trainer's class name in checkpoints, so a variant's name is its configuration, see ``variants.py``).

Defaults and why:

* ``initial_lr = 3e-4``, ``weight_decay = 0.05``, ``betas = (0.9, 0.98)``, ``grad_clip_norm = 1.0``: nnU-Net's own
  recipe for attention networks (the Primus trainers). FIAS mixes attention and convolutions; nnU-Net's SGD at
  lr 1e-2 with momentum 0.99 makes attention logits explode in the first epochs. The 0.05 decay is DilateFormer's
  ImageNet setting; it is not applied to biases and normalisation weights (1-D tensors), as in DilateFormer/timm.
  beta2 = 0.98 makes the second-moment estimate react faster after the warm-up; the clip norm of 1 is the usual
  transformer value (nnU-Net's CNN default is 12).
* Warm-up: linear over the first ``warmup_fraction = 5 %`` of the epochs (50 of 1000, Primus' length), then
  nnU-Net's poly decay (exponent 0.9) over the rest. Both are functions of the epoch only, stepped where nnU-Net
  steps its scheduler, so ``--c`` resumes the schedule exactly.
* Deep supervision: the four outputs the network returns (full resolution, strides 8, 16, 32) with weights
  ``1/2**i``, none zeroed, normalised. nnU-Net's default gives the coarsest output weight 0; its head would then get
  no gradient, which breaks DistributedDataParallel without ``find_unused_parameters`` (``-num_gpus``), and FIAS'
  stride-32 head is a trained head, not a by-product.
* Epochs, iterations and batch size stay nnU-Net's (1000 x 250, batch from the plans) so FIAS and nnUNetTrainer
  compare at equal budget. FIAS replaces the plans' network and takes only the patch size, the batch size and the
  preprocessing (normalisation, spacing) from the plans. nnU-Net sizes the batch for the plans' own network; where
  FIAS would keep more activations per sample than that network (planners that size large batches for a ResEnc
  U-Net), the batch is lowered in proportion, with the reason in the log, so FIAS fits wherever the plans' network
  fits.
"""
from __future__ import annotations

import json
import math
import os
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import _LRScheduler

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_fias._util import atomic_savefig, atomic_write_json, count_flops, deep_supervision_weights

CAF_JSON = "caf_balance.json"
CAF_PNG = "caf_balance.png"


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
        self.initial_lr, self.num_epochs, self.warmup_epochs, self.exponent = initial_lr, num_epochs, warmup_epochs, exponent
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


def fias_adamw(parameters, device_type: str, lr: float = 3e-4, weight_decay: float = 5e-2,
               betas: Sequence[float] = (0.9, 0.98)) -> torch.optim.AdamW:
    """FIASTrainer's AdamW: no weight decay on biases and normalisation weights (1-D tensors), as DilateFormer/timm.

    The fused kernel is used on CUDA and CPU (torch >= 2.4): on CPU it does FIAS-T's update in about a third of the
    time of the default implementation (docs/benchmarks.md).
    """
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device_type in ("cuda", "cpu"))


def _require_2d_or_3d(patch_size: Sequence[int], configuration: str, trainer_name: str) -> None:
    if len(patch_size) not in (2, 3):
        raise ValueError(
            f"{trainer_name} trains FIAS on 2D or 3D patches, but configuration '{configuration}' has a "
            f"{len(patch_size)}D patch size {list(patch_size)}. Use -c 2d or -c 3d_fullres.")


# Above this many voxels per patch, the batch-size fitting measures both networks at a smaller patch of the same
# aspect (activations grow in proportion to the voxels, so the ratio carries over): a 128^3 U-Net keeps several GB
# of activations per sample, too much to measure on the CPU at every training start.
MAX_MEASURED_VOXELS = 2_000_000


def measurement_patch(patch: Sequence[int], divisors: Sequence[int], max_voxels: int = MAX_MEASURED_VOXELS
                      ) -> list[int]:
    """``patch``, or where it has more than ``max_voxels`` voxels, a patch about ``max_voxels / 2`` large with the
    same aspect whose axes stay multiples of ``divisors`` (so neither network pads)."""
    patch = [int(p) for p in patch]
    if math.prod(patch) <= max_voxels:
        return patch
    factor = (max_voxels / 2 / math.prod(patch)) ** (1 / len(patch))
    return [max(int(d), round(p * factor / d) * int(d)) for p, d in zip(patch, divisors)]


class _AutocastOff(nn.Module):
    """Runs the wrapped network in float32 even inside nnU-Net's autocast region (NoAMP validation)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.net(x.float())


class FIASTrainer(nnUNetTrainer):
    """nnU-Net trainer for FIAS: the 2D network for ``2d``, FIAS-3D for the 3D configurations
    (``nnUNetv2_train DATASET 2d|3d_fullres FOLD -tr FIASTrainer``).

    Class attributes (set by variants; read at inference too, where nnU-Net calls
    :meth:`build_network_architecture` on the class):

    * ``fias_preset``: network size, ``"T"``, ``"S"`` or ``"B"``.
    * ``fias_overrides``: keyword arguments passed on to ``FIAS`` / ``FIAS3d`` (e.g. ``{"caf_variant": "sigmoid"}``).

    Training attributes set in ``__init__`` (override them in a subclass ``__init__``): ``initial_lr``,
    ``weight_decay``, ``betas``, ``warmup_fraction``, ``grad_clip_norm``, ``use_amp`` and nnU-Net's own
    (``num_epochs``, ``num_iterations_per_epoch``, ``enable_deep_supervision``...). See the module docstring for the
    defaults' rationale.
    """

    fias_preset: str = "T"
    fias_overrides: Mapping = MappingProxyType({})

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Checked before nnU-Net creates the output folder, so a wrong -c leaves nothing behind.
        _require_2d_or_3d(PlansManager(plans).get_configuration(configuration).patch_size, configuration,
                    self.__class__.__name__)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 3e-4
        self.weight_decay = 5e-2
        self.betas = (0.9, 0.98)
        self.warmup_fraction = 0.05
        self.grad_clip_norm = 1.0
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
        """Builds FIAS (2D patch) or FIAS-3D (3D patch) from the class attributes and the plan's per-axis strides
        (see ``fias_strides_from_plan``; in 3D also the plan's kernel sizes, see ``fias_stage_kernels_from_plan``);
        nnU-Net calls this on the instance (training) and on the class (inference, with deep supervision off,
        followed by a strict ``load_state_dict``)."""
        from nnunetv2_fias.architectures import FIAS, FIAS3d, fias_stage_kernels_from_plan, fias_strides_from_plan

        patch = configuration_manager.patch_size
        _require_2d_or_3d(patch, configuration_manager.data_identifier, cls.__name__)
        kwargs = dict(cls.fias_overrides)
        arch = configuration_manager.network_arch_init_kwargs
        plan_strides = arch.get("strides")
        if "strides" not in kwargs and plan_strides is not None:
            kwargs["strides"] = fias_strides_from_plan(plan_strides, patch)
        network = FIAS
        if len(patch) == 3:
            network = FIAS3d
            if "stage_kernel_sizes" not in kwargs and arch.get("kernel_sizes") is not None:
                kwargs["stage_kernel_sizes"] = fias_stage_kernels_from_plan(arch["kernel_sizes"], plan_strides)
        return network(num_input_channels, num_output_channels, preset=cls.fias_preset,
                       deep_supervision=enable_deep_supervision, **kwargs)

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
        fitted, reason = self._memory_fitted_batch_size(planned)
        if fitted != planned:
            # The ConfigurationManager holds its own copy of the configuration: the plans on disk (and inference)
            # keep the planned batch size; nnU-Net's DDP split below reads this one.
            self.configuration_manager.configuration["batch_size"] = fitted
        self.print_to_log_file(reason)
        super()._set_batch_size_and_oversample()

    def _memory_fitted_batch_size(self, planned: int) -> tuple[int, str]:
        """The planned batch, or a smaller one where FIAS keeps more activations per sample than the plans' network.

        Both networks are measured at the plans' patch size, batch 1, float32, on the CPU (tensors saved for
        backward by one training forward pass: what grows with the batch). Patches of more than
        ``MAX_MEASURED_VOXELS`` voxels (large 3D patches) are measured at a smaller patch of the same aspect
        (:func:`measurement_patch`) and the figures scaled by the voxel ratio.
        """
        from nnunetv2_fias.benchmark.memory import saved_activation_mb

        patch = list(self.configuration_manager.patch_size)
        channels = self._num_input_channels()
        classes = self.label_manager.num_segmentation_heads
        plans_name = self.configuration_manager.network_arch_class_name.rsplit(".", 1)[-1]
        own = self.build_network_architecture(self.plans_manager, self.configuration_manager, channels, classes, True)
        plan_strides = self.configuration_manager.network_arch_init_kwargs.get("strides") or [[1] * len(patch)]
        divisors = [math.lcm(int(f), int(np.prod([s[a] if isinstance(s, (list, tuple)) else s
                                                   for s in plan_strides])))
                    for a, f in enumerate(own.size_divisor)]
        measured = measurement_patch(patch, divisors, MAX_MEASURED_VOXELS)
        scale = math.prod(patch) / math.prod(measured)
        x = torch.zeros(1, channels, *measured)
        fias_mb = saved_activation_mb(own.train(), x) * scale
        del own
        try:
            theirs = nnUNetTrainer.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                              channels, classes, True)
            plans_mb = saved_activation_mb(theirs.train(), x) * scale
            del theirs
        except Exception as e:  # e.g. hand-edited plans whose patch no longer fits the planned network's strides
            return planned, (f"FIAS replaces the plans' network ({plans_name}); the plans' network could not be "
                             f"measured at patch {patch} ({type(e).__name__}: {e}). Batch size {planned} as planned.")
        where = "" if measured == patch else (f" (measured at {'x'.join(map(str, measured))} and scaled by the voxel "
                                              f"ratio, to keep the measurement light)")
        head = (f"FIAS replaces the plans' network ({plans_name}) and takes only the patch size, batch size and "
                f"preprocessing from the plans. Training activations per {'x'.join(map(str, patch))} sample{where}: "
                f"FIAS {fias_mb:.1f} MB, {plans_name} {plans_mb:.1f} MB ({fias_mb / plans_mb:.2f}x).")
        if fias_mb <= plans_mb:
            return planned, f"{head} Batch size {planned} as planned."
        minimum = dist.get_world_size() if self.is_ddp else 1
        fitted = max(minimum, math.floor(planned * plans_mb / fias_mb))
        if fitted >= planned:
            return planned, f"{head} Batch size {planned} as planned (the plans' minimum for this run)."
        return fitted, (f"{head} Batch size lowered from the planned {planned} to {fitted}, so that FIAS needs no more "
                        f"activation memory than the network the plans sized the batch for.")

    def _num_input_channels(self) -> int:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        return determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)

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

    def _log_setup(self) -> None:
        net = self._fias()
        n_params = sum(p.numel() for p in net.parameters())
        patch = list(self.configuration_manager.patch_size)
        flops = self._count_flops(net, patch)
        overrides = dict(self.fias_overrides)
        self.print_to_log_file(
            f"FIAS preset {self.fias_preset}" + (f" with overrides {overrides}" if overrides else "")
            + f": {n_params / 1e6:.2f} M parameters, "
            + (f"{flops / 1e9:.2f} GFLOPs" if flops is not None else "FLOPs not countable")
            + f" per forward pass of one {'x'.join(map(str, patch))} patch "
              f"({self.num_input_channels} input channel(s), {self.label_manager.num_segmentation_heads} outputs)")
        self.print_to_log_file(
            f"Optimizer: AdamW lr {self.initial_lr:g}, betas {tuple(self.betas)}, weight decay {self.weight_decay:g} "
            f"(not on biases/norms), linear warm-up {self._warmup_epochs()} of {self.num_epochs} epochs then poly "
            f"0.9, gradient clipping at norm {self.grad_clip_norm:g}; batch size {self.batch_size}, "
            f"{self.num_iterations_per_epoch} iterations per epoch")
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

    def _count_flops(self, net: nn.Module, patch: list[int]) -> float | None:
        try:
            return float(count_flops(net, self.num_input_channels, patch, self.device))
        except Exception as e:  # FLOPs are informative only; never fail a training over them
            self.print_to_log_file(f"Could not count FLOPs: {type(e).__name__}: {e}")
            return None

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

    def _record_caf_epoch(self) -> None:
        if not self._caf_epoch_values:
            return
        weights = _epoch_means(self._caf_epoch_values)
        shares = _epoch_means(self._caf_share_values) if self._caf_share_values else [math.nan] * len(weights)
        self._caf_history[self.current_epoch] = weights
        self._caf_share_history[self.current_epoch] = shares
        self.print_to_log_file(f"CAF per stage (strides {self._stage_strides()}): global-branch weight a_G",
                               [round(v, 4) for v in weights], "effective global share",
                               [round(v, 4) for v in shares])
        if self.local_rank == 0:
            self._save_caf_history()

    def _stage_strides(self) -> list[list[int]] | None:
        return None if self.network is None else [list(s) for s in self._fias().encoder.strides]

    def _caf_paths(self) -> tuple[str, str]:
        return os.path.join(self.output_folder, CAF_JSON), os.path.join(self.output_folder, CAF_PNG)

    def _load_caf_history(self) -> None:
        """On ``--c``, keep the epochs the checkpoint covers (a crash may have logged one more)."""
        json_path, _ = self._caf_paths()
        self._caf_history, self._caf_share_history = {}, {}
        if self.current_epoch > 0 and os.path.isfile(json_path):
            try:
                with open(json_path) as f:
                    saved = json.load(f)
                for key, history in (("global_weight", self._caf_history), ("global_share", self._caf_share_history)):
                    history.update({int(e): [math.nan if v is None else float(v) for v in w]
                                    for e, w in zip(saved["epochs"], saved.get(key, []))
                                    if int(e) < self.current_epoch})
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.print_to_log_file(f"Could not read {json_path} ({e}); the CAF history restarts here.")

    def _save_caf_history(self) -> None:
        json_path, png_path = self._caf_paths()
        epochs = sorted(self._caf_history)
        weights = [self._caf_history[e] for e in epochs]
        shares = [self._caf_share_history.get(e, [math.nan] * len(w)) for e, w in zip(epochs, weights)]
        payload = {
            "description": "Per stage's CAF block, averaged over the epoch's training iterations: global_weight is "
                           "the mean weight a_G of the global (DilateFormer) branch (the local DMK branch gets "
                           "1 - a_G); global_share is the global branch's effective share of the fused feature, "
                           "mean|a_G G| / (mean|a_G G| + mean|a_L L|), which also reflects the branches' scales.",
            "trainer": self.__class__.__name__, "preset": self.fias_preset,
            "stage_strides": self._stage_strides(), "epochs": epochs, "global_weight": _strict_json(weights),
            "global_share": _strict_json(shares),
        }
        atomic_write_json(json_path, payload, indent=1, allow_nan=False)
        self._plot_caf(epochs, weights, shares, self._stage_strides(), png_path)

    @staticmethod
    def _plot_caf(epochs: list[int], weights: list[list[float]], shares: list[list[float]],
                  strides: list[list[int]] | None, png_path: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        panels = ((weights, "CAF weight a_G of the global branch"),
                  (shares, "effective share of the global branch"))
        for i, (values, label) in enumerate(panels):
            ax = fig.add_subplot(1, 2, i + 1)
            arr = np.asarray(values, dtype=float).reshape(len(epochs), -1)
            for s in range(arr.shape[1]):
                ax.plot(epochs, arr[:, s], marker="o" if len(epochs) < 30 else None, markersize=3,
                        label=f"stage {s + 1}" + (f" (stride {'x'.join(map(str, strides[s]))})" if strides else ""))
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_ylim(0, 1)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.legend(loc="best", fontsize="small")
        fig.suptitle("CAF balance: global (DilateFormer) vs local (DMK) branch")
        fig.tight_layout()
        atomic_savefig(fig, png_path)


def _epoch_means(per_iteration: list[np.ndarray]) -> list[float]:
    arr = np.stack(per_iteration)
    return [float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in arr.T]


def _strict_json(rows: list[list[float]]) -> list[list[float | None]]:
    return [[v if math.isfinite(v) else None for v in row] for row in rows]  # strict JSON: NaN -> null
