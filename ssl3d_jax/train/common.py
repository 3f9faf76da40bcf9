"""Pieces shared by the pretraining and finetuning runners: devices, data iterators, meta."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

import ssl3d_jax
from ssl3d_jax import parallel
from ssl3d_jax.data import brats, pipeline, preprocess, slices
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.train import loop

log = logging.getLogger(__name__)


def make_preprocess(config) -> preprocess.Preprocess:
    return preprocess.Preprocess(
        size=config.data.size, mode=config.data.resize_mode, normalization=config.data.normalization
    )


def train_iterator(config, cases, *, batch_size: int, with_label: bool, seed: int):
    """A grain iterator over this process's share of the global batch.

    3D: preprocessed volumes `[S, S, S, C]`; 2D (`config.data.spatial_dims == 2`): their axial
    slices `[S, S, C]`. Preprocessed volumes are cached in memory up to `config.data.cache_mb`.
    """
    n_proc = jax.process_count()
    source = pipeline.CachedSource(
        brats.BratsSource(cases, with_label=with_label),
        make_preprocess(config),
        cache_bytes=config.data.cache_mb * 2**20,
    )
    if config.data.spatial_dims == 2:
        source = slices.SliceSource(
            source, size=config.data.size, keep_fraction=config.data.slice_fraction
        )
    elif config.data.spatial_dims != 3:
        raise ConfigError(f"config.data.spatial_dims={config.data.spatial_dims}: expected 2 or 3")
    ds = pipeline.make_train_dataset(
        source,
        None,
        batch_size=batch_size // n_proc,
        seed=seed,
        num_workers=config.data.num_workers,
        num_threads=config.data.num_threads,
        shard_index=jax.process_index(),
        shard_count=n_proc,
    )
    return iter(ds)


def batch_putter(mesh, keys: tuple[str, ...]):
    sharding = parallel.data_sharded(mesh)

    def put(batch):
        return parallel.put_batch({k: batch[k] for k in keys}, sharding)

    return put


def run_meta(config, *, phase: str) -> dict:
    """JSON stored with every checkpoint: what produced it and what it expects as input."""
    return {
        "library": "ssl3d_jax",
        "version": ssl3d_jax.__version__,
        "phase": phase,
        "task": config.task,
        "input": {
            "in_channels": len(config.data.modalities),
            "spatial_dims": config.data.spatial_dims,
            "modalities": list(config.data.modalities),
            "axis_order": "DHWC" if config.data.spatial_dims == 3 else "HWC (axial slices)",
            "size": config.data.size,
            "resize_mode": config.data.resize_mode,
            "normalization": config.data.normalization,
        },
        "config": config.to_dict()
        if isinstance(config, ml_collections.ConfigDict)
        else dict(config),
    }


def abstract_like(state):
    """Shape/dtype/sharding skeleton of `state`, for restoring into the same layout."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def log_devices(mesh) -> None:
    log.info(
        "JAX %s on %d process(es), %d device(s): %s; mesh %s",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        dict(mesh.shape),
    )


def fit(
    *,
    phase: str,
    state,
    step_fn,
    batches,
    keys: tuple[str, ...],
    cfg,
    workdir: str,
    ckpt,
    meta: dict,
    mesh,
):
    """`loop.train_loop` with the settings of `cfg` (`config.pretrain` or `config.finetune`),
    checkpointing into `ckpt` and closing the data iterator (its worker processes) at the end."""
    try:
        return loop.train_loop(
            phase=phase,
            state=state,
            step_fn=step_fn,
            batches=batches,
            put_batch=batch_putter(mesh, keys),
            num_steps=cfg.num_steps,
            writer=loop.MetricWriter(os.path.join(workdir, "metrics.jsonl")),
            log_every=cfg.log_every,
            checkpointer=ckpt,
            checkpoint_every=cfg.checkpoint_every,
            meta=meta,
            data_iter=batches,
        )
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
