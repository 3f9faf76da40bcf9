"""3D (and 2D) Jigsaw puzzle pretext task (Taleb et al., NeurIPS 2020, section 3; original
`algorithms/jigsaw.py`, `preprocessing/preprocess_jigsaw.py`, `permutations/`).

The task: cut a volume into a P x P x P grid of (jittered) patches (an image into P x P tiles),
shuffle them with one of K fixed permutations, and let a network predict which permutation was
applied. Output slot s receives original patch `perm[s]` (the original's `patches[perm_k]`), with
patches in row-major grid order (`extract_grid`). A shared encoder embeds every patch (one encoder
call on the `[B * N, ...]` patches), each patch's bottom features are global-max-pooled, the N
feature vectors are concatenated in slot order, and an MLP head gives K-way logits.

Paper setting (original `configs/train/jigsaw_3d.json`): P = 3, jitter 3 on 128^3 volumes ->
27 patches of 39^3; K = 100 permutations of 27; encoder = U-Net contracting path (16..128, bottom
256), features 27 x 256 = 6912 -> `big_fully` (2048, 1024) -> 100-way softmax, categorical
cross-entropy; batch 8, Adam lr 1e-4. 2D (`jigsaw_2d.json`): P = 3 (9 tiles), jitter 8 on 224^2
retina images (jitter 4 on 128^2 pancreas slices), 100 permutations of 9, batch 32, lr 1e-5.

Deliberate deviations from the original code:
  * Random grid position (`config.jigsaw.grid_fraction` < 1, `ops/patches.py`): the grid spans
    only that share of each edge, at a random origin per volume. The original's grid sat at the
    volume's origin, so with the anatomy resized to touch every face each patch alone showed
    which cell it came from (how much background, and where), and the puzzle could be solved
    patch by patch without relating patches to each other (docs/results/shortcut_audit.md). The
    `paper` size keeps the original geometry, where the audit finds the same shortcut.
  * Permutation set: computed by `permutation_set` (greedy max-min Hamming selection from a seeded
    pool of random candidates, see there) instead of shipped files. The original 3D set was 100
    independent random permutations of 27 (min pairwise Hamming distance 19), with no max-Hamming
    selection despite the paper's description; the 2D set was Noroozi's max-average set (min 2).
    Ours reaches min 24 (3D) and min 6 (2D) for 100 permutations, so no two classes differ by
    just a couple of swapped patches.
  * Puzzles are built on device inside the jitted train step from a `jax.random` key
    (`make_batch`), not by a NumPy generator on the host.
  * Puzzles per volume (`config.jigsaw.puzzles_per_volume`, M): the original shuffled each volume
    once per step. With M > 1 a volume's patches are cut and encoded once and M distinct
    permutations of the set are applied to the encoded patches, each a puzzle of its own for the
    head. This equals encoding M shuffled copies (the encoder sees one patch at a time), at the
    cost of one. With the grid at a random origin one puzzle per volume never left chance
    (3000 steps x 4 volumes at 40³); 64 per volume learned within a few hundred steps: 4 labels
    a step for a 100-way problem is too noisy a gradient (docs/results/pretext_lr_search.md,
    "Jigsaw: many puzzles per volume").
  * `training` selects the crop: random jitter offsets when True, centre offsets when False (the
    original's validation mode, the only pretext task where it had one). The pretraining loss
    (`make_task`) always uses training=True.
  * The encoder has no final max-pool; per-patch features are `global_max_pool`ed over the bottom
    block (identical to the original's final pool + flatten for a 2^3 bottom, and works for any
    patch size). GroupNorm / LayerNorm replace BatchNorm (see `models/layers.py`,
    `models/heads.py`); the configs use no dropout (the original: 0.5 in every block and head
    layer), as for the other tasks.
  * The model returns logits; the softmax is inside the float32 cross-entropy.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.heads import MLPHead
from ssl3d_jax.models.layers import check_spatial_dims
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, global_max_pool
from ssl3d_jax.ops.patches import check_grid_fraction, extract_grid
from ssl3d_jax.tasks import Task, TaskDef, classification_chance, pretext_loss

__all__ = [
    "sample_puzzles",
    "permutation_set",
    "num_classes",
    "sample_puzzle",
    "make_batch",
    "JigsawModel",
    "loss_fn",
    "make_task",
]

# Random candidates per greedy step's pool. Measured for 100 permutations (seeds 0, 1): pools of
# 1,000 to 50,000, and for 9 patches even all 9! = 362,880 permutations, all reach the same minimum
# distance (24 of 27, 6 of 9); 10,000 takes ~40 ms for 27 patches.
_POOL_SIZE = 10_000


@functools.cache
def permutation_set(num_permutations: int, num_patches: int, seed: int = 0) -> np.ndarray:
    """A set of permutations with a large minimum pairwise Hamming distance.

    Greedy max-min selection: a pool of `_POOL_SIZE` (10,000) distinct-by-chance random
    permutations is drawn from `np.random.default_rng(seed)` (all `num_patches!` permutations, in
    random order, when that is not larger than the pool). The first pool entry is taken; each next
    permutation is the pool entry maximising its minimum Hamming distance (number of differing
    positions) to those already chosen, ties broken by the largest summed distance, then by the
    lowest pool index. Deterministic for a given seed; cached (the returned array is read-only).

    Achieved for seed 0 (pairwise Hamming distance over all pairs):
      * (100, 27): min 24, mean 26.20. The original 3D set (100 independent random permutations)
        has min 19, mean 26.0; 100 random permutations from `default_rng(0)` have min 21.
      * (100, 9): min 6, mean 8.08. The original 2D set (Noroozi-style max-average selection) has
        min 2, mean 8.08; 100 random permutations from `default_rng(0)` have min 3.

    Args:
      num_permutations: K >= 1, the number of permutations (= jigsaw classes).
      num_patches: N >= 2, the length of each permutation.
      seed: NumPy seed of the candidate pool.

    Returns:
      `[num_permutations, num_patches]` int32 numpy array, unique rows, each a permutation of
      `range(num_patches)`.

    Raises:
      ConfigError: if K < 1, N < 2, K > N! or K exceeds the candidate pool.
    """
    k, n = int(num_permutations), int(num_patches)
    if n < 2:
        raise ConfigError(f"jigsaw needs at least 2 patches to shuffle, got num_patches={n}.")
    n_all = math.factorial(n)
    if k < 1 or k > min(n_all, _POOL_SIZE):
        raise ConfigError(
            f"jigsaw.num_permutations={k}: expected 1 <= num_permutations <= "
            f"min({n}!, {_POOL_SIZE}) for {n} patches."
        )
    rng = np.random.default_rng(seed)
    if n_all <= _POOL_SIZE:
        pool = np.asarray(list(itertools.permutations(range(n))), dtype=np.int16)
        pool = pool[rng.permutation(n_all)]
    else:
        pool = rng.permuted(np.tile(np.arange(n, dtype=np.int16), (_POOL_SIZE, 1)), axis=1)
    chosen = [0]
    min_dist = (pool != pool[0]).sum(axis=1)  # [pool] int: min distance to the chosen set
    sum_dist = min_dist.astype(np.int64)
    for _ in range(k - 1):
        # Lexicographic (min, sum) as one integer: sum_dist < k * n + 1 always. Already chosen
        # entries (and duplicates of them) have min_dist 0 and lose to any entry that differs.
        score = min_dist.astype(np.int64) * (k * n + 1) + sum_dist
        i = int(np.argmax(score))
        chosen.append(i)
        d = (pool != pool[i]).sum(axis=1)
        np.minimum(min_dist, d, out=min_dist)
        sum_dist += d
    perms = pool[chosen].astype(np.int32)
    if len(np.unique(perms, axis=0)) != k:
        # Only when the pool holds fewer than k distinct permutations (astronomically unlikely).
        raise ConfigError(f"jigsaw.permutation_seed={seed}: pool too small for {k} permutations.")
    perms.setflags(write=False)
    return perms


def num_classes(num_permutations: int) -> int:
    """Number of jigsaw classes: one per permutation."""
    return int(num_permutations)


def _check_grid(patches_per_side: int) -> None:
    if patches_per_side < 2:
        raise ConfigError(
            f"jigsaw.patches_per_side must be >= 2 (a grid of >= 2 patches per axis), got "
            f"{patches_per_side}."
        )


def _as_permutations(permutations, num_patches: int) -> jax.Array:
    perms = jnp.asarray(permutations, dtype=jnp.int32)
    if perms.ndim != 2 or perms.shape[1] != num_patches:
        raise ConfigError(
            f"jigsaw permutations must have shape [K, {num_patches}] for this grid, got "
            f"{perms.shape}."
        )
    return perms


def sample_puzzle(
    volume: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    permutations: np.ndarray | jax.Array,
    training: bool,
    grid_fraction: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One shuffled puzzle and its label from one volume (or image).

    Args:
      volume: `[D, H, W, C]` (3D) or `[H, W, C]` (2D).
      key: a `jax.random` key.
      patches_per_side: P >= 2, static.
      jitter: J >= 0, static.
      permutations: `[K, N]` int, `N = P**spatial_dims` (e.g. `permutation_set(K, N)`).
      training: static; random jitter offsets (and grid origin) if True, centre offsets
        otherwise.
      grid_fraction: static share of each edge the grid spans (`ops.patches.grid_starts`); 1 is
        the original's grid at the origin.

    Returns:
      `shuffled [N, *patch, C]` (dtype of volume) with `shuffled[s] = patches[perm[label][s]]`,
      patches in row-major grid order, and `label` int32 scalar in `[0, K)`.
    """
    patches, labels = sample_puzzles(
        volume,
        key,
        patches_per_side=patches_per_side,
        jitter=jitter,
        permutations=permutations,
        training=training,
        grid_fraction=grid_fraction,
    )
    perms = _as_permutations(permutations, patches.shape[0])
    return patches[perms[labels[0]]], labels[0]


