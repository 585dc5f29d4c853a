"""``nnunetv2_fias demo``: FIAS trained and evaluated through the real nnU-Net pipeline on built-in phantoms.

One command runs, in a fresh folder (default ``./demo_output``):

1. generate synthetic abdominal CT phantoms in the Synapse release layout (:mod:`nnunetv2_fias.phantoms`);
2. ``nnunetv2_fias convert-synapse --protocol transunet`` (18 training / 12 test cases, 8 organs);
3. ``nnUNetv2_plan_and_preprocess -c 2d --verify_dataset_integrity``;
4. ``nnUNetv2_train DATASET 2d 0 -tr FIASTrainer_demoBudget`` (fold 0 only; ``--compare`` also trains
   ``nnUNetTrainer_demoBudget``, nnU-Net's own U-Net at the same budget);
5. ``nnUNetv2_predict`` on the 12 test cases;
6. ``nnunetv2_fias evaluate`` (Dice and HD95 per organ);
7. ``report.md`` and an overlay PNG (image, reference, prediction) of a test slice.

Modules: :mod:`.settings` (dataset, budgets, errors), :mod:`.pipeline` (output folder, environment, steps),
:mod:`.report` (report and overlay), :mod:`.cli` (command line). ``nnUNet_raw``, ``nnUNet_preprocessed`` and
``nnUNet_results`` point into the output folder for the nnU-Net subprocesses only; the user's own nnU-Net folders
and environment are never touched.
"""
from nnunetv2_fias.demo.cli import build_parser, main
from nnunetv2_fias.demo.pipeline import build_env, prepare_output, resolve_device, run_demo
from nnunetv2_fias.demo.report import write_overlay, write_report
from nnunetv2_fias.demo.settings import (BUDGETS, CONFIGURATION, DATASET_ID, DATASET_NAME, FOLD, MARKER,
                                         METHOD_NAMES, SHIM_DIR, Budget, DemoError)

__all__ = ["BUDGETS", "CONFIGURATION", "DATASET_ID", "DATASET_NAME", "FOLD", "MARKER", "METHOD_NAMES", "SHIM_DIR",
           "Budget", "DemoError", "build_env", "build_parser", "main", "prepare_output", "resolve_device", "run_demo",
           "write_overlay", "write_report"]
