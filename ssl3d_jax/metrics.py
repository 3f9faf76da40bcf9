"""Evaluation metrics: Dice per binary mask and per BraTS region.

The original's BraTS scores were broken (a second argmax collapsed each flattened label vector to
one index) and its "dice" averaged in the background class. Here every region is scored on its own,
per case, on hard masks; background never enters a score.
"""

from __future__ import annotations

import numpy as np

from ssl3d_jax.data import brats

REGIONS = ("WT", "TC", "ET")


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


def brats_region_dice(pred_labels, true_labels) -> dict[str, float]:
    """Dice of the BraTS regions WT (1, 2, 4), TC (1, 4) and ET (4), each on its own.

    Args:
      pred_labels: int array `[D, H, W]` of BraTS labels {0, 1, 2, 4}.
      true_labels: int array `[D, H, W]` of BraTS labels {0, 1, 2, 4}.

    Returns:
      {'WT': float, 'TC': float, 'ET': float}.
    """
    p = brats.label_to_regions(np.asarray(pred_labels))
    t = brats.label_to_regions(np.asarray(true_labels))
    return {name: dice(p[..., i], t[..., i]) for i, name in enumerate(REGIONS)}
