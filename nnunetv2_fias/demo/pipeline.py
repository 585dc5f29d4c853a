"""The demo's steps: output folder, subprocess environment, and the nnU-Net commands run one after another.

Every nnU-Net step is the console command a user would type, run as a subprocess whose output is streamed to the
console and saved under ``DIR/logs``. ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` point into DIR
for those subprocesses only; the user's own nnU-Net folders and environment are never touched.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nnunetv2_fias import _util
from nnunetv2_fias.demo.report import format_duration, write_overlay, write_report
from nnunetv2_fias.demo.settings import (BUDGETS, COMPARE_NOTE, DATASET_ID, DATASET_NAME, FOLD,
                                         MARKER, METHOD_NAMES, NNUNET_FOLDERS, SHIM_DIR, Budget, DemoError)


# ---------------------------------------------------------------------------------------------------------------
# Output folder and environment
# ---------------------------------------------------------------------------------------------------------------

def prepare_output(out: Path, overwrite: bool) -> None:
    """Create ``out`` or clear a previous demo run in it; never touch a folder the demo did not write."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"-o/--output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(f"-o/--output {out} is not empty and holds no {MARKER}, so it was not written by "
                            f"`nnunetv2_fias demo`; choose a new or empty folder (nothing was changed)")
        if not overwrite:
            raise DemoError(f"-o/--output {out} holds a previous demo run ({out / MARKER}); pass --overwrite to "
                            f"delete it and start again, or choose another folder with -o")
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is a :class:`DemoError`."""
    try:
        return _util.resolve_device(device)
    except ValueError as e:
        raise DemoError(str(e)) from None


def check_trainers(budget: Budget, compare: bool) -> None:
    """Fail before writing anything if the installed package lacks a trainer the budget needs."""
    from nnunetv2_fias import trainers

    names = [budget.fias_trainer] + ([budget.baseline_trainer] if compare else [])
    missing = [n for n in names if not hasattr(trainers, n)]
    if missing:
        raise DemoError(f"the installed nnunetv2_fias.trainers lacks {', '.join(missing)}; reinstall the package "
                        f"(pip install -e .) from this repository")


def build_env(out: Path, device: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the nnU-Net subprocesses: nnU-Net folders under ``out``, the FIAS trainers discoverable.

    ``nnUNet_extTrainer`` keeps any folders the user already has and appends the package's shim folder.
    ``nnUNet_compile`` is off: the demo's short trainings would spend more time compiling than they save.
    On CPU, nnU-Net's worker pools default to 8/12 processes, which costs minutes and GBs on a laptop; the demo
    uses 1 (and passive OpenMP waiting) unless the user has set ``nnUNet_def_n_proc`` / ``nnUNet_n_proc_DA`` /
    ``OMP_WAIT_POLICY`` themselves.
    """
    env = dict(os.environ if base is None else base)
    for name in NNUNET_FOLDERS:
        env[name] = str(out / name)
    existing = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(SHIM_DIR) not in existing:
        existing.append(str(SHIM_DIR))
    env["nnUNet_extTrainer"] = os.pathsep.join(existing)
    env["nnUNet_compile"] = "f"
    if device == "cpu":
        env.setdefault("nnUNet_def_n_proc", "1")
        env.setdefault("nnUNet_n_proc_DA", "1")
        # Idle OpenMP threads sleep instead of spinning, so the data-augmentation and export workers do not
        # steal the training process' cores.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"  # stream epoch lines as they happen
    env.setdefault("MPLBACKEND", "Agg")
    return env


def create_nnunet_folders(env: dict[str, str]) -> None:
    """Create the folders ``env`` names as nnU-Net's: the converter (like ``nnunetv2_fias doctor``) requires them."""
    for name in NNUNET_FOLDERS:
        Path(env[name]).mkdir(exist_ok=True)


def console_command(name: str) -> list[str]:
    """A console command of this environment (next to sys.executable), so the venv's nnU-Net is used."""
    command = _util.console_command(name)
    if command is None:
        raise DemoError(f"cannot find the console command {name} next to {sys.executable} or on PATH; is nnunetv2 "
                        f"installed in this environment?")
    return command


