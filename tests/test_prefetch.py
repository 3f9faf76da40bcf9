"""Device prefetch in the training loop (issue 6, item 4): `train_loop` reads batches in a
background thread (`pipeline.DevicePrefetcher`) and must still consume them in order, checkpoint
the data position of the last CONSUMED batch (not of those read ahead), re-raise a producer's
error in the loop, stop its thread, and log as `data_wait_fraction` the time the device sat
idle waiting for data, not the time the loop blocked while dispatched steps still ran.

The loop runs with fake steps (host numpy, or a simulated asynchronous device) except for one
test with a jitted step on the 8-device mesh of conftest and real `put_batch` sharding.
"""

from __future__ import annotations

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax import parallel
from ssl3d_jax.checkpoint import Checkpointer, IteratorPosition
from ssl3d_jax.data import pipeline
from ssl3d_jax.errors import DataError
from ssl3d_jax.train import common, loop
from ssl3d_jax.train.state import TrainState


def _grain_batches():
    """The training pipeline (shuffle, repeat, batch, reader threads) over 40 tiny records."""
    records = [{"x": np.full((2,), i, np.int32)} for i in range(40)]
    return iter(pipeline.make_train_dataset(records, None, batch_size=4, seed=5, num_threads=2))


def _stream(n: int) -> list[list[int]]:
    it = _grain_batches()
    return [next(it)["x"][:, 0].tolist() for _ in range(n)]


def _state():
    return TrainState(step=np.int32(0), params={}, opt_state={}, rng=np.zeros(2))


class _FakeCheckpointer:
    """Keeps, per saved step, the data position that `Checkpointer.save` would write."""

    def __init__(self):
        self.positions: dict[int, dict] = {}

    def save(self, step, state, meta, data_iter=None):
        self.positions[step] = json.loads(data_iter.get_state())

    def wait(self):
        pass


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "device-prefetch" and t.is_alive()]


def _run(tmp_path, batches, *, num_steps, step=None, prefetch=2, checkpointer=None, **kw):
    """`train_loop` with a host step that records each consumed batch's first column."""
    consumed = []

    def step_fn(_):
        def fn(state, batch):
            if step is not None:
                return step(state, batch)
            consumed.append(np.asarray(batch["x"])[:, 0].tolist())
            return state.replace(step=state.step + 1), {"loss": np.float32(1.0)}

        return fn

    loop.train_loop(
        phase="pretrain",
        state=_state(),
        step_fn=step_fn,
        batches=batches,
        put_batch=lambda b: b,
        num_steps=num_steps,
        writer=loop.MetricWriter(tmp_path / "metrics.jsonl"),
        log_every=kw.pop("log_every", 1),
        checkpointer=checkpointer,
        data_iter=batches,
        prefetch=prefetch,
        **kw,
    )
    return consumed


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_consumed_order_is_the_unprefetched_order(tmp_path, prefetch):
    consumed = _run(tmp_path, _grain_batches(), num_steps=12, prefetch=prefetch)
    assert consumed == _stream(12)  # 12 batches of 4 = more than one epoch of 40 records
    assert not _prefetch_threads()


def test_saved_position_is_that_of_the_last_consumed_batch(tmp_path):
    """At each save the prefetcher has read up to 2 batches more; resuming from the saved
    position must give exactly the batch after the last one the loop consumed."""
    ckpt = _FakeCheckpointer()
    batches = _grain_batches()
    _run(tmp_path, batches, num_steps=7, checkpointer=ckpt, checkpoint_every=2)
    stream = _stream(12)
    assert sorted(ckpt.positions) == [2, 4, 6, 7]
    for done, position in ckpt.positions.items():
        resumed = _grain_batches()
        resumed.set_state(position)
        assert next(resumed)["x"][:, 0].tolist() == stream[done], done
    # The live iterator has moved on past the last save only by what was read for the run.
    assert batches.get_state() == ckpt.positions[7]


def test_iterator_position_round_trips_through_orbax(tmp_path):
    """`IteratorPosition` writes the file grain's handler reads back into a live iterator."""
    it = _grain_batches()
    for _ in range(3):
        next(it)
    position = IteratorPosition(it.get_state())
    for _ in range(2):  # the live iterator moves on (as the prefetcher does); the save must not
        next(it)
    state = {"w": jnp.arange(3.0)}
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(3, state, {"task": "x"}, data_iter=position)
        ckpt.wait()
    resumed = _grain_batches()
    with Checkpointer(tmp_path / "ck", create=False) as ckpt:
        ckpt.restore(3, common.abstract_like(state), data_iter=resumed)
    assert next(resumed)["x"][:, 0].tolist() == _stream(4)[3]


