"""Tests of the built-in phantom (`ssl3d_jax/data/phantom.py`): an anatomy on which the ten
rotation classes of the rotation task are distinguishable, labels and tissue map that agree,
tumours that vary, and a random pose."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from ssl3d_jax.data import phantom, preprocess, synthetic
from ssl3d_jax.tasks import rotation

SHAPE = (32, 36, 28)
SPACING = (1.2, 1.0, 1.5)
TISSUE = {n: i for i, n in enumerate(phantom.TISSUE_NAMES)}
TUMOUR_TISSUE = {1: "necrosis", 2: "oedema", 4: "enhancing"}

# Rotation classes. A single case is no test: its random GM/WM texture, sulci, tumour, boundary
# bumps and pose make any two maps differ (the v1 phantom, symmetric under every 180 degree
# turn, differed by 13-19% of head voxels per case at 32^3 between classes that no model can tell
# apart, as much as under a left-right mirror). What a classifier can use is what the classes
# differ by over cases, so the check compares the average anatomy ("atlas") of CASES cases:
# coarse classes (texture and tumour merged into parenchyma), each case cropped to the head and
# resized to CUBE^3 as the pipeline does, averaged, and pooled over BLOCK^3 blocks (so that
# sub-block boundary jitter does not count; pooling commutes with the rotations). Measured, min
# over the 45 pairs of classes (two index ranges x seeds 0-2): v2 0.105-0.121 of head voxels,
# 1.9-2.3x the left-right mirror's difference (the anatomy's own symmetry, so the noise left); v1
# 0.027-0.042, 0.8-1.35x its mirror.
CUBE, BLOCK, CASES = 32, 4, 8
MIN_DIFFERING = 0.07
MIN_OVER_MIRROR = 1.6


def _coarse(tissues: np.ndarray) -> np.ndarray:
    """int32: 0 background, 1 scalp / skull, 2 CSF, 3 parenchyma (GM, WM and tumour: their
    layout is random per case, only the anatomy should count)."""
    lut = np.full(len(phantom.TISSUE_NAMES) + 1, 3, np.int32)  # indexed by tissue + 1
    lut[0] = 0
    lut[TISSUE["scalp"] + 1] = lut[TISSUE["skull"] + 1] = 1
    lut[TISSUE["csf"] + 1] = 2
    return lut[tissues.astype(np.int64) + 1]


def _atlas(maps) -> np.ndarray:
    """float32 [CUBE // BLOCK] * 3 + [3]: per coarse class 1..3, the fraction of cases and voxels
    of each block in that class, after cropping each map to its head and resizing to CUBE^3
    (nearest neighbour, `preprocess.fit_to_cube`)."""
    acc = np.zeros((CUBE,) * 3 + (3,), np.float32)
    for m in maps:
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(m > 0))
        crop = m[box]
        _, cube = preprocess.fit_to_cube(np.zeros((*crop.shape, 1), np.float32), crop, size=CUBE)
        acc += np.stack([cube == k for k in (1, 2, 3)], axis=-1)
    q = CUBE // BLOCK
    return (acc / len(maps)).reshape(q, BLOCK, q, BLOCK, q, BLOCK, 3).mean(axis=(1, 3, 5))


def _differing(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of head voxels in a different class (half the L1 distance over the head mass)."""
    return float(0.5 * np.abs(a - b).sum() / (0.5 * (a.sum() + b.sum())))


def _rotation_differences(atlas: np.ndarray) -> dict[tuple[int, int], float]:
    """`_differing` between the atlas rotated by class i and by class j, for all pairs i < j."""
    n = rotation.num_classes(3)
    rotated = [np.asarray(rotation.rotate(jnp.asarray(atlas), k)) for k in range(n)]
    return {(i, j): _differing(rotated[i], rotated[j]) for i in range(n) for j in range(i + 1, n)}


@pytest.mark.parametrize("first", [0, CASES])
def test_rotation_classes_distinct(first):
    maps = [
        _coarse(phantom.make_phantom_case(SHAPE, SPACING, index=i, return_tissues=True)[2])
        for i in range(first, first + CASES)
    ]
    atlas = _atlas(maps)
    diffs = _rotation_differences(atlas)
    assert len(diffs) == 45
    worst = min(diffs, key=diffs.get)
    mirror = _differing(atlas, atlas[::-1])
    assert diffs[worst] >= MIN_DIFFERING, (worst, diffs[worst])
    assert diffs[worst] >= MIN_OVER_MIRROR * mirror, (worst, diffs[worst], mirror)


def test_rotation_check_catches_symmetric_anatomy():
    # The v1 failure mode: head, brain and a ventricle pair, all centred ellipsoids, are symmetric
    # under a 180 degree turn about each axis, so classes 0 / 2 / 5 / 8 (and others) coincide.
    coords = [(np.arange(n) - (n - 1) / 2) * sp for n, sp in zip(SHAPE, SPACING)]
    x, y, z = np.meshgrid(*coords, indexing="ij")
    half = np.asarray(SHAPE) * SPACING / 2
    r = np.sqrt(
        (x / (0.85 * half[0])) ** 2 + (y / (0.85 * half[1])) ** 2 + (z / (0.85 * half[2])) ** 2
    )
    tissues = np.full(SHAPE, -1, np.int8)
    tissues[r < 1] = TISSUE["scalp"]
    tissues[r < 0.93] = TISSUE["skull"]
    tissues[r < 0.82] = TISSUE["csf"]
    tissues[r < 0.78] = TISSUE["wm"]
    for side in (-1, 1):
        rv = ((x - side * 3.0) / 2.0) ** 2 + (y / 7.0) ** 2 + (z / 3.0) ** 2
        tissues[rv < 1] = TISSUE["csf"]
    diffs = _rotation_differences(_atlas([_coarse(tissues)]))
    assert min(diffs.values()) < 0.01 < MIN_DIFFERING
    assert diffs[(0, 2)] == diffs[(0, 5)] == diffs[(0, 8)] == 0.0


@pytest.mark.parametrize("shape", [synthetic.SHAPE, SHAPE])
def test_labels_and_tissues(shape):
    st = ndi.generate_binary_structure(3, 1)
    for index in range(6):
        image, seg, tissues = phantom.make_phantom_case(
            shape, SPACING, seed=0, index=index, return_tissues=True
        )
        assert image.shape == (*shape, 4) and seg.shape == tissues.shape == shape
        assert (image.dtype, seg.dtype, tissues.dtype) == (np.float32, np.uint8, np.int8)
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}, index
        # Nested regions WT (1, 2, 4) > TC (1, 4) > ET (4), layered from the core outwards:
        # necrosis, then the enhancing shell, then the oedema; the necrosis mostly enclosed by ET.
        wt, tc, et = seg > 0, np.isin(seg, (1, 4)), seg == 4
        assert et.sum() < tc.sum() < wt.sum()
        centre = np.argwhere(seg == 1).mean(0)
        spread = [
            np.linalg.norm((np.argwhere(seg == k) - centre) * SPACING, axis=1).mean()
            for k in (1, 4, 2)
        ]
        assert spread[0] < spread[1] < spread[2], (index, spread)
        rim = ndi.binary_dilation(seg == 1, st) & (seg != 1)
        assert (seg[rim] == 4).mean() > 0.75, index
        # Tissue map agrees with the labels; tumour only inside the brain.
        for label, name in TUMOUR_TISSUE.items():
            np.testing.assert_array_equal(seg == label, tissues == TISSUE[name])
        assert not np.isin(tissues[~wt], [TISSUE[n] for n in TUMOUR_TISSUE.values()]).any()
        assert (tissues[wt] >= 0).all()
        # Background exactly 0 outside the head, signal inside; the head clear of every face.
        head = tissues >= 0
        assert (image[~head] == 0).all() and (image[head] > 0).all()
        for axis in range(3):
            assert not np.take(head, [0, shape[axis] - 1], axis=axis).any(), (index, axis)


