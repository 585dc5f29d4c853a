"""Synthetic abdominal CT phantoms written in the Synapse (BTCV) release layout.

The demo and the tests need Synapse-shaped data without downloading anything. This module draws small,
deterministic "abdomens": an elliptic body with fat, muscle wall, spine and bowel, and the 13 labelled organs of
the Multi-Atlas Abdomen Labeling challenge at plausible positions, sizes and contrast-enhanced HU values, with
smooth shape deformation, intensity texture, partial-volume blur and noise that vary between cases. Files are
written exactly where the real release puts them::

    RawData/Training/img/img0001.nii.gz      30 labelled cases: 0001-0010 and 0021-0040
    RawData/Training/label/label0001.nii.gz  uint8, values 0..13 (Synapse label numbering)
    RawData/Testing/img/img0061.nii.gz       20 unlabelled cases: 0061-0080

Every case is drawn from its own random stream seeded by ``(seed, case number)``, so a case does not depend on
which other cases are generated, and the same seed always gives the same arrays.

The anatomy is defined in millimetres, so any grid size gives the same abdomen (the in-plane spacing is
``365 mm / size``; body size, organ positions, sizes, shapes, intensities, noise level and slice thickness vary
between cases). The default 96x96x16 grid is about 4 mm in-plane and 5 mm between slices: coarse, but every
one of the 13 organs is present in every case.

Example:
    >>> from nnunetv2_fias.phantoms import write_synapse_phantoms
    >>> raw = write_synapse_phantoms("/tmp/phantoms", seed=0)   # -> /tmp/phantoms/RawData
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from nnunetv2_fias._util import staged_directory

# Synapse label numbering (raw release values).
SYNAPSE_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic vein",
    11: "pancreas",
    12: "right adrenal",
    13: "left adrenal",
}
# Case numbers of the real release: 0011-0020 do not exist.
TRAINING_CASES: tuple[int, ...] = tuple(range(1, 11)) + tuple(range(21, 41))
TESTING_CASES: tuple[int, ...] = tuple(range(61, 81))

DEFAULT_SIZE: tuple[int, int, int] = (96, 96, 16)
_FOV_MM = 365.0  # in-plane field of view; the real scans' 512 x ~0.71 mm
_SLAB_MM = 80.0  # cranio-caudal extent covered by the slices (compressed abdomen)


@dataclass(frozen=True)
class Phantom:
    """One generated case.

    Attributes:
        image: int16 HU array, shape (z, y, x) (SimpleITK order; the file is x, y, z like the real release).
        label: uint8 array of Synapse label values, same shape; None for Testing cases.
        spacing: voxel spacing in mm as (x, y, z).
    """

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (drives shape deformation and texture)."""
    f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma_vox, mode="wrap")
    f -= f.mean()
    std = float(f.std())
    return f / std if std > 0 else f


class _Grid:
    """Physical coordinates (mm) of a (z, y, x) grid, body-centred; t in [0, 1] runs cranial -> caudal."""

    def __init__(self, size_xyz: tuple[int, int, int], spacing: tuple[float, float, float], t_shift: float):
        nx, ny, nz = size_xyz
        sx, sy, sz = spacing
        x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx
        y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy
        t = (np.arange(nz, dtype=np.float32) + 0.5) / nz + t_shift
        self.shape = (nz, ny, nx)
        self.x = x[None, None, :]
        self.y = y[None, :, None]
        self.t = t[:, None, None]
        self.spacing = spacing


def _profile(t: np.ndarray, t0: float, t1: float, power: float = 0.35) -> np.ndarray:
    """Size factor along z: 1 in the middle of [t0, t1], falling to 0 at its ends (rounded organ poles)."""
    mid, half = (t0 + t1) / 2, (t1 - t0) / 2
    u = np.clip(1 - ((t - mid) / half) ** 2, 0, None)
    return u**power


def _ellipsoid(g: _Grid, cx, cy, ax, ay, t0, t1, angle=0.0, deform=None, amp=0.0, power=0.35, drift=(0.0, 0.0)):
    """Mask of a deformed ellipse swept along z with a rounded profile; centre may drift with t (mm per unit t)."""
    s = _profile(g.t, t0, t1, power)
    dx = g.x - (cx + drift[0] * (g.t - t0))
    dy = g.y - (cy + drift[1] * (g.t - t0))
    c, sn = np.cos(angle), np.sin(angle)
    u, v = c * dx + sn * dy, -sn * dx + c * dy
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt((u / (ax * s + 1e-6)) ** 2 + (v / (ay * s + 1e-6)) ** 2)
    limit = 1.0 + (amp * deform if deform is not None else 0.0)
    return (r < limit) & (s > 0.05)


