"""The paper's comparison: every pretext task plus from-scratch, over labelled fractions.

Run:
    python launch/main.py --config=configs/sweep.py --workdir=sweep       # phantom, CPU, ~1 h
    python launch/main.py --config=configs/sweep.py:smoke --workdir=/tmp/s  # seconds-scale (CI)
    python launch/main.py --config=configs/sweep.py:paper --workdir=runs/brats \\
        --config.data.root=/data/BraTS2021_Training

Each task is pretrained with its own `configs/<task>.py` (same size and dimensionality); the
sections `data`, `model`, `finetune` and `experiment` of this config override those of every task,
so that all methods are finetuned and tested identically, on the same split files
(`<workdir>/splits`). Results: `<workdir>/results.{csv,md}` and `results_<metric>.png`; see
`ssl3d_jax/experiment.py`.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.base_config(arg)
    config.task = "sweep"
    config.mode = "sweep"
    return config
