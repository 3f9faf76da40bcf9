"""A deterministic synthetic brain-tumour phantom written as a BraTS-layout NIfTI dataset.

It is the built-in default dataset, so that every entry point runs without downloading BraTS.
Each case (RAS voxel order), in anatomical coordinates:
  * an egg-shaped head (bright scalp, dark skull): wider and flatter in front, narrower and
    rounder behind, a domed vault over a flat base;
  * a brain with grey/white-matter texture, a CSF rim, sulci and a midline falx; lateral
    ventricles anterior of centre (a body tapering back from wide frontal horns, narrow occipital
    horns) and a third ventricle; a cerebellum posterior-inferior (a flattened ellipsoid with
    finer GM/WM foliation, under a CSF tentorium); a tapered brainstem going down from the centre
    out through the inferior face, with the pons in front;
  * a tumour of nested regions, ET subset of TC subset of WT: label 2 oedema (outer blob), label 4
    enhancing tumour (a shell), label 1 necrotic core (centre). Anywhere in the brain, near the
    cortex or deep, either hemisphere; whole-tumour radius 0.15-0.55 of the brain's; an
    anisotropic, randomly oriented ellipsoid, sometimes with a second lobe, with an irregular
    boundary; tumour contrasts jittered more than normal tissue, enhancement from faint to strong.
    Every label is present even in tiny test volumes.
The anatomy is placed with a random pose (rotation up to +-12 degrees about each axis, shift up to
3% of the extent), applied to the coordinate grid before the shapes are computed; the head always
keeps background around it. Four modalities with MRI-like contrasts, a smooth bias field and
Rician noise; background (outside the head) exactly 0, as in skull-stripped BraTS. Stored as int16
(like most scanners' output) with the seg as uint8.

Why this anatomy (v2): the v1 phantom (centred ellipsoids, a centred ventricle pair) was symmetric
under a 180 degree turn about each axis, so the ten classes of the rotation task
(`tasks/rotation.py`) collapsed into four groups and no model could exceed 40% accuracy; it
differs top/bottom and front/back now (left/right stays roughly symmetric, as a brain is), which
tells all ten apart (`tests/test_phantom.py` measures it). v1's tumours were also too uniform in
place, size and shape for segmentation to mean much (two labelled cases nearly saturated
whole-tumour Dice), and every head had the same pose.
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
_VERSION = "v2"
# Pose of the anatomy: rotation up to this many degrees about each axis, shift up to this fraction
# of the extent per axis.
_POSE_DEGREES = 12.0
_POSE_SHIFT = 0.03
_BUMP = 0.04  # relative amplitude of the smooth bumps on the head / brain boundary
_FOLIA = 3.5  # cerebellar GM / WM leaves from the core to the surface
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
    # Filtering a coarse grid and upsampling is ~100x cheaper than filtering at full size; the
    # separable linear upsampling below is ~10x cheaper than ndi.zoom (and avoids BLAS, whose
    # threads crawl on a busy machine).
    small = [max(3, s // coarse + 2) for s in shape]
    f = ndi.gaussian_filter(rng.standard_normal(small), sigma=1.0, mode="wrap").astype(np.float32)
    for axis, n in enumerate(shape):
        f = _upsample_linear(f, n, axis)
    return ((f - f.mean()) / (f.std() + 1e-8)).astype(np.float32)


def _upsample_linear(f: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """`f` linearly interpolated to `n_out` samples along `axis`, the same as
    `ndi.zoom(order=1, grid_mode=True, mode="nearest")` along that axis."""
    n_in = f.shape[axis]
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(f.dtype).reshape([-1 if a == axis else 1 for a in range(f.ndim)])
    return np.take(f, lo, axis) * (1 - w) + np.take(f, hi, axis) * w


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


def _rotation(angles) -> np.ndarray:
    """float64 [3, 3]: rotation by `angles` (radians) about axes 0, 1 and 2, in that order."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """float64 [3, 3]: a uniformly random rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _fibonacci_sphere(n: int) -> np.ndarray:
    """float64 [n, 3]: n near-uniformly spread unit vectors (a Fibonacci spiral)."""
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = k * np.pi * (3 - np.sqrt(5))
    return np.stack([np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z], axis=1)


_SPHERE = _fibonacci_sphere(64)  # directions to test that a tumour core fits in the brain


