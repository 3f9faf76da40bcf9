"""A pretext task of one's own, added as README "Adding a task" says: one task module and one
config file in a folder outside the repository, registered through `$SSL3D_JAX_TASKS`, and no
other file changed. The example is `docs/examples/flip_axis/` (flip-axis prediction); the test
copies its two files into a temporary folder and runs `--list`, pretraining + finetuning, the
visualize mode and the sweep on it through `launch/main.py`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from launch_util import ROOT, run_main
from PIL import Image

from ssl3d_jax import experiment, tasks

EXAMPLE = ROOT / "docs" / "examples" / "flip_axis"
FAST = ["--config.pretrain.knn_every=0", "--config.finetune.arms=('pretrained',)"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The two files in a fresh folder, and the environment that registers the task."""
    folder = tmp_path_factory.mktemp("my_tasks")
    for name in ("flip_axis.py", "flip_axis_config.py"):
        shutil.copy(EXAMPLE / name, folder / name)
    env = {tasks.ENV_VAR: str(folder / "flip_axis.py")}
    return folder, env, tmp_path_factory.getbasetemp() / "shared_cache"


@pytest.fixture
def registered(plugin, monkeypatch):
    """The task registered in this process too, for the rest of this test only."""
    tasks.registry()  # the built-in tasks, in the registry that is restored afterwards
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    monkeypatch.setattr(tasks, "_LOADED", set(tasks._LOADED))
    for key, value in plugin[1].items():
        monkeypatch.setenv(key, value)
    return plugin


@pytest.mark.slow
def test_list_names_the_task_and_its_config(plugin):
    folder, env, cache = plugin
    proc = run_main(["--list"], cache, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    configs_part, tasks_part = proc.stdout.split("Pretext tasks")
    assert str(folder / "flip_axis_config.py") in configs_part
    assert "(config.task='flip_axis')" in configs_part
    listed = [line.split()[0] for line in tasks_part.splitlines()[1:] if line.strip()]
    assert listed[-1] == "flip_axis" and len(listed) == len(tasks.names()) + 1
    assert "Flip-axis prediction: which spatial axis" in tasks_part  # its docstring's summary


@pytest.mark.slow
def test_pretrain_finetune_and_visualize(plugin):
    folder, env, cache = plugin
    workdir = folder / "work"
    config = f"--config={folder / 'flip_axis_config.py'}:smoke"
    proc = run_main([config, f"--workdir={workdir}", *FAST], cache, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    meta = json.loads((workdir / "checkpoints" / str(steps[-1]) / "meta" / "metadata").read_text())
    assert meta["task"] == "flip_axis" and meta["task_input"]["task"] == "flip_axis"
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    pretext = [r for r in records if r["phase"] == "pretrain" and "loss" in r]
    assert pretext and pretext[-1]["chance_loss"] == pytest.approx(1.3862944, rel=1e-6)  # ln 4
    arm = json.loads((workdir / "results.json").read_text())["arms"]["pretrained"]
    assert arm["restored_tensors"] > 0  # the task's encoder went into the U-Net
    assert set(arm["dice_mean"]) == {"WT", "TC", "ET"}

    proc = run_main([config, f"--workdir={workdir}", "--config.mode=visualize"], cache, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = sorted(p.name for p in (workdir / "figures").iterdir())
    assert figures == ["curves.png", "flip_axis.png", "segmentation_pretrained.png"]
    with Image.open(workdir / "figures" / "flip_axis.png") as im:  # the generic figure
        assert im.format == "PNG" and im.size == (800, 280)  # figures.FIGSIZE["sample"] x 80 dpi
        pixels = np.asarray(im.convert("RGB"), np.float32)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # a picture, not a flat colour


@pytest.mark.slow
def test_the_sweep_includes_and_runs_the_task(registered, tmp_path):
    folder, env, cache = registered
    from ssl3d_jax import cli

    sweep = cli.load_config("configs/sweep.py:smoke")
    assert tasks.expand(sweep.experiment.tasks, key="config.experiment.tasks")[-1] == "flip_axis"
    tc = experiment.task_config("flip_axis", sweep)
    assert tc.task == "flip_axis" and "flip_axis" in tc

    proc = run_main(
        [
            "--config=configs/sweep.py:smoke",
            f"--workdir={tmp_path / 'sweep'}",
            "--config.experiment.tasks=('flip_axis',)",
            "--config.experiment.arms=('pretrained',)",
            "--config.experiment.fractions=(1.0,)",
        ],
        cache,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert len(results) > 1 and all(",flip_axis," in f",{row}," for row in results[1:])
