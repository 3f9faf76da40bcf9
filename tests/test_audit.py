"""Tests of the single-patch shortcut audit (`ssl3d_jax.audit`): the classifier, the position
labels, and on the smoke phantom: the configs' random grid stays near chance while the original's
fixed grid is flagged (docs/results/shortcut_audit.md has the default-size numbers)."""

from __future__ import annotations

import copy
import json
import itertools

import jax
import numpy as np
import pytest

from ssl3d_jax import audit
from ssl3d_jax.errors import ConfigError


def test_softmax_regression_separates_blobs_and_not_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 20)) * 3
    y = rng.integers(0, 5, 600)
    x = centres[y] + rng.normal(size=(600, 20))
    w, b = audit.fit_softmax_regression(x[:400], y[:400], 5, l2=1e-2)
    assert w.shape == (20, 5) and b.shape == (5,)
    assert np.mean(np.argmax(x[400:] @ w + b, axis=1) == y[400:]) > 0.95
    # Labels unrelated to the features: held-out accuracy near chance (1/5).
    noise = rng.normal(size=(600, 20))
    w, b = audit.fit_softmax_regression(noise[:400], y[:400], 5, l2=1e-2)
    assert np.mean(np.argmax(noise[400:] @ w + b, axis=1) == y[400:]) < 0.35


def _cell_constant_volumes(side: int, p: int, count: int = 2) -> np.ndarray:
    """`[count, side, side, side, 1]` volumes whose every grid cell holds its row-major index."""
    vol = np.zeros((side,) * 3, np.float32)
    g = side // p
    for i, cell in enumerate(itertools.product(range(p), repeat=3)):
        vol[tuple(slice(c * g, (c + 1) * g) for c in cell)] = i
    return np.broadcast_to(vol[None, ..., None], (count, *vol.shape, 1)).copy()


@pytest.mark.slow
@pytest.mark.parametrize("task", audit.TASKS)
def test_position_labels_are_the_cells_the_patches_came_from(task):
    config = audit.task_config(task, "smoke")
    section = config[task]
    section.grid_fraction, section.jitter = 1.0, 1  # fixed grid: each cell is constant
    if task == "cpc":  # no whole-volume shift / zero padding, which would mix cells
        section.volume_crop = section.patch_crop = 1.0
    p = int(section.patches_per_side)
    x, y, k = audit.position_samples(
        config, _cell_constant_volumes(6 * p, p), samples_per_volume=40, key=jax.random.key(0)
    )
    assert x.shape[0] == y.shape[0] == 80 and k == (p**3 - 1 if task == "rpl" else p**3)
    cell = y + (y >= p**3 // 2) if task == "rpl" else y  # RPL classes skip the centre cell
    np.testing.assert_array_equal(x.min(axis=1), cell)
    np.testing.assert_array_equal(x.max(axis=1), cell)
    assert len(set(y.tolist())) > k // 2  # many positions drawn


def test_audit_errors():
    config = audit.task_config("rpl", "smoke")
    config.task = "rotation"
    v = np.zeros((2, 24, 24, 24, 1), np.float32)
    with pytest.raises(ConfigError, match="rotation"):
        audit.audit(config, v, v, samples_per_volume=2, key=jax.random.key(0))


@pytest.fixture(scope="module")
def smoke_inputs():
    """The smoke phantom preprocessed as `configs/rpl.py:smoke` (24³, the 4 non-test cases for
    the classifier, the 2 held-out test cases to score it)."""
    train, test, _ = audit.load_inputs(audit.task_config("rpl", "smoke"))
    return train, test


@pytest.mark.slow
@pytest.mark.parametrize("task", ["rpl", "jigsaw"])
def test_random_grid_near_chance_and_fixed_grid_flagged(smoke_inputs, task):
    """The smoke config's random grid: held-out single-patch accuracy <= 2.5x chance; the
    original's fixed grid at the origin (jitter 3), on the same cases and draws: >= 5x.

    Measured (phantom v2, 400 test patches of the 2 held-out cases): random grid 1.56x (RPL) and
    1.42x (Jigsaw), fixed grid 11.1x and 12.6x. With 400 test patches the ratio's standard error
    near chance is about 0.3, so 2.5 is 3 of them above the measurement (the default size's
    1.2-1.4x, docs/results/shortcut_audit.md, has 600 test patches of 6 cases).
    """
    train, test = smoke_inputs
    config = audit.task_config(task, "smoke")
    assert config[task].grid_fraction < 1.0
    kw = dict(samples_per_volume=200, key=jax.random.key(0), l2=0.1)
    now = audit.audit(config, train, test, **kw)
    fixed = copy.deepcopy(config)
    fixed[task].grid_fraction, fixed[task].jitter = 1.0, 3
    before = audit.audit(fixed, train, test, **kw)
    assert now["n_train"] == 200 * len(train) and now["n_test"] == 200 * len(test)
    assert now["chance"] == pytest.approx(1 / (26 if task == "rpl" else 27))
    assert now["ratio_to_chance"] <= 2.5, now
    assert before["ratio_to_chance"] >= 5.0, before


def test_resume_continues_the_interrupted_run_only(tmp_path, monkeypatch):
    """`--resume` hands the interrupted last run's rows to `run_report`, keeps that run's own
    command and replaces it (not appends); it refuses a complete run or other settings. Every
    partial save leaves a readable report."""
    out = str(tmp_path / "audit")
    row = dict(task="rpl", background="zero", grid_fraction=0.5, jitter=1, seconds=3)
    settings = dict(
        size="smoke", dims=3, samples_per_volume=100, seed=0, squares=False, downsample=1
    )
    calls = []

    def fake_run_report(*, done_rows, save, command, **kw):
        calls.append(list(done_rows))
        partial = {"meta": dict(settings, command=command, complete=False), "rows": [row]}
        save(partial)  # a save mid-run rewrites the same (last) run, still interrupted
        with open(out + ".json") as fh:
            assert json.load(fh)["runs"][-1]["meta"]["complete"] is False
        rows = [*done_rows, dict(row, grid_fraction=0.4)]
        return {"meta": dict(settings, command=command, complete=True), "rows": rows}

    monkeypatch.setattr(audit, "run_report", fake_run_report)
    monkeypatch.setattr(audit, "render_markdown", lambda report: "md\n")
    first = {"meta": dict(settings, command="python -m ssl3d_jax.audit --first"), "rows": []}
    interrupted = {
        "meta": dict(settings, command="python -m ssl3d_jax.audit --size smoke", complete=False),
        "rows": [row],
    }
    with open(out + ".json", "w") as fh:
        json.dump({"runs": [first, interrupted]}, fh)

    with pytest.raises(SystemExit, match="other settings"):
        audit.main(["--size", "default", "--resume", "--out", out])
    report = audit.main(["--size", "smoke", "--resume", "--out", out])
    assert calls == [[row]]
    with open(out + ".json") as fh:
        saved = json.load(fh)
    assert saved == report and len(saved["runs"]) == 2  # replaced, not appended
    last = saved["runs"][-1]
    assert last["meta"]["complete"] is True and len(last["rows"]) == 2
    assert last["meta"]["command"] == "python -m ssl3d_jax.audit --size smoke"
    with pytest.raises(SystemExit, match="no interrupted run"):
        audit.main(["--size", "smoke", "--resume", "--out", out])
