"""One entry point for finetuning an arm: the runner follows the dataset's kind.

Segmentation data goes to `finetune.run` (3D / 2D U-Net), classification data (the images
layout) to `classify.run`. Callers (`run.py`, `experiment.py`) use this, so that neither runner
imports the other.
"""

from __future__ import annotations

from ssl3d_jax.train import classify, finetune

__all__ = ["run"]


def run(config, workdir: str, arm: str, splits: dict, dataset, *, init_from=None, mesh=None):
    """`classify.run` for classification datasets, `finetune.run` otherwise (same arguments and
    result conventions; see there)."""
    runner = classify.run if dataset.kind == "classification" else finetune.run
    return runner(config, workdir, arm, splits, dataset, init_from=init_from, mesh=mesh)
