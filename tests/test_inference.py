"""Sliding-window inference: window grid, blending, padding, batching and one compile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax import inference


def voxelwise(x):
    """[N, *window, C] -> [N, *window, 2]: logits that depend on each voxel alone."""
    x = np.asarray(x)
    a = x[..., 0] + 2.0 * x[..., -1]
    return np.stack([a, -a], axis=-1)


class Recorder:
    """Wraps a predict_fn, recording the input shapes it was called with."""

    def __init__(self, fn):
        self.fn = fn
        self.shapes = []

    def __call__(self, batch):
        self.shapes.append(batch.shape)
        return self.fn(batch)


def test_window_starts():
    assert inference.window_starts(20, 8, 4) == [0, 4, 8, 12]
    assert inference.window_starts(21, 8, 4) == [0, 4, 8, 12, 13]  # last flush to the border
    assert inference.window_starts(8, 8, 4) == [0]
    assert inference.window_starts(5, 8, 4) == [0]


@pytest.mark.parametrize(
    "shape,window",
    [
        ((5, 7, 6), (8, 8, 8)),  # smaller than the window on every axis
        ((16, 16, 16), (8, 8, 8)),  # divisible
        ((21, 13, 9), (8, 8, 8)),  # larger, not divisible, mixed
        ((30, 17), (8, 8)),  # 2D
        ((6, 19), (8, 8)),  # 2D, one axis smaller
    ],
)
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_voxelwise_prediction_equals_whole_volume(shape, window, blend):
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((*shape, 2)).astype(np.float32)
    rec = Recorder(voxelwise)
    out = inference.sliding_window(
        rec, volume, window=window, overlap=0.5, batch_size=3, blend=blend
    )
    expected = voxelwise(volume[None])[0]
    assert out.shape == (*shape, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Every call has the same shape: exactly batch_size windows.
    assert set(rec.shapes) == {(3, *window, 2)}


def test_no_overlap_is_exact_and_counts_windows():
    volume = np.random.default_rng(1).standard_normal((16, 24, 8, 1)).astype(np.float32)
    rec = Recorder(voxelwise)
    out = inference.sliding_window(
        rec, volume, window=(8, 8, 8), overlap=0.0, batch_size=4, blend="constant"
    )
    np.testing.assert_array_equal(out, voxelwise(volume[None])[0])  # one window per voxel
    assert len(rec.shapes) == 2  # 2 * 3 * 1 = 6 windows in 2 batches of 4 (last padded)


def test_blending_weights_centre():
    """Overlapping windows that disagree are blended: the Gaussian favours window centres."""
    calls = iter(range(100))

    def window_id(batch):  # each window predicts its own running number everywhere
        ids = np.array([next(calls) for _ in range(batch.shape[0])], np.float32)
        return np.broadcast_to(ids[:, None, None, None], (*batch.shape[:-1], 1)).copy()

    volume = np.zeros((12, 8, 1), np.float32)  # windows start at 0 and 4 along axis 0
    out = inference.sliding_window(window_id, volume, window=(8, 8), batch_size=1)[..., 0]
    assert out[0, 4] == 0.0 and out[11, 4] == 1.0  # covered by one window only
    assert 0.0 < out[5, 4] < 0.5 < out[6, 4] < 1.0  # overlap: nearer centre wins more
    flat = inference.sliding_window(
        window_id, volume, window=(8, 8), batch_size=1, blend="constant"
    )[..., 0]
    np.testing.assert_allclose(flat[4:8], 2.5)  # plain mean of windows 2 and 3


def test_jitted_model_compiles_once():
    traces = []

    @jax.jit
    def predict(x):
        traces.append(x.shape)  # runs only while tracing
        return jnp.concatenate([x[..., :1] * 3.0, -x[..., :1]], axis=-1)

    rng = np.random.default_rng(2)
    for shape in [(9, 8, 8), (17, 11, 20), (5, 5, 5)]:
        volume = rng.standard_normal((*shape, 1)).astype(np.float32)
        out = inference.sliding_window(predict, volume, window=(8, 8, 8), batch_size=2)
        np.testing.assert_allclose(out[..., 0], 3.0 * volume[..., 0], rtol=1e-5, atol=1e-5)
    assert len(traces) == 1


def test_bad_arguments():
    vol = np.zeros((8, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="spatial axes"):
        inference.sliding_window(voxelwise, vol[..., 0], window=(8, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        inference.sliding_window(voxelwise, vol, window=(8, 8, 8), overlap=1.0)
    with pytest.raises(ValueError, match="predict_fn returned"):
        inference.sliding_window(lambda x: x[:, :4], vol, window=(8, 8, 8))
    with pytest.raises(ValueError, match="blend"):
        inference.sliding_window(voxelwise, vol, window=(8, 8, 8), blend="max")
