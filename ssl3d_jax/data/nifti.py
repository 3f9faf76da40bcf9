"""Reading and writing NIfTI volumes with clear errors for bad files.

Only numpy and nibabel; nothing here knows about models or JAX.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib

import nibabel as nib
import numpy as np

from ssl3d_jax.errors import DataError
from ssl3d_jax.fileio import atomic_path

# Everything a missing, corrupt or truncated (.nii or .nii.gz) file has been seen to raise from
# nibabel's header parse or its lazy data read.
_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    gzip.BadGzipFile,
    EOFError,
    zlib.error,
    OSError,
    ValueError,
)


def load_nifti(
    path: str | os.PathLike, *, dtype=np.float32, canonical: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one NIfTI volume.

    Args:
      path: a `.nii` or `.nii.gz` file.
      dtype: dtype of the returned array. Integer dtypes read the stored values with the header's
        scaling applied and then cast (labels are never interpolated or rounded through floats
        of a different value).
      canonical: reorient to the closest canonical (RAS+) orientation, so that every case of a
        dataset shares one axis order whatever its scanner orientation.

    Returns:
      (array, affine): `array` of `dtype`, shape as stored (3D or 4D), after reorientation;
      `affine` float64 [4, 4] mapping voxel indices of the returned array to world mm.

    Raises:
      DataError naming `path`: missing file, unreadable / corrupt / truncated file, NaN or Inf
      voxels.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: NIfTI file not found (expected a readable .nii or .nii.gz file).")
    try:
        img = nib.load(str(path))
        if canonical:
            img = nib.as_closest_canonical(img)
        # `dataobj` reads lazily, so truncation only shows up here, not at nib.load.
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except _READ_ERRORS as e:
        raise DataError(
            f"{path}: cannot read NIfTI file ({type(e).__name__}: {e}); expected a valid, "
            "complete .nii or .nii.gz file."
        ) from e
    if data.dtype.kind in "fc" and not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise DataError(f"{path}: {bad} NaN or Inf voxels; expected only finite values.")
    if np.dtype(dtype).kind in "iu" and data.dtype.kind == "f":
        # Label maps stored as float (common in converted datasets) must hold whole numbers.
        if not np.array_equal(data, np.round(data)):
            raise DataError(f"{path}: non-integer values; expected an integer label map.")
    return data.astype(dtype, copy=False), affine


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> None:
    """Writes `array` (any numeric dtype, 3D or 4D) with `affine` (float [4, 4]) atomically.

    The file is written to a temporary name in the same folder and then renamed, so a killed
    writer never leaves a truncated file under the final name.
    """
    path = pathlib.Path(path)
    # nibabel picks gzip from the suffix, so the temp name must keep it.
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, tmp)
