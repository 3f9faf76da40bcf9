"""Packaging and the command line: `pip install -e .` gives a working `ssl3d` command.

`--help` explains the config syntax and every mode of `run.MODES`; `--list` names every config
file and pretext task without a `--config`; a config path is resolved against the installed
configs folder from any directory; and the installed `ssl3d` executable (next to
`sys.executable`, as `pip install -e .` puts it) runs `configs/rpl.py:smoke` end to end from a
directory other than the repository root.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from launch_util import ROOT

from ssl3d_jax import cli, run

# The built-in tasks: the modules that register one (README "Adding a task").
TASKS = sorted(
    p.stem
    for p in (ROOT / "ssl3d_jax" / "tasks").glob("*.py")
    if "\nTASK = TaskDef(" in p.read_text()
)
# Cuts configs/rpl.py:smoke to seconds: two pretraining steps, one finetuning step, one arm.
FAST = [
    "--config.pretrain.num_steps=2",
    "--config.pretrain.knn_every=0",
    "--config.finetune.num_steps=1",
    "--config.finetune.arms=('pretrained',)",
]


def _command(args, cwd, timeout=120, exe=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
    # SSL3D_JAX_CACHE stays conftest's persistent test cache (compiles, phantom data).
    cmd = [str(exe)] if exe else [sys.executable, str(ROOT / "launch" / "main.py")]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _installed_ssl3d() -> pathlib.Path:
    exe = pathlib.Path(sys.executable).parent / ("ssl3d.exe" if os.name == "nt" else "ssl3d")
    if not exe.exists():
        pytest.fail(
            f"the `ssl3d` command is not installed next to {sys.executable}: run "
            "`pip install -e .` in the repository root (README, Install)",
            pytrace=False,
        )
    return exe


def test_pyproject_installs_the_packages_the_command_and_the_pinned_requirements():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"] == {"ssl3d": "ssl3d_jax.cli:main"}
    assert meta["project"]["dynamic"] == ["dependencies"]
    assert meta["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"ssl3d_jax", "ssl3d_jax.*", "configs"} <= set(include)
    # The test and lint sections survive.
    assert meta["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert meta["tool"]["ruff"]["line-length"] == 100


@pytest.mark.slow
def test_help_explains_config_syntax_modes_and_outputs(tmp_path):
    proc = _command(["--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    for needle in (
        "--config=FILE[:ARG]",
        "smoke",
        "default",
        "paper",
        ":smoke,2d",
        "--config.KEY=VALUE",
        "--workdir",
        "results.json",
        "--list",
        str(ROOT / "configs"),
    ):
        assert needle in text, needle
    for mode in run.MODES:
        assert f"\n  {mode} " in text, mode  # one line per mode
    assert "see ssl3d_jax/run.py" not in text  # every mode has its own description


@pytest.mark.slow
def test_list_names_every_config_and_task_without_a_config(tmp_path):
    proc = _command(["--list"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    configs_part, tasks_part = proc.stdout.split("Pretext tasks")
    config_files = sorted(
        p.stem for p in (ROOT / "configs").glob("*.py") if "def get_config" in p.read_text()
    )
    assert "sweep" in config_files and "common" not in config_files
    for name in config_files:
        assert f"\n  {name} " in configs_part, name
    assert "\n  common " not in configs_part
    assert configs_part.count("ARG: smoke | default | paper; append ,2d for 2D") == len(
        config_files
    )
    listed = [line.split()[0] for line in tasks_part.splitlines()[1:] if line.strip()]
    assert len(TASKS) == 5 and sorted(listed) == TASKS
    assert listed == cli.task_names()


def test_config_path_resolves_against_the_configs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rpl = str(ROOT / "configs" / "rpl.py")
    for given in ("configs/rpl.py", "rpl.py", "rpl"):
        assert cli.resolve_config_path(given) == rpl
    assert cli.resolve_config_spec("configs/rpl.py:smoke,2d") == rpl + ":smoke,2d"
    assert cli.resolve_config_path("configs/nope.py") == "configs/nope.py"
    assert cli.resolve_config_path("other/rpl.py") == "other/rpl.py"  # only configs/ is searched
    # A file in the current directory wins over the installed one.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rpl.py").write_text("")
    assert cli.resolve_config_path("configs/rpl.py") == "configs/rpl.py"

    config = cli.load_config("rpl:smoke")
    assert (config.task, config.size, config.data.spatial_dims) == ("rpl", "smoke", 3)
    with pytest.raises(AttributeError):
        config.pretrain.num_stepz = 3  # locked, as on the command line
    with pytest.raises(FileNotFoundError, match="ssl3d --list"):
        cli.load_config("configs/nope.py")


def test_missing_config_file_or_flag_is_one_line(tmp_path):
    proc = _command(["--config=configs/nope.py:smoke"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --config=configs/nope.py:smoke: no file")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _command([], cwd=tmp_path)
    assert proc.returncode == 2 and "--config is required" in proc.stderr


@pytest.mark.slow
def test_installed_ssl3d_command_runs_smoke_from_another_directory(tmp_path):
    exe = _installed_ssl3d()
    listing = _command(["--list"], cwd=tmp_path, exe=exe)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert f"in {ROOT / 'configs'})" in listing.stdout, (
        f"{exe} runs another checkout's code: run `pip install -e .` in {ROOT}"
    )
    proc = _command(
        ["--config=configs/rpl.py:smoke", "--workdir=out", *FAST],
        cwd=tmp_path,
        timeout=600,
        exe=exe,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())  # relative to the cwd
    assert results["task"] == "rpl" and set(results["arms"]) == {"pretrained"}
    dice = results["arms"]["pretrained"]["dice_mean"]
    assert set(dice) == {"WT", "TC", "ET"}
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in dice.values())
