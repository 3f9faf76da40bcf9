"""Pretext-task pretraining: `run(config, workdir, cases)` → `<workdir>/checkpoints`.

Resumes from the latest checkpoint in the workdir (state, RNG and data-iterator position), and
refuses a workdir whose checkpoints come from another task.
"""

from __future__ import annotations

import logging
import os

import jax
import optax

from ssl3d_jax import parallel, tasks
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.errors import CheckpointError
from ssl3d_jax.train import common
from ssl3d_jax.train import step as step_lib

log = logging.getLogger(__name__)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def run(config, workdir: str, cases: list, *, mesh=None) -> str:
    """Pretrain the encoder of `config.task` on `cases` (labels unused).

    Returns:
      the absolute checkpoint folder.
    """
    cfg = config.pretrain
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_size(cfg.batch_size, mesh, "config.pretrain.batch_size")
    common.log_devices(mesh)
    in_channels = len(config.data.modalities)
    task = tasks.get_task(config, in_channels=in_channels)
    ckpt_dir = checkpoint_dir(workdir)
    meta = common.run_meta(config, phase="pretrain")
    meta["task_input"] = task.input_spec

    with Checkpointer(ckpt_dir, max_to_keep=cfg.keep_checkpoints) as ckpt:
        latest = ckpt.latest_step()
        if latest is not None:
            found = ckpt.read_meta(latest).get("task")
            if found != config.task:
                raise CheckpointError(
                    f"{ckpt_dir} holds checkpoints of task {found!r}, not {config.task!r}; use "
                    "another --workdir"
                )
            if latest >= cfg.num_steps:
                log.info("Pretraining already complete (step %d) in %s", latest, ckpt_dir)
                return ckpt_dir

        key_init, key_run = jax.random.split(jax.random.key(config.seed))
        graphdef, params = step_lib.init_params(task.build_model, key_init, mesh)
        tx = optax.adam(cfg.learning_rate)
        state = step_lib.create_train_state(tx, params, key_run, mesh)
        batches = common.train_iterator(
            config, cases, batch_size=cfg.batch_size, with_label=False, seed=config.seed
        )
        if latest is not None:
            log.info("Resuming pretraining from step %d in %s", latest, ckpt_dir)
            state = ckpt.restore(latest, common.abstract_like(state), data_iter=batches)

        def loss_fn(model, batch, key):
            return task.loss(model, batch["image"], key)

        train_step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, loss_fn, tx), mesh)
        common.fit(
            phase="pretrain",
            state=state,
            step_fn=lambda s: train_step,
            batches=batches,
            keys=("image",),
            cfg=cfg,
            workdir=workdir,
            ckpt=ckpt,
            meta=meta,
            mesh=mesh,
        )
    return ckpt_dir
