"""Tests of the U-Net layers, encoder, decoder and heads (`ssl3d_jax.models`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.heads import MLPHead
from ssl3d_jax.models.layers import ConvBlock, UpConv2, group_count, max_pool2
from ssl3d_jax.models.unet import (
    Encoder,
    Encoder3D,
    EncoderConfig,
    SegmentationModel,
    UNetDecoder,
    flatten_features,
    global_max_pool,
)

SMALL = dict(filters=(4, 8, 8, 8), bottom_filters=8, num_groups=4)

POOL_CASES = [(2, 4, 6, 8, 3), (1, 5, 7, 3, 2), (1, 1, 1, 1, 1), (2, 13, 18, 9, 1)]


def _ceil_half(s):
    return (s + 1) // 2


POOL_CASES_2D = [(2, 4, 6, 3), (1, 5, 7, 2), (1, 1, 1, 1), (2, 13, 18, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("shape", POOL_CASES + POOL_CASES_2D)
def test_max_pool2_matches_reduce_window(shape):
    n = len(shape) - 2
    x = jax.random.normal(jax.random.key(0), shape)
    got = max_pool2(x)
    window = (1,) + (2,) * n + (1,)
    ref = lax.reduce_window(
        x,
        -jnp.inf,
        lax.max,
        window,
        window,
        [(0, 0)] + [(0, s % 2) for s in shape[1:-1]] + [(0, 0)],
    )
    assert got.shape == (shape[0], *map(_ceil_half, shape[1:-1]), shape[-1])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    for padding in ("SAME", "VALID") if all(s % 2 == 0 for s in shape[1:-1]) else ("SAME",):
        pooled = nnx.max_pool(x, (2,) * n, (2,) * n, padding=padding)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(pooled))


def test_bad_ranks_raise():
    with pytest.raises(ConfigError, match=r"\(2, 4, 4\)"):
        max_pool2(jnp.zeros((2, 4, 4)))
    with pytest.raises(ConfigError, match="spatial_dims"):
        Encoder3D(1, spatial_dims=4, filters=(4,), bottom_filters=4, rngs=nnx.Rngs(0))
    enc = Encoder3D(1, spatial_dims=2, filters=(4,), bottom_filters=4, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="rank 4"):
        enc(jnp.zeros((1, 4, 4, 4, 1)))  # a volume batch into a 2D encoder
    with pytest.raises(ConfigError, match="rank 5"):
        ConvBlock(1, 4, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 4, 1)))  # 3D conv would not batch


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, in_shape", [(3, (2, 3, 4, 5)), (2, (2, 3, 5)), (2, (1, 1, 7))], ids=["3d", "2d", "2d_1x7"]
)
@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_upconv2_equals_conv_transpose(n, in_shape, padding):
    cin, cout = 6, 5
    ref = nnx.ConvTranspose(
        cin, cout, kernel_size=(2,) * n, strides=(2,) * n, padding=padding, rngs=nnx.Rngs(0)
    )
    ref.bias[...] = jax.random.normal(jax.random.key(9), (cout,))
    up = UpConv2(cin, cout, spatial_dims=n, rngs=nnx.Rngs(1))
    assert up.kernel.shape == ref.kernel.shape == (2,) * n + (cin, cout)
    up.kernel[...] = ref.kernel[...]
    up.bias[...] = ref.bias[...]
    b, *spatial = in_shape
    out_shape = (b, *(2 * s for s in spatial), cout)
    x = jax.random.normal(jax.random.key(2), (*in_shape, cin))
    r = jax.random.normal(jax.random.key(3), out_shape)
    y_ref, y = ref(x), up(x)
    assert y.shape == y_ref.shape == out_shape
    # f32 sums of 6 products in a different order: agreement to ~1e-6 relative.
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)

    def grads(module):
        graphdef, params = nnx.split(module, nnx.Param)

        def f(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x) * r)

        g_params, g_x = jax.grad(f, argnums=(0, 1))(nnx.to_pure_dict(params), x)
        return g_params["kernel"], g_params["bias"], g_x

    for g, g_ref in zip(grads(up), grads(ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-4)


def test_group_count():
    assert group_count(16, 8) == 8
    assert group_count(4, 8) == 4
    assert group_count(12, 8) == 6


def test_kernel_rank_is_3d():
    block = ConvBlock(3, 16, rngs=nnx.Rngs(0))
    assert block.conv1.kernel.shape == (3, 3, 3, 3, 16)
    assert block.conv2.kernel.shape == (3, 3, 3, 16, 16)
    # Paper widths: every conv kernel of the encoder is 3x3x3 (built abstractly, no init cost).
    enc = nnx.eval_shape(lambda: Encoder3D(1, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    kernels = [v.shape for p, v in leaves if "kernel" in str(p)]
    assert len(kernels) == 10 and all(k[:3] == (3, 3, 3) for k in kernels)
    assert params["bottom"]["conv2"]["kernel"].shape == (3, 3, 3, 256, 256)


@pytest.mark.slow
def test_kernel_rank_is_2d():
    block = ConvBlock(3, 16, spatial_dims=2, rngs=nnx.Rngs(0))
    assert block.conv1.kernel.shape == (3, 3, 3, 16)
    assert block.conv2.kernel.shape == (3, 3, 16, 16)
    model = nnx.eval_shape(lambda: SegmentationModel(1, 2, spatial_dims=2, rngs=nnx.Rngs(0)))
    assert model.encoder.spatial_dims == 2 and model.encoder.bottom_filters == 256
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kernels = {
        jax.tree_util.keystr(p): v.shape
        for p, v in jax.tree_util.tree_leaves_with_path(params)
        if "kernel" in str(p)
    }
    # Encoder 10 convs, decoder 4 up-convs + 8 convs + classifier, all rank 2 + (in, out).
    assert len(kernels) == 23 and all(len(k) == 4 for k in kernels.values())
    assert params["encoder"]["down0"]["conv1"]["kernel"].shape == (3, 3, 1, 16)
    assert params["encoder"]["bottom"]["conv2"]["kernel"].shape == (3, 3, 256, 256)
    assert params["decoder"]["up0"]["kernel"].shape == (2, 2, 32, 16)
    assert params["decoder"]["classifier"]["kernel"].shape == (1, 1, 16, 2)
    # Same tree as 3D: only kernel ranks differ.
    model3 = nnx.eval_shape(lambda: SegmentationModel(1, 2, rngs=nnx.Rngs(0)))
    params3 = nnx.to_pure_dict(nnx.state(model3, nnx.Param))
    assert jax.tree.structure(params3) == jax.tree.structure(params)
    assert Encoder is Encoder3D


SHAPE_CASES = [(13, 13, 13), (16, 16, 16), (18, 18, 18), (20, 24, 18), (39, 39, 39)]


@pytest.fixture(scope="module")
def seg_model():
    return SegmentationModel(2, 3, encoder=EncoderConfig(**SMALL), rngs=nnx.Rngs(0))


SHAPE_CASES_2D = [(13, 13), (16, 16), (20, 24), (7, 33), (1, 5)]


@pytest.fixture(scope="module")
def seg_model_2d():
    return SegmentationModel(2, 3, spatial_dims=2, encoder=EncoderConfig(**SMALL), rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("spatial", SHAPE_CASES + SHAPE_CASES_2D)
def test_encoder_decoder_shapes(request, spatial):
    model = request.getfixturevalue("seg_model" if len(spatial) == 3 else "seg_model_2d")
    x = jax.ShapeDtypeStruct((2, *spatial, 2), jnp.float32)
    feats, skips = jax.eval_shape(lambda v: model.encoder(v), x)
    sizes = [spatial]
    for _ in range(4):
        sizes.append(tuple(_ceil_half(s) for s in sizes[-1]))
    assert [s.shape for s in skips] == [(2, *sizes[i], f) for i, f in enumerate(SMALL["filters"])]
    assert feats.shape == (2, *sizes[4], SMALL["bottom_filters"])
    logits = jax.eval_shape(lambda v: model(v), x)
    assert logits.shape == (2, *spatial, 3)  # decoder output at the input's resolution


@pytest.mark.slow
def test_segmentation_forward_2d_odd_nonsquare(seg_model_2d):
    x = jax.random.normal(jax.random.key(0), (2, 13, 10, 2))
    logits = jax.jit(lambda v: seg_model_2d(v))(x)
    assert logits.shape == (2, 13, 10, 3)
    assert np.all(np.isfinite(np.asarray(logits)))
    feats, _ = seg_model_2d.encoder(x)
    assert global_max_pool(feats).shape == (2, SMALL["bottom_filters"])
    np.testing.assert_array_equal(
        np.asarray(global_max_pool(feats)), np.asarray(feats).max(axis=(1, 2))
    )
    assert flatten_features(feats).shape == (2, feats.shape[1] * feats.shape[2] * feats.shape[3])


def test_segmentation_forward_odd_noncubic(seg_model):
    x = jax.random.normal(jax.random.key(0), (1, 13, 10, 7, 2))
    logits = jax.jit(lambda v: seg_model(v))(x)
    assert logits.shape == (1, 13, 10, 7, 3)
    assert np.all(np.isfinite(np.asarray(logits)))
    assert global_max_pool(jnp.ones((2, 3, 1, 2, 5))).shape == (2, 5)


def test_param_tree_keys(seg_model):
    params = nnx.to_pure_dict(nnx.split(seg_model, nnx.Param)[1])
    assert set(params) == {"encoder", "decoder"}
    assert set(params["encoder"]) == {"down0", "down1", "down2", "down3", "bottom"}
    assert params["decoder"]["up0"]["kernel"].shape == (2, 2, 2, 8, 4)
    assert params["decoder"]["classifier"]["kernel"].shape == (1, 1, 1, 4, 3)
    # Everything is a Param: no BatchNorm statistics or stored RNG state.
    _, _, rest = nnx.split(seg_model, nnx.Param, ...)
    assert jax.tree.leaves(rest) == []


@pytest.mark.slow
def test_dropout_needs_rngs_and_is_random():
    model = SegmentationModel(
        1, 2, encoder=EncoderConfig(**SMALL, dropout_rate=0.5), rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8, 1))
    with pytest.raises(ValueError):
        model(x, train=True)
    a = model(x, train=True, rngs=nnx.Rngs(dropout=jax.random.key(1)))
    b = model(x, train=True, rngs=nnx.Rngs(dropout=jax.random.key(2)))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))


@pytest.mark.slow
def test_mlp_head():
    head = MLPHead(10, (16, 8), 5, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 10))
    out = head(x)
    assert out.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(out), 0.0)  # zero-initialised output layer
    params = nnx.to_pure_dict(nnx.state(head, nnx.Param))
    assert set(params) == {"dense0", "norm0", "dense1", "norm1", "out"}
    dec = UNetDecoder(num_classes=2, **SMALL, rngs=nnx.Rngs(0))
    assert dec.classifier.kernel.shape == (1, 1, 1, 4, 2)
