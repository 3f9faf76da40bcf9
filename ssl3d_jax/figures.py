"""Figures of pretext-task inputs, segmentations and training curves: numpy in, a
`matplotlib.figure.Figure` and the 2D arrays drawn out.

Each task's `Task.plot` (`ssl3d_jax/tasks/<task>.py`) draws its samples with a `plot_<task>`
function of this module; a task without one gets `plot_sample`, a picture of every sampled array.
`ssl3d_jax.visualize` (the 'visualize' mode) writes them as PNG files.

Figures are built without pyplot (no global backend or state; PNGs are written by the Agg
renderer), at the fixed sizes of `FIGSIZE` inches, so that a PNG is
`FIGSIZE[name] * config.visualize.dpi` pixels.

Display convention: a 3D patch `[d, h, w, C]` is shown by its middle slice along array axis 2
(the axial axis after canonical reorientation, `data.slices.AXIAL_AXIS`), one channel
(`config.visualize.channel`), array axis 0 downwards; a 2D patch `[h, w, C]` directly.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ssl3d_jax import metrics

# Figure sizes in inches (width, height); pixels = inches * config.visualize.dpi.
FIGSIZE = {
    "rpl": (10.0, 3.5),
    "jigsaw": (10.0, 6.0),
    "rotation": (12.5, 5.5),
    "cpc": (12.0, 6.0),
    "exemplar": (10.0, 3.0),
    "sample": (10.0, 3.5),
    "segmentation": (9.0, 3.5),
    "curves": (10.0, 4.0),
}

AXIAL = 2  # = data.slices.AXIAL_AXIS (kept literal so this module imports no data code)
_CONTEXT, _TARGET = "tab:blue", "tab:red"


# --------------------------------------------------------------------------------------------
# Arrays → 2D pictures
# --------------------------------------------------------------------------------------------


def to_2d(x: np.ndarray, *, channel: int = 0) -> np.ndarray:
    """One channel of a patch as a 2D array: `[d, h, w, C]` → its middle slice along axis 2,
    `[d, h]`; `[h, w, C]` → `[h, w]`. float32."""
    x = np.asarray(x, np.float32)
    if x.ndim == 4:
        x = np.take(x, x.shape[AXIAL] // 2, axis=AXIAL)
    if x.ndim != 3:
        raise ValueError(f"to_2d expects [d, h, w, C] or [h, w, C], got shape {x.shape}")
    return x[..., channel]


def mosaic(tiles: np.ndarray, *, gap: int = 1) -> np.ndarray:
    """`[rows, cols, h, w]` tiles → one `[rows·(h+gap)-gap, cols·(w+gap)-gap]` float32 array,
    NaN in the gaps (drawn blank)."""
    rows, cols, h, w = tiles.shape
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan, np.float32)
    for i in range(rows):
        for j in range(cols):
            out[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = tiles[i, j]
    return out


def grid_layers(tiles: np.ndarray, patches_per_side: int, spatial_dims: int) -> np.ndarray:
    """Row-major grid tiles `[P**n, h, w]` → `[L, P, P, h, w]`: layer l holds the tiles of grid
    index `(i, j, l)` (3D, L = P layers along grid axis 2, the axis of the drawn slices) or
    `(i, j)` (2D, L = 1)."""
    p = int(patches_per_side)
    grid = tiles.reshape((p,) * spatial_dims + tiles.shape[1:])
    if spatial_dims == 2:
        return grid[None]
    return np.moveaxis(grid, 2, 0)


def _limits(*arrays: np.ndarray) -> tuple[float, float]:
    """One grey-level range for related panels (robust percentiles), so that they compare."""
    v = np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _show(ax, image: np.ndarray, title: str = "", *, limits=None) -> None:
    lo, hi = limits if limits is not None else _limits(image)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _figure(name: str) -> Figure:
    return Figure(figsize=FIGSIZE[name])


def _tile_box(ax, i: int, j: int, h: int, w: int, gap: int, color: str) -> None:
    ax.add_patch(
        Rectangle(
            (j * (w + gap) - 0.5, i * (h + gap) - 0.5),
            w,
            h,
            fill=False,
            edgecolor=color,
            linewidth=1.5,
        )
    )


# --------------------------------------------------------------------------------------------
# Figures: numpy in, (Figure, {name: 2D array drawn}) out
# --------------------------------------------------------------------------------------------


def rpl_offset(label: int, patches_per_side: int, spatial_dims: int) -> tuple[int, ...]:
    """Grid offset (cells per axis) of RPL class `label`'s query from the centre patch."""
    p = int(patches_per_side)
    n = p**spatial_dims
    centre = n // 2
    query = int(label) + (int(label) >= centre)  # the task's mapping: the centre is skipped
    shape = (p,) * spatial_dims
    return tuple(
        int(q - c) for q, c in zip(np.unravel_index(query, shape), np.unravel_index(centre, shape))
    )


