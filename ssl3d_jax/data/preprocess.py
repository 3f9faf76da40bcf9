"""Preprocessing of 3D scans: resampling, foreground crop, intensity normalisation, fitting.

numpy + scipy only. `Preprocess` is the grain transform every 3D pipeline runs on a source
record (image `[D, H, W, C]` in canonical RAS voxel order, as `nifti.load_nifti` returns it).
With `keep_geometry=True` it also returns a JSON-able `geometry` dict recording every spatial
step, so that `ssl3d_jax.data.export.to_native` can map a prediction back onto the scan's grid.
2D images have their own source and are not handled here (3D volumes only).

Order of the steps, and why:
  1. crop to the foreground bounding box (on the native grid: the box is exact in the file's
     voxels, and the costly resampling then only touches the foreground);
  2. resample the crop to the target spacing (image linear, label nearest: labels are never
     interpolated linearly, which in the original created spurious classes at boundaries);
  3. intensities: CT clipped to a HU window and scaled to [0, 1]; MRI normalised per channel over
     the foreground (z-score or min-max);
  4. fit to the model's input: resize to S^3, crop / pad to S^3, or keep the volume ("none",
     padded up to S per axis so that random S^3 crops and sliding windows fit);
  5. MRI with `background="value"`: the background (outside the foreground mask, fitted like the
     label; padding included) is set to a value below every foreground value (`background_value`).
     With the default "zero" it stays 0, which after z-scoring is also the mean tissue value and
     the convolutions' zero padding.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np
import scipy.ndimage as ndi

from ssl3d_jax.errors import ConfigError

NORMALIZATIONS = ("zscore", "minmax")
# MRI background after normalisation: 'zero' (0: also the z-scored mean tissue value and the
# convolutions' padding) or 'value' (`background_value`: below every foreground value).
BACKGROUNDS = ("zero", "value")
# The 'value' background per normalisation: min-max foreground lies in [0, 1], so -1 is below all
# of it; z-scored MRI foreground rarely reaches 3 standard deviations below the mean (that needs
# a tissue darker than mean - 3 std), so -5 leaves a margin; where a channel's foreground does
# reach it, that channel's background goes 1 below its foreground minimum instead.
BACKGROUND_VALUES = {"zscore": -5.0, "minmax": -1.0}
CUBE_MODES = ("resize", "crop_pad")
RESIZE_MODES = ("resize", "crop_pad", "none")
MODALITIES = ("mri", "ct")
# HU threshold of the CT body mask: between air (-1000) and fat (about -100), so the body with
# its lungs' walls is one region, while the air around it is not.
CT_BODY_HU = -500.0
# Bumped whenever the output of `Preprocess` changes for the same settings, so that disk caches
# written by an older version are never reused (it is part of `settings()`).
PREPROCESS_VERSION = 1


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """float [D, H, W, C] -> bool [D, H, W]: voxels where any channel is non-zero (the brain)."""
    return np.any(image != 0, axis=-1)


def ct_body_mask(image: np.ndarray) -> np.ndarray:
    """float [D, H, W, C] in HU -> bool [D, H, W]: the largest connected region above -500 HU.

    The largest region is the patient's body; the scanner table and other small objects are
    separate regions (unless they touch the body) and are left out. Channel 0 is used.
    """
    mask = np.asarray(image)[..., 0] > CT_BODY_HU
    labels, n = ndi.label(mask)
    if n <= 1:
        return mask
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == int(np.argmax(counts))


def ct_window(image: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """float [...] in HU -> float32 [...] in [0, 1]: clip to `window` = (lo, hi), then scale.

    lo (and everything below it, e.g. air) becomes 0, hi and above becomes 1; the padding value
    0 of later steps is therefore "air / below the window".
    """
    lo, hi = float(window[0]), float(window[1])
    out = (np.clip(np.asarray(image, np.float32), lo, hi) - lo) / np.float32(hi - lo)
    return out.astype(np.float32, copy=False)


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


def background_value(image: np.ndarray, foreground: np.ndarray, *, method: str) -> np.ndarray:
    """Per channel, the 'value' background of a normalised MRI `image [..., C]`.

    `BACKGROUND_VALUES[method]`, or 1 below the channel's smallest foreground value where that is
    lower (and below 0, the value resampling mixes into the foreground's edge), so that it is
    strictly below every foreground voxel of the fitted image.

    Returns:
      float32 `[C]`.
    """
    if method not in BACKGROUND_VALUES:
        raise ConfigError(
            f"config.data.normalization: unknown value {method!r}; expected one of "
            f"{tuple(BACKGROUND_VALUES)}."
        )
    fg = np.asarray(foreground, bool)
    base = np.float32(BACKGROUND_VALUES[method])
    if not fg.any():
        return np.full(image.shape[-1], base, np.float32)
    lowest = np.minimum(image[fg].min(axis=0), 0.0)
    return np.minimum(base, lowest - 1.0).astype(np.float32)


def resample(vol: np.ndarray, shape: Sequence[int], *, order: int) -> np.ndarray:
    """Resamples the spatial axes of `vol` [*spatial] to `shape` (voxel edges aligned).

    Voxel edges (not centres) are aligned, so an image and its label keep the same, symmetric
    extent, and resampling to a shape and back returns to the same grid.

    Args:
      vol: array [*spatial] (no channel axis).
      shape: output spatial shape.
      order: 0 (nearest neighbour by index gathering: values are copied, never mixed, so a label
        map never gains a value) or 1 (linear, float32 output).
    """
    vol = np.asarray(vol)
    shape = tuple(int(s) for s in shape)
    if vol.shape == shape:
        return vol.copy()
    if order == 0:
        # Output voxel o covers input [o, o+1) * n / s; take the input voxel under its centre.
        idx = [
            np.minimum(((np.arange(s) + 0.5) * (n / s)).astype(np.int64), n - 1)
            for n, s in zip(vol.shape, shape)
        ]
        return vol[np.ix_(*idx)]
    zoom = [s / n for n, s in zip(vol.shape, shape)]
    out = ndi.zoom(
        vol.astype(np.float32, copy=False), zoom, order=order, mode="nearest", grid_mode=True
    )
    assert out.shape == shape, (out.shape, shape)
    return out


def resample_image(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    # One channel at a time: peak memory stays at about two float32 channels.
    return np.stack(
        [resample(image[..., c], shape, order=1) for c in range(image.shape[-1])], axis=-1
    ).astype(np.float32, copy=False)


def _resize_volume(vol: np.ndarray, size: int, order: int) -> np.ndarray:
    out = resample(vol, (size,) * vol.ndim, order=order)
    assert out.shape == (size,) * vol.ndim, out.shape
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


def _foreground_centre(fg: np.ndarray) -> list[float]:
    if fg.any():
        idx = np.nonzero(fg)
        return [(i.min() + i.max() + 1) / 2 for i in idx]
    return [n / 2 for n in fg.shape]


def _pad_slices(shape, size: int) -> tuple[list[slice], list[slice], tuple[int, ...]]:
    """Mode "none": centred zero padding of axes shorter than `size`; longer axes untouched."""
    out_shape = tuple(max(n, size) for n in shape)
    src = [slice(0, n) for n in shape]
    dst = [slice((m - n) // 2, (m - n) // 2 + n) for n, m in zip(shape, out_shape)]
    return src, dst, out_shape


def _paste(image, label, src, dst, out_shape):
    out = np.zeros((*out_shape, image.shape[-1]), np.float32)
    out[tuple(dst)] = image[tuple(src)]
    out_label = None
    if label is not None:
        out_label = np.zeros(out_shape, np.int32)
        out_label[tuple(dst)] = np.asarray(label)[tuple(src)]
    return out, out_label


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
    if mode not in CUBE_MODES:
        raise ConfigError(
            f"config.data.resize_mode: unknown value {mode!r}; expected one of {CUBE_MODES}."
        )
    image = np.asarray(image, dtype=np.float32)
    if mode == "resize":
        out = resample_image(image, (size,) * 3)
        out_label = None if label is None else _resize_volume(np.asarray(label), size, order=0)
    else:
        centre = _foreground_centre(foreground_mask(image))
        src, dst = _crop_pad_slices(image.shape[:3], size, centre)
        out, out_label = _paste(image, label, src, dst, (size,) * 3)
    return out.astype(np.float32, copy=False), (
        None if out_label is None else out_label.astype(np.int32, copy=False)
    )


def _bbox(mask: np.ndarray) -> list[list[int]]:
    """[[lo, hi), ...] per axis of the True voxels; the whole volume when there are none."""
    if not mask.any():
        return [[0, int(n)] for n in mask.shape]
    box = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.nonzero(np.any(mask, axis=other))[0]
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def _slices_json(slices: Sequence[slice]) -> list[list[int]]:
    return [[int(s.start), int(s.stop)] for s in slices]


def affine_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """float [4, 4] voxel-to-world affine -> mm per voxel axis (the norms of its columns)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0))


