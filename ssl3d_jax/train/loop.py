"""The host-side training loop: feed batches, log metrics, checkpoint, stop on a non-finite loss.

It knows nothing of tasks or files beyond the metrics file and the `Checkpointer` it is handed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, Iterator

import jax

from ssl3d_jax.errors import Ssl3dError

log = logging.getLogger(__name__)


class NonFiniteLossError(Ssl3dError, FloatingPointError):
    """The loss became NaN or Inf; the run stops without saving the bad state."""


class MetricWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl` (flushed every write)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


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
):
    """Run steps `state.step` … `num_steps − 1` and return the final state.

    Args:
      phase: name written with every metric record ('pretrain', 'finetune/pretrained', …).
      state: a replicated `TrainState`; training resumes from `state.step`.
      step_fn: `step -> jitted step function` (finetuning swaps functions after the warm-up).
      batches: iterator of host numpy batches; `put_batch` makes them global device arrays.
      writer: the metrics file.
      checkpointer: a `Checkpointer`, or None for no checkpoints; saved every `checkpoint_every`
        steps and at the end, together with `meta` and the iterator position of `data_iter`.
      probes: `(name, every, fn)` triples: `fn(state) -> dict of floats` runs every `every`
        steps and at the end (e.g. the kNN probe of the encoder during pretraining); its record
        goes to the metrics file with phase `<phase>/<name>`.

    Raises:
      NonFiniteLossError: with the step number; the checkpoint of that step is not written.
    """
    start = int(jax.device_get(state.step))
    pending: list[tuple[int, dict]] = []
    t_last, n_last = time.perf_counter(), start
    t_data = 0.0

    def flush(step_done: int) -> dict:
        nonlocal pending, t_last, n_last, t_data
        host = jax.device_get(pending)
        pending = []
        now = time.perf_counter()
        rate = (step_done - n_last) / max(now - t_last, 1e-9)
        last = {}
        for s, m in host:
            m = {k: float(v) for k, v in m.items()}
            if not all(math.isfinite(v) for v in m.values()):
                raise NonFiniteLossError(
                    f"{phase}: non-finite metrics at step {s}: {m}; stopping without saving this "
                    "state (the last good checkpoint is kept)"
                )
            last = m
        record = dict(
            last,
            phase=phase,
            step=step_done,
            steps_per_sec=rate,
            data_wait_fraction=t_data / max(now - t_last, 1e-9),
            time=time.time(),
        )
        writer.write(record)
        eta = (num_steps - step_done) / max(rate, 1e-9)
        shown = " ".join(f"{k} {last[k]:.4g}" for k in sorted(last))
        log.info(
            "[%s] step %d/%d  %s  %.2f steps/s  eta %s",
            phase,
            step_done,
            num_steps,
            shown,
            rate,
            _fmt_time(eta),
        )
        t_last, n_last, t_data = now, step_done, 0.0
        return last

    for step in range(start, num_steps):
        t0 = time.perf_counter()
        batch = put_batch(next(batches))
        t_data += time.perf_counter() - t0
        state, metrics = step_fn(step)(state, batch)
        pending.append((step + 1, metrics))  # numbered as logged: steps completed
        done = step + 1
        save = checkpointer is not None and (
            done == num_steps or (checkpoint_every and done % checkpoint_every == 0)
        )
        if done % log_every == 0 or done == num_steps or save:
            flush(done)  # also checks finiteness before anything is saved
        if save:
            checkpointer.save(done, state, meta or {}, data_iter=data_iter)
        for name, every, fn in probes:
            if every and (done % every == 0 or done == num_steps):
                t_probe = time.perf_counter()
                result = {k: float(v) for k, v in fn(state).items()}
                writer.write(dict(result, phase=f"{phase}/{name}", step=done, time=time.time()))
                shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(result.items()))
                log.info("[%s/%s] step %d  %s", phase, name, done, shown)
                t_last += time.perf_counter() - t_probe  # not counted as training time
    if pending:
        flush(num_steps)
    if checkpointer is not None:
        checkpointer.wait()
    return state
