"""Steps and checks shared by test modules (pretext tasks, augmentations, patches)."""

from __future__ import annotations

import jax
import numpy as np
import optax

from ssl3d_jax import parallel


def adam_steps(value_and_grad, params, volumes, key, steps: int):
    """`steps` Adam updates (lr 3e-3) of `params` on one fixed batch and key, the overfit tests'
    memorising run; `value_and_grad(params, volumes, key) -> ((loss, metrics), grads)`."""
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)
    for _ in range(steps):
        _, grads = value_and_grad(params, volumes, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def on_one_and_eight_devices(fn, params, volumes) -> list:
    """`fn(params, batch)` on one device, then on all eight (params replicated, `{'image':
    volumes}` sharded over the data axis): the two results, on the host. The params are the same
    initial values under both meshes: re-initialising under each would only add compilations."""
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        p = jax.device_put(params, parallel.replicated(mesh))
        batch = parallel.put_batch({"image": volumes}, parallel.data_sharded(mesh))
        assert len(batch["image"].sharding.device_set) == len(devices)
        results.append(jax.device_get(fn(p, batch)))
    assert len(jax.devices()) == 8
    return results


def assert_decided_by_key(fn, x, key, other_key) -> list:
    """`fn(x, key)` twice gives equal outputs (every leaf), `fn(x, other_key)` a different first
    leaf; returns the first call's leaves."""
    a, b, c = (jax.tree.leaves(fn(x, k)) for k in (key, key, other_key))
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    return a
