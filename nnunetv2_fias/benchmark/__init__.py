"""`nnunetv2_fias benchmark`: FIAS next to nnU-Net's own U-Net (and optionally SwinUNETR-2D) at the same input.

For every model, at the same patch size, batch size, channels and classes:

* ``params``: trainable parameters.
* ``gflops``: forward GFLOPs of one patch (batch 1, deep supervision off), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; elementwise work is not counted).
* ``train_step_ms``: median wall time of one training step as the trainers run it: forward, nnU-Net's Dice + CE loss
  over every deep-supervision output, backward, gradient clipping, optimizer step (nnU-Net's U-Net: SGD, momentum
  0.99, nesterov, clip 12, nnU-Net's loss weights; FIAS: AdamW, clip 1, FIASTrainer's loss weights; SwinUNETR: AdamW,
  no deep supervision), after warm-up steps.
* ``infer_ms``: median wall time of one inference forward pass of one patch (batch 1, eval mode, deep supervision
  off, no autograd), as nnU-Net's sliding-window predictor runs it.
* ``peak_mem_mb``: CUDA allocator peak on GPU; on CPU the process peak RSS (``base_mem_mb`` is the RSS of the same
  process after importing torch and nnU-Net, before the model was built).
* ``ratio_train_step``, ``ratio_peak_mem``: the model's value over the nnU-Net U-Net's.

Each model runs in its own worker process (``python -m nnunetv2_fias.benchmark --_worker SPEC``), so its peak
memory is its own; the parent alternates the workers step by step (one timed step of each model per round, in a
rotating order), so that a busy machine slows every model alike and the ratios stay meaningful.

The nnU-Net baseline is ``PlainConvUNet`` built by ``get_network_from_plans``: with ``--plans``, from that plans
file's configuration exactly; without, from the architecture nnU-Net's default 2D ``ExperimentPlanner`` derives for
the patch (``get_pool_and_conv_props`` with isotropic spacing, feature map edge >= 4, features
``min(32 * 2**i, 512)``, two convs per stage, InstanceNorm, LeakyReLU, deep supervision).

``--skip-timing`` only counts parameters and FLOPs, in this process, for one or more ``--patch`` sizes: the
model-size table of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

PROTOCOL_PREFIX = "@@fias-benchmark "
BASELINE_NAME = "nnU-Net"
KNOWN_BASELINES = ("nnunet", "swinunetr")
NNUNET_ARCH_CLASS = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
NNUNET_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


class BenchmarkError(Exception):
    """A user error or a failed worker: reported as one message, exit code 2."""


# ----------------------------------------------------------------------------------------------- architectures
def default_nnunet_architecture(patch: Sequence[int]) -> dict:
    """nnU-Net's default 2D ``PlainConvUNet`` architecture for ``patch``, as ``ExperimentPlanner`` plans it.

    Spacing is isotropic, so the topology only depends on the patch size. Raises ``BenchmarkError`` when nnU-Net
    would have to pad the patch (its U-Net needs every axis divisible by ``2**pools``).
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    patch = [int(p) for p in patch]
    _, pools, kernels, padded, divisor = get_pool_and_conv_props([1.0] * len(patch), patch, 4, 999999)
    if [int(p) for p in padded] != patch:
        raise BenchmarkError(
            f"--patch {' '.join(map(str, patch))}: nnU-Net's default 2D U-Net needs each axis divisible by "
            f"{' x '.join(str(int(d)) for d in divisor)} for this patch; nnU-Net would use "
            f"{' '.join(str(int(p)) for p in padded)} (pass that, or a --plans file)")
    n = len(pools)
    return {
        "network_class_name": NNUNET_ARCH_CLASS,
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": [min(32 * 2 ** i, 512) for i in range(n)],
            "conv_op": "torch.nn.modules.conv.Conv2d",
            "kernel_sizes": [list(k) for k in kernels],
            "strides": [list(s) for s in pools],
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": list(NNUNET_REQUIRES_IMPORT),
    }


def _monai_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("monai") is not None


