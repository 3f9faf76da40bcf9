"""benchmarks/input_pipeline.py at a tiny size: main() writes JSON and markdown that agree.

The train-step timing is replaced by fixed rates (compiling two steps would take most of the
time budget; `step_rates` is the same jitted code that tests/test_train.py exercises), so that
the "× step" ratio columns are checked against known numbers; likewise the pretraining runs of
`data_wait` (the real loop's measure is tested in tests/test_prefetch.py), so that the rows per
prefetch depth are checked against known figures. Everything else runs for real:
phantom NIfTI, decode + preprocess, the disk cache, grain, and the memory child processes.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import input_pipeline  # noqa: E402

FAKE_RATES = {
    "pretrain_rpl": {
        "batch": 8,
        "input": [8, 24, 24, 24, 4, "float32"],
        "first_step_s": 1.0,
        "median_ms": 400.0,
        "mean_ms": 400.0,
        "min_ms": 400.0,
        "max_ms": 400.0,
        "n": 1,
        "volumes_per_s": 20.0,
    },
    "finetune_segmentation": {
        "batch": 2,
        "input": [2, 24, 24, 24, 4, "float32"],
        "first_step_s": 1.0,
        "median_ms": 500.0,
        "mean_ms": 500.0,
        "min_ms": 500.0,
        "max_ms": 500.0,
        "n": 1,
        "volumes_per_s": 4.0,
    },
}


def fake_data_wait(size, root, cache_dir, workdir, *, steps, prefetch):
    fraction = 0.01 if prefetch else 0.2
    return {
        "prefetch": prefetch,
        "steps": steps,
        "log_every": 1,
        "checkpoint_every": 250,
        "load_average_before": [1.0, 1.0, 1.0],
        "load_average_after": [1.5, 1.0, 1.0],
        "num_workers": 0,
        "num_threads": 2,
        "batch": 8,
        "wall_s": 1.0,
        "windows": [{"step": 1, "data_wait_fraction": fraction, "steps_per_sec": 10.0}],
        "steady_data_wait_fraction": fraction,
        "steady_steps_per_sec": 10.0,
    }


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ip")
    mp = pytest.MonkeyPatch()
    mp.setattr(input_pipeline, "step_rates", lambda *a, **k: FAKE_RATES)
    mp.setattr(input_pipeline, "data_wait", fake_data_wait)
    try:
        res = input_pipeline.main(
            [
                "--size=smoke",
                "--cases=4",
                "--shape=28,30,26",
                "--workers=0",
                "--batches=2",
                "--steps=5",
                "--prefetch=2,0",
                "--step-repeats=1",
                "--brats-cases=0",
                "--memory-factor=2",
                f"--out={out}",
            ]
        )
    finally:
        mp.undo()
    return res, out


@pytest.mark.slow
def test_json_matches_returned_result(result):
    res, out = result
    with open(out / "input_pipeline.json") as f:
        assert json.load(f) == json.loads(json.dumps(res))
    assert res["command"].startswith("python benchmarks/input_pipeline.py --size=smoke")
    assert res["machine"]["cores"] >= 1 and res["date"]


def test_per_case_costs(result):
    res, _ = result
    pc = res["per_case"]
    assert pc["cases"] == 4
    assert pc["raw_image"] == [28, 30, 26, 4, "float32"]
    assert pc["preprocessed_image"] == [24, 24, 24, 4, "float32"]  # smoke size, 4 channels
    # Reading the memory-mapped cache skips gzip decoding and resampling.
    assert pc["cache_cases_per_s"] > pc["nifti_cases_per_s"] > 0


def test_grain_rows_and_markdown(result):
    res, out = result
    rows = res["grain"]
    assert [(r["source"], r["workers"]) for r in rows] == [("nifti", 0), ("cache", 0)]
    assert all(r["cases_per_s"] > 0 and r["batch"] == 8 for r in rows)
    md = (out / "input_pipeline.md").read_text()
    assert res["command"] in md
    for r in rows:
        ratios = (r["cases_per_s"] / 20.0, r["cases_per_s"] / 4.0)
        line = f"| {r['source']} | 0 | {r['first_batch_s']} | {r['cases_per_s']} | "
        line += f"{ratios[0]:.1f} | {ratios[1]:.1f} |"
        assert line in md
    assert "pretrain_rpl step (20.0 vol/s)" in md


def test_memory_rows(result):
    res, out = result
    mem = res["memory"]
    small, big = mem["rows"]
    assert (small["cases"], big["cases"]) == (4, 8)
    # The same number of batches from both: one epoch of 8 cases, two of 4 (batch 8).
    assert small["batches"] == big["batches"] == 1
    assert 0 < small["maxrss_before_mb"] <= small["maxrss_mb"]
    assert mem["growth_mb"] == pytest.approx(big["maxrss_mb"] - small["maxrss_mb"], abs=0.11)
    assert f"{big['cases']} cases {big['maxrss_mb']} MB" in (out / "input_pipeline.md").read_text()


def test_data_wait_row_per_prefetch_depth(result):
    res, out = result
    rows = res["data_wait"]
    assert [(r["prefetch"], r["default"], r["steps"]) for r in rows] == [
        (2, True, 5),
        (0, False, 5),
    ]
    md = (out / "input_pipeline.md").read_text()
    assert "`config.data.prefetch=2` (the config's default)" in md
    assert "logged `data_wait_fraction` **1.00%**" in md
    assert "`config.data.prefetch=0` (`run" in md and "**20.00%**" in md
