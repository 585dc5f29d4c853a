"""The models the benchmark compares: their specs, how each is built, and what its training step uses.

A spec is a JSON-able dict (it is passed to worker processes on the command line) with ``kind`` (``fias``,
``nnunet`` or ``swinunetr``), ``channels``, ``classes``, ``patch``, ``batch``, ``device``, ``amp``, ``threads``,
``seed`` and, for FIAS and nnU-Net, the nnU-Net ``arch`` dict of the configuration.

FIAS is built exactly as FIASTrainer builds it (``build_network_architecture`` on the trainer class of the preset, or
the trainer named instead of a preset,
with a plans dict whose ``2d`` (or, for a 3D patch, ``3d_fullres``) configuration has the benchmark's patch, batch and
architecture), so that whatever the trainer reads from the configuration is read here too. nnU-Net's U-Net is
``get_network_from_plans`` with the architecture of the plans (``--plans``) or the one nnU-Net's default planner
derives for the patch (2D or 3D).
"""
from __future__ import annotations

from typing import Sequence

from nnunetv2_fias._util import deep_supervision_weights

BASELINE_NAME = "nnU-Net"
KNOWN_BASELINES = ("nnunet", "swinunetr")
NNUNET_ARCH_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
NNUNET_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")
# The trainer class of each preset (nnUNetv2_train -tr ...); the benchmark builds FIAS through it.
FIAS_TRAINERS = {"T": "FIASTrainer", "S": "FIASTrainer_S", "B": "FIASTrainer_B"}


class BenchmarkError(Exception):
    """A user error or a failed worker: reported as one message, exit code 1."""


def default_nnunet_architecture(patch: Sequence[int], strict: bool = True) -> dict:
    """nnU-Net's default ``PlainConvUNet`` architecture for a 2D or 3D ``patch``, as ``ExperimentPlanner`` plans it
    (2D: up to 512 features per stage; 3D: up to 320 and a 4x4x4 coarsest map).

    Spacing is isotropic, so the topology only depends on the patch size. With ``strict``, raises ``BenchmarkError``
    when nnU-Net would have to pad the patch (its U-Net needs every axis divisible by ``2**pools``); otherwise
    returns the architecture of the padded patch.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    patch = [int(p) for p in patch]
    dim = len(patch)
    _, pools, kernels, padded, divisor = get_pool_and_conv_props([1.0] * dim, patch, 4, 999999)
    if strict and [int(p) for p in padded] != patch:
        raise BenchmarkError(
            f"--patch {' '.join(map(str, patch))}: nnU-Net's default {dim}D U-Net needs each axis divisible by "
            f"{' x '.join(str(int(d)) for d in divisor)} for this patch; nnU-Net would use "
            f"{' '.join(str(int(p)) for p in padded)} (pass that, or a --plans file)")
    n = len(pools)
    if strict and n < 2:
        # PlainConvUNet has no decoder without a downsampling (it fails with an IndexError, or on 1x1 maps in
        # InstanceNorm); nnU-Net's planner downsamples an axis only while the map stays at least 4 voxels wide.
        raise BenchmarkError(
            f"--patch {' '.join(map(str, patch))}: too small for nnU-Net's default {dim}D U-Net, which needs at "
            f"least one downsampling (nnU-Net's planner pools an axis only from 8 voxels on, e.g. --patch "
            f"{' '.join(['8'] * dim) if dim == 2 else ' '.join(map(str, [max(1, patch[0]), 8, 8]))}); "
            f"pass a larger --patch, or --baselines none to measure FIAS alone")
    return {
        "network_class_name": NNUNET_ARCH_CLASS,
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": [min(32 * 2 ** i, 512 if dim == 2 else 320) for i in range(n)],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": [list(k) for k in kernels],
            "strides": [list(s) for s in pools],
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": list(NNUNET_REQUIRES_IMPORT),
    }


def monai_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("monai") is not None


def model_specs(config, patch: Sequence[int], arch: dict | None) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(name, spec) per model to measure, FIAS presets first, and the skipped baselines with the reason.

    ``config`` is the resolved benchmark configuration (``cli.BenchmarkConfig``); ``arch`` the nnU-Net architecture
    for ``patch``.
    """
    common = dict(channels=config.channels, classes=config.classes, patch=list(patch), batch=config.batch,
                  device=config.device, amp=config.amp, threads=config.threads, seed=config.seed)
    models = [(f"FIAS-{p}" if p in FIAS_TRAINERS else p, dict(common, kind="fias", preset=p, arch=arch))
              for p in config.presets]
    skipped = []
    for baseline in config.baselines:
        if baseline == "nnunet":
            models.append((BASELINE_NAME, dict(common, kind="nnunet", arch=arch)))
        elif baseline == "swinunetr":
            reason = None
            if len(patch) != 2:
                reason = f"SwinUNETR-2D is a 2D baseline, the patch {list(patch)} is 3D"
            elif not monai_available():
                reason = "MONAI is not installed (pip install monai)"
            elif any(p % 32 for p in patch):
                reason = f"SwinUNETR needs a patch divisible by 32, got {list(patch)}"
            if reason:
                skipped.append({"model": "SwinUNETR-2D", "reason": reason})
            else:
                models.append(("SwinUNETR-2D", dict(common, kind="swinunetr")))
    return models, skipped


