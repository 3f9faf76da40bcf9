"""Writing predictions back onto the scan: inverse preprocessing and NIfTI export.

A prediction made on a preprocessed volume lives on the model's grid (resized, cropped,
resampled, RAS-reoriented). `to_native` undoes the spatial steps of `preprocess.Preprocess`
from its `geometry` dict, giving an array on the canonical grid of the case (`probs_to_native`
does it for class probabilities, resampled linearly before the argmax); `save_prediction`
maps class indices to the dataset's on-disk label values, undoes the canonical reorientation and
writes a NIfTI with exactly the reference scan's shape, affine and q/s-forms, so that it opens on
top of the scan in ITK-SNAP or 3D Slicer.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations

from ssl3d_jax.data.preprocess import resample
from ssl3d_jax.errors import DataError
from ssl3d_jax.fileio import atomic_path


def _check_fitted(spatial: Sequence[int], geometry: Mapping[str, Any], fn: str) -> None:
    fitted = tuple(int(n) for n in geometry["fitted_shape"])
    if tuple(spatial) != fitted:
        raise ValueError(
            f"{fn}: prediction spatial shape {tuple(spatial)} differs from the preprocessed "
            f"shape {fitted} recorded in geometry."
        )


def _undo_geometry(
    vol: np.ndarray, geometry: Mapping[str, Any], *, order: int, fill: float = 0
) -> np.ndarray:
    """One spatial volume [*F] on the preprocessed grid -> [*canonical_shape] on the case's
    canonical grid: undoes the fitting (resize, or crop / pad), the resampling to the target
    spacing and the foreground crop, in that order. Resampling is nearest neighbour (`order`
    0: values copied, dtype kept) or linear (1: float32). Voxels the model never saw (outside
    the crop_pad window or the foreground crop) get `fill`."""
    vol = np.asarray(vol)
    dtype = vol.dtype if order == 0 else np.float32
    resampled = tuple(int(n) for n in geometry["resampled_shape"])
    fit = geometry["fit"]

    # Undo the fitting: back to the resampled crop.
    if fit["mode"] == "resize":
        x = resample(vol, resampled, order=order)
    else:
        x = np.full(resampled, fill, dtype)
        src = tuple(slice(a, b) for a, b in fit["src"])
        dst = tuple(slice(a, b) for a, b in fit["dst"])
        x[src] = vol[dst]

    # Undo the resampling: back to the foreground box on the native grid.
    box = geometry["crop_box"]
    box_shape = tuple(int(b) - int(a) for a, b in box)
    if box_shape != resampled:
        x = resample(x, box_shape, order=order)

    # Undo the crop.
    out = np.full(tuple(int(n) for n in geometry["canonical_shape"]), fill, dtype)
    out[tuple(slice(int(a), int(b)) for a, b in box)] = x
    return out


def to_native(pred: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """Maps a prediction on the preprocessed grid back to the case's canonical grid.

    Args:
      pred: int [*F] class indices (inverted with nearest neighbour: no new values), or float
        [*F, K] per-class scores (inverted linearly, channel by channel). F =
        `geometry["fitted_shape"]`. For class probabilities use `probs_to_native`, which
        also fills the voxels the model never saw with background.
      geometry: the `geometry` dict of `Preprocess(keep_geometry=True)` for this case.

    Returns:
      array [*canonical_shape] (int) or [*canonical_shape, K] (float32), on the voxel grid of
      the canonically reoriented scan (what `nifti.load_nifti` returns). Voxels outside the
      foreground crop or the crop_pad window are 0 (background class / zero score).
    """
    pred = np.asarray(pred)
    if pred.dtype.kind in "iub":
        _check_fitted(pred.shape, geometry, "to_native")
        return _undo_geometry(pred, geometry, order=0)
    _check_fitted(pred.shape[:-1], geometry, "to_native")
    # One channel at a time: peak memory stays at about two float32 channels beyond the output.
    return np.stack(
        [_undo_geometry(pred[..., k], geometry, order=1) for k in range(pred.shape[-1])], axis=-1
    )


def probs_to_native(probs: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """Class indices on the case's canonical grid from class probabilities on the model's grid.

    nnU-Net's way: each class's probability is resampled linearly to the scan's grid (through
    the same steps as `to_native`: fitting, spacing, foreground crop), then the argmax is taken
    there. Mapping the argmax labels back by nearest neighbour (`to_native` of int labels)
    instead copies each coarse voxel's class to a block of fine voxels, a staircase of up to
    the resize factor along every boundary.

    Args:
      probs: float [*F, K] class probabilities (e.g. a softmax), K >= 1, class 0 the
        background. F = `geometry["fitted_shape"]`.
      geometry: the `geometry` dict of `Preprocess(keep_geometry=True)` for this case.

    Returns:
      int32 [*canonical_shape] class indices, as `to_native(argmax(probs))` returns them (map
      them to on-disk label values with `save_prediction`). Voxels the model never saw (outside
      the foreground crop or the crop_pad window) count as background with probability 1, so
      they are class 0, and the boundary with them falls where it does for labels. Ties go to
      the lower class index, as with `np.argmax`.
    """
    probs = np.asarray(probs)
    if probs.ndim < 2 or probs.shape[-1] < 1 or probs.dtype.kind != "f":
        raise ValueError(
            f"probs_to_native: probabilities of shape {probs.shape} ({probs.dtype}); expected "
            "float [*spatial, K]."
        )
    _check_fitted(probs.shape[:-1], geometry, "probs_to_native")
    # A running argmax over the classes, one channel resampled at a time: memory stays at a few
    # float32 volumes of the scan's grid whatever K.
    best = labels = None
    for k in range(probs.shape[-1]):
        p = _undo_geometry(probs[..., k], geometry, order=1, fill=1.0 if k == 0 else 0.0)
        if best is None:
            best, labels = p, np.zeros(p.shape, np.int32)
        else:
            better = p > best
            labels[better] = k
            best = np.where(better, p, best)
    return labels


def _label_dtype(values: np.ndarray):
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    for dt in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    raise DataError(f"label values {lo}..{hi} do not fit a 32-bit integer NIfTI.")


def save_prediction(
    labels: np.ndarray,
    reference_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    label_values: Sequence[int],
) -> pathlib.Path:
    """Writes class indices on the canonical grid as a label NIfTI aligned with a reference scan.

    Args:
      labels: int [D, H, W] class indices on the canonical (RAS) grid of `reference_path`, e.g.
        `to_native(...)` of an argmax.
      reference_path: the scan the prediction belongs to (3D, or 4D with channels on the last
        axis, e.g. Decathlon BrainTumour: the output then has its first three dims).
      out_path: `.nii.gz` or `.nii` file to write (atomically: temp file + rename).
      label_values: on-disk label value of class index i (e.g. BraTS (0, 1, 2, 4): 3 -> 4).

    Returns:
      out_path. The file has exactly the reference's spatial shape, affine, q/s-forms (codes
      included) and units; its dtype is uint8 when the values fit (else int16 / int32), with
      no intensity scaling and the NIfTI label intent.

    Raises:
      DataError naming the reference when it cannot be read, or when `labels` does not fit its
      canonical grid; ValueError when `labels` holds class indices outside `label_values`.
    """
    reference_path = pathlib.Path(reference_path)
    out_path = pathlib.Path(out_path)
    try:
        ref = nib.load(str(reference_path))
        ref_shape = tuple(int(n) for n in ref.shape)
        ref_affine = np.asarray(ref.affine, np.float64)
    except Exception as e:  # nibabel raises many types for bad files
        raise DataError(
            f"{reference_path}: cannot read the reference NIfTI ({type(e).__name__}: {e})."
        ) from e
    if len(ref_shape) not in (3, 4):
        raise DataError(f"{reference_path}: shape {ref_shape}; expected a 3D or 4D volume.")
    spatial = ref_shape[:3]

    ornt = orientations.io_orientation(ref_affine)
    canonical_shape = [0, 0, 0]
    for ax, (out_ax, _) in enumerate(ornt):
        canonical_shape[int(out_ax)] = spatial[ax]
    labels = np.asarray(labels)
    if labels.shape != tuple(canonical_shape) or labels.dtype.kind not in "iub":
        raise DataError(
            f"{reference_path}: prediction of shape {labels.shape} ({labels.dtype}) does not fit "
            f"this scan; expected integer class indices of shape {tuple(canonical_shape)} (the "
            "scan's canonical RAS grid)."
        )
    lut = np.asarray(label_values, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= lut.size):
        raise ValueError(
            f"save_prediction: class indices {int(labels.min())}..{int(labels.max())} outside "
            f"0..{lut.size - 1} (label_values={tuple(label_values)})."
        )
    dtype = _label_dtype(lut)
    values = lut[labels].astype(dtype)

    # load_nifti applied `ornt` (as_closest_canonical); apply its inverse.
    back = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), ornt)
    data = np.ascontiguousarray(orientations.apply_orientation(values, back))
    assert data.shape == spatial, (data.shape, spatial)

    header = ref.header.copy()
    header.set_data_shape(spatial)
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    # affine=None: nibabel then keeps the copied header's q/s-forms and their codes bit for bit
    # (given an affine it may rewrite them, e.g. set sform_code 2 on a qform-only scan).
    img = nib.Nifti1Image(data, None, header=header)
    img.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    img.header["cal_min"] = 0
    img.header["cal_max"] = float(lut.max()) if lut.size else 0.0

    suffix = ".nii.gz" if out_path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(out_path, suffix=suffix) as tmp:
        nib.save(img, tmp)
    return out_path
