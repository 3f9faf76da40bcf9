"""launch/pretext_lr_search.py: the choice is the lowest final VALIDATION loss, overrides reach
the named config keys, and the report marks the chosen row."""

from __future__ import annotations

import importlib.util
import pathlib

from configs import rpl as rpl_config

_PATH = pathlib.Path(__file__).resolve().parents[1] / "launch" / "pretext_lr_search.py"
_spec = importlib.util.spec_from_file_location("pretext_lr_search", _PATH)
search = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(search)


def _row(task, lr, val_loss, train_loss):
    return {
        "task": task,
        "learning_rate": lr,
        "steps": 10,
        "batch_size": 2,
        "chance": {"loss": 3.0},
        # A low TRAIN loss must not win: the choice is made on the held-out cases.
        "train_final": {"loss": train_loss},
        "val": [{"step": 5, "loss": 3.0}, {"step": 10, "loss": val_loss}],
        "wall_time_s": 1.0,
    }


def test_choice_is_the_lowest_final_validation_loss():
    rows = [
        _row("rpl", 1e-3, 2.9, 0.1),
        _row("rpl", 3e-4, 2.0, 1.5),
        _row("rotation", 1e-3, 1.0, 1.0),
    ]
    best = search.choose(rows)
    assert best["rpl"]["learning_rate"] == 3e-4 and best["rotation"]["learning_rate"] == 1e-3
    md = search.markdown(rows, best, command="cmd", header="hdr")
    assert "| rpl | **0.0003** |" in md and "| rpl | 0.001 |" in md
    assert "0.67" in md  # 2.0 / chance 3.0


def test_overrides_set_the_named_keys():
    config = rpl_config.get_config("smoke")
    search._override(config, ["rpl.grid_fraction=0.75", "pretrain.batch_size=4"])
    assert config.rpl.grid_fraction == 0.75 and config.pretrain.batch_size == 4
