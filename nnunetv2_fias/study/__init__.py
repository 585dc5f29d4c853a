"""``nnunetv2_fias study``: a whole comparison of trainers (five folds, model selection, test inference, paired
statistics) as one resumable command, run here or as a SLURM job array.

Modules: ``grid`` (the grid, its jobs, the study file), ``layout`` (folders; job state from nnU-Net's files),
``commands`` (the stock nnU-Net commands), ``checks`` (validation and planning steps), ``execute`` (processes,
logs, locks), ``run`` (planning and training), ``finish`` (selection and inference), ``scores``, ``stats``,
``compare``, ``plots``, ``report`` (scoring and the report), ``status``, ``slurm``, ``cli``.
"""
from nnunetv2_fias.study.cli import main

__all__ = ["main"]