# ---------------------------------------------------------------------------------------------------------------
# Progress and running steps
# ---------------------------------------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of all finished subprocesses and their workers."""
    try:
        import resource
    except ImportError:  # Windows: this process only
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StepRunner:
    """Runs the steps, prints their names and times, streams subprocess output into the console and a log."""

    _PREFIX = b"    | "

    def __init__(self, out: Path, env: dict[str, str], n_steps: int):
        self.out, self.env, self.n_steps = out, env, n_steps
        self.logs = out / "logs"
        self.logs.mkdir(exist_ok=True)
        self.t0 = time.monotonic()
        self.k = 0
        self.times: list[tuple[str, float, float]] = []

    def header(self, title: str) -> tuple[float, float]:
        self.k += 1
        print(f"\n[{self.k}/{self.n_steps}] {title}   (elapsed {format_duration(time.monotonic() - self.t0)})",
              flush=True)
        return time.monotonic(), _cpu_seconds()

    def done(self, title: str, start: tuple[float, float]) -> None:
        dt, cpu = time.monotonic() - start[0], _cpu_seconds() - start[1]
        self.times.append((title, dt, cpu))
        print(f"    done in {format_duration(dt)} (CPU time {format_duration(cpu)})", flush=True)

    def _indent(self, chunk: bytes, at_line_start: bool) -> tuple[bytes, bool]:
        """Indent the tool's output under the step title; keep \\r so progress bars still redraw."""
        pieces = []
        for part in re.split(rb"([\r\n])", chunk):
            if part in (b"\r", b"\n"):
                pieces.append(part)
                at_line_start = True
            elif part:
                if at_line_start:
                    pieces.append(self._PREFIX)
                pieces.append(part)
                at_line_start = False
        return b"".join(pieces), at_line_start

    def run(self, title: str, cmd: list[str], log_name: str) -> None:
        start = self.header(title)
        print("    $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        log = self.logs / log_name
        out = getattr(sys.stdout, "buffer", None)
        with open(log, "wb") as f:
            f.write(("$ " + shlex.join(cmd) + "\n").encode())
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.out)
            at_line_start = True
            try:
                assert proc.stdout is not None
                fd = proc.stdout.fileno()
                while chunk := os.read(fd, 65536):
                    f.write(chunk)
                    data, at_line_start = self._indent(chunk, at_line_start)
                    if out is not None:
                        out.write(data)
                        out.flush()
                    else:
                        sys.stdout.write(data.decode(errors="replace"))
                        sys.stdout.flush()
                rc = proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if not at_line_start:
            print(flush=True)
        if rc != 0:
            raise DemoError(f"step '{title}' failed (exit status {rc}); its command and full output are in {log}")
        self.done(title, start)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def _write_marker(out: Path, marker: dict) -> None:
    _util.atomic_write_json(out / MARKER, marker, indent=1)


