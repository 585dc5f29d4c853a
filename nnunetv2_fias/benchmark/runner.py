"""Running the benchmark: timed runs in interleaved worker processes, size counts in this process, and the tables.

Both take the resolved configuration (``cli.BenchmarkConfig``) and return the report dictionary that ``--json``
writes; :func:`format_report` and :func:`format_sizes` turn it into the markdown tables of docs/benchmarks.md.
"""
from __future__ import annotations

import os
import statistics
from typing import Sequence

from nnunetv2_fias.benchmark.models import BASELINE_NAME, build_model, model_specs
from nnunetv2_fias.benchmark.parts import format_breakdown, run_parts
from nnunetv2_fias.benchmark.worker import Worker, rotating_rounds


def interleaved(workers: Sequence[Worker], command: str, warmup: int, repeats: int) -> dict[str, dict[str, list]]:
    """Run ``warmup + repeats`` rounds of one ``command`` per worker, rotating the order every round."""
    workers = list(workers)
    samples = {w.name: {"ms": [], "cpu_ms": []} for w in workers}
    for r, w in rotating_rounds(workers, warmup + repeats):
        reply = w.request(command)
        if r >= warmup:
            samples[w.name]["ms"].append(reply["ms"])
            samples[w.name]["cpu_ms"].append(reply["cpu_ms"])
    return samples


def _ratio(value: float, base: dict | None, key: str) -> float | None:
    return value / base[key] if base else None


def _measure_workers(config, models: list[tuple[str, dict]], log) -> tuple:
    """Start one worker per model and run the interleaved timings; returns the workers, the train, infer and
    fwd+bwd samples, the ``--breakdown`` rows and each worker's final reply (peak and activation memory)."""
    workers: list[Worker] = []
    try:
        for name, spec in models:
            log(f"building {name} in its own process ...")
            workers.append(Worker(name, spec))
        log(f"timing {config.warmup} warm-up + {config.repeats} training steps per model, interleaved ...")
        train = interleaved(workers, "train", config.warmup, config.repeats)
        log(f"timing {config.warmup} warm-up + {config.repeats} inference passes per model, interleaved ...")
        infer = interleaved(workers, "infer", config.warmup, config.repeats)
        fwd_bwd = None
        if config.fwd_bwd:
            log(f"timing {config.warmup} warm-up + {config.repeats} forward+backward passes per model, "
                "interleaved ...")
            fwd_bwd = interleaved(workers, "fwd_bwd", config.warmup, config.repeats)
        breakdown = peaks = None
        if config.breakdown:  # the main table's peak memory is the one before the parts ran
            peaks = {w.name: w.request("peak")["peak_mem_mb"] for w in workers}
            log(f"timing {config.warmup} warm-up + {config.repeats} forward+backward passes of each part per model, "
                "interleaved ...")
            breakdown = run_parts(workers, config.warmup, config.repeats)
        log("measuring the activation memory of one training forward pass per model ...")
        final = {w.name: w.request("quit") for w in workers}
        for name, peak in (peaks or {}).items():
            final[name]["peak_mem_mb"] = peak
    finally:
        for w in workers:
            w.close()
    return workers, train, infer, fwd_bwd, breakdown, final


