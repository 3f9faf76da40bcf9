"""Pretext batch generation the way the original did it: NumPy, one volume at a time, on the host.

What: one function per pretext task that builds the same arrays as our jitted batch functions
(`ssl3d_jax.tasks.{rpl,jigsaw,cpc,rotation}.make_batch`, `ssl3d_jax.tasks.exemplar.make_triplets`)
in the style of the original code (HealthML/self-supervised-3d-tasks,
`preprocessing/preprocess_{rpl,jigsaw,cpc,rotation,exemplar}.py`, `preprocessing/utils/crop.py`):
a Python loop over the volumes of the batch, scalar `np.random` draws, NumPy slicing, flips and
transposes, `np.array` / `np.stack` copies, and `scipy.ndimage` (cubic spline) for Exemplar's
arbitrary-angle rotations and zoom.

Why: `benchmarks/pretext_batches.py` times these against our functions (issue 6, 1a). The original
itself cannot be imported (it needs TensorFlow 2.1, albumentations, cv2) and is not copied here;
these functions are re-written from the behaviour described in
`/work/shared/reference/original_code_and_paper.md` (sections 2.1-2.6).

They return what our functions return, so that the benchmark compares like with like: the same
shapes and dtypes (float32 inputs stay float32), and labels that mean the same thing (int32 class
indices). Where the original did extra work that is intrinsic to its style it is kept (RPL and
jigsaw crop and copy all `P**3` patches of a volume before picking / permuting them; every patch
and volume is a separate NumPy array that is stacked at the end). Deliberate differences from the
original, all of them to match our outputs:
  * Labels are int32 indices, not float64 one-hot vectors; Exemplar's triplets are three float32
    arrays, not one float64 `[B, 3, ...]` array.
  * Rotation: the class table is ours (`ssl3d_jax.tasks.rotation.rotation_table`, the
    `np.rot90` sign convention, which swaps the original's classes 4 <-> 6 and 7 <-> 9), and
    class 9 is a real rotation (the paper-era code left it unrotated).
  * CPC returns the augmented `[B, P**3, p, p, p, C]` patches, as ours; the original went on to
    materialise every column's context and target sequences (12 patches x 32 examples per
    volume, ~6x the patch bytes), which ours gathers from the latents instead. So the CPC
    reference does LESS than the original did.
  * Exemplar: negatives come from the batch (the original's "batch" option; its shipped configs
    read a fresh volume from disk per example instead), and the positive (hence the negative) is
    augmented too when `augment_positive`, as ours. The augmentation is the original's recipe
    (arbitrary angles in [0, 360) unless `max_degrees` is given, cubic spline, zoom with random
    re-crop), not our on-device variant.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndimage

# Exemplar's rotation planes in the original's order; also the order of our rotation classes.
PLANES_3D = ((0, 1), (1, 2), (0, 2))


# --------------------------------------------------------------------------------------------
# Cropping and padding primitives (the original's preprocessing/utils)
# --------------------------------------------------------------------------------------------


def crop(x: np.ndarray, crop_shape, is_training: bool = True) -> np.ndarray:
    """Crop the leading (spatial) axes of `x [*spatial, C]` to `crop_shape`.

    Offsets are drawn uniformly in `[0, s - c]` per axis when training, else centred
    (`(s - c) // 2`). Returns a view.
    """
    index = []
    for s, c in zip(x.shape, crop_shape):
        start = np.random.randint(0, s - c + 1) if is_training else (s - c) // 2
        index.append(slice(start, start + c))
    return x[tuple(index)]


def pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad every spatial axis of `x [*spatial, C]` that is shorter than `size`, centred
    (`(size - s) // 2` before, the rest after); longer axes are left alone."""
    pads = [((size - s) // 2, size - s - (size - s) // 2) if s < size else (0, 0)
            for s in x.shape[:-1]]  # fmt: skip
    return np.pad(x, [*pads, (0, 0)], mode="constant", constant_values=0)


def crop_patches(volume: np.ndarray, is_training: bool, patches_per_side: int, jitter: int):
    """The `P**n` grid patches of `volume [*spatial, C]` as a list, row-major grid order.

    Cell `g = s // P` per axis; each patch is `g - J` voxels per axis, cut at a random offset in
    `[0, J]` inside its cell when training, at `J // 2` otherwise. The list holds views.
    """
    n = volume.ndim - 1
    cells = [s // patches_per_side for s in volume.shape[:n]]
    shape = [g - jitter for g in cells]
    patches = []
    for cell in np.ndindex(*([patches_per_side] * n)):
        index = tuple(slice(i * g, i * g + g) for i, g in zip(cell, cells))
        patch = volume[index]
        if jitter > 0:
            patch = crop(patch, shape, is_training)
        patches.append(patch)
    return patches


# --------------------------------------------------------------------------------------------
# The five tasks
# --------------------------------------------------------------------------------------------


def rpl_batch(volumes: np.ndarray, *, patches_per_side: int, jitter: int, training: bool = True):
    """RPL pairs: `(pairs [B, 2, *patch, C], labels [B] int32)`, pair = [centre, query].

    Label c in `[0, P**n - 1)` names grid patch c, or c + 1 from the centre on (the centre is
    skipped), as `ssl3d_jax.tasks.rpl.make_batch`.
    """
    n_patches = patches_per_side ** (volumes.ndim - 2)
    centre = n_patches // 2
    pairs, labels = [], []
    for volume in volumes:
        patches = np.array(crop_patches(volume, training, patches_per_side, jitter))
        label = np.random.randint(n_patches - 1)
        query = label + 1 if label >= centre else label
        pairs.append(np.array([patches[centre], patches[query]]))
        labels.append(label)
    return np.array(pairs), np.array(labels, dtype=np.int32)


def _rotate_class(volume: np.ndarray, label: int) -> np.ndarray:
    # The original's if/elif chain of flips and transposes, in our class order: class
    # 1 + 3 * g + (k - 1) is np.rot90(volume, k, axes=PLANES_3D[g]).
    if label == 0:
        return volume
    elif label == 1:
        return np.transpose(np.flip(volume, 1), (1, 0, 2, 3))
    elif label == 2:
        return np.flip(volume, (0, 1))
    elif label == 3:
        return np.flip(np.transpose(volume, (1, 0, 2, 3)), 1)
    elif label == 4:
        return np.transpose(np.flip(volume, 2), (0, 2, 1, 3))
    elif label == 5:
        return np.flip(volume, (1, 2))
    elif label == 6:
        return np.flip(np.transpose(volume, (0, 2, 1, 3)), 2)
    elif label == 7:
        return np.transpose(np.flip(volume, 2), (2, 1, 0, 3))
    elif label == 8:
        return np.flip(volume, (0, 2))
    elif label == 9:
        return np.flip(np.transpose(volume, (2, 1, 0, 3)), 2)
    raise ValueError(f"rotation class must be in [0, 10), got {label}")


def rotation_batch(volumes: np.ndarray):
    """3D rotation prediction: `(rotated [B, D, D, D, C], labels [B] int32 in [0, 10))`.

    `rotated[b]` is `volumes[b]` turned by class `labels[b]` of
    `ssl3d_jax.tasks.rotation.rotation_table(3)`.
    """
    if volumes.ndim != 5:
        raise ValueError(f"rotation_batch expects [B, D, D, D, C], got {volumes.shape}")
    rotated, labels = [], []
    for volume in volumes:
        label = np.random.randint(10)
        rotated.append(_rotate_class(volume, label))
        labels.append(label)
    return np.stack(rotated), np.array(labels, dtype=np.int32)


def jigsaw_batch(
    volumes: np.ndarray,
    *,
    patches_per_side: int,
    jitter: int,
    permutations: np.ndarray,
    training: bool = True,
):
    """Jigsaw puzzles: `(shuffled [B, P**n, *patch, C], labels [B] int32 in [0, K))` with
    `shuffled[b, s] = patches[permutations[labels[b], s]]` (patches in row-major grid order)."""
    permutations = np.asarray(permutations)
    puzzles, labels = [], []
    for volume in volumes:
        label = np.random.randint(len(permutations))
        patches = np.array(crop_patches(volume, training, patches_per_side, jitter))
        puzzles.append(patches[permutations[label]])
        labels.append(label)
    return np.stack(puzzles), np.array(labels, dtype=np.int32)


def cpc_batch(
    volumes: np.ndarray,
    *,
    patches_per_side: int,
    jitter: int,
    volume_crop: float = 1.0,
    patch_crop: float = 1.0,
    flip: bool = False,
    training: bool = True,
):
    """CPC patches `[B, P**n, *patch, C]`, augmented as the original's `preprocess_volume_3d`.

    Per volume (when training): random crop to `int(volume_crop * D)` and centred zero-pad back;
    grid patches (random jitter offsets); per patch a flip along axis 0 with probability 1/2 (if
    `flip`), then random crop to `int(patch_crop * p)` and centred zero-pad back.
    """
    out = []
    for volume in volumes:
        size = volume.shape[0]
        if training:
            c = max(int(size * volume_crop), 1)
            volume = pad_to(crop(volume, [c] * (volume.ndim - 1)), size)
        result = []
        for patch in crop_patches(volume, training, patches_per_side, jitter):
            if training:
                p = patch.shape[0]
                if flip and np.random.choice([False, True]):
                    patch = np.flip(patch, 0)
                c = max(int(p * patch_crop), 1)
                patch = pad_to(crop(patch, [c] * (patch.ndim - 1)), p)
            result.append(patch)
        out.append(np.asarray(result))
    return np.stack(out)


def augment_exemplar(
    volume: np.ndarray,
    *,
    flip_prob: float = 0.5,
    rotate_prob: float = 0.5,
    rot90_prob: float = 0.5,
    max_degrees: float | None = None,
    intensity_prob: float = 0.5,
    shift: float = 0.125,
    contrast: float = 0.5,
    zoom_prob: float = 0.15,
    min_scale: float = 0.8,
    max_scale: float = 1.2,
) -> np.ndarray:
    """The original's `augment_exemplar_3d` on one `[*spatial, C]` volume (2D: one plane).

    In order: each spatial axis flipped with `flip_prob`; for each plane, with `rotate_prob`, a
    rotation that is k x 90 degrees (`np.rot90`) with `rot90_prob`, otherwise an arbitrary angle
    by `scipy.ndimage.rotate` (cubic spline, zero fill; angle in [0, 360), or
    [-max_degrees, max_degrees] if given); brightness + contrast with `intensity_prob`; zoom by
    U(min_scale, max_scale) per axis with `zoom_prob` (`ndimage.zoom`, cubic), zero-padded and
    randomly cropped back to the input size. Returns a new array of the input's shape and dtype.
    """
    n = volume.ndim - 1
    planes = PLANES_3D if n == 3 else ((0, 1),)
    x = volume.copy()
    for axis in range(n):
        if np.random.rand() < flip_prob:
            x = np.flip(x, axis)
    for plane in planes:
        if np.random.rand() < rotate_prob:
            if np.random.rand() < rot90_prob:
                x = np.rot90(x, k=np.random.randint(0, 4), axes=plane)
            else:
                if max_degrees is None:
                    angle = np.random.uniform(0, 360)
                else:
                    angle = np.random.uniform(-max_degrees, max_degrees)
                x = ndimage.rotate(x, angle, axes=plane, reshape=False)
    if np.random.rand() < intensity_prob:
        x = x + np.random.uniform(-shift, shift)
        factor = np.random.uniform(1 - contrast, 1 + contrast)
        mean = np.mean(x)
        x = factor * (x - mean) + mean
    if np.random.rand() < zoom_prob:
        factors = [np.random.uniform(min_scale, max_scale) for _ in range(n)] + [1]
        zoomed = pad_to(ndimage.zoom(x, factors, mode="constant"), volume.shape[0])
        x = crop(zoomed, volume.shape[:n])
    return np.asarray(x, dtype=volume.dtype)


def derangement(n: int) -> np.ndarray:
    """A random permutation of `range(n)` without fixed points (one n-cycle, Sattolo)."""
    index = list(range(n))
    for i in range(n - 1, 0, -1):
        j = np.random.randint(i)  # 0 <= j < i: never stays in place
        index[i], index[j] = index[j], index[i]
    return np.array(index, dtype=np.int32)


def exemplar_triplets(volumes: np.ndarray, *, augment_positive: bool = True, **augment_kwargs):
    """Exemplar triplets: `(anchors, positives, negatives, negative_index)`.

    anchor b = `augment_exemplar(volumes[b])`; positive b = another independent augmentation (or
    `volumes[b]` itself if not `augment_positive`); negative b = positive of volume
    `negative_index[b]`, a derangement of the batch. Each view `[B, *spatial, C]` (dtype of
    `volumes`), `negative_index [B]` int32, as `ssl3d_jax.tasks.exemplar.make_triplets`.
    """
    if len(volumes) < 2:
        raise ValueError("exemplar needs at least 2 volumes per batch")
    anchors, positives = [], []
    for volume in volumes:
        anchors.append(augment_exemplar(volume, **augment_kwargs))
        positives.append(
            augment_exemplar(volume, **augment_kwargs) if augment_positive else volume.copy()
        )
    negative_index = derangement(len(volumes))
    negatives = [positives[i].copy() for i in negative_index]
    return np.stack(anchors), np.stack(positives), np.stack(negatives), negative_index
