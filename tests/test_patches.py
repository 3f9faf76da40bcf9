"""Tests of `ssl3d_jax.ops.patches`: grid order, offsets, jitter range, jit/vmap, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.ops.patches import extract_grid, num_patches, patch_shape

P, J = 3, 2
SHAPE = (15, 18, 12)  # non-cubic; cells 5 x 6 x 4, patches 3 x 4 x 2


def cell_constant_volume(shape, p):
    """Volume whose every grid cell holds its row-major cell index (leftover voxels -1)."""
    vol = -np.ones(shape, np.float32)
    g = [s // p for s in shape]
    for i in range(p):
        for j in range(p):
            for k in range(p):
                cell = tuple(slice(a * n, (a + 1) * n) for a, n in zip((i, j, k), g))
                vol[cell] = i * p * p + j * p + k
    return vol[..., None]


def coordinate_volume(shape):
    """3-channel volume whose voxel value is its own (d, h, w) coordinate."""
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


def test_helpers():
    assert num_patches(3) == 27
    assert patch_shape(SHAPE, patches_per_side=P, jitter=J) == (3, 4, 2)
    assert patch_shape((128, 128, 128, 1), patches_per_side=3, jitter=3) == (39, 39, 39)


@pytest.mark.parametrize("training", [True, False])
def test_cell_constant_values(training):
    vol = jnp.asarray(cell_constant_volume(SHAPE, P))
    out = np.asarray(_jitted(training)(vol, jax.random.key(0)))
    assert out.shape == (27, 3, 4, 2, 1)
    for n in range(27):
        np.testing.assert_array_equal(out[n], n)  # constant and equal to its own row-major index


def test_eval_offset_is_half_jitter():
    vol = np.random.default_rng(0).normal(size=(*SHAPE, 2)).astype(np.float32)
    out = np.asarray(
        jax.jit(functools.partial(extract_grid, patches_per_side=P, jitter=J, training=False))(
            jnp.asarray(vol), None
        )
    )
    g, ps, o = (5, 6, 4), (3, 4, 2), J // 2
    n = 0
    for i in range(P):
        for j in range(P):
            for k in range(P):
                s = (i * g[0] + o, j * g[1] + o, k * g[2] + o)
                ref = vol[s[0] : s[0] + ps[0], s[1] : s[1] + ps[1], s[2] : s[2] + ps[2]]
                np.testing.assert_array_equal(out[n], ref)
                n += 1


def test_training_offsets_cover_range_and_match_numpy():
    vol = coordinate_volume(SHAPE)
    keys = jax.random.split(jax.random.key(1), 64)
    vols = jnp.broadcast_to(jnp.asarray(vol), (64, *vol.shape))
    out = np.asarray(_batched(True)(vols, keys))  # [64, 27, 3, 4, 2, 3]
    g, ps = np.array([5, 6, 4]), (3, 4, 2)
    cells = np.stack(np.meshgrid(*[np.arange(P)] * 3, indexing="ij"), -1).reshape(-1, 3)
    starts = out[:, :, 0, 0, 0, :].astype(int)  # the corner voxel holds its own coordinate
    offsets = starts - cells[None] * g
    assert offsets.min() == 0 and offsets.max() == J
    for a in range(3):  # every offset value appears on every axis
        assert set(np.unique(offsets[..., a])) == set(range(J + 1))
    for b in range(0, 64, 7):
        for n in range(27):
            s = starts[b, n]
            ref = vol[s[0] : s[0] + ps[0], s[1] : s[1] + ps[1], s[2] : s[2] + ps[2]]
            np.testing.assert_array_equal(out[b, n], ref)


def test_determinism():
    vol = jnp.asarray(coordinate_volume(SHAPE))
    f = _jitted(True)
    a = np.asarray(f(vol, jax.random.key(3)))
    b = np.asarray(f(vol, jax.random.key(3)))
    c = np.asarray(f(vol, jax.random.key(4)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_jit_vmap_matches_single():
    vols = jax.random.normal(jax.random.key(0), (3, *SHAPE, 1))
    keys = jax.random.split(jax.random.key(5), 3)
    batched = np.asarray(_batched(True)(vols, keys))
    assert batched.shape == (3, 27, 3, 4, 2, 1)
    for b in range(3):
        np.testing.assert_array_equal(batched[b], np.asarray(_jitted(True)(vols[b], keys[b])))


@pytest.mark.parametrize("p, j", [(3, 5), (4, 4), (0, 0), (3, -1)])
def test_bad_sizes_raise(p, j):
    with pytest.raises(ConfigError):
        extract_grid(
            jnp.zeros((12, 12, 12, 1)),
            jax.random.key(0),
            patches_per_side=p,
            jitter=j,
            training=True,
        )
