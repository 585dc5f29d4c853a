"""Command line of ``nnunetv2_fias benchmark``: arguments, their resolution into a :class:`BenchmarkConfig`, main.

Resolution reads everything a run needs (the plans file and the dataset.json beside it, the device, defaults)
and validates it before any model is built, so a user error is one message and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_fias._util import atomic_write_json, resolve_device
from nnunetv2_fias.benchmark.models import KNOWN_BASELINES, BenchmarkError, default_nnunet_architecture
from nnunetv2_fias.benchmark.predict import add_arguments as add_predict_arguments

DEFAULT_PATCH = (128, 128)
DEFAULT_BATCH, DEFAULT_CHANNELS, DEFAULT_CLASSES = 2, 1, 9


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything a benchmark run needs, validated and with defaults filled in."""

    presets: tuple[str, ...]
    baselines: tuple[str, ...]
    patches: tuple[tuple[int, ...], ...]
    batch: int
    channels: int
    classes: int
    device: str
    amp: bool
    warmup: int
    repeats: int
    fwd_bwd: bool
    threads: int | None
    seed: int
    skip_timing: bool
    json: Path | None
    plans: Path | None = None
    configuration: str = "2d"
    plans_arch: dict | None = None
    breakdown: bool = False

    def architecture(self, patch) -> dict:
        """nnU-Net's U-Net for ``patch``: the plans' one, else what nnU-Net's 2D planner derives for the patch
        (for a patch it would pad, the padded patch's one: then FIAS alone is measured and only needs its plans)."""
        if self.plans_arch is not None:
            return self.plans_arch
        return default_nnunet_architecture(patch, strict="nnunet" in self.baselines)


@dataclass(frozen=True)
class PlansInput:
    """What a plans file (and the dataset.json beside it) gives a run."""

    patch: tuple[int, ...]
    arch: dict
    batch: int
    channels: int | None = None
    classes: int | None = None