def _egg_radius(x, y, z, axes, egg: float, base: float):
    """Normalised radius of the egg-shaped head (1 on its surface) at anatomical mm coordinates
    from its centre (x left-right, y posterior-anterior, z inferior-superior).

    `axes` are the semi-axes through the centre. Towards the front the left-right semi-axis grows
    by up to `egg` and the vertical one shrinks by up to `egg / 2` (wider and flatter), towards the
    back the reverse (narrower and rounder); below the centre the vertical semi-axis is `base`
    times as long (a flat skull base under a domed vault). Contained in the ellipsoid of semi-axes
    `axes * (1 + egg, 1, 1 + egg / 2)`.
    """
    ax, ay, az = (float(a) for a in axes)  # Python floats keep float32 arrays float32
    yn = np.clip(y / ay, -1.0, 1.0)
    sx = ax * (1 + egg * yn)
    sz = az * (1 - 0.5 * egg * yn) * np.where(z < 0, np.float32(base), np.float32(1.0))
    return np.sqrt((x / sx) ** 2 + (y / ay) ** 2 + (z / sz) ** 2)


def make_phantom_case(
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    *,
    seed: int = 0,
    index: int = 0,
    return_tissues: bool = False,
):
    """One case in RAS voxel order (axis 0 left to right, 1 posterior to anterior, 2 inferior to
    superior).

    Returns:
      (image float32 [D, H, W, 4] in MODALITIES order, >= 0, exactly 0 outside the head;
       seg uint8 [D, H, W] with values in {0, 1, 2, 4}), plus, if `return_tissues`,
      tissues int8 [D, H, W]: index into TISSUE_NAMES, -1 outside the head.
    """
    rng = np.random.default_rng([seed, index])
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, np.float64)
    half = np.asarray(shape) * spacing / 2
    vox = float(spacing.max())
    t = {n: i for i, n in enumerate(_TISSUES)}

    # Head shape, then pose: anatomical -> world mm is `rot @ a + shift`. The head shrinks until
    # its posed bounding box (boundary bumps included) leaves background on every side.
    head_axes = half * rng.uniform(0.80, 0.88, 3)
    egg = float(rng.uniform(0.10, 0.16))
    base = float(rng.uniform(0.72, 0.80))
    rot = _rotation(np.deg2rad(rng.uniform(-_POSE_DEGREES, _POSE_DEGREES, 3)))
    shift = rng.uniform(-_POSE_SHIFT, _POSE_SHIFT, 3) * 2 * half
    reach = head_axes * np.array([1 + egg, 1.0, 1 + 0.5 * egg]) / (1 - _BUMP)
    limit = half - np.maximum(1.5 * spacing, 0.05 * half) - np.abs(shift)
    head_axes = head_axes * min(1.0, float((limit / np.sqrt(rot**2 @ reach**2)).min()))

    # Anatomical mm coordinates of every voxel: the pose is applied to the grid, so every shape
    # below is computed smooth in anatomical space.
    grid = [
        (np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(sp) - np.float32(sh)
        for n, sp, sh in zip(shape, spacing, shift)
    ]
    grid = np.meshgrid(*grid, indexing="ij", sparse=True)
    x, y, z = (sum(np.float32(rot[i, j]) * grid[i] for i in range(3)) for j in range(3))

    bump = np.clip(_smooth_field(rng, shape, coarse=6), -1, 1)
    r_head = _egg_radius(x, y, z, head_axes, egg, base) * (1 + _BUMP * bump)
    head = r_head < 1.0
    brain_frac = float(rng.uniform(0.80, 0.84))
    r_brain = r_head / brain_frac  # 1 at the brain surface
    envelope = r_brain < 1.0  # brain and its CSF rim
    inner = r_brain < 0.95  # parenchyma
    brain_axes = head_axes * brain_frac
    bx, by, bz = brain_axes.tolist()
    u = (x / bx, y / by, z / bz)  # brain-normalised

    texture = _smooth_field(rng, shape, coarse=4)
    fine = _smooth_field(rng, shape, coarse=2)
    sulcus_field = _smooth_field(rng, shape, coarse=4)
    # Integer tissue map (index into _TISSUES order; -1 outside the head).
    tmap = np.full(shape, -1, np.int8)
    tmap[head] = t["scalp"]
    tmap[head & (r_head < 0.93)] = t["skull"]
    tmap[envelope] = t["csf"]
    # Cerebrum: WM dominates deep, GM near the cortex (a smooth field plus a depth ramp), thin
    # CSF sulci (a level set of another field) in the outer part.
    wm = (texture + 2.2 * (0.9 - r_brain)) > 0.3
    tmap[inner] = np.where(wm, t["wm"], t["gm"])[inner]
    tmap[inner & (r_brain > 0.75) & (np.abs(sulcus_field) < 0.1)] = t["csf"]
    # Falx: a thin midline CSF sheet in the upper part, reaching lower in front and behind than
    # in the middle (above the corpus callosum).
    sheet = 0.6 * float(spacing[0])
    tmap[envelope & (np.abs(x) < sheet) & (u[2] > 0.3 - 0.15 * u[1] ** 2)] = t["csf"]

    # Cerebellum: a flattened ellipsoid posterior-inferior with finer foliation (concentric GM /
    # WM leaves around a WM core), capped by the tentorium (a CSF sheet on its upper surface).
    cb_centre = [0.0, -0.55, -0.48]
    cb_axes = (np.array([0.66, 0.36, 0.32]) * rng.uniform(0.9, 1.1, 3)).tolist()
    r_cb = np.sqrt(sum(((u[k] - cb_centre[k]) / cb_axes[k]) ** 2 for k in range(3)))
    cerebellum = inner & (r_cb < 1.0)
    folia = np.sin(2 * np.pi * _FOLIA * r_cb + 1.5 * fine)
    cb_wm = (r_cb + 0.1 * fine < 0.4) | (folia > 0.55)
    tmap[cerebellum] = np.where(cb_wm, t["wm"], t["gm"])[cerebellum]
    tent = 1.5 * float(spacing.mean()) / float((np.array(cb_axes) * brain_axes).min())
    tmap[inner & (r_cb >= 1.0) & (r_cb < 1.0 + tent) & (u[2] > cb_centre[2])] = t["csf"]

    # Brainstem: a tapered cylinder from the middle of the brain down (and slightly back) to the
    # inferior face of the head, in a CSF sheath below the brain, with the pons bulging in front.
    depth = np.maximum(0.05 - u[2], 0.0)
    stem_radius = 0.18 * bx * rng.uniform(0.9, 1.1) * (1 - 0.3 * np.minimum(depth, 1.0))
    d_stem = np.sqrt(x**2 + ((u[1] + 0.1 + 0.2 * depth) * by) ** 2)
    below = head & (u[2] < 0.05)
    tmap[below & ~inner & (d_stem < stem_radius + 1.2 * float(spacing.mean()))] = t["csf"]
    pons = ((u[0] / 0.2) ** 2 + ((u[1] + 0.02) / 0.17) ** 2 + ((u[2] + 0.32) / 0.16) ** 2) < 1
    tmap[(below & (d_stem < stem_radius)) | (pons & inner)] = t["wm"]

    # Ventricles, anterior of centre: per side a body tapering backwards from a wide frontal horn,
    # and a narrow occipital horn curving down behind; a thin midline third ventricle.
    v = rng.uniform(0.8, 1.2, 3).tolist()
    along = np.clip((u[1] - 0.15) / (0.38 * v[1]), -1.5, 1.5)
    width = 0.10 * v[0] * (1 + 0.4 * along)
    for side in (-1.0, 1.0):
        body = ((u[0] - side * 0.12) / width) ** 2 + along**2 + ((u[2] - 0.16) / (0.13 * v[2])) ** 2
        horn = (
            ((u[0] - side * 0.18) / (0.05 * v[0])) ** 2
            + ((u[1] + 0.28) / 0.15) ** 2
            + ((u[2] - 0.06 + 0.3 * (u[1] + 0.28)) / (0.07 * v[2])) ** 2
        )
        tmap[inner & ((body < 1) | (horn < 1))] = t["csf"]
    third = (np.abs(x) < sheet) & ((((u[1] - 0.05) / 0.2) ** 2 + ((u[2] + 0.02) / 0.12) ** 2) < 1)
    tmap[inner & third] = t["csf"]

    # Tumour, nested ET subset of TC subset of WT: a randomly oriented anisotropic ellipsoid
    # (optionally with a second lobe) with an irregular boundary, anywhere in the brain. Radii in
    # mm, with minimums of a voxel and a bit per layer (along the shortest axis) so that every
    # label exists even in tiny test volumes; anisotropy only where the brain is big enough.
    brain_r = float(brain_axes.min())
    spread = float(np.clip((brain_r / vox - 6.0) / 8.0, 0.0, 1.0))
    aspect = np.exp(spread * rng.uniform(-0.3, 0.3, 3)).tolist()
    a_min = min(aspect)
    r_wt = rng.uniform(0.15, 0.55) * brain_r
    r_tc = rng.uniform(0.5, 0.75) * r_wt
    r_nec = rng.uniform(0.3, 0.6) * r_tc
    r_nec = max(r_nec, 1.25 * vox / a_min)
    r_tc = max(r_tc, r_nec + 1.25 * vox / a_min)
    r_wt = max(r_wt, r_tc + 1.5 * vox / a_min)
    # Centre: on a random ray from the middle of the brain (hemisphere by a coin), uniformly (in
    # volume) up to the deepest point where the core (TC, boundary bumps included, plus a voxel)
    # still fits in the parenchyma; the oedema may reach the cortex (it is clipped there).
    orient = _random_rotation(rng)
    direction = rng.standard_normal(3)
    direction[0] = rng.choice([-1.0, 1.0]) * abs(direction[0])
    ray = direction / np.linalg.norm(direction) * brain_axes
    core = (orient * np.asarray(aspect)) @ _SPHERE.T * (1.2 * r_tc) + _SPHERE.T * vox  # [3, P]
    limit = brain_frac * 0.95 / (1 + _BUMP)  # head radius where the parenchyma surely ends

    def fits(s: float) -> bool:
        return bool((_egg_radius(*(s * ray[:, None] + core), head_axes, egg, base) < limit).all())

    lo, hi = 0.0, 1.0
    if fits(lo):
        for _ in range(20):
            lo, hi = ((lo + hi) / 2, hi) if fits((lo + hi) / 2) else (lo, (lo + hi) / 2)
    centre = ray * lo * rng.uniform() ** (1 / 3)
    rel = (x - np.float32(centre[0]), y - np.float32(centre[1]), z - np.float32(centre[2]))
    d = np.sqrt(
        sum(
            (sum(np.float32(orient[i, k]) * rel[i] for i in range(3)) / aspect[k]) ** 2
            for k in range(3)
        )
    )
    if rng.uniform() < 0.35:  # a second, smaller lobe beside the first
        lobe = rng.standard_normal(3)
        lobe = centre + lobe / np.linalg.norm(lobe) * r_wt * rng.uniform(0.6, 1.0)
        size = np.float32(rng.uniform(0.45, 0.75))
        d2 = np.sqrt(sum((c - np.float32(lc)) ** 2 for c, lc in zip((x, y, z), lobe))) / size
        d = np.minimum(d, d2)
    # Irregular boundaries: the same radial perturbation for all layers keeps them nested.
    d = d / (1 + 0.2 * np.clip(_smooth_field(rng, shape, coarse=5), -1, 1))
    seg = np.zeros(shape, np.uint8)
    seg[(d < r_wt) & envelope] = 2
    seg[(d < r_tc) & envelope] = 4
    seg[(d < r_nec) & envelope] = 1
    tmap[seg == 2] = t["oedema"]
    tmap[seg == 4] = t["enhancing"]
    tmap[seg == 1] = t["necrosis"]

    # Per-case contrast jitter (larger for the tumour; enhancement from faint to strong), then
    # texture (more heterogeneous in the tumour), bias field and Rician noise.
    tumour_rows = np.isin(np.arange(len(_TISSUES)), [t["oedema"], t["enhancing"], t["necrosis"]])
    table = np.asarray(list(_TISSUES.values()), np.float32)  # [T, 4]
    jitter = np.where(tumour_rows[:, None], 0.18, 0.07)
    table = table * (1 + jitter * rng.uniform(-1, 1, table.shape)).astype(np.float32)
    table[t["enhancing"], 1] = table[t["enhancing"], 0] * (1 + rng.uniform(0.5, 2.0))
    scale = np.float32(rng.uniform(700, 1100))
    modulation = 1 + 0.05 * texture
    modulation[seg > 0] += 0.08 * fine[seg > 0]
    bias = np.exp(0.12 * _smooth_field(rng, shape, coarse=16))
    # Only the head: the background stays exactly 0 (and costs no noise samples).
    signal = table[tmap[head]] * (modulation * bias)[head][:, None] * scale  # [N, 4]
    sigma = 0.025 * scale
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(signal.shape, dtype=np.float32) * sigma
    image = np.zeros((*shape, len(MODALITIES)), np.float32)
    image[head] = np.sqrt((signal + n1) ** 2 + n2**2)
    if return_tissues:
        return image, seg, tmap
    return image, seg


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
    `brats_phantom-<_VERSION>-<hash of the parameters>`. Generated into a temp folder beside it and
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
