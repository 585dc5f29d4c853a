"""The measuring worker: one model in its own process, so that its peak memory is its own.

The parent starts ``python -m nnunetv2_fias.benchmark --_worker SPEC`` and talks to it line by line: the worker
answers on stdout with lines starting with :data:`PROTOCOL_PREFIX` followed by JSON, the parent sends one command
per line on stdin. :class:`Worker` is the parent's handle.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

from nnunetv2_fias.benchmark.models import BenchmarkError, build_model, loss_weights, optimizer, output_sizes

PROTOCOL_PREFIX = "@@fias-benchmark "


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


def _training_loss(spec: dict, model, labels):
    """nnU-Net's Dice + CE loss, over every deep-supervision output with the model's trainer weights; and targets."""
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    sizes = output_sizes(model, spec)
    if sizes is None:
        return loss, labels
    patch = tuple(spec["patch"])
    target = [labels if s == patch else torch.nn.functional.interpolate(labels, size=s, mode="nearest")
              for s in sizes]
    return DeepSupervisionWrapper(loss, loss_weights(spec["kind"], len(sizes))), target


def _timed_steps(spec: dict, model, device) -> tuple[dict, object]:
    """``{"train", "fwd_bwd", "infer"}`` step functions on a fixed random batch, and that batch's input."""
    import torch

    from nnunetv2_fias.architectures.measure import set_deep_supervision

    batch, patch, classes = spec["batch"], tuple(spec["patch"]), spec["classes"]
    x = torch.randn(batch, spec["channels"], *patch, device=device)
    labels = torch.randint(0, classes, (batch, 1, *patch), device=device).float()
    loss, target = _training_loss(spec, model, labels)
    opt, clip = optimizer(model, spec["kind"])
    x_infer = x[:1].clone()
    autocast = _autocast(spec, device)

    def fwd_bwd_step():
        model.train()
        set_deep_supervision(model, True)
        opt.zero_grad(set_to_none=True)
        with autocast():
            value = loss(model(x), target)
        value.backward()

    def train_step():
        fwd_bwd_step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    def infer_step():
        model.eval()
        set_deep_supervision(model, False)
        with torch.inference_mode(), autocast():
            model(x_infer)

    return {"train": train_step, "fwd_bwd": fwd_bwd_step, "infer": infer_step}, x


def _autocast(spec: dict, device):
    """A factory of the context the model runs in: bf16 autocast with ``spec["amp"]``, else nothing."""
    import torch

    amp = bool(spec.get("amp"))
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _peak_mem_mb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else _peak_rss_mb()


def _controls(spec: dict, model, x, steps: dict, device) -> dict:
    """The untimed commands: ``peak`` (the peak memory so far) and ``parts``, which adds a ``part:NAME`` step per
    part of the model (:mod:`.parts`) and answers with the names. The parts are built only when asked for, so that
    what they hold and run never enters the peak of the main table."""
    def add_parts() -> dict:
        from nnunetv2_fias.benchmark.parts import part_steps

        parts = part_steps(spec["kind"], model, x, _autocast(spec, device))
        steps.update({f"part:{name}": run for name, run in parts.items()})
        return {"parts": list(parts)}

    return {"peak": lambda: {"peak_mem_mb": _peak_mem_mb(device)}, "parts": add_parts}


def _serve(steps: dict, controls: dict, device) -> None:
    """Answer timing and control commands from stdin until ``quit``."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command in controls:
            _send(controls[command]())
            continue
        if command not in steps:
            _send({"error": f"unknown command {command!r}"})
            continue
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        steps[command]()
        sync()
        _send({"ms": (time.perf_counter() - t0) * 1e3, "cpu_ms": (time.process_time() - c0) * 1e3})


def worker_main(spec: dict) -> int:
    """One model in its own process: report size and FLOPs, then run timed steps on request from stdin.

    Commands (one per line): ``train``, ``fwd_bwd``, ``infer`` and, after ``parts``, ``part:NAME`` (each answered
    with ``{"ms": wall, "cpu_ms": process CPU}``); ``peak`` and ``parts`` (see :func:`_controls`); ``quit``,
    answered with the peak memory and then the activation memory of one training forward pass (measured last, so
    that its float32 forward does not enter the peak of an ``--amp`` run).
    """
    import torch

    from nnunetv2_fias.architectures.measure import count_flops, saved_activation_mb

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    # Resident memory of torch and nnU-Net alone, before this process built anything.
    base_mem = _current_rss_mb() if device.type == "cpu" else 0.0
    torch.manual_seed(spec.get("seed", 0))
    model = build_model(spec).to(device)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = count_flops(model, spec["channels"], spec["patch"], device)
    steps, x = _timed_steps(spec, model, device)
    _send({"ready": True, "params": params, "flops": flops, "base_mem_mb": base_mem})
    _serve(steps, _controls(spec, model, x, steps, device), device)
    _send({"peak_mem_mb": _peak_mem_mb(device), "activation_mb": saved_activation_mb(model, x)})
    return 0


def rotating_rounds(workers: list, rounds: int):
    """``(round, worker)`` over ``rounds`` rounds of ``workers``, the order rotating every round, so that a busy
    machine slows every model alike."""
    for r in range(rounds):
        shift = r % len(workers)
        for w in workers[shift:] + workers[:shift]:
            yield r, w


class Worker:
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