def build_model(spec: dict):
    """Build the model a worker spec describes (see ``_model_specs``), with deep supervision on where it has it."""
    import torch

    kind, channels, classes = spec["kind"], spec["channels"], spec["classes"]
    if kind == "fias":
        from nnunetv2_fias.architectures import FIAS

        return FIAS(channels, classes, preset=spec["preset"], deep_supervision=True)
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
    raise ValueError(f"unknown model kind {kind!r}")  # pragma: no cover - specs are built by this module


def _set_deep_supervision(model, enabled: bool) -> None:
    decoder = getattr(model, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled


def _output_sizes(model, spec: dict) -> list[tuple[int, ...]] | None:
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


def _loss_weights(kind: str, n: int) -> list[float]:
    """nnU-Net's deep-supervision weights (1/2**i, the lowest resolution zeroed) or FIASTrainer's (none zeroed)."""
    weights = [1 / 2 ** i for i in range(n)]
    if kind == "nnunet" and n > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def _optimizer(model, kind: str):
    import torch

    if kind == "nnunet":  # nnUNetTrainer.configure_optimizers
        return torch.optim.SGD(model.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True), 12.0
    from nnunetv2_fias.trainers.fias_trainer import fias_adamw

    return fias_adamw(model.parameters(), next(model.parameters()).device.type), 1.0


def count_flops(model, channels: int, patch: Sequence[int], device) -> int:
    """Forward FLOPs of one patch (batch 1) in eval mode with deep supervision off."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    _set_deep_supervision(model, False)
    try:
        x = torch.zeros(1, channels, *patch, device=device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
        _set_deep_supervision(model, True)


# ------------------------------------------------------------------------------------------------------ worker
def _peak_rss_mb() -> float:
    import resource

    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):  # not Linux
        return _peak_rss_mb()


def _send(message: dict) -> None:
    sys.stdout.write(PROTOCOL_PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def worker_main(spec: dict) -> int:
    """One model in its own process: report size and FLOPs, then run timed steps on request from stdin.

    Commands (one per line): ``train``, ``fwd_bwd``, ``infer`` (each answered with ``{"ms": wall, "cpu_ms": process CPU}``) and
    ``quit`` (answered with the peak memory).
    """
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    # Resident memory of torch and nnU-Net alone, before this process built anything.
    base_mem = _current_rss_mb() if device.type == "cpu" else 0.0
    torch.manual_seed(spec.get("seed", 0))
    model = build_model(spec).to(device)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = count_flops(model, spec["channels"], spec["patch"], device)

    batch, patch, classes = spec["batch"], tuple(spec["patch"]), spec["classes"]
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    x = torch.randn(batch, spec["channels"], *patch, device=device)
    labels = torch.randint(0, classes, (batch, 1, *patch), device=device).float()
    sizes = _output_sizes(model, spec)
    if sizes is not None:
        loss = DeepSupervisionWrapper(loss, _loss_weights(spec["kind"], len(sizes)))
        target = [labels if s == patch else torch.nn.functional.interpolate(labels, size=s, mode="nearest")
                  for s in sizes]
    else:
        target = labels
    optimizer, clip = _optimizer(model, spec["kind"])
    x_infer = x[:1].clone()
    amp = bool(spec.get("amp"))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step():
        model.train()
        _set_deep_supervision(model, True)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(x)
            value = loss(out, target)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    def fwd_bwd_step():
        model.train()
        _set_deep_supervision(model, True)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            value = loss(model(x), target)
        value.backward()

    def infer_step():
        model.eval()
        _set_deep_supervision(model, False)
        with torch.inference_mode(), autocast():
            model(x_infer)

    steps = {"train": train_step, "fwd_bwd": fwd_bwd_step, "infer": infer_step}
    _send({"ready": True, "params": params, "flops": flops, "base_mem_mb": base_mem})
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command not in steps:
            _send({"error": f"unknown command {command!r}"})
            continue
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        steps[command]()
        sync()
        _send({"ms": (time.perf_counter() - t0) * 1e3, "cpu_ms": (time.process_time() - c0) * 1e3})
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else _peak_rss_mb()
    _send({"peak_mem_mb": peak})
    return 0


class _Worker:
    """Parent-side handle of one worker process."""

    def __init__(self, name: str, spec: dict):
        self.name, self.spec = name, spec
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ)
        env.setdefault("nnUNet_compile", "f")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nnunetv2_fias.benchmark", "--_worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        self.info = self._receive()

    def _receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL_PREFIX):
                message = json.loads(line[len(PROTOCOL_PREFIX):])
                if "error" in message:
                    raise BenchmarkError(f"{self.name} worker: {message['error']}")
                return message
        self.proc.wait()
        self._stderr.seek(0)
        tail = "\n".join(self._stderr.read().strip().splitlines()[-15:])
        raise BenchmarkError(f"the {self.name} worker exited with code {self.proc.returncode}:\n{tail}")

    def request(self, command: str) -> dict:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died; _receive reports its stderr
        return self._receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


# ---------------------------------------------------------------------------------------------------- parent
def _model_specs(args, patch: Sequence[int], arch: dict | None) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(name, spec) per model to measure, FIAS presets first, and the skipped baselines with the reason."""
    common = dict(channels=args.channels, classes=args.classes, patch=list(patch), batch=args.batch,
                  device=args.device, amp=args.amp, threads=args.threads, seed=args.seed)
    models = [(f"FIAS-{p}", dict(common, kind="fias", preset=p)) for p in args.presets]
    skipped = []
    for baseline in args.baseline_list:
        if baseline == "nnunet":
            models.append((BASELINE_NAME, dict(common, kind="nnunet", arch=arch)))
        elif baseline == "swinunetr":
            reason = None
            if not _monai_available():
                reason = "MONAI is not installed (pip install monai)"
            elif any(p % 32 for p in patch):
                reason = f"SwinUNETR needs a patch divisible by 32, got {list(patch)}"
            if reason:
                skipped.append({"model": "SwinUNETR-2D", "reason": reason})
            else:
                models.append(("SwinUNETR-2D", dict(common, kind="swinunetr")))
    return models, skipped


def _interleaved(workers: list[_Worker], command: str, warmup: int, repeats: int) -> dict[str, dict[str, list]]:
    """Run ``warmup + repeats`` rounds of one ``command`` per worker, rotating the order every round."""
    samples = {w.name: {"ms": [], "cpu_ms": []} for w in workers}
    for r in range(warmup + repeats):
        shift = r % len(workers)
        for w in workers[shift:] + workers[:shift]:
            reply = w.request(command)
            if r >= warmup:
                samples[w.name]["ms"].append(reply["ms"])
                samples[w.name]["cpu_ms"].append(reply["cpu_ms"])
    return samples


def run_timed(args, patch: Sequence[int], arch: dict | None, log=print) -> dict:
    """Measure every model (one worker process each, steps interleaved); returns the report dictionary."""
    import torch

    models, skipped = _model_specs(args, patch, arch)
    for s in skipped:
        log(f"skipping {s['model']}: {s['reason']}")
    workers: list[_Worker] = []
    try:
        for name, spec in models:
            log(f"building {name} in its own process ...")
            workers.append(_Worker(name, spec))
        log(f"timing {args.warmup} warm-up + {args.repeats} training steps per model, interleaved ...")
        train = _interleaved(workers, "train", args.warmup, args.repeats)
        log(f"timing {args.warmup} warm-up + {args.repeats} inference passes per model, interleaved ...")
        infer = _interleaved(workers, "infer", args.warmup, args.repeats)
        fwd_bwd = None
        if args.fwd_bwd:
            log(f"timing {args.warmup} warm-up + {args.repeats} forward+backward passes per model, interleaved ...")
            fwd_bwd = _interleaved(workers, "fwd_bwd", args.warmup, args.repeats)
        peaks = {w.name: w.request("quit")["peak_mem_mb"] for w in workers}
    finally:
        for w in workers:
            w.close()
    results = []
    for w in workers:
        results.append({
            "model": w.name,
            "params": w.info["params"],
            "gflops": w.info["flops"] / 1e9,
            "train_step_ms": statistics.median(train[w.name]["ms"]),
            "infer_ms": statistics.median(infer[w.name]["ms"]),
            "peak_mem_mb": peaks[w.name],
            "base_mem_mb": w.info["base_mem_mb"],
            "train_step_cpu_ms": statistics.median(train[w.name]["cpu_ms"]),
            "train_step_ms_samples": train[w.name]["ms"],
            "infer_ms_samples": infer[w.name]["ms"],
        })
        if fwd_bwd:
            results[-1].update(fwd_bwd_ms=statistics.median(fwd_bwd[w.name]["ms"]),
                               fwd_bwd_cpu_ms=statistics.median(fwd_bwd[w.name]["cpu_ms"]),
                               fwd_bwd_ms_samples=fwd_bwd[w.name]["ms"])
    baseline = next((r for r in results if r["model"] == BASELINE_NAME), None)
    for r in results:
        r["ratio_train_step"] = r["train_step_ms"] / baseline["train_step_ms"] if baseline else None
        r["ratio_peak_mem"] = r["peak_mem_mb"] / baseline["peak_mem_mb"] if baseline else None
        if "fwd_bwd_ms" in r:
            r["ratio_fwd_bwd"] = r["fwd_bwd_ms"] / baseline["fwd_bwd_ms"] if baseline else None
    return {
        "baseline": BASELINE_NAME if baseline else None,
        "results": results,
        "skipped": skipped,
        "device": _device_name(args.device),
        "patch": list(patch),
        "batch": args.batch,
        "channels": args.channels,
        "classes": args.classes,
        "amp": "bf16" if args.amp else None,
        "threads": args.threads or torch.get_num_threads(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "plans": str(args.plans) if args.plans else None,
        "configuration": args.configuration if args.plans else None,
        "torch": torch.__version__,
    }


def run_sizes(args, patches: Sequence[Sequence[int]], log=print) -> dict:
    """Parameters and forward GFLOPs (batch 1) of every model at every patch, in this process (no timing)."""
    import torch

    results, skipped = [], []
    for patch in patches:
        arch = default_nnunet_architecture(patch) if "nnunet" in args.baseline_list and not args.plans else \
            getattr(args, "_plans_arch", None)
        models, skip = _model_specs(args, patch, arch)
        skipped += [dict(s, patch=list(patch)) for s in skip]
        for name, spec in models:
            log(f"counting {name} at {patch[0]}x{patch[1]} ...")
            torch.manual_seed(0)
            model = build_model(spec)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            flops = count_flops(model, spec["channels"], patch, "cpu")
            results.append({"model": name, "patch": list(patch), "params": params, "gflops": flops / 1e9})
            del model
    for r in results:
        base = next((b for b in results if b["model"] == BASELINE_NAME and b["patch"] == r["patch"]), None)
        r["ratio_params"] = r["params"] / base["params"] if base else None
        r["ratio_gflops"] = r["gflops"] / base["gflops"] if base else None
    return {"baseline": BASELINE_NAME if "nnunet" in args.baseline_list else None, "results": results,
            "skipped": skipped, "channels": args.channels, "classes": args.classes, "batch": 1,
            "torch": torch.__version__}


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------------------ formatting
def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_report(report: dict) -> str:
    """Markdown table of a timed report (what docs/benchmarks.md records)."""
    base = report["baseline"] or "-"
    mem = "peak mem MB" + (" (RSS)" if report["device"].startswith("cpu") else "")
    fwd_bwd = any("fwd_bwd_ms" in r for r in report["results"])
    cpu = report["device"].startswith("cpu")
    head = f"| model | params (M) | GFLOPs | train step (ms) | x {base} |"
    head += " train step CPU time (ms) |" if cpu else ""
    head += f" fwd+bwd (ms) | x {base} |" if fwd_bwd else ""
    lines = [head + f" inference (ms) | {mem} | x {base} |",
             "|---|---:|---:|---:|---:|" + ("---:|" if cpu else "") + ("---:|---:|" if fwd_bwd else "") +
             "---:|---:|---:|"]
    for r in report["results"]:
        row = (f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {r['train_step_ms']:.1f} | "
               f"{_fmt(r['ratio_train_step'], '.2f')} |")
        if cpu:  # process CPU time: what the step costs, whatever else the machine is running
            row += f" {r['train_step_cpu_ms']:.1f} |"
        if fwd_bwd:
            row += f" {_fmt(r.get('fwd_bwd_ms'), '.1f')} | {_fmt(r.get('ratio_fwd_bwd'), '.2f')} |"
        lines.append(row + f" {r['infer_ms']:.1f} | {r['peak_mem_mb']:.0f} | {_fmt(r['ratio_peak_mem'], '.2f')} |")
    return "\n".join(lines)


def format_sizes(report: dict) -> str:
    """Markdown table of a ``--skip-timing`` report."""
    lines = ["| model | patch | params (M) | GFLOPs | x params | x GFLOPs |", "|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['patch'][0]}x{r['patch'][1]} | {r['params'] / 1e6:.2f} | "
                     f"{r['gflops']:.2f} | {_fmt(r['ratio_params'], '.2f')} | {_fmt(r['ratio_gflops'], '.2f')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_fias benchmark",
        description="Parameters, FLOPs, training-step time, inference time and peak memory of FIAS next to "
                    "nnU-Net's own 2D U-Net (and MONAI's SwinUNETR-2D when installed), at the same input. Each "
                    "model runs in its own process; steps are interleaved so that ratios survive a busy machine.")
    src = parser.add_argument_group("input (default: --patch 128 128, batch 2, 1 channel, 9 classes)")
    src.add_argument("--plans", type=Path, help="nnU-Net plans file (nnUNetPlans.json): patch size, batch size "
                     "and the exact U-Net of its configuration; channels/classes from a dataset.json beside it")
    src.add_argument("-c", "--configuration", default="2d", help="configuration in --plans (default: 2d)")
    src.add_argument("--patch", nargs=2, type=int, action="append", metavar=("H", "W"),
                     help="patch size (without --plans); repeatable with --skip-timing")
    src.add_argument("--batch", type=int, help="batch size (default: the plans' batch size, else 2)")
    src.add_argument("--channels", type=int, help="input channels (default: dataset.json beside --plans, else 1)")
    src.add_argument("--classes", type=int, help="output classes incl. background (default: dataset.json beside "
                     "--plans, else 9 as Synapse)")
    run = parser.add_argument_group("models and measurement")
    run.add_argument("--preset", default="T", help="FIAS preset(s), comma-separated, e.g. T or T,S,B (default: T)")
    run.add_argument("--baselines", default="nnunet", help="comma-separated from nnunet,swinunetr, or none "
                     "(default: nnunet; swinunetr is skipped when MONAI is not installed)")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    run.add_argument("--amp", action="store_true", help="bf16 autocast for forward and loss (as on GPU training)")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: 2)")
    run.add_argument("--repeats", type=int, help="timed steps per model; medians are reported (default: 7 on CPU, "
                     "20 on GPU)")
    run.add_argument("--fwd-bwd", action="store_true", help="also time forward + loss + backward without the "
                     "optimizer step (fwd_bwd_ms)")
    run.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's default)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    run.add_argument("--skip-timing", action="store_true", help="only parameters and GFLOPs (batch 1), for every "
                     "--patch given, in this process")
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the report as JSON to this file")
    out.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise BenchmarkError(f"{name} must be >= 1, got {value}")


