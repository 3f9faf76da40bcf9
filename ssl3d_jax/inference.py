"""Sliding-window inference over volumes (or images) larger than the model's input.

With `config.data.resize_mode="none"` the model trains on S^3 crops of volumes kept at their
resampled size, so prediction tiles each volume with overlapping windows and blends the window
outputs with a Gaussian weight (nnU-Net: window borders see less context and are less reliable).
numpy only: `predict_fn` is any callable, typically a jitted model; it is always called with the
same batch shape, so it compiles once.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

from ssl3d_jax.progress import Progress

BLENDS = ("gaussian", "constant")
# nnU-Net's Gaussian importance map: sigma = window / 8, floored so that corner voxels covered by
# a single window keep a usable (non-zero, non-denormal) weight.
_SIGMA_SCALE = 1.0 / 8
_MIN_WEIGHT = 1e-3


def window_starts(n: int, w: int, step: int) -> list[int]:
    """Start offsets of windows of length `w` with stride `step` over `n >= w` voxels.

    A regular grid from 0, plus one window flush with the end when the grid misses it.
    """
    if n <= w:
        return [0]
    starts = list(range(0, n - w + 1, step))
    if starts[-1] != n - w:
        starts.append(n - w)
    return starts


def importance_map(window: Sequence[int], blend: str = "gaussian") -> np.ndarray:
    """float32 [*window] blending weights, max 1: Gaussian (sigma = w/8 per axis) or constant."""
    if blend not in BLENDS:
        raise ValueError(f"sliding_window: blend={blend!r}; expected one of {BLENDS}.")
    if blend == "constant":
        return np.ones(tuple(window), np.float32)
    weight = np.ones((), np.float64)
    for w in window:
        x = np.arange(w) - (w - 1) / 2
        g = np.exp(-0.5 * (x / max(w * _SIGMA_SCALE, 1e-6)) ** 2)
        weight = np.multiply.outer(weight, g)
    weight /= weight.max()
    return np.maximum(weight, _MIN_WEIGHT).astype(np.float32)


def sliding_window(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    volume: np.ndarray,
    *,
    window: tuple[int, ...],
    overlap: float = 0.5,
    batch_size: int = 4,
    blend: str = "gaussian",
    progress: bool = False,
) -> np.ndarray:
    """Predicts a whole volume window by window and blends the overlapping outputs.

    Args:
      predict_fn: float [N, *window, C] (numpy) -> logits or probabilities [N, *window, K]
        (numpy or jax). Always called with N = `batch_size` (the last batch is padded by
        repeating its last window, and the extra outputs dropped), so a jitted function compiles
        once.
      volume: float [*spatial, C]; len(spatial) == len(window) (2D images or 3D volumes). Axes
        shorter than the window are zero-padded at the end (the background value of
        preprocessed volumes) and cropped back.
      window: the model's input size, e.g. (S, S, S).
      overlap: fraction of a window shared with its neighbour along each axis, in [0, 1). The
        last window along an axis is flush with the border.
      batch_size: windows per call.
      blend: "gaussian" (centre-weighted, nnU-Net) or "constant" (plain average).
      progress: a progress bar over the windows (on a terminal; else a log line per ~10 %).
        Off by default: callers that loop over volumes count volumes instead.

    Returns:
      float32 [*spatial, K]: the weighted average of the window outputs covering each voxel
      (linear in the outputs: blend logits, then argmax or softmax).
    """
    window = tuple(int(w) for w in window)
    nd = len(window)
    volume = np.asarray(volume)
    if volume.ndim != nd + 1:
        raise ValueError(
            f"sliding_window: volume shape {volume.shape}; expected [*spatial, C] with "
            f"{nd} spatial axes (window {window})."
        )
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"sliding_window: overlap={overlap}; expected 0 <= overlap < 1.")
    if batch_size < 1 or any(w < 1 for w in window):
        raise ValueError(f"sliding_window: batch_size={batch_size}, window={window}.")
    weight = importance_map(window, blend)

    spatial = volume.shape[:nd]
    padded = tuple(max(n, w) for n, w in zip(spatial, window))
    if padded != spatial:
        pad = [(0, p - n) for p, n in zip(padded, spatial)] + [(0, 0)]
        volume = np.pad(volume, pad)
    steps = [max(1, int(w * (1.0 - overlap))) for w in window]
    corners = list(
        itertools.product(*(window_starts(n, w, s) for n, w, s in zip(padded, window, steps)))
    )

    out = None
    norm = np.zeros(padded, np.float32)
    bar = Progress(len(corners), "sliding window") if progress else None
    for b in range(0, len(corners), batch_size):
        chunk = corners[b : b + batch_size]
        slices = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in chunk]
        batch = np.stack([volume[s] for s in slices])
        if len(chunk) < batch_size:
            fill = np.repeat(batch[-1:], batch_size - len(chunk), axis=0)
            batch = np.concatenate([batch, fill])
        pred = np.asarray(predict_fn(batch), dtype=np.float32)
        if pred.shape[: nd + 1] != (batch_size, *window) or pred.ndim != nd + 2:
            raise ValueError(
                f"sliding_window: predict_fn returned shape {pred.shape}; expected "
                f"{(batch_size, *window)} + (K,)."
            )
        if out is None:
            out = np.zeros((*padded, pred.shape[-1]), np.float32)
        for s, p in zip(slices, pred):
            out[s] += p * weight[..., None]
            norm[s] += weight
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    out /= norm[..., None]
    return out[tuple(slice(0, n) for n in spatial)]
