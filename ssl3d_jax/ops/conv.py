"""3x..x3 convolutions for XLA:CPU: oneDNN through `jax.ffi`, and exact pure-XLA rewrites.

Why: XLA:CPU runs small 3D convolutions far below its matmul speed. At the shapes our U-Nets see
(few channels, 5³–40³ voxels, batch 2–16) a `lax.conv_general_dilated` forward, and above all its
gradients, cost 4-18x what the same convolution costs in PyTorch (benchmarks/results/layers.md).

`conv3_same(x, w, impl=...)` computes exactly `lax.conv_general_dilated(x, w, (1,) * n, 'SAME')`
(cross-correlation, no bias), `conv3_s2(x, w, impl=...)` the stride-2 SAME convolution, in one of
these formulations (`config.model.conv_impl`):

  * `'onednn'`: oneDNN's primitives as XLA FFI custom calls (`ssl3d_jax.ops.onednn`), forward and
    both gradients; PyTorch's speed on CPU. Needs the C++ extension that `pip install` builds.
  * `'taps2d'` (3D): the sum over the 3 taps of the first spatial axis of one batched 2D
    convolution each (`y[:, d] = sum_a conv2d(x_pad[:, d + a], w[a])`), with a custom gradient
    made of 2D convolutions too. XLA:CPU hands 2D convolutions to a faster library than its 3D
    ones: fastest pure-XLA formulation on mid-sized and large maps (1.7-4x XLA's 3D conv).
  * `'stacked'`: the zero-padded input's 3^(n-1) shifts along the last n-1 axes stacked along
    channels, then one matmul per first-axis tap, with its own gradient (dX: the same with the
    flipped, in/out-swapped kernel; dW: 3 matmuls over every voxel). Fastest on tiny maps (<= 4³).
  * `'wstacked'`: XLA's convolution forward; its gradients differentiate "3 last-axis shifts
    stacked along channels + one `3x..x3x1` convolution".
  * `'xla'`: `lax.conv_general_dilated` itself (the reference, and what GPUs and TPUs run).

`'auto'` (`auto_impl`) picks per call from the platform, dtype and static shape: on CPU `'onednn'`
where the extension is loaded and supports the dtype; otherwise, logged once with the reason, the
fastest pure-XLA formulation measured for that shape: in 3D `'stacked'` up to 4³ voxels per
sample, `'taps2d'` up to 64³, XLA's own above (memory: the rewrites' transient copies of 128³ maps
cost more memory than they save time); in 2D XLA's own convolution (which beat the rewrites at
every 2D shape measured). Off CPU always `'xla'`.

The only difference between formulations is float summation order (tests: ~1e-6 relative in
float32); parameters and checkpoints are the same whatever runs them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.ops import onednn

__all__ = [
    "conv3_same",
    "conv3_s2",
    "conv3_xla",
    "conv3_s2_xla",
    "conv3_s2d",
    "conv3_taps2d",
    "conv3_stacked",
    "conv3_wstacked",
    "auto_impl",
    "resolve_impl",
    "check_onednn",
    "CONV_IMPLS",
]

CONV_IMPLS = ("auto", "onednn", "taps2d", "stacked", "wstacked", "xla")

# Without oneDNN, `auto` uses the stacked formulation up to this many voxels per sample (3D);
# above it the batched 2D taps (benchmarks/results/layers.md).
_AUTO_MAX_STACKED_VOXELS = 4**3
# Above it `auto` without oneDNN runs the plain XLA convolution (memory; module docstring).
_AUTO_MAX_REWRITE_VOXELS = 64**3
# Above it, the forward of inputs with at most this many channels still uses the stacked matmuls
# (2x40³ 4->8: 24 vs 67 ms, benchmarks/results/layers.md).
_FEW_CHANNELS = 4


def _dimension_numbers(n: int):
    return ("NHWC", "HWIO", "NHWC") if n == 2 else ("NDHWC", "DHWIO", "NDHWC")


def conv3_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """Reference: `lax.conv_general_dilated` SAME stride 1 (what `nnx.Conv` computes).

    Args:
      x: `[B, *spatial, Cin]` (n = 2 or 3 spatial axes).
      w: `(3,) * n + (Cin, Cout)`, same dtype as `x`.

    Returns:
      `[B, *spatial, Cout]`, dtype of `x`.
    """
    n = x.ndim - 2
    return lax.conv_general_dilated(x, w, (1,) * n, "SAME", dimension_numbers=_dimension_numbers(n))


def _wstacked_forward(x: jax.Array, w: jax.Array) -> jax.Array:
    """The 3 last-axis shifts stacked along channels + one `3x..x3x1` conv (= `conv3_xla`)."""
    n = x.ndim - 2
    last = x.shape[-2]
    xp = jnp.pad(x, [(0, 0)] * n + [(1, 1), (0, 0)])
    x3 = jnp.concatenate([xp[..., c : c + last, :] for c in range(3)], axis=-1)
    w3 = w.reshape((3,) * (n - 1) + (1, 3 * w.shape[-2], w.shape[-1]))
    return lax.conv_general_dilated(
        x3, w3, (1,) * n, [(1, 1)] * (n - 1) + [(0, 0)], dimension_numbers=_dimension_numbers(n)
    )


@jax.custom_vjp
def conv3_wstacked(x: jax.Array, w: jax.Array) -> jax.Array:
    """`conv3_xla(x, w)`; its gradients are those of `_wstacked_forward` (module docstring).

    The forward pass is XLA's plain convolution (the W-stacked one measured no faster), except
    for inputs of <= `_FEW_CHANNELS` channels (the first layer), whose forward the 9-shift
    `_stacked_forward` runs ~3x faster; the backward pass differentiates the W-stacked
    formulation, whose input and kernel gradients XLA runs faster. Same shapes and dtypes as
    `conv3_xla`.
    """
    return _wstacked_primal(x, w)


def _wstacked_primal(x, w):
    if x.shape[-1] <= _FEW_CHANNELS:
        return _stacked_forward(x, w)
    return conv3_xla(x, w)


def _wstacked_fwd(x, w):
    return _wstacked_primal(x, w), (x, w)


def _wstacked_bwd(res, dy):
    x, w = res
    return jax.vjp(_wstacked_forward, x, w)[1](dy.astype(x.dtype))


conv3_wstacked.defvjp(_wstacked_fwd, _wstacked_bwd)


def _stack_shifts(x: jax.Array) -> jax.Array:
    """`[B, S0, *rest, C]` -> `[B, S0 + 2, *rest, 3^(n-1) C]`: x zero-padded by 1 on every spatial
    axis, with its 3^(n-1) shifts along the `rest` axes stacked (tap-major) along channels."""
    n = x.ndim - 2
    rest = x.shape[2:-1]
    xp = jnp.pad(x, [(0, 0)] + [(1, 1)] * n + [(0, 0)])
    if n == 2:
        (w_,) = rest
        parts = [xp[:, :, c : c + w_] for c in range(3)]
    else:
        h_, w_ = rest
        parts = [xp[:, :, b : b + h_, c : c + w_] for b in range(3) for c in range(3)]
    return jnp.concatenate(parts, axis=-1)


def _stacked_forward(x: jax.Array, w: jax.Array) -> jax.Array:
    """Sum over the first axis' 3 taps of one matmul each on the stacked shifts."""
    d = x.shape[1]
    xs = _stack_shifts(x)
    ws = w.reshape(3, -1, w.shape[-1])  # [3, 3^(n-1) Cin, Cout], tap-major like xs
    y = jnp.einsum("b...k,ko->b...o", xs[:, 0:d], ws[0])
    for a in (1, 2):
        y = y + jnp.einsum("b...k,ko->b...o", xs[:, a : a + d], ws[a])
    return y.astype(x.dtype)


