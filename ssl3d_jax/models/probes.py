"""Voxel-level linear probe of a (frozen) encoder: dense linear probing for segmentation.

A linear read-out of the encoder's multi-scale features at every voxel, as in the dense linear
probes of the self-supervised literature: every skip and the bottom features are brought back to
the input resolution, concatenated, and mapped to class logits by ONE 1x1x1 (1x1 in 2D) conv. The
probe measures what the features already encode, so it has no hidden layer and no nonlinearity.

The encoder is the same `Encoder3D` (same keyword arguments, same attribute name `encoder`) as in
`SegmentationModel` and every pretext model, so a pretraining checkpoint's `params['encoder']`
restores into it unchanged. Train the head alone with the generic train step:
`step.make_train_step(graphdef, loss_fn, tx, trainable=("head",))` (no gradient is computed for
the encoder at all); the probe's forward does not stop gradients itself, so training with
`trainable=None` would finetune the encoder too.

Upsampling: nearest neighbour by repetition, i.e. every voxel of level `i` is repeated over the
`2^i`-wide block of input voxels its max-pool window covered, then cropped to the input shape.
This is exact with respect to the encoder's ceil ("SAME") pooling (the window of the padded last
voxel is the one cropped), costs no arithmetic, and is what a nearest `jax.image.resize` would do
for even sizes (for odd sizes `resize` would misalign the pooling windows by up to half a voxel).

Cost: a linear map commutes with the repetition, so the head is applied to each level at its own
resolution (a `[C_i, K]` slice of the one kernel) and only the K-channel logits are upsampled and
summed. This equals "upsample, concatenate, 1x1 conv" exactly (up to float summation order) but
never materialises the `sum(C_i)`-channel full-resolution tensor (e.g. 496 channels at 128^3 for
the paper's widths), which is what makes the probe cheaper than the U-Net decoder it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.layers import check_spatial_dims
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig

__all__ = [
    "VoxelLinearProbe",
    "head_parameter_count",
    "probe_feature_channels",
    "upsample_repeat",
]


def probe_feature_channels(filters: Sequence[int], bottom_filters: int) -> int:
    """Channels of the concatenated multi-scale features: every skip plus the bottom."""
    return int(sum(int(f) for f in filters)) + int(bottom_filters)


def upsample_repeat(x: jax.Array, factor: int, shape: Sequence[int]) -> jax.Array:
    """Nearest-neighbour upsampling by repetition, cropped at the high end.

    Args:
      x: `[B, *spatial, C]`, any number of spatial axes.
      factor: integer repetition per spatial axis (`2**level` for U-Net level `level`).
      shape: target spatial shape; each entry must lie in `(factor * (s - 1), factor * s]` for
        the matching `s` of `x` (the ceil-pooled relation of `max_pool2`).

    Returns:
      `[B, *shape, C]`, dtype of `x`; output voxel `v` holds `x[v // factor]`.
    """
    b, *spatial, c = x.shape
    if len(shape) != len(spatial) or any(
        not factor * (s - 1) < t <= factor * s for s, t in zip(spatial, shape)
    ):
        raise ConfigError(
            f"upsample_repeat: cannot bring spatial shape {tuple(spatial)} to {tuple(shape)} "
            f"by repeating {factor}x"
        )
    if factor == 1:
        return x
    n = len(spatial)
    # Broadcast + reshape (one copy) instead of n successive jnp.repeat calls.
    expanded = x.reshape(b, *[d for s in spatial for d in (s, 1)], c)
    expanded = jnp.broadcast_to(expanded, (b, *[d for s in spatial for d in (s, factor)], c))
    y = expanded.reshape(b, *(factor * s for s in spatial), c)
    return y[(slice(None), *(slice(0, t) for t in shape[:n]))]


class VoxelLinearProbe(nnx.Module):
    """Encoder3D + a linear per-voxel read-out of its multi-scale features (2D or 3D).

    Args:
      in_channels: input channels C.
      num_classes: K, output logits per voxel.
      spatial_dims: 3 (volumes, default) or 2 (images).
      rngs: `nnx.Rngs` for the initialisers.
      encoder: the `EncoderConfig` (`EncoderConfig.from_config(config.model)`), so that a
        pretext checkpoint's `params['encoder']` fits. With a bfloat16 `dtype` each level's
        read-out is a bfloat16 matmul (forward and backward), whose K-channel result is summed
        over the levels, and biased, in float32.

    Attributes:
      encoder: the `Encoder3D` (checkpoint contract: restored from `params['encoder']`).
      head: `nnx.Conv` with kernel `(1,) * spatial_dims + (sum(filters) + bottom_filters, K)`
        and bias `(K,)`: `(sum(filters) + bottom_filters + 1) * K` parameters. Kernel input
        channels are ordered skips shallow -> deep, then the bottom (the concatenation order).

    Call:
      `x [B, *spatial, C]`, `train`, `rngs` -> logits `[B, *spatial, K]` float32.
      The encoder always runs in inference mode (no dropout even when `train`): a probe reads the
      deterministic features of a frozen encoder; GroupNorm has no train mode, so dropout is the
      only difference. `train` / `rngs` are accepted so that the finetuning loss can call the
      probe like the segmentation model.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 3,
        encoder: EncoderConfig = EncoderConfig(),
        rngs: nnx.Rngs,
    ):
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.encoder = Encoder3D(
            in_channels, spatial_dims=self.spatial_dims, **encoder.kwargs(), rngs=rngs
        )
        self.feature_channels = probe_feature_channels(
            self.encoder.filters, self.encoder.bottom_filters
        )
        self.num_classes = int(num_classes)
        self.head = nnx.Conv(
            self.feature_channels,
            self.num_classes,
            kernel_size=(1,) * self.spatial_dims,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        del train, rngs  # see the class docstring: the encoder is read in inference mode
        features, skips = self.encoder(x, train=False)
        levels = (*skips, features)
        kernel = self.head.kernel[...].reshape(self.feature_channels, self.num_classes)
        shape = x.shape[1:-1]
        logits = None
        start = 0
        for level, f in enumerate(levels):
            c = f.shape[-1]
            # Linear head per level at its own resolution, then upsample K channels only (see the
            # module docstring: identical to upsample -> concat -> 1x1 conv).
            part = jnp.einsum("...c,ck->...k", f, kernel[start : start + c].astype(f.dtype))
            part = part.astype(jnp.float32)  # K channels: summed over the levels in float32
            part = upsample_repeat(part, 2**level, shape)
            logits = part if logits is None else logits + part
            start += c
        return (logits + self.head.bias[...]).astype(jnp.float32)

    def dense_features(self, x: jax.Array) -> jax.Array:
        """The probe's input made explicit: `[B, *spatial, sum(filters) + bottom_filters]`.

        Every level upsampled to the input resolution and concatenated (skips shallow -> deep,
        then the bottom). Memory-hungry at full size; meant for tests and analysis, `__call__`
        never builds it.
        """
        features, skips = self.encoder(x, train=False)
        shape = x.shape[1:-1]
        return jnp.concatenate(
            [upsample_repeat(f, 2**level, shape) for level, f in enumerate((*skips, features))],
            axis=-1,
        )


def head_parameter_count(model: VoxelLinearProbe) -> int:
    """Number of scalars in `model.head` (for reporting: `(feature_channels + 1) * K`)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model.head, nnx.Param)))
