"""Writing predictions back onto the scan: inverse preprocessing and NIfTI export.

A prediction made on a preprocessed volume lives on the model's grid (resized, cropped,
resampled, RAS-reoriented). `to_native` undoes the spatial steps of `preprocess.Preprocess`
from its `geometry` dict, giving an array on the canonical grid of the case; `save_prediction`
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

from ssl3d_jax.data.preprocess import resample, resample_image
from ssl3d_jax.errors import DataError
from ssl3d_jax.fileio import atomic_path


def _undo_spatial(arr: np.ndarray, shape: Sequence[int], *, labels: bool) -> np.ndarray:
    if labels:
        return resample(arr, shape, order=0)
    return resample_image(arr, shape)


def to_native(pred: np.ndarray, geometry: Mapping[str, Any]) -> np.ndarray:
    """Maps a prediction on the preprocessed grid back to the case's canonical grid.

    Args:
      pred: int [*F] class indices (inverted with nearest neighbour: no new values), or float
        [*F, K] per-class scores / probabilities (inverted linearly; take the argmax afterwards
        for smoother boundaries). F = `geometry["fitted_shape"]`.
      geometry: the `geometry` dict of `Preprocess(keep_geometry=True)` for this case.

    Returns:
      array [*canonical_shape] (int) or [*canonical_shape, K] (float32), on the voxel grid of
      the canonically reoriented scan (what `nifti.load_nifti` returns). Voxels outside the
      foreground crop or the crop_pad window are 0 (background class / zero score).
    """
    pred = np.asarray(pred)
    labels = pred.dtype.kind in "iub"
    fitted = tuple(int(n) for n in geometry["fitted_shape"])
    spatial = pred.shape if labels else pred.shape[:-1]
    if tuple(spatial) != fitted:
        raise ValueError(
            f"to_native: prediction spatial shape {tuple(spatial)} differs from the preprocessed "
            f"shape {fitted} recorded in geometry."
        )
    tail = () if labels else pred.shape[-1:]
    dtype = pred.dtype if labels else np.float32
    resampled = tuple(int(n) for n in geometry["resampled_shape"])
    fit = geometry["fit"]

    # Undo the fitting: back to the resampled crop.
    if fit["mode"] == "resize":
        x = _undo_spatial(pred, resampled, labels=labels)
    else:
        x = np.zeros(resampled + tail, dtype)
        src = tuple(slice(a, b) for a, b in fit["src"])
        dst = tuple(slice(a, b) for a, b in fit["dst"])
        x[src] = pred[dst]

    # Undo the resampling: back to the foreground box on the native grid.
    box = geometry["crop_box"]
    box_shape = tuple(int(b) - int(a) for a, b in box)
    if box_shape != resampled:
        x = _undo_spatial(x, box_shape, labels=labels)

    # Undo the crop.
    out = np.zeros(tuple(int(n) for n in geometry["canonical_shape"]) + tail, dtype)
    out[tuple(slice(int(a), int(b)) for a, b in box)] = x
    return out


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
