"""Tests of the dataset layouts (ssl3d_jax.data.datasets): BraTS, Decathlon, nifti folder, images.

Every layout is written by `synthetic` into tmp_path and read back; the checks are about meaning
(an on-disk label comes back as the class its name says, channel c is the modality named
channels[c], CT stays in HU), layout detection, and DataErrors that name the offending file.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import re
import shutil

import numpy as np
import pytest

from ssl3d_jax.data import brats, datasets, nifti, synthetic
from ssl3d_jax.errors import ConfigError, DataError

SHAPE = (16, 18, 14)


# ----------------------------------------------------------------------------------------------
# BraTS


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("brats")
    synthetic.write_brats(root, num_cases=2, shape=SHAPE, naming="2021")
    return root


def test_brats_dataset_and_label_map(brats_root):
    assert datasets.detect_layout(brats_root) == "brats"
    ds = datasets.open_dataset(brats_root)
    assert ds.layout == "brats" and ds.kind == "segmentation" and ds.modality == "mri"
    assert ds.channels == ("t1", "t1ce", "t2", "flair") and ds.in_channels == 4
    assert ds.label_values == (0, 1, 2, 4) and ds.num_classes == 4
    assert ds.regions == (("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,)))
    assert [c.name for c in ds.cases] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert isinstance(ds.cases[0], brats.Case) and brats.Case is datasets.Case
    src = datasets.VolumeSource(ds)
    rec = src[1]
    assert rec["image"].shape == (*SHAPE, 4) and rec["image"].dtype == np.float32
    assert rec["label"].dtype == np.int32 and rec["case_index"] == 1
    # On-disk 4 (enhancing tumour) is class 3, and class 3 is exactly the ET region.
    seg, _ = nifti.load_nifti(ds.cases[1].label, dtype=np.int32)
    assert (seg == 4).any()
    np.testing.assert_array_equal(rec["label"] == 3, seg == 4)
    np.testing.assert_array_equal(np.asarray(ds.label_values)[rec["label"]], seg)
    et = dict(ds.regions)["ET"]
    np.testing.assert_array_equal(np.isin(rec["label"], et), brats.label_to_regions(seg)[..., 2])
    # Sources pickle into grain workers.
    again = pickle.loads(pickle.dumps(src))[1]
    np.testing.assert_array_equal(again["image"], rec["image"])


def test_brats_modality_subset_and_channel_order(brats_root):
    ds = datasets.open_dataset(brats_root, modalities=("FLAIR", "t1"))
    assert ds.channels == ("flair", "t1")
    rec = datasets.VolumeSource(ds, with_label=False)[0]
    assert "label" not in rec and rec["image"].shape == (*SHAPE, 2)
    full = datasets.VolumeSource(datasets.open_dataset(brats_root), with_label=False)[0]
    np.testing.assert_array_equal(rec["image"], full["image"][..., [3, 0]])
    with pytest.raises(ConfigError, match=r"config\.data\.modalities.*'t3'"):
        datasets.open_dataset(brats_root, modalities=("t1", "t3"))


@pytest.mark.parametrize("naming", ["2018", "2020"])
def test_brats_release_namings(tmp_path, naming):
    synthetic.write_brats(tmp_path, num_cases=2, shape=(12, 12, 12), naming=naming)
    assert datasets.detect_layout(tmp_path) == "brats"
    ds = datasets.open_dataset(tmp_path)
    assert len(ds.cases) == 2 and all(c.label is not None for c in ds.cases)
    if naming == "2018":  # HGG/ and LGG/ grouping folders
        assert {c.images[0].parent.parent.name for c in ds.cases} == {"HGG", "LGG"}
    assert datasets.VolumeSource(ds)[0]["label"].max() <= 3
    if naming == "2020":
        # BraTS20_Training_355's seg is misnamed in the release; renamed case folders keep their
        # files' names.
        seg = ds.cases[1].label
        seg.rename(seg.parent / "W39_1998.09.19_Segm.nii.gz")
        folder = ds.cases[0].images[0].parent
        folder.rename(tmp_path / "renamed")
        ds = datasets.open_dataset(tmp_path)
        assert [c.name for c in ds.cases] == ["BraTS20_Training_002", "renamed"]
        assert ds.cases[0].label.name == "W39_1998.09.19_Segm.nii.gz"
        assert ds.cases[1].images[0].name == "BraTS20_Training_001_t1.nii.gz"


def test_brats_unknown_label_value(brats_root, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(brats_root, root)
    ds = datasets.open_dataset(root)
    seg, affine = nifti.load_nifti(ds.cases[0].label, dtype=np.int32, canonical=False)
    seg[0, 0, 0] = 3
    nifti.save_nifti(ds.cases[0].label, seg.astype(np.uint8), affine)
    want = re.escape(str(ds.cases[0].label)) + r": unexpected label values \[3\]"
    with pytest.raises(DataError, match=want):
        datasets.VolumeSource(ds)[0]
    with pytest.raises(DataError, match=want):
        brats.BratsSource(ds.cases)[0]


# ----------------------------------------------------------------------------------------------
# Images (2D classification)


@pytest.fixture(scope="module")
def images_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("images")
    synthetic.write_image_folder(root, num_images=10, size=32, num_unlabelled=2)
    return root


def test_images_dataset(images_root):
    assert datasets.detect_layout(images_root) == "images"
    ds = datasets.open_dataset(images_root)
    assert ds.layout == "images" and ds.kind == "classification" and ds.spatial_dims == 2
    assert ds.modality == "photo" and ds.channels == ("R", "G", "B")
    assert ds.label_values == (0, 1, 2, 3, 4) and ds.num_classes == 5
    assert ds.class_names == ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4")
    assert ds.regions == ()
    assert [c.name for c in ds.cases] == [f"img_{i:03d}" for i in range(10)]
    assert [c.target for c in ds.cases] == [i % 5 for i in range(10)]
    # Images without a CSV row: unlabelled, kept apart from the labelled cases.
    assert [c.name for c in ds.unlabelled_cases] == ["img_010", "img_011"]
    assert all(c.target is None for c in ds.unlabelled_cases)


def test_image_source_record_semantics(images_root):
    ds = datasets.open_dataset(images_root)
    src = datasets.ImageSource(ds, size=24)
    assert len(src) == 10
    for i in (0, 3):
        rec = src[i]
        img = rec["image"]
        assert img.shape == (24, 24, 3) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert rec["target"] == i % 5 and rec["target"].dtype == np.int32
        assert rec["case_index"] == i and rec["case_index"].dtype == np.int32
    # The grade is visible: the number of bright yellow blobs (blue channel high only there).
    import scipy.ndimage as ndi

    for i in range(5):
        blobs = src[i]["image"][..., 2] > 0.3
        assert ndi.label(blobs)[1] == i % 5
    # The centre square crop cuts the black sides of the wider-than-tall image.
    from PIL import Image

    raw = np.asarray(Image.open(ds.cases[1].images[0]), np.float32) / 255  # [32, 40, 3]
    assert raw.shape == (32, 40, 3)
    native = datasets.ImageSource(ds, size=32)[1]["image"]
    np.testing.assert_allclose(native, raw[:, 4:36], atol=1e-6)
    with pytest.raises(DataError, match="no label row"):
        datasets.ImageSource(ds, ds.unlabelled_cases, size=16)
    rec = datasets.ImageSource(ds, ds.unlabelled_cases, size=16, with_label=False)[0]
    assert "target" not in rec


def test_images_generic_csv_and_errors(images_root, tmp_path):
    root = tmp_path / "imgs"
    shutil.copytree(images_root, root)
    (root / "trainLabels.csv").unlink()
    (root / "labels.csv").write_text("image,label\nimg_000.png,1\nimg_001,2\n")
    ds = datasets.open_dataset(root)
    assert ds.label_values == (0, 1, 2) and ds.class_names == ("class 0", "class 1", "class 2")
    assert [c.target for c in ds.cases] == [1, 2] and len(ds.unlabelled_cases) == 10
    csv = root / "labels.csv"
    for body, want in [
        ("image,label\nimg_000,1\nimg_999,2\n", r"labels\.csv, line 3: image 'img_999' not found"),
        ("image,label\nimg_000,1.5\n", r"labels\.csv, line 2: label='1\.5'"),
        ("image,label\nimg_000,-1\n", r"labels\.csv, line 2: label='-1'"),
        ("image,label\nimg_000,x\n", r"labels\.csv, line 2: label='x'"),
        ("image,label\nimg_000,1\nimg_000,2\n", r"labels\.csv, line 3: .* listed twice"),
        ("name,label\nimg_000,1\n", r"labels\.csv: no image column"),
        ("image,label\n", r"labels\.csv: no label rows"),
    ]:
        csv.write_text(body)
        with pytest.raises(DataError, match=want):
            datasets.open_dataset(root)
    csv.write_text("image,level\nimg_000,1\n")
    (root / "train" / "img_000.png").write_bytes(b"not a png")
    src = datasets.ImageSource(datasets.open_dataset(root), size=8)
    with pytest.raises(DataError, match=re.escape(str(root / "train" / "img_000.png"))):
        src[0]
    (root / "other.csv").write_text("image,level\n")
    with pytest.raises(ConfigError, match=r"config\.data\.labels_csv"):
        datasets.open_dataset(root)
    assert len(datasets.open_dataset(root, labels_csv="labels.csv").cases) == 1


# ----------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon


@pytest.fixture(scope="module")
def brain_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("Task01_BrainTumour")
    synthetic.write_decathlon_brain(root, num_cases=2, num_test=1, shape=SHAPE)
    return root


@pytest.fixture(scope="module")
def pancreas_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("Task07_Pancreas")
    synthetic.write_decathlon_pancreas(root, num_cases=2, num_test=1, shape=SHAPE)
    return root


def test_decathlon_brain_dataset(brain_root):
    assert (brain_root / "imagesTr" / "._BRATS_001.nii.gz").exists()  # macOS junk, ignored
    assert datasets.detect_layout(brain_root) == "decathlon"
    ds = datasets.open_dataset(brain_root)
    assert ds.layout == "decathlon" and ds.kind == "segmentation" and ds.modality == "mri"
    assert ds.name == "BRATS" and ds.channels == ("FLAIR", "T1w", "t1gd", "T2w")
    assert ds.label_values == (0, 1, 2, 3)
    assert ds.class_names == ("background", "edema", "non-enhancing tumor", "enhancing tumour")
    assert ds.regions == (
        ("edema", (1,)),
        ("non-enhancing tumor", (2,)),
        ("enhancing tumour", (3,)),
    )
    assert [c.name for c in ds.cases] == ["BRATS_001", "BRATS_002"]
    assert [c.name for c in ds.unlabelled_cases] == ["BRATS_003"]
    assert all(c.label is None for c in ds.unlabelled_cases)
    rec = datasets.VolumeSource(ds)[0]
    assert rec["image"].shape == (*SHAPE, 4) and rec["label"].shape == SHAPE
    # Labels come back as the class whose dataset.json name says what it is: the phantom's
    # enhancing tumour (BraTS 4) was written as Decathlon 3 = "enhancing tumour".
    _, brats_seg = synthetic.phantom.make_phantom_case(SHAPE, synthetic.SPACING, seed=0, index=0)
    et = ds.class_names.index("enhancing tumour")
    np.testing.assert_array_equal(rec["label"] == et, brats_seg == 4)
    np.testing.assert_array_equal(rec["label"] == ds.class_names.index("edema"), brats_seg == 2)
    unlab = datasets.VolumeSource(ds, ds.unlabelled_cases, with_label=False)[0]
    assert unlab["image"].shape == (*SHAPE, 4)
    with pytest.raises(DataError, match="no label"):
        datasets.VolumeSource(ds, ds.unlabelled_cases)


def test_decathlon_4d_channel_order(brain_root, tmp_path):
    root = tmp_path / "t1"
    shutil.copytree(brain_root, root)
    ds = datasets.open_dataset(root)
    path = ds.cases[0].images[0]
    vol, affine = nifti.load_nifti(path, canonical=False)
    const = np.broadcast_to(np.arange(4, dtype=np.float32), vol.shape).copy()
    nifti.save_nifti(path, const, affine)  # channel k holds the constant k
    order = {name: k for k, name in enumerate(ds.channels)}
    img = datasets.VolumeSource(ds, with_label=False)[0]["image"]
    for c, name in enumerate(ds.channels):
        assert np.all(img[..., c] == order[name])
    sub = datasets.open_dataset(root, modalities=("t2w", "flair"))
    assert sub.channels == ("T2w", "FLAIR") and sub.in_channels == 2
    img = datasets.VolumeSource(sub)[0]["image"]
    assert img.shape == (*SHAPE, 2)
    assert np.all(img[..., 0] == 3) and np.all(img[..., 1] == 0)
    with pytest.raises(ConfigError, match=r"config\.data\.modalities.*'T1ce'"):
        datasets.open_dataset(root, modalities=("T1ce",))


def test_decathlon_pancreas_ct_in_hu(pancreas_root):
    ds = datasets.open_dataset(pancreas_root)
    assert ds.modality == "ct" and ds.channels == ("CT",) and ds.in_channels == 1
    assert ds.class_names == ("background", "pancreas", "cancer") and ds.num_classes == 3
    assert ds.regions == (("pancreas", (1,)), ("cancer", (2,)))
    rec = datasets.VolumeSource(ds)[1]
    img, lab = rec["image"][..., 0], rec["label"]
    assert rec["image"].shape == (*SHAPE, 1)
    # Raw Hounsfield units arrive untouched (windowing is preprocessing's job).
    assert img.min() < -900 and img.max() > 700
    assert abs(np.median(img[lab == 1]) - 100) < 15
    assert abs(np.median(img[lab == 2]) - 60) < 15
    assert (lab == 2).any() and (lab == 1).sum() > (lab == 2).sum()


def test_decathlon_errors(brain_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(brain_root, root)
    missing = root / "labelsTr" / "BRATS_002.nii.gz"
    missing.unlink()
    with pytest.raises(DataError, match=re.escape(str(missing)) + ": label of training case"):
        datasets.open_dataset(root)
    shutil.copy(root / "labelsTr" / "BRATS_001.nii.gz", missing)
    # A label value dataset.json does not list.
    seg, affine = nifti.load_nifti(missing, dtype=np.int32, canonical=False)
    seg[1, 1, 1] = 7
    nifti.save_nifti(missing, seg.astype(np.uint8), affine)
    ds = datasets.open_dataset(root)
    with pytest.raises(DataError, match=re.escape(str(missing)) + r".*values \[7\]"):
        datasets.VolumeSource(ds)[1]
    doc = json.loads((root / "dataset.json").read_text())
    doc["modality"] = {"0": "FLAIR", "1": "T1w"}
    (root / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"BRATS_001\.nii\.gz: 4 channel\(s\), but .* lists 2"):
        datasets.open_dataset(root)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: cannot read"):
        datasets.open_dataset(root)


# ----------------------------------------------------------------------------------------------
# nifti folder (unlabelled)


def test_nifti_folder(tmp_path):
    files = synthetic.write_nifti_folder(tmp_path, num_files=3, channels=2)
    assert {f.name.endswith(".nii") for f in files} == {True, False}
    assert datasets.detect_layout(tmp_path) == "nifti"
    ds = datasets.open_dataset(tmp_path)
    assert ds.kind == "unlabelled" and ds.channels == ("ch0", "ch1") and ds.modality == "mri"
    assert ds.label_values == () and ds.regions == ()
    assert [c.name for c in ds.cases] == ["scan_000", "scan_002", "sub/scan_001"]
    shapes = {datasets.VolumeSource(ds, with_label=False)[i]["image"].shape for i in range(3)}
    assert shapes == {(24, 28, 20, 2), (20, 24, 18, 2), (22, 26, 16, 2)}
    with pytest.raises(DataError, match="unlabelled"):
        datasets.VolumeSource(ds)
    # A 3D scan among 2-channel 4D scans.
    odd = tmp_path / "deep" / "odd.nii.gz"
    nifti.save_nifti(odd, np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(DataError, match=re.escape(str(odd)) + r": 1 channel\(s\), but"):
        datasets.open_dataset(tmp_path)


def test_nifti_folder_ct_guess(tmp_path):
    hu, _ = synthetic.make_ct_case(SHAPE)
    nifti.save_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), np.diag([0.8, 0.8, 2.5, 1]))
    (tmp_path / "._ct.nii.gz").write_bytes(b"junk")
    ds = datasets.open_dataset(tmp_path, layout="nifti")
    assert ds.modality == "ct" and ds.channels == ("ch0",) and len(ds.cases) == 1


# ----------------------------------------------------------------------------------------------
# Layout detection and folder errors


def test_detect_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        datasets.detect_layout(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty: no known dataset layout.*\n.*brats: .*\n"):
        datasets.open_dataset(empty)
    with pytest.raises(ConfigError, match=r"config\.data\.layout='bids'"):
        datasets.open_dataset(empty, layout="bids")
    with pytest.raises(DataError, match=r"empty: no \.nii"):
        datasets.open_dataset(empty, layout="nifti")
    assert datasets.LAYOUTS == ("brats", "decathlon", "nifti", "images")
