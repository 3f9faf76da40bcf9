"""The host-side training loop: feed batches, log metrics, checkpoint, stop on a non-finite loss.

It knows nothing of tasks or files beyond the metrics file and the `Checkpointer` it is handed.

Exact resume: a run restarted from its checkpoint at step S first drops the metric records that
the interrupted run logged after S (they are logged again, identically), so that the metrics file
of an interrupted and resumed run equals that of an uninterrupted one, except for the wall-clock
fields `WALL_CLOCK_FIELDS`. Every record of a step is written before that step's checkpoint is
saved, so a checkpoint never exists without the records up to its step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, Iterator

import jax

from ssl3d_jax import fileio
from ssl3d_jax.checkpoint import IteratorPosition
from ssl3d_jax.data.pipeline import DevicePrefetcher, Prefetched
from ssl3d_jax.errors import Ssl3dError
from ssl3d_jax.progress import Progress

log = logging.getLogger(__name__)

# Fields of a metric record that measure time, not training: they differ between runs.
WALL_CLOCK_FIELDS = ("time", "steps_per_sec", "data_wait_fraction")


class NonFiniteLossError(Ssl3dError, FloatingPointError):
    """The loss became NaN or Inf; the run stops without saving the bad state."""


def _in_phase(record_phase: str, phase: str) -> bool:
    return record_phase == phase or record_phase.startswith(phase + "/")


class MetricWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl` (flushed every write).

    Only process 0 writes (every process of a multi-host run logs the same global metrics).

    With `tensorboard` on, every record also goes to TensorBoard (`ssl3d_jax.tensorboard`):
    `<dir>/tensorboard/<phase>`, opened by `drop_after(phase, step)` (which a phase calls first)
    with `purge_step = step + 1`, so that a resumed phase hides its events after `step` there too.
    The runners pass `config.tensorboard`. `batch_size` (the global batch): TensorBoard also shows
    `volumes_per_sec` = steps_per_sec · batch_size (not written to metrics.jsonl).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        tensorboard: bool = False,
        batch_size: int | None = None,
    ):
        self.path = os.fspath(path)
        self.batch_size = batch_size
        self.enabled = jax.process_index() == 0
        self.workdir = os.path.dirname(os.path.abspath(self.path))
        self.tensorboard = bool(tensorboard) and self.enabled
        self._tb = None  # the ssl3d_jax.tensorboard.Writer of the current phase
        if self.enabled:
            os.makedirs(self.workdir, exist_ok=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tensorboard:
            if self._tb is None:  # a record without drop_after first: no purge
                self._open_tb(str(record.get("phase", "")).split("/")[0] or "run", None)
            if self.batch_size and "steps_per_sec" in record:
                record = dict(record, volumes_per_sec=record["steps_per_sec"] * self.batch_size)
            self._tb.scalars(record)

    def _open_tb(self, phase: str, purge_step: int | None) -> None:
        from ssl3d_jax import tensorboard

        self.close()
        self._tb = tensorboard.Writer(
            tensorboard.folder(self.workdir, phase), purge_step=purge_step
        )

    def close(self) -> None:
        """Closes the TensorBoard event file (metrics.jsonl is closed after every write)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def drop_after(self, phase: str, step: int) -> int:
        """Remove the records of `phase` (and its sub-phases `phase/...`, e.g. probes) logged
        after `step`, and any torn line, rewriting the file atomically; other phases are kept.
        With TensorBoard on, (re)opens the phase's event folder with `purge_step = step + 1`.

        Returns:
          the number of lines removed.
        """
        if self.tensorboard:
            self._open_tb(phase, step + 1)
        if not self.enabled or not os.path.exists(self.path):
            return 0
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill during the write
            later = _in_phase(str(record.get("phase", "")), phase) and record.get("step", 0) > step
            if not later:
                kept.append(line)
        if len(kept) != len(lines):
            fileio.atomic_write(self.path, lambda f: f.write("".join(x + "\n" for x in kept)))
        return len(lines) - len(kept)


