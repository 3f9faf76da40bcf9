"""The gather-based rotation (`ssl3d_jax.tasks.rotation.rotate` with a traced label, `make_batch`)
against the implementation it replaced (`lax.switch` over the classes, kept here as the reference)
and against `np.rot90` spelled out per class: bit-identical outputs and labels for the same key,
every class, 3D and 2D, odd and even sides, several dtypes; plus the structure that makes it fast
(one gather, no per-class branches or selects)."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.tasks import rotation

# The documented classes, written out independently of `rotation.rotation_table`:
# (quarter turns, plane) with `np.rot90(x, turns, axes=plane)`.
DOC_3D = [(0, (0, 1))] + [(k, plane) for plane in ((0, 1), (1, 2), (0, 2)) for k in (1, 2, 3)]
DOC_2D = [(k, (0, 1)) for k in range(4)]


def documented(x: np.ndarray, label: int) -> np.ndarray:
    turns, plane = (DOC_3D if x.ndim == 4 else DOC_2D)[label]
    return np.rot90(x, turns, axes=plane)


# --- the implementation before the gather (copied verbatim in substance) ------------------------


def _ref_rotate(volume, label):
    spatial_dims = volume.ndim - 1
    table = DOC_3D if spatial_dims == 3 else DOC_2D

    def branch(x, c):
        k, plane = table[c]
        return jnp.rot90(x, k, axes=plane) if k else x

    branches = [functools.partial(branch, c=c) for c in range(len(table))]
    return jax.lax.switch(jnp.asarray(label, jnp.int32), branches, volume)


def _ref_make_batch(volumes, key):
    n = 10 if volumes.ndim == 5 else 4
    labels = jax.random.randint(key, (volumes.shape[0],), 0, n, dtype=jnp.int32)
    return jax.vmap(_ref_rotate)(volumes, labels), labels


# Module-level jits: one compile per input shape / dtype, shared by the tests.
new_rotate = jax.jit(rotation.rotate)
ref_rotate = jax.jit(_ref_rotate)
new_batch = jax.jit(rotation.make_batch)
ref_batch = jax.jit(_ref_make_batch)


def _volume(shape, dtype, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape) * 50
    if dtype == "bool":
        return x > 0
    return x.astype(dtype)


CASES = [(3, 5), (3, 6), (2, 5), (2, 6)]  # (spatial_dims, side): odd and even sides


@pytest.mark.parametrize("spatial_dims,side", CASES)
def test_every_class_is_the_documented_rotation(spatial_dims, side):
    x = _volume((side,) * spatial_dims + (3,), "float32", seed=side)
    n = rotation.num_classes(spatial_dims)
    outputs = []
    for label in range(n):
        want = documented(x, label)
        got = np.asarray(new_rotate(x, jnp.int32(label)))
        np.testing.assert_array_equal(got, want, err_msg=f"class {label}")
        np.testing.assert_array_equal(got, np.asarray(ref_rotate(x, jnp.int32(label))))
        np.testing.assert_array_equal(np.asarray(rotation.rotate(x, label)), want)  # static
        outputs.append(got.tobytes())
    assert len(set(outputs)) == n  # the classes are told apart by their output


@pytest.mark.parametrize(
    "spatial_dims,side,dtype",
    [(d, s, "float32") for d, s in CASES]
    + [(3, 5, t) for t in ("bfloat16", "int8", "bool")]
    + [(2, 6, t) for t in ("bfloat16", "int8", "bool")],
)
def test_make_batch_is_bit_identical_to_the_switch_version(spatial_dims, side, dtype):
    batch = 24 if spatial_dims == 3 else 12
    if dtype == "bfloat16":
        x = jnp.asarray(_volume((batch,) + (side,) * spatial_dims + (2,), "float32"), jnp.bfloat16)
    else:
        x = jnp.asarray(_volume((batch,) + (side,) * spatial_dims + (2,), dtype))
    for seed in (0, 7):
        key = jax.random.key(seed)
        got, labels = new_batch(x, key)
        want, want_labels = ref_batch(x, key)
        assert got.dtype == x.dtype and got.shape == x.shape and labels.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(labels), np.asarray(want_labels))
        got = np.asarray(got)
        # Compare the raw bits (bfloat16 / NaN-safe).
        np.testing.assert_array_equal(got.view(np.uint8), np.asarray(want).view(np.uint8))
        host = np.asarray(x)
        for b, label in enumerate(np.asarray(labels)):
            np.testing.assert_array_equal(got[b], documented(host[b], int(label)))
    # A batch this size with two keys draws most classes: the check above is not vacuous.
    assert len(set(np.asarray(labels).tolist())) >= (3 if spatial_dims == 2 else 6)


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_out_of_range_traced_labels_clamp_like_lax_switch(spatial_dims):
    x = _volume((4,) * spatial_dims + (1,), "float32", seed=3)
    n = rotation.num_classes(spatial_dims)
    for label in (-5, -1, n, n + 7):
        np.testing.assert_array_equal(
            np.asarray(new_rotate(x, jnp.int32(label))),
            np.asarray(ref_rotate(x, jnp.int32(label))),
        )
    np.testing.assert_array_equal(np.asarray(new_rotate(x, jnp.int32(-1))), x)
    np.testing.assert_array_equal(np.asarray(new_rotate(x, jnp.int32(n))), documented(x, n - 1))


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_degenerate_side_one(spatial_dims):
    x = _volume((3,) + (1,) * spatial_dims + (2,), "float32")
    got, _ = new_batch(jnp.asarray(x), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got), x)


def _primitives(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_primitives(sub))
    return found


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_make_batch_is_one_gather_without_branches(spatial_dims):
    """Why it is fast: one gather of the whole batch; the old `lax.switch` became, under vmap, a
    select over every class's rotated copy (10x the data movement in 3D)."""
    x = jnp.zeros((2,) + (6,) * spatial_dims + (2,))
    eqns = _primitives(jax.make_jaxpr(rotation.make_batch)(x, jax.random.key(0)).jaxpr)
    assert "cond" not in [e.primitive.name for e in eqns]
    big = [e for e in eqns if e.outvars and getattr(e.outvars[0].aval, "size", 0) >= x.size]
    names = [e.primitive.name for e in big]
    assert names.count("gather") == 1 and "select_n" not in names, names
    # ... and nothing else touches the volume data but a reshape (a free bitcast in XLA).
    assert set(names) == {"gather", "reshape"}, names
    # The old version, for contrast, selects over every class.
    old = _primitives(jax.make_jaxpr(_ref_make_batch)(x, jax.random.key(0)).jaxpr)
    assert "select_n" in [e.primitive.name for e in old if e.outvars[0].aval.size >= x.size]


def test_non_cubic_inputs_still_raise():
    with pytest.raises(ConfigError, match=r"\(5, 5, 4, 1\)"):
        rotation.rotate(jnp.zeros((5, 5, 4, 1)), jnp.int32(1))
    with pytest.raises(ConfigError, match=r"\(5, 4, 1\)"):
        rotation.rotate(jnp.zeros((5, 4, 1)), jnp.int32(1))
    with pytest.raises(ConfigError, match="shape"):
        rotation.make_batch(jnp.zeros((2, 6, 6, 5, 1)), jax.random.key(0))
