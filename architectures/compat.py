"""Loading FIAS checkpoints: one that does not fit says what changed (decoder, stem, classes, preset) instead of
listing every tensor."""
from __future__ import annotations

from torch import nn


class CheckpointMismatchError(RuntimeError):
    """A state dict that does not fit the FIAS network it is loaded into, with what differs in words."""


def _group(keys) -> str:
    groups = sorted({".".join(k.split(".")[:3]) for k in keys})
    return ", ".join(groups[:6]) + (f" and {len(groups) - 6} more" if len(groups) > 6 else "")


def _stage_widths(shapes: dict) -> list[int]:
    """Channels of each stage, read from the input of its CAF fusion (as far as the state dict has them)."""
    return [shape[1] for key, shape in sorted(shapes.items())
            if key.startswith("encoder.fusions.") and key.endswith(".squeeze.0.weight")]


def check_checkpoint_fits(net: nn.Module, state_dict: dict) -> None:
    """Raise :class:`CheckpointMismatchError` naming what changed when ``state_dict`` does not fit ``net`` exactly."""
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    reshaped = [k for k in own if k in theirs and own[k] != theirs[k]]
    if not (missing or unexpected or reshaped):
        return
    reasons = []
    if any(k.startswith("decoder.stem_stages.") for k in missing):
        reasons.append("the checkpoint has no full-resolution decoder stages: it was trained with "
                       "full_resolution_decoder=False; build the network that way")
    if any(k.startswith("decoder.stem_stages.") for k in unexpected):
        reasons.append("the checkpoint has full-resolution decoder stages, this network has none "
                       "(full_resolution_decoder=False)")
    widths = _stage_widths(own), _stage_widths(theirs)
    if widths[0] != widths[1]:
        reasons.append(f"the stage widths differ (checkpoint {widths[1]}, network {widths[0]}): another preset, or FIAS "
                       "sized by the plan on one side only (FIASTrainer_planSized narrows FIAS on patches under "
                       "128x128; FIASTrainer keeps the preset)")
    elif any(k.startswith("encoder.global_branch.stem.") for k in missing + unexpected + reshaped):
        reasons.append("the global branch's stem differs: this network uses DilateFormer's official stem "
                       f"(stem_width={net.encoder.stem_channels[0]}); build it with the checkpoint's stem_width")
    head = "decoder.seg_layers.1.weight"
    if head in own and head in theirs and own[head][0] != theirs[head][0]:
        reasons.append(f"the number of output channels differs (checkpoint {theirs[head][0]}, network "
                       f"{own[head][0]}); to fine-tune into another label set use nnUNetv2_train -pretrained_weights, "
                       "which skips the segmentation heads")
    if not reasons:
        reasons.append("the preset or the network arguments (widths, depths, heads, kernels) differ")
    details = []
    if missing:
        details.append(f"{len(missing)} tensors missing ({_group(missing)})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected ({_group(unexpected)})")
    if reshaped:
        first = reshaped[0]
        details.append(f"{len(reshaped)} with other shapes (e.g. {first}: checkpoint {list(theirs[first])}, network "
                       f"{list(own[first])})")
    raise CheckpointMismatchError("This checkpoint does not fit the FIAS network built here: " + "; ".join(reasons)
                                  + ". " + "; ".join(details) + ".")
