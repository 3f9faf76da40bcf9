"""Pieces shared by the pretraining and finetuning runners: devices, data iterators, meta."""

from __future__ import annotations

import logging
import os

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import ssl3d_jax
from ssl3d_jax import parallel
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.data import cache, datasets, pipeline, preprocess, slices
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.train import loop
from ssl3d_jax.train.data import write_json

log = logging.getLogger(__name__)

# Device prefetch depth of `fit` for iterators without `device_prefetch` (`train_iterator`'s
# carry `config.data.prefetch`).
DEFAULT_PREFETCH = 2


def make_preprocess(config, dataset, *, keep_geometry: bool = False) -> preprocess.Preprocess:
    d = config.data
    return preprocess.Preprocess(
        size=d.size,
        mode=d.resize_mode,
        normalization=d.normalization,
        modality=dataset.modality,
        ct_window=tuple(d.ct_window),
        spacing=tuple(d.spacing) if d.spacing else None,
        crop_foreground=d.crop_foreground,
        background=d.background,
        keep_geometry=keep_geometry,
    )


def cache_root(config) -> str | None:
    """The preprocessed-array cache folder, or None when `config.data.cache_dir == ''`."""
    if config.data.cache_dir == "":
        return None
    if config.data.cache_dir:
        return os.path.abspath(os.path.expanduser(config.data.cache_dir))
    base = os.environ.get("SSL3D_JAX_CACHE", os.path.expanduser("~/.cache/ssl3d_jax"))
    return os.path.join(base, "preprocessed")


def preprocessed_source(config, dataset, cases, *, with_label: bool, progress: bool = True):
    """A random-access source of preprocessed records (`image`, `label`, `case_index`) of
    `cases`, read from the disk cache (built here on first use) when it is enabled.

    The cache key covers every preprocessing setting and every file of the dataset (path, size,
    mtime), so one cache serves pretraining, finetuning and evaluation, and a changed setting or
    file never reuses stale arrays.
    """
    # Decathlon test scans (dataset.unlabelled_cases) pretrain without labels.
    labelled = dataset.kind == "segmentation" and all(c.label is not None for c in cases)
    volumes = datasets.VolumeSource(dataset, cases, with_label=labelled)
    prep = make_preprocess(config, dataset, keep_geometry=True)
    root = cache_root(config)
    if root is None:
        source = pipeline.CachedSource(
            volumes, make_preprocess(config, dataset), cache_bytes=config.data.cache_mb * 2**20
        )
        return source if with_label or not labelled else _DropLabel(source)
    info = {
        "layout": dataset.layout,
        "channels": list(dataset.channels),
        "label_values": list(dataset.label_values),
        "labelled": labelled,
    }
    files = [p for c in dataset.cases for p in (*c.images, *([c.label] if c.label else []))]
    key = cache.cache_key(info, prep.settings(), files)
    # Case names of a NIfTI folder are relative paths ('sub/scan_001'); cache files are flat.
    names = [c.name.replace(os.sep, "__").replace("/", "__") for c in cases]
    # Every process builds (see build_cache's `share`): no process waits on another, and hosts
    # without a shared cache folder each get a complete one.
    folder = cache.build_cache(
        volumes,
        prep,
        root,
        key=key,
        names=names,
        progress=progress and jax.process_index() == 0,
        share=(jax.process_index(), jax.process_count()),
    )
    return cache.CachedArraysSource(folder, names, with_label=with_label and labelled)


class _DropLabel(grain.sources.RandomAccessDataSource):
    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        return {k: v for k, v in self._source[i].items() if k != "label"}


def train_iterator(config, dataset, cases, *, batch_size: int, with_label: bool, seed: int):
    """A grain iterator over this process's share of each global batch of `batch_size`.

    One shuffled record stream (the same seed on every process) is cut into batches of
    `batch_size / process_count` and process p takes batches p, p + P, p + 2P, …: at step t the
    processes' batches, stacked in process order (`parallel.put_batch`), are exactly records
    `[t·B, (t+1)·B)` of the stream, i.e. the global batch that one process would read, whatever
    the number of processes. Random crops are drawn per record position, so they agree too. Each
    process checkpoints its own iterator position (grain writes one file per process).

    Volumes: preprocessed `[S, S, S, C]` (random S³ crops with `resize_mode='none'`); 2D
    (`config.data.spatial_dims == 2`): their axial slices `[S, S, C]`; image datasets: images
    `[S, S, 3]` with their grade as `target`.

    The iterator carries `device_prefetch` (`config.data.prefetch`), the depth of the device
    prefetch that `fit` gives `train_loop`.
    """
    per_process, index, count = parallel.process_share(batch_size)
    transform = None
    if dataset.layout == "images":
        if config.data.spatial_dims != 2:
            raise ConfigError(
                f"{dataset.root} holds 2D images: use a 2D config (e.g. configs/rpl.py:2d) or "
                "config.data.spatial_dims=2"
            )
        source = datasets.ImageSource(dataset, cases, size=config.data.size, with_label=with_label)
    else:
        source = preprocessed_source(config, dataset, cases, with_label=with_label)
        if config.data.resize_mode == "none":
            if config.data.spatial_dims == 2:
                raise ConfigError(
                    "config.data.resize_mode='none' (random crops, sliding-window evaluation) is "
                    "3D only; use 'resize' or 'crop_pad' with 2D configs"
                )
            transform = preprocess.RandomCrop(config.data.size)
        if config.data.spatial_dims == 2:
            source = slices.SliceSource(
                source, size=config.data.size, keep_fraction=config.data.slice_fraction
            )
        elif config.data.spatial_dims != 3:
            raise ConfigError(
                f"config.data.spatial_dims={config.data.spatial_dims}: expected 2 or 3"
            )
    prefetch = config.data.prefetch
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ConfigError(
            f"config.data.prefetch={prefetch!r}: expected a whole number of batches >= 0"
        )
    ds = pipeline.make_train_dataset(
        source,
        transform,
        batch_size=per_process,
        seed=seed,
        num_workers=config.data.num_workers,
        num_threads=config.data.num_threads,
        shard_index=index,
        shard_count=count,
    )
    it = iter(ds)
    # Read by `fit`: how many batches `train_loop` puts on the device ahead of the step.
    it.device_prefetch = prefetch
    return it


