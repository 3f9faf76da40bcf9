"""Pretext tasks. Each task is one module `ssl3d_jax/tasks/<name>.py` exposing
`make_task(config, *, in_channels) -> Task`; `config.task` names the module."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax

from ssl3d_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
    """What the generic pretraining loop needs from a pretext task.

    Attributes:
      name: the task's name (= its module and config file name).
      build_model: `rngs -> nnx.Module`; the module has an `.encoder` attribute (the part that is
        handed to finetuning) and takes whatever the task's loss feeds it.
      loss: `(model, volumes, key) -> (loss, metrics)`, pure and jit-able; `volumes` is a
        `[B, D, H, W, C]` float32 batch, and all of the task's sampling (patches, labels) happens
        inside, on device, from `key`.
      input_spec: JSON-able description of what the task consumed, stored in checkpoints.
    """

    name: str
    build_model: Callable
    loss: Callable
    input_spec: dict


def encoder_config(config) -> dict:
    """Keyword arguments of `Encoder3D` from `config.model` (shared by every task's model)."""
    m = config.model
    return dict(
        filters=tuple(int(f) for f in m.filters),
        bottom_filters=int(m.bottom_filters),
        num_groups=int(m.num_groups),
        dropout_rate=float(m.dropout_rate),
    )


def check_batch_rank(volumes, spatial_dims: int, task: str) -> None:
    """Static check that a task's batch is `[B, *spatial, C]` with `spatial_dims` spatial axes."""
    if volumes.ndim != spatial_dims + 2:
        raise ConfigError(
            f"{task} with config.data.spatial_dims={spatial_dims} expects a batch "
            f"[B, {spatial_dims} spatial axes, C], got shape {tuple(volumes.shape)}"
        )


def pretext_loss(loss_fn: Callable, *, task: str, spatial_dims: int, uses_dropout: bool, **static):
    """`Task.loss` from a task's `loss_fn(model, volumes, key, *, training, dropout_key, **static)`.

    Checks the batch rank, splits the step key into the task's sampling key and a dropout key, and
    always trains (random jitter / augmentation, dropout when configured).
    """

    def loss(model, volumes, key):
        check_batch_rank(volumes, spatial_dims, task)
        key_batch, key_dropout = jax.random.split(key)
        return loss_fn(
            model,
            volumes,
            key_batch,
            training=True,
            dropout_key=key_dropout if uses_dropout else None,
            **static,
        )

    return loss


def get_task(config, *, in_channels: int) -> Task:
    name = config.task
    try:
        module = importlib.import_module(f"ssl3d_jax.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"ssl3d_jax.tasks.{name}":
            raise  # a missing dependency of an existing task module, not a mistyped task
        raise ConfigError(f"config.task={name!r}: no module ssl3d_jax/tasks/{name}.py") from e
    return module.make_task(config, in_channels=in_channels)
