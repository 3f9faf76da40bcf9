"""The finetuning arms (each arm's schedule, trainable parts and learning rate), the restore
check, the TensorBoard writer, and `Scores`, what a downstream task's evaluation gives the
generic runner.

The runner (`downstream.py`) and the downstream tasks it runs (segmentation in `finetune.py`,
classification in `classify.py`) import this module; the tasks import neither each other nor
the runner.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from ssl3d_jax import tensorboard
from ssl3d_jax.checkpoint import open_pretrained
from ssl3d_jax.errors import CheckpointError

__all__ = [
    "ARMS",
    "PROBE_PARTS",
    "RESTORED_ARMS",
    "SCHEDULES",
    "Scores",
    "check_compatible",
    "learning_rate",
    "open_tensorboard",
    "trainable_parts",
]

log = logging.getLogger(__name__)

# How each arm trains (see `trainable_parts`): 'warmup' = the task's warm-up parts (the decoder,
# or the classification head) alone for `config.finetune.warmup_frozen_steps`, then everything;
# 'full' = everything from step 0; 'probe' = a linear read-out of the frozen encoder. The
# controls train exactly as the arm of the same schedule and differ from it only in skipping the
# restore.
SCHEDULES = {
    "pretrained": "warmup",
    "scratch": "full",
    "probe": "probe",
    "random_warmup": "warmup",
    "random_probe": "probe",
}
ARMS = tuple(SCHEDULES)
# Arms whose encoder is restored from the pretraining checkpoint (all others keep the random
# initialisation of the shared init key).
RESTORED_ARMS = ("pretrained", "probe")
# The top-level part trained by the probe arms (the linear read-out); their encoder never trains.
PROBE_PARTS = ("head",)


def trainable_parts(
    config, arm: str, step: int, *, warmup_parts: tuple[str, ...]
) -> tuple[str, ...] | None:
    """The top-level parameter parts that train at (0-based) `step` of `arm`; None: all.

    `warmup_parts`: the parts that train alone during the frozen warm-up (the task's).
    """
    schedule = SCHEDULES[arm]
    if schedule == "probe":
        return PROBE_PARTS
    if schedule == "warmup" and step < config.finetune.warmup_frozen_steps:
        return warmup_parts
    return None


def learning_rate(config, arm: str) -> float:
    """`config.finetune.probe_learning_rate` for the probe arms, else `learning_rate`."""
    cfg = config.finetune
    return cfg.probe_learning_rate if SCHEDULES[arm] == "probe" else cfg.learning_rate


def check_compatible(init_from: str, config, dataset) -> dict:
    """Refuse an encoder pretrained on other inputs before touching its weights.

    Reads the checkpoint's self-description (`meta.input`, written by every pretraining run) and
    compares channel count, channel names and dimensionality with this run's data.

    Returns:
      the checkpoint's meta.
    """
    with open_pretrained(init_from) as ckpt:
        meta = ckpt.read_meta()
    spec = meta.get("input", {})
    dims = spec.get("spatial_dims")
    if dims is not None and dims != config.data.spatial_dims:
        raise CheckpointError(
            f"encoder in {init_from} was pretrained in {dims}D, but config.data.spatial_dims is "
            f"{config.data.spatial_dims}"
        )
    have = spec.get("in_channels")
    if have is not None and have != dataset.in_channels:
        raise CheckpointError(
            f"encoder in {init_from} was pretrained on {have} input channels "
            f"({spec.get('modalities')}), but this data has {dataset.in_channels} "
            f"({list(dataset.channels)}); select channels with config.data.modalities"
        )
    names = spec.get("modalities")
    if names and [n.lower() for n in names] != [n.lower() for n in dataset.channels]:
        log.warning(
            "Encoder in %s was pretrained on channels %s; this data's channels are %s",
            init_from,
            names,
            list(dataset.channels),
        )
    return meta


def open_tensorboard(config, workdir: str, phase: str, *, learning_rate: float):
    """The phase's TensorBoard writer (None when `config.tensorboard` is off or on processes
    other than 0), with the learning rate logged at step 0 (constant: no schedule)."""
    if not config.tensorboard:
        return None
    tb = tensorboard.Writer(tensorboard.folder(workdir, phase))
    if not tb.enabled:
        return None
    tb.scalars({"phase": phase, "step": 0, "learning_rate": float(learning_rate)})
    return tb


class Scores(NamedTuple):
    """A downstream task's evaluation of a list of cases.

    per_case: {case_name: {score: value}} (JSON-able).
    metrics: {score: float}, the summary over the cases (the results' `metrics` / `val_metrics`).
    fields: further result fields of the task (read from the test cases' evaluation).
    note: appended to the log line of the metrics ('' for none).
    """

    per_case: dict
    metrics: dict
    fields: dict
    note: str = ""
