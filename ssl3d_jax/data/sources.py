"""grain sources that read the cases of a `Dataset` (`types.Dataset`): `VolumeSource` for 3D
layouts (BraTS, Decathlon, nifti folder); `ImageSource` for the images layout lives in `images`
and is re-exported here.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from ssl3d_jax.data.images import ImageSource
from ssl3d_jax.data.nifti import load_nifti
from ssl3d_jax.data.types import Case, Dataset, check_same_grid, labels_to_index
from ssl3d_jax.errors import DataError

__all__ = ["VolumeSource", "ImageSource"]


class VolumeSource(grain.sources.RandomAccessDataSource):
    """grain source reading one 3D case (BraTS, Decathlon or nifti layout) per record.

    Record `i` (of `cases`, default `dataset.cases`):
      image: float32 [D, H, W, C], channels in `dataset.channels` order, values as stored (MRI
        intensities, CT in Hounsfield units; normalisation is preprocessing's job);
      label: int32 [D, H, W], class index 0..num_classes-1 (only when `with_label`);
      case_index: np.int32 scalar, = i;
      affine: float64 [4, 4] of the (canonically reoriented, RAS) volumes.
    Holds only plain attributes so it pickles into grain worker processes.

    Raises (at construction): DataError when `with_label` and a case has no label file.
    Raises (reading): DataError naming the file: unreadable, wrong dimensionality or channel
      count, grid mismatch between a case's files, unexpected label values.
    """

    def __init__(
        self, dataset: Dataset, cases: Sequence[Case] | None = None, *, with_label: bool = True
    ):
        if dataset.spatial_dims != 3:
            raise DataError(
                f"{dataset.root}: {dataset.layout} layout holds {dataset.spatial_dims}D images; "
                "VolumeSource reads 3D volumes (use ImageSource)."
            )
        self.dataset = dataset
        self.cases = list(dataset.cases if cases is None else cases)
        self.with_label = with_label
        if with_label:
            if dataset.kind != "segmentation":
                raise DataError(
                    f"{dataset.root}: dataset {dataset.name!r} is {dataset.kind}, without "
                    "segmentation labels, but labels were requested (with_label=True)."
                )
            for c in self.cases:
                if c.label is None:
                    raise DataError(
                        f"{c.images[0].parent}: case {c.name} has no label (seg) file, but "
                        "labels were requested (with_label=True)."
                    )

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.dataset.name!r}, {len(self.cases)} cases, "
            f"with_label={self.with_label})"
        )

    def _read_image(self, case: Case):
        ds = self.dataset
        if not ds.channel_index:  # one 3D file per channel (BraTS)
            channels = []
            ref = None
            for p in case.images:
                data, affine = load_nifti(p, dtype=np.float32)
                if data.ndim != 3:
                    raise DataError(f"{p}: shape {data.shape}; expected a 3D volume.")
                if ref is None:
                    ref = (p, data.shape, affine)
                else:
                    check_same_grid(*ref, p, data.shape, affine)
                channels.append(data)
            return np.stack(channels, axis=-1), ref
        (p,) = case.images
        data, affine = load_nifti(p, dtype=np.float32)
        if data.ndim > 4:  # singleton time axis before the vector axis
            data = data.reshape(data.shape[:3] + tuple(s for s in data.shape[3:] if s != 1))
        if data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4 or data.shape[-1] != ds.file_channels:
            want = "a 3D volume" if ds.file_channels == 1 else "a 4D volume [X, Y, Z, C]"
            raise DataError(
                f"{p}: shape {data.shape}; expected {want} with {ds.file_channels} channel(s) "
                f"({ds.name}: {ds.file_channels} modalities)."
            )
        if ds.channel_index != tuple(range(ds.file_channels)):
            data = data[..., list(ds.channel_index)]
        return np.ascontiguousarray(data), (p, data.shape[:3], affine)

    def __getitem__(self, i):
        i = int(i)
        case = self.cases[i]
        image, (ref_path, ref_shape, ref_affine) = self._read_image(case)
        record = {"image": image, "case_index": np.int32(i), "affine": ref_affine}
        if self.with_label:
            # Read as integers straight from disk: labels are never resampled through floats.
            seg, affine = load_nifti(case.label, dtype=np.int32)
            check_same_grid(ref_path, ref_shape, ref_affine, case.label, seg.shape, affine)
            record["label"] = labels_to_index(
                seg, self.dataset.label_values, path=case.label, dataset=self.dataset.name
            )
        return record