def fias_configuration(spec: dict) -> str:
    """``2d`` for a 2D patch, ``3d_fullres`` for a 3D one."""
    return "2d" if len(spec["patch"]) == 2 else "3d_fullres"


def fias_plans(spec: dict) -> dict:
    """The minimal nnU-Net plans a FIAS trainer would be given for this spec: one ``2d`` or ``3d_fullres``
    configuration."""
    configuration = fias_configuration(spec)
    return {
        "dataset_name": "Dataset000_Benchmark",
        "plans_name": "nnUNetPlans",
        "configurations": {configuration: {
            "data_identifier": f"nnUNetPlans_{configuration}",
            "patch_size": list(spec["patch"]),
            "batch_size": int(spec["batch"]),
            "architecture": spec["arch"],
        }},
    }


def build_fias(spec: dict):
    """FIAS as ``FIASTrainer(_S/_B).build_network_architecture`` builds it for training (deep supervision on)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_fias import trainers

    trainer = getattr(trainers, FIAS_TRAINERS.get(spec["preset"], spec["preset"]))  # a preset or a trainer name
    plans = PlansManager(fias_plans(spec))
    configuration = plans.get_configuration(fias_configuration(spec))
    return trainer.build_network_architecture(plans, configuration, spec["channels"], spec["classes"],
                                              enable_deep_supervision=True)


def build_model(spec: dict):
    """Build the model a spec describes (see :func:`model_specs`), with deep supervision on where it has it."""
    kind, channels, classes = spec["kind"], spec["channels"], spec["classes"]
    if kind == "fias":
        return build_fias(spec)
    if kind == "nnunet":
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        arch = spec["arch"]
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                      channels, classes, deep_supervision=True)
    if kind == "swinunetr":
        import inspect

        from monai.networks.nets import SwinUNETR

        kwargs = dict(in_channels=channels, out_channels=classes, spatial_dims=2, feature_size=24)
        if "img_size" in inspect.signature(SwinUNETR).parameters:  # required before MONAI 1.5, removed later
            kwargs["img_size"] = tuple(spec["patch"])
        return SwinUNETR(**kwargs)
    raise ValueError(f"unknown model kind {kind!r}")


def output_sizes(model, spec: dict) -> list[tuple[int, ...]] | None:
    """Spatial size of every deep-supervision output, main first (None: one output)."""
    patch = tuple(spec["patch"])
    if spec["kind"] == "fias":
        return [tuple(s) for s in model.output_sizes(patch)]
    if spec["kind"] == "nnunet":
        import numpy as np

        strides = np.array(spec["arch"]["arch_kwargs"]["strides"])
        cum = np.cumprod(strides, axis=0)[:-1]
        return [tuple(int(round(p / s)) for p, s in zip(patch, row)) for row in cum]
    return None


def loss_weights(kind: str, n: int) -> list[float]:
    """Deep-supervision loss weights: nnU-Net's (lowest resolution zeroed) for its U-Net, FIASTrainer's otherwise."""
    return deep_supervision_weights(n, zero_lowest=kind == "nnunet")


def optimizer(model, kind: str):
    """The optimizer and gradient-clip norm the model's trainer uses."""
    import torch

    if kind == "nnunet":  # nnUNetTrainer.configure_optimizers
        return torch.optim.SGD(model.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True), 12.0
    from nnunetv2_fias.trainers import FIASTrainer
    from nnunetv2_fias.trainers.optim import fias_adamw

    recipe = FIASTrainer.recipe
    device_type = next(model.parameters()).device.type
    return (fias_adamw(model.parameters(), device_type, recipe["initial_lr"], recipe["weight_decay"], recipe["betas"]),
            recipe["grad_clip_norm"])
