"""Dice and the segmentation losses on hand-computed cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax import losses, metrics


def test_dice_hand_computed():
    pred = np.array([1, 1, 0, 0, 1], bool)
    target = np.array([1, 0, 0, 1, 1], bool)
    # |P ∩ T| = 2, |P| = 3, |T| = 3 → 4/6
    assert metrics.dice(pred, target) == pytest.approx(2 / 3)


def test_dice_empty_and_disjoint():
    z = np.zeros((4, 4, 4), bool)
    assert metrics.dice(z, z) == 1.0
    one = z.copy()
    one[0, 0, 0] = True
    assert metrics.dice(one, z) == 0.0
    assert metrics.dice(z, one) == 0.0
    assert metrics.dice(one, one) == 1.0


def test_dice_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(np.zeros(3, bool), np.zeros(4, bool))


def test_brats_region_dice_each_region_on_its_own():
    true = np.zeros((2, 2, 2), np.int32)
    true[0, 0, 0] = 4  # ET
    true[0, 0, 1] = 1  # necrotic core
    true[0, 1, 0] = 2  # oedema
    pred = true.copy()
    pred[0, 0, 0] = 1  # ET voxel predicted as necrosis: TC and WT still right, ET missed
    d = metrics.brats_region_dice(pred, true)
    assert d["WT"] == 1.0
    assert d["TC"] == 1.0
    assert d["ET"] == 0.0
    # Background voxels never count: an all-background pair scores 1 (nothing to find), not
    # a background Dice.
    bg = np.zeros((3, 3, 3), np.int32)
    assert metrics.brats_region_dice(bg, bg) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


def test_soft_dice_loss_perfect_and_wrong():
    labels = jnp.array([[0, 1, 2, 3]])
    perfect = jnp.eye(4)[labels] * 100.0
    assert float(losses.soft_dice_loss(perfect, labels, num_classes=4)) == pytest.approx(
        0, abs=1e-4
    )
    wrong = jnp.eye(4)[(labels + 1) % 4] * 100.0
    assert float(losses.soft_dice_loss(wrong, labels, num_classes=4)) == pytest.approx(1, abs=1e-4)


def test_cross_entropy_uniform():
    logits = jnp.zeros((2, 3, 4))
    labels = jnp.zeros((2, 3), jnp.int32)
    assert float(losses.cross_entropy(logits, labels)) == pytest.approx(np.log(4), rel=1e-6)
