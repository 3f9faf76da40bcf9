"""U-Net segmentation finetuning of a (pre)trained encoder, and its evaluation: `SEGMENTATION`,
the segmentation task of the generic finetuning runner `downstream.run` (which holds the arms'
protocol).

The 'pretrained' arm's frozen warm-up trains the decoder alone; the probe arms train a voxel-wise
linear read-out of the frozen encoder's features (how much of the segmentation the pretext
features already hold).

Deviations from the original: the loss is soft Dice over the tumour classes + cross-entropy, and
evaluation reports per-case Dice of each evaluation region of the dataset (BraTS: WT/TC/ET;
Decathlon: one per labelled structure), each on its own, never averaged with the background (the
original's region scores were broken by a double argmax). Scores are computed in each scan's own
voxel grid: the class probabilities on the model's cube (or, with `resize_mode='none'`, the
sliding-window probabilities) are mapped back through the preprocessing and the argmax is taken
there (as nnU-Net does), exactly as for the exported NIfTI prediction. HD95 scores a missed or
falsely detected region as BraTS does (`metrics.HD95_MISSING_MM`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from ssl3d_jax import inference, losses, metrics, parallel, tensorboard
from ssl3d_jax.data import datasets, export, slices
from ssl3d_jax.models.probes import VoxelLinearProbe
from ssl3d_jax.models.unet import EncoderConfig, SegmentationModel
from ssl3d_jax.progress import Progress
from ssl3d_jax.train import common
from ssl3d_jax.train.arms import SCHEDULES, Scores, learning_rate

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


class Segmentation:
    """Segmentation as a `downstream.Downstream` task: `build_model`, `make_loss`, `evaluate`."""

    label_key = "label"
    warmup_parts = ("decoder",)

    def check(self, config, dataset, cases: list) -> None:
        del config, dataset, cases  # every case of a segmentation dataset has its label file

    def build_model(self, config, dataset, arm: str):
        return build_model(
            config, in_channels=dataset.in_channels, num_classes=dataset.num_classes, arm=arm
        )

    def loss(self, config, dataset):
        return make_loss(config, dataset.num_classes)

    def meta(self, dataset, arm: str) -> dict:
        del dataset, arm
        return {}

    def arm_fields(self, config, arm: str) -> dict:
        """`seed`, `learning_rate`, `warmup_frozen_steps` (0 unless the arm warms up)."""
        warmup = config.finetune.warmup_frozen_steps if SCHEDULES[arm] == "warmup" else 0
        return {
            "seed": int(config.seed),
            "learning_rate": learning_rate(config, arm),
            "warmup_frozen_steps": warmup,
        }

    def score(
        self, config, dataset, graphdef, params, cases, *, phase, out_dir=None, tb=None, tb_step=0
    ) -> Scores:
        """`evaluate` (predictions written to `out_dir`, overlays to `tb`), summarised.

        Returns:
          `Scores`: per case, each region's Dice (plus HD95 when `config.finetune.hd95`);
          metrics, their means over the cases; fields `dice_per_case` (the per-case scores),
          `n_excluded` (per metric, the cases left out of its mean: HD95 of a region absent from
          both prediction and truth), `dice_mean` (the regions' mean Dice),
          `dice_nearest_argmax_mean` (mean Dice of the labels mapped back by nearest neighbour
          instead of the probabilities, see `evaluate`), `predictions` (`out_dir`).
        """
        per_case, nearest_per_case = evaluate(
            config,
            dataset,
            graphdef,
            params,
            cases,
            out_dir=out_dir,
            tb=tb,
            tb_step=tb_step,
            phase=phase,
        )
        # NaN scores (HD95 of a region absent from both prediction and truth) are left out of
        # the means and counted in `n_excluded`.
        summary, n_excluded = metrics.mean_over_cases(per_case)
        dice_nearest, _ = metrics.mean_over_cases(nearest_per_case)
        note = (
            "".join(
                f"  ({n} left out of {k}: absent from both)" for k, n in n_excluded.items() if n
            )
            + "; Dice with nearest-neighbour argmax labels: "
            + "  ".join(f"{r} {v:.3f}" for r, v in dice_nearest.items())
        )
        fields = {
            "dice_per_case": per_case,
            "n_excluded": n_excluded,
            "dice_mean": {r: summary[r] for r, _ in dataset.regions},
            "dice_nearest_argmax_mean": dice_nearest,
            "predictions": out_dir,
        }
        return Scores(per_case, summary, fields, note)


SEGMENTATION = Segmentation()


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
