"""Pretext tasks and their registry.

A pretext task is one module that defines `TASK = TaskDef(name, make, ...)`, where
`make(config, *, in_channels) -> Task` builds the configured task (model, loss, sampling, plot),
plus one config file whose `get_config(arg)` sets `config.task = name` and the task's section.
The registry (`registry()`, `names()`) holds:

- the built-in tasks: every module of this package that defines `TASK` (config files in the
  repository's `configs/<name>.py`);
- tasks of the user's: the Python files (or importable module names) listed in the environment
  variable `SSL3D_JAX_TASKS` (separated by `os.pathsep`, `:` on Linux), each defining `TASK`; a
  `TaskDef.config_file` relative path is relative to the task's file. Notebooks can also call
  `register(TASK)`.

Everything else takes its task list from here: `config.task`, the sweep's
`config.experiment.tasks=('all',)`, visualize, `ssl3d --list`, the benchmarks and the tests.
README "Adding a task" walks through an example.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.util
import logging
import math
import os
import pkgutil
import sys
from typing import Callable

import jax
from flax import nnx

from ssl3d_jax import config_files
from ssl3d_jax.errors import ConfigError

log = logging.getLogger(__name__)

ENV_VAR = "SSL3D_JAX_TASKS"


@dataclasses.dataclass(frozen=True)
class Task:
    """A pretext task as configured: what pretraining, visualize and the benchmarks need.

    Attributes:
      name: the task's name (= its `TaskDef.name` and `config.task`).
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
      sample: `(volumes, key) -> {name: array [B, ...]}`, pure and jit-able: one draw of what
        the loss feeds the network (patches, labels, views) from `volumes [B, *spatial, C]`
        (B >= 2), as the loss draws it, the batch axis first; for figures
        (`ssl3d_jax.visualize`).
      plot: `(sample, volumes, *, names, channel) -> (Figure, panels)` drawing volume 0 of a
        `sample` (numpy arrays) with `ssl3d_jax.figures`; `names` are the case names of
        `volumes`. None: `figures.plot_sample`, a generic picture of every sampled array.
      couples_batch: the loss takes its negatives from the other samples of the batch (CPC,
        Exemplar): gradient accumulation then changes the task, and `get_task` warns.
      min_batch: the fewest volumes per (micro-)batch the loss accepts (Exemplar: 2, a volume's
        negative is another volume).
    """

    name: str
    build_model: Callable
    loss: Callable
    input_spec: dict
    chance: dict[str, float] = dataclasses.field(default_factory=dict)
    sample: Callable | None = None
    plot: Callable | None = None
    couples_batch: bool = False
    min_batch: int = 1


@dataclasses.dataclass(frozen=True)
class TaskDef:
    """What a task module registers: its module-level `TASK`.

    Attributes:
      name: `config.task`; unique in the registry.
      make: `(config, *, in_channels) -> Task`; raises `ConfigError` naming the config key for a
        bad setting.
      summary: one line for `ssl3d --list` (default: the first sentence of the module docstring).
      config_file: the task's config file (`get_config(arg)`, arg e.g. `smoke,2d`): absolute, or
        relative to the task module's folder. None: `configs/<name>.py` of the repository.
      order: position in listings and in the sweep (the built-in tasks: the paper's order).
    """

    name: str
    make: Callable
    summary: str = ""
    config_file: str | None = None
    order: int = 100


_REGISTRY: dict[str, TaskDef] = {}
_LOADED: set[str] = set()  # registry sources already imported: builtins and SSL3D_JAX_TASKS entries


def register(definition: TaskDef, *, origin: str | None = None) -> TaskDef:
    """Adds `definition` to the registry (again: a no-op for the same task) and returns it.

    Args:
      origin: the file of the module that defines it; a relative `config_file` is resolved
        against its folder.

    Raises:
      ConfigError: another task of the same name is registered.
    """
    if not isinstance(definition, TaskDef):
        raise ConfigError(f"register: expected a ssl3d_jax.tasks.TaskDef, got {definition!r}")
    config_file = definition.config_file
    if config_file and origin and not os.path.isabs(config_file):
        config_file = os.path.join(os.path.dirname(os.path.abspath(origin)), config_file)
        definition = dataclasses.replace(definition, config_file=config_file)
    known = _REGISTRY.get(definition.name)
    if known is not None and known.make is not definition.make:
        raise ConfigError(
            f"task {definition.name!r} is registered twice (by {known.make.__module__} and "
            f"{definition.make.__module__}); task names must be unique"
        )
    _REGISTRY[definition.name] = definition
    return definition


def _register_module(module, source: str) -> None:
    definition = getattr(module, "TASK", None)
    if definition is None:
        raise ConfigError(f"{ENV_VAR}: {source} defines no TASK = ssl3d_jax.tasks.TaskDef(...)")
    if not definition.summary:
        definition = dataclasses.replace(definition, summary=config_files.summary(module.__doc__))
    register(definition, origin=getattr(module, "__file__", None))


def _import_entry(entry: str):
    """A `SSL3D_JAX_TASKS` entry: a `.py` file (imported under its own module name) or a module."""
    if not entry.endswith(".py"):
        return importlib.import_module(entry)
    path = os.path.abspath(entry)
    if not os.path.isfile(path):
        raise ConfigError(f"{ENV_VAR}: no file {path}")
    name = "ssl3d_jax_user_task_" + os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def registry() -> dict[str, TaskDef]:
    """Every registered task by name, in `order` then name: the built-in ones, those of
    `$SSL3D_JAX_TASKS` (read at each call, so a later setting is picked up) and `register`'s."""
    if "builtin" not in _LOADED:
        for info in pkgutil.iter_modules(__path__):
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "TASK"):
                _register_module(module, module.__name__)
        _LOADED.add("builtin")
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        entry = entry.strip()
        if entry and entry not in _LOADED:
            _register_module(_import_entry(entry), entry)
            _LOADED.add(entry)
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def names() -> tuple[str, ...]:
    """The registered task names, in registry order."""
    return tuple(registry())


