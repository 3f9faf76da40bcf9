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

Device prefetch (`DevicePrefetcher`): a thread reads the next batches and copies them to the
device while the current step computes, so that the training loop waits only when the pipeline
is slower than the step; it also measures that wait (see `DevicePrefetcher.get`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

import grain
import numpy as np

log = logging.getLogger(__name__)


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


class Prefetched(NamedTuple):
    """One batch handed over by `DevicePrefetcher`.

    batch: what `put` made of the host batch (global device arrays in training).
    position: `position()` taken right after this batch was read (the grain iterator state that
      resumes with the NEXT batch), or None.
    description: `describe(host batch)`, or ''.
    """

    batch: Any
    position: Any
    description: str


_END = object()  # sentinel: the producer read `limit` batches, or the source ran out


class _Failed(NamedTuple):
    error: BaseException


class DevicePrefetcher:
    """Reads host batches and puts them on the device in a background thread, `depth` ahead.

    The training step dispatches asynchronously, so the loop can hand the device its next step
    only once that step's batch is on the device; doing `next(batches)` and the host → device
    copy here, ahead of the step, keeps them off the loop's critical path. The loop takes the
    batches in order with `get` and blocks only when none is ready yet.

    The iterator is used by the producer thread alone from construction until `close()`: the
    position of a consumed batch comes with it (`Prefetched.position`), taken right after the
    read, so that a checkpoint stores where the loop is, not where the prefetcher is.

    An exception in the producer (e.g. a `DataError` naming a file) is raised by `get` in the
    consuming thread, as the same exception object, after the batches read before it. `close()`
    stops the thread (it is a daemon: a producer stuck in a read never keeps Python alive).

    Args:
      batches: iterator of host batches.
      put: `host batch -> device batch` (e.g. `parallel.put_batch`); called in the thread.
      depth: batches kept ready (≥ 1); the thread may hold one more in the making.
      limit: read at most this many batches (the steps left), None: until `batches` ends.
      position: `() -> state` of `batches` after a read (e.g. `iterator.get_state`), or None.
      describe: `host batch -> str` kept with the batch, or None.
    """

    def __init__(
        self,
        batches: Iterator,
        put: Callable[[Any], Any],
        *,
        depth: int = 2,
        limit: int | None = None,
        position: Callable[[], Any] | None = None,
        describe: Callable[[Any], str] | None = None,
        poll_s: float = 1e-3,
    ):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._batches, self._put, self._limit = batches, put, limit
        self._position, self._describe = position, describe
        self._poll_s = poll_s
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="device-prefetch", daemon=True)
        self._thread.start()

    def _offer(self, item) -> bool:
        """Queue `item` unless stopped meanwhile; False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        n = 0
        try:
            while not self._stop.is_set() and (self._limit is None or n < self._limit):
                try:
                    host = next(self._batches)
                except StopIteration:
                    break
                pos = self._position() if self._position is not None else None
                desc = self._describe(host) if self._describe is not None else ""
                if not self._offer(Prefetched(self._put(host), pos, desc)):
                    return
                n += 1
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._offer(_Failed(e))
            return
        self._offer(_END)

    def __iter__(self):
        return self

    def __next__(self) -> Prefetched:
        return self.get()[0]

    def get(self, device_busy: Callable[[], bool] | None = None) -> tuple[Prefetched, float]:
        """The next batch, and the seconds spent waiting for it while the device was idle.

        `device_busy() -> bool`: whether the device still computes work dispatched before (e.g.
        the previous step's outputs are not ready). The loop's waiting only delays training
        while the device is idle: asynchronous dispatch lets the loop run ahead of the device,
        and a wait while steps are still queued costs nothing. Without it every second of
        waiting counts. The moment the device turns idle is found by polling every `poll_s`
        (the midpoint of the poll interval is taken).

        Raises:
          StopIteration: after `limit` batches or when `batches` ended.
          the producer's exception, as raised there.
        """
        if self._done:
            raise StopIteration
        try:
            item, idle = self._queue.get_nowait(), 0.0
        except queue.Empty:
            item, idle = self._wait(device_busy)
        if item is _END or isinstance(item, _Failed):
            self._done = True
            self._thread.join()
            if item is _END:
                raise StopIteration
            raise item.error
        return item, idle

    def _wait(self, device_busy) -> tuple[Any, float]:
        t0 = time.perf_counter()
        if device_busy is None or not device_busy():
            return self._queue.get(), time.perf_counter() - t0
        checked = t0
        while True:
            try:
                item = self._queue.get(timeout=self._poll_s)
            except queue.Empty:
                now = time.perf_counter()
                if device_busy():
                    checked = now
                    continue
                # Idle since some moment in (checked, now]: wait for the batch without polling.
                idle_from = 0.5 * (checked + now)
                return self._queue.get(), time.perf_counter() - idle_from
            now = time.perf_counter()
            idle = 0.0 if device_busy() else now - 0.5 * (checked + now)
            return item, idle

    def close(self, timeout: float = 30.0) -> None:
        """Stop the producer and wait for it (at most `timeout` s for a read in progress)."""
        self._stop.set()
        self._done = True
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("device prefetch thread still reading after %.0f s; left behind", timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
