"""From `config.data` to cases and splits: which scans pretrain, which are labelled, which test.

Splits are drawn from the sorted case names with `config.seed`, never from file-system order (the
original's `os.listdir` order made its splits machine-dependent), and are written to
`<workdir>/splits.json` so that every arm and every rerun uses the same cases.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import jax
import numpy as np

from ssl3d_jax.data import datasets, phantom
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.fileio import atomic_write

log = logging.getLogger(__name__)


def resolve_root(config) -> pathlib.Path:
    """`config.data.root`, or the built-in phantom dataset (generated on first use)."""
    if config.data.root:
        return pathlib.Path(config.data.root).expanduser()
    p = config.data.phantom
    root = phantom.default_dataset_root(num_cases=p.num_cases, seed=p.seed)
    log.info("config.data.root not set: using the built-in phantom dataset at %s", root)
    return root


def open_dataset(config):
    """The dataset of `config.data` (layout detected from the root unless `config.data.layout`)."""
    root = resolve_root(config)
    modalities = config.data.modalities
    return datasets.open_dataset(
        root,
        layout=config.data.layout,
        modalities=tuple(modalities) if modalities else None,
        labels_csv=config.data.labels_csv,
    )


def base_split(config, dataset) -> dict:
    """Test / train / labelled split of `dataset` from `config.seed` (see `make_splits`).

    An unlabelled dataset (a folder of NIfTI scans) only pretrains: every scan is 'train'.
    """
    names = [c.name for c in dataset.cases]
    if dataset.kind == "unlabelled":
        if config.mode != "pretrain":
            raise ConfigError(
                f"{dataset.root}: {dataset.layout} data has no labels, so config.mode="
                f"{config.mode!r} cannot finetune on it; use config.mode='pretrain' here and "
                "finetune on a labelled dataset with config.finetune.init_from"
            )
        return {"test": [], "train": sorted(names), "labeled": []}
    num_labeled = config.finetune.num_labeled
    if config.mode in ("experiment", "sweep"):
        num_labeled = -1  # the labelled sets come from config.experiment.fractions
    return make_splits(
        names, num_test=config.data.num_test, num_labeled=num_labeled, seed=config.seed
    )


def make_splits(names: list[str], *, num_test: int, num_labeled: int, seed: int) -> dict:
    """Deterministic split of case names.

    Returns:
      {'test': [...], 'train': [...], 'labeled': [...]}: `train` (all non-test cases) is used
      unlabelled for pretraining; `labeled` ⊆ `train` is the finetuning set.
    """
    names = sorted(names)
    if not 0 < num_test < len(names):
        raise ConfigError(
            f"config.data.num_test={num_test}: need 0 < num_test < the number of "
            f"cases ({len(names)})"
        )
    perm = np.random.default_rng(seed).permutation(len(names))
    test = sorted(names[i] for i in perm[:num_test])
    train_order = [names[i] for i in perm[num_test:]]
    if num_labeled == -1:
        num_labeled = len(train_order)
    if not 0 < num_labeled <= len(train_order):
        raise ConfigError(
            f"config.finetune.num_labeled={num_labeled}: need 1..{len(train_order)} "
            "(the non-test cases) or -1 for all"
        )
    return {
        "test": test,
        "train": sorted(train_order),
        "labeled": sorted(train_order[:num_labeled]),
    }


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically: a reader never sees a half-written file.

    In a multi-process run only process 0 writes: every process holds the same object (splits,
    results), and the workdir is shared (orbax checkpoints need that anyway).
    """
    if jax.process_index() != 0:
        return
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def select(cases: list, names: list[str]) -> list:
    by_name = {c.name: c for c in cases}
    return [by_name[n] for n in names]


def fraction_splits(
    base: dict, *, fractions, repetitions: int, seed: int
) -> dict[tuple[float, int], dict]:
    """Labelled subsets of `base['train']` for the paper's data-efficiency protocol.

    Repetition `r` draws one permutation of the sorted training names from `(seed, r)`; the first
    `max(1, round(f · N))` names are the labelled set of fraction `f`, so the sets of one
    repetition are nested (5% ⊂ 10% ⊂ …) and every method sees exactly the same cases. (The
    original took the first files of `os.listdir`, the same subset in every repetition and a
    different one on every machine.)

    Returns:
      {(fraction, repetition): {'test', 'train', 'labeled', 'fraction', 'repetition', 'seed'}}.
    """
    train = sorted(base["train"])
    out = {}
    for f in fractions:
        if not 0.0 < float(f) <= 1.0:
            raise ConfigError(f"config.experiment.fractions: {f} is not a fraction in (0, 1]")
    for r in range(repetitions):
        perm = np.random.default_rng([seed, r]).permutation(len(train))
        for f in fractions:
            n = max(1, int(round(float(f) * len(train))))
            out[(float(f), r)] = {
                "test": list(base["test"]),
                "train": train,
                "labeled": sorted(train[i] for i in perm[:n]),
                "fraction": float(f),
                "repetition": r,
                "seed": seed,
            }
    return out


def split_filename(fraction: float, repetition: int) -> str:
    return f"split_{fraction * 100:g}pct_rep{repetition}.json"


def load_or_write_split(splits_dir: str, split: dict) -> dict:
    """The split file of (fraction, repetition) in `splits_dir`: written on first use, and on
    later use checked against what this config would draw (a changed dataset or seed must not
    silently compare methods on different cases)."""
    os.makedirs(splits_dir, exist_ok=True)
    path = os.path.join(splits_dir, split_filename(split["fraction"], split["repetition"]))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != split:
            raise ConfigError(
                f"{path}: this split file differs from the split this config draws (other "
                "data, seed or num_test?); use another config.experiment.splits_dir or delete it"
            )
        return saved
    write_json(path, split)
    return split


def pretraining_cases(dataset, split: dict) -> list:
    """The training cases of `split`, plus the dataset's unlabelled cases (e.g. Decathlon test
    scans): self-supervised pretraining needs no labels, and never sees a test case."""
    return select(dataset.cases, split["train"]) + list(dataset.unlabelled_cases)
