"""What every registered pretext task must satisfy (README "Adding a task"): its config file
names it, its `Task` is complete and JSON-describable, its loss and sample have the documented
shapes, its metrics include the ones it states a chance level for, and its model's encoder is the
library's `Encoder3D`, so a checkpoint of it restores into the segmentation model. Shapes only
(`jax.eval_shape`): nothing is compiled, so this runs in the fast lane for every task, a user's
registered ones included."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ssl3d_jax import tasks
from ssl3d_jax.models.unet import EncoderConfig, SegmentationModel

CASES = [(name, dims) for name in tasks.names() for dims in (3, 2)]
IN_CHANNELS = 2


def _config(name: str, dims: int):
    return tasks.task_config(name, "smoke" if dims == 3 else "smoke,2d")


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


@pytest.mark.parametrize("name, dims", CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_config_file_names_the_task_and_the_task_is_complete(name, dims):
    config = _config(name, dims)
    assert config.task == name and name in config  # its own section, config.<name>
    assert int(config.data.spatial_dims) == dims
    task = tasks.get_task(config, in_channels=IN_CHANNELS)
    assert task.name == name
    spec = json.loads(json.dumps(task.input_spec))  # stored in checkpoints
    assert spec["task"] == name
    assert task.chance and all(math.isfinite(v) and v > 0 for v in task.chance.values())
    assert task.sample is not None and task.min_batch >= 1
    assert isinstance(task.couples_batch, bool)


@pytest.mark.slow
@pytest.mark.parametrize("name, dims", CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_loss_and_sample_shapes(name, dims):
    config = _config(name, dims)
    task = tasks.get_task(config, in_channels=IN_CHANNELS)
    batch = max(2, task.min_batch)
    volumes = jax.ShapeDtypeStruct(
        (batch, *(int(config.data.size),) * dims, IN_CHANNELS), jnp.float32
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
    key = jax.random.key(0)
    loss, metrics = jax.eval_shape(
        lambda s, v, k: task.loss(nnx.merge(graphdef, s), v, k), state, volumes, key
    )
    assert loss.shape == () and loss.dtype == jnp.float32
    assert "loss" in metrics and set(task.chance) <= set(metrics)
    assert all(m.shape == () for m in metrics.values())
    sample = jax.eval_shape(task.sample, volumes, key)
    assert isinstance(sample, dict) and sample
    assert all(x.shape[0] == batch for x in sample.values())  # the batch axis first


@pytest.mark.parametrize("name, dims", CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_the_encoder_restores_into_the_segmentation_model(name, dims):
    config = _config(name, dims)
    task = tasks.get_task(config, in_channels=IN_CHANNELS)
    pretext = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    seg = nnx.eval_shape(
        lambda: SegmentationModel(
            IN_CHANNELS,
            4,
            spatial_dims=dims,
            encoder=EncoderConfig.from_config(config.model),
            rngs=nnx.Rngs(0),
        )
    )
    ours = nnx.to_pure_dict(nnx.state(pretext.encoder, nnx.Param))
    theirs = nnx.to_pure_dict(nnx.state(seg.encoder, nnx.Param))
    assert _shapes(ours) == _shapes(theirs)
