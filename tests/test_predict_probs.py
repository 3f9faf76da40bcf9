"""Class probabilities of a preprocessed volume (`finetune.predict_probs`), which evaluation maps
to the scan's grid before the argmax, and the argmax labels of `predict_volume`."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl3d_jax.train import finetune

K = 3


def _config(size: int, spatial_dims: int):
    return ml_collections.ConfigDict(
        {
            "data": {"size": size, "spatial_dims": spatial_dims},
            "finetune": {"sliding_window_overlap": 0.5},
        }
    )


def _logits(x: np.ndarray) -> np.ndarray:
    """A voxel-wise 'model': logits from the input channels, so that the expected softmax of any
    volume is known whatever the windows or slices it is cut into."""
    x = np.asarray(x, np.float32)
    return np.stack([x[..., 0], 2.0 * x[..., 1], x[..., 0] - x[..., 1]], -1)


def _predict(params, x):
    assert params == "params"
    return jnp.asarray(_logits(x))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize(
    "size,spatial_dims,shape",
    [(6, 3, (6, 6, 6)), (6, 2, (6, 6, 6)), (4, 3, (7, 5, 6))],  # cube, 2D slices, windows
)
def test_predict_probs_softmax_and_argmax(size, spatial_dims, shape):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(*shape, 2)).astype(np.float32) * 3
    config = _config(size, spatial_dims)
    probs = finetune.predict_probs(config, _predict, "params", volume)
    assert probs.shape == (*shape, K) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # Voxel-wise model: slices stacked back on the axial axis, windows blended to the same.
    np.testing.assert_allclose(probs, _softmax(_logits(volume)), atol=1e-5)
    labels = finetune.predict_volume(config, _predict, "params", volume)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, _logits(volume).argmax(-1))
