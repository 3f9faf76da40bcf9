"""Every task's smoke config, 3D and 2D, end to end through launch/main.py:
pretrain → checkpoint → encoder restored into the segmentation model → finetune → Dice."""

from __future__ import annotations

import json

import pytest
from launch_util import run_main

from ssl3d_jax import tasks

# RPL 3D is covered in detail by tests/test_launch.py.
CASES = [
    (task, dims) for task in tasks.names() for dims in ("3d", "2d") if (task, dims) != ("rpl", "3d")
]


@pytest.mark.slow
@pytest.mark.parametrize("task,dims", CASES, ids=[f"{t}-{d}" for t, d in CASES])
def test_smoke_end_to_end(task, dims, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"{task}_{dims}")
    workdir = base / "work"
    proc = run_main(
        [
            f"--config=configs/{task}.py:smoke,{dims}",
            f"--workdir={workdir}",
            "--config.finetune.arms=('pretrained',)",
        ],
        tmp_path_factory.getbasetemp() / "shared_cache",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (workdir / "checkpoints").is_dir()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {
        "pretrain",
        "pretrain/knn",
        "pretrain/val",  # the pretext loss on the held-out validation cases
        "finetune/pretrained",
    }
    results = json.loads((workdir / "results.json").read_text())
    arm = results["arms"]["pretrained"]
    assert arm["restored_tensors"] > 0
    assert set(arm["dice_mean"]) == {"WT", "TC", "ET"}
    with open(
        workdir
        / "checkpoints"
        / str(max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()))
        / "meta"
        / "metadata"
    ) as f:
        meta = json.load(f)
    assert meta["task"] == task and meta["input"]["spatial_dims"] == int(dims[0])
