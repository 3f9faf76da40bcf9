"""The decathlon layout of `datasets`: a Medical Segmentation Decathlon task folder.

`<root>/dataset.json` describes the task: `name`, `modality` ({"0": "FLAIR", ...}: the channels,
on the last axis of 4D images in key order), `labels` ({"0": "background", ...}: on-disk label
value -> class name), `training` ([{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/..."}])
and `test` (["./imagesTs/y.nii.gz"]). E.g. Task01_BrainTumour (4D MRI, labels 0..3) and
Task07_Pancreas (3D CT, 0 background, 1 pancreas, 2 cancer).

Choices:
  * `Dataset.cases` are the training cases (with labels); the test images (no labels) are
    `Dataset.unlabelled_cases`, usable for self-supervised pretraining only.
  * A missing training image or label is a DataError; a missing test image is only skipped with a
    warning (test images are optional extras, and are often not copied).
  * Class i is the i-th smallest label value of dataset.json (so 0 = background); regions are one
    per non-background class, named by dataset.json.
  * macOS `._*` AppleDouble files (in the official tar files) are never cases.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Sequence

from ssl3d_jax.data import types
from ssl3d_jax.errors import DataError

log = logging.getLogger(__name__)


def _load_json(path: pathlib.Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path}: cannot read ({type(e).__name__}: {e}); expected a Medical Segmentation "
            "Decathlon dataset.json."
        ) from e
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object with keys modality, labels, training.")
    return doc


def _int_keyed(doc: dict, key: str, path: pathlib.Path) -> list[tuple[int, str]]:
    """`doc[key]` ({"0": "name", ...}) as [(int, name)] sorted by int."""
    d = doc.get(key)
    if not isinstance(d, dict) or not d:
        raise DataError(
            f"{path}: key {key!r} missing or empty; expected e.g. "
            f'"{key}": {{"0": "{"FLAIR" if key == "modality" else "background"}", ...}}.'
        )
    try:
        items = sorted((int(k), str(v)) for k, v in d.items())
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {key} keys {list(d)}; expected integers as strings.") from e
    return items


def _resolve(root: pathlib.Path, entry, path: pathlib.Path, what: str) -> pathlib.Path:
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{path}: {what} entry {entry!r}; expected a relative file path string.")
    p = pathlib.Path(entry)
    return p if p.is_absolute() else root / entry.removeprefix("./")


def _case_name(p: pathlib.Path) -> str:
    return types.nifti_name(p) or p.stem


def open_decathlon(
    root: str | os.PathLike, *, modalities: Sequence[str] | None = None
) -> types.Dataset:
    """The decathlon layout as a `types.Dataset`.

    Reads dataset.json and the header of every image (to check its channel count); no volume
    data.

    Raises:
      DataError naming dataset.json or the file: unreadable JSON, missing modality / labels /
        training keys, no label 0, a training image or label that does not exist, an image whose
        channel count differs from the modalities listed.
      ConfigError: `modalities` naming a channel the task does not have.
    """
    root = pathlib.Path(root)
    path = root / "dataset.json"
    doc = _load_json(path)
    mods = _int_keyed(doc, "modality", path)
    labels = _int_keyed(doc, "labels", path)
    if [k for k, _ in mods] != list(range(len(mods))):
        raise DataError(
            f"{path}: modality keys {[k for k, _ in mods]}; expected 0..{len(mods) - 1}."
        )
    if labels[0][0] != 0:
        raise DataError(
            f"{path}: labels {dict(labels)}; expected label 0 (background) and non-negative values."
        )
    available = tuple(name for _, name in mods)
    index = types.select_channels(available, modalities, where=f"{path}")

    training = doc.get("training") or []
    if not isinstance(training, list):
        raise DataError(f"{path}: 'training' is {type(training).__name__}; expected a list.")
    cases = []
    for k, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(
                f"{path}: training[{k}] = {entry!r}; expected {{'image': ..., 'label': ...}}."
            )
        image = _resolve(root, entry["image"], path, f"training[{k}].image")
        if image.name.startswith("._"):
            continue
        label = entry.get("label")
        label = None if label is None else _resolve(root, label, path, f"training[{k}].label")
        for p, what in ((image, "image"), (label, "label")):
            if p is not None and not p.is_file():
                raise DataError(
                    f"{p}: {what} of training case {k} listed in {path} does not exist; "
                    "expected the complete task folder (imagesTr/, labelsTr/)."
                )
        cases.append(types.Case(name=_case_name(image), images=(image,), label=label))
    test = []
    for k, entry in enumerate(doc.get("test") or []):
        entry = entry.get("image") if isinstance(entry, dict) else entry
        image = _resolve(root, entry, path, f"test[{k}]")
        if image.name.startswith("._"):
            continue
        if not image.is_file():
            log.warning("%s: test image %s listed in %s not found; skipped.", root, image, path)
            continue
        test.append(types.Case(name=_case_name(image), images=(image,)))

    labelled = [c for c in cases if c.label is not None]
    if labelled and len(labelled) < len(cases):
        missing = next(c for c in cases if c.label is None)
        raise DataError(
            f"{path}: training case {missing.name} has no 'label' while others do; expected "
            "every training entry to name its label file."
        )
    if not cases and not test:
        raise DataError(f"{path}: no training or test images listed; expected a 'training' list.")
    names = [c.name for c in cases + test]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path}: case names {dup[:5]} listed more than once; expected unique.")

    # Every image's header (not its data: ~1 ms each), so that a scan with a missing or extra
    # channel is named before training starts rather than when a batch first draws it.
    for case in cases + test:
        (image,) = case.images
        n = types.file_channels(image)
        if n != len(available):
            raise DataError(
                f"{image}: {n} channel(s), but {path} lists {len(available)} modalities "
                f"{available}; expected the last axis of 4D images to hold them in that order."
            )

    segmentation = bool(labelled)
    is_ct = any(name.strip().lower() == "ct" for name in available)
    return types.Dataset(
        name=str(doc.get("name") or root.name),
        layout="decathlon",
        root=root,
        kind="segmentation" if segmentation else "unlabelled",
        spatial_dims=3,
        modality="ct" if is_ct else "mri",
        channels=tuple(available[i] for i in index),
        cases=tuple(sorted(cases if segmentation else cases + test, key=lambda c: c.name)),
        label_values=tuple(v for v, _ in labels) if segmentation else (),
        class_names=tuple(name for _, name in labels) if segmentation else (),
        regions=tuple((name, (i,)) for i, (_, name) in enumerate(labels) if i > 0)
        if segmentation
        else (),
        channel_index=index,
        file_channels=len(available),
        unlabelled_cases=tuple(sorted(test, key=lambda c: c.name)) if segmentation else (),
    )
