"""The images layout of `datasets`: a folder of 2D PNG / JPEG images and a CSV of integer grades.

Made for the paper's 2D benchmark, Kaggle diabetic retinopathy (`trainLabels.csv` with columns
`image,level`, images `train/<image>.jpeg`, grades 0-4), and for any `image,label` CSV.

Choices (see also `open_images`):
  * `Dataset.cases` are the images with a CSV row (kind "classification"); images under `root`
    without a row are `Dataset.unlabelled_cases` (usable for pretraining only), so that every
    case a finetuning loop sees has a target.
  * Names in the CSV may omit the extension (Kaggle does); they are matched against the files'
    relative path, file name, or file name without extension, under `root` (recursive).
  * K = max grade + 1, and at least 5 for diabetic-retinopathy columns (`level`, `diagnosis`), so
    that a labelled subset lacking grade 4 still gets the 5-way head of the full task.
"""

from __future__ import annotations

import csv
import logging
import os
import pathlib
from typing import Sequence

import grain
import numpy as np

from ssl3d_jax.data import types
from ssl3d_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Accepted column names, first match wins: Kaggle DR (image, level), APTOS 2019 (id_code,
# diagnosis), generic (image, label).
IMAGE_COLUMNS = ("image", "id_code", "image_id", "filename", "file", "id")
LABEL_COLUMNS = ("level", "diagnosis", "label", "grade", "target", "class")
GRADE_COLUMNS = ("level", "diagnosis", "grade")
MIN_GRADES = 5  # diabetic retinopathy: no DR, mild, moderate, severe, proliferative


def _find_csv(root: pathlib.Path, labels_csv) -> pathlib.Path:
    if labels_csv is not None:
        p = pathlib.Path(labels_csv).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise ConfigError(
                f"config.data.labels_csv={str(labels_csv)!r}: {p} is not a file; expected a CSV "
                "of labels (columns image,level or image,label), relative to config.data.root "
                "or absolute."
            )
        return p
    csvs = sorted(p for p in root.glob("*.csv") if not p.name.startswith(".") and p.is_file())
    if len(csvs) == 1:
        return csvs[0]
    if not csvs:
        raise DataError(
            f"{root}: no *.csv of labels found; expected the images layout: "
            f"{types.LAYOUT_EXAMPLES['images']}."
        )
    raise ConfigError(
        f"config.data.labels_csv=None, but {root} holds {len(csvs)} CSV files "
        f"({', '.join(p.name for p in csvs)}); set config.data.labels_csv to the labels file."
    )


def _index_images(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Every image under `root` (recursive, hidden skipped), keyed by relative path, file name
    and file name without extension (a key may map to several files)."""
    keys: dict[str, list[pathlib.Path]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() not in types.IMAGE_SUFFIXES or not p.is_file():
            continue
        for key in {rel.as_posix(), p.name, p.stem, rel.with_suffix("").as_posix()}:
            keys.setdefault(key, []).append(p)
    return keys


def _column(fields: list[str], candidates: Sequence[str], csv_path, what: str) -> str:
    lower = {f.strip().lower(): f for f in fields}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise DataError(
        f"{csv_path}: no {what} column among {fields}; expected one named "
        f"{' / '.join(candidates)} (e.g. Kaggle's `image,level`)."
    )


def _grade(value: str, csv_path, line: int, column: str) -> int:
    v = (value or "").strip()
    try:
        g = int(v)
    except ValueError:
        try:
            f = float(v)
        except ValueError:
            f = float("nan")
        if not f.is_integer():
            raise DataError(
                f"{csv_path}, line {line}: {column}={value!r}; expected a non-negative integer "
                "grade."
            ) from None
        g = int(f)
    if g < 0:
        raise DataError(
            f"{csv_path}, line {line}: {column}={value!r}; expected a non-negative integer grade."
        )
    return g


def open_images(
    root: str | os.PathLike,
    *,
    modalities: Sequence[str] | None = None,
    labels_csv: str | os.PathLike | None = None,
) -> types.Dataset:
    """The images layout as a `types.Dataset` (reads the CSV and lists the files only).

    Raises:
      DataError naming the CSV (and line): no image / label column, empty CSV, a non-integer or
        negative grade, an image listed twice, an image listed but not found (or ambiguous).
      ConfigError: `labels_csv` not a file, several CSVs and no `labels_csv`, `modalities` other
        than None or R,G,B.
    """
    root = pathlib.Path(root)
    if modalities is not None and tuple(str(m).lower() for m in modalities) != ("r", "g", "b"):
        raise ConfigError(
            f"config.data.modalities={tuple(modalities)!r}: the images layout always reads RGB; "
            "expected None."
        )
    csv_path = _find_csv(root, labels_csv)
    index = _index_images(root)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        image_col = _column(fields, IMAGE_COLUMNS, csv_path, "image")
        label_col = _column(fields, LABEL_COLUMNS, csv_path, "label")
        rows = []
        for row in reader:
            if not any((v or "").strip() for v in row.values()):
                continue  # blank line
            rows.append((reader.line_num, row))
    if not rows:
        raise DataError(f"{csv_path}: no label rows; expected a header and one row per image.")
    labelled: dict[pathlib.Path, tuple[str, int]] = {}
    for line, row in rows:
        name = (row.get(image_col) or "").strip()
        if not name:
            raise DataError(
                f"{csv_path}, line {line}: empty {image_col!r}; expected an image name."
            )
        target = _grade(row.get(label_col), csv_path, line, label_col)
        hits = index.get(name.removeprefix("./"), [])
        if len(hits) != 1:
            why = "not found" if not hits else f"ambiguous ({', '.join(map(str, hits[:3]))})"
            raise DataError(
                f"{csv_path}, line {line}: image {name!r} {why} under {root}; expected exactly "
                f"one file {name}{'' if pathlib.Path(name).suffix else '.{png,jpg,jpeg}'}."
            )
        p = hits[0]
        if p in labelled:
            raise DataError(
                f"{csv_path}, line {line}: image {name!r} ({p}) listed twice; expected one row "
                "per image."
            )
        labelled[p] = (name, target)
    all_files = sorted({p for ps in index.values() for p in ps})
    stems = [p.stem for p in all_files]
    unique_stems = len(set(stems)) == len(stems)

    def case_name(p: pathlib.Path) -> str:
        return p.stem if unique_stems else p.relative_to(root).with_suffix("").as_posix()

    cases = sorted(
        (types.Case(name=case_name(p), images=(p,), target=t) for p, (_, t) in labelled.items()),
        key=lambda c: c.name,
    )
    unlabelled = tuple(
        types.Case(name=case_name(p), images=(p,)) for p in all_files if p not in labelled
    )
    if unlabelled:
        log.info(
            "%s: %d images without a row in %s are unlabelled (pretraining only).",
            root,
            len(unlabelled),
            csv_path.name,
        )
    k = max(c.target for c in cases) + 1
    is_grade = label_col.strip().lower() in GRADE_COLUMNS
    if is_grade:
        k = max(k, MIN_GRADES)
    word = "grade" if is_grade else "class"
    return types.Dataset(
        name=root.name,
        layout="images",
        root=root,
        kind="classification",
        spatial_dims=2,
        modality="photo",
        channels=("R", "G", "B"),
        cases=tuple(cases),
        label_values=tuple(range(k)),
        class_names=tuple(f"{word} {i}" for i in range(k)),
        regions=(),
        unlabelled_cases=tuple(sorted(unlabelled, key=lambda c: c.name)),
    )


def load_image(path: str | os.PathLike, *, size: int) -> np.ndarray:
    """One image file -> float32 [size, size, 3] in [0, 1], RGB.

    The centred largest square is cut out (fundus photographs are wider than tall with black
    sides, so this keeps the retina), then resized with Pillow's antialiased bicubic filter.

    Raises:
      DataError naming `path`: missing, unreadable, or truncated file.
    """
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    try:
        with Image.open(path) as img:
            # JPEG can decode at 1/2, 1/4 or 1/8 scale for almost free; Kaggle fundus images are
            # ~3000 px wide and we want a few hundred, so this is most of the decode time saved.
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()  # decodes now, so truncated files fail here
            if img.mode in ("I", "I;16", "I;16B", "F"):
                a = np.asarray(img, dtype=np.float32)
                a = a / max(float(a.max()), 1.0) * 255.0
                img = Image.fromarray(a.astype(np.uint8), mode="L")
            img = img.convert("RGB")
            w, h = img.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
            img = img.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float32)
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file not found.") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"{path}: cannot read image ({type(e).__name__}: {e}); expected a valid, complete "
            "PNG or JPEG file."
        ) from e
    return arr / np.float32(255.0)


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
        dataset: types.Dataset,
        cases: Sequence[types.Case] | None = None,
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
        i = int(i)
        case = self.cases[i]
        record = {
            "image": load_image(case.images[0], size=self.size),
            "case_index": np.int32(i),
        }
        if self.with_label:
            record["target"] = np.int32(case.target)
        return record
