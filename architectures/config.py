"""FIAS's configuration: the presets and one frozen dataclass that resolves and validates the arguments once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .building_blocks.fusion import CAF_VARIANTS
from .building_blocks.helpers import per_axis

FIAS_PRESETS: dict[str, dict] = {
    # DilateFormer-Tiny/Small/Base layouts for the global branch.
    "T": dict(widths=(72, 144, 288, 576), global_depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
              local_depths=(2, 2, 2, 2)),
    "S": dict(widths=(72, 144, 288, 576), global_depths=(3, 5, 8, 3), num_heads=(3, 6, 12, 24),
              local_depths=(2, 2, 2, 2)),
    "B": dict(widths=(96, 192, 384, 768), global_depths=(4, 8, 10, 3), num_heads=(3, 6, 12, 24),
              local_depths=(3, 3, 3, 3)),
}
NUM_STAGES = 4
# Two downsamplings in the stems, one before each of stages 2-4.
NUM_DOWNSAMPLINGS = 5


def _per_stage(name: str, value, n: int = NUM_STAGES) -> tuple[int, ...]:
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} needs one value per stage ({n}), got {len(value)}: {value}")
    return value


@dataclass(frozen=True)
class FIASConfig:
    """FIAS's architecture arguments (see :class:`~nnunetv2_fias.architectures.FIAS` for their meaning).

    ``widths``, ``global_depths``, ``num_heads`` and ``local_depths`` left at None come from ``preset``; ``strides``
    left at None are 2 along every axis. After construction every field holds its resolved, normalised value
    (tuples of ints), and every bad value has raised a ValueError that names the argument.
    """

    input_channels: int
    num_classes: int
    ndim: int = 2
    preset: str = "T"
    widths: Optional[Sequence[int]] = None
    global_depths: Optional[Sequence[int]] = None
    num_heads: Optional[Sequence[int]] = None
    local_depths: Optional[Sequence[int]] = None
    msda_stages: Sequence[int] = (0, 1)
    dilations: Sequence = (1, 2, 3)
    kernel_size: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.1
    stem_width: int = 16
    dmk_kernel_sizes: Sequence = (3, 5, 7)
    dmk_expansion: float = 2.0
    caf_variant: str = "select"
    caf_reduction: int = 4
    decoder_kv_reduction: Sequence[int] = (4, 2, 1)
    mc_pool_sizes: Sequence[int] = (1, 2, 3)
    checkpoint_stages: Sequence[int] = (0, 1)
    strides: Optional[Sequence[Sequence[int]]] = None
    full_resolution_decoder: bool = False
    stage_kernel_sizes: Optional[Sequence[Sequence[int]]] = None

    def __post_init__(self):
        self._resolve_topology()
        self._check_stages()
        self._check_blocks()
        self._resolve_geometry()

    def _set(self, **values) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _resolve_topology(self) -> None:
        if self.preset not in FIAS_PRESETS:
            raise ValueError(f"preset must be one of {sorted(FIAS_PRESETS)}, got {self.preset!r}")
        if self.input_channels < 1 or self.num_classes < 1:
            raise ValueError(f"input_channels and num_classes must be >= 1, got {self.input_channels} and "
                             f"{self.num_classes}")
        for name, low in (("widths", 1), ("global_depths", 0), ("num_heads", 1), ("local_depths", 0)):
            given = getattr(self, name)
            value = _per_stage(name, FIAS_PRESETS[self.preset][name] if given is None else given)
            if min(value) < low:
                raise ValueError(f"{name} must be >= {low} per stage, got {value}")
            self._set(**{name: value})
        for s, (w, h) in enumerate(zip(self.widths, self.num_heads)):
            if w % h:
                raise ValueError(f"num_heads[{s}]={h} must divide widths[{s}]={w}")

    def _check_stages(self) -> None:
        for name in ("msda_stages", "checkpoint_stages"):
            stages = tuple(int(s) for s in getattr(self, name))
            if any(s not in range(NUM_STAGES) for s in stages):
                raise ValueError(f"{name} must hold stage indices 0..3, got {stages}")
            self._set(**{name: stages})
        dilations = tuple(self.dilations)
        if not dilations:
            raise ValueError(f"dilations must be a non-empty sequence of dilation rates, got {self.dilations!r}")
        for s in self.msda_stages:
            if self.num_heads[s] % len(dilations):
                raise ValueError(f"num_heads[{s}]={self.num_heads[s]} must be divisible by the number of dilation "
                                 f"rates {len(dilations)} (dilations={dilations}), since stage {s} uses MSDA")
        self._set(dilations=tuple(per_axis(d, self.ndim, "dilations") for d in dilations))
        kv = tuple(int(r) for r in self.decoder_kv_reduction)
        if len(kv) != NUM_STAGES - 1 or min(kv) < 1:
            raise ValueError(f"decoder_kv_reduction needs three factors >= 1 (strides 4, 8, 16), got {kv}")
        self._set(decoder_kv_reduction=kv)

    def _check_blocks(self) -> None:
        if self.caf_variant not in CAF_VARIANTS:
            raise ValueError(f"caf_variant must be one of {CAF_VARIANTS}, got {self.caf_variant!r}")
        if self.caf_reduction < 1:
            raise ValueError(f"caf_reduction must be >= 1, got {self.caf_reduction}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.stem_width < 1:
            raise ValueError(f"stem_width must be >= 1, got {self.stem_width}")
        flat = [v for k in self.dmk_kernel_sizes for v in (k if isinstance(k, (tuple, list)) else (k,))]
        if not self.dmk_kernel_sizes or any(k < 1 or k % 2 == 0 for k in flat):
            raise ValueError(f"dmk_kernel_sizes must be positive odd integers, got {tuple(self.dmk_kernel_sizes)}")
        kernel_size = per_axis(self.kernel_size, self.ndim, "kernel_size", odd=True)
        pools = tuple(int(k) for k in self.mc_pool_sizes)
        if not pools or any(k < 1 for k in pools):
            raise ValueError(f"mc_pool_sizes must be a non-empty sequence of integers >= 1, got {pools}")
        self._set(kernel_size=kernel_size, dmk_kernel_sizes=tuple(self.dmk_kernel_sizes), mc_pool_sizes=pools)

    def _resolve_geometry(self) -> None:
        ndim = self.ndim
        strides = ((2,) * ndim,) * NUM_DOWNSAMPLINGS if self.strides is None else tuple(
            tuple(int(v) for v in s) for s in self.strides)
        if len(strides) != NUM_DOWNSAMPLINGS or any(len(s) != ndim or min(s) < 1 for s in strides):
            raise ValueError(f"strides needs the per-axis strides ({ndim} values >= 1) of the five downsamplings (two "
                             f"in the stems, one before each of stages 2-4), got {self.strides}")
        kernels = None if self.stage_kernel_sizes is None else tuple(
            tuple(int(v) for v in k) for k in self.stage_kernel_sizes)
        if kernels is not None and (len(kernels) != NUM_STAGES or any(len(k) != ndim or min(k) < 1
                                                                      for k in kernels)):
            raise ValueError(f"stage_kernel_sizes needs one kernel size per axis ({ndim} values >= 1) per stage (4), "
                             f"got {self.stage_kernel_sizes}")
        self._set(strides=strides, stage_kernel_sizes=kernels)

    def dmk_kernels_per_stage(self) -> tuple[tuple, ...]:
        """Per stage, the DMK block's depthwise kernels: ``dmk_kernel_sizes``, with size 1 along the axes where the
        plan's kernel at that stage (``stage_kernel_sizes``) is 1 (thick slices nnU-Net does not convolve across)."""
        if self.stage_kernel_sizes is None:
            return (self.dmk_kernel_sizes,) * NUM_STAGES
        return tuple(tuple(tuple(1 if p == 1 else int(k) for p in plan) for k in self.dmk_kernel_sizes)
                     for plan in self.stage_kernel_sizes)
