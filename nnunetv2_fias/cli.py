"""The `nnunetv2_fias` console command.

Each subcommand lives in its own module exposing ``main(argv: list[str] | None) -> int``; the dispatcher imports
only the module that is asked for, so ``nnunetv2_fias env`` stays fast and a broken optional dependency of one
subcommand cannot break the others.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "convert-synapse": ("nnunetv2_fias.dataset_conversion.synapse", "Convert Synapse (BTCV) into nnU-Net's raw format."),
    "convert-acdc": ("nnunetv2_fias.dataset_conversion.acdc", "Convert ACDC into nnU-Net's raw format."),
    "evaluate": ("nnunetv2_fias.evaluation", "Per-class DSC and HD95 tables, plots and trainer comparisons."),
    "demo": ("nnunetv2_fias.demo", "Generate phantoms, train FIAS through nnU-Net, predict and evaluate."),
    "benchmark": ("nnunetv2_fias.benchmark", "Parameters, FLOPs, step time and memory of FIAS vs baselines."),
    "env": ("nnunetv2_fias.doctor", "Print the `export nnUNet_extTrainer=...` line that lets nnU-Net find FIAS."),
    "doctor": ("nnunetv2_fias.doctor", "Check the installation, nnU-Net variables, trainer discovery and device."),
}


def _usage() -> str:
    lines = ["usage: nnunetv2_fias <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "Run `nnunetv2_fias <command> -h` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"nnunetv2_fias: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    # env and doctor share a module; each exposes a main named after the command.
    entry = getattr(module, f"main_{name.replace('-', '_')}", None) or module.main
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