def _load_plans(args) -> tuple[list[int], dict]:
    """Patch size and U-Net architecture of ``args.configuration`` in ``args.plans``; fills batch/channels/classes
    defaults from the plans and a dataset.json next to them."""
    path = args.plans
    if not path.is_file():
        raise BenchmarkError(f"--plans {path}: no such file")
    try:
        plans = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"--plans {path}: not a readable JSON file ({e})") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise BenchmarkError(f"--plans {path}: not an nnU-Net plans file (no 'configurations')")
    if args.configuration not in plans["configurations"]:
        raise BenchmarkError(f"--plans {path}: no configuration {args.configuration!r}; it has "
                             f"{', '.join(sorted(plans['configurations']))}")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        cm = PlansManager(plans).get_configuration(args.configuration)
        patch = [int(p) for p in cm.patch_size]
        arch = {"network_class_name": cm.network_arch_class_name,
                "arch_kwargs": dict(cm.network_arch_init_kwargs),
                "_kw_requires_import": list(cm.network_arch_init_kwargs_req_import)}
        batch = int(cm.batch_size)
    except (KeyError, TypeError, ValueError) as e:
        raise BenchmarkError(f"--plans {path}: configuration {args.configuration!r} is incomplete ({e!r})") from None
    if len(patch) != 2:
        raise BenchmarkError(f"--plans {path}: configuration {args.configuration!r} has a {len(patch)}D patch "
                             f"{patch}; FIAS is 2D (use -c 2d)")
    dataset_json = path.parent / "dataset.json"
    if dataset_json.is_file() and (args.channels is None or args.classes is None):
        try:
            ds = json.loads(dataset_json.read_text())
            from nnunetv2.utilities.label_handling.label_handling import LabelManager

            channels = len(ds.get("channel_names", ds.get("modality", {})))
            classes = LabelManager(ds["labels"], ds.get("regions_class_order")).num_segmentation_heads
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise BenchmarkError(f"{dataset_json}: cannot read channels/labels ({e!r}); pass --channels and "
                                 "--classes") from None
        args.channels = args.channels or channels or None
        args.classes = args.classes or classes
    if args.batch is None:
        args.batch = batch
    return patch, arch


