"""The main job: pretrain a pretext task, then finetune and evaluate each arm; results.json.

`run(config, workdir)` is what `launch/main.py` calls; it is importable for notebooks.
"""

from __future__ import annotations

import logging
import os
import time

from ssl3d_jax import parallel
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.train import data as data_lib
from ssl3d_jax.train import finetune, pretrain

log = logging.getLogger(__name__)

MODES = ("pretrain_finetune", "pretrain", "finetune")


def run(config, workdir: str) -> dict | None:
    """Run `config.mode` in `workdir`; returns the results dict when finetuning ran."""
    if config.mode not in MODES:
        raise ConfigError(f"config.mode={config.mode!r}: expected one of {MODES}")
    if not config.task:
        raise ConfigError("config.task is empty: use a task config such as configs/rpl.py")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    root = data_lib.resolve_root(config)
    cases = data_lib.load_cases(root, config)
    splits = data_lib.make_splits(
        [c.name for c in cases],
        num_test=config.data.num_test,
        num_labeled=config.finetune.num_labeled,
        seed=config.seed,
    )
    data_lib.write_json(os.path.join(workdir, "splits.json"), splits)
    log.info(
        "%d cases: %d train (%d labelled for finetuning), %d test",
        len(cases),
        len(splits["train"]),
        len(splits["labeled"]),
        len(splits["test"]),
    )
    mesh = parallel.make_mesh()

    by_name = {c.name: c for c in cases}
    if config.mode in ("pretrain_finetune", "pretrain"):
        pretrain.run(config, workdir, [by_name[n] for n in splits["train"]], mesh=mesh)
    if config.mode == "pretrain":
        return None

    init_from = config.finetune.init_from or pretrain.checkpoint_dir(workdir)
    results = {
        "task": config.task,
        "data_root": str(root),
        "splits": splits,
        "arms": {},
    }
    for arm in config.finetune.arms:
        results["arms"][arm] = finetune.run(
            config, workdir, arm, splits, cases, init_from=init_from, mesh=mesh
        )
    results["wall_time_s"] = time.time() - t0
    path = os.path.join(workdir, "results.json")
    data_lib.write_json(path, results)
    log.info("Wrote %s", path)
    for arm, r in results["arms"].items():
        log.info("  %-10s " + "  ".join(f"{k} {v:.3f}" for k, v in r["dice_mean"].items()), arm)
    return results