def batch_putter(mesh, keys: tuple[str, ...]):
    sharding = parallel.data_sharded(mesh)

    def put(batch):
        return parallel.put_batch({k: batch[k] for k in keys}, sharding)

    return put


def run_meta(config, dataset, *, phase: str) -> dict:
    """JSON stored with every checkpoint: what produced it and what it expects as input."""
    d = config.data
    if dataset.layout == "images":
        axis_order = "HWC (RGB image)"
    else:
        axis_order = "DHWC (RAS)" if d.spatial_dims == 3 else "HWC (axial slices, RAS)"
    return {
        "library": "ssl3d_jax",
        "version": ssl3d_jax.__version__,
        "phase": phase,
        "task": config.task,
        "input": {
            "in_channels": dataset.in_channels,
            "spatial_dims": d.spatial_dims,
            "modalities": list(dataset.channels),
            "modality": dataset.modality,
            "axis_order": axis_order,
            "size": d.size,
            "resize_mode": d.resize_mode,
            "normalization": d.normalization if dataset.modality == "mri" else dataset.modality,
            "ct_window": list(d.ct_window) if dataset.modality == "ct" else None,
            "spacing": list(d.spacing) if d.spacing else None,
            "crop_foreground": d.crop_foreground,
            "background": d.background if dataset.modality == "mri" else None,
        },
        "dataset": {"name": dataset.name, "layout": dataset.layout, "root": str(dataset.root)},
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
    probes: tuple = (),
    case_names: list[str] | None = None,
    tensorboard: bool = False,
    chance: dict[str, float] | None = None,
):
    """`loop.train_loop` with the settings of `cfg` (`config.pretrain` or `config.finetune`),
    checkpointing into `ckpt` and closing the data iterator (its worker processes) at the end.
    Batches are put on the device `batches.device_prefetch` steps ahead (`train_iterator`).

    `case_names`: the names of the cases that `batches` reads, in source order (what a record's
    `case_index` indexes), so that a non-finite loss names the cases of its batch.
    `tensorboard`: also write every record to TensorBoard (`config.tensorboard`).
    `chance`: the chance level of each metric (`Task.chance`), logged beside it (`chance_<k>`).
    """
    try:
        return loop.train_loop(
            phase=phase,
            state=state,
            step_fn=step_fn,
            batches=batches,
            put_batch=batch_putter(mesh, keys),
            num_steps=cfg.num_steps,
            writer=loop.MetricWriter(
                os.path.join(workdir, "metrics.jsonl"),
                tensorboard=tensorboard,
                batch_size=cfg.batch_size,
            ),
            log_every=cfg.log_every,
            checkpointer=ckpt,
            checkpoint_every=cfg.checkpoint_every,
            meta=meta,
            data_iter=batches,
            probes=probes,
            describe_batch=describe_cases(case_names),
            prefetch=getattr(batches, "device_prefetch", DEFAULT_PREFETCH),
            chance=chance,
        )
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def describe_cases(case_names: list[str] | None):
    """`host batch -> 'batch of cases A, B'` from the batch's `case_index` (each case once, in
    batch order; `#i` when no names are given); '' for a batch without `case_index`."""

    def describe(batch: dict) -> str:
        if "case_index" not in batch:
            return ""
        indices = dict.fromkeys(int(i) for i in np.asarray(batch["case_index"]).reshape(-1))
        names = [
            case_names[i] if case_names is not None and 0 <= i < len(case_names) else f"#{i}"
            for i in indices
        ]
        share = " (this process's share)" if jax.process_count() > 1 else ""
        return f"batch of cases {', '.join(names)}{share}"

    return describe


def fit_arm(*, phase: str, arm_dir: str, state, restored: dict | None, **fit_kwargs):
    """Train one finetuning arm in `arm_dir`: the list of restored encoder tensors next to its
    checkpoints, resume from the arm's latest readable checkpoint (state and data position, see
    `Checkpointer.restore_latest`), then `fit`.

    `fit_kwargs`: `fit`'s remaining arguments (step_fn, batches, keys, cfg, workdir, meta, mesh).
    """
    os.makedirs(arm_dir, exist_ok=True)
    if restored is not None:
        write_json(os.path.join(arm_dir, "restored_params.json"), restored)
    with Checkpointer(os.path.join(arm_dir, "checkpoints"), max_to_keep=2) as ckpt:
        latest, restored_state = ckpt.restore_latest(
            abstract_like(state), data_iter=fit_kwargs["batches"]
        )
        if latest is not None:
            log.info("Resuming %s from step %d", phase, latest)
            state = restored_state
        return fit(phase=phase, state=state, ckpt=ckpt, **fit_kwargs)
