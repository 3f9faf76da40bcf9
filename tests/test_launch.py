"""The main command end to end at smoke size, as a user runs it (a subprocess)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from launch_util import run_main as _run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("launch")
    workdir = base / "work"
    proc = _run(["--config=configs/rpl.py:smoke", f"--workdir={workdir}"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc


@pytest.mark.slow
def test_default_command_end_to_end_smoke(smoke_run):
    workdir, proc = smoke_run
    # Built-in phantom data was generated into the cache folder, in BraTS layout.
    assert "built-in phantom dataset" in proc.stderr
    # Pretraining checkpoints, complete (orbax's commit marker) and not left as temp folders.
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == 4
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    # Metrics of every phase, one JSON object per line, finite losses.
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in records}
    # pretrain/val: the pretext loss on the held-out validation cases.
    assert phases == {
        "pretrain",
        "pretrain/knn",
        "pretrain/val",
        "finetune/pretrained",
        "finetune/scratch",
    }
    assert [r["step"] for r in records if r["phase"] == "pretrain"] == [1, 2, 3, 4]
    # The online kNN probe of the encoder ran every 2 steps (smoke) during pretraining.
    knn = [r for r in records if r["phase"] == "pretrain/knn"]
    assert [r["step"] for r in knn] == [2, 4]
    assert all(0.0 <= r["knn_accuracy"] <= 1.0 for r in knn)
    assert all(r["loss"] == r["loss"] for r in records if r["phase"] != "pretrain/knn")
    # Results: WT/TC/ET Dice for the pretrained and the from-scratch model.
    results = json.loads((workdir / "results.json").read_text())
    assert set(results["arms"]) == {"pretrained", "scratch"}
    for arm in results["arms"].values():
        assert set(arm["dice_mean"]) == {"WT", "TC", "ET"}
        assert all(0.0 <= v <= 1.0 for v in arm["dice_mean"].values())
        assert len(arm["dice_per_case"]) == arm["num_test"] == 2
        # The validation case is scored too (config.data.num_val=1 at smoke size).
        assert arm["num_val"] == 1 and set(arm["val_metrics"]) == set(arm["metrics"])
        # One prediction NIfTI per test case, in the scan's own grid (shape and affine).
        for case in results["splits"]["test"]:
            pred = nib.load(f"{arm['predictions']}/{case}_pred.nii.gz")
            (seg,) = (workdir.parent / "cache").glob(f"brats_phantom*/{case}/{case}_seg.nii.gz")
            ref = nib.load(seg)
            assert pred.shape == ref.shape
            np.testing.assert_array_equal(pred.affine, ref.affine)
            assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 4}
    assert results["arms"]["pretrained"]["restored_tensors"] > 0
    assert results["arms"]["scratch"]["restored_tensors"] == 0
    restored = json.loads((workdir / "finetune/pretrained/restored_params.json").read_text())
    assert restored["step"] == 4 and restored["missing"] == []
    # The split is saved and pretraining never saw the test or validation cases.
    splits = json.loads((workdir / "splits.json").read_text())
    assert not set(splits["test"]) & set(splits["train"])
    assert len(splits["val"]) == 1 and not set(splits["val"]) & set(splits["train"])
    assert not set(splits["val"]) & set(splits["test"])
    assert set(splits["labeled"]) <= set(splits["train"])


@pytest.mark.slow
def test_rerun_resumes_instead_of_starting_over(smoke_run, tmp_path):
    workdir, _ = smoke_run
    proc = _run(
        ["--config=configs/rpl.py:smoke", f"--workdir={workdir}", "--config.pretrain.num_steps=6"],
        workdir.parent / "cache",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Resuming pretraining from step 4" in proc.stderr
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    pre = [r["step"] for r in records if r["phase"] == "pretrain"]
    assert pre == [1, 2, 3, 4, 5, 6]


def test_mistyped_config_key_is_an_error(tmp_path):
    proc = _run(
        ["--config=configs/rpl.py:smoke", f"--workdir={tmp_path}", "--config.pretrain.num_stepz=3"],
        tmp_path / "cache",
    )
    assert proc.returncode == 1
    assert (
        "error: --config.pretrain.num_stepz: the config has no key 'num_stepz'; "
        "did you mean 'num_steps'?" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_checkpoint_describes_itself(smoke_run):
    import ssl3d_jax
    from ssl3d_jax.checkpoint import Checkpointer

    workdir, _ = smoke_run
    with Checkpointer(workdir / "checkpoints", create=False) as ckpt:
        meta = ckpt.read_meta()
    assert meta["library"] == "ssl3d_jax" and meta["version"] == ssl3d_jax.__version__
    assert meta["task"] == "rpl" and meta["phase"] == "pretrain"
    spec = meta["input"]
    assert spec["in_channels"] == 4 and spec["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert spec["spatial_dims"] == 3 and spec["axis_order"].startswith("DHWC")
    assert spec["normalization"] == "zscore" and spec["size"] == 24
    assert meta["dataset"]["layout"] == "brats"
    # The full config, and the task's own input description (patch grid).
    assert meta["config"]["rpl"]["patches_per_side"] == 3
    assert meta["task_input"]


@pytest.mark.slow
def test_preprocess_command_fills_the_cache_once(tmp_path):
    cache = tmp_path / "cache"
    base = ["--config=configs/rpl.py:smoke", f"--workdir={tmp_path / 'work'}"]
    proc = _run([*base, "--config.mode=preprocess"], cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Preprocessing 6 of 6 cases" in proc.stderr
    (folder,) = (cache / "preprocessed").iterdir()
    assert len(list(folder.glob("*.image.npy"))) == len(list(folder.glob("*.label.npy"))) == 6
    settings = json.loads((folder / "settings.json").read_text())["settings"]
    assert settings["size"] == 24 and settings["normalization"] == "zscore"
    # Training with the same settings reads the cache: nothing is preprocessed again.
    proc = _run(
        [*base, "--config.mode=pretrain", "--config.pretrain.num_steps=1"],
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Preprocessing" not in proc.stderr
    # Another setting is another cache key: preprocessed anew, the first cache left as it was.
    before = sorted(p.name for p in folder.iterdir())
    proc = _run([*base, "--config.mode=preprocess", "--config.data.normalization=minmax"], cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Preprocessing 6 of 6 cases" in proc.stderr
    assert len(list((cache / "preprocessed").iterdir())) == 2
    assert sorted(p.name for p in folder.iterdir()) == before
