"""Tests of the data layer: phantom, NIfTI reading, BraTS source, preprocessing, grain pipeline."""

from __future__ import annotations

import gzip
import pathlib
import re
import shutil

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from ssl3d_jax.data import brats, nifti, phantom, pipeline, preprocess
from ssl3d_jax.errors import ConfigError, DataError

SHAPE = (20, 24, 18)
SPACING = (1.2, 1.0, 1.5)
NUM_CASES = 3


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    r = tmp_path_factory.mktemp("phantom")
    phantom.write_brats_phantom(r, num_cases=NUM_CASES, shape=SHAPE, spacing=SPACING, seed=0)
    return r


@pytest.fixture(scope="module")
def source(root) -> brats.BratsSource:
    return brats.BratsSource(brats.find_cases(root))


def _copy_dataset(root, tmp_path) -> tuple[pathlib.Path, list[brats.Case]]:
    dst = tmp_path / "data"
    shutil.copytree(root, dst)
    return dst, brats.find_cases(dst)


# ----------------------------------------------------------------------------------------------
# Phantom


def test_phantom_layout(root):
    names = sorted(p.name for p in root.iterdir())
    assert names == [f"Phantom_{i:03d}" for i in range(NUM_CASES)]
    for name in names:
        files = sorted(p.name for p in (root / name).iterdir())
        assert files == sorted(f"{name}_{m}.nii.gz" for m in (*brats.MODALITIES, "seg"))
    cases = brats.find_cases(root)
    assert [c.name for c in cases] == names
    assert [p.name.split("_")[-1] for p in cases[0].images] == [
        f"{m}.nii.gz" for m in brats.MODALITIES
    ]


def test_phantom_deterministic(root, tmp_path):
    phantom.write_brats_phantom(tmp_path / "a", num_cases=1, shape=SHAPE, spacing=SPACING, seed=0)
    phantom.write_brats_phantom(tmp_path / "b", num_cases=1, shape=SHAPE, spacing=SPACING, seed=1)
    for suffix in ("t1", "flair", "seg"):
        rel = pathlib.Path("Phantom_000") / f"Phantom_000_{suffix}.nii.gz"
        ref, same, other = (
            np.asarray(nib.load(folder / rel).dataobj)
            for folder in (root, tmp_path / "a", tmp_path / "b")
        )
        assert ref.tobytes() == same.tobytes()
        assert not np.array_equal(ref, other)


def test_phantom_files_match_generator_after_reorientation(source):
    # Stored LAS on disk; load_nifti's canonical reorientation must give back the RAS arrays.
    image, seg = phantom.make_phantom_case(SHAPE, SPACING, seed=0, index=1)
    rec = source[1]
    np.testing.assert_allclose(rec["image"], np.clip(np.rint(image), 0, None), atol=0.5)
    np.testing.assert_array_equal(brats.INDEX_TO_LABEL[rec["label"]], seg)


def test_phantom_labels_nested_and_varied(root):
    centroids, sizes = [], []
    for case in brats.find_cases(root):
        seg, _ = nifti.load_nifti(case.label, dtype=np.int32)
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}, case.label
        regions = brats.label_to_regions(seg)
        wt, tc, et = regions[..., 0], regions[..., 1], regions[..., 2]
        assert np.all(tc <= wt) and np.all(et <= tc)
        assert et.sum() < tc.sum() < wt.sum()
        centroids.append(np.argwhere(wt).mean(0))
        sizes.append(int(wt.sum()))
    assert len(set(sizes)) == NUM_CASES
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(centroids) for b in centroids[i + 1 :]]
    assert min(gaps) > 0.5


def test_phantom_geometry(root):
    img = nib.load(root / "Phantom_000" / "Phantom_000_t1.nii.gz")
    assert img.shape == SHAPE and len(set(SHAPE)) == 3
    np.testing.assert_allclose(img.header.get_zooms()[:3], SPACING, rtol=1e-5)
    lin = img.affine[:3, :3]
    assert not np.allclose(lin, np.diag(np.diag(lin)))  # oblique, not a diagonal affine
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    seg = nib.load(root / "Phantom_000" / "Phantom_000_seg.nii.gz")
    assert np.asarray(seg.dataobj).dtype == np.uint8
    data, affine = nifti.load_nifti(root / "Phantom_000" / "Phantom_000_t1.nii.gz")
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and data.dtype == np.float32


