"""Property-based tests (hypothesis) of the patch grid and the augmentations, over random shapes,
grids, jitters, keys and dtypes.

Each property is checked against plain numpy: a patch is the numpy slice of the volume at the
offset the grid reports, and lies inside the volume and its cell; flips, 90° turns, the task
rotations and the jigsaw shuffle only move values (never change, create or drop one); flips and
turns undo themselves; dtypes and shapes are kept. Shapes are drawn from small ranges, since
every new (shape, dtype) costs a compile: the patch ops run eagerly (a few tiny per-op compiles),
the augmentations through one cached `jax.jit` per function (one compile of ~0.2 s instead of
dozens of per-op ones). Runs are derandomized and keep no example database, so CI sees the same
examples on every run.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.ops import augment as aug
from ssl3d_jax.ops import patches
from ssl3d_jax.tasks import cpc, exemplar, jigsaw, rotation, rpl

# hypothesis keeps a cache of the constants of the code under test in its storage folder
# (./.hypothesis by default); keep it with the other test caches, which git ignores. Read lazily,
# when the first test runs, so setting it after the imports is in time.
os.environ.setdefault(
    "HYPOTHESIS_STORAGE_DIRECTORY",
    str(pathlib.Path(__file__).resolve().parents[1] / ".cache" / "hypothesis"),
)


def _settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,  # first calls compile
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


pytestmark = pytest.mark.usefixtures("fast_compile")  # conftest.py


# Every dtype the ops are documented to keep. Values are small integers, exact in all of them.
DTYPES = {
    "float32": np.float32,
    "bfloat16": jnp.bfloat16,
    "float16": np.float16,
    "int32": np.int32,
    "uint8": np.uint8,
}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _volume(shape, dtype: str, seed: int, *, low: int = 0) -> jax.Array:
    """Values low..255 (exact in every dtype), distinct as far as that range allows."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(math.prod(shape)) % (256 - low) + low
    return jnp.asarray(values.reshape(shape).astype(DTYPES[dtype]))


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def _grid_case(draw, max_cells_extra: int = 3):
    """(spatial shape, P, J) with every patch >= 1 voxel; edges bounded to keep shapes few."""
    dims = draw(st.sampled_from([2, 3]))
    p = draw(st.integers(1, 3))
    j = draw(st.integers(0, 2))
    spatial = tuple(
        draw(st.integers(p * (j + 1), p * (j + 1) + max_cells_extra)) for _ in range(dims)
    )
    return spatial, p, j


@st.composite
def grid_cases(draw):
    spatial, p, j = _grid_case(draw)
    channels = draw(st.integers(1, 2))
    return (
        (*spatial, channels),
        p,
        j,
        draw(st.sampled_from(sorted(DTYPES))),
        draw(st.integers(0, 2**31 - 1)),
        draw(st.booleans()),
    )


# ----------------------------------------------------------------------------------------------
# ssl3d_jax.ops.patches


