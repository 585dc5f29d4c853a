"""`nnunetv2_fias benchmark`: FIAS next to nnU-Net's own U-Net (and optionally SwinUNETR-2D) at the same input.

For every model, at the same patch size, batch size, channels and classes:

* ``params``: trainable parameters.
* ``gflops``: forward GFLOPs of one patch (batch 1, deep supervision off), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; elementwise work is not counted).
* ``activation_mb``: MB (2**20 bytes) of the tensors one training forward pass at the batch size saves for backward
  (train mode, deep supervision on, float32, loss not included; parameters excluded, each storage counted once, the
  inputs of activation-checkpointed regions included): see :mod:`nnunetv2_fias.architectures.measure`.
* ``train_step_ms``: median wall time of one training step as the trainers run it: forward, nnU-Net's Dice + CE loss
  over every deep-supervision output, backward, gradient clipping, optimizer step (nnU-Net's U-Net: SGD, momentum
  0.99, nesterov, clip 12, nnU-Net's loss weights; FIAS: FIASTrainer.recipe and loss weights; SwinUNETR: AdamW,
  no deep supervision), after warm-up steps.
* ``infer_ms``: median wall time of one inference forward pass of one patch (batch 1, eval mode, deep supervision
  off, no autograd), as nnU-Net's sliding-window predictor runs it.
* ``peak_mem_mb``: CUDA allocator peak on GPU; on CPU the process peak RSS (``base_mem_mb`` is the RSS of the same
  process after importing torch and nnU-Net, before the model was built).
* ``ratio_*``: the model's value over the nnU-Net U-Net's.

Each model runs in its own worker process (``python -m nnunetv2_fias.benchmark --_worker SPEC``), so its peak
memory is its own; the parent alternates the workers step by step (one timed step of each model per round, in a
rotating order), so that a busy machine slows every model alike and the ratios stay meaningful.

FIAS is built exactly as its trainer builds it (``FIASTrainer.build_network_architecture``, ``FIASTrainer_S``/``_B``
for the larger presets). The nnU-Net baseline is ``PlainConvUNet`` built by ``get_network_from_plans``: with
``--plans``, from that plans file's configuration exactly; without, from the architecture nnU-Net's default 2D
``ExperimentPlanner`` derives for the patch (``get_pool_and_conv_props`` with isotropic spacing, feature map edge
>= 4, features ``min(32 * 2**i, 512)``, two convs per stage, InstanceNorm, LeakyReLU, deep supervision).

``--breakdown`` also times forward + backward of each part of the networks on its own (:mod:`~.parts`): FIAS's
global branch, local branch, fusion + decoder, whole and whole without recomputation; the U-Net's encoder, decoder
and whole; each part's ratio is to the U-Net as a whole.

``--skip-timing`` only counts parameters, FLOPs and activation memory, in this process, for one or more ``--patch``
sizes: the model-size table of docs/benchmarks.md.

Modules: :mod:`~.models` (specs and model building), :mod:`~.worker` (the measuring process), :mod:`~.runner`
(interleaved runs, size counts, tables), :mod:`~.parts` (``--breakdown``), :mod:`~.predict` (``--predict``),
:mod:`~.cli` (arguments, main), :mod:`~.baselines` (reference attention formulations and their micro-benchmark).
"""
from nnunetv2_fias.benchmark.cli import BenchmarkConfig, build_parser, main, resolve
from nnunetv2_fias.benchmark.models import (BASELINE_NAME, FIAS_TRAINERS, KNOWN_BASELINES, NNUNET_ARCH_CLASS,
                                            BenchmarkError, build_model, default_nnunet_architecture, fias_plans,
                                            loss_weights, model_specs, monai_available, output_sizes)
from nnunetv2_fias.benchmark.parts import FIAS_PARTS, UNET_PARTS
from nnunetv2_fias.benchmark.runner import format_report, format_sizes, run_sizes, run_timed
from nnunetv2_fias.benchmark.worker import PROTOCOL_PREFIX, Worker, worker_main

__all__ = ["BASELINE_NAME", "FIAS_PARTS", "FIAS_TRAINERS", "KNOWN_BASELINES", "NNUNET_ARCH_CLASS", "PROTOCOL_PREFIX",
           "UNET_PARTS", "BenchmarkConfig", "BenchmarkError", "Worker", "build_model", "build_parser",
           "default_nnunet_architecture", "fias_plans", "format_report", "format_sizes", "loss_weights", "main",
           "model_specs", "monai_available", "output_sizes", "resolve", "run_sizes", "run_timed", "worker_main"]
