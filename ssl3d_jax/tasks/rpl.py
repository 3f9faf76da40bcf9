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
    (`make_batch`), not by a NumPy generator on the host.
  * Queries per volume (`config.rpl.queries_per_volume`, Q): the original drew one query per
    volume and step. With Q > 1 each volume gives Q distinct queries against its one reference
    (Q = P**n - 1: all of them), the reference encoded once, every pair classified on its own by
    the same head; the loss is the mean over the B * Q pairs. With the grid at a random origin one
    query per volume never left chance (11 250 steps x 8 volumes at 40³), all 26 did within a few
    hundred steps: a batch of 8 pairs for a 26-way problem whose cue is faint is too noisy a
    gradient (docs/results/pretext_lr_search.md, "RPL: all queries per volume").
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

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.heads import MLPHead
from ssl3d_jax.models.layers import check_spatial_dims
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, global_max_pool
from ssl3d_jax.ops.patches import (
    check_grid_fraction,
    grid_starts,
    patch_shape,
    slice_patches,
    spatial_dims_of,
)
from ssl3d_jax.tasks import Task, TaskDef, classification_chance, pretext_loss

__all__ = [
    "num_classes",
    "sample_pair",
    "sample_queries",
    "make_batch",
    "RPLModel",
    "loss_fn",
]


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


def check_queries(queries_per_volume: int, patches_per_side: int, spatial_dims: int) -> int:
    """`queries_per_volume` as an int in `[1, P**n - 1]`, or a `ConfigError` naming the key."""
    q, n = int(queries_per_volume), num_classes(patches_per_side, spatial_dims)
    if not 1 <= q <= n:
        raise ConfigError(
            f"config.rpl.queries_per_volume={queries_per_volume!r}: expected 1 to {n} (the "
            f"{n} non-centre cells of a {patches_per_side}-per-side {spatial_dims}D grid)."
        )
    return q


