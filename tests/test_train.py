"""The jitted train step: no retrace across steps, a sharded batch and a replicated state, frozen
parts untouched, and 8 devices == 1 device on the same global batch: the loss and every gradient
of every pretext task (whole training steps across processes: tests/test_distributed.py)."""

from __future__ import annotations

import functools
import importlib

import jax
import numpy as np
import optax
import pytest
from flax import nnx

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


@pytest.mark.slow
def test_no_retrace_across_steps(task, volumes):
    traces = []
    mesh, state, step = _make(task, jax.devices(), optax.adam(1e-3), traces)
    for i in range(3):
        batch = parallel.put_batch({"image": volumes + i}, parallel.data_sharded(mesh))
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    assert len(traces) == 1
    assert int(state.step) == 3


@pytest.mark.slow
def test_batch_is_sharded_and_state_replicated(task, volumes):
    mesh, state, step = _make(task, jax.devices(), optax.adam(1e-3))
    batch = parallel.put_batch({"image": volumes}, parallel.data_sharded(mesh))
    assert len(batch["image"].sharding.device_set) == 8
    assert batch["image"].addressable_shards[0].data.shape[0] == BATCH // 8
    state, _ = step(state, batch)
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


# Every pretext task at its smoke size (3D; RPL also 2D). Batch 8 over 8 devices puts ONE volume
# on each device: CPC's and Exemplar's negatives, which come from the other volumes of the batch,
# then all live on other devices, so equality with one device shows that the loss is computed on
# the global batch (per-device negatives would leave none at all).
GRAD_CASES = [
    ("rpl", "3d"),
    ("rpl", "2d"),
    ("rotation", "3d"),
    ("jigsaw", "3d"),
    ("cpc", "3d"),
    ("exemplar", "3d"),
]
# Tolerances: the 8-device program computes the same float32 values but reduces them in another
# order (per-device partial sums, then an all-reduce over devices), so results differ by a few
# float32 ulps of the summed terms: ~1e-7 relative for the loss. Gradients are sums of many
# products whose magnitudes span orders of magnitude; a relative test fails on entries that are
# cancellations near zero, so each leaf gets an absolute floor of 1e-3 × its largest entry
# (observed worst case 1e-4 on a CPC leaf; a batch that is not global differs by O(1)).
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL_SCALE = 1e-4, 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name,dims", GRAD_CASES)
def test_loss_and_gradients_equal_on_one_and_eight_devices(name, dims):
    config = importlib.import_module(f"configs.{name}").get_config(f"smoke,{dims}")
    batch_size = config.pretrain.batch_size
    assert batch_size == len(jax.devices()) == 8
    task = tasks.get_task(config, in_channels=IN_CHANNELS)
    spatial = (config.data.size,) * int(dims[0])
    rng = np.random.default_rng(1)
    volumes = rng.normal(size=(batch_size, *spatial, IN_CHANNELS)).astype(np.float32)
    graphdef, params = step_lib.init_params(task.build_model, jax.random.key(0))
    # Heads start with a zero output layer (so no gradient reaches below it at step 0): move
    # every parameter a little, as training would, so that every gradient is compared.
    leaves, treedef = jax.tree.flatten(params)
    noise = [rng.normal(scale=0.05, size=np.shape(x)).astype(np.float32) for x in leaves]
    params = jax.tree.unflatten(treedef, [np.asarray(x) + n for x, n in zip(leaves, noise)])
    key = jax.random.key(3)  # the task's sampling (patches, labels, augmentation) per step

    def loss_and_grads(p, batch):
        def objective(p):
            return task.loss(nnx.merge(graphdef, p), batch["image"], key)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(p)
        return loss, metrics, grads

    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        batch = parallel.put_batch({"image": volumes}, parallel.data_sharded(mesh))
        assert len(batch["image"].sharding.device_set) == len(devices)
        fn = jax.jit(loss_and_grads, out_shardings=parallel.replicated(mesh))
        results.append(jax.device_get(fn(parallel.replicate(params, mesh), batch)))
    (loss1, metrics1, grads1), (loss8, metrics8, grads8) = results
    np.testing.assert_allclose(loss8, loss1, rtol=LOSS_RTOL)
    for k in metrics1:
        np.testing.assert_allclose(metrics8[k], metrics1[k], rtol=LOSS_RTOL, atol=1e-6, err_msg=k)
    flat1 = dict(jax.tree_util.tree_flatten_with_path(grads1)[0])
    flat8 = dict(jax.tree_util.tree_flatten_with_path(grads8)[0])
    assert flat1.keys() == flat8.keys()
    worst = 0.0
    for path, g1 in flat1.items():
        scale = float(np.max(np.abs(g1)))
        worst = max(worst, float(np.max(np.abs(flat8[path] - g1))) / max(scale, 1e-30))
        np.testing.assert_allclose(
            flat8[path],
            g1,
            rtol=GRAD_RTOL,
            atol=GRAD_ATOL_SCALE * scale,
            err_msg=jax.tree_util.keystr(path),
        )
    print(
        f"{name} {dims}: loss |8-1| {abs(float(loss8) - float(loss1)):.2e}, "
        f"max |g8-g1| / max|g1| per leaf {worst:.2e}"
    )
    # The comparison is not vacuous: the loss reaches every parameter tensor.
    dead = [jax.tree_util.keystr(p) for p, g in flat1.items() if not np.any(g)]
    assert not dead, dead