def _capsule(g: _Grid, p0, p1, radius, t0, t1, deform=None, amp=0.0):
    """Mask of a thick in-plane segment p0 -> p1 (mm), present for t in [t0, t1]."""
    px, py = g.x - p0[0], g.y - p0[1]
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    h = np.clip((px * vx + py * vy) / (vx * vx + vy * vy), 0, 1)
    d = np.sqrt((px - h * vx) ** 2 + (py - h * vy) ** 2)
    limit = radius * (1.0 + (amp * deform if deform is not None else 0.0))
    return (d < limit) & (g.t >= t0) & (g.t <= t1)


def _jitter(rng: np.random.Generator):
    """``jit(scale)``: one normal draw from the case's stream (the order of draws fixes the phantom)."""
    return lambda scale: float(rng.normal(0.0, scale))


def _paint_organs(g: _Grid, rng: np.random.Generator, deform: list, inside: np.ndarray, org_s: float):
    """The label map of the 13 organs, and the stomach's full mask (for the gastric air)."""
    jit = _jitter(rng)
    shape = g.shape
    label = np.zeros(shape, np.uint8)

    def paint(mask: np.ndarray, value: int) -> None:
        label[mask & inside] = value

    # Painting order: later organs win where shapes touch (small vessels and tubes on top).
    # Liver: large, patient right (small x), tapering caudally.
    paint(_ellipsoid(g, -55 * org_s + jit(5), -5 + jit(5), 72 * org_s, 80 * org_s, -0.35 + jit(0.03), 0.78 + jit(0.03),
                     angle=0.25 + jit(0.08), deform=deform[0], amp=0.12, power=0.5, drift=(15, 0)), 6)
    # Spleen: patient left, posterior, cranial.
    paint(_ellipsoid(g, 82 * org_s + jit(4), 45 + jit(4), 26 * org_s, 48 * org_s, -0.05 + jit(0.03), 0.55 + jit(0.03),
                     angle=-0.5 + jit(0.1), deform=deform[1], amp=0.12), 1)
    # Stomach: patient left, anterior (gastric air added below).
    stomach = _ellipsoid(g, 45 + jit(5), -38 + jit(5), 48 * org_s, 34 * org_s, -0.15 + jit(0.03), 0.6 + jit(0.03),
                         angle=0.3 + jit(0.1), deform=deform[2], amp=0.15, drift=(-20, 10))
    paint(stomach, 7)
    # Gallbladder: under the liver, anterior.
    paint(_ellipsoid(g, -42 + jit(4), -48 + jit(4), 15, 22, 0.4 + jit(0.03), 0.85 + jit(0.03),
                     angle=0.6 + jit(0.15), deform=deform[1], amp=0.1), 4)
    # Pancreas: an oblique band towards the spleen; portal/splenic vein runs along it, a little more cranial.
    paint(_capsule(g, (-12 + jit(3), 18 + jit(3)), (62 + jit(4), 30 + jit(4)), 9.0 * org_s,
                   0.45 + jit(0.03), 0.78 + jit(0.03), deform=deform[2], amp=0.2), 11)
    paint(_capsule(g, (-32 + jit(3), 8 + jit(3)), (50 + jit(4), 16 + jit(3)), 5.5,
                   0.32 + jit(0.02), 0.46 + jit(0.02)), 10)
    # Kidneys (right 2, left 3), posterior and caudal; adrenals (right 12, left 13) above them.
    for value, side in ((2, -1), (3, 1)):
        paint(_ellipsoid(g, side * 66 * org_s + jit(4), 62 + jit(4), 24 * org_s, 32 * org_s, 0.42 + jit(0.04),
                         1.2 + jit(0.04), angle=side * 0.45 + jit(0.1), deform=deform[0], amp=0.08), value)
    for value, side in ((12, -1), (13, 1)):
        paint(_ellipsoid(g, side * 44 + jit(3), 50 + jit(3), 11, 7, 0.22 + jit(0.03), 0.5 + jit(0.03),
                         angle=side * 0.9 + jit(0.15)), value)
    # Inferior vena cava and aorta in front of the spine, through all slices; esophagus only cranially.
    paint(_ellipsoid(g, -22 + jit(3), 50 + jit(3), 12, 9, -0.5, 1.5), 9)
    aorta = _ellipsoid(g, 10 + jit(3), 57 + jit(3), 11, 11, -0.5, 1.5, drift=(4, 0))
    paint(aorta, 8)
    paint(_ellipsoid(g, 16 + jit(3), 40 + jit(3), 8, 7, -0.5, 0.3 + jit(0.03), power=0.1), 5)

    return label, stomach


