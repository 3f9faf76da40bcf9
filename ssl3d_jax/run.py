"""The main job: pretrain a pretext task, then finetune and evaluate each arm; results.json.

Other modes: 'preprocess' (fill the preprocessed-array cache), 'experiment' and 'sweep' (the
paper's label-fraction protocol, `ssl3d_jax.experiment`), 'visualize' (PNG figures of the tasks'
inputs, predictions and curves under <workdir>/figures, `ssl3d_jax.visualize`).

`run(config, workdir)` is what `launch/main.py` calls; it is importable for notebooks.
"""

from __future__ import annotations

import logging
import os
import time

from ssl3d_jax import experiment, parallel, tasks
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.unet import EncoderConfig
from ssl3d_jax.train import common, downstream, pretrain
from ssl3d_jax.train import data as data_lib

log = logging.getLogger(__name__)

MODES = (
    "pretrain_finetune",
    "pretrain",
    "finetune",
    "preprocess",
    "experiment",
    "sweep",
    "visualize",
)


TRAINING_MODES = ("pretrain_finetune", "pretrain", "finetune", "experiment", "sweep")


def run(config, workdir: str) -> dict | list | None:
    """Run `config.mode` in `workdir`.

    Returns:
      the results dict when finetuning ran ('pretrain_finetune', 'finetune'); the result rows
      for 'experiment' and 'sweep'; the written figure paths for 'visualize'; None otherwise.
    """
    # Before anything touches the devices: with several processes, JAX must know them all.
    parallel.initialize_distributed(config.distributed)
    if config.mode not in MODES:
        raise ConfigError(f"config.mode={config.mode!r}: expected one of {MODES}")
    workdir = os.path.abspath(workdir)
    if config.mode in TRAINING_MODES:
        # The model settings (e.g. conv_impl='onednn' where the extension is missing) fail here,
        # before any data is read or the workdir is touched.
        EncoderConfig.from_config(config.model)
    if config.mode == "sweep":
        return experiment.run_sweep(config, workdir)
    dataset = data_lib.open_dataset(config)
    log.info(
        "Data: %s (%s layout, %s, %d cases, channels %s) at %s",
        dataset.name,
        dataset.layout,
        dataset.kind,
        len(dataset.cases),
        ", ".join(dataset.channels),
        dataset.root,
    )
    if config.mode == "preprocess":
        common.preprocessed_source(config, dataset, dataset.cases, with_label=True)
        log.info("Preprocessed %d cases into %s", len(dataset.cases), common.cache_root(config))
        return None
    if config.mode == "visualize":
        from ssl3d_jax import visualize  # matplotlib is imported only for this mode

        return visualize.run(config, workdir, dataset=dataset)
    if not config.task:
        raise ConfigError("config.task is empty: use a task config such as configs/rpl.py")
    if config.mode in ("pretrain_finetune", "pretrain", "experiment"):
        # A task that cannot run at config.data.size fails before the workdir is touched.
        tasks.get_task(config, in_channels=dataset.in_channels)
    os.makedirs(workdir, exist_ok=True)
    if config.mode == "experiment":
        return experiment.run_experiment(config, workdir, dataset=dataset)
    t0 = time.time()
    splits = data_lib.base_split(config, dataset)
    data_lib.write_json(os.path.join(workdir, "splits.json"), splits)  # process 0 only
    log.info(
        "%d cases: %d train (%d labelled for finetuning), %d validation, %d test",
        len(dataset.cases),
        len(splits["train"]),
        len(splits["labeled"]),
        len(splits["val"]),
        len(splits["test"]),
    )
    mesh = parallel.make_mesh()

    if config.mode in ("pretrain_finetune", "pretrain"):
        # The training cases only; the pretext loss is also measured on the validation cases.
        pretrain.run(
            config,
            workdir,
            dataset,
            data_lib.pretraining_cases(dataset, splits),
            mesh=mesh,
            val_cases=data_lib.select(dataset.cases, splits["val"]),
        )
    if config.mode == "pretrain":
        return None

    init_from = config.finetune.init_from or pretrain.checkpoint_dir(workdir)
    results = {
        "task": config.task,
        "data_root": str(dataset.root),
        "dataset": {"name": dataset.name, "layout": dataset.layout},
        "splits": splits,
        "arms": {},
    }
    # The pretraining's final pretext metrics vs chance (pretrain_summary.json of the workdir
    # that holds the checkpoint folder), so that results from a run that learned nothing show it.
    pretext = pretrain.read_summary(os.path.dirname(os.path.abspath(init_from)))
    if pretext is not None:
        results["pretext"] = pretext
    for arm in config.finetune.arms:
        results["arms"][arm] = downstream.run(
            config, workdir, arm, splits, dataset, init_from=init_from, mesh=mesh
        )
    results["wall_time_s"] = time.time() - t0
    path = os.path.join(workdir, "results.json")
    data_lib.write_json(path, results)  # process 0 only
    if parallel.is_primary():
        log.info("Wrote %s", path)
    for arm, r in results["arms"].items():
        log.info("  %-10s " + "  ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items()), arm)
    return results
