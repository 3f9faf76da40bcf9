"""Checkpoint round trip, and restoring only the encoder into a segmentation model; every item
of a checkpoint (iterator position included) round-trips exactly, an unreadable newest step falls
back to the previous one, and a save killed midway leaves no step that looks complete."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import types

import jax
import numpy as np
import optax
import pytest

from configs import rpl as rpl_config
from ssl3d_jax import parallel, tasks
from ssl3d_jax.checkpoint import Checkpointer, restore_encoder
from ssl3d_jax.errors import CheckpointError
from ssl3d_jax.train import common, finetune
from ssl3d_jax.train import step as step_lib


@pytest.fixture(scope="module")
def config():
    return rpl_config.get_config("smoke")


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


# What run_meta reads of a dataset: a 4-channel MRI volume dataset.
_BRATS_LIKE = types.SimpleNamespace(
    name="BraTS",
    layout="brats",
    root="/data/brats",
    modality="mri",
    channels=("t1", "t1ce", "t2", "flair"),
    in_channels=4,
)


def _pretrain_state(config, mesh, in_channels):
    task = tasks.get_task(config, in_channels=in_channels)
    _, params = step_lib.init_params(task.build_model, jax.random.key(3), mesh)
    return step_lib.create_train_state(optax.adam(1e-3), params, jax.random.key(4), mesh)


@pytest.fixture(scope="module")
def saved(config, mesh, tmp_path_factory):
    """A pretraining checkpoint at step 7 with 4-channel inputs."""
    state = _pretrain_state(config, mesh, 4)
    state = state.replace(step=state.step + 7)
    ckpt_dir = tmp_path_factory.mktemp("pre") / "checkpoints"
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(7, state, common.run_meta(config, _BRATS_LIKE, phase="pretrain"))
    return ckpt_dir, jax.device_get(state)


def test_full_state_round_trip(saved, config, mesh):
    ckpt_dir, state = saved
    fresh = _pretrain_state(config, mesh, 4)
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() == 7
        assert ckpt.read_meta()["task"] == "rpl"
        restored = ckpt.restore(7, common.abstract_like(fresh))
    assert int(restored.step) == 7
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), state.params)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))


def test_encoder_only_restore_into_segmentation_model(saved, config, mesh):
    ckpt_dir, state = saved
    _, seg = step_lib.init_params(
        finetune.build_model(config, in_channels=4, num_classes=4), jax.random.key(9), mesh
    )
    seg = jax.device_get(seg)
    merged, report = restore_encoder(ckpt_dir, seg["encoder"])
    # Every encoder tensor came from the checkpoint ...
    jax.tree.map(np.testing.assert_array_equal, merged, state.params["encoder"])
    n_leaves = len(jax.tree.leaves(seg["encoder"]))
    assert len(report["loaded"]) == n_leaves and report["missing"] == []
    assert report["step"] == 7
    # ... and differs from the fresh init (so the test can fail).
    fresh_leaf = jax.tree.leaves(seg["encoder"])[0]
    assert not np.array_equal(jax.tree.leaves(merged)[0], fresh_leaf)
    # The pretext head is not part of the segmentation model.
    assert "head" in state.params and "head" not in seg


@pytest.mark.slow
def test_restore_refuses_wrong_channel_count(saved, config, mesh):
    ckpt_dir, _ = saved
    _, seg = step_lib.init_params(
        finetune.build_model(config, in_channels=2, num_classes=4), jax.random.key(9), mesh
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        restore_encoder(ckpt_dir, jax.device_get(seg["encoder"]))


def test_restore_fails_loudly_when_nothing_matches(tmp_path, mesh):
    ckpt_dir = tmp_path / "checkpoints"
    state = step_lib.create_train_state(
        optax.sgd(1.0),
        {"encoder": {"other": {"w": np.ones(3, np.float32)}}},
        jax.random.key(0),
        mesh,
    )
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, state, {"task": "x"})
    with pytest.raises(CheckpointError, match="no encoder parameter"):
        restore_encoder(ckpt_dir, {"conv": {"kernel": np.zeros((3,), np.float32)}})


def test_restore_without_encoder_part_or_checkpoint(tmp_path, mesh):
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_encoder(tmp_path / "nothing", {})
    ckpt_dir = tmp_path / "checkpoints"
    state = step_lib.create_train_state(
        optax.sgd(1.0), {"head": {"w": np.ones(3, np.float32)}}, jax.random.key(0), mesh
    )
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(1, state, {"task": "x"})
    with pytest.raises(CheckpointError, match="no params/encoder"):
        restore_encoder(ckpt_dir, {"w": np.ones(3, np.float32)})


# --- exact resume: every item round-trips; damaged and interrupted saves (issue 5) ---------------


def _records(n: int = 40) -> list[dict]:
    return [{"x": np.full((2,), i, np.int32)} for i in range(n)]


def _batches(num_threads: int = 2):
    """The training pipeline (shuffle, repeat, batch, prefetch threads) over 40 tiny records."""
    from ssl3d_jax.data import pipeline

    ds = pipeline.make_train_dataset(
        _records(), None, batch_size=4, seed=5, num_threads=num_threads
    )
    return iter(ds)


_SHAPE = (64, 64)


def _trained_state(mesh, n_updates: int = 3):
    """A state whose every item differs from a fresh one: Adam moments and count, step, rng."""
    tx = optax.adam(0.1)
    # 16 KiB: large enough that orbax stores it in a data file of its own, not inline.
    w = np.random.default_rng(0).normal(size=_SHAPE).astype(np.float32)
    state = step_lib.create_train_state(tx, {"encoder": {"w": w}}, jax.random.key(11), mesh)
    for i in range(n_updates):
        grads = {"encoder": {"w": np.full(_SHAPE, i + 1.0, np.float32)}}
        updates, opt = tx.update(
            grads["encoder"], state.opt_state["encoder"], state.params["encoder"]
        )
        state = state.replace(
            step=state.step + 1,
            params={"encoder": optax.apply_updates(state.params["encoder"], updates)},
            opt_state={"encoder": opt},
            rng=jax.random.fold_in(state.rng, i),
        )
    return tx, state


def test_every_item_round_trips_including_the_iterator_position(tmp_path, mesh):
    """params, optimizer state, step, RNG and the grain position all come back exactly; the
    position is the one at `save` time, although the async save completes later."""
    tx, state = _trained_state(mesh)
    stream = _batches()
    expected = [next(stream)["x"] for _ in range(8)]
    it = _batches()
    for _ in range(3):
        next(it)
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(3, state, {"task": "x"}, data_iter=it)
        for _ in range(2):  # consumed while the save may still be writing
            next(it)
        ckpt.wait()
    fresh = step_lib.create_train_state(
        tx, {"encoder": {"w": np.zeros(_SHAPE, np.float32)}}, jax.random.key(0), mesh
    )
    resumed = _batches()
    with Checkpointer(tmp_path / "ck") as ckpt:
        step, restored = ckpt.restore_latest(common.abstract_like(fresh), data_iter=resumed)
    assert step == 3 and int(restored.step) == 3
    want, got = jax.device_get(state), jax.device_get(restored)
    jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
    jax.tree.map(np.testing.assert_array_equal, got.opt_state, want.opt_state)
    assert int(got.opt_state["encoder"][0].count) == 3  # Adam's count, not a fresh 0
    np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(want.rng))
    # The resumed iterator continues with the 4th batch, the one after the saved position.
    for k in range(3, 8):
        np.testing.assert_array_equal(next(resumed)["x"], expected[k])


def _two_steps(directory, mesh):
    """Checkpoints at steps 1 and 2 with different params; returns the states."""
    _, s1 = _trained_state(mesh, 1)
    _, s2 = _trained_state(mesh, 2)
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, s1, {"task": "x"})
        ckpt.save(2, s2, {"task": "x"})
    return jax.device_get(s1), s2


def _damage(step_dir, how: str) -> None:
    data = sorted((step_dir / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    if how == "truncated":
        os.truncate(data[-1], data[-1].stat().st_size // 2)
    elif how == "deleted":
        data[-1].unlink()
    else:  # the tree metadata
        (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated", "deleted", "no_metadata"])
def test_unreadable_newest_checkpoint_falls_back_and_is_kept(tmp_path, mesh, caplog, how):
    directory = tmp_path / "ck"
    s1, s2 = _two_steps(directory, mesh)
    _damage(directory / "2", how)
    files = sorted(p.relative_to(directory / "2") for p in (directory / "2").rglob("*"))
    with caplog.at_level(logging.WARNING, logger="ssl3d_jax.checkpoint"):
        with Checkpointer(directory) as ckpt:
            step, restored = ckpt.restore_latest(common.abstract_like(s2))
            assert ckpt.all_steps() == [1]
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), s1.params)
    (warning,) = [r for r in caplog.records if r.name == "ssl3d_jax.checkpoint"]
    assert warning.levelno == logging.WARNING
    assert f"{directory / '2'} is unreadable" in warning.getMessage()
    assert "Error" in warning.getMessage() or "error" in warning.getMessage()
    # Nothing saved is lost: the folder is renamed aside, every file still in it ...
    assert not (directory / "2").exists()
    aside = directory / "2.unreadable"
    assert sorted(p.relative_to(aside) for p in aside.rglob("*")) == files
    # ... and a later save of step 2 does not collide with it.
    with Checkpointer(directory) as ckpt:
        ckpt.save(2, s2, {"task": "x"})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.restore_latest(common.abstract_like(s2))[0] == 2
    assert aside.is_dir()


def test_all_checkpoints_unreadable_is_a_clear_error(tmp_path, mesh):
    directory = tmp_path / "ck"
    _, s2 = _two_steps(directory, mesh)
    _damage(directory / "1", "truncated")
    _damage(directory / "2", "deleted")
    with Checkpointer(directory) as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint in .* can be read") as err:
            ckpt.restore_latest(common.abstract_like(s2))
    assert str(directory / "1") in str(err.value) and str(directory / "2") in str(err.value)
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]  # nothing moved


def test_checkpoint_of_another_model_is_refused_not_set_aside(tmp_path, mesh):
    directory = tmp_path / "ck"
    _two_steps(directory, mesh)
    other = step_lib.create_train_state(
        optax.adam(0.1), {"encoder": {"w": np.zeros((5, 4), np.float32)}}, jax.random.key(0), mesh
    )
    with Checkpointer(directory) as ckpt:
        with pytest.raises(CheckpointError, match="do not fit this run's model"):
            ckpt.restore_latest(common.abstract_like(other))
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


_KILLED_SAVE = """
import os, signal, sys
import jax, numpy as np, optax
from ssl3d_jax import parallel
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.train import step as step_lib

