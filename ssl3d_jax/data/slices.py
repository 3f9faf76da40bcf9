"""2D training data from 3D scans: the axial slices of preprocessed volumes.

The paper's 2D baselines train the same tasks on slices (pancreas CT slices, BraTS slices). Slices
are cut from the preprocessed cube, so every 2D setting shares the 3D preprocessing (RAS
orientation, per-modality normalisation, resize) and its in-memory cache.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

# After `nib.as_closest_canonical` the array axes are (R, A, S): axis 2 runs inferior→superior,
# so fixing it gives axial slices.
AXIAL_AXIS = 2


class SliceSource(grain.sources.RandomAccessDataSource):
    """Axial slices of the volumes of `source`.

    Record `i` is slice `first + i % n` of volume `i // n`, where the `n = round(S · keep_fraction)`
    central slices of each `S`-slice volume are kept: the outermost slices of a head scan hold
    little or no brain.

    Args:
      source: random-access source of preprocessed records: `image` `[S, S, S, C]` float32,
        optionally `label` `[S, S, S]` int32, and `case_index`.
      size: `S`, the cube edge (static, from `config.data.size`).
      keep_fraction: fraction of central slices kept per volume, in (0, 1].

    Records: `image` `[S, S, C]` float32, `label` `[S, S]` int32 (if present), `case_index` int32,
    `slice_index` int32.
    """

    def __init__(self, source: Any, *, size: int, keep_fraction: float = 0.6):
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction={keep_fraction}: expected a value in (0, 1]")
        self._source = source
        self._per_volume = max(1, int(round(size * keep_fraction)))
        self._first = (size - self._per_volume) // 2

    @property
    def slices_per_volume(self) -> int:
        return self._per_volume

    def __len__(self) -> int:
        return len(self._source) * self._per_volume

    def __getitem__(self, index: int) -> dict:
        volume, k = divmod(int(index), self._per_volume)
        record = self._source[volume]
        z = self._first + k
        out = {
            "image": np.ascontiguousarray(np.take(record["image"], z, axis=AXIAL_AXIS)),
            "case_index": np.int32(record["case_index"]),
            "slice_index": np.int32(z),
        }
        if "label" in record:
            out["label"] = np.ascontiguousarray(np.take(record["label"], z, axis=AXIAL_AXIS))
        return out
