"""Dataset layouts behind one interface: `open_dataset(root)` -> `Dataset`, read by a grain source.

Four on-disk layouts (`LAYOUTS`) are recognised, so that the same pretraining / finetuning code
runs on BraTS, the Medical Segmentation Decathlon, a plain folder of NIfTI scans, or a folder of
2D images with a CSV of grades (e.g. Kaggle diabetic retinopathy, the paper's 2D benchmark):

  brats      <root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz            (brats.py)
  decathlon  <root>/dataset.json + imagesTr/ + labelsTr/ (+ imagesTs/)      (decathlon.py)
  nifti      <root>/**/*.nii[.gz], unlabelled, 3D or 4D (channels last)     (this file)
  images     <root>/**/*.{png,jpg,jpeg} + <root>/<labels>.csv               (images.py)

A `Dataset` is a plain, picklable description (paths and label conventions); nothing is read
from a volume until a source's `__getitem__`, so opening a dataset of hundreds of cases is cheap.
Segmentation labels are always handed to models as class indices 0..K-1 (`label_values[i]` is the
on-disk value of class i), never as on-disk values, so that BraTS's label 4 and a Decathlon
task's label 3 need no special cases downstream.

The layout modules import this one, so it imports them lazily inside `open_dataset`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pathlib
from typing import Sequence

import grain
import nibabel as nib
import numpy as np

from ssl3d_jax.data.nifti import _READ_ERRORS, load_nifti
from ssl3d_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------
# Layout detection and opening


def _nifti_name(p: pathlib.Path) -> str | None:
    """`p`'s name without the NIfTI suffix, or None when `p` is not a NIfTI file we read."""
    name = p.name
    if name.startswith("."):  # macOS `._x.nii.gz` resource forks and other hidden files
        return None
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _visible_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _looks_like_brats_case(folder: pathlib.Path) -> bool:
    for p in folder.iterdir():
        stem = _nifti_name(p)
        if stem is not None and (stem.endswith("_seg") or stem.endswith("_flair")):
            return True
    return False


def _is_brats(root: pathlib.Path) -> bool:
    # Case folders directly under root (BraTS 2020/2021) or one grouping level down
    # (BraTS 2018/2019 ship HGG/ and LGG/).
    for d in _visible_dirs(root):
        if _looks_like_brats_case(d):
            return True
        if any(_looks_like_brats_case(g) for g in _visible_dirs(d)[:5]):
            return True
    return False


def _check_root(root: pathlib.Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist; expected one of:\n{_expected()}")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected one of:\n{_expected()}")


