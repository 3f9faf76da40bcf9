"""Shortcut audit of the grid-based pretext tasks: can ONE patch tell where it came from?

RPL, Jigsaw and CPC are meant to be solved by relating patches to each other. If a single patch
already shows which grid cell it was cut from (how much background it holds and where, a fixed
intensity gradient, ...), a network can solve the task patch by patch and learn little else. The
audit measures that directly: it samples single patches with the task's OWN sampling functions
(`rpl.make_batch`, `jigsaw.make_batch`, `cpc.make_batch`, `training=True`, so the random grid
origin and jitter of the config apply), labels each with its position, trains a multinomial
logistic regression on the raw voxels of the patches of one set of cases and scores it on the
patches of other cases. Held-out accuracy near chance means no linear single-patch shortcut.

Labels (one patch per task draw, an independent draw each):
  * rpl: the query patch of a pair and the pair's class (`P**n - 1` classes; the centre
    reference is never a query);
  * jigsaw: one patch of a puzzle, drawn uniformly among the slots, and the grid cell it was cut
    from, `perm[label][slot]` (`P**n` classes);
  * cpc: one of the grid patches (after CPC's augmentation) and its grid cell (`P**n` classes).
    The InfoNCE candidates of a prediction include the same volume's other patches, so a latent
    that encodes absolute position alone singles out the positive.

Features: the patch's voxels (all channels), optionally average-pooled by `downsample` per axis,
optionally with their squares (`squares=True`: a per-voxel quadratic model, which sees
"tissue vs background" also where background and mean tissue are both 0 after z-scoring),
standardised with the training patches' mean and standard deviation. Classifier: softmax
regression with an L2 penalty, fitted by SciPy's L-BFGS for a fixed number of iterations (NumPy
only; scikit-learn is not a dependency). With several L2 strengths, the one with the best
accuracy on a case-wise validation split of the training cases is refitted on all of them.

Command (writes the report of docs/results/shortcut_audit.md, `--help` for the flags):

    python -m ssl3d_jax.audit --out=docs/results/shortcut_audit

API: `audit(config, train_volumes, test_volumes, samples_per_volume=..., key=...)`.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import platform
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from ssl3d_jax import tasks
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.ops.patches import grid_layout, patch_shape

__all__ = [
    "TASKS",
    "position_samples",
    "fit_softmax_regression",
    "audit",
    "paper_jitter",
    "task_config",
    "load_inputs",
    "run_report",
    "render_markdown",
    "main",
]

TASKS = ("rpl", "jigsaw", "cpc")
# L2 strengths tried (selected on a case-wise validation split); measured on the default
# phantom, the best lies inside this range for every setting of the report.
DEFAULT_L2 = (1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_MAX_ITER = 200


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def _section(config, task: str):
    section = config.get(task)
    if section is None:
        raise ConfigError(f"audit: the config has no `{task}` section (config.task={task!r}).")
    return section


def _sampler(config, task: str, spatial_dims: int):
    """`(volumes [V, *spatial, C], key) -> (patches [V, *patch, C], labels [V] int32)`, one
    single patch per volume from one draw of the task, and the number of classes."""
    s = _section(config, task)
    p, j = int(s.patches_per_side), int(s.jitter)
    f = float(s.grid_fraction)
    n = p**spatial_dims
    if task == "rpl":
        from ssl3d_jax.tasks import rpl

        def draw(volumes, key):
            pairs, labels = rpl.make_batch(
                volumes, key, patches_per_side=p, jitter=j, training=True, grid_fraction=f
            )
            return pairs[:, 1], labels  # the query patch and its class

        return draw, n - 1
    if task == "jigsaw":
        from ssl3d_jax.tasks import jigsaw

        perms = jnp.asarray(
            jigsaw.permutation_set(int(s.num_permutations), n, int(s.permutation_seed))
        )

        def draw(volumes, key):
            key_task, key_slot = jax.random.split(key)
            puzzles, labels = jigsaw.make_batch(
                volumes,
                key_task,
                patches_per_side=p,
                jitter=j,
                permutations=perms,
                training=True,
                grid_fraction=f,
            )
            slot = jax.random.randint(key_slot, (volumes.shape[0],), 0, n)
            rows = jnp.arange(volumes.shape[0])
            return puzzles[rows, slot], perms[labels, slot]  # output slot s holds cell perm[s]

        return draw, n
    if task == "cpc":
        from ssl3d_jax.tasks import cpc

        def draw(volumes, key):
            key_task, key_slot = jax.random.split(key)
            patches = cpc.make_batch(
                volumes,
                key_task,
                patches_per_side=p,
                jitter=j,
                volume_crop=float(s.volume_crop),
                patch_crop=float(s.patch_crop),
                flip=bool(s.flip_patches),
                training=True,
                grid_fraction=f,
            )
            cell = jax.random.randint(key_slot, (volumes.shape[0],), 0, n)
            return patches[jnp.arange(volumes.shape[0]), cell], cell

        return draw, n
    raise ConfigError(f"audit: config.task={task!r}; expected one of {TASKS}.")


def _pool(x: np.ndarray, factor: int) -> np.ndarray:
    """Average pooling of `x [N, *spatial, C]` by `factor` per spatial axis (remainder dropped)."""
    if factor <= 1:
        return x
    spatial = x.shape[1:-1]
    keep = [s // factor * factor for s in spatial]
    if min(keep) < factor:
        raise ConfigError(f"audit: downsample={factor} is larger than the patch {spatial}.")
    x = x[(slice(None), *(slice(0, k) for k in keep))]
    shape = [x.shape[0]]
    for k in keep:
        shape += [k // factor, factor]
    shape.append(x.shape[-1])
    return x.reshape(shape).mean(axis=tuple(range(2, 2 * len(keep) + 1, 2)))


def position_samples(
    config,
    volumes: np.ndarray,
    *,
    samples_per_volume: int,
    key: jax.Array,
    downsample: int = 1,
    squares: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Single patches of `config.task` with their position labels, as features.

    Args:
      config: a task config (`config.task` in `TASKS`, with its section, e.g. `config.rpl`).
      volumes: `[V, D, H, W, C]` (or `[V, H, W, C]` images) float, preprocessed.
      samples_per_volume: S, independent task draws per volume (one patch from each).
      key: `jax.random` key.
      downsample: average pooling factor per spatial axis of the patches (1: raw voxels).
      squares: append the squared features (a per-voxel quadratic model).

    Returns:
      `(features [V * S, F] float32, labels [V * S] int64, num_classes)`.
    """
    task = str(config.task)
    volumes = jnp.asarray(volumes, jnp.float32)
    dims = volumes.ndim - 2
    if dims not in (2, 3):
        raise ConfigError(f"audit: volumes must be [V, *spatial, C], got {volumes.shape}.")
    draw, num_classes = _sampler(config, task, dims)

    @jax.jit
    def run(volumes, keys):  # sequential over the draws: one draw's patches in memory at a time
        # (volumes is an argument: closed over, it would become a large constant for XLA.)
        return jax.lax.map(lambda k: draw(volumes, k), keys)

    patches, labels = run(volumes, jax.random.split(key, int(samples_per_volume)))  # [S, V, ...]
    patches = np.asarray(patches, np.float32).reshape(-1, *patches.shape[2:])
    x = _pool(patches, int(downsample)).reshape(patches.shape[0], -1)
    if squares:
        x = np.concatenate([x, x * x], axis=1)
    return x, np.asarray(labels).reshape(-1).astype(np.int64), num_classes


