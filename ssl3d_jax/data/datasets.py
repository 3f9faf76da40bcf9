"""Dataset layouts behind one interface: `open_dataset(root)` -> `Dataset`, read by a grain source.

Four on-disk layouts (`LAYOUTS`) are recognised, so that the same pretraining / finetuning code
runs on BraTS, the Medical Segmentation Decathlon, a plain folder of NIfTI scans, or a folder of
2D images with a CSV of grades (e.g. Kaggle diabetic retinopathy, the paper's 2D benchmark):

  brats      <root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz            (brats.py)
  decathlon  <root>/dataset.json + imagesTr/ + labelsTr/ (+ imagesTs/)      (decathlon.py)
  nifti      <root>/**/*.nii[.gz], unlabelled, 3D or 4D (channels last)     (nifti_folder.py)
  images     <root>/**/*.{png,jpg,jpeg} + <root>/<labels>.csv               (images.py)

A `Dataset` is a plain, picklable description (paths and label conventions); nothing is read
from a volume until a source's `__getitem__`, so opening a dataset of hundreds of cases is cheap.
Segmentation labels are always handed to models as class indices 0..K-1 (`label_values[i]` is the
on-disk value of class i), never as on-disk values, so that BraTS's label 4 and a Decathlon
task's label 3 need no special cases downstream.

Modules: `types` (Case, Dataset, shared helpers), one module per layout, `sources` (grain
sources); this one detects the layout and dispatches (`OPENERS`), and re-exports the public
names of the others, so `datasets.X` keeps working. Nothing here is imported back by them.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Sequence

from ssl3d_jax.data import brats, decathlon, images, nifti_folder
from ssl3d_jax.data.images import ImageSource
from ssl3d_jax.data.nifti_folder import open_nifti_folder
from ssl3d_jax.data.sources import VolumeSource
from ssl3d_jax.data.types import (
    GRID_TOLERANCE_VOXELS,
    IMAGE_SUFFIXES,
    KINDS,
    LAYOUT_EXAMPLES,
    LAYOUTS,
    NIFTI_SUFFIXES,
    Case,
    Dataset,
    check_root,
    check_same_grid,
    expected_layouts,
    file_channels,
    grid_distance_mm,
    labels_to_index,
    looks_like_brats_case,
    nifti_name,
    select_channels,
    visible_dirs,
)
from ssl3d_jax.errors import ConfigError, DataError

__all__ = [
    "GRID_TOLERANCE_VOXELS",
    "IMAGE_SUFFIXES",
    "KINDS",
    "LAYOUT_EXAMPLES",
    "LAYOUTS",
    "NIFTI_SUFFIXES",
    "OPENERS",
    "Case",
    "Dataset",
    "ImageSource",
    "VolumeSource",
    "check_same_grid",
    "detect_layout",
    "file_channels",
    "grid_distance_mm",
    "labels_to_index",
    "looks_like_brats_case",
    "nifti_name",
    "open_dataset",
    "open_nifti_folder",
    "select_channels",
    "visible_dirs",
]

log = logging.getLogger(__name__)

# Layout -> opener(root, modalities=..., labels_csv=...) -> Dataset.
OPENERS = {
    "brats": lambda root, modalities, labels_csv: brats.open_brats(root, modalities=modalities),
    "decathlon": lambda root, modalities, labels_csv: decathlon.open_decathlon(
        root, modalities=modalities
    ),
    "nifti": lambda root, modalities, labels_csv: nifti_folder.open_nifti_folder(
        root, modalities=modalities
    ),
    "images": lambda root, modalities, labels_csv: images.open_images(
        root, modalities=modalities, labels_csv=labels_csv
    ),
}


def _is_brats(root: pathlib.Path) -> bool:
    # Case folders directly under root (BraTS 2020/2021) or one grouping level down
    # (BraTS 2018/2019 ship HGG/ and LGG/).
    for d in visible_dirs(root):
        if looks_like_brats_case(d):
            return True
        if any(looks_like_brats_case(g) for g in visible_dirs(d)[:5]):
            return True
    return False


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of the dataset folder `root`, one of `LAYOUTS`.

    Rules, first match wins: `dataset.json` -> decathlon; sub-folders holding `*_seg.nii*` or
    `*_flair.nii*` -> brats; a `*.csv` and image files -> images; any `.nii` / `.nii.gz`
    (recursive) -> nifti.

    Raises:
      DataError naming `root` and listing the expected layouts, with one example each.
    """
    root = pathlib.Path(root)
    check_root(root)
    if (root / "dataset.json").is_file():
        return "decathlon"
    if _is_brats(root):
        return "brats"
    csvs = [p for p in root.glob("*.csv") if not p.name.startswith(".")]
    if csvs and any(
        p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") for p in root.rglob("*")
    ):
        return "images"
    if any(nifti_name(p) is not None for p in root.rglob("*.nii*")):
        return "nifti"
    raise DataError(
        f"{root}: no known dataset layout found (no dataset.json, no BraTS case folders, no CSV "
        f"with images, no .nii/.nii.gz files); expected one of:\n{expected_layouts()}"
    )


def open_dataset(
    root: str | os.PathLike,
    *,
    layout: str = "auto",
    modalities: Sequence[str] | None = None,
    labels_csv: str | os.PathLike | None = None,
) -> Dataset:
    """Describes the dataset in `root` (no volume is read; cheap).

    Args:
      root: the dataset folder (`config.data.root`).
      layout: one of `LAYOUTS`, or "auto" (`detect_layout`) (`config.data.layout`).
      modalities: channel names to use, in this order, case-insensitive; None: all channels of the
        dataset (`config.data.modalities`).
      labels_csv: images layout: the CSV of labels, relative to `root` or absolute; None: the
        single `*.csv` in `root` (`config.data.labels_csv`).

    Raises:
      DataError: missing / unrecognised folder, missing or unreadable files, bad label files.
      ConfigError: unknown layout, unknown modality names, `labels_csv` in a non-images layout.
    """
    root = pathlib.Path(root).expanduser()
    if layout not in ("auto", *LAYOUTS):
        raise ConfigError(
            f"config.data.layout={layout!r}: expected 'auto' or one of {', '.join(LAYOUTS)}."
        )
    check_root(root)
    if layout == "auto":
        layout = detect_layout(root)
    if labels_csv is not None and layout != "images":
        raise ConfigError(
            f"config.data.labels_csv={str(labels_csv)!r}: only used by the images layout, but "
            f"{root} has layout {layout!r}; leave it None."
        )
    ds = OPENERS[layout](root, modalities, labels_csv)
    log.info("Opened %r", ds)
    return ds
