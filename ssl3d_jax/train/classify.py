"""Image classification finetuning of a (pre)trained encoder, and its evaluation.

The paper's diabetic-retinopathy experiment (Taleb et al., NeurIPS 2020, section 4 / Figure 4;
original `finetune.py` with `kaggle_retina` configs): fundus photographs graded 0-4, scored by the
quadratic-weighted Cohen kappa (QWK) and accuracy on held-out cases. Arms, all from the same
initialisation key (same head init, same scratch encoder, same data order and steps), so that they
differ only in how the encoder starts and whether it trains:

  * 'pretrained': encoder restored from the pretext checkpoint; the head alone trains for
    `config.finetune.warmup_frozen_steps`, then everything (the original's `epochs_initialized`);
  * 'scratch': random encoder, everything trains from step 0 (`epochs_random`);
  * 'probe': restored encoder frozen for ALL steps under a single linear layer, the standard
    linear-evaluation protocol (the original's `epochs_frozen` kept its MLP top; a linear head
    measures the features themselves rather than what an MLP can make of them);
  * controls 'random_warmup' / 'random_probe': exactly 'pretrained' / 'probe' (same model, head
    init, schedule, learning rate and data order) without the restore, so that the encoder
    stays at its random initialisation (see `arms.SCHEDULES`).

Loss: softmax cross-entropy over the K grades, prediction = argmax. The original used an ordinal
multi-label sigmoid head (grade g -> the first g+1 of K outputs on, binary cross-entropy) decoded
as (number of outputs > 0.5) - 1, which can decode to -1 (outside the grades) and is not monotone;
its kappa therefore scored impossible grades. Softmax always predicts a valid grade, gives
calibrated class probabilities, and is what the other finetuning tasks use; the ordinal structure
is still what QWK rewards, which we report. (Class imbalance, ~73% grade 0 in EyePACS, is left to
the data; no re-weighting.)

Deviations from the original as in `downstream.py`: Adam's state is kept across the unfreeze (one
optimizer state per parameter part), the U-Net encoder replaces DenseNet121 with global MAX pooling
(see `models/classifier.py`), and augmentation is random horizontal / vertical flips on device
(the original also zoomed by 0.85-1.15).

`CLASSIFICATION` is this task of the generic finetuning runner `downstream.run`. Settings of the
`config.classify` section (configs/common.py): `head_hidden` (hidden width of the MLP head of the
'pretrained' and 'scratch' arms), `head_dropout` (original 0.5), `flip` (random flips in
training). The MLP default is 64 wide, for CPU-scale runs; set `config.classify.head_hidden=1024`
for the original's head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssl3d_jax import losses, metrics
from ssl3d_jax.data import datasets
from ssl3d_jax.errors import ConfigError, DataError
from ssl3d_jax.models.classifier import ClassificationModel
from ssl3d_jax.models.unet import EncoderConfig
from ssl3d_jax.ops import augment
from ssl3d_jax.progress import Progress
from ssl3d_jax.train.arms import SCHEDULES, Scores

# Test images predicted per jitted call (fixed, the last chunk is padded: one compilation).
EVAL_BATCH = 16


def build_model(config, *, in_channels: int, num_classes: int, spatial_dims: int, arm: str):
    """`rngs -> ClassificationModel`: a linear head for 'probe', an MLP head otherwise."""
    # The same encoder settings as every pretext model, so that params['encoder'] fits.
    encoder = EncoderConfig.from_config(config.model)
    linear = SCHEDULES[arm] == "probe"
    hidden = None if linear else int(config.classify.head_hidden)

    def build(rngs):
        return ClassificationModel(
            in_channels,
            num_classes,
            spatial_dims=spatial_dims,
            hidden=hidden,
            dropout_rate=float(config.classify.head_dropout),
            encoder=encoder,
            rngs=rngs,
        )

    return build


def random_flips(images: jax.Array, key: jax.Array) -> jax.Array:
    """Flip each image horizontally and / or vertically, each with probability 1/2.

    Fundus grading does not depend on the eye's orientation (left and right eyes are mirror
    images); the original's retina generator flipped the same way.

    Args:
      images: `[B, H, W, C]` float.
      key: PRNG key.

    Returns:
      `[B, H, W, C]`, same dtype; a permutation of each image's pixels.
    """
    kh, kv = jax.random.split(key)
    b = images.shape[0]
    flip_w = jax.random.bernoulli(kh, 0.5, (b, 1, 1, 1))
    flip_h = jax.random.bernoulli(kv, 0.5, (b, 1, 1, 1))
    return augment.flip_where(images, (flip_w, flip_h), (2, 1))


def classification_loss(model, batch, key, *, flip: bool):
    """Softmax cross-entropy of the grades; `batch` holds image `[B, H, W, C]` float32 and target
    `[B]` int32 class indices. Metrics: 'ce' and the batch 'accuracy'."""
    key_aug, key_dropout = jax.random.split(key)
    images = batch["image"]
    if flip:
        images = random_flips(images, key_aug)
    logits = model(images, train=True, rngs=nnx.Rngs(dropout=key_dropout))
    ce = losses.cross_entropy(logits, batch["target"])
    acc = jnp.mean((jnp.argmax(logits, axis=-1) == batch["target"]).astype(jnp.float32))
    return ce, {"ce": ce, "accuracy": acc}


def confusion_matrix(y_true, y_pred, *, num_classes: int) -> np.ndarray:
    """`[K, K]` int64 counts, rows = true class, columns = predicted class."""
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return out


class Classification:
    """Classification as a `downstream.Downstream` task: `build_model`, `classification_loss`,
    `evaluate`."""

    label_key = "target"
    warmup_parts = ("head",)

    def check(self, config, dataset, cases: list) -> None:
        """The config's dimensionality is the images'; every case has a grade."""
        if config.data.spatial_dims != dataset.spatial_dims:
            raise ConfigError(
                f"{dataset.root} holds {dataset.spatial_dims}D images, but "
                f"config.data.spatial_dims is {config.data.spatial_dims}: use a 2D config (e.g. "
                "configs/rotation.py:2d)"
            )
        unlabelled = [c.name for c in cases if c.target is None]
        if unlabelled:
            raise DataError(
                f"cases {unlabelled[:5]} of {dataset.root} have no grade in the labels CSV, but "
                "are in the labeled / val / test split"
            )

    def build_model(self, config, dataset, arm: str):
        return build_model(
            config,
            in_channels=dataset.in_channels,
            num_classes=dataset.num_classes,
            spatial_dims=config.data.spatial_dims,
            arm=arm,
        )

    def loss(self, config, dataset):
        del dataset
        return functools.partial(classification_loss, flip=bool(config.classify.flip))

    def meta(self, dataset, arm: str) -> dict:
        return {"arm": arm, "class_names": list(dataset.class_names)}

    def arm_fields(self, config, arm: str) -> dict:
        """`arm`, `warmup_frozen_steps` (the steps with the encoder frozen: all for the probe
        arms), `trainable` ('head' for the probe arms, else 'all')."""
        cfg = config.finetune
        schedule = SCHEDULES[arm]
        frozen = {"warmup": cfg.warmup_frozen_steps, "full": 0, "probe": cfg.num_steps}[schedule]
        return {
            "arm": arm,
            "warmup_frozen_steps": frozen,
            "trainable": "head" if schedule == "probe" else "all",
        }

    def score(
        self, config, dataset, graphdef, params, cases, *, phase, out_dir=None, tb=None, tb_step=0
    ) -> Scores:
        """`evaluate`, summarised. The predictions are in the results (`per_case`): nothing is
        written to `out_dir` or shown in `tb`.

        Returns:
          `Scores`: per case, `evaluate`'s; metrics `accuracy` and `qwk` (quadratic-weighted
          kappa); fields `per_case`, `confusion` (rows true, columns predicted), `class_names`.
        """
        del out_dir, tb, tb_step
        per_case = evaluate(config, dataset, graphdef, params, cases, phase=phase)
        y_true = [p["target"] for p in per_case.values()]
        y_pred = [p["pred"] for p in per_case.values()]
        num_classes = dataset.num_classes
        scores = {
            "accuracy": metrics.accuracy(y_true, y_pred),
            "qwk": metrics.quadratic_weighted_kappa(y_true, y_pred, num_classes=num_classes),
        }
        fields = {
            "per_case": per_case,
            "confusion": confusion_matrix(y_true, y_pred, num_classes=num_classes).tolist(),
            "class_names": list(dataset.class_names),
        }
        return Scores(per_case, scores, fields)


CLASSIFICATION = Classification()


def evaluate(config, dataset, graphdef, params, cases, *, phase: str = "classify") -> dict:
    """Predict the grade of every case (no augmentation), in fixed-size padded batches, with a
    progress bar over the cases (on a terminal; else a log line per ~10 %).

    Returns:
      {case_name: {'target': int, 'pred': int (argmax), 'probs': [K floats] (softmax)}}.
    """

    @jax.jit
    def predict(params, images):
        model = nnx.merge(graphdef, params)
        return jax.nn.softmax(model(images, train=False).astype(jnp.float32), axis=-1)

    source = datasets.ImageSource(dataset, cases, size=config.data.size, with_label=True)
    out = {}
    bar = Progress(len(source), f"evaluate {phase}")
    for start in range(0, len(source), EVAL_BATCH):
        recs = [source[i] for i in range(start, min(start + EVAL_BATCH, len(source)))]
        images = np.stack([r["image"] for r in recs])
        pad = EVAL_BATCH - len(recs)
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        probs = np.asarray(predict(params, images))[: len(recs)]
        # Record i of the source is cases[i].
        for i, (r, p) in enumerate(zip(recs, probs)):
            out[cases[start + i].name] = {
                "target": int(r["target"]),
                "pred": int(np.argmax(p)),
                "probs": [float(v) for v in p],
            }
        bar.update(len(recs))
    bar.close()
    return out
