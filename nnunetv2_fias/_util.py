"""Small helpers that several commands and the trainer share: atomic output, process counts, devices and
deep-supervision weights. Nothing here imports torch at module level, so light commands stay fast.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; owners are then told apart by pid and host alone
    fcntl = None


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


# ------------------------------------------------------------------------------------------------ staging folders
# A folder is built under a hidden name beside its final place and renamed into place when complete. The hidden
# names are ``.<final name>.partial-XXXXXXXX`` (being written), and ``.<final name>.old-XXXXXXXX`` /
# ``.<final name>.replaced-XXXXXXXX`` (a replaced folder, moved aside to be deleted). A run killed with SIGKILL
# leaves them behind; the next run for the same name and ``nnunetv2_fias doctor`` find them.
STAGING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|replaced)-[a-z0-9_]{8}$")
# Inside a staging folder while its writer runs: the writer holds a POSIX lock on it (released by the kernel when
# the process dies, also on SIGKILL) and has written its pid and host. Removed before the final rename.
STAGING_OWNER = ".nnunetv2_fias-staging-owner"
# A staging folder without a live owner record (written by an older version, or caught between the writer's
# mkdir and its lock) counts as abandoned only when nothing in it changed for this long.
UNOWNED_STALE_AFTER_S = 3600.0
_OWNED_HERE: set[Path] = set()  # staging folders this process is writing (its own lock must not be probed)


@dataclasses.dataclass(frozen=True)
class StaleStaging:
    """A staging folder left behind by a run that no longer exists."""

    path: Path
    reason: str
    size_bytes: int

    def describe(self) -> str:
        return f"{self.path} ({_size_text(self.size_bytes)}; {self.reason})"


def _size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _last_change(path: Path) -> float:
    """Newest mtime/ctime of the folder and its direct entries (case files land one level below the top)."""
    times = []
    for p in [path, *path.iterdir()]:
        with contextlib.suppress(OSError):
            st = os.lstat(p)
            times += [st.st_mtime, st.st_ctime]
    return max(times)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner_state(folder: Path) -> tuple[bool | None, str]:
    """Whether the writer recorded in ``folder`` is still running (None: no usable record), and its description."""
    owner = folder / STAGING_OWNER
    try:
        fd = os.open(owner, os.O_RDWR)
    except FileNotFoundError:
        return None, "no owner record"
    except OSError:
        try:  # another user's folder: the record is readable, the lock cannot be probed
            info = json.loads(owner.read_text() or "{}")
        except (OSError, ValueError):
            return None, "owner record unreadable"
        who = f"pid {info.get('pid')} on {info.get('host')}"
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return _pid_alive(info["pid"]), who
        return None, who
    try:
        try:
            if fcntl is None:
                raise OSError("no POSIX locks")
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return True, "its writer holds the lock"
        except OSError:  # no locking on this file system: fall back to the pid on this host
            locked = None
        else:
            locked = False
        raw = os.read(fd, 4096)
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            info = None
        if not info:  # the writer is between creating the record and locking it
            return None, "owner record empty"
        who = f"pid {info.get('pid')} on {info.get('host')}"
        if locked is False:
            return False, f"left by {who}, which has ended"
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            alive = _pid_alive(info["pid"])
            return alive, f"{'written' if alive else 'left'} by {who}"
        return None, who
    finally:
        os.close(fd)  # releases the probe's lock


def find_stale_staging(parent: str | os.PathLike, name: str | None = None,
                       now: float | None = None) -> list[StaleStaging]:
    """Staging folders in ``parent`` (for the final folder ``name``, or for any name) whose writer is gone.

    Only names this module's staging produces are considered. A folder being written (its owner record locked, or
    its writer's pid alive on this host) is never listed; one without a usable owner record only when nothing in it
    changed for :data:`UNOWNED_STALE_AFTER_S`.
    """
    parent = Path(parent)
    now = time.time() if now is None else now
    found = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    for path in entries:
        m = STAGING_RE.match(path.name)
        if not m or (name is not None and m.group("name") != name) or path.is_symlink() or not path.is_dir():
            continue
        if path.resolve() in _OWNED_HERE:
            continue
        alive, who = _owner_state(path) if m.group("kind") == "partial" else (None, "a replaced folder moved aside")
        if alive is None:
            try:
                idle = now - _last_change(path)
            except (OSError, ValueError):
                continue
            if idle < UNOWNED_STALE_AFTER_S:
                continue
            reason = f"{who}, unchanged for {idle / 3600:.1f} h"
        elif alive:
            continue
        else:
            reason = who
        what = "unfinished" if m.group("kind") == "partial" else "replaced, not yet deleted"
        found.append(StaleStaging(path, f"{what}: {reason}", _tree_size(path)))
    return found


def remove_stale_staging(parent: str | os.PathLike, name: str | None = None) -> list[StaleStaging]:
    """Delete what :func:`find_stale_staging` lists; returns the folders removed (one that cannot be is skipped)."""
    removed = []
    for stale in find_stale_staging(parent, name):
        shutil.rmtree(stale.path, ignore_errors=True)
        if not stale.path.exists():
            removed.append(stale)
    return removed


class StagingFolder:
    """A new hidden staging folder ``.<final.name>.partial-XXXXXXXX`` beside ``final``, owned by this process.

    Its mode is what a plain ``mkdir`` gives under the umask (``mkdtemp`` makes it 0700, which would leave a
    shared ``nnUNet_raw`` unreadable to others after the rename). :meth:`release` drops the owner record; call it
    right before renaming the folder into place.
    """

    def __init__(self, final: str | os.PathLike):
        final = Path(final)
        self.path = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        self._fd: int | None = None
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.path, 0o777 & ~umask)
            _OWNED_HERE.add(self.path.resolve())
            self._fd = os.open(self.path / STAGING_OWNER, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            with contextlib.suppress(OSError):  # no locks on this file system: the pid and host still tell
                if fcntl is not None:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX)
            os.write(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "started": time.time()}).encode())
        except BaseException:
            self.remove()
            raise

    def release(self) -> None:
        """Drop the owner record (the folder is about to become the final one)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path / STAGING_OWNER)
            os.close(self._fd)
            self._fd = None
        _OWNED_HERE.discard(self.path.resolve())

    def remove(self) -> None:
        """Delete the folder and everything in it (on failure)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    On any error the temporary folder is removed and ``final`` is untouched. An existing ``final`` is replaced only
    when ``overwrite`` is true (then the old folder is removed after the new one is complete); otherwise
    ``FileExistsError`` is raised before anything is written. Staging folders of ``final`` left by killed runs are
    removed first, with a line on stderr.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    for stale in remove_stale_staging(final.parent, final.name):
        print(f"removed a staging folder left by an interrupted run: {stale.describe()}", file=sys.stderr)
    staging = StagingFolder(final)
    tmp = staging.path
    try:
        yield tmp
        staging.release()
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            old.rmdir()
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        staging.remove()
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


# ------------------------------------------------------------------------------------------------ commands
def console_command(name: str) -> list[str] | None:
    """A console command of this environment: the script next to ``sys.executable`` (so that the venv's nnU-Net is
    used even where the venv is not on PATH), else the one on PATH; ``nnunetv2_fias`` falls back to ``python -m``.
    None when there is none."""
    import sys

    local = Path(sys.executable).parent / name
    if local.is_file():
        return [str(local)]
    found = shutil.which(name)
    if found is not None:
        return [found]
    return [sys.executable, "-m", "nnunetv2_fias.cli"] if name == "nnunetv2_fias" else None


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
def deep_supervision_weights(n: int, zero_lowest: bool = False) -> list[float]:
    """Loss weights ``1 / 2**i`` of ``n`` outputs (highest resolution first), normalised to sum 1.

    ``zero_lowest=True`` is nnU-Net's default: the lowest-resolution output gets weight 0. FIASTrainer uses
    ``zero_lowest=False``: every FIAS output is a trained head, and a head without gradient breaks
    DistributedDataParallel without ``find_unused_parameters``.
    """
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    weights = [1 / 2 ** i for i in range(n)]
    if zero_lowest and n > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]
