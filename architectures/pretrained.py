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

import os
import re
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from .dilateformer_checkpoint import (DilateFormerLayout, check_layout, dilateformer_layout,
                                     read_dilateformer_checkpoint, unwrap_state_dict)

_GLOBAL_PREFIX = "encoder.global_branch."


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
        return source, unwrap_state_dict(path_or_state_dict, source)
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


__all__ = ["LoadReport", "Transfer", "check_dilateformer_weights", "load_dilateformer_weights"]