def test_deterministic():
    a = phantom.make_phantom_case(SHAPE, SPACING, seed=3, index=2, return_tissues=True)
    b = phantom.make_phantom_case(SHAPE, SPACING, seed=3, index=2, return_tissues=True)
    for u, v in zip(a, b):
        assert u.tobytes() == v.tobytes()
    for other in (dict(seed=3, index=3), dict(seed=4, index=2)):
        c = phantom.make_phantom_case(SHAPE, SPACING, **other, return_tissues=True)
        for u, v in zip(a, c):
            assert not np.array_equal(u, v), other


def test_tumour_variety():
    # Over 12 cases: whole-tumour volume (fraction of the brain) spans a factor >= 3 (measured
    # 0.038-0.142, 3.7x), centres on both sides of the head's centre plane (measured 4 right, 6
    # left, 2 within a voxel), some deep and some reaching the skull (6 of 12 within 2 voxels).
    shape, spacing = (48, 56, 44), SPACING
    not_brain = [TISSUE["scalp"], TISSUE["skull"]]
    fractions, sides, at_skull = [], [], 0
    for index in range(12):
        _, seg, tissues = phantom.make_phantom_case(
            shape, spacing, seed=0, index=index, return_tissues=True
        )
        brain = (tissues >= 0) & ~np.isin(tissues, not_brain)
        fractions.append((seg > 0).sum() / brain.sum())
        offset = np.argwhere(seg > 0).mean(0)[0] - np.argwhere(tissues >= 0).mean(0)[0]
        sides.append(np.sign(offset) if abs(offset) > 1 else 0)
        skull = ndi.binary_dilation(tissues == TISSUE["skull"], iterations=2)
        at_skull += bool((skull & (seg > 0)).any())
    assert max(fractions) >= 3 * min(fractions), fractions
    assert sides.count(1) >= 3 and sides.count(-1) >= 3, sides
    assert 1 <= at_skull < 12


def _head_pose_stats(n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Per case: left-right mirror asymmetry of the head mask about the volume's centre plane
    (fraction of the union), and the head's centroid in mm."""
    asym, centroids = [], []
    for index in range(n):
        tissues = phantom.make_phantom_case(SHAPE, SPACING, index=index, return_tissues=True)[2]
        head = tissues >= 0
        asym.append((head ^ head[::-1]).sum() / (head | head[::-1]).sum())
        centroids.append(np.argwhere(head).mean(0) * SPACING)
    return np.asarray(asym), np.asarray(centroids)


def test_pose_varies(monkeypatch):
    # Pose-free control (same cases, rotation and shift range 0): the head is mirror symmetric up
    # to its boundary bumps (measured <= 0.094) and centred (centroid spread <= 1 mm). With the
    # pose the mirror asymmetry is 0.06-0.29 (median 0.15) and the centroids spread ~2.5 mm.
    asym, centroids = _head_pose_stats()
    monkeypatch.setattr(phantom, "_POSE_DEGREES", 0.0)
    monkeypatch.setattr(phantom, "_POSE_SHIFT", 0.0)
    flat_asym, flat_centroids = _head_pose_stats()
    assert np.median(asym) > 1.3 * flat_asym.max(), (asym, flat_asym)
    assert asym.max() > 2 * flat_asym.max()
    assert np.ptp(centroids, axis=0).max() > 2 * np.ptp(flat_centroids, axis=0).max()
