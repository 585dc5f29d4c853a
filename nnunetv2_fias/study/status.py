"""``study status``: every job of the study as done / running / failed / interrupted / to-do, with the log of each
failure. The state comes from nnU-Net's files first, the study's job records second."""
from __future__ import annotations

from typing import NamedTuple

from nnunetv2_fias.study.layout import FoldState, read_job_record, record_is_live
from nnunetv2_fias.study.run import Context


class Row(NamedTuple):
    job: str
    state: str
    detail: str


def _from_record(ctx: Context, key: str, default: str) -> tuple[str, str]:
    record = read_job_record(ctx.paths, key)
    if record_is_live(record):
        return "running", f"since {_when(record)} on {record['host']} (pid {record['pid']}), log {record['log']}"
    if record and record.get("status") == "failed":
        return "failed", f"exit status {record.get('returncode')}, log {record['log']}"
    if record and record.get("status") in ("running", "stopped"):
        return "interrupted", f"log {record['log']}"
    return default, ""


def _when(record: dict) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(record.get("time", 0)))


def job_rows(ctx: Context) -> list[Row]:
    from nnunetv2_fias.study.finish import model_trained, predictions_current, selection_current, test_images

    rows = []
    for job in ctx.grid.train_jobs():
        state = ctx.state(job)
        if state is FoldState.DONE:
            rows.append(Row(f"[{job.index}] train {job.label}", "done", str(ctx.paths.fold_folder(job))))
            continue
        default = {FoldState.RESUME: "interrupted", FoldState.VALIDATE: "interrupted"}.get(state, "to-do")
        status, detail = _from_record(ctx, job.key, default)
        if status in ("interrupted", "to-do") and state is not FoldState.TODO:
            detail = f"{'resumes with --c' if state is FoldState.RESUME else 'validates with --val'}; {detail}"
        rows.append(Row(f"[{job.index}] train {job.label}", status, detail.rstrip("; ")))
    for model in ctx.grid.models:
        trained = model_trained(ctx, model)
        for step, current in (("select", selection_current), ("predict", predictions_current)):
            key = f"{step}__{model.name}"
            if step == "predict" and test_images(ctx) is None:
                rows.append(Row(f"predict {model.name}", "skipped", f"no imagesTs in {ctx.paths.raw}"))
            elif trained and (step == "select" or selection_current(ctx, model)) and current(ctx, model):
                rows.append(Row(f"{step} {model.name}", "done", ""))
            else:
                status, detail = _from_record(ctx, key, "to-do")
                if status == "to-do" and not trained:
                    detail = "waits for its training jobs"
                rows.append(Row(f"{step} {model.name}", status, detail))
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max(len(r.job) for r in rows)
    lines = [f"{r.job:<{width}}  {r.state:<11}  {r.detail}".rstrip() for r in rows]
    counts = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    return "\n".join(lines + ["", ", ".join(f"{n} {s}" for s, n in counts.items())])
