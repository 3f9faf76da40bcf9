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

import numpy as np

from ssl3d_jax.data import brats, phantom
from ssl3d_jax.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_root(config) -> pathlib.Path:
    """`config.data.root`, or the built-in phantom dataset (generated on first use)."""
    if config.data.root:
        return pathlib.Path(config.data.root).expanduser()
    p = config.data.phantom
    root = phantom.default_dataset_root(num_cases=p.num_cases, seed=p.seed)
    log.info("config.data.root not set: using the built-in phantom dataset at %s", root)
    return root


def load_cases(root: pathlib.Path, config) -> list:
    return brats.find_cases(root, modalities=tuple(config.data.modalities))


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
    """Write JSON atomically: a reader never sees a half-written file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def select(cases: list, names: list[str]) -> list:
    by_name = {c.name: c for c in cases}
    return [by_name[n] for n in names]
