"""Rotation prediction pretext task, 3D and 2D (Taleb et al., NeurIPS 2020, section 3; original
`algorithms/rotation.py`, `preprocessing/preprocess_rotation.py:rotate_batch_3d` / `rotate_batch`).

The task: rotate each whole input (no patches) by one of a fixed set of axis-aligned rotations,
drawn uniformly per input, and train encoder + classifier to predict which one.

3D classes (10, the original's table, spec section 2.2), on the spatial axes (0, 1, 2) of a
`[D, D, D, C]` volume; "by k" is `jnp.rot90(volume, k, axes=plane)`:
  * 0: identity;
  * 1, 2, 3: by 1, 2, 3 quarter turns in the (0, 1) plane (about axis 2);
  * 4, 5, 6: by 1, 2, 3 quarter turns in the (1, 2) plane (about axis 0);
  * 7, 8, 9: by 1, 2, 3 quarter turns in the (0, 2) plane (about axis 1).
All ten are proper rotations (signed permutation matrices of determinant +1) and pairwise distinct.
2D classes (4): `jnp.rot90(image, k, axes=(0, 1))` for k = 0..3 on an `[H, H, C]` image.

Paper setting: 3D (`rotation_3d.json`): 128^3 whole volumes, batch 4, Adam lr 1e-4, 1000 epochs;
encoder = U-Net contracting path (16..128, bottom 256) with a final 2x2x2 max-pool, Flatten
(4^3 x 256 = 16384) -> `big_fully` (2048, 1024) -> Dense(10) softmax, categorical cross-entropy.
2D (`rotation_2d.json`, Kaggle retina): 224^2 images, batch 32, lr 1e-5, DenseNet121, Dense(4).

Head input (flatten, not global pooling): the classifier sees `Flatten(max_pool2(bottom))`, the
bottom features max-pooled once more by 2 (ceil) and flattened. Flatten keeps the spatial layout of
the features, which is what tells orientations apart (where the anatomy sits, not only what is
there; a global pool would throw that away). The extra 2x pool is the original's final max-pool,
which our encoder dropped (see `models/unet.py`); keeping it here gives exactly the original's
4^3 x 256 = 16384 head inputs at 128^3, where flattening the 8^3 x 256 bottom directly would make
the first head layer 8x larger (~268 M weights). At the default 40^3 the bottom is 3^3 -> 2^3.
The flattened size is static, from `config.data.size`.

Deliberate deviations from the original code:
  * Class 9 (270 degrees in the (0, 2) plane) is a real rotation. In the original before the
    2021 fix (PR #11, i.e. in all of the paper's runs) it tested `rot == 10`, never fired, and class
    9 volumes were left unrotated, indistinguishable from class 0.
  * Labels and rotations are drawn on device inside the jitted train step from a `jax.random` key
    (`make_batch`), not by NumPy on the host; `rotate` takes a traced label.
  * The within-plane sign convention is `jnp.rot90`'s (the original's flip + transpose
    combinations were never documented; any fixed bijection onto these 10 rotations is the task).
  * Inputs must have equal spatial sizes (our pipeline gives cubes / squares); the original 2D code
    centre-cropped non-square images first, for 3D it assumed cubes.
  * 2D uses the 2D U-Net encoder (as the original's pancreas 2D configs), not DenseNet121.
  * GroupNorm / LayerNorm replace BatchNorm (see `models/layers.py`, `models/heads.py`); the model
    returns logits, the softmax is inside the float32 cross-entropy.

Implementation: every class is a signed axis permutation, `out[i] = x[s(i)]` with source
coordinate `s_a = i_{q(a)}` or `n - 1 - i_{q(a)}`, so the source's flat index is AFFINE in the
output coordinates: `offset + sum_d coef_d * i_d`, `coef_d` in `{+-1, +-n, +-n^2}`. A traced label
picks one row of a `[classes, spatial_dims + 1]` table (built at trace time from `jnp.rot90`'s own
definition, `ops.augment.rot90_index_rows`) and the rotation is ONE gather of `C`-element rows
(`ops.augment.gather_rot90`), its index computed from iotas inside the same XLA fusion: one read
and one write of the volume. The previous `lax.switch` over the classes became, under `vmap`
(`make_batch`), a select over all 10 rotated copies: measured 2.2x the time and 2.3x the CPU time
of the gather at the paper's 4 x 128^3 x 4, and slower than the NumPy reference of
benchmarks/pretext_batches.py. A select over the 4 distinct axis permutations plus conditional
flips measured slower still. Static labels still use `jnp.rot90`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.heads import MLPHead
from ssl3d_jax.models.layers import check_spatial_dims, max_pool2
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, flatten_features
from ssl3d_jax.ops.augment import gather_rot90, rot90_index_rows
from ssl3d_jax.tasks import Task, TaskDef, classification_chance, pretext_loss

__all__ = [
    "num_classes",
    "rotation_table",
    "rotate",
    "make_batch",
    "RotationModel",
    "loss_fn",
    "make_task",
]

# Planes of the three 3D groups, in the original's class order: classes 1-3, 4-6, 7-9.
_PLANES_3D = ((0, 1), (1, 2), (0, 2))


def num_classes(spatial_dims: int) -> int:
    """Number of rotation classes: 10 in 3D, 4 in 2D."""
    return 10 if check_spatial_dims(spatial_dims) == 3 else 4


def rotation_table(spatial_dims: int) -> tuple[tuple[int, tuple[int, int]], ...]:
    """Class -> `(quarter_turns, plane)`: class c is `jnp.rot90(x, quarter_turns, axes=plane)`.

    3D: `((0, (0, 1)), (1, (0, 1)), (2, (0, 1)), (3, (0, 1)), (1, (1, 2)), ..., (3, (0, 2)))`.
    2D: `((k, (0, 1)) for k in 0..3)`.
    """
    if check_spatial_dims(spatial_dims) == 2:
        return tuple((k, (0, 1)) for k in range(4))
    return ((0, (0, 1)),) + tuple((k, plane) for plane in _PLANES_3D for k in (1, 2, 3))


def _check_square(shape: Sequence[int]) -> int:
    """Spatial dims of an unbatched `[*spatial, C]` input; raises unless 2/3 equal spatial sizes."""
    spatial = tuple(shape[:-1])
    if len(spatial) not in (2, 3):
        raise ConfigError(
            f"rotate expects an image [H, W, C] or a volume [D, H, W, C], got shape {tuple(shape)}."
        )
    if len(set(spatial)) != 1:
        raise ConfigError(
            f"rotate needs equal spatial sizes (a 90 degree rotation would change the shape "
            f"otherwise), got shape {tuple(shape)}; set config.data.size so that inputs are "
            f"cubes / squares."
        )
    return len(spatial)


def _rotate_static(x: jax.Array, label: int, spatial_dims: int) -> jax.Array:
    k, plane = rotation_table(spatial_dims)[label]
    return jnp.rot90(x, k, axes=plane) if k else x


def _rotate_traced(x: jax.Array, label: jax.Array, spatial_dims: int) -> jax.Array:
    """`x [*(n,) * spatial_dims, C]` rotated by traced class `label` (clamped into range): one
    gather of `C`-element rows at affine source indices (see the module docstring)."""
    table = jnp.asarray(rot90_index_rows(x.shape, rotation_table(spatial_dims)))
    return gather_rot90(x, table[jnp.clip(jnp.asarray(label, jnp.int32), 0, table.shape[0] - 1)])


def rotate(volume: jax.Array, label: jax.Array | int) -> jax.Array:
    """Rotate one volume or image by the rotation of class `label`.

    Args:
      volume: `[D, D, D, C]` (3D, classes 0..9) or `[H, H, C]` (2D, classes 0..3), any dtype;
        the spatial sizes must be equal. The dimensionality is read from the rank.
      label: int32 scalar class, traced or static. A static int is checked against the range; a
        traced one outside `[0, num_classes)` is clamped into it.

    Returns:
      The rotated input, same shape and dtype. Exact (a pure permutation of the voxels).

    Raises:
      ConfigError: if the rank is not 3 or 4 or the spatial sizes differ.
    """
    spatial_dims = _check_square(volume.shape)
    n = num_classes(spatial_dims)
    if isinstance(label, numbers.Integral):
        if not 0 <= label < n:
            raise ValueError(f"rotation label must be in [0, {n}), got {label}.")
        return _rotate_static(volume, int(label), spatial_dims)
    return _rotate_traced(volume, label, spatial_dims)


def make_batch(volumes: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rotate every input of a batch by its own uniformly drawn class.

    Args:
      volumes: `[B, D, D, D, C]` (3D) or `[B, H, H, C]` (2D).
      key: a `jax.random` key.

    Returns:
      `rotated` (shape and dtype of `volumes`) and `labels [B]` int32 in `[0, num_classes)`,
      with `rotated[b] == rotate(volumes[b], labels[b])`.
    """
    spatial_dims = _check_square(volumes.shape[1:])
    labels = jax.random.randint(
        key, (volumes.shape[0],), 0, num_classes(spatial_dims), dtype=jnp.int32
    )
    return jax.vmap(rotate)(volumes, labels), labels