def plot_rpl(
    volume: np.ndarray,
    pair: np.ndarray,
    label: int,
    *,
    patches_per_side: int,
    channel: int = 0,
) -> tuple[Figure, dict]:
    """RPL: the input with its grid, the reference (centre) and query patches, the grid schematic.

    Args:
      volume: `[D, H, W, C]` or `[H, W, C]`, the input the pair was cut from.
      pair: `[2, *patch, C]`, `rpl.sample_pair`'s `[reference, query]`.
      label: the class, in `[0, P**n - 1)`.
    """
    dims = volume.ndim - 1
    p = int(patches_per_side)
    offset = rpl_offset(label, p, dims)
    panels = {
        "input": to_2d(volume, channel=channel),
        "reference": to_2d(pair[0], channel=channel),
        "query": to_2d(pair[1], channel=channel),
    }
    # Schematic: layers along grid axis 2 side by side; 1 = reference, 2 = query.
    cells = np.zeros((p,) * dims, np.float32)
    centre = np.unravel_index(p**dims // 2, (p,) * dims)
    query = tuple(c + o for c, o in zip(centre, offset))
    cells[centre], cells[query] = 1, 2
    layers = grid_layers(cells.reshape(-1, 1, 1), p, dims)  # [L, P, P, 1, 1]
    schematic = np.concatenate(
        [np.pad(layer[..., 0, 0], ((0, 0), (0, 1)), constant_values=np.nan) for layer in layers],
        axis=1,
    )[:, :-1]
    panels["schematic"] = schematic
    fig = _figure("rpl")
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    _show(axes[0], panels["input"], f"input (channel {channel})")
    size = volume.shape[0] / p
    for k in range(1, p):
        axes[0].axhline(k * size - 0.5, color="yellow", linewidth=0.6)
        axes[0].axvline(k * volume.shape[1] / p - 0.5, color="yellow", linewidth=0.6)
    lim = _limits(panels["reference"], panels["query"])
    _show(axes[1], panels["reference"], "reference: centre patch", limits=lim)
    _show(axes[2], panels["query"], "query patch", limits=lim)
    cmap = colors.ListedColormap(["0.9", _CONTEXT, _TARGET])
    axes[3].imshow(schematic, cmap=cmap, vmin=0, vmax=2)
    for (i, j), v in np.ndenumerate(schematic):
        if v in (1, 2):
            axes[3].text(j, i, "RQ"[int(v) - 1], ha="center", va="center", color="white")
    axes[3].set_xticks([])
    axes[3].set_yticks([])
    axes[3].set_title(
        f"{p}^{dims} grid" + (", layers along axis 2" if dims == 3 else ""), fontsize=8
    )
    fig.suptitle(f"RPL: class {int(label)}, query offset {offset} (grid cells)", fontsize=10)
    return fig, panels


def plot_jigsaw(
    shuffled: np.ndarray,
    permutation: np.ndarray,
    label: int,
    *,
    patches_per_side: int,
    channel: int = 0,
    gap: int = 1,
) -> tuple[Figure, dict]:
    """Jigsaw: the puzzle in shuffled (slot) order and solved (grid) order.

    Args:
      shuffled: `[N, *patch, C]`, slot s holding grid patch `permutation[s]`
        (`jigsaw.sample_puzzle`).
      permutation: `[N]` int, the permutation of class `label`.

    Returns panels `shuffled` and `solved` (`[N, h, w]` tiles in slot / grid order) and one
    `shuffled_mosaic_<l>` / `solved_mosaic_<l>` per layer.
    """
    n = shuffled.shape[0]
    dims = shuffled.ndim - 2
    p = int(patches_per_side)
    tiles = np.stack([to_2d(x, channel=channel) for x in shuffled])
    solved = np.empty_like(tiles)
    solved[np.asarray(permutation)] = tiles  # slot s goes back to grid index perm[s]
    panels = {"shuffled": tiles, "solved": solved}
    layers = {k: grid_layers(v, p, dims) for k, v in panels.items()}
    count = layers["solved"].shape[0]
    fig = _figure("jigsaw")
    # 3D: a row per order, a column per grid layer; 2D: the two orders side by side.
    axes = np.asarray(fig.subplots(2, count, squeeze=False) if dims == 3 else fig.subplots(1, 2))
    axes = axes.reshape(2, count)
    lim = _limits(tiles)
    for r, kind in enumerate(("shuffled", "solved")):
        for col in range(count):
            image = mosaic(layers[kind][col], gap=gap)
            panels[f"{kind}_mosaic_{col}"] = image
            where = f" (grid layer {col} of axis 2)" if dims == 3 else " (grid order)"
            _show(axes[r, col], image, f"{kind}{where}", limits=lim)
    fig.suptitle(
        f"Jigsaw: permutation class {int(label)} of {n} patches; shuffled slot order "
        f"= {list(map(int, permutation))[: min(n, 12)]}{' ...' if n > 12 else ''}",
        fontsize=9,
    )
    return fig, panels


def plot_rotation(rotated: np.ndarray, table, *, channel: int = 0) -> tuple[Figure, dict]:
    """Rotation: the input under every rotation class.

    Args:
      rotated: `[K, *spatial, C]`, class k = `rotation.rotate(volume, k)`.
      table: `rotation.rotation_table(spatial_dims)`: class → (quarter turns, plane).

    Returns panels `rotated` `[K, h, w]`.
    """
    k = rotated.shape[0]
    tiles = np.stack([to_2d(x, channel=channel) for x in rotated])
    fig = _figure("rotation")
    cols = 5 if k > 5 else k
    axes = np.asarray(fig.subplots(-(-k // cols), cols, squeeze=False)).ravel()
    lim = _limits(tiles)
    for c in range(k):
        turns, plane = table[c]
        title = "class 0: identity" if turns == 0 else f"class {c}: {90 * turns}° in plane {plane}"
        _show(axes[c], tiles[c], title, limits=lim)
    for ax in axes[k:]:
        ax.set_axis_off()
    fig.suptitle(f"Rotation: the {k} classes (middle slice along axis 2 of each)", fontsize=10)
    return fig, {"rotated": tiles}


def plot_cpc(
    patches: np.ndarray,
    *,
    patches_per_side: int,
    context: np.ndarray,
    targets: np.ndarray,
    column: int,
    channel: int = 0,
    gap: int = 1,
) -> tuple[Figure, dict]:
    """CPC: the patch grid with context rows (blue) and target rows (red), and one column's GRU
    context sequence and its targets.

    Args:
      patches: `[P**n, *patch, C]`, `cpc.make_batch`'s patches of one volume (row-major grid).
      context, targets: `cpc.context_indices` `[P**(n-1), T]` / `cpc.target_indices`
        `[P**(n-1), K]` grid indices.
      column: the column whose sequence is drawn.
    """
    dims = patches.ndim - 2
    p = int(patches_per_side)
    tiles = np.stack([to_2d(x, channel=channel) for x in patches])
    h, w = tiles.shape[1:]
    layers = grid_layers(tiles, p, dims)
    target_rows = sorted({int(t) // p ** (dims - 1) for t in np.ravel(targets)})
    seq = np.concatenate([tiles[context[column]], tiles[targets[column]]])
    panels = {"tiles": tiles, "sequence": seq}
    fig = _figure("cpc")
    grid = fig.add_gridspec(2, len(layers), height_ratios=[3, 1])
    lim = _limits(tiles)
    for col, layer in enumerate(layers):
        ax = fig.add_subplot(grid[0, col])
        image = mosaic(layer, gap=gap)
        panels[f"grid_{col}"] = image
        where = f"grid layer {col} of axis 2" if dims == 3 else "grid"
        _show(ax, image, f"{where}; rows = axis 0", limits=lim)
        for i in range(p):
            for j in range(p):
                color = _TARGET if i in target_rows else _CONTEXT
                _tile_box(ax, i, j, h, w, gap, color)
    ax = fig.add_subplot(grid[1, :])
    strip = mosaic(seq[None], gap=gap)
    _show(ax, strip, limits=lim)
    t = context.shape[1]
    for j in range(seq.shape[0]):
        _tile_box(ax, 0, j, h, w, gap, _CONTEXT if j < t else _TARGET)
    ax.set_title(
        f"column {column}: GRU context sequence ({t} patches, blue) → predicted patches "
        f"({targets.shape[1]} terms, red)",
        fontsize=8,
    )
    fig.suptitle(
        f"CPC: {p}^{dims} patch grid; blue = context rows, red = target rows {target_rows}",
        fontsize=10,
    )
    return fig, panels


def plot_exemplar(
    volume: np.ndarray,
    anchor: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    *,
    negative_source: str = "",
    channel: int = 0,
) -> tuple[Figure, dict]:
    """Exemplar: the input, and the anchor, positive (both augmented views of it) and negative
    (an augmented view of another volume of the batch), `exemplar.make_triplets`."""
    panels = {
        name: to_2d(x, channel=channel)
        for name, x in (
            ("input", volume),
            ("anchor", anchor),
            ("positive", positive),
            ("negative", negative),
        )
    }
    fig = _figure("exemplar")
    axes = fig.subplots(1, 4)
    lim = _limits(*panels.values())
    titles = {
        "input": "input",
        "anchor": "anchor (augmented)",
        "positive": "positive (augmented again)",
        "negative": f"negative ({negative_source})" if negative_source else "negative",
    }
    for ax, (name, image) in zip(axes, panels.items()):
        _show(ax, image, titles[name], limits=lim)
    fig.suptitle("Exemplar: triplet (pull anchor to positive, push from negative)", fontsize=10)
    return fig, panels


def plot_sample(
    sample: dict, volumes: np.ndarray, *, names, channel: int = 0, title: str = ""
) -> tuple[Figure, dict]:
    """The generic figure of a task without a plot function of its own: volume 0, then the
    first item of every sampled image array of volume 0, and the other sampled values of volume 0
    (labels) in the title.

    Args:
      sample: `Task.sample`'s `{name: array}` as numpy, each with the batch axis first.
      volumes: `[B, *spatial, C]`, what was sampled from; names: their case names.
    """
    dims = volumes.ndim - 2
    panels = {f"input ({names[0]})": to_2d(volumes[0], channel=channel)}
    values = []
    for name, value in sample.items():
        x = np.asarray(value)[0] if np.ndim(value) else np.asarray(value)
        if x.ndim >= dims + 1 and np.issubdtype(x.dtype, np.floating):
            while x.ndim > dims + 1:  # the first patch / view of volume 0
                x = x[0]
            panels[name] = to_2d(x, channel=channel)
        elif x.size <= 8:
            values.append(f"{name} {np.array2string(x.ravel(), separator=',')}")
    fig = _figure("sample")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, image) in zip(axes, panels.items()):
        _show(ax, image, name)
    fig.suptitle("  ".join([t for t in (title, *values) if t]), fontsize=9)
    return fig, panels


def plot_segmentation(
    image: np.ndarray, true: np.ndarray, pred: np.ndarray, *, title: str = ""
) -> tuple[Figure, dict]:
    """Predicted vs true labels on one slice.

    Args:
      image: `[h, w]` float, the scan slice; true, pred: `[h, w]` int labels (0 = background).
    """
    panels = {"image": np.asarray(image, np.float32), "true": true, "pred": pred}
    fig = _figure("segmentation")
    axes = fig.subplots(1, 3)
    lim = _limits(panels["image"])
    vmax = max(int(np.max(true)), int(np.max(pred)), 1)
    for ax, (name, lab) in zip(axes, (("image", None), ("true", true), ("predicted", pred))):
        _show(ax, panels["image"], name, limits=lim)
        if lab is not None:
            masked = np.ma.masked_equal(np.asarray(lab), 0)
            ax.imshow(masked, cmap="autumn", vmin=1, vmax=vmax, alpha=0.6, interpolation="nearest")
    fig.suptitle(
        f"{title}  foreground Dice on this slice {metrics.dice(true > 0, pred > 0):.3f}", fontsize=9
    )
    return fig, panels


_PROBE_KEYS = ("knn", "dice", "accuracy")


def plot_curves(records: list[dict], *, test_dice: dict | None = None) -> tuple[Figure, dict]:
    """Loss per phase vs step (left); kNN probe, Dice and accuracy metrics per phase (right).

    Args:
      records: the `metrics.jsonl` records (`phase`, `step`, metric values).
      test_dice: optional `{arm: {region: mean test Dice}}` (results.json), written below.

    Returns panels `{'<phase>/<metric>': [steps, values] float64 [2, n]}` (every numeric metric).
    """
    series: dict[str, list] = {}
    for r in records:
        phase, step = r.get("phase"), r.get("step")
        if phase is None or step is None:
            continue
        for k, v in r.items():
            if k in ("phase", "step", "time") or not isinstance(v, (int, float)):
                continue
            series.setdefault(f"{phase}/{k}", []).append((float(step), float(v)))
    panels = {k: np.asarray(sorted(v), np.float64).T for k, v in series.items()}
    fig = _figure("curves")
    left, right = fig.subplots(1, 2)
    for name, (steps, values) in panels.items():
        phase, key = name.rsplit("/", 1)
        if key == "loss":
            left.plot(steps, values, marker=".", label=phase)
        elif any(p in key for p in _PROBE_KEYS):
            right.plot(steps, values, marker=".", label=name)
    left.set(title="loss", xlabel="step")
    right.set(title="kNN probe / Dice / accuracy", xlabel="step")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if test_dice:
        text = "\n".join(
            f"test Dice {arm}: " + " ".join(f"{k} {v:.3f}" for k, v in sorted(d.items()))
            for arm, d in sorted(test_dice.items())
        )
        fig.subplots_adjust(bottom=0.24)  # room for the results under the axes
        fig.text(0.5, 0.02, text, ha="center", va="bottom", fontsize=7)
    elif not right.get_legend_handles_labels()[0]:
        right.text(0.5, 0.5, "no such metrics", ha="center", va="center")
    return fig, panels


def save(fig: Figure, path: str, *, dpi: int) -> str:
    """Write `fig` as a PNG of exactly `figsize * dpi` pixels (no tight bounding box)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
