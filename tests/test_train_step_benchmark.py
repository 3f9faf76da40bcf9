"""benchmarks/train_step.py: the script runs at smoke size and its JSON and markdown agree; the
PyTorch twins (benchmarks/torch_models.py) have exactly our parameter counts.

Why: the benchmark's numbers are only worth publishing if each row is the step it names (a
finite loss from the library's own step), its GFLOP/s is the XLA FLOP count over the measured
median, the markdown shows the same rows as the JSON, and the PyTorch model it compares against
is the same network (same layers and widths, hence the same parameter count). One smoke RPL step
(batch 8: a multiple of the 8 simulated test devices), one timed step, no fresh processes.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import step_flops
from benchmarks import train_step as ts


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train_step") / "ts")
    report = ts.main(["--sizes=smoke", "--tasks=rpl", "--steps=1", "--phases=", f"--out={out}"])
    return report, out


def test_json_rows_are_consistent(smoke_run):
    report, out = smoke_run
    with open(out + ".json") as f:
        written = json.load(f)
    assert written["steps"] == json.loads(json.dumps(report["steps"]))
    (row,) = written["steps"]
    assert (row["kind"], row["size"]) == ("pretext/rpl", "smoke")
    assert row["finite"]
    assert len(row["step_s"]) == 1 and row["median_s"] == row["step_s"][0] > 0
    assert row["flops"] > 0 and row["compile_s"] > 0
    assert row["gflops_per_s"] == pytest.approx(row["flops"] / row["median_s"] / 1e9)
    # The same parameter count as benchmarks/step_flops.py's abstract build of the step.
    spec = ts.step_spec("pretext/rpl", "smoke")
    _, abstract = step_flops.abstract_state(spec["build"], spec["tx"])
    assert row["params"] == step_flops.param_count(abstract)
    if "torch_median_s" in row:
        assert row["ratio"] == pytest.approx(row["median_s"] / row["torch_median_s"])
        assert row["torch_params"] == row["params"]
    m = written["machine"]
    assert m["cores"] >= 1 and m["versions"]["jax"]
    assert "--sizes=smoke" in written["command"] and written["date"]
    assert written["phases"] == []


def test_markdown_shows_the_json_rows(smoke_run):
    report, out = smoke_run
    with open(out + ".md") as f:
        md = f.read()
    assert report["command"] in md and report["machine"]["cpu"] in md
    table = [line for line in md.splitlines() if line.startswith("| pretext/")]
    assert len(table) == len(report["steps"]) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    row = report["steps"][0]
    assert cells[:2] == ["pretext/rpl", "smoke"]
    assert float(cells[5]) == pytest.approx(row["median_s"], rel=1e-2)
    assert float(cells[7]) == pytest.approx(row["gflops_per_s"], rel=1e-2)


@pytest.mark.parametrize("kind", ["pretext/rpl", "finetune/full"])
@pytest.mark.parametrize("size", ["default", "paper"])
def test_torch_twin_has_our_parameter_count(kind, size):
    pytest.importorskip("torch")
    twin = ts.torch_twin(kind, size)
    assert twin is not None
    spec = ts.step_spec(kind, size)
    _, abstract = step_flops.abstract_state(spec["build"], spec["tx"])
    import torch_models  # importable once benchmarks/train_step.py is

    assert torch_models.param_count(twin[0]) == step_flops.param_count(abstract)