class _PatchAction(argparse.Action):
    """``--patch H W`` or ``--patch D H W``, repeatable; another count is a usage error (exit 2)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) not in (2, 3):
            parser.error(f"{option_string} takes 2 (H W) or 3 (D H W) sizes, got {len(values)}: "
                         f"{' '.join(map(str, values))}")
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + [list(values)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_fias benchmark",
        description="Parameters, FLOPs, activation memory, training-step time, inference time and peak memory of "
                    "FIAS next to nnU-Net's own U-Net (and MONAI's SwinUNETR-2D when installed), at the same "
                    "2D or 3D input. Each model runs in its own process; steps are interleaved so that ratios survive a busy "
                    "machine.")
    src = parser.add_argument_group("input (default: --patch 128 128, batch 2, 1 channel, 9 classes)")
    src.add_argument("--plans", type=Path, help="nnU-Net plans file (nnUNetPlans.json): patch size, batch size "
                     "and the exact U-Net of its configuration; channels/classes from a dataset.json beside it")
    src.add_argument("-c", "--configuration", default="2d", help="configuration in --plans (default: 2d)")
    src.add_argument("--patch", nargs="+", type=int, action=_PatchAction, metavar="SIZE",
                     help="patch size, H W (FIAS) or D H W (FIAS-3D), without --plans; repeatable with "
                          "--skip-timing")
    src.add_argument("--batch", type=int, help="batch size (default: the plans' batch size, else 2)")
    src.add_argument("--channels", type=int, help="input channels (default: dataset.json beside --plans, else 1)")
    src.add_argument("--classes", type=int, help="output classes incl. background (default: dataset.json beside "
                     "--plans, else 9 as Synapse)")
    run = parser.add_argument_group("models and measurement")
    run.add_argument("--preset", default="T", help="FIAS preset(s) or FIAS trainer class(es), comma-separated, e.g. "
                     "T or T,S,B or FIASTrainer,FIASTrainer_planSized; FIAS is built as that trainer builds it "
                     "(default: T, i.e. FIASTrainer)")
    run.add_argument("--baselines", default="nnunet", help="comma-separated from nnunet,swinunetr, or none "
                     "(default: nnunet; swinunetr is skipped when MONAI is not installed)")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    run.add_argument("--amp", action="store_true", help="bf16 autocast for forward and loss (as on GPU training)")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: 2)")
    run.add_argument("--repeats", type=int, help="timed steps per model; medians are reported (default: 7 on CPU, "
                     "20 on GPU)")
    run.add_argument("--fwd-bwd", action="store_true", help="also time forward + loss + backward without the "
                     "optimizer step (fwd_bwd_ms)")
    run.add_argument("--breakdown", action="store_true", help="also time forward + backward of each part of the "
                     "networks: FIAS's global branch, local branch, fusion + decoder, whole, and whole without "
                     "recomputing its checkpointed stages; the U-Net's encoder, decoder and whole")
    run.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's default)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    run.add_argument("--skip-timing", action="store_true", help="only parameters, GFLOPs (batch 1) and activation "
                     "memory (--batch), for every --patch given, in this process")
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, help="write the report as JSON to this file")
    out.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    add_predict_arguments(parser)
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser


# ------------------------------------------------------------------------------------------------ resolution
def _check_positive(args) -> None:
    for name in ("batch", "channels", "classes", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BenchmarkError(f"--{name} must be >= 1, got {value}")
    if args.warmup < 0:
        raise BenchmarkError(f"--warmup must be >= 0, got {args.warmup}")


def _presets(text: str) -> tuple[str, ...]:
    from nnunetv2_fias.architectures import FIAS_PRESETS
    from nnunetv2_fias.trainers import TRAINERS, FIASTrainer

    fias_trainers = sorted(cls.__name__ for cls in TRAINERS if issubclass(cls, FIASTrainer))
    presets = tuple(p.strip() for p in text.split(",") if p.strip())
    if not presets or any(p not in FIAS_PRESETS and p not in fias_trainers for p in presets):
        raise BenchmarkError(f"--preset {text!r}: presets are {', '.join(sorted(FIAS_PRESETS))}; FIAS trainers are "
                             f"{', '.join(fias_trainers)}")
    return presets


def _baselines(text: str) -> tuple[str, ...]:
    names = [b.strip().lower() for b in text.split(",") if b.strip()]
    if names == ["none"]:
        return ()
    unknown = [b for b in names if b not in KNOWN_BASELINES]
    if unknown:
        raise BenchmarkError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(KNOWN_BASELINES)} "
                             "or none")
    return tuple(dict.fromkeys(names))


def _device(requested: str | None) -> str:
    try:
        return resolve_device(requested)
    except ValueError as e:
        raise BenchmarkError(str(e)) from None


def _check_json_target(path: Path | None, force: bool) -> None:
    if path is None:
        return
    if path.exists() and not force:
        raise BenchmarkError(f"--json {path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise BenchmarkError(f"--json {path}: folder {path.parent} does not exist")


def _read_plans_file(path: Path, configuration: str):
    """The ``ConfigurationManager`` of ``configuration`` in the plans file ``path``."""
    if not path.is_file():
        raise BenchmarkError(f"--plans {path}: no such file")
    try:
        plans = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchmarkError(f"--plans {path}: not a readable JSON file ({e})") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise BenchmarkError(f"--plans {path}: not an nnU-Net plans file (no 'configurations')")
    if configuration not in plans["configurations"]:
        raise BenchmarkError(f"--plans {path}: no configuration {configuration!r}; it has "
                             f"{', '.join(sorted(plans['configurations']))}")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(plans).get_configuration(configuration)


def _dataset_channels_classes(dataset_json: Path) -> tuple[int | None, int]:
    """Input channels and segmentation heads of a dataset.json (nnU-Net's LabelManager counts the heads)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    try:
        ds = json.loads(dataset_json.read_text())
        channels = len(ds.get("channel_names", ds.get("modality", {})))
        classes = LabelManager(ds["labels"], ds.get("regions_class_order")).num_segmentation_heads
    except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        raise BenchmarkError(f"{dataset_json}: cannot read channels/labels ({e!r}); pass --channels and "
                             "--classes") from None
    return channels or None, classes


def load_plans(path: Path, configuration: str, need_dataset: bool = True) -> PlansInput:
    """Patch, U-Net architecture and batch of ``configuration`` in the plans file ``path``; with ``need_dataset``,
    channels and classes from a dataset.json beside it (when there is one)."""
    cm = _read_plans_file(path, configuration)
    try:
        patch = tuple(int(p) for p in cm.patch_size)
        arch = {"network_class_name": cm.network_arch_class_name,
                "arch_kwargs": dict(cm.network_arch_init_kwargs),
                "_kw_requires_import": list(cm.network_arch_init_kwargs_req_import)}
        batch = int(cm.batch_size)
    except (KeyError, TypeError, ValueError) as e:
        raise BenchmarkError(f"--plans {path}: configuration {configuration!r} is incomplete ({e!r})") from None
    if len(patch) not in (2, 3):
        raise BenchmarkError(f"--plans {path}: configuration {configuration!r} has a {len(patch)}D patch "
                             f"{list(patch)}; FIAS takes 2D or 3D patches")
    strides = arch["arch_kwargs"].get("strides") or []
    if any(isinstance(st, (list, tuple)) and len(st) != len(patch) for st in strides):
        raise BenchmarkError(f"--plans {path}: configuration {configuration!r} has a {len(patch)}D patch "
                             f"{list(patch)} but its U-Net's strides {strides} are not {len(patch)}D")
    dataset_json = path.parent / "dataset.json"
    channels = classes = None
    if need_dataset and dataset_json.is_file():
        channels, classes = _dataset_channels_classes(dataset_json)
    return PlansInput(patch, arch, batch, channels, classes)


def _patches(args) -> tuple[tuple[int, ...], ...]:
    if args.patch and len(args.patch) > 1 and not args.skip_timing:
        raise BenchmarkError("several --patch sizes are only supported with --skip-timing")
    patches = tuple(tuple(p) for p in (args.patch or [DEFAULT_PATCH]))
    for patch in patches:
        if min(patch) < 1:
            raise BenchmarkError(f"--patch {' '.join(map(str, patch))}: sizes must be >= 1")
    return patches


def resolve(args: argparse.Namespace) -> BenchmarkConfig:
    """Validate the parsed arguments and fill in defaults (from ``--plans`` where given); ``args`` is not changed."""
    if args.plans and args.patch:
        raise BenchmarkError("give either --plans (with -c) or --patch, not both")
    if args.breakdown and args.skip_timing:
        raise BenchmarkError("--breakdown times the parts of the networks; it cannot be combined with --skip-timing")
    _check_positive(args)
    presets, baselines = _presets(args.preset), _baselines(args.baselines)
    device = _device(args.device)
    _check_json_target(args.json, args.force)
    plans = None
    if args.plans:
        plans = load_plans(args.plans, args.configuration, need_dataset=args.channels is None or args.classes is None)
        patches = (plans.patch,)
    else:
        patches = _patches(args)
    config = BenchmarkConfig(
        presets=presets, baselines=baselines, patches=patches,
        batch=args.batch or (plans.batch if plans else DEFAULT_BATCH),
        channels=args.channels or (plans and plans.channels) or DEFAULT_CHANNELS,
        classes=args.classes or (plans and plans.classes) or DEFAULT_CLASSES,
        device=device, amp=args.amp, warmup=args.warmup,
        repeats=args.repeats or (20 if device.startswith("cuda") else 7),
        fwd_bwd=args.fwd_bwd, threads=args.threads, seed=args.seed, skip_timing=args.skip_timing, json=args.json,
        plans=args.plans, configuration=args.configuration, plans_arch=plans.arch if plans else None,
        breakdown=args.breakdown)
    for patch in patches:
        config.architecture(patch)  # raises for a patch nnU-Net's U-Net would pad
    return config


# ------------------------------------------------------------------------------------------------------- main
def _run(config: BenchmarkConfig, log) -> tuple[dict, str]:
    from nnunetv2_fias.benchmark.runner import format_report, format_sizes, run_sizes, run_timed

    if config.skip_timing:
        report = run_sizes(config, log)
        return report, format_sizes(report)
    report = run_timed(config, log)
    header = (f"{report['device']}, patch {'x'.join(map(str, report['patch']))}, batch {report['batch']}, "
              f"{report['threads']} threads, amp {report['amp'] or 'off'}, torch {report['torch']}, median of "
              f"{report['repeats']}")
    return report, f"{header}\n\n{format_report(report)}"


def _run_predict(args, log) -> tuple[dict, str]:
    from nnunetv2_fias.benchmark.predict import format_predict, run_predict

    _check_positive(args)
    if args.cases < 1:
        raise BenchmarkError(f"--cases must be >= 1, got {args.cases}")
    _check_json_target(args.json, args.force)
    report = run_predict(args, _device(args.device), args.threads, args.repeats or 3, log)
    return report, format_predict(report)


def main(argv: list[str] | None = None) -> int:
    """``nnunetv2_fias benchmark``: 0 on success, 1 for a user error or a failed worker (argparse exits 2)."""
    args = build_parser().parse_args(argv)
    if args._worker is not None:
        from nnunetv2_fias.benchmark.worker import worker_main

        return worker_main(json.loads(args._worker))
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 - progress goes to stderr
    try:
        if args.predict:
            report, text = _run_predict(args, log)
            json_path = args.json
        else:
            config = resolve(args)
            report, text = _run(config, log)
            json_path = config.json
        if json_path:
            atomic_write_json(json_path, report)
    except BenchmarkError as e:
        print(f"nnunetv2_fias benchmark: error: {e}", file=sys.stderr)
        return 1
    print(text)
    for s in report["skipped"]:
        print(f"skipped {s['model']}: {s['reason']}")
    return 0
