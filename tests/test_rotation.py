"""Tests of the rotation pretext task (`ssl3d_jax.tasks.rotation`): what each class rotates,
batches, model, loss, overfit, and 8 devices == 1 device, in 3D and 2D."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import rotation as rotation_config
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.tasks import get_task, rotation
from ssl3d_jax.train import step as step_lib
from check_util import adam_steps, on_one_and_eight_devices

SIZE = 12  # 12 -> 6 -> 3 bottom -> 2 pooled: 2^d x 8 head inputs
ENC = dict(filters=(4, 8), bottom_filters=8, num_groups=1)
# Plane group of each 3D class (None: identity) and the axis that group leaves fixed.
GROUP_3D = [None, 0, 0, 0, 1, 1, 1, 2, 2, 2]
FIXED_AXIS = {0: 2, 1: 0, 2: 1}  # (0,1) plane about axis 2, (1,2) about 0, (0,2) about 1


def coordinate_volume(side: int, spatial_dims: int) -> np.ndarray:
    """`[side]*d + [d]` float32: each voxel holds its own coordinates, centred, times 2 (integers).

    A rotation moves values, not coordinates, so after `rotate` voxel x holds the coordinates
    `M x` of the voxel it came from; `M` is recovered exactly by least squares.
    """
    c = 2 * np.arange(side) - (side - 1)
    grids = np.meshgrid(*([c] * spatial_dims), indexing="ij")
    return np.stack(grids, axis=-1).astype(np.float32)


def rotation_matrix(label: int, spatial_dims: int, side: int = 4) -> np.ndarray:
    """The `d x d` integer matrix `M` with `rotate(v, label)[x] = v[M x]` (centred coordinates)."""
    src = coordinate_volume(side, spatial_dims)
    out = np.asarray(rotation.rotate(jnp.asarray(src), label))
    x = src.reshape(-1, spatial_dims)
    m_t, *_ = np.linalg.lstsq(x, out.reshape(-1, spatial_dims), rcond=None)
    m = np.round(m_t.T).astype(int)
    np.testing.assert_array_equal(x @ m.T, out.reshape(-1, spatial_dims))  # exactly linear
    return m


def random_volume(key, spatial_dims, side=SIZE, channels=2, batch=None):
    shape = (side,) * spatial_dims + (channels,)
    if batch is not None:
        shape = (batch, *shape)
    return jax.random.normal(jax.random.key(key), shape)


@functools.cache
def _jit_rotate():
    traces = []

    def f(v, label):
        traces.append(1)
        return rotation.rotate(v, label)

    return jax.jit(f), traces


@functools.cache
def _jit_make_batch():
    traces = []

    def f(v, key):
        traces.append(1)
        return rotation.make_batch(v, key)

    return jax.jit(f), traces


# --- what the classes mean ----------------------------------------------------------------------


def test_num_classes():
    assert rotation.num_classes(3) == 10
    assert rotation.num_classes(2) == 4
    assert len(rotation.rotation_table(3)) == 10 and len(rotation.rotation_table(2)) == 4
    with pytest.raises(ConfigError, match="spatial_dims"):
        rotation.num_classes(4)


def test_3d_classes_are_ten_distinct_proper_rotations():
    mats = [rotation_matrix(k, 3) for k in range(10)]
    for k, m in enumerate(mats):
        # Signed permutation matrix with determinant +1: a proper axis-aligned rotation.
        assert set(np.abs(m).sum(axis=0)) == {1} and set(np.abs(m).sum(axis=1)) == {1}, (k, m)
        assert set(np.unique(m)) <= {-1, 0, 1}
        assert round(np.linalg.det(m)) == 1, (k, m)
    np.testing.assert_array_equal(mats[0], np.eye(3, dtype=int))
    assert len({m.tobytes() for m in mats}) == 10
    for k in range(1, 10):
        group = GROUP_3D[k]
        f = FIXED_AXIS[group]
        # The group's axis is fixed, the other two are rotated (not fixed).
        assert mats[k][f, f] == 1, (k, mats[k])
        others = [a for a in range(3) if a != f]
        assert not np.array_equal(mats[k][np.ix_(others, others)], np.eye(2, dtype=int))
        # Classes 3g+1, 3g+2, 3g+3 are 1, 2, 3 quarter turns: powers of the group's generator.
        first = mats[3 * group + 1]
        quarter = k - 3 * group
        np.testing.assert_array_equal(mats[k], np.linalg.matrix_power(first, quarter))
    for g in range(3):  # a quarter turn has order 4
        np.testing.assert_array_equal(
            np.linalg.matrix_power(mats[3 * g + 1], 4), np.eye(3, dtype=int)
        )


def test_2d_classes_are_four_distinct_proper_rotations():
    mats = [rotation_matrix(k, 2) for k in range(4)]
    np.testing.assert_array_equal(mats[0], np.eye(2, dtype=int))
    for k, m in enumerate(mats):
        assert round(np.linalg.det(m)) == 1 and set(np.abs(m).sum(axis=0)) == {1}, (k, m)
        np.testing.assert_array_equal(m, np.linalg.matrix_power(mats[1], k))
    assert len({m.tobytes() for m in mats}) == 4


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_inverse_rotation_recovers_original(spatial_dims):
    n = rotation.num_classes(spatial_dims)
    mats = [rotation_matrix(k, spatial_dims) for k in range(n)]
    v = random_volume(0, spatial_dims, side=6, channels=2)
    for k in range(n):
        # The inverse rotation is itself a class (M^T, same plane): closure of the class set.
        inv = [j for j in range(n) if np.array_equal(mats[j], mats[k].T)]
        assert len(inv) == 1, k
        back = rotation.rotate(rotation.rotate(v, k), inv[0])
        np.testing.assert_array_equal(np.asarray(back), np.asarray(v))
        # Independently of the table: undo with numpy's rot90 by -k in the class's plane.
        turns, plane = rotation.rotation_table(spatial_dims)[k]
        undone = np.rot90(np.asarray(rotation.rotate(v, k)), -turns, axes=plane)
        np.testing.assert_array_equal(undone, np.asarray(v))
        if k:
            assert not np.array_equal(np.asarray(rotation.rotate(v, k)), np.asarray(v))


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_traced_label_equals_eager_and_no_retrace(spatial_dims):
    f, traces = _jit_rotate()
    v = random_volume(1, spatial_dims, side=6, channels=1)
    f(v, jnp.int32(0))  # traced at most once per shape
    before = len(traces)
    for k in range(rotation.num_classes(spatial_dims)):
        got = f(v, jnp.int32(k))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(rotation.rotate(v, k)))
        assert got.dtype == v.dtype and got.shape == v.shape
    assert len(traces) == before  # no retrace for any label


def test_bad_inputs():
    with pytest.raises(ConfigError, match=r"\(16, 16, 12, 1\)"):
        rotation.rotate(jnp.zeros((16, 16, 12, 1)), 1)
    with pytest.raises(ConfigError, match=r"\(16, 12, 1\)"):
        rotation.rotate(jnp.zeros((16, 12, 1)), jnp.int32(1))
    with pytest.raises(ConfigError, match="shape"):
        rotation.make_batch(jnp.zeros((2, 8, 8, 6, 1)), jax.random.key(0))
    with pytest.raises(ConfigError, match="shape"):
        rotation.rotate(jnp.zeros((4, 4, 4, 4, 1)), 0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        rotation.rotate(jnp.zeros((4, 4, 4, 1)), 10)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        rotation.rotate(jnp.zeros((4, 4, 1)), 4)


# --- batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_make_batch_labels_match_rotations(spatial_dims):
    f, _ = _jit_make_batch()
    jit_rotate, _ = _jit_rotate()
    vols = random_volume(2, spatial_dims, side=6, channels=1, batch=64)
    rotated, labels = f(vols, jax.random.key(5))
    rotated, labels = np.asarray(rotated), np.asarray(labels)
    n = rotation.num_classes(spatial_dims)
    assert labels.dtype == np.int32 and labels.shape == (64,)
    assert labels.min() >= 0 and labels.max() < n
    for b in range(64):
        expected = jit_rotate(vols[b], labels[b])  # == eager rotate (test above)
        np.testing.assert_array_equal(rotated[b], np.asarray(expected))


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_make_batch_label_distribution(spatial_dims):
    f, _ = _jit_make_batch()
    n_vol = 2000
    vols = jnp.zeros((n_vol,) + (2,) * spatial_dims + (1,))
    _, labels = f(vols, jax.random.key(0))
    n = rotation.num_classes(spatial_dims)
    counts = np.bincount(np.asarray(labels), minlength=n)
    assert counts.shape == (n,)
    # Uniform: every class within 5 standard deviations of n_vol / n.
    expected = n_vol / n
    sd = math.sqrt(n_vol * (1 / n) * (1 - 1 / n))
    assert np.all(np.abs(counts - expected) < 5 * sd), counts


def test_make_batch_determinism_and_no_retrace():
    f, traces = _jit_make_batch()
    vols = random_volume(3, 3, side=6, channels=1, batch=16)
    a = f(vols, jax.random.key(3))
    before = len(traces)
    b = f(vols, jax.random.key(3))
    c = f(vols + 1.0, jax.random.key(4))  # new data and key, same shapes: no retrace
    assert len(traces) == before
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))


# --- loss semantics without a model -------------------------------------------------------------


class _Oracle:
    """A stand-in model that reads the rotation off a coordinate volume: logits 50 for the class
    whose rotation of the reference matches the input, 0 otherwise (rolled by `shift`)."""

    def __init__(self, reference, shift=0):
        self.reference = reference
        self.shift = shift

    def __call__(self, x, *, train=False, rngs=None):
        n = rotation.num_classes(self.reference.ndim - 1)
        candidates = jnp.stack([rotation.rotate(self.reference, k) for k in range(n)])
        match = jnp.all(x[:, None] == candidates[None], axis=tuple(range(2, x.ndim + 1)))
        return jnp.roll(50.0 * match.astype(jnp.float32), self.shift, axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_loss_uses_the_labels_it_rotated_by(spatial_dims):
    ref = jnp.asarray(coordinate_volume(4, spatial_dims))
    vols = jnp.broadcast_to(ref, (32, *ref.shape))
    loss, metrics = rotation.loss_fn(_Oracle(ref), vols, jax.random.key(0), training=False)
    assert float(metrics["accuracy"]) == 1.0 and float(loss) < 1e-6
    loss, metrics = rotation.loss_fn(_Oracle(ref, 1), vols, jax.random.key(0), training=False)
    assert float(metrics["accuracy"]) == 0.0 and float(loss) > 10


# --- model, overfit, task -----------------------------------------------------------------------
# One task, one param init and one jitted (loss, grads) per dimensionality, shared by all tests
# below (compiles dominate this file's run time).


def _config(spatial_dims, dropout=0.0):
    config = rotation_config.get_config("smoke" if spatial_dims == 3 else "smoke,2d")
    config.data.size = SIZE
    config.model.filters = ENC["filters"]
    config.model.bottom_filters = ENC["bottom_filters"]
    config.model.num_groups = ENC["num_groups"]
    config.model.dropout_rate = dropout
    config.rotation.head_hidden = (32,)
    config.rotation.head_dropout = dropout
    return config


@functools.cache
def _task_and_step(spatial_dims):
    """`(task, graphdef, params, value_and_grad)`; `value_and_grad(params, volumes, key)` ->
    `((loss, metrics), grads)` of the task's loss, jitted."""
    task = get_task(_config(spatial_dims), in_channels=1)
    graphdef, params = step_lib.init_params(task.build_model, jax.random.key(0))

    def loss(p, volumes, key):
        return task.loss(nnx.merge(graphdef, p), volumes, key)

    return task, graphdef, params, jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_model_logits_shape_and_size_check(spatial_dims):
    _, graphdef, params, _ = _task_and_step(spatial_dims)
    model = nnx.merge(graphdef, params)
    x = jax.ShapeDtypeStruct((3,) + (SIZE,) * spatial_dims + (1,), jnp.float32)
    logits = jax.eval_shape(lambda x: model(x), x)  # shapes only: nothing to compile
    assert logits.shape == (3, rotation.num_classes(spatial_dims))
    # Flattened head input: 2^d pooled positions x 8 bottom filters.
    assert params["head"]["dense0"]["kernel"].shape == (2**spatial_dims * 8, 32)
    assert model.encoder.filters == ENC["filters"]
    bad = jax.ShapeDtypeStruct((1,) + (SIZE + 2,) * spatial_dims + (1,), jnp.float32)
    with pytest.raises(ConfigError, match="config.data.size"):
        jax.eval_shape(lambda x: model(x), bad)


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_loss_at_init_and_overfit(spatial_dims):
    _, _, params, value_and_grad = _task_and_step(spatial_dims)
    volumes = random_volume(0, spatial_dims, side=SIZE, channels=1, batch=4)
    key = jax.random.key(2)  # fixed: the same 4 rotated inputs every step, to be memorised
    (loss0, metrics), _ = value_and_grad(params, volumes, key)
    n = rotation.num_classes(spatial_dims)
    np.testing.assert_allclose(float(loss0), math.log(n), rtol=1e-5)  # zero-init output layer
    assert set(metrics) == {"loss", "accuracy"}
    params = adam_steps(value_and_grad, params, volumes, key, 40)
    (loss, metrics), _ = value_and_grad(params, volumes, key)
    # Measured: 3D 2.30 -> 0.48, 2D 1.39 -> 0.054, accuracy 1.0 in both.
    assert np.isfinite(float(loss))
    assert float(loss) < 0.3 * float(loss0), (float(loss0), float(loss))
    assert float(metrics["accuracy"]) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_eight_devices_equal_one_device(spatial_dims):
    task, _, params, value_and_grad = _task_and_step(spatial_dims)
    assert task.name == "rotation"
    assert task.input_spec["num_classes"] == rotation.num_classes(spatial_dims)
    volumes = np.asarray(random_volume(4, spatial_dims, side=SIZE, channels=1, batch=8))
    key = jax.random.key(9)
    ((la, ma), ga), ((lb, mb), gb) = on_one_and_eight_devices(
        lambda p, batch: value_and_grad(p, batch["image"], key), params, volumes
    )
    np.testing.assert_allclose(
        [float(la), float(ma["accuracy"])], [float(lb), float(mb["accuracy"])], rtol=1e-5
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ga, gb)