def _expected() -> str:
    return "\n".join(f"  {k}: {v}" for k, v in LAYOUT_EXAMPLES.items())


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of the dataset folder `root`, one of `LAYOUTS`.

    Rules, first match wins: `dataset.json` -> decathlon; sub-folders holding `*_seg.nii*` or
    `*_flair.nii*` -> brats; a `*.csv` and image files -> images; any `.nii` / `.nii.gz`
    (recursive) -> nifti.

    Raises:
      DataError naming `root` and listing the expected layouts, with one example each.
    """
    root = pathlib.Path(root)
    _check_root(root)
    if (root / "dataset.json").is_file():
        return "decathlon"
    if _is_brats(root):
        return "brats"
    csvs = [p for p in root.glob("*.csv") if not p.name.startswith(".")]
    if csvs and any(
        p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") for p in root.rglob("*")
    ):
        return "images"
    if any(_nifti_name(p) is not None for p in root.rglob("*.nii*")):
        return "nifti"
    raise DataError(
        f"{root}: no known dataset layout found (no dataset.json, no BraTS case folders, no CSV "
        f"with images, no .nii/.nii.gz files); expected one of:\n{_expected()}"
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
    _check_root(root)
    if layout == "auto":
        layout = detect_layout(root)
    if labels_csv is not None and layout != "images":
        raise ConfigError(
            f"config.data.labels_csv={str(labels_csv)!r}: only used by the images layout, but "
            f"{root} has layout {layout!r}; leave it None."
        )
    # Imported here: the layout modules import this module for Case / Dataset.
    if layout == "brats":
        from ssl3d_jax.data import brats

        ds = brats.open_brats(root, modalities=modalities)
    elif layout == "decathlon":
        from ssl3d_jax.data import decathlon

        ds = decathlon.open_decathlon(root, modalities=modalities)
    elif layout == "images":
        from ssl3d_jax.data import images

        ds = images.open_images(root, modalities=modalities, labels_csv=labels_csv)
    else:
        ds = open_nifti_folder(root, modalities=modalities)
    log.info("Opened %r", ds)
    return ds


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


# ----------------------------------------------------------------------------------------------
# nifti layout: a folder of unlabelled scans


def _file_channels(path: pathlib.Path) -> int:
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


def open_nifti_folder(root: str | os.PathLike, *, modalities=None) -> Dataset:
    """The nifti layout: every `.nii` / `.nii.gz` under `root` (recursive) is one unlabelled case.

    Case names are the paths relative to `root` without suffix (unique even when sub-folders
    repeat file names). Channels ("ch0", ...): every file must have the same channel count (its
    header is read here; when they differ, the files differing from the most common count are
    named). The modality is "ct" when the first file's
    minimum is below -500 (air in Hounsfield units; MRI intensities are never that negative),
    else "mri".

    Raises:
      DataError: no NIfTI files, an unreadable header, a file with a different channel count.
    """
    root = pathlib.Path(root)
    _check_root(root)
    files = []
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts[:-1]):
            continue
        stem = _nifti_name(p)
        if stem is not None and p.is_file():
            files.append((str(p.relative_to(root).parent / stem), p))
    files.sort()
    if not files:
        raise DataError(
            f"{root}: no .nii or .nii.gz files found (recursive); expected the nifti layout: "
            f"{LAYOUT_EXAMPLES['nifti']}."
        )
    counts = [_file_channels(p) for _, p in files]
    # The odd one out is the file to name: the most common count wins (ties: the first file's).
    n = max(counts, key=lambda c: (counts.count(c), c == counts[0]))
    like = next(p for (_, p), c in zip(files, counts) if c == n)
    for (_, p), m in zip(files, counts):
        if m != n:
            raise DataError(
                f"{p}: {m} channel(s), but {counts.count(n)} of the {len(files)} scans have {n} "
                f"(e.g. {like}); expected every scan of a nifti folder to have the same channels "
                "(3D = 1, 4D = size of the last axis)."
            )
    data, _ = load_nifti(files[0][1])
    modality = "ct" if float(data.min()) < -500 else "mri"
    available = tuple(f"ch{i}" for i in range(n))
    index = select_channels(available, modalities, where=f"{root} (nifti layout)")
    return Dataset(
        name=root.name,
        layout="nifti",
        root=root,
        kind="unlabelled",
        spatial_dims=3,
        modality=modality,
        channels=tuple(available[i] for i in index),
        cases=tuple(Case(name=name, images=(p,)) for name, p in files),
        label_values=(),
        class_names=(),
        regions=(),
        channel_index=index,
        file_channels=n,
    )


# ----------------------------------------------------------------------------------------------
# Reading volumes


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


class ImageSource(grain.sources.RandomAccessDataSource):
    """grain source reading one 2D image (images layout) per record.

    Record `i` (of `cases`, default `dataset.cases`):
      image: float32 [size, size, 3] in [0, 1], RGB: the centred largest square of the image,
        resized to `size` (antialiased); grey or RGBA files are converted to RGB;
      target: np.int32 scalar, class index (only when `with_label`);
      case_index: np.int32 scalar, = i.

    Raises (at construction): DataError when `with_label` and a case has no target.
    Raises (reading): DataError naming the unreadable or truncated image file.
    """

    def __init__(
        self,
        dataset: Dataset,
        cases: Sequence[Case] | None = None,
        *,
        size: int,
        with_label: bool = True,
    ):
        if dataset.spatial_dims != 2:
            raise DataError(
                f"{dataset.root}: {dataset.layout} layout holds {dataset.spatial_dims}D volumes; "
                "ImageSource reads 2D images (use VolumeSource)."
            )
        if int(size) < 1:
            raise ConfigError(f"ImageSource size={size}: expected a positive number of pixels.")
        self.dataset = dataset
        self.cases = list(dataset.cases if cases is None else cases)
        self.size = int(size)
        self.with_label = with_label
        if with_label:
            for c in self.cases:
                if c.target is None:
                    raise DataError(
                        f"{c.images[0]}: image {c.name} has no label row in the labels CSV, but "
                        "labels were requested (with_label=True)."
                    )

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return (
            f"ImageSource({self.dataset.name!r}, {len(self.cases)} images, size={self.size}, "
            f"with_label={self.with_label})"
        )

    def __getitem__(self, i):
        from ssl3d_jax.data import images  # PIL only for 2D users

        i = int(i)
        case = self.cases[i]
        record = {
            "image": images.load_image(case.images[0], size=self.size),
            "case_index": np.int32(i),
        }
        if self.with_label:
            record["target"] = np.int32(case.target)
        return record
