"""Pretext classification heads (Taleb et al., NeurIPS 2020; original `models/fully_connected.py`).

`MLPHead` is the original's `big_fully` top (Dense 2048 ReLU -> BN -> Dropout 0.5 -> Dense 1024
ReLU -> BN -> Dropout 0.5) followed by the task's own output Dense, returning logits (the softmax
lives in the loss).

Deviation from the original: LayerNorm instead of BatchNorm. Like GroupNorm in the encoder
(`layers.py`), it has no running statistics, so the train step stays a pure function of the params,
it needs no train/eval switch (no frozen-BN mismatch, spec section 8 #18), and it computes the same
thing for any batch size and device count.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ssl3d_jax.errors import ConfigError

__all__ = ["MLPHead"]


class MLPHead(nnx.Module):
    """Dense -> ReLU -> LayerNorm -> Dropout per hidden layer, then a linear output layer.

    Args:
      in_features: input features F.
      hidden: hidden widths (original: 2048, 1024); may be empty.
      out_features: number of logits.
      dropout_rate: element-wise dropout after every hidden layer (original: 0.5).
      dtype: compute dtype of the dense layers (None: the input's; `jnp.bfloat16` for mixed
        precision); parameters stay float32 and LayerNorm statistics are float32 either way.
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `x [B, F]` float, `train` (static bool: dropout on), `rngs` (`nnx.Rngs(dropout=key)`, needed
      only if `train` and `dropout_rate > 0`) -> logits `[B, out_features]` float32.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (2048, 1024),
        out_features: int | None = None,
        *,
        dropout_rate: float = 0.0,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if out_features is None:
            raise ConfigError("MLPHead needs out_features (the number of logits).")
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout_rate = float(dropout_rate)
        cin = int(in_features)
        precision = dict(dtype=dtype, param_dtype=jnp.float32)
        # Named attributes (dense0, norm0, ...) keep the pure param dict's keys strings.
        for i, h in enumerate(self.hidden):
            setattr(self, f"dense{i}", nnx.Linear(cin, h, **precision, rngs=rngs))
            setattr(self, f"norm{i}", nnx.LayerNorm(h, **precision, rngs=rngs))
            cin = h
        self.dropout = nnx.Dropout(self.dropout_rate)
        # Zero-initialised output layer (big_vision's `head_zeroinit`): the initial logits are 0,
        # so the initial loss is exactly log(num_classes) and early training is not dominated by
        # random logit scales. The original used Keras' glorot_uniform here.
        self.out = nnx.Linear(
            cin,
            int(out_features),
            kernel_init=nnx.initializers.zeros_init(),
            **precision,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        use_dropout = train and self.dropout_rate > 0.0
        if use_dropout and rngs is None:
            raise ConfigError("dropout_rate > 0 with train=True needs rngs=nnx.Rngs(dropout=key).")
        for i in range(len(self.hidden)):
            x = nnx.relu(getattr(self, f"dense{i}")(x))
            x = getattr(self, f"norm{i}")(x)
            if use_dropout:
                x = self.dropout(x, deterministic=False, rngs=rngs)
        return self.out(x).astype(jnp.float32)
