"""ImageNet weights of the official DilateFormer (T, S, B) for FIAS's global branch.

The DilateFormer checkpoints (DeiT-style ``{'model': state_dict}`` files from the DilateFormer authors' repository)
are not on any package index, so users bring the file and :func:`load_dilateformer_weights` copies it into a FIAS
network. The global branch follows DilateFormer's layout, so every encoder tensor has one counterpart:

* ``patch_embed.proj.{0,1,3,4,6,7,9}`` -> ``stem.{0.0,0.1,1.0,1.1,2.0,2.1,3}`` (convolutions and BatchNorms);
* ``stages.i.blocks.j.pos_embed`` -> ``stages.i.j.cpe``; ``norm1``, ``norm2``, ``attn.proj``, ``mlp.fc1/fc2`` keep
  their names;
* ``attn.qkv``: MSDA stages take it as their ``qkv`` Linear (the official 1x1 convolution, squeezed; both order the
  channels q/k/v, dilation group, head, head dim); global-attention stages split its rows into ``q`` (the first
  third) and ``kv`` (the rest: keys, then values);
* ``stages.i.downsample.proj.{0,1}`` -> ``downsamples.{i+1}.{0,1}`` (biased 3x3 stride-2 convolution, BatchNorm);
* ``norm`` (DilateFormer's final norm after stage 4) -> ``norms.3``, which sits at the same place in FIAS.

Everything is copied with identical values except the stem's first convolution when the network does not take 3
channels: it is adapted with timm's ``adapt_input_conv``. One channel gets the sum of the RGB weights (a grey image
x then gives exactly the response DilateFormer gives the RGB image (x, x, x)); C channels get the RGB weights
repeated cyclically (R, G, B, R, ...) and scaled by 3 / C (for C a multiple of 3 the same grey-image identity holds).
Not loaded: the ImageNet classifier ``head`` and, having no DilateFormer counterpart, the norms after stages 1-3,
the DMK branch, the fusions and the decoder (they keep their initialisation). Everything is checked before the
first tensor is written, so an error leaves the network unchanged.
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
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from .fias import FIAS_PRESETS

# The official model sizes: embedding width of stage 1 and blocks per stage.
DILATEFORMER_SIZES = {"T": (72, (2, 2, 6, 2)), "S": (72, (3, 5, 8, 3)), "B": (96, (4, 8, 10, 3))}
_SIGNATURE = ("patch_embed.proj.0.weight", "patch_embed.proj.9.weight", "stages.0.blocks.0.attn.qkv.weight")
_GLOBAL_PREFIX = "encoder.global_branch."


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


@dataclass(frozen=True)
class Transfer:
    """One tensor copied from the checkpoint (``source``) into the network (``target``)."""

    source: str
    target: str
    numel: int
    note: str = ""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_dilateformer_weights` did.

    ``loaded``: tensors copied with identical values (``note`` says where a 1x1 convolution became a Linear or a
    fused qkv was split); ``adapted``: tensors whose values were changed to fit (the stem's first convolution for a
    number of input channels other than 3); ``skipped``: checkpoint keys not loaded, with the reason;
    ``not_pretrained``: global-branch tensors of the network that have no DilateFormer counterpart.
    """

    source: str
    checkpoint: DilateFormerLayout
    loaded: tuple[Transfer, ...]
    adapted: tuple[Transfer, ...]
    skipped: tuple[tuple[str, str], ...]
    not_pretrained: tuple[str, ...]

    @property
    def loaded_elements(self) -> int:
        return sum(t.numel for t in self.loaded)

    def summary(self) -> list[str]:
        """The report as log lines."""
        lines = [f"ImageNet weights of {self.checkpoint.describe()} from {self.source}: {len(self.loaded)} tensors "
                 f"({self.loaded_elements / 1e6:.2f} M values) copied unchanged into FIAS's global branch"]
        lines += [f"  adapted: {t.source} -> {t.target} ({t.note})" for t in self.adapted]
        reasons: dict[str, list[str]] = {}
        for key, reason in self.skipped:
            reasons.setdefault(reason, []).append(key)
        lines += [f"  skipped: {', '.join(keys)} ({reason})" for reason, keys in reasons.items()]
        reshaped = []
        for marker, what in (("as Linear", "MSDA qkv 1x1 convolution weights as Linear weights"),
                             ("query rows", "fused qkv of global attention split into q and kv"),
                             ("final norm", "DilateFormer's final norm into norms.3")):
            n = len({t.source for t in self.loaded if marker in t.note})
            reshaped += [f"{what} ({n} checkpoint tensor{'s' if n > 1 else ''})"] if n else []
        lines += [f"  same values, other form: {'; '.join(reshaped)}"] if reshaped else []
        modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in self.not_pretrained))
        lines.append("  kept at initialisation (no DilateFormer counterpart): "
                     + "".join(f"{m}, " for m in modules) + "the DMK branch, the fusions and the decoder")
        return lines