def lookup(name: str, *, key: str = "config.task") -> TaskDef:
    """The registered task `name`; a `ConfigError` naming `key` and the known tasks otherwise."""
    found = registry().get(name)
    if found is None:
        raise ConfigError(
            f"{key}={name!r}: no such pretext task; registered: {', '.join(names())} (a task of "
            f"your own: list its file in ${ENV_VAR}, README 'Adding a task')"
        )
    return found


def expand(chosen, *, key: str) -> tuple[str, ...]:
    """A task list from a config: `('all',)` → every registered task; otherwise each name
    checked (`ConfigError` naming `key` for an unknown one)."""
    chosen = tuple(chosen or ())
    if "all" in chosen:
        return names()
    for name in chosen:
        lookup(name, key=key)
    return chosen


def config_file(name: str) -> str:
    """The config file of registered task `name` (its `config_file`, else `configs/<name>.py`)."""
    definition = lookup(name)
    if definition.config_file:
        return definition.config_file
    folder = config_files.configs_dir()
    path = str(folder / f"{name}.py") if folder is not None else f"configs/{name}.py"
    return path


def task_config(name: str, arg: str | None):
    """The (unlocked) config of task `name` from its config file, `get_config(arg)`."""
    path = config_file(name)
    if not os.path.isfile(path):
        raise ConfigError(f"task {name!r}: its config file {path} does not exist")
    config = config_files.load_config(path + (f":{arg}" if arg is not None else ""))
    config.unlock()
    return config


def classification_chance(num_classes: int) -> dict[str, float]:
    """`Task.chance` of a `num_classes`-way softmax classification with `{'loss', 'accuracy'}`
    metrics: the cross-entropy ln(K) and the accuracy 1 / K of uniform predictions."""
    k = int(num_classes)
    return {"loss": math.log(k), "accuracy": 1.0 / k}


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
    """The `Task` of registered task `config.task` for inputs of `in_channels` channels.

    Also checks, from shapes only (`jax.eval_shape`, nothing is compiled), that the task can
    train on the inputs that `config.data` gives it: `config.data.spatial_dims` axes of
    `config.data.size` voxels (every preprocessing mode and random crop yields that edge); and
    its (micro-)batch against `config.pretrain.grad_accum_steps` (`Task.min_batch`; a warning
    for a `Task.couples_batch` loss).

    Raises:
      ConfigError: an unknown `config.task`; a `config.data.size` too small for the task, naming
        the smallest size that works; micro-batches smaller than the task accepts.
    """
    definition = lookup(config.task)
    task = definition.make(config, in_channels=in_channels)
    _check_input_size(definition, task, config, in_channels)
    _check_micro_batch(task, int(config.pretrain.batch_size), int(config.pretrain.grad_accum_steps))
    return task


def _check_micro_batch(task: Task, batch_size: int, accum: int) -> None:
    micro = batch_size // max(accum, 1)
    if accum > 1 and micro < task.min_batch:
        raise ConfigError(
            f"config.pretrain.grad_accum_steps={accum}: {task.name} needs micro-batches of at "
            f"least {task.min_batch} volumes, got {batch_size} / {accum} = {micro}"
        )
    if accum > 1 and task.couples_batch:
        _warn_coupled(task.name, accum, batch_size)


@functools.cache  # once per setting: a run builds its task more than once
def _warn_coupled(name: str, accum: int, batch_size: int) -> None:
    # Not just a memory saving (ssl3d_jax.train.step): the loss's negatives are the batch it sees.
    log.warning(
        "%s with config.pretrain.grad_accum_steps=%d: the loss takes its negatives from the "
        "batch, and each micro-batch of %d volumes sees only its own, so accumulation changes the "
        "task (fewer, easier negatives), it does not reproduce the batch of %d",
        name,
        accum,
        batch_size // accum,
        batch_size,
    )


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


def _check_input_size(definition: TaskDef, task: Task, config, in_channels: int) -> None:
    size = int(config.data.size)
    found = _input_problem(task, config, size, in_channels)
    if found is None:
        return
    problem, error = found

    def works(s: int) -> bool:
        trial = copy.deepcopy(config)
        trial.data.size = s
        try:
            t = definition.make(trial, in_channels=in_channels)
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