def _resolve(args) -> tuple[list[list[int]], dict | None]:
    """Validate the arguments, fill defaults; returns the patch list and the nnU-Net architecture (timed runs)."""
    import torch

    if args.plans and args.patch:
        raise BenchmarkError("give either --plans (with -c) or --patch, not both")
    if args.patch and len(args.patch) > 1 and not args.skip_timing:
        raise BenchmarkError("several --patch sizes are only supported with --skip-timing")
    for name in ("batch", "channels", "classes", "repeats", "threads"):
        _positive(f"--{name}", getattr(args, name))
    if args.warmup < 0:
        raise BenchmarkError(f"--warmup must be >= 0, got {args.warmup}")
    from nnunetv2_fias.architectures import FIAS_PRESETS

    args.presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    bad = [p for p in args.presets if p not in FIAS_PRESETS]
    if bad or not args.presets:
        raise BenchmarkError(f"--preset {args.preset!r}: presets are {', '.join(sorted(FIAS_PRESETS))}")
    names = [b.strip().lower() for b in args.baselines.split(",") if b.strip()]
    if names == ["none"]:
        names = []
    unknown = [b for b in names if b not in KNOWN_BASELINES]
    if unknown:
        raise BenchmarkError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(KNOWN_BASELINES)} "
                             "or none")
    args.baseline_list = list(dict.fromkeys(names))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: no CUDA device is available to torch")
    if args.repeats is None:
        args.repeats = 20 if args.device == "cuda" else 7
    if args.json and args.json.exists() and not args.force:
        raise BenchmarkError(f"--json {args.json} exists; pass --force to overwrite it")
    if args.json and not args.json.parent.is_dir():
        raise BenchmarkError(f"--json {args.json}: folder {args.json.parent} does not exist")
    arch = None
    if args.plans:
        patch, arch = _load_plans(args)
        args._plans_arch = arch
        patches = [patch]
    else:
        patches = [list(p) for p in (args.patch or [[128, 128]])]
    for patch in patches:
        if min(patch) < 1:
            raise BenchmarkError(f"--patch {patch[0]} {patch[1]}: sizes must be >= 1")
    args.batch = args.batch or 2
    args.channels = args.channels or 1
    args.classes = args.classes or 9
    if "nnunet" in args.baseline_list and not args.plans:
        for patch in patches:
            arch = default_nnunet_architecture(patch)  # raises for a patch nnU-Net would pad
    return patches, arch


def _write_json(path: Path, report: dict) -> None:
    # Written next to the target and renamed, so a failure never leaves a half-written file behind.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args._worker is not None:
        return worker_main(json.loads(args._worker))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 - progress goes to stderr
    try:
        patches, arch = _resolve(args)
        if args.skip_timing:
            report = run_sizes(args, patches, log)
            text = format_sizes(report)
        else:
            report = run_timed(args, patches[0], arch, log)
            text = format_report(report)
            text = (f"{report['device']}, patch {report['patch'][0]}x{report['patch'][1]}, batch {report['batch']}, "
                    f"{report['threads']} threads, amp {report['amp'] or 'off'}, torch {report['torch']}, median "
                    f"of {report['repeats']}\n\n{text}")
        if args.json:
            _write_json(args.json, report)
    except BenchmarkError as e:
        print(f"nnunetv2_fias benchmark: error: {e}", file=sys.stderr)
        return 2
    print(text)
    for s in report["skipped"]:
        print(f"skipped {s['model']}: {s['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
