"""A checkpoint written before the one-Task-registry restructure (issue 15) still restores: its
encoder into today's finetuning model, and every parameter into today's pretext model.

`tests/data/rpl_smoke_1ed6c24/` is the `checkpoints` folder of
`launch/main.py --config=configs/rpl.py:smoke --config.mode=pretrain --config.pretrain.num_steps=2`
run at commit 1ed6c24 (the main branch before the restructure), on the built-in phantom."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
from flax import nnx
from launch_util import ROOT

from ssl3d_jax import tasks
from ssl3d_jax.checkpoint import Checkpointer, restore_encoder
from ssl3d_jax.train import finetune

OLD = ROOT / "tests" / "data" / "rpl_smoke_1ed6c24"


def _shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(np.dtype(x.dtype))), tree)


def test_a_checkpoint_written_before_the_restructure_restores(tmp_path):
    ckpt = shutil.copytree(OLD, tmp_path / "checkpoints")  # orbax may tidy the folder it opens
    meta = json.loads((ckpt / "2" / "meta" / "metadata").read_text())
    assert meta["task"] == "rpl" and meta["input"]["in_channels"] == 4
    config = tasks.task_config("rpl", "smoke")

    # Its encoder into today's segmentation model: every leaf, nothing left over.
    model = finetune.build_model(config, in_channels=4, num_classes=4)(nnx.Rngs(0))
    fresh = nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))
    encoder, report = restore_encoder(ckpt, fresh)
    assert report["loaded"] and not report["missing"] and not report["unused"]

    # Every parameter into today's RPL model, the same tree and the same values.
    task = tasks.get_task(config, in_channels=4)
    abstract = nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))), nnx.Param)
    )
    with Checkpointer(ckpt, create=False) as c:
        step = c.latest_step()
        assert _shapes(c.param_shapes(step)) == _shapes(abstract)
        params = c.restore_params(
            step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract)
        )
    jax.tree.map(np.testing.assert_array_equal, params["encoder"], encoder)
    assert any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(params["head"]))
