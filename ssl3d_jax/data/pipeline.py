"""grain pipelines for training (shuffled, infinite, batched) and evaluation (ordered, unbatched).

Error propagation (checked with grain 0.2.18, see tests/test_data.py): an exception raised in
the source or transform (e.g. `DataError` for a corrupt file) reaches the caller iterating the
dataset, as the original type with its message (which names the file), both with
`num_workers=0` (reader threads) and with `num_workers > 0`, where grain pickles the worker's
exception and re-raises it in the main process. Prefetching means it can surface a few batches
before the batch that holds the bad case. A worker killed outright (segfault, OOM) instead gives a
`RuntimeError` "Worker process was terminated unexpectedly"; that is also what scripts without
an `if __name__ == "__main__":` guard get, because spawned workers re-import the main module.

Epochs: `.shuffle()` before `.repeat()` reshuffles every epoch (grain derives the permutation
from seed + epoch), deterministically for a given seed.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import grain
import numpy as np


def _call(transform, record):
    return transform.map(record) if hasattr(transform, "map") else transform(record)


class CachedSource(grain.sources.RandomAccessDataSource):
    """`transform(source[i])`, kept in memory up to `cache_bytes` per process.

    Decoding gzip NIfTI and resampling costs ~0.1 s per BraTS-sized case on one core, which
    starves a CPU training step of 8 volumes; small datasets (the built-in phantom, few-label
    finetuning sets) fit in memory after the first epoch. Records are kept first-come until the
    budget is spent and never evicted: with shuffled access over a larger dataset an LRU would
    thrash, while a fixed subset gives a steady hit rate and flat memory. Records must not be
    modified in place by later transforms (batching copies them).
    """

    def __init__(self, source: Any, transform: Any, *, cache_bytes: int):
        self._source = source
        self._transform = transform
        self._budget = int(cache_bytes)
        self._init_cache()

    def _init_cache(self) -> None:
        self._cache: dict[int, dict] = {}
        self._used = 0
        self._lock = threading.Lock()

    def __getstate__(self):  # worker processes start with an empty cache of their own
        return {"_source": self._source, "_transform": self._transform, "_budget": self._budget}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        with self._lock:
            hit = self._cache.get(index)
        if hit is not None:
            return hit
        record = _call(self._transform, self._source[index])
        size = sum(v.nbytes for v in record.values() if isinstance(v, np.ndarray))
        with self._lock:
            if index not in self._cache and self._used + size <= self._budget:
                self._cache[index] = record
                self._used += size
        return record


def make_train_dataset(
    source: Any,
    transform: Any,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch: int = 2,
    shard_index: int = 0,
    shard_count: int = 1,
    cache_bytes: int = 0,
) -> grain.IterDataset:
    """Infinite stream of batches: dicts of numpy arrays with a new leading batch axis.

    Args:
      source: a random-access source (`__len__`, `__getitem__`), e.g. `BratsSource`.
      transform: a `grain.transforms.Map` or a picklable callable record -> record, or None
        when `source` already yields finished records.
      batch_size: per-shard batch size; the last incomplete batch of the stream is dropped.
      seed: shuffle seed; the same seed gives the same batches whatever `num_workers`.
      num_workers: worker processes (0: read in this process with `num_threads` threads).
      shard_index, shard_count: this host's slice of the batch stream.
      cache_bytes: keep transformed records in memory up to this many bytes per process
        (`CachedSource`); 0 transforms every record every epoch.
    """
    if transform is not None and cache_bytes > 0:
        source, transform = CachedSource(source, transform, cache_bytes=cache_bytes), None
    ds = grain.MapDataset.source(source).seed(seed).shuffle()
    if isinstance(transform, grain.transforms.RandomMap):
        # Random per record (e.g. random crops), reproducibly: grain derives each record's
        # generator from the dataset seed and the record's position in the stream.
        ds = ds.repeat().random_map(transform)
    elif transform is not None:
        ds = ds.map(transform).repeat()
    else:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    # Slicing a MapDataset shards deterministically; it must happen before to_iter_dataset.
    ds = ds[shard_index::shard_count]
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def make_eval_dataset(source: Any, transform: Callable | Any) -> grain.MapDataset:
    """One transformed record per case, in source order (no shuffle, no repeat, no batch)."""
    return grain.MapDataset.source(source).map(transform)
