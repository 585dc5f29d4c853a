"""``study run``: plan what is missing, train every fold that is not done, then select, predict, score, report.

Re-running continues where a previous run stopped: what is done is read from nnU-Net's own files, so a crash, a
SIGKILL or a reboot costs at most the unfinished part of the jobs that were running.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nnunetv2_fias.study import checks, commands, execute
from nnunetv2_fias.study.grid import Grid, StudyError, TrainJob, check_study_dir
from nnunetv2_fias.study.layout import (FoldState, Paths, fold_state, needs_npz, resolve_dataset,
                                        set_aside_broken_checkpoints, write_job_record)


@dataclass(frozen=True)
class Context:
    grid: Grid
    paths: Paths
    options: commands.Options
    env: dict[str, str]  # the nnU-Net commands' environment

    def state(self, job: TrainJob) -> FoldState:
        return fold_state(self.paths.fold_folder(job), needs_npz(self.grid))

    def train_command(self, job: TrainJob) -> list[str]:
        return commands.train_command(self.grid, job, self.state(job), self.options, needs_npz(self.grid))


def make_context(study_dir: Path, grid: Grid | None, options: commands.Options,
                 base_env: dict[str, str] | None = None) -> Context:
    """Resolve the dataset and the grid (the recorded one when ``grid`` is None); writes nothing."""
    env = commands.subprocess_env(dict(os.environ if base_env is None else base_env), options.device)
    if grid is not None:
        grid = Grid(resolve_dataset(grid.dataset, env), grid.configurations, grid.models, grid.folds)
    grid = check_study_dir(study_dir, grid)
    resolve_dataset(grid.dataset, env)  # nnU-Net's folders set and the dataset still there
    return Context(grid, Paths.from_env(study_dir.resolve(), grid.dataset, env), options, env)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def run_planning(ctx: Context, steps: Sequence[tuple[str, list[str]]]) -> None:
    env = commands.subprocess_env(ctx.env, ctx.options.device, planning=True)
    for key, command in steps:
        print(f"[plan] {commands.show(command)}", flush=True)
        write_job_record(ctx.paths, key, "running", command=commands.show(command))
        code = execute.run_sequence([command], env, ctx.paths.log(key), key)
        write_job_record(ctx.paths, key, "done" if code == 0 else "failed", returncode=code)
        if code != 0:
            raise StudyError(f"planning failed (exit status {code}); see {ctx.paths.log(key)}")
    if steps:
        checks.check_planned(ctx.grid, ctx.paths)


def _begin(ctx: Context, job: TrainJob, total: int) -> tuple[list[str], float]:
    fold = ctx.paths.fold_folder(job)
    for moved in set_aside_broken_checkpoints(fold):
        print(f"  {fold}: incomplete checkpoint (a kill during its save) moved to {moved.name}", flush=True)
    command = ctx.train_command(job)
    what = "resuming" if "--c" in command else "validating" if "--val" in command else "training"
    print(f"[train {job.index + 1}/{total}] {job.label}: {what} (log {ctx.paths.log(job.key)})", flush=True)
    write_job_record(ctx.paths, job.key, "running", command=commands.show(command))
    return command, time.monotonic()


def _end(ctx: Context, job: TrainJob, code: int, t0: float) -> bool:
    ok = code == 0 and ctx.state(job) is FoldState.DONE
    write_job_record(ctx.paths, job.key, "done" if ok else "failed", returncode=code)
    took = _clock(time.monotonic() - t0)
    if ok:
        print(f"  {job.label}: done in {took}", flush=True)
    else:
        print(f"  {job.label}: FAILED after {took} (exit status {code}); see {ctx.paths.log(job.key)}", flush=True)
    return ok


def run_train_job(ctx: Context, job: TrainJob, total: int) -> bool:
    """One fold, holding its lock; True when nnU-Net's files say it is done afterwards."""
    with execute.Lock(ctx.paths.job_state(job.key).with_suffix(".lock"), f"training {job.label}"):
        if ctx.state(job) is FoldState.DONE:
            print(f"[train {job.index + 1}/{total}] {job.label}: already done", flush=True)
            return True
        command, t0 = _begin(ctx, job, total)
        try:
            code = execute.run_sequence([command], ctx.env, ctx.paths.log(job.key), job.label)
        except BaseException:
            write_job_record(ctx.paths, job.key, "stopped")
            raise
        return _end(ctx, job, code, t0)


def gpu_slots(gpus: Sequence[str] | None, per_job: int) -> list[str]:
    """``--gpus`` as the GPU groups jobs run on at once (``CUDA_VISIBLE_DEVICES`` values), ``per_job`` GPUs each."""
    if not gpus:
        return []
    if len(gpus) % per_job:
        raise StudyError(f"--gpus {','.join(gpus)}: {len(gpus)} GPUs do not split into groups of --gpus-per-job "
                         f"{per_job}")
    return [",".join(gpus[i:i + per_job]) for i in range(0, len(gpus), per_job)]


def run_training(ctx: Context, slots: Sequence[str]) -> list[TrainJob]:
    """Train every fold that is not done, one per slot at a time; returns the jobs that failed (the others ran)."""
    jobs = ctx.grid.train_jobs()
    todo = [j for j in jobs if ctx.state(j) is not FoldState.DONE]
    print(f"training: {len(jobs) - len(todo)} of {len(jobs)} folds done, {len(todo)} to run", flush=True)
    if len(slots) <= 1:
        env = dict(ctx.env, CUDA_VISIBLE_DEVICES=slots[0]) if slots else ctx.env
        one = Context(ctx.grid, ctx.paths, ctx.options, env)
        return [j for j in todo if not run_train_job(one, j, len(jobs))]
    return _run_training_parallel(ctx, todo, len(jobs), slots)


def _run_training_parallel(ctx: Context, todo: list[TrainJob], total: int, gpus: Sequence[str]) -> list[TrainJob]:
    failed, tasks = [], []
    for job in todo:
        lock = execute.Lock(ctx.paths.job_state(job.key).with_suffix(".lock"), f"training {job.label}")
        started: dict[str, float] = {}

        def prepare(job=job, lock=lock, started=started) -> list[str]:
            lock.acquire()
            command, started["t0"] = _begin(ctx, job, total)
            return command

        def done(code: int, job=job, lock=lock, started=started) -> None:
            lock.release()
            if not _end(ctx, job, code, started["t0"]):
                failed.append(job)

        tasks.append(execute.Task(prepare=prepare, done=done, log=ctx.paths.log(job.key), title=job.label,
                                  env=ctx.env))
    execute.run_parallel(tasks, list(gpus))
    return failed
