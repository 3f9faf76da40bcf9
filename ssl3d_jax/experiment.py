"""The paper's data-efficiency protocol: label fractions × repetitions × arms, then a report.

`config.mode='experiment'` runs it for one pretext task: pretrain once, then for every labelled
fraction and repetition finetune each arm of `config.experiment.arms` ('pretrained', 'scratch',
'probe') on exactly the same cases. `config.mode='sweep'` (configs/sweep.py) runs it for every task
of `config.experiment.tasks` plus one from-scratch baseline, with one shared set of split files,
and writes one report:

    <workdir>/splits/split_<pct>pct_rep<r>.json   the labelled/test cases, shared by all methods
    <workdir>/<task>/checkpoints                  pretraining of each task
    <workdir>/<task>/runs/<pct>pct_rep<r>/finetune/<arm>/{checkpoints,predictions}, result.json
    <workdir>/results.csv, results.md, results_<metric>.png

Every finished (fraction, repetition, arm) leaves a `result.json`; a rerun of the same command
skips those, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time

import ml_collections

from ssl3d_jax import parallel, report
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.train import data as data_lib
from ssl3d_jax.train import finetune, pretrain

log = logging.getLogger(__name__)

ARMS = ("pretrained", "scratch", "probe")
# Sections a sweep shares with every task's own config (the task keeps its pretraining section:
# batch sizes and steps differ per task).
SHARED_SECTIONS = ("data", "model", "finetune", "experiment")


def method_name(task: str, arm: str) -> str:
    """Row label of a result: the task for its pretrained arm, 'scratch', or '<task> probe'."""
    return {"pretrained": task, "scratch": "scratch", "probe": f"{task} probe"}[arm]


def _check_arms(arms) -> None:
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ConfigError(f"config.experiment.arms={tuple(arms)}: expected a subset of {ARMS}")


def run_experiment(config, workdir: str, *, dataset=None, arms=None, mesh=None) -> list[dict]:
    """Pretrain `config.task` (when an arm needs it), then finetune every fraction × repetition ×
    arm; writes the report of this task into `workdir` and returns the result rows."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    arms = tuple(config.experiment.arms if arms is None else arms)
    _check_arms(arms)
    dataset = data_lib.open_dataset(config) if dataset is None else dataset
    mesh = parallel.make_mesh() if mesh is None else mesh
    base = data_lib.base_split(config, dataset)
    splits_dir = config.experiment.splits_dir or os.path.join(workdir, "splits")
    splits = data_lib.fraction_splits(
        base,
        fractions=config.experiment.fractions,
        repetitions=config.experiment.repetitions,
        seed=config.seed,
    )
    needs_encoder = any(a in ("pretrained", "probe") for a in arms)
    init_from = config.finetune.init_from
    if needs_encoder and not init_from:
        init_from = pretrain.run(
            config, workdir, dataset, data_lib.pretraining_cases(dataset, base), mesh=mesh
        )

    rows = []
    for (fraction, rep), split in sorted(splits.items()):
        split = data_lib.load_or_write_split(splits_dir, split)
        run_dir = os.path.join(workdir, "runs", f"{fraction * 100:g}pct_rep{rep}")
        for arm in arms:
            result = _finetune_once(config, run_dir, arm, split, dataset, init_from, mesh)
            rows.append(
                {
                    "method": method_name(config.task, arm),
                    "task": config.task,
                    "arm": arm,
                    "fraction": fraction,
                    "repetition": rep,
                    "num_labeled": len(split["labeled"]),
                    "metrics": result["metrics"],
                }
            )
    _write_report(rows, workdir, title=f"{config.task}: test metrics vs labelled fraction")
    return rows


def _finetune_once(config, run_dir, arm, split, dataset, init_from, mesh) -> dict:
    path = os.path.join(run_dir, "finetune", arm, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        log.info("%s: done before, %s", path, _fmt(result["metrics"]))
        return result
    t0 = time.time()
    result = finetune.run(config, run_dir, arm, split, dataset, init_from=init_from, mesh=mesh)
    result["wall_time_s"] = time.time() - t0
    result["labeled"] = list(split["labeled"])
    result["test"] = list(split["test"])
    data_lib.write_json(path, result)
    return result


def _fmt(m: dict) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float))


def _write_report(rows, workdir, *, title, notes="") -> dict:
    metric_names = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    if not parallel.is_primary():  # every process has the rows; one writes them
        return {}
    paths = report.write_report(rows, workdir, metrics=metric_names, title=title, notes=notes)
    log.info("Wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths


def task_config(task: str, config) -> ml_collections.ConfigDict:
    """`configs/<task>.py` at the sweep's size and dimensionality, with the sweep's shared
    sections (data, model, finetune, experiment) and seed."""
    try:
        module = importlib.import_module(f"configs.{task}")
    except ImportError as e:
        raise ConfigError(
            f"config.experiment.tasks: no config configs/{task}.py for task {task!r} ({e})"
        ) from None
    arg = f"{config.size},{config.data.spatial_dims}d"
    tc = module.get_config(arg)
    with tc.unlocked():
        for section in SHARED_SECTIONS:
            tc[section] = ml_collections.ConfigDict(config[section].to_dict())
        tc.seed = config.seed
        tc.mode = "experiment"
    return tc


def run_sweep(config, workdir: str) -> list[dict]:
    """Every task of `config.experiment.tasks` and one from-scratch baseline, on shared splits.

    Returns the rows of `<workdir>/results.csv`.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    tasks = tuple(config.experiment.tasks)
    if not tasks:
        raise ConfigError("config.experiment.tasks is empty: name at least one pretext task")
    arms = tuple(config.experiment.arms)
    _check_arms(arms)
    with config.unlocked():
        config.experiment.splits_dir = config.experiment.splits_dir or os.path.join(
            workdir, "splits"
        )
    dataset = data_lib.open_dataset(config)
    mesh = parallel.make_mesh()
    rows = []
    task_arms = tuple(a for a in arms if a != "scratch")
    for task in tasks:
        if not task_arms:
            break
        log.info("=== sweep: %s (%s) ===", task, ", ".join(task_arms))
        tc = task_config(task, config)
        rows += run_experiment(
            tc, os.path.join(workdir, task), dataset=dataset, arms=task_arms, mesh=mesh
        )
    if "scratch" in arms:
        # The from-scratch baseline does not depend on the pretext task: run it once.
        log.info("=== sweep: scratch ===")
        tc = task_config(tasks[0], config)
        rows += run_experiment(
            tc, os.path.join(workdir, "scratch"), dataset=dataset, arms=("scratch",), mesh=mesh
        )
    _write_report(
        rows,
        workdir,
        title=f"Test metrics vs labelled fraction ({dataset.name}, {config.size} size)",
        notes=_sweep_notes(config, dataset, tasks),
    )
    return rows


def _sweep_notes(config, dataset, tasks) -> str:
    return (
        f"Dataset: {dataset.name} ({dataset.layout} layout at {dataset.root}), "
        f"{len(dataset.cases)} cases, {config.data.num_test} held out for testing. "
        f"Tasks: {', '.join(tasks)}; arms: {', '.join(config.experiment.arms)}; "
        f"{config.experiment.repetitions} repetition(s) per fraction; "
        f"{config.finetune.num_steps} finetuning steps per run whatever the fraction. "
        "Cells: mean ± 95% CI half-width over repetitions (t distribution)."
    )
