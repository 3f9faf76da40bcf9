"""Pretext tasks. Each task is one module `ssl3d_jax/tasks/<name>.py` exposing
`make_task(config, *, in_channels) -> Task`; `config.task` names the module."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
from typing import Callable

import jax
from flax import nnx

from ssl3d_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Task:
    """What the generic pretraining loop needs from a pretext task.

    Attributes:
      name: the task's name (= its module and config file name).
      build_model: `rngs -> nnx.Module`; the module has an `.encoder` attribute (the part that is
        handed to finetuning) and takes whatever the task's loss feeds it.
      loss: `(model, volumes, key) -> (loss, metrics)`, pure and jit-able; `volumes` is a
        `[B, D, H, W, C]` float32 batch, and all of the task's sampling (patches, labels) happens
        inside, on device, from `key`.
      input_spec: JSON-able description of what the task consumed, stored in checkpoints.
      chance: `{metric: value}`, what each metric of `loss` takes for a model that has learned
        nothing (uniform predictions, or equal distances): e.g. `loss` ln(K) and `accuracy` 1 / K
        for a K-way classification. Logged beside the metrics (`chance_<metric>`), and the end of
        pretraining warns when the loss stays near `chance['loss']`. Metrics without a fixed
        chance value (e.g. Exemplar's distances) are absent; `{}` when unknown.
    """

    name: str
    build_model: Callable
    loss: Callable
    input_spec: dict
    chance: dict[str, float] = dataclasses.field(default_factory=dict)


def classification_chance(num_classes: int) -> dict[str, float]:
    """`Task.chance` of a `num_classes`-way softmax classification with `{'loss', 'accuracy'}`
    metrics: the cross-entropy ln(K) and the accuracy 1 / K of uniform predictions."""
    k = int(num_classes)
    return {"loss": math.log(k), "accuracy": 1.0 / k}


def encoder_config(config) -> dict:
    """Keyword arguments of `Encoder3D` from `config.model` (shared by every task's model).

    Besides the architecture (`filters`, `bottom_filters`, `num_groups`, `dropout_rate`, which
    fix the parameter tree), `dtype` (the compute dtype, from `config.model.compute_dtype`) and
    `remat` (`config.model.remat`): they change how the model computes, never its parameters
    (always float32), so a checkpoint restores whatever either setting was at save time. Every
    model reads its heads' compute dtype from `dtype` too.

    Raises:
      ConfigError: an unknown `config.model.compute_dtype`, a non-boolean `config.model.remat`,
        or `config.model.conv_impl='onednn'` where oneDNN convolutions cannot run.
    """
    from ssl3d_jax.models.layers import DOWNSAMPLES, check_conv_impl, compute_dtype

    m = config.model
    remat = m.get("remat", False)
    if not isinstance(remat, bool):
        raise ConfigError(f"config.model.remat={remat!r}: expected True or False.")
    conv_impl = check_conv_impl(m.get("conv_impl", "auto"))
    if conv_impl == "onednn":  # before any data is read: the extension is missing, or no CPU
        from ssl3d_jax.ops.conv import check_onednn

        check_onednn(compute_dtype(m.get("compute_dtype", "float32")))
    downsample = m.get("downsample", "max_pool")
    if downsample not in DOWNSAMPLES:
        raise ConfigError(f"config.model.downsample={downsample!r}: expected one of {DOWNSAMPLES}.")
    return dict(
        filters=tuple(int(f) for f in m.filters),
        bottom_filters=int(m.bottom_filters),
        num_groups=int(m.num_groups),
        dropout_rate=float(m.dropout_rate),
        dtype=compute_dtype(m.get("compute_dtype", "float32")),
        remat=remat,
        conv_impl=conv_impl,
        downsample=downsample,
    )


def check_batch_rank(volumes, spatial_dims: int, task: str) -> None:
    """Static check that a task's batch is `[B, *spatial, C]` with `spatial_dims` spatial axes."""
    if volumes.ndim != spatial_dims + 2:
        raise ConfigError(
            f"{task} with config.data.spatial_dims={spatial_dims} expects a batch "
            f"[B, {spatial_dims} spatial axes, C], got shape {tuple(volumes.shape)}"
        )


def pretext_loss(loss_fn: Callable, *, task: str, spatial_dims: int, uses_dropout: bool, **static):
    """`Task.loss` from a task's `loss_fn(model, volumes, key, *, training, dropout_key, **static)`.

    Checks the batch rank, splits the step key into the task's sampling key and a dropout key, and
    always trains (random jitter / augmentation, dropout when configured).
    """

    def loss(model, volumes, key):
        check_batch_rank(volumes, spatial_dims, task)
        key_batch, key_dropout = jax.random.split(key)
        return loss_fn(
            model,
            volumes,
            key_batch,
            training=True,
            dropout_key=key_dropout if uses_dropout else None,
            **static,
        )

    return loss


def get_task(config, *, in_channels: int) -> Task:
    """The `Task` of `config.task` for inputs of `in_channels` channels.

    Also checks, from shapes only (`jax.eval_shape`, nothing is compiled), that the task can
    train on the inputs that `config.data` gives it: `config.data.spatial_dims` axes of
    `config.data.size` voxels (every preprocessing mode and random crop yields that edge).

    Raises:
      ConfigError: an unknown `config.task`; a `config.data.size` too small for the task, naming
        the smallest size that works.
    """
    name = config.task
    try:
        module = importlib.import_module(f"ssl3d_jax.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"ssl3d_jax.tasks.{name}":
            raise  # a missing dependency of an existing task module, not a mistyped task
        raise ConfigError(f"config.task={name!r}: no module ssl3d_jax/tasks/{name}.py") from e
    task = module.make_task(config, in_channels=in_channels)
    _check_input_size(module, task, config, in_channels)
    return task


# Each input of the encoder (a patch; the whole input for rotation and exemplar) needs at least
# this many voxels per axis: with one there is no spatial structure left, flips and 90° turns are
# the identity (rotation's classes become indistinguishable), and the 3x3x3 convolutions see one
# voxel in zero padding. Smaller than the encoder's 2**len(filters) downsampling is fine: its
# pools round up, so every level keeps >= 1 voxel (the default 40³ RPL patches are 10³).
MIN_ENCODER_INPUT = 2
# Sizes tried when searching for the smallest working one; beyond it the failure is not a size.
_MAX_SIZE = 4096


def _input_problem(
    task: Task, config, size: int, in_channels: int
) -> tuple[str, Exception | None] | None:
    """Why `task` cannot train on `size`-edge inputs (and the exception raised, if any), or None
    when it can."""
    dims = int(config.data.spatial_dims)
    spec = task.input_spec
    if "patches_per_side" in spec:  # grid tasks: patches of size // P - J voxels per axis
        p, j = int(spec["patches_per_side"]), int(spec.get("jitter", 0))
        f = float(spec.get("grid_fraction", 1.0))
        if f == 1.0:
            edge = size // p - j
            formula = f"size // patches_per_side - jitter = {size} // {p} - {j}"
        else:  # the grid spans floor(f * size) voxels (ops/patches.py: grid_layout)
            edge = math.floor(size * f + 1e-9) // p - j
            formula = (
                f"floor(grid_fraction * size) // patches_per_side - jitter = "
                f"floor({f} * {size}) // {p} - {j}"
            )
        grid = "x".join([str(p)] * dims)
        what = f"its {grid} grid gives patches of {edge} voxel(s) per axis ({formula})"
    else:
        edge, what = size, f"its encoder input would be {size} voxel(s) per axis"
    if edge < MIN_ENCODER_INPUT:
        return f"{what}, fewer than {MIN_ENCODER_INPUT}", None

    graphdef, state = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
    # Two inputs: the fewest every task accepts (exemplar's negatives are other inputs).
    volumes = jax.ShapeDtypeStruct((2, *(size,) * dims, in_channels), jax.numpy.float32)
    try:
        jax.eval_shape(
            lambda s, v, k: task.loss(nnx.merge(graphdef, s), v, k),
            state,
            volumes,
            jax.random.key(0),
        )
    except Exception as e:  # noqa: BLE001 — any failure; the caller tells size ones apart
        return f"{what}, and its loss fails on them ({type(e).__name__}: {e})", e
    return None


def _check_input_size(module, task: Task, config, in_channels: int) -> None:
    size = int(config.data.size)
    found = _input_problem(task, config, size, in_channels)
    if found is None:
        return
    problem, error = found

    def works(s: int) -> bool:
        trial = copy.deepcopy(config)
        trial.data.size = s
        try:
            t = module.make_task(trial, in_channels=in_channels)
        except ConfigError:
            return False
        return _input_problem(t, trial, s, in_channels) is None

    # Doubling, then bisection: every task's constraints grow with the size (patch edges are
    # size // P - J), so the working sizes are all those from some minimum on.
    lo, hi = size, max(2 * size, MIN_ENCODER_INPUT)
    while not works(hi):
        lo, hi = hi, 2 * hi
        if hi > _MAX_SIZE:
            if error is not None:
                raise error  # no size helps: not a size problem; the task's own error says what
            raise ConfigError(
                f"config.data.size={size}: too small for the {config.task} task: {problem}; "
                f"and no size up to {_MAX_SIZE} works."
            )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    raise ConfigError(
        f"config.data.size={size}: too small for the {config.task} task: {problem}; expected "
        f"config.data.size >= {hi} (the edge of the {int(config.data.spatial_dims)}D inputs "
        "after preprocessing, in voxels)."
    )
