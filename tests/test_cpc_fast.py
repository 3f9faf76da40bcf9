"""CPC `make_batch` as one fused gather per volume (`ssl3d_jax.tasks.cpc`) against the step-wise
implementation it replaced (whole-volume `random_crop_pad` -> `extract_grid` -> per-patch
`augment_patch`, kept here as the reference): bit-identical patches for the same key, 3D and 2D,
with and without flips, crops, jitter and training; odd sizes; several dtypes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax.ops.patches import extract_grid
from ssl3d_jax.tasks import cpc


def _reference(
    volumes,
    key,
    *,
    patches_per_side,
    jitter,
    volume_crop,
    patch_crop,
    flip,
    training,
    grid_fraction=1.0,
):
    """The step-wise `make_batch` before the fused gather (verbatim in substance; the grid
    fraction passed on to `extract_grid`)."""

    def one(volume, k):
        k_vol, k_grid, k_patch = jax.random.split(k, 3)
        if training:
            crop = tuple(max(int(s * volume_crop), 1) for s in volume.shape[:-1])
            volume = cpc.random_crop_pad(volume, k_vol, crop_shape=crop)
        patches = extract_grid(
            volume,
            k_grid,
            patches_per_side=patches_per_side,
            jitter=jitter,
            training=training,
            grid_fraction=grid_fraction,
        )
        if training:
            keys = jax.random.split(k_patch, patches.shape[0])

            def aug(x, kk):
                return cpc.augment_patch(x, kk, patch_crop=patch_crop, flip=flip)

            patches = jax.vmap(aug)(patches, keys)
        return patches

    return jax.vmap(one)(volumes, jax.random.split(key, volumes.shape[0]))


# The static arguments of `make_batch` a case's fields give, in the cases' order.
_FIELDS = ("patches_per_side", "jitter", "volume_crop", "patch_crop", "flip", "training")


@functools.cache
def _pair(*fields, grid_fraction=1.0):
    """`make_batch` and `_reference`, jitted, with the static arguments of a case's fields."""
    kw = dict(zip(_FIELDS, fields, strict=True), grid_fraction=grid_fraction)
    return (
        jax.jit(functools.partial(cpc.make_batch, **kw)),
        jax.jit(functools.partial(_reference, **kw)),
    )


def _bit_identical(ours, ref, x, seeds) -> list:
    """`ours` and `ref` on `x` for each seed's key: same shape, dtype and raw bits; the outputs
    `(got, want)` per seed as NumPy arrays."""
    out = []
    for seed in seeds:
        got, want = ours(x, jax.random.key(seed)), ref(x, jax.random.key(seed))
        assert got.shape == want.shape and got.dtype == want.dtype == x.dtype
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # the raw bits
        out.append((got, want))
    return out


# (spatial shape, P, jitter, volume_crop, patch_crop, flip, training, dtype)
CASES = [
    ((16, 16, 16), 4, 0, 0.95, 7 / 8, True, True, "float32"),  # the paper's 3D setting, scaled
    ((17, 13, 15), 3, 1, 0.8, 0.6, True, True, "bfloat16"),  # odd, non-cubic, jitter, big crops
    ((16, 16, 16), 4, 1, 0.95, 7 / 8, True, False, "float32"),  # validation: no augmentation
    ((13, 12, 12), 2, 2, 1.0, 0.5, True, True, "float32"),  # patch crop only
    ((20, 20), 5, 0, 1.0, 11 / 12, False, True, "float32"),  # the paper's 2D setting, scaled
    ((21, 18), 4, 1, 0.7, 0.75, True, True, "int8"),  # 2D with flip and both crops
]


def _ids(case) -> str:
    return "x".join(map(str, case[0])) + f"-P{case[1]}-{'train' if case[6] else 'eval'}-{case[7]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fused_make_batch_is_bit_identical_to_the_stepwise_version(case):
    spatial, p, j, vc, pc, flip, training, dtype = case
    ours, ref = _pair(*case[1:7])
    # Values != 0 everywhere, so a zero in the output can only come from the padding.
    x = np.random.default_rng(p).integers(1, 100, (3, *spatial, 2))
    x = jnp.asarray(x * np.where(np.random.default_rng(j).random(x.shape) < 0.5, -1, 1), dtype)
    got, want = _bit_identical(ours, ref, x, (0, 1, 2))[-1]
    if training and (vc < 1 or pc < 1):
        assert (got == 0).any()  # the padding is exercised
    if training and flip:
        assert (got != want[:, :, ::-1]).any()  # nothing trivially symmetric hides a bug


# (spatial shape, P, jitter, volume_crop, patch_crop, flip, training, grid_fraction)
GRID_CASES = [
    ((20, 20, 20), 4, 1, 0.95, 7 / 8, True, True, 0.6),  # the default's random grid, scaled
    ((21, 17, 19), 3, 0, 0.9, 0.75, True, True, 0.5),  # odd, non-cubic
    ((20, 20, 20), 4, 1, 0.95, 7 / 8, True, False, 0.6),  # validation: centred grid
    ((24, 22), 5, 1, 1.0, 11 / 12, False, True, 0.7),  # 2D
]


@pytest.mark.slow
@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: f"{_ids(c[:7] + ('float32',))}-f{c[7]}")
def test_fused_make_batch_with_a_random_grid_is_bit_identical(case):
    spatial, p, training = case[0], case[1], case[6]
    ours, ref = _pair(*case[1:7], grid_fraction=case[7])
    x = jnp.asarray(np.random.default_rng(p).integers(1, 100, (2, *spatial, 2)), jnp.float32)
    outs = [got for got, _ in _bit_identical(ours, ref, x, (0, 1))]
    assert training == (not np.array_equal(*outs))  # eval: centred grid, same for every key
