"""Startup: the one-off jitted initialisations compile at XLA optimisation level 0 on CPU (seconds
saved per run; figure: benchmarks/RESULTS.md "time to the first step") and still give the
initialisers' values: equal, to float rounding, to the same program compiled with every
optimisation."""

from __future__ import annotations

import pytest

import jax
import numpy as np
import optax
from flax import nnx

from configs import rpl as rpl_config
from ssl3d_jax import parallel, tasks
from ssl3d_jax.train import step as step_lib


@pytest.mark.slow
def test_init_compiles_at_level_zero_on_cpu_and_gives_the_optimised_values():
    mesh = parallel.make_mesh(jax.devices()[:1])
    assert step_lib.init_compiler_options(mesh) == {"xla_backend_optimization_level": 0}
    task = tasks.get_task(rpl_config.get_config("smoke"), in_channels=1)
    key = jax.random.key(7)
    _, params = step_lib.init_params(task.build_model, key, mesh)

    def init(k):
        _, p = nnx.split(task.build_model(nnx.Rngs(k)), nnx.Param)
        return nnx.to_pure_dict(p)

    reference = jax.jit(init)(key)  # default (fully optimised) compile
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = max(float(np.abs(want).max()), 1e-30)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
    kernels = [x for x in jax.tree.leaves(params) if np.asarray(x).ndim == 5]  # 3D convs
    assert kernels and all(float(np.std(np.asarray(k))) > 0 for k in kernels)  # really random

    state = step_lib.create_train_state(optax.adam(1e-3), params, jax.random.key(1), mesh)
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.asarray(x).ndim > 0]
    assert moments and all(not np.asarray(m).any() for m in moments)  # Adam starts at zero


def test_init_options_only_on_cpu():
    class _Dev:
        platform = "gpu"

    class _Mesh:
        devices = np.array([_Dev()])

    assert step_lib.init_compiler_options(_Mesh()) is None
