"""Regular 2D / 3D patch grid with per-patch random jitter (the pretext tasks' cropping primitive).

Port of the original `preprocessing/utils/crop.py:crop_patches_3d` (and its 2D counterpart
`crop_patches`) for `patch_jitter >= 0` (Taleb et al., NeurIPS 2020; spec section 2.1): the input
is cut into a grid of P cells per spatial axis, of size `g = size // P` per axis, and from every
cell a sub-block of size `g - jitter` is taken at an offset in `[0, jitter]` (uniform,
independently per patch and per axis) when training, or at the fixed offset `jitter // 2`
otherwise. Leftover voxels at the high end (`size - P * g`) are never used, as in the original.

`grid_fraction` f < 1 (default 1 = the original's grid above, bit for bit): cells are
`g = floor(f * size) // P` voxels per axis (the grid covers about the fraction f of each edge),
patches `g - jitter`, and the grid's origin is drawn per input, uniform in `[0, size - P * g]`
per axis when training (one draw for all cells of that input; centred, `(size - P * g) // 2`,
otherwise). The paper's text says the patches are "sampled at random locations", but its code
fixed the grid at the origin: with scans resized to the input cube
(`config.data.resize_mode='resize'`) the anatomy touches every face, so the amount and place of
background in one patch alone tells which cell it came from (a linear classifier on one RPL
query patch: 0.93 held-out accuracy against chance 0.04 on the phantom, `ssl3d_jax/audit.py`,
docs/results/shortcut_audit.md). A random origin over a room of more than a cell decouples a
cell from a fixed place in the volume (0.055 for f = 0.5 at 40³).

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
  * `grid_fraction < 1`: a grid smaller than the input at a random origin (see above); the
    original had only `grid_fraction = 1`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssl3d_jax.errors import ConfigError

__all__ = [
    "check_grid_fraction",
    "extract_grid",
    "grid_layout",
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


def check_grid_fraction(grid_fraction: float, name: str = "grid_fraction") -> float:
    """`grid_fraction` as a float in (0, 1], or a `ConfigError` naming `name` (a config key)."""
    try:
        f = float(grid_fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if isinstance(grid_fraction, bool) or not 0.0 < f <= 1.0:
        raise ConfigError(
            f"{name} must be in (0, 1] (the share of each input edge the patch grid spans; 1 = "
            f"the original's grid over the whole input), got {grid_fraction!r}."
        )
    return f


def grid_layout(
    volume_shape: tuple[int, ...], *, patches_per_side: int, grid_fraction: float = 1.0
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cell size and origin room of the grid, per spatial axis.

    Cells are `g = floor(grid_fraction * s) // P` voxels on an axis of `s` voxels. For
    `grid_fraction < 1` the grid's origin can move over all `s - P * g` voxels the grid leaves;
    for `grid_fraction = 1` it stays at 0 (room 0): the original's grid, whose `s - P * (s // P)`
    leftover voxels stay unused at the high end.

    Args:
      volume_shape: `(H, W, C)` or `(D, H, W, C)`; the last entry (channels) is ignored.
      patches_per_side: P >= 1.
      grid_fraction: f in (0, 1].

    Returns:
      `(cell, room)`: two tuples with one int per spatial axis.

    Raises:
      ConfigError: a bad rank, P < 1, or f outside (0, 1].
    """
    n = spatial_dims_of(volume_shape)
    if int(patches_per_side) < 1:
        raise ConfigError(f"patches_per_side must be >= 1, got {patches_per_side}.")
    f = check_grid_fraction(grid_fraction)
    spatial = tuple(int(s) for s in volume_shape[:n])
    # The epsilon keeps e.g. 40 * 0.7 = 28.000000000000004 and 0.29 * 100 = 28.999999999999996
    # at the intended integer; f = 1 gives exactly s.
    p = int(patches_per_side)
    cell = tuple(min(s, math.floor(s * f + 1e-9)) // p for s in spatial)
    room = tuple(0 if f == 1.0 else s - p * g for s, g in zip(spatial, cell))
    return cell, room


def patch_shape(
    volume_shape: tuple[int, ...],
    *,
    patches_per_side: int,
    jitter: int,
    grid_fraction: float = 1.0,
) -> tuple[int, ...]:
    """Spatial shape of every patch of the grid.

    Args:
      volume_shape: the full shape of one input, `(H, W, C)` (2D) or `(D, H, W, C)` (3D); the rank
        decides the dimensionality and the last entry (channels) is ignored.
      patches_per_side: P, the grid has P cells per axis (static Python int >= 1).
      jitter: J >= 0, the patch is J pixels / voxels smaller than its cell per axis.
      grid_fraction: f in (0, 1], the share of each edge the grid spans (`grid_layout`).

    Returns:
      `(g_h - J, g_w - J)` in 2D, `(g_d - J, g_h - J, g_w - J)` in 3D, with cells
      `g = floor(f * s) // P` (`s // P` for the default f = 1).

    Raises:
      ConfigError: if the rank is not 3 or 4, P < 1, J < 0, f outside (0, 1], or a patch size
        would be < 1.
    """
    cell, _ = grid_layout(
        volume_shape, patches_per_side=patches_per_side, grid_fraction=grid_fraction
    )
    if int(jitter) < 0:
        raise ConfigError(
            f"jitter must be >= 0, got {jitter} (the original's overlapping mode, jitter < 0, "
            "is not supported)."
        )
    shape = tuple(g - jitter for g in cell)
    if min(shape) < 1:
        spatial = tuple(int(s) for s in volume_shape[: spatial_dims_of(volume_shape)])
        raise ConfigError(
            f"patch size would be {shape} < 1 for an input of spatial shape {spatial} with "
            f"patches_per_side={patches_per_side}, jitter={jitter} and grid_fraction="
            f"{grid_fraction}: each cell (floor(grid_fraction * size) // patches_per_side = "
            f"{cell}) must be larger than the jitter."
        )
    return shape


def grid_starts(
    volume_shape: tuple[int, ...],
    key: jax.Array | None,
    *,
    patches_per_side: int,
    jitter: int,
    training: bool,
    grid_fraction: float = 1.0,
) -> jax.Array:
    """Start corners of all grid patches (grid origin + cell origin + jitter offset).

    Args:
      volume_shape: static shape of one input, `(H, W, C)` or `(D, H, W, C)`.
      key: a `jax.random` key; only used when `training` (may be None otherwise).
      patches_per_side: P (static).
      jitter: J (static).
      training: static; random offsets in `[0, J]` if True, else `J // 2`; with
        `grid_fraction < 1` also a random grid origin in `[0, room]` per axis if True, else the
        centred `room // 2` (`grid_layout`).
      grid_fraction: static f in (0, 1]; 1 (default) is the original's grid at the origin,
        bit-identical to before the option existed (same key use, same offsets).

    Returns:
      `[P**n, n]` int32 with n = 2 or 3 spatial dims, row-major grid order.
    """
    patch_shape(
        volume_shape, patches_per_side=patches_per_side, jitter=jitter, grid_fraction=grid_fraction
    )  # validates
    n = spatial_dims_of(volume_shape)
    p = patches_per_side
    cell, room = grid_layout(
        volume_shape, patches_per_side=patches_per_side, grid_fraction=grid_fraction
    )
    cells = np.stack(np.meshgrid(*([np.arange(p)] * n), indexing="ij"), axis=-1).reshape(-1, n)
    origins = jnp.asarray(cells * np.array(cell), dtype=jnp.int32)
    moves = any(r > 0 for r in room)
    if training:
        if key is None:
            raise ConfigError("extract_grid(training=True) needs a jax.random key.")
        if moves:  # static: with no room the key is used as before (grid_fraction = 1)
            key_origin, key = jax.random.split(key)
            # One origin per input (all cells move together), uniform in [0, room] per axis.
            limit = jnp.asarray(room, jnp.int32) + 1
            origins = origins + jax.random.randint(key_origin, (n,), 0, limit, dtype=jnp.int32)
        # maxval is exclusive: offsets are uniform in [0, jitter] inclusive, as np.random.randint
        # (0, jitter + 1) in the original.
        offsets = jax.random.randint(key, (p**n, n), 0, jitter + 1, dtype=jnp.int32)
    else:
        if moves:
            origins = origins + jnp.asarray([r // 2 for r in room], jnp.int32)
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
    grid_fraction: float = 1.0,
) -> jax.Array:
    """Crops the P x P (x P) grid of (jittered) patches from one image or volume.

    Works under `jax.jit` and `jax.vmap` (over inputs and keys); all sizes are static.

    Args:
      volume: `[D, H, W, C]` (3D) or `[H, W, C]` (2D), any dtype; the rank decides.
      key: a `jax.random` key (typed or raw); ignored (may be None) when not training.
      patches_per_side: P, static Python int >= 1.
      jitter: J >= 0, static Python int.
      training: static Python bool; random offsets in `[0, J]` per patch and axis if True, the
        centre offset `J // 2` otherwise (and a random / centred grid origin for f < 1).
      grid_fraction: static f in (0, 1], the share of each edge the grid spans (`grid_starts`);
        1 (default) is the original's grid at the origin.

    Returns:
      3D: `[P**3, D // P - J, H // P - J, W // P - J, C]`; 2D: `[P**2, H // P - J, W // P - J, C]`
      (for f < 1 the cells are `floor(f * s) // P`); same dtype as `volume`, row-major grid order
      (first spatial axis outermost).

    Raises:
      ConfigError: if the rank is not 3 or 4, or a patch size would be < 1 (or P < 1, J < 0,
        f outside (0, 1]).
    """
    shape = patch_shape(
        volume.shape, patches_per_side=patches_per_side, jitter=jitter, grid_fraction=grid_fraction
    )
    starts = grid_starts(
        volume.shape,
        key,
        patches_per_side=patches_per_side,
        jitter=jitter,
        training=training,
        grid_fraction=grid_fraction,
    )
    return slice_patches(volume, starts, shape)
