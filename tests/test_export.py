"""Export of predictions: inverse preprocessing back to the scan's grid and NIfTI writing that
matches the reference scan (shape, affine, orientation, on-disk label values)."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from ssl3d_jax.data import export, nifti, preprocess
from ssl3d_jax.errors import DataError

# Stored (on-disk) shape, deliberately non-cubic; spacing anisotropic.
SHAPE = (24, 20, 14)
SPACING = (1.1, 0.9, 2.0)
LABEL_VALUES = (0, 1, 2, 4)  # BraTS-like: class 3 is written as 4


def _oblique_permuted_affine():
    """Voxel axes stored as (S, L, P) with a small rotation: not RAS, not diagonal, so loading
    reorders and flips axes, and the export has to undo it."""
    # Columns: axis 0 -> +z (S), axis 1 -> -x (L), axis 2 -> -y (P).
    base = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], np.float64)
    a, b = np.deg2rad(6.0), np.deg2rad(-4.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ base @ np.diag(SPACING)
    aff[:3, 3] = [31.5, -12.25, 7.0]
    return aff


def _write_case(folder, *, four_d: bool, qform_only: bool = False):
    shape = SHAPE
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centre = (np.asarray(shape) - 1) / 2
    head = (((grid - centre) / (np.asarray(shape) * 0.5)) ** 2).sum(-1) <= 1
    rng = np.random.default_rng(0)
    image = np.zeros((*shape, 2), np.float32)
    image[head] = 50 + 10 * rng.random((head.sum(), 2))
    seg = np.zeros(shape, np.int16)
    # Solid blobs a few voxels across: resampling down and back costs each a thin rim only.
    for value, offset in ((1, [-6, 3, 0]), (2, [6, 3, 0]), (4, [0, -5, 0])):
        seg[(((grid - (centre + offset)) / [5, 4.5, 3.5]) ** 2).sum(-1) <= 1] = value
    seg[~head] = 0
    aff = _oblique_permuted_affine()

    def save(path, data):
        if qform_only:  # as some scanners write: no sform, quaternion-coded qform only
            hdr = nib.Nifti1Header()
            hdr.set_qform(aff, code=1)
            hdr.set_sform(None, code=0)
            img = nib.Nifti1Image(data, None, header=hdr)
        else:
            img = nib.Nifti1Image(data, aff)
        nib.save(img, str(path))

    folder.mkdir(parents=True, exist_ok=True)
    if four_d:
        save(folder / "image.nii.gz", image)
    else:
        save(folder / "image.nii.gz", image[..., 0])
    save(folder / "label.nii.gz", seg)
    return folder / "image.nii.gz", folder / "label.nii.gz", seg


def _load_record(image_path, label_path):
    image, affine = nifti.load_nifti(image_path)
    if image.ndim == 3:
        image = image[..., None]
    seg, _ = nifti.load_nifti(label_path, dtype=np.int32)
    lut = np.zeros(max(LABEL_VALUES) + 1, np.int32)
    lut[list(LABEL_VALUES)] = np.arange(len(LABEL_VALUES))
    return {"image": image, "label": lut[seg], "case_index": np.int32(0), "affine": affine}


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def case4d(tmp_path_factory):
    return _write_case(tmp_path_factory.mktemp("ref4d"), four_d=True)


def test_reference_is_not_canonical(case4d):
    image_path, label_path, _ = case4d
    rec = _load_record(image_path, label_path)
    assert rec["image"].shape[:3] != SHAPE  # axes were reordered on load
    assert nib.aff2axcodes(nib.load(str(image_path)).affine) == ("S", "L", "P")


CONFIGS = list(
    itertools.product(
        [("resize", 16), ("crop_pad", 24), ("none", 8)],
        [None, (1.0, 1.0, 1.5), (1.5, 1.5, 1.5)],
        [True, False],
    )
)


@pytest.mark.parametrize("fit,spacing,crop", CONFIGS)
def test_export_roundtrip(case4d, tmp_path, fit, spacing, crop):
    mode, size = fit
    image_path, label_path, seg = case4d
    rec = _load_record(image_path, label_path)
    t = preprocess.Preprocess(
        size=size, mode=mode, spacing=spacing, crop_foreground=crop, keep_geometry=True
    )
    out = t.map(rec)
    # The preprocessed label stands in for a perfect prediction.
    native = export.to_native(out["label"], out["geometry"])
    assert native.shape == rec["label"].shape and native.dtype == out["label"].dtype
    path = export.save_prediction(
        native, image_path, tmp_path / "pred.nii.gz", label_values=LABEL_VALUES
    )
    ref = nib.load(str(image_path))
    got = nib.load(str(path))
    assert np.array_equal(got.shape, ref.shape[:3])  # 4D reference -> 3D label map
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-6)
    for k in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "srow_x"):
        np.testing.assert_array_equal(got.header[k], ref.header[k])
    assert got.get_data_dtype() == np.uint8
    data = np.asarray(got.dataobj)
    assert set(np.unique(data).tolist()) <= set(LABEL_VALUES)
    if mode in ("crop_pad", "none") and spacing is None:
        np.testing.assert_array_equal(data, seg)  # no resampling anywhere: exact
    else:
        # Nearest-neighbour resampling moves each boundary by up to half a voxel of the coarser
        # grid (and breaks exact ties one way, a shift of up to 1/3 voxel for a 2:3 ratio). On
        # blobs 4-5 voxels in radius, which the tiny test volume cannot avoid, one resampling
        # each way keeps Dice > 0.9; two (spacing + resize) or a 1.67x coarser grid > 0.85.
        n_resampled = (mode == "resize") + (spacing is not None)
        harsh = n_resampled > 1 or spacing == (1.5, 1.5, 1.5)
        for v in LABEL_VALUES[1:]:
            d = _dice(data == v, seg == v)
            assert d > (0.85 if harsh else 0.9), (v, d)
            # No gross shift: each blob's centre stays within ~half a coarse voxel.
            c_got = np.argwhere(data == v).mean(0)
            c_ref = np.argwhere(seg == v).mean(0)
            np.testing.assert_allclose(c_got, c_ref, atol=0.6)


def test_export_3d_qform_only_reference(tmp_path):
    image_path, label_path, seg = _write_case(tmp_path / "ref", four_d=False, qform_only=True)
    rec = _load_record(image_path, label_path)
    out = preprocess.Preprocess(size=24, mode="crop_pad", keep_geometry=True).map(rec)
    native = export.to_native(out["label"], out["geometry"])
    path = export.save_prediction(
        native, image_path, tmp_path / "pred.nii", label_values=LABEL_VALUES
    )
    got, ref = nib.load(str(path)), nib.load(str(image_path))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-6)
    assert int(got.header["sform_code"]) == 0 and int(got.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(got.dataobj), seg)
    # Class 3 is written as the on-disk value 4 and reads back as class 3.
    back, _ = nifti.load_nifti(path, dtype=np.int32)
    assert np.array_equal(back == 4, rec["label"] == 3) and (back == 4).any()


def test_to_native_probabilities(case4d):
    image_path, label_path, seg = case4d
    rec = _load_record(image_path, label_path)
    t = preprocess.Preprocess(size=16, mode="resize", keep_geometry=True)
    out = t.map(rec)
    onehot = np.eye(len(LABEL_VALUES), dtype=np.float32)[out["label"]]  # [S,S,S,K]
    probs = export.to_native(onehot, out["geometry"])
    assert probs.shape == (*rec["label"].shape, len(LABEL_VALUES)) and probs.dtype == np.float32
    labels = probs.argmax(-1)
    for c in range(1, len(LABEL_VALUES)):
        assert _dice(labels == c, rec["label"] == c) > 0.9


def test_export_errors(case4d, tmp_path):
    image_path, label_path, _ = case4d
    rec = _load_record(image_path, label_path)
    with pytest.raises(DataError, match="image.nii.gz.*does not fit"):
        export.save_prediction(
            np.zeros(SHAPE, np.int32), image_path, tmp_path / "x.nii.gz", label_values=(0, 1)
        )
    with pytest.raises(ValueError, match="class indices"):
        export.save_prediction(rec["label"], image_path, tmp_path / "x.nii.gz", label_values=(0, 1))
    with pytest.raises(DataError, match="missing.nii.gz"):
        export.save_prediction(
            rec["label"], tmp_path / "missing.nii.gz", tmp_path / "x.nii.gz", label_values=(0, 1)
        )
    assert not list(tmp_path.iterdir())  # nothing half-written
    t = preprocess.Preprocess(size=8, mode="resize", keep_geometry=True)
    out = t.map(rec)
    with pytest.raises(ValueError, match="preprocessed shape"):
        export.to_native(out["label"][:4], out["geometry"])


# ------------------------------------------------------------------------------------------------
# Class probabilities resampled to the scan's grid before the argmax (`probs_to_native`).


def _resize_geometry():
    # A model cube of 8³ resized from a 28 × 28 × 8 foreground box inside a 30 × 30 × 8 scan.
    return {
        "canonical_shape": [30, 30, 8],
        "crop_box": [[1, 29], [1, 29], [0, 8]],
        "resampled_shape": [28, 28, 8],
        "fitted_shape": [8, 8, 8],
        "fit": {"mode": "resize"},
    }


def test_probs_to_native_smooth_boundary_where_nearest_labels_staircase():
    geometry = _resize_geometry()
    # Tumour probability linear in the model grid's voxel-centre coordinates (in [0.07, 0.98]):
    # the true boundary p = 0.5 is the oblique line 0.08 (x - 3.2) + 0.05 (y - 3.5) = 0.
    x, y, _ = np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij")
    p1 = 0.5 + 0.08 * (x - 3.2) + 0.05 * (y - 3.5)
    probs = np.stack([1.0 - p1, p1], -1).astype(np.float32)

    # Expected: linear interpolation reproduces a linear function, so at each scan voxel the
    # probability is the line evaluated at its centre mapped to model coordinates (edges aligned,
    # clamped to the outermost centres, where the resampling repeats the edge value).
    centres = np.clip((np.arange(28) + 0.5) * 8 / 28 - 0.5, 0, 7)
    sx, sy = np.meshgrid(centres, centres, indexing="ij")
    margin = 0.08 * (sx - 3.2) + 0.05 * (sy - 3.5)
    assert np.abs(margin).min() > 1e-4  # no voxel on the boundary itself: no ties
    expected = np.zeros((30, 30, 8), np.int32)
    expected[1:29, 1:29, :] = (margin > 0)[..., None]

    got = export.probs_to_native(probs, geometry)
    assert got.shape == (30, 30, 8) and got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)

    # The old way: argmax on the 8³ grid, labels copied to 3.5-voxel blocks: a staircase that
    # misses the line by up to half a block.
    nearest = export.to_native(probs.argmax(-1).astype(np.int32), geometry)
    wrong = int((nearest != expected).sum())
    assert wrong >= 8 * 10, wrong  # dozens of voxels along the staircase, in every slice


@pytest.mark.parametrize("fit", [("crop_pad", 24), ("none", 8)])
@pytest.mark.parametrize("crop", [True, False])
def test_probs_to_native_identity_geometry_same_labels(case4d, fit, crop):
    # No resampling anywhere (no resize, no target spacing): argmax then map back is exact, and
    # the probability path must give the same labels.
    mode, size = fit
    image_path, label_path, _ = case4d
    rec = _load_record(image_path, label_path)
    out = preprocess.Preprocess(size=size, mode=mode, crop_foreground=crop, keep_geometry=True).map(
        rec
    )
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(len(LABEL_VALUES)), size=out["label"].shape).astype(np.float32)
    got = export.probs_to_native(probs, out["geometry"])
    np.testing.assert_array_equal(
        got, export.to_native(probs.argmax(-1).astype(np.int32), out["geometry"])
    )


def test_probs_to_native_unseen_voxels_are_background():
    # crop_pad window of 5 voxels cutting a 9-voxel resampled axis (the other axes whole or
    # padded), then resampled 9 -> 17 back to the box. Everything the model saw is tumour: the
    # voxels it never saw must stay background, the boundary where nearest neighbour puts it
    # (odd resampled size: no voxel centre exactly on the boundary).
    geometry = {
        "canonical_shape": [20, 8, 6],
        "crop_box": [[2, 19], [1, 6], [1, 5]],
        "resampled_shape": [9, 5, 4],
        "fitted_shape": [5, 5, 5],
        "fit": {
            "mode": "crop_pad",
            "src": [[2, 7], [0, 5], [0, 4]],
            "dst": [[0, 5], [0, 5], [0, 4]],
        },
    }
    labels = np.ones((5, 5, 5), np.int32)
    probs = np.eye(2, dtype=np.float32)[labels]
    got = export.probs_to_native(probs, geometry)
    want = export.to_native(labels, geometry)
    assert 0 < want.sum() < (want.size - 100)
    np.testing.assert_array_equal(got, want)
    # Zero probabilities there instead of background (what `to_native` of floats gives) would let
    # the tumour bleed into the unseen voxels next to the window.
    assert (export.to_native(probs, geometry).argmax(-1) != want).any()


def _forward_probs(label, geometry, k):
    """Class probabilities on the model's grid of an ideal model: the case's one-hot label pushed
    through the preprocessing's spatial steps linearly (each coarse voxel holds the fractions of
    the classes it covers); voxels of the padding are background."""
    box = tuple(slice(a, b) for a, b in geometry["crop_box"])
    x = preprocess.resample_image(
        np.eye(k, dtype=np.float32)[label][box], geometry["resampled_shape"]
    )
    fit = geometry["fit"]
    if fit["mode"] == "resize":
        return preprocess.resample_image(x, geometry["fitted_shape"])
    out = np.zeros((*geometry["fitted_shape"], k), np.float32)
    out[..., 0] = 1.0
    out[tuple(slice(a, b) for a, b in fit["dst"])] = x[tuple(slice(a, b) for a, b in fit["src"])]
    return out


@pytest.mark.parametrize(
    "mode,size,spacing",
    [
        ("resize", 16, (1.0, 1.0, 1.5)),
        ("resize", 8, None),
        ("crop_pad", 12, (1.5, 1.5, 2.0)),
        ("crop_pad", 24, None),
    ],
)
def test_probs_to_native_scan_shape_and_label_values(case4d, tmp_path, mode, size, spacing):
    image_path, label_path, seg = case4d
    rec = _load_record(image_path, label_path)
    out = preprocess.Preprocess(size=size, mode=mode, spacing=spacing, keep_geometry=True).map(rec)
    probs = _forward_probs(rec["label"], out["geometry"], len(LABEL_VALUES))
    native = export.probs_to_native(probs, out["geometry"])
    assert native.shape == rec["label"].shape and native.dtype == np.int32
    path = export.save_prediction(
        native, image_path, tmp_path / "pred.nii.gz", label_values=LABEL_VALUES
    )
    data = np.asarray(nib.load(str(path)).dataobj)
    assert data.shape == SHAPE
    assert set(np.unique(data).tolist()) == set(LABEL_VALUES)  # 0, 1, 2 and 4, nothing else
    back, _ = nifti.load_nifti(path, dtype=np.int32)
    np.testing.assert_array_equal(back, np.asarray(LABEL_VALUES)[native])  # class 3 <-> 4
    if spacing is None and mode == "crop_pad":
        np.testing.assert_array_equal(data, seg)  # no resampling: the labels come back exactly
        return
    # Resampled: the blobs come back close to the truth, closer than the nearest-neighbour
    # staircase of the argmax labels (blobs only ~2-5 model voxels across here).
    nearest = export.to_native(probs.argmax(-1).astype(np.int32), out["geometry"])
    ours = [_dice(native == c, rec["label"] == c) for c in range(1, len(LABEL_VALUES))]
    old = [_dice(nearest == c, rec["label"] == c) for c in range(1, len(LABEL_VALUES))]
    assert min(ours) > 0.85, ours
    assert np.mean(ours) > np.mean(old) + 0.03, (ours, old)