def test_batch_size_not_divisible_by_devices_is_a_config_error():
    mesh = parallel.make_mesh()
    with pytest.raises(Exception, match="config.pretrain.batch_size=6"):
        parallel.check_batch_size(6, mesh, "config.pretrain.batch_size")


@pytest.mark.slow
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


# --- finetuning controls: 'random_warmup' / 'random_probe' are 'pretrained' / 'probe' minus the
# restore ---------------------------------------------------------------------------------------

CONTROLS = [("pretrained", "random_warmup"), ("probe", "random_probe")]


def test_control_arms_share_model_schedule_and_learning_rate():
    from ssl3d_jax.train import arms, finetune

    config = rpl_config.get_config("smoke")
    config.finetune.num_steps, config.finetune.warmup_frozen_steps = 6, 2
    parts = functools.partial(arms.trainable_parts, warmup_parts=finetune.SEGMENTATION.warmup_parts)
    for arm, control in CONTROLS:
        assert arm in arms.RESTORED_ARMS and control not in arms.RESTORED_ARMS
        assert arms.learning_rate(config, control) == arms.learning_rate(config, arm)
        steps = range(config.finetune.num_steps)
        schedule = [parts(config, arm, s) for s in steps]
        assert [parts(config, control, s) for s in steps] == schedule
        built = [
            finetune.build_model(config, in_channels=2, num_classes=3, arm=a)(nnx.Rngs(0))
            for a in (arm, control)
        ]
        assert type(built[0]) is type(built[1])
    # The warm-up: decoder alone for 2 steps, then everything; scratch trains everything at once.
    assert [parts(config, "random_warmup", s) for s in range(3)] == [
        ("decoder",),
        ("decoder",),
        None,
    ]
    assert parts(config, "scratch", 0) is None


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    from ssl3d_jax.data import phantom
    from ssl3d_jax.train import data as data_lib

    root = tmp_path_factory.mktemp("controls") / "data"
    phantom.write_brats_phantom(root, num_cases=5, shape=(30, 34, 28), seed=3)
    config = rpl_config.get_config("smoke")
    config.data.root = str(root)
    config.data.num_test = 1
    config.data.num_val = 1
    config.finetune.batch_size = 8  # tests run on 8 simulated devices
    config.finetune.save_predictions = False
    config.tensorboard = False
    dataset = data_lib.open_dataset(config)
    return config, dataset, data_lib.base_split(config, dataset)


@pytest.mark.slow
@pytest.mark.parametrize("arm,control", CONTROLS)
def test_control_is_bit_identical_to_its_arm_when_the_restore_returns_the_random_encoder(
    arm, control, finetune_data, tmp_path, monkeypatch
):
    """With the restore replaced by "keep the random encoder", the pretrained arm and its control
    give bit-identical parameters and scores: same parameter tree, decoder / read-out init, data
    order and trainable-parts schedule; the restore is their only difference."""
    from ssl3d_jax.train import downstream, finetune

    config, dataset, splits = finetune_data
    restores, params = [], {}

    def keep_random_encoder(path, encoder):
        restores.append(path)
        return encoder, {"step": 0, "loaded": ["encoder"], "missing": [], "unused": []}

    real_evaluate = finetune.evaluate

    def spy(config, dataset, graphdef, p, cases, **kwargs):
        params.setdefault(current, jax.device_get(p))  # the trained params, at the first call
        return real_evaluate(config, dataset, graphdef, p, cases, **kwargs)

    monkeypatch.setattr(downstream, "restore_encoder", keep_random_encoder)
    monkeypatch.setattr(downstream, "check_compatible", lambda *a, **k: {})
    monkeypatch.setattr(finetune, "evaluate", spy)
    results = {}
    for current in (arm, control):
        results[current] = downstream.run(
            config, str(tmp_path), current, splits, dataset, init_from="/pretext/checkpoints"
        )
    assert restores == ["/pretext/checkpoints"]  # the control never restores
    assert results[arm]["restored_tensors"] == 1 and results[control]["restored_tensors"] == 0
    ours, theirs = params[arm], params[control]
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    for key in ("dice_per_case", "val_per_case", "warmup_frozen_steps", "learning_rate", "seed"):
        assert results[arm][key] == results[control][key], key
    assert results[arm]["num_val"] == 1 and results[arm]["val_metrics"] is not None
