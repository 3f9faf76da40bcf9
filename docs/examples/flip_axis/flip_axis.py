"""Flip-axis prediction: which spatial axis a volume was mirrored along, if any.

An example of a pretext task of one's own (README "Adding a task"): this module and its config
file `flip_axis_config.py` are all it takes. Register it by listing this file in the environment
variable `SSL3D_JAX_TASKS`; then `ssl3d --list` names it, `--config=.../flip_axis_config.py`
pretrains and finetunes it, the sweep's `('all',)` task list includes it and the visualize mode
draws it (with the generic figure, as it defines no plot function). `tests/test_task_plugin.py`
runs all of that on a copy of these two files.

The task: each volume is left as it is (class 0) or mirrored along spatial axis `a` (class
`a + 1`), drawn uniformly on device; the encoder and a linear head on its flattened bottom
features predict the class. The head sees where features are, not only which (a global pool
would be blind to mirroring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssl3d_jax import tasks
from ssl3d_jax.models.unet import Encoder3D, EncoderConfig, flatten_features


def flip(volume: jax.Array, label: jax.Array) -> jax.Array:
    """`volume [*spatial, C]` mirrored along spatial axis `label - 1` (label 0: unchanged);
    `label` is an int32 scalar, traced or not."""
    spatial = range(volume.ndim - 1)
    return jnp.stack([volume, *(jnp.flip(volume, axis=a) for a in spatial)])[label]


def make_batch(volumes: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`volumes [B, *spatial, C]` → (each flipped by its own class, `labels [B]` int32)."""
    labels = jax.random.randint(key, (volumes.shape[0],), 0, volumes.ndim - 1, jnp.int32)
    return jax.vmap(flip)(volumes, labels), labels


class FlipModel(nnx.Module):
    """Encoder3D → flattened bottom features → linear logits `[B, spatial_dims + 1]`."""

    def __init__(self, in_channels, *, input_size, spatial_dims, encoder: EncoderConfig, rngs):
        # The same encoder as every model of the library: finetuning restores params['encoder'].
        self.encoder = Encoder3D(
            in_channels, spatial_dims=spatial_dims, **encoder.kwargs(), rngs=rngs
        )
        edge = int(input_size)
        for _ in self.encoder.filters:  # each level halves the edge, rounding up
            edge = (edge + 1) // 2
        features = edge**spatial_dims * self.encoder.bottom_filters
        self.head = nnx.Linear(features, spatial_dims + 1, rngs=rngs)

    def __call__(self, x, *, train=False, rngs=None):
        bottom, _ = self.encoder(x, train=train, rngs=rngs)
        return self.head(flatten_features(bottom).astype(jnp.float32))


def loss_fn(model, volumes, key, *, training, dropout_key):
    flipped, labels = make_batch(volumes, key)
    rngs = nnx.Rngs(dropout=dropout_key) if dropout_key is not None else None
    logits = model(flipped, train=training, rngs=rngs)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def make_task(config, *, in_channels: int) -> tasks.Task:
    """Reads `config.data` (size, spatial_dims) and `config.model` (the shared encoder)."""
    dims, size = int(config.data.spatial_dims), int(config.data.size)
    encoder = EncoderConfig.from_config(config.model)

    def build_model(rngs):
        return FlipModel(
            in_channels,
            input_size=size,
            spatial_dims=dims,
            encoder=encoder,
            rngs=rngs,
        )

    def sample(volumes, key):
        flipped, labels = make_batch(volumes, key)
        return {"flipped": flipped, "labels": labels}

    return tasks.Task(
        name="flip_axis",
        build_model=build_model,
        loss=tasks.pretext_loss(
            loss_fn,
            task="flip_axis",
            spatial_dims=dims,
            uses_dropout=encoder.dropout_rate > 0,
        ),
        input_spec={"task": "flip_axis", "spatial_dims": dims, "size": size},
        chance=tasks.classification_chance(dims + 1),
        sample=sample,
    )


TASK = tasks.TaskDef(name="flip_axis", make=make_task, config_file="flip_axis_config.py")
