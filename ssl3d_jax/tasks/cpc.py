"""Contrastive Predictive Coding (CPC) pretext task, 3D and 2D (Taleb et al., NeurIPS 2020,
section 3; original `algorithms/cpc.py`, `preprocessing/preprocess_cpc.py`).

The task: cut a volume into a P x P x P grid of patches (an image into P x P), encode every patch
to a latent `z` (shared encoder -> global max pool -> Dense(code_size)). Prediction runs along the
first spatial array axis ("rows"). The last context row is `e = P // 2 - 1`; for every column
`c` (the remaining grid coordinates, `(y, z)` in 3D, `x` in 2D) the context is a pyramid over the
rows `0..e-1`: row `r` contributes the neighbourhood of half-width `e - r` around `c` (out-of-range
neighbours mirror-reflected: index -1 -> 1, P -> P - 2), followed by the patch `(e, c)` itself.
For P = 4 in 3D this is the original's 3 x 3 neighbourhood of row 0 then patch `(1, y, z)`:
10 latents. A GRU (last state) summarises the context latents, in that order, into `c_t`; one
linear predictor per future term k gives `W_k c_t`, the predicted latent of patch `(e + k, c)`,
k = 1 .. P - 1 - e (rows 2 and 3 for P = 4). Each prediction is scored against candidate latents
by dot product, and the loss is InfoNCE (softmax cross-entropy of the true patch's latent among
the candidates).

Paper setting (original `configs/train/cpc_3d.json`): 128^3 volumes, P = 4 with no overlap and no
jitter -> 64 patches of 32^3; code_size 1024; GRU 256 units; 2 prediction terms; Adam lr 1e-4;
batch 32 examples (= 16 columns x (1 positive + 1 negative) = exactly one volume per batch).
Augmentation (train and validation alike): whole-volume random crop to `int(0.95 * D)` and
centred zero-pad back; per patch a flip along axis 0 with probability 1/2, then a random crop to
`int(7/8 * p)` and centred zero-pad back. 2D (`cpc_2d.json`): 224^2 retina images, a 5 x 5 grid
of 50 %-overlapping patches, context = the 3 row-0 neighbours (zeros outside) + patch `(1, c)`,
targets rows 3 and 4 (row 2 skipped because of the overlap), per-patch crop 11/12 + pad, no flip.

Candidate set of InfoNCE (`info_nce`): for the prediction of volume b, column c, term k, the
positive is the latent of the true target patch `(e + k, c)` of volume b; the negatives are EVERY
OTHER patch latent of the GLOBAL batch: all `B * P**n` latents of all volumes on all devices,
minus the positive itself. This includes the other patches of the same volume (other columns,
the context patches, the other target rows of the same column) as well as every patch of every
other volume. The train step runs on global arrays sharded over the 'data' mesh, so the
`[predictions] x [all latents]` score matrix gathers the latents across devices (XLA inserts the
all-gather); the loss is the same on 1 or 8 devices for the same global batch. With gradient
accumulation (`config.pretrain.grad_accum_steps = k > 1`) the loss only ever sees one micro-batch
of B / k volumes, so the candidates are `B / k * P**n` latents: a different, easier task than the
batch of B, not the same gradient computed in pieces (`Task.couples_batch`: `tasks.get_task`
warns).

Deliberate deviations from the original code:
  * Random grid position (`config.cpc.grid_fraction` < 1, `ops/patches.py`): the grid spans only
    that share of each edge, at a random origin per volume. With the original's grid at the
    volume's origin and the anatomy touching every face, a single patch tells which cell it came
    from (its background), so the positive of a prediction can be told from the same volume's
    other patches by position alone (docs/results/shortcut_audit.md). The `paper` size keeps the
    original geometry.
  * InfoNCE over all `B * P**n - 1` in-batch negatives, as the paper describes CPC, instead of
    the original's Keras formulation (one negative target sequence per context, a sigmoid of the
    mean dot product, binary cross-entropy), whose negatives with the shipped batch size all came
    from the same volume (spec sections 1.3, 2.5, 8 #6). One softmax per (volume, column, term),
    not one score per column averaged over the terms. Scores are plain dot products divided by
    `temperature` (1 = the paper's unscaled dot product), not the original's mean over code dims.
  * Every patch is encoded ONCE per step and the context / target sequences are gathered from
    the latents by static indices; the original re-encoded 12 patches for each of the 2 x 16
    examples per volume (context patches duplicated by the mirroring included).
  * All patch sampling and augmentation runs on device inside the jitted step from a `jax.random`
    key (`make_batch`), not in a single-threaded NumPy loader. Its randomness is the original's:
    crop offsets uniform in `[0, size - crop]`, centred zero-pad back (`random_crop_pad`).
  * `training=False` disables all augmentation (and uses centred jitter offsets). The original
    augmented validation batches too; pass `training=True` to reproduce that. The pretraining
    task always uses `training=True`.
  * Batch size counts volumes, not generated examples. The `paper` config uses 8 volumes per
    batch (8 x 64 = 512 candidate latents per prediction) instead of the original's one volume,
    so that the data-parallel batch splits over devices and negatives come from other scans too.
  * 2D: a NON-overlapping P x P grid (optionally jittered; the shared `extract_grid` primitive does
    not implement the original's overlapping mode), out-of-range context neighbours MIRRORED as in
    3D instead of replaced by zero images, and targets are ALL rows after the last context row
    (`e + 1 .. P - 1`; for P = 5: rows 2, 3, 4, three terms) since without overlap nothing leaks
    from row `e` into row `e + 1`. No per-patch flip in 2D (as the original); the whole-image
    crop is a no-op (the original 2D configs set crop_size = D).
  * A single grid geometry for every P >= 2 (the pyramid above); P = 2 and 3 have `e = 0`, so the
    context is the single patch `(0, c)`.
  * The encoder has no final max-pool; features are `global_max_pool`ed over the bottom block
    (identical to the original's pool + flatten for 32^3 patches). GroupNorm instead of BatchNorm.
    The GRU is Flax's `GRUCell` (Keras' default GRU has a second, recurrent bias; Flax's has one
    input bias): same gating, slightly fewer parameters.
  * Param tree: `params['encoder']` is exactly the U-Net contracting path (what finetuning
    restores); the code projection `code`, the GRU `context` and the predictors `predict<k>` sit
    beside it.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, global_max_pool
from ssl3d_jax.ops.augment import flip_where
from ssl3d_jax.ops.patches import check_grid_fraction, grid_starts, patch_shape
from ssl3d_jax.tasks import Task, TaskDef, classification_chance, pretext_loss


__all__ = [
    "last_context_row",
    "context_indices",
    "target_indices",
    "split_context_targets",
    "random_crop_pad",
    "augment_patch",
    "make_batch",
    "CPCModel",
    "info_nce",
    "loss_fn",
    "make_task",
]


# --------------------------------------------------------------------------------------------
# Grid geometry (static NumPy index tables)
# --------------------------------------------------------------------------------------------


def _check(patches_per_side: int, spatial_dims: int) -> tuple[int, int]:
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ConfigError(
            f"spatial_dims (config.data.spatial_dims) must be 2 or 3, got {spatial_dims!r}."
        )
    if isinstance(patches_per_side, bool) or int(patches_per_side) < 2:
        raise ConfigError(
            f"config.cpc.patches_per_side must be >= 2 (CPC needs at least one context row and "
            f"one row to predict), got {patches_per_side!r}."
        )
    return int(patches_per_side), int(spatial_dims)


def last_context_row(patches_per_side: int) -> int:
    """`e = P // 2 - 1` (clamped at 0): the last grid row of the context (1 for P = 4 and 5)."""
    return max(int(patches_per_side) // 2 - 1, 0)


def _reflect(i: int, p: int) -> int:
    # The original's mirror: -k -> k, p - 1 + k -> p - 1 - k (np.pad mode='reflect').
    if i < 0:
        i = -i
    if i >= p:
        i = 2 * (p - 1) - i
    return i


def _flat(row: int, column: tuple[int, ...], p: int) -> int:
    index = row
    for c in column:
        index = index * p + c
    return index


def _columns(p: int, n: int) -> list[tuple[int, ...]]:
    return list(itertools.product(range(p), repeat=n - 1))


def context_indices(patches_per_side: int, spatial_dims: int) -> np.ndarray:
    """Grid indices of the context patches of every column, in GRU order.

    Column `c` (row-major over the non-row grid axes: `(y, z)` in 3D, `x` in 2D) gets, for each
    row `r = 0 .. e-1` (`e = last_context_row(P)`), the neighbourhood `c - (e - r) .. c + (e - r)`
    (per axis, row-major, out-of-range entries mirror-reflected), then the patch `(e, c)`.

    Returns:
      `[P**(n-1), T]` int32 NumPy array of row-major grid indices in `[0, P**n)`;
      `T = 10` for P = 4 in 3D, `T = 4` for P = 4 or 5 in 2D.
    """
    p, n = _check(patches_per_side, spatial_dims)
    e = last_context_row(p)
    table = []
    for column in _columns(p, n):
        seq = []
        for r in range(e):
            h = e - r
            for offset in itertools.product(range(-h, h + 1), repeat=n - 1):
                neighbour = tuple(_reflect(c + o, p) for c, o in zip(column, offset))
                seq.append(_flat(r, neighbour, p))
        seq.append(_flat(e, column, p))
        table.append(seq)
    return np.asarray(table, dtype=np.int32)


def target_indices(patches_per_side: int, spatial_dims: int) -> np.ndarray:
    """Grid indices of the patches to predict: rows `e + 1 .. P - 1` of each column.

    Returns:
      `[P**(n-1), K]` int32 NumPy array, `K = P - 1 - e` prediction terms (2 for P = 4).
    """
    p, n = _check(patches_per_side, spatial_dims)
    e = last_context_row(p)
    table = [[_flat(r, column, p) for r in range(e + 1, p)] for column in _columns(p, n)]
    return np.asarray(table, dtype=np.int32)


def split_context_targets(
    x: jax.Array, *, patches_per_side: int, spatial_dims: int
) -> tuple[jax.Array, jax.Array]:
    """Gathers the context and target sequences of every column from per-patch values.

    Args:
      x: `[B, P**n, ...]` anything per grid patch (patches, latents), row-major grid order.

    Returns:
      `context [B, P**(n-1), T, ...]` and `targets [B, P**(n-1), K, ...]` (see `context_indices`,
      `target_indices`).
    """
    ctx = context_indices(patches_per_side, spatial_dims)
    tgt = target_indices(patches_per_side, spatial_dims)
    if x.shape[1] != int(patches_per_side) ** int(spatial_dims):
        raise ConfigError(
            f"split_context_targets: expected {patches_per_side}**{spatial_dims} patches on axis "
            f"1, got shape {x.shape}."
        )
    return jnp.take(x, jnp.asarray(ctx), axis=1), jnp.take(x, jnp.asarray(tgt), axis=1)


# --------------------------------------------------------------------------------------------
# Patches and augmentation (on device)
# --------------------------------------------------------------------------------------------


def _crop_starts(key: jax.Array, spatial: tuple[int, ...], crop: tuple[int, ...]) -> jax.Array:
    """`[n]` int32 crop corner, uniform in `[0, s - c]` per axis (`random_crop_pad`'s draw)."""
    room = jnp.asarray([s - c for s, c in zip(spatial, crop)], jnp.int32)
    return jax.random.randint(key, (len(spatial),), 0, room + 1, dtype=jnp.int32)


def random_crop_pad(x: jax.Array, key: jax.Array, *, crop_shape: tuple[int, ...]) -> jax.Array:
    """Random crop to `crop_shape`, then zero-pad back to the input shape, centred.

    The original's `crop_3d` + `pad_to_final_size_3d`: crop offsets uniform in `[0, s - c]` per
    axis, padding `(s - c) // 2` before and the rest after. Net effect: the content is shifted by
    up to `s - c` voxels and gets a zero border.

    Args:
      x: `[*spatial, C]`.
      key: `jax.random` key.
      crop_shape: static, one entry per spatial axis, each in `[1, s]`.

    Returns:
      same shape and dtype as `x`.
    """
    spatial = tuple(x.shape[:-1])
    crop_shape = tuple(int(c) for c in crop_shape)
    if crop_shape == spatial:
        return x
    starts = _crop_starts(key, spatial, crop_shape)
    crop = lax.dynamic_slice(x, (*starts, jnp.zeros((), jnp.int32)), (*crop_shape, x.shape[-1]))
    pads = [((s - c) // 2, s - c - (s - c) // 2) for s, c in zip(spatial, crop_shape)]
    return jnp.pad(crop, [*pads, (0, 0)])


def _crop_shape(spatial: tuple[int, ...], fraction: float) -> tuple[int, ...]:
    return tuple(max(int(s * fraction), 1) for s in spatial)


def augment_patch(patch: jax.Array, key: jax.Array, *, patch_crop: float, flip: bool) -> jax.Array:
    """The original's per-patch augmentation: flip along array axis 0 with probability 1/2 (if
    `flip`), then `random_crop_pad` to `int(patch_crop * p)` per axis.

    Args:
      patch: `[*patch_spatial, C]`.
      key: `jax.random` key.
      patch_crop: static fraction in (0, 1]; 1 disables the crop.
      flip: static.
    """
    key_flip, key_crop = jax.random.split(key)
    if flip:
        patch = flip_where(patch, (jax.random.bernoulli(key_flip),), (0,))
    crop = _crop_shape(patch.shape[:-1], patch_crop)
    return random_crop_pad(patch, key_crop, crop_shape=crop)


def make_batch(
    volumes: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    volume_crop: float = 1.0,
    patch_crop: float = 1.0,
    flip: bool = False,
    training: bool,
    grid_fraction: float = 1.0,
) -> jax.Array:
    """All grid patches of every volume (image), augmented as the original's CPC preprocessing.

    Per volume: `random_crop_pad` to `int(volume_crop * size)` (whole-volume shift + zero border),
    `extract_grid` (random jitter offsets when training), then `augment_patch` per patch. With
    `training=False` no augmentation at all and centred jitter offsets. Computed as one fused
    gather per volume with the same random draws (`_volume_patches`): measured 2.9x faster than
    running the steps one after another at the paper's 8 x 128^3 x 4, 9x at the default 2 x 40^3.

    Args:
      volumes: `[B, *spatial, C]` (3 or 2 spatial axes).
      key: `jax.random` key, split per volume.
      patches_per_side: P, static.
      jitter: J >= 0, static; patches are `size // P - J` per axis (`floor(grid_fraction * size)
        // P - J` for a grid smaller than the input).
      volume_crop, patch_crop: static fractions in (0, 1] (original 3D: 0.95, 7/8; 2D: 1, 11/12).
      flip: static; per-patch flip along array axis 0 (original: 3D only).
      training: static.
      grid_fraction: static share of each edge the grid spans; < 1 puts the grid at a random
        origin per volume when training, centred otherwise (`ops.patches.grid_starts`); 1 is the
        original's grid at the origin.

    Returns:
      `[B, P**n, *patch_spatial, C]`, dtype of `volumes`, row-major grid order.
    """
    for name, f in (("volume_crop", volume_crop), ("patch_crop", patch_crop)):
        if not 0.0 < float(f) <= 1.0:
            raise ConfigError(f"config.cpc.{name} must be in (0, 1], got {f!r}.")
    one = functools.partial(
        _volume_patches,
        patches_per_side=patches_per_side,
        jitter=jitter,
        volume_crop=volume_crop,
        patch_crop=patch_crop,
        flip=flip,
        training=training,
        grid_fraction=grid_fraction,
    )
    return jax.vmap(one)(volumes, jax.random.split(key, volumes.shape[0]))


def _volume_patches(
    volume: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    volume_crop: float,
    patch_crop: float,
    flip: bool,
    training: bool,
    grid_fraction: float = 1.0,
) -> jax.Array:
    """`make_batch` for one volume `[*spatial, C]` -> `[P**n, *patch, C]`, as ONE gather.

    The chain crop-pad(volume) -> grid patch -> flip -> crop-pad(patch) only moves voxels and
    writes zeros, and every step is a per-axis shift (the flip a reflection) of the coordinates.
    So output voxel `q` of patch `p` reads source voxel `src_a = A[p, a] +- q_a` per axis, or is
    zero where it falls into either padding. The random draws are exactly those of the step-wise
    version (`random_crop_pad`, `extract_grid`, `augment_patch`: same keys, same order), the
    indices come from iotas inside the gather's fusion: one read of the used voxels and one write
    of the patches, instead of ~3 passes over the data (the volume crop-pad alone rewrote the whole
    volume). Bit-identical to the step-wise version (tests/test_cpc_fast.py).
    """
    n = volume.ndim - 1
    spatial = tuple(int(s) for s in volume.shape[:-1])
    channels = volume.shape[-1]
    k_vol, k_grid, k_patch = jax.random.split(key, 3)
    if int(np.prod(spatial)) >= 2**31:
        raise ConfigError(f"CPC: {spatial} voxels per input overflow int32 gather indices.")
    grid = dict(patches_per_side=patches_per_side, jitter=jitter, grid_fraction=grid_fraction)
    pshape = patch_shape(volume.shape, **grid)
    starts = grid_starts(volume.shape, k_grid, training=training, **grid)  # [N, n]
    count = starts.shape[0]

    vcrop = _crop_shape(spatial, volume_crop) if training else spatial
    pcrop = _crop_shape(pshape, patch_crop) if training else pshape
    vstart = _crop_starts(k_vol, spatial, vcrop) if vcrop != spatial else jnp.zeros((n,), jnp.int32)
    flips = jnp.zeros((count,), bool)
    pstart = jnp.zeros((count, n), jnp.int32)
    if training:

        def patch_draws(k: jax.Array) -> tuple[jax.Array, jax.Array]:
            key_flip, key_crop = jax.random.split(k)  # as augment_patch
            flipped = jax.random.bernoulli(key_flip) if flip else jnp.zeros((), bool)
            t = _crop_starts(key_crop, pshape, pcrop) if pcrop != pshape else pstart[0]
            return flipped, t

        flips, pstart = jax.vmap(patch_draws)(jax.random.split(k_patch, count))

    grid = (count, *pshape)
    col = (count,) + (1,) * n
    masked = vcrop != spatial or pcrop != pshape
    valid = jnp.ones(grid, bool)
    index = jnp.zeros(grid, jnp.int32)
    for a in range(n):
        q = lax.broadcasted_iota(jnp.int32, grid, a + 1)
        p_lo = (pshape[a] - pcrop[a]) // 2  # patch crop-pad: q reads u of the flipped patch
        u = q - p_lo + pstart[:, a].reshape(col)
        if a == 0 and flip and training:
            u = jnp.where(flips.reshape(col), pshape[0] - 1 - u, u)
        x = starts[:, a].reshape(col) + u  # coordinate in the crop-padded volume
        v_lo = (spatial[a] - vcrop[a]) // 2
        if masked:
            valid &= (q >= p_lo) & (q < p_lo + pcrop[a]) & (x >= v_lo) & (x < v_lo + vcrop[a])
        index = index * spatial[a] + (x - v_lo + vstart[a])
    if masked:
        index = jnp.where(valid, index, 0)  # any in-bounds row: its value is replaced by zero
    dims = lax.GatherDimensionNumbers(
        offset_dims=(n + 1,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    out = lax.gather(
        volume.reshape(-1, channels),
        index[..., None],
        dims,
        (1, channels),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    if masked:
        out = jnp.where(valid[..., None], out, jnp.zeros((), volume.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class CPCModel(nnx.Module):
    """Patch encoder (`.encoder`) + code projection + GRU context network + linear predictors.

    Args:
      in_channels: input channels C.
      patches_per_side: P (fixes the context / target index tables and the number of terms K).
      spatial_dims: 3 (volumes) or 2 (images).
      code_size: latent size (original: 1024).
      gru_units: GRU width (original: 256).
      encoder: the `EncoderConfig` (shared by every model, `config.model`); the head computes in
        its `dtype`.
      rngs: `nnx.Rngs` for the initialisers.

    Attributes:
      encoder: the U-Net contracting path (the only part handed to finetuning).
      code: Dense(bottom_filters -> code_size), linear (the original's g_enc top).
      context: `nnx.RNN(nnx.GRUCell(code_size, gru_units))`, the original's g_ar.
      predict0 .. predict{K-1}: Dense(gru_units -> code_size), one per future term.

    Call:
      `patches [B, P**n, *patch, C]` -> `(predictions [B, P**(n-1), K, code_size],
      latents [B, P**n, code_size])`, in the compute dtype (float32 by default).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        patches_per_side: int,
        spatial_dims: int = 3,
        code_size: int = 1024,
        gru_units: int = 256,
        encoder: EncoderConfig = EncoderConfig(),
        rngs: nnx.Rngs,
    ):
        p, n = _check(patches_per_side, spatial_dims)
        self.patches_per_side, self.spatial_dims = p, n
        self.num_terms = p - 1 - last_context_row(p)
        self.gru_units = int(gru_units)
        self.encoder = Encoder3D(in_channels, **encoder.kwargs(), spatial_dims=n, rngs=rngs)
        precision = dict(dtype=encoder.dtype, param_dtype=jnp.float32)
        self.code = nnx.Linear(self.encoder.bottom_filters, int(code_size), **precision, rngs=rngs)
        # rngs=False: the RNN then carries no RNG state (only Params), so the model splits into
        # (graphdef, params) alone; the GRU has no dropout to feed.
        self.context = nnx.RNN(
            nnx.GRUCell(int(code_size), self.gru_units, **precision, rngs=rngs), rngs=False
        )
        for k in range(self.num_terms):
            setattr(
                self,
                f"predict{k}",
                nnx.Linear(self.gru_units, int(code_size), **precision, rngs=rngs),
            )

    def encode(
        self, patches: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """`[M, *patch, C]` -> latents `[M, code_size]`."""
        features, _ = self.encoder(patches, train=train, rngs=rngs)
        return self.code(global_max_pool(features))

    def predict(self, context: jax.Array) -> jax.Array:
        """Context latents `[R, T, code_size]` (GRU order) -> predictions `[R, K, code_size]`."""
        carry = jnp.zeros((context.shape[0], self.gru_units), context.dtype)
        state = self.context(context, initial_carry=carry)[:, -1]  # last GRU state
        return jnp.stack(
            [getattr(self, f"predict{k}")(state) for k in range(self.num_terms)], axis=1
        )

    def __call__(
        self, patches: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, jax.Array]:
        b, n = patches.shape[:2]
        latents = self.encode(
            patches.reshape(b * n, *patches.shape[2:]), train=train, rngs=rngs
        ).reshape(b, n, -1)
        context, _ = split_context_targets(
            latents, patches_per_side=self.patches_per_side, spatial_dims=self.spatial_dims
        )
        cols, t = context.shape[1:3]
        predictions = self.predict(context.reshape(b * cols, t, -1))
        return predictions.reshape(b, cols, self.num_terms, -1), latents


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def info_nce(
    predictions: jax.Array,
    latents: jax.Array,
    positive_index: jax.Array,
    *,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """InfoNCE of predicted latents against ALL latents of the batch.

    Candidates of every prediction: the `B * N` latents of the whole (global) batch. The positive
    of prediction `(b, m)` is `latents[b, positive_index[..., m]]`; every other latent (same
    volume or not) is a negative. Scores are `<prediction, latent> / temperature`, and the loss is
    the softmax cross-entropy of the positive among the `B * N` candidates.

    Args:
      predictions: `[B, M, E]` float.
      latents: `[B, N, E]` float.
      positive_index: int, `[M]` (same for every volume) or `[B, M]`, values in `[0, N)`: the
        index of the positive within its own volume's latents.
      temperature: static positive float.

    Returns:
      `(loss, accuracy)`: float32 scalars; mean cross-entropy over the `B * M` predictions, and
      the fraction whose highest-scoring candidate is the positive.
    """
    b, m, _ = predictions.shape
    n = latents.shape[1]
    flat = latents.reshape(b * n, -1).astype(jnp.float32)
    # Global batch: under a 'data'-sharded jit this contraction all-gathers `flat` across devices.
    scores = jnp.einsum("bme,ce->bmc", predictions.astype(jnp.float32), flat) / temperature
    positive = jnp.broadcast_to(jnp.asarray(positive_index, jnp.int32), (b, m))
    labels = positive + n * jnp.arange(b, dtype=jnp.int32)[:, None]  # index into the B * N
    loss = optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean()
    accuracy = (jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32).mean()
    return loss, accuracy


def loss_fn(
    model: CPCModel,
    volumes: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    volume_crop: float = 1.0,
    patch_crop: float = 1.0,
    flip: bool = False,
    temperature: float = 1.0,
    training: bool,
    grid_fraction: float = 1.0,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CPC loss on a batch: patches and augmentation on device, encode, GRU, predict, InfoNCE.

    Args:
      model: a `CPCModel` built for the same `patches_per_side` and the input's spatial rank.
      volumes: `[B, *spatial, C]` float.
      key: `jax.random` key for the grid jitter and augmentations.
      patches_per_side, jitter, volume_crop, patch_crop, flip, grid_fraction: see `make_batch`.
      temperature: InfoNCE temperature.
      training: static; augmentation and model train mode (dropout) if True.
      dropout_key: key for dropout; required if `training` and the model has dropout > 0.

    Returns:
      `(loss, metrics)`: float32 scalar InfoNCE, and `{'loss', 'accuracy'}` float32 scalars
      (accuracy: top-1 of the positive among the `B * P**n` candidates).
    """
    patches = make_batch(
        volumes,
        key,
        patches_per_side=patches_per_side,
        jitter=jitter,
        volume_crop=volume_crop,
        patch_crop=patch_crop,
        flip=flip,
        training=training,
        grid_fraction=grid_fraction,
    )
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    predictions, latents = model(patches, train=training, rngs=rngs)
    b, cols, k, e = predictions.shape
    targets = target_indices(patches_per_side, volumes.ndim - 2).reshape(-1)  # [cols * K]
    loss, accuracy = info_nce(
        predictions.reshape(b, cols * k, e), latents, targets, temperature=temperature
    )
    return loss, {"loss": loss, "accuracy": accuracy}


def make_task(config, *, in_channels: int):
    """The CPC `Task` for the generic pretraining loop (see `ssl3d_jax.tasks.Task`).

    Reads `config.model` (filters, bottom_filters, num_groups, dropout_rate, compute_dtype,
    remat), `config.data` (spatial_dims) and `config.cpc` (patches_per_side, jitter,
    grid_fraction, code_size, gru_units, temperature, volume_crop,
    patch_crop, flip_patches), and `config.pretrain` (batch_size, grad_accum_steps) for the
    chance level. The negatives of InfoNCE come from the batch (`Task.couples_batch`: with
    gradient accumulation from each micro-batch alone, and `get_task` warns). The loss always
    augments (`training=True`) and runs the model in train mode; its dropout key is split off the
    step key.
    """
    c = config.cpc
    p, n = _check(int(c.patches_per_side), int(config.data.spatial_dims))
    j = int(c.jitter)
    f = check_grid_fraction(c.grid_fraction, "config.cpc.grid_fraction")
    code_size, gru_units = int(c.code_size), int(c.gru_units)
    temperature = float(c.temperature)
    if not temperature > 0:
        raise ConfigError(f"config.cpc.temperature must be > 0, got {c.temperature!r}.")
    aug = dict(
        volume_crop=float(c.volume_crop), patch_crop=float(c.patch_crop), flip=bool(c.flip_patches)
    )
    for name in ("volume_crop", "patch_crop"):
        if not 0.0 < aug[name] <= 1.0:
            raise ConfigError(f"config.cpc.{name} must be in (0, 1], got {aug[name]!r}.")
    encoder = EncoderConfig.from_config(config.model)
    uses_dropout = encoder.dropout_rate > 0
    accum = int(config.pretrain.grad_accum_steps)

    def build_model(rngs: nnx.Rngs) -> CPCModel:
        return CPCModel(
            in_channels,
            patches_per_side=p,
            spatial_dims=n,
            code_size=code_size,
            gru_units=gru_units,
            encoder=encoder,
            rngs=rngs,
        )

    loss = pretext_loss(
        loss_fn,
        task="CPC",
        spatial_dims=n,
        uses_dropout=uses_dropout,
        patches_per_side=p,
        jitter=j,
        temperature=temperature,
        grid_fraction=f,
        **aug,
    )

    input_spec = {
        "task": "cpc",
        "spatial_dims": n,
        "patches_per_side": p,
        "jitter": j,
        "grid_fraction": f,
        "code_size": code_size,
        "in_channels": in_channels,
    }
    # Chance: uniform scores over the InfoNCE candidates of a prediction, the B * P**n latents of
    # the (micro-)batch that the loss sees.
    candidates = int(config.pretrain.batch_size) // accum * p**n

    def sample(volumes, key):
        patches = make_batch(
            volumes, key, patches_per_side=p, jitter=j, training=True, grid_fraction=f, **aug
        )
        return {"patches": patches}

    def plot(s, volumes, *, names, channel):
        from ssl3d_jax import figures

        centre = (p // 2,) * (n - 1)  # a central column
        return figures.plot_cpc(
            s["patches"][0],
            patches_per_side=p,
            context=context_indices(p, n),
            targets=target_indices(p, n),
            column=int(np.ravel_multi_index(centre, (p,) * (n - 1))),
            channel=channel,
        )

    return Task(
        name="cpc",
        build_model=build_model,
        loss=loss,
        input_spec=input_spec,
        chance=classification_chance(candidates) if candidates > 1 else {},
        sample=sample,
        plot=plot,
        couples_batch=True,
    )


TASK = TaskDef(name="cpc", make=make_task, order=3)
