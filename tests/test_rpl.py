"""Tests of the RPL pretext task (`ssl3d_jax.tasks.rpl`), 3D and 2D: labels, batches, model, loss,
overfit."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.unet import EncoderConfig
from ssl3d_jax.ops.patches import extract_grid
from ssl3d_jax import tasks
from ssl3d_jax.tasks import rpl
from check_util import adam_steps

P, J = 3, 2
SIDE = 15  # cells of 5, patches of 3
# num_groups=1: at a tiny bottom GroupNorm normalises each group over few values; with 2 channels
# per group at a 1^3 bottom it collapses to +-1 and erases the input. Two levels (5^3 patches ->
# 3^3 bottom): with four levels (1^3 bottom of 8 channels) the 3D overfit plateaued near log(4).
ENC = dict(filters=(4, 8), bottom_filters=8, num_groups=1)


def cell_constant_volume(side, p, spatial_dims=3):
    """`[side] * spatial_dims + [1]` image / volume, each grid cell holding its row-major index."""
    g = side // p
    idx = np.minimum(np.arange(side) // g, p - 1)
    grids = np.meshgrid(*[idx] * spatial_dims, indexing="ij")
    vol = sum(c * p ** (spatial_dims - 1 - a) for a, c in enumerate(grids))
    return vol.astype(np.float32)[..., None]


@functools.cache
def _batch_fn(training):
    return jax.jit(
        functools.partial(rpl.make_batch, patches_per_side=P, jitter=J, training=training)
    )


def test_num_classes():
    assert rpl.num_classes(3) == 26
    assert rpl.num_classes(5) == 124
    assert rpl.num_classes(3, spatial_dims=3) == 26
    assert rpl.num_classes(3, spatial_dims=2) == 8  # the original's 2D RPL: 9 tiles, 8 classes
    assert rpl.num_classes(5, spatial_dims=2) == 24
    with pytest.raises(ConfigError):
        rpl.num_classes(2)
    with pytest.raises(ConfigError):
        rpl.sample_pair(
            jnp.zeros((16, 16, 16, 1)),
            jax.random.key(0),
            patches_per_side=4,
            jitter=1,
            training=True,
        )


@pytest.mark.parametrize("n", [3, 2])
@pytest.mark.parametrize("training", [True, False])
def test_labels_match_query_position(n, training):
    n_vol = 400 if n == 3 else 200
    vol = jnp.asarray(cell_constant_volume(SIDE, P, n))
    vols = jnp.broadcast_to(vol, (n_vol, *vol.shape))
    pairs, labels = _batch_fn(training)(vols, jax.random.key(0))
    pairs, labels = np.asarray(pairs), np.asarray(labels)
    assert pairs.shape == (n_vol, 2, *(3,) * n, 1) and labels.dtype == np.int32
    centre = {3: 13, 2: 4}[n]  # the original's centre indices: floor(27 / 2), floor(9 / 2)
    np.testing.assert_array_equal(pairs[:, 0], centre)  # reference is the constant centre cell
    query_index = np.where(labels < centre, labels, labels + 1)
    for b in range(n_vol):
        np.testing.assert_array_equal(pairs[b, 1], query_index[b])
    # Every class drawn, never out of range.
    assert set(labels.tolist()) == set(range(rpl.num_classes(P, n)))
    assert not np.any(query_index == centre)


@pytest.mark.parametrize("grid_fraction", [1.0, 0.7])
@pytest.mark.parametrize(
    "shape, centre", [((SIDE, 16, 17, 2), 13), ((SIDE, 17, 2), 4)], ids=["3d", "2d"]
)
def test_sample_pair_equals_extract_grid(shape, centre, grid_fraction):
    vol = jax.random.normal(jax.random.key(1), shape)
    kw = dict(patches_per_side=P, jitter=J, training=True, grid_fraction=grid_fraction)
    for seed in range(3):
        key = jax.random.key(7 + seed)
        pair, label = rpl.sample_pair(vol, key, **kw)
        key_grid, _ = jax.random.split(key)
        grid = extract_grid(vol, key_grid, **kw)
        q = int(label) + (int(label) >= centre)
        assert pair.shape == (2, *grid.shape[1:])
        np.testing.assert_array_equal(np.asarray(pair[0]), np.asarray(grid[centre]))
        np.testing.assert_array_equal(np.asarray(pair[1]), np.asarray(grid[q]))


def test_make_batch_determinism():
    vols = jax.random.normal(jax.random.key(0), (4, SIDE, SIDE, SIDE, 1))
    a = _batch_fn(True)(vols, jax.random.key(3))
    b = _batch_fn(True)(vols, jax.random.key(3))
    c = _batch_fn(True)(vols, jax.random.key(4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


@functools.cache
def _model_and_step(n):
    """Tiny RPL model (n spatial dims) plus one jitted (loss, grads) function over pure params."""
    model = rpl.RPLModel(
        1,
        patches_per_side=3,
        spatial_dims=n,
        encoder=EncoderConfig(**ENC),
        head_hidden=(32,),
        rngs=nnx.Rngs(0),
    )
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)

    def loss(p, volumes, key):
        return rpl.loss_fn(
            nnx.merge(graphdef, p), volumes, key, patches_per_side=3, jitter=3, training=True
        )

    return model, params, jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 2])
def test_model_logits_shape(n):
    model, _, _ = _model_and_step(n)
    assert model.encoder.spatial_dims == n
    logits = model(jnp.zeros((3, 2, *(5,) * n, 1)))
    assert logits.shape == (3, rpl.num_classes(3, n))
    with pytest.raises(ConfigError, match="rank"):
        model(jnp.zeros((3, 2, *(5,) * (5 - n), 1)))  # 2D pairs into the 3D model and vice versa


# Measured (60 Adam steps, lr 3e-3): 3D 3.258 -> 0.257, 2D 2.079 -> 0.048, accuracy 1.0 in
# both. The loss first drops towards log(4) (label marginal of the 4 pairs), then the encoder
# learns to tell the pairs apart.
@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 2])
def test_loss_at_init_and_overfit(n):
    _, params, value_and_grad = _model_and_step(n)
    volumes = jax.random.uniform(jax.random.key(0), (4, *(24,) * n, 1))
    key = jax.random.key(1)  # fixed: the same 4 pairs every step, so the model can memorise them
    (loss0, metrics), _ = value_and_grad(params, volumes, key)
    assert np.isfinite(float(loss0))
    # Zero-initialised output layer: exactly uniform logits at init.
    np.testing.assert_allclose(float(loss0), math.log(rpl.num_classes(3, n)), rtol=1e-5)
    assert set(metrics) == {"loss", "accuracy"}

    params = adam_steps(value_and_grad, params, volumes, key, 60)
    (loss, metrics), _ = value_and_grad(params, volumes, key)
    assert float(loss) < 0.25 * float(loss0), (float(loss0), float(loss))
    assert float(metrics["accuracy"]) >= 0.75


def _rpl_config(n, **sections):
    """configs/rpl.py:smoke (2D for n = 2) on the whole-input grid (grid_fraction 1), one query
    per volume, with the keys of `sections` replaced."""
    config = tasks.task_config("rpl", "smoke" if n == 3 else "smoke,2d")
    config.rpl.update(dict(grid_fraction=1.0, queries_per_volume=1, head_dropout=0.0))
    for name, values in sections.items():
        config[name].update(values)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 2])
def test_make_task_smoke_config(n):
    config = _rpl_config(
        n,
        model=dict(filters=(4, 8), bottom_filters=8, num_groups=1, dropout_rate=0.1),
        rpl=dict(patches_per_side=3, jitter=1, head_hidden=(8,), head_dropout=0.1),
    )
    task = rpl.make_task(config, in_channels=1)
    assert task.input_spec["spatial_dims"] == n
    model = task.build_model(nnx.Rngs(0))
    assert model.encoder.filters == (4, 8) and model.encoder.spatial_dims == n
    assert model.head.out.kernel.shape[-1] == rpl.num_classes(3, n)
    loss, metrics = task.loss(model, jnp.ones((2, *(12,) * n, 1)), jax.random.key(0))
    assert np.isfinite(float(loss)) and set(metrics) == {"loss", "accuracy"}
    with pytest.raises(ConfigError, match="spatial_dims"):
        task.loss(model, jnp.ones((2, *(12,) * (5 - n), 1)), jax.random.key(0))


@pytest.mark.slow
def test_make_task_grid_fraction():
    config = _rpl_config(
        3,
        model=dict(filters=(4,), bottom_filters=4, num_groups=1, dropout_rate=0.0),
        rpl=dict(patches_per_side=3, jitter=1, grid_fraction=0.5, head_hidden=(8,)),
    )
    task = rpl.make_task(config, in_channels=1)
    assert task.input_spec["grid_fraction"] == 0.5
    model = task.build_model(nnx.Rngs(0))
    loss, _ = task.loss(model, jnp.ones((2, 24, 24, 24, 1)), jax.random.key(0))  # 3³ patches
    assert np.isfinite(float(loss))
    config.rpl.grid_fraction = 1.5
    with pytest.raises(ConfigError, match=r"config\.rpl\.grid_fraction"):
        rpl.make_task(config, in_channels=1)


@pytest.mark.parametrize("n", [3, 2])
@pytest.mark.parametrize("q", [1, 5, "all"])
def test_sample_queries_labels_mean_query_cells(n, q):
    """Each volume's reference is the centre cell, its Q queries distinct non-centre cells whose
    labels name them (on volumes whose cells hold their own index); Q = all gives every class."""
    classes = rpl.num_classes(P, n)
    q = classes if q == "all" else q
    vol = jnp.asarray(cell_constant_volume(SIDE, P, n))
    vols = jnp.broadcast_to(vol, (6, *vol.shape))
    patches, labels = jax.jit(
        functools.partial(
            rpl.make_batch, patches_per_side=P, jitter=J, training=True, num_queries=q
        )
    )(vols, jax.random.key(2))
    patches, labels = np.asarray(patches), np.asarray(labels)
    assert patches.shape == (6, 1 + q, *(3,) * n, 1) and labels.shape == (6, q)
    centre = classes // 2
    np.testing.assert_array_equal(patches[:, 0], centre)
    cells = np.where(labels < centre, labels, labels + 1)
    for b in range(6):
        assert len(set(labels[b].tolist())) == q  # distinct queries
        for i in range(q):
            np.testing.assert_array_equal(patches[b, 1 + i], cells[b, i])
    if q == classes:
        assert all(sorted(row) == list(range(classes)) for row in labels.tolist())
    if q == 1:  # the single query is sample_pair's, from the same key
        pairs, pair_labels = _batch_fn(True)(vols, jax.random.key(2))
        np.testing.assert_array_equal(np.asarray(pairs), patches)
        np.testing.assert_array_equal(np.asarray(pair_labels), labels[:, 0])
    with pytest.raises(ConfigError, match="queries_per_volume"):
        rpl.sample_queries(
            vol,
            jax.random.key(0),
            patches_per_side=P,
            jitter=J,
            training=True,
            num_queries=classes + 1,
        )


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 2])
def test_query_logits_equal_one_pair_at_a_time(n):
    """Q queries against one reference give the logits of the Q pairs classified one by one, and
    the loss with Q queries is the mean cross-entropy over all B * Q pairs."""
    model, params, _ = _model_and_step(n)
    patches = jax.random.normal(jax.random.key(5), (2, 4, *(5,) * n, 1))
    logits = np.asarray(model.query_logits(patches))
    assert logits.shape == (2, 3, rpl.num_classes(3, n))
    for i in range(3):
        pair = jnp.stack([patches[:, 0], patches[:, 1 + i]], axis=1)
        np.testing.assert_allclose(np.asarray(model(pair)), logits[:, i], rtol=1e-5, atol=1e-5)

    volumes = jax.random.normal(jax.random.key(6), (2, *(15,) * n, 1))
    kw = dict(patches_per_side=3, jitter=1, training=False, queries_per_volume=3)
    # A model whose output layer is not zero, so that the cross-entropy depends on the labels.
    trained = nnx.clone(model)
    trained.head.out.kernel.value = jax.random.normal(
        jax.random.key(7), trained.head.out.kernel.value.shape
    )
    loss, metrics = rpl.loss_fn(trained, volumes, jax.random.key(8), **kw)
    patches, labels = rpl.make_batch(
        volumes, jax.random.key(8), patches_per_side=3, jitter=1, training=False, num_queries=3
    )
    logits = trained.query_logits(patches).reshape(6, -1)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels.reshape(6))
    np.testing.assert_allclose(float(loss), float(expected.mean()), rtol=1e-5)
    acc = np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels).reshape(6))
    np.testing.assert_allclose(float(metrics["accuracy"]), acc)
