"""The official DilateFormer checkpoint files: reading them, recognising their size, matching it to FIAS.

Users bring the file (it is on no package index), so every way it can be wrong gets a message that names the file
and the cause: a missing or unreadable file, an nnU-Net training checkpoint in its place, another model size.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .config import FIAS_PRESETS

# The official model sizes: embedding width of stage 1 and blocks per stage.
DILATEFORMER_SIZES = {"T": (72, (2, 2, 6, 2)), "S": (72, (3, 5, 8, 3)), "B": (96, (4, 8, 10, 3))}
_SIGNATURE = ("patch_embed.proj.0.weight", "patch_embed.proj.9.weight", "stages.0.blocks.0.attn.qkv.weight")


@dataclass(frozen=True)
class DilateFormerLayout:
    """Size of a DilateFormer encoder: ``embed_dim`` (stage 1 width; stage i has ``embed_dim * 2**i``) and depths."""

    embed_dim: int
    depths: tuple[int, ...]

    @property
    def size(self) -> str | None:
        """``"T"``, ``"S"`` or ``"B"`` for an official size, else None."""
        for name, (embed, depths) in DILATEFORMER_SIZES.items():
            if (embed, depths) == (self.embed_dim, self.depths):
                return name
        return None

    def describe(self, model: str = "DilateFormer") -> str:
        name = f"{model}-{self.size}" if self.size else f"a {model} variant"
        return f"{name} (embed {self.embed_dim}, depths {','.join(map(str, self.depths))})"


# ---------------------------------------------------------------------------------------------------- reading
def unwrap_state_dict(obj, source: str) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint (``{'model': sd}`` or ``sd``), without ``module.``."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} is not a DilateFormer checkpoint: it holds a {type(obj).__name__}, not a dict")
    sd = obj["model"] if isinstance(obj.get("model"), Mapping) else obj
    sd = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in sd.items()}
    missing = [k for k in _SIGNATURE if not isinstance(sd.get(k), torch.Tensor)]
    if missing:
        if _NNUNET_KEYS <= set(obj):
            raise ValueError(_nnunet_checkpoint_message(source))
        shown = ", ".join(map(str, list(obj)[:6])) + (", ..." if len(obj) > 6 else "")
        raise ValueError(f"{source} is not a DilateFormer checkpoint: it has no '{missing[0]}' "
                         f"(top-level keys: {shown or 'none'})")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_dilateformer_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a DilateFormer checkpoint file and return its model state dict.

    ``torch.load(..., weights_only=True)``; the ``argparse.Namespace`` that DeiT-style training scripts store next to
    the weights is allowed. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that cannot
    be read as a PyTorch checkpoint or is not a DilateFormer one; the message names the file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"DilateFormer checkpoint {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DilateFormer checkpoint {path} does not exist")
    not_torch = _not_a_torch_file(path)
    if not_torch:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({not_torch})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 114" in random bytes
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and permission errors alike: the user needs the file and the cause
        # An nnU-Net checkpoint holds numpy scalars, which weights-only loading refuses; say what the file is.
        if _NNUNET_KEYS <= _pickled_strings(path):
            raise ValueError(_nnunet_checkpoint_message(path)) from None
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({_cause(e)})") from None
    return unwrap_state_dict(obj, path)


# Top-level keys of the checkpoints nnUNetv2_train writes (checkpoint_final.pth, _best, _latest).
_NNUNET_KEYS = frozenset({"network_weights", "trainer_name"})


def _nnunet_checkpoint_message(source: str) -> str:
    return (f"{source} is an nnU-Net training checkpoint (it holds network_weights and trainer_name), not "
            "DilateFormer's ImageNet weights: to start a training from it, pass it to nnUNetv2_train ... "
            "-pretrained_weights (with -tr FIASTrainer, not an ImageNet variant); nnUNet_FIAS_pretrained takes the "
            "official DilateFormer file")


def _not_a_torch_file(path: str) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file (zip archive, or a pickle in the legacy format), else None."""
    import zipfile

    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
    if not head:
        return "the file is empty"
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # the zip format, or the pickle protocol marker
        return None
    return "neither torch.save's zip format nor a pickle: an unrelated or damaged file"


