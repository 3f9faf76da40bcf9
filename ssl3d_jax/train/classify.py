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

Deviations from the original as in `finetune.py`: Adam's state is kept across the unfreeze (one
optimizer state per parameter part), the U-Net encoder replaces DenseNet121 with global MAX pooling
(see `models/classifier.py`), and augmentation is random horizontal / vertical flips on device
(the original also zoomed by 0.85-1.15).

Settings read from an optional `config.classify` section (defaults in `DEFAULTS`): `head_hidden`
(hidden width of the MLP head of the 'pretrained' and 'scratch' arms),
`head_dropout` (original 0.5), `flip` (random flips in training). The MLP default is 64 wide, for
CPU-scale runs; set `config.classify.head_hidden=1024` for the original's head.
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
from ssl3d_jax.checkpoint import restore_encoder
from ssl3d_jax.data import datasets
from ssl3d_jax.errors import CheckpointError, ConfigError, DataError
from ssl3d_jax.models.classifier import ClassificationModel
from ssl3d_jax.ops import augment
from ssl3d_jax.progress import Progress
from ssl3d_jax.tasks import encoder_config
from ssl3d_jax.train import arms, common
from ssl3d_jax.train import data as data_lib
from ssl3d_jax.train import step as step_lib

log = logging.getLogger(__name__)

ARMS = arms.ARMS  # pretrained, scratch, probe and the controls random_warmup, random_probe
# Used where `config.classify` (or one of its keys) is absent.
DEFAULTS = {"head_hidden": 64, "head_dropout": 0.0, "flip": True}
# Test images predicted per jitted call (fixed, the last chunk is padded: one compilation).
EVAL_BATCH = 16


def setting(config, key: str):
    """`config.classify.<key>`, or `DEFAULTS[key]` when the section or key is absent."""
    section = config.get("classify") if hasattr(config, "get") else None
    if section is not None and key in section:
        return section[key]
    return DEFAULTS[key]


