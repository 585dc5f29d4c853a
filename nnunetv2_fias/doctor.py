"""``nnunetv2_fias env`` and ``nnunetv2_fias doctor``: make nnU-Net find the FIAS trainers, and check the setup.

``env`` prints the shell line that adds the plugin's discovery folder to ``nnUNet_extTrainer`` (keeping any folders
already there), for ``eval "$(nnunetv2_fias env)"``. ``doctor`` checks what a training needs and says how to fix
each problem; it exits 1 if any check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
import re
import shlex
import sys
import traceback
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

MIN_NNUNET = (2, 8)
NNUNET_PATH_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def shim_folder() -> Path:
    """The folder nnUNet_extTrainer must contain: it holds only the uniquely named re-export module."""
    from nnunetv2_fias import nnunet_ext

    return Path(nnunet_ext.__file__).resolve().parent


def _split_ext(value: str | None) -> list[str]:
    return [p for p in (value or "").split(os.pathsep) if p.strip()]


def _same_path(a: str, b: Path) -> bool:
    # No expanduser: nnU-Net uses the folders as written, so a literal "~" does not work there either.
    try:
        return Path(a).resolve() == b
    except OSError:
        return False


def ext_trainer_value(current: str | None) -> str:
    """``nnUNet_extTrainer`` with the shim folder appended, unless it is already there."""
    folder = shim_folder()
    parts = _split_ext(current)
    if not any(_same_path(p, folder) for p in parts):
        parts.append(str(folder))
    return os.pathsep.join(parts)


# torch's CPU operators run in OpenMP parallel regions, and GNU OpenMP's default lets a thread that reaches the end of
# a region spin for the others. When another process holds one of the cores (nnU-Net's augmentation or export
# workers, a second job), every region waits for a descheduled thread, and FIAS, with many small operators, slows down
# far more than the U-Net (docs/benchmarks.md, "FIAS on a busy CPU"). Waiting threads that sleep at once
# (OMP_WAIT_POLICY=PASSIVE) remove that. OpenMP reads the variable when torch loads, so it must be in the environment
# of nnUNetv2_train / nnUNetv2_predict before they start: `env` exports it unless the user has set it.
OMP_WAIT_ADVICE = "OMP_WAIT_POLICY=PASSIVE"


def env_lines(shell: str, environ: dict[str, str] | None = None) -> list[str]:
    """The lines ``nnunetv2_fias env`` prints: nnUNet_extTrainer with the shim folder, and OMP_WAIT_POLICY unless
    it is set already."""
    environ = os.environ if environ is None else environ
    values = {"nnUNet_extTrainer": ext_trainer_value(environ.get("nnUNet_extTrainer"))}
    if not environ.get("OMP_WAIT_POLICY"):
        values["OMP_WAIT_POLICY"] = "PASSIVE"
    if shell == "sh":
        return [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    if shell == "fish":
        return [f"set -gx {k} {shlex.quote(v)}" for k, v in values.items()]
    return [f"$env:{k} = '" + v.replace("'", "''") + "'" for k, v in values.items()]


def main_env(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_fias env",
        description="Print the shell commands that let nnU-Net find the FIAS trainers (nnUNet_extTrainer) and keep "
                    "OpenMP threads from spinning on a shared CPU (OMP_WAIT_POLICY=PASSIVE, unless already set). "
                    "Use it as: eval \"$(nnunetv2_fias env)\"; put that line in your shell profile to keep it.")
    parser.add_argument("--shell", choices=("sh", "fish", "powershell"), default="sh",
                        help="syntax of the printed lines: sh (bash/zsh, default), fish or powershell")
    args = parser.parse_args(argv)
    print("\n".join(env_lines(args.shell)))
    return 0


class Finding(NamedTuple):
    level: str  # "ok", "warn" or "fail"
    text: str
    fix: str = ""


class _Report:
    def __init__(self) -> None:
        self.failures = 0
        self.warnings = 0
        self.findings: list[Finding] = []

    def ok(self, text: str) -> None:
        self.findings.append(Finding("ok", text))
        print(f"[ok]   {text}")

    def warn(self, text: str, fix: str) -> None:
        self.warnings += 1
        self.findings.append(Finding("warn", text, fix))
        print(f"[warn] {text}\n       fix: {fix}")

    def fail(self, text: str, fix: str) -> None:
        self.failures += 1
        self.findings.append(Finding("fail", text, fix))
        print(f"[FAIL] {text}\n       fix: {fix}")


def _version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric release components: '2.8.1' -> (2, 8, 1), '2.10.0rc1' -> (2, 10, 0)."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    return tuple(int(g) for g in match.groups() if g is not None) if match else ()


def _check_nnunet(rep: _Report) -> bool:
    try:
        version = metadata.version("nnunetv2")
    except metadata.PackageNotFoundError:
        rep.fail("nnU-Net (nnunetv2) is not installed", "pip install 'nnunetv2>=2.8,<2.9'")
        return False
    if _version_tuple(version)[:2] < MIN_NNUNET:
        rep.fail(f"nnunetv2 {version} is too old: external trainers (nnUNet_extTrainer) need nnunetv2 >= 2.8",
                 "pip install 'nnunetv2>=2.8,<2.9'")
        return False
    rep.ok(f"nnunetv2 {version} (>= {'.'.join(map(str, MIN_NNUNET))})")
    return True


def _check_paths(rep: _Report) -> None:
    for var in NNUNET_PATH_VARS:
        value = os.environ.get(var)
        if not value:
            rep.fail(f"{var} is not set",
                     f"mkdir -p /path/to/{var} && export {var}=/path/to/{var} (a folder of your choice; see "
                     f"nnU-Net's documentation/setting_up_paths.md)")
        elif os.path.exists(value) and not os.path.isdir(value):
            rep.fail(f"{var}={value} is a file, not a folder",
                     f"export {var}=/path/to/{var} (a folder; {value} itself is not a place for nnU-Net's data)")
        elif not os.path.isdir(value):
            rep.fail(f"{var}={value} does not exist", f"mkdir -p {shlex.quote(value)}")
        elif not os.access(value, os.W_OK):
            rep.fail(f"{var}={value} is not writable", "choose a folder you can write to, or fix its permissions")
        else:
            rep.ok(f"{var}={value}")
            if var == "nnUNet_raw":
                _check_staging_leftovers(rep, value)


def _check_staging_leftovers(rep: _Report, raw: str) -> None:
    """Hidden staging folders of conversions that were killed (they are never used and can be large)."""
    from nnunetv2_fias._util import find_stale_staging

    stale = find_stale_staging(raw)
    if stale:
        rep.warn(f"nnUNet_raw holds {len(stale)} staging folder(s) left by interrupted runs, never used by nnU-Net:"
                 + "".join(f"\n         {s.describe()}" for s in stale),
                 "rm -rf " + " ".join(shlex.quote(str(s.path)) for s in stale)
                 + "  (re-running the conversion of that dataset also removes them)")


# A class name no folder defines: looking it up makes nnU-Net import every module of a folder.
_ABSENT_CLASS = "_NnunetV2FiasDoctorAbsentClass"


class BrokenModule(NamedTuple):
    folder: str
    file: Path | None  # the module nnU-Net imports (None if the traceback names no file in the folder)
    origin: str  # where the error was raised when that is another file of the folder, else ""
    error: str


def find_broken_module(folder: str) -> BrokenModule | None:
    """The first module of an nnUNet_extTrainer folder that nnU-Net's trainer search cannot import, if any.

    nnU-Net (``recursive_find_python_class``) imports the folder's modules one by one until one defines the asked
    class and lets any import error escape, so the search runs here with a name that no folder defines.
    """
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            recursive_find_python_class(folder, _ABSENT_CLASS, None, base_folder=folder,
                                        cleanup_imports_from_base_folder=True)
    except Exception as e:  # whatever a module raises while imported ends nnU-Net's search
        root = Path(folder).resolve()
        places = [(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)]
        if isinstance(e, SyntaxError) and e.filename:
            places.append((e.filename, e.lineno))
        inside = [(Path(f).resolve(), line) for f, line in places
                  if not f.startswith("<") and Path(f).resolve().is_relative_to(root)]
        file = inside[0][0] if inside else None
        origin = f"{inside[-1][0]}, line {inside[-1][1]}" if inside and inside[-1][0] != file else ""
        message = str(e).splitlines()[0] if str(e) else ""
        return BrokenModule(folder, file, origin, f"{type(e).__name__}: {message}".rstrip(": "))
    return None


def _report_broken(rep: _Report, broken: BrokenModule, before_fias: bool, is_shim: bool) -> None:
    what = f"importing {broken.file.name}" if broken.file else "importing one of its modules"
    where = f" (raised in {broken.origin})" if broken.origin else ""
    text = (f"nnUNet_extTrainer folder {broken.folder}: {what} fails with {broken.error}{where}. nnU-Net's trainer "
            f"search imports every module of each nnUNet_extTrainer folder in turn, so ")
    if is_shim:
        rep.fail(text + "every FIAS trainer lookup fails with this error",
                 "reinstall nnunetv2-fias in this environment (the error says what is missing)")
        return
    fix = (f"fix or remove {broken.file}, or " if broken.file else "fix the module, or ") + \
        f"remove {broken.folder} from nnUNet_extTrainer"
    if before_fias:
        rep.fail(text + "the search for EVERY trainer not built into nnU-Net (every FIAS trainer included) fails "
                        "with this error", fix)
    else:
        rep.warn(text + "the FIAS trainers (found in an earlier folder) still resolve, but the search for any "
                        "trainer that is not in an earlier folder fails with this error", fix)


def _check_discovery(rep: _Report) -> None:
    folder = shim_folder()
    parts = _split_ext(os.environ.get("nnUNet_extTrainer"))
    fix_env = 'eval "$(nnunetv2_fias env)"  (add it to your shell profile to keep it)'
    if not any(_same_path(p, folder) for p in parts):
        rep.fail(f"nnUNet_extTrainer does not contain the FIAS discovery folder {folder} "
                 f"(current value: {os.environ.get('nnUNet_extTrainer', '<unset>')!r})", fix_env)
        return
    shim_index = next(i for i, p in enumerate(parts) if _same_path(p, folder))
    blocked = False
    sources = _plugin_source_folders()
    for i, p in enumerate(parts):
        if not os.path.isdir(p):
            rep.warn(f"nnUNet_extTrainer lists {p}, which is not a folder (nnU-Net skips it)",
                     "remove it from nnUNet_extTrainer")
            continue
        if any(_same_path(p, src) for src in sources):
            # nnU-Net imports the modules of a listed folder as top-level modules, so a package folder of this
            # plugin fails on its relative imports; only the discovery folder is meant to be listed.
            rep.fail(f"nnUNet_extTrainer lists {p}, a source folder of nnunetv2-fias, not its discovery folder "
                     f"{folder}; nnU-Net cannot import a package folder's modules on their own",
                     f"remove {p} from nnUNet_extTrainer, then {fix_env}")
            blocked = blocked or i <= shim_index
            continue
        broken = find_broken_module(p)
        if broken is not None:
            _report_broken(rep, broken, before_fias=i <= shim_index, is_shim=i == shim_index)
            blocked = blocked or i <= shim_index
    if blocked:  # every lookup below would end in the error just reported
        return
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2_fias import trainers

    wrong = []
    for cls in trainers.TRAINERS:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                found = recursive_find_trainer_class_by_name(cls.__name__)
        except Exception as e:  # nnU-Net raises RuntimeError when the class is not found
            wrong.append(f"{cls.__name__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if found is not cls:
            wrong.append(f"{cls.__name__} resolves to {found.__module__}.{found.__qualname__}{_where(found)}, "
                         f"not the installed {cls.__module__}.{cls.__qualname__}")
    if wrong:
        rep.fail("nnU-Net does not resolve every FIAS trainer to the installed class:\n         "
                 + "\n         ".join(wrong),
                 "remove other folders that define these class names from nnUNet_extTrainer (a built-in or earlier "
                 "folder wins), reinstall nnunetv2-fias, then " + fix_env)
    else:
        rep.ok(f"nnU-Net resolves {', '.join(c.__name__ for c in trainers.TRAINERS)} to the installed classes "
               f"(via {folder})")


def _plugin_source_folders() -> list[Path]:
    """The plugin's package folders (and the folder above them) other than the discovery folder."""
    import importlib.util

    folders = []
    for name in ("nnunetv2_fias", "nnunetv2_fias.architectures", "nnunetv2_fias.dataset_conversion",
                 "nnunetv2_fias.trainers"):
        spec = importlib.util.find_spec(name)  # located, not imported: a broken module must not stop doctor
        folders += [Path(f).resolve() for f in (spec.submodule_search_locations or [])] if spec else []
    return folders + [f.parent for f in folders]