def _pickled_strings(path: str) -> set[str]:
    """The strings in a zip-format checkpoint's pickle, read with ``pickletools`` (nothing is unpickled)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            data = z.read(name)
        return {arg for op, arg, _ in pickletools.genops(data) if "UNICODE" in op.name and isinstance(arg, str)}
    except Exception:  # not a zip checkpoint, or a damaged one: nothing to recognise
        return set()


def _cause(error: Exception) -> str:
    """One line on why ``torch.load`` failed (its weights-only messages are a page long, and their advice to load
    with ``weights_only=False`` is wrong for a file that is not a checkpoint at all)."""
    text = str(error)
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"it holds a {refused.group(1)}, which weights-only loading refuses; save the state dict alone, "
                "e.g. torch.save(checkpoint['model'], path)")
    if "Weights only load failed" in text or isinstance(error, pickle.UnpicklingError):
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return "its pickle is damaged or not a checkpoint" + (f": {detail.group(1).strip()}" if detail else "")
    lines = [line.split("  (Could this error message be improved?")[0].strip() for line in text.splitlines()
             if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def dilateformer_layout(state_dict: Mapping[str, torch.Tensor]) -> DilateFormerLayout:
    """Embedding width and depths of the DilateFormer whose (unwrapped) state dict this is."""
    embed = int(state_dict["patch_embed.proj.9.weight"].shape[0])
    blocks = [set() for _ in range(4)]
    for key in state_dict:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key)
        if m and int(m.group(1)) < 4:
            blocks[int(m.group(1))].add(int(m.group(2)))
    return DilateFormerLayout(embed, tuple(len(b) for b in blocks))


def _fias_name(widths: Sequence[int], depths: Sequence[int]) -> str:
    for preset, cfg in FIAS_PRESETS.items():
        if tuple(cfg["widths"]) == tuple(widths) and tuple(cfg["global_depths"]) == tuple(depths):
            return f"FIAS-{preset}"
    return "a FIAS"


def check_layout(layout: DilateFormerLayout, widths: Sequence[int], depths: Sequence[int], source: str,
                 network: str = "the network", suggest: Callable[[str], str] = "FIAS preset '{}'".format) -> None:
    """Raise ``ValueError`` naming both sizes when the checkpoint's layout differs from the global branch's
    (``widths`` and ``depths`` per stage); ``suggest(preset)`` names what to use for a checkpoint that fits a FIAS
    preset."""
    widths, depths = tuple(int(w) for w in widths), tuple(int(d) for d in depths)
    expected = tuple(layout.embed_dim * 2 ** i for i in range(4))
    if widths == expected and depths == layout.depths:
        return
    net = f"{_fias_name(widths, depths)} (embed {widths[0]}, depths {','.join(map(str, depths))}" + (
        f", widths {','.join(map(str, widths))})" if widths != tuple(widths[0] * 2 ** i for i in range(4)) else ")")
    fit = [p for p, cfg in FIAS_PRESETS.items()
           if tuple(cfg["widths"]) == expected and tuple(cfg["global_depths"]) == layout.depths]
    hint = f"; it fits {suggest(fit[0])}" if fit else ""
    raise ValueError(f"{source}: checkpoint is {layout.describe()} but {network} is {net}{hint}")


def layout_of_preset(preset: str, overrides: Mapping | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Widths and global depths a FIAS with ``preset`` and keyword ``overrides`` builds (without building it)."""
    overrides = dict(overrides or {})
    cfg = FIAS_PRESETS[preset]
    return (tuple(overrides.get("widths", cfg["widths"])), tuple(overrides.get("global_depths", cfg["global_depths"])))


__all__ = ["DILATEFORMER_SIZES", "DilateFormerLayout", "check_layout", "dilateformer_layout", "layout_of_preset",
           "read_dilateformer_checkpoint", "unwrap_state_dict"]
