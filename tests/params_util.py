"""Random parameters for gradient comparisons (tests/test_precision.py, tests/test_onednn.py)."""

from __future__ import annotations

import jax
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