def run_timed(config, log=print) -> dict:
    """Measure every model at the configuration's (single) patch, one worker process each, steps interleaved."""
    import torch

    patch = config.patches[0]
    models, skipped = model_specs(config, patch, config.architecture(patch))
    for s in skipped:
        log(f"skipping {s['model']}: {s['reason']}")
    workers, train, infer, fwd_bwd, breakdown, final = _measure_workers(config, models, log)
    results = []
    for w in workers:
        results.append({
            "model": w.name,
            "params": w.info["params"],
            "gflops": w.info["flops"] / 1e9,
            "train_step_ms": statistics.median(train[w.name]["ms"]),
            "infer_ms": statistics.median(infer[w.name]["ms"]),
            "peak_mem_mb": final[w.name]["peak_mem_mb"],
            "activation_mb": final[w.name]["activation_mb"],
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
        r["ratio_train_step"] = _ratio(r["train_step_ms"], baseline, "train_step_ms")
        r["ratio_peak_mem"] = _ratio(r["peak_mem_mb"], baseline, "peak_mem_mb")
        r["ratio_activation"] = _ratio(r["activation_mb"], baseline, "activation_mb")
        if "fwd_bwd_ms" in r:
            r["ratio_fwd_bwd"] = _ratio(r["fwd_bwd_ms"], baseline, "fwd_bwd_ms")
    return {
        "baseline": BASELINE_NAME if baseline else None,
        "results": results,
        "breakdown": breakdown,
        "skipped": skipped,
        "device": device_name(config.device),
        "patch": list(patch),
        "batch": config.batch,
        "channels": config.channels,
        "classes": config.classes,
        "amp": "bf16" if config.amp else None,
        "threads": config.threads or torch.get_num_threads(),
        "warmup": config.warmup,
        "repeats": config.repeats,
        "plans": str(config.plans) if config.plans else None,
        "configuration": config.configuration if config.plans else None,
        "torch": torch.__version__,
    }


def run_sizes(config, log=print) -> dict:
    """Parameters, forward GFLOPs (batch 1) and activation memory (the configuration's batch) of every model at every
    patch, in this process on the configuration's device (no timing)."""
    import torch

    from nnunetv2_fias.architectures.measure import count_flops, saved_activation_mb

    results, skipped = [], []
    for patch in config.patches:
        models, skip = model_specs(config, patch, config.architecture(patch))
        skipped += [dict(s, patch=list(patch)) for s in skip]
        for name, spec in models:
            log(f"counting {name} at {'x'.join(map(str, patch))} ...")
            torch.manual_seed(config.seed)
            model = build_model(spec).to(config.device)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            flops = count_flops(model, spec["channels"], patch, config.device)
            x = torch.randn(config.batch, config.channels, *patch, device=config.device)
            results.append({"model": name, "patch": list(patch), "params": params, "gflops": flops / 1e9,
                            "activation_mb": saved_activation_mb(model, x)})
            del model, x
    for r in results:
        base = next((b for b in results if b["model"] == BASELINE_NAME and b["patch"] == r["patch"]), None)
        r["ratio_params"] = _ratio(r["params"], base, "params")
        r["ratio_gflops"] = _ratio(r["gflops"], base, "gflops")
        r["ratio_activation"] = _ratio(r["activation_mb"], base, "activation_mb")
    return {"baseline": BASELINE_NAME if "nnunet" in config.baselines else None, "results": results,
            "skipped": skipped, "channels": config.channels, "classes": config.classes, "batch": 1,
            "activation_batch": config.batch, "device": device_name(config.device), "torch": torch.__version__}


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------------------ formatting
def _cell(value, spec: str, none: str = "-") -> str:
    """``value`` formatted with ``spec``, or ``none`` when there is no value (no baseline to divide by)."""
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
    lines = [head + f" inference (ms) | {mem} | x {base} | act MB | x {base} |",
             "|---|---:|---:|---:|---:|" + ("---:|" if cpu else "") + ("---:|---:|" if fwd_bwd else "") +
             "---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        row = (f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {r['train_step_ms']:.1f} | "
               f"{_cell(r['ratio_train_step'], '.2f')} |")
        if cpu:  # process CPU time: what the step costs, whatever else the machine is running
            row += f" {r['train_step_cpu_ms']:.1f} |"
        if fwd_bwd:
            row += f" {_cell(r.get('fwd_bwd_ms'), '.1f')} | {_cell(r.get('ratio_fwd_bwd'), '.2f')} |"
        lines.append(row + f" {r['infer_ms']:.1f} | {r['peak_mem_mb']:.0f} | {_cell(r['ratio_peak_mem'], '.2f')} | "
                           f"{r['activation_mb']:.1f} | {_cell(r['ratio_activation'], '.2f')} |")
    if report.get("breakdown"):
        lines += ["", format_breakdown(report["breakdown"], report["baseline"])]
    return "\n".join(lines)


def format_sizes(report: dict) -> str:
    """Markdown table of a ``--skip-timing`` report."""
    lines = [f"| model | patch | params (M) | GFLOPs | x params | x GFLOPs | act MB (batch {report['activation_batch']}) "
             "| x act MB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['patch']))} | {r['params'] / 1e6:.2f} | "
                     f"{r['gflops']:.2f} | {_cell(r['ratio_params'], '.2f')} | {_cell(r['ratio_gflops'], '.2f')} | "
                     f"{r['activation_mb']:.1f} | {_cell(r['ratio_activation'], '.2f')} |")
    return "\n".join(lines)