@_settings(300)
@given(
    spatial=st.lists(st.integers(1, 40), min_size=2, max_size=3),
    p=st.integers(1, 6),
    j=st.integers(0, 6),
)
def test_patch_shape_is_cell_minus_jitter_or_a_config_error(spatial, p, j):
    shape = (*spatial, 3)
    want = tuple(s // p - j for s in spatial)
    if min(want) >= 1:
        assert patches.patch_shape(shape, patches_per_side=p, jitter=j) == want
        assert patches.num_patches(p, len(spatial)) == p ** len(spatial)
    else:
        with pytest.raises(ConfigError, match="patch size would be"):
            patches.patch_shape(shape, patches_per_side=p, jitter=j)


@_settings(30)
@given(case=grid_cases())
def test_grid_starts_inside_volume_and_own_cell(case):
    shape, p, j, _, seed, training = case
    n = len(shape) - 1
    pshape = patches.patch_shape(shape, patches_per_side=p, jitter=j)
    starts = patches.grid_starts(
        shape, jax.random.key(seed), patches_per_side=p, jitter=j, training=training
    )
    assert starts.shape == (p**n, n) and starts.dtype == jnp.int32
    starts = np.asarray(starts)
    cell = np.array([s // p for s in shape[:n]])
    # Row-major cell order: patch i belongs to cell np.unravel_index(i, (p,) * n).
    cells = np.array(list(itertools.product(range(p), repeat=n))).reshape(-1, n)
    offsets = starts - cells * cell
    if training:
        assert offsets.min() >= 0 and offsets.max() <= j
    else:
        assert np.all(offsets == j // 2)
    # Inside the volume, and inside its own cell (patches never overlap).
    assert np.all(starts + np.array(pshape) <= np.array(shape[:n]))
    assert np.all(offsets + np.array(pshape) <= cell)


@_settings(30)
@given(case=grid_cases(), fraction=st.sampled_from([0.5, 0.7, 0.9]))
def test_random_grid_starts_inside_volume_with_one_origin(case, fraction):
    shape, p, j, _, seed, training = case
    n = len(shape) - 1
    kw = dict(patches_per_side=p, jitter=j, grid_fraction=fraction)
    try:
        pshape = patches.patch_shape(shape, **kw)
    except ConfigError:  # cells of the smaller grid too small for the jitter
        cell, _ = patches.grid_layout(shape, patches_per_side=p, grid_fraction=fraction)
        assert min(cell) - j < 1
        return
    cell, room = patches.grid_layout(shape, patches_per_side=p, grid_fraction=fraction)
    assert all(c == math.floor(s * fraction + 1e-9) // p for c, s in zip(cell, shape))
    assert all(r == s - p * c for r, s, c in zip(room, shape, cell))
    starts = np.asarray(patches.grid_starts(shape, jax.random.key(seed), training=training, **kw))
    cells = np.array(list(itertools.product(range(p), repeat=n))).reshape(-1, n)
    rel = starts - cells * np.array(cell)  # grid origin + jitter offset, per patch
    if training:
        origin = rel.min(axis=0)
        assert (rel - origin >= 0).all() and (rel - origin <= j).all()
    else:
        np.testing.assert_array_equal(rel, np.broadcast_to(np.array(room) // 2 + j // 2, rel.shape))
    assert (rel >= 0).all() and (rel <= np.array(room) + j).all()
    assert np.all(starts + np.array(pshape) <= np.array(shape[:n]))


@pytest.mark.slow
@_settings(30)
@given(case=grid_cases())
def test_extract_grid_is_the_numpy_slice_at_the_reported_starts(case):
    shape, p, j, dtype, seed, training = case
    n = len(shape) - 1
    vol = _volume(shape, dtype, seed)
    key = jax.random.key(seed)
    out = patches.extract_grid(vol, key, patches_per_side=p, jitter=j, training=training)
    pshape = patches.patch_shape(shape, patches_per_side=p, jitter=j)
    assert out.shape == (p**n, *pshape, shape[-1]) and out.dtype == vol.dtype
    starts = np.asarray(
        patches.grid_starts(shape, key, patches_per_side=p, jitter=j, training=training)
    )
    want = np.stack(
        [vol[tuple(slice(a, a + m) for a, m in zip(start, pshape))] for start in starts]
    )
    assert _same(out, want)


@pytest.mark.slow
@_settings(25)
@given(
    spatial=st.lists(st.integers(1, 7), min_size=2, max_size=3),
    dtype=st.sampled_from(sorted(DTYPES)),
    data=st.data(),
)
def test_slice_patches_at_any_starts_inside(spatial, dtype, data):
    vol = _volume((*spatial, 2), dtype, 0)
    pshape = tuple(data.draw(st.integers(1, s)) for s in spatial)
    count = data.draw(st.integers(1, 4))
    starts = np.array(
        [[data.draw(st.integers(0, s - m)) for s, m in zip(spatial, pshape)] for _ in range(count)],
        np.int32,
    )
    out = patches.slice_patches(vol, jnp.asarray(starts), pshape)
    want = np.stack([vol[tuple(slice(a, a + m) for a, m in zip(s, pshape))] for s in starts])
    assert _same(out, want)


# ----------------------------------------------------------------------------------------------
# ssl3d_jax.ops.augment: flips and 90° turns are exact permutations that undo themselves


@st.composite
def cubes(draw, dtypes=tuple(sorted(DTYPES))):
    dims = draw(st.sampled_from([2, 3]))
    side = draw(st.integers(1, 4 if dims == 2 else 3))  # 1: the degenerate cube
    channels = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    return _volume((side,) * dims + (channels,), dtype, seed), seed


@functools.cache
def _jit(fn, **static):
    """One jitted `fn(x, key_or_param)` per function and static keywords (cached compiles)."""
    return jax.jit(functools.partial(fn, **static))


def _symmetries(x: np.ndarray):
    """All signed axis permutations of the spatial axes of `x` (the cube's symmetry group)."""
    n = x.ndim - 1
    for order in itertools.permutations(range(n)):
        moved = np.transpose(x, (*order, n))
        for flips in itertools.product([False, True], repeat=n):
            axes = tuple(a for a, f in enumerate(flips) if f)
            yield np.flip(moved, axes) if axes else moved


@pytest.mark.slow
@_settings(15)
@given(case=cubes())
def test_random_flip_is_an_involution_and_a_flip(case):
    x, seed = case
    key = jax.random.key(seed)
    flip = _jit(aug.random_flip)
    once = flip(x, key)
    assert _same(flip(once, key), x)  # same key, same axes: undone
    n = x.ndim - 1
    assert _same(_jit(aug.random_flip, prob=1.0)(x, key), np.flip(x, tuple(range(n))))
    flips = [np.flip(x, axes) for r in range(n + 1) for axes in itertools.combinations(range(n), r)]
    assert any(_same(once, f) for f in flips)


@_settings(25)
@given(case=cubes(), k=st.integers(-9, 9), data=st.data())
def test_rot90_is_numpy_rot90_and_undone_by_minus_k(case, k, data):
    x, _ = case
    plane = data.draw(st.sampled_from(aug.spatial_planes(x.ndim - 1)))
    turn = _jit(aug.rot90, plane=plane)  # k traced: any integer, taken modulo 4
    once = turn(x, k)
    assert _same(once, np.rot90(x, k, axes=plane))
    assert _same(turn(once, -k), x)


@_settings(20)
@given(case=cubes())
def test_random_rot90_is_one_of_the_quarter_turns(case):
    x, seed = case
    out = _jit(aug.random_rot90)(x, jax.random.key(seed))
    turns = [np.rot90(x, k, axes=p) for p in aug.spatial_planes(x.ndim - 1) for k in range(4)]
    assert any(_same(out, t) for t in turns)


@pytest.mark.slow
@_settings(12)
@given(case=cubes(dtypes=FLOAT_DTYPES + ("int32",)))
def test_augment_without_resampling_is_a_cube_symmetry(case):
    # No small angles, zoom or intensity change: flips and 90° turns compose into one signed
    # axis permutation, applied exactly (no value is interpolated, whatever the dtype).
    x, seed = case
    exact = _jit(aug.augment, max_degrees=0.0, intensity_prob=0.0, zoom_prob=0.0)
    out = exact(x, jax.random.key(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert any(_same(out, s) for s in _symmetries(x))


@pytest.mark.slow
@_settings(8)
@given(case=cubes(dtypes=FLOAT_DTYPES))
def test_augment_keeps_shape_dtype_and_finiteness(case):
    x, seed = case
    full = _jit(aug.augment, rotate_prob=1.0, rot90_prob=0.0, zoom_prob=1.0)
    out = full(x, jax.random.key(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))


@pytest.mark.slow
@_settings(6)
@given(case=cubes(dtypes=FLOAT_DTYPES))
def test_zero_angles_and_unit_zoom_are_exact_identities(case):
    x, _ = case
    n = x.ndim - 1
    assert _same(_jit(aug.rotate)(x, jnp.zeros(len(aug.spatial_planes(n)))), x)
    assert _same(_jit(aug.zoom)(x, jnp.ones(n)), x)


@_settings(15)
@given(case=cubes(dtypes=("float32",)), delta=st.floats(-1, 1), c=st.floats(0.5, 1.5))
def test_intensity_moves_the_mean_by_delta_and_scales_the_spread(case, delta, c):
    x, _ = case
    out = np.asarray(_jit(aug.intensity)(x, delta, c), np.float64)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(out.mean(), x64.mean() + delta, atol=1e-3)
    np.testing.assert_allclose(out.std(), c * x64.std(), rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# The tasks' own sampling


@_settings(20)
@given(case=cubes(), data=st.data())
def test_rotation_task_classes_are_the_table_turns(case, data):
    x, _ = case
    dims = x.ndim - 1
    label = data.draw(st.integers(0, rotation.num_classes(dims) - 1))
    k, plane = rotation.rotation_table(dims)[label]
    want = np.rot90(x, k, axes=plane)
    assert _same(rotation.rotate(x, label), want)  # static label
    assert _same(_jit(rotation.rotate)(x, jnp.int32(label)), want)  # traced label (lax.switch)


@pytest.mark.slow
@_settings(15)
@given(case=grid_cases())
def test_rpl_pair_is_the_centre_and_the_labelled_grid_patch(case):
    shape, _, j, dtype, seed, training = case
    p = 3  # RPL needs an odd grid with a centre cell
    shape = tuple(max(s, p * (j + 1)) for s in shape[:-1]) + shape[-1:]
    vol = _volume(shape, dtype, seed)
    key = jax.random.key(seed)
    pair, label = rpl.sample_pair(vol, key, patches_per_side=p, jitter=j, training=training)
    n = p ** (len(shape) - 1)
    assert 0 <= int(label) < n - 1
    query = int(label) + (int(label) >= n // 2)  # every cell but the centre, in grid order
    grid = patches.extract_grid(
        vol, jax.random.split(key)[0], patches_per_side=p, jitter=j, training=training
    )
    assert _same(pair, np.stack([grid[n // 2], grid[query]]))


@pytest.mark.slow
@_settings(15)
@given(case=grid_cases(), num_perms=st.integers(1, 5))
def test_jigsaw_puzzle_is_a_permutation_of_the_grid(case, num_perms):
    shape, p, j, dtype, seed, training = case
    p = max(p, 2)  # jigsaw needs at least a 2 x 2 grid
    shape = tuple(max(s, p * (j + 1)) for s in shape[:-1]) + shape[-1:]
    n = p ** (len(shape) - 1)
    perms = np.stack([np.random.default_rng(seed + i).permutation(n) for i in range(num_perms)])
    vol = _volume(shape, dtype, seed)
    key = jax.random.key(seed)
    shuffled, label = jigsaw.sample_puzzle(
        vol, key, patches_per_side=p, jitter=j, permutations=perms, training=training
    )
    assert 0 <= int(label) < num_perms
    grid = patches.extract_grid(
        vol, jax.random.split(key)[0], patches_per_side=p, jitter=j, training=training
    )
    assert _same(shuffled, np.asarray(grid)[perms[int(label)]])


@pytest.mark.slow
@_settings(15)
@given(n=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
def test_exemplar_negatives_are_a_single_cycle_without_fixed_points(n, seed):
    index = np.asarray(exemplar.random_derangement(jax.random.key(seed), n))
    assert sorted(index.tolist()) == list(range(n)) and np.all(index != np.arange(n))
    seen, i = set(), 0
    while i not in seen:  # following the cycle from 0 visits every input
        seen.add(i)
        i = int(index[i])
    assert len(seen) == n


@_settings(20)
@given(
    spatial=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    dtype=st.sampled_from(sorted(DTYPES)),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_cpc_crop_pad_is_a_crop_of_the_input_placed_centred(spatial, dtype, seed, data):
    x = np.asarray(_volume((*spatial, 1), dtype, seed, low=1))  # 0 only in the padding
    crop = tuple(data.draw(st.integers(1, s)) for s in spatial)
    out = np.asarray(cpc.random_crop_pad(x, jax.random.key(seed), crop_shape=crop))
    assert out.shape == x.shape and out.dtype == x.dtype
    pads = [(s - c) // 2 for s, c in zip(spatial, crop)]
    inner = tuple(slice(a, a + c) for a, c in zip(pads, crop))
    mask = np.zeros(out.shape, bool)
    mask[inner] = True
    assert np.all(out[~mask] == 0)
    # The centred block is the input's crop at some start in [0, s - c] per axis.
    starts = itertools.product(*[range(s - c + 1) for s, c in zip(spatial, crop)])
    crops = (x[tuple(slice(a, a + c) for a, c in zip(start, crop))] for start in starts)
    assert any(_same(out[inner], c) for c in crops)
