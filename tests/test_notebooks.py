"""The notebooks in notebooks/ run headless, top to bottom, at test size.

Each notebook is executed by nbclient in a fresh kernel of this Python (ipykernel), in a
temporary folder, with SSL3D_NOTEBOOK_TINY=1 (its parameter cell then cuts the steps) and the
tests' persistent compile cache ($SSL3D_JAX_CACHE, as set by conftest), and must finish without a
cell error, with a results.json of finite Dice and, for the quickstart, pictures in its outputs.
"""

from __future__ import annotations

import pytest

import json
import math
import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def _execute(name: str, cwd: pathlib.Path, devices: int) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = dict(os.environ, SSL3D_NOTEBOOK_TINY="1")
    # This checkout's code, installed (`pip install -e .`) or not: tests/test_packaging.py covers
    # the installation.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("XLA_FLAGS", None)  # conftest's 8 simulated devices: too slow to compile for
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    client = NotebookClient(
        nb,
        kernel_name="python3",  # ipykernel's own spec: runs this interpreter (sys.executable)
        timeout=300,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, on errors
    return nb


def _outputs(nb, kind: str) -> list:
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if kind in o.get("data", {}) or (kind == "stream" and o.output_type == "stream")
    ]


def _check_results(path: pathlib.Path, arms: set[str]) -> dict:
    results = json.loads(path.read_text())
    assert set(results["arms"]) == arms
    for arm in results["arms"].values():
        assert set(arm["dice_mean"]) == {"WT", "TC", "ET"}
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in arm["dice_mean"].values())
    return results


def test_committed_notebooks_have_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name


@pytest.mark.slow
def test_quickstart_runs_and_shows_dice_and_pictures(tmp_path):
    nb = _execute("quickstart.ipynb", tmp_path, devices=1)
    workdir = tmp_path / "quickstart_workdir"
    _check_results(workdir / "results.json", {"pretrained", "scratch"})
    # The Dice table is rendered from results.json, one row per arm.
    (table,) = [o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown")]
    assert "| pretrained |" in table and "| scratch |" in table and "Dice WT" in table
    # The visualize mode's PNGs are displayed inline: the task's inputs, a segmentation, curves.
    pngs = _outputs(nb, "image/png")
    figures = sorted(p.name for p in (workdir / "figures").glob("*.png"))
    assert {"rpl.png", "curves.png"} <= set(figures)
    assert any(f.startswith("segmentation_") for f in figures)
    assert len(pngs) == len(figures)


@pytest.mark.slow
def test_colab_notebook_shards_over_devices_and_finetunes(tmp_path):
    nb = _execute("colab_tpu.ipynb", tmp_path, devices=2)
    text = "".join(o.get("text", "") for o in _outputs(nb, "stream"))
    # Install cell skipped (the package imports), CPU fallback reported, the mesh spans both
    # devices and the batches were rounded to multiples of the device count.
    assert "ssl3d_jax is installed: nothing to do." in text
    assert "2 cpu device(s)" in text and "No TPU/GPU found" in text
    assert "mesh: {'data': 2}" in text
    assert "finetune batch 2, 2 device(s)" in text
    workdir = tmp_path / "colab_workdir"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    _check_results(workdir / "results.json", {"pretrained"})  # one arm at test size
