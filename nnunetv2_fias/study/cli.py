"""``nnunetv2_fias study run|status|report|task|finish``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nnunetv2_fias import _util
from nnunetv2_fias.study import checks, commands, execute, finish, report, run, slurm, status
from nnunetv2_fias.study.grid import DEFAULT_FOLDS, Grid, Model, StudyError, write_study


def _grid_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the grid (recorded in STUDY_DIR/study.json; leave out to continue the recorded one)")
    g.add_argument("-d", dest="dataset", help="dataset id or name, e.g. 111 or Dataset111_Synapse")
    g.add_argument("-c", dest="configurations", nargs="+", help="configurations, e.g. 2d 3d_fullres")
    g.add_argument("-tr", dest="trainers", nargs="+", metavar="TRAINER[:PLANS]",
                   help="trainers, each with its plans (default nnUNetPlans), e.g. FIASTrainer nnUNetTrainer "
                        "nnUNetTrainer:nnUNetResEncUNetMPlans; the first is the reference unless --ref")
    g.add_argument("-f", dest="folds", nargs="+", type=int, help="folds (default 0 1 2 3 4)")


def _run_options(p: argparse.ArgumentParser, device_default: str = "auto") -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=device_default,
                   help="device for training and prediction (auto: cuda when torch sees a GPU; slurm: cuda)")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="processes for nnU-Net's planning, ensembling, prediction export and the scoring "
                        "(default: nnUNet_def_n_proc, else 8, at most the CPUs)")
    p.add_argument("--gpus-per-job", type=int, default=1, metavar="N",
                   help="GPUs per training job (per node); above 1 each fold trains as one torchrun job of "
                        "nnunetv2_fias.train (default 1: plain nnUNetv2_train)")
    p.add_argument("--nodes-per-job", type=int, default=1, metavar="M",
                   help="SLURM only: nodes per training job (srun torchrun across them; default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_fias study", description=(
        "The five-fold comparison of trainers as one resumable command: plan, train every fold, select the best "
        "configuration or ensemble per trainer, predict and score the test set, and report paired statistics."))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or continue) a study")
    p.add_argument("study_dir", type=Path, metavar="STUDY_DIR")
    _grid_arguments(p)
    _run_options(p)
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: here, one job after another (or one per GPU with --gpus); slurm: write sbatch "
                        "scripts (a job array for training), submitted only with --submit")
    p.add_argument("--gpus", help="comma-separated GPU ids; local: one training per GPU at a time")
    p.add_argument("--ref", help="reference trainer for the paired statistics (default: the first -tr)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs, their commands and what is done; run "
                                                          "nothing")
    s = p.add_argument_group("slurm (with --executor slurm)")
    s.add_argument("--partition")
    s.add_argument("--time", help="time limit per job, e.g. 48:00:00")
    s.add_argument("--mem", help="memory per job, e.g. 64G")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--account")
    s.add_argument("--array-limit", type=int, help="at most this many training tasks at once")
    s.add_argument("--sbatch-option", action="append", default=[], help="another sbatch option, e.g. --qos=high "
                                                                        "(repeatable)")
    s.add_argument("--submit", action="store_true", help="submit the scripts with sbatch")
    for name, text in (("status", "done/running/failed/to-do of every job"),
                       ("report", "(re)write report.md and comparison.json from what is done"),
                       ("finish", "selection, test inference, scoring and report (the SLURM array's last job)"),
                       ("task", "run one training job by its index (the SLURM array task body)")):
        q = sub.add_parser(name, help=text)
        q.add_argument("study_dir", type=Path, metavar="STUDY_DIR")
        if name != "status":
            _run_options(q, "cpu" if name == "report" else "auto")
        if name in ("report", "finish"):
            q.add_argument("--ref", help="reference trainer (default: the first)")
        if name == "task":
            q.add_argument("--index", type=int, required=True)
    return parser


def _grid(args) -> Grid | None:
    given = [args.dataset, args.configurations, args.trainers]
    if not any(given) and args.folds is None:
        return None
    if not all(given):
        raise StudyError("-d, -c and -tr go together (or leave all out to continue the study recorded in "
                         "STUDY_DIR)")
    return Grid(args.dataset, tuple(args.configurations), tuple(Model.parse(t) for t in args.trainers),
                tuple(args.folds) if args.folds is not None else DEFAULT_FOLDS)


def _options(args, executor: str = "local") -> commands.Options:
    n = args.num_processes if getattr(args, "num_processes", None) else _util.default_num_processes()
    device = getattr(args, "device", "cpu")
    if executor == "slurm":
        device = "cuda" if device == "auto" else device
    else:
        try:
            device = _util.resolve_device(device)
        except ValueError as e:
            raise StudyError(str(e)) from None
    gpus, nodes = getattr(args, "gpus_per_job", 1), getattr(args, "nodes_per_job", 1)
    if gpus < 1 or nodes < 1 or n < 1:
        raise StudyError("-np, --gpus-per-job and --nodes-per-job must be at least 1")
    if (gpus > 1 or nodes > 1) and device == "cpu":
        raise StudyError("--gpus-per-job/--nodes-per-job spread a fold over GPUs; they cannot go with --device cpu")
    if nodes > 1 and executor != "slurm" and "SLURM_JOB_ID" not in os.environ:
        raise StudyError("--nodes-per-job: a fold across nodes needs a SLURM allocation (--executor slurm)")
    return commands.Options(device=device, num_processes=n, gpus_per_job=gpus, nodes_per_job=nodes)


def _print_plan(ctx: run.Context, steps) -> None:
    grid, jobs = ctx.grid, ctx.grid.train_jobs()
    print(f"study {ctx.paths.study}: {grid.dataset}, configurations {' '.join(grid.configurations)}, folds "
          f"{' '.join(map(str, grid.folds))}, {len(grid.models)} models, {len(jobs)} training jobs")
    print("planning:" if steps else "planning: done (plans and preprocessed data exist)")
    for _, command in steps:
        print(f"  {commands.show(command)}")
    print("training (index = SLURM array index):")
    for job in jobs:
        state = ctx.state(job)
        text = "done" if state is run.FoldState.DONE else f"{state.value}: {commands.show(ctx.train_command(job))}"
        print(f"  [{job.index}] {job.label}: {text}")
    print("after training, per model:")
    for model in grid.models:
        print(f"  {model.name}: {commands.show(commands.find_best_command(grid, model, ctx.options))}")
        images = finish.test_images(ctx)
        if images is None:
            print(f"    no test images in {ctx.paths.raw / 'imagesTs'}: no test inference")
        elif finish.selection_current(ctx, model):
            work = ctx.paths.predictions(model).with_name(f".{model.name}.partial")
            for command in commands.inference_commands(grid, finish.load_selection(ctx, model), images, work,
                                                       ctx.options):
                print(f"    {commands.show(command)}")
        else:
            print("    then the inference find_best prescribes (nnUNetv2_predict on imagesTs, nnUNetv2_ensemble when "
                  "an ensemble wins, nnUNetv2_apply_postprocessing)")
    print(f"then: scoring (labelsTs and cross-validation), {ctx.paths.study / 'report.md'} and comparison.json")


def _slurm_options(args) -> slurm.SlurmOptions:
    return slurm.SlurmOptions(partition=args.partition, time=args.time, mem=args.mem,
                              cpus_per_task=args.cpus_per_task, account=args.account, array_limit=args.array_limit,
                              extra=tuple(args.sbatch_option))


def cmd_run(args) -> int:
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    if gpus and args.executor == "local":
        checks.check_gpus(gpus, args.device)
        args.device = "cuda"
    options = _options(args, args.executor)
    ctx = run.make_context(args.study_dir, _grid(args), options)
    checks.check_trainers(ctx.grid, ctx.env)
    report.reference_model(ctx, args.ref)
    steps = checks.planning_steps(ctx.grid, ctx.paths, options)
    if args.dry_run:
        _print_plan(ctx, steps)
        return 0
    write_study(ctx.paths.study, ctx.grid)
    with execute.Lock(ctx.paths.study / ".study.lock", f"a study in {ctx.paths.study}"), \
            execute.sigterm_as_interrupt():
        if args.executor == "slurm":
            todo = [j.index for j in ctx.grid.train_jobs() if ctx.state(j) is not run.FoldState.DONE]
            script = slurm.write_scripts(ctx, steps, todo, _slurm_options(args))
            print(f"wrote {script.parent}/*.sbatch; submit with: bash {script}")
            if args.submit:
                slurm.submit(script)
            return 0
        run.run_planning(ctx, steps)
        failed = run.run_training(ctx, run.gpu_slots(gpus, options.gpus_per_job))
        return _finish(ctx, args.ref, [f"training {j.label} failed ({ctx.paths.log(j.key)})" for j in failed])


def _finish(ctx: run.Context, ref: str | None, problems: list[str]) -> int:
    problems = problems + finish.finish(ctx)
    path = report.write_report(ctx, ref)
    print(f"report: {path} (and {ctx.paths.study / 'comparison.json'})")
    for line in problems:
        print(f"not done: {line}")
    return 1 if problems else 0


def cmd_finish(args) -> int:
    ctx = run.make_context(args.study_dir, None, _options(args))
    with execute.Lock(ctx.paths.study / ".study.lock", f"a study in {ctx.paths.study}"), \
            execute.sigterm_as_interrupt():
        return _finish(ctx, args.ref, [])


def cmd_task(args) -> int:
    ctx = run.make_context(args.study_dir, None, _options(args))
    jobs = ctx.grid.train_jobs()
    if not 0 <= args.index < len(jobs):
        raise StudyError(f"--index {args.index}: the study has training jobs 0-{len(jobs) - 1}")
    with execute.sigterm_as_interrupt():
        return 0 if run.run_train_job(ctx, jobs[args.index], len(jobs)) else 1


def cmd_status(args) -> int:
    ctx = run.make_context(args.study_dir, None, commands.Options(device="cpu"))
    print(status.format_rows(status.job_rows(ctx)))
    return 0


def cmd_report(args) -> int:
    ctx = run.make_context(args.study_dir, None, _options(args))
    print(report.write_report(ctx, args.ref))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "finish": cmd_finish, "task": cmd_task, "status": cmd_status,
               "report": cmd_report}[args.command]
    try:
        return handler(args)
    except StudyError as e:
        print(f"nnunetv2_fias study: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nnunetv2_fias study: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
