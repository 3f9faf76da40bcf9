"""The experiment runner (config.mode='sweep') end to end at smoke size, as a user runs it."""

from __future__ import annotations

import csv
import json

import pytest
from launch_util import run_main as _run

TASKS = ("rpl", "rotation")
ARGS = [
    "--config=configs/sweep.py:smoke",
    f"--config.experiment.tasks=({TASKS[0]!r},{TASKS[1]!r})",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweep")
    workdir = base / "work"
    proc = _run([*ARGS, f"--workdir={workdir}"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, base


def _rows(workdir):
    with open(workdir / "results.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_writes_csv_md_and_plot_with_all_arms(sweep):
    workdir, _ = sweep
    rows = _rows(workdir)
    methods = {r["method"] for r in rows}
    assert methods == {"rpl", "rotation", "rpl probe", "rotation probe", "scratch"}
    fractions = sorted({float(r["fraction"]) for r in rows})
    assert fractions == [0.5, 1.0]
    for r in rows:
        for region in ("WT", "TC", "ET"):
            assert 0.0 <= float(r[region]) <= 1.0
    md = (workdir / "results.md").read_text()
    for m in methods:
        assert m in md
    assert "50%" in md and "100%" in md
    png = workdir / "results_WT.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each task's own report, and a prediction NIfTI per test case of every run.
    assert (workdir / "rpl" / "results.csv").exists()
    preds = list((workdir / "scratch").glob("runs/*/finetune/scratch/predictions/*.nii.gz"))
    assert len(preds) == 2 * 2  # 2 fractions × 2 test cases


def test_split_files_shared_by_all_methods(sweep):
    workdir, _ = sweep
    results = list(workdir.glob("*/runs/*/finetune/*/result.json"))
    assert len(results) == 2 * 5  # fractions × methods
    by_run = {}
    for p in results:
        r = json.loads(p.read_text())
        by_run.setdefault(p.parts[-4], set()).add((tuple(r["labeled"]), tuple(r["test"])))
    for run, used in by_run.items():
        assert len(used) == 1, f"{run}: methods finetuned on different cases: {used}"
    half = json.loads((workdir / "splits" / "split_50pct_rep0.json").read_text())
    full = json.loads((workdir / "splits" / "split_100pct_rep0.json").read_text())
    assert set(half["labeled"]) < set(full["labeled"]) == set(full["train"])
    assert not set(full["test"]) & set(full["train"])


def test_rerun_reuses_results_and_identical_split_files(sweep, tmp_path):
    workdir, base = sweep
    before = {p.name: p.read_bytes() for p in (workdir / "splits").iterdir()}
    # The same command again: nothing is recomputed, the split files are unchanged.
    proc = _run([*ARGS, f"--workdir={workdir}"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done before" in proc.stderr
    assert "finetune/scratch] step" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (workdir / "splits").iterdir()} == before
    # A fresh workdir draws byte-identical split files from the same config.
    other = tmp_path / "other"
    proc = _run(
        [*ARGS, f"--workdir={other}", "--config.experiment.arms=('scratch',)"],
        base / "cache",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p.name: p.read_bytes() for p in (other / "splits").iterdir()} == before
