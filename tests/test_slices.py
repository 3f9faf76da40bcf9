"""2D training data: axial slices of the preprocessed volumes."""

from __future__ import annotations

import numpy as np
import pytest

from ssl3d_jax.data.slices import AXIAL_AXIS, SliceSource


class _Volumes:
    """Two 6³ volumes whose voxels hold (volume, x, y, z) codes."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        x, y, z = np.meshgrid(*[np.arange(6)] * 3, indexing="ij")
        code = (i * 1000 + x * 100 + y * 10 + z).astype(np.float32)
        return {
            "image": np.stack([code, -code], axis=-1),
            "label": (z % 4).astype(np.int32),
            "case_index": np.int32(i),
        }


def test_slices_are_the_central_axial_slices():
    src = SliceSource(_Volumes(), size=6, keep_fraction=0.5)
    assert src.slices_per_volume == 3 and len(src) == 6
    seen = []
    for i in range(len(src)):
        rec = src[i]
        v, z = int(rec["case_index"]), int(rec["slice_index"])
        seen.append((v, z))
        assert rec["image"].shape == (6, 6, 2) and rec["label"].shape == (6, 6)
        expected = np.take(_Volumes()[v]["image"], z, axis=AXIAL_AXIS)
        np.testing.assert_array_equal(rec["image"], expected)
        # Axial: the third spatial axis (superior, after RAS reorientation) is fixed.
        assert np.all(rec["image"][..., 0] % 10 == z)
        np.testing.assert_array_equal(rec["label"], np.full((6, 6), z % 4))
    assert seen == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]


def test_keep_fraction_is_checked():
    with pytest.raises(ValueError, match="keep_fraction"):
        SliceSource(_Volumes(), size=6, keep_fraction=0.0)
