"""The BraTS layout of `datasets`: finding cases, label conventions, and a grain data source.

Layout: `<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz` (`.nii` also accepted), BraTS
2018-2021 (2018/2019 case folders may sit in HGG/ and LGG/).
Labels on disk: 0 background, 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour;
models see class indices 0..3 (`INDEX_TO_LABEL` maps back), regions WT = {1,2,4}, TC = {1,4},
ET = {4} on disk = class indices (1,2,3), (1,3), (3,).
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from ssl3d_jax.data import sources, types
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
    return types.labels_to_index(seg, LABELS, path=path, dataset="BraTS")


# The shared case description (types.Case); BraTS cases set `images` (MODALITIES order) and
# `label`.
Case = types.Case

# Class index -> region membership, for types.Dataset.regions.
INDEX_REGIONS = (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,)))
CLASS_NAMES = ("background", "necrotic / non-enhancing core", "oedema", "enhancing tumour")


def _find_file(folder: pathlib.Path, stem: str, suffix_tag: str) -> pathlib.Path | None:
    """`<folder>/<stem>.nii[.gz]`, else the single visible `*_<suffix_tag>.nii[.gz]` in `folder`.

    The fallback accepts case folders renamed after download (file names keep the original
    case id), which is common with BraTS 2018-2021 copies.
    """
    for suffix in _SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    hits = [
        p
        for suffix in _SUFFIXES
        for p in folder.glob(f"*_{suffix_tag}{suffix}")
        if not p.name.startswith(".") and p.is_file()
    ]
    return hits[0] if len(hits) == 1 else None


def _find_seg(folder: pathlib.Path, name: str) -> pathlib.Path | None:
    p = _find_file(folder, f"{name}_seg", "seg")
    if p is not None:
        return p
    # BraTS 2020 ships one case (BraTS20_Training_355) whose seg is named
    # `W39_1998.09.19_Segm.nii`: accept a single other NIfTI whose name mentions "seg".
    hits = [
        q
        for q in folder.iterdir()
        if types.nifti_name(q) is not None and "seg" in q.name.lower() and q.is_file()
    ]
    return hits[0] if len(hits) == 1 else None


def _case_folders(root: pathlib.Path) -> list[pathlib.Path]:
    """Case folders under `root`: its sub-folders, or those of grouping folders (HGG/, LGG/ of
    BraTS 2018/2019), i.e. sub-folders holding no NIfTI file but case folders."""
    out = []
    for d in types.visible_dirs(root):
        has_nifti = any(types.nifti_name(p) is not None for p in d.iterdir())
        sub = [] if has_nifti else types.visible_dirs(d)
        if sub and any(types.looks_like_brats_case(g) for g in sub):
            out.extend(sub)
        else:
            out.append(d)
    return sorted(out, key=lambda p: p.name)


def find_cases(
    root: str | os.PathLike,
    *,
    modalities: Sequence[str] = MODALITIES,
    require_label: bool = True,
) -> list[Case]:
    """Lists the cases of a BraTS training folder, sorted by case name.

    Accepts the 2018-2021 releases: `<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]` with
    case names such as `Brats18_2013_2_1`, `BraTS19_CBICA_AAB_1`, `BraTS20_Training_001` or
    `BraTS2021_00000`, case folders optionally grouped one level down (2018/2019 `HGG/`, `LGG/`).

    Raises:
      DataError: `root` missing or not a folder; no case folders; a case missing a modality or
        (when `require_label`) its seg file; two case folders with the same name.
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
    folders = _case_folders(root)
    if not folders:
        raise DataError(f"{root}: no case folders found; expected a folder laid out as {layout}.")
    cases = []
    seen: dict[str, pathlib.Path] = {}
    for folder in folders:
        name = folder.name
        if name in seen:
            raise DataError(
                f"{folder}: case name {name} also used by {seen[name]}; expected unique case "
                "folder names."
            )
        seen[name] = folder
        images = []
        for m in modalities:
            p = _find_file(folder, f"{name}_{m}", m)
            if p is None:
                raise DataError(
                    f"{folder / f'{name}_{m}.nii.gz'}: missing {m} image of case {name} "
                    f"(expected layout {layout})."
                )
            images.append(p)
        label = _find_seg(folder, name)
        if label is None and require_label:
            raise DataError(
                f"{folder / f'{name}_seg.nii.gz'}: missing segmentation of case {name} "
                f"(expected layout {layout})."
            )
        cases.append(Case(name=name, images=tuple(images), label=label))
    return cases


def make_dataset(
    root: str | os.PathLike, cases: Sequence[Case], channels: Sequence[str] = MODALITIES
) -> types.Dataset:
    """The BraTS `types.Dataset` of `cases` (images in `channels` order)."""
    cases = tuple(sorted(cases, key=lambda c: c.name))
    labelled = bool(cases) and all(c.label is not None for c in cases)
    return types.Dataset(
        name="BraTS",
        layout="brats",
        root=pathlib.Path(root),
        kind="segmentation" if labelled else "unlabelled",
        spatial_dims=3,
        modality="mri",
        channels=tuple(channels),
        cases=cases,
        label_values=LABELS if labelled else (),
        class_names=CLASS_NAMES if labelled else (),
        regions=INDEX_REGIONS if labelled else (),
    )


def open_brats(root: str | os.PathLike, *, modalities: Sequence[str] | None = None):
    """The brats layout as a `types.Dataset` (see `find_cases` for the accepted folders).

    Cases without a seg file are allowed only when no case has one (a test set): the dataset is
    then "unlabelled"; otherwise every case needs its seg (a missing one is a DataError, since a
    partly labelled BraTS copy is more likely a broken download than intended).
    """
    index = types.select_channels(MODALITIES, modalities, where=f"{root} (BraTS layout)")
    channels = tuple(MODALITIES[i] for i in index)
    cases = find_cases(root, modalities=channels, require_label=False)
    missing = [c for c in cases if c.label is None]
    if missing and len(missing) < len(cases):
        find_cases(root, modalities=channels, require_label=True)  # raises naming the file
    return make_dataset(root, cases, channels)


class BratsSource(sources.VolumeSource):
    """`sources.VolumeSource` over BraTS `cases` (the pre-datasets API, kept for callers).

    Record `i`:
      image: float32 [D, H, W, C], channels = modalities in `Case.images` order;
      label: int32 [D, H, W], class index 0..3 (only when `with_label`);
      case_index: np.int32 scalar, = i;
      affine: float64 [4, 4] of the (canonically reoriented) volumes.
    """

    def __init__(self, cases: Sequence[Case], *, with_label: bool = True):
        cases = list(cases)
        root = cases[0].images[0].parent.parent if cases else pathlib.Path(".")
        channels = _channel_names(cases)
        dataset = types.Dataset(
            name="BraTS",
            layout="brats",
            root=root,
            kind="segmentation",
            spatial_dims=3,
            modality="mri",
            channels=channels,
            cases=tuple(cases),
            label_values=LABELS,
            class_names=CLASS_NAMES,
            regions=INDEX_REGIONS,
        )
        super().__init__(dataset, cases, with_label=with_label)


def _channel_names(cases: Sequence[Case]) -> tuple[str, ...]:
    if not cases:
        return MODALITIES
    c = cases[0]
    names = []
    for p in c.images:
        stem = types.nifti_name(p) or p.name
        names.append(stem.rsplit("_", 1)[-1])
    return tuple(names)


_check_same_grid = types.check_same_grid