def _pooled_size(size: int, levels: int) -> int:
    """Edge of `max_pool2(bottom)` for a `size` input through `levels` ceil-halving pools, + 1."""
    for _ in range(levels + 1):
        size = (size + 1) // 2
    return size


class RotationModel(nnx.Module):
    """Encoder on the whole input -> `Flatten(max_pool2(bottom))` -> MLP head -> class logits.

    Args:
      in_channels: input channels C.
      input_size: edge of the (cubic / square) input, static; fixes the flattened feature size.
      spatial_dims: 3 (volumes) or 2 (images).
      encoder: the `EncoderConfig` (shared by every model, `config.model`); the head computes in
        its `dtype`.
      head_hidden: hidden widths of the head (original: 2048, 1024).
      head_dropout: dropout rate of the head (original: 0.5).
      rngs: `nnx.Rngs` for the initialisers.

    Call:
      `x [B, *(input_size,) * spatial_dims, C]` -> logits `[B, num_classes(spatial_dims)]`.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        input_size: int,
        spatial_dims: int = 3,
        encoder: EncoderConfig = EncoderConfig(),
        head_hidden: Sequence[int] = (2048, 1024),
        head_dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.input_size = int(input_size)
        self.encoder = Encoder3D(
            in_channels, **encoder.kwargs(), spatial_dims=self.spatial_dims, rngs=rngs
        )
        edge = _pooled_size(self.input_size, len(self.encoder.filters))
        in_features = edge**self.spatial_dims * self.encoder.bottom_filters
        self.head = MLPHead(
            in_features,
            head_hidden,
            num_classes(self.spatial_dims),
            dropout_rate=head_dropout,
            dtype=encoder.dtype,
            rngs=rngs,
        )

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        expected = (self.input_size,) * self.spatial_dims
        if tuple(x.shape[1:-1]) != expected:
            raise ConfigError(
                f"RotationModel was built for inputs of spatial shape {expected} "
                f"(config.data.size={self.input_size}), got a batch of shape {tuple(x.shape)}."
            )
        features, _ = self.encoder(x, train=train, rngs=rngs)
        # The original's final max-pool, then Flatten (see the module docstring).
        return self.head(flatten_features(max_pool2(features)), train=train, rngs=rngs)


def loss_fn(
    model: RotationModel,
    volumes: jax.Array,
    key: jax.Array,
    *,
    training: bool,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Rotation loss on a batch: rotations drawn on device, then softmax cross-entropy.

    Args:
      model: a `RotationModel` (anything with the same call signature).
      volumes: `[B, D, D, D, C]` or `[B, H, H, C]` float.
      key: `jax.random` key for the labels.
      training: static; model train mode (dropout) if True.
      dropout_key: key for dropout; required if `training` and the model has dropout > 0.

    Returns:
      `(loss, metrics)`: float32 scalar mean cross-entropy, and `{'loss', 'accuracy'}` float32
      scalars.
    """
    rotated, labels = make_batch(volumes, key)
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    logits = model(rotated, train=training, rngs=rngs).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def make_task(config, *, in_channels: int):
    """The rotation `Task` for the generic pretraining loop (see `ssl3d_jax.tasks.Task`).

    Reads `config.data` (size, spatial_dims), `config.model` (filters, bottom_filters, num_groups,
    dropout_rate) and `config.rotation` (head_hidden, head_dropout). The loss runs the model in
    train mode; its dropout key is split off the step key.
    """
    spatial_dims = check_spatial_dims(config.data.spatial_dims)
    size = int(config.data.size)
    if size < 1:
        raise ConfigError(f"config.data.size must be a positive int, got {config.data.size!r}.")
    encoder = EncoderConfig.from_config(config.model)
    head_hidden = tuple(int(h) for h in config.rotation.head_hidden)
    head_dropout = float(config.rotation.head_dropout)
    uses_dropout = encoder.dropout_rate > 0 or head_dropout > 0

    def build_model(rngs: nnx.Rngs) -> RotationModel:
        return RotationModel(
            in_channels,
            input_size=size,
            spatial_dims=spatial_dims,
            encoder=encoder,
            head_hidden=head_hidden,
            head_dropout=head_dropout,
            rngs=rngs,
        )

    loss = pretext_loss(
        loss_fn,
        task="rotation",
        spatial_dims=spatial_dims,
        uses_dropout=uses_dropout,
    )

    input_spec = {
        "task": "rotation",
        "spatial_dims": spatial_dims,
        "size": size,
        "num_classes": num_classes(spatial_dims),
        "in_channels": in_channels,
    }

    def sample(volumes, key):
        # Each volume under every class, `[B, K, *spatial, C]` (the key is not used: the figure
        # shows them all).
        classes = range(num_classes(spatial_dims))
        return {"rotated": jnp.stack([jax.vmap(rotate, (0, None))(volumes, c) for c in classes], 1)}

    def plot(s, volumes, *, names, channel):
        from ssl3d_jax import figures

        return figures.plot_rotation(s["rotated"][0], rotation_table(spatial_dims), channel=channel)

    return Task(
        name="rotation",
        build_model=build_model,
        loss=loss,
        input_spec=input_spec,
        chance=classification_chance(num_classes(spatial_dims)),
        sample=sample,
        plot=plot,
    )


TASK = TaskDef(name="rotation", make=make_task, order=1)
