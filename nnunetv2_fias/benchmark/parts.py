"""``benchmark --breakdown``: where a network's forward + backward goes, each part timed on its own.

FIAS: the DilateFormer (global) branch, the DMK (local) branch, the CAF fusions with the decoder and heads (run on
the branches' outputs, computed once and detached), the whole network, and the whole network without recomputing
its checkpointed stages (what the activation-memory target costs). nnU-Net's U-Net: its encoder, its decoder (on the
encoder's detached skips) and the whole. Every part runs in training mode with deep supervision and is
backpropagated from the sum of its outputs' mean squares, so the parts of one network add up to about its whole
and compare across networks; neither nnU-Net's loss nor the optimizer is included.
"""
from __future__ import annotations

import contextlib
import statistics
from typing import Callable, Sequence

from nnunetv2_fias.benchmark.models import BASELINE_NAME
from nnunetv2_fias.benchmark.worker import rotating_rounds

WHOLE = "whole"
FIAS_PARTS = ("global branch", "local branch", "fusion + decoder", WHOLE, "whole, no recomputation")
UNET_PARTS = ("encoder", "decoder", WHOLE)


def _backward(outputs) -> None:
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    sum(o.float().square().mean() for o in outputs).backward()


@contextlib.contextmanager
def _no_recomputation(model):
    """FIAS with no checkpointed stage inside the context; the checkpointed stages are restored afterwards."""
    branches = (model.encoder.global_branch, model.encoder.local_branch)
    saved = [b.checkpoint_stages for b in branches]
    try:
        for b in branches:
            b.checkpoint_stages = frozenset()
        yield
    finally:
        for b, stages in zip(branches, saved):
            b.checkpoint_stages = stages


def part_steps(kind: str, model, x, autocast: Callable = contextlib.nullcontext) -> dict[str, Callable[[], None]]:
    """One forward + backward function per part of ``model`` (a FIAS, nnU-Net's ``PlainConvUNet``, or any other
    network as a whole), on the batch ``x``."""
    import torch

    from nnunetv2_fias.architectures.measure import set_deep_supervision

    def detached(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.detach().requires_grad_() for t in tensors]

    def step(forward: Callable, inputs: Sequence[torch.Tensor] = ()) -> Callable[[], None]:
        def run() -> None:
            model.train()
            set_deep_supervision(model, True)
            model.zero_grad(set_to_none=True)
            for t in inputs:
                t.grad = None
            with autocast():
                outputs = forward()
            _backward(outputs)
        return run

    model.train()  # the decoder parts' inputs come from the encoder as training computes them
    set_deep_supervision(model, True)
    if kind == "fias":
        enc = model.encoder
        with torch.no_grad(), autocast():
            g, loc = detached(enc.global_branch(x, enc.stem_skips)), detached(enc.local_branch(x))

        def whole_without_recomputation():
            with _no_recomputation(model):
                return model(x)

        return {"global branch": step(lambda: enc.global_branch(x, enc.stem_skips)),
                "local branch": step(lambda: enc.local_branch(x)),
                "fusion + decoder": step(lambda: model.decoder(enc.fuse(g, loc)), g + loc),
                WHOLE: step(lambda: model(x)),
                "whole, no recomputation": step(whole_without_recomputation)}
    if kind == "nnunet":
        with torch.no_grad(), autocast():
            skips = detached(model.encoder(x))
        return {"encoder": step(lambda: model.encoder(x)),
                "decoder": step(lambda: model.decoder(skips), skips),
                WHOLE: step(lambda: model(x))}
    return {WHOLE: step(lambda: model(x))}


def run_parts(workers: Sequence, warmup: int, repeats: int) -> list[dict]:
    """Have every worker build its model's parts, then time them (``warmup + repeats`` rounds, the workers' order
    rotating each round, a model's parts one after another); one row per part with the median and its ratio to the
    U-Net as a whole."""
    workers = list(workers)
    parts = {w.name: w.request("parts")["parts"] for w in workers}
    samples = {(w.name, part): [] for w in workers for part in parts[w.name]}
    for r, w in rotating_rounds(workers, warmup + repeats):
        for part in parts[w.name]:
            reply = w.request(f"part:{part}")
            if r >= warmup:
                samples[(w.name, part)].append(reply["ms"])
    rows = [{"model": model, "part": part, "ms": statistics.median(ms), "ms_samples": ms}
            for (model, part), ms in samples.items()]
    base = next((r["ms"] for r in rows if r["model"] == BASELINE_NAME and r["part"] == WHOLE), None)
    for r in rows:
        r["ratio"] = r["ms"] / base if base else None
    return rows


def format_breakdown(rows: list[dict], baseline: str | None) -> str:
    """Markdown table of :func:`run_parts`' rows."""
    ratio = f"x {baseline} whole" if baseline else "x baseline"
    lines = [f"| model | part (forward + backward) | ms | {ratio} |", "|---|---|---:|---:|"]
    for r in rows:
        cell = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['part']} | {r['ms']:.1f} | {cell} |")
    return "\n".join(lines)
