"""Checkpoint round trip, and restoring only the encoder into a segmentation model."""

from __future__ import annotations

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
