"""Finetuning one arm of a (pre)trained encoder on labelled data, and its evaluation: the runner
shared by segmentation and classification.

The protocol (the paper's, from the original `finetune.py`): the 'pretrained' arm restores the
pretext encoder, trains the task's new parts (decoder, classification head) alone for
`config.finetune.warmup_frozen_steps` (encoder frozen), then everything; the 'scratch' arm trains
the same network from random initialisation; the 'probe' arm keeps the restored encoder frozen
and trains only a linear read-out of its features. All arms use the same initialisation key,
data order and steps, so the only difference is the encoder's start. Two controls separate what
the pretext weights bring from what the protocol does: 'random_warmup' trains exactly as
'pretrained' (same model, new parts' init, data order, learning rate and frozen warm-up
schedule, `arms.trainable_parts`) from the randomly initialised encoder, and 'random_probe' is
the 'probe' read-out on a frozen randomly initialised encoder; the only difference to their
pretrained counterparts is the skipped restore (`arms.RESTORED_ARMS`).

What a kind of data adds is a `Downstream` task, picked by `dataset.kind`: segmentation
(`finetune.SEGMENTATION`, 3D / 2D U-Net) and classification (`classify.CLASSIFICATION`, images
with grades). This module owns the rest: the arm, the restore and its compatibility check, the
freeze schedule, training (checkpoints, resume, metrics), the val / test evaluation calls,
TensorBoard and the results.

Deviation from the original: Adam's state is kept across the unfreeze (the original re-created
the optimizer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

import jax
import optax

from ssl3d_jax import parallel, tensorboard
from ssl3d_jax.checkpoint import restore_encoder
from ssl3d_jax.errors import CheckpointError, ConfigError
from ssl3d_jax.train import classify, common, finetune
from ssl3d_jax.train import data as data_lib
from ssl3d_jax.train import step as step_lib
from ssl3d_jax.train.arms import (
    ARMS,
    RESTORED_ARMS,
    Scores,
    check_compatible,
    learning_rate,
    open_tensorboard,
    trainable_parts,
)

__all__ = ["Downstream", "run", "task_of"]

log = logging.getLogger(__name__)


class Downstream(Protocol):
    """What a kind of labelled data adds to `run` (`finetune.Segmentation`,
    `classify.Classification`).

    label_key: the batch key of the ground truth ('label' `[B, *S]` class indices, 'target' `[B]`
      grades).
    warmup_parts: the top-level parameter parts that train alone during the frozen warm-up.
    """

    label_key: str
    warmup_parts: tuple[str, ...]

    def check(self, config, dataset, cases: list) -> None:
        """Raise (before any work) when `config` or `cases` (every case of the splits) do not fit
        the task."""

    def build_model(self, config, dataset, arm: str) -> Callable:
        """`rngs -> nnx.Module` of `arm` with top-level parts 'encoder' and the task's own."""

    def loss(self, config, dataset) -> Callable:
        """The `(model, batch, key) -> (loss, metrics)` of the train step."""

    def meta(self, dataset, arm: str) -> dict:
        """Entries added to the checkpoints' meta."""

    def arm_fields(self, config, arm: str) -> dict:
        """Result fields that describe how `arm` trained."""

    def score(
        self,
        config,
        dataset,
        graphdef,
        params,
        cases: list,
        *,
        phase: str,
        out_dir: str | None = None,
        tb: tensorboard.Writer | None = None,
        tb_step: int = 0,
    ) -> Scores:
        """Predict and score `cases` (no augmentation); `out_dir`: where the task may write its
        predictions (None: nowhere); `tb`: where it may show pictures of them, at `tb_step`."""


def task_of(dataset) -> Downstream:
    """The downstream task of `dataset.kind`."""
    if dataset.kind == "classification":
        return classify.CLASSIFICATION
    if dataset.kind == "segmentation":
        return finetune.SEGMENTATION
    raise CheckpointError(
        f"{dataset.root}: {dataset.layout} data has no labels to finetune on; use it for "
        "config.mode='pretrain' and finetune on a labelled dataset (config.finetune.init_from)"
    )


