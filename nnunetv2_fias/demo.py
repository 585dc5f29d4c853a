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

Every nnU-Net step is the console command a user would type, run as a subprocess whose output is streamed (and
saved under ``DIR/logs``). ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` point into DIR for those
subprocesses only; the user's own nnU-Net folders and environment are never touched.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID:03d}_Synapse"
MARKER = "demo_run.json"  # identifies a folder written by this command (see _prepare_output)
FOLD = "0"
CONFIGURATION = "2d"
SHIM_DIR = Path(__file__).resolve().parent / "nnunet_ext"


@dataclass(frozen=True)
class Budget:
    """What a ``--budget`` choice runs: phantom grid and the trainer classes (their names carry the budget)."""

    size: tuple[int, int, int]
    fias_trainer: str
    baseline_trainer: str
    description: str


BUDGETS: dict[str, Budget] = {
    "demo": Budget((96, 96, 16), "FIASTrainer_demoBudget", "nnUNetTrainer_demoBudget",
                   "96x96x16 phantoms; FIAS-T for a few hundred iterations of batch 4 without mirroring "
                   "(about 5 minutes on 2 idle CPU cores)"),
    "smoke": Budget((48, 48, 8), "FIASTrainer_smokeBudget", "nnUNetTrainer_smokeBudget",
                    "48x48x8 phantoms; 1 epoch of 2 iterations: checks that every step runs, learns nothing "
                    "(used by the test suite)"),
}
METHOD_NAMES = {"fias": "FIAS-T", "baseline": "nnU-Net (nnUNetTrainer)"}


class DemoError(Exception):
    """A user-facing failure: printed as one message, exit status 1."""


# ---------------------------------------------------------------------------------------------------------------
# Output folder and environment
# ---------------------------------------------------------------------------------------------------------------

def _prepare_output(out: Path, overwrite: bool) -> None:
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
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                        "use --device cpu or auto")
    return device


def _check_trainers(budget: Budget, compare: bool) -> None:
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
    for name, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                      ("nnUNet_results", "nnUNet_results")):
        env[name] = str(out / sub)
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


def _command(name: str) -> list[str]:
    """A console command of this environment (next to sys.executable), so the venv's nnU-Net is used."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return [str(path)]
    if name == "nnunetv2_fias":
        return [sys.executable, "-m", "nnunetv2_fias.cli"]
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"cannot find the console command {name} next to {sys.executable} or on PATH; is nnunetv2 "
                        f"installed in this environment?")
    return [found]


# ---------------------------------------------------------------------------------------------------------------
# Progress and running steps
# ---------------------------------------------------------------------------------------------------------------

def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}" if m else f"{seconds:.1f} s"


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of all finished subprocesses and their workers."""
    try:
        import resource
    except ImportError:  # Windows: this process only
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class _Runner:
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
        print(f"\n[{self.k}/{self.n_steps}] {title}   (elapsed {_fmt(time.monotonic() - self.t0)})", flush=True)
        return time.monotonic(), _cpu_seconds()

    def done(self, title: str, start: tuple[float, float]) -> None:
        dt, cpu = time.monotonic() - start[0], _cpu_seconds() - start[1]
        self.times.append((title, dt, cpu))
        print(f"    done in {_fmt(dt)} (CPU time {_fmt(cpu)})", flush=True)

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
                while True:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    f.write(chunk)
                    # Indent the tool's output under the step title; keep \r so progress bars still redraw.
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
                    data = b"".join(pieces)
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
            raise DemoError(f"step '{title}' failed (exit status {rc}); its full output is in {log}\n"
                            f"    command: {shlex.join(cmd)}")
        self.done(title, start)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def _pick_slice(reference: Path, file_ending: str) -> tuple[str, int]:
    """Test case and slice showing the most organs (ties: most organ pixels)."""
    import numpy as np
    import SimpleITK as sitk

    best = None
    for f in sorted(reference.glob("*" + file_ending)):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        for z in range(lab.shape[0]):
            s = lab[z]
            key = (len(np.unique(s)), int((s > 0).sum()))
            if best is None or key > best[0]:
                best = (key, f.name[: -len(file_ending)], z)
    if best is None:
        raise DemoError(f"no reference label files (*{file_ending}) in {reference}")
    return best[1], best[2]


def write_overlay(raw_dataset: Path, predictions: dict[str, Path], png: Path) -> tuple[str, int]:
    """PNG of one test slice: CT (abdomen window), reference and each method's prediction as colour overlays.

    Returns:
        The case name and slice index shown.
    """
    import numpy as np
    import SimpleITK as sitk
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    dataset = json.loads((raw_dataset / "dataset.json").read_text())
    ending = dataset["file_ending"]
    names = {int(v): k for k, v in dataset["labels"].items() if int(v) > 0}
    case, z = _pick_slice(raw_dataset / "labelsTs", ending)
    def read_slice(path: Path):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[z]

    image = read_slice(raw_dataset / "imagesTs" / f"{case}_0000{ending}")
    panels = [("reference", read_slice(raw_dataset / "labelsTs" / f"{case}{ending}"))]
    panels += [(method, read_slice(folder / f"{case}{ending}")) for method, folder in predictions.items()]

    n_labels = max(names) if names else 1
    # tab10 without its grey (invisible on CT), then tab20's lighter shades for datasets with more labels.
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    palette += [c for i, c in enumerate(colormaps["tab20"].colors) if i % 2 == 1 and i != 15]
    colours = np.array([palette[i % len(palette)] for i in range(n_labels)])
    cmap = ListedColormap(colours)
    window = np.clip((image.astype(np.float32) + 125) / 400, 0, 1)  # TransUNet's [-125, 275] HU window

    fig = Figure(figsize=(3.2 * (len(panels) + 1), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    axes[0].imshow(window, cmap="gray", interpolation="nearest")
    axes[0].set_title(f"{case}, slice {z}\nCT [-125, 275] HU", fontsize=9)
    for ax, (title, seg) in zip(axes[1:], panels):
        ax.imshow(window, cmap="gray", interpolation="nearest")
        masked = np.ma.masked_where(seg == 0, seg - 1)
        ax.imshow(masked, cmap=cmap, vmin=0, vmax=n_labels - 1, alpha=0.55, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    handles = [Patch(color=colours[v - 1], label=name) for v, name in sorted(names.items())]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.97))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return case, z


COMPARE_NOTE = ("Both trainers ran at the same small budget. nnUNetTrainer's recipe (SGD, lr 0.01, poly decay) is "
                "made for 1000 epochs x 250 iterations and has barely started here, while FIASTrainer's AdamW with "
                "warm-up converges quickly: the comparison shows the pipeline at work, not which network is better.")


def _training_budget(fold_dir: Path) -> str:
    """Epochs, iterations and batch size as nnU-Net recorded them in the fold's debug.json."""
    try:
        d = json.loads((fold_dir / "debug.json").read_text())
        mirroring = "off" if d.get("inference_allowed_mirroring_axes") == "None" else "on"
        return (f"{d['num_epochs']} epochs x {d['num_iterations_per_epoch']} iterations, batch size "
                f"{d['batch_size']}, test-time mirroring {mirroring}")
    except (OSError, ValueError, KeyError):
        return "budget not readable from debug.json"


def _write_report(out: Path, args: argparse.Namespace, device: str, budget: Budget, trainers: dict[str, str],
                  runner: _Runner, overlay: tuple[str, int], total: float) -> Path:
    eval_dir = out / "evaluation"
    table = (eval_dir / "summary.md").read_text().strip()
    summary = json.loads((eval_dir / "summary.json").read_text())
    means = {m: v["mean_over_labels"]["dice"] for m, v in summary["methods"].items()}
    results = out / "nnUNet_results" / DATASET_NAME
    fold_dirs = {key: results / f"{trainer}__nnUNetPlans__{CONFIGURATION}" / f"fold_{FOLD}"
                 for key, trainer in trainers.items()}
    lines = [
        "# nnunetv2_fias demo report", "",
        f"- Command: `{shlex.join(['nnunetv2_fias', 'demo', *args.argv])}`",
        f"- Finished: {_dt.datetime.now().isoformat(timespec='seconds')}; total wall time {_fmt(total)} on "
        f"device `{device}`",
        f"- Budget `{args.budget}`: {budget.description}",
        f"- Data: synthetic phantoms (seed {args.seed}) in the Synapse layout, converted with the TransUNet protocol "
        f"(18 training cases, 12 test cases, 8 organs). **These are phantoms: the numbers say nothing about "
        f"performance on real CT.**",
        f"- Training: nnU-Net configuration `{CONFIGURATION}`, fold {FOLD} only (nnU-Net's 5-fold split of the 18 "
        f"training cases: 14 train / 4 validation); not a 5-fold cross-validation.",
    ]
    lines += [f"- {METHOD_NAMES[key]}: `{trainers[key]}`, {_training_budget(d)}" for key, d in fold_dirs.items()]
    lines += ["- Test: the 12 held-out cases, predicted with `nnUNetv2_predict` from `checkpoint_final.pth`.", ""]
    if "baseline" in trainers:
        lines += [COMPARE_NOTE, ""]
    lines += [
        "## Test-set results", "",
        "Mean Dice over the 8 organs: " + ", ".join(f"{m} **{100 * d:.2f} %**" if d is not None else f"{m} n/a"
                                                    for m, d in means.items()), "",
        table, "",
        "## Files", "",
        f"- Table and metrics: `{eval_dir / 'summary.md'}`, `{eval_dir / 'summary.json'}`, "
        f"`{eval_dir / 'metrics.csv'}`",
        f"- Plots: `{eval_dir / 'dice.png'}`, `{eval_dir / 'hd95_mm.png'}`, `{eval_dir / 'hd95_voxel.png'}`",
        f"- Overlay of test case {overlay[0]}, slice {overlay[1]} (CT, reference, predictions): "
        f"`{out / 'overlay.png'}`",
    ]
    for key, fold_dir in fold_dirs.items():
        extra = f", CAF balance `{fold_dir / 'caf_balance.png'}`" if key == "fias" else ""
        lines.append(f"- {METHOD_NAMES[key]}: training curves `{fold_dir / 'progress.png'}`{extra}, "
                     f"predictions `{out / 'predictions' / trainers[key]}`")
    cpu_total = sum(c for _, _, c in runner.times)
    lines += [f"- Logs of every step: `{out / 'logs'}`", "", "## Steps", "",
              f"CPU time counts every process of a step (user + system), so on an otherwise idle machine a step "
              f"takes at least its CPU time divided by the cores it can use ({os.cpu_count()} here).", "",
              "| step | wall time | CPU time |", "|---|---:|---:|"]
    lines += [f"| {title} | {_fmt(dt)} | {_fmt(cpu)} |" for title, dt, cpu in runner.times]
    lines += [f"| total | {_fmt(total)} | {_fmt(cpu_total)} |", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_fias demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Generate synthetic abdominal CT phantoms in the Synapse layout, convert them (TransUNet protocol), plan "
            "and preprocess with nnU-Net, train FIAS (fold 0 only), predict the 12 test cases and evaluate them; "
            "writes report.md and an overlay PNG. Everything stays inside -o DIR; your own nnU-Net folders and "
            "variables are not used.", 100),
        epilog="budgets:\n" + "\n".join(textwrap.fill(b.description, 100, initial_indent=f"  {k:<7}",
                                                       subsequent_indent=" " * 9) for k, b in BUDGETS.items())
               + "\n\nA run cannot be resumed: rerun with --overwrite to start again in the same folder.",
    )
    parser.add_argument("-o", "--output", default="demo_output", metavar="DIR",
                        help="folder for everything the demo writes (default: ./demo_output); must be new, empty, "
                             "or a previous demo run together with --overwrite")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): cuda when torch sees a GPU, else cpu")
    parser.add_argument("--compare", action="store_true",
                        help="also train nnU-Net's own nnUNetTrainer at the same budget and compare both")
    parser.add_argument("--budget", choices=tuple(BUDGETS), default="demo",
                        help="demo (default): the real demo; smoke: tiny phantoms and 2 iterations, to check the "
                             "pipeline quickly (the test suite uses it)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous demo run in DIR first")
    parser.add_argument("-np", "--num-processes", type=int, default=None, metavar="N",
                        help="processes for conversion, preprocessing and evaluation (default: 1 on cpu, "
                             "min(4, #CPUs) on cuda)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nnunetv2_fias demo``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    args.argv = argv
    out = Path(args.output).resolve()
    try:
        if args.seed < 0:
            raise DemoError(f"--seed must be >= 0, got {args.seed}")
        if args.num_processes is not None and args.num_processes < 1:
            raise DemoError(f"-np/--num-processes must be >= 1, got {args.num_processes}")
        device = resolve_device(args.device)
        _check_trainers(BUDGETS[args.budget], args.compare)
        _prepare_output(out, args.overwrite)
        return _run(args, out, device)
    except DemoError as e:
        print(f"\nnunetv2_fias demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nnunetv2_fias demo: interrupted; partial results are in {out} (rerun with --overwrite)",
              file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, out: Path, device: str) -> int:
    budget = BUDGETS[args.budget]
    n_proc = args.num_processes or (1 if device == "cpu" else min(4, os.cpu_count() or 1))
    env = build_env(out, device)
    trainers = {"fias": budget.fias_trainer}
    if args.compare:
        trainers["baseline"] = budget.baseline_trainer
    marker = {"tool": "nnunetv2_fias demo", "argv": args.argv, "device": device, "budget": args.budget,
              "started": _dt.datetime.now().isoformat(timespec="seconds"), "status": "running"}
    (out / MARKER).write_text(json.dumps(marker, indent=1))

    n_steps = 5 + 2 * len(trainers)
    runner = _Runner(out, env, n_steps)
    print(f"nnunetv2_fias demo: writing everything to {out}")
    print(f"  device {device}; budget '{args.budget}': {budget.description}")
    print(f"  nnU-Net configuration {CONFIGURATION}, fold {FOLD} only (not a 5-fold cross-validation); "
          f"nnUNet_raw/preprocessed/results under {out}")
    raw_dataset = out / "nnUNet_raw" / DATASET_NAME
    try:
        from nnunetv2_fias.phantoms import write_synapse_phantoms

        start = runner.header(f"generate phantoms ({'x'.join(map(str, budget.size))}, seed {args.seed})")
        raw = write_synapse_phantoms(out / "phantoms", seed=args.seed, size=budget.size)
        print(f"    wrote 30 labelled + 20 unlabelled cases to {raw}", flush=True)
        runner.done("generate phantoms", start)

        runner.run("convert-synapse (TransUNet protocol: 18 train / 12 test, 8 organs)",
                   _command("nnunetv2_fias") + ["convert-synapse", "-i", str(raw), "-d", str(DATASET_ID),
                                                "--protocol", "transunet", "-np", str(n_proc)],
                   "1_convert.log")
        runner.run("nnUNetv2_plan_and_preprocess (2d)",
                   _command("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", CONFIGURATION,
                                                               "-np", str(n_proc), "-npfp", str(n_proc),
                                                               "--verify_dataset_integrity"],
                   "2_plan_and_preprocess.log")
        for key, trainer in trainers.items():
            runner.run(f"nnUNetv2_train {METHOD_NAMES[key]} ({trainer}, fold {FOLD})",
                       _command("nnUNetv2_train") + [str(DATASET_ID), CONFIGURATION, FOLD, "-tr", trainer,
                                                     "-device", device],
                       f"3_train_{trainer}.log")
        predictions = {}
        for key, trainer in trainers.items():
            folder = out / "predictions" / trainer
            runner.run(f"nnUNetv2_predict the 12 test cases with {METHOD_NAMES[key]} ({trainer})",
                       _command("nnUNetv2_predict") + ["-i", str(raw_dataset / "imagesTs"), "-o", str(folder),
                                                       "-d", str(DATASET_ID), "-c", CONFIGURATION, "-f", FOLD,
                                                       "-tr", trainer, "-device", device,
                                                       "-npp", str(n_proc), "-nps", str(n_proc)],
                       f"4_predict_{trainer}.log")
            predictions[METHOD_NAMES[key]] = folder

        runner.run("nnunetv2_fias evaluate (Dice, HD95 per organ)",
                   _command("nnunetv2_fias") + ["evaluate", "-r", str(raw_dataset / "labelsTs"),
                                                "-p", *map(str, predictions.values()),
                                                "--names", *predictions.keys(),
                                                "-j", str(raw_dataset / "dataset.json"),
                                                "-o", str(out / "evaluation"), "-np", str(n_proc)],
                   "5_evaluate.log")

        start = runner.header("report")
        overlay = write_overlay(raw_dataset, predictions, out / "overlay.png")
        runner.done("report", start)
        total = time.monotonic() - runner.t0
        report = _write_report(out, args, device, budget, trainers, runner, overlay, total)
    except BaseException as e:
        marker.update(status="failed", error=str(e) or type(e).__name__,
                      finished=_dt.datetime.now().isoformat(timespec="seconds"))
        (out / MARKER).write_text(json.dumps(marker, indent=1))
        raise

    marker.update(status="done", finished=_dt.datetime.now().isoformat(timespec="seconds"),
                  wall_time_s=round(total, 1))
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    print("\n" + "=" * 100)
    print((out / "evaluation" / "summary.md").read_text().strip())
    print("=" * 100)
    print(f"Demo finished in {_fmt(total)} on {device}.")
    print(f"  report:   {report}")
    print(f"  plots:    {out / 'evaluation'}/dice.png, hd95_mm.png, hd95_voxel.png")
    print(f"  overlay:  {out / 'overlay.png'}  (test case {overlay[0]}, slice {overlay[1]})")
    print(f"  fold {FOLD} only; the phantoms are synthetic, so these numbers say nothing about real CT.")
    if args.compare:
        print("  " + COMPARE_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
