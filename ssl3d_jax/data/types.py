"""The types every dataset layout shares (`Case`, `Dataset`, the layout names) and the helpers
the layout modules use (file naming, channel selection, label coding, grid checks).

Imports no other module of `ssl3d_jax.data` but `nifti`, so that the layout modules
(`brats`, `decathlon`, `nifti_folder`, `images`), the grain sources (`sources`) and the
dispatching `datasets` module import it and not each other: no import cycle.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Sequence

import nibabel as nib
import numpy as np

from ssl3d_jax.data.nifti import _READ_ERRORS
from ssl3d_jax.errors import ConfigError, DataError

LAYOUTS = ("brats", "decathlon", "nifti", "images")
KINDS = ("segmentation", "classification", "unlabelled")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# One example per layout, for the error raised when no layout matches.
LAYOUT_EXAMPLES = {
    "brats": "<root>/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz",
    "decathlon": "<root>/dataset.json, <root>/imagesTr/BRATS_001.nii.gz, "
    "<root>/labelsTr/BRATS_001.nii.gz (Medical Segmentation Decathlon)",
    "nifti": "<root>/scans/sub-01.nii.gz (any .nii / .nii.gz, unlabelled, 3D or 4D)",
    "images": "<root>/trainLabels.csv (columns image,level) + <root>/train/10_left.jpeg",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One case (scan or image) of a dataset.

    images: BraTS: one 3D file per channel, in `Dataset.channels` order; Decathlon / nifti
      folder: one file (3D, or 4D with channels on the last axis); images layout: one 2D image.
    label: segmentation label file, or None.
    target: classification label (images layout), or None.
    """

    name: str
    images: tuple[pathlib.Path, ...]
    label: pathlib.Path | None = None
    target: int | None = None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """What a dataset holds and how its labels are coded; see the module docstring.

    Fields after `regions` are additions of this implementation (all with defaults):
      channel_index: for layouts with one (possibly 4D) file per case, the index on the file's
        last axis of each entry of `channels`; () when each channel is its own file (BraTS).
      file_channels: the number of channels every file of a one-file-per-case layout must hold
        (1 for 3D files); 0 for BraTS.
      unlabelled_cases: further cases without labels (Decathlon test images, images without a
        CSV row), usable for self-supervised pretraining only; sorted by name, never in `cases`.
    """

    name: str
    layout: str
    root: pathlib.Path
    kind: str
    spatial_dims: int
    modality: str
    channels: tuple[str, ...]
    cases: tuple[Case, ...]
    label_values: tuple[int, ...]
    class_names: tuple[str, ...]
    regions: tuple[tuple[str, tuple[int, ...]], ...]
    channel_index: tuple[int, ...] = ()
    file_channels: int = 0
    unlabelled_cases: tuple[Case, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def in_channels(self) -> int:
        return len(self.channels)

    @property
    def all_cases(self) -> tuple[Case, ...]:
        """`cases` then `unlabelled_cases`: everything usable for pretraining."""
        return self.cases + self.unlabelled_cases

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, layout={self.layout}, kind={self.kind}, "
            f"{len(self.cases)} cases (+{len(self.unlabelled_cases)} unlabelled), "
            f"channels={self.channels}, classes={self.class_names}, root={str(self.root)!r})"
        )


def nifti_name(p: pathlib.Path) -> str | None:
    """`p`'s name without the NIfTI suffix, or None when `p` is not a NIfTI file we read."""
    name = p.name
    if name.startswith("."):  # macOS `._x.nii.gz` resource forks and other hidden files
        return None
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def visible_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def looks_like_brats_case(folder: pathlib.Path) -> bool:
    for p in folder.iterdir():
        stem = nifti_name(p)
        if stem is not None and (stem.endswith("_seg") or stem.endswith("_flair")):
            return True
    return False


def select_channels(
    available: Sequence[str], modalities: Sequence[str] | None, *, where: str
) -> tuple[int, ...]:
    """Indices into `available` of `modalities` (case-insensitive, in the order given).

    None selects all channels. `where` names the dataset in the error message.

    Raises:
      ConfigError naming `config.data.modalities` and listing the available names.
    """
    if modalities is None:
        return tuple(range(len(available)))
    if isinstance(modalities, str):
        modalities = (modalities,)
    lower = [a.lower() for a in available]
    out = []
    for m in modalities:
        if str(m).lower() not in lower:
            raise ConfigError(
                f"config.data.modalities={tuple(modalities)!r}: {m!r} is not a channel of "
                f"{where}; expected names from {tuple(available)} (case-insensitive) or None "
                "for all."
            )
        out.append(lower.index(str(m).lower()))
    if not out or len(set(out)) != len(out):
        raise ConfigError(
            f"config.data.modalities={tuple(modalities)!r}: expected distinct, non-empty channel "
            f"names from {tuple(available)}, or None for all."
        )
    return tuple(out)