def _transpose_kernel(w: jax.Array) -> jax.Array:
    """Kernel of the input gradient: spatially flipped, in/out swapped."""
    n = w.ndim - 2
    return jnp.swapaxes(w[(slice(None, None, -1),) * n], -1, -2)


@jax.custom_vjp
def conv3_stacked(x: jax.Array, w: jax.Array) -> jax.Array:
    """`conv3_xla(x, w)` computed as stacked shifts + matmuls (module docstring); same shapes."""
    return _stacked_forward(x, w)


def _stacked_fwd(x, w):
    return _stacked_forward(x, w), (x, w)


def _stacked_bwd(res, dy):
    x, w = res
    d = x.shape[1]
    dx = _stacked_forward(dy.astype(x.dtype), _transpose_kernel(w))
    xs = _stack_shifts(x)
    dy = dy.astype(x.dtype)
    # Float32 accumulation over every voxel (what XLA's conv dW does for bf16 on CPU too).
    dws = [
        jnp.einsum("b...k,b...o->ko", xs[:, a : a + d], dy, preferred_element_type=jnp.float32)
        for a in range(3)
    ]
    dw = jnp.stack(dws).reshape(w.shape).astype(w.dtype)
    return dx, dw


conv3_stacked.defvjp(_stacked_fwd, _stacked_bwd)


def _conv2d(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_dimension_numbers(2))


def _taps2d_forward(x: jax.Array, w: jax.Array) -> jax.Array:
    """`sum_a conv2d(x_pad[:, a : a + D], w[a])`, the depth axis folded into the batch."""
    b, d, h, w_, c = x.shape
    xp = jnp.pad(x, [(0, 0), (1, 1), (0, 0), (0, 0), (0, 0)])
    y = sum(_conv2d(xp[:, a : a + d].reshape(b * d, h, w_, c), w[a]) for a in range(3))
    return y.reshape(b, d, h, w_, w.shape[-1]).astype(x.dtype)


