"""Random parameters and comparisons for gradient tests (tests/test_precision.py,
tests/test_onednn.py, tests/test_fast_layers.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_params(build, seed=0):
    """(graphdef, params) of `build`'s model with random float32 params, without compiling an
    initialiser: N(0, 0.2) everywhere (no zero-initialised head blocks a gradient), norm scales
    around 1."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = rng.normal(scale=0.2, size=s.shape).astype(np.float32)
        return x + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else x

    return graphdef, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(abstract))


def close_to_scale(a, b, rtol=2e-5):
    """`a` equals `b` (same shape) up to `rtol` of `b`'s largest magnitude, compared in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(float(np.abs(b).max()), 1e-6)
    np.testing.assert_allclose(a / scale, b / scale, atol=rtol, rtol=0)


def assert_tree_close(actual, desired, *, rtol, atol_scale, what=""):
    """Same tree paths; each leaf within `rtol` and `atol_scale` x the desired leaf's largest
    magnitude."""
    flat_a = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
    flat_d = dict(jax.tree_util.tree_flatten_with_path(desired)[0])
    assert flat_a.keys() == flat_d.keys()
    for path, d in flat_d.items():
        scale = max(float(np.max(np.abs(d))), 1e-12)
        np.testing.assert_allclose(
            flat_a[path],
            d,
            rtol=rtol,
            atol=atol_scale * scale,
            err_msg=f"{what} {jax.tree_util.keystr(path)}",
        )


def assert_same_sin_gradients(modules, x, *, pick=lambda out: out):
    """Two modules with the same parameters (e.g. two `conv_impl`s) give the same
    `sum(sin(pick(module(x))))` and the same gradients in the params and in `x`
    (`close_to_scale`)."""
    outs = []
    for module in modules:
        graphdef, params = nnx.split(module, nnx.Param)
        f = jax.value_and_grad(
            lambda p, x, g=graphdef: jnp.sum(jnp.sin(pick(nnx.merge(g, p)(x)))), argnums=(0, 1)
        )
        outs.append(jax.jit(f)(params, x))
    (value_a, grads_a), (value_b, grads_b) = outs
    close_to_scale(value_b, value_a)
    jax.tree.map(close_to_scale, grads_b, grads_a)