# ---------------------------------------------------------------------------------------------------- reading
def _unwrap(obj, source: str) -> dict[str, torch.Tensor]:
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
    return _unwrap(obj, path)


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


# ---------------------------------------------------------------------------------------------------- mapping
def _source_key(target: str) -> tuple[str, str] | None:
    """Official key for a global-branch key (relative to the branch), and the kind of copy; None: no counterpart."""
    m = re.fullmatch(r"stem\.([0-2])\.([01])\.(.+)", target)
    if m:
        return f"patch_embed.proj.{3 * int(m.group(1)) + int(m.group(2))}.{m.group(3)}", "copy"
    m = re.fullmatch(r"stem\.3\.(.+)", target)
    if m:
        return f"patch_embed.proj.9.{m.group(1)}", "copy"
    m = re.fullmatch(r"downsamples\.([1-3])\.([01])\.(.+)", target)
    if m:
        return f"stages.{int(m.group(1)) - 1}.downsample.proj.{m.group(2)}.{m.group(3)}", "copy"
    m = re.fullmatch(r"norms\.3\.(.+)", target)
    if m:
        return f"norm.{m.group(1)}", "final norm"
    m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", target)
    if not m:
        return None
    block, rest = f"stages.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
    if rest.startswith("cpe."):
        return block + "pos_embed." + rest[len("cpe."):], "copy"
    for fias, kind in (("attn.qkv.", "qkv"), ("attn.q.", "q"), ("attn.kv.", "kv")):
        if rest.startswith(fias):
            return block + "attn.qkv." + rest[len(fias):], kind
    return block + rest, "copy"


_NOTES = {"final norm": "DilateFormer's final norm, after stage 4 as in FIAS", "q": "query rows of qkv split off",
          "kv": "key and value rows of qkv split off"}


