"""Tests of the CPC pretext task (`ssl3d_jax.tasks.cpc`): grid geometry, batches, InfoNCE, model,
overfit, and the 8-device == 1-device loss with negatives gathered across devices."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl3d_jax import parallel
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.unet import Encoder3D
from ssl3d_jax.ops.patches import patch_shape
from ssl3d_jax import tasks
from ssl3d_jax.tasks import cpc
from ssl3d_jax.train.step import init_params
from check_util import adam_steps, assert_decided_by_key

P = 4
SIDE = 16  # cells and patches of 4 per axis
ENC = dict(filters=(4, 8), bottom_filters=16, num_groups=1, dropout_rate=0.0)
DIMS = [3, 2]


def cell_constant(side, p, n):
    """`[side]*n + [1]` array, each grid cell holding its row-major cell index."""
    idx = np.minimum(np.arange(side) // (side // p), p - 1)
    grids = np.meshgrid(*([idx] * n), indexing="ij")
    flat = np.zeros([side] * n, np.int64)
    for g in grids:
        flat = flat * p + g
    return flat.astype(np.float32)[..., None]


def _config(n, **cpc_overrides):
    section = dict(
        patches_per_side=P,
        jitter=0,
        code_size=16,
        gru_units=8,
        temperature=1.0,
        volume_crop=0.95,
        patch_crop=7 / 8,
        flip_patches=True,
    )
    section.update(cpc_overrides)
    config = tasks.task_config("cpc", "smoke" if n == 3 else "smoke,2d")
    config.model.update(ENC)
    config.data.size = SIDE
    config.cpc.update(dict(section, grid_fraction=1.0))  # the grid over the whole input
    return config


@functools.cache
def _task(n):
    return cpc.make_task(_config(n), in_channels=1)


@functools.cache
def _params(n):
    return init_params(_task(n).build_model, jax.random.key(0))


@functools.cache
def _batch_fn(n, training):
    return jax.jit(
        functools.partial(
            cpc.make_batch,
            patches_per_side=P,
            jitter=0,
            volume_crop=0.95 if training else 1.0,
            patch_crop=7 / 8,
            flip=n == 3,
            training=training,
        )
    )


# ---------------------------------------------------------------- geometry -----------------


def _reference_context(p, n):
    """Independent reference: np.pad(mode='reflect') of the row-0 index plane (P = 4: e = 1)."""
    idx = np.arange(p**n).reshape([p] * n)
    row0 = np.pad(idx[0], [(1, 1)] * (n - 1), mode="reflect")  # -1 -> 1, p -> p - 2
    out = []
    for col in np.ndindex(*([p] * (n - 1))):
        window = row0[tuple(slice(c, c + 3) for c in col)]
        out.append([*window.ravel(), idx[(1, *col)]])
    return np.asarray(out)


@pytest.mark.parametrize("n", DIMS)
def test_context_and_target_indices(n):
    ctx, tgt = cpc.context_indices(P, n), cpc.target_indices(P, n)
    assert ctx.dtype == np.int32 and tgt.dtype == np.int32
    assert ctx.shape == (P ** (n - 1), 3 ** (n - 1) + 1) and tgt.shape == (P ** (n - 1), 2)
    np.testing.assert_array_equal(ctx, _reference_context(P, n))
    idx = np.arange(P**n).reshape([P] * n)
    for c, col in enumerate(np.ndindex(*([P] * (n - 1)))):
        np.testing.assert_array_equal(tgt[c], [idx[(2, *col)], idx[(3, *col)]])
    if n == 3:
        # Hand-written: column (0, 0) mirrors -1 -> 1; column (3, 3) mirrors 4 -> 2.
        np.testing.assert_array_equal(ctx[0], [5, 4, 5, 1, 0, 1, 5, 4, 5, 16])
        np.testing.assert_array_equal(ctx[15], [10, 11, 10, 14, 15, 14, 10, 11, 10, 31])
        np.testing.assert_array_equal(tgt[15], [47, 63])
    else:
        np.testing.assert_array_equal(ctx[0], [1, 0, 1, 4])
        np.testing.assert_array_equal(ctx[3], [2, 3, 2, 7])
    # Context rows are all before every target row: nothing to predict leaks into the context.
    assert (ctx // P ** (n - 1)).max() < (tgt // P ** (n - 1)).min()


def test_grid_geometry_other_sizes():
    # P = 5 in 2D (the paper's 2D grid, non-overlapping here): context 3 + 1, rows 2..4 targets.
    np.testing.assert_array_equal(cpc.context_indices(5, 2)[0], [1, 0, 1, 5])
    np.testing.assert_array_equal(cpc.target_indices(5, 2)[4], [14, 19, 24])
    # P = 6 in 3D: a pyramid of 5x5 (row 0) + 3x3 (row 1) + the patch (2, y, z).
    assert cpc.context_indices(6, 3).shape == (36, 25 + 9 + 1)
    assert cpc.target_indices(6, 3).shape == (36, 3)
    with pytest.raises(ConfigError):
        cpc.context_indices(1, 3)
    with pytest.raises(ConfigError):
        cpc.target_indices(4, 4)


@pytest.mark.parametrize("n", DIMS)
def test_patches_context_and_targets_on_cell_constant_volume(n):
    vol = jnp.asarray(cell_constant(SIDE, P, n))
    patches = _batch_fn(n, False)(jnp.stack([vol, vol + 1000.0]), jax.random.key(0))
    assert patches.shape == (2, P**n, *([SIDE // P] * n), 1)
    values = np.asarray(patches).reshape(2, P**n, -1)
    assert (values.min(-1) == values.max(-1)).all()  # every patch is one cell
    ids = values[..., 0]
    np.testing.assert_array_equal(ids[0], np.arange(P**n))
    context, targets = cpc.split_context_targets(
        jnp.asarray(ids), patches_per_side=P, spatial_dims=n
    )
    np.testing.assert_array_equal(np.asarray(context[0]), _reference_context(P, n))
    np.testing.assert_array_equal(np.asarray(targets[1]), cpc.target_indices(P, n) + 1000.0)


@pytest.mark.parametrize("n", DIMS)
def test_augmented_patches_stay_in_their_cell(n):
    """With augmentation on, each patch holds only its own cell's value or the zero border."""
    vol = jnp.asarray(cell_constant(SIDE, P, n)) + 1.0  # cells 1.., zero = padding
    patches = np.asarray(_batch_fn(n, True)(vol[None], jax.random.key(3)))[0]
    values = patches.reshape(P**n, -1)
    for i, v in enumerate(values):
        # The whole-volume shift (<= 1 voxel) and the per-patch crop (offset <= 1) can bring in
        # voxels of the next cells, but at least 2 of 4 voxels per axis stay the patch's own, so
        # its own value is the most frequent non-zero one; the crop + pad adds a zero border.
        assert (v == 0).any()
        vals, counts = np.unique(v[v != 0], return_counts=True)
        assert vals[np.argmax(counts)] == i + 1, (i, vals, counts)
        assert set(vals.tolist()) <= set(range(i + 1, P**n + 1))  # only higher-index neighbours


