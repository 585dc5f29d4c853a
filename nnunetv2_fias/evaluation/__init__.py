"""Per-class Dice and HD95 under the paper protocol, tables, plots and trainer comparisons
(``nnunetv2_fias evaluate``).

nnU-Net's own evaluation reports Dice only, while the papers FIAS is compared against report Dice and HD95 as
TransUNet computes them; this package reproduces that protocol and adds HD95 in millimetres (see
:mod:`nnunetv2_fias.evaluation.metrics` for the exact definitions and empty-mask rules).

Modules: ``metrics`` (Dice, HD95 on masks), ``inputs`` (folders, dataset.json and labels, reading and checking
label maps), ``pipeline`` (:func:`evaluate_folders`, per-case work in worker processes), ``report`` (means,
summary.json, metrics.csv, summary.md, plots, atomic output), ``cli`` (the command line).

Python API::

    from nnunetv2_fias.evaluation import evaluate_folders
    summary = evaluate_folders("Dataset111_Synapse/labelsTs", ["pred_fias", "pred_nnunet"],
                               labels=["aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
                                       "spleen", "stomach"], output="eval_out")
    summary["methods"]["pred_fias"]["mean_over_labels"]["dice"]
"""
from nnunetv2_fias.evaluation.cli import main
from nnunetv2_fias.evaluation.inputs import DEFAULT_FILE_ENDING, SPACING_RTOL, EvaluationError
from nnunetv2_fias.evaluation.metrics import METRICS, dice_coefficient, hd95, score_masks
from nnunetv2_fias.evaluation.pipeline import evaluate_folders
from nnunetv2_fias.evaluation.report import format_markdown

__all__ = ["DEFAULT_FILE_ENDING", "METRICS", "SPACING_RTOL", "EvaluationError", "dice_coefficient",
           "evaluate_folders", "format_markdown", "hd95", "main", "score_masks"]
