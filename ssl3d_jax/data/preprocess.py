"""Intensity normalisation and fitting volumes to a cube (numpy + scipy only)."""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
import scipy.ndimage as ndi

from ssl3d_jax.errors import ConfigError

NORMALIZATIONS = ("zscore", "minmax")
RESIZE_MODES = ("resize", "crop_pad")


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """float [D, H, W, C] -> bool [D, H, W]: voxels where any channel is non-zero (the brain)."""
    return np.any(image != 0, axis=-1)


def normalize_intensity(
    image: np.ndarray, *, method: str = "zscore", foreground: np.ndarray | None = None
) -> np.ndarray:
    """Per-channel intensity normalisation over the foreground.

    Each channel is normalised on its own (the original min-max normalised all channels jointly,
    which lets the brightest modality squash the others).

    Args:
      image: float [D, H, W, C].
      method: "zscore" ((x - mean) / std over the foreground) or "minmax" (foreground to [0, 1]).
      foreground: bool [D, H, W]; default `foreground_mask(image)`; all voxels if it is empty.

    Returns:
      float32 [D, H, W, C], background voxels 0.
    """
    if method not in NORMALIZATIONS:
        raise ConfigError(
            f"config.data.normalization: unknown value {method!r}; expected one of "
            f"{NORMALIZATIONS}."
        )
    image = np.asarray(image, dtype=np.float32)
    fg = foreground_mask(image) if foreground is None else np.asarray(foreground, dtype=bool)
    if not fg.any():
        fg = np.ones(image.shape[:-1], dtype=bool)
    vals = image[fg].astype(np.float64)  # [N, C]; float64 so large volumes sum accurately
    if method == "zscore":
        mean = vals.mean(axis=0)
        std = vals.std(axis=0)
        std = np.where(std > 1e-8, std, 1.0)  # a constant channel becomes 0, not NaN
        out = (image - mean.astype(np.float32)) / std.astype(np.float32)
    else:
        lo = vals.min(axis=0)
        hi = vals.max(axis=0)
        rng = np.where(hi - lo > 1e-8, hi - lo, 1.0)
        out = (image - lo.astype(np.float32)) / rng.astype(np.float32)
    out[~fg] = 0.0
    return out.astype(np.float32, copy=False)


def _resize_volume(vol: np.ndarray, size: int, order: int) -> np.ndarray:
    # Per-axis zoom factors: any shape and voxel spacing maps to the cube. grid_mode=True aligns
    # voxel edges (not centres), so labels and images keep the same, symmetric extent.
    zoom = [size / s for s in vol.shape]
    out = ndi.zoom(vol, zoom, order=order, mode="nearest", grid_mode=True)
    assert out.shape == (size,) * 3, out.shape
    return out


def _crop_pad_slices(shape, size: int, centre) -> tuple[list[slice], list[slice]]:
    """Source and destination slices per axis to crop / pad a volume of `shape` to `size`."""
    src, dst = [], []
    for n, c in zip(shape, centre):
        if n >= size:
            start = int(round(c - size / 2))
            start = min(max(start, 0), n - size)  # keep the window inside the volume
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
        else:
            off = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(off, off + n))
    return src, dst


def fit_to_cube(
    image: np.ndarray, label: np.ndarray | None = None, *, size: int, mode: str = "resize"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Brings a volume of any shape to a cube.

    Args:
      image: float [D, H, W, C].
      label: int [D, H, W] or None.
      size: edge length S of the output cube.
      mode: "resize" (trilinear image, nearest-neighbour label: labels are never interpolated
        linearly, which in the original created spurious classes at boundaries) or "crop_pad"
        (crop centred on the foreground bounding box, zero-pad centred).

    Returns:
      (float32 [S, S, S, C], int32 [S, S, S] or None).
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(
            f"config.data.resize_mode: unknown value {mode!r}; expected one of {RESIZE_MODES}."
        )
    image = np.asarray(image, dtype=np.float32)
    if mode == "resize":
        out = np.stack(
            [_resize_volume(image[..., c], size, order=1) for c in range(image.shape[-1])], axis=-1
        )
        out_label = None if label is None else _resize_volume(np.asarray(label), size, order=0)
    else:
        fg = foreground_mask(image)
        if fg.any():
            idx = np.nonzero(fg)
            centre = [(i.min() + i.max() + 1) / 2 for i in idx]
        else:
            centre = [n / 2 for n in image.shape[:3]]
        src, dst = _crop_pad_slices(image.shape[:3], size, centre)
        out = np.zeros((size, size, size, image.shape[-1]), np.float32)
        out[tuple(dst)] = image[tuple(src)]
        out_label = None
        if label is not None:
            out_label = np.zeros((size, size, size), np.int32)
            out_label[tuple(dst)] = np.asarray(label)[tuple(src)]
    return out.astype(np.float32, copy=False), (
        None if out_label is None else out_label.astype(np.int32, copy=False)
    )


class Preprocess(grain.transforms.Map):
    """grain transform: normalise intensities, then fit to an S^3 cube.

    Input record: dict(image float32 [D,H,W,C], label int32 [D,H,W] (optional), case_index,
    affine). Output: dict(image float32 [S,S,S,C], label int32 [S,S,S] if present, case_index);
    `affine` is dropped because a batch of per-case affines of different grids means nothing
    after resampling (use `BratsSource` directly if it is needed).
    """

    def __init__(self, *, size: int, mode: str = "resize", normalization: str = "zscore"):
        if mode not in RESIZE_MODES:
            raise ConfigError(
                f"config.data.resize_mode: unknown value {mode!r}; expected one of {RESIZE_MODES}."
            )
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"config.data.normalization: unknown value {normalization!r}; expected one of "
                f"{NORMALIZATIONS}."
            )
        self.size = int(size)
        self.mode = mode
        self.normalization = normalization

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        image = normalize_intensity(record["image"], method=self.normalization)
        image, label = fit_to_cube(image, record.get("label"), size=self.size, mode=self.mode)
        out = {"image": image, "case_index": np.int32(record["case_index"])}
        if label is not None:
            out["label"] = label
        return out