def test_random_crop_pad_semantics():
    x = jnp.arange(1, 9, dtype=jnp.float32).reshape(8, 1)
    outs = {
        tuple(np.asarray(cpc.random_crop_pad(x, jax.random.key(s), crop_shape=(6,)))[:, 0])
        for s in range(50)
    }
    # Crop of 6 at offset 0..2, padded 1 before / 1 after.
    expected = {tuple([0.0, *range(1 + o, 7 + o), 0.0]) for o in range(3)}
    assert outs == expected
    assert cpc.random_crop_pad(x, jax.random.key(0), crop_shape=(8,)) is x


@pytest.mark.parametrize("n", DIMS)
def test_make_batch_determinism(n):
    vols = jax.random.normal(jax.random.key(0), (2, *([SIDE] * n), 1))
    assert_decided_by_key(_batch_fn(n, True), vols, jax.random.key(3), jax.random.key(4))


# ---------------------------------------------------------------- InfoNCE ------------------


def _one_hot_setup(b=3, n=8):
    latents = jnp.eye(b * n).reshape(b, n, b * n)  # latent of patch (v, i) = e_{v*n + i}
    positive = jnp.asarray([5, 2, 7, 0])  # M = 4 predictions per volume
    return latents, positive


@pytest.mark.slow
def test_info_nce_positive_is_true_target():
    latents, positive = _one_hot_setup()
    b, n, _ = latents.shape
    true = latents[:, positive]  # [B, M, E]: predictions equal to the true target latents
    loss, acc = cpc.info_nce(true, latents, positive)
    # Candidate set = all B * N latents: the positive scores 1, the B*N - 1 others 0.
    np.testing.assert_allclose(float(loss), math.log(math.e + b * n - 1) - 1.0, rtol=1e-6)
    assert float(acc) == 1.0
    # Sharp predictions: the loss goes to its minimum 0.
    loss, acc = cpc.info_nce(50.0 * true, latents, positive)
    assert float(loss) < 1e-6 and float(acc) == 1.0
    # Temperature scales the scores.
    loss_t, _ = cpc.info_nce(true, latents, positive, temperature=0.02)
    np.testing.assert_allclose(float(loss_t), float(loss), atol=1e-6)


