"""The finetuning arms and what the segmentation and classification runners share: each arm's
schedule, its learning rate, the restore check and the TensorBoard writer.

Both runners (`finetune.py`, `classify.py`) import this module and not each other;
`downstream.run` picks the runner from the dataset.
"""

from __future__ import annotations

import logging

from ssl3d_jax import tensorboard
from ssl3d_jax.checkpoint import open_pretrained
from ssl3d_jax.errors import CheckpointError

__all__ = [
    "ARMS",
    "RESTORED_ARMS",
    "SCHEDULES",
    "check_compatible",
    "learning_rate",
    "open_tensorboard",
    "trainable_parts",
]

log = logging.getLogger(__name__)

# How each arm trains (see `trainable_parts`): 'warmup' = the decoder alone for
# `config.finetune.warmup_frozen_steps`, then everything; 'full' = everything from step 0;
# 'probe' = a linear read-out of the frozen encoder (VoxelLinearProbe). The controls train
# exactly as the arm of the same schedule and differ from it only in skipping the restore.
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
# Top-level parts trained (None: all); the encoder of the probe arms never trains.
_WARMUP_PARTS = ("decoder",)
_PROBE_PARTS = ("head",)


def trainable_parts(config, arm: str, step: int) -> tuple[str, ...] | None:
    """The top-level parameter parts that train at (0-based) `step` of `arm`; None: all."""
    schedule = SCHEDULES[arm]
    if schedule == "probe":
        return _PROBE_PARTS
    if schedule == "warmup" and step < config.finetune.warmup_frozen_steps:
        return _WARMUP_PARTS
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
    if not config.get("tensorboard", False):
        return None
    tb = tensorboard.Writer(tensorboard.folder(workdir, phase))
    if not tb.enabled:
        return None
    tb.scalars({"phase": phase, "step": 0, "learning_rate": float(learning_rate)})
    return tb
