"""Bad input through the whole run: one clear error naming the file; saved work stays intact.

A complete smoke run is made once; each case then damages a fresh copy of its data and reruns in a
copy of its workdir with more steps, so that the run resumes from the checkpoints and meets the
damage while training. Cases that fail before any run (a config that cannot work, a dataset whose
files disagree with its description) are checked where they fail, without a run.
docs/bad_input.md lists every case with its message and the test that proves it.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from configs import cpc as cpc_config
from configs import jigsaw as jigsaw_config
from configs import rotation as rotation_config
from configs import rpl as rpl_config
from ssl3d_jax import run, tasks
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.data import datasets, nifti, phantom, synthetic
from ssl3d_jax.errors import CheckpointError, ConfigError, DataError


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


def _damage_nan_voxels(data, case):
    path = data / case / f"{case}_t1ce.nii.gz"
    img = nib.load(path)
    vol = np.asarray(img.dataobj).astype(np.float32)
    vol[3, 4, 5] = np.nan
    vol[6, 7, 8] = np.nan
    vol[9, 10, 11] = -np.inf
    nib.save(nib.Nifti1Image(vol, img.affine), path)
    return path


def _damage_affine_mismatch(data, case):
    path = data / case / f"{case}_seg.nii.gz"
    img = nib.load(path)
    affine = img.affine.copy()
    affine[1, 3] += 3.0  # a label of another scan, or shifted: 3 mm, 2 to 3 voxels off
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), path)
    return path


# name -> (damage, split of the case damaged, what the message says after the file's path)
DAMAGES = {
    "corrupt_gz": (
        _damage_corrupt,
        "labeled",
        r": cannot read NIfTI file \(.*\); expected a valid, complete \.nii or \.nii\.gz file\.",
    ),
    "not_nifti": (
        _damage_not_gzip,
        "train",
        r": cannot read NIfTI file \(.*\); expected a valid, complete \.nii or \.nii\.gz file\.",
    ),
    "missing_modality": (
        _damage_missing_modality,
        "train",
        r": missing flair image of case \S+ \(expected layout <root>/<case>/<case>_\{t1,",
    ),
    "nan_inf_voxels": (
        _damage_nan_voxels,
        "train",
        r": 3 NaN or Inf voxels; expected only finite values\.",
    ),
    "image_label_shape_mismatch": (
        _damage_shape_mismatch,
        "labeled",
        r": shape \(28, 34, 28\) differs from \S+_t1\.nii\.gz shape \(30, 34, 28\); expected all "
        "modalities and the seg of a case on the same voxel grid",
    ),
    "image_label_affine_mismatch": (
        _damage_affine_mismatch,
        "labeled",
        r": affine \[\[.*\]\] differs from \S+_t1\.nii\.gz affine \[\[.*\]\]: the same voxel "
        r"lies up to 3 mm apart \(tolerance 0\.1 mm, 0\.1 voxel\); expected all modalities",
    ),
    "label_outside_0124": (
        _damage_label_values,
        "labeled",
        r": unexpected label values \[3\]; expected BraTS labels \[0, 1, 2, 4\]\.",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_bad_input_names_the_file_and_keeps_checkpoints(complete_run, tmp_path, damage):
    data, workdir = complete_run
    bad_data, bad_work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(data, bad_data)
    shutil.copytree(workdir, bad_work)
    splits = json.loads((bad_work / "splits.json").read_text())
    fn, split, message = DAMAGES[damage]
    bad_path = fn(bad_data, splits[split][0])

    ckpt_dirs = [bad_work / "checkpoints", bad_work / "finetune" / "pretrained" / "checkpoints"]
    before = [_snapshot(d) for d in ckpt_dirs]
    results_before = (bad_work / "results.json").read_bytes()

    config = _config(bad_data)
    config.pretrain.num_steps = 6
    config.finetune.num_steps = 5
    config.data.cache_dir = str(tmp_path / "cache")  # this case's own, to inspect below
    with pytest.raises(DataError) as err:
        run.run(config, str(bad_work))
    # One error: the damaged file first, then what is wrong with it and what was expected.
    assert re.match(re.escape(str(bad_path)) + message, str(err.value), re.S), str(err.value)

    # Nothing saved was lost or changed (a phase that read only good data may have added
    # steps), and no half-written step was left behind.
    for d, old in zip(ckpt_dirs, before):
        new = _snapshot(d)
        assert {k: new.get(k) for k in old} == old
    assert not [p for d in ckpt_dirs for p in d.iterdir() if "tmp" in p.name]
    assert (bad_work / "results.json").read_bytes() == results_before
    with Checkpointer(ckpt_dirs[0], create=False) as ckpt:
        assert ckpt.read_meta()["task"] == "rpl"
    # The preprocessed cache holds complete cases only (the damaged one is not half-written).
    cache = tmp_path / "cache"
    for folder in cache.iterdir() if cache.exists() else ():
        assert not list(folder.glob(".*tmp*"))
        for npy in folder.glob("*.image.npy"):
            name = npy.name.removesuffix(".image.npy")
            assert (folder / f"{name}.json").is_file() and name != bad_path.parent.name


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    want = re.escape(str(tmp_path / "empty")) + r": no known dataset layout found \(.*\); expected"
    with pytest.raises(DataError, match=want):
        run.run(_config(tmp_path / "empty"), str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_finetune_without_pretraining_checkpoint(complete_run, tmp_path):
    data, _ = complete_run
    config = _config(data)
    config.mode = "finetune"
    with pytest.raises(CheckpointError, match="does not exist"):
        run.run(config, str(tmp_path / "fresh_workdir"))


@pytest.mark.slow
def test_workdir_of_another_task_is_refused(complete_run, tmp_path):
    data, workdir = complete_run
    other = tmp_path / "work"
    shutil.copytree(workdir, other)
    before = _snapshot(other / "checkpoints")
    config = _config(data, rotation_config)
    with pytest.raises(CheckpointError, match="holds checkpoints of task 'rpl', not 'rotation'"):
        run.run(config, str(other))
    assert _snapshot(other / "checkpoints") == before


@pytest.mark.slow
def test_finetune_refuses_encoder_with_other_channel_count(complete_run, tmp_path):
    data, workdir = complete_run
    config = _config(data)
    config.mode = "finetune"
    config.data.modalities = ("t1", "flair")
    config.finetune.init_from = str(workdir / "checkpoints")
    with pytest.raises(CheckpointError, match="pretrained on 4 input channels"):
        run.run(config, str(tmp_path / "ft"))


@pytest.mark.slow
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


# ----------------------------------------------------------------------------------------------
# Inputs smaller than the task's patch grid: config.data.size is every input's edge (resize and
# crop_pad give size³ volumes; resize_mode 'none' pads smaller scans up to size³ crops, see
# tests/test_preprocess.py::test_random_crop_deterministic_and_foreground).


@pytest.mark.parametrize(
    "task_config, size, need, why",
    [
        # The smoke configs' random grids (grid_fraction 0.5 / 0.6): patches of
        # floor(f * size) // P - J voxels. floor(0.5 * 14) // 3 - 1 = 1: patches exist, but of
        # one voxel (no shape error without the check); 18 gives 2.
        (rpl_config, 14, 18, r"its 3x3x3 grid gives patches of 1 voxel\(s\) per axis"),
        (jigsaw_config, 9, 18, r"its 3x3x3 grid gives patches of 0 voxel\(s\) per axis"),
        (cpc_config, 7, 14, r"its 4x4x4 grid gives patches of 1 voxel\(s\) per axis"),
        (rotation_config, 1, 2, r"its encoder input would be 1 voxel\(s\) per axis"),
    ],
)
def test_input_smaller_than_the_patch_grid(task_config, size, need, why):
    config = task_config.get_config("smoke")
    config.data.size = size
    want = (
        rf"config\.data\.size={size}: too small for the {config.task} task: {why}.*; expected "
        rf"config\.data\.size >= {need} \(the edge of the 3D inputs after preprocessing"
    )
    with pytest.raises(ConfigError, match=want):
        tasks.get_task(config, in_channels=4)
    config.data.size = need  # the size named is the smallest that works
    assert tasks.get_task(config, in_channels=4).name == config.task


class _TinyModel(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(2, 1, rngs=rngs)


def _fake_task_module(loss):
    def make_task(config, *, in_channels):
        return tasks.Task(
            name="fake", build_model=_TinyModel, loss=loss, input_spec={"task": "fake"}
        )

    return tasks.TaskDef(name="fake", make=make_task)


def test_shape_failure_of_a_task_becomes_a_size_error(monkeypatch):
    def loss(model, volumes, key):  # needs 6³ inputs, as a deeper model would
        x = jax.lax.dynamic_slice(volumes, (0, 0, 0, 0, 0), (2, 6, 6, 6, volumes.shape[-1]))
        return jnp.mean(x), {}

    monkeypatch.setitem(tasks._REGISTRY, "fake", _fake_task_module(loss))
    config = rpl_config.get_config("smoke")
    config.task = "fake"
    config.data.size = 4
    want = (
        r"config\.data\.size=4: too small for the fake task: its encoder input would be 4 "
        r"voxel\(s\) per axis, and its loss fails on them \(TypeError: .*\); expected "
        r"config\.data\.size >= 6 "
    )
    with pytest.raises(ConfigError, match=want):
        tasks.get_task(config, in_channels=1)
    config.data.size = 6
    tasks.get_task(config, in_channels=1)

    def broken(model, volumes, key):  # fails at every size: not a size problem
        raise ConfigError("config.fake.margin=-1: expected >= 0")

    monkeypatch.setitem(tasks._REGISTRY, "fake", _fake_task_module(broken))
    with pytest.raises(ConfigError, match=r"^config\.fake\.margin=-1: expected >= 0"):
        tasks.get_task(config, in_channels=1)


@pytest.mark.slow
def test_too_small_size_stops_before_any_checkpoint(complete_run, tmp_path):
    data, workdir = complete_run
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    before = _snapshot(work / "checkpoints")
    config = _config(data)
    config.data.size = 12
    config.pretrain.num_steps = 6
    with pytest.raises(ConfigError, match=r"config\.data\.size=12: too small for the rpl task"):
        run.run(config, str(work))
    assert _snapshot(work / "checkpoints") == before
    with pytest.raises(ConfigError, match=r"config\.data\.size=12: too small"):
        run.run(config, str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()  # nothing written, not even splits.json


# ----------------------------------------------------------------------------------------------
# Files of a dataset that disagree with each other or with its description (no run needed:
# they fail when the dataset is opened or a case is read, before anything is written)


@pytest.fixture(scope="module")
def decathlon_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("Task01_BrainTumour")
    synthetic.write_decathlon_brain(root, num_cases=3, num_test=1, shape=(12, 14, 10))
    return root


@pytest.mark.parametrize("channels", [3, 1])
def test_decathlon_image_with_wrong_channel_count(decathlon_root, tmp_path, channels):
    root = tmp_path / "task"
    shutil.copytree(decathlon_root, root)
    bad = root / "imagesTr" / "BRATS_002.nii.gz"  # not the first: every header is checked
    vol, affine = nifti.load_nifti(bad, canonical=False)
    nifti.save_nifti(bad, vol[..., :channels].squeeze(), affine)
    want = (
        re.escape(str(bad))
        + rf": {channels} channel\(s\), but "
        + re.escape(str(root / "dataset.json"))
        + r" lists 4 modalities \('FLAIR', 'T1w', 't1gd', 'T2w'\); expected the last axis"
    )
    with pytest.raises(DataError, match=want):
        datasets.open_dataset(root)


def test_grid_check_tolerates_float_noise_not_a_shift(tmp_path):
    # An oblique scan: qform (a float32 quaternion) and sform round the same geometry differently.
    angle = np.deg2rad(12.0)
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.9, 1.1, 2.5])
    affine[:3, 3] = [-117.3, 131.9, -70.45]
    vol = np.zeros((20, 22, 12), np.int16)

    def save(name, aff, *, sform=True, qform=True):
        img = nib.Nifti1Image(vol, None)
        img.set_qform(aff if qform else np.diag([3.0, 3.0, 3.0, 1.0]), code=1)
        img.set_sform(aff if sform else None, code=1 if sform else 0)
        nib.save(img, tmp_path / name)
        return tmp_path / name, *nifti.load_nifti(tmp_path / name)[::-1]

    path_a, aff_a, _ = save("image.nii.gz", affine)
    # A label with only a qform, one whose qform is junk but whose sform (which nibabel uses)
    # is right, and one rewritten in float32 with a rounding-sized translation difference.
    noisy = affine.astype(np.float32).astype(np.float64)
    noisy[:3, 3] += 2e-4
    for name, aff, kw in [
        ("qform_only.nii.gz", affine, {"sform": False}),
        ("junk_qform.nii.gz", affine, {"qform": False}),
        ("float32.nii.gz", noisy, {}),
    ]:
        path_b, aff_b, _ = save(name, aff, **kw)
        assert not np.array_equal(aff_a, aff_b) or name == "junk_qform.nii.gz"
        datasets.check_same_grid(path_a, vol.shape, aff_a, path_b, vol.shape, aff_b)
    # Half a voxel off along the scan's own first axis, in world mm: a different grid.
    shifted = affine.copy()
    shifted[:3, 3] += 0.5 * affine[:3, 0]
    path_b, aff_b, _ = save("shifted.nii.gz", shifted)
    want = re.escape(str(path_b)) + r": affine .* differs from " + re.escape(str(path_a))
    with pytest.raises(DataError, match=want + r" affine .*: the same voxel lies up to 0\.45 mm"):
        datasets.check_same_grid(path_a, vol.shape, aff_a, path_b, vol.shape, aff_b)
    bad = affine.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match=want):
        datasets.check_same_grid(path_a, vol.shape, aff_a, path_b, vol.shape, bad)