def test_info_nce_negatives():
    latents, positive = _one_hot_setup()
    b, n, _ = latents.shape
    # Predict another patch of the SAME volume: that patch is a negative -> accuracy 0.
    other_same = latents[:, (positive + 1) % n]
    loss, acc = cpc.info_nce(10.0 * other_same, latents, positive)
    assert float(acc) == 0.0
    np.testing.assert_allclose(float(loss), math.log(math.exp(10.0) + b * n - 1), rtol=1e-6)
    # Predict the same position in ANOTHER volume: also a negative.
    other_vol = jnp.roll(latents, 1, axis=0)[:, positive]
    loss, acc = cpc.info_nce(10.0 * other_vol, latents, positive)
    assert float(acc) == 0.0 and float(loss) > 9.0
    # Per-volume positive indices ([B, M]) are accepted too.
    per_vol = jnp.stack([positive, (positive + 1) % n, positive])
    _, acc = cpc.info_nce(latents[jnp.arange(b)[:, None], per_vol], latents, per_vol)
    assert float(acc) == 1.0


@pytest.mark.slow
def test_info_nce_uses_global_batch_negatives():
    """All-batch negatives differ from per-shard negatives (what a per-device loss would do)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    pred = jax.random.normal(k1, (8, 6, 5))
    lat = jax.random.normal(k2, (8, 10, 5))
    pos = jnp.arange(6)
    global_loss, _ = cpc.info_nce(pred, lat, pos)
    per_shard = np.mean(
        [float(cpc.info_nce(pred[i : i + 1], lat[i : i + 1], pos)[0]) for i in range(8)]
    )
    assert abs(float(global_loss) - per_shard) > 0.1


# ---------------------------------------------------------------- model and loss -----------


@pytest.mark.parametrize("n", DIMS)
def test_model_structure_and_shapes(n):
    graphdef, params = _params(n)
    assert set(params) == {"encoder", "code", "context", "predict0", "predict1"}
    # The encoder subtree is exactly a plain U-Net encoder (what finetuning restores); the code
    # projection, GRU and predictors are beside it.
    plain = nnx.eval_shape(lambda: Encoder3D(1, **ENC, spatial_dims=n, rngs=nnx.Rngs(0)))
    plain_shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(plain, nnx.Param)))
    assert jax.tree.map(jnp.shape, params["encoder"]) == plain_shapes
    patches = jax.ShapeDtypeStruct((2, P**n, *([4] * n), 1), jnp.float32)
    predictions, latents = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params, patches)
    assert predictions.shape == (2, P ** (n - 1), 2, 16)
    assert latents.shape == (2, P**n, 16)


_TRACES = {2: [], 3: []}


@functools.cache
def _value_and_grad(n):
    graphdef, _ = _params(n)
    task = _task(n)

    def loss(p, v, k):
        _TRACES[n].append(1)  # runs at trace time only
        return task.loss(nnx.merge(graphdef, p), v, k)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.slow
@pytest.mark.parametrize("n", DIMS)
def test_loss_at_init_and_overfit(n):
    _, params = _params(n)
    value_and_grad = _value_and_grad(n)
    volumes = jax.random.uniform(jax.random.key(0), (2, *([SIDE] * n), 1))
    key = jax.random.key(1)  # fixed: the same patches every step, so the model can memorise them
    (loss0, metrics), _ = value_and_grad(params, volumes, key)
    assert set(metrics) == {"loss", "accuracy"}
    # Near chance at init: log of the 2 * P**n candidates.
    assert abs(float(loss0) - math.log(2 * P**n)) < 1.0, float(loss0)
    params = adam_steps(value_and_grad, params, volumes, key, 60)
    (loss, metrics), _ = value_and_grad(params, volumes, key)
    assert np.isfinite(float(loss))
    # Measured after 60 steps: 3D 4.87 -> 1.60 (accuracy 0.58), 2D 3.34 -> 0.24 (accuracy 1).
    assert float(loss) < 0.5 * float(loss0), (n, float(loss0), float(loss))
    assert float(metrics["accuracy"]) > 0.3, (n, float(metrics["accuracy"]))


@pytest.mark.parametrize("n", DIMS)
def test_no_retrace(n):
    _, params = _params(n)
    value_and_grad = _value_and_grad(n)
    shape = (2, *([SIDE] * n), 1)
    (a, _), _ = value_and_grad(
        params, jax.random.normal(jax.random.key(7), shape), jax.random.key(0)
    )
    (b, _), _ = value_and_grad(
        params, jax.random.normal(jax.random.key(8), shape), jax.random.key(1)
    )
    assert len(_TRACES[n]) == 1 and float(a) != float(b)


@pytest.mark.slow
@pytest.mark.parametrize("n", DIMS)
def test_eight_devices_equal_one_device_with_cross_device_negatives(n):
    """Different volumes on every device: the loss depends on all of them through the negatives,
    and it matches between 1 and 8 devices, so the negatives are gathered across devices."""
    assert jax.device_count() == 8
    task = _task(n)
    graphdef, params = _params(n)
    volumes = np.asarray(jax.random.normal(jax.random.key(5), (8, *([SIDE] * n), 1)))
    key = jax.random.key(2)
    section = _config(n).cpc

    def loss_and_outputs(p, b):
        model = nnx.merge(graphdef, p)
        loss, metrics = task.loss(model, b["image"], key)
        # The same patches as task.loss (its key split), for the per-device comparison below.
        patches = cpc.make_batch(
            b["image"],
            jax.random.split(key)[0],
            patches_per_side=P,
            jitter=0,
            volume_crop=section.volume_crop,
            patch_crop=section.patch_crop,
            flip=section.flip_patches,
            training=True,
        )
        return loss, metrics, model(patches, train=True)

    out = {}
    for ndev in (1, 8):
        mesh = parallel.make_mesh(jax.devices()[:ndev])
        p = jax.device_put(params, parallel.replicated(mesh))
        batch = parallel.put_batch({"image": volumes}, parallel.data_sharded(mesh))
        assert len(batch["image"].sharding.device_set) == ndev
        if ndev == 1:
            loss, metrics, (predictions, latents) = jax.jit(loss_and_outputs)(p, batch)
        else:
            loss, metrics = jax.jit(
                lambda p, b: task.loss(nnx.merge(graphdef, p), b["image"], key)
            )(p, batch)
        out[ndev] = float(loss), float(metrics["accuracy"])
    np.testing.assert_allclose(out[8], out[1], rtol=1e-5)

    # Decomposition: the task loss is InfoNCE over ALL 8 * P**n latents ...
    b, cols, k, e = predictions.shape
    preds = predictions.reshape(b, cols * k, e)
    targets = cpc.target_indices(P, n).reshape(-1)
    global_loss, _ = cpc.info_nce(preds, latents, targets)
    np.testing.assert_allclose(float(global_loss), out[1][0], rtol=1e-5)
    # ... whereas per-device negatives (each device's volume alone) would give another loss.
    per_device = np.mean(
        [float(cpc.info_nce(preds[i : i + 1], latents[i : i + 1], targets)[0]) for i in range(b)]
    )
    assert abs(per_device - out[1][0]) > 0.1, (per_device, out[1][0])


def test_make_task_config_errors_and_spec():
    task = cpc.make_task(_config(3), in_channels=1)
    assert task.name == "cpc" and task.input_spec["patches_per_side"] == P
    with pytest.raises(ConfigError):
        cpc.make_task(_config(3, patches_per_side=1), in_channels=1)
    with pytest.raises(ConfigError):
        cpc.make_task(_config(3, temperature=0.0), in_channels=1)
    with pytest.raises(ConfigError):
        cpc.make_task(_config(3, patch_crop=1.5), in_channels=1)


@pytest.mark.parametrize("arg", ["smoke", "smoke,2d", "default", "default,2d", "paper", "paper,2d"])
def test_configs_build(arg):
    from configs import cpc as cpc_config

    config = cpc_config.get_config(arg)
    assert config.task == "cpc"
    cpc.make_task(config, in_channels=4)  # validates the section
    n = config.data.spatial_dims
    p, j, f = config.cpc.patches_per_side, config.cpc.jitter, config.cpc.grid_fraction
    shape = (config.data.size,) * n + (1,)
    edge = patch_shape(shape, patches_per_side=p, jitter=j, grid_fraction=f)[0]
    # Patches large enough for the encoder; the random grid (f < 1) except at paper size.
    assert edge >= (3 if config.size == "smoke" else 5), edge
    assert (f == 1.0) == (config.size == "paper")
    assert cpc.target_indices(p, n).shape[1] >= 2
