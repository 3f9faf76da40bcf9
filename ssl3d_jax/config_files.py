"""Config files: `FILE[:ARG]` specs, where FILE is a Python file whose `get_config(ARG)` returns an
`ml_collections.ConfigDict` (the repository's `configs/<name>.py`, or a file of the user's).

Shared by the command line (`ssl3d_jax.cli`) and the library's per-task configs (the sweep and
visualize build each task's config from the config file its registration names,
`ssl3d_jax.tasks.task_config`). The library loads config files by path; it never imports the
repository's `configs` package by name.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re

PROG = "ssl3d"

# The ARG words of `--config=FILE:ARG` that `ssl3d --list` tries (documented in `ssl3d --help`).
SIZE_ARGS = ("smoke", "default", "paper")


def summary(doc: str | None) -> str:
    """One line from a module docstring (of a config file or a task, for `ssl3d --list`): its
    first sentence, without the paper reference."""
    para = " ".join((doc or "").split("\n\n", 1)[0].split())
    para = re.split(r"\s*\(Taleb", para, maxsplit=1)[0]
    return para.rstrip(" .,;:") + "." if para else ""


def configs_dir() -> pathlib.Path | None:
    """The folder of the importable `configs` package (the repository's configs/), or None."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def resolve_config_path(path: str) -> str:
    """`path` when it exists; else `configs/<name>.py` (given as `configs/<name>.py`,
    `<name>.py` or `<name>`) in `configs_dir()` when that exists; else `path` unchanged."""
    if os.path.exists(path):
        return path
    folder = configs_dir()
    parts = pathlib.PurePath(path).parts
    if folder is None or not (len(parts) == 1 or (len(parts) == 2 and parts[0] == "configs")):
        return path
    name = parts[-1] if parts[-1].endswith(".py") else parts[-1] + ".py"
    candidate = folder / name
    return str(candidate) if candidate.is_file() else path


def resolve_config_spec(spec: str) -> str:
    """`FILE[:ARG]` with FILE resolved by `resolve_config_path`."""
    path, colon, arg = spec.partition(":")
    return resolve_config_path(path) + colon + arg


def load_config(spec: str):
    """The locked config of `FILE[:ARG]`, as `--config=FILE[:ARG]` gives it (for notebooks).

    As ml_collections' config flag: `get_config(ARG)`, or `get_config()` without a colon.
    Locked: assigning a key that does not exist raises instead of adding it.
    """
    path, colon, arg = resolve_config_spec(spec).partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_config(spec))
    module = load_module(path)
    config = module.get_config(arg) if colon else module.get_config()
    config.lock()
    return config


def load_module(path: str):
    """The config file at `path`, executed as a module (its `get_config` not called yet)."""
    module_spec = importlib.util.spec_from_file_location("config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def missing_config(spec: str) -> str:
    """The message for a `--config` FILE that exists neither here nor in the configs folder."""
    return (
        f"--config={spec}: no file {spec.partition(':')[0]!r} in {os.getcwd()} nor in the "
        f"configs folder {configs_dir()}; `{PROG} --list` lists the config files"
    )
