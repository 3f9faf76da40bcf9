"""Atomic file writes, shared by every writer of the library (NIfTI, cache arrays, JSON, reports).

A file is written under a hidden temporary name in its own folder and renamed onto its final name
only when complete, so a reader (or a rerun after a crash) never sees a half-written file, and a
failed write leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[str]:
    """Yields a temporary file name `.<name>.<random><suffix>` next to `path`; renamed onto `path`
    when the block completes, removed when it raises. `suffix` matters to writers that pick a
    format from the name (nibabel gzips `.nii.gz`)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(
    path: str | os.PathLike, write: Callable, *, binary: bool = False, fsync: bool = False
) -> pathlib.Path:
    """`write(file_object)` into `path` atomically (text: UTF-8, no newline translation);
    `fsync` also flushes the data to disk before the rename."""
    with atomic_path(path) as tmp:
        kwargs = {} if binary else {"newline": "", "encoding": "utf-8"}
        with open(tmp, "wb" if binary else "w", **kwargs) as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return pathlib.Path(path)