def window_mean(steps: list[dict[str, float]]) -> dict[str, float]:
    """`{metric: mean}` over the steps of a log window (each step's `{metric: value}`); a metric
    that only some steps report is averaged over those."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for m in steps:
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def _with_chance(name: str, value: float, chance: dict[str, float]) -> str:
    """`'loss 2.63 (chance 3.258)'`, or `'loss 2.63'` for a metric without a chance value."""
    text = f"{name} {value:.4g}"
    return f"{text} (chance {chance[name]:.4g})" if name in chance else text


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train_loop(
    *,
    phase: str,
    state,
    step_fn: Callable[[int], Callable],
    batches: Iterator[dict],
    put_batch: Callable[[dict], dict],
    num_steps: int,
    writer: MetricWriter,
    log_every: int,
    checkpointer=None,
    checkpoint_every: int = 0,
    meta: dict | None = None,
    data_iter=None,
    probes: tuple = (),
    describe_batch: Callable[[dict], str] | None = None,
    prefetch: int = 2,
    chance: dict[str, float] | None = None,
):
    """Run steps `state.step` … `num_steps − 1` and return the final state.

    Every `log_every` steps (and at every checkpoint and the end) one record goes to `writer`:
    the MEAN over the steps since the previous record (the log window) of each metric that the
    step function returns, never one step's value. Each step's metrics are checked for NaN / Inf
    individually (the error names the step).

    Args:
      phase: name written with every metric record ('pretrain', 'finetune/pretrained', …).
      state: a replicated `TrainState`; training resumes from `state.step`.
      step_fn: `step -> jitted step function` (finetuning swaps functions after the warm-up).
      batches: iterator of host numpy batches; `put_batch` makes them global device arrays.
      writer: the metrics file.
      checkpointer: a `Checkpointer`, or None for no checkpoints; saved every `checkpoint_every`
        steps and at the end, together with `meta` and the iterator position of `data_iter`
        (`batches` itself in training) after the last batch the loop consumed.
      probes: `(name, every, fn)` triples: `fn(state) -> dict of floats` runs every `every`
        steps and at the end (e.g. the kNN probe of the encoder during pretraining); its record
        goes to the metrics file with phase `<phase>/<name>`.
      describe_batch: `host batch -> str` naming what a batch holds (e.g. its cases), kept for
        the steps not yet checked and named in a `NonFiniteLossError`.
      prefetch: batches read and put on the device ahead of the step, in a background thread
        (`DevicePrefetcher`); 0 reads each batch in the loop, between steps.
      chance: `{metric: value}` a model that learned nothing would score (`Task.chance`): every
        record also holds `chance_<metric>`, and the log line shows `loss 2.63 (chance 3.26)`.

    Each checkpoint's meta also holds `train_metrics`: the record's window means and its `step`.

    `data_wait_fraction` in each record: the share of the interval's wall time that the device
    sat idle because the loop was waiting for its next batch, i.e. the loop blocked on the
    pipeline after the previously dispatched step had finished. (Time blocked while dispatched
    steps still run is not lost: asynchronous dispatch lets the loop run ahead of the device.)
    With `prefetch=0` a read counts whole when the device is idle at its end, else not at all.

    Raises:
      NonFiniteLossError: naming the step and its batch; no checkpoint of that step or later is
        written (the earlier ones are untouched).
    """
    chance = dict(chance or {})
    start = int(jax.device_get(state.step))
    dropped = writer.drop_after(phase, start)
    if dropped:
        log.info("[%s] dropped %d metric records logged after step %d", phase, dropped, start)
    # (step, metrics on device, batch description): small, until the next flush checks them.
    pending: list[tuple[int, dict, str]] = []
    t_last, n_last = time.perf_counter(), start
    t_data = 0.0
    window: dict = {}  # the means of the last record, for the checkpoint meta
    # On a terminal a progress bar replaces the per-flush log lines (else they are the log).
    bar = Progress(num_steps, phase, initial=start, unit="steps")

    def flush(step_done: int) -> dict:
        nonlocal pending, t_last, n_last, t_data
        host = jax.device_get([(s, m) for s, m, _ in pending])
        described = {s: d for s, _, d in pending}
        pending = []
        now = time.perf_counter()
        rate = (step_done - n_last) / max(now - t_last, 1e-9)
        steps = []
        for s, m in host:
            m = {k: float(v) for k, v in m.items()}
            if not all(math.isfinite(v) for v in m.values()):
                batch = f" ({described[s]})" if described[s] else ""
                raise NonFiniteLossError(
                    f"{phase}: non-finite metrics at step {s}{batch}: {m}; stopping without "
                    "saving this state (the last good checkpoint is kept)"
                )
            steps.append(m)
        mean = window_mean(steps)
        record = dict(
            mean,
            **{f"chance_{k}": float(v) for k, v in chance.items()},
            phase=phase,
            step=step_done,
            steps_per_sec=rate,
            data_wait_fraction=t_data / max(now - t_last, 1e-9),
            time=time.time(),
        )
        writer.write(record)
        eta = (num_steps - step_done) / max(rate, 1e-9)
        shown = " ".join(_with_chance(k, mean[k], chance) for k in sorted(mean))
        if bar.enabled:
            postfix = {}
            if "loss" in mean:  # `loss=2.63 (chance 3.258)`
                postfix["loss"] = _with_chance("loss", mean["loss"], chance)[len("loss ") :]
            bar.update(step_done - bar.n, **postfix)
        (log.debug if bar.enabled else log.info)(
            "[%s] step %d/%d  %s  %.2f steps/s  eta %s",
            phase,
            step_done,
            num_steps,
            shown,
            rate,
            _fmt_time(eta),
        )
        t_last, n_last, t_data = now, step_done, 0.0
        return mean

    # The data position is taken right after each read and travels with its batch: the
    # prefetcher reads ahead, and a checkpoint must resume after the last CONSUMED batch.
    position = getattr(data_iter, "get_state", None) if checkpointer is not None else None
    dispatched = None  # outputs of the last dispatched step: ready once the device is idle

    def device_busy() -> bool:
        return any(
            not leaf.is_ready() for leaf in jax.tree.leaves(dispatched) if hasattr(leaf, "is_ready")
        )

    def read_inline(busy) -> tuple[Prefetched, float]:
        t0 = time.perf_counter()
        host = next(batches)
        item = Prefetched(
            put_batch(host),
            position() if position is not None else None,
            describe_batch(host) if describe_batch is not None else "",
        )
        return item, 0.0 if busy() else time.perf_counter() - t0

    feed = None
    if prefetch > 0:
        feed = DevicePrefetcher(
            batches,
            put_batch,
            depth=prefetch,
            limit=num_steps - start,
            position=position,
            describe=describe_batch,
        )
    try:
        for step in range(start, num_steps):
            item, idle = feed.get(device_busy) if feed is not None else read_inline(device_busy)
            t_data += idle
            state, metrics = step_fn(step)(state, item.batch)
            dispatched = metrics
            # Numbered as logged: steps completed.
            pending.append((step + 1, metrics, item.description))
            done = step + 1
            save = checkpointer is not None and (
                done == num_steps or (checkpoint_every and done % checkpoint_every == 0)
            )
            if done % log_every == 0 or done == num_steps or save:
                window = flush(done)  # also checks finiteness before anything is saved
            for name, every, fn in probes:
                if every and (done % every == 0 or done == num_steps):
                    t_probe = time.perf_counter()
                    result = {k: float(v) for k, v in fn(state).items()}
                    writer.write(dict(result, phase=f"{phase}/{name}", step=done, time=time.time()))
                    shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(result.items()))
                    log.info("[%s/%s] step %d  %s", phase, name, done, shown)
                    t_last += time.perf_counter() - t_probe  # not counted as training time
            if save:  # after every record of this step: a resumed run never logs them again
                at = data_iter if item.position is None else IteratorPosition(item.position)
                saved_meta = dict(meta or {}, train_metrics=dict(window, step=done))
                checkpointer.save(done, state, saved_meta, data_iter=at)
    finally:
        if feed is not None:
            feed.close()  # before the caller closes `batches`: the thread reads from it
    if pending:
        flush(num_steps)
    if checkpointer is not None:
        checkpointer.wait()
    bar.close()
    writer.close()
    return state
