"""Frozen-encoder probes: pooled features, a weighted kNN classifier, and an online kNN probe.

The kNN probe (Wu et al., CVPR 2018 "Unsupervised feature learning via non-parametric instance
discrimination"; Caron et al., ICCV 2021, DINO) classifies a query by the cosine-similarity
weighted vote of its k nearest training samples, weights `exp(sim / T)`. It needs no training, so
it can run every few hundred pretraining steps as an online signal of representation quality.

Segmentation datasets have no per-sample label; `patch_presence_dataset` turns them into one:
patches on a regular grid, labelled by whether their central half holds foreground.

Decisions:
  * Pooled features are the global max pool of the bottom features only (the pooling every
    pretext head uses), by default. The bottom is what pretraining shapes most; pooled shallow
    skips mostly carry intensity statistics that a random encoder already has, which would flatten
    the curve. `with_skips=True` adds every pooled skip, each level L2-normalised first so that
    every level weighs the same in the cosine whatever its width or magnitude.
  * Zero feature vectors (possible: features are post-ReLU) are normalised with an epsilon and
    have similarity 0 to everything rather than NaN.
  * `KnnProbe` runs on ONE device (the first by default): pooled features of the whole probe set
    come from one jitted call (`lax.map` over fixed-size batches, the last one zero-padded), with
    the data kept on that device between calls; a replicated encoder is copied there (a few MB).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.unet import global_max_pool

__all__ = [
    "pooled_features",
    "knn_predict",
    "patch_presence_dataset",
    "balanced_accuracy",
    "KnnProbe",
]

log = logging.getLogger(__name__)

_EPS = 1e-12


def _l2_normalize(x: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, _EPS)


def pooled_features(encoder: nnx.Module, x: jax.Array, *, with_skips: bool = False) -> jax.Array:
    """Global max-pooled encoder features, the encoder in inference mode (no dropout).

    Args:
      encoder: an `Encoder3D` (or anything called `(x, train=False) -> (features, skips)`).
      x: `[B, *spatial, C]` float, spatial = (D, H, W) or (H, W).
      with_skips: False: `[B, bottom_filters]`, the bottom's global max pool. True: every skip's
        pool (shallow -> deep) then the bottom's, each L2-normalised, concatenated:
        `[B, sum(filters) + bottom_filters]`.

    Returns:
      `[B, F]` float32.
    """
    features, skips = encoder(x, train=False)
    if not with_skips:
        return global_max_pool(features).astype(jnp.float32)
    levels = [global_max_pool(f).astype(jnp.float32) for f in (*skips, features)]
    return jnp.concatenate([_l2_normalize(v) for v in levels], axis=-1)


def knn_predict(
    train_feats: jax.Array,
    train_labels: jax.Array,
    query_feats: jax.Array,
    *,
    k: int = 20,
    num_classes: int,
    temperature: float = 0.07,
) -> jax.Array:
    """Weighted kNN vote (Wu et al. 2018, as in DINO's `eval_knn.py`).

    Each query takes its k most cosine-similar training samples and adds `exp(sim / T)` to the
    score of each neighbour's class; the prediction is the highest score (ties: lowest class
    index). Pure `jnp`; jit with `k`, `num_classes` (and `temperature`) static.

    Args:
      train_feats: `[N, F]` float.
      train_labels: `[N]` int in `[0, num_classes)`.
      query_feats: `[M, F]` float.
      k: neighbours; clipped to N.
      num_classes: number of classes.
      temperature: T; small T lets the nearest neighbours dominate, large T tends to a plain
        majority vote.

    Returns:
      `[M]` int32 predicted classes.
    """
    if k < 1:
        raise ConfigError(f"knn_predict: k must be >= 1, got {k}")
    n = train_feats.shape[0]
    k = min(int(k), n)
    train_n = _l2_normalize(train_feats.astype(jnp.float32))
    query_n = _l2_normalize(query_feats.astype(jnp.float32))
    sim = jnp.matmul(query_n, train_n.T, precision=jax.lax.Precision.HIGHEST)  # [M, N]
    top_sim, top_idx = jax.lax.top_k(sim, k)  # [M, k], best first
    # Shifting by the best similarity rescales a query's weights uniformly (same vote), and keeps
    # exp() finite for tiny temperatures.
    weights = jnp.exp((top_sim - top_sim[:, :1]) / temperature)
    onehot = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=jnp.float32)  # [M, k, K]
    scores = jnp.einsum("mk,mkc->mc", weights, onehot)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean per-class recall over the classes present in `labels` (`[M]` ints)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    recalls = [float(np.mean(preds[labels == c] == c)) for c in np.unique(labels)]
    return float(np.mean(recalls))


def _grid_starts(size: int, patch: int, stride: int) -> list[int]:
    return list(range(0, size - patch + 1, stride))


def patch_presence_dataset(
    volumes: np.ndarray, labels: np.ndarray, *, patch: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch labels from a segmentation dataset: "does this patch's centre hold foreground?".

    Cuts a regular grid of `patch`-sided cubes (squares in 2D) from every volume, starting at 0
    with step `stride` along each axis (the high-end remainder is not covered when the size is not
    `patch + j * stride`). A patch is positive (1) when its central half, the voxels
    `[patch // 4, patch - patch // 4)` along each axis (half the side, rounded up), holds any
    label > 0 (background is class 0). The centre rather than the whole patch: foreground touching
    only the border is barely seen by the features and makes the label ambiguous.

    Args:
      volumes: `[N, D, H, W, C]` (3D) or `[N, H, W, C]` (2D) float.
      labels: `[N, D, H, W]` or `[N, H, W]` int class indices.
      patch: patch side in voxels.
      stride: grid step (default `patch`: non-overlapping).

    Returns:
      `(patches, has_foreground)`: `[P, patch, patch, patch, C]` (2D: `[P, patch, patch, C]`)
      float32, volume-major then grid in C order (last axis fastest); `[P]` int32 in {0, 1}. The
      positive rate is logged; balancing is the caller's business.
    """
    volumes = np.asarray(volumes)
    labels = np.asarray(labels)
    if labels.ndim not in (3, 4) or volumes.shape[:-1] != labels.shape:
        raise ConfigError(
            "patch_presence_dataset expects volumes [N, *spatial, C] and labels [N, *spatial] "
            f"with 2 or 3 spatial axes, got {volumes.shape} and {labels.shape}"
        )
    stride = patch if stride is None else stride
    spatial = labels.shape[1:]
    if patch < 1 or stride < 1 or patch > min(spatial):
        raise ConfigError(
            f"patch_presence_dataset: patch={patch} and stride={stride} must be >= 1, patch at "
            f"most the smallest spatial size of {spatial}"
        )
    starts = np.stack(
        np.meshgrid(*[_grid_starts(s, patch, stride) for s in spatial], indexing="ij"), -1
    ).reshape(-1, len(spatial))
    lo, hi = patch // 4, patch - patch // 4
    patches, present = [], []
    for vol, lab in zip(volumes, labels):
        for start in starts:
            window = tuple(slice(int(s), int(s) + patch) for s in start)
            centre = tuple(slice(int(s) + lo, int(s) + hi) for s in start)
            patches.append(vol[window])
            present.append(bool(np.any(lab[centre] > 0)))
    out = np.stack(patches).astype(np.float32)
    has_fg = np.asarray(present, np.int32)
    log.info(
        "patch_presence_dataset: %d patches of %d^%d, %.1f%% with foreground",
        len(has_fg),
        patch,
        len(spatial),
        100.0 * float(has_fg.mean()) if len(has_fg) else 0.0,
    )
    return out, has_fg


