"""The pure-XLA CPU formulations of the U-Net's layers equal the plain ones (issues 6 and 13).

`ssl3d_jax.ops.conv.conv3_taps2d` (3 batched 2D convolutions, custom VJP), `conv3_stacked`
(stacked shifts + matmuls with its own VJP) and `conv3_wstacked` (last-axis shifts stacked + one
3x3x1 conv) must compute the
same convolution as `lax.conv_general_dilated` / `nnx.Conv` (SAME, stride 1, no bias), forward and
both gradients, in 2D and 3D, for odd and non-cubic sizes; and a whole segmentation model built
with `conv_impl='auto'` (stacked on these tiny maps), under remat, and a 2D ConvBlock with
`'wstacked'` must give the output and gradients of the same module with `conv_impl='xla'` (plain
`nnx.Conv`). `conv3_s2` (stride-2 3x..x3 SAME conv as space-to-depth + 2x..x2 conv) must equal
the lax stride-2 conv (odd sizes too), and an encoder with `downsample='conv'` must give the same
output and gradients with it as with `nnx.Conv(strides=2)`. Float32 tolerance: 2e-5
relative to the largest magnitude (only the float summation order differs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from params_util import assert_same_sin_gradients
from params_util import close_to_scale as _close

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.layers import ConvBlock
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, SegmentationModel
from ssl3d_jax.ops import onednn
from ssl3d_jax.ops.conv import (
    auto_impl,
    conv3_s2,
    conv3_s2_xla,
    conv3_same,
    conv3_stacked,
    conv3_taps2d,
    conv3_wstacked,
)


def _ref(x, w):
    n = x.ndim - 2
    dn = ("NHWC", "HWIO", "NHWC") if n == 2 else ("NDHWC", "DHWIO", "NDHWC")
    return lax.conv_general_dilated(x, w, (1,) * n, "SAME", dimension_numbers=dn)


@pytest.mark.slow
@pytest.mark.parametrize(
    "x_shape,cout",
    [
        ((2, 5, 4, 3, 3), 5),
        ((1, 6, 6, 6, 2), 4),
        ((3, 7, 5, 2), 3),
        ((2, 1, 1, 1, 4), 2),
        ((1, 4, 3, 5, 6), 3),
    ],
    ids=["3d-odd", "3d-even", "2d-odd", "3d-1voxel", "3d-6ch"],
)
@pytest.mark.parametrize(
    "impl", [conv3_taps2d, conv3_stacked, conv3_wstacked], ids=["taps2d", "stacked", "wstacked"]
)
def test_fast_conv_forward_and_gradients(x_shape, cout, impl):
    n = len(x_shape) - 2
    if impl is conv3_taps2d and n == 2:
        pytest.skip("taps2d is a 3D formulation (in 2D conv3_same runs XLA's convolution)")
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, (3,) * n + (x_shape[-1], cout))
    dy = jax.random.normal(kd, x_shape[:-1] + (cout,))
    y_ref, vjp_ref = jax.vjp(_ref, x, w)
    y, vjp = jax.vjp(jax.jit(impl), x, w)
    _close(y, y_ref)
    for got, want in zip(vjp(dy), vjp_ref(dy)):  # dX, dW
        _close(got, want)
    # Second-order use (e.g. grad of grad) is not needed; a jitted grad through jit must work.
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(impl(x, w) ** 2), argnums=(0, 1)))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(_ref(x, w) ** 2), argnums=(0, 1))(x, w)
    for got, want in zip(g, g_ref):
        _close(got, want)


@pytest.mark.slow
def test_stacked_conv_bfloat16_close_to_xla():
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 5, 4)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4, 4)).astype(jnp.bfloat16)
    y, vjp = jax.vjp(conv3_stacked, x, w)
    assert y.dtype == jnp.bfloat16
    dx, dw = vjp(jnp.ones_like(y))
    assert dx.dtype == dw.dtype == jnp.bfloat16
    xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
    y_ref, vjp_ref = jax.vjp(_ref, xf, wf)
    for got, want in zip((y, dx, dw), (y_ref, *vjp_ref(jnp.ones_like(y_ref)))):
        _close(got, want, rtol=2e-2)


def test_conv3_same_dispatch_and_errors():
    # Without the oneDNN extension (or with it hidden): the fastest pure-XLA formulation measured.
    with onednn.hidden("hidden by test_fast_layers"):
        assert auto_impl((2, 4, 4, 4, 8)) == "stacked"
        assert auto_impl((2, 10, 10, 10, 8)) == "taps2d"
        assert auto_impl((2, 40, 40, 40, 8), platform="cpu") == "taps2d"
        assert auto_impl((2, 64, 64, 64, 8), platform="cpu") == "taps2d"
        assert auto_impl((2, 128, 128, 128, 8), platform="cpu") == "xla"  # memory: copies
        assert auto_impl((16, 128, 128, 8), platform="cpu") == "xla"  # 2D: XLA's conv is fastest
    assert auto_impl((2, 10, 10, 10, 8), platform="gpu") == "xla"  # vendor kernels off CPU
    assert auto_impl((2, 40, 40, 40, 8), platform="tpu") == "xla"
    x, w = jnp.ones((1, 3, 3, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(ConfigError, match="conv_impl"):
        conv3_same(x, w, impl="fast")
    with pytest.raises(ConfigError, match="kernel"):
        conv3_same(x, jnp.ones((3, 3, 3, 2, 2)))
    with pytest.raises(ConfigError, match="conv_impl"):
        ConvBlock(2, 2, conv_impl="nope", rngs=nnx.Rngs(0))


def _segmentation(conv_impl, spatial_dims, remat):
    return SegmentationModel(
        2,
        3,
        spatial_dims=spatial_dims,
        encoder=EncoderConfig(
            filters=(4, 8), bottom_filters=8, num_groups=2, remat=remat, conv_impl=conv_impl
        ),
        rngs=nnx.Rngs(0),
    )


def _loss_and_grads(model, x):
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def f(params, x):
        def loss(params, x):
            logits = nnx.merge(graphdef, params)(x)
            return jnp.sum(jnp.sin(logits)), logits

        (_, logits), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return logits, grads

    return f(params, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spatial_dims,shape,remat,impl",
    [(3, (1, 5, 4, 3, 2), True, "taps2d"), (3, (1, 9, 8, 7, 2), False, "fallback")],
    ids=["3d-remat-taps2d", "3d-auto-without-onednn"],
)
def test_segmentation_model_fast_equals_plain(spatial_dims, shape, remat, impl):
    """'fallback': conv_impl='auto' with the oneDNN extension hidden (stacked and taps2d by
    feature-map size); the oneDNN path itself: tests/test_onednn.py."""
    x = jax.random.normal(jax.random.key(3), shape)
    plain = _segmentation("xla", spatial_dims, remat)
    fast = _segmentation("auto" if impl == "fallback" else impl, spatial_dims, remat)
    # Same parameter tree and values (same init keys): checkpoints are interchangeable.
    p_plain, p_fast = nnx.state(plain, nnx.Param), nnx.state(fast, nnx.Param)
    assert jax.tree.structure(p_plain) == jax.tree.structure(p_fast)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p_plain, p_fast)
    logits_ref, (gp_ref, gx_ref) = _loss_and_grads(plain, x)
    if impl == "fallback":
        with onednn.hidden("hidden by test_fast_layers"):
            logits, (gp, gx) = _loss_and_grads(fast, x)
    else:
        logits, (gp, gx) = _loss_and_grads(fast, x)
    _close(logits, logits_ref)
    _close(gx, gx_ref)
    jax.tree.map(_close, gp, gp_ref)


@pytest.mark.slow
def test_conv_block_2d_wstacked_equals_plain():
    x = jax.random.normal(jax.random.key(4), (2, 7, 6, 3))
    blocks = [
        ConvBlock(3, 4, num_groups=2, spatial_dims=2, conv_impl=i, rngs=nnx.Rngs(0))
        for i in ("xla", "wstacked")
    ]
    assert_same_sin_gradients(blocks, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "x_shape", [(2, 6, 5, 7, 3), (1, 1, 2, 3, 2), (2, 7, 6, 3)], ids=["3d-odd", "3d-tiny", "2d"]
)
def test_space_to_depth_stride2_conv_equals_lax(x_shape):
    n = len(x_shape) - 2
    x = jax.random.normal(jax.random.key(5), x_shape)
    w = jax.random.normal(jax.random.key(6), (3,) * n + (x_shape[-1], 4))
    y_ref, vjp_ref = jax.vjp(conv3_s2_xla, x, w)
    y, vjp = jax.vjp(jax.jit(conv3_s2), x, w)
    assert y.shape == x_shape[:1] + tuple((s + 1) // 2 for s in x_shape[1:-1]) + (4,)
    _close(y, y_ref)
    dy = jax.random.normal(jax.random.key(7), y.shape)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        _close(got, want)


@pytest.mark.parametrize("x_shape", [(2, 7, 6, 3), (1, 70, 66, 66, 2)], ids=["2d", "3d-large"])
def test_stride2_auto_without_onednn_is_space_to_depth(x_shape):
    """Where 'auto' falls back to XLA's stride-1 convolution (2D, maps above 64³), the stride-2
    conv must still be the space-to-depth rewrite: XLA's own stride-2 dX runs at ~1 GFLOP/s."""
    n = len(x_shape) - 2
    x = jnp.zeros(x_shape)
    w = jnp.zeros((3,) * n + (x_shape[-1], 2))
    with onednn.hidden("hidden by test_fast_layers"):
        hlo = jax.jit(lambda x, w: conv3_s2(x, w, impl="auto")).lower(x, w).as_text()
    assert "convolution" in hlo and "stride = [2" not in hlo, hlo
    xla_hlo = jax.jit(lambda x, w: conv3_s2(x, w, impl="xla")).lower(x, w).as_text()
    assert "stride = [2" in xla_hlo


@pytest.mark.slow
def test_encoder_conv_downsampling_fast_equals_nnx_conv():
    """downsample='conv': the s2d DownConv equals nnx.Conv(strides=2) in a whole encoder."""
    x = jax.random.normal(jax.random.key(8), (1, 5, 4, 3, 2))
    encoders = []
    for impl in ("xla", "stacked"):
        enc = Encoder3D(
            2,
            filters=(4,),
            bottom_filters=4,
            num_groups=2,
            downsample="conv",
            conv_impl=impl,
            rngs=nnx.Rngs(0),
        )
        assert enc.pool0.conv.kernel.shape == (3, 3, 3, 4, 4)
        encoders.append(enc)
    assert_same_sin_gradients(encoders, x, pick=lambda out: out[0])  # the features
    with pytest.raises(ConfigError, match="downsample"):
        Encoder3D(2, downsample="avg", rngs=nnx.Rngs(0))
