"""Frozen-encoder probes: the voxel linear probe (shape, head size, head-only training), the
weighted kNN vote, patch foreground labels, and the online KnnProbe (accuracy, no recompiles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssl3d_jax import losses, parallel, probes
from ssl3d_jax.models.probes import VoxelLinearProbe, head_parameter_count, upsample_repeat
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, SegmentationModel
from ssl3d_jax.train import step as step_lib

ENC = dict(filters=(4, 8), bottom_filters=8, num_groups=2, dropout_rate=0.0)


@pytest.fixture(params=[3, 2], ids=["3d", "2d"])
def dims(request):
    return request.param


def _init(build, seed: int = 0):
    """`build(rngs)` with numpy-drawn weights: eager NNX init compiles every initialiser on its
    own (~7 s on 2 cores for a tiny 3D model), jit-ed init compiles a large graph; this is free.
    Kernels ~ N(0, 1 / fan_in), norm scales 1, biases 0 (weight values do not matter here)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1].key)
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    return nnx.merge(graphdef, params)


# --- voxel linear probe ------------------------------------------------------------------------


def test_upsample_repeat_is_nearest_aligned_with_pooling():
    x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(1, 2, 3, 2)  # [B, 2, 3, C]
    y = upsample_repeat(x, 4, (7, 10))  # 7 <= 4*2 and 10 <= 4*3: the high end is cropped
    assert y.shape == (1, 7, 10, 2)
    for i in range(7):
        for j in range(10):
            np.testing.assert_array_equal(y[0, i, j], x[0, i // 4, j // 4])


@pytest.mark.slow
def test_voxel_probe_shape_head_size_and_definition(dims):
    k = 3
    size = 13  # odd: ceil pooling, upsampled levels are cropped
    model = _init(
        lambda rngs: VoxelLinearProbe(
            2, k, spatial_dims=dims, encoder=EncoderConfig(**ENC), rngs=rngs
        )
    )
    x = jax.random.normal(jax.random.key(1), (2, *(size,) * dims, 2))
    logits, dense = model(x), model.dense_features(x)
    reference, features = model.head(dense), model.encoder(x)[0]
    assert logits.shape == (2, *(size,) * dims, k) and logits.dtype == jnp.float32
    channels = sum(ENC["filters"]) + ENC["bottom_filters"]
    assert head_parameter_count(model) == (channels + 1) * k
    assert model.head.kernel.shape == (*(1,) * dims, channels, k)
    # The per-level evaluation equals its definition: upsample every level, concat, one 1x1 conv.
    assert dense.shape == (2, *(size,) * dims, channels)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
    # The bottom's channels are the concat's last ones, and a bottom voxel covers a 4^n block.
    np.testing.assert_array_equal(dense[(0, *(5,) * dims)][-8:], features[(0, *(1,) * dims)])


def test_voxel_probe_encoder_fits_segmentation_checkpoints(dims):
    probe = nnx.eval_shape(
        lambda: VoxelLinearProbe(
            2, 4, spatial_dims=dims, encoder=EncoderConfig(**ENC), rngs=nnx.Rngs(0)
        )
    )
    seg = nnx.eval_shape(
        lambda: SegmentationModel(
            2, 4, spatial_dims=dims, encoder=EncoderConfig(**ENC), rngs=nnx.Rngs(0)
        )
    )
    shapes = lambda m: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m.encoder, nnx.Param)))  # noqa: E731
    assert shapes(probe) == shapes(seg)


def test_head_only_training_leaves_encoder_unchanged():
    k = 3
    mesh = parallel.make_mesh(jax.devices()[:1])

    model = _init(
        lambda rngs: VoxelLinearProbe(1, k, spatial_dims=3, encoder=EncoderConfig(**ENC), rngs=rngs)
    )
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    assert set(params) == {"encoder", "head"}
    tx = optax.adam(1e-2)
    state = step_lib.create_train_state(tx, params, jax.random.key(1), mesh)

    def loss_fn(model, batch, key):
        logits = model(batch["image"], train=True, rngs=nnx.Rngs(dropout=key))
        return losses.cross_entropy(logits, batch["label"]), {}

    step = jax.jit(step_lib.make_train_step(graphdef, loss_fn, tx, trainable=("head",)))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, 12, 12, 12, 1)).astype(np.float32),
        "label": rng.integers(0, k, (2, 12, 12, 12)).astype(np.int32),
    }
    before = jax.device_get(state.params)
    state, metrics = step(state, batch)
    after = jax.device_get(state.params)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, before["encoder"], after["encoder"])
    assert not np.allclose(before["head"]["kernel"], after["head"]["kernel"])
    assert not np.allclose(before["head"]["bias"], after["head"]["bias"])


