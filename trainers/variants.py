"""FIASTrainer variants, one change each; the class name says what it is.

nnU-Net stores the trainer's class name in every checkpoint and names the results folder after it, so these names
are a public API: never rename or repurpose one, add a new class instead.
"""
import torch

from .fias_trainer import FIASTrainer


class FIASTrainer_5epochs(FIASTrainer):
    """Smoke test: 5 epochs (warm-up 1 epoch)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class FIASTrainer_100epochs(FIASTrainer):
    """100 epochs (warm-up 5)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class FIASTrainer_250epochs(FIASTrainer):
    """250 epochs (warm-up 12)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 250


class FIASTrainerNoDS(FIASTrainer):
    """Without deep supervision: the loss sees the full-resolution output only."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False


class FIASTrainerNoAMP(FIASTrainer):
    """float32 training steps and per-epoch validation on CUDA (no autocast, no GradScaler): the fix for NaN
    losses. nnU-Net's predictor (final validation, inference) autocasts regardless; FIAS keeps its attention
    logits and softmax in float32 there."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_amp = False


class FIASTrainer_S(FIASTrainer):
    """FIAS-S (DilateFormer-Small layout)."""

    fias_preset = "S"


class FIASTrainer_B(FIASTrainer):
    """FIAS-B (DilateFormer-Base layout)."""

    fias_preset = "B"


class FIASTrainer_planSized(FIASTrainer):
    """FIAS sized by the plan: on patches under 128x128 (FIAS's first stage under 1024 positions) narrower heads,
    under 64x64 also half the blocks, with the learning rate scaled by the width (``fias_plan_sized``; see
    :func:`~nnunetv2_fias.architectures.fias_size_from_plan` and docs/benchmarks.md for its speed and accuracy)."""

    fias_plan_sized = True