def check_puzzles(puzzles_per_volume: int, num_permutations: int) -> int:
    """`puzzles_per_volume` as an int in `[1, K]`, or a `ConfigError` naming the key."""
    m, k = int(puzzles_per_volume), int(num_permutations)
    if not 1 <= m <= k:
        raise ConfigError(
            f"config.jigsaw.puzzles_per_volume={puzzles_per_volume!r}: expected 1 to "
            f"num_permutations={k} (distinct permutations of one volume's patches)."
        )
    return m


def sample_puzzles(
    volume: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    permutations: np.ndarray | jax.Array,
    training: bool,
    grid_fraction: float = 1.0,
    num_puzzles: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """One volume's patches in grid order and the labels of `num_puzzles` distinct puzzles.

    Puzzle i is `patches[permutations[labels[i]]]`; `JigsawModel.puzzle_logits` applies the
    permutations to the encoded patches. The patches are those of `sample_puzzle` for the same key
    (same offsets); for one puzzle its label is `sample_puzzle`'s too.

    Args:
      volume, key, patches_per_side, jitter, permutations, training, grid_fraction: as
        `sample_puzzle`.
      num_puzzles: M in `[1, K]`, static; distinct labels in random order.

    Returns:
      `patches [N, *patch, C]` in row-major grid order (dtype of volume), `labels [M]` int32 in
      `[0, K)`.
    """
    _check_grid(patches_per_side)
    n = patches_per_side ** (volume.ndim - 1)
    perms = _as_permutations(permutations, n)
    m = check_puzzles(num_puzzles, perms.shape[0])
    key_grid, key_label = jax.random.split(key)
    patches = extract_grid(
        volume,
        key_grid,
        patches_per_side=patches_per_side,
        jitter=jitter,
        training=training,
        grid_fraction=grid_fraction,
    )
    if m == 1:  # sample_puzzle's draw
        labels = jax.random.randint(key_label, (), 0, perms.shape[0], dtype=jnp.int32)[None]
    else:
        labels = jax.random.permutation(key_label, perms.shape[0])[:m].astype(jnp.int32)
    return patches, labels


def make_batch(
    volumes: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    permutations: np.ndarray | jax.Array,
    training: bool,
    grid_fraction: float = 1.0,
    num_puzzles: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`sample_puzzle` (or `sample_puzzles`) for every volume of a batch, each with its own key.

    Args:
      volumes: `[B, D, H, W, C]` (3D) or `[B, H, W, C]` (2D).
      key: a `jax.random` key, split into B keys.
      patches_per_side, jitter, permutations, training, grid_fraction: as `sample_puzzle`.
      num_puzzles: None: one shuffled puzzle per volume (`sample_puzzle`); M: `sample_puzzles`.

    Returns:
      None: `shuffled [B, N, *patch, C]` (dtype of volumes), `labels [B]` int32 in `[0, K)`.
      M: `patches [B, N, *patch, C]` in grid order, `labels [B, M]` int32 in `[0, K)`.
    """
    keys = jax.random.split(key, volumes.shape[0])
    kw = dict(
        patches_per_side=patches_per_side,
        jitter=jitter,
        permutations=permutations,
        training=training,
        grid_fraction=grid_fraction,
    )
    if num_puzzles is None:
        sample = functools.partial(sample_puzzle, **kw)
    else:
        sample = functools.partial(sample_puzzles, **kw, num_puzzles=num_puzzles)
    return jax.vmap(sample)(volumes, keys)


class JigsawModel(nnx.Module):
    """Shared per-patch encoder + MLP head over the concatenated patch features.

    Args:
      in_channels: input channels C.
      num_patches: N, patches per puzzle (`P**spatial_dims`).
      num_permutations: K, the number of classes.
      encoder: the `EncoderConfig` (shared by every model, `config.model`); the head computes in
        its `dtype`.
      head_hidden: hidden widths of the head (original `big_fully`: 2048, 1024).
      head_dropout: dropout rate of the head (original: 0.5).
      spatial_dims: 3 (volumes) or 2 (images), passed on to the encoder.
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `patches [B, N, *patch, C]` float (shuffled: slot order) -> logits `[B, K]` float32.
      `puzzle_logits(patches [B, N, *patch, C] in grid order, slots [B, M, N] int)` -> logits
      `[B, M, K]` float32: puzzle i of example b puts grid patch `slots[b, i, s]` in slot s;
      `model(patches[b][slots[b, i]])` for each puzzle, with every patch encoded once.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        num_patches: int,
        num_permutations: int,
        encoder: EncoderConfig = EncoderConfig(),
        head_hidden: Sequence[int] = (2048, 1024),
        head_dropout: float = 0.0,
        spatial_dims: int = 3,
        rngs: nnx.Rngs,
    ):
        self.num_patches = int(num_patches)
        self.spatial_dims = int(spatial_dims)
        self.encoder = Encoder3D(
            in_channels, **encoder.kwargs(), spatial_dims=self.spatial_dims, rngs=rngs
        )
        self.head = MLPHead(
            self.num_patches * self.encoder.bottom_filters,
            head_hidden,
            num_classes(num_permutations),
            dropout_rate=head_dropout,
            dtype=encoder.dtype,
            rngs=rngs,
        )

    def __call__(
        self, patches: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        b, n = patches.shape[:2]
        if n != self.num_patches or patches.ndim != self.spatial_dims + 3:
            raise ConfigError(
                f"JigsawModel expects [B, {self.num_patches}, *patch ({self.spatial_dims}-D), C] "
                f"patches, got shape {patches.shape}."
            )
        return self.puzzle_logits(
            patches, jnp.broadcast_to(jnp.arange(n), (b, 1, n)), train=train, rngs=rngs
        )[:, 0]

    def puzzle_logits(
        self,
        patches: jax.Array,
        slots: jax.Array,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        b, n = patches.shape[:2]
        if n != self.num_patches or patches.ndim != self.spatial_dims + 3:
            raise ConfigError(
                f"JigsawModel expects [B, {self.num_patches}, *patch ({self.spatial_dims}-D), C] "
                f"patches, got shape {patches.shape}."
            )
        # One encoder call on all B * N patches: the original's TimeDistributed shared encoder.
        x = patches.reshape(b * n, *patches.shape[2:])
        features, _ = self.encoder(x, train=train, rngs=rngs)
        features = global_max_pool(features).reshape(b, n, features.shape[-1])
        # [B, M, N, F] -> [B * M, N * F]: each puzzle's patch features concatenated in slot order.
        puzzles = jax.vmap(lambda f, s: f[s])(features, slots)
        m = slots.shape[1]
        logits = self.head(puzzles.reshape(b * m, -1), train=train, rngs=rngs)
        return logits.reshape(b, m, -1)


def loss_fn(
    model: JigsawModel,
    volumes: jax.Array,
    key: jax.Array,
    *,
    patches_per_side: int,
    jitter: int,
    permutations: np.ndarray | jax.Array,
    training: bool,
    grid_fraction: float = 1.0,
    puzzles_per_volume: int = 1,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Jigsaw loss on a batch: puzzles are built on device, then softmax cross-entropy.

    Args:
      model: a `JigsawModel`.
      volumes: `[B, D, H, W, C]` or `[B, H, W, C]` float.
      key: `jax.random` key for the crops and labels.
      patches_per_side, jitter, permutations, grid_fraction: grid and permutation set (static).
      training: static; random crop jitter (and grid origin) and model train mode (dropout) if
        True.
      puzzles_per_volume: static M; 1 is the original's one shuffled puzzle per volume, M > 1
        distinct permutations of each volume's encoded patches (`sample_puzzles`).
      dropout_key: key for dropout; required if `training` and the model has dropout > 0.

    Returns:
      `(loss, metrics)`: float32 scalar mean cross-entropy over the B * M puzzles, and
      `{'loss', 'accuracy'}` float32 scalars.
    """
    grid = dict(
        patches_per_side=patches_per_side,
        jitter=jitter,
        permutations=permutations,
        training=training,
        grid_fraction=grid_fraction,
    )
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    if int(puzzles_per_volume) == 1:
        puzzles, labels = make_batch(volumes, key, **grid)
        logits = model(puzzles, train=training, rngs=rngs).astype(jnp.float32)
    else:
        patches, labels = make_batch(volumes, key, **grid, num_puzzles=int(puzzles_per_volume))
        slots = _as_permutations(permutations, patches.shape[1])[labels]  # [B, M, N]
        logits = model.puzzle_logits(patches, slots, train=training, rngs=rngs)
        logits, labels = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), labels.ravel()
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def make_task(config, *, in_channels: int):
    """The jigsaw `Task` for the generic pretraining loop (see `ssl3d_jax.tasks.Task`).

    Reads `config.model` (filters, bottom_filters, num_groups, dropout_rate), `config.data`
    (spatial_dims) and `config.jigsaw` (patches_per_side, jitter, grid_fraction,
    num_permutations, permutation_seed, puzzles_per_volume, head_hidden, head_dropout). The
    permutation set is computed here, once. The loss always uses random sub-crops and grid origins
    (`training=True`) and train mode; its dropout key is split off the step key.
    """
    spatial_dims = check_spatial_dims(config.data.spatial_dims)
    p, j = int(config.jigsaw.patches_per_side), int(config.jigsaw.jitter)
    f = check_grid_fraction(config.jigsaw.grid_fraction, "config.jigsaw.grid_fraction")
    _check_grid(p)
    n = p**spatial_dims
    k = int(config.jigsaw.num_permutations)
    seed = int(config.jigsaw.permutation_seed)
    perms = permutation_set(k, n, seed)
    m = check_puzzles(config.jigsaw.puzzles_per_volume, k)
    encoder = EncoderConfig.from_config(config.model)
    head_hidden = tuple(int(h) for h in config.jigsaw.head_hidden)
    head_dropout = float(config.jigsaw.head_dropout)
    uses_dropout = encoder.dropout_rate > 0 or head_dropout > 0

    def build_model(rngs: nnx.Rngs) -> JigsawModel:
        return JigsawModel(
            in_channels,
            num_patches=n,
            num_permutations=k,
            encoder=encoder,
            head_hidden=head_hidden,
            head_dropout=head_dropout,
            spatial_dims=spatial_dims,
            rngs=rngs,
        )

    loss = pretext_loss(
        loss_fn,
        task="jigsaw",
        spatial_dims=spatial_dims,
        uses_dropout=uses_dropout,
        patches_per_side=p,
        jitter=j,
        permutations=perms,
        grid_fraction=f,
        puzzles_per_volume=m,
    )

    input_spec = {
        "task": "jigsaw",
        "spatial_dims": spatial_dims,
        "patches_per_side": p,
        "jitter": j,
        "grid_fraction": f,
        "num_permutations": k,
        "permutation_seed": seed,
        "puzzles_per_volume": m,
        # Identifies the exact set, should the selection algorithm ever change.
        "permutations_sha256": hashlib.sha256(perms.tobytes()).hexdigest(),
        "in_channels": in_channels,
    }

    def sample(volumes, key):
        # One puzzle per volume: what the figure draws.
        puzzles, labels = make_batch(
            volumes,
            key,
            patches_per_side=p,
            jitter=j,
            permutations=perms,
            training=True,
            grid_fraction=f,
        )
        return {"puzzles": puzzles, "labels": labels}

    def plot(s, volumes, *, names, channel):
        from ssl3d_jax import figures

        label = int(s["labels"][0])
        return figures.plot_jigsaw(
            s["puzzles"][0], perms[label], label, patches_per_side=p, channel=channel
        )

    return Task(
        name="jigsaw",
        build_model=build_model,
        loss=loss,
        input_spec=input_spec,
        chance=classification_chance(num_classes(k)),
        sample=sample,
        plot=plot,
    )


TASK = TaskDef(name="jigsaw", make=make_task, order=2)
