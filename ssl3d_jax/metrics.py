"""Evaluation metrics: Dice and HD95 per region, quadratic-weighted kappa and accuracy.

The original's BraTS scores were broken (a second argmax collapsed each flattened label vector to
one index) and its "dice" averaged in the background class. Here every region (a set of class
indices, e.g. BraTS WT = {1, 2, 3}) is scored on its own, per case, on hard masks; background never
enters a score. Its retina kappa decoded "no output above 0.5" to grade -1, outside the label set;
`quadratic_weighted_kappa` rejects labels outside `[0, num_classes)` instead of scoring them.

All functions here are numpy/scipy and run on the host, on one case at a time.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage


REGIONS = ("WT", "TC", "ET")

# Evaluation regions of BraTS in class-index space (label 4 -> index 3), as `Dataset.regions`.
BRATS_REGIONS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("WT", (1, 2, 3)),
    ("TC", (1, 3)),
    ("ET", (3,)),
)


def dice(pred, target) -> float:
    """Dice coefficient of two binary masks.

    Args:
      pred: bool (or 0/1) array, any shape.
      target: bool (or 0/1) array of the same shape.

    Returns:
      Python float in [0, 1]; 1.0 when both masks are empty (nothing to find, nothing found).
    """
    pred = np.asarray(pred).astype(bool)
    target = np.asarray(target).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"dice: pred shape {pred.shape} != target shape {target.shape}")
    denom = int(pred.sum()) + int(target.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, target).sum()) / denom


# ------------------------------------------------------------------------------------------------
# Region scores on class-index volumes.


@dataclasses.dataclass(frozen=True)
class RegionStats:
    """Voxel counts of one region in one case, from which Dice follows.

    Reports may want to leave out cases where the region is absent from both prediction and
    ground truth (Dice 1 by convention, which inflates means on small regions such as ET), so the
    counts are kept rather than only the score.
    """

    pred_voxels: int
    target_voxels: int
    intersection: int

    @property
    def empty(self) -> bool:
        """True when the region is absent from both the prediction and the ground truth."""
        return self.pred_voxels == 0 and self.target_voxels == 0

    @property
    def dice(self) -> float:
        """Dice in [0, 1]; 1.0 when `empty` (nothing to find, nothing found)."""
        denom = self.pred_voxels + self.target_voxels
        return 1.0 if denom == 0 else 2.0 * self.intersection / denom


def _check_pair(pred, target, fn: str) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"{fn}: pred shape {pred.shape} != target shape {target.shape}")
    return pred, target


def _check_regions(regions, fn: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for name, classes in regions:
        classes = tuple(int(c) for c in classes)
        if not classes or any(c <= 0 for c in classes):
            # Background (0) never enters a score, see the module docstring.
            raise ValueError(
                f"{fn}: region {name!r} has class indices {classes}; expected a non-empty "
                "tuple of foreground indices (>= 1)"
            )
        out.append((str(name), classes))
    return out


def region_stats(pred, target, regions) -> dict[str, RegionStats]:
    """Voxel counts of each region, each region taken on its own as a binary mask.

    Args:
      pred: int array of class indices, any shape (e.g. `[D, H, W]`).
      target: int array of class indices, same shape.
      regions: sequence of `(name, class_indices)`, e.g. `BRATS_REGIONS` or
        `(("pancreas", (1,)), ("tumour", (2,)))`; indices must be >= 1.

    Returns:
      {name: RegionStats} in the order of `regions`.
    """
    pred, target = _check_pair(pred, target, "region_stats")
    out = {}
    for name, classes in _check_regions(regions, "region_stats"):
        p = np.isin(pred, classes)
        t = np.isin(target, classes)
        out[name] = RegionStats(
            pred_voxels=int(p.sum()),
            target_voxels=int(t.sum()),
            intersection=int(np.logical_and(p, t).sum()),
        )
    return out


def region_dice(pred, target, regions) -> dict[str, float]:
    """Dice of each region, each on its own as a binary mask.

    Args: as `region_stats`.

    Returns:
      {name: float in [0, 1]} in the order of `regions`. A region absent from both prediction and
      target scores 1.0 (nothing to find, nothing found); use `region_stats(...)[name].empty` to
      tell such cases apart.
    """
    return {name: s.dice for name, s in region_stats(pred, target, regions).items()}


# HD95 of a region present in exactly one of prediction and truth (missed, or falsely detected):
# the BraTS challenge's evaluation scores it as 373.13 mm, the diagonal of the BraTS grid of
# 240 × 240 × 155 voxels of 1 mm (sqrt(240² + 240² + 155²) = 373.129 mm).
HD95_MISSING_MM = 373.13


def _surface(mask: np.ndarray) -> np.ndarray:
    # Face-connected erosion, as medpy/MONAI; voxels on the array border count as surface
    # (border_value=0), so a mask filling the whole crop still has a surface.
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hausdorff95(pred_mask, target_mask, *, spacing=None) -> float:
    """95th-percentile symmetric Hausdorff distance between two binary masks, in mm (MONAI's).

    Surfaces are the mask voxels removed by one face-connected binary erosion. For each surface
    voxel of one mask the Euclidean distance (scaled by `spacing`) to the nearest surface voxel of
    the other is taken, giving two directed distance sets; the result is the larger of their two
    95th percentiles (numpy's linear interpolation). This is MONAI's
    `compute_hausdorff_distance(..., percentile=95)`. It is not medpy's `hd95`, which takes one
    95th percentile of the union of both directed sets, so the two differ whenever the sets'
    tails do (e.g. directed sets {7, 5} and {5}: here max(6.9, 5) = 6.9; medpy the 95th
    percentile of {5, 5, 7} = 6.8). Compare published HD95 only with the same definition.

    Args:
      pred_mask: bool (or 0/1) array, any number of dims (e.g. `[D, H, W]`).
      target_mask: bool array of the same shape.
      spacing: voxel size in mm per axis (a sequence of length ndim, or one number); None → 1.

    Returns:
      Python float >= 0. Exactly one mask empty (a missed region, or a false detection) →
      `HD95_MISSING_MM`, as the BraTS evaluation scores it (whatever the volume's size, so that
      a miss is always penalised and numbers compare with BraTS's). Both empty → nan: nothing to
      find and nothing found has no distance; means leave such cases out and count them
      (`mean_over_cases`).
    """
    pred, target = _check_pair(pred_mask, target_mask, "hausdorff95")
    pred = pred.astype(bool)
    target = target.astype(bool)
    if spacing is None:
        spacing = (1.0,) * pred.ndim
    elif np.ndim(spacing) == 0:
        spacing = (float(spacing),) * pred.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(
            f"hausdorff95: spacing {spacing} must hold {pred.ndim} positive finite numbers"
        )
    has_p, has_t = bool(pred.any()), bool(target.any())
    if not has_p and not has_t:
        return float("nan")
    if has_p != has_t:
        return HD95_MISSING_MM

    # Crop to the bounding box of both masks plus one voxel: the distance transform is
    # Euclidean (not geodesic), so distances between surface voxels inside the box are exact,
    # and the one-voxel margin keeps the erosion identical to the uncropped one.
    coords = np.nonzero(pred | target)
    box = tuple(
        slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n))
        for c, n in zip(coords, pred.shape, strict=True)
    )
    sp = _surface(pred[box])
    st = _surface(target[box])
    # distance_transform_edt gives, for every non-zero voxel, the distance to the nearest zero.
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(dist_to_t[sp], 95), np.percentile(dist_to_p[st], 95)))


def region_hd95(pred, target, regions, *, spacing=None) -> dict[str, float]:
    """HD95 (mm) of each region, each on its own as a binary mask.

    Args: as `region_stats`, plus `spacing` as in `hausdorff95` (e.g. from the NIfTI header).

    Returns:
      {name: float} in the order of `regions`; `HD95_MISSING_MM` when the region is absent
      from exactly one of prediction and target, nan when absent from both (see `hausdorff95`).
    """
    pred, target = _check_pair(pred, target, "region_hd95")
    return {
        name: hausdorff95(np.isin(pred, classes), np.isin(target, classes), spacing=spacing)
        for name, classes in _check_regions(regions, "region_hd95")
    }


def mean_over_cases(per_case) -> tuple[dict[str, float], dict[str, int]]:
    """Mean of each score over cases, NaN scores left out and counted.

    Args:
      per_case: {case: {score_name: float}}, every case with the same names (e.g. `region_dice`
        merged with `'HD95 <region>'` of `region_hd95`).

    Returns:
      (means, n_excluded): {score_name: mean of its non-NaN values, nan when there are none},
      {score_name: number of cases whose value was NaN and left out (HD95: the region absent
      from both prediction and truth)}, both in the order of the first case's names.
    """
    cases = list(per_case.values())
    names = list(cases[0]) if cases else []
    means, n_excluded = {}, {}
    for name in names:
        values = np.asarray([float(c[name]) for c in cases], np.float64)
        kept = values[~np.isnan(values)]
        means[name] = float(kept.mean()) if kept.size else float("nan")
        n_excluded[name] = int(values.size - kept.size)
    return means, n_excluded


# ------------------------------------------------------------------------------------------------
# Classification (diabetic-retinopathy grades).


def _check_labels(y_true, y_pred, fn: str) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{fn}: y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError(f"{fn}: no labels to score")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"{fn}: {name} must hold integer class indices")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def accuracy(y_true, y_pred) -> float:
    """Fraction of equal labels.

    Args:
      y_true: int array `[N]` (any shape; flattened).
      y_pred: int array with the same number of elements.

    Returns:
      Python float in [0, 1].
    """
    y_true, y_pred = _check_labels(y_true, y_pred, "accuracy")
    return float(np.mean(y_true == y_pred))


def quadratic_weighted_kappa(y_true, y_pred, *, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (the Kaggle diabetic-retinopathy metric).

    kappa = 1 - sum(W * O) / sum(W * E), with O the confusion matrix, E the outer product of the
    two label histograms divided by N (agreement expected by chance), and W[i, j] = (i - j)² /
    (K - 1)².

    Args:
      y_true: int array `[N]` of grades in `[0, num_classes)`.
      y_pred: int array `[N]` of grades in `[0, num_classes)`.
      num_classes: K >= 2 (5 for retinopathy grades 0..4).

    Returns:
      Python float in [-1, 1]: 1 for perfect agreement, about 0 for chance, exactly 0 when all
      predictions are one grade and the truth is not constant. When truth and prediction are the
      same single grade, sum(W * E) is 0 and the formula is 0/0; we return 1.0 (perfect agreement)
      by convention (sklearn returns nan there).

    Raises:
      ValueError when a label lies outside `[0, num_classes)` (the original decoded "no output
      above 0.5" to -1 and scored it silently).
    """
    if int(num_classes) < 2:
        raise ValueError(f"quadratic_weighted_kappa: num_classes={num_classes}; expected >= 2")
    k = int(num_classes)
    y_true, y_pred = _check_labels(y_true, y_pred, "quadratic_weighted_kappa")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        bad = np.unique(y[(y < 0) | (y >= k)])
        if bad.size:
            raise ValueError(
                f"quadratic_weighted_kappa: {name} holds {bad.tolist()}, outside [0, {k})"
            )
    observed = np.zeros((k, k), np.float64)
    np.add.at(observed, (y_true, y_pred), 1.0)
    expected = np.outer(observed.sum(1), observed.sum(0)) / y_true.size
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2 / (k - 1) ** 2
    denom = float((weights * expected).sum())
    if denom == 0.0:
        # Only possible when both label sets are the same constant grade.
        return 1.0
    return float(1.0 - (weights * observed).sum() / denom)
