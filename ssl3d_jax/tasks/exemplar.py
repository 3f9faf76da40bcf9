"""3D Exemplar networks pretext task (Taleb et al., NeurIPS 2020, section 3; original
`algorithms/exemplar.py`, `preprocessing/preprocess_exemplar.py`,
`data/preproc_negative_sampling.py`, `utils/metrics.py:triplet_loss`; spec section 2.6).

The task: every volume of the batch is its own class ("exemplar"). For each volume x a triplet
(anchor, positive, negative) is built: anchor and positive are two views of x, the negative is
another volume. A shared encoder + projection embeds all three, and a triplet loss pulls the
anchor towards the positive and pushes it from the negative, so the encoder learns features that
are invariant to the augmentations but tell volumes apart. The 2D variant (`spatial_dims = 2`)
does the same on images `[H, W, C]`.

Paper setting (`configs/train/exemplar_3d.json`): whole 128³ volumes, batch 2, Adam lr 1e-4, 1000
epochs, code size 1024, margin alpha = 1.0 on a mean-squared distance, negatives drawn from the
dataset; anchor = augmented x (flips, 90° or arbitrary rotations in the 3 planes,
brightness/contrast, zoom; see `ssl3d_jax.ops.augment`), positive = x un-augmented, negative =
another volume un-augmented.
2D (`exemplar_2d.json`): batch 16, lr 1e-5, code size 1024.

Deliberate deviations from the original code:
  * ONE projection head shared by the three branches. The original gave each branch its own
    Dense(1024, sigmoid) after the shared encoder (almost certainly unintended: the three
    embeddings then live in unrelated spaces, and the distances between them mean little).
  * Embeddings are L2-normalised (no sigmoid) and the hinge uses EUCLIDEAN distances on the
    unit sphere (`squared_distance=False`, default; in [0, 2]) or, optionally, squared ones (in
    [0, 4]). The original's sigmoid codes with a mean-squared distance kept every distance below
    1, so with alpha = 1.0 the hinge never switched off and the loss degenerated to the linear
    d(a, p) - d(a, n) + 1. On the unit sphere alpha = 1.0 is reachable (Euclidean: d(a, n) >= 1 +
    d(a, p); e.g. >= 60° between anchor and negative when d(a, p) = 0). Plain rather than
    squared distances by default (as Hermans et al. 2017 recommend): at init all codes are nearly
    equal, and the gradient of a squared distance vanishes with the distance, that of a plain
    one does not. Measured on the default 3D config (phantom, 40³, batch 2): with squared
    distances the loss was still 0.999 after 80 steps (codes within 1e-3 of each other); with
    plain distances 0.44.
  * The positive is AUGMENTED too (independent key; `augment_positive=True`, default). The issue
    this port answers asks for the positive to be an on-device augmentation of the same volume,
    and symmetric views avoid a shortcut: with a pristine positive the network can separate
    "augmented" from "pristine" (zero-filled corners, blur) instead of volumes. Set
    `augment_positive=False` for the original's pristine positive (and pristine negative).
  * Negatives come from the (global) batch, not from a fresh disk read per example: a random
    cyclic derangement of the batch (Sattolo's algorithm, the original's "batch" option), so no
    volume is its own negative. The negative of volume i is the POSITIVE view of volume
    `negative_index[i]`, so anchors and negatives are treated alike (both augmented, or neither
    with `augment_positive=False`), and its embedding is gathered from the positives' embeddings
    instead of being encoded again (2B encoder inputs instead of 3B; identical values because
    nothing in the model mixes samples: GroupNorm, no BatchNorm). Needs batch size >= 2. With
    gradient accumulation (`config.pretrain.grad_accum_steps = k > 1`) "the batch" is each
    micro-batch of B / k volumes: negatives (random or batch-hard) come from fewer volumes, which
    changes the task (`tasks.get_task` warns, `Task.min_batch`: B / k >= 2).
  * Option `batch_hard=True` (default off): for each anchor the hardest negative, i.e. the
    nearest embedding among both views of all OTHER volumes of the global batch (2B - 2
    candidates), as in Hermans et al. 2017: once random negatives satisfy the margin they give
    no gradient, the hardest ones keep the task informative.
  * Encoder features are `global_max_pool`ed over the bottom block before the projection (the
    original flattened its final 4³ x 256 pooled map, 16384 inputs per head, which ties the head
    to the input size). GroupNorm replaces BatchNorm (see `models/layers.py`).
  * Augmentations run on device (`ssl3d_jax.ops.augment`); see that module for the differences
    from the original recipe (small angles, trilinear, centred zoom).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.layers import check_spatial_dims
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, global_max_pool
from ssl3d_jax.ops.augment import (
    augment,
    check_augment_params,
    intensity_params,
    random_flip,
    random_intensity,
    random_rot90,
    random_rotate,
    random_zoom,
    rot90,
    rotate,
    zoom,
)
from ssl3d_jax.tasks import Task, TaskDef, pretext_loss


__all__ = [
    # augmentations, re-exported for convenience (defined in ssl3d_jax.ops.augment)
    "augment",
    "random_flip",
    "random_rot90",
    "random_rotate",
    "random_intensity",
    "random_zoom",
    "rot90",
    "rotate",
    "zoom",
    "intensity_params",
    # the task
    "AUGMENT_KEYS",
    "random_derangement",
    "make_triplets",
    "squared_distance",
    "distance",
    "triplet_loss",
    "batch_hard_triplet_loss",
    "ExemplarModel",
    "loss_fn",
    "make_task",
]

# Keys of `config.exemplar` that are `augment` keyword arguments.
AUGMENT_KEYS = (
    "flip_prob",
    "rotate_prob",
    "rot90_prob",
    "max_degrees",
    "intensity_prob",
    "shift",
    "contrast",
    "zoom_prob",
    "min_scale",
    "max_scale",
)


def _check_batch(batch_size: int) -> None:
    if batch_size < 2:
        raise ConfigError(
            f"exemplar needs at least 2 volumes per batch (config.pretrain.batch_size): the "
            f"negative of a volume is another volume of the batch; got {batch_size}."
        )


def random_derangement(key: jax.Array, n: int) -> jax.Array:
    """A random permutation of `range(n)` with no fixed point: one n-cycle (Sattolo's algorithm).

    Args:
      key: a `jax.random` key.
      n: static size >= 2.

    Returns:
      `[n]` int32 `index` with `index[i] != i` for every i.
    """
    _check_batch(n)
    order = jax.random.permutation(key, n).astype(jnp.int32)
    # Walk the shuffled order as a cycle: each element points to its successor.
    return jnp.zeros((n,), jnp.int32).at[order].set(jnp.roll(order, -1))


def make_triplets(
    volumes: jax.Array,
    key: jax.Array,
    *,
    augment_positive: bool = True,
    augment_kwargs: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Anchor, positive and negative views of a batch, built on device.

    anchor i = `augment(volumes[i])`; positive i = `augment(volumes[i])` with an independent key
    (or `volumes[i]` itself if not `augment_positive`); negative i = positive of volume
    `negative_index[i]`, a random derangement (never i).

    Args:
      volumes: `[B, *spatial, C]` float, B >= 2, spatial square / cubic.
      key: a `jax.random` key.
      augment_positive: static; augment the positives (and hence the negatives) too.
      augment_kwargs: static keyword arguments of `augment` (default: its defaults).

    Returns:
      `(anchors, positives, negatives)` each `[B, *spatial, C]` (dtype of `volumes`), and
      `negative_index [B]` int32.
    """
    b = volumes.shape[0]
    _check_batch(b)
    kwargs = dict(augment_kwargs or {})
    # One split for all keys (every jax.random call costs compile time, see ops/augment.py).
    keys = jax.random.split(key, 2 * b + 1)
    aug = jax.vmap(lambda v, k: augment(v, k, **kwargs))
    anchors = aug(volumes, keys[:b])
    positives = aug(volumes, keys[b : 2 * b]) if augment_positive else volumes
    negative_index = random_derangement(keys[2 * b], b)
    return anchors, positives, positives[negative_index], negative_index


def squared_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """Squared Euclidean distance over the last axis: `[..., E], [..., E] -> [...]` float32."""
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.sum(diff * diff, axis=-1)


def distance(a: jax.Array, b: jax.Array, *, squared: bool = True) -> jax.Array:
    """Squared (default) or plain Euclidean distance over the last axis, float32.

    The plain distance is `sqrt(max(d2, 1e-12))`: its gradient has norm 1 however close the
    points are (0 below 1e-6 rather than infinite at 0).
    """
    d2 = squared_distance(a, b)
    return d2 if squared else jnp.sqrt(jnp.maximum(d2, 1e-12))


def triplet_loss(
    anchor: jax.Array,
    positive: jax.Array,
    negative: jax.Array,
    *,
    margin: float,
    squared: bool = True,
) -> jax.Array:
    """`mean_i max(0, d(a_i, p_i) - d(a_i, n_i) + margin)`, d = `distance(squared=squared)`.

    Args:
      anchor, positive, negative: `[B, E]` float embeddings.
      margin: alpha (the original's 1.0).
      squared: static; squared Euclidean distances (default) or plain Euclidean ones.

    Returns:
      float32 scalar.
    """
    d_ap = distance(anchor, positive, squared=squared)
    d_an = distance(anchor, negative, squared=squared)
    return jnp.mean(jnp.maximum(d_ap - d_an + margin, 0.0))


def batch_hard_triplet_loss(
    anchor: jax.Array, positive: jax.Array, *, margin: float, squared: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Triplet loss with each anchor's hardest negative from the other volumes of the batch.

    The candidates for anchor i are `anchor[j]` and `positive[j]` for every `j != i` (both views of
    every other volume); the hardest is the nearest. The choice is not differentiated; the
    distance to the chosen negative is.

    Args:
      anchor, positive: `[B, E]` float embeddings, row i of both from volume i; B >= 2.
      margin: alpha.
      squared: static; the distance of the hinge, as in `triplet_loss`.

    Returns:
      `(loss, negative)`: float32 scalar `triplet_loss(anchor, positive, negative)`, and the
      chosen negatives `[B, E]`.
    """
    b = anchor.shape[0]
    _check_batch(b)
    candidates = jnp.concatenate([anchor, positive], axis=0)  # [2B, E]
    owner = jnp.concatenate([jnp.arange(b), jnp.arange(b)])  # volume of each candidate
    d = squared_distance(anchor[:, None, :], candidates[None, :, :])  # [B, 2B]; same order
    d = jnp.where(owner[None, :] == jnp.arange(b)[:, None], jnp.inf, d)
    hardest = jax.lax.stop_gradient(jnp.argmin(d, axis=1))
    negative = candidates[hardest]
    loss = triplet_loss(anchor, positive, negative, margin=margin, squared=squared)
    return loss, negative


class ExemplarModel(nnx.Module):
    """Encoder -> global max-pool -> ONE Dense(code_size) -> L2 normalisation.

    Args:
      in_channels: input channels C.
      code_size: embedding size (original: 1024).
      spatial_dims: 3 (volumes) or 2 (images).
      encoder: the `EncoderConfig` (shared by every model, `config.model`); the head computes in
        its `dtype`.
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `x [N, *spatial, C]` -> unit-norm embeddings `[N, code_size]` float32.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        code_size: int,
        spatial_dims: int = 3,
        encoder: EncoderConfig = EncoderConfig(),
        rngs: nnx.Rngs,
    ):
        self.encoder = Encoder3D(
            in_channels, spatial_dims=spatial_dims, **encoder.kwargs(), rngs=rngs
        )
        # The single projection shared by anchor, positive and negative (the original: three).
        self.projection = nnx.Linear(
            self.encoder.bottom_filters,
            int(code_size),
            dtype=encoder.dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        features, _ = self.encoder(x, train=train, rngs=rngs)
        z = self.projection(global_max_pool(features)).astype(jnp.float32)
        # eps inside the sqrt: a finite gradient even for a zero code.
        return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)


def loss_fn(
    model: ExemplarModel,
    volumes: jax.Array,
    key: jax.Array,
    *,
    margin: float,
    squared: bool = True,
    batch_hard: bool = False,
    augment_positive: bool = True,
    augment_kwargs: Mapping[str, Any] | None = None,
    training: bool = True,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Exemplar triplet loss on a batch: triplets built on device, then embedded and compared.

    Args:
      model: an `ExemplarModel`.
      volumes: `[B, *spatial, C]` float, B >= 2.
      key: `jax.random` key for the augmentations and the negatives.
      margin: alpha of the triplet loss.
      squared: static; squared Euclidean distances if True, plain Euclidean ones if False.
      batch_hard: static; hardest negatives (`batch_hard_triplet_loss`) instead of the random
        derangement.
      augment_positive, augment_kwargs: static, see `make_triplets`.
      training: static; model train mode (dropout).
      dropout_key: key for dropout; required if `training` and the model has dropout > 0.

    Returns:
      `(loss, metrics)`: float32 scalar, and float32 scalars `{'loss', 'triplet_accuracy'
      (fraction of anchors with d(a, p) < d(a, n)), 'd_pos', 'd_neg' (mean distances d)}`.
    """
    anchors, positives, _, negative_index = make_triplets(
        volumes, key, augment_positive=augment_positive, augment_kwargs=augment_kwargs
    )
    b = volumes.shape[0]
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    # One encoder call for both views (negatives are gathered from the positives' embeddings).
    codes = model(jnp.concatenate([anchors, positives], axis=0), train=training, rngs=rngs)
    a, p = codes[:b], codes[b:]
    if batch_hard:
        loss, n = batch_hard_triplet_loss(a, p, margin=margin, squared=squared)
    else:
        n = p[negative_index]
        loss = triplet_loss(a, p, n, margin=margin, squared=squared)
    d_ap, d_an = distance(a, p, squared=squared), distance(a, n, squared=squared)
    metrics = {
        "loss": loss,
        "triplet_accuracy": jnp.mean((d_ap < d_an).astype(jnp.float32)),
        "d_pos": jnp.mean(d_ap),
        "d_neg": jnp.mean(d_an),
    }
    return loss, metrics


def make_task(config, *, in_channels: int):
    """The Exemplar `Task` for the generic pretraining loop (see `ssl3d_jax.tasks.Task`).

    Reads `config.model` (filters, bottom_filters, num_groups, dropout_rate, compute_dtype,
    remat), `config.data` (spatial_dims) and `config.exemplar` (code_size, margin,
    squared_distance, batch_hard, augment_positive and the `AUGMENT_KEYS` of `augment`). The loss
    runs in train mode; its dropout key is split off the step key.

    The negatives come from the batch (`Task.couples_batch`): with
    `config.pretrain.grad_accum_steps = k > 1` from each micro-batch of `batch_size / k` volumes
    alone (see `ssl3d_jax.train.step`), which changes the task; `get_task` warns, and refuses
    micro-batches of fewer than 2 volumes (`Task.min_batch`).
    """
    cfg = config.exemplar
    spatial_dims = check_spatial_dims(config.data.spatial_dims)
    code_size = int(cfg.code_size)
    if code_size < 1:
        raise ConfigError(f"config.exemplar.code_size={cfg.code_size!r}: expected >= 1.")
    margin = float(cfg.margin)
    squared = bool(cfg.squared_distance)
    if margin <= 0:
        raise ConfigError(f"config.exemplar.margin={cfg.margin!r}: expected > 0.")
    augment_kwargs = {k: float(cfg[k]) for k in AUGMENT_KEYS}
    check_augment_params(**augment_kwargs, prefix="config.exemplar.")
    batch_hard, augment_positive = bool(cfg.batch_hard), bool(cfg.augment_positive)
    encoder = EncoderConfig.from_config(config.model)
    uses_dropout = encoder.dropout_rate > 0

    def build_model(rngs: nnx.Rngs) -> ExemplarModel:
        return ExemplarModel(
            in_channels,
            code_size=code_size,
            spatial_dims=spatial_dims,
            encoder=encoder,
            rngs=rngs,
        )

    loss = pretext_loss(
        loss_fn,
        task="exemplar",
        spatial_dims=spatial_dims,
        uses_dropout=uses_dropout,
        margin=margin,
        squared=squared,
        batch_hard=batch_hard,
        augment_positive=augment_positive,
        augment_kwargs=augment_kwargs,
    )

    input_spec = {
        "task": "exemplar",
        "in_channels": in_channels,
        "spatial_dims": spatial_dims,
        "code_size": code_size,
        "margin": margin,
        "squared_distance": squared,
        "batch_hard": batch_hard,
        "augment_positive": augment_positive,
        "augment": augment_kwargs,
    }

    # Chance: embeddings that tell no volume apart give d(a, p) = d(a, n), i.e. the loss is the
    # margin, and d(a, p) < d(a, n) for half of the triplets (a coin flip).
    def sample(volumes, key):
        a, p, n, index = make_triplets(
            volumes, key, augment_positive=augment_positive, augment_kwargs=augment_kwargs
        )
        return {"anchors": a, "positives": p, "negatives": n, "negative_index": index}

    def plot(s, volumes, *, names, channel):
        from ssl3d_jax import figures

        return figures.plot_exemplar(
            volumes[0],
            s["anchors"][0],
            s["positives"][0],
            s["negatives"][0],
            negative_source=f"case {names[int(s['negative_index'][0])]}",
            channel=channel,
        )

    return Task(
        name="exemplar",
        build_model=build_model,
        loss=loss,
        input_spec=input_spec,
        chance={"loss": margin, "triplet_accuracy": 0.5},
        sample=sample,
        plot=plot,
        couples_batch=True,
        min_batch=2,  # a volume's negative is another volume of its (micro-)batch
    )


TASK = TaskDef(name="exemplar", make=make_task, order=4)
