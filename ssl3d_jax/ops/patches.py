"""Regular 3D patch grid with per-patch random jitter (the pretext tasks' cropping primitive).

Port of the original `preprocessing/utils/crop.py:crop_patches_3d` for `patch_jitter >= 0`
(Taleb et al., NeurIPS 2020; spec section 2.1): the volume is cut into a P x P x P grid of cells of
size `g = size // P` per axis, and from every cell a sub-cube of size `g - jitter` is taken at an
offset in `[0, jitter]` (uniform, independently per patch and per axis) when training, or at the
fixed offset `jitter // 2` otherwise. Leftover voxels at the high end (`size - P * g`) are never
used, as in the original. Patches come out in row-major grid order: cell `(i, j, k)` has index
`i * P * P + j * P + k`.

Deviations from the original:
  * The crop runs on device inside the jitted step (one `lax.dynamic_slice` per cell, vmapped),
    with a `jax.random` key instead of `np.random`; this measured as fast as a NumPy loop
    (cpu_measurements.md section 3) and keeps all SSL randomness in the pure train step.
  * The overlapping-patch mode of the original (`jitter < 0`, used only by 2D CPC) is not
    supported; a negative jitter raises `ConfigError`.
  * Per-axis cell sizes are allowed to differ (non-cubic volumes); the original assumed cubes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssl3d_jax.errors import ConfigError

__all__ = ["extract_grid", "num_patches", "patch_shape", "grid_starts", "slice_patches"]


def num_patches(patches_per_side: int) -> int:
    """Number of patches in a P x P x P grid, `P**3`."""
    return int(patches_per_side) ** 3


def patch_shape(
    volume_shape: tuple[int, ...], *, patches_per_side: int, jitter: int
) -> tuple[int, int, int]:
    """Spatial shape `(pd, ph, pw)` of every patch of the grid.

    Args:
      volume_shape: `(D, H, W)` or `(D, H, W, C)`; only the first three entries are used.
      patches_per_side: P, the grid has P cells per axis (static Python int >= 1).
      jitter: J >= 0, the patch is J voxels smaller than its cell per axis.

    Returns:
      `(D // P - J, H // P - J, W // P - J)`.

    Raises:
      ConfigError: if P < 1, J < 0, or a patch size would be < 1.
    """
    if int(patches_per_side) < 1:
        raise ConfigError(f"patches_per_side must be >= 1, got {patches_per_side}.")
    if int(jitter) < 0:
        raise ConfigError(
            f"jitter must be >= 0, got {jitter} (the original's overlapping mode, jitter < 0, "
            "is not supported)."
        )
    spatial = tuple(int(s) for s in volume_shape[:3])
    shape = tuple(s // patches_per_side - jitter for s in spatial)
    if min(shape) < 1:
        raise ConfigError(
            f"patch size would be {shape} < 1 for a volume of spatial shape {spatial} with "
            f"patches_per_side={patches_per_side} and jitter={jitter}: each cell (size // "
            "patches_per_side) must be larger than the jitter."
        )
    return shape  # type: ignore[return-value]


def grid_starts(
    volume_shape: tuple[int, ...],
    key: jax.Array | None,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
) -> jax.Array:
    """Start corners of all grid patches (cell origin + jitter offset).

    Args:
      volume_shape: `(D, H, W, ...)` static shape of the volume.
      key: a `jax.random` key; only used when `training` (may be None otherwise).
      patches_per_side: P (static).
      jitter: J (static).
      training: static; random offsets in `[0, J]` if True, else `J // 2`.

    Returns:
      `[P**3, 3]` int32, row-major grid order.
    """
    patch_shape(volume_shape, patches_per_side=patches_per_side, jitter=jitter)  # validates
    p = patches_per_side
    cells = np.stack(np.meshgrid(*([np.arange(p)] * 3), indexing="ij"), axis=-1).reshape(-1, 3)
    cell_size = np.array([int(s) // p for s in volume_shape[:3]])
    origins = jnp.asarray(cells * cell_size, dtype=jnp.int32)
    if training:
        if key is None:
            raise ConfigError("extract_grid(training=True) needs a jax.random key.")
        # maxval is exclusive: offsets are uniform in [0, jitter] inclusive, as np.random.randint
        # (0, jitter + 1) in the original.
        offsets = jax.random.randint(key, (p**3, 3), 0, jitter + 1, dtype=jnp.int32)
    else:
        offsets = jnp.full((p**3, 3), jitter // 2, dtype=jnp.int32)
    return origins + offsets


def slice_patches(volume: jax.Array, starts: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Cuts `[N, pd, ph, pw, C]` patches at `starts [N, 3]` out of `volume [D, H, W, C]`."""

    def one(start: jax.Array) -> jax.Array:
        zero = jnp.zeros((), start.dtype)
        return lax.dynamic_slice(
            volume, (start[0], start[1], start[2], zero), (*shape, volume.shape[-1])
        )

    return jax.vmap(one)(starts)


def extract_grid(
    volume: jax.Array,
    key: jax.Array | None,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
) -> jax.Array:
    """Crops the P x P x P grid of (jittered) patches from one volume.

    Works under `jax.jit` and `jax.vmap` (over volumes and keys); all sizes are static.

    Args:
      volume: `[D, H, W, C]`, any dtype.
      key: a `jax.random` key (typed or raw); ignored (may be None) when not training.
      patches_per_side: P, static Python int >= 1.
      jitter: J >= 0, static Python int.
      training: static Python bool; random offsets in `[0, J]` per patch and axis if True, the
        centre offset `J // 2` otherwise.

    Returns:
      `[P**3, D // P - J, H // P - J, W // P - J, C]`, same dtype as `volume`, row-major grid
      order (first spatial axis outermost).

    Raises:
      ConfigError: if a patch size would be < 1 (or P < 1, J < 0).
    """
    if volume.ndim != 4:
        raise ConfigError(f"extract_grid expects a [D, H, W, C] volume, got shape {volume.shape}.")
    shape = patch_shape(volume.shape, patches_per_side=patches_per_side, jitter=jitter)
    starts = grid_starts(
        volume.shape, key, patches_per_side=patches_per_side, jitter=jitter, training=training
    )
    return slice_patches(volume, starts, shape)
