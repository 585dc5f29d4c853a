"""Fitting FIASTrainer's batch to the memory nnU-Net planned: nnU-Net sizes the batch for its own network, so FIAS's
activations per sample are measured against that network's, and the batch is lowered where FIAS needs more."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

from nnunetv2_fias.architectures.building_blocks.helpers import to_ntuple
from nnunetv2_fias.architectures.measure import saved_activation_mb

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


def _activations_per_sample(trainer, patch: list[int]) -> tuple[float, float | Exception, list[int]]:
    """MB of training activations one ``patch`` sample keeps in FIAS and in the plans' network (or why the latter
    could not be built), and the patch they were measured at."""
    channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                            trainer.dataset_json)
    classes = trainer.label_manager.num_segmentation_heads
    own = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, channels, classes,
                                             True)
    per_axis_stride = to_ntuple(len(patch))
    plan_strides = [per_axis_stride(s) for s in
                    trainer.configuration_manager.network_arch_init_kwargs.get("strides") or [1]]
    divisors = [math.lcm(int(f), math.prod(int(s[a]) for s in plan_strides)) for a, f in enumerate(own.size_divisor)]
    measured = measurement_patch(patch, divisors, MAX_MEASURED_VOXELS)
    scale = math.prod(patch) / math.prod(measured)
    x = torch.zeros(1, channels, *measured)
    fias_mb = saved_activation_mb(own.train(), x) * scale
    del own
    try:
        theirs = nnUNetTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                          channels, classes, True)
        return fias_mb, saved_activation_mb(theirs.train(), x) * scale, measured
    except Exception as e:  # e.g. hand-edited plans whose patch no longer fits the planned network's strides
        return fias_mb, e, measured


def memory_fitted_batch_size(trainer, planned: int) -> tuple[int, str]:
    """The planned batch, or a smaller one where FIAS keeps more activations per sample than the plans' network
    and more than ``trainer.min_activation_budget_mb`` in all (a plan whose batch nnU-Net capped for a small dataset
    leaves memory to spare). Returns the batch and the reason, for the log.

    Both networks are measured at the plans' patch size, batch 1, float32, on the CPU (tensors saved for
    backward by one training forward pass: what grows with the batch). Patches of more than
    ``MAX_MEASURED_VOXELS`` voxels (large 3D patches) are measured at a smaller patch of the same aspect
    (:func:`measurement_patch`) and the figures scaled by the voxel ratio.
    """
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    plans_name = trainer.configuration_manager.network_arch_class_name.rsplit(".", 1)[-1]
    fias_mb, plans_mb, measured = _activations_per_sample(trainer, patch)
    if isinstance(plans_mb, Exception):
        return planned, (f"FIAS replaces the plans' network ({plans_name}); the plans' network could not be "
                         f"measured at patch {patch} ({type(plans_mb).__name__}: {plans_mb}). Batch size {planned} "
                         f"as planned.")
    where = "" if measured == patch else (f" (measured at {'x'.join(map(str, measured))} and scaled by the voxel "
                                          f"ratio, to keep the measurement light)")
    head = (f"FIAS replaces the plans' network ({plans_name}) and takes the patch size, batch size, "
            f"preprocessing, strides and kernel sizes from the plans. Training activations per "
            f"{'x'.join(map(str, patch))} sample{where}: "
            f"FIAS {fias_mb:.1f} MB, {plans_name} {plans_mb:.1f} MB ({fias_mb / plans_mb:.2f}x).")
    if fias_mb <= plans_mb:
        return planned, f"{head} Batch size {planned} as planned."
    if fias_mb * planned <= trainer.min_activation_budget_mb:
        return planned, (f"{head} Batch size {planned} as planned: FIAS's activations at that batch "
                         f"({fias_mb * planned:.0f} MB) stay under {trainer.min_activation_budget_mb:.0f} MB, which "
                         f"any GPU nnU-Net plans for has to spare.")
    minimum = dist.get_world_size() if trainer.is_ddp else 1
    fitted = max(minimum, math.floor(planned * plans_mb / fias_mb),
                 math.floor(trainer.min_activation_budget_mb / fias_mb))
    if fitted >= planned:
        return planned, f"{head} Batch size {planned} as planned (the plans' minimum for this run)."
    return fitted, (f"{head} Batch size lowered from the planned {planned} to {fitted}, so that FIAS needs no more "
                    f"activation memory than the network the plans sized the batch for (or than "
                    f"{trainer.min_activation_budget_mb:.0f} MB).")
