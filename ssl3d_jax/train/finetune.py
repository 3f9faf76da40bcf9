"""U-Net segmentation finetuning of a (pre)trained encoder, and its evaluation.

Protocol (the paper's, from the original `finetune.py`): the 'pretrained' arm restores the
pretext encoder, trains the decoder alone for `warmup_frozen_steps` (encoder frozen), then trains
everything; the 'scratch' arm trains the same network from random initialisation; the 'probe' arm
keeps the restored encoder frozen and trains only a voxel-wise linear read-out of its features
(how much of the segmentation the pretext features already hold). All arms use the same
initialisation key, data order and steps, so the only difference is the encoder's start.
Two controls separate what the pretext weights bring from what the protocol does: 'random_warmup'
trains exactly as 'pretrained' (same model, decoder init, data order, learning rate and frozen
warm-up schedule, `trainable_parts`) from the randomly initialised encoder, and 'random_probe'
is the 'probe' read-out on a frozen randomly initialised encoder; the only difference to their
pretrained counterparts is the skipped restore (`RESTORED_ARMS`).
Classification datasets (2D images with grades) go to `ssl3d_jax.train.classify`.

Deviations from the original: Adam's state is kept across the unfreeze (the original re-created
the optimizer), the loss is soft Dice over the tumour classes + cross-entropy, and evaluation
reports per-case Dice of each evaluation region of the dataset (BraTS: WT/TC/ET; Decathlon: one
per labelled structure), each on its own, never averaged with the background (the original's
region scores were broken by a double argmax). Scores are computed in each scan's own voxel grid:
the class probabilities on the model's cube (or, with `resize_mode='none'`, the sliding-window
probabilities) are mapped back through the preprocessing and the argmax is taken there (as
nnU-Net does), exactly as for the exported NIfTI prediction. HD95 scores a missed or falsely
detected region as BraTS does (`metrics.HD95_MISSING_MM`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import jax
import numpy as np
import optax
from flax import nnx

from ssl3d_jax import inference, losses, metrics, parallel, tensorboard
from ssl3d_jax.checkpoint import restore_encoder
from ssl3d_jax.data import datasets, export, slices
from ssl3d_jax.errors import CheckpointError
from ssl3d_jax.models.probes import VoxelLinearProbe
from ssl3d_jax.models.unet import EncoderConfig, SegmentationModel
from ssl3d_jax.progress import Progress
from ssl3d_jax.train import common
from ssl3d_jax.train import data as data_lib
from ssl3d_jax.train import step as step_lib

# The arms, their schedules and what they share with classification finetuning live in
# `train/arms.py` (imported by both runners, so neither imports the other); re-exported here.
from ssl3d_jax.train.arms import (  # noqa: F401 (re-exported)
    _PROBE_PARTS,
    _WARMUP_PARTS,
    ARMS,
    RESTORED_ARMS,
    SCHEDULES,
    check_compatible,
    learning_rate,
    open_tensorboard,
    trainable_parts,
)

log = logging.getLogger(__name__)


def build_model(config, *, in_channels: int, num_classes: int, arm: str = "scratch"):
    # The same encoder settings as every pretext model, so that params['encoder'] fits.
    encoder = EncoderConfig.from_config(config.model)
    cls = VoxelLinearProbe if SCHEDULES[arm] == "probe" else SegmentationModel

    def build(rngs):
        return cls(
            in_channels,
            num_classes,
            spatial_dims=config.data.spatial_dims,
            encoder=encoder,
            rngs=rngs,
        )

    return build


def make_loss(config, num_classes: int):
    """`segmentation_loss` with `config.finetune`'s Dice and cross-entropy weights: the
    `(model, batch, key) -> (loss, metrics)` that every finetuning step (and benchmark) uses."""
    return functools.partial(
        segmentation_loss,
        num_classes=num_classes,
        dice_weight=config.finetune.dice_weight,
        ce_weight=config.finetune.ce_weight,
    )


def segmentation_loss(model, batch, key, *, num_classes: int, dice_weight: float, ce_weight: float):
    """Soft Dice (foreground classes) + voxel cross-entropy; `batch` holds image `[B,*S,C]` and
    label `[B,*S]` class indices."""
    logits = model(batch["image"], train=True, rngs=nnx.Rngs(dropout=key))
    dice = losses.soft_dice_loss(logits, batch["label"], num_classes=num_classes)
    ce = losses.cross_entropy(logits, batch["label"])
    return dice_weight * dice + ce_weight * ce, {"dice_loss": dice, "ce": ce}


def run(
    config, workdir: str, arm: str, splits: dict, dataset, *, init_from: str | None, mesh=None
) -> dict:
    """Finetune one arm on `splits['labeled']`, evaluate on `splits['val']` and `splits['test']`.

    `config.seed` seeds the run: the init key (decoder / read-out / random encoder), the data
    order and the dropout keys (the experiment passes each repetition's seed in it).

    Returns:
      JSON-able results: `metrics` (mean over test cases of each region's Dice, plus HD95 when
      `config.finetune.hd95`), `val_metrics` / `val_per_case` / `num_val` (the same on the
      validation cases, None without any: choose settings on these, never on the test
      scores), `seed`, `n_excluded` (per metric, the test cases left out of its mean:
      HD95 of a region absent from both prediction and truth), `dice_nearest_argmax_mean`
      (Dice of the labels mapped back by nearest neighbour instead of the probabilities, see
      `evaluate`), per-case scores, what was restored, the steps.
    """
    if dataset.kind == "classification":
        raise CheckpointError(
            f"{dataset.root}: classification data is finetuned by ssl3d_jax.train.classify.run "
            "(ssl3d_jax.train.downstream.run picks the runner from the dataset)"
        )
    if dataset.kind != "segmentation":
        raise CheckpointError(
            f"{dataset.root}: {dataset.layout} data has no labels to finetune on; use it for "
            "config.mode='pretrain' and finetune on a labelled dataset (config.finetune.init_from)"
        )
    if arm not in ARMS:
        raise CheckpointError(f"config.finetune.arms: unknown arm {arm!r}, expected one of {ARMS}")
    cfg = config.finetune
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(cfg.batch_size, mesh, "config.finetune.batch_size")
    accum = step_lib.grad_accum_steps(config, "finetune", mesh)  # checked before any work
    arm_dir = os.path.join(os.path.abspath(workdir), "finetune", arm)
    phase = f"finetune/{arm}"

    # Same init key in every arm: identical decoder init, so the arms differ only in the encoder.
    key_init, key_run = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
    build = build_model(
        config, in_channels=dataset.in_channels, num_classes=dataset.num_classes, arm=arm
    )
    graphdef, params = step_lib.init_params(build, key_init, mesh)
    restored = None
    if arm in RESTORED_ARMS:  # the only difference between an arm and its random control
        if not init_from:
            raise CheckpointError(
                f"finetune arm {arm!r} needs config.finetune.init_from "
                "(a pretraining checkpoints folder)"
            )
        check_compatible(init_from, config, dataset)
        enc, restored = restore_encoder(init_from, jax.device_get(params["encoder"]))
        params = dict(params, encoder=parallel.replicate(enc, mesh))

    tx = optax.adam(learning_rate(config, arm))
    state = step_lib.create_train_state(tx, params, key_run, mesh)
    loss_fn = make_loss(config, dataset.num_classes)
    step_fns = {}  # trainable parts -> jitted step, built on first use

    def step_fn(step):
        parts = trainable_parts(config, arm, step)
        if parts not in step_fns:
            step_fns[parts] = step_lib.jit_train_step(
                step_lib.make_train_step(graphdef, loss_fn, tx, trainable=parts, accum_steps=accum),
                mesh,
            )
        return step_fns[parts]

    labeled = data_lib.select(dataset.cases, splits["labeled"])
    batches = common.train_iterator(
        config, dataset, labeled, batch_size=cfg.batch_size, with_label=True, seed=config.seed + 1
    )
    meta = common.run_meta(config, dataset, phase=phase)
    meta["restored"] = restored
    state = common.fit_arm(
        phase=phase,
        arm_dir=arm_dir,
        state=state,
        restored=restored,
        step_fn=step_fn,
        batches=batches,
        keys=("image", "label"),
        cfg=cfg,
        workdir=workdir,
        meta=meta,
        mesh=mesh,
        case_names=[c.name for c in labeled],
        tensorboard=bool(config.get("tensorboard", False)),
    )

    # Validation cases first: scored like the test cases, without predictions or overlays.
    val = data_lib.select(dataset.cases, splits.get("val") or [])
    val_per_case = val_metrics = None
    if val:
        val_per_case = evaluate(
            config, dataset, graphdef, state.params, val, phase=f"{phase}/val"
        ).scores
        val_metrics, _ = metrics.mean_over_cases(val_per_case)
        log.info(
            "[%s] val (%d cases): %s",
            phase,
            len(val_per_case),
            "  ".join(f"{r} {v:.3f}" for r, v in val_metrics.items()),
        )

    test = data_lib.select(dataset.cases, splits["test"])
    out_dir = os.path.join(arm_dir, "predictions") if cfg.save_predictions else None
    # Opened after training: an event file that sorts before the training loop's (which purges
    # the steps after a resume) would have its later steps hidden by that purge.
    lr = learning_rate(config, arm)
    tb = open_tensorboard(config, workdir, phase, learning_rate=lr)
    try:
        per_case, nearest_per_case = evaluate(
            config,
            dataset,
            graphdef,
            state.params,
            test,
            out_dir=out_dir,
            tb=tb,
            tb_step=cfg.num_steps,
            phase=phase,
        )
        # NaN scores (HD95 of a region absent from both prediction and truth) are left out of
        # the means and counted in `n_excluded`.
        summary, n_excluded = metrics.mean_over_cases(per_case)
        dice_nearest, _ = metrics.mean_over_cases(nearest_per_case)
        if tb is not None:
            tb.scalars(dict(summary, phase=f"{phase}/test", step=cfg.num_steps))
            if val_metrics is not None:
                tb.scalars(dict(val_metrics, phase=f"{phase}/val", step=cfg.num_steps))
    finally:
        if tb is not None:
            tb.close()
    dice_mean = {r: summary[r] for r, _ in dataset.regions}
    log.info(
        "[%s] test (%d cases): %s%s; Dice with nearest-neighbour argmax labels: %s",
        phase,
        len(per_case),
        "  ".join(f"{r} {v:.3f}" for r, v in summary.items()),
        "".join(f"  ({n} left out of {k}: absent from both)" for k, n in n_excluded.items() if n),
        "  ".join(f"{r} {v:.3f}" for r, v in dice_nearest.items()),
    )
    return {
        "metrics": summary,
        "n_excluded": n_excluded,
        "dice_mean": dice_mean,
        "dice_nearest_argmax_mean": dice_nearest,
        "dice_per_case": per_case,
        "val_metrics": val_metrics,
        "val_per_case": val_per_case,
        "num_labeled": len(splits["labeled"]),
        "num_val": len(val),
        "num_test": len(per_case),
        "seed": int(config.seed),
        "learning_rate": lr,
        "steps": cfg.num_steps,
        "warmup_frozen_steps": cfg.warmup_frozen_steps if SCHEDULES[arm] == "warmup" else 0,
        "restored_from": init_from if restored else None,
        "restored_tensors": len(restored["loaded"]) if restored else 0,
        "predictions": out_dir,
    }


# Test cases shown as segmentation overlays in TensorBoard (the first ones, in split order).
NUM_OVERLAYS = 2


def make_predictor(config, graphdef):
    """A jitted `(params, x [N, *window, C]) -> logits [N, *window, K]`; 2D models see the
    axial slices of a volume as their batch (see `predict_volume`)."""

    @jax.jit
    def predict(params, x):
        return nnx.merge(graphdef, params)(x, train=False)

    return predict


def predict_probs(config, predict, params, volume: np.ndarray) -> np.ndarray:
    """Class probabilities float32 `[*spatial, K]` (softmax over the classes) of one
    preprocessed volume `[*spatial, C]`.

    3D: one forward pass on the cube, or sliding windows of the training crop over a larger
    volume (`resize_mode='none'`; overlapping windows' softmax blended); 2D: every axial slice of
    the cube as one batch, softmax per slice, stacked back, so that 2D and 3D models are scored
    on the same voxels.
    """
    size = config.data.size
    softmax = lambda x: np.asarray(jax.nn.softmax(predict(params, x), axis=-1))  # noqa: E731
    if config.data.spatial_dims == 2:
        stack = np.moveaxis(volume, slices.AXIAL_AXIS, 0)
        probs = np.moveaxis(softmax(stack), 0, slices.AXIAL_AXIS)
    elif tuple(volume.shape[:3]) == (size,) * 3:
        probs = softmax(volume[None])[0]
    else:
        probs = inference.sliding_window(
            softmax,
            volume,
            window=(size,) * 3,
            overlap=config.finetune.sliding_window_overlap,
            batch_size=1,
        )
    return np.asarray(probs, np.float32)


def predict_volume(config, predict, params, volume: np.ndarray) -> np.ndarray:
    """Class indices int32 `[*spatial]` of one preprocessed volume `[*spatial, C]`: the argmax
    of `predict_probs`, on the model's grid."""
    return np.argmax(predict_probs(config, predict, params, volume), axis=-1).astype(np.int32)


class Evaluation(NamedTuple):
    """What `evaluate` returns.

    scores: {case_name: {region: Dice, ...(, 'HD95 <region>': mm)}}, of the prediction made as
      nnU-Net does (class probabilities resampled to the scan's grid, argmax there).
    dice_nearest_argmax: {case_name: {region: Dice}} of the previous way (argmax on the model's
      grid, labels mapped back by nearest neighbour), kept to report what the change did.
    """

    scores: dict
    dice_nearest_argmax: dict


def evaluate(
    config,
    dataset,
    graphdef,
    params,
    cases,
    *,
    out_dir: str | None = None,
    tb: tensorboard.Writer | None = None,
    tb_step: int = 0,
    phase: str = "finetune",
) -> Evaluation:
    """Per-case scores of each evaluation region, in each scan's own voxel grid.

    The class probabilities on the preprocessed volume are mapped back through the preprocessing
    (fitting, crop, resampling; linearly, channel by channel) to the scan's grid, where the argmax
    gives the prediction (`export.probs_to_native`, as nnU-Net does); it is scored against the
    label file as loaded, and with `out_dir` written there as `<case>_pred.nii.gz` with the
    scan's shape and affine. The Dice of the previous way (argmax on the model's grid, labels
    mapped back by nearest neighbour) is computed too. With `tb`, the first `NUM_OVERLAYS` cases
    are shown as `<phase>/overlay/<case>` at `tb_step`: the axial slice with the most true
    foreground, plain / true / predicted labels. A progress bar counts the cases (on a terminal;
    else a log line per ~10 %).

    Returns:
      `Evaluation(scores, dice_nearest_argmax)`. HD95 (with `config.finetune.hd95`) is
      `metrics.HD95_MISSING_MM` for a region in exactly one of prediction and truth, nan for a
      region in neither (`metrics.mean_over_cases` leaves those out and counts them).
    """
    predict = make_predictor(config, graphdef)
    prep = common.make_preprocess(config, dataset, keep_geometry=True)
    source = datasets.VolumeSource(dataset, cases, with_label=True)
    # Every process evaluates (no collectives: replicated params, host volumes); one writes.
    out_dir = out_dir if parallel.is_primary() else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    out, nearest_dice = {}, {}
    bar = Progress(len(cases), f"evaluate {phase}")
    for i, case in enumerate(cases):
        raw = source[i]
        rec = prep.map(raw)
        cube = (config.data.size,) * 3
        if i == 0 and config.data.spatial_dims == 3 and tuple(rec["image"].shape[:3]) != cube:
            log.info(
                "Evaluating with sliding windows of %d³ (overlap %.2f) over volumes such as %s",
                config.data.size,
                config.finetune.sliding_window_overlap,
                tuple(rec["image"].shape[:3]),
            )
        probs = predict_probs(config, predict, params, rec["image"])
        pred = export.probs_to_native(probs, rec["geometry"])
        nearest = export.to_native(np.argmax(probs, axis=-1).astype(np.int32), rec["geometry"])
        del probs
        nearest_dice[case.name] = metrics.region_dice(nearest, raw["label"], dataset.regions)
        scores = metrics.region_dice(pred, raw["label"], dataset.regions)
        if config.finetune.hd95:
            spacing = tuple(float(s) for s in np.linalg.norm(raw["affine"][:3, :3], axis=0))
            hd = metrics.region_hd95(pred, raw["label"], dataset.regions, spacing=spacing)
            scores.update({f"HD95 {k}": v for k, v in hd.items()})
        out[case.name] = scores
        bar.update(**{k: v for k, v in list(scores.items())[:1]})
        if tb is not None and i < NUM_OVERLAYS:
            label = np.asarray(raw["label"])
            z = tensorboard.best_slice(label, axis=slices.AXIAL_AXIS)
            image = np.take(np.asarray(raw["image"])[..., 0], z, axis=slices.AXIAL_AXIS)
            picture = tensorboard.overlay(
                image,
                np.take(label, z, axis=slices.AXIAL_AXIS),
                np.take(pred, z, axis=slices.AXIAL_AXIS),
            )
            tb.image(f"{phase}/overlay/{case.name}", picture, tb_step)
        if out_dir:
            export.save_prediction(
                pred,
                case.label or case.images[0],
                os.path.join(out_dir, f"{case.name}_pred.nii.gz"),
                label_values=dataset.label_values,
            )
    bar.close()
    return Evaluation(out, nearest_dice)
