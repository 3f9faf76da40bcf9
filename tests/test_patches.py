"""Tests of `ssl3d_jax.ops.patches` (2D and 3D): grid order, offsets, jitter, jit/vmap, errors."""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.ops.patches import (
    extract_grid,
    grid_layout,
    grid_starts,
    num_patches,
    patch_shape,
    slice_patches,
)
from check_util import assert_decided_by_key

P, J = 3, 2
SHAPE = (15, 18, 12)  # non-cubic; cells 5 x 6 x 4, patches 3 x 4 x 2
# Spatial shape per dimensionality: 3D as above, 2D non-square (cells 5 x 6 -> patches 3 x 4),
# with 1-2 leftover pixels at the high end of each axis.
SHAPES = {3: SHAPE, 2: (16, 20)}
PSHAPES = {3: (3, 4, 2), 2: (3, 4)}


def cell_constant_volume(shape, p):
    """Image / volume whose every grid cell holds its row-major cell index (leftover -1)."""
    vol = -np.ones(shape, np.float32)
    g = [s // p for s in shape]
    for n, cell in enumerate(itertools.product(range(p), repeat=len(shape))):
        vol[tuple(slice(a * m, (a + 1) * m) for a, m in zip(cell, g))] = n
    return vol[..., None]


def coordinate_volume(shape):
    """n-channel image / volume whose pixel value is its own (d, h, w) / (h, w) coordinate."""
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(
        np.float32
    )


@functools.cache
def _jitted(training):
    return jax.jit(functools.partial(extract_grid, patches_per_side=P, jitter=J, training=training))


@functools.cache
def _batched(training):
    return jax.jit(
        jax.vmap(functools.partial(extract_grid, patches_per_side=P, jitter=J, training=training))
    )


def _crop(vol, start, shape):
    return vol[tuple(slice(s, s + n) for s, n in zip(start, shape))]


def test_helpers():
    assert num_patches(3) == 27
    assert num_patches(3, spatial_dims=3) == 27
    assert num_patches(3, spatial_dims=2) == 9
    assert patch_shape((*SHAPE, 1), patches_per_side=P, jitter=J) == (3, 4, 2)
    assert patch_shape((128, 128, 128, 1), patches_per_side=3, jitter=3) == (39, 39, 39)
    # 2D (rank-3 shape [H, W, C]): the original's kaggle retina and pancreas slice settings.
    assert patch_shape((224, 224, 3), patches_per_side=3, jitter=8) == (66, 66)
    assert patch_shape((128, 128, 1), patches_per_side=3, jitter=4) == (38, 38)
    assert patch_shape((16, 20, 1), patches_per_side=P, jitter=J) == (3, 4)
    starts = grid_starts((16, 20, 1), None, patches_per_side=P, jitter=J, training=False)
    assert starts.shape == (9, 2) and starts.dtype == jnp.int32
    # Row-major: the last axis varies fastest.
    np.testing.assert_array_equal(np.asarray(starts[:4]), [[1, 1], [1, 7], [1, 13], [6, 1]])


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_cell_constant_values(n, training):
    vol = jnp.asarray(cell_constant_volume(SHAPES[n], P))
    out = np.asarray(_jitted(training)(vol, jax.random.key(0)))
    assert out.shape == (P**n, *PSHAPES[n], 1)
    for i in range(P**n):
        np.testing.assert_array_equal(out[i], i)  # constant and equal to its own row-major index


@pytest.mark.parametrize("n", [2, 3])
def test_eval_offset_is_half_jitter(n):
    vol = np.random.default_rng(0).normal(size=(*SHAPES[n], 2)).astype(np.float32)
    out = np.asarray(_jitted(False)(jnp.asarray(vol), None))
    g, ps, o = [s // P for s in SHAPES[n]], PSHAPES[n], J // 2
    for i, cell in enumerate(itertools.product(range(P), repeat=n)):
        start = [c * m + o for c, m in zip(cell, g)]
        np.testing.assert_array_equal(out[i], _crop(vol, start, ps))


@pytest.mark.parametrize("n", [2, 3])
def test_training_offsets_cover_range_and_match_numpy(n):
    vol = coordinate_volume(SHAPES[n])
    keys = jax.random.split(jax.random.key(1), 64)
    vols = jnp.broadcast_to(jnp.asarray(vol), (64, *vol.shape))
    out = np.asarray(_batched(True)(vols, keys))  # [64, P**n, *patch, n]
    g, ps = np.array([s // P for s in SHAPES[n]]), PSHAPES[n]
    cells = np.array(list(itertools.product(range(P), repeat=n)))
    starts = out[(slice(None), slice(None), *([0] * n))].astype(int)  # corner holds its coords
    offsets = starts - cells[None] * g
    assert offsets.min() == 0 and offsets.max() == J
    for a in range(n):  # every offset value appears on every axis
        assert set(np.unique(offsets[..., a])) == set(range(J + 1))
    for b in range(0, 64, 7):
        for i in range(P**n):
            np.testing.assert_array_equal(out[b, i], _crop(vol, starts[b, i], ps))


def test_slice_patches_2d_matches_grid_starts():
    img = jax.random.normal(jax.random.key(0), (16, 20, 3))
    key = jax.random.key(2)
    starts = grid_starts(img.shape, key, patches_per_side=P, jitter=J, training=True)
    got = slice_patches(img, starts[jnp.array([4, 0])], (3, 4))
    grid = extract_grid(img, key, patches_per_side=P, jitter=J, training=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(grid[jnp.array([4, 0])]))


@pytest.mark.parametrize("n", [2, 3])
def test_determinism(n):
    vol = jnp.asarray(coordinate_volume(SHAPES[n]))
    assert_decided_by_key(_jitted(True), vol, jax.random.key(3), jax.random.key(4))


@pytest.mark.slow
def test_jit_vmap_matches_single():
    vols = jax.random.normal(jax.random.key(0), (3, *SHAPE, 1))
    keys = jax.random.split(jax.random.key(5), 3)
    batched = np.asarray(_batched(True)(vols, keys))
    assert batched.shape == (3, 27, 3, 4, 2, 1)
    for b in range(3):
        np.testing.assert_array_equal(batched[b], np.asarray(_jitted(True)(vols[b], keys[b])))


@pytest.mark.parametrize("shape", [(12, 12, 12, 1), (12, 12, 1)])
@pytest.mark.parametrize("p, j", [(3, 5), (4, 4), (0, 0), (3, -1)])
def test_bad_sizes_raise(shape, p, j):
    with pytest.raises(ConfigError):
        extract_grid(
            jnp.zeros(shape),
            jax.random.key(0),
            patches_per_side=p,
            jitter=j,
            training=True,
        )


@pytest.mark.parametrize("shape", [(12, 12), (2, 12, 12, 12, 1)])
def test_bad_rank_raises_with_shape(shape):
    with pytest.raises(ConfigError, match=re.escape(str(shape))):
        extract_grid(jnp.zeros(shape), None, patches_per_side=3, jitter=0, training=False)
    with pytest.raises(ConfigError):
        num_patches(3, spatial_dims=4)


# ----------------------------------------------------------------------------------------------
# grid_fraction < 1: a smaller grid at a random origin


def _old_grid_starts(volume_shape, key, *, patches_per_side, jitter, training):
    """`grid_starts` as it was before `grid_fraction` existed (verbatim in substance)."""
    n = len(volume_shape) - 1
    p = patches_per_side
    cells = np.stack(np.meshgrid(*([np.arange(p)] * n), indexing="ij"), axis=-1).reshape(-1, n)
    origins = jnp.asarray(cells * np.array([s // p for s in volume_shape[:n]]), jnp.int32)
    if training:
        offsets = jax.random.randint(key, (p**n, n), 0, jitter + 1, dtype=jnp.int32)
    else:
        offsets = jnp.full((p**n, n), jitter // 2, dtype=jnp.int32)
    return origins + offsets


@pytest.mark.parametrize("shape", [(*SHAPE, 2), (16, 20, 3), (40, 40, 40, 1), (128, 128, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_grid_fraction_one_is_bit_identical_to_before(shape, training):
    for seed in range(4):
        key = jax.random.key(seed)
        got = grid_starts(
            shape, key, patches_per_side=P, jitter=J, training=training, grid_fraction=1.0
        )
        want = _old_grid_starts(shape, key, patches_per_side=P, jitter=J, training=training)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        # and the default is 1
        default = grid_starts(shape, key, patches_per_side=P, jitter=J, training=training)
        np.testing.assert_array_equal(np.asarray(default), np.asarray(want))
    vol = jax.random.normal(jax.random.key(9), shape)
    np.testing.assert_array_equal(
        np.asarray(extract_grid(vol, key, patches_per_side=P, jitter=J, training=training)),
        np.asarray(
            extract_grid(
                vol, key, patches_per_side=P, jitter=J, training=training, grid_fraction=1.0
            )
        ),
    )


def test_grid_layout():
    # 40 * 0.5 = 20 -> cells 6, room 40 - 18 = 22; f = 1: the original's cells, room 0.
    assert grid_layout((40, 40, 40, 4), patches_per_side=3, grid_fraction=0.5) == (
        (6, 6, 6),
        (22, 22, 22),
    )
    assert grid_layout((40, 40, 40, 4), patches_per_side=3) == ((13, 13, 13), (0, 0, 0))
    assert grid_layout((128, 128, 1), patches_per_side=3) == ((42, 42), (0, 0))
    assert grid_layout((40, 30, 1), patches_per_side=4, grid_fraction=0.7) == ((7, 5), (12, 10))
    assert patch_shape((40, 40, 40, 1), patches_per_side=3, jitter=1, grid_fraction=0.5) == (
        5,
        5,
        5,
    )
    for bad in (0.0, -0.5, 1.5, float("nan"), True, "half"):
        with pytest.raises(ConfigError, match="grid_fraction"):
            grid_layout((40, 40, 40, 1), patches_per_side=3, grid_fraction=bad)
    with pytest.raises(ConfigError, match="patch size would be"):
        patch_shape((24, 24, 24, 1), patches_per_side=3, jitter=4, grid_fraction=0.5)


@pytest.mark.parametrize("n", [2, 3])
def test_random_grid_origin_per_key_within_bounds(n):
    """Training: one origin per input, uniform over [0, room] per axis, all cells moved by it;
    the jitter offsets stay in [0, J] on top."""
    shape, f, jitter = (*SHAPES[n], 1), 0.6, 1
    cell, room = grid_layout(shape, patches_per_side=P, grid_fraction=f)
    assert min(room) >= 3
    cells = np.array(list(itertools.product(range(P), repeat=n)))
    fn = jax.jit(
        jax.vmap(
            functools.partial(
                grid_starts,
                shape,
                patches_per_side=P,
                jitter=jitter,
                training=True,
                grid_fraction=f,
            )
        )
    )
    starts = np.asarray(fn(jax.random.split(jax.random.key(0), 400)))  # [400, P**n, n]
    rel = starts - cells[None] * np.array(cell)  # origin + jitter offset
    origin = rel.min(axis=1)  # >= the origin, equal to it where a patch drew offset 0
    assert (rel - origin[:, None] <= jitter).all()  # all cells share one origin
    assert (origin >= 0).all() and (rel.max(axis=1) <= np.array(room) + jitter).all()
    pshape = patch_shape(shape, patches_per_side=P, jitter=jitter, grid_fraction=f)
    assert (starts + np.array(pshape) <= np.array(shape[:n])).all()  # inside the input
    for a in range(n):  # every origin value drawn on every axis (also the extremes)
        assert set(np.unique(origin[:, a])) == set(range(room[a] + 1)), a
    # Differs across keys: most of the (room + 1)**n possible origins are drawn.
    assert len({o.tobytes() for o in origin}) > 0.5 * np.prod(np.array(room) + 1)
    # Same key, same grid.
    key = jax.random.key(5)
    kw = dict(patches_per_side=P, jitter=jitter, training=True, grid_fraction=f)
    np.testing.assert_array_equal(grid_starts(shape, key, **kw), grid_starts(shape, key, **kw))


@pytest.mark.parametrize("n", [2, 3])
def test_random_grid_centred_when_not_training(n):
    shape, f, jitter = (*SHAPES[n], 1), 0.8, 2
    cell, room = grid_layout(shape, patches_per_side=P, grid_fraction=f)
    assert min(room) >= 2
    starts = grid_starts(
        shape, None, patches_per_side=P, jitter=jitter, training=False, grid_fraction=f
    )
    cells = np.array(list(itertools.product(range(P), repeat=n)))
    want = cells * np.array(cell) + np.array(room) // 2 + jitter // 2
    np.testing.assert_array_equal(np.asarray(starts), want)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("training", [True, False])
def test_random_grid_patches_are_slices_at_the_starts(n, training):
    shape, f = (*SHAPES[n], 2), 0.7
    vol = np.random.default_rng(n).normal(size=shape).astype(np.float32)
    kw = dict(patches_per_side=P, jitter=1, training=training, grid_fraction=f)
    pshape = patch_shape(shape, patches_per_side=P, jitter=1, grid_fraction=f)
    batched = jax.jit(jax.vmap(functools.partial(extract_grid, **kw), in_axes=(None, 0)))
    keys = jax.random.split(jax.random.key(3), 3)
    out = np.asarray(batched(jnp.asarray(vol), keys))
    assert out.shape == (3, P**n, *pshape, 2)
    for b in range(3):
        starts = np.asarray(grid_starts(shape, keys[b], **kw))
        for i in range(P**n):
            np.testing.assert_array_equal(out[b, i], _crop(vol, starts[i], pshape))
