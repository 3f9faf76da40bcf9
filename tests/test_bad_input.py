"""Bad input through the whole run: one clear error naming the file; saved work stays intact.

A complete smoke run is made once; each case then damages a fresh copy of its data and reruns in a
copy of its workdir with more steps, so that the run resumes from the checkpoints and meets the
damage while training.
"""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from configs import rotation as rotation_config
from configs import rpl as rpl_config
from ssl3d_jax import run
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.data import phantom
from ssl3d_jax.errors import CheckpointError, DataError


def _config(root, task_config=rpl_config):
    config = task_config.get_config("smoke")
    config.data.root = str(root)
    config.data.phantom.num_cases = 5
    config.data.num_test = 1
    config.finetune.batch_size = 8  # tests run on 8 simulated devices
    config.finetune.arms = ("pretrained",)
    return config


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    data = base / "data"
    phantom.write_brats_phantom(data, num_cases=5, shape=(30, 34, 28), seed=3)
    workdir = base / "work"
    run.run(_config(data), str(workdir))
    return data, workdir


def _snapshot(ckpt_dir):
    return {p.relative_to(ckpt_dir): p.read_bytes() for p in ckpt_dir.rglob("*") if p.is_file()}


def _damage_corrupt(data, case):
    path = data / case / f"{case}_t2.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 3])  # truncated download
    return path


def _damage_missing_modality(data, case):
    path = data / case / f"{case}_flair.nii.gz"
    path.unlink()
    return path


def _damage_shape_mismatch(data, case):
    path = data / case / f"{case}_seg.nii.gz"
    img = nib.load(path)
    seg = np.asarray(img.dataobj)[:-2]
    nib.save(nib.Nifti1Image(seg, img.affine), path)
    return path


def _damage_label_values(data, case):
    path = data / case / f"{case}_seg.nii.gz"
    img = nib.load(path)
    seg = np.asarray(img.dataobj).copy()
    seg[seg == 4] = 3  # BraTS 2023 renumbering, not our {0, 1, 2, 4}
    nib.save(nib.Nifti1Image(seg, img.affine, img.header), path)
    return path


def _damage_not_gzip(data, case):
    path = data / case / f"{case}_t1.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"this is not a NIfTI header")
    return path


DAMAGES = {
    "corrupt_gz": (_damage_corrupt, "labeled"),
    "not_nifti": (_damage_not_gzip, "train"),
    "missing_modality": (_damage_missing_modality, "train"),
    "image_label_shape_mismatch": (_damage_shape_mismatch, "labeled"),
    "label_outside_0124": (_damage_label_values, "labeled"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_bad_input_names_the_file_and_keeps_checkpoints(complete_run, tmp_path, damage):
    data, workdir = complete_run
    bad_data, bad_work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(data, bad_data)
    shutil.copytree(workdir, bad_work)
    splits = json.loads((bad_work / "splits.json").read_text())
    fn, split = DAMAGES[damage]
    bad_path = fn(bad_data, splits[split][0])

    ckpt_dirs = [bad_work / "checkpoints", bad_work / "finetune" / "pretrained" / "checkpoints"]
    before = [_snapshot(d) for d in ckpt_dirs]
    results_before = (bad_work / "results.json").read_bytes()

    config = _config(bad_data)
    config.pretrain.num_steps = 6
    config.finetune.num_steps = 5
    with pytest.raises(DataError) as err:
        run.run(config, str(bad_work))
    assert str(bad_path) in str(err.value)

    # Nothing saved was lost or changed (a phase that read only good data may have added
    # steps), and no half-written step was left behind.
    for d, old in zip(ckpt_dirs, before):
        new = _snapshot(d)
        assert {k: new.get(k) for k in old} == old
    assert not [p for d in ckpt_dirs for p in d.iterdir() if "tmp" in p.name]
    assert (bad_work / "results.json").read_bytes() == results_before
    with Checkpointer(ckpt_dirs[0], create=False) as ckpt:
        assert ckpt.read_meta()["task"] == "rpl"


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        run.run(_config(tmp_path / "empty"), str(tmp_path / "work"))


def test_finetune_without_pretraining_checkpoint(complete_run, tmp_path):
    data, _ = complete_run
    config = _config(data)
    config.mode = "finetune"
    with pytest.raises(CheckpointError, match="does not exist"):
        run.run(config, str(tmp_path / "fresh_workdir"))


def test_workdir_of_another_task_is_refused(complete_run, tmp_path):
    data, workdir = complete_run
    other = tmp_path / "work"
    shutil.copytree(workdir, other)
    before = _snapshot(other / "checkpoints")
    config = _config(data, rotation_config)
    with pytest.raises(CheckpointError, match="holds checkpoints of task 'rpl', not 'rotation'"):
        run.run(config, str(other))
    assert _snapshot(other / "checkpoints") == before


def test_finetune_refuses_encoder_with_other_channel_count(complete_run, tmp_path):
    data, workdir = complete_run
    config = _config(data)
    config.mode = "finetune"
    config.data.modalities = ("t1", "flair")
    config.finetune.init_from = str(workdir / "checkpoints")
    with pytest.raises(CheckpointError, match="pretrained on 4 input channels"):
        run.run(config, str(tmp_path / "ft"))


def test_finetune_refuses_encoder_of_other_dimensionality(complete_run, tmp_path):
    data, workdir = complete_run
    config = _config(data)
    config.mode = "finetune"
    config.data.spatial_dims = 2
    config.finetune.init_from = str(workdir / "checkpoints")
    with pytest.raises(
        CheckpointError, match="pretrained in 3D, but config.data.spatial_dims is 2"
    ):
        run.run(config, str(tmp_path / "ft"))
    assert not (tmp_path / "ft" / "finetune").exists()