class KnnProbe:
    """Online kNN probe of an encoder on a fixed labelled probe set (pooled features, cosine kNN).

    Built once from host arrays; `probe(encoder)` then costs one jitted call that embeds the train
    and test samples (fixed-size batches, the last zero-padded, padding dropped before the kNN) and
    votes. The call is compiled once: the encoder's structure (graphdef) is static, its weights
    are arguments, so later calls with new weights (the same architecture) reuse it.

    Args:
      train_x: `[N, *spatial, C]` float (spatial = (D, H, W) or (H, W)).
      train_y: `[N]` int in `[0, num_classes)`.
      test_x: `[M, *spatial, C]`, the same per-sample shape as `train_x`.
      test_y: `[M]` int.
      num_classes: classes of the kNN vote.
      k: neighbours (clipped to N).
      batch_size: samples per encoder call.
      temperature: kNN weight temperature T.
      with_skips: see `pooled_features`.
      device: where the probe runs (default: `jax.devices()[0]`).

    Call:
      `probe(encoder: nnx.Module) -> {'knn_accuracy': float, 'knn_balanced_accuracy': float}`;
      balanced accuracy is the mean recall over the classes present in `test_y`. With pure params
      (e.g. a train state), pass `nnx.merge(graphdef, state.params).encoder`.

    Attributes:
      num_traces: how many times the jitted function was traced (1 after any number of calls on
        encoders of one architecture).
    """

    def __init__(
        self,
        train_x: np.ndarray,
        train_y: np.ndarray,
        test_x: np.ndarray,
        test_y: np.ndarray,
        *,
        num_classes: int,
        k: int = 20,
        batch_size: int = 32,
        temperature: float = 0.07,
        with_skips: bool = False,
        device=None,
    ):
        train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
        train_y, test_y = np.asarray(train_y), np.asarray(test_y)
        if train_x.ndim not in (4, 5) or train_x.shape[1:] != test_x.shape[1:]:
            raise ConfigError(
                "KnnProbe expects train_x and test_x [N, *spatial, C] with 2 or 3 spatial axes "
                f"and the same per-sample shape, got {train_x.shape} and {test_x.shape}"
            )
        for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
            if y.shape != (len(x),) or len(x) == 0:
                raise ConfigError(
                    f"KnnProbe: {name}_y must be [{len(x)}] (one label per {name}_x sample, at "
                    f"least one sample), got shape {y.shape}"
                )
            if np.any((y < 0) | (y >= num_classes)):
                raise ConfigError(f"KnnProbe: {name}_y holds labels outside [0, {num_classes})")
        if batch_size < 1 or k < 1:
            raise ConfigError(f"KnnProbe: batch_size={batch_size} and k={k} must be >= 1")
        self.num_classes = int(num_classes)
        self.k = int(k)
        self.temperature = float(temperature)
        self.with_skips = bool(with_skips)
        self.batch_size = int(batch_size)
        self.num_train, self.num_test = len(train_x), len(test_x)
        self.device = jax.local_devices()[0] if device is None else device
        self.num_traces = 0

        x = np.concatenate([train_x, test_x])
        pad = -len(x) % self.batch_size
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        x = x.reshape(-1, self.batch_size, *x.shape[1:])
        self._x = jax.device_put(x, self.device)
        self._train_y = jax.device_put(train_y.astype(np.int32), self.device)
        self._test_y = test_y.astype(np.int64)
        self._predict = jax.jit(self._predict_impl, static_argnums=0)

    def _predict_impl(self, graphdef, state, x, train_y):
        self.num_traces += 1  # trace time only

        def embed(batch):
            encoder = nnx.merge(graphdef, state)
            return pooled_features(encoder, batch, with_skips=self.with_skips)

        feats = jax.lax.map(embed, x)  # [num_batches, batch_size, F]
        feats = feats.reshape(-1, feats.shape[-1])
        n, m = self.num_train, self.num_test
        return knn_predict(
            feats[:n],
            train_y,
            feats[n : n + m],
            k=self.k,
            num_classes=self.num_classes,
            temperature=self.temperature,
        )

    def predict(self, encoder: nnx.Module) -> np.ndarray:
        """`[M]` int32 kNN predictions for the test samples."""
        graphdef, state = nnx.split(encoder)
        from ssl3d_jax.parallel import local_copy

        state = local_copy(state, self.device)
        return np.asarray(self._predict(graphdef, state, self._x, self._train_y))

    def __call__(self, encoder: nnx.Module) -> dict[str, float]:
        preds = self.predict(encoder)
        return {
            "knn_accuracy": float(np.mean(preds == self._test_y)),
            "knn_balanced_accuracy": balanced_accuracy(self._test_y, preds),
        }

    @classmethod
    def from_segmentation(
        cls,
        train_volumes: np.ndarray,
        train_labels: np.ndarray,
        test_volumes: np.ndarray,
        test_labels: np.ndarray,
        *,
        patch: int,
        stride: int | None = None,
        **kwargs,
    ) -> KnnProbe:
        """A foreground-presence probe (2 classes) from segmentation volumes.

        Split by case (train and test volumes distinct) so that no test patch has a neighbouring,
        overlapping patch of the same scan in the train set. Arrays as in
        `patch_presence_dataset`; `kwargs` go to `KnnProbe` (`num_classes` is 2).
        """
        tx, ty = patch_presence_dataset(train_volumes, train_labels, patch=patch, stride=stride)
        vx, vy = patch_presence_dataset(test_volumes, test_labels, patch=patch, stride=stride)
        return cls(tx, ty, vx, vy, num_classes=2, **kwargs)
