"""Running the study's commands: each job's output goes to its own log file, its state to a job record.

Child processes are killed with the study process (Linux ``PR_SET_PDEATHSIG``), so a killed ``study run`` leaves no
training running on behind it that a re-run would then race against. Several training jobs run at once only with
``--gpus`` (one per GPU, nnU-Net's advice for cross-validation); everything else runs one after another.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from nnunetv2_fias.study.commands import resolve, show
from nnunetv2_fias.study.grid import StudyError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start(command: list[str], env: dict[str, str], log) -> subprocess.Popen:
    log.write(f"$ {show(command)}\n")
    log.flush()
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(resolve(command), env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=preexec)


@contextlib.contextmanager
def open_log(path: Path, title: str) -> Iterator:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {title} =====\n")
        log.flush()
        yield log


def run_sequence(commands: Sequence[list[str]], env: dict[str, str], log_path: Path, title: str) -> int:
    """Run ``commands`` one after another into ``log_path``; the first non-zero exit status stops it."""
    with open_log(log_path, title) as log:
        for command in commands:
            proc = start(command, env, log)
            try:
                code = proc.wait()
            except BaseException:
                _stop(proc)
                raise
            if code != 0:
                log.write(f"exit status {code}\n")
                return code
    return 0


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Task:
    """One job for :func:`run_parallel`: ``prepare()`` returns its command when a slot is free (so the command
    reflects the state at that moment), ``done(exit_status)`` is called when it ends."""
    prepare: Callable[[], list[str]]
    done: Callable[[int], None]
    log: Path
    title: str
    env: dict[str, str]


def run_parallel(tasks: Sequence[Task], slots: Sequence[str | None]) -> None:
    """Run ``tasks`` with at most one per slot at a time; a slot is a GPU id (``CUDA_VISIBLE_DEVICES``) or None.

    Polled from this thread (no threads: ``preexec_fn`` is unsafe with threads). A failing task does not stop the
    others.
    """
    pending = list(tasks)
    running: dict[str | None, tuple[subprocess.Popen, Task, object]] = {}
    free = list(slots)
    try:
        while pending or running:
            while pending and free:
                slot, task = free.pop(0), pending.pop(0)
                env = dict(task.env)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                command = task.prepare()
                log = open_log(task.log, task.title)
                handle = log.__enter__()
                running[slot] = (start(command, env, handle), task, log)
            time.sleep(0.5)
            for slot, (proc, task, log) in list(running.items()):
                code = proc.poll()
                if code is not None:
                    log.__exit__(None, None, None)
                    del running[slot]
                    free.append(slot)
                    task.done(code)
    except BaseException:
        for proc, _, log in running.values():
            _stop(proc)
            log.__exit__(None, None, None)
        raise


class Lock:
    """An exclusive ``flock`` on a file beside the study's records, taken without waiting.

    The study takes one for ``study run`` and one per job, so neither two runs nor a local run and a SLURM array
    task train the same fold at once. The lock goes with the process, also when it is killed.
    """

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text().strip() or "another process"
            raise StudyError(f"{self.what} is already running ({holder}; lock {self.path}); wait for it or stop "
                             f"it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SLURM's ``scancel`` and time limits send SIGTERM: stop the running child and record the job as stopped."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
