"""Regular 2D / 3D patch grid with per-patch random jitter (the pretext tasks' cropping primitive).

Port of the original `preprocessing/utils/crop.py:crop_patches_3d` (and its 2D counterpart
`crop_patches`) for `patch_jitter >= 0` (Taleb et al., NeurIPS 2020; spec section 2.1): the input
is cut into a grid of P cells per spatial axis, of size `g = size // P` per axis, and from every
cell a sub-block of size `g - jitter` is taken at an offset in `[0, jitter]` (uniform,
independently per patch and per axis) when training, or at the fixed offset `jitter // 2`
otherwise. Leftover voxels at the high end (`size - P * g`) are never used, as in the original.

The rank of the input decides the dimensionality:
  * 3D: `volume [D, H, W, C]` -> `[P**3, pd, ph, pw, C]`; cell `(i, j, k)` has index
    `i * P * P + j * P + k`.
  * 2D: `image [H, W, C]` -> `[P**2, ph, pw, C]`; cell `(i, j)` has index `i * P + j`.
Patches always come out in row-major grid order (first spatial axis outermost).

Deviations from the original:
  * The crop runs on device inside the jitted step (one `lax.dynamic_slice` per cell, vmapped),
    with a `jax.random` key instead of `np.random`; this measured as fast as a NumPy loop
    (cpu_measurements.md section 3) and keeps all SSL randomness in the pure train step.
  * The overlapping-patch mode of the original (`jitter < 0`, used only by 2D CPC) is not
    supported; a negative jitter raises `ConfigError`.
  * Per-axis cell sizes are allowed to differ (non-square / non-cubic inputs); the original
    assumed squares / cubes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssl3d_jax.errors import ConfigError

__all__ = [
    "extract_grid",
    "num_patches",
    "patch_shape",
    "grid_starts",
    "slice_patches",
    "spatial_dims_of",
]


def spatial_dims_of(shape: tuple[int, ...]) -> int:
    """Spatial rank of a channels-last single input: `[H, W, C]` -> 2, `[D, H, W, C]` -> 3.

    Raises:
      ConfigError: for any other rank, naming the shape.
    """
    if len(shape) not in (3, 4):
        raise ConfigError(
            f"expected a 2D image [H, W, C] or a 3D volume [D, H, W, C] (rank 3 or 4), got shape "
            f"{tuple(shape)}."
        )
    return len(shape) - 1


def num_patches(patches_per_side: int, spatial_dims: int = 3) -> int:
    """Number of patches in the grid, `P**spatial_dims` (27 for a 3x3x3 grid, 9 for 3x3)."""
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    return int(patches_per_side) ** int(spatial_dims)


def patch_shape(
    volume_shape: tuple[int, ...], *, patches_per_side: int, jitter: int
) -> tuple[int, ...]:
    """Spatial shape of every patch of the grid.

    Args:
      volume_shape: the full shape of one input, `(H, W, C)` (2D) or `(D, H, W, C)` (3D); the rank
        decides the dimensionality and the last entry (channels) is ignored.
      patches_per_side: P, the grid has P cells per axis (static Python int >= 1).
      jitter: J >= 0, the patch is J pixels / voxels smaller than its cell per axis.

    Returns:
      `(H // P - J, W // P - J)` in 2D, `(D // P - J, H // P - J, W // P - J)` in 3D.

    Raises:
      ConfigError: if the rank is not 3 or 4, P < 1, J < 0, or a patch size would be < 1.
    """
    n = spatial_dims_of(volume_shape)
    if int(patches_per_side) < 1:
        raise ConfigError(f"patches_per_side must be >= 1, got {patches_per_side}.")
    if int(jitter) < 0:
        raise ConfigError(
            f"jitter must be >= 0, got {jitter} (the original's overlapping mode, jitter < 0, "
            "is not supported)."
        )
    spatial = tuple(int(s) for s in volume_shape[:n])
    shape = tuple(s // patches_per_side - jitter for s in spatial)
    if min(shape) < 1:
        raise ConfigError(
            f"patch size would be {shape} < 1 for an input of spatial shape {spatial} with "
            f"patches_per_side={patches_per_side} and jitter={jitter}: each cell (size // "
            "patches_per_side) must be larger than the jitter."
        )
    return shape


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
      volume_shape: static shape of one input, `(H, W, C)` or `(D, H, W, C)`.
      key: a `jax.random` key; only used when `training` (may be None otherwise).
      patches_per_side: P (static).
      jitter: J (static).
      training: static; random offsets in `[0, J]` if True, else `J // 2`.

    Returns:
      `[P**n, n]` int32 with n = 2 or 3 spatial dims, row-major grid order.
    """
    patch_shape(volume_shape, patches_per_side=patches_per_side, jitter=jitter)  # validates
    n = spatial_dims_of(volume_shape)
    p = patches_per_side
    cells = np.stack(np.meshgrid(*([np.arange(p)] * n), indexing="ij"), axis=-1).reshape(-1, n)
    cell_size = np.array([int(s) // p for s in volume_shape[:n]])
    origins = jnp.asarray(cells * cell_size, dtype=jnp.int32)
    if training:
        if key is None:
            raise ConfigError("extract_grid(training=True) needs a jax.random key.")
        # maxval is exclusive: offsets are uniform in [0, jitter] inclusive, as np.random.randint
        # (0, jitter + 1) in the original.
        offsets = jax.random.randint(key, (p**n, n), 0, jitter + 1, dtype=jnp.int32)
    else:
        offsets = jnp.full((p**n, n), jitter // 2, dtype=jnp.int32)
    return origins + offsets


def slice_patches(volume: jax.Array, starts: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Cuts patches at `starts [N, n]` out of one input.

    Args:
      volume: `[H, W, C]` (n = 2) or `[D, H, W, C]` (n = 3).
      starts: `[N, n]` integer start corners.
      shape: static spatial patch shape, length n.

    Returns:
      `[N, *shape, C]`, dtype of `volume`.
    """
    n = spatial_dims_of(volume.shape)
    if starts.shape[-1] != n or len(shape) != n:
        raise ConfigError(
            f"slice_patches: starts {starts.shape} / patch shape {tuple(shape)} do not match the "
            f"{n} spatial dims of an input of shape {volume.shape}."
        )

    def one(start: jax.Array) -> jax.Array:
        zero = jnp.zeros((), start.dtype)
        return lax.dynamic_slice(
            volume, (*(start[a] for a in range(n)), zero), (*shape, volume.shape[-1])
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
    """Crops the P x P (x P) grid of (jittered) patches from one image or volume.

    Works under `jax.jit` and `jax.vmap` (over inputs and keys); all sizes are static.

    Args:
      volume: `[D, H, W, C]` (3D) or `[H, W, C]` (2D), any dtype; the rank decides.
      key: a `jax.random` key (typed or raw); ignored (may be None) when not training.
      patches_per_side: P, static Python int >= 1.
      jitter: J >= 0, static Python int.
      training: static Python bool; random offsets in `[0, J]` per patch and axis if True, the
        centre offset `J // 2` otherwise.

    Returns:
      3D: `[P**3, D // P - J, H // P - J, W // P - J, C]`; 2D: `[P**2, H // P - J, W // P - J, C]`;
      same dtype as `volume`, row-major grid order (first spatial axis outermost).

    Raises:
      ConfigError: if the rank is not 3 or 4, or a patch size would be < 1 (or P < 1, J < 0).
    """
    shape = patch_shape(volume.shape, patches_per_side=patches_per_side, jitter=jitter)
    starts = grid_starts(
        volume.shape, key, patches_per_side=patches_per_side, jitter=jitter, training=training
    )
    return slice_patches(volume, starts, shape)
