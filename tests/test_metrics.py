"""Dice and the segmentation losses on hand-computed cases."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax import losses, metrics
from ssl3d_jax.data import brats


def _brats_region_dice(pred_labels, true_labels) -> dict[str, float]:
    """Reference: Dice of each BraTS region (WT, TC, ET) from BraTS label volumes {0, 1, 2, 4},
    through the label → region masks of the data layer."""
    p = brats.label_to_regions(np.asarray(pred_labels))
    t = brats.label_to_regions(np.asarray(true_labels))
    return {name: metrics.dice(p[..., i], t[..., i]) for i, name in enumerate(metrics.REGIONS)}


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
    d = _brats_region_dice(pred, true)
    assert d["WT"] == 1.0
    assert d["TC"] == 1.0
    assert d["ET"] == 0.0
    # Background voxels never count: an all-background pair scores 1 (nothing to find), not
    # a background Dice.
    bg = np.zeros((3, 3, 3), np.int32)
    assert _brats_region_dice(bg, bg) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


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


# ------------------------------------------------------------------------------------------------
# Region Dice / HD95 on class-index volumes.

PANCREAS = (("pancreas", (1,)), ("tumour", (2,)))


def test_region_dice_pancreas_each_class_on_its_own():
    true = np.array([0, 1, 1, 1, 2, 2, 0, 0])
    pred = np.array([0, 1, 1, 0, 2, 1, 0, 0])
    # pancreas: P = {1, 2, 5}, T = {1, 2, 3}, |P ∩ T| = 2 → 4/6; tumour: P = {4}, T = {4, 5} → 2/3
    d = metrics.region_dice(pred, true, PANCREAS)
    assert list(d) == ["pancreas", "tumour"]
    assert d["pancreas"] == pytest.approx(2 / 3)
    assert d["tumour"] == pytest.approx(2 / 3)
    # Background agreement (six 0-voxels here) never raises a score.
    assert metrics.region_dice(np.zeros(8, int), true, PANCREAS) == {"pancreas": 0.0, "tumour": 0.0}


def test_region_dice_brats_regions_match_brats_region_dice():
    rng = np.random.default_rng(0)
    to_index = np.array([0, 1, 2, 0, 3])  # BraTS label 4 is class index 3
    true_labels = rng.choice([0, 1, 2, 4], size=(6, 6, 6))
    pred_labels = rng.choice([0, 1, 2, 4], size=(6, 6, 6))
    d = metrics.region_dice(to_index[pred_labels], to_index[true_labels], metrics.BRATS_REGIONS)
    assert d == pytest.approx(_brats_region_dice(pred_labels, true_labels))


def test_region_stats_flags_empty_regions():
    true = np.array([[0, 1], [1, 0]])
    pred = np.array([[0, 1], [0, 0]])
    s = metrics.region_stats(pred, true, PANCREAS)
    assert (s["pancreas"].pred_voxels, s["pancreas"].target_voxels) == (1, 2)
    assert s["pancreas"].intersection == 1
    assert not s["pancreas"].empty
    # No tumour anywhere: Dice 1 by convention, and `empty` lets a report leave the case out.
    assert s["tumour"].empty
    assert s["tumour"].dice == 1.0


def test_region_rejects_background_and_shape_mismatch():
    z = np.zeros((3, 3), int)
    with pytest.raises(ValueError, match="foreground"):
        metrics.region_dice(z, z, (("all", (0, 1)),))
    with pytest.raises(ValueError, match="shape"):
        metrics.region_dice(z, np.zeros((3, 4), int), PANCREAS)


def test_hausdorff95_hand_computed_with_spacing():
    # 1D: pred surface = {1, 3} (index 2 is interior), target surface = {8}.
    # pred → target: {7, 5}; 95th percentile with linear interpolation = 5 + 0.95 · 2 = 6.9.
    # target → pred: {5}. HD95 = max(6.9, 5) = 6.9 voxels, 3.45 mm at 0.5 mm per voxel.
    pred = np.zeros(10, bool)
    pred[1:4] = True
    target = np.zeros(10, bool)
    target[8] = True
    assert metrics.hausdorff95(pred, target) == pytest.approx(6.9)
    assert metrics.hausdorff95(pred, target, spacing=(0.5,)) == pytest.approx(3.45)
    assert metrics.hausdorff95(target, pred, spacing=0.5) == pytest.approx(3.45)


def test_hausdorff95_anisotropic_single_voxels():
    a = np.zeros((6, 6, 6), bool)
    b = a.copy()
    a[0, 0, 0] = True
    b[3, 0, 0] = True
    # 3 voxels apart along axis 0, 2 mm per voxel on that axis.
    assert metrics.hausdorff95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert metrics.hausdorff95(a, a, spacing=(2.0, 1.0, 1.0)) == 0.0


def test_hausdorff95_ignores_a_single_outlier():
    # A 10 × 10 sheet plus one stray voxel 8 slices away: 1 of 101 surface voxels, below the
    # 5% tail, so HD95 stays 0 where the plain Hausdorff distance would be 8.
    target = np.zeros((12, 12, 12), bool)
    target[1, 1:11, 1:11] = True
    pred = target.copy()
    pred[9, 5, 5] = True
    assert metrics.hausdorff95(pred, target) == pytest.approx(0.0)


def test_hausdorff95_matches_brute_force():
    from scipy import ndimage

    def brute(a, b, sp):
        sa = np.argwhere(a & ~ndimage.binary_erosion(a)) * sp
        sb = np.argwhere(b & ~ndimage.binary_erosion(b)) * sp
        d = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1))
        return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))

    rng = np.random.default_rng(1)
    sp = np.array([1.0, 2.0, 0.5])
    for _ in range(5):
        a = ndimage.binary_dilation(rng.random((12, 14, 10)) > 0.97, iterations=1)
        b = ndimage.binary_dilation(rng.random((12, 14, 10)) > 0.97, iterations=2)
        assert metrics.hausdorff95(a, b, spacing=sp) == pytest.approx(brute(a, b, sp))


def test_hausdorff95_empty_masks_and_bad_spacing():
    z = np.zeros((4, 4, 4), bool)
    one = z.copy()
    one[1, 1, 1] = True
    # BraTS scoring: a missed region and a false detection cost the BraTS image diagonal.
    assert metrics.HD95_MISSING_MM == 373.13
    assert metrics.HD95_MISSING_MM == pytest.approx(np.sqrt(240**2 + 240**2 + 155**2), abs=5e-3)
    assert metrics.hausdorff95(z, one) == 373.13  # missed: in the truth, not predicted
    assert metrics.hausdorff95(one, z) == 373.13  # false detection: predicted, not in the truth
    assert metrics.hausdorff95(z, one, spacing=(2.0, 2.0, 2.0)) == 373.13  # in mm, any grid
    assert np.isnan(metrics.hausdorff95(z, z))  # nothing to find, nothing found: no distance
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff95(one, one, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hausdorff95(one, one, spacing=(1.0, 0.0, 1.0))


def test_region_hd95():
    true = np.zeros((8, 8, 8), int)
    true[1, 1, 1] = 1
    pred = np.zeros_like(true)
    pred[4, 1, 1] = 1
    pred[6, 6, 6] = 2  # tumour predicted, none in the truth → a false detection
    d = metrics.region_hd95(pred, true, PANCREAS, spacing=(1.5, 1.0, 1.0))
    assert d["pancreas"] == pytest.approx(4.5)
    assert d["tumour"] == metrics.HD95_MISSING_MM
    # Tumour missed: in the truth, absent from the prediction.
    assert metrics.region_hd95(true, pred, PANCREAS)["tumour"] == metrics.HD95_MISSING_MM
    same = metrics.region_hd95(true, true, PANCREAS)  # no tumour in either
    assert same["pancreas"] == 0.0 and np.isnan(same["tumour"])


def test_hausdorff95_is_monai_definition_not_medpy():
    # 2D, anisotropic: a 3 × 3 square against a 1 × 2 bar plus a far voxel. The two directed
    # distance sets have different tails, so MONAI's max of the two directed 95th percentiles
    # and medpy's 95th percentile of their union differ; both computed by brute force.
    pred = np.zeros((9, 12), bool)
    pred[1:4, 1:4] = True
    target = np.zeros((9, 12), bool)
    target[2, 2:4] = True
    target[7, 10] = True
    sp = np.array([1.0, 0.7])

    def surface_mm(m):
        # Surface as defined for both: the voxels a face-connected erosion removes.
        pts = []
        for i, j in np.argwhere(m):
            nbrs = [(i + di, j + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))]
            inside = all(0 <= a < m.shape[0] and 0 <= b < m.shape[1] and m[a, b] for a, b in nbrs)
            if not inside:
                pts.append((i, j))
        return np.asarray(pts, np.float64) * sp

    sp_, st_ = surface_mm(pred), surface_mm(target)
    d = np.sqrt(((sp_[:, None] - st_[None]) ** 2).sum(-1))
    pred_to_target, target_to_pred = d.min(1), d.min(0)
    monai = max(np.percentile(pred_to_target, 95), np.percentile(target_to_pred, 95))
    medpy = np.percentile(np.concatenate([pred_to_target, target_to_pred]), 95)
    assert abs(monai - medpy) > 0.5  # the case tells the two definitions apart
    got = metrics.hausdorff95(pred, target, spacing=sp)
    assert got == pytest.approx(monai)
    assert got != pytest.approx(medpy)
    assert metrics.hausdorff95(target, pred, spacing=sp) == pytest.approx(monai)  # symmetric


def test_mean_over_cases_excludes_and_counts_nan():
    # Two cases: case b has no tumour in either prediction or truth (HD95 nan, left out and
    # counted); case c missed the tumour (373.13, averaged in).
    true = np.zeros((6, 6, 6), int)
    true[1:3, 1:3, 1:3] = 1
    true[4, 4, 4] = 2
    no_tumour = np.where(true == 2, 0, true)
    per_case = {}
    for name, (pred, target) in {
        "a": (true, true),
        "b": (no_tumour, no_tumour),
        "c": (no_tumour, true),
    }.items():
        scores = metrics.region_dice(pred, target, PANCREAS)
        hd = metrics.region_hd95(pred, target, PANCREAS)
        scores.update({f"HD95 {k}": v for k, v in hd.items()})
        per_case[name] = scores
    assert np.isnan(per_case["b"]["HD95 tumour"])
    assert per_case["c"]["HD95 tumour"] == metrics.HD95_MISSING_MM
    means, n_excluded = metrics.mean_over_cases(per_case)
    assert list(means) == ["pancreas", "tumour", "HD95 pancreas", "HD95 tumour"]
    assert means["HD95 tumour"] == pytest.approx((0.0 + 373.13) / 2)  # b left out, not 0
    assert means["HD95 pancreas"] == 0.0
    assert means["tumour"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)  # Dice: 1 when both empty
    assert n_excluded == {"pancreas": 0, "tumour": 0, "HD95 pancreas": 0, "HD95 tumour": 1}
    # A region absent everywhere: no case to average, nan (skipped and counted by the report).
    means, n_excluded = metrics.mean_over_cases({"b": per_case["b"]})
    assert np.isnan(means["HD95 tumour"]) and n_excluded["HD95 tumour"] == 1


# ------------------------------------------------------------------------------------------------
# Classification.


def test_quadratic_weighted_kappa_hand_computed():
    # O: (0,0), (0,1), (1,1), (2,2); W = (i-j)²/4 → sum W·O = 0.25.
    # Histograms true (2,1,1), pred (1,2,1), E = outer / 4 → sum W·E = 1.25. κ = 1 - 0.25/1.25.
    k = metrics.quadratic_weighted_kappa([0, 0, 1, 2], [0, 1, 1, 2], num_classes=3)
    assert k == pytest.approx(0.8)
    # Two classes, both answers swapped: sum W·O = 2, sum W·E = 1 → κ = -1.
    assert metrics.quadratic_weighted_kappa([0, 1], [1, 0], num_classes=2) == pytest.approx(-1.0)


def test_quadratic_weighted_kappa_reference_points():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 4000)
    assert metrics.quadratic_weighted_kappa(y, y, num_classes=5) == pytest.approx(1.0)
    chance = metrics.quadratic_weighted_kappa(y, rng.integers(0, 5, 4000), num_classes=5)
    assert abs(chance) < 0.05
    assert metrics.quadratic_weighted_kappa(y, np.full_like(y, 2), num_classes=5) == pytest.approx(
        0.0, abs=1e-12
    )
    # Both constant and equal: 0/0 in the formula; perfect agreement by convention.
    assert metrics.quadratic_weighted_kappa([3, 3, 3], [3, 3, 3], num_classes=5) == 1.0
    # Quadratic weights: being off by 2 grades costs more than being off by 1.
    off1 = metrics.quadratic_weighted_kappa(y, np.clip(y + 1, 0, 4), num_classes=5)
    off2 = metrics.quadratic_weighted_kappa(y, np.clip(y + 2, 0, 4), num_classes=5)
    assert 1.0 > off1 > off2


def test_quadratic_weighted_kappa_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 200)
    p = np.clip(y + rng.integers(-2, 3, 200), 0, 4)
    assert metrics.quadratic_weighted_kappa(y, p, num_classes=5) == pytest.approx(
        sk.cohen_kappa_score(y, p, weights="quadratic")
    )


def test_quadratic_weighted_kappa_rejects_out_of_range_grades():
    # The original decoded "no sigmoid output above 0.5" to grade -1 and scored it silently.
    with pytest.raises(ValueError, match=r"\[-1\]"):
        metrics.quadratic_weighted_kappa([0, 1, 2], [0, -1, 2], num_classes=5)
    with pytest.raises(ValueError, match="outside"):
        metrics.quadratic_weighted_kappa([0, 5], [0, 1], num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.quadratic_weighted_kappa([0], [0], num_classes=1)


def test_accuracy():
    assert metrics.accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == pytest.approx(0.75)
    assert metrics.accuracy(np.array([[1, 2]]), np.array([1, 2])) == 1.0
    with pytest.raises(ValueError, match="labels"):
        metrics.accuracy([0, 1], [0])


@pytest.mark.slow
def test_cross_entropy_equals_optax_integer_label_form():
    import jax
    import optax

    from ssl3d_jax import losses

    logits = jax.random.normal(jax.random.key(0), (2, 5, 6, 4, 3)) * 3.0
    labels = jax.random.randint(jax.random.key(1), (2, 5, 6, 4), 0, 3)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), want, rtol=1e-6)
    g = jax.grad(losses.cross_entropy)(logits, labels)
    g_want = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).mean())(
        logits
    )
    np.testing.assert_allclose(g, g_want, rtol=1e-5, atol=1e-8)