def file_channels(path: pathlib.Path) -> int:
    """Channels of a NIfTI file from its header only (1 for 3D, last axis size for 4D)."""
    try:
        shape = nib.load(str(path)).shape
    except _READ_ERRORS as e:
        raise DataError(
            f"{path}: cannot read NIfTI header ({type(e).__name__}: {e}); expected a valid .nii "
            "or .nii.gz file."
        ) from e
    # 5D NIfTI with a singleton time axis (dim 4 = 1) stores vector data on axis 4.
    shape = tuple(shape[:3]) + tuple(s for s in shape[3:] if s != 1)
    if len(shape) == 3:
        return 1
    if len(shape) == 4:
        return int(shape[3])
    raise DataError(
        f"{path}: shape {shape}; expected a 3D volume or a 4D volume with channels on the last "
        "axis."
    )


def labels_to_index(seg, label_values: Sequence[int], *, path, dataset: str = "") -> np.ndarray:
    """On-disk labels int [...] -> class index int32 [...] (`label_values[i]` -> i).

    Raises:
      DataError naming `path`, listing the unexpected values and the expected ones.
    """
    seg = np.asarray(seg)
    values = np.asarray(label_values, dtype=np.int64)
    top = int(values.max())
    lut = np.full(top + 1, -1, dtype=np.int32)
    lut[values] = np.arange(len(values), dtype=np.int32)
    # min/max and a LUT are O(n); np.unique on a full volume sorts it (~10x slower).
    inside = (seg >= 0) & (seg <= top)
    out = lut[np.where(inside, seg, 0).astype(np.int64)]
    bad_mask = ~inside | (out < 0)
    if bad_mask.any():
        bad = np.unique(seg[bad_mask]).tolist()
        what = f"{dataset} labels" if dataset else "labels"
        raise DataError(
            f"{path}: unexpected label values {bad}; expected {what} {values.tolist()}."
        )
    return out


# Two files of a case share a voxel grid when their affines place every voxel within this
# fraction of a voxel of each other. Float32 header storage and qform (quaternion) vs sform
# round trips move a 240 mm field of view by ~1e-4 mm; a wrong or shifted label file is off by
# whole voxels. Comparing positions in mm, rather than affine entries, keeps the tolerance
# meaningful for large translations and for any voxel size.
GRID_TOLERANCE_VOXELS = 0.1


def grid_distance_mm(shape, affine_a, affine_b) -> float:
    """Largest distance in mm between where `affine_a` and `affine_b` put the same voxel.

    Args:
      shape: the grid's spatial shape (3 entries; more are ignored).
      affine_a, affine_b: float [4, 4] voxel-to-world affines.

    Returns:
      max over the voxel centres of the grid of |A_b v - A_a v| (attained at a corner voxel, as
      the difference is affine in v); NaN when an affine is not finite.
    """
    diff = np.asarray(affine_b, np.float64) - np.asarray(affine_a, np.float64)
    corners = np.array(list(itertools.product(*[(0, int(n) - 1) for n in shape[:3]])), np.float64)
    moved = corners @ diff[:3, :3].T + diff[:3, 3]  # [8, 3] mm
    return float(np.linalg.norm(moved, axis=1).max())


def check_same_grid(path_a, shape_a, affine_a, path_b, shape_b, affine_b) -> None:
    """DataError naming both files unless the volumes share the spatial shape and voxel grid.

    The grids agree when no voxel is placed further apart (`grid_distance_mm`) than
    `GRID_TOLERANCE_VOXELS` times the smallest voxel edge of `path_a`, so float noise between the
    affines of a scan's files passes and a shifted, flipped or resampled file does not.
    """
    if tuple(shape_a) != tuple(shape_b):
        raise DataError(
            f"{path_b}: shape {tuple(shape_b)} differs from {path_a} shape {tuple(shape_a)}; "
            "expected all modalities and the seg of a case on the same voxel grid."
        )
    tol = GRID_TOLERANCE_VOXELS * min(
        float(v) for v in np.linalg.norm(np.asarray(affine_a, np.float64)[:3, :3], axis=0)
    )
    dist = grid_distance_mm(shape_a, affine_a, affine_b)
    if not dist <= tol:  # also catches NaN
        raise DataError(
            f"{path_b}: affine {np.round(affine_b, 4).tolist()} differs from {path_a} affine "
            f"{np.round(affine_a, 4).tolist()}: the same voxel lies up to {dist:.3g} mm apart "
            f"(tolerance {tol:.3g} mm, {GRID_TOLERANCE_VOXELS} voxel); expected all modalities "
            "and the seg of a case on the same voxel grid."
        )


def check_root(root: pathlib.Path) -> None:
    """A DataError unless `root` is an existing folder."""
    if not root.exists():
        raise DataError(
            f"{root}: data folder does not exist; expected one of:\n{expected_layouts()}"
        )
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected one of:\n{expected_layouts()}")


def expected_layouts() -> str:
    """One line per layout: its name and an example path."""
    return "\n".join(f"  {k}: {v}" for k, v in LAYOUT_EXAMPLES.items())
