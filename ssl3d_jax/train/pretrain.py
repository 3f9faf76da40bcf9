"""Pretext-task pretraining: `run(config, workdir, cases)` → `<workdir>/checkpoints`.

Resumes from the latest checkpoint in the workdir (state, RNG and data-iterator position), and
refuses a workdir whose checkpoints come from another task.

Every run (also one found complete) ends with `<workdir>/pretrain_summary.json`: the final log
window's mean pretext metrics beside their chance level (`Task.chance`), and `near_chance`, set
(with a WARNING in the log) when the final loss is within 5 % of chance, i.e. the encoder learned
nothing from the pretext task.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ssl3d_jax import parallel, probes, tasks, tensorboard
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.data import datasets, slices
from ssl3d_jax.errors import CheckpointError
from ssl3d_jax.train import common, loop
from ssl3d_jax.train import step as step_lib
from ssl3d_jax.train.data import write_json

log = logging.getLogger(__name__)

# `<workdir>/pretrain_summary.json`: see `pretext_summary`.
SUMMARY_FILE = "pretrain_summary.json"
# A final pretext loss at or above this fraction of the chance loss counts as "learned nothing".
NEAR_CHANCE = 0.95


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def run(config, workdir: str, dataset, cases: list, *, mesh=None, val_cases=None) -> str:
    """Pretrain the encoder of `config.task` on `cases` of `dataset` (labels unused).

    `val_cases`: held-out cases (never trained on) on which the pretext loss and metrics are
    measured every `config.pretrain.knn_every` steps and at the end (phase `pretrain/val` in
    metrics.jsonl): the signal that choices such as the learning rate are made on.

    Returns:
      the absolute checkpoint folder.
    """
    cfg = config.pretrain
    mesh = parallel.make_mesh() if mesh is None else mesh
    # The batch size and gradient accumulation, checked before any work.
    accum = step_lib.grad_accum_steps(cfg, mesh, name="config.pretrain")
    common.log_devices(mesh)
    in_channels = dataset.in_channels
    task = tasks.get_task(config, in_channels=in_channels)
    ckpt_dir = checkpoint_dir(workdir)
    meta = common.run_meta(config, dataset, phase="pretrain")
    meta["task_input"] = task.input_spec
    meta["chance"] = task.chance

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
                report_pretext(workdir, task, ckpt=ckpt)
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
        if config.tensorboard:
            log_start(config, dataset, cases, workdir, start=latest or 0)

        def loss_fn(model, batch, key):
            return task.loss(model, batch["image"], key)

        train_step = step_lib.jit_train_step(
            step_lib.make_train_step(graphdef, loss_fn, tx, accum_steps=accum), mesh
        )
        knn = knn_probe(config, dataset, cases, graphdef)
        val = val_probe(config, dataset, val_cases or [], graphdef, task)
        probe_list = () if knn is None else (("knn", cfg.knn_every, knn),)
        if val is not None:
            probe_list += (("val", cfg.knn_every or cfg.num_steps, val),)
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
            probes=probe_list,
            case_names=[c.name for c in cases],
            tensorboard=bool(config.tensorboard),
            chance=task.chance,
        )
        report_pretext(workdir, task, ckpt=ckpt)
    return ckpt_dir


def near_chance(loss: float, chance_loss: float, *, threshold: float = NEAR_CHANCE) -> bool:
    """Whether a final pretext `loss` is no better than chance: `loss >= threshold * chance_loss`
    (a loss that went up counts too). Exemplar's chance loss is its margin (d_pos = d_neg)."""
    return bool(loss >= threshold * chance_loss)


