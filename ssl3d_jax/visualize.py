"""Pictures of what each pretext task feeds the network, of predictions and of training curves.

`config.mode='visualize'` (`run(config, workdir)`) writes PNG figures under `<workdir>/figures/`:

- `<task>.png` for each drawn pretext task (`config.visualize.tasks`): the RPL reference / query
  pair and its class, the jigsaw grid shuffled and solved, the rotation classes, CPC's context and
  target patches, the exemplar triplet;
- `segmentation_<arm>.png`: predicted vs true labels of one test case, from a finished run's
  `<workdir>/finetune/<arm>/predictions/<case>_pred.nii.gz`;
- `curves.png`: loss per phase vs step, and the kNN probe / Dice / accuracy metrics, from
  `<workdir>/metrics.jsonl`.

Why: to check by eye that the tasks see what they should (patch geometry, labels, augmentation).
The inputs are real volumes of the configured dataset, read and preprocessed by the training
pipeline (`train.common.preprocessed_source`, 2D slices through `data.slices.SliceSource`), and
the samples come from each task's own pure functions (`tasks/<task>.py` `make_batch`,
`sample_*`), so the figures show exactly what the network is fed.

Two layers: `sample_<task>` (jax, returns numpy arrays) and `plot_<figure>` (numpy in, a
`matplotlib.figure.Figure` and the 2D arrays drawn out). Figures are built without pyplot (no
global backend or state; PNGs are written by the Agg renderer), at the fixed sizes of
`FIGSIZE` inches, so that a PNG is `FIGSIZE[name] * config.visualize.dpi` pixels.

Display convention: a 3D patch `[d, h, w, C]` is shown by its middle slice along array axis 2
(the axial axis after canonical reorientation, `data.slices.AXIAL_AXIS`), one channel
(`config.visualize.channel`), array axis 0 downwards; a 2D patch `[h, w, C]` directly.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os

import jax
import numpy as np
from matplotlib import colors
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ssl3d_jax.errors import ConfigError

log = logging.getLogger(__name__)

TASKS = ("rpl", "jigsaw", "rotation", "cpc", "exemplar")

# Figure sizes in inches (width, height); pixels = inches * config.visualize.dpi.
FIGSIZE = {
    "rpl": (10.0, 3.5),
    "jigsaw": (10.0, 6.0),
    "rotation": (12.5, 5.5),
    "cpc": (12.0, 6.0),
    "exemplar": (10.0, 3.0),
    "segmentation": (9.0, 3.5),
    "curves": (10.0, 4.0),
}

_AXIAL = 2  # = data.slices.AXIAL_AXIS (kept literal so this module imports no data code)
_CONTEXT, _TARGET = "tab:blue", "tab:red"


# --------------------------------------------------------------------------------------------
# Arrays → 2D pictures
# --------------------------------------------------------------------------------------------


def to_2d(x: np.ndarray, *, channel: int = 0) -> np.ndarray:
    """One channel of a patch as a 2D array: `[d, h, w, C]` → its middle slice along axis 2,
    `[d, h]`; `[h, w, C]` → `[h, w]`. float32."""
    x = np.asarray(x, np.float32)
    if x.ndim == 4:
        x = np.take(x, x.shape[_AXIAL] // 2, axis=_AXIAL)
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


def plot_segmentation(
    image: np.ndarray, true: np.ndarray, pred: np.ndarray, *, title: str = ""
) -> tuple[Figure, dict]:
    """Predicted vs true labels on one slice.

    Args:
      image: `[h, w]` float, the scan slice; true, pred: `[h, w]` int labels (0 = background).
    """
    from ssl3d_jax import metrics

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


# --------------------------------------------------------------------------------------------
# Samples from the tasks' own functions (jax in, numpy out)
# --------------------------------------------------------------------------------------------


def sample_rpl(volumes: np.ndarray, key, section) -> dict:
    """`rpl.make_batch` on `volumes [B, *spatial, C]` with `config.rpl`'s grid (training=True, as
    pretraining draws it): `pairs [B, 2, *patch, C]`, `labels [B]`."""
    from ssl3d_jax.tasks import rpl

    fn = functools.partial(
        rpl.make_batch,
        patches_per_side=int(section.patches_per_side),
        jitter=int(section.jitter),
        training=True,
        grid_fraction=float(section.get("grid_fraction", 1.0)),
    )
    pairs, labels = jax.jit(fn)(volumes, key)
    return {"pairs": np.asarray(pairs), "labels": np.asarray(labels)}


def sample_jigsaw(volumes: np.ndarray, key, section) -> dict:
    """`jigsaw.make_batch` with `config.jigsaw`'s grid and permutation set (training=True):
    `puzzles [B, N, *patch, C]`, `labels [B]`, `permutations [K, N]`."""
    from ssl3d_jax.tasks import jigsaw

    p = int(section.patches_per_side)
    n = p ** (volumes.ndim - 2)
    perms = jigsaw.permutation_set(int(section.num_permutations), n, int(section.permutation_seed))
    fn = functools.partial(
        jigsaw.make_batch,
        patches_per_side=p,
        jitter=int(section.jitter),
        permutations=perms,
        training=True,
        grid_fraction=float(section.get("grid_fraction", 1.0)),
    )
    puzzles, labels = jax.jit(fn)(volumes, key)
    return {"puzzles": np.asarray(puzzles), "labels": np.asarray(labels), "permutations": perms}


def sample_rotation(volume: np.ndarray) -> dict:
    """`rotation.rotate(volume, k)` for every class k: `rotated [K, *spatial, C]`, `table`."""
    from ssl3d_jax.tasks import rotation

    dims = volume.ndim - 1
    k = rotation.num_classes(dims)
    rotated = np.stack([np.asarray(rotation.rotate(volume, c)) for c in range(k)])
    return {"rotated": rotated, "table": rotation.rotation_table(dims)}


def sample_cpc(volumes: np.ndarray, key, section) -> dict:
    """`cpc.make_batch` with `config.cpc`'s grid and augmentation (training=True): `patches
    [B, P**n, *patch, C]`, with `context` / `targets` index tables."""
    from ssl3d_jax.tasks import cpc

    p, dims = int(section.patches_per_side), volumes.ndim - 2
    fn = functools.partial(
        cpc.make_batch,
        patches_per_side=p,
        jitter=int(section.jitter),
        volume_crop=float(section.volume_crop),
        patch_crop=float(section.patch_crop),
        flip=bool(section.flip_patches),
        training=True,
        grid_fraction=float(section.get("grid_fraction", 1.0)),
    )
    return {
        "patches": np.asarray(jax.jit(fn)(volumes, key)),
        "context": cpc.context_indices(p, dims),
        "targets": cpc.target_indices(p, dims),
    }


def sample_exemplar(volumes: np.ndarray, key, section) -> dict:
    """`exemplar.make_triplets` with `config.exemplar`'s augmentation: `anchors`, `positives`,
    `negatives` `[B, *spatial, C]`, `negative_index [B]`."""
    from ssl3d_jax.tasks import exemplar

    kwargs = {k: float(section[k]) for k in exemplar.AUGMENT_KEYS}
    fn = functools.partial(
        exemplar.make_triplets,
        augment_positive=bool(section.augment_positive),
        augment_kwargs=kwargs,
    )
    a, p, n, idx = jax.jit(fn)(volumes, key)
    return {
        "anchors": np.asarray(a),
        "positives": np.asarray(p),
        "negatives": np.asarray(n),
        "negative_index": np.asarray(idx),
    }


def task_figure(task: str, section, volumes: np.ndarray, key, *, names, channel: int = 0):
    """`(Figure, panels)` of pretext task `task` on `volumes [B, *spatial, C]` (B >= 2, drawn:
    volume 0), with the task's config section `section` (e.g. `config.rpl`)."""
    if task == "rpl":
        s = sample_rpl(volumes, key, section)
        return plot_rpl(
            volumes[0],
            s["pairs"][0],
            int(s["labels"][0]),
            patches_per_side=int(section.patches_per_side),
            channel=channel,
        )
    if task == "jigsaw":
        s = sample_jigsaw(volumes, key, section)
        label = int(s["labels"][0])
        return plot_jigsaw(
            s["puzzles"][0],
            s["permutations"][label],
            label,
            patches_per_side=int(section.patches_per_side),
            channel=channel,
        )
    if task == "rotation":
        s = sample_rotation(volumes[0])
        return plot_rotation(s["rotated"], s["table"], channel=channel)
    if task == "cpc":
        s = sample_cpc(volumes, key, section)
        p, dims = int(section.patches_per_side), volumes.ndim - 2
        centre = (p // 2,) * (dims - 1)  # a central column
        column = int(np.ravel_multi_index(centre, (p,) * (dims - 1)))
        return plot_cpc(
            s["patches"][0],
            patches_per_side=p,
            context=s["context"],
            targets=s["targets"],
            column=column,
            channel=channel,
        )
    if task == "exemplar":
        s = sample_exemplar(volumes, key, section)
        return plot_exemplar(
            volumes[0],
            s["anchors"][0],
            s["positives"][0],
            s["negatives"][0],
            negative_source=f"case {names[int(s['negative_index'][0])]}",
            channel=channel,
        )
    raise ConfigError(f"config.visualize.tasks: unknown task {task!r}; expected one of {TASKS}")


# --------------------------------------------------------------------------------------------
# The mode
# --------------------------------------------------------------------------------------------


def selected_tasks(config) -> tuple[str, ...]:
    """`config.visualize.tasks`: () → `(config.task,)`; `('all',)` → every task."""
    chosen = tuple(config.visualize.tasks or ())
    if not chosen:
        if not config.task:
            raise ConfigError(
                "config.visualize.tasks is empty and config.task is not set: use a task config "
                "or --config.visualize.tasks=all"
            )
        return (config.task,)
    if "all" in chosen:
        return TASKS
    for t in chosen:
        if t not in TASKS:
            raise ConfigError(f"config.visualize.tasks: unknown task {t!r}; expected {TASKS}")
    return chosen


def task_section(config, task: str):
    """The `config.<task>` section: this config's own when it has one (overrides kept), else the
    default of `configs/<task>.py` at this config's size and dimensionality."""
    if task in config:
        return config[task]
    from ssl3d_jax import experiment

    return experiment.task_config(task, config)[task]


def load_inputs(config, dataset, num: int = 2) -> tuple[np.ndarray, list[str]]:
    """`num` preprocessed training inputs `[num, *spatial, C]` exactly as pretraining reads them
    (3D volumes; 2D: the middle kept axial slice of each volume, or the images), and their case
    names. The first is `config.visualize.case` when set, else the first training case."""
    from ssl3d_jax.data import datasets, preprocess, slices
    from ssl3d_jax.train import common
    from ssl3d_jax.train import data as data_lib

    if dataset.kind == "unlabelled":
        names = sorted(c.name for c in dataset.cases)
    else:
        names = list(data_lib.base_split(config, dataset)["train"])
    want = config.visualize.case
    if want:
        known = {c.name for c in dataset.cases}
        if want not in known:
            raise ConfigError(f"config.visualize.case={want!r}: no such case in {dataset.root}")
        names = [want] + [n for n in names if n != want]
    if len(names) < num:
        raise ConfigError(f"visualize needs {num} cases, {dataset.root} has {len(names)}")
    cases = data_lib.select(dataset.cases, names[:num])
    dims = int(config.data.spatial_dims)
    if dataset.layout == "images":
        source = datasets.ImageSource(dataset, cases, size=config.data.size, with_label=False)
        images = [np.asarray(source[i]["image"]) for i in range(num)]
        return np.stack(images).astype(np.float32), names[:num]
    source = common.preprocessed_source(config, dataset, cases, with_label=False, progress=False)
    records = [source[i] for i in range(num)]
    if config.data.resize_mode == "none":  # the training crop, centred on no voxel in particular
        crop = preprocess.RandomCrop(config.data.size, foreground_prob=0.0)
        rng = np.random.default_rng(int(config.visualize.seed))
        records = [crop.random_map(dict(r), rng) for r in records]
    if dims == 2:
        sliced = slices.SliceSource(
            _ListSource(records), size=config.data.size, keep_fraction=config.data.slice_fraction
        )
        per = sliced.slices_per_volume
        records = [sliced[v * per + per // 2] for v in range(num)]
    return np.stack([np.asarray(r["image"], np.float32) for r in records]), names[:num]


class _ListSource:
    def __init__(self, records):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]


def segmentation_figures(config, workdir: str, dataset) -> list[tuple[str, Figure]]:
    """`(arm, Figure)` per finetuning arm with saved predictions: the case
    `config.visualize.case` (else the first predicted case), on the axial slice with the most
    true foreground (the middle one without any); scan channel `config.visualize.channel`."""
    from ssl3d_jax import tensorboard
    from ssl3d_jax.data import nifti

    by_name = {c.name: c for c in dataset.cases}
    out = []
    for arm_dir in sorted(glob.glob(os.path.join(workdir, "finetune", "*"))):
        preds = sorted(glob.glob(os.path.join(arm_dir, "predictions", "*_pred.nii.gz")))
        arm = os.path.basename(arm_dir)
        cases = {os.path.basename(p)[: -len("_pred.nii.gz")]: p for p in preds}
        cases = {k: v for k, v in cases.items() if k in by_name and by_name[k].label is not None}
        if not cases:
            continue
        name = config.visualize.case if config.visualize.case in cases else sorted(cases)[0]
        case = by_name[name]
        pred, _ = nifti.load_nifti(cases[name], dtype=np.int32)
        true, _ = nifti.load_nifti(case.label, dtype=np.int32)
        ch = int(config.visualize.channel)
        if dataset.channel_index:
            scan, _ = nifti.load_nifti(case.images[0])
            if scan.ndim == 4:
                scan = scan[..., dataset.channel_index[ch]]
        else:
            scan, _ = nifti.load_nifti(case.images[ch])
        if pred.shape != true.shape or scan.shape[:3] != true.shape:
            log.warning(
                "Skipping %s: prediction %s, label %s and scan %s differ in shape",
                cases[name],
                pred.shape,
                true.shape,
                scan.shape,
            )
            continue
        z = tensorboard.best_slice(true, axis=_AXIAL)
        fig, _ = plot_segmentation(
            scan[:, :, z],
            true[:, :, z],
            pred[:, :, z],
            title=f"{arm}: case {name}, axial slice {z}, {dataset.channels[ch]};",
        )
        out.append((arm, fig))
    return out


def run(config, workdir: str, *, dataset=None) -> list[str]:
    """Write the figures of `config.visualize` under `<workdir>/figures/`; returns their paths.

    Pretext-task figures always; `segmentation_<arm>.png` and `curves.png` only when the workdir
    holds predictions / `metrics.jsonl` (each skip is logged).
    """
    from ssl3d_jax.train import data as data_lib

    workdir = os.path.abspath(workdir)
    if jax.process_index() != 0:  # every process would draw the same figures
        return []
    out_dir = os.path.join(workdir, "figures")
    dpi = int(config.visualize.dpi)
    channel = int(config.visualize.channel)
    dataset = data_lib.open_dataset(config) if dataset is None else dataset
    if not 0 <= channel < dataset.in_channels:
        raise ConfigError(
            f"config.visualize.channel={channel}: the data has {dataset.in_channels} channel(s)"
        )
    tasks = selected_tasks(config)
    written = []
    volumes, names = load_inputs(config, dataset)
    log.info("Drawing %s on case(s) %s", ", ".join(tasks), ", ".join(names))
    key = jax.random.key(int(config.visualize.seed))
    for task in tasks:
        fig, _ = task_figure(
            task, task_section(config, task), volumes, key, names=names, channel=channel
        )
        written.append(save(fig, os.path.join(out_dir, f"{task}.png"), dpi=dpi))

    segs = segmentation_figures(config, workdir, dataset) if dataset.kind == "segmentation" else []
    if not segs:
        log.info(
            "No segmentation figure: no predictions under %s/finetune/<arm>/predictions "
            "(run a finetuning mode first)",
            workdir,
        )
    for arm, fig in segs:
        written.append(save(fig, os.path.join(out_dir, f"segmentation_{arm}.png"), dpi=dpi))

    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            records = [json.loads(line) for line in f if line.strip()]
        results = os.path.join(workdir, "results.json")
        test_dice = None
        if os.path.exists(results):
            with open(results) as f:
                arms = json.load(f).get("arms", {})
            test_dice = {a: r["dice_mean"] for a, r in arms.items() if "dice_mean" in r}
        fig, _ = plot_curves(records, test_dice=test_dice)
        written.append(save(fig, os.path.join(out_dir, "curves.png"), dpi=dpi))
    else:
        log.info("No training curves: %s does not exist", metrics)
    for path in written:
        log.info("Wrote %s", path)
    return written
