"""The main command on generated data in every labelled layout other than BraTS (which
tests/test_launch.py covers): Decathlon CT (Task07 Pancreas), Decathlon 4D MRI (Task01
BrainTumour), and a 2D image folder with a CSV of grades."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from launch_util import run_main as _run

from ssl3d_jax.data import synthetic

ARMS = "--config.finetune.arms=('pretrained','scratch','probe')"


def _main(tmp_path, config: str, root, *extra: str):
    """`launch/main.py --config=<config> --config.data.root=<root> ...` in `tmp_path/work`."""
    workdir = tmp_path / "work"
    data = [f"--config.data.root={root}"] if root else []  # None: the built-in phantom
    args = [f"--config={config}", *data, f"--workdir={workdir}", *extra]
    proc = _run(args, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc


def _results(workdir):
    return json.loads((workdir / "results.json").read_text())


def _check_predictions(arm: dict, data_root, test_cases, *, spatial_of) -> None:
    for case in test_cases:
        pred = nib.load(f"{arm['predictions']}/{case}_pred.nii.gz")
        ref = nib.load(spatial_of(data_root, case))
        assert pred.shape == ref.shape[:3]
        np.testing.assert_array_equal(pred.affine, ref.affine)


@pytest.mark.slow
def test_decathlon_pancreas_ct_all_arms(tmp_path):
    root = synthetic.write_decathlon_pancreas(tmp_path / "Task07_Pancreas", num_cases=6)
    workdir, proc = _main(tmp_path, "configs/rpl.py:smoke", root, ARMS)
    assert "decathlon layout" in proc.stderr
    results = _results(workdir)
    assert set(results["arms"]) == {"pretrained", "scratch", "probe"}
    for arm in results["arms"].values():
        # dataset.json's label names are the regions; background never scored.
        assert set(arm["metrics"]) == {"pancreas", "cancer"}
        _check_predictions(
            arm,
            root,
            results["splits"]["test"],
            spatial_of=lambda r, c: r / "labelsTr" / f"{c}.nii.gz",
        )
    assert results["arms"]["probe"]["restored_tensors"] > 0
    # The checkpoint describes a 1-channel CT input with its HU window.
    from ssl3d_jax.checkpoint import Checkpointer

    with Checkpointer(workdir / "checkpoints", create=False) as ckpt:
        spec = ckpt.read_meta()["input"]
    assert spec["in_channels"] == 1 and spec["modality"] == "ct"
    assert spec["ct_window"] == [-100.0, 240.0]


@pytest.mark.slow
def test_decathlon_brain_4d_scratch(tmp_path):
    root = synthetic.write_decathlon_brain(tmp_path / "Task01_BrainTumour", num_cases=5)
    workdir, _ = _main(
        tmp_path,
        "configs/rpl.py:smoke",
        root,
        "--config.mode=finetune",
        "--config.finetune.arms=('scratch',)",
        "--config.finetune.hd95=True",
    )
    arm = _results(workdir)["arms"]["scratch"]
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    regions = {v for k, v in labels.items() if k != "0"}
    assert set(arm["metrics"]) == regions | {f"HD95 {r}" for r in regions}
    both_empty = {f"HD95 {r}": 0 for r in regions}
    for scores in arm["dice_per_case"].values():
        for r in regions:  # mm; NaN only where both prediction and truth are empty
            hd = scores[f"HD95 {r}"]
            assert hd != hd or 0.0 <= hd <= 373.13
            both_empty[f"HD95 {r}"] += hd != hd
    # Those cases are left out of the means and counted; Dice never is.
    assert arm["n_excluded"] == {r: 0 for r in regions} | both_empty
    # The Dice of the old nearest-neighbour label mapping is reported beside the metrics.
    assert set(arm["dice_nearest_argmax_mean"]) == regions
    # Predictions of a 4D (modalities on the last axis) scan are 3D label maps on its grid.
    _check_predictions(
        arm,
        root,
        _results(workdir)["splits"]["test"],
        spatial_of=lambda r, c: r / "imagesTr" / f"{c}.nii.gz",
    )


@pytest.mark.slow
def test_image_folder_classification_all_arms(tmp_path):
    root = synthetic.write_image_folder(tmp_path / "fundus", num_images=12)
    workdir, proc = _main(
        tmp_path, "configs/rotation.py:smoke,2d", root, "--config.data.num_test=4", ARMS
    )
    assert "images layout" in proc.stderr
    results = _results(workdir)
    for arm in results["arms"].values():
        assert set(arm["metrics"]) == {"accuracy", "qwk"}
        preds = arm["per_case"]
        assert len(preds) == 4
        acc = np.mean([p["pred"] == p["target"] for p in preds.values()])
        assert arm["metrics"]["accuracy"] == pytest.approx(acc)


@pytest.mark.slow
def test_unlabelled_nifti_folder_pretrains_and_refuses_finetuning(tmp_path):
    files = synthetic.write_nifti_folder(tmp_path / "scans", num_files=4)
    root = tmp_path / "scans"
    workdir, proc = _main(tmp_path, "configs/rotation.py:smoke", root, "--config.mode=pretrain")
    assert "nifti layout" in proc.stderr
    # Every scan (mixed shapes, .nii and .nii.gz, in sub-folders) is preprocessed and pretrained on.
    assert f"Preprocessing {len(files)} of {len(files)} cases" in proc.stderr
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"pretrain"}  # no labels: no kNN probe
    from ssl3d_jax.checkpoint import Checkpointer

    with Checkpointer(workdir / "checkpoints", create=False) as ckpt:
        assert ckpt.read_meta()["input"]["in_channels"] == 1
    proc = _run(
        [
            "--config=configs/rotation.py:smoke",
            f"--config.data.root={root}",
            f"--workdir={workdir}",
        ],
        tmp_path / "cache",
    )
    assert proc.returncode == 1
    assert "has no labels" in proc.stderr and "config.mode='pretrain'" in proc.stderr


@pytest.mark.slow
def test_random_crops_and_sliding_window_evaluation(tmp_path):
    """resize_mode='none': pretraining and finetuning on random 24³ crops of the (larger)
    preprocessed scans, evaluation by sliding windows, predictions back in each scan's grid."""
    workdir, proc = _main(
        tmp_path,
        "configs/rpl.py:smoke",
        None,
        "--config.data.resize_mode=none",
        "--config.finetune.arms=('pretrained',)",
    )
    assert "Evaluating with sliding windows of 24³" in proc.stderr
    results = _results(workdir)
    arm = results["arms"]["pretrained"]
    assert arm["restored_tensors"] > 0
    _check_predictions(
        arm,
        None,
        results["splits"]["test"],
        spatial_of=lambda _, c: next(
            (tmp_path / "cache").glob(f"brats_phantom*/{c}/{c}_seg.nii.gz")
        ),
    )
