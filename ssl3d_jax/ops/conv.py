"""Fast exact 3x..x3 stride-1 SAME convolution for XLA:CPU (issue 6, item 2).

Why: XLA:CPU runs small 3D convolutions far below its matmul speed. At the shapes our U-Nets see
(few channels, 5³–40³ voxels, batch 2–16) a `lax.conv_general_dilated` forward, and above all its
kernel gradient (dW), costs several times what the same FLOPs cost as a matmul
(benchmarks/results/layers.md). `conv3_same` computes exactly the same convolution as
`lax.conv_general_dilated(x, w, (1,) * n, 'SAME')` (cross-correlation, no bias) with a
`jax.custom_vjp` whose forward, input gradient and kernel gradient each use a "partial im2col"
formulation:

  * the zero-padded input's 3^(n-1) shifts along the LAST n-1 spatial axes are stacked along the
    channel axis (`[B, D+2, H, W, 3^(n-1) C]`; 9x the input's memory in 3D, 3x in 2D);
  * the output is then the sum over the 3 taps of the FIRST spatial axis of one matmul each
    (contraction length 3^(n-1) C): `y = sum_a xs[:, a:a+D] @ w[a]`;
  * dX is the same operation on the output cotangent with the spatially flipped, in/out-swapped
    kernel (a SAME stride-1 conv's transpose for an odd kernel is again one);
  * dW[a] = xs[:, a:a+D]^T @ dy, 3 matmuls contracting over every voxel.

On larger feature maps (above `_AUTO_MAX_VOXELS`) the stacked matmuls lose to XLA's convolution,
but a lighter variant still wins in the backward pass: `conv3_wstacked` runs XLA's convolution
forward, and for its gradients differentiates the equivalent "3 shifts along the LAST spatial axis
stacked along channels (3x the input's memory) + one `3x..x3x1` convolution over 3C channels".
That input gradient measured 2-3x faster than the plain convolution's and the kernel gradient
10-30 % faster (benchmarks/results/layers.md); its forward was no faster, hence the plain one
(or, for <= 4 input channels, the 9-shift matmuls, ~3x faster there).

The only difference from the XLA convolution is float summation order (tests: ~1e-6 relative in
float32). `impl='xla'` keeps the plain `lax.conv_general_dilated` (the reference, and the fall
back for layers where the rewrite does not win); `impl='auto'` picks per call from the static
shape (see `auto_impl`).

Memory: the stacked copies are transient, but on large maps they raise the step's peak. At the
paper's 2 x 128³ segmentation step, 'wstacked' on the 128³ level took the XLA:CPU scratch from
5.2 to 9.5 GiB (benchmarks/remat_memory.py), so `auto` keeps XLA's convolution above
`_AUTO_MAX_WSTACKED_VOXELS` (64³ per sample), where a map's 3x copy would cost more memory than
it saves time on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ssl3d_jax.errors import ConfigError

__all__ = [
    "conv3_same",
    "conv3_xla",
    "conv3_stacked",
    "conv3_wstacked",
    "auto_impl",
    "CONV_IMPLS",
]

CONV_IMPLS = ("auto", "stacked", "wstacked", "xla")

# `auto` uses the stacked formulation up to this many voxels per sample and channel product;
# above it the XLA convolution's forward is competitive (benchmarks/results/layers.md).
_AUTO_MAX_VOXELS = 16**3
# Above it `auto` runs the plain XLA convolution (memory; module docstring).
_AUTO_MAX_WSTACKED_VOXELS = 64**3
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


def auto_impl(x_shape: tuple[int, ...], platform: str | None = None) -> str:
    """The formulation `impl='auto'` uses for an input of static shape `x_shape` on `platform`
    (None: JAX's default backend). The rewrites were measured on XLA:CPU only; GPU and TPU keep
    their vendor convolution kernels (`'xla'`)."""
    if (platform or jax.default_backend()) != "cpu":
        return "xla"
    voxels = 1
    for s in x_shape[1:-1]:
        voxels *= int(s)
    if voxels <= _AUTO_MAX_VOXELS:
        return "stacked"
    return "wstacked" if voxels <= _AUTO_MAX_WSTACKED_VOXELS else "xla"


def conv3_same(x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
    """3x..x3 stride-1 SAME convolution without bias, exactly `nnx.Conv`'s (cross-correlation).

    Args:
      x: `[B, *spatial, Cin]` with 2 or 3 spatial axes, floating point.
      w: `(3,) * n + (Cin, Cout)`, the dtype of `x` (cast both before calling).
      impl: `'auto'` (by static shape, `auto_impl`), `'stacked'` (shifts + matmuls with its own
        gradient), `'wstacked'` (last-axis shifts + one conv) or `'xla'`
        (`lax.conv_general_dilated`).

    Returns:
      `[B, *spatial, Cout]`, dtype of `x`.
    """
    if impl not in CONV_IMPLS:
        raise ConfigError(f"config.model.conv_impl={impl!r}: expected one of {CONV_IMPLS}.")
    n = x.ndim - 2
    if n not in (2, 3) or w.shape != (3,) * n + (x.shape[-1], w.shape[-1]):
        raise ConfigError(
            f"conv3_same expects x [B, *spatial, C] with 2 or 3 spatial axes and a kernel "
            f"(3,)*n + (C, O); got {x.shape} and {w.shape}."
        )
    if impl == "auto":
        impl = auto_impl(x.shape)
    fn = {"stacked": conv3_stacked, "wstacked": conv3_wstacked, "xla": conv3_xla}[impl]
    return fn(x, w)


def conv3_s2_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """Reference: 3x..x3 stride-2 SAME convolution, `lax.conv_general_dilated` (= `nnx.Conv(...,
    strides=2, padding='SAME')`). x `[B, *spatial, Cin]`, w `(3,) * n + (Cin, Cout)` ->
    `[B, *ceil(spatial / 2), Cout]`."""
    n = x.ndim - 2
    return lax.conv_general_dilated(x, w, (2,) * n, "SAME", dimension_numbers=_dimension_numbers(n))


def conv3_s2(x: jax.Array, w: jax.Array) -> jax.Array:
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
