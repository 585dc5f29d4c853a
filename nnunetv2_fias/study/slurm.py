"""``--executor slurm``: job scripts for a SLURM cluster, submitted only with ``--submit``.

- ``plan.sbatch`` (only when plans or preprocessed data are missing) runs the planning commands;
- ``train.sbatch`` is a job array, one task per training job not yet done; its body runs
  ``nnunetv2_fias study task STUDY_DIR --index $SLURM_ARRAY_TASK_ID``, i.e. exactly the job of that index (the
  indices ``study run --dry-run`` prints), with the same resume logic as a local run;
- ``finish.sbatch`` runs after the array (``afterany``: a failed fold does not hold back the other trainers) and does
  the selection, test inference, scoring and report (``study finish``);
- ``submit.sh`` chains them with ``sbatch --parsable`` and ``--dependency``.
"""
from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunetv2_fias import _util
from nnunetv2_fias.study import commands
from nnunetv2_fias.study.grid import StudyError
from nnunetv2_fias.study.run import Context


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    account: str | None = None
    array_limit: int | None = None  # at most this many array tasks at once (%N)
    extra: tuple[str, ...] = ()  # further sbatch options, passed through as written


def _header(name: str, log: Path, opts: SlurmOptions, gpus: int, nodes: int = 1) -> list[str]:
    """``gpus`` per node (0: none); ``nodes`` > 1 with one task per node (srun starts one torchrun on each)."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --output={log}"]
    for option, value in (("partition", opts.partition), ("time", opts.time), ("mem", opts.mem),
                          ("cpus-per-task", opts.cpus_per_task), ("account", opts.account)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    if nodes > 1:
        lines += [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    lines += [f"#SBATCH {x}" for x in opts.extra]
    return lines


def _body(ctx: Context, planning: bool = False) -> list[str]:
    env = commands.subprocess_env(ctx.env, ctx.options.device, planning=planning)
    lines = ["set -euo pipefail", *commands.env_exports(env)]
    if planning:
        lines.append("unset nnUNet_n_proc_DA  # nnU-Net 2.8.1's planner crashes on nnUNet_n_proc_DA=0")
    return lines


def _study(ctx: Context, *args: str) -> str:
    o = ctx.options
    extra = ["--gpus-per-job", str(o.gpus_per_job), "--nodes-per-job", str(o.nodes_per_job)] if args[0] == "task" \
        else []
    return shlex.join(["nnunetv2_fias", "study", *args, str(ctx.paths.study), "--device", o.device,
                       "-np", str(o.num_processes), *extra])


def write_scripts(ctx: Context, plan_steps: Sequence[tuple[str, list[str]]], indices: Sequence[int],
                  opts: SlurmOptions) -> Path:
    """Write the scripts into ``STUDY_DIR/slurm`` and return ``submit.sh``."""
    folder = ctx.paths.study / "slurm"
    logs = ctx.paths.study / "logs" / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    name = f"study_{ctx.grid.dataset}"
    scripts = {}
    gpu = ctx.options.device != "cpu"
    if plan_steps:
        scripts["plan.sbatch"] = _header(f"{name}_plan", logs / "plan_%j.out", opts, gpus=0) + \
            _body(ctx, planning=True) + [commands.show(c) for _, c in plan_steps]
    if indices:
        limit = f"%{opts.array_limit}" if opts.array_limit else ""
        nodes = ctx.options.nodes_per_job
        rdzv = ['export STUDY_RDZV_ENDPOINT="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):29500"'] \
            if nodes > 1 else []
        scripts["train.sbatch"] = _header(f"{name}_train", logs / "train_%A_%a.out", opts,
                                          gpus=ctx.options.gpus_per_job * gpu, nodes=nodes) + \
            [f"#SBATCH --array={','.join(map(str, indices))}{limit}"] + _body(ctx) + rdzv + \
            ["exec " + _study(ctx, "task") + ' --index "$SLURM_ARRAY_TASK_ID"']
    scripts["finish.sbatch"] = _header(f"{name}_finish", logs / "finish_%j.out", opts, gpus=int(gpu)) + \
        _body(ctx) + ["exec " + _study(ctx, "finish")]
    folder.mkdir(parents=True, exist_ok=True)
    for file, lines in scripts.items():
        _util.atomic_write_text(folder / file, "\n".join(lines) + "\n")
    _util.atomic_write_text(folder / "submit.sh", _submit_script(folder, scripts))
    return folder / "submit.sh"


def _submit_script(folder: Path, scripts: dict) -> str:
    q = lambda f: shlex.quote(str(folder / f))  # noqa: E731
    lines = ["#!/bin/bash", "# Submits the study's jobs with dependencies; prints the job ids.", "set -euo pipefail",
             "dep=()"]
    if "plan.sbatch" in scripts:
        lines += [f"plan=$(sbatch --parsable {q('plan.sbatch')})", 'echo "planning: job $plan"',
                  'dep=(--dependency=afterok:"$plan")']
    if "train.sbatch" in scripts:
        lines += [f'train=$(sbatch --parsable ${{dep[@]+"${{dep[@]}}"}} {q("train.sbatch")})', 'echo "training: array job $train"',
                  'dep=(--dependency=afterany:"$train")']
    lines += [f'finish=$(sbatch --parsable ${{dep[@]+"${{dep[@]}}"}} {q("finish.sbatch")})',
              'echo "selection, inference, scoring and report: job $finish"']
    return "\n".join(lines) + "\n"


def submit(script: Path) -> None:
    import shutil

    if shutil.which("sbatch") is None:
        raise StudyError(f"--submit: there is no sbatch command here (no SLURM); the scripts are written, submit "
                         f"them on the cluster with `bash {script}`")
    code = subprocess.call(["bash", str(script)])
    if code != 0:
        raise StudyError(f"{script} failed (exit status {code}) while submitting")