def test_producer_error_surfaces_in_the_loop_and_the_thread_ends(tmp_path):
    def batches():
        for i in range(2):
            yield {"x": np.full((4, 2), i)}
        raise DataError("cannot read /data/BraTS_007/BraTS_007_t1.nii.gz: truncated gzip")

    with pytest.raises(DataError, match="BraTS_007_t1.nii.gz: truncated gzip") as err:
        consumed = []
        _run(
            tmp_path,
            batches(),
            num_steps=5,
            step=lambda s, b: (consumed.append(int(b["x"][0, 0])) or s, {"loss": 1.0}),
        )
    assert consumed == [0, 1]  # the batches read before the error were trained on first
    assert "_produce" in "".join(_tb_names(err.value.__traceback__))  # raised where it happened
    assert not _prefetch_threads()


def _tb_names(tb) -> list[str]:
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def test_thread_stops_when_the_loop_fails_with_batches_still_queued(tmp_path):
    """A non-finite loss stops the loop while the producer waits on a full queue over an
    infinite iterator: the thread must still end (no hang)."""
    losses = iter([1.0, float("nan")] + [1.0] * 10)
    with pytest.raises(loop.NonFiniteLossError, match="step 2"):
        _run(
            tmp_path,
            _grain_batches(),
            num_steps=10,
            step=lambda s, b: (s, {"loss": np.float32(next(losses))}),
        )
    assert not _prefetch_threads()


def test_prefetcher_close_while_blocked_and_limit():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    feed = pipeline.DevicePrefetcher(endless(), lambda b: b * 10, depth=2, limit=3)
    assert [next(feed).batch for _ in range(3)] == [0, 10, 20]
    with pytest.raises(StopIteration):
        next(feed)
    assert not feed.alive
    feed = pipeline.DevicePrefetcher(endless(), lambda b: b, depth=1)
    time.sleep(0.05)  # the producer now blocks on the full queue
    feed.close()
    assert not feed.alive


class _Device:
    """A simulated asynchronous device: a step is queued at dispatch and takes `step_s`."""

    def __init__(self, step_s: float):
        self.step_s, self.free_at = step_s, 0.0

    def dispatch(self) -> _Result:
        self.free_at = max(self.free_at, time.perf_counter()) + self.step_s
        return _Result(self.free_at)


class _Result:
    """A metric on the simulated device: `is_ready` like a jax.Array; reading it waits."""

    def __init__(self, ready_at: float):
        self.ready_at = ready_at

    def is_ready(self) -> bool:
        return time.perf_counter() >= self.ready_at

    def __float__(self) -> float:
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))
        return 1.0


def _wait_fraction(tmp_path, *, read_s: float, step_s: float, prefetch: int = 2) -> float:
    def slow():
        while True:
            time.sleep(read_s)
            yield {"x": np.zeros((4, 2))}

    device = _Device(step_s)
    steps = 12
    _run(
        tmp_path,
        slow(),
        num_steps=steps,
        step=lambda s, b: (s, {"loss": device.dispatch()}),
        log_every=steps,
        prefetch=prefetch,
    )
    with open(tmp_path / "metrics.jsonl") as f:
        (record,) = [json.loads(line) for line in f]
    return record["data_wait_fraction"]


@pytest.mark.slow
def test_data_wait_fraction_is_the_time_the_device_waits(tmp_path):
    # Reading (60 ms) is slower than the step (10 ms): the device idles ~5/6 of the time.
    assert _wait_fraction(tmp_path / "slow", read_s=0.06, step_s=0.01) > 0.6
    # Reading (15 ms) is faster than the step (60 ms): the loop still blocks on every read, as
    # it runs ahead of the queued steps, but the device never waits.
    assert _wait_fraction(tmp_path / "fast", read_s=0.015, step_s=0.06) < 0.1
    # Without prefetch the same reads happen between dispatches, still hidden by queued steps.
    assert _wait_fraction(tmp_path / "inline", read_s=0.015, step_s=0.06, prefetch=0) < 0.1


def test_jitted_step_on_the_mesh_sees_the_same_batches_with_and_without_prefetch(tmp_path):
    """Real `put_batch` (global arrays sharded over 8 devices) from the producer thread."""
    mesh = parallel.make_mesh()
    put = common.batch_putter(mesh, ("x",))

    @jax.jit
    def step(state, batch):
        x = batch["x"].astype(jnp.float32)
        return state.replace(step=state.step + 1), {"loss": jnp.sum(x * (1.0 + state.step))}

    def losses(prefetch):
        sub = tmp_path / str(prefetch)
        records = [{"x": np.full((2,), i, np.int32)} for i in range(40)]
        batches = iter(pipeline.make_train_dataset(records, None, batch_size=8, seed=5))
        loop.train_loop(
            phase="pretrain",
            state=TrainState(step=jnp.int32(0), params={}, opt_state={}, rng=jnp.zeros(2)),
            step_fn=lambda s: step,
            batches=batches,
            put_batch=put,
            num_steps=6,
            writer=loop.MetricWriter(sub / "metrics.jsonl"),
            log_every=1,
            prefetch=prefetch,
        )
        with open(sub / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f]

    assert losses(2) == losses(0)
    assert not _prefetch_threads()
