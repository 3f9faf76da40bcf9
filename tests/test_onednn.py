"""oneDNN convolutions through `jax.ffi` (issue 13): the same numbers as XLA's convolution.

* Every kernel (3x..x3 stride-1 SAME in 3D and 2D, the stride-2 SAME downsampling conv, the
  2x..x2 stride-2 transposed conv), forward, input gradient and kernel gradient, against
  `lax.conv_general_dilated` / `nnx.ConvTranspose`, on odd, even, 1-voxel and non-cubic shapes.
  Float32 tolerance: 2e-5 of the largest magnitude (oneDNN sums in another order than XLA;
  observed <= 6e-7). bfloat16: within 2e-2 of the float32 result.
* Transformations: jit, grad (and grad of grad), vmap over the activations (folded into the
  batch) and over the kernel, per-example gradients, remat, and a batch sharded over 8 simulated
  devices (each device runs the kernel on its shard: no all-gather of activations).
* Whole models: the segmentation U-Net (3D with remat and learned downsampling, 2D) and every
  pretext model give the same loss and gradients with `conv_impl='onednn'` as with `'xla'`; the
  segmentation train step with accumulation and on 8 devices equals 1 device, accumulation 1.
* The fallback: with the extension hidden, `'auto'` takes the pure-XLA path and logs why once;
  `'onednn'` is refused naming the reason. When `SSL3D_JAX_REQUIRE_ONEDNN=1` (`.ci/run` sets it)
  the extension must be there.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from params_util import (
    assert_same_sin_gradients,
    assert_tree_close,
    close_to_scale as _close,
    random_params,
)
from jax import lax

from ssl3d_jax import parallel
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.layers import UpConv2
from ssl3d_jax.models.unet import EncoderConfig, SegmentationModel
from ssl3d_jax.ops import conv as conv_lib
from ssl3d_jax.ops import onednn
from ssl3d_jax.train import finetune
from ssl3d_jax.train import step as step_lib

REQUIRE_ENV = "SSL3D_JAX_REQUIRE_ONEDNN"
needs_onednn = pytest.mark.skipif(
    not onednn.available(), reason=f"oneDNN extension unavailable: {onednn.unavailable_reason()}"
)


def test_extension_is_built_where_required():
    """CI builds the extension (`pip install -e .`) and must run every test below with it."""
    if os.environ.get(REQUIRE_ENV) != "1":
        pytest.skip(f"{REQUIRE_ENV} is not set")
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.version().startswith("3.")
    assert conv_lib.auto_impl((2, 40, 40, 40, 8), platform="cpu") == "onednn"


def _dn(n):
    return ("NHWC", "HWIO", "NHWC") if n == 2 else ("NDHWC", "DHWIO", "NDHWC")


def _lax_conv(x, w, strides, padding="SAME"):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_dn(x.ndim - 2))


def _random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape)


def _check_vjp(fn, ref, x, w):
    """Forward, input gradient and kernel gradient of `fn` == `ref` (and a jitted grad)."""
    y_ref, vjp_ref = jax.vjp(ref, x, w)
    y, vjp = jax.vjp(jax.jit(fn), x, w)
    _close(y, y_ref)
    dy = _random(y_ref.shape, 99)
    for got, want in zip(vjp(dy), vjp_ref(dy)):  # dX, dW
        _close(got, want)
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1)))(x, w)
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(ref(x, w))), argnums=(0, 1))(x, w)
    for got, want in zip(g, g_ref):
        _close(got, want)


SHAPES = {
    "3d-odd": ((2, 5, 4, 3, 3), 5),
    "3d-even": ((1, 6, 6, 6, 2), 4),
    "3d-1voxel": ((2, 1, 1, 1, 4), 2),
    "3d-noncubic-6ch": ((1, 4, 3, 7, 6), 3),
    "2d-odd": ((3, 7, 5, 2), 3),
    "2d-1pixel": ((2, 1, 1, 3), 2),
}


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("case", list(SHAPES))
def test_same_conv_equals_lax(case):
    x_shape, cout = SHAPES[case]
    n = len(x_shape) - 2
    x, w = _random(x_shape, 0), _random((3,) * n + (x_shape[-1], cout), 1)
    _check_vjp(
        lambda x, w: conv_lib.conv3_same(x, w, impl="onednn"),
        lambda x, w: _lax_conv(x, w, (1,) * n),
        x,
        w,
    )


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("case", ["3d-odd", "3d-even", "3d-1voxel", "3d-noncubic-6ch", "2d-odd"])
def test_stride2_conv_equals_lax(case):
    x_shape, cout = SHAPES[case]
    n = len(x_shape) - 2
    x, w = _random(x_shape, 2), _random((3,) * n + (x_shape[-1], cout), 3)
    y = conv_lib.conv3_s2(x, w, impl="onednn")
    assert y.shape == x_shape[:1] + tuple((s + 1) // 2 for s in x_shape[1:-1]) + (cout,)
    _check_vjp(lambda x, w: conv_lib.conv3_s2(x, w, impl="onednn"), conv_lib.conv3_s2_xla, x, w)


def _conv_transpose_ref(x, kernel):
    """`nnx.ConvTranspose(kernel_size=2, strides=2)` without bias, with `kernel` as its kernel."""
    n = x.ndim - 2
    layer = nnx.ConvTranspose(
        x.shape[-1], kernel.shape[-1], (2,) * n, strides=2, use_bias=False, rngs=nnx.Rngs(0)
    )
    layer.kernel[...] = kernel
    return layer(x)


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("case", ["3d-odd", "3d-even", "3d-1voxel", "2d-odd"])
def test_transposed_conv_equals_nnx_conv_transpose(case):
    x_shape, cout = SHAPES[case]
    n = len(x_shape) - 2
    x, k = _random(x_shape, 4), _random((2,) * n + (x_shape[-1], cout), 5)
    _check_vjp(onednn.conv_transpose2, _conv_transpose_ref, x, k)
    # The layer: same parameters, same output and gradients as its einsum formulation.
    ups = []
    for impl in ("xla", "onednn"):
        up = UpConv2(x_shape[-1], cout, spatial_dims=n, conv_impl=impl, rngs=nnx.Rngs(0))
        up.bias[...] = _random((cout,), 6)
        ups.append(up)
    assert_same_sin_gradients(ups, x)


@pytest.mark.slow
@needs_onednn
def test_bfloat16_close_to_float32():
    x = _random((2, 5, 6, 4, 8), 7)
    w = _random((3, 3, 3, 8, 8), 8) * 0.2
    dy = _random((2, 5, 6, 4, 8), 9)
    y, vjp = jax.vjp(lambda x, w: onednn.conv(x, w), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    dx, dw = vjp(dy.astype(jnp.bfloat16))
    assert dx.dtype == dw.dtype == jnp.bfloat16
    y_ref, vjp_ref = jax.vjp(lambda x, w: _lax_conv(x, w, (1, 1, 1)), x, w)
    for got, want in zip((y, dx, dw), (y_ref, *vjp_ref(dy))):
        _close(got, want, rtol=2e-2)


@pytest.mark.slow
@needs_onednn
def test_second_derivatives_equal_lax():
    """The three primitives differentiate into each other: grad of grad works and is right."""
    x, w = _random((2, 4, 5, 3, 2), 10), _random((3, 3, 3, 2, 3), 11)

    def gnorm(conv):
        def inner(x, w):
            gx, gw = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))(x, w)
            return jnp.sum(gx**2) + jnp.sum(jnp.cos(gw))

        return jax.grad(inner, argnums=(0, 1))

    got = jax.jit(gnorm(lambda x, w: onednn.conv(x, w, strides=(2, 1, 2))))(x, w)
    want = gnorm(lambda x, w: _lax_conv(x, w, (2, 1, 2)))(x, w)
    for a, b in zip(got, want):
        _close(a, b, rtol=1e-4)


@pytest.mark.slow
@needs_onednn
def test_vmap_folds_activations_and_maps_kernels():
    xs = _random((3, 2, 5, 4, 3, 2), 12)  # 3 vmapped batches of 2 volumes
    w = _random((3, 3, 3, 2, 4), 13)
    ws = _random((3, 3, 3, 3, 2, 4), 14)
    ref = jax.vmap(lambda x, w: _lax_conv(x, w, (1, 1, 1)))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))

    shared = jax.vmap(onednn.conv, in_axes=(0, None))
    ref_shared = jax.vmap(lambda x: _lax_conv(x, w, (1, 1, 1)))
    _close(shared(xs, w), ref_shared(xs))
    got = jax.jit(jax.grad(loss(shared), argnums=(0, 1)))(xs, w)
    want = jax.grad(loss(jax.vmap(lambda x, w: _lax_conv(x, w, (1, 1, 1)), (0, None))), (0, 1))(
        xs, w
    )
    for a, b in zip(got, want):
        _close(a, b)
    # The shared-kernel case is one call on the folded batch, not one per vmapped element.
    hlo = jax.jit(shared).lower(xs, w).as_text()
    assert hlo.count("ssl3d_onednn_conv_fwd") == 1 and "while" not in hlo
    both = jax.vmap(onednn.conv)
    for got, want in zip(
        jax.grad(loss(both), argnums=(0, 1))(xs, ws), jax.grad(loss(ref), argnums=(0, 1))(xs, ws)
    ):
        _close(got, want)
    # Per-example kernel gradients (vmap outside grad): one kernel gradient per element.
    per_example = jax.vmap(jax.grad(loss(onednn.conv), argnums=1), in_axes=(0, None))(xs, w)
    per_example_ref = jax.vmap(
        jax.grad(loss(lambda x, w: _lax_conv(x, w, (1, 1, 1))), argnums=1), in_axes=(0, None)
    )(xs, w)
    assert per_example.shape == (3,) + w.shape
    _close(per_example, per_example_ref)


@needs_onednn
def test_sharded_batch_runs_per_device_and_equals_one_device():
    devices = jax.devices()
    assert len(devices) == 8
    x, w = _random((8, 6, 5, 4, 3), 15), _random((3, 3, 3, 3, 4), 16)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(onednn.conv(x, w))), argnums=(0, 1)))
    want = grad(x, w)
    mesh = parallel.make_mesh(devices)
    xs = jax.device_put(x, parallel.data_sharded(mesh))
    ws = jax.device_put(w, parallel.replicated(mesh))
    got = grad(xs, ws)
    for a, b in zip(got, want):
        _close(a, b)
    assert got[0].sharding.spec[0] == "data"
    hlo = grad.lower(xs, ws).compile().as_text()
    # Every custom call sees one volume (its device's shard); no activation is gathered.
    calls = re.findall(
        r"= f32\[([\d,]+)\][^\n]*custom_call_target=\"ssl3d_onednn_conv_(\w+)\"", hlo
    )
    assert {kind for _, kind in calls} == {"fwd", "bwd_data", "bwd_weights"}
    for shape, kind in calls:
        if kind != "bwd_weights":
            assert shape.split(",")[0] == "1", (kind, shape)
    assert "all-gather" not in hlo
    assert re.search(r"\sall-reduce(?:-start)?\(", hlo)  # the kernel gradient's psum


# ------------------------------------------------------------------------------------------------
# Whole models: 'onednn' == 'xla'
# ------------------------------------------------------------------------------------------------


def _loss_and_grads(graphdef, params, loss):
    @jax.jit
    def f(params):
        return jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p)), has_aux=True)(params)

    return jax.device_get(f(params))


def _assert_same_loss_and_grads(a, b, what):
    (loss_a, _), grads_a = a
    (loss_b, _), grads_b = b
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5, err_msg=what)
    assert_tree_close(grads_a, grads_b, rtol=1e-4, atol_scale=1e-4, what=what)
    assert all(np.any(g) for g in jax.tree.leaves(grads_b)), what  # every parameter is compared


SEG_MODELS = {
    "3d-remat-convdown": dict(spatial_dims=3, remat=True, downsample="conv", shape=(2, 9, 8, 7)),
    "2d": dict(spatial_dims=2, remat=False, downsample="max_pool", shape=(3, 12, 10)),
}


@needs_onednn
@pytest.mark.parametrize("case", list(SEG_MODELS))
def test_segmentation_model_onednn_equals_xla(case):
    spec = dict(SEG_MODELS[case])
    shape = spec.pop("shape")
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(*shape, 2)).astype(np.float32),
        "label": rng.integers(0, 3, size=shape).astype(np.int32),
    }
    loss = finetune.make_loss(_seg_config(), 3)
    results = {}
    for impl in ("xla", "onednn"):

        def build(rngs, impl=impl):
            return SegmentationModel(
                2,
                3,
                spatial_dims=spec["spatial_dims"],
                encoder=EncoderConfig(
                    filters=(4, 8),
                    bottom_filters=8,
                    num_groups=2,
                    conv_impl=impl,
                    remat=spec["remat"],
                    downsample=spec["downsample"],
                ),
                rngs=rngs,
            )

        graphdef, params = random_params(build)
        results[impl] = _loss_and_grads(
            graphdef, params, lambda m: loss(m, batch, jax.random.key(0))
        )
    _assert_same_loss_and_grads(results["onednn"], results["xla"], case)


def _seg_config():
    from configs import rpl as rpl_config

    return rpl_config.get_config("smoke")


TASKS = ("rpl", "rotation", "jigsaw", "cpc", "exemplar")


@pytest.mark.slow
@needs_onednn
@pytest.mark.parametrize("name", TASKS)
def test_pretext_model_onednn_equals_xla(name):
    volumes = np.random.default_rng(1).normal(size=(4, 16, 16, 16, 2)).astype(np.float32)
    results = {}
    for impl in ("xla", "onednn"):
        config = importlib.import_module(f"configs.{name}").get_config("smoke")
        config.data.size = 16
        config.model.filters = (4, 8)
        config.model.bottom_filters = 8
        config.model.conv_impl = impl
        task = importlib.import_module(f"ssl3d_jax.tasks.{name}").make_task(config, in_channels=2)
        graphdef, params = random_params(task.build_model)
        results[impl] = _loss_and_grads(
            graphdef, params, lambda m, t=task: t.loss(m, volumes, jax.random.key(3))
        )
    _assert_same_loss_and_grads(results["onednn"], results["xla"], name)


@pytest.mark.slow
@needs_onednn
def test_segmentation_step_accumulation_and_devices_with_onednn():
    """The real train step with 'onednn': accumulation 2 on 8 devices == 1 step on 1 device."""
    rng = np.random.default_rng(2)
    batch = {
        "image": rng.normal(size=(16, 8, 8, 8, 2)).astype(np.float32),
        "label": rng.integers(0, 3, size=(16, 8, 8, 8)).astype(np.int32),
    }
    loss = finetune.make_loss(_seg_config(), 3)

    def build(rngs):
        return SegmentationModel(
            2,
            3,
            encoder=EncoderConfig(
                filters=(4,), bottom_filters=8, num_groups=2, remat=True, conv_impl="onednn"
            ),
            rngs=rngs,
        )

    graphdef, params = random_params(build)
    # An "optimizer" whose new state is the gradient.
    tx = optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
    )
    out = {}
    for accum, devices in ((1, jax.devices()[:1]), (2, jax.devices())):
        mesh = parallel.make_mesh(devices)
        state = step_lib.create_train_state(tx, params, jax.random.key(1), mesh)
        step = step_lib.jit_train_step(
            step_lib.make_train_step(graphdef, loss, tx, accum_steps=accum), mesh
        )
        new_state, metrics = step(state, parallel.put_batch(batch, parallel.data_sharded(mesh)))
        out[accum] = (jax.device_get(metrics["loss"]), jax.device_get(new_state.opt_state))
    np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[2][1]), jax.tree.leaves(out[1][1])):
        scale = max(float(np.max(np.abs(b))), 1e-12)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


# ------------------------------------------------------------------------------------------------
# The fallback
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def hidden_extension(monkeypatch):
    monkeypatch.setattr(onednn, "_warned", set())
    with onednn.hidden("hidden by a test"):
        yield


def test_hidden_extension_falls_back_to_xla_path_and_logs_once(hidden_extension, caplog):
    assert not onednn.available() and onednn.unavailable_reason() == "hidden by a test"
    with caplog.at_level(logging.WARNING, logger="ssl3d_jax.ops.onednn"):
        assert conv_lib.auto_impl((2, 40, 40, 40, 8), platform="cpu") == "taps2d"
        assert conv_lib.auto_impl((2, 4, 4, 4, 8), platform="cpu") == "stacked"
        assert conv_lib.auto_impl((2, 128, 128, 128, 8), platform="cpu") == "xla"  # memory
        assert conv_lib.auto_impl((2, 64, 64, 8), platform="cpu") == "xla"  # 2D
    logged = [r.getMessage() for r in caplog.records if "hidden by a test" in r.getMessage()]
    assert len(logged) == 1, logged
    assert "using the XLA path" in logged[0]
    x, w = _random((1, 5, 4, 3, 2), 20), _random((3, 3, 3, 2, 3), 21)
    with pytest.raises(ConfigError, match=r"conv_impl='onednn'.*hidden by a test"):
        conv_lib.conv3_same(x, w, impl="onednn")
    # 'auto' computes the same convolution on the fallback path, with no custom call.
    fn = jax.jit(lambda x, w: conv_lib.conv3_same(x, w, impl="auto"))
    _close(fn(x, w), _lax_conv(x, w, (1, 1, 1)))
    assert "ssl3d_onednn" not in fn.lower(x, w).as_text()
    # Off CPU, XLA's own convolution whatever the extension.
    assert conv_lib.auto_impl((2, 40, 40, 40, 8), platform="gpu") == "xla"


@needs_onednn
def test_disabling_by_environment_hides_the_extension():
    """A fresh process with SSL3D_JAX_ONEDNN=0 runs as if the extension could not be built."""
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "import jax, jax.numpy as jnp\n"
        "from ssl3d_jax.ops import conv, onednn\n"
        "x = jnp.ones((1, 8, 8, 8, 2)); w = jnp.ones((3, 3, 3, 2, 2))\n"
        "y = jax.jit(lambda x, w: conv.conv3_same(x, w) + conv.conv3_same(x, w))(x, w)\n"
        "print('impl', conv.auto_impl(x.shape), float(y.sum()))\n"
    )
    env = dict(os.environ, **{onednn.DISABLE_ENV: "0"})
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "impl taps2d" in out.stdout
    assert out.stderr.count(f"disabled by {onednn.DISABLE_ENV}=0") == 1, out.stderr


def test_auto_resolves_to_onednn_on_cpu_when_available():
    impl = conv_lib.auto_impl((2, 40, 40, 40, 8), platform="cpu")
    assert impl == ("onednn" if onednn.available() else "taps2d")
    assert conv_lib.auto_impl((2, 40, 40, 40, 8), platform="tpu") == "xla"


def test_onednn_where_it_cannot_run_fails_before_any_work(hidden_extension, tmp_path):
    from configs import rpl as rpl_config
    from ssl3d_jax import run as run_lib

    config = rpl_config.get_config("smoke")
    config.model.conv_impl = "onednn"
    config.data.root = str(tmp_path / "no-data-here")
    with pytest.raises(ConfigError, match=r"config\.model\.conv_impl='onednn'.*hidden by a test"):
        run_lib.run(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()
    with pytest.raises(ConfigError, match="CPU only"):
        conv_lib.check_onednn(platform="gpu")