@pytest.mark.slow
def test_make_task_with_dropout():
    # Dropout adds no params: the dropout model reuses the shared init.
    _, _, params, _ = _task_and_step(3)
    task = rotation.make_task(_config(3, dropout=0.1), in_channels=1)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))), nnx.Param)
    loss = jax.jit(lambda p, v, k: task.loss(nnx.merge(graphdef, p), v, k))
    volumes = random_volume(5, 3, side=SIZE, channels=1, batch=2)
    a, metrics = loss(params, volumes, jax.random.key(0))
    b, _ = loss(params, volumes, jax.random.key(0))
    assert np.isfinite(float(a)) and set(metrics) == {"loss", "accuracy"}
    assert float(a) == float(b)


def test_configs():
    paper = rotation_config.get_config("paper")
    assert paper.task == "rotation" and paper.data.size == 128
    assert paper.pretrain.batch_size == 4 and paper.pretrain.learning_rate == 1e-4
    assert paper.rotation.head_hidden == (2048, 1024)
    paper_2d = rotation_config.get_config("paper,2d")
    assert paper_2d.pretrain.batch_size == 32 and paper_2d.pretrain.learning_rate == 1e-5
    for arg in ("", "smoke", "2d", "smoke,2d"):
        config = rotation_config.get_config(arg)
        task = rotation.make_task(config, in_channels=4)
        assert task.input_spec["size"] == config.data.size
        assert task.input_spec["spatial_dims"] == config.data.spatial_dims
