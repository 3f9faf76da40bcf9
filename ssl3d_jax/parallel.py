"""Data parallelism: a 1-D `data` mesh over all devices, batches sharded on their leading axis."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssl3d_jax.errors import ConfigError


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all devices of all processes).

    Built with `Mesh(...)`, whose axes are Auto: `jax.make_mesh` defaults to Explicit axes in jax
    0.10, under which the reshapes of patch extraction need explicit output shardings.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def check_batch_size(batch_size: int, mesh: Mesh, key: str) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(
            f"{key}={batch_size} must be a multiple of the number of devices ({n}), because the "
            "global batch is split evenly across them"
        )


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy batch (this process's part) → global `jax.Array`s sharded along 'data'."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