# --- kNN vote ----------------------------------------------------------------------------------


def test_knn_separated_blobs_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 10.0
    train_y = np.repeat(np.arange(4), 15)
    test_y = np.repeat(np.arange(4), 5)
    train = centres[train_y] + rng.normal(size=(60, 16))
    test = centres[test_y] + rng.normal(size=(20, 16))
    pred = probes.knn_predict(
        jnp.asarray(train), jnp.asarray(train_y), jnp.asarray(test), k=20, num_classes=4
    )
    np.testing.assert_array_equal(pred, test_y)
    # jit with static k / num_classes; k > N is clipped to N
    fn = jax.jit(probes.knn_predict, static_argnames=("k", "num_classes"))
    pred = fn(train[:3], train_y[:3], test, k=50, num_classes=4)
    assert pred.shape == (20,) and pred.dtype == jnp.int32


def test_knn_k1_is_the_nearest_neighbour_by_cosine():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(30, 8)).astype(np.float32)
    train_y = rng.integers(0, 5, 30)
    query = rng.normal(size=(25, 8)).astype(np.float32)
    pred = probes.knn_predict(train, train_y, query, k=1, num_classes=5)
    cos = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ (
        train / np.linalg.norm(train, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(pred, train_y[np.argmax(cos, axis=1)])


def test_knn_temperature_weighting_decides():
    # Query [1, 0]: one class-1 neighbour at cos 1, two class-0 neighbours at cos 0.6.
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
    train_y = np.array([1, 0, 0])
    query = np.array([[1.0, 0.0]], np.float32)
    # k=2: a 1-1 count tie, which the similarity weights break for the nearer neighbour.
    assert int(probes.knn_predict(train, train_y, query, k=2, num_classes=2)[0]) == 1
    # k=3: sharp weights (T = 0.07) let the nearest win, flat ones (T = 100) are a majority vote.
    assert int(probes.knn_predict(train, train_y, query, k=3, num_classes=2)[0]) == 1
    flat = probes.knn_predict(train, train_y, query, k=3, num_classes=2, temperature=100.0)
    assert int(flat[0]) == 0


def test_knn_zero_features_do_not_give_nan():
    train = np.array([[0.0, 0.0], [1.0, 0.0]], np.float32)
    pred = probes.knn_predict(train, np.array([0, 1]), np.array([[2.0, 0.0]]), k=1, num_classes=2)
    assert int(pred[0]) == 1


# --- patch foreground labels -------------------------------------------------------------------


def test_patch_presence_labels_3d():
    vols = np.random.default_rng(0).normal(size=(2, 16, 16, 16, 2)).astype(np.float32)
    labels = np.zeros((2, 16, 16, 16), np.int32)
    labels[0, 9:11, 2:4, 10:12] = 2  # a foreground cube
    labels[0, 0, 0, 0] = 1  # in patch 0's border ring only: not its central half
    patches, has_fg = probes.patch_presence_dataset(vols, labels, patch=8)
    assert patches.shape == (16, 8, 8, 8, 2) and patches.dtype == np.float32
    assert has_fg.dtype == np.int32
    # grid (z, y, x) in C order, 2 per axis: the cube's patch starts at (8, 0, 8) -> index 5,
    # whose central half [10, 14) x [2, 6) x [10, 14) meets the cube; volume 1 is empty.
    expected = np.zeros(16, np.int32)
    expected[5] = 1
    np.testing.assert_array_equal(has_fg, expected)
    np.testing.assert_array_equal(patches[5], vols[0, 8:16, 0:8, 8:16])
    np.testing.assert_array_equal(patches[8 + 3], vols[1, 0:8, 8:16, 8:16])

    # Overlapping grid (starts 0, 4, 8): centre intervals [2,6), [6,10), [10,14) per axis.
    _, has_fg = probes.patch_presence_dataset(vols[:1], labels[:1], patch=8, stride=4)
    expected = np.zeros(27, np.int32)
    expected[[1 * 9 + 0 * 3 + 2, 2 * 9 + 0 * 3 + 2]] = 1  # starts (4, 0, 8) and (8, 0, 8)
    np.testing.assert_array_equal(has_fg, expected)


def test_patch_presence_labels_2d():
    imgs = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
    labels = np.zeros((1, 16, 16), np.int32)
    labels[0, 9:11, 2:4] = 1
    patches, has_fg = probes.patch_presence_dataset(imgs, labels, patch=8)
    assert patches.shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(has_fg, [0, 0, 1, 0])
    np.testing.assert_array_equal(patches[2], imgs[0, 8:16, 0:8])


# --- online kNN probe --------------------------------------------------------------------------


class _IntensityEncoder(nnx.Module):
    """Features [x, 1 - x] * scale per voxel: constant-0 and constant-1 inputs pool to orthogonal
    vectors, so a cosine kNN separates them perfectly for any scale > 0."""

    def __init__(self, scale: float):
        self.scale = nnx.Param(jnp.asarray(scale, jnp.float32))

    def __call__(self, x, *, train=False, rngs=None):
        f = jnp.concatenate([x[..., :1], 1.0 - x[..., :1]], axis=-1) * self.scale[...]
        return f, (f,)


def _constant_volumes(n: int, size: int, dims: int, seed: int):
    y = np.random.default_rng(seed).permutation(np.arange(n) % 2)
    x = np.broadcast_to(y.reshape(-1, *(1,) * (dims + 1)), (n, *(size,) * dims, 1))
    return x.astype(np.float32), y


def test_knn_probe_separates_by_construction_without_recompiling(dims):
    train_x, train_y = _constant_volumes(10, 8, dims, seed=0)
    test_x, test_y = _constant_volumes(7, 8, dims, seed=1)
    probe = probes.KnnProbe(train_x, train_y, test_x, test_y, num_classes=2, k=5, batch_size=4)
    for scale in (1.0, 3.0):
        out = probe(_IntensityEncoder(scale))
        assert out == {"knn_accuracy": 1.0, "knn_balanced_accuracy": 1.0}
    assert probe.num_traces == 1


@pytest.mark.slow
def test_knn_probe_matches_eager_features_of_a_real_encoder(dims):
    rng = np.random.default_rng(0)
    size = 12 if dims == 3 else 16
    x = rng.normal(size=(11, *(size,) * dims, 2)).astype(np.float32)
    y = rng.integers(0, 3, 11)
    # 11 samples in batches of 4: the last batch is padded, the padding must not become a neighbour.
    probe = probes.KnnProbe(x[:7], y[:7], x[7:], y[7:], num_classes=3, k=3, batch_size=4)
    for seed in (0, 1):
        enc = _init(lambda rngs: Encoder3D(2, spatial_dims=dims, rngs=rngs, **ENC), seed)
        feats = probes.pooled_features(enc, jnp.asarray(x))
        assert feats.shape == (11, ENC["bottom_filters"]) and feats.dtype == jnp.float32
        expected = probes.knn_predict(feats[:7], y[:7], feats[7:], k=3, num_classes=3)
        np.testing.assert_array_equal(probe.predict(enc), expected)
        out = probe(enc)
        assert out["knn_accuracy"] == pytest.approx(float(np.mean(np.asarray(expected) == y[7:])))
    assert probe.num_traces == 1


@pytest.mark.slow
def test_pooled_features_with_skips():
    enc = _init(lambda rngs: Encoder3D(1, spatial_dims=2, rngs=rngs, **ENC))
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 1))
    feats = probes.pooled_features(enc, x, with_skips=True)
    assert feats.shape == (3, sum(ENC["filters"]) + ENC["bottom_filters"])
    # each level L2-normalised: three levels of unit norm (none is all-zero here)
    sizes = np.cumsum((0, *ENC["filters"], ENC["bottom_filters"]))
    for a, b in zip(sizes[:-1], sizes[1:]):
        np.testing.assert_allclose(np.linalg.norm(feats[:, a:b], axis=1), 1.0, rtol=1e-5)


def test_balanced_accuracy():
    labels = np.array([0, 0, 0, 0, 1])
    assert probes.balanced_accuracy(labels, np.zeros(5, int)) == pytest.approx(0.5)
    assert probes.balanced_accuracy(labels, labels) == 1.0