def final_pretext_metrics(workdir: str) -> dict | None:
    """The last record of phase 'pretrain' (not its probes) in `<workdir>/metrics.jsonl`: the
    window means of the final step, with its `step`; None without one."""
    path = os.path.join(os.path.abspath(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return None
    final = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if record.get("phase") == "pretrain" and (
                final is None or record.get("step", 0) >= final.get("step", 0)
            ):
                final = record
    return final


def pretext_summary(task: str, record: dict, chance: dict) -> dict:
    """`{task, step, final_loss, chance_loss, ratio, near_chance, metrics, chance}` from the final
    'pretrain' record (or checkpoint `train_metrics`) and the task's chance levels.

    `ratio` = final_loss / chance_loss; `near_chance` (`near_chance`) and `ratio` are None when
    the record has no loss or the task no chance loss."""
    skip = {"phase", "step", "learning_rate", *loop.WALL_CLOCK_FIELDS}
    metrics = {
        k: float(v)
        for k, v in record.items()
        if k not in skip and not k.startswith("chance_") and isinstance(v, (int, float))
    }
    loss, chance_loss = metrics.get("loss"), chance.get("loss")
    known = loss is not None and chance_loss is not None
    return {
        "task": task,
        "step": record.get("step"),
        "final_loss": loss,
        "chance_loss": None if chance_loss is None else float(chance_loss),
        "ratio": loss / chance_loss if known and chance_loss > 0 else None,
        "near_chance": near_chance(loss, chance_loss) if known else None,
        "threshold": NEAR_CHANCE,
        "metrics": metrics,
        "chance": {k: float(v) for k, v in chance.items()},
    }


def report_pretext(workdir: str, task, *, ckpt=None) -> dict | None:
    """Compare the final pretext metrics with `task.chance`: write `<workdir>/pretrain_summary.json`
    (`pretext_summary`), log a WARNING when the run ended near chance, and return the summary.

    The metrics come from metrics.jsonl's final 'pretrain' record, else (no metrics file, e.g.
    checkpoints copied elsewhere) from the latest checkpoint's meta `train_metrics`; None (and
    nothing written) without either."""
    record = final_pretext_metrics(workdir)
    if record is None and ckpt is not None and ckpt.latest_step() is not None:
        record = ckpt.read_meta().get("train_metrics")
    if record is None:
        log.info("No pretraining metrics in %s: no pretext summary", workdir)
        return None
    summary = pretext_summary(task.name, record, task.chance)
    path = os.path.join(os.path.abspath(workdir), SUMMARY_FILE)
    if summary["near_chance"]:
        log.warning(
            "Pretraining ended within %d%% of chance: loss %.4g vs chance %.4g (ratio %.3f) at "
            "step %s; the encoder learned nothing from the %s pretext task — check the learning "
            "rate (config.pretrain.learning_rate), the number of steps, the batch size and the "
            "inputs (config.data) before finetuning from it. Recorded in %s",
            round((1 - NEAR_CHANCE) * 100),
            summary["final_loss"],
            summary["chance_loss"],
            summary["ratio"] if summary["ratio"] is not None else float("nan"),
            summary["step"],
            task.name,
            path,
        )
    elif summary["near_chance"] is False:
        log.info(
            "Pretraining ended at loss %.4g vs chance %.4g (ratio %.3f)",
            summary["final_loss"],
            summary["chance_loss"],
            summary["ratio"] if summary["ratio"] is not None else float("nan"),
        )
    write_json(path, summary)  # process 0 only
    return summary


def read_summary(workdir: str) -> dict | None:
    """`<workdir>/pretrain_summary.json` (`report_pretext`), or None when absent."""
    path = os.path.join(os.path.abspath(workdir), SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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


# Draws of the task's random sampling (grid origin, jitter, labels) per held-out case: the
# pretext loss of one draw is noisy; a fixed set of draws makes steps comparable.
VAL_DRAWS = 4


def val_probe(config, dataset, cases, graphdef, task):
    """`state -> {'loss', ...}`: the task's loss and metrics on held-out `cases`, or None.

    Same sampling as training (random grid origin, jitter, augmentations), with fixed keys, so
    every evaluation sees the same pretext samples; means over `VAL_DRAWS` draws per case.
    """
    if not cases or config.data.resize_mode == "none":
        return None
    if dataset.kind == "classification":  # 2D images with grades
        source = datasets.ImageSource(dataset, cases, size=config.data.size, with_label=False)
        vols = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
    else:
        source = common.preprocessed_source(
            config, dataset, cases, with_label=False, progress=False
        )
        vols = np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])
    if config.data.spatial_dims == 2 and vols.ndim == 5:  # central axial slice of each volume
        vols = np.take(vols, vols.shape[1 + slices.AXIAL_AXIS] // 2, axis=1 + slices.AXIAL_AXIS)
    batch = int(config.pretrain.batch_size)
    # Whole batches of the training size (CPC / Exemplar draw negatives from the batch): cases
    # repeated to fill them, each with its own key.
    reps = max(VAL_DRAWS, -(-batch // len(vols)))
    idx = np.resize(np.arange(len(vols)), reps * len(vols))
    idx = idx[: (len(idx) // batch) * batch] if len(idx) >= batch else np.resize(idx, batch)
    batches = [jnp.asarray(vols[idx[i : i + batch]]) for i in range(0, len(idx), batch)]
    keys = jax.random.split(jax.random.key(12345), len(batches))
    log.info(
        "Held-out pretext loss every %d steps on %d validation cases (%d batches of %d)",
        config.pretrain.knn_every or config.pretrain.num_steps,
        len(vols),
        len(batches),
        batch,
    )

    @jax.jit
    def evaluate(params, x, key):
        _, metrics = task.loss(nnx.merge(graphdef, params), x, key)
        return metrics

    def run(state):
        params = jax.device_get(state.params)
        out = [jax.device_get(evaluate(params, x, k)) for x, k in zip(batches, keys)]
        return {k: float(np.mean([o[k] for o in out])) for k in out[0]}

    return run