def _tissue_background(g: _Grid, rng: np.random.Generator, deform: list, body: np.ndarray, wall: np.ndarray,
                       rb: np.ndarray, inside: np.ndarray, label: np.ndarray):
    """The HU image of the unlabelled tissue (fat, wall, skin, spine, muscles, bowel) and its texture field."""
    shape, spacing = g.shape, g.spacing
    tex = _smooth_field(rng, shape, [max(0.5, 4.0 / spacing[2]), 4.0 / spacing[1], 4.0 / spacing[0]])
    image = np.full(shape, -1000.0, np.float32)
    image[body] = -95.0 + 12.0 * tex[body]
    image[wall] = 50.0 + 8.0 * tex[wall]
    image[body & (rb >= 0.985)] = 30.0  # skin
    r_vert = np.broadcast_to(np.sqrt((g.x / 18.0) ** 2 + ((g.y - 88.0) / 17.0) ** 2), shape)
    image[r_vert < 1.0] = 250.0 + 40.0 * tex[r_vert < 1.0]
    image[(r_vert >= 0.8) & (r_vert < 1.0)] = 650.0
    for side in (-1, 1):
        m = _ellipsoid(g, side * 38, 98, 20, 15, -0.5, 1.5, deform=deform[1], amp=0.1) & body
        image[m] = 55.0 + 8.0 * tex[m]
    free = inside & (label == 0) & (g.y < 45) & (g.t > 0.35)
    bowel = free & (deform[2] > 0.4)
    image[bowel] = 25.0 + 15.0 * tex[bowel]
    image[bowel & (tex > 1.4)] = -750.0  # gas

    return image, tex


def _organ_intensities(image: np.ndarray, label: np.ndarray, tex: np.ndarray, rng: np.random.Generator, g: _Grid,
                       stomach: np.ndarray) -> None:
    """Organ HU values in ``image``, in place: contrast-enhanced portal-venous phase, with per-case offsets."""
    jit = _jitter(rng)
    spacing = g.spacing
    hu = {1: 120, 2: 185, 3: 185, 4: 12, 5: 45, 6: 100, 7: 40, 8: 230, 9: 155, 10: 175, 11: 75, 12: 35, 13: 35}
    offset = jit(8.0)
    for value, mean in hu.items():
        m = label == value
        image[m] = mean + offset + jit(8.0) + 10.0 * tex[m]
    for value in (2, 3):  # kidney medulla: darker core
        m = label == value
        core = m & (gaussian_filter(m.astype(np.float32), sigma=[0.5, 6.0 / spacing[1], 6.0 / spacing[0]]) > 0.85)
        image[core] -= 60.0
    air = stomach & (label == 7) & (g.y < -38 - 12) & (g.t < 0.3)
    image[air] = -700.0  # gastric air (still stomach)


