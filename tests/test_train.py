"""The jitted train step: no retrace across steps, and 8 devices == 1 device on the same batch."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from configs import rpl as rpl_config
from ssl3d_jax import parallel, tasks
from ssl3d_jax.train import step as step_lib
from ssl3d_jax.train.state import TrainState

IN_CHANNELS = 2
BATCH = 8


@pytest.fixture(scope="module", params=["3d", "2d"])
def dims(request):
    return request.param


@pytest.fixture(scope="module")
def task(dims):
    config = rpl_config.get_config(f"smoke,{dims}")
    return tasks.get_task(config, in_channels=IN_CHANNELS)


@pytest.fixture(scope="module")
def volumes(dims):
    rng = np.random.default_rng(0)
    spatial = (24,) * int(dims[0])
    return rng.normal(size=(BATCH, *spatial, IN_CHANNELS)).astype(np.float32)


def _make(task, devices, tx, counter=None):
    mesh = parallel.make_mesh(devices)
    graphdef, params = step_lib.init_params(task.build_model, jax.random.key(0), mesh)
    state = step_lib.create_train_state(tx, params, jax.random.key(1), mesh)

    def loss_fn(model, batch, key):
        if counter is not None:
            counter.append(1)  # runs at trace time only
        return task.loss(model, batch["image"], key)

    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, loss_fn, tx), mesh)
    return mesh, state, step


def test_no_retrace_across_steps(task, volumes):
    traces = []
    mesh, state, step = _make(task, jax.devices(), optax.adam(1e-3), traces)
    for i in range(3):
        batch = parallel.put_batch({"image": volumes + i}, parallel.data_sharded(mesh))
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    assert len(traces) == 1
    assert int(state.step) == 3


def test_batch_is_sharded_and_state_replicated(task, volumes):
    mesh, state, step = _make(task, jax.devices(), optax.adam(1e-3))
    batch = parallel.put_batch({"image": volumes}, parallel.data_sharded(mesh))
    assert len(batch["image"].sharding.device_set) == 8
    assert batch["image"].addressable_shards[0].data.shape[0] == BATCH // 8
    state, _ = step(state, batch)
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_eight_devices_equal_one_device(task, volumes):
    # SGD, so that parameter differences are lr × gradient differences (Adam's first step is
    # ~sign(g) and would amplify float noise on near-zero gradients).
    tx = optax.sgd(0.1)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh, state, step = _make(task, devices, tx)
        batch = parallel.put_batch({"image": volumes}, parallel.data_sharded(mesh))
        state, m1 = step(state, batch)
        state, m2 = step(state, batch)
        results.append(jax.device_get((m1, m2, state.params)))
    (a1, a2, pa), (b1, b2, pb) = results
    assert len(jax.devices()) == 8
    for ma, mb in ((a1, b1), (a2, b2)):
        for k in ma:
            np.testing.assert_allclose(ma[k], mb[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), pa, pb)
    # The step did learn something: the loss changed between the two steps.
    assert abs(float(a1["loss"]) - float(a2["loss"])) > 1e-6


def test_batch_size_not_divisible_by_devices_is_a_config_error():
    mesh = parallel.make_mesh()
    with pytest.raises(Exception, match="config.pretrain.batch_size=6"):
        parallel.check_batch_size(6, mesh, "config.pretrain.batch_size")


def test_frozen_parts_get_no_update_and_keep_their_optimizer_state(task, volumes):
    """The finetuning warm-up: only the trainable parts move, the frozen part's Adam state is
    untouched (so unfreezing continues it instead of resetting it, unlike the original)."""
    tx = optax.adam(1e-2)
    mesh = parallel.make_mesh(jax.devices()[:1])
    graphdef, params = step_lib.init_params(task.build_model, jax.random.key(0), mesh)
    state = step_lib.create_train_state(tx, params, jax.random.key(1), mesh)
    before = jax.device_get(state)

    def loss_fn(model, batch, key):
        return task.loss(model, batch["image"], key)

    frozen = jax.jit(step_lib.make_train_step(graphdef, loss_fn, tx, trainable=("head",)))
    batch = parallel.put_batch({"image": volumes}, parallel.data_sharded(mesh))
    after, _ = frozen(state, batch)
    after = jax.device_get(after)
    same = jax.tree.map(np.array_equal, before.params["encoder"], after.params["encoder"])
    assert all(jax.tree.leaves(same))
    same_opt = jax.tree.map(np.array_equal, before.opt_state["encoder"], after.opt_state["encoder"])
    assert all(jax.tree.leaves(same_opt))
    moved = jax.tree.map(np.array_equal, before.params["head"], after.params["head"])
    assert not all(jax.tree.leaves(moved))
    assert int(after.step) == 1


def test_non_finite_loss_stops_without_saving(tmp_path):
    from ssl3d_jax.train import loop

    class _Ckpt:
        saved: list = []

        def save(self, step, *a, **k):
            self.saved.append(step)

        def wait(self):
            pass

    ckpt = _Ckpt()
    losses = iter([1.0, 0.5, float("nan"), 0.1])

    def step_fn(_):
        def step(state, batch):
            return state.replace(step=state.step + 1), {"loss": np.float32(next(losses))}

        return step

    state = TrainState(step=np.int32(0), params={}, opt_state={}, rng=np.zeros(2))
    with pytest.raises(loop.NonFiniteLossError, match="step 3"):
        loop.train_loop(
            phase="pretrain",
            state=state,
            step_fn=step_fn,
            batches=iter(lambda: {}, None),
            put_batch=lambda b: b,
            num_steps=4,
            writer=loop.MetricWriter(tmp_path / "metrics.jsonl"),
            log_every=1,
            checkpointer=ckpt,
            checkpoint_every=1,
        )
    assert ckpt.saved == [1, 2]  # steps 1 and 2 completed finitely; step 3 (loss NaN) not saved