def _where(cls: type) -> str:
    # nnU-Net drops the modules it imported from nnUNet_extTrainer folders, so the class may have no module left.
    try:
        return f" ({inspect.getsourcefile(cls)})"
    except (TypeError, OSError):
        top = cls.__module__.split(".")[0]
        for folder in _split_ext(os.environ.get("nnUNet_extTrainer")):
            for candidate in (Path(folder) / f"{top}.py", Path(folder) / top):
                if candidate.exists():
                    return f" (from {candidate})"
        return ""


def _compile_requested(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1", "t")


def nnunet_compiles(device_type: str, value: str | None, windows: bool = os.name == "nt") -> tuple[bool, bool]:
    """Whether nnU-Net 2.8 torch.compiles the network for (training, prediction), given nnUNet_compile's value.

    Training (``nnUNetTrainer._do_i_compile``) compiles on CUDA outside Windows unless nnUNet_compile is set to a
    false value, and never on the CPU or MPS; the predictor compiles only when nnUNet_compile is set to true.
    """
    training = device_type == "cuda" and not windows and (value is None or _compile_requested(value))
    return training, _compile_requested(value)


def _check_device(rep: _Report) -> None:
    import torch

    value = os.environ.get("nnUNet_compile")
    shown = " unset" if value is None else f"={value}"
    if torch.cuda.is_available():
        rep.ok(f"torch {torch.__version__}: CUDA device cuda:0 ({torch.cuda.get_device_name(0)}) will be used "
               f"(nnU-Net's default -device cuda)")
        training, prediction = nnunet_compiles("cuda", value)
        rep.ok(f"nnUNet_compile{shown}: nnU-Net's training {'compiles' if training else 'does not compile'} the "
               f"network (it does on CUDA outside Windows unless nnUNet_compile is false), its predictor "
               f"{'compiles' if prediction else 'does not compile'} it (only when nnUNet_compile is true)")
        return
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if mps:
        rep.warn(f"torch {torch.__version__}: no CUDA device; Apple MPS is available",
                 "pass -device mps to nnUNetv2_train and nnUNetv2_predict")
    else:
        rep.warn(f"torch {torch.__version__}: no CUDA device, training and prediction will run on the CPU (slow: "
                 f"hours per epoch for real 2D datasets)",
                 "pass -device cpu to nnUNetv2_train and nnUNetv2_predict; for real training use a machine with a GPU")
    if not os.environ.get("OMP_WAIT_POLICY"):
        rep.warn("OMP_WAIT_POLICY is unset: on a CPU shared with nnU-Net's workers or other jobs, OpenMP threads "
                 "spin-wait for descheduled peers and FIAS's many small operators slow down many times over",
                 'eval "$(nnunetv2_fias env)" (exports OMP_WAIT_POLICY=PASSIVE), or export it yourself')
    if nnunet_compiles("mps" if mps else "cpu", value)[1]:
        rep.warn(f"nnUNet_compile{shown} makes nnU-Net's predictor compile the network (training never compiles "
                 f"on the {'MPS device' if mps else 'CPU'}); compiling is several times slower on the CPU and "
                 f"unsupported on MPS", "unset nnUNet_compile (or export nnUNet_compile=f)")


def main_doctor(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_fias doctor",
        description="Check nnU-Net's version, its path variables, that nnU-Net resolves the FIAS trainers to this "
                    "installation, and which torch device will be used. Exits 1 if a check fails.")
    parser.parse_args(argv)
    return 1 if run_checks().failures else 0


def run_checks() -> _Report:
    """All of ``doctor``'s checks, printed as they run; the report holds the findings."""
    rep = _Report()
    print(f"nnunetv2_fias {metadata.version('nnunetv2-fias') if _has_dist('nnunetv2-fias') else '(not installed)'}"
          f", Python {sys.version.split()[0]}")
    nnunet_ok = _check_nnunet(rep)
    _check_paths(rep)
    if nnunet_ok:
        _check_discovery(rep)
    _check_device(rep)
    print(f"\n{rep.failures} problem(s), {rep.warnings} warning(s)" if rep.failures or rep.warnings
          else "\nAll checks passed.")
    return rep


def _has_dist(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False
