"""Building blocks of the 2D / 3D U-Net (Taleb et al., NeurIPS 2020; original `models/unet3d.py`
and, for 2D, `models/unet.py`).

Everything is channels-last: `[B, D, H, W, C]` in 3D, `[B, H, W, C]` in 2D. Modules take
`spatial_dims` (3 by default, the paper's setting; 2 for the original's 2D baselines) and build
kernels of that rank; `max_pool2` reads it from its input's rank.

* `max_pool2`: 2x..x2 stride-2 max-pool with ceil output size ("SAME"-style), as reshape + max.
* `UpConv2`: exact 2x..x2 stride-2 transposed conv (the original's `Conv3DTranspose(f, 2, 2)` /
  `Conv2DTranspose(f, 2, 2)`), computed as one einsum + depth-to-space. XLA:CPU runs
  `ConvTranspose` stride 2 as an lhs-dilated convolution at ~1 GFLOP/s; the rewrite measured 60x
  faster forward and 13x faster forward + backward in 3D (cpu_measurements.md section 3). Same
  parameters, same result. `conv_impl='onednn'` runs oneDNN's transposed convolution instead
  (`ssl3d_jax.ops.onednn.conv_transpose2`; not faster than the einsum at the default shapes).
* `DownConv`: nnU-Net-style learned downsampling (`config.model.downsample='conv'`, not the
  paper's): a 3x..x3 stride-2 SAME conv -> GroupNorm -> ReLU, the conv computed by oneDNN on
  CPU, or exactly as space-to-depth + a stride-1 2x..x2 conv (`ssl3d_jax.ops.conv.conv3_s2`),
  because XLA:CPU runs a stride-2 conv's input gradient at ~1 GFLOP/s.
* `ConvBlock`: the original's "conv3d block" (or 2D "conv block"), two 3x..x3 SAME convolutions.
  With `conv_impl='auto'` (config.model.conv_impl's default) they run through
  `ssl3d_jax.ops.conv.conv3_same`: the same parameters and the same convolution, computed on CPU
  by oneDNN's primitives as FFI custom calls (`ssl3d_jax.ops.onednn`) where the extension is
  built, else by the pure-XLA rewrite XLA:CPU runs fastest for the map's size
  (benchmarks/results/layers.md); on GPU/TPU by XLA's convolution.

Deviation from the original in `ConvBlock` (and the whole library): **GroupNorm instead of
BatchNorm, placed before the ReLU** (the original did Conv+ReLU then BN). GroupNorm carries no
running statistics, so the train step stays a pure function of the params (no mutable batch-stats
collection to thread through jit and checkpoints); it is well-defined for the small 3D batches we
train with; it needs no train/eval mode switch, which removes the original's frozen-BN finetuning
problem (spec section 8, bug list #18); and it computes identical math on any number of devices
(BatchNorm statistics would silently become per-device under data parallelism). Norm before ReLU is
the usual modern ordering (conv -> norm -> nonlinearity).

Precision: every module takes `dtype`, the COMPUTE dtype (None / float32, or bfloat16 for mixed
precision); parameters are always created and stored in float32 (`param_dtype`), so optimizer
state, checkpoints and the restore of a pretrained encoder do not depend on it. With bfloat16,
convolutions and the up-convolution cast their inputs and kernels to bfloat16; GroupNorm computes
its mean and variance (and the normalisation) in float32 and casts the result back (flax's
`_compute_stats` promotes to at least float32), so the statistics of 128³ feature maps are not
summed in an 8-bit mantissa.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.ops import onednn
from ssl3d_jax.ops.conv import CONV_IMPLS, conv3_s2, conv3_same, resolve_impl

__all__ = [
    "max_pool2",
    "UpConv2",
    "ConvBlock",
    "DownConv",
    "DOWNSAMPLES",
    "group_count",
    "check_spatial_dims",
    "COMPUTE_DTYPES",
    "compute_dtype",
    "check_conv_impl",
]

# config.model.compute_dtype -> the dtype modules compute in (parameters stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, key: str = "config.model.compute_dtype"):
    """`'float32'` / `'bfloat16'` -> `jnp.float32` / `jnp.bfloat16` (the modules' `dtype`).

    Raises:
      ConfigError naming `key` for any other value.
    """
    if isinstance(name, str) and name.strip().lower() in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[name.strip().lower()]
    raise ConfigError(f"{key}={name!r}: expected one of {tuple(COMPUTE_DTYPES)}.")


_AXES = "dhw"  # einsum letters of the spatial axes (the last `spatial_dims` of them are used)


def check_spatial_dims(spatial_dims: int) -> int:
    """Returns `spatial_dims` as an int; raises `ConfigError` unless it is 2 or 3."""
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ConfigError(
            f"spatial_dims (config.data.spatial_dims) must be 2 or 3, got {spatial_dims!r}."
        )
    return int(spatial_dims)


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2(x2) max-pool, stride 2, with "SAME"-style (ceil) output size, in 2D or 3D.

    Odd axes are padded with -inf at the high end, so the last window of an odd axis holds just one
    voxel; no axis ever becomes empty, so any input of >= 1 voxel per axis works. Implemented as
    reshape + max, which is exact and much faster on XLA:CPU than `reduce_window`.

    Args:
      x: `[B, *spatial, C]` floating point with 2 (`[B, H, W, C]`) or 3 (`[B, D, H, W, C]`)
        spatial axes; every spatial axis is pooled.

    Returns:
      `[B, *ceil(spatial / 2), C]`, dtype of `x`.
    """
    if x.ndim not in (4, 5):
        raise ConfigError(
            f"max_pool2 expects [B, H, W, C] or [B, D, H, W, C], got shape {x.shape}."
        )
    b, *spatial, c = x.shape
    pads = [(0, 0)] + [(0, s % 2) for s in spatial] + [(0, 0)]
    if any(p[1] for p in pads):
        x = jnp.pad(x, pads, constant_values=jnp.array(-jnp.inf, dtype=x.dtype))
    halves = [(s + 1) // 2 for s in spatial]
    x = x.reshape(b, *[n for h in halves for n in (h, 2)], c)
    return jnp.max(x, axis=tuple(range(2, 2 + 2 * len(spatial), 2)))


class UpConv2(nnx.Module):
    """2x2(x2) stride-2 transposed convolution as einsum + depth-to-space, in 2D or 3D.

    Exactly equals `nnx.ConvTranspose(in_features, out_features, kernel_size=(2,) * n,
    strides=(2,) * n, padding='VALID' or 'SAME')` with the same `kernel` and `bias` (for k = s = 2
    the windows do not overlap and both paddings give a 2x larger output). The parameter layout is
    ConvTranspose's, `kernel (2,) * n + (in, out)` and `bias (out,)`, so checkpoints are
    interchangeable. ConvTranspose (transpose_kernel=False) correlates the zero-dilated input with
    the kernel, which puts kernel tap `(1 - a, 1 - b, ...)` at output sub-position `(a, b, ...)`;
    hence the spatial flip below.

    Args:
      in_features: input channels.
      out_features: output channels.
      spatial_dims: n, 3 (volumes, default) or 2 (images).
      dtype: compute dtype (None: that of the promoted inputs); the parameters stay float32.
      conv_impl: `'onednn'` runs oneDNN's transposed convolution; any other `CONV_IMPLS` value
        the einsum (module docstring).
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      x `[B, *spatial, in]` -> `[B, *(2 * spatial), out]`, `dtype` (or that of the promoted
      inputs).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        spatial_dims: int = 3,
        kernel_init: nnx.Initializer = nnx.initializers.lecun_normal(),
        bias_init: nnx.Initializer = nnx.initializers.zeros_init(),
        dtype=None,
        conv_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.dtype = dtype
        self.conv_impl = check_conv_impl(conv_impl)
        self.out_features = out_features
        self.spatial_dims = check_spatial_dims(spatial_dims)
        shape = (2,) * self.spatial_dims + (in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.spatial_dims
        if x.ndim != n + 2:
            raise ConfigError(
                f"UpConv2(spatial_dims={n}) expects [B, *spatial, C] of rank {n + 2}, got shape "
                f"{x.shape}."
            )
        b, *spatial, _ = x.shape
        kernel = self.kernel[...][(slice(None, None, -1),) * n]
        dtype = self.dtype or jnp.result_type(x, kernel)
        x = x.astype(dtype)
        if self.conv_impl == "onednn" and resolve_impl("onednn", x) == "onednn":
            # Only when forced: at the default model's shapes oneDNN's transposed convolution
            # did not beat the einsum (whole segmentation step within noise, per layer mixed;
            # benchmarks/results/layers.md), so 'auto' keeps the einsum.
            y = onednn.conv_transpose2(x, self.kernel[...].astype(dtype))
        else:
            kernel = kernel.astype(dtype)
            # One matmul: every input voxel emits a 2x..x2 block of output voxels. 3D:
            # "bdhwc,xyzco->bdxhywzo"; 2D: "bhwc,yzco->bhywzo".
            axes, taps = _AXES[-n:], "xyz"[-n:]
            y = jnp.einsum(
                f"b{axes}c,{taps}co->b{''.join(a + t for a, t in zip(axes, taps))}o", x, kernel
            )
            y = y.reshape(b, *(2 * s for s in spatial), self.out_features)
        # The bias is added in float32 (fused, no extra buffer): its gradient then sums float32
        # cotangents over every voxel, where a bfloat16 sum over 128³ voxels would lose most of
        # its digits. The einsum itself (and its transposes) stays in `dtype`.
        return (y.astype(jnp.promote_types(dtype, jnp.float32)) + self.bias[...]).astype(dtype)


def check_conv_impl(conv_impl: str) -> str:
    """Returns `conv_impl` if it names a `conv3_same` formulation, else raises `ConfigError`."""
    if conv_impl not in CONV_IMPLS:
        raise ConfigError(f"config.model.conv_impl={conv_impl!r}: expected one of {CONV_IMPLS}.")
    return conv_impl


def group_count(channels: int, num_groups: int) -> int:
    """GroupNorm group count: `min(num_groups, channels)`, lowered to a divisor of `channels`.

    For the usual power-of-two widths this is exactly `min(num_groups, channels)`; the divisor
    fallback only keeps odd widths (e.g. 12 channels with 8 groups -> 6) from failing.
    """
    g = max(1, min(int(num_groups), int(channels)))
    while channels % g:
        g -= 1
    return g


def _conv3(
    in_channels: int, out_channels: int, *, spatial_dims: int, dtype, rngs: nnx.Rngs, strides=1
) -> nnx.Conv:
    """The bias-free 3 x 3 (x 3) SAME convolution of `ConvBlock` and `DownConv`: He-normal
    kernel, float32 parameters, computed in `dtype`."""
    return nnx.Conv(
        in_channels,
        out_channels,
        # tuple: an int would silently build a 1-D kernel
        kernel_size=(3,) * spatial_dims,
        strides=strides,
        padding="SAME",
        use_bias=False,
        kernel_init=nnx.initializers.he_normal(),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class ConvBlock(nnx.Module):
    """The paper's "conv3d block": 2 x [Conv 3x3x3 SAME -> GroupNorm -> ReLU] (3x3 in 2D).

    Optional element-wise dropout after the first conv/norm/ReLU (the original: Dropout(0.5) after
    the first conv, not spatial). Deviation from the original: GroupNorm instead of BatchNorm and
    norm before ReLU (see the module docstring); convolutions have no bias since the norm's shift
    makes it redundant; He-normal kernel init as in the original (`he_normal`).

    Args:
      in_channels: input channels.
      channels: output channels of both convolutions.
      num_groups: GroupNorm groups, `min(num_groups, channels)` (see `group_count`).
      dropout_rate: element-wise dropout rate after the first conv; 0 disables it.
      spatial_dims: 3 (kernels `(3, 3, 3, in, out)`, default) or 2 (kernels `(3, 3, in, out)`).
      dtype: compute dtype (None: float32 / the input's); parameters stay float32, GroupNorm
        statistics are float32 whatever the compute dtype (see the module docstring).
      conv_impl: how the convolutions are computed (`ssl3d_jax.ops.conv.conv3_same`): `'xla'`
        (`nnx.Conv` as is, the module default), `'auto'` (oneDNN on CPU where built, else by
        feature-map size; what `config.model.conv_impl` defaults to), `'onednn'`, `'taps2d'`,
        `'stacked'` or `'wstacked'`. Same result up to
        float summation order, same parameters.
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `x [B, *spatial, in_channels]`, `train` (static bool: dropout on), `rngs`
      (`nnx.Rngs(dropout=key)`, needed only if `train` and `dropout_rate > 0`) ->
      `[B, *spatial, channels]` in `dtype`, spatial = (D, H, W) or (H, W).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        num_groups: int = 8,
        dropout_rate: float = 0.0,
        spatial_dims: int = 3,
        dtype=None,
        conv_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        groups = group_count(channels, num_groups)
        self.conv_impl = check_conv_impl(conv_impl)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        conv = dict(spatial_dims=self.spatial_dims, dtype=dtype, rngs=rngs)
        norm = dict(num_groups=groups, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.conv1 = _conv3(in_channels, channels, **conv)
        self.norm1 = nnx.GroupNorm(channels, **norm)
        self.conv2 = _conv3(channels, channels, **conv)
        self.norm2 = nnx.GroupNorm(channels, **norm)
        self.dropout_rate = float(dropout_rate)
        # No rngs stored in the module: the dropout key comes at call time, so that the module's
        # state is params only and `nnx.split(model, nnx.Param)` captures all of it.
        self.dropout = nnx.Dropout(self.dropout_rate)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        if x.ndim != self.spatial_dims + 2:
            # A 3D conv would silently treat a [B, H, W, C] batch as one unbatched volume.
            raise ConfigError(
                f"ConvBlock(spatial_dims={self.spatial_dims}) expects [B, *spatial, C] of rank "
                f"{self.spatial_dims + 2}, got shape {x.shape}."
            )
        x = nnx.relu(self.norm1(self._conv(self.conv1, x)))
        if train and self.dropout_rate > 0.0:
            if rngs is None:
                raise ConfigError(
                    "dropout_rate > 0 with train=True needs rngs=nnx.Rngs(dropout=key)."
                )
            x = self.dropout(x, deterministic=False, rngs=rngs)
        return nnx.relu(self.norm2(self._conv(self.conv2, x)))

    def _conv(self, conv: nnx.Conv, x: jax.Array) -> jax.Array:
        """`conv(x)` (SAME, stride 1, no bias) computed as `self.conv_impl` says."""
        if self.conv_impl == "xla":
            return conv(x)
        kernel = conv.kernel[...]
        # nnx.Conv's dtype rule: the compute dtype, else the promoted type of input and kernel.
        dtype = conv.dtype or jnp.result_type(x, kernel)
        return conv3_same(x.astype(dtype), kernel.astype(dtype), impl=self.conv_impl)


# config.model.downsample: the paper's max-pool, or a learned stride-2 conv block (`DownConv`).
DOWNSAMPLES = ("max_pool", "conv")


class DownConv(nnx.Module):
    """Learned 2x downsampling: 3x..x3 stride-2 SAME conv (no bias) -> GroupNorm -> ReLU.

    Not in the paper (which max-pools): the nnU-Net-style alternative, selected by
    `config.model.downsample='conv'`. The parameters are an `nnx.Conv(channels, channels,
    kernel_size=(3,) * n, strides=2, use_bias=False)` (`conv.kernel`) and an `nnx.GroupNorm`
    (`norm`); with `conv_impl='xla'` the conv runs as that `nnx.Conv`, otherwise through
    `conv3_s2` (oneDNN, or the exact space-to-depth rewrite; same result up to float summation
    order).

    Args:
      channels: input and output channels.
      num_groups: GroupNorm groups (see `group_count`).
      spatial_dims: 3 (default) or 2.
      dtype: compute dtype (None: float32); parameters stay float32.
      conv_impl: `'xla'` (nnx.Conv), `'onednn'` / `'auto'` (oneDNN where it runs) or any other
        `CONV_IMPLS` value (space-to-depth).
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `x [B, *spatial, channels]` -> `[B, *ceil(spatial / 2), channels]` in `dtype`; `train` and
      `rngs` are accepted (and ignored) so that it is called like a `ConvBlock`.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_groups: int = 8,
        spatial_dims: int = 3,
        dtype=None,
        conv_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.conv_impl = check_conv_impl(conv_impl)
        self.conv = _conv3(
            channels, channels, spatial_dims=self.spatial_dims, dtype=dtype, rngs=rngs, strides=2
        )
        self.norm = nnx.GroupNorm(
            channels,
            num_groups=group_count(channels, num_groups),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        del train, rngs  # no dropout here
        if x.ndim != self.spatial_dims + 2:
            raise ConfigError(
                f"DownConv(spatial_dims={self.spatial_dims}) expects [B, *spatial, C] of rank "
                f"{self.spatial_dims + 2}, got shape {x.shape}."
            )
        if self.conv_impl == "xla":
            y = self.conv(x)
        else:
            kernel = self.conv.kernel[...]
            dtype = self.conv.dtype or jnp.result_type(x, kernel)
            y = conv3_s2(x.astype(dtype), kernel.astype(dtype), impl=self.conv_impl)
        return nnx.relu(self.norm(y))
