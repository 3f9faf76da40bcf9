"""2D / 3D U-Net encoder and decoder (Taleb et al., NeurIPS 2020; original `models/unet3d.py`,
and `models/unet.py` for the 2D baselines).

Every module takes `spatial_dims` (3 by default: volumes `[B, D, H, W, C]`, the paper's setting;
2: images `[B, H, W, C]`, same architecture with 3x3 convs, 2x2 pools and 2x2 up-convs). The
parameter tree is the same in both cases (only kernel ranks differ), and the 3D tree is unchanged
from the 3D-only version, so old checkpoints restore.

Encoder (`downconv_model_3d`, spec section 1.4): for each width f in (16, 32, 64, 128):
ConvBlock(f) -> keep as skip -> 2x2x2 max-pool; then a bottom ConvBlock(256). Decoder
(`upconv_model_3d`, spec section 3.3): for each level from deep to shallow: 2x2x2 stride-2
transposed conv to that level's width -> concat with the skip -> ConvBlock; a final 1x1x1 conv gives
per-voxel class logits.

Deviations from the original:
  * The original's extra max-pool after the bottom block is DROPPED. It turns a 2^3 bottom into
    1^3 for 39^3 / 32^3 patches but breaks (empty tensors) below 32^3 patches; pretext heads
    use `global_max_pool` over the bottom features instead, which equals that max-pool wherever the
    original worked with a 2^3 bottom. Consequently the decoder starts directly from the bottom
    block's output; the original's parameter-free UpSampling3D that undid the extra pool is gone.
  * Max-pooling uses ceil ("SAME") output sizes instead of floor, so every input of >= 1 voxel
    per axis works (odd sizes, non-cubic, patches like 13^3 / 18^3 / 39^3, whole volumes). The
    decoder crops each upsampled tensor (which can then be 1 voxel larger) to its skip's shape;
    the output always has the input's spatial shape.
  * GroupNorm instead of BatchNorm (see `layers.py`), logits instead of a softmax output.
  * Transposed convs are the exact einsum + depth-to-space rewrite `UpConv2` (XLA:CPU speed).

Options that are not the paper's architecture or arithmetic: `conv_impl` (how the convolutions
are computed: oneDNN on CPU, XLA, or a pure-XLA rewrite, `ssl3d_jax/ops/conv.py`: same
parameters and results, speed only) and
`downsample='conv'` (an nnU-Net-style learned stride-2 conv block, `layers.DownConv`, instead of
the paper's max-pool; extra parameters `encoder.pool{i}`; the default is 'max_pool').

Precision and memory (`config.model.compute_dtype`, `config.model.remat`): every module takes
`dtype` (compute dtype; parameters are float32 whatever it is, see `layers.py`) and `remat`. With
`remat=True` each encoder block, and each decoder level (up-conv, crop, concat and block), is
wrapped in `nnx.remat` (`jax.checkpoint`, nothing saved inside): the backward pass recomputes the
block's convolutions and norms from the block's input instead of storing every intermediate
activation. Only block inputs / outputs (the skips among them) stay live between the forward and
the backward pass, which is what lets 128³ inputs fit, for one extra forward pass of compute
(benchmarks/remat_memory.md). XLA:CPU undoes remat unless compiled with
`train.step.CPU_COMPILER_OPTIONS`, which `step.jit_train_step` passes. Logits of
`SegmentationModel` are float32 in either case.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.layers import (
    DOWNSAMPLES,
    ConvBlock,
    DownConv,
    UpConv2,
    check_spatial_dims,
    max_pool2,
)

__all__ = [
    "Encoder3D",
    "Encoder",
    "UNetDecoder",
    "SegmentationModel",
    "global_max_pool",
    "flatten_features",
]


def global_max_pool(x: jax.Array) -> jax.Array:
    """Max over all spatial positions: `[B, *spatial, F]` -> `[B, F]` (any number of spatial axes).

    Generalises the original's final 2x2x2 max-pool of a 2^3 bottom (giving 1^3 x F) to any bottom
    size.
    """
    return jnp.max(x, axis=tuple(range(1, x.ndim - 1)))


def flatten_features(x: jax.Array) -> jax.Array:
    """Flattens everything but the batch axis: `[B, *spatial, F]` -> `[B, prod(spatial) * F]`.

    The original's `Flatten()` over the encoder's bottom (e.g. for CPC / Exemplar embeddings); only
    meaningful when the bottom's spatial size is fixed by the patch size.
    """
    return x.reshape(x.shape[0], -1)


def _check_rank(x: jax.Array, spatial_dims: int, name: str) -> None:
    if x.ndim != spatial_dims + 2:
        raise ConfigError(
            f"{name}(spatial_dims={spatial_dims}) expects [B, *spatial, C] of rank "
            f"{spatial_dims + 2}, got shape {x.shape}."
        )


class Encoder3D(nnx.Module):
    """U-Net contracting path, 3D (default) or 2D. Also exported as `Encoder`.

    Args:
      in_channels: input channels C.
      spatial_dims: 3 (volumes, default) or 2 (images); exposed as `self.spatial_dims`.
      filters: widths of the pooled levels (paper: 16, 32, 64, 128).
      bottom_filters: width of the bottom block (paper: 256).
      num_groups: GroupNorm groups per block.
      dropout_rate: element-wise dropout inside every block (original: 0.5).
      dtype: compute dtype (None / `jnp.float32`, or `jnp.bfloat16`); params stay float32.
      remat: rematerialise each block in the backward pass (see the module docstring).
      conv_impl: how the convolutions are computed (`ConvBlock`; 'xla' default, 'auto',
        'onednn', 'taps2d', 'stacked', 'wstacked'): same parameters and results, speed only.
      downsample: 'max_pool' (the paper, default) or 'conv' (not the paper: nnU-Net-style
        stride-2 conv + GroupNorm + ReLU per level, `layers.DownConv`, parameters `pool{i}`).
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `x [B, D, H, W, C]` float -> `(features, skips)` in `dtype`: `features [B, d, h, w,
      bottom_filters]` with `d = D` ceil-halved `len(filters)` times, `skips` a tuple shallow ->
      deep, `skips[i]: [B, D_i, H_i, W_i, filters[i]]` with `D_0 = D`. In 2D the same without the
      D axis: `x [B, H, W, C]` -> `features [B, h, w, bottom_filters]`.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        spatial_dims: int = 3,
        filters: Sequence[int] = (16, 32, 64, 128),
        bottom_filters: int = 256,
        num_groups: int = 8,
        dropout_rate: float = 0.0,
        dtype=None,
        remat: bool = False,
        conv_impl: str = "xla",
        downsample: str = "max_pool",
        rngs: nnx.Rngs,
    ):
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.filters = tuple(int(f) for f in filters)
        self.bottom_filters = int(bottom_filters)
        self.remat = bool(remat)
        block_kwargs = dict(
            num_groups=num_groups,
            dropout_rate=dropout_rate,
            spatial_dims=self.spatial_dims,
            dtype=dtype,
            conv_impl=conv_impl,
        )
        cin = in_channels
        # Named attributes (down0, down1, ...) rather than a list: the pure param dict then has
        # string keys only (params['encoder']['down0']['conv1']['kernel']), clean for orbax.
        for i, f in enumerate(self.filters):
            setattr(self, f"down{i}", ConvBlock(cin, f, **block_kwargs, rngs=rngs))
            cin = f
        if downsample not in DOWNSAMPLES:
            raise ConfigError(
                f"config.model.downsample={downsample!r}: expected one of {DOWNSAMPLES}."
            )
        self.downsample = downsample
        if downsample == "conv":  # pool0, pool1, ...: learned stride-2 downsampling per level
            for i, f in enumerate(self.filters):
                pool = DownConv(
                    f,
                    num_groups=num_groups,
                    spatial_dims=self.spatial_dims,
                    dtype=dtype,
                    conv_impl=conv_impl,
                    rngs=rngs,
                )
                setattr(self, f"pool{i}", pool)
        self.bottom = ConvBlock(cin, self.bottom_filters, **block_kwargs, rngs=rngs)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        _check_rank(x, self.spatial_dims, "Encoder3D")

        def block(module, x, rngs):
            return module(x, train=train, rngs=rngs)

        if self.remat:
            # graph_updates=False: jax.checkpoint over the split state without writing graph
            # changes back; the default path refuses a model whose params are concrete arrays
            # closed over by an outer jit ("Cannot mutate Param from a different trace level").
            block = nnx.remat(block, graph_updates=False)
        skips = []
        for i in range(len(self.filters)):
            x = block(getattr(self, f"down{i}"), x, rngs)
            skips.append(x)
            if self.downsample == "conv":
                x = block(getattr(self, f"pool{i}"), x, rngs)
            else:
                x = max_pool2(x)
        # Deviation from original: no max-pool after the bottom block (see module docstring).
        x = block(self.bottom, x, rngs)
        return x, tuple(skips)


