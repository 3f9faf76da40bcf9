"""A deterministic synthetic brain-tumour phantom written as a BraTS-layout NIfTI dataset.

It is the built-in default dataset, so that every entry point runs without downloading BraTS.
Each case: an ellipsoidal head (bright scalp, dark skull), a brain with grey/white-matter texture
and CSF (ventricles and a rim), and a tumour of nested regions, ET subset of TC subset of WT:
  label 2 oedema (outer blob), label 4 enhancing tumour (a shell), label 1 necrotic core (centre).
Four modalities with MRI-like contrasts, a smooth bias field and Rician noise; background
(outside the head) exactly 0, as in skull-stripped BraTS. Stored as int16 (like most scanners'
output) with the seg as uint8.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np
import scipy.ndimage as ndi

from ssl3d_jax.data.brats import MODALITIES
from ssl3d_jax.data.nifti import save_nifti

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (80, 96, 72)
DEFAULT_SPACING = (1.2, 1.0, 1.5)
_VERSION = "v1"

# Tissue -> mean intensity per modality (t1, t1ce, t2, flair), relative to white matter in T1.
# Roughly: T1 WM > GM > CSF, tumour hypo-intense; T1ce like T1 but enhancing tumour very bright;
# T2 CSF and oedema bright; FLAIR CSF suppressed, oedema bright.
_TISSUES = {
    "scalp": (0.90, 0.90, 0.50, 0.60),
    "skull": (0.05, 0.05, 0.05, 0.05),
    "csf": (0.15, 0.15, 1.00, 0.10),
    "gm": (0.60, 0.62, 0.55, 0.60),
    "wm": (0.85, 0.86, 0.35, 0.45),
    "oedema": (0.45, 0.46, 0.90, 0.95),
    "enhancing": (0.45, 1.30, 0.70, 0.75),
    "necrosis": (0.30, 0.30, 0.85, 0.50),
}


def _smooth_field(rng: np.random.Generator, shape, coarse: int = 8) -> np.ndarray:
    """float32 `shape`, zero mean, unit std, smooth on the scale of ~shape/coarse voxels."""
    # Filtering a coarse grid and upsampling is ~100x cheaper than filtering at full size.
    small = [max(3, s // coarse + 2) for s in shape]
    f = ndi.gaussian_filter(rng.standard_normal(small), sigma=1.0, mode="wrap")
    f = ndi.zoom(f, [s / c for s, c in zip(shape, small)], order=1, grid_mode=True, mode="nearest")
    f = f[: shape[0], : shape[1], : shape[2]]
    return ((f - f.mean()) / (f.std() + 1e-8)).astype(np.float32)


def phantom_affine(shape, spacing) -> np.ndarray:
    """float64 [4, 4]: voxel spacing, a small oblique rotation, origin at the volume centre.

    Axis 0 is stored left-to-right flipped (LAS, as many DICOM conversions are) so readers must
    reorient; the rotation is small enough that the closest canonical orientation is unambiguous.
    """
    ax, az = np.deg2rad(4.0), np.deg2rad(7.0)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    lin = rz @ rx @ np.diag(np.asarray(spacing, np.float64) * np.array([-1.0, 1.0, 1.0]))
    centre = (np.asarray(shape, np.float64) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = -lin @ centre
    return affine


TISSUE_NAMES = tuple(_TISSUES)


def make_phantom_case(
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    *,
    seed: int = 0,
    index: int = 0,
    return_tissues: bool = False,
):
    """One case in RAS voxel order.

    Returns:
      (image float32 [D, H, W, 4] in MODALITIES order, >= 0, exactly 0 outside the head;
       seg uint8 [D, H, W] with values in {0, 1, 2, 4}), plus, if `return_tissues`,
      tissues int8 [D, H, W]: index into TISSUE_NAMES, -1 outside the head.
    """
    rng = np.random.default_rng([seed, index])
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, np.float64)
    # World-mm coordinates from the volume centre, so shapes are round in space whatever the
    # voxel spacing.
    coords = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * sp for n, sp in zip(shape, spacing)]
    x, y, z = np.meshgrid(*coords, indexing="ij", sparse=True)
    half = np.asarray(shape) * spacing / 2

    # Head: ellipsoid with a smoothly perturbed boundary.
    head_axes = half * rng.uniform(0.84, 0.92, 3)
    r_head = np.sqrt((x / head_axes[0]) ** 2 + (y / head_axes[1]) ** 2 + (z / head_axes[2]) ** 2)
    r_head = r_head * (1 + 0.03 * _smooth_field(rng, shape, coarse=6))
    head = r_head < 1.0
    brain_frac = rng.uniform(0.80, 0.84)
    brain = r_head < brain_frac
    r_brain = r_head / brain_frac  # 1 at the brain surface

    texture = _smooth_field(rng, shape, coarse=4)
    # Integer tissue map (index into _TISSUES order; -1 outside the head).
    names = list(_TISSUES)
    tmap = np.zeros(shape, np.int8) - 1
    tmap[head] = names.index("scalp")
    tmap[(r_head < 0.93) & head] = names.index("skull")
    tmap[r_brain < 1.0] = names.index("csf")
    # WM dominates deep, GM near the cortex: threshold a smooth field plus a depth ramp.
    wm = (texture + 2.2 * (0.9 - r_brain)) > 0.3
    tmap[(r_brain < 0.95) & ~wm] = names.index("gm")
    tmap[(r_brain < 0.95) & wm] = names.index("wm")
    # Lateral ventricles: two small ellipsoids beside the midline.
    v_axes = half * brain_frac * np.array([0.10, 0.28, 0.14]) * rng.uniform(0.8, 1.2, 3)
    v_off = half[0] * brain_frac * rng.uniform(0.12, 0.18)
    for sign in (-1, 1):
        rv = ((x - sign * v_off) / v_axes[0]) ** 2 + (y / v_axes[1]) ** 2 + (z / v_axes[2]) ** 2
        tmap[(rv < 1.0) & brain] = names.index("csf")

    # Tumour radii in mm, with minimums of a voxel and a bit per layer so that every label
    # exists even in tiny test volumes.
    brain_r = float((half * brain_frac * head_axes / half).min())
    vox = float(spacing.max())
    r_wt = rng.uniform(0.35, 0.55) * brain_r
    r_tc = rng.uniform(0.55, 0.75) * r_wt
    r_nec = rng.uniform(0.35, 0.6) * r_tc
    r_nec = max(r_nec, 1.25 * vox)
    r_tc = max(r_tc, r_nec + 1.25 * vox)
    r_wt = max(r_wt, r_tc + 1.5 * vox)
    # Centre inside the brain, in a random hemisphere (sign of the left-right axis).
    room = max(0.0, 1.0 - 1.1 * r_wt / brain_r)
    direction = rng.standard_normal(3)
    direction[0] = rng.choice([-1.0, 1.0]) * (abs(direction[0]) + 0.5)
    direction /= np.linalg.norm(direction)
    centre = direction * rng.uniform(0.3, 1.0) * room * half * brain_frac * head_axes / half
    d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    # Irregular boundaries: the same radial perturbation for all layers keeps them nested.
    d = d / (1 + 0.2 * np.clip(_smooth_field(rng, shape, coarse=5), -1, 1))
    seg = np.zeros(shape, np.uint8)
    seg[(d < r_wt) & head] = 2
    seg[(d < r_tc) & head] = 4
    seg[(d < r_nec) & head] = 1
    tmap[seg == 2] = names.index("oedema")
    tmap[seg == 4] = names.index("enhancing")
    tmap[seg == 1] = names.index("necrosis")

    # Per-case contrast jitter, then texture, bias field and Rician noise.
    table = np.asarray([_TISSUES[n] for n in names], np.float32)  # [T, 4]
    table = table * rng.uniform(0.93, 1.07, table.shape).astype(np.float32)
    scale = np.float32(rng.uniform(700, 1100))
    base = table[np.maximum(tmap, 0)]  # [D, H, W, 4]
    bias = np.exp(0.12 * _smooth_field(rng, shape, coarse=16))[..., None]
    signal = base * (1 + 0.05 * texture[..., None]) * bias * scale
    sigma = 0.025 * scale
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    image = np.sqrt((signal + n1) ** 2 + n2**2)
    image[~head] = 0.0
    if return_tissues:
        return image.astype(np.float32), seg, tmap
    return image.astype(np.float32), seg


def write_brats_phantom(
    root: str | os.PathLike,
    *,
    num_cases: int,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    seed: int = 0,
) -> list[pathlib.Path]:
    """Writes `num_cases` phantom cases as `<root>/Phantom_XXX/Phantom_XXX_{mod,seg}.nii.gz`.

    Images are int16 (rounded intensities), seg uint8. Deterministic in (shape, spacing, seed);
    case i depends only on (seed, i). Returns the case folders, sorted.
    """
    root = pathlib.Path(root)
    affine = phantom_affine(shape, spacing)
    folders = []
    for i in range(num_cases):
        name = f"Phantom_{i:03d}"
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        image, seg = make_phantom_case(shape, spacing, seed=seed, index=i)
        # Store LAS: flip axis 0 to match the affine's negative x (see phantom_affine).
        image, seg = image[::-1], seg[::-1]
        for c, m in enumerate(MODALITIES):
            vol = np.clip(np.rint(image[..., c]), 0, np.iinfo(np.int16).max).astype(np.int16)
            save_nifti(folder / f"{name}_{m}.nii.gz", vol, affine)
        save_nifti(folder / f"{name}_seg.nii.gz", np.ascontiguousarray(seg), affine)
        folders.append(folder)
    return folders


def default_dataset_root(
    *, num_cases: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, seed: int = 0
) -> pathlib.Path:
    """The phantom dataset used when `config.data.root` is unset; generated on first use.

    Lives in `$SSL3D_JAX_CACHE` (default `~/.cache/ssl3d_jax`) under
    `brats_phantom-v1-<hash of the parameters>`. Generated into a temp folder beside it and
    renamed into place, so a killed run never leaves a half dataset under the final name, and a
    concurrent creator that loses the rename race just uses the winner's copy.
    """
    params = {
        "num_cases": int(num_cases),
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "seed": int(seed),
        "version": _VERSION,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    cache = pathlib.Path(
        os.environ.get("SSL3D_JAX_CACHE") or pathlib.Path.home() / ".cache" / "ssl3d_jax"
    )
    final = cache / f"brats_phantom-{_VERSION}-{digest}"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    msg = f"Writing phantom BraTS dataset ({num_cases} cases, shape {tuple(shape)}) to {final}"
    log.info(msg)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        write_brats_phantom(tmp, num_cases=num_cases, shape=shape, spacing=spacing, seed=seed)
        (tmp / "params.json").write_text(json.dumps(params, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): use theirs.
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