# --------------------------------------------------------------------------------------------
# Softmax regression
# --------------------------------------------------------------------------------------------


def fit_softmax_regression(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    l2: float,
    max_iter: int = DEFAULT_MAX_ITER,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: minimises mean cross-entropy + `l2 / 2 * |W|^2` (the bias
    is not penalised) with L-BFGS for at most `max_iter` iterations, from zero weights.

    Args:
      x: `[N, F]` float features (standardise them first).
      y: `[N]` int labels in `[0, num_classes)`.

    Returns:
      `(W [F, K], b [K])` float64.
    """
    # float32 products (4x faster than float64 here, and far inside its precision for these
    # losses); L-BFGS keeps its own state in float64.
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int64)
    n, f = x.shape
    k = int(num_classes)
    onehot = np.zeros((n, k), np.float32)
    onehot[np.arange(n), y] = 1.0

    def loss_grad(theta):
        w = theta[: f * k].reshape(f, k).astype(np.float32)
        logits = x @ w + theta[f * k :].astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -float((onehot * logp).sum(dtype=np.float64)) / n
        loss += 0.5 * l2 * float((w * w).sum(dtype=np.float64))
        d = (np.exp(logp) - onehot) / np.float32(n)
        grad = np.concatenate([(x.T @ d + np.float32(l2) * w).ravel(), d.sum(axis=0)])
        return loss, grad.astype(np.float64)

    result = scipy.optimize.minimize(
        loss_grad,
        np.zeros(f * k + k),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": int(max_iter)},
    )
    theta = result.x
    return theta[: f * k].reshape(f, k), theta[f * k :]


def _accuracy(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(np.asarray(x, np.float32) @ w.astype(np.float32) + b, 1) == y))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)  # constant features (e.g. always background) -> 0
    return [(a - mean) / std for a in (train, *others)]


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


def audit(
    config,
    train_volumes: np.ndarray,
    test_volumes: np.ndarray,
    *,
    samples_per_volume: int,
    key: jax.Array,
    l2: float | Sequence[float] = DEFAULT_L2,
    downsample: int = 1,
    squares: bool = False,
    max_iter: int = DEFAULT_MAX_ITER,
) -> dict:
    """Held-out accuracy of a linear classifier of a single patch's position, vs chance.

    Args:
      config: task config; `config.task` in `TASKS` and its section (grid, jitter,
        grid_fraction, ...) decide the sampling.
      train_volumes: `[V, *spatial, C]` preprocessed inputs the classifier is fitted on.
      test_volumes: `[V', *spatial, C]` other cases (never the same scans) it is scored on.
      samples_per_volume: independent task draws per volume (one patch from each).
      key: `jax.random` key (split between the train and test draws).
      l2: one L2 strength, or several: then each is fitted on the first 2/3 of the training
        volumes, scored on the rest, and the best is refitted on all training volumes.
      downsample, squares: features (see `position_samples`).
      max_iter: L-BFGS iterations per fit.

    Returns:
      `{"task", "accuracy", "chance", "ratio_to_chance", "n_train", "n_test", "num_classes",
      "l2", "train_accuracy"}`: `chance` is 1 / num_classes (the classes are uniform by
      construction), `ratio_to_chance` accuracy / chance.
    """
    task = str(config.task)
    if task not in TASKS:
        raise ConfigError(f"audit: config.task={task!r}; expected one of {TASKS}.")
    if len(train_volumes) < 1 or len(test_volumes) < 1:
        raise ConfigError("audit: needs at least one training and one test volume.")
    key_train, key_test = jax.random.split(key)
    sample = functools.partial(
        position_samples,
        config,
        samples_per_volume=samples_per_volume,
        downsample=downsample,
        squares=squares,
    )
    x_train, y_train, k = sample(np.asarray(train_volumes), key=key_train)
    x_test, y_test, _ = sample(np.asarray(test_volumes), key=key_test)

    l2s = [float(l2)] if np.isscalar(l2) else [float(v) for v in l2]
    chosen = l2s[0]
    if len(l2s) > 1:
        v = len(train_volumes)
        if v < 2:
            raise ConfigError("audit: choosing l2 needs at least two training volumes.")
        # Samples are [S, V] row-major: volume index = row % V. Case-wise split: no scan is in
        # both the fitting and the validation part.
        fit_part = (np.arange(len(y_train)) % v) < max(1, (2 * v) // 3)
        a, b = _standardise(x_train[fit_part], x_train[~fit_part])
        scores = []
        for value in l2s:
            w, bias = fit_softmax_regression(a, y_train[fit_part], k, l2=value, max_iter=max_iter)
            scores.append(_accuracy(w, bias, b, y_train[~fit_part]))
        chosen = l2s[int(np.argmax(scores))]
    a, b = _standardise(x_train, x_test)
    w, bias = fit_softmax_regression(a, y_train, k, l2=chosen, max_iter=max_iter)
    accuracy = _accuracy(w, bias, b, y_test)
    chance = 1.0 / k
    return {
        "task": task,
        "accuracy": accuracy,
        "chance": chance,
        "ratio_to_chance": accuracy / chance,
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "num_classes": int(k),
        "l2": chosen,
        "train_accuracy": _accuracy(w, bias, a, y_train),
    }


# --------------------------------------------------------------------------------------------
# The report command
# --------------------------------------------------------------------------------------------

# The jitter of each task's config BEFORE the random grid existed (commit 884e2a0), per
# (size, spatial dims): the "fixed grid (before)" rows reproduce that setting.
BEFORE_JITTER = {
    ("default", 3): {"rpl": 3, "jigsaw": 3, "cpc": 2},
    ("smoke", 3): {"rpl": 3, "jigsaw": 3, "cpc": 0},
    ("paper", 3): {"rpl": 3, "jigsaw": 3, "cpc": 0},
    ("default", 2): {"rpl": 3, "jigsaw": 2, "cpc": 2},
    ("smoke", 2): {"rpl": 3, "jigsaw": 3, "cpc": 0},
    ("paper", 2): {"rpl": 3, "jigsaw": 8, "cpc": 1},
}


def paper_jitter(cell: int) -> int:
    """The original's jitter share of the cell (3 of 42 voxels), at least 1 voxel."""
    return max(1, round(int(cell) * 3 / 42))


def task_config(task: str, size: str, dims: int = 3):
    """The task's config file (`tasks.config_file`) at `size` (and `2d` for dims 2), unlocked."""
    if task not in TASKS:
        raise ConfigError(f"audit: task {task!r}; expected one of {TASKS}.")
    return tasks.task_config(task, size + (",2d" if dims == 2 else ""))


def load_inputs(config, *, slices_per_case: int = 8) -> tuple[np.ndarray, np.ndarray, list]:
    """The preprocessed inputs of `config.data`'s dataset, split as the runs split it.

    Classifier training inputs: every case but the held-out test cases of `config.seed`'s split
    (`config.data.num_test`; the same test cases as the runs'), test inputs: those test cases.
    3D: the volumes `[V, S, S, S, C]`; 2D: `slices_per_case` evenly spaced axial slices of the
    central `config.data.slice_fraction` of each volume, `[V * slices_per_case, S, S, C]` (a
    case's slices stay on one side).

    Returns:
      `(train_inputs, test_inputs, test_case_names)`.
    """
    from ssl3d_jax.data import slices
    from ssl3d_jax.train import common, data

    dataset = data.open_dataset(config)
    names = [c.name for c in dataset.cases]
    split = data.make_splits(
        names, num_test=int(config.data.num_test), num_labeled=-1, seed=int(config.seed)
    )

    def read(which: list[str]) -> np.ndarray:
        cases = data.select(dataset.cases, which)
        source = common.preprocessed_source(
            config, dataset, cases, with_label=False, progress=False
        )
        vols = np.stack([np.asarray(source[i]["image"], np.float32) for i in range(len(source))])
        if int(config.data.spatial_dims) == 3:
            return vols
        size = vols.shape[1]
        keep = max(1, int(round(size * float(config.data.slice_fraction))))
        first = (size - keep) // 2
        zs = first + np.linspace(0, keep - 1, int(slices_per_case)).round().astype(int)
        out = np.take(vols, zs, axis=1 + slices.AXIAL_AXIS)  # [V, .., k, .., C]
        out = np.moveaxis(out, 1 + slices.AXIAL_AXIS, 1)  # [V, k, S, S, C]
        return out.reshape(-1, *out.shape[2:])

    return read(split["train"]), read(split["test"]), list(split["test"])


def _variants(task: str, config, size: str, dims: int, fractions: Sequence[float]) -> list:
    """`(name, grid_fraction, jitter)` rows: the old fixed grid, the config, the fractions; a
    fraction giving the same grid (cells, jitter) as an earlier row is left out."""
    section = config[task]
    p = int(section.patches_per_side)
    shape = (int(config.data.size),) * dims + (1,)

    def geometry(f: float, j: int) -> tuple:  # the cells decide the room too
        return grid_layout(shape, patches_per_side=p, grid_fraction=f)[0][0], j, f == 1.0

    rows, seen = [], set()
    before = BEFORE_JITTER.get((size, dims), {}).get(task)
    candidates = []
    if before is not None:
        candidates.append(("fixed grid (before)", 1.0, int(before)))
    candidates.append((f"configs/{task}.py", float(section.grid_fraction), int(section.jitter)))
    for f in fractions:
        cell = grid_layout(shape, patches_per_side=p, grid_fraction=float(f))[0][0]
        candidates.append(("random grid", float(f), paper_jitter(cell)))
    for name, f, j in candidates:
        g = geometry(f, j)
        if g not in seen and g[0] - j >= 1:
            seen.add(g)
            rows.append((name, f, j))
    return rows


def machine_description() -> str:
    """CPU model, core count, OS and jax version: the header line of a committed report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}; jax {jax.__version__}"


def git_commit() -> str:
    """Short hash of the checkout this module lives in, or 'unknown'."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + (" + uncommitted changes" if dirty else "")


def render_markdown(report: dict) -> str:
    """The markdown report of `run_report`'s dict (rows of every run, in order)."""
    lines = [
        "# Shortcut audit: does one patch alone tell where it came from?",
        "",
        "Written by `python -m ssl3d_jax.audit` (`ssl3d_jax/audit.py`). For each grid-based",
        "pretext task, single patches are drawn with the task's own sampling function",
        "(`training=True`: random grid origin and jitter apply), labelled with their grid position",
        "(RPL: the query's class, 26; Jigsaw: the cell a puzzle slot came from, 27; CPC: the cell",
        "of one of the 64 patches), and a softmax regression on the patch's standardised voxels",
        "(all 4 channels; L2 chosen on a case-wise validation split, L-BFGS) is fitted on the",
        "patches of the non-test cases and scored on the held-out test cases of the split.",
        "Accuracy near chance (`x chance` near 1) means no linear single-patch shortcut;",
        "`quadratic` adds the squared voxels as features (a per-voxel quadratic model, which also",
        "sees background where it equals the z-scored mean tissue value 0).",
        "",
    ]
    if report.get("summary"):  # written by hand into the JSON, kept by --append / --render_only
        lines += [report["summary"].rstrip(), ""]
    for run in report["runs"]:
        meta = run["meta"]
        lines += [
            f"## {meta['size']} size, {meta['dims']}D ({meta['input']})",
            "",
            "```bash",
            meta["command"],
            "```",
            "",
            f"- Date: {meta['date']}; machine: {meta['machine']}; commit {meta['commit']}.",
            f"- Data: {meta['data']}.",
            f"- {meta['samples_per_volume']} task draws per input (one patch from each); "
            f"features: {meta['features']}; {meta['seconds']:.0f} s in all.",
            "",
        ]
        if not meta.get("complete", True):
            lines += ["**Interrupted** (rows so far); rerun the command with `--resume`.", ""]
        quad = any("quadratic_accuracy" in r for r in run["rows"])
        head = "| task | background | grid | grid_fraction | jitter | cell | patch | accuracy "
        head += "| chance | x chance |" + (" quadratic accuracy | x chance |" if quad else "")
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in run["rows"]:
            cells = [
                r["task"],
                r["background"],
                r["grid"],
                f"{r['grid_fraction']:g}",
                str(r["jitter"]),
                f"{r['cell']}",
                f"{r['patch']}",
                f"{r['accuracy']:.3f}",
                f"{r['chance']:.3f}",
                f"**{r['ratio_to_chance']:.2f}**",
            ]
            if quad:
                cells += (
                    [f"{r['quadratic_accuracy']:.3f}", f"{r['quadratic_ratio_to_chance']:.2f}"]
                    if "quadratic_accuracy" in r
                    else ["", ""]
                )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_report(
    *,
    size: str,
    dims: int,
    tasks: Sequence[str],
    backgrounds: Sequence[str],
    fractions: Sequence[float],
    samples_per_volume: int,
    seed: int,
    squares: bool,
    downsample: int,
    num_cases: int | None,
    num_test: int | None,
    slices_per_case: int,
    command: str,
    log=print,
    done_rows: Sequence[dict] = (),
    save=None,
) -> dict:
    """One run of the command: every (task, background, grid variant) row; see `main`.

    `done_rows`: rows of an interrupted run with the same settings, reused instead of recomputed
    (matched on task, background, grid_fraction and jitter). `save(run)`: called with the run so
    far (`meta["complete"]` False) after every row, so that a killed run keeps what it measured.
    """
    from ssl3d_jax.data import phantom

    t0 = time.time()
    rows = []
    inputs = {}
    described = ""

    def meta(complete: bool) -> dict:
        features = "raw voxels" if downsample <= 1 else f"voxels average-pooled by {downsample}"
        return dict(
            size=size,
            dims=dims,
            input=f"{int(task_config(tasks[0], size, dims).data.size)}^{dims} inputs",
            command=command,
            date=datetime.date.today().isoformat(),
            machine=machine_description(),
            commit=git_commit(),
            data=described,
            samples_per_volume=int(samples_per_volume),
            features=features + (" (and their squares)" if squares else ""),
            squares=bool(squares),
            downsample=int(downsample),
            seed=int(seed),
            seconds=time.time() - t0 + sum(float(r.get("seconds", 0)) for r in done_rows),
            complete=complete,
        )

    def done(task, background, f, j):
        for r in done_rows:
            if (r["task"], r["background"], r["grid_fraction"], r["jitter"]) == (
                task,
                background,
                f,
                j,
            ):
                return r
        return None

    for background in backgrounds:
        for task in tasks:
            config = task_config(task, size, dims)
            config.data.background = background
            if num_cases is not None:
                config.data.phantom.num_cases = int(num_cases)
            if num_test is not None:
                config.data.num_test = int(num_test)
            data_key = json.dumps(config.data.to_dict(), sort_keys=True, default=str)
            if data_key not in inputs:
                log(f"loading {size} {dims}D inputs, background={background!r}")
                inputs[data_key] = load_inputs(config, slices_per_case=slices_per_case)
            train, test, test_names = inputs[data_key]
            where = config.data.root or f"built-in phantom {phantom._VERSION}"
            described = (
                f"{where}, {config.data.phantom.num_cases if not config.data.root else '?'} "
                f"cases ({len(test_names)} held out: {', '.join(test_names)}), preprocessed as "
                f"`configs/<task>.py:{size}` (resize_mode {config.data.resize_mode!r}, "
                f"normalization {config.data.normalization!r}); inputs {train.shape[1:]}, "
                f"{len(train)} train / {len(test)} test"
            )
            for name, f, j in _variants(task, config, size, dims, fractions):
                previous = done(task, background, f, j)
                if previous is not None:
                    rows.append(previous)
                    log(f"{task:7s} {background:5s} {name:20s} f={f:<5g} J={j}: done before")
                    continue
                trial = copy.deepcopy(config)
                trial[task].grid_fraction = f
                trial[task].jitter = j
                shape = (int(config.data.size),) * dims + (1,)
                p = int(trial[task].patches_per_side)
                cell, _ = grid_layout(shape, patches_per_side=p, grid_fraction=f)
                pshape = patch_shape(shape, patches_per_side=p, jitter=j, grid_fraction=f)
                key = jax.random.key(seed)
                t = time.time()
                kw = dict(samples_per_volume=samples_per_volume, key=key, downsample=downsample)
                result = audit(trial, train, test, **kw)
                row = dict(
                    result,
                    background=background,
                    grid=name,
                    grid_fraction=f,
                    jitter=j,
                    cell=cell[0],
                    patch="x".join(map(str, pshape)),
                )
                if squares:
                    quad = audit(trial, train, test, squares=True, **kw)
                    row["quadratic_accuracy"] = quad["accuracy"]
                    row["quadratic_ratio_to_chance"] = quad["ratio_to_chance"]
                row["seconds"] = round(time.time() - t, 1)
                rows.append(row)
                log(
                    f"{task:7s} {background:5s} {name:20s} f={f:<5g} J={j} patch {row['patch']:8s}"
                    f" accuracy {row['accuracy']:.3f} = {row['ratio_to_chance']:.2f} x chance"
                    + (f", quadratic {row['quadratic_ratio_to_chance']:.2f} x" if squares else "")
                    + f" ({row['seconds']} s)"
                )
                if save is not None:
                    save({"meta": meta(False), "rows": list(rows)})
    return {"meta": meta(True), "rows": rows}


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m ssl3d_jax.audit [flags]`: runs the audit grid and writes `<out>.md/.json`."""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m ssl3d_jax.audit",
        description="Single-patch position shortcut audit of the grid pretext tasks on the "
        "built-in phantom (or --root); writes <out>.json and <out>.md.",
    )
    parser.add_argument("--size", default="default", choices=("smoke", "default", "paper"))
    parser.add_argument("--dims", type=int, default=3, choices=(2, 3))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--backgrounds", default="zero,value")
    parser.add_argument(
        "--fractions",
        default="0.75,0.6,0.5,0.4",
        help="grid_fraction values of the 'random grid' rows (jitter: 3/42 of the cell, >= 1); "
        "the old fixed grid and the config's own setting are always included",
    )
    parser.add_argument("--samples_per_volume", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--squares", action="store_true", help="also the quadratic features")
    parser.add_argument("--downsample", type=int, default=1, help="average pooling of patches")
    parser.add_argument("--num_cases", type=int, default=None, help="phantom cases")
    parser.add_argument("--num_test", type=int, default=None, help="held-out cases")
    parser.add_argument("--slices_per_case", type=int, default=8, help="2D: slices per case")
    parser.add_argument("--out", default="docs/results/shortcut_audit")
    parser.add_argument("--append", action="store_true", help="keep the runs already in <out>.json")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted last run of <out>.json (same settings): its rows are kept",
    )
    parser.add_argument(
        "--render_only", action="store_true", help="only rewrite <out>.md from <out>.json"
    )
    args = parser.parse_args(argv)
    if args.render_only:
        with open(args.out + ".json") as fh:
            report = json.load(fh)
        with open(args.out + ".md", "w") as fh:
            fh.write(render_markdown(report))
        print(f"wrote {args.out}.md")
        return report
    command = "python -m ssl3d_jax.audit " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    report = {"runs": []}
    if (args.append or args.resume) and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as fh:
            report = json.load(fh)
    done_rows = []
    if args.resume:
        runs = report["runs"]
        if not runs or runs[-1]["meta"].get("complete", True):
            raise SystemExit(f"--resume: {args.out}.json has no interrupted run to continue")
        last = runs[-1]["meta"]
        settings = dict(
            size=args.size,
            dims=args.dims,
            samples_per_volume=args.samples_per_volume,
            seed=args.seed,
            squares=args.squares,
            downsample=args.downsample,
        )
        differ = {k: (last.get(k), v) for k, v in settings.items() if last.get(k) != v}
        if differ:
            raise SystemExit(f"--resume: the interrupted run had other settings {differ}")
        done_rows = runs.pop()["rows"]
        command = last["command"]  # the run's own command, not the resuming one
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save(run: dict) -> None:
        whole = dict(report, runs=[*report["runs"], run])
        with open(args.out + ".json", "w") as fh:
            json.dump(whole, fh, indent=1)
        with open(args.out + ".md", "w") as fh:
            fh.write(render_markdown(whole))

    run = run_report(
        size=args.size,
        dims=args.dims,
        tasks=[t for t in args.tasks.split(",") if t],
        backgrounds=[b for b in args.backgrounds.split(",") if b],
        fractions=[float(f) for f in args.fractions.split(",") if f],
        samples_per_volume=args.samples_per_volume,
        seed=args.seed,
        squares=args.squares,
        downsample=args.downsample,
        num_cases=args.num_cases,
        num_test=args.num_test,
        slices_per_case=args.slices_per_case,
        command=command.strip(),
        log=lambda msg: print(msg, flush=True),
        done_rows=done_rows,
        save=save,
    )
    save(run)
    report["runs"].append(run)
    print(f"wrote {args.out}.md and {args.out}.json")
    return report


if __name__ == "__main__":
    main()
