"""3D U-Net encoder and decoder (Taleb et al., NeurIPS 2020; original `models/unet3d.py`).

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
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ssl3d_jax.models.layers import ConvBlock, UpConv2, max_pool2

__all__ = ["Encoder3D", "UNetDecoder", "SegmentationModel", "global_max_pool"]


def global_max_pool(x: jax.Array) -> jax.Array:
    """Max over all spatial positions: `[B, d, h, w, F]` -> `[B, F]`.

    Generalises the original's final 2x2x2 max-pool of a 2^3 bottom (giving 1^3 x F) to any bottom
    size.
    """
    return jnp.max(x, axis=(1, 2, 3))


class Encoder3D(nnx.Module):
    """U-Net contracting path.

    Args:
      in_channels: input channels C.
      filters: widths of the pooled levels (paper: 16, 32, 64, 128).
      bottom_filters: width of the bottom block (paper: 256).
      num_groups: GroupNorm groups per block.
      dropout_rate: element-wise dropout inside every block (original: 0.5).
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `x [B, D, H, W, C]` float -> `(features, skips)`: `features [B, d, h, w, bottom_filters]`
      with `d = D` ceil-halved `len(filters)` times, `skips` a tuple shallow -> deep,
      `skips[i]: [B, D_i, H_i, W_i, filters[i]]` with `D_0 = D`.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        filters: Sequence[int] = (16, 32, 64, 128),
        bottom_filters: int = 256,
        num_groups: int = 8,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.filters = tuple(int(f) for f in filters)
        self.bottom_filters = int(bottom_filters)
        cin = in_channels
        # Named attributes (down0, down1, ...) rather than a list: the pure param dict then has
        # string keys only (params['encoder']['down0']['conv1']['kernel']), clean for orbax.
        for i, f in enumerate(self.filters):
            block = ConvBlock(cin, f, num_groups=num_groups, dropout_rate=dropout_rate, rngs=rngs)
            setattr(self, f"down{i}", block)
            cin = f
        self.bottom = ConvBlock(
            cin, self.bottom_filters, num_groups=num_groups, dropout_rate=dropout_rate, rngs=rngs
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i in range(len(self.filters)):
            x = getattr(self, f"down{i}")(x, train=train, rngs=rngs)
            skips.append(x)
            x = max_pool2(x)
        # Deviation from original: no max-pool after the bottom block (see module docstring).
        x = self.bottom(x, train=train, rngs=rngs)
        return x, tuple(skips)


class UNetDecoder(nnx.Module):
    """U-Net expanding path with a 1x1x1 classification conv.

    Args:
      filters: the encoder's level widths, shallow -> deep (paper: 16, 32, 64, 128).
      bottom_filters: the encoder's bottom width (paper: 256).
      num_classes: output channels (logits).
      num_groups: GroupNorm groups per block.
      dropout_rate: element-wise dropout inside every block (original decoder: 0.5).
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `features [B, d, h, w, bottom_filters]`, `skips` as returned by `Encoder3D` ->
      logits `[B, D, H, W, num_classes]` at the resolution of `skips[0]` (the input's).
    """

    def __init__(
        self,
        *,
        filters: Sequence[int] = (16, 32, 64, 128),
        bottom_filters: int = 256,
        num_classes: int,
        num_groups: int = 8,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.filters = tuple(int(f) for f in filters)
        cin = int(bottom_filters)
        for i in reversed(range(len(self.filters))):
            f = self.filters[i]
            setattr(self, f"up{i}", UpConv2(cin, f, rngs=rngs))
            setattr(
                self,
                f"block{i}",
                ConvBlock(2 * f, f, num_groups=num_groups, dropout_rate=dropout_rate, rngs=rngs),
            )
            cin = f
        self.classifier = nnx.Conv(cin, num_classes, kernel_size=(1, 1, 1), rngs=rngs)

    def __call__(
        self,
        features: jax.Array,
        skips: Sequence[jax.Array],
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        x = features
        for i in reversed(range(len(self.filters))):
            skip = skips[i]
            x = getattr(self, f"up{i}")(x)
            # Ceil pooling makes the upsampled tensor up to 1 voxel larger than the skip on odd
            # axes; the surplus is at the high end (where max_pool2 padded), so crop it there.
            d, h, w = skip.shape[1:4]
            x = x[:, :d, :h, :w, :]
            x = jnp.concatenate([x, skip], axis=-1)
            x = getattr(self, f"block{i}")(x, train=train, rngs=rngs)
        return self.classifier(x)


class SegmentationModel(nnx.Module):
    """Encoder3D + UNetDecoder (the finetuning model).

    The attribute name `encoder` is part of the checkpoint contract: finetuning restores
    `params['encoder']` from a pretraining checkpoint.

    Call:
      `x [B, D, H, W, in_channels]` -> logits `[B, D, H, W, num_classes]`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        filters: Sequence[int] = (16, 32, 64, 128),
        bottom_filters: int = 256,
        num_groups: int = 8,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.encoder = Encoder3D(
            in_channels,
            filters=filters,
            bottom_filters=bottom_filters,
            num_groups=num_groups,
            dropout_rate=dropout_rate,
            rngs=rngs,
        )
        self.decoder = UNetDecoder(
            filters=filters,
            bottom_filters=bottom_filters,
            num_classes=num_classes,
            num_groups=num_groups,
            dropout_rate=dropout_rate,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        features, skips = self.encoder(x, train=train, rngs=rngs)
        return self.decoder(features, skips, train=train, rngs=rngs)