def generate_phantom(case_id: int, seed: int = 0, size: Sequence[int] = DEFAULT_SIZE, labelled: bool = True) -> Phantom:
    """Draw one synthetic abdominal CT.

    Args:
        case_id: Synapse case number (e.g. 1 for img0001); seeds the case's own random stream.
        seed: global seed; the same (seed, case_id, size) always gives the same arrays.
        size: grid size (x, y, z) in voxels; the anatomy is in mm, so spacing follows the size.
        labelled: whether to return the label map (Testing cases of the real release have none).

    Returns:
        The phantom (image in HU as int16, label as uint8 with Synapse values, spacing).

    Raises:
        ValueError: for a size smaller than 16x16x4 or a negative case number or seed.
    """
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size[:2]) < 16 or size[2] < 4:
        raise ValueError(f"phantom size must be (x, y, z) with x, y >= 16 and z >= 4, got {size}")
    if case_id < 0 or seed < 0:
        raise ValueError(f"case_id and seed must be non-negative, got case_id={case_id}, seed={seed}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(case_id)]))
    nx, ny, nz = size
    # In-plane spacing is the same for every case: nnU-Net's 2D patch is the median resampled size, so varying it
    # would give half the cases more than one sliding-window tile per slice. Bodies vary in size instead.
    s_inplane = _FOV_MM / max(nx, ny)
    spacing = (float(s_inplane), float(s_inplane), float(_SLAB_MM / nz * rng.choice([0.9, 1.0, 1.1])))
    g = _Grid(size, spacing, t_shift=float(rng.uniform(-0.04, 0.04)))
    shape = g.shape
    sig = [max(0.6, 12.0 / spacing[2]), 18.0 / spacing[1], 18.0 / spacing[0]]  # ~18 mm correlation
    deform = [_smooth_field(rng, shape, sig) for _ in range(3)]

    body_s = rng.uniform(0.9, 1.05)
    bx, by = 150.0 * body_s * rng.uniform(0.95, 1.05), 112.0 * body_s * rng.uniform(0.95, 1.05)
    rb = np.sqrt((g.x / bx) ** 2 + ((g.y - 5.0) / by) ** 2) + 0.03 * deform[0]
    body = rb < 1.0
    wall = body & (rb > 0.84) & (rb < 0.9)
    inside = rb <= 0.84  # organs stay inside the abdominal wall
    org_s = body_s * rng.uniform(0.92, 1.08)  # organs scale with the body, with their own variation

    label, stomach = _paint_organs(g, rng, deform, inside, org_s)
    image, tex = _tissue_background(g, rng, deform, body, wall, rb, inside, label)
    _organ_intensities(image, label, tex, rng, g, stomach)

    image = gaussian_filter(image, sigma=[0.0, 0.6, 0.6])  # partial volume in-plane
    image += rng.normal(0.0, rng.uniform(8.0, 16.0), shape).astype(np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return Phantom(image=image, label=label if labelled else None, spacing=spacing)


def _write_nifti(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(array.shape[::-1], spacing)))
    sitk.WriteImage(img, str(path), useCompression=True)


def write_synapse_phantoms(
    out_dir: str | os.PathLike,
    seed: int = 0,
    size: Sequence[int] = DEFAULT_SIZE,
    training_cases: Iterable[int] = TRAINING_CASES,
    testing_cases: Iterable[int] = TESTING_CASES,
    overwrite: bool = False,
) -> Path:
    """Write phantoms in the Synapse release layout under ``out_dir/RawData``.

    The folder is built next to its final place and renamed at the end, so an interrupted run never leaves a
    half-written ``RawData``.

    Args:
        out_dir: parent folder; created if missing.
        seed: global seed (see :func:`generate_phantom`).
        size: grid size (x, y, z).
        training_cases: labelled case numbers (default: the release's 30).
        testing_cases: unlabelled case numbers (default: the release's 20; pass () to skip ``Testing``).
        overwrite: replace an existing ``out_dir/RawData``.

    Returns:
        The path of ``RawData``.

    Raises:
        FileExistsError: ``out_dir/RawData`` exists and overwrite is False.
        ValueError: invalid size, seed or case numbers.
    """
    training_cases, testing_cases = sorted(set(training_cases)), sorted(set(testing_cases))
    for c in training_cases + testing_cases:
        if not 0 <= c <= 9999:
            raise ValueError(f"case numbers must be in 0..9999 (4 digits in the file name), got {c}")
    if set(training_cases) & set(testing_cases):
        both = sorted(set(training_cases) & set(testing_cases))
        raise ValueError(f"a case cannot be both Training and Testing: {both}")
    out_dir = Path(out_dir)
    final = out_dir / "RawData"
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    with staged_directory(final, overwrite=overwrite) as tmp:
        for sub in ("Training/img", "Training/label") + (("Testing/img",) if testing_cases else ()):
            (tmp / sub).mkdir(parents=True)
        for c in training_cases:
            p = generate_phantom(c, seed=seed, size=size)
            _write_nifti(p.image, p.spacing, tmp / "Training" / "img" / f"img{c:04d}.nii.gz")
            _write_nifti(p.label, p.spacing, tmp / "Training" / "label" / f"label{c:04d}.nii.gz")
        for c in testing_cases:
            p = generate_phantom(c, seed=seed, size=size, labelled=False)
            _write_nifti(p.image, p.spacing, tmp / "Testing" / "img" / f"img{c:04d}.nii.gz")
    return final


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected XxYxZ such as 96x96x16, got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """``python -m nnunetv2_fias.phantoms -o DIR``: write phantoms in the Synapse layout (DIR/RawData)."""
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_fias.phantoms", description=main.__doc__)
    parser.add_argument("-o", "--output", required=True, help="parent folder; RawData/ is written inside it")
    parser.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    parser.add_argument("--size", type=_parse_size, default=DEFAULT_SIZE, help="grid XxYxZ (default 96x96x16)")
    parser.add_argument("--no-testing", action="store_true", help="skip the 20 unlabelled Testing cases")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing RawData folder")
    args = parser.parse_args(argv)
    try:
        raw = write_synapse_phantoms(args.output, seed=args.seed, size=args.size,
                                     testing_cases=() if args.no_testing else TESTING_CASES,
                                     overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
