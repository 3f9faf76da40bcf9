"""The `nifti` layout: a folder of unlabelled NIfTI scans (3D, or 4D with channels last), for
self-supervised pretraining on scans without labels.

  nifti      <root>/**/*.nii[.gz], unlabelled, 3D or 4D (channels last)
"""

from __future__ import annotations

import os
import pathlib

from ssl3d_jax.data.nifti import load_nifti
from ssl3d_jax.data.types import (
    LAYOUT_EXAMPLES,
    Case,
    Dataset,
    check_root,
    file_channels,
    nifti_name,
    select_channels,
)
from ssl3d_jax.errors import DataError


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
    check_root(root)
    files = []
    for p in root.rglob("*"):
        if any(part.startswith(".") for part in p.relative_to(root).parts[:-1]):
            continue
        stem = nifti_name(p)
        if stem is not None and p.is_file():
            files.append((str(p.relative_to(root).parent / stem), p))
    files.sort()
    if not files:
        raise DataError(
            f"{root}: no .nii or .nii.gz files found (recursive); expected the nifti layout: "
            f"{LAYOUT_EXAMPLES['nifti']}."
        )
    counts = [file_channels(p) for _, p in files]
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
