"""Pretext tasks. Each task is one module `ssl3d_jax/tasks/<name>.py` exposing
`make_task(config, *, in_channels) -> Task`; `config.task` names the module."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

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


def get_task(config, *, in_channels: int) -> Task:
    name = config.task
    try:
        module = importlib.import_module(f"ssl3d_jax.tasks.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(f"config.task={name!r}: no module ssl3d_jax/tasks/{name}.py") from e
    return module.make_task(config, in_channels=in_channels)
