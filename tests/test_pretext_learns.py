"""Every pretext task learns at its default settings: a short pretraining at small size on the
phantom ends clearly below chance (the window-mean loss of its last steps ≤ 0.8 × chance).

The default run once sat at chance for 1000 steps (RPL at lr 1e-3: loss ln 26 throughout) and was
finetuned anyway; this is the test that would have caught it. Learning rates and batch sizes are
each task's own config values at `smoke` size (the same learning rates as at `default` size,
chosen by launch/pretext_lr_search.py on the validation split); only the number of steps is set
here, to what a short run needs.

RPL, Jigsaw and CPC do NOT learn yet once their grids sit at a random origin (the shortcut audit,
docs/results/shortcut_audit.md): with the grid fixed at the origin they learned the patches'
position from the head outline (RPL loss 0.14 = 0.04 × chance), with the shortcut removed they
stay at chance at every learning rate tried (docs/results/pretext_lr_search.md). They are strict
expected failures here, so that the day one of them learns this test says so.
"""

from __future__ import annotations

import importlib
import json

import pytest

from ssl3d_jax.data import phantom
from ssl3d_jax.train import data as data_lib
from ssl3d_jax.train import pretrain

_AT_CHANCE = pytest.mark.xfail(
    strict=True,
    reason="at chance without the position shortcut (issue 14 open; pretext_lr_search.md)",
)
TASKS = (
    pytest.param("rpl", marks=_AT_CHANCE),
    "rotation",
    pytest.param("jigsaw", marks=_AT_CHANCE),
    pytest.param("cpc", marks=_AT_CHANCE),
    "exemplar",
)
# Steps of the short run per task (smoke-size models take milliseconds per step).
STEPS = {"rpl": 240, "rotation": 240, "jigsaw": 240, "cpc": 160, "exemplar": 160}
MAX_RATIO = 0.8


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    phantom.write_brats_phantom(root, num_cases=4, shape=(30, 34, 28), seed=5)
    return root


@pytest.mark.parametrize("task", TASKS)
def test_default_pretext_loss_falls_below_chance(task, data_root, tmp_path):
    config = importlib.import_module(f"configs.{task}").get_config("smoke")
    config.mode = "pretrain"
    config.data.root = str(data_root)
    config.tensorboard = False
    steps = STEPS[task]
    config.pretrain.num_steps = steps
    config.pretrain.log_every = steps // 4
    config.pretrain.checkpoint_every = steps
    config.pretrain.knn_every = 0
    dataset = data_lib.open_dataset(config)
    workdir = tmp_path / "work"
    pretrain.run(config, str(workdir), dataset, list(dataset.cases))
    summary = json.loads((workdir / pretrain.SUMMARY_FILE).read_text())
    assert summary["near_chance"] is False, summary
    assert summary["final_loss"] <= MAX_RATIO * summary["chance_loss"], (
        f"{task}: final window loss {summary['final_loss']:.4g} vs chance "
        f"{summary['chance_loss']:.4g} at lr {config.pretrain.learning_rate:g}"
    )