def build_model(config, *, in_channels: int, num_classes: int, spatial_dims: int, arm: str):
    """`rngs -> ClassificationModel`: a linear head for 'probe', an MLP head otherwise."""
    # The same encoder settings as every pretext model, so that params['encoder'] fits.
    enc = encoder_config(config)
    enc_dropout = enc.pop("dropout_rate")
    linear = arms.SCHEDULES[arm] == "probe"
    hidden = None if linear else int(setting(config, "head_hidden"))

    def build(rngs):
        return ClassificationModel(
            in_channels,
            num_classes,
            spatial_dims=spatial_dims,
            hidden=hidden,
            dropout_rate=float(setting(config, "head_dropout")),
            encoder_dropout_rate=enc_dropout,
            rngs=rngs,
            **enc,
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


def _select(dataset, names, what: str) -> list:
    return data_lib.select(dataset.cases, names, what, f"the dataset at {dataset.root}")


def confusion_matrix(y_true, y_pred, *, num_classes: int) -> np.ndarray:
    """`[K, K]` int64 counts, rows = true class, columns = predicted class."""
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return out


def run(
    config, workdir: str, arm: str, splits: dict, dataset, *, init_from: str | None, mesh=None
) -> dict:
    """Finetune one arm on `splits['labeled']`, evaluate on `splits['val']` (when given) and
    `splits['test']`.

    Args:
      config: the run's config (`config.finetune`, `config.model`, `config.data.size`, ...).
      workdir: checkpoints go to `<workdir>/finetune/<arm>/checkpoints` (resumed when present),
        metrics to `<workdir>/metrics.jsonl`.
      arm: one of `ARMS`.
      splits: {'labeled': [case names], 'test': [case names]} of `dataset`, optionally 'val'.
      dataset: a classification `datasets.Dataset` (images layout).
      init_from: pretraining checkpoints folder ('pretrained' and 'probe').

    Returns:
      JSON-able results: {'metrics': {'accuracy', 'qwk'}, 'per_case': {name: {'target', 'pred',
      'probs'}}, 'confusion' (rows true, columns predicted), 'class_names', 'arm',
      'num_labeled', 'num_test', 'val_metrics' / 'val_per_case' (None without 'val' cases) and
      'num_val', 'steps', 'warmup_frozen_steps', 'trainable',
      'restored_from', 'restored_tensors'}.
    """
    if arm not in ARMS:
        raise ConfigError(f"config.finetune.arms: unknown arm {arm!r}, expected one of {ARMS}")
    if dataset.kind != "classification":
        raise ConfigError(
            f"config.data.root={dataset.root}: a {dataset.kind} dataset ({dataset.layout} "
            "layout); classification finetuning needs images with grades (a labels CSV)"
        )
    if config.data.spatial_dims != dataset.spatial_dims:
        raise ConfigError(
            f"{dataset.root} holds {dataset.spatial_dims}D images, but config.data.spatial_dims "
            f"is {config.data.spatial_dims}: use a 2D config (e.g. configs/rotation.py:2d)"
        )
    cfg = config.finetune
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(cfg.batch_size, mesh, "config.finetune.batch_size")
    accum = step_lib.grad_accum_steps(config, "finetune", mesh)  # checked before any work
    labeled = _select(dataset, splits["labeled"], "labeled")
    test = _select(dataset, splits["test"], "test")
    val = _select(dataset, splits.get("val") or [], "val")
    unlabelled = [c.name for c in labeled + val + test if c.target is None]
    if unlabelled:
        raise DataError(
            f"cases {unlabelled[:5]} of {dataset.root} have no grade in the labels CSV, but are "
            "in the labeled / val / test split"
        )
    restores = arm in arms.RESTORED_ARMS
    if restores:  # fail before any compilation
        if not init_from:
            raise CheckpointError(
                f"finetune arm {arm!r} needs config.finetune.init_from "
                "(a pretraining checkpoints folder)"
            )
        arms.check_compatible(init_from, config, dataset)
    num_classes = dataset.num_classes
    arm_dir = os.path.join(os.path.abspath(workdir), "finetune", arm)
    phase = f"finetune/{arm}"

    # One init key for every arm: identical head init (same head type) and scratch encoder.
    key_init, key_run = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
    build = build_model(
        config,
        in_channels=dataset.in_channels,
        num_classes=num_classes,
        spatial_dims=config.data.spatial_dims,
        arm=arm,
    )
    graphdef, params = step_lib.init_params(build, key_init, mesh)
    restored = None
    if restores:
        enc, restored = restore_encoder(init_from, jax.device_get(params["encoder"]))
        params = dict(params, encoder=parallel.replicate(enc, mesh))

    schedule = arms.SCHEDULES[arm]
    tx = optax.adam(arms.learning_rate(config, arm))
    state = step_lib.create_train_state(tx, params, key_run, mesh)
    loss_fn = functools.partial(classification_loss, flip=bool(setting(config, "flip")))
    full_step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, loss_fn, tx, accum_steps=accum), mesh
    )
    head_step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, loss_fn, tx, trainable=("head",), accum_steps=accum),
        mesh,
    )
    if schedule == "probe":
        warmup, step_fn = cfg.num_steps, (lambda s: head_step)
    else:
        warmup = cfg.warmup_frozen_steps if schedule == "warmup" else 0
        step_fn = lambda s: head_step if s < warmup else full_step  # noqa: E731

    batches = common.train_iterator(
        config, dataset, labeled, batch_size=cfg.batch_size, with_label=True, seed=config.seed + 1
    )
    meta = common.run_meta(config, dataset, phase=phase)
    meta["arm"] = arm
    meta["class_names"] = list(dataset.class_names)
    meta["restored"] = restored
    state = common.fit_arm(
        phase=phase,
        arm_dir=arm_dir,
        state=state,
        restored=restored,
        step_fn=step_fn,
        batches=batches,
        keys=("image", "target"),
        cfg=cfg,
        workdir=workdir,
        meta=meta,
        mesh=mesh,
        case_names=[c.name for c in labeled],
        tensorboard=bool(config.get("tensorboard", False)),
    )

    def score(per_case: dict) -> dict:
        y_true = [p["target"] for p in per_case.values()]
        y_pred = [p["pred"] for p in per_case.values()]
        return {
            "accuracy": metrics.accuracy(y_true, y_pred),
            "qwk": metrics.quadratic_weighted_kappa(y_true, y_pred, num_classes=num_classes),
        }

    # Validation cases first: every choice (learning rate, steps, arm settings) is made on them.
    val_per_case = val_scores = None
    if val:
        val_per_case = evaluate(config, graphdef, state.params, dataset, val, phase=phase)
        val_scores = score(val_per_case)
        log.info(
            "[%s] val (%d cases): accuracy %.3f  QWK %.3f",
            phase,
            len(val_per_case),
            val_scores["accuracy"],
            val_scores["qwk"],
        )
    per_case = evaluate(config, graphdef, state.params, dataset, test, phase=phase)
    y_true = [p["target"] for p in per_case.values()]
    y_pred = [p["pred"] for p in per_case.values()]
    scores = score(per_case)
    lr = arms.learning_rate(config, arm)
    tb = arms.open_tensorboard(config, workdir, phase, learning_rate=lr)
    if tb is not None:  # opened after training (see finetune.run)
        tb.scalars(dict(scores, phase=f"{phase}/test", step=cfg.num_steps))
        if val_scores is not None:
            tb.scalars(dict(val_scores, phase=f"{phase}/val", step=cfg.num_steps))
        tb.close()
    log.info(
        "[%s] test (%d cases): accuracy %.3f  QWK %.3f",
        phase,
        len(per_case),
        scores["accuracy"],
        scores["qwk"],
    )
    return {
        "arm": arm,
        "metrics": scores,
        "per_case": per_case,
        "confusion": confusion_matrix(y_true, y_pred, num_classes=num_classes).tolist(),
        "class_names": list(dataset.class_names),
        "num_labeled": len(labeled),
        "num_test": len(per_case),
        "val_metrics": val_scores,
        "val_per_case": val_per_case,
        "num_val": len(val),
        "steps": cfg.num_steps,
        "warmup_frozen_steps": warmup,
        "trainable": "head" if schedule == "probe" else "all",
        "restored_from": init_from if restored else None,
        "restored_tensors": len(restored["loaded"]) if restored else 0,
    }


def evaluate(config, graphdef, params, dataset, cases, *, phase: str = "classify") -> dict:
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