def test_phantom_contrasts():
    image, seg, tissues = phantom.make_phantom_case(
        SHAPE, SPACING, seed=0, index=0, return_tissues=True
    )
    t1, t1ce, t2, flair = (image[..., c] for c in range(4))
    csf = tissues == phantom.TISSUE_NAMES.index("csf")
    oedema, et = seg == 2, seg == 4
    assert t2[csf].mean() > t2[oedema].mean() and flair[csf].mean() < flair[oedema].mean()
    assert t1ce[et].mean() > 1.8 * t1[et].mean()
    wm = tissues == phantom.TISSUE_NAMES.index("wm")
    assert t1[wm].mean() > t1[csf].mean() and t2[wm].mean() < t2[csf].mean()
    assert np.all(image[tissues < 0] == 0) and np.all(image >= 0)


def test_default_dataset_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL3D_JAX_CACHE", str(tmp_path / "cache"))
    kw = dict(num_cases=1, shape=SHAPE, spacing=SPACING, seed=0)
    first = phantom.default_dataset_root(**kw)
    assert first.parent == tmp_path / "cache" and first.name.startswith("brats_phantom-v2-")
    seg = first / "Phantom_000" / "Phantom_000_seg.nii.gz"
    mtime = seg.stat().st_mtime_ns
    assert phantom.default_dataset_root(**kw) == first
    assert seg.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]  # no temp left
    assert phantom.default_dataset_root(**{**kw, "seed": 1}) != first


# ----------------------------------------------------------------------------------------------
# Labels


def test_label_to_regions_numpy_and_jax():
    seg = np.array([[0, 1, 2], [4, 2, 0]], np.int32)
    want = np.array(
        [
            [[0, 0, 0], [1, 1, 0], [1, 0, 0]],
            [[1, 1, 1], [1, 0, 0], [0, 0, 0]],
        ],
        bool,
    )
    got = brats.label_to_regions(seg)
    assert got.dtype == bool and got.shape == (2, 3, 3)
    np.testing.assert_array_equal(got, want)
    got_j = brats.label_to_regions(jnp.asarray(seg))
    assert got_j.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got_j), want)