def _nnunet_steps(runner: StepRunner, raw: Path, trainers: dict[str, str], device: str, n_proc: int,
                  configuration: str) -> dict[str, Path]:
    """Convert, plan and preprocess, train, predict and evaluate; return ``{method name: predictions folder}``."""
    out = runner.out
    raw_dataset = out / "nnUNet_raw" / DATASET_NAME
    runner.run("convert-synapse (TransUNet protocol: 18 train / 12 test, 8 organs)",
               console_command("nnunetv2_fias") + ["convert-synapse", "-i", str(raw), "-d", str(DATASET_ID),
                                                   "--protocol", "transunet", "-np", str(n_proc)],
               "1_convert.log")
    runner.run(f"nnUNetv2_plan_and_preprocess ({configuration})",
               console_command("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", configuration,
                                                                  "-np", str(n_proc), "-npfp", str(n_proc),
                                                                  "--verify_dataset_integrity"],
               "2_plan_and_preprocess.log")
    for key, trainer in trainers.items():
        runner.run(f"nnUNetv2_train {METHOD_NAMES[key]} ({trainer}, fold {FOLD})",
                   console_command("nnUNetv2_train") + [str(DATASET_ID), configuration, FOLD, "-tr", trainer,
                                                        "-device", device],
                   f"3_train_{trainer}.log")
    predictions = {}
    for key, trainer in trainers.items():
        folder = out / "predictions" / trainer
        runner.run(f"nnUNetv2_predict the 12 test cases with {METHOD_NAMES[key]} ({trainer})",
                   console_command("nnUNetv2_predict") + ["-i", str(raw_dataset / "imagesTs"), "-o", str(folder),
                                                          "-d", str(DATASET_ID), "-c", configuration, "-f", FOLD,
                                                          "-tr", trainer, "-device", device,
                                                          "-npp", str(n_proc), "-nps", str(n_proc)],
                   f"4_predict_{trainer}.log")
        predictions[METHOD_NAMES[key]] = folder
    runner.run("nnunetv2_fias evaluate (Dice, HD95 per organ)",
               console_command("nnunetv2_fias") + ["evaluate", "-r", str(raw_dataset / "labelsTs"),
                                                   "-p", *map(str, predictions.values()),
                                                   "--names", *predictions.keys(),
                                                   "-j", str(raw_dataset / "dataset.json"),
                                                   "-o", str(out / "evaluation"), "-np", str(n_proc)],
               "5_evaluate.log")
    return predictions


def run_demo(args: argparse.Namespace, out: Path, device: str) -> int:
    """Run every step into the prepared folder ``out``; the marker file records the run's status."""
    budget = BUDGETS[args.budget]
    n_proc = args.num_processes or (1 if device == "cpu" else min(4, _util.available_cpus()))
    env = build_env(out, device)
    trainers = {"fias": budget.fias_trainer}
    if args.compare:
        trainers["baseline"] = budget.baseline_trainer
    marker = {"tool": "nnunetv2_fias demo", "argv": args.argv, "device": device, "budget": args.budget,
              "configuration": args.configuration,
              "started": _now(), "status": "running"}
    _write_marker(out, marker)

    runner = StepRunner(out, env, n_steps=5 + 2 * len(trainers))
    print(f"nnunetv2_fias demo: writing everything to {out}")
    print(f"  device {device}; budget '{args.budget}': {budget.description}")
    print(f"  nnU-Net configuration {args.configuration}, fold {FOLD} only (not a 5-fold cross-validation); "
          f"nnUNet_raw/preprocessed/results under {out}")
    try:
        from nnunetv2_fias.phantoms import write_synapse_phantoms

        create_nnunet_folders(env)
        start = runner.header(f"generate phantoms ({'x'.join(map(str, budget.size))}, seed {args.seed})")
        raw = write_synapse_phantoms(out / "phantoms", seed=args.seed, size=budget.size)
        print(f"    wrote 30 labelled + 20 unlabelled cases to {raw}", flush=True)
        runner.done("generate phantoms", start)

        predictions = _nnunet_steps(runner, raw, trainers, device, n_proc, args.configuration)

        start = runner.header("report")
        overlay = write_overlay(out / "nnUNet_raw" / DATASET_NAME, predictions, out / "overlay.png")
        runner.done("report", start)
        total = time.monotonic() - runner.t0
        report = write_report(out, args, device, budget, trainers, runner.times, overlay, total)
    except BaseException as e:
        marker.update(status="failed", error=str(e) or type(e).__name__, finished=_now())
        _write_marker(out, marker)
        raise

    marker.update(status="done", finished=_now(), wall_time_s=round(total, 1))
    _write_marker(out, marker)
    print("\n" + "=" * 100)
    print((out / "evaluation" / "summary.md").read_text().strip())
    print("=" * 100)
    print(f"Demo finished in {format_duration(total)} on {device}.")
    print(f"  report:   {report}")
    print(f"  plots:    {out / 'evaluation'}/dice.png, hd95_mm.png, hd95_voxel.png")
    print(f"  overlay:  {out / 'overlay.png'}  (test case {overlay[0]}, slice {overlay[1]})")
    print(f"  fold {FOLD} only; the phantoms are synthetic, so these numbers say nothing about real CT.")
    if args.compare:
        print("  " + COMPARE_NOTE)
    return 0