mesh = parallel.make_mesh()
big = {"encoder": {"w": np.random.default_rng(0).normal(size=(2**21,)).astype(np.float32)}}
state = step_lib.create_train_state(optax.sgd(0.1), big, jax.random.key(0), mesh)
ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, state, {"task": "x"})
ckpt.wait()
ckpt.save(2, state.replace(step=state.step + 2), {"task": "x"})
os.kill(os.getpid(), signal.SIGKILL)  # while the asynchronous save of step 2 is writing
"""


@pytest.mark.slow
def test_killed_save_leaves_no_step_that_looks_complete(tmp_path, mesh):
    directory = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(directory)], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    # The kill hit the save: step 2 exists only as orbax's temporary folder.
    names = sorted(p.name for p in directory.iterdir())
    assert "1" in names and "2" not in names
    assert [n for n in names if n.startswith("2.orbax-checkpoint-tmp")], names
    fresh = step_lib.create_train_state(
        optax.sgd(0.1), {"encoder": {"w": np.zeros(2**21, np.float32)}}, jax.random.key(0), mesh
    )
    with Checkpointer(directory) as ckpt:
        assert ckpt.all_steps() == [1]
        step, restored = ckpt.restore_latest(common.abstract_like(fresh))
    assert step == 1 and int(restored.step) == 0
    # Opening the folder to write removed the unfinished temporary folder.
    assert sorted(p.name for p in directory.iterdir()) == ["1"]