def test_labels_to_index():
    seg = np.array([0, 1, 2, 4, 4], np.uint8)
    idx = brats.labels_to_index(seg, path="x_seg.nii.gz")
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(idx, [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(brats.INDEX_TO_LABEL[idx], seg)
    with pytest.raises(DataError, match=r"bad_seg\.nii\.gz.*\[3\]"):
        brats.labels_to_index(np.array([0, 3, 1]), path="bad_seg.nii.gz")


# ----------------------------------------------------------------------------------------------
# Source + preprocessing


def test_source_record(source):
    assert len(source) == NUM_CASES
    rec = source[2]
    assert rec["image"].shape == (*SHAPE, 4) and rec["image"].dtype == np.float32
    assert rec["label"].shape == SHAPE and rec["label"].dtype == np.int32
    assert rec["case_index"] == 2 and rec["case_index"].dtype == np.int32
    assert rec["affine"].shape == (4, 4) and rec["affine"].dtype == np.float64
    unlabelled = brats.BratsSource(source.cases, with_label=False)[0]
    assert "label" not in unlabelled


def test_normalize_intensity(source):
    image = source[0]["image"]
    fg = np.any(image != 0, axis=-1)
    z = preprocess.normalize_intensity(image, method="zscore")
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[fg].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(z[fg].std(0), 1, atol=1e-3)
    assert np.all(z[~fg] == 0)
    m = preprocess.normalize_intensity(image, method="minmax")
    np.testing.assert_allclose(m[fg].min(0), 0, atol=1e-6)
    np.testing.assert_allclose(m[fg].max(0), 1, atol=1e-6)
    assert m.min() >= 0 and m.max() <= 1
    const = preprocess.normalize_intensity(np.ones((4, 4, 4, 2), np.float32))
    assert np.all(np.isfinite(const)) and np.all(const == 0)
    with pytest.raises(ConfigError, match="config.data.normalization"):
        preprocess.normalize_intensity(image, method="bogus")


def test_resize_labels_nearest():
    # Linear interpolation between labels 0 and 3 would create 1s and 2s at the boundary.
    label = np.zeros((7, 9, 5), np.int32)
    label[2:5, 3:7, 1:4] = 3
    image = np.random.default_rng(0).random((7, 9, 5, 2)).astype(np.float32)
    img, lab = preprocess.fit_to_cube(image, label, size=16, mode="resize")
    assert img.shape == (16, 16, 16, 2) and img.dtype == np.float32
    assert lab.shape == (16, 16, 16) and lab.dtype == np.int32
    assert set(np.unique(lab).tolist()) == {0, 3}
    with pytest.raises(ConfigError, match="config.data.resize_mode"):
        preprocess.fit_to_cube(image, label, size=16, mode="bogus")


@pytest.mark.parametrize("mode", ["resize", "crop_pad"])
def test_preprocess_to_cube(source, mode):
    size = 16
    t = preprocess.Preprocess(size=size, mode=mode, normalization="zscore")
    for i in range(len(source)):
        raw = source[i]
        out = t.map(raw)
        assert set(out) == {"image", "label", "case_index"}
        assert out["image"].shape == (size,) * 3 + (4,) and out["image"].dtype == np.float32
        assert out["label"].shape == (size,) * 3 and out["label"].dtype == np.int32
        assert set(np.unique(out["label"]).tolist()) == {0, 1, 2, 3}
        if mode == "crop_pad":
            # Cropped around the head's centre: most of the tumour survives the crop.
            assert (out["label"] > 0).sum() > 0.5 * (raw["label"] > 0).sum()
    # Padding only (cube larger than every axis): every tumour voxel kept, exactly.
    big = preprocess.Preprocess(size=26, mode="crop_pad", normalization="minmax").map(source[0])
    raw_label = source[0]["label"]
    kept = np.sort(big["label"][big["label"] > 0])
    assert np.array_equal(kept, np.sort(raw_label[raw_label > 0]))
    assert big["image"].min() >= 0 and big["image"].max() <= 1


# ----------------------------------------------------------------------------------------------
# grain pipeline


def _take(ds, n):
    it = iter(ds)
    try:
        return [next(it) for _ in range(n)]
    finally:
        if hasattr(it, "close"):
            it.close()


def test_train_dataset_batches_and_epochs(source):
    t = preprocess.Preprocess(size=8, mode="resize", normalization="zscore")
    batches = _take(pipeline.make_train_dataset(source, t, batch_size=1, seed=3), 3 * 6)
    b = batches[0]
    assert b["image"].shape == (1, 8, 8, 8, 4) and b["label"].shape == (1, 8, 8, 8)
    assert b["case_index"].shape == (1,)
    order = [int(b["case_index"][0]) for b in batches]
    epochs = [tuple(order[i : i + 3]) for i in range(0, len(order), 3)]
    assert all(sorted(e) == [0, 1, 2] for e in epochs)  # each epoch visits every case once
    assert len(set(epochs)) > 1  # reshuffled between epochs
    again = _take(pipeline.make_train_dataset(source, t, batch_size=1, seed=3), 3 * 6)
    assert [int(b["case_index"][0]) for b in again] == order
    other = _take(pipeline.make_train_dataset(source, t, batch_size=1, seed=4), 3 * 6)
    assert [int(b["case_index"][0]) for b in other] != order


@pytest.mark.slow
def test_train_dataset_multiprocess_matches(source):
    t = preprocess.Preprocess(size=8, mode="resize", normalization="zscore")
    kw = dict(batch_size=2, seed=0)
    ref = _take(pipeline.make_train_dataset(source, t, num_workers=0, **kw), 4)
    mp = _take(pipeline.make_train_dataset(source, t, num_workers=2, **kw), 4)
    assert ref[0]["image"].shape == (2, 8, 8, 8, 4)
    for a, b in zip(ref, mp):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_train_dataset_shards(source):
    t = preprocess.Preprocess(size=8, mode="resize", normalization="zscore")
    full = _take(pipeline.make_train_dataset(source, t, batch_size=1, seed=0), 6)
    s1 = _take(
        pipeline.make_train_dataset(source, t, batch_size=1, seed=0, shard_index=1, shard_count=2),
        3,
    )
    assert [int(b["case_index"][0]) for b in s1] == [int(b["case_index"][0]) for b in full[1::2]]


def test_eval_dataset(source):
    t = preprocess.Preprocess(size=8, mode="resize", normalization="zscore")
    ds = pipeline.make_eval_dataset(source, t)
    assert len(ds) == NUM_CASES
    assert [int(ds[i]["case_index"]) for i in range(len(ds))] == [0, 1, 2]
    assert ds[0]["image"].shape == (8, 8, 8, 4)


# ----------------------------------------------------------------------------------------------
# Bad input: each a DataError naming the offending file


def test_missing_root_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        brats.find_cases(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty: no case folders found.*<case>_\{t1"):
        brats.find_cases(tmp_path / "empty")


def test_missing_modality(root, tmp_path):
    data, cases = _copy_dataset(root, tmp_path)
    cases[1].images[3].unlink()
    with pytest.raises(DataError, match=r"Phantom_001_flair\.nii\.gz: missing flair"):
        brats.find_cases(data)
    cases[2].label.unlink()
    (data / "Phantom_001").rename(data / ".Phantom_001")  # hidden folders are ignored
    with pytest.raises(DataError, match=r"Phantom_002_seg\.nii\.gz: missing segmentation"):
        brats.find_cases(data)
    assert len(brats.find_cases(data, require_label=False)) == 2


def test_corrupt_files(root, tmp_path):
    data, cases = _copy_dataset(root, tmp_path)
    garbage = cases[0].images[1]
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    truncated = cases[1].images[2]
    truncated.write_bytes(truncated.read_bytes()[:800])
    # A valid gzip stream holding too few bytes: header parses, data read fails.
    short = cases[2].label
    short.write_bytes(gzip.compress(gzip.decompress(short.read_bytes())[:400]))
    for path in (garbage, truncated, short):
        with pytest.raises(DataError, match=re.escape(str(path))):
            nifti.load_nifti(path)
    src = brats.BratsSource(cases)
    for i, path in enumerate((garbage, truncated, short)):
        with pytest.raises(DataError, match=re.escape(str(path))):
            src[i]
    with pytest.raises(DataError, match="NIfTI file not found"):
        nifti.load_nifti(tmp_path / "absent.nii.gz")


def test_shape_mismatch_and_affine_mismatch(root, tmp_path):
    data, cases = _copy_dataset(root, tmp_path)
    seg, affine = nifti.load_nifti(cases[0].label, dtype=np.int32, canonical=False)
    nifti.save_nifti(cases[0].label, seg[:-2].astype(np.uint8), affine)
    want = re.escape(str(cases[0].label)) + r": shape \(18, 24, 18\) differs from .*Phantom_000_t1"
    with pytest.raises(DataError, match=want):
        brats.BratsSource(cases)[0]
    t2, affine = nifti.load_nifti(cases[1].images[2], canonical=False)
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    nifti.save_nifti(cases[1].images[2], t2, shifted)
    with pytest.raises(DataError, match=re.escape(str(cases[1].images[2])) + ": affine"):
        brats.BratsSource(cases)[1]


def test_bad_label_values(root, tmp_path):
    data, cases = _copy_dataset(root, tmp_path)
    seg, affine = nifti.load_nifti(cases[0].label, dtype=np.int32, canonical=False)
    seg[0, 0, 0] = 3
    nifti.save_nifti(cases[0].label, seg.astype(np.uint8), affine)
    want = re.escape(str(cases[0].label)) + r": unexpected label values \[3\]"
    with pytest.raises(DataError, match=want):
        brats.BratsSource(cases)[0]


def test_nan_voxels(root, tmp_path):
    data, cases = _copy_dataset(root, tmp_path)
    img, affine = nifti.load_nifti(cases[0].images[0], canonical=False)
    img[3, 4, 5] = np.nan
    nifti.save_nifti(cases[0].images[0], img, affine)
    with pytest.raises(DataError, match=re.escape(str(cases[0].images[0])) + ": 1 NaN or Inf"):
        brats.BratsSource(cases)[0]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_error_surfaces_through_pipeline(root, tmp_path, num_workers):
    data, cases = _copy_dataset(root, tmp_path)
    bad = cases[1].images[0]
    bad.write_bytes(bad.read_bytes()[:1000])
    t = preprocess.Preprocess(size=8, mode="resize", normalization="zscore")
    ds = pipeline.make_train_dataset(
        brats.BratsSource(cases), t, batch_size=1, seed=0, num_workers=num_workers
    )
    # grain re-raises the worker's exception in the caller, type and message intact.
    with pytest.raises(DataError, match=re.escape(str(bad))):
        _take(ds, 2 * NUM_CASES)


def test_save_nifti_atomic_no_temp_left(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nifti.save_nifti(tmp_path / "x.nii.gz", arr, np.diag([2.0, 1.0, 3.0, 1.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]
    data, affine = nifti.load_nifti(tmp_path / "x.nii.gz", dtype=np.int16)
    np.testing.assert_array_equal(data, arr)
    np.testing.assert_allclose(affine, np.diag([2.0, 1.0, 3.0, 1.0]))


def test_cached_source_gives_the_same_batches_within_budget(tmp_path):
    from ssl3d_jax.data import phantom as _phantom
    from ssl3d_jax.data.pipeline import CachedSource

    root = tmp_path / "cached"
    _phantom.write_brats_phantom(root, num_cases=3, shape=(20, 24, 18), seed=1)
    source = brats.BratsSource(brats.find_cases(root), with_label=True)
    transform = preprocess.Preprocess(size=12, mode="resize", normalization="zscore")

    def batches(cache_bytes):
        ds = pipeline.make_train_dataset(
            source, transform, batch_size=2, seed=5, num_threads=2, cache_bytes=cache_bytes
        )
        it = iter(ds)
        return [next(it) for _ in range(4)]

    plain, cached = batches(0), batches(10 * 2**20)
    for a, b in zip(plain, cached):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    one_record = 12**3 * 4 * 4 + 12**3 * 4 + 4  # image float32, label int32, case_index
    small = CachedSource(source, transform, cache_bytes=one_record)
    for i in range(len(source)):
        small[i]
    assert len(small._cache) == 1 and small._used <= one_record