def run(config, workdir: str, arm: str, splits: dict, dataset, *, init_from=None, mesh=None):
    """Finetune one arm on `splits['labeled']`, evaluate on `splits['val']` (when given) and
    `splits['test']`.

    `config.seed` seeds the run: the init key (decoder / head / random encoder), the data order
    and the dropout keys (the experiment passes each repetition's seed in it).

    Args:
      config: the run's config (`config.finetune`, `config.model`, `config.data`, the task's
        section).
      workdir: checkpoints go to `<workdir>/finetune/<arm>/checkpoints` (resumed when present),
        metrics to `<workdir>/metrics.jsonl`, test predictions (segmentation,
        `config.finetune.save_predictions`) to `<workdir>/finetune/<arm>/predictions`.
      arm: one of `arms.ARMS`.
      splits: {'labeled': [case names], 'test': [case names]} of `dataset`, optionally 'val'.
      dataset: a segmentation or classification `datasets.Dataset`.
      init_from: pretraining checkpoints folder (the arms in `arms.RESTORED_ARMS`).

    Returns:
      JSON-able results: `metrics` (the test cases' summary), `val_metrics` / `val_per_case` (the
      same on the validation cases, None without any: choose settings on these, never on the
      test scores), `num_labeled` / `num_val` / `num_test`, `steps`, `restored_from`,
      `restored_tensors`, and the task's fields (`finetune.Segmentation.score` /
      `arm_fields`, `classify.Classification.score` / `arm_fields`).
    """
    task = task_of(dataset)
    if arm not in ARMS:
        raise ConfigError(f"config.finetune.arms: unknown arm {arm!r}, expected one of {ARMS}")
    labeled = _select(dataset, splits["labeled"], "labeled")
    val = _select(dataset, splits.get("val") or [], "val")
    test = _select(dataset, splits["test"], "test")
    task.check(config, dataset, labeled + val + test)
    cfg = config.finetune
    mesh = parallel.make_mesh() if mesh is None else mesh
    # The batch size and gradient accumulation, checked before any work.
    accum = step_lib.grad_accum_steps(cfg, mesh, name="config.finetune")
    restores = arm in RESTORED_ARMS  # the only difference between an arm and its random control
    if restores:  # fail before any compilation
        if not init_from:
            raise CheckpointError(
                f"finetune arm {arm!r} needs config.finetune.init_from "
                "(a pretraining checkpoints folder)"
            )
        check_compatible(init_from, config, dataset)
    arm_dir = os.path.join(os.path.abspath(workdir), "finetune", arm)
    phase = f"finetune/{arm}"

    # Same init key in every arm: identical decoder / head init (for the same model) and scratch
    # encoder, so the arms differ only in the encoder.
    key_init, key_run = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
    graphdef, params = step_lib.init_params(task.build_model(config, dataset, arm), key_init, mesh)
    restored = None
    if restores:
        enc, restored = restore_encoder(init_from, jax.device_get(params["encoder"]))
        params = dict(params, encoder=parallel.replicate(enc, mesh))

    lr = learning_rate(config, arm)
    tx = optax.adam(lr)
    state = step_lib.create_train_state(tx, params, key_run, mesh)
    loss_fn = task.loss(config, dataset)
    step_fns = {}  # trainable parts -> jitted step, built on first use

    def step_fn(step):
        parts = trainable_parts(config, arm, step, warmup_parts=task.warmup_parts)
        if parts not in step_fns:
            step_fns[parts] = step_lib.jit_train_step(
                step_lib.make_train_step(graphdef, loss_fn, tx, trainable=parts, accum_steps=accum),
                mesh,
            )
        return step_fns[parts]

    batches = common.train_iterator(
        config, dataset, labeled, batch_size=cfg.batch_size, with_label=True, seed=config.seed + 1
    )
    meta = common.run_meta(config, dataset, phase=phase)
    meta.update(task.meta(dataset, arm))
    meta["restored"] = restored
    state = common.fit_arm(
        phase=phase,
        arm_dir=arm_dir,
        state=state,
        restored=restored,
        step_fn=step_fn,
        batches=batches,
        keys=("image", task.label_key),
        cfg=cfg,
        workdir=workdir,
        meta=meta,
        mesh=mesh,
        case_names=[c.name for c in labeled],
        tensorboard=bool(config.tensorboard),
    )

    # Validation cases first: scored like the test cases, without predictions or pictures; every
    # choice (learning rate, steps, arm settings) is made on them.
    val_metrics = val_per_case = None
    if val:
        val_scores = task.score(config, dataset, graphdef, state.params, val, phase=f"{phase}/val")
        _log_scores(phase, "val", val_scores)
        val_metrics, val_per_case = val_scores.metrics, val_scores.per_case
    out_dir = os.path.join(arm_dir, "predictions") if cfg.save_predictions else None
    # Opened after training: an event file that sorts before the training loop's (which purges
    # the steps after a resume) would have its later steps hidden by that purge.
    tb = open_tensorboard(config, workdir, phase, learning_rate=lr)
    try:
        scores = task.score(
            config,
            dataset,
            graphdef,
            state.params,
            test,
            phase=phase,
            out_dir=out_dir,
            tb=tb,
            tb_step=cfg.num_steps,
        )
        if tb is not None:
            tb.scalars(dict(scores.metrics, phase=f"{phase}/test", step=cfg.num_steps))
            if val_metrics is not None:
                tb.scalars(dict(val_metrics, phase=f"{phase}/val", step=cfg.num_steps))
    finally:
        if tb is not None:
            tb.close()
    _log_scores(phase, "test", scores)
    return {
        "metrics": scores.metrics,
        "val_metrics": val_metrics,
        "val_per_case": val_per_case,
        "num_labeled": len(labeled),
        "num_val": len(val),
        "num_test": len(scores.per_case),
        "steps": cfg.num_steps,
        "restored_from": init_from if restored else None,
        "restored_tensors": len(restored["loaded"]) if restored else 0,
        **scores.fields,
        **task.arm_fields(config, arm),
    }


def _select(dataset, names, what: str) -> list:
    return data_lib.select(dataset.cases, names, what, f"the dataset at {dataset.root}")


def _log_scores(phase: str, split: str, scores: Scores) -> None:
    log.info(
        "[%s] %s (%d cases): %s%s",
        phase,
        split,
        len(scores.per_case),
        "  ".join(f"{k} {v:.3f}" for k, v in scores.metrics.items()),
        scores.note,
    )
