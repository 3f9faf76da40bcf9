"""The paper's data-efficiency protocol: label fractions × repetitions × arms, then a report.

`config.mode='experiment'` runs it for one pretext task: for every repetition pretrain once, then
for every labelled fraction finetune each arm of `config.experiment.arms` ('pretrained',
'scratch', 'probe' and the controls 'random_warmup', 'random_probe', see `arms.SCHEDULES`) on
exactly the same cases. `config.mode='sweep'` (configs/sweep.py) runs it for every task of
`config.experiment.tasks` plus, once, the arms that do not depend on the task (`TASK_FREE_ARMS`),
with one shared set of split files, and writes one report:

    <workdir>/splits/split_<pct>pct_rep<r>.json   the labelled/val/test cases, shared by all methods
    <workdir>/<task>/rep<r>/checkpoints           pretraining of each task in repetition r
    <workdir>/<task>/runs/<pct>pct_rep<r>/finetune/<arm>/{checkpoints,predictions}, result.json
    <workdir>/baselines/runs/<pct>pct_rep<r>/finetune/<arm>/...   scratch, random_warmup,
                                                  random_probe (no pretraining)
    <workdir>/results.csv, results_paired.csv, results.md, results_<metric>.png,
    results_paired_<metric>.png                   (see `ssl3d_jax.report`)

Repetitions. Repetition r redraws everything that is random in a run: the labelled subsets (a
permutation of the training cases from `(config.seed, r)`, `data.fraction_splits`), the
pretraining seed and the finetuning seed (decoder / read-out / random-encoder init, data order,
dropout and augmentation keys), both `repetition_seed(config.seed, r) = config.seed + 1000 * r`
(so repetition 0 is the main command's run). Each repetition pretrains its own encoder, shared by
the fractions of that repetition. The test and validation cases are drawn from `config.seed` only
and stay the same in every repetition, so that per-case scores pair up across methods and
repetitions (`report.paired_differences`). The seeds are recorded in every result.json
(`seeds`).

Every finished (fraction, repetition, arm) leaves a `result.json`; a rerun of the same command
skips those, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time

import ml_collections

from ssl3d_jax import parallel, report, tasks
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.train import data as data_lib
from ssl3d_jax.train import arms as arms_lib
from ssl3d_jax.train import downstream, pretrain

log = logging.getLogger(__name__)

ARMS = arms_lib.ARMS
# Arms whose result does not depend on the pretext task (no restored encoder): a sweep runs
# them once, in <workdir>/baselines.
TASK_FREE_ARMS = tuple(a for a in ARMS if a not in arms_lib.RESTORED_ARMS)
# Sections a sweep shares with every task's own config (the task keeps its pretraining section:
# batch sizes and steps differ per task).
SHARED_SECTIONS = ("data", "model", "finetune", "experiment")
# Seed of repetition r: config.seed + REPETITION_SEED_STRIDE * r (see the module docstring).
REPETITION_SEED_STRIDE = 1000
BASELINES_DIR = "baselines"


def repetition_seed(seed: int, repetition: int) -> int:
    """The pretraining and finetuning seed of `repetition`: `seed + 1000 * repetition`.

    Within a run the seed is used as `seed` and `seed + 1` (pretraining: init key and data order;
    finetuning: `fold_in(key(seed), 1)` and data order `seed + 1`), so the stride keeps the
    repetitions' streams apart.
    """
    return int(seed) + REPETITION_SEED_STRIDE * int(repetition)


def method_name(task: str, arm: str) -> str:
    """Row label of a result: the task for its pretrained arm, 'scratch', '<task> probe',
    'random_warmup' or 'random probe'."""
    return {
        "pretrained": task,
        "scratch": "scratch",
        "probe": f"{task} probe",
        "random_warmup": "random_warmup",
        "random_probe": "random probe",
    }[arm]


def _check_arms(arms) -> None:
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise ConfigError(f"config.experiment.arms={tuple(arms)}: expected a subset of {ARMS}")


def with_seed(config, seed: int) -> ml_collections.ConfigDict:
    """A copy of `config` whose `seed` is `seed` (the repetition's; `config` is unchanged)."""
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.seed = int(seed)
    return out


def run_experiment(config, workdir: str, *, dataset=None, arms=None, mesh=None) -> list[dict]:
    """For every repetition: pretrain `config.task` (when an arm needs it) with the repetition's
    seed, then finetune every fraction × arm; writes the report of this task into `workdir` and
    returns the result rows."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    arms = tuple(config.experiment.arms if arms is None else arms)
    _check_arms(arms)
    dataset = data_lib.open_dataset(config) if dataset is None else dataset
    mesh = parallel.make_mesh() if mesh is None else mesh
    base = data_lib.base_split(config, dataset)  # test / val / train: from config.seed only
    splits_dir = config.experiment.splits_dir or os.path.join(workdir, "splits")
    splits = data_lib.fraction_splits(
        base,
        fractions=config.experiment.fractions,
        repetitions=config.experiment.repetitions,
        seed=config.seed,
    )
    fractions = sorted({f for f, _ in splits})
    needs_encoder = any(a in arms_lib.RESTORED_ARMS for a in arms)
    fixed_encoder = config.finetune.init_from
    if needs_encoder and fixed_encoder and config.experiment.repetitions > 1:
        log.warning(
            "config.finetune.init_from=%s: every repetition restores this one encoder, so the "
            "pretraining seed is not redrawn (the repetitions sample finetuning only)",
            fixed_encoder,
        )

    rows = []
    for rep in range(config.experiment.repetitions):
        seed = repetition_seed(config.seed, rep)
        rep_config = with_seed(config, seed)
        init_from, pretrain_seed = fixed_encoder, None
        if needs_encoder and not fixed_encoder:
            # Pretraining reads the training cases only: never a validation or test case.
            init_from = pretrain.run(
                rep_config,
                os.path.join(workdir, f"rep{rep}"),
                dataset,
                data_lib.pretraining_cases(dataset, base),
                mesh=mesh,
                val_cases=data_lib.select(dataset.cases, base["val"]),
            )
            pretrain_seed = seed
        for fraction in fractions:
            split = data_lib.load_or_write_split(splits_dir, splits[fraction, rep])
            run_dir = os.path.join(workdir, "runs", f"{fraction * 100:g}pct_rep{rep}")
            for arm in arms:
                restores = arm in arms_lib.RESTORED_ARMS
                seeds = {
                    "split": int(config.seed),  # test / val cases
                    "labeled_subset": [int(config.seed), rep],  # np.random.default_rng(...)
                    "pretrain": pretrain_seed if restores else None,
                    "finetune": seed,
                }
                result = _finetune_once(
                    rep_config,
                    run_dir,
                    arm,
                    split,
                    dataset,
                    init_from if restores else None,
                    mesh,
                    seeds=seeds,
                )
                rows.append(
                    {
                        "method": method_name(config.task, arm),
                        "task": None if arm in TASK_FREE_ARMS else config.task,
                        "arm": arm,
                        "fraction": fraction,
                        "repetition": rep,
                        "num_labeled": len(split["labeled"]),
                        "metrics": result["metrics"],
                        "val_metrics": result.get("val_metrics"),
                        "per_case": per_case_scores(result),
                        "seeds": result["seeds"],
                    }
                )
    _write_report(
        rows,
        workdir,
        title=f"{config.task}: test metrics vs labelled fraction",
        notes=_protocol_notes(config, dataset),
    )
    return rows


def per_case_scores(result: dict) -> dict:
    """{test case: {metric: value}} of a finetuning result: segmentation's `dice_per_case` (Dice
    and HD95 per region), classification's per-case correctness as 'accuracy' (QWK has no
    per-case value)."""
    if "dice_per_case" in result:
        return result["dice_per_case"]
    return {
        case: {"accuracy": float(p["pred"] == p["target"])}
        for case, p in result.get("per_case", {}).items()
    }


def _finetune_once(config, run_dir, arm, split, dataset, init_from, mesh, *, seeds) -> dict:
    path = os.path.join(run_dir, "finetune", arm, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        if result.get("seeds") != seeds:
            raise ConfigError(
                f"{path} was made with seeds {result.get('seeds')}, but this run would use "
                f"{seeds} (an older version, or another config.seed): use a new --workdir or "
                "delete the old results"
            )
        log.info("%s: done before, %s", path, _fmt(result["metrics"]))
        return result
    t0 = time.time()
    result = downstream.run(config, run_dir, arm, split, dataset, init_from=init_from, mesh=mesh)
    result["wall_time_s"] = time.time() - t0
    result["arm"] = arm
    result["fraction"] = split["fraction"]
    result["repetition"] = split["repetition"]
    result["seeds"] = seeds
    result["labeled"] = list(split["labeled"])
    result["val"] = list(split["val"])
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
    """The config file of registered task `task` (`ssl3d_jax.tasks.config_file`) at this config's
    size and dimensionality, with its shared sections (data, model, finetune, experiment) and
    seed."""
    tc = tasks.task_config(task, f"{config.size},{config.data.spatial_dims}d")
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
    names = tasks.expand(config.experiment.tasks, key="config.experiment.tasks")
    if not names:
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
    task_arms = tuple(a for a in arms if a not in TASK_FREE_ARMS)
    free_arms = tuple(a for a in arms if a in TASK_FREE_ARMS)
    for task in names:
        if not task_arms:
            break
        log.info("=== sweep: %s (%s) ===", task, ", ".join(task_arms))
        tc = task_config(task, config)
        rows += run_experiment(
            tc, os.path.join(workdir, task), dataset=dataset, arms=task_arms, mesh=mesh
        )
    if free_arms:
        # The from-scratch baseline and the random-encoder controls do not depend on the pretext
        # task (nothing is restored): run them once.
        log.info("=== sweep: %s ===", ", ".join(free_arms))
        tc = task_config(names[0], config)
        rows += run_experiment(
            tc, os.path.join(workdir, BASELINES_DIR), dataset=dataset, arms=free_arms, mesh=mesh
        )
    _write_report(
        rows,
        workdir,
        title=f"Test metrics vs labelled fraction ({dataset.name}, {config.size} size)",
        notes=_sweep_notes(config, dataset, names),
    )
    return rows


def _sweep_notes(config, dataset, names) -> str:
    return f"Tasks: {', '.join(names)}. " + _protocol_notes(config, dataset)


def _protocol_notes(config, dataset) -> str:
    reps = config.experiment.repetitions
    return (
        f"Dataset: {dataset.name} ({dataset.layout} layout at {dataset.root}), "
        f"{len(dataset.cases)} cases: {config.data.num_test} held out for testing, "
        f"{config.data.num_val} for validation (scored in each result.json's "
        "`val_metrics`, never pretrained on), the rest for training (pretraining and the "
        f"labelled subsets). Arms: {', '.join(config.experiment.arms)}; {reps} repetition(s) "
        "per fraction, repetition r with its own labelled subsets and its own pretraining and "
        f"finetuning seed {config.seed} + {REPETITION_SEED_STRIDE}·r; the test cases are the "
        f"same in every repetition. {config.finetune.num_steps} finetuning steps per run "
        "whatever the fraction. Plots: mean over (repetition, test case) with a bootstrap 95% "
        "CI (`ssl3d_jax.report`)."
    )