class UNetDecoder(nnx.Module):
    """U-Net expanding path with a 1x1x1 (1x1 in 2D) classification conv.

    Args:
      spatial_dims: 3 (volumes, default) or 2 (images).
      filters: the encoder's level widths, shallow -> deep (paper: 16, 32, 64, 128).
      bottom_filters: the encoder's bottom width (paper: 256).
      num_classes: output channels (logits).
      num_groups: GroupNorm groups per block.
      dropout_rate: element-wise dropout inside every block (original decoder: 0.5).
      dtype: compute dtype (None / `jnp.float32`, or `jnp.bfloat16`); params stay float32.
      remat: rematerialise each level (up-conv, concat, block) in the backward pass.
      conv_impl: as in `Encoder3D`.
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `features [B, d, h, w, bottom_filters]`, `skips` as returned by `Encoder3D` ->
      logits `[B, D, H, W, num_classes]` float32 at the resolution of `skips[0]` (the input's);
      in 2D `[B, H, W, num_classes]`.
    """

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        filters: Sequence[int] = (16, 32, 64, 128),
        bottom_filters: int = 256,
        num_classes: int,
        num_groups: int = 8,
        dropout_rate: float = 0.0,
        dtype=None,
        remat: bool = False,
        conv_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        n = self.spatial_dims = check_spatial_dims(spatial_dims)
        self.filters = tuple(int(f) for f in filters)
        self.remat = bool(remat)
        block_kwargs = dict(
            num_groups=num_groups,
            dropout_rate=dropout_rate,
            spatial_dims=n,
            dtype=dtype,
            conv_impl=conv_impl,
        )
        cin = int(bottom_filters)
        for i in reversed(range(len(self.filters))):
            f = self.filters[i]
            setattr(
                self,
                f"up{i}",
                UpConv2(cin, f, spatial_dims=n, dtype=dtype, conv_impl=conv_impl, rngs=rngs),
            )
            setattr(self, f"block{i}", ConvBlock(2 * f, f, **block_kwargs, rngs=rngs))
            cin = f
        # Applied in `__call__` as a matmul over channels (a 1x1 conv is one); the module only
        # holds its parameters (kernel `(1,) * n + (cin, K)`, bias `(K,)`).
        self.classifier = nnx.Conv(
            cin, num_classes, kernel_size=(1,) * n, param_dtype=jnp.float32, rngs=rngs
        )

    def __call__(
        self,
        features: jax.Array,
        skips: Sequence[jax.Array],
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        _check_rank(features, self.spatial_dims, "UNetDecoder")

        def level(up, block, x, skip, rngs):
            x = up(x)
            # Ceil pooling makes the upsampled tensor up to 1 voxel larger than the skip on odd
            # axes; the surplus is at the high end (where max_pool2 padded), so crop it there.
            x = x[(slice(None), *(slice(0, s) for s in skip.shape[1:-1]))]
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            return block(x, train=train, rngs=rngs)

        if self.remat:
            level = nnx.remat(level, graph_updates=False)  # as in Encoder3D
        x = features
        for i in reversed(range(len(self.filters))):
            x = level(getattr(self, f"up{i}"), getattr(self, f"block{i}"), x, skips[i], rngs)
        # The 1x1 conv in the compute dtype (forward and backward), then float32 logits: the bias
        # is added in float32 (its gradient sums float32 cotangents over every voxel) and
        # softmax, Dice and argmax read float32.
        kernel = self.classifier.kernel[...]
        kernel = kernel.reshape(kernel.shape[-2], kernel.shape[-1]).astype(x.dtype)
        logits = jnp.einsum("...c,ck->...k", x, kernel)
        return logits.astype(jnp.float32) + self.classifier.bias[...]


class SegmentationModel(nnx.Module):
    """Encoder3D + UNetDecoder (the finetuning model), 3D (default) or 2D (`spatial_dims=2`).

    The attribute name `encoder` is part of the checkpoint contract: finetuning restores
    `params['encoder']` from a pretraining checkpoint.

    Keyword arguments other than `spatial_dims`, `downsample` and `rngs` are those the encoder
    and the decoder both take, with their defaults (`Encoder3D`: filters, bottom_filters,
    num_groups, dropout_rate, dtype (compute dtype), remat, conv_impl); `downsample` goes to the
    encoder only.

    Call:
      `x [B, *spatial, in_channels]` -> logits `[B, *spatial, num_classes]` float32, spatial =
      (D, H, W) or (H, W).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 3,
        downsample: str = "max_pool",
        rngs: nnx.Rngs,
        **kwargs,
    ):
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.encoder = Encoder3D(
            in_channels, spatial_dims=self.spatial_dims, downsample=downsample, rngs=rngs, **kwargs
        )
        self.decoder = UNetDecoder(
            spatial_dims=self.spatial_dims, num_classes=num_classes, rngs=rngs, **kwargs
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        features, skips = self.encoder(x, train=train, rngs=rngs)
        return self.decoder(features, skips, train=train, rngs=rngs)


# Dimension-neutral name for new code; `Encoder3D` stays the canonical (checkpointed) class name.
Encoder = Encoder3D