def _converted(kind: str, value: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The checkpoint tensor as FIAS stores it (identical values), and a note on what changed in form."""
    note = _NOTES.get(kind, "")
    if kind in ("qkv", "q", "kv") and value.ndim == 4 and value.shape[2:] == (1, 1):
        value, note = value.flatten(1), (note + ", " if note else "") + "1x1 conv weight as Linear"
    if kind in ("q", "kv"):
        third = value.shape[0] // 3
        value = value[:third] if kind == "q" else value[third:]
    return value, note


def _adapt_stem(value: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, str]:
    with warnings.catch_warnings():
        # timm's import applies torch.jit.interface, which recent torch deprecates with a FutureWarning.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.interface.* is deprecated", category=FutureWarning)
        from timm.models import adapt_input_conv

    if in_channels == 1:
        rule = "RGB weights summed for 1 input channel"
    else:
        rule = f"RGB weights repeated cyclically over {in_channels} input channels and scaled by 3/{in_channels}"
    return adapt_input_conv(in_channels, value.clone()), rule


def _bare(net: nn.Module) -> nn.Module:
    if isinstance(net, DistributedDataParallel):
        net = net.module
    if isinstance(net, OptimizedModule):
        net = net._orig_mod
    return net


# ---------------------------------------------------------------------------------------------------- loading
def _read(path_or_state_dict, source: str | None) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(path_or_state_dict, Mapping):
        source = source or "the state dict"
        return source, _unwrap(path_or_state_dict, source)
    source = source or os.fspath(path_or_state_dict)
    return source, read_dilateformer_checkpoint(path_or_state_dict)


def _transfer_plan(net: nn.Module, sd: Mapping[str, torch.Tensor], source: str):
    """Every check of :func:`load_dilateformer_weights` and what it would copy; raises ``ValueError`` on a misfit.

    Nothing is copied: the plan pairs each target tensor with its value.
    """
    fias = _bare(net)
    branch = getattr(getattr(fias, "encoder", None), "global_branch", None)
    if branch is None:
        raise ValueError(f"load_dilateformer_weights needs a FIAS network, got {type(fias).__name__}")
    layout = dilateformer_layout(sd)
    widths = [norm.normalized_shape[0] for norm in branch.norms]
    check_layout(layout, widths, [len(stage) for stage in branch.stages], source)

    targets = branch.state_dict()
    in_channels = branch.stem[0][0].in_channels
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    loaded, adapted, not_pretrained, used, problems = [], [], [], set(), []
    for key, target in targets.items():
        mapped = _source_key(key)
        full = _GLOBAL_PREFIX + key
        if mapped is None:
            not_pretrained.append(full)
            continue
        src_key, kind = mapped
        if src_key not in sd:
            problems.append(f"it lacks '{src_key}' (for {full})")
            continue
        used.add(src_key)
        value, note = _converted(kind, sd[src_key])
        bucket = loaded
        if key == "stem.0.0.weight" and value.shape[1] != in_channels:
            if value.shape[1] != 3:
                problems.append(f"'{src_key}' takes {value.shape[1]} input channels, the network {in_channels} "
                                "(only RGB weights are adapted)")
                continue
            value, note = _adapt_stem(value, in_channels)
            bucket = adapted
        if value.shape != target.shape:
            problems.append(f"'{src_key}' has shape {tuple(sd[src_key].shape)}, which does not fit {full} "
                            f"{tuple(target.shape)}")
            continue
        plan.append((target, value))
        bucket.append(Transfer(src_key, full, target.numel(), note))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{source}: {layout.describe()} does not fit the network: {'; '.join(problems[:3])}{more}")
    skipped = [(k, "ImageNet classifier: FIAS has segmentation heads instead" if k.startswith("head.")
                else "no counterpart in FIAS") for k in sd if k not in used]
    return plan, LoadReport(source, layout, tuple(loaded), tuple(adapted), tuple(skipped), tuple(not_pretrained))


def check_dilateformer_weights(net: nn.Module, path_or_state_dict: str | os.PathLike | Mapping,
                               source: str | None = None) -> None:
    """Every check :func:`load_dilateformer_weights` makes, without copying anything.

    Only keys and shapes are compared and ``net`` is left unchanged, so a trainer can check a checkpoint against a
    copy of its network before it writes anything. Raises as :func:`load_dilateformer_weights` does.
    """
    source, sd = _read(path_or_state_dict, source)
    _transfer_plan(net, sd, source)


def load_dilateformer_weights(net: nn.Module, path_or_state_dict: str | os.PathLike | Mapping,
                              source: str | None = None) -> LoadReport:
    """Copy an official DilateFormer ImageNet checkpoint into the global branch of the FIAS network ``net``.

    Args:
        net: a :class:`~nnunetv2_fias.architectures.FIAS` (DDP / torch.compile wrappers are looked through).
        path_or_state_dict: the checkpoint file, or its content (``{'model': sd}`` or ``sd``; ``module.`` prefixes
            are stripped).
        source: how the report and errors name the checkpoint (default: the path, or "the state dict").

    Returns:
        A :class:`LoadReport`. See the module docstring for the mapping and the input-channel rule.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file, not a DilateFormer checkpoint, another model size than the network's (the
            message names both), or a tensor whose shape does not fit. The network is unchanged then.
    """
    source, sd = _read(path_or_state_dict, source)
    plan, report = _transfer_plan(net, sd, source)
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)
    return report


def layout_of_preset(preset: str, overrides: Mapping | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Widths and global depths a FIAS with ``preset`` and keyword ``overrides`` builds (without building it)."""
    overrides = dict(overrides or {})
    cfg = FIAS_PRESETS[preset]
    return (tuple(overrides.get("widths", cfg["widths"])), tuple(overrides.get("global_depths", cfg["global_depths"])))


__all__ = ["DILATEFORMER_SIZES", "DilateFormerLayout", "LoadReport", "Transfer", "check_dilateformer_weights",
           "check_layout", "dilateformer_layout",
           "layout_of_preset", "load_dilateformer_weights", "read_dilateformer_checkpoint"]
