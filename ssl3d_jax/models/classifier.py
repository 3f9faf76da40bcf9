"""Image / volume classifier: the shared U-Net encoder, a global max-pool, and a classifier head.

The finetuning model of the paper's diabetic-retinopathy experiment (Taleb et al., NeurIPS 2020,
section 4; original `utils/model_utils.py` with the `simple_multiclass` top). The attribute name
`encoder` is part of the checkpoint contract, as in `SegmentationModel`: classification finetuning
restores `params['encoder']` from a pretext checkpoint.

Pooling: a global MAX over the encoder's bottom features, as the pretext heads that pool
(`global_max_pool`, the original's default `pooling: max` for the U-Net encoder), so a pretrained
encoder's features are read the way they were trained to be read. Global (not flatten) pooling
makes the head independent of the input size. The original's retina runs used DenseNet121 with
average pooling instead; we use the U-Net encoder of every other experiment.

Heads: `hidden=None` is a single linear layer (the linear probe); `hidden=h` is `MLPHead` with one
hidden layer of width h (the original's `simple_multiclass`: Dense 1024 ReLU -> BN -> Dropout 0.5
-> Dense; LayerNorm instead of BatchNorm, see `heads.py`). Both return logits; the softmax lives in
the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ssl3d_jax.models.heads import MLPHead
from ssl3d_jax.models.layers import check_spatial_dims
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, global_max_pool

__all__ = ["ClassificationModel"]


class ClassificationModel(nnx.Module):
    """Encoder3D -> global max-pool -> linear or MLP head, 2D (default) or 3D.

    Args:
      in_channels: input channels C (3 for RGB fundus photographs).
      num_classes: number of logits K (5 DR grades).
      spatial_dims: 2 (images `[B, H, W, C]`, default) or 3 (volumes `[B, D, H, W, C]`).
      hidden: None for a linear head (the linear probe), or the hidden width of an `MLPHead`.
      dropout_rate: dropout of the MLP head's hidden layer (original: 0.5); unused by a linear head.
      rngs: `nnx.Rngs` for the initialisers. The encoder is created first, so that with the same
        key its initial weights do not depend on the head (all finetuning arms share them).
      encoder: the `EncoderConfig` (`EncoderConfig.from_config(config.model)`), so that a
        pretext checkpoint's encoder fits; the head computes in its `dtype`.

    Call:
      `x [B, *spatial, C]` float32, `train` (static bool: dropout on), `rngs`
      (`nnx.Rngs(dropout=key)`, needed only with dropout in training) -> logits `[B, K]` float32.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        spatial_dims: int = 2,
        hidden: int | None = None,
        dropout_rate: float = 0.0,
        rngs: nnx.Rngs,
        encoder: EncoderConfig = EncoderConfig(),
    ):
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.encoder = Encoder3D(
            in_channels, spatial_dims=self.spatial_dims, **encoder.kwargs(), rngs=rngs
        )
        features = self.encoder.bottom_filters
        dtype = encoder.dtype
        self.hidden = None if hidden is None else int(hidden)
        if self.hidden is None:
            self.head = nnx.Linear(
                features, int(num_classes), dtype=dtype, param_dtype=jnp.float32, rngs=rngs
            )
        else:
            self.head = MLPHead(
                features,
                (self.hidden,),
                int(num_classes),
                dropout_rate=dropout_rate,
                dtype=dtype,
                rngs=rngs,
            )

    def features(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Pooled encoder features `[B, bottom_filters]`."""
        bottom, _ = self.encoder(x, train=train, rngs=rngs)
        return global_max_pool(bottom)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        pooled = self.features(x, train=train, rngs=rngs)
        if self.hidden is None:
            return self.head(pooled).astype(jnp.float32)
        return self.head(pooled, train=train, rngs=rngs)
