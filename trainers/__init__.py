"""nnU-Net trainers for FIAS. nnU-Net finds them by class name through the shim in ``nnunetv2_fias/nnunet_ext``
(``eval "$(nnunetv2_fias env)"``).

>>> from nnunetv2_fias.trainers import FIASTrainer
"""
from .fias_trainer import FIASTrainer, WarmupPolyLRScheduler
from .budgets import (FIASTrainer_demoBudget, FIASTrainer_smokeBudget, nnUNetTrainer_demoBudget,
                      nnUNetTrainer_smokeBudget)
from .pretrained import FIASTrainer_ImageNet, FIASTrainer_ImageNet_B, FIASTrainer_ImageNet_S
from .variants import (FIASTrainer_5epochs, FIASTrainer_100epochs, FIASTrainer_250epochs, FIASTrainer_B,
                       FIASTrainer_S, FIASTrainer_planSized, FIASTrainerNoAMP, FIASTrainerNoDS)

# Every trainer class nnU-Net can be asked for with -tr (also re-exported by the discovery shim).
TRAINERS = (FIASTrainer, FIASTrainer_5epochs, FIASTrainer_100epochs, FIASTrainer_250epochs, FIASTrainerNoDS,
            FIASTrainerNoAMP, FIASTrainer_S, FIASTrainer_B, FIASTrainer_demoBudget, nnUNetTrainer_demoBudget,
            FIASTrainer_smokeBudget, nnUNetTrainer_smokeBudget, FIASTrainer_ImageNet, FIASTrainer_ImageNet_S,
            FIASTrainer_ImageNet_B, FIASTrainer_planSized)

__all__ = [cls.__name__ for cls in TRAINERS] + ["TRAINERS", "WarmupPolyLRScheduler"]
