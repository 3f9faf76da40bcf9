"""3D U-Net segmentation finetuning of a (pre)trained encoder, and its evaluation.

Protocol (the paper's, from the original `finetune.py`): the 'pretrained' arm restores the
pretext encoder, trains the decoder alone for `warmup_frozen_steps` (encoder frozen), then trains
everything; the 'scratch' arm trains the same network from random initialisation. Both arms use the
same decoder initialisation, data order and steps, so the only difference is the encoder's start.

Deviations from the original: Adam's state is kept across the unfreeze (the original re-created
the optimizer), the loss is soft Dice over the tumour classes + cross-entropy, and evaluation
reports per-case Dice of the BraTS regions WT/TC/ET, each on its own, never averaged with the
background (the original's region scores were broken by a double argmax).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ssl3d_jax import losses, metrics, parallel
from ssl3d_jax.checkpoint import Checkpointer, restore_encoder
from ssl3d_jax.data import brats, pipeline, slices
from ssl3d_jax.errors import CheckpointError
from ssl3d_jax.models.unet import SegmentationModel
from ssl3d_jax.tasks import encoder_config
from ssl3d_jax.train import common
from ssl3d_jax.train import data as data_lib
from ssl3d_jax.train import step as step_lib

log = logging.getLogger(__name__)

NUM_CLASSES = len(brats.LABELS)  # background + labels 1, 2, 4 as class indices 0..3
ARMS = ("pretrained", "scratch")


def build_model(config, *, in_channels: int):
    # The same encoder settings as every pretext model, so that params['encoder'] fits.
    encoder_kwargs = encoder_config(config)

    def build(rngs):
        return SegmentationModel(
            in_channels,
            NUM_CLASSES,
            spatial_dims=config.data.spatial_dims,
            rngs=rngs,
            **encoder_kwargs,
        )

    return build


def segmentation_loss(model, batch, key, *, dice_weight: float, ce_weight: float):
    """Soft Dice (tumour classes) + voxel cross-entropy; `batch` holds image `[B,D,H,W,C]` and
    label `[B,D,H,W]` class indices."""
    logits = model(batch["image"], train=True, rngs=nnx.Rngs(dropout=key))
    dice = losses.soft_dice_loss(logits, batch["label"], num_classes=NUM_CLASSES)
    ce = losses.cross_entropy(logits, batch["label"])
    return dice_weight * dice + ce_weight * ce, {"dice_loss": dice, "ce": ce}


def _check_compatible(init_from: str, config) -> None:
    """Refuse an encoder pretrained on other input channels before touching its weights."""
    if not os.path.isdir(init_from):
        raise CheckpointError(
            f"pretraining checkpoint folder {init_from} does not exist (set "
            "config.finetune.init_from, or run the pretraining first with config.mode)"
        )
    with Checkpointer(init_from, create=False) as ckpt:
        meta = ckpt.read_meta()
    dims = meta.get("input", {}).get("spatial_dims")
    if dims is not None and dims != config.data.spatial_dims:
        raise CheckpointError(
            f"encoder in {init_from} was pretrained in {dims}D, but config.data.spatial_dims is "
            f"{config.data.spatial_dims}"
        )
    want = len(config.data.modalities)
    have = meta.get("input", {}).get("in_channels")
    if have is not None and have != want:
        raise CheckpointError(
            f"encoder in {init_from} was pretrained on {have} input channels "
            f"({meta['input'].get('modalities')}), but config.data.modalities has {want}"
        )


def run(
    config, workdir: str, arm: str, splits: dict, cases: list, *, init_from: str | None, mesh=None
) -> dict:
    """Finetune one arm on `splits['labeled']`, evaluate on `splits['test']`.

    Returns:
      JSON-able results: per-case and mean Dice of WT/TC/ET, what was restored, the steps.
    """
    if arm not in ARMS:
        raise CheckpointError(f"config.finetune.arms: unknown arm {arm!r}, expected one of {ARMS}")
    cfg = config.finetune
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(cfg.batch_size, mesh, "config.finetune.batch_size")
    in_channels = len(config.data.modalities)
    arm_dir = os.path.join(os.path.abspath(workdir), "finetune", arm)
    phase = f"finetune/{arm}"
    by_name = {c.name: c for c in cases}

    # Same init key in both arms: identical decoder init, so the arms differ only in the encoder.
    key_init, key_run = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
    graphdef, params = step_lib.init_params(
        build_model(config, in_channels=in_channels), key_init, mesh
    )
    restored = None
    if arm == "pretrained":
        if not init_from:
            raise CheckpointError(
                "finetune arm 'pretrained' needs config.finetune.init_from "
                "(a pretraining checkpoints folder)"
            )
        _check_compatible(init_from, config)
        enc, restored = restore_encoder(init_from, jax.device_get(params["encoder"]))
        params = dict(params, encoder=jax.device_put(enc, parallel.replicated(mesh)))

    tx = optax.adam(cfg.learning_rate)
    state = step_lib.create_train_state(tx, params, key_run, mesh)
    loss_fn = functools.partial(
        segmentation_loss, dice_weight=cfg.dice_weight, ce_weight=cfg.ce_weight
    )
    full_step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, loss_fn, tx), mesh)
    frozen_step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, loss_fn, tx, trainable=("decoder",)), mesh
    )
    warmup = cfg.warmup_frozen_steps if arm == "pretrained" else 0

    batches = common.train_iterator(
        config,
        [by_name[n] for n in splits["labeled"]],
        batch_size=cfg.batch_size,
        with_label=True,
        seed=config.seed + 1,
    )
    meta = common.run_meta(config, phase=phase)
    meta["restored"] = restored
    os.makedirs(arm_dir, exist_ok=True)
    if restored is not None:  # the full list of loaded tensors, next to the arm's checkpoints
        data_lib.write_json(os.path.join(arm_dir, "restored_params.json"), restored)
    with Checkpointer(os.path.join(arm_dir, "checkpoints"), max_to_keep=2) as ckpt:
        latest = ckpt.latest_step()
        if latest is not None:
            log.info("Resuming %s from step %d", phase, latest)
            state = ckpt.restore(latest, common.abstract_like(state), data_iter=batches)
        state = common.fit(
            phase=phase,
            state=state,
            step_fn=lambda s: frozen_step if s < warmup else full_step,
            batches=batches,
            keys=("image", "label"),
            cfg=cfg,
            workdir=workdir,
            ckpt=ckpt,
            meta=meta,
            mesh=mesh,
        )

    per_case = evaluate(config, graphdef, state.params, [by_name[n] for n in splits["test"]])
    mean = {r: float(np.mean([d[r] for d in per_case.values()])) for r in metrics.REGIONS}
    log.info(
        "[%s] test Dice (%d cases): %s",
        phase,
        len(per_case),
        "  ".join(f"{r} {v:.3f}" for r, v in mean.items()),
    )
    return {
        "dice_mean": mean,
        "dice_per_case": per_case,
        "num_labeled": len(splits["labeled"]),
        "num_test": len(per_case),
        "steps": cfg.num_steps,
        "warmup_frozen_steps": warmup,
        "restored_from": init_from if restored else None,
        "restored_tensors": len(restored["loaded"]) if restored else 0,
    }


def evaluate(config, graphdef, params, cases) -> dict:
    """Per-case Dice of WT/TC/ET on the preprocessed cube of each test case.

    In 2D the volume is segmented slice by slice (all axial slices as one batch) and scored in 3D,
    so that 2D and 3D models are compared on the same voxels.

    Returns:
      {case_name: {'WT': float, 'TC': float, 'ET': float}}.
    """
    dims = config.data.spatial_dims
    axis = slices.AXIAL_AXIS

    @jax.jit
    def predict(params, volume):
        model = nnx.merge(graphdef, params)
        if dims == 3:
            return jnp.argmax(model(volume[None], train=False)[0], axis=-1)
        stack = jnp.moveaxis(volume, axis, 0)  # [S, S, S, C]: every axial slice, as a batch
        return jnp.moveaxis(jnp.argmax(model(stack, train=False), axis=-1), 0, axis)

    source = brats.BratsSource(cases, with_label=True)
    ds = pipeline.make_eval_dataset(source, common.make_preprocess(config))
    out = {}
    for i in range(len(ds)):
        rec = ds[i]
        pred = np.asarray(predict(params, rec["image"]))
        out[cases[i].name] = metrics.brats_region_dice(
            brats.INDEX_TO_LABEL[pred], brats.INDEX_TO_LABEL[rec["label"]]
        )
    return out
