"""From `config.data` to cases and splits: which scans pretrain, which are labelled, which
validate, which test.

Splits are drawn from the sorted case names with `config.seed`, never from file-system order (the
original's `os.listdir` order made its splits machine-dependent), and are written to
`<workdir>/splits.json` so that every arm and every rerun uses the same cases:

  * 'test' (`config.data.num_test`): only scored, never used to choose anything;
  * 'val' (`config.data.num_val`): scored by every finetuning run (`val_metrics`) for choices
    such as the probe learning rate, and held out of pretraining (so that a pretext loss can be
    measured on unseen cases);
  * 'train': every other case; pretraining reads these (unlabelled), and the labelled sets are
    drawn from them;
  * 'labeled' ⊆ 'train': the finetuning set.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import jax
import numpy as np

from ssl3d_jax.data import datasets, phantom
from ssl3d_jax.errors import ConfigError, DataError
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
    """Test / val / train / labelled split of `dataset` from `config.seed` (see `make_splits`).

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
        return {"test": [], "val": [], "train": sorted(names), "labeled": []}
    num_labeled = config.finetune.num_labeled
    if config.mode in ("experiment", "sweep"):
        num_labeled = -1  # the labelled sets come from config.experiment.fractions
    return make_splits(
        names,
        num_test=config.data.num_test,
        num_val=config.data.num_val,
        num_labeled=num_labeled,
        seed=config.seed,
    )


def make_splits(
    names: list[str], *, num_test: int, num_labeled: int, seed: int, num_val: int = 0
) -> dict:
    """Deterministic split of case names.

    One permutation of the sorted names from `seed`: its first `num_test` names are the test
    cases (the same as before validation splits existed), the next `num_val` the validation
    cases, the rest the training cases.

    Returns:
      {'test': [...], 'val': [...], 'train': [...], 'labeled': [...]}, pairwise disjoint except
      `labeled` ⊆ `train`: `train` (the non-test, non-validation cases) is used unlabelled for
      pretraining; `labeled` is the finetuning set.
    """
    names = sorted(names)
    if not 0 < num_test < len(names):
        raise ConfigError(
            f"config.data.num_test={num_test}: need 0 < num_test < the number of "
            f"cases ({len(names)})"
        )
    if not 0 <= num_val < len(names) - num_test:
        raise ConfigError(
            f"config.data.num_val={num_val}: need 0 <= num_val < {len(names) - num_test} (the "
            f"{len(names)} cases less config.data.num_test={num_test}, keeping at least one "
            "training case)"
        )
    perm = np.random.default_rng(seed).permutation(len(names))
    test = sorted(names[i] for i in perm[:num_test])
    val = sorted(names[i] for i in perm[num_test : num_test + num_val])
    train_order = [names[i] for i in perm[num_test + num_val :]]
    if num_labeled == -1:
        num_labeled = len(train_order)
    if not 0 < num_labeled <= len(train_order):
        raise ConfigError(
            f"config.finetune.num_labeled={num_labeled}: need 1..{len(train_order)} "
            "(the non-test, non-validation cases) or -1 for all"
        )
    return {
        "test": test,
        "val": val,
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


def select(
    cases: list, names: list[str], what: str = "selected", where: str = "the dataset"
) -> list:
    """The cases named `names`, in that order; a `DataError` lists (up to five of) those missing."""
    by_name = {c.name: c for c in cases}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise DataError(f"{what} cases {missing[:5]} are not in {where} ({len(by_name)} cases)")
    return [by_name[n] for n in names]


def fraction_splits(
    base: dict, *, fractions, repetitions: int, seed: int
) -> dict[tuple[float, int], dict]:
    """Labelled subsets of `base['train']` for the paper's data-efficiency protocol.

    Repetition `r` draws one permutation of the sorted training names from `(seed, r)`; the first
    `max(1, round(f · N))` names are the labelled set of fraction `f`, so the sets of one
    repetition are nested (5% ⊂ 10% ⊂ …) and every method sees exactly the same cases. (The
    original took the first files of `os.listdir`, the same subset in every repetition and a
    different one on every machine.) The test and validation cases are those of `base` in every
    repetition, so that per-case scores pair up across repetitions.

    Returns:
      {(fraction, repetition): {'test', 'val', 'train', 'labeled', 'fraction', 'repetition',
      'seed'}}.
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
                "val": list(base.get("val", [])),
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
        if "val" not in saved:
            raise ConfigError(
                f"{path}: this split file was written by an older version without a validation "
                "split (config.data.num_val); its methods were compared without one. Use a new "
                "--workdir (or config.experiment.splits_dir), or delete the old split files"
            )
        if saved != split:
            raise ConfigError(
                f"{path}: this split file differs from the split this config draws (other "
                "data, seed, num_test or num_val?); use another config.experiment.splits_dir "
                "or delete it"
            )
        return saved
    write_json(path, split)
    return split


def pretraining_cases(dataset, split: dict) -> list:
    """The training cases of `split`, plus the dataset's unlabelled cases (e.g. Decathlon test
    scans): self-supervised pretraining needs no labels, and never sees a test or validation
    case."""
    return select(dataset.cases, split["train"]) + list(dataset.unlabelled_cases)
