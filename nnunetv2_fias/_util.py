"""Small helpers that several commands and the trainer share: atomic output, process counts, devices, FLOPs and
deep-supervision weights. Nothing here imports torch at module level, so light commands stay fast.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence


# ------------------------------------------------------------------------------------------------ atomic output
def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A failure (or an interrupt) leaves neither a half-written ``path`` nor the temporary file behind. ``suffix`` keeps
    the extension for writers that infer the format from it (matplotlib's ``savefig``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2, allow_nan: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")


def atomic_savefig(fig, path: str | os.PathLike) -> None:
    """``fig.savefig`` through :func:`atomic_write` (the suffix tells matplotlib the format)."""
    atomic_write(path, fig.savefig, suffix=Path(path).suffix)


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    On any error the temporary folder is removed and ``final`` is untouched. An existing ``final`` is replaced only
    when ``overwrite`` is true (then the old folder is removed after the new one is complete); otherwise
    ``FileExistsError`` is raised before anything is written.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            old.rmdir()
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ processes
def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_num_processes() -> int:
    """Worker processes for our pools: nnU-Net's own default (``nnUNet_def_n_proc``, else 8), at most the CPUs here.

    Read at call time (nnU-Net reads its variable once at import), so tests and users can change it in-process.
    """
    env = os.environ.get("nnUNet_def_n_proc", "").strip()
    n = int(env) if env.isdigit() else 8
    return max(1, min(n, available_cpus()))


# ------------------------------------------------------------------------------------------------ devices
def resolve_device(device: str | None, option: str = "--device") -> str:
    """``"auto"``/None -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; ``"cuda"`` without a GPU -> ValueError."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ValueError(f"{option} must be auto, cpu or cuda, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{option} {device}: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                         f"use {option} cpu or auto")
    return str(device)


# ------------------------------------------------------------------------------------------------ networks
def set_deep_supervision(model, enabled: bool) -> bool:
    """Set ``model.decoder.deep_supervision`` where the model has one; return the previous value (False if none)."""
    decoder = getattr(model, "decoder", None)
    previous = bool(getattr(decoder, "deep_supervision", False))
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled
    return previous


def count_flops(model, channels: int, patch: Sequence[int], device="cpu") -> int:
    """Forward FLOPs of one patch (batch 1) in eval mode with deep supervision off.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention (elementwise work is
    not counted). The model's mode and deep-supervision flag are restored afterwards.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    ds = set_deep_supervision(model, False)
    try:
        x = torch.zeros(1, channels, *patch, device=device)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
        set_deep_supervision(model, ds)


def deep_supervision_weights(n: int, zero_lowest: bool = False) -> list[float]:
    """Loss weights ``1 / 2**i`` of ``n`` outputs (highest resolution first), normalised to sum 1.

    ``zero_lowest=True`` is nnU-Net's default (the lowest-resolution output gets weight 0); FIASTrainer keeps it.
    """
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    weights = [1 / 2 ** i for i in range(n)]
    if zero_lowest and n > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]
