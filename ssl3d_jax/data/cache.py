"""A disk cache of preprocessed cases: built once, read memory-mapped by every run.

Resampling and normalising a BraTS-sized case costs ~0.1-1 s of CPU; repeated in every epoch of
every run it starves training. `build_cache` runs `Preprocess` once per case and writes
`<dir>/<name>.image.npy`, `<name>.label.npy` and `<name>.json` (geometry) under a folder named by
`cache_key`: a hash of the preprocessing settings and of every input file's path, size and
mtime, so a changed setting or a replaced file gives a new folder and stale data is never read.
Every file is written atomically (temp file + `os.replace`), the JSON last as the case's
completion marker: a killed build resumes where it stopped, and a half-written file is never
read. `CachedArraysSource` then serves the records with flat memory (one case read at a time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
import threading
import time
from typing import Any, Sequence

import grain
import numpy as np

from ssl3d_jax.errors import DataError
from ssl3d_jax.fileio import atomic_write
from ssl3d_jax.progress import Progress

log = logging.getLogger(__name__)

# Part of every key: bump when the on-disk format changes.
CACHE_FORMAT = 1
# A temp file not touched for this long belongs to a killed writer (a live one writes a case in
# seconds); younger ones may belong to a concurrent builder and are left alone.
_STALE_TMP_S = 600.0
_NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


def default_cache_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/ssl3d_jax/preprocessed`, default `~/.cache/ssl3d_jax/preprocessed`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "ssl3d_jax" / "preprocessed"


def cache_key(
    dataset_like_info: dict[str, Any], settings: dict[str, Any], files: Sequence[Any]
) -> str:
    """sha256 hex digest identifying one preprocessed version of a dataset.

    Args:
      dataset_like_info: JSON-able facts that change the records, e.g. {"channels": [...],
        "label_values": [...], "cases": [...]} (channel order, label mapping).
      settings: `Preprocess.settings()`.
      files: every input file (images and labels); each enters the key with its absolute path,
        size and mtime_ns, so an edited or replaced file invalidates the cache.

    Raises:
      DataError naming a missing input file.
    """
    stats = []
    for f in files:
        p = pathlib.Path(f).absolute()
        try:
            st = p.stat()
        except OSError as e:
            raise DataError(f"{p}: cannot read input file for the cache key ({e}).") from e
        stats.append([str(p), int(st.st_size), int(st.st_mtime_ns)])
    payload = {
        "format": CACHE_FORMAT,
        "info": dataset_like_info,
        "settings": settings,
        "files": stats,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _save_npy(path: pathlib.Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False), binary=True, fsync=True)


def _save_json(path: pathlib.Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True)
    atomic_write(path, lambda f: f.write(text), fsync=True)


def _remove_stale_tmp(folder: pathlib.Path) -> None:
    now = time.time()
    for p in folder.glob(".*.tmp"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                p.unlink()
        except OSError:
            pass  # removed by a concurrent builder


def _check_names(names: Sequence[str], n: int, where: str) -> list[str]:
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"{where}: {len(names)} names for {n} records.")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: case names are not unique.")
    bad = [x for x in names if not _NAME_OK.match(x)]
    if bad:
        raise ValueError(f"{where}: case names {bad[:3]} are not safe file names.")
    return names


def build_cache(
    source: Any,
    preprocess: Any,
    cache_dir: str | os.PathLike,
    *,
    key: str,
    names: Sequence[str],
    progress: bool = True,
    share: tuple[int, int] = (0, 1),
) -> str:
    """Preprocesses every record of `source` into `<cache_dir>/<key>/` (resuming a partial build).

    Args:
      source: random-access source (`len`, `[i]`) of records image / label / case_index / affine
        (e.g. `datasets.VolumeSource`).
      preprocess: a `Preprocess` constructed with `keep_geometry=True` (its `geometry` is stored
        for export), or anything with `.map(record)` / a callable returning such records.
      cache_dir: the cache root (e.g. `default_cache_dir()`).
      key: `cache_key(...)` of this dataset and these settings.
      names: one unique, file-name-safe name per record (the case names).
      progress: show a progress bar on a terminal (log lines otherwise).
      share: (index, count) of this builder among `count` concurrent ones (the processes of a
        multi-host run). Builder i starts with every count-th missing case from the i-th, then
        does the rest, skipping each case another builder has finished meanwhile: builders that
        share the cache folder split the work, builders on separate disks each build it all,
        and nobody waits for anybody (a case built twice is written twice, atomically, with the
        same content).

    Returns:
      the folder holding the cache, as a string. A case whose JSON exists is complete and is
      neither read from `source` nor preprocessed again.
    """
    names = _check_names(names, len(source), "build_cache")
    folder = pathlib.Path(cache_dir) / key
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(folder)
    settings = preprocess.settings() if hasattr(preprocess, "settings") else None
    meta = folder / "settings.json"
    if not meta.exists():
        _save_json(meta, {"key": key, "settings": settings, "names": names})
    todo = [i for i, n in enumerate(names) if not (folder / f"{n}.json").exists()]
    if not todo:
        return str(folder)
    index, count = share
    todo = todo[index::count] + [i for k, i in enumerate(todo) if k % count != index]
    log.info("Preprocessing %d of %d cases into %s", len(todo), len(names), folder)
    with Progress(len(todo), "preprocess", enabled=None if progress else False) as bar:
        for i in todo:
            name = names[i]
            if count > 1 and (folder / f"{name}.json").exists():
                bar.update()  # finished by another builder
                continue
            record = source[i]
            out = preprocess.map(record) if hasattr(preprocess, "map") else preprocess(record)
            if "geometry" not in out:
                raise ValueError(
                    "build_cache: the transform returned no `geometry`; construct it with "
                    "Preprocess(..., keep_geometry=True)."
                )
            _save_npy(folder / f"{name}.image.npy", out["image"])
            has_label = "label" in out
            if has_label:
                _save_npy(folder / f"{name}.label.npy", out["label"])
            # Written last: its presence means the case is complete.
            _save_json(
                folder / f"{name}.json",
                {
                    "case_index": int(out["case_index"]),
                    "has_label": has_label,
                    "geometry": out["geometry"],
                },
            )
            bar.update()
    return str(folder)


# numpy parses a .npy header with `ast.literal_eval`, and CPython 3.11's AST constructor keeps its
# recursion depth in shared state: two header parses on different threads (grain reads records on
# several) can raise "SystemError: AST constructor recursion depth mismatch" (python/cpython
# #106905; it stopped a sweep here). The lock covers the header read and the memory map only, not
# the copy of the data.
_NPY_HEADER_LOCK = threading.Lock()


class CachedArraysSource(grain.sources.RandomAccessDataSource):
    """grain source over a cache written by `build_cache`.

    Record i equals what `Preprocess` returned for case `names[i]`: image float32, label int32
    (when `with_label`), case_index np.int32, and `geometry` (dict) when `with_geometry` (off by
    default: grain cannot batch dicts of per-case lists). Arrays are read through a memory map
    and copied, so memory stays flat whatever the dataset size. Holds only paths: it pickles
    into grain worker processes.

    Raises:
      DataError naming the folder and the missing cases when the cache is incomplete.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        names: Sequence[str],
        *,
        with_label: bool = True,
        with_geometry: bool = False,
    ):
        self.directory = pathlib.Path(directory)
        self.names = [str(n) for n in names]
        self.with_label = with_label
        self.with_geometry = with_geometry
        missing = []
        for n in self.names:
            need = [f"{n}.json", f"{n}.image.npy"] + ([f"{n}.label.npy"] if with_label else [])
            if not all((self.directory / f).is_file() for f in need):
                missing.append(n)
        if missing:
            raise DataError(
                f"{self.directory}: preprocessed cache incomplete: {len(missing)} of "
                f"{len(self.names)} cases missing (e.g. {missing[:3]}"
                f"{', labels' if with_label else ''}); expected a cache finished by build_cache "
                "(run it again to resume)."
            )

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"CachedArraysSource({self.directory}, {len(self.names)} cases)"

    def meta(self, i: int) -> dict[str, Any]:
        """The JSON of case i: case_index, has_label, geometry."""
        with open(self.directory / f"{self.names[int(i)]}.json") as f:
            return json.load(f)

    def geometry(self, i: int) -> dict[str, Any]:
        return self.meta(i)["geometry"]

    def _load(self, path: pathlib.Path) -> np.ndarray:
        try:
            with _NPY_HEADER_LOCK:
                mapped = np.load(path, mmap_mode="r")
            return np.array(mapped)
        except (OSError, ValueError) as e:
            raise DataError(
                f"{path}: cannot read cached array ({e}); delete the cache folder "
                f"{self.directory} to rebuild it."
            ) from e

    def __getitem__(self, i) -> dict[str, Any]:
        i = int(i)
        name = self.names[i]
        meta = self.meta(i)
        record = {
            "image": self._load(self.directory / f"{name}.image.npy"),
            "case_index": np.int32(i),  # index in this source's `names`, like VolumeSource
        }
        if self.with_label:
            record["label"] = self._load(self.directory / f"{name}.label.npy")
        if self.with_geometry:
            record["geometry"] = meta["geometry"]
        return record
