"""TensorBoard event files beside `metrics.jsonl`, and the numpy image renderings they show.

Layout: one run folder per training phase, `<workdir>/tensorboard/<phase>` (`pretrain`,
`finetune/pretrained`, `finetune/scratch`, ...). Scalar tags are `<record phase>/<metric>`
(`pretrain/loss`, `pretrain/knn/knn_accuracy`, `finetune/pretrained/test/WT`), x axis = the
record's step. Why one folder per phase rather than one writer: resuming a phase at step S must
hide that phase's events logged after S (tensorboardX's `purge_step`), and TensorBoard purges a
whole run folder, so a finetuning arm resumed at step 10 would otherwise hide pretraining's steps.

Only process 0 writes (every process logs the same global metrics). Images are rendered here in
numpy (no matplotlib): `montage` (mid slices of a batch, one row per sample, one column per
channel) and `overlay` (a slice with the true and the predicted labels in colour).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys

import jax
import numpy as np

log = logging.getLogger(__name__)

# Record fields that are not metrics (the step is the x axis; wall-clock time is TensorBoard's).
_NOT_SCALARS = ("phase", "step", "time")
# Label colours (RGB) for class indices 1, 2, 3, ...; class 0 (background) stays grey.
_COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]],
    np.uint8,
)
_ALPHA = 0.45  # opacity of the label colours over the image
# tensorboardX names event files `events.out.tfevents.<seconds>.<host><suffix>`: two writers
# opened in the same second would share (and truncate) one file. The suffix makes each unique and
# sorts them in creation order, which TensorBoard's purge (see `Writer`) relies on.
_FILE_COUNTER = itertools.count()


def folder(workdir: str, phase: str) -> str:
    """`<workdir>/tensorboard/<phase>`: the run folder of one training phase."""
    return os.path.join(os.path.abspath(workdir), "tensorboard", *phase.split("/"))


class Writer:
    """A tensorboardX `SummaryWriter` for one phase's run folder; a no-op on processes != 0.

    Args:
      logdir: the run folder (see `folder`).
      purge_step: when reopening a phase resumed at step S, S + 1: TensorBoard then hides the
        events of this folder logged earlier with step >= S + 1 (the interrupted run's steps
        that the resumed run logs again), as `MetricWriter.drop_after` does for metrics.jsonl.
        TensorBoard reads a folder's files in name (= creation) order and purges only what it
        read before: a writer that logs steps > S next to a purging one must be opened after it.

    Every call flushes: records are rare (every `log_every` steps) and a killed run keeps them.
    """

    def __init__(self, logdir: str, *, purge_step: int | None = None):
        self.logdir = logdir
        self._writer = None
        if jax.process_index() == 0:
            SummaryWriter = _summary_writer_class()
            os.makedirs(logdir, exist_ok=True)
            suffix = f".{os.getpid()}.{next(_FILE_COUNTER):06d}"
            self._writer = SummaryWriter(
                logdir, purge_step=purge_step, flush_secs=10, filename_suffix=suffix
            )

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalars(self, record: dict) -> None:
        """Every finite numeric field of a metrics record as `<record phase>/<field>` at
        `record['step']`."""
        if self._writer is None:
            return
        phase, step = str(record.get("phase", "")), int(record.get("step", 0))
        for k, v in sorted(record.items()):
            if k in _NOT_SCALARS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                self._writer.add_scalar(f"{phase}/{k}" if phase else k, float(v), step)
        self._writer.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """uint8 `[H, W]` (grey) or `[H, W, 3]` (RGB)."""
        if self._writer is None:
            return
        image = np.asarray(image)
        self._writer.add_image(tag, image, step, dataformats="HW" if image.ndim == 2 else "HWC")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@contextlib.contextmanager
def _without_torch():
    """Makes `import torch` fail inside the block unless torch is already imported.

    tensorboardX's writer imports torch whenever it is installed (only to accept torch tensors,
    which we never pass): that costs seconds and loads torch's own OpenMP / BLAS runtimes into
    the training process. A None entry in sys.modules makes the import raise ImportError, which
    tensorboardX handles; the entry is removed afterwards, so a later `import torch` works.
    """
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _summary_writer_class():
    with _without_torch():
        from tensorboardX import SummaryWriter
    return SummaryWriter


def to_uint8(x: np.ndarray, *, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    """float `[...]` -> uint8 `[...]`, the `lo`..`hi` percentiles stretched to 0..255 (robust to
    outliers: z-scored scans have long tails); a constant input gives zeros."""
    x = np.asarray(x, np.float32)
    if not x.size:
        return np.zeros(x.shape, np.uint8)
    a, b = np.percentile(x, [lo, hi])
    if not b > a:  # mostly one value (e.g. background): stretch the full range instead
        a, b = float(x.min()), float(x.max())
    if not b > a:
        return np.zeros(x.shape, np.uint8)
    return (np.clip((x - a) / (b - a), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mid_slices(batch: np.ndarray, *, spatial_dims: int, axis: int = 2) -> np.ndarray:
    """The middle slice along spatial `axis` of every sample: float `[B, *spatial, C]` ->
    `[B, H, W, C]` (2D batches are returned as they are)."""
    batch = np.asarray(batch)
    if spatial_dims == 2:
        return batch
    return np.take(batch, batch.shape[1 + axis] // 2, axis=1 + axis)


def montage(slices: np.ndarray, *, max_samples: int = 8, max_channels: int = 4, pad: int = 1):
    """A grid of 2D slices: float `[B, H, W, C]` -> uint8 `[rows·(H+pad), cols·(W+pad)]`, one
    row per sample (at most `max_samples`), one column per channel (at most `max_channels`),
    each tile contrast-stretched on its own (`to_uint8`)."""
    slices = np.asarray(slices)[:max_samples, ..., :max_channels]
    b, h, w, c = slices.shape
    out = np.zeros((b * (h + pad), c * (w + pad)), np.uint8)
    for i in range(b):
        for j in range(c):
            y, x = i * (h + pad), j * (w + pad)
            out[y : y + h, x : x + w] = to_uint8(slices[i, ..., j])
    return out


def colour_labels(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 `[H, W]` image, int `[H, W]` class indices -> uint8 `[H, W, 3]`: class k > 0 tinted
    with colour k (cycling), background left grey."""
    rgb = np.repeat(np.asarray(grey, np.float32)[..., None], 3, axis=-1)
    labels = np.asarray(labels)
    fg = labels > 0
    colours = _COLOURS[(np.maximum(labels, 1) - 1) % len(_COLOURS)].astype(np.float32)
    rgb[fg] = (1 - _ALPHA) * rgb[fg] + _ALPHA * colours[fg]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, true: np.ndarray, pred: np.ndarray, *, pad: int = 2) -> np.ndarray:
    """Three panels side by side: the slice, the slice with the true labels, the slice with the
    predicted labels. float `[H, W]`, int `[H, W]`, int `[H, W]` -> uint8 `[H, 3W + 2·pad, 3]`."""
    grey = to_uint8(image)
    panels = [np.repeat(grey[..., None], 3, axis=-1), colour_labels(grey, true)]
    panels.append(colour_labels(grey, pred))
    h = grey.shape[0]
    gap = np.zeros((h, pad, 3), np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def best_slice(label: np.ndarray, *, axis: int = 2) -> int:
    """The index along `axis` of the slice with the most foreground in `label` (int
    `[*spatial]`); the middle slice when there is none."""
    label = np.asarray(label)
    other = tuple(a for a in range(label.ndim) if a != axis)
    area = (label > 0).sum(axis=other)
    return int(np.argmax(area)) if area.any() else label.shape[axis] // 2