@jax.custom_vjp
def conv3_taps2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """`conv3_xla(x, w)` in 3D as 3 batched 2D convolutions (module docstring); same shapes.

    The custom gradient keeps only `x` and `w` for the backward pass (autodiff would store the
    three shifted copies of `x`): dX is the same formulation with the flipped, in/out-swapped
    kernel, dW[a] the kernel gradient of tap a's 2D convolution.
    """
    return _taps2d_forward(x, w)


def _taps2d_fwd(x, w):
    return _taps2d_forward(x, w), (x, w)


def _taps2d_bwd(res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    b, d, h, w_, c = x.shape
    dx = _taps2d_forward(dy, _transpose_kernel(w))
    xp = jnp.pad(x, [(0, 0), (1, 1), (0, 0), (0, 0), (0, 0)])
    dy2 = dy.reshape(b * d, h, w_, dy.shape[-1])
    dw = jnp.stack(
        [
            jax.vjp(lambda k, a=a: _conv2d(xp[:, a : a + d].reshape(b * d, h, w_, c), k), w[a])[1](
                dy2
            )[0]
            for a in range(3)
        ]
    )
    return dx, dw.astype(w.dtype)


conv3_taps2d.defvjp(_taps2d_fwd, _taps2d_bwd)


def _fallback_impl(x_shape: tuple[int, ...]) -> str:
    """The fastest pure-XLA formulation measured for an input of static shape `x_shape`."""
    if len(x_shape) != 5:
        return "xla"  # 2D: XLA's own convolution beat the rewrites at every shape measured
    voxels = 1
    for s in x_shape[1:-1]:
        voxels *= int(s)
    if voxels <= _AUTO_MAX_STACKED_VOXELS:
        return "stacked"
    return "taps2d" if voxels <= _AUTO_MAX_REWRITE_VOXELS else "xla"


def auto_impl(x_shape: tuple[int, ...], platform: str | None = None, dtype=jnp.float32) -> str:
    """The formulation `impl='auto'` uses for an input of static shape `x_shape` and `dtype` on
    `platform` (None: JAX's default backend): `'xla'` off CPU (GPU and TPU keep their vendor
    kernels); on CPU `'onednn'` where the extension supports `dtype`, else the pure-XLA
    formulation measured fastest for the shape (module docstring), logging once why."""
    if (platform or jax.default_backend()) != "cpu":
        return "xla"
    if onednn.supports(dtype):
        return "onednn"
    if onednn.available():
        name = jnp.dtype(dtype).name
        onednn.warn_fallback_once(
            f"{name} convolutions", reason=f"oneDNN has no {name} kernels for this CPU"
        )
    else:
        onednn.warn_fallback_once("config.model.conv_impl='auto'")
    return _fallback_impl(x_shape)


def check_onednn(dtype=jnp.float32, platform: str | None = None) -> None:
    """Raises `ConfigError` (naming config.model.conv_impl and why) unless oneDNN convolutions
    can run `dtype` on `platform` (None: JAX's default backend)."""
    platform = platform or jax.default_backend()
    if platform != "cpu":
        why = f"they run on CPU only, and this run's backend is {platform}"
    elif onednn.supports(dtype):
        return
    else:
        why = onednn.unavailable_reason() or f"no oneDNN {jnp.dtype(dtype).name} kernels here"
    raise ConfigError(
        f"config.model.conv_impl='onednn': oneDNN convolutions cannot run here ({why}). "
        "Use 'auto' (falls back to the XLA path) or 'xla'."
    )


def resolve_impl(impl: str, x: jax.Array) -> str:
    """`impl` with `'auto'` resolved for `x` (`auto_impl`); `'onednn'` checked to be usable.

    Raises:
      ConfigError: an unknown `impl`, or `'onednn'` where the extension is not loaded, does not
        run `x`'s dtype, or the backend is not a CPU (the message says why).
    """
    if impl not in CONV_IMPLS:
        raise ConfigError(f"config.model.conv_impl={impl!r}: expected one of {CONV_IMPLS}.")
    if impl == "auto":
        return auto_impl(x.shape, dtype=x.dtype)
    if impl == "onednn":
        check_onednn(x.dtype)
    return impl


def conv3_same(x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
    """3x..x3 stride-1 SAME convolution without bias, exactly `nnx.Conv`'s (cross-correlation).

    Args:
      x: `[B, *spatial, Cin]` with 2 or 3 spatial axes, floating point.
      w: `(3,) * n + (Cin, Cout)`, the dtype of `x` (cast both before calling).
      impl: one of `CONV_IMPLS` (module docstring); `'taps2d'` in 2D is XLA's own convolution.

    Returns:
      `[B, *spatial, Cout]`, dtype of `x`.
    """
    n = x.ndim - 2
    if n not in (2, 3) or w.shape != (3,) * n + (x.shape[-1], w.shape[-1]):
        raise ConfigError(
            f"conv3_same expects x [B, *spatial, C] with 2 or 3 spatial axes and a kernel "
            f"(3,)*n + (C, O); got {x.shape} and {w.shape}."
        )
    impl = resolve_impl(impl, x)
    if impl == "onednn":
        return onednn.conv(x, w)
    if impl == "taps2d" and n == 2:
        impl = "xla"
    fn = {
        "taps2d": conv3_taps2d,
        "stacked": conv3_stacked,
        "wstacked": conv3_wstacked,
        "xla": conv3_xla,
    }[impl]
    return fn(x, w)


def conv3_s2_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """Reference: 3x..x3 stride-2 SAME convolution, `lax.conv_general_dilated` (= `nnx.Conv(...,
    strides=2, padding='SAME')`). x `[B, *spatial, Cin]`, w `(3,) * n + (Cin, Cout)` ->
    `[B, *ceil(spatial / 2), Cout]`."""
    n = x.ndim - 2
    return lax.conv_general_dilated(x, w, (2,) * n, "SAME", dimension_numbers=_dimension_numbers(n))


def conv3_s2d(x: jax.Array, w: jax.Array) -> jax.Array:
    """`conv3_s2_xla(x, w)` exactly, as space-to-depth + a stride-1 2x..x2 convolution.

    Why: XLA:CPU differentiates a stride-2 convolution wrt its input as an lhs-dilated
    convolution at ~1 GFLOP/s (cpu_measurements.md section 3: half of a whole training step);
    after space-to-depth every pass is a stride-1 convolution. For an even axis SAME pads (0, 1)
    and window i covers voxels 2i..2i+2; an odd axis is first padded by one zero voxel at the low
    end, which reproduces SAME's (1, 1) there. The 3-tap kernel is zero-padded to 4 taps and cut
    into 2 blocks of 2 per axis, so block-tap a, sub-position p holds kernel tap 2a + p.

    Args:
      x: `[B, *spatial, Cin]`, 2 or 3 spatial axes of any size >= 1.
      w: `(3,) * n + (Cin, Cout)`, dtype of `x`.

    Returns:
      `[B, *ceil(spatial / 2), Cout]`, dtype of `x`.
    """
    n = x.ndim - 2
    b, *spatial, c = x.shape
    lows = [s % 2 for s in spatial]
    x = jnp.pad(x, [(0, 0)] + [(lo, 0) for lo in lows] + [(0, 0)])
    halves = [(s + lo) // 2 for s, lo in zip(spatial, lows)]
    # [B, h0, 2, h1, 2, (h2, 2,) C] -> [B, h0, h1, (h2,) 2, 2, (2,) C] -> [B, *halves, 2^n C]
    x = x.reshape(b, *[v for h in halves for v in (h, 2)], c)
    perm = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n]
    x = x.transpose(perm).reshape(b, *halves, (2**n) * c)
    cout = w.shape[-1]
    wp = jnp.pad(w, [(0, 1)] * n + [(0, 0), (0, 0)])  # taps 0..3, tap 3 = 0
    wp = wp.reshape(*[v for _ in range(n) for v in (2, 2)], c, cout)  # (a0, p0, a1, p1, .., C, O)
    perm = [2 * i for i in range(n)] + [2 * i + 1 for i in range(n)] + [2 * n, 2 * n + 1]
    wp = wp.transpose(perm).reshape(*(2,) * n, (2**n) * c, cout)
    return lax.conv_general_dilated(
        x, wp, (1,) * n, [(0, 1)] * n, dimension_numbers=_dimension_numbers(n)
    )


def conv3_s2(x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
    """3x..x3 stride-2 SAME convolution without bias (= `conv3_s2_xla`), `impl` as in
    `conv3_same`: `'onednn'` (and `'auto'` where oneDNN runs) oneDNN's strided convolution,
    `'xla'` XLA's, everything else the exact space-to-depth rewrite `conv3_s2d` (also where
    `'auto'` falls back to XLA for a stride-1 conv: XLA's stride-2 input gradient is the slow
    one, cpu_measurements.md section 3).

    Args:
      x: `[B, *spatial, Cin]`, 2 or 3 spatial axes of any size >= 1.
      w: `(3,) * n + (Cin, Cout)`, dtype of `x`.

    Returns:
      `[B, *ceil(spatial / 2), Cout]`, dtype of `x`.
    """
    if impl == "xla":
        return conv3_s2_xla(x, w)
    if resolve_impl(impl, x) == "onednn":
        return onednn.conv(x, w, strides=(2,) * (x.ndim - 2))
    return conv3_s2d(x, w)
