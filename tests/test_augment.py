"""Tests of the on-device augmentations (`ssl3d_jax.ops.augment`): 2D and 3D, under jit + vmap."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.ops import augment as aug
from check_util import assert_decided_by_key

SIDE = 9  # odd: the centre voxel is a voxel, and rotations / zooms about it keep it
N = 6  # inputs per vmapped batch
DIMS = [2, 3]


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest.py


def _shape(dims, channels=2):
    return (SIDE,) * dims + (channels,)


def _unique(dims, channels=2, batch=N):
    """`[batch, *spatial, C]` float32 holding distinct values (so permutations are identifiable)."""
    size = batch * math.prod(_shape(dims, channels))
    return jnp.arange(size, dtype=jnp.float32).reshape(batch, *_shape(dims, channels)) / size


def _keys(seed, n=N):
    return jax.random.split(jax.random.key(seed), n)


@functools.cache
def _jv(name, **params):
    """`jit(vmap(aug.<name>(x, key, **params)))`, cached so each variant compiles once."""
    fn = getattr(aug, name)
    return jax.jit(jax.vmap(lambda x, k: fn(x, k, **params)))


def _is_permutation(a, b):
    np.testing.assert_array_equal(np.sort(np.ravel(a)), np.sort(np.ravel(b)))


@pytest.mark.parametrize("dims", DIMS)
def test_flip_is_exact_permutation_and_involution(dims):
    x = _unique(dims)
    keys = _keys(0)
    flipped = _jv("random_flip")(x, keys)
    twice = _jv("random_flip")(flipped, keys)  # same key -> same axes -> identity
    np.testing.assert_array_equal(np.asarray(twice), np.asarray(x))
    for b in range(N):
        xb = np.asarray(x[b])
        candidates = [
            np.flip(xb, axis=tuple(a for a in range(dims) if flags[a]))
            for flags in np.ndindex(*(2,) * dims)
        ]
        assert any(np.array_equal(np.asarray(flipped[b]), c) for c in candidates)
    all_flips = _jv("random_flip", prob=1.0)(x, keys)
    np.testing.assert_array_equal(
        np.asarray(all_flips), np.asarray(jnp.flip(x, axis=tuple(range(1, dims + 1))))
    )
    np.testing.assert_array_equal(np.asarray(_jv("random_flip", prob=0.0)(x, keys)), np.asarray(x))


def test_flip_rate():
    x = _unique(3, channels=1, batch=1)[0]
    keys = _keys(1, 400)
    flipped = _jv("random_flip")(jnp.broadcast_to(x, (400, *x.shape)), keys)
    rate = float(jnp.mean(flipped[:, 0, 0, 0, 0] != x[0, 0, 0, 0]))  # corner moves iff any flip
    assert abs(rate - (1 - 0.5**3)) < 0.06


@pytest.mark.parametrize("dims", DIMS)
def test_rot90_matches_jnp_and_four_turns_are_identity(dims):
    x = _unique(dims, batch=1)[0]
    rot = jax.jit(aug.rot90, static_argnames="plane")
    for plane in aug.spatial_planes(dims):
        y = x
        for k in range(4):
            expected = jnp.rot90(x, k, axes=plane)
            np.testing.assert_array_equal(np.asarray(rot(x, k, plane=plane)), np.asarray(expected))
            np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
            y = rot(y, 1, plane=plane)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # four quarter turns
        np.testing.assert_array_equal(
            np.asarray(rot(x, -1, plane=plane)), np.asarray(jnp.rot90(x, 3, axes=plane))
        )


@pytest.mark.parametrize("dims", DIMS)
def test_random_rot90_is_one_of_the_rotations(dims):
    x = jnp.broadcast_to(_unique(dims, batch=1)[0], (N, *_shape(dims)))
    out = np.asarray(_jv("random_rot90")(x, _keys(2)))
    x0 = np.asarray(x[0])
    candidates = [np.rot90(x0, k, axes=p) for p in aug.spatial_planes(dims) for k in range(4)]
    for b in range(N):
        assert any(np.array_equal(out[b], c) for c in candidates)
    with pytest.raises(ConfigError, match="equal edges"):
        aug.random_rot90(jnp.zeros((8, 9, 2)), jax.random.key(0))


@pytest.mark.parametrize("dims", DIMS)
def test_rotate_zero_is_identity_and_quarter_turn_matches_rot90(dims):
    x = _unique(dims)
    np.testing.assert_array_equal(
        np.asarray(_jv("random_rotate", max_degrees=0.0)(x, _keys(3))), np.asarray(x)
    )
    planes = aug.spatial_planes(dims)
    rotate = jax.jit(jax.vmap(aug.rotate, in_axes=(0, None)))
    inner = (slice(None),) + (slice(1, -1),) * dims
    for i, plane in enumerate(planes):
        angles = jnp.zeros(len(planes)).at[i].set(math.pi / 2)
        got = rotate(x, angles)  # trilinear path
        expected = jnp.rot90(x, 1, axes=(plane[0] + 1, plane[1] + 1))
        np.testing.assert_allclose(np.asarray(got[inner]), np.asarray(expected[inner]), atol=1e-5)


@pytest.mark.parametrize("dims", DIMS)
def test_rotation_keeps_centre_and_interpolates(dims):
    x = jax.random.normal(jax.random.key(0), (N, *_shape(dims)))
    out = _jv("random_rotate", max_degrees=40.0)(x, _keys(4))
    centre = (slice(None),) + (SIDE // 2,) * dims
    np.testing.assert_array_equal(np.asarray(out[centre]), np.asarray(x[centre]))
    assert not np.allclose(np.asarray(out), np.asarray(x))
    # Interpolated values of a constant volume stay within [0, value] (zero fill outside).
    const = jnp.full((N, *_shape(dims)), 3.0)
    out = np.asarray(_jv("random_rotate", max_degrees=40.0)(const, _keys(4)))
    assert out.min() >= 0.0 and out.max() <= 3.0 + 1e-5
    assert out.min() < 3.0  # corners rotated in from outside are zero-filled
    np.testing.assert_allclose(out[centre], 3.0)


@pytest.mark.parametrize("dims", DIMS)
def test_intensity_matches_formula(dims):
    x = jax.random.normal(jax.random.key(1), (N, *_shape(dims)))
    keys = _keys(5)
    out = _jv("random_intensity", shift=0.125, contrast=0.5)(x, keys)
    for b in range(N):
        delta, c = aug.intensity_params(keys[b], shift=0.125, contrast=0.5)
        assert -0.125 <= float(delta) <= 0.125 and 0.5 <= float(c) <= 1.5
        mean = float(jnp.mean(x[b]))
        expected = float(c) * (np.asarray(x[b]) - mean) + mean + float(delta)
        np.testing.assert_allclose(np.asarray(out[b]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dims", DIMS)
def test_zoom(dims):
    x = jax.random.normal(jax.random.key(2), (N, *_shape(dims)))
    same = _jv("random_zoom", min_scale=1.0, max_scale=1.0)(x, _keys(6))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(aug.zoom(x[0], jnp.ones(dims))), np.asarray(x[0]))
    centre = (slice(None),) + (SIDE // 2,) * dims
    zoomed = _jv("random_zoom", min_scale=0.8, max_scale=1.2)(x, _keys(6))
    np.testing.assert_array_equal(np.asarray(zoomed[centre]), np.asarray(x[centre]))
    # Zoom x2 about the centre: output voxel centre + 2d comes from input voxel centre + d.
    c = SIDE // 2
    big = aug.zoom(x[0], jnp.full(dims, 2.0))
    idx_out, idx_in = (c + 2,) * dims, (c + 1,) * dims
    np.testing.assert_allclose(np.asarray(big[idx_out]), np.asarray(x[0][idx_in]), atol=1e-6)
    # Zoom x0.5: the border comes from outside the input and is zero-filled.
    small = aug.zoom(x[0], jnp.full(dims, 0.5))
    np.testing.assert_array_equal(np.asarray(small[(0,) * dims]), 0.0)


@pytest.mark.parametrize("dims", DIMS)
def test_augment_determinism_and_variation(dims):
    x = jax.random.normal(jax.random.key(3), (N, *_shape(dims)))
    (a,) = assert_decided_by_key(_jv("augment"), x, _keys(7), _keys(8))
    assert a.shape == x.shape and a.dtype == x.dtype


@pytest.mark.parametrize("dims", DIMS)
def test_augment_geometric_only_is_permutation(dims):
    x = jnp.broadcast_to(_unique(dims, batch=1)[0], (32, *_shape(dims)))
    fn = _jv("augment", max_degrees=0.0, intensity_prob=0.0, zoom_prob=0.0)
    out = np.asarray(fn(x, _keys(9, 32)))
    for b in range(32):
        _is_permutation(out[b], x[b])
    # Many of the 8 (2D) / 48 (3D) orientations of the square / cube appear.
    assert len({o.tobytes() for o in out}) >= (6 if dims == 2 else 12)
    nothing = _jv("augment", flip_prob=0.0, rotate_prob=0.0, intensity_prob=0.0, zoom_prob=0.0)(
        x, _keys(9, 32)
    )
    np.testing.assert_array_equal(np.asarray(nothing), np.asarray(x))


@pytest.mark.parametrize("dims", DIMS)
def test_augment_keeps_centre_without_intensity(dims):
    x = jax.random.normal(jax.random.key(4), (N, *_shape(dims)))
    fn = _jv(
        "augment", flip_prob=0.0, rotate_prob=1.0, rot90_prob=0.0, intensity_prob=0.0, zoom_prob=1.0
    )
    out = fn(x, _keys(10))
    centre = (slice(None),) + (SIDE // 2,) * dims
    np.testing.assert_allclose(np.asarray(out[centre]), np.asarray(x[centre]), atol=1e-6)
    assert not np.allclose(np.asarray(out), np.asarray(x))


def test_bad_inputs():
    with pytest.raises(ConfigError, match="one volume"):
        aug.augment(jnp.zeros((2, 9, 9, 9, 1)), jax.random.key(0))
    with pytest.raises(ConfigError, match="rotate_prob"):
        aug.augment(jnp.zeros((9, 9, 1)), jax.random.key(0), rotate_prob=1.5)
    with pytest.raises(ConfigError, match="min_scale"):
        aug.augment(jnp.zeros((9, 9, 1)), jax.random.key(0), min_scale=1.3, max_scale=1.2)