def sample_queries(
    volume: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
    grid_fraction: float = 1.0,
    num_queries: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """The reference patch and `num_queries` distinct query patches of one volume, with labels.

    The patch values are exactly those `extract_grid(volume, key_grid, ...)` would give for the
    same key (same offsets), but only the needed patches are sliced.

    Args:
      volume: `[D, H, W, C]` (3D) or `[H, W, C]` (2D); the rank decides.
      key: a `jax.random` key.
      patches_per_side: P, odd, static.
      jitter: J, static.
      training: static; random sub-crop offsets (and grid origin) if True, centre offsets
        otherwise.
      grid_fraction: static share of each edge the grid spans (`ops.patches.grid_starts`); 1 is
        the original's grid at the origin.
      num_queries: Q, static, in `[1, P**n - 1]`; the queries are distinct cells, in random order
        (Q = P**n - 1: every non-centre cell once).

    Returns:
      `patches [1 + Q, pd, ph, pw, C]` (2D: `[1 + Q, ph, pw, C]`; dtype of volume) = [centre
      patch, query patches...], and `labels [Q]` int32 in `[0, P**n - 1)`, n = number of spatial
      dims; label c is grid cell c if c < centre, else c + 1.
    """
    _check_grid(patches_per_side)
    dims = spatial_dims_of(volume.shape)
    q = check_queries(num_queries, patches_per_side, dims)
    n = patches_per_side**dims
    centre = n // 2
    key_grid, key_label = jax.random.split(key)
    grid = dict(patches_per_side=patches_per_side, jitter=jitter, grid_fraction=grid_fraction)
    shape = patch_shape(volume.shape, **grid)
    starts = grid_starts(volume.shape, key_grid, training=training, **grid)
    if q == 1:  # the original's single draw (and the same random stream as before Q existed)
        labels = jax.random.randint(key_label, (), 0, n - 1, dtype=jnp.int32)[None]
    else:
        labels = jax.random.permutation(key_label, n - 1)[:q].astype(jnp.int32)
    cells = labels + (labels >= centre).astype(jnp.int32)  # skip the centre cell
    patch_starts = jnp.concatenate([starts[centre][None], starts[cells]])
    return slice_patches(volume, patch_starts, shape), labels


def sample_pair(
    volume: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
    grid_fraction: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One (reference, query) pair and its label from one volume: `sample_queries` with Q = 1.

    Returns:
      `pair [2, pd, ph, pw, C]` (2D: `[2, ph, pw, C]`; dtype of volume) = [centre patch, query
      patch], and `label` int32 scalar in `[0, P**n - 1)`, n = number of spatial dims.
    """
    pair, labels = sample_queries(
        volume,
        key,
        patches_per_side=patches_per_side,
        jitter=jitter,
        training=training,
        grid_fraction=grid_fraction,
    )
    return pair, labels[0]


def make_batch(
    volumes: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
    grid_fraction: float = 1.0,
    num_queries: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`sample_pair` (or `sample_queries`) for every volume of a batch, each with its own key.

    Args:
      volumes: `[B, D, H, W, C]` (3D) or `[B, H, W, C]` (2D).
      key: a `jax.random` key, split into B keys.
      patches_per_side, jitter, training, grid_fraction: as `sample_pair`.
      num_queries: None: one pair per volume (`sample_pair`); Q: `sample_queries` with Q.

    Returns:
      None: `pairs [B, 2, pd, ph, pw, C]` (2D: `[B, 2, ph, pw, C]`), `labels [B]` int32.
      Q: `patches [B, 1 + Q, pd, ph, pw, C]` (reference first), `labels [B, Q]` int32.
    """
    keys = jax.random.split(key, volumes.shape[0])
    grid = dict(
        patches_per_side=patches_per_side,
        jitter=jitter,
        training=training,
        grid_fraction=grid_fraction,
    )
    if num_queries is None:
        sample = lambda v, k: sample_pair(v, k, **grid)  # noqa: E731
    else:
        sample = lambda v, k: sample_queries(v, k, **grid, num_queries=num_queries)  # noqa: E731
    return jax.vmap(sample)(volumes, keys)


class RPLModel(nnx.Module):
    """Siamese encoder + MLP head for RPL.

    Args:
      in_channels: input channels C.
      patches_per_side: P (odd), fixes the number of classes `P**spatial_dims - 1`.
      spatial_dims: 3 (volume patches, default) or 2 (image patches).
      encoder: the `EncoderConfig` (shared by every model, `config.model`); the head computes in
        its `dtype`.
      head_hidden: hidden widths of the head (original: 2048, 1024).
      head_dropout: dropout rate of the head (original: 0.5).
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `pairs [B, 2, pd, ph, pw, C]` (2D: `[B, 2, ph, pw, C]`) -> logits
      `[B, P**spatial_dims - 1]` float32.
      `query_logits(patches [B, 1 + Q, *patch, C])` (reference first) -> logits
      `[B, Q, P**spatial_dims - 1]` float32: each query against the reference, the reference
      encoded once; `model(pairs)` equals `model.query_logits(pairs)[:, 0]`.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        patches_per_side: int,
        spatial_dims: int = 3,
        encoder: EncoderConfig = EncoderConfig(),
        head_hidden: Sequence[int] = (2048, 1024),
        head_dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.encoder = Encoder3D(
            in_channels, spatial_dims=self.spatial_dims, **encoder.kwargs(), rngs=rngs
        )
        self.head = MLPHead(
            2 * self.encoder.bottom_filters,
            head_hidden,
            num_classes(patches_per_side, self.spatial_dims),
            dropout_rate=head_dropout,
            dtype=encoder.dtype,
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
        return self.query_logits(pairs, train=train, rngs=rngs)[:, 0]

    def query_logits(
        self, patches: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        if patches.ndim != self.spatial_dims + 3 or patches.shape[1] < 2:
            raise ConfigError(
                f"RPLModel(spatial_dims={self.spatial_dims}) expects [B, 1 + Q, *patch, C] "
                f"(reference, then Q >= 1 queries) of rank {self.spatial_dims + 3}, got shape "
                f"{patches.shape}."
            )
        b, m = patches.shape[:2]
        # One encoder call on all B * (1 + Q) patches: the shared (siamese) encoder of the
        # original's TimeDistributed wrapper, as a single larger batch.
        x = patches.reshape(b * m, *patches.shape[2:])
        features, _ = self.encoder(x, train=train, rngs=rngs)
        features = global_max_pool(features).reshape(b, m, features.shape[-1])
        reference = jnp.broadcast_to(features[:, :1], features[:, 1:].shape)
        pairs = jnp.concatenate([reference, features[:, 1:]], axis=-1)  # ref || query
        logits = self.head(pairs.reshape(b * (m - 1), -1), train=train, rngs=rngs)
        return logits.reshape(b, m - 1, -1)


def loss_fn(
    model: RPLModel,
    volumes: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
    grid_fraction: float = 1.0,
    queries_per_volume: int = 1,
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
      queries_per_volume: static Q, distinct queries per volume against its reference
        (`sample_queries`); 1 is the original's single pair.
      dropout_key: key for dropout; required if `training` and the model has dropout > 0.

    Returns:
      `(loss, metrics)`: float32 scalar mean cross-entropy over the B * Q pairs, and
      `{'loss', 'accuracy'}` float32 scalars.
    """
    patches, labels = make_batch(
        volumes,
        key,
        patches_per_side=patches_per_side,
        jitter=jitter,
        training=training,
        grid_fraction=grid_fraction,
        num_queries=int(queries_per_volume),
    )
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    logits = model.query_logits(patches, train=training, rngs=rngs).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def make_task(config, *, in_channels: int):
    """The RPL `Task` for the generic pretraining loop (see `ssl3d_jax.tasks.Task`).

    Reads `config.model` (filters, bottom_filters, num_groups, dropout_rate), `config.data`
    (spatial_dims: 3 for volumes, 2 for images) and `config.rpl` (patches_per_side, jitter,
    grid_fraction, queries_per_volume, head_hidden,
    head_dropout). The loss always uses random
    sub-crops and grid origins (`training=True`) and train mode; its dropout key is split off the
    step key.
    """
    p, j = int(config.rpl.patches_per_side), int(config.rpl.jitter)
    f = check_grid_fraction(config.rpl.grid_fraction, "config.rpl.grid_fraction")
    _check_grid(p)
    spatial_dims = check_spatial_dims(config.data.spatial_dims)
    q = check_queries(config.rpl.queries_per_volume, p, spatial_dims)
    encoder = EncoderConfig.from_config(config.model)
    head_hidden = tuple(int(h) for h in config.rpl.head_hidden)
    head_dropout = float(config.rpl.head_dropout)
    uses_dropout = encoder.dropout_rate > 0 or head_dropout > 0

    def build_model(rngs: nnx.Rngs) -> RPLModel:
        return RPLModel(
            in_channels,
            patches_per_side=p,
            spatial_dims=spatial_dims,
            encoder=encoder,
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
        queries_per_volume=q,
    )

    input_spec = {
        "task": "rpl",
        "spatial_dims": spatial_dims,
        "patches_per_side": p,
        "jitter": j,
        "grid_fraction": f,
        "queries_per_volume": q,
        "in_channels": in_channels,
    }
    grid = dict(patches_per_side=p, jitter=j, training=True, grid_fraction=f)

    def sample(volumes, key):
        # One (reference, query) pair per volume: what the figure draws.
        pairs, labels = make_batch(volumes, key, **grid)
        return {"pairs": pairs, "labels": labels}

    def plot(s, volumes, *, names, channel):
        from ssl3d_jax import figures

        return figures.plot_rpl(
            volumes[0], s["pairs"][0], int(s["labels"][0]), patches_per_side=p, channel=channel
        )

    return Task(
        name="rpl",
        build_model=build_model,
        loss=loss,
        input_spec=input_spec,
        chance=classification_chance(num_classes(p, spatial_dims)),
        sample=sample,
        plot=plot,
    )


TASK = TaskDef(name="rpl", make=make_task, order=0)
