"""Relative Patch Location (RPL) pretext task, 3D and 2D (Taleb et al., NeurIPS 2020, section 3;
original `algorithms/relative_patch_location.py`, `preprocessing/preprocess_rpl.py`).

The task: cut a volume (image) into a P x P x P (P x P) grid of (jittered) patches. The centre
patch (grid index `P**n // 2`, n = 3 or 2 spatial dims) is the reference; one of the other
`P**n - 1` patches is the query. A shared (siamese) encoder embeds both, and a classifier on the
concatenated features predicts which of the `P**n - 1` positions the query came from. Class c maps
to grid index c if c < centre else c + 1 (the centre is skipped). The dimensionality is the rank of
the input (`[D, H, W, C]` volumes or `[H, W, C]` images), and `config.data.spatial_dims` in
`make_task`.

Paper setting, 3D: P = 3, jitter 3, 128^3 volumes -> 27 patches of 39^3, 26 classes; encoder =
U-Net contracting path (16..128, bottom 256), features 2 x 256 = 512 -> `big_fully` (2048, 1024)
-> 26-way softmax, categorical cross-entropy.
Paper setting, 2D (the original's `rpl_2d*.json`): P = 3 -> 9 tiles, centre index 4, 8 classes;
kaggle retina 224^2 with J = 8 (66^2 tiles, DenseNet121 encoder) and pancreas slices 128^2 with
J = 4 (38^2 tiles, the 2D U-Net encoder with 16..128 filters, the one used here).

Deliberate deviations from the original code:
  * Random grid position (`config.rpl.grid_fraction` < 1, `ops/patches.py`): the 3x3x3 grid spans
    only that share of each edge, at a random origin per volume, with the patches "sampled at
    random locations" as the paper's text says. The original's code always put the grid at the
    volume's origin; with the anatomy resized to touch every face of the input cube the query
    patch ALONE then tells its class (0.93 held-out accuracy of a linear classifier on one patch,
    chance 0.04, docs/results/shortcut_audit.md). The `paper` size keeps the original geometry,
    where the audit finds the same shortcut (configs/rpl.py).
  * Pairs are built on device inside the jitted train step from a `jax.random` key
    (`make_batch`), not by a NumPy generator on the host; one query per volume, as the original.
  * `training` controls the sub-crop jitter: random offsets when True, centre offsets when False.
    The original always cropped randomly, validation included (it called the crop with
    `is_training=True`); pass `training=True` for validation to reproduce that.
  * An even P is rejected (`ConfigError`): the original took index `P**n // 2` regardless, which
    for even P is not the centre of the grid, so the "relative location" is ill-defined.
  * The encoder has no final max-pool; features are `global_max_pool`ed over the bottom block
    (identical to the original's final pool + flatten for a 2^3 bottom, and works for any patch
    size). GroupNorm / LayerNorm replace BatchNorm (see `models/layers.py`, `models/heads.py`).
  * 2D uses the same U-Net encoder as 3D (2D convs) for every dataset; the original's retina
    configs used a DenseNet121 instead.
  * The model returns logits; the softmax is inside the float32 cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.heads import MLPHead
from ssl3d_jax.models.layers import check_spatial_dims
from ssl3d_jax.models.unet import Encoder3D, global_max_pool
from ssl3d_jax.ops.patches import (
    check_grid_fraction,
    grid_starts,
    patch_shape,
    slice_patches,
    spatial_dims_of,
)
from ssl3d_jax.tasks import Task, classification_chance, encoder_config, pretext_loss

__all__ = ["num_classes", "sample_pair", "make_batch", "RPLModel", "loss_fn"]


def _check_grid(patches_per_side: int) -> None:
    if patches_per_side < 3 or patches_per_side % 2 == 0:
        raise ConfigError(
            f"RPL needs an odd patches_per_side >= 3 so that the reference is a true centre "
            f"patch, got {patches_per_side}."
        )


def num_classes(patches_per_side: int, spatial_dims: int = 3) -> int:
    """Number of RPL classes, `P**spatial_dims - 1` (26 for P = 3 in 3D, 8 in 2D)."""
    _check_grid(patches_per_side)
    return patches_per_side ** check_spatial_dims(spatial_dims) - 1


def sample_pair(
    volume: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
    grid_fraction: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One (reference, query) pair and its label from one volume.

    The patch values are exactly those `extract_grid(volume, key_grid, ...)` would give for the
    same key (same offsets), but only the two needed patches are sliced.

    Args:
      volume: `[D, H, W, C]` (3D) or `[H, W, C]` (2D); the rank decides.
      key: a `jax.random` key.
      patches_per_side: P, odd, static.
      jitter: J, static.
      training: static; random sub-crop offsets (and grid origin) if True, centre offsets
        otherwise.
      grid_fraction: static share of each edge the grid spans (`ops.patches.grid_starts`); 1 is
        the original's grid at the origin.

    Returns:
      `pair [2, pd, ph, pw, C]` (2D: `[2, ph, pw, C]`; dtype of volume) = [centre patch, query
      patch], and `label` int32 scalar in `[0, P**n - 1)`, n = number of spatial dims.
    """
    _check_grid(patches_per_side)
    n = patches_per_side ** spatial_dims_of(volume.shape)
    centre = n // 2
    key_grid, key_label = jax.random.split(key)
    grid = dict(patches_per_side=patches_per_side, jitter=jitter, grid_fraction=grid_fraction)
    shape = patch_shape(volume.shape, **grid)
    starts = grid_starts(volume.shape, key_grid, training=training, **grid)
    label = jax.random.randint(key_label, (), 0, n - 1, dtype=jnp.int32)
    query = label + (label >= centre).astype(jnp.int32)  # skip the centre cell
    pair_starts = jnp.stack([starts[centre], starts[query]])
    return slice_patches(volume, pair_starts, shape), label


