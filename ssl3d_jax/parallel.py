"""Data parallelism from one CPU to many hosts: one code path.

A 1-D `data` mesh over all devices of all processes; the train state is replicated and every
batch is sharded on its leading axis. With several processes (`initialize_distributed`), each
process reads its own share of every global batch and `put_batch` assembles the global
`jax.Array`, so the jitted step sees the same global batch, and computes the same losses and
gradients, whatever the number of processes and devices.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssl3d_jax.errors import ConfigError

log = logging.getLogger(__name__)

INITIALIZE = ("auto", "on", "off")
CPU_COLLECTIVES = ("gloo", "mpi")
# Clusters whose environment `jax.distributed.initialize` reads by itself (jax/_src/clusters),
# and which 'auto' therefore trusts. Not Kubernetes: its detection needs the `kubernetes`
# package and API access to the pod, and CI jobs often run in pods; not mpi4py: opt-in in JAX.
_AUTO_CLUSTERS = ("slurm", "ompi", "gcetpu", "gketpu")


def _detect_cluster() -> tuple[str, int | None] | None:
    """(JAX's name of the cluster, its process count) when this process runs in a multi-process
    job of a cluster that JAX recognises (SLURM, Open MPI, Cloud TPU), else None.

    A job of one process (`srun -n 1`, a single-host TPU VM) is not a cluster: initialising would
    only start a coordinator service for nobody.
    """
    try:
        from jax._src import clusters  # private: the detection JAX itself runs
    except ImportError:  # pragma: no cover - moved in a later JAX
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if env.name not in _AUTO_CLUSTERS:
            continue
        try:
            if not env.is_env_present():
                continue
            count = env.get_process_count()
        except Exception as e:  # a half-set environment must not stop a single-process run
            log.warning("Ignoring the %s environment: %s", env.name, e)
            continue
        if count is None or int(count) > 1:
            return env.name, None if count is None else int(count)
    return None


def initialize_distributed(cfg) -> bool:
    """`jax.distributed.initialize` as `config.distributed` says; call before any device use.

    Args:
      cfg: `config.distributed`: `initialize` ('auto' | 'on' | 'off'), `coordinator_address`
        ('host:port'), `num_processes`, `process_id` (None: from the environment), and
        `cpu_collectives` ('gloo' | 'mpi', the all-reduce backend of CPU-only runs).
        'auto' initialises when a coordinator is named (`coordinator_address` or
        $JAX_COORDINATOR_ADDRESS) or when a multi-process SLURM, Open MPI or Cloud TPU job is
        detected, so that a run on a laptop never waits for peers.

    Returns:
      whether this process is part of an initialised multi-process run. Idempotent: a second
      call (a second `run()` in a notebook) finds it initialised and returns True.

    Raises:
      ConfigError: an unknown `initialize` / `cpu_collectives` value, or a run that must
        initialise after JAX has already set up its devices in this process.
    """
    mode = cfg.initialize
    if mode not in INITIALIZE:
        raise ConfigError(f"config.distributed.initialize={mode!r}: expected one of {INITIALIZE}")
    collectives = cfg.cpu_collectives
    if collectives not in CPU_COLLECTIVES:
        raise ConfigError(
            f"config.distributed.cpu_collectives={collectives!r}: expected one of {CPU_COLLECTIVES}"
        )
    if jax.distributed.is_initialized():
        _log_processes()
        return True
    if mode == "off":
        return False
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    cluster = None if address else _detect_cluster()
    if mode == "auto" and not address and cluster is None:
        return False
    explicit = address and cfg.num_processes is not None and cfg.process_id is not None
    kwargs = dict(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        # Everything given (or a cluster found here): keep JAX from probing other clusters.
        cluster_detection_method="deactivate" if explicit else (cluster and cluster[0]),
    )
    # CPU-only processes all-reduce gradients through this backend; it must be chosen before the
    # CPU client is created (at initialisation). Harmless on accelerators.
    jax.config.update("jax_cpu_collectives_implementation", collectives)
    log.info(
        "Initialising jax.distributed (%s): coordinator %s, process %s of %s",
        cluster[0] if cluster else "config" if cfg.coordinator_address else "environment",
        address or "from the cluster",
        "?" if cfg.process_id is None else cfg.process_id,
        "?" if cfg.num_processes is None else cfg.num_processes,
    )
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before any JAX calls" not in str(e):
            raise
        raise ConfigError(
            f"config.distributed.initialize={mode!r}: jax.distributed must be initialised "
            "before anything uses the devices, but this process already has; call run() "
            "first, or set config.distributed.initialize='off'"
        ) from e
    except ValueError as e:  # e.g. no coordinator address or process id could be determined
        raise ConfigError(
            f"config.distributed.initialize={mode!r}: {e}; set config.distributed."
            "{coordinator_address,num_processes,process_id}"
        ) from e
    _log_processes()
    return True


def _log_processes() -> None:
    log.info(
        "Process %d of %d: %d local device(s) of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_primary() -> bool:
    """Whether this process writes the run's files (results, splits, metrics): process 0.

    The other processes hold the same values. A multi-host run's workdir must be on a filesystem
    that every host sees (orbax writes each checkpoint from all processes into it).
    """
    return jax.process_index() == 0


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all devices of all processes).

    Devices are ordered by process, so that each process owns one contiguous block of the mesh
    and hence of every batch: process p's share of a global batch of B is rows
    `[p·B/P, (p+1)·B/P)`, the records a single process would have put there (`train_iterator`).
    Built with `Mesh(...)`, whose axes are Auto: `jax.make_mesh` defaults to Explicit axes in jax
    0.10, under which the reshapes of patch extraction need explicit output shardings.

    Raises:
      ConfigError: processes with different numbers of devices in the mesh (their shares of a
        batch would differ).
    """
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    per_process: dict[int, int] = {}
    for d in devices:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    if len(set(per_process.values())) > 1:
        raise ConfigError(
            f"devices per process differ ({per_process}): every process must bring the same "
            "number of devices, because each reads an equal share of every global batch"
        )
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def _identity(tree):
    return tree


def replicate(tree, mesh: Mesh):
    """`tree` (host arrays, single-device or replicated `jax.Array`s) replicated on every device
    of `mesh`. Every process must pass the same values.

    `jax.device_put` only targets this process's devices; with several processes the copy goes
    through a jitted identity, for which JAX places each process's host value on its own devices.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, replicated(mesh))
    return jax.jit(_identity, out_shardings=replicated(mesh))(tree)


def local_copy(tree, device=None):
    """`tree` on one device of this process (default: its first), e.g. for a probe that runs on
    one device. A replicated array spanning several processes is read from this process's own
    copy (`jax.device_put` refuses arrays with devices of other processes)."""
    device = jax.local_devices()[0] if device is None else device

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"local_copy: array of sharding {x.sharding} is not replicated")
            x = x.addressable_data(0)
        return jax.device_put(x, device)

    return jax.tree.map(one, tree)


def check_batch_size(batch_size: int, mesh: Mesh, key: str) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(
            f"{key}={batch_size} must be a multiple of the number of devices ({n}), because the "
            "global batch is split evenly across them"
        )


def process_share(batch_size: int) -> tuple[int, int, int]:
    """(rows per process, this process's index, process count) of a global batch of
    `batch_size`: process p reads rows `[p·b, (p+1)·b)` (see `make_mesh`)."""
    count = jax.process_count()
    if batch_size % count:
        raise ConfigError(
            f"batch size {batch_size} must be a multiple of the number of processes ({count})"
        )
    return batch_size // count, jax.process_index(), count


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy batch → global `jax.Array`s sharded along 'data'.

    One process: `batch` is the global batch. Several: `batch` is this process's rows of the
    global batch (`process_share`); the global array has `process_count` times as many rows,
    this process's shard being its own devices' part of them (no data crosses hosts here).
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
