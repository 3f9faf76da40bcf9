"""Pretext-task pretraining: `run(config, workdir, cases)` → `<workdir>/checkpoints`.

Resumes from the latest checkpoint in the workdir (state, RNG and data-iterator position), and
refuses a workdir whose checkpoints come from another task.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import optax
from flax import nnx

from ssl3d_jax import parallel, probes, tasks, tensorboard
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.data import datasets, slices
from ssl3d_jax.errors import CheckpointError
from ssl3d_jax.train import common
from ssl3d_jax.train import step as step_lib

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def run(config, workdir: str, dataset, cases: list, *, mesh=None) -> str:
    """Pretrain the encoder of `config.task` on `cases` of `dataset` (labels unused).

    Returns:
      the absolute checkpoint folder.
    """
    cfg = config.pretrain
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(cfg.batch_size, mesh, "config.pretrain.batch_size")
    accum = step_lib.grad_accum_steps(config, "pretrain", mesh)  # checked before any work
    common.log_devices(mesh)
    in_channels = dataset.in_channels
    task = tasks.get_task(config, in_channels=in_channels)
    ckpt_dir = checkpoint_dir(workdir)
    meta = common.run_meta(config, dataset, phase="pretrain")
    meta["task_input"] = task.input_spec

    def same_task(step, found):
        if found.get("task") != config.task:
            raise CheckpointError(
                f"{ckpt_dir} holds checkpoints of task {found.get('task')!r}, not "
                f"{config.task!r}; use another --workdir"
            )

    with Checkpointer(ckpt_dir, max_to_keep=cfg.keep_checkpoints) as ckpt:
        key_init, key_run = jax.random.split(jax.random.key(config.seed))
        graphdef, params = step_lib.init_params(task.build_model, key_init, mesh)
        tx = optax.adam(cfg.learning_rate)
        state = step_lib.create_train_state(tx, params, key_run, mesh)
        abstract = common.abstract_like(state)
        # Resume from the newest readable checkpoint (an unreadable one is set aside with a
        # warning, and training goes on from the one before).
        if any(s >= cfg.num_steps for s in ckpt.all_steps()):
            # Complete if the final state reads: check without starting the data pipeline.
            latest, _ = ckpt.restore_latest(abstract, check_meta=same_task)
            if latest >= cfg.num_steps:
                log.info("Pretraining already complete (step %d) in %s", latest, ckpt_dir)
                return ckpt_dir
        batches = common.train_iterator(
            config, dataset, cases, batch_size=cfg.batch_size, with_label=False, seed=config.seed
        )
        try:
            latest, restored = ckpt.restore_latest(
                abstract, data_iter=batches, check_meta=same_task
            )
        except BaseException:
            _close(batches)
            raise
        if latest is not None:
            log.info("Resuming pretraining from step %d in %s", latest, ckpt_dir)
            state = restored
        if config.get("tensorboard", False):
            log_start(config, dataset, cases, workdir, start=latest or 0)

        def loss_fn(model, batch, key):
            return task.loss(model, batch["image"], key)

        train_step = step_lib.jit_train_step(
            step_lib.make_train_step(graphdef, loss_fn, tx, accum_steps=accum), mesh
        )
        knn = knn_probe(config, dataset, cases, graphdef)
        common.fit(
            phase="pretrain",
            state=state,
            step_fn=lambda s: train_step,
            batches=batches,
            keys=("image",),
            cfg=cfg,
            workdir=workdir,
            ckpt=ckpt,
            meta=meta,
            mesh=mesh,
            probes=() if knn is None else (("knn", cfg.knn_every, knn),),
            case_names=[c.name for c in cases],
            tensorboard=bool(config.get("tensorboard", False)),
        )
    return ckpt_dir


def log_start(config, dataset, cases, workdir: str, *, start: int) -> None:
    """TensorBoard (process 0): the learning rate at step `start` (constant: no schedule), and on a
    fresh run a montage of the first training batch's inputs (`pretrain/inputs` at step 0: the
    middle axial slice of each volume, one row per sample, one column per channel).

    The batch is drawn by a second iterator with the same seed (the training one cannot be peeked
    at without moving the position its checkpoints store), in threads rather than processes.
    """
    writer = tensorboard.Writer(tensorboard.folder(workdir, "pretrain"))
    if not writer.enabled:
        return
    try:
        cfg = config.pretrain
        writer.scalars({"phase": "pretrain", "step": start, "learning_rate": cfg.learning_rate})
        if start:
            return
        sample_config = config.copy_and_resolve_references()
        sample_config.data.num_workers = 0
        it = common.train_iterator(
            sample_config,
            dataset,
            cases,
            batch_size=cfg.batch_size,
            with_label=False,
            seed=config.seed,
        )
        try:
            batch = next(it)
        finally:
            _close(it)
        dims = config.data.spatial_dims
        grid = tensorboard.montage(tensorboard.mid_slices(batch["image"], spatial_dims=dims))
        writer.image("pretrain/inputs", grid, 0)
    finally:
        writer.close()


def _close(batches) -> None:
    close = getattr(batches, "close", None)  # grain worker processes
    if close is not None:
        close()


def knn_probe(config, dataset, cases, graphdef):
    """`state -> {'knn_accuracy', 'knn_balanced_accuracy'}`, or None when disabled / no labels.

    An online signal of what the encoder learns, from labelled training cases only (never the
    test cases): segmentation data gives patches of half the input size labelled by whether they
    hold any foreground (tumour) voxel; classification data gives the images and their grades.
    The first half of the cases is the memory bank, the second half the queries.
    """
    cfg = config.pretrain
    labelled = [c for c in cases if c.label is not None or c.target is not None]
    n = min(cfg.knn_cases, len(labelled))
    if not cfg.knn_every or n < 2 or dataset.kind not in ("segmentation", "classification"):
        return None
    chosen = sorted(labelled, key=lambda c: c.name)[:n]
    dims = config.data.spatial_dims
    if dataset.kind == "classification":
        source = datasets.ImageSource(dataset, chosen, size=config.data.size, with_label=True)
        recs = [source[i] for i in range(len(source))]
        x = np.stack([r["image"] for r in recs])
        y = np.array([r["target"] for r in recs], np.int32)
        num_classes = dataset.num_classes
    else:
        if config.data.resize_mode == "none":
            log.info("kNN probe off: resize_mode 'none' gives volumes of different shapes")
            return None
        source = common.preprocessed_source(config, dataset, chosen, with_label=True)
        recs = [source[i] for i in range(len(source))]
        vols = np.stack([np.asarray(r["image"]) for r in recs])
        labels = np.stack([np.asarray(r["label"]) for r in recs])
        if dims == 2:  # the central axial slice of every volume
            z = vols.shape[1 + slices.AXIAL_AXIS] // 2
            vols = np.take(vols, z, axis=1 + slices.AXIAL_AXIS)
            labels = np.take(labels, z, axis=1 + slices.AXIAL_AXIS)
        patch = max(config.data.size // 2, 4)
        sets = [
            _balanced(*probes.patch_presence_dataset(v, lab, patch=patch, stride=patch // 2))
            for v, lab in ((vols[: n // 2], labels[: n // 2]), (vols[n // 2 :], labels[n // 2 :]))
        ]
        (bank_x, bank_y), (query_x, query_y) = sets
        probe = probes.KnnProbe(bank_x, bank_y, query_x, query_y, num_classes=2, k=cfg.knn_k)
        x = np.concatenate([bank_x, query_x])
        half = len(bank_x)
    if dataset.kind == "classification":
        half = len(x) // 2
        probe = probes.KnnProbe(
            x[:half], y[:half], x[half:], y[half:], num_classes=num_classes, k=cfg.knn_k
        )
    log.info(
        "kNN probe every %d steps: %d bank / %d query samples from %d training cases",
        cfg.knn_every,
        half,
        len(x) - half,
        n,
    )

    def run(state):
        return probe(nnx.merge(graphdef, state.params).encoder)

    return run


def _balanced(x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All patches with foreground and as many without, drawn with a fixed seed: tumours fill a
    few percent of a scan, and an unbalanced set scores the majority vote, not the features."""
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) <= len(pos):
        return x, y
    keep = np.sort(
        np.concatenate([pos, np.random.default_rng(seed).choice(neg, len(pos), replace=False)])
    )
    return x[keep], y[keep]