class Preprocess(grain.transforms.Map):
    """grain transform: crop, resample, normalise intensities and fit a 3D case for the model.

    Input record: dict(image float32 [D,H,W,C] in canonical RAS voxel order, label int32 [D,H,W]
    class indices (optional), case_index, affine float64 [4,4] (needed only with `spacing`)).
    Output: dict(image float32 [*F, C], label int32 [*F] if present, case_index np.int32, and
    with `keep_geometry` a JSON-able `geometry` dict) where F = (S, S, S) for modes "resize" and
    "crop_pad", and the resampled crop padded up to at least S per axis for mode "none".
    `affine` is dropped: a batch of per-case affines means nothing after resampling; `geometry`
    holds what is needed to map predictions back (see `export.to_native`).

    Args:
      size: S, the model's input edge length.
      mode: "resize" (whole volume -> S^3), "crop_pad" (centred crop / zero pad to S^3, no
        resampling) or "none" (keep the volume; train on random S^3 crops (`RandomCrop`) and
        predict with sliding windows).
      normalization: MRI only: "zscore" or "minmax" per channel over the foreground. Ignored for
        CT, whose HU have a physical meaning that the fixed window keeps.
      modality: "mri" (foreground = any channel non-zero) or "ct" (foreground = body mask,
        `ct_body_mask`; intensities clipped to `ct_window` and scaled to [0, 1]).
      ct_window: (lo, hi) HU window for CT.
      spacing: target mm per axis (3 numbers, or one for isotropic); None keeps the native grid.
      crop_foreground: crop to the foreground bounding box first (smaller volumes, and "resize"
        spends its voxels on the anatomy rather than on air).
      background: MRI only: "zero" (background 0, as the normalisation leaves it) or "value"
        (background, padding included, set to `background_value`: -5 after z-scoring, -1 after
        min-max, lower where a channel's foreground reaches it). The foreground mask is the
        normalisation's (any channel non-zero), fitted like the label (nearest neighbour);
        foreground voxels are the same as with "zero". Ignored for CT.
      keep_geometry: add the `geometry` dict to the output record.
    """

    def __init__(
        self,
        *,
        size: int,
        mode: str = "resize",
        normalization: str = "zscore",
        modality: str = "mri",
        ct_window: Sequence[float] = (-100.0, 240.0),
        spacing: float | Sequence[float] | None = None,
        crop_foreground: bool = True,
        background: str = "zero",
        keep_geometry: bool = False,
    ):
        if mode not in RESIZE_MODES:
            raise ConfigError(
                f"config.data.resize_mode: unknown value {mode!r}; expected one of {RESIZE_MODES}."
            )
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"config.data.normalization: unknown value {normalization!r}; expected one of "
                f"{NORMALIZATIONS}."
            )
        if background not in BACKGROUNDS:
            raise ConfigError(
                f"config.data.background: unknown value {background!r}; expected one of "
                f"{BACKGROUNDS}."
            )
        if modality not in MODALITIES:
            raise ConfigError(
                f"config.data.modality / dataset modality {modality!r}: expected one of "
                f"{MODALITIES} (3D preprocessing)."
            )
        window = tuple(float(v) for v in ct_window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ConfigError(
                f"config.data.ct_window: {ct_window!r}; expected (lo, hi) HU with lo < hi."
            )
        if spacing is not None:
            sp = np.atleast_1d(np.asarray(spacing, np.float64))
            if sp.size == 1:
                sp = np.repeat(sp, 3)
            if sp.shape != (3,) or not np.all(np.isfinite(sp)) or not np.all(sp > 0):
                raise ConfigError(
                    f"config.data.spacing: {spacing!r}; expected None or positive mm per axis "
                    "(one number or three)."
                )
            spacing = tuple(float(v) for v in sp)
        if int(size) < 1:
            raise ConfigError(f"config.data.size: {size!r}; expected a positive integer.")
        self.size = int(size)
        self.mode = mode
        self.normalization = normalization
        self.modality = modality
        self.ct_window = window
        self.spacing = spacing
        self.crop_foreground = bool(crop_foreground)
        self.background = background
        self.keep_geometry = bool(keep_geometry)

    def settings(self) -> dict[str, Any]:
        """JSON-able settings that determine the output (the disk cache key)."""
        settings = {
            "version": PREPROCESS_VERSION,
            "size": self.size,
            "mode": self.mode,
            "normalization": self.normalization if self.modality == "mri" else None,
            "modality": self.modality,
            "ct_window": list(self.ct_window) if self.modality == "ct" else None,
            "spacing": None if self.spacing is None else list(self.spacing),
            "crop_foreground": self.crop_foreground,
        }
        if self.modality == "mri" and self.background != "zero":
            # Only when it changes the output: caches written before the option existed (all
            # 'zero') keep their key.
            settings["background"] = self.background
        return settings

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "version")
        return f"Preprocess({args}, keep_geometry={self.keep_geometry})"

    def map(self, record: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(record["image"], dtype=np.float32)
        if image.ndim != 4:
            raise ValueError(f"Preprocess: image shape {image.shape}; expected [D, H, W, C].")
        label = record.get("label")
        label = None if label is None else np.asarray(label, dtype=np.int32)
        shape0 = tuple(int(n) for n in image.shape[:3])
        affine = record.get("affine")
        native = affine_spacing(affine) if affine is not None else None

        # 1. foreground crop on the native grid.
        if self.crop_foreground:
            fg = ct_body_mask(image) if self.modality == "ct" else foreground_mask(image)
            box = _bbox(fg)
        else:
            box = [[0, n] for n in shape0]
        crop = tuple(slice(lo, hi) for lo, hi in box)
        image = image[crop]
        label = None if label is None else label[crop]
        box_shape = tuple(hi - lo for lo, hi in box)

        # 2. resampling to the target spacing.
        if self.spacing is not None:
            if native is None:
                raise ValueError("Preprocess(spacing=...) needs the record's `affine`.")
            new_shape = tuple(
                max(1, int(np.floor(n * s / t + 0.5)))
                for n, s, t in zip(box_shape, native, self.spacing)
            )
            image = resample_image(image, new_shape)
            label = None if label is None else resample(label, new_shape, order=0)
        else:
            new_shape = box_shape

        # 3. intensities.
        fg = None  # the foreground of a 'value' background, fitted with the image below
        if self.modality == "ct":
            image = ct_window(image, self.ct_window)
        else:
            fg = foreground_mask(image)
            if not fg.any():
                fg = np.ones(fg.shape, bool)  # normalize_intensity's fallback: all foreground
            image = normalize_intensity(image, method=self.normalization, foreground=fg)
            if self.background == "zero":
                fg = None
            else:
                fill = background_value(image, fg, method=self.normalization)

        # 4. fitting.
        fit: dict[str, Any] = {"mode": self.mode}
        if self.mode == "resize":
            fitted = (self.size,) * 3
            image = resample_image(image, fitted)
            label = None if label is None else resample(label, fitted, order=0)
            fg = None if fg is None else resample(fg, fitted, order=0)
        else:
            if self.mode == "crop_pad":
                centre = _foreground_centre(foreground_mask(image))
                src, dst = _crop_pad_slices(new_shape, self.size, centre)
                fitted = (self.size,) * 3
            else:
                src, dst, fitted = _pad_slices(new_shape, self.size)
            if fg is not None:  # padding is background
                fg = _paste(image[..., :1], fg, src, dst, fitted)[1].astype(bool)
            image, label = _paste(image, label, src, dst, fitted)
            fit.update(src=_slices_json(src), dst=_slices_json(dst))

        # 5. background value (MRI, background="value").
        if fg is not None:
            image[~fg] = fill

        out = {
            "image": image.astype(np.float32, copy=False),
            "case_index": np.int32(record["case_index"]),
        }
        if label is not None:
            out["label"] = label.astype(np.int32, copy=False)
        if self.keep_geometry:
            out["geometry"] = {
                "canonical_shape": list(shape0),
                "spacing": None if native is None else list(native),
                "target_spacing": None if self.spacing is None else list(self.spacing),
                "crop_box": box,
                "resampled_shape": list(new_shape),
                "fitted_shape": list(fitted),
                "fit": fit,
                "canonical_affine": None if affine is None else np.asarray(affine).tolist(),
            }
        return out


class RandomCrop(grain.transforms.RandomMap):
    """grain random transform: a random S^d crop of `image` [*spatial, C] and `label` [*spatial].

    For mode "none": with probability `foreground_prob` the crop is centred (clipped to the
    volume) on a uniformly drawn foreground voxel (label > 0), else its corner is uniform: the
    tumour is small, and uniform crops would rarely show it (nnU-Net's foreground oversampling).
    Axes shorter than S are zero-padded (centred) first. Deterministic given grain's rng. Other
    keys of the record are passed through; `geometry`, if present, is dropped (it describes the
    whole volume, not the crop).
    """

    def __init__(self, size: int, *, foreground_prob: float = 0.33):
        if not 0.0 <= float(foreground_prob) <= 1.0:
            raise ConfigError(
                f"foreground_prob={foreground_prob!r}: expected a probability in [0, 1]."
            )
        self.size = int(size)
        self.foreground_prob = float(foreground_prob)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = np.asarray(element["image"])
        label = element.get("label")
        shape = image.shape[:-1]
        s = self.size
        if any(n < s for n in shape):
            src, dst, padded = _pad_slices(shape, s)
            image, label = _paste(image, label, src, dst, padded)
            shape = padded
        # Both draws happen every call, so the rng stream does not depend on the branch taken.
        use_fg = rng.random() < self.foreground_prob
        corner = [int(rng.integers(0, n - s + 1)) for n in shape]
        if use_fg and label is not None:
            fg = np.flatnonzero(np.asarray(label) > 0)
            if fg.size:
                centre = np.unravel_index(fg[int(rng.integers(0, fg.size))], shape)
                corner = [min(max(int(c) - s // 2, 0), n - s) for c, n in zip(centre, shape)]
        window = tuple(slice(c, c + s) for c in corner)
        out = {k: v for k, v in element.items() if k not in ("image", "label", "geometry")}
        out["image"] = np.ascontiguousarray(image[window])
        if label is not None:
            out["label"] = np.ascontiguousarray(np.asarray(label)[window])
        return out
