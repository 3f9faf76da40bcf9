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

from typing import Any, Callable

import grain


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
) -> grain.IterDataset:
    """Infinite stream of batches: dicts of numpy arrays with a new leading batch axis.

    Args:
      source: a random-access source (`__len__`, `__getitem__`), e.g. `BratsSource`.
      transform: a `grain.transforms.Map` or a picklable callable record -> record.
      batch_size: per-shard batch size; the last incomplete batch of the stream is dropped.
      seed: shuffle seed; the same seed gives the same batches whatever `num_workers`.
      num_workers: worker processes (0: read in this process with `num_threads` threads).
      shard_index, shard_count: this host's slice of the batch stream.
    """
    ds = grain.MapDataset.source(source).seed(seed).shuffle()
    ds = ds.map(transform)
    ds = ds.repeat().batch(batch_size, drop_remainder=True)
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
