"""BraTS-layout datasets: finding cases, label conventions, and a grain data source.

Layout: `<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz` (`.nii` also accepted).
Labels: 0 background, 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

import grain
import numpy as np

from ssl3d_jax.data.nifti import load_nifti
from ssl3d_jax.errors import DataError

MODALITIES = ("t1", "t1ce", "t2", "flair")
LABELS = (0, 1, 2, 4)
# Class index i (what the model predicts) -> BraTS label.
INDEX_TO_LABEL = np.array(LABELS, dtype=np.int32)
REGIONS = ("WT", "TC", "ET")

# Region membership table [3 regions, 4 labels]; compared by broadcasting so that the same code
# runs on numpy and jax arrays without importing jax here.
_REGION_LABELS = np.array([[1, 2, 4], [1, 4, -1], [4, -1, -1]], dtype=np.int32)

_SUFFIXES = (".nii.gz", ".nii")


def label_to_regions(seg):
    """BraTS labels int [...] -> bool [..., 3] regions (WT = {1,2,4}, TC = {1,4}, ET = {4}).

    Accepts numpy or jax integer arrays; returns the same array type.
    """
    # [..., 1, 1] == [3, 3] -> [..., 3, 3]; -1 pads never match a label.
    return (seg[..., None, None] == _REGION_LABELS).any(-1)


def labels_to_index(seg: np.ndarray, *, path: str | os.PathLike) -> np.ndarray:
    """BraTS labels int [...] with values in {0,1,2,4} -> class index int32 [...] in {0,1,2,3}.

    Raises:
      DataError naming `path` and listing the unexpected values.
    """
    seg = np.asarray(seg)
    lut = np.full(max(LABELS) + 1, -1, dtype=np.int32)
    lut[list(LABELS)] = np.arange(len(LABELS), dtype=np.int32)
    values = np.unique(seg)
    bad = [v for v in values.tolist() if not (0 <= v <= max(LABELS)) or lut[int(v)] < 0]
    if bad:
        raise DataError(
            f"{path}: unexpected label values {bad}; expected BraTS labels {list(LABELS)}."
        )
    return lut[seg.astype(np.int64)]


@dataclasses.dataclass(frozen=True)
class Case:
    """One BraTS case: image files in `MODALITIES` order and the optional seg file."""

    name: str
    images: tuple[pathlib.Path, ...]
    label: pathlib.Path | None


def _find_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for suffix in _SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def find_cases(
    root: str | os.PathLike,
    *,
    modalities: Sequence[str] = MODALITIES,
    require_label: bool = True,
) -> list[Case]:
    """Lists the cases of a BraTS training folder, sorted by case name.

    Raises:
      DataError: `root` missing or not a folder; no case folders; a case missing a modality or
        (when `require_label`) its seg file.
    """
    root = pathlib.Path(root)
    layout = "<root>/<case>/<case>_{" + ",".join([*modalities, "seg"]) + "}.nii.gz"
    if not root.exists():
        raise DataError(
            f"{root}: data folder does not exist; expected a folder laid out as {layout}."
        )
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected a folder laid out as {layout}.")
    # Sorted, unlike os.listdir in the original, so case indices are the same on every machine.
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not folders:
        raise DataError(f"{root}: no case folders found; expected a folder laid out as {layout}.")
    cases = []
    for folder in folders:
        name = folder.name
        images = []
        for m in modalities:
            p = _find_file(folder, f"{name}_{m}")
            if p is None:
                raise DataError(
                    f"{folder / f'{name}_{m}.nii.gz'}: missing {m} image of case {name} "
                    f"(expected layout {layout})."
                )
            images.append(p)
        label = _find_file(folder, f"{name}_seg")
        if label is None and require_label:
            raise DataError(
                f"{folder / f'{name}_seg.nii.gz'}: missing segmentation of case {name} "
                f"(expected layout {layout})."
            )
        cases.append(Case(name=name, images=tuple(images), label=label))
    return cases


class BratsSource(grain.sources.RandomAccessDataSource):
    """grain source reading one BraTS case per record.

    Record `i`:
      image: float32 [D, H, W, C], channels = modalities in `Case.images` order;
      label: int32 [D, H, W], class index 0..3 (only when `with_label`);
      case_index: np.int32 scalar, = i;
      affine: float64 [4, 4] of the (canonically reoriented) volumes.
    Holds only plain attributes so it pickles into grain worker processes.
    """

    def __init__(self, cases: Sequence[Case], *, with_label: bool = True):
        self.cases = list(cases)
        self.with_label = with_label
        if with_label:
            for c in self.cases:
                if c.label is None:
                    raise DataError(
                        f"{c.images[0].parent}: case {c.name} has no seg file, but labels were "
                        "requested (with_label=True)."
                    )

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return f"BratsSource({len(self.cases)} cases, with_label={self.with_label})"

    def __getitem__(self, i):
        i = int(i)
        case = self.cases[i]
        channels = []
        ref_path = ref_shape = ref_affine = None
        for p in case.images:
            data, affine = load_nifti(p, dtype=np.float32)
            if data.ndim != 3:
                raise DataError(f"{p}: shape {data.shape}; expected a 3D volume.")
            if ref_path is None:
                ref_path, ref_shape, ref_affine = p, data.shape, affine
            else:
                _check_same_grid(ref_path, ref_shape, ref_affine, p, data.shape, affine)
            channels.append(data)
        record = {
            "image": np.stack(channels, axis=-1),
            "case_index": np.int32(i),
            "affine": ref_affine,
        }
        if self.with_label:
            # Read as integers straight from disk: labels are never resampled through floats.
            seg, affine = load_nifti(case.label, dtype=np.int32)
            _check_same_grid(ref_path, ref_shape, ref_affine, case.label, seg.shape, affine)
            record["label"] = labels_to_index(seg, path=case.label)
        return record


def _check_same_grid(path_a, shape_a, affine_a, path_b, shape_b, affine_b) -> None:
    if tuple(shape_a) != tuple(shape_b):
        raise DataError(
            f"{path_b}: shape {tuple(shape_b)} differs from {path_a} shape {tuple(shape_a)}; "
            "expected all modalities and the seg of a case on the same voxel grid."
        )
    if not np.allclose(affine_a, affine_b, atol=1e-4):
        raise DataError(
            f"{path_b}: affine {np.round(affine_b, 4).tolist()} differs from {path_a} affine "
            f"{np.round(affine_a, 4).tolist()}; expected all modalities and the seg of a case "
            "on the same voxel grid."
        )
