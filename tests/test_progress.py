"""Progress bars: the training loop's (ETA, steps/s, loss on a terminal; plain log lines and no
carriage returns otherwise), resumed positions, and evaluation bars."""

from __future__ import annotations

import io
import logging
import types

import numpy as np

from ssl3d_jax import inference, progress
from ssl3d_jax.train import loop


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _train(tmp_path, num_steps=6, start=0, chance=None):
    """train_loop on a fake state (only `.step`) with loss = 1 / step."""

    def step_fn(step):
        def step_(state, batch):
            return types.SimpleNamespace(step=state.step + 1), {"loss": np.float32(1 / (step + 1))}

        return step_

    return loop.train_loop(
        phase="pretrain",
        state=types.SimpleNamespace(step=start),
        step_fn=step_fn,
        batches=iter([{"image": np.zeros((1, 2))}] * num_steps),
        put_batch=lambda b: b,
        num_steps=num_steps,
        writer=loop.MetricWriter(tmp_path / "metrics.jsonl", tensorboard=False),
        log_every=2,
        chance=chance,
    )


def test_training_bar_on_a_terminal_shows_eta_rate_and_loss(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress, "_REDRAW_S", 0.0)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with caplog.at_level(logging.INFO, logger="ssl3d_jax.train.loop"):
        _train(tmp_path, chance={"loss": 2.0})
    text = terminal.getvalue()
    lines = [x for x in text.split("\r") if x]
    assert len(lines) == 4 and text.endswith("\n")  # 3 flushes (every 2 steps) + the close
    assert lines[0].startswith("pretrain  2/6 [33%] ") and "steps/s" in lines[0]
    # The mean loss of the window (steps 1, 2: (1 + 1/2) / 2), beside its chance level.
    assert "ETA" in lines[0] and "loss=0.75 (chance 2)" in lines[0]
    assert lines[-1].startswith("pretrain  6/6 [100%]") and "loss=0.1833" in lines[-1]
    # The bar replaces the per-flush log lines (they would break the redrawn line).
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "step" in r.msg]


def test_training_off_a_terminal_logs_lines_without_carriage_returns(tmp_path, monkeypatch, caplog):
    stream = io.StringIO()  # isatty() is False
    monkeypatch.setattr("sys.stderr", stream)
    with caplog.at_level(logging.INFO):
        _train(tmp_path)
    assert "\r" not in stream.getvalue() and stream.getvalue() == ""
    shown = [r.getMessage() for r in caplog.records if r.name == "ssl3d_jax.train.loop"]
    assert len(shown) == 3 and shown[-1].startswith("[pretrain] step 6/6")
    assert not [r for r in caplog.records if r.name == "ssl3d_jax.progress"]  # no duplicates


def test_resumed_bar_counts_position_but_rates_only_new_steps(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    bar = progress.Progress(
        10, "finetune", enabled=True, stream=Terminal(), initial=6, unit="steps"
    )
    now[0] = 102.0
    bar.n = 8  # 2 new steps in 2 s
    line = bar.format()
    assert line.startswith("finetune  8/10 [80%] 1 steps/s ETA 0:02")


def test_off_terminal_bar_logs_at_most_one_line_per_tenth(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="ssl3d_jax.progress"):
        with progress.Progress(1000, "evaluate", stream=stream, initial=500) as bar:
            for _ in range(500):
                bar.update()
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and lines[-1].startswith("evaluate  1000/1000 [100%]")


def test_sliding_window_bar_counts_windows(monkeypatch):
    monkeypatch.setattr(progress, "_REDRAW_S", 0.0)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    volume = np.ones((8, 8, 1), np.float32)

    def predict(x):
        return np.concatenate([x, -x], axis=-1)

    inference.sliding_window(predict, volume, window=(4, 4), overlap=0.0, batch_size=3)
    assert terminal.getvalue() == ""  # off by default
    out = inference.sliding_window(
        predict, volume, window=(4, 4), overlap=0.0, batch_size=3, progress=True
    )
    assert out.shape == (8, 8, 2)
    assert terminal.getvalue().rstrip().split("\r")[-1].startswith("sliding window  4/4 [100%]")