def make_batch(
    volumes: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
    grid_fraction: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """`sample_pair` for every volume of a batch, each with its own key.

    Args:
      volumes: `[B, D, H, W, C]` (3D) or `[B, H, W, C]` (2D).
      key: a `jax.random` key, split into B keys.
      patches_per_side, jitter, training, grid_fraction: as `sample_pair`.

    Returns:
      `pairs [B, 2, pd, ph, pw, C]` (2D: `[B, 2, ph, pw, C]`), `labels [B]` int32.
    """
    keys = jax.random.split(key, volumes.shape[0])
    sample = lambda v, k: sample_pair(  # noqa: E731
        v,
        k,
        patches_per_side=patches_per_side,
        jitter=jitter,
        training=training,
        grid_fraction=grid_fraction,
    )
    return jax.vmap(sample)(volumes, keys)


class RPLModel(nnx.Module):
    """Siamese encoder + MLP head for RPL.

    Args:
      in_channels: input channels C.
      patches_per_side: P (odd), fixes the number of classes `P**spatial_dims - 1`.
      spatial_dims: 3 (volume patches, default) or 2 (image patches).
      encoder_kwargs: keyword arguments of `Encoder3D` (filters, bottom_filters, num_groups,
        dropout_rate, dtype, remat); `spatial_dims` is passed separately. The head computes in
        the same `dtype`.
      head_hidden: hidden widths of the head (original: 2048, 1024).
      head_dropout: dropout rate of the head (original: 0.5).
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `pairs [B, 2, pd, ph, pw, C]` (2D: `[B, 2, ph, pw, C]`) -> logits
      `[B, P**spatial_dims - 1]` float.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        patches_per_side: int,
        spatial_dims: int = 3,
        encoder_kwargs: dict[str, Any] | None = None,
        head_hidden: Sequence[int] = (2048, 1024),
        head_dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        encoder_kwargs = dict(encoder_kwargs or {})
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.encoder = Encoder3D(
            in_channels, spatial_dims=self.spatial_dims, **encoder_kwargs, rngs=rngs
        )
        self.head = MLPHead(
            2 * self.encoder.bottom_filters,
            head_hidden,
            num_classes(patches_per_side, self.spatial_dims),
            dropout_rate=head_dropout,
            dtype=encoder_kwargs.get("dtype"),
            rngs=rngs,
        )

    def __call__(
        self, pairs: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        if pairs.ndim != self.spatial_dims + 3 or pairs.shape[1] != 2:
            raise ConfigError(
                f"RPLModel(spatial_dims={self.spatial_dims}) expects pairs [B, 2, *patch, C] of "
                f"rank {self.spatial_dims + 3}, got shape {pairs.shape}."
            )
        b = pairs.shape[0]
        # One encoder call on all 2B patches: the shared (siamese) encoder of the original's
        # TimeDistributed wrapper, as a single larger batch.
        x = pairs.reshape(2 * b, *pairs.shape[2:])
        features, _ = self.encoder(x, train=train, rngs=rngs)
        features = global_max_pool(features).reshape(b, 2 * features.shape[-1])  # ref || query
        return self.head(features, train=train, rngs=rngs)


def loss_fn(
    model: RPLModel,
    volumes: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
    grid_fraction: float = 1.0,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """RPL loss on a batch of volumes: pairs are built on device, then softmax cross-entropy.

    Args:
      model: an `RPLModel`.
      volumes: `[B, D, H, W, C]` (3D) or `[B, H, W, C]` (2D) float, matching the model.
      key: `jax.random` key for the crops and labels.
      patches_per_side, jitter, grid_fraction: static grid parameters (`sample_pair`).
      training: static; random crop jitter (and grid origin) and model train mode (dropout) if
        True.
      dropout_key: key for dropout; required if `training` and the model has dropout > 0.

    Returns:
      `(loss, metrics)`: float32 scalar mean cross-entropy, and `{'loss', 'accuracy'}` float32
      scalars.
    """
    pairs, labels = make_batch(
        volumes,
        key,
        patches_per_side=patches_per_side,
        jitter=jitter,
        training=training,
        grid_fraction=grid_fraction,
    )
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    logits = model(pairs, train=training, rngs=rngs).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def make_task(config, *, in_channels: int):
    """The RPL `Task` for the generic pretraining loop (see `ssl3d_jax.tasks.Task`).

    Reads `config.model` (filters, bottom_filters, num_groups, dropout_rate), `config.data`
    (spatial_dims: 3 for volumes, 2 for images) and `config.rpl` (patches_per_side, jitter,
    grid_fraction (optional, default 1), head_hidden, head_dropout). The loss always uses random
    sub-crops and grid origins (`training=True`) and train mode; its dropout key is split off the
    step key.
    """
    p, j = int(config.rpl.patches_per_side), int(config.rpl.jitter)
    f = check_grid_fraction(config.rpl.get("grid_fraction", 1.0), "config.rpl.grid_fraction")
    _check_grid(p)
    spatial_dims = check_spatial_dims(config.data.spatial_dims)
    encoder_kwargs = encoder_config(config)
    head_hidden = tuple(int(h) for h in config.rpl.head_hidden)
    head_dropout = float(config.rpl.head_dropout)
    uses_dropout = encoder_kwargs["dropout_rate"] > 0 or head_dropout > 0

    def build_model(rngs: nnx.Rngs) -> RPLModel:
        return RPLModel(
            in_channels,
            patches_per_side=p,
            spatial_dims=spatial_dims,
            encoder_kwargs=encoder_kwargs,
            head_hidden=head_hidden,
            head_dropout=head_dropout,
            rngs=rngs,
        )

    loss = pretext_loss(
        loss_fn,
        task="RPL",
        spatial_dims=spatial_dims,
        uses_dropout=uses_dropout,
        patches_per_side=p,
        jitter=j,
        grid_fraction=f,
    )

    input_spec = {
        "task": "rpl",
        "spatial_dims": spatial_dims,
        "patches_per_side": p,
        "jitter": j,
        "grid_fraction": f,
        "in_channels": in_channels,
    }
    return Task(
        name="rpl",
        build_model=build_model,
        loss=loss,
        input_spec=input_spec,
        chance=classification_chance(num_classes(p, spatial_dims)),
    )
