"""Pretext metrics you can trust: every record holds the mean of its log window (not the last
step's value), each task's chance level is logged beside its metrics, and a pretraining that ends
within 5 % of chance says so (a WARNING and `near_chance` in pretrain_summary.json)."""

from __future__ import annotations

import json
import logging
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl3d_jax import tasks
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.data import phantom
from ssl3d_jax.tasks import exemplar
from ssl3d_jax.train import loop, pretrain
from ssl3d_jax.train import data as data_lib

# --- window means -----------------------------------------------------------------------------


def _fake_train(tmp_path, values, *, log_every, chance=None, checkpointer=None, every=0):
    """train_loop on a fake state (only `.step`) whose step s returns `values[s]` as metrics."""

    def step_fn(step):
        def step_(state, batch):
            return types.SimpleNamespace(step=state.step + 1), {
                k: np.float32(v) for k, v in values[step].items()
            }

        return step_

    loop.train_loop(
        phase="pretrain",
        state=types.SimpleNamespace(step=0),
        step_fn=step_fn,
        batches=iter([{"image": np.zeros((1, 2))}] * len(values)),
        put_batch=lambda b: b,
        num_steps=len(values),
        writer=loop.MetricWriter(tmp_path / "metrics.jsonl"),
        log_every=log_every,
        chance=chance,
        checkpointer=checkpointer,
        checkpoint_every=every,
        prefetch=0,
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_record_holds_the_window_mean_not_the_last_step(tmp_path):
    # Accuracy of batches of 8: 0, 0.125, 0.5, 0 then 0.25, 0.75, 1.0 (a shorter final window).
    acc = [0.0, 0.125, 0.5, 0.0, 0.25, 0.75, 1.0]
    loss = [4.0, 3.0, 2.0, 1.0, 6.0, 2.0, 1.0]
    records = _fake_train(
        tmp_path, [{"loss": x, "accuracy": a} for x, a in zip(loss, acc)], log_every=4
    )
    assert [r["step"] for r in records] == [4, 7]
    assert records[0]["accuracy"] == pytest.approx(0.15625)  # last step alone: 0
    assert records[0]["loss"] == pytest.approx(2.5)  # last step alone: 1
    assert records[1]["accuracy"] == pytest.approx(2.0 / 3)
    assert records[1]["loss"] == pytest.approx(3.0)
    assert not any(k.startswith("chance_") for r in records for k in r)  # none given


def test_chance_is_logged_beside_the_metrics(tmp_path, caplog):
    chance = {"loss": math.log(26), "accuracy": 1 / 26}
    values = [{"loss": 2.5, "accuracy": 0.25}, {"loss": 2.75, "accuracy": 0.0}]
    with caplog.at_level(logging.INFO, logger="ssl3d_jax.train.loop"):
        records = _fake_train(tmp_path, values, log_every=2, chance=chance)
    (record,) = records
    assert record["chance_loss"] == pytest.approx(math.log(26))
    assert record["chance_accuracy"] == pytest.approx(1 / 26)
    assert record["loss"] == pytest.approx(2.625) and record["accuracy"] == pytest.approx(0.125)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "ssl3d_jax.train.loop"]
    assert "loss 2.625 (chance 3.258)" in line and "accuracy 0.125 (chance 0.03846)" in line


def test_non_finite_step_is_named_inside_a_window(tmp_path):
    values = [{"loss": 1.0}, {"loss": float("inf")}, {"loss": 1.0}, {"loss": 1.0}]
    with pytest.raises(loop.NonFiniteLossError, match="step 2"):
        _fake_train(tmp_path, values, log_every=4)


def test_checkpoint_meta_holds_the_window_means(tmp_path):
    class _Ckpt:
        def __init__(self):
            self.meta = {}

        def save(self, step, state, meta, data_iter=None):
            self.meta[step] = meta

        def wait(self):
            pass

    ckpt = _Ckpt()
    values = [{"loss": float(i)} for i in range(1, 7)]
    _fake_train(tmp_path, values, log_every=2, checkpointer=ckpt, every=3)
    assert sorted(ckpt.meta) == [3, 6]
    # Windows: steps 1-2, 3 (cut by the checkpoint), 4, 5-6.
    assert ckpt.meta[3]["train_metrics"] == {"loss": 3.0, "step": 3}
    assert ckpt.meta[6]["train_metrics"] == {"loss": 5.5, "step": 6}


# --- chance levels per task -------------------------------------------------------------------

LN = math.log


# The chance level each task states (one parameter per task: README "Adding a task").
CHANCE = [
    ("rpl", "smoke", {"loss": LN(26), "accuracy": 1 / 26}),  # 3³ - 1 classes
    ("rpl", "smoke,2d", {"loss": LN(8), "accuracy": 1 / 8}),  # 3² - 1
    ("rotation", "smoke", {"loss": LN(10), "accuracy": 0.1}),
    ("rotation", "smoke,2d", {"loss": LN(4), "accuracy": 0.25}),
    ("jigsaw", "smoke", {"loss": LN(100), "accuracy": 0.01}),
    # InfoNCE: the 8 volumes x 4³ patch latents of the batch are the candidates.
    ("cpc", "smoke", {"loss": LN(8 * 64), "accuracy": 1 / 512}),
    ("cpc", "smoke,2d", {"loss": LN(8 * 16), "accuracy": 1 / 128}),
    ("exemplar", "smoke", {"loss": 1.0, "triplet_accuracy": 0.5}),  # the margin
]


@pytest.mark.parametrize("name, preset, expected", CHANCE)
def test_each_task_states_its_chance_level(name, preset, expected):
    config = tasks.task_config(name, preset)
    task = tasks.lookup(name).make(config, in_channels=2)
    assert task.chance == pytest.approx(expected, rel=1e-12)


def test_every_registered_task_states_its_chance_level():
    assert {name for name, _, _ in CHANCE} == set(tasks.names())


def test_chance_follows_the_task_settings():
    from configs import cpc as cpc_config
    from configs import exemplar as exemplar_config
    from configs import jigsaw as jigsaw_config
    from configs import rpl as rpl_config
    from ssl3d_jax.errors import ConfigError
    from ssl3d_jax.tasks import cpc, jigsaw, rpl

    config = rpl_config.get_config("smoke")
    config.rpl.patches_per_side = 5
    assert rpl.make_task(config, in_channels=1).chance["loss"] == pytest.approx(LN(124))
    config = jigsaw_config.get_config("smoke")
    config.jigsaw.num_permutations = 24
    with pytest.raises(
        ConfigError, match="puzzles_per_volume=64: expected 1 to num_permutations=24"
    ):
        jigsaw.make_task(config, in_channels=1)  # the config's 64 puzzles per volume > 24
    config.jigsaw.puzzles_per_volume = 24
    assert jigsaw.make_task(config, in_channels=1).chance["accuracy"] == pytest.approx(1 / 24)
    config = exemplar_config.get_config("smoke")
    config.exemplar.margin = 0.3
    assert exemplar.make_task(config, in_channels=1).chance["loss"] == pytest.approx(0.3)
    # CPC with accumulation: each micro-batch of 8 / 2 volumes is a candidate set.
    config = cpc_config.get_config("smoke")
    config.pretrain.grad_accum_steps = 2
    assert cpc.make_task(config, in_channels=1).chance["loss"] == pytest.approx(LN(4 * 64))


# --- near chance ------------------------------------------------------------------------------


def test_near_chance_decision():
    assert pretrain.near_chance(math.log(26), math.log(26))
    assert pretrain.near_chance(3.3, math.log(26))  # worse than chance counts too
    assert pretrain.near_chance(0.96 * 3.0, 3.0)
    assert not pretrain.near_chance(0.94 * 3.0, 3.0)
    assert not pretrain.near_chance(2.63, math.log(26))


def _task(chance):
    return types.SimpleNamespace(name="rpl", chance=chance)


def _write_records(workdir, records):
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_summary_of_a_run_below_chance_is_not_flagged(tmp_path, caplog):
    chance = {"loss": math.log(26), "accuracy": 1 / 26}
    _write_records(
        tmp_path,
        [
            {"phase": "pretrain", "step": 10, "loss": 3.2, "accuracy": 0.05, "time": 1.0},
            {"phase": "pretrain", "step": 20, "loss": 2.0, "accuracy": 0.4, "time": 2.0},
            {"phase": "pretrain/knn", "step": 20, "knn_accuracy": 0.9, "time": 2.0},
            {"phase": "finetune/probe", "step": 30, "loss": 9.0, "time": 3.0},
        ],
    )
    with caplog.at_level(logging.WARNING):
        summary = pretrain.report_pretext(str(tmp_path), _task(chance))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    written = json.loads((tmp_path / pretrain.SUMMARY_FILE).read_text())
    assert written == summary
    assert summary["near_chance"] is False and summary["step"] == 20
    assert summary["final_loss"] == 2.0 and summary["chance_loss"] == pytest.approx(LN(26))
    assert summary["ratio"] == pytest.approx(2.0 / LN(26))
    assert summary["metrics"] == {"loss": 2.0, "accuracy": 0.4}


def test_summary_of_a_run_at_chance_warns(tmp_path, caplog):
    chance = {"loss": 1.0, "triplet_accuracy": 0.5}  # Exemplar, margin 1
    _write_records(
        tmp_path,
        [{"phase": "pretrain", "step": 5, "loss": 0.99, "chance_loss": 1.0, "d_pos": 0.1}],
    )
    with caplog.at_level(logging.WARNING):
        summary = pretrain.report_pretext(str(tmp_path), _task(chance))
    assert summary["near_chance"] is True and summary["ratio"] == pytest.approx(0.99)
    assert summary["metrics"] == {"loss": 0.99, "d_pos": 0.1}  # chance_* kept apart
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "within 5% of chance: loss 0.99 vs chance 1" in warning
    assert "learned nothing" in warning and "learning rate" in warning
    assert pretrain.read_summary(str(tmp_path))["near_chance"] is True


def test_no_metrics_no_summary(tmp_path):
    assert pretrain.report_pretext(str(tmp_path), _task({"loss": 1.0})) is None
    assert pretrain.read_summary(str(tmp_path)) is None


@pytest.mark.slow
def test_pretraining_that_learns_nothing_is_flagged_also_when_found_complete(tmp_path, caplog):
    """RPL at smoke size with learning rate 0: the loss stays at ln 26 (the initial logits are
    nearly uniform), the summary says near_chance, and a rerun of the complete run (nothing
    trained) writes it again from metrics.jsonl."""
    from configs import rpl as rpl_config

    data = tmp_path / "data"
    phantom.write_brats_phantom(data, num_cases=3, shape=(30, 34, 28), seed=3)
    config = rpl_config.get_config("smoke")
    config.mode = "pretrain"
    config.data.root = str(data)
    config.tensorboard = False
    config.pretrain.learning_rate = 0.0
    config.pretrain.num_steps = 2
    config.pretrain.log_every = 2
    config.pretrain.knn_every = 0
    dataset = data_lib.open_dataset(config)
    cases = list(dataset.cases)
    workdir = tmp_path / "work"
    with caplog.at_level(logging.WARNING, logger="ssl3d_jax.train.pretrain"):
        pretrain.run(config, str(workdir), dataset, cases)
    (record,) = [
        json.loads(x)
        for x in (workdir / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["phase"] == "pretrain"
    ]
    assert record["chance_loss"] == pytest.approx(LN(26))
    assert record["chance_accuracy"] == pytest.approx(1 / 26)
    summary = json.loads((workdir / pretrain.SUMMARY_FILE).read_text())
    assert summary["near_chance"] is True, summary
    assert summary["final_loss"] == pytest.approx(record["loss"])
    assert any("within 5% of chance" in r.getMessage() for r in caplog.records)
    with Checkpointer(workdir / "checkpoints", create=False) as ckpt:
        meta = ckpt.read_meta()
    assert meta["train_metrics"]["loss"] == pytest.approx(record["loss"])
    assert meta["train_metrics"]["step"] == 2
    assert meta["chance"]["loss"] == pytest.approx(LN(26))

    (workdir / pretrain.SUMMARY_FILE).unlink()
    pretrain.run(config, str(workdir), dataset, cases)  # already complete
    assert json.loads((workdir / pretrain.SUMMARY_FILE).read_text()) == summary


# --- exemplar's metrics on hand-made embeddings -----------------------------------------------


class _FixedCodes:
    """Stands in for an `ExemplarModel`: returns the given codes (anchors then positives)."""

    def __init__(self, codes):
        self.codes = jnp.asarray(codes, jnp.float32)

    def __call__(self, x, *, train=False, rngs=None):
        assert x.shape[0] == self.codes.shape[0]
        return self.codes


def _exemplar_metrics(anchors, positives, margin=1.0):
    volumes = jnp.zeros((2, 9, 9, 1))  # batch 2: volume i's negative is volume 1 - i
    codes = np.concatenate([anchors, positives])
    _, metrics = exemplar.loss_fn(
        _FixedCodes(codes), volumes, jax.random.key(0), margin=margin, training=False
    )
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.slow
def test_exemplar_metrics_on_hand_made_embeddings():
    # Triplet 0: a = (1, 0), p = (0, 1), n = p_1 = (0.6, -0.8): d_pos 2 > d_neg 0.8 (wrong).
    # Triplet 1: a = (0, -1), p = (0.6, -0.8), n = p_0 = (0, 1): d_pos 0.4 < d_neg 4 (right).
    m = _exemplar_metrics([[1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [0.6, -0.8]])
    assert m["triplet_accuracy"] == pytest.approx(0.5)
    assert m["d_pos"] == pytest.approx((2.0 + 0.4) / 2)
    assert m["d_neg"] == pytest.approx((0.8 + 4.0) / 2)
    assert m["loss"] == pytest.approx((2.0 - 0.8 + 1.0 + 0.0) / 2)
    # Both triplets right.
    m = _exemplar_metrics([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
    assert m["triplet_accuracy"] == 1.0 and m["d_pos"] == 0.0 and m["d_neg"] == pytest.approx(2.0)
    # Collapsed codes (learned nothing): d_pos = d_neg, the loss is the margin = chance; a tie
    # is not a correct triplet.
    same = [[0.6, 0.8], [0.6, 0.8]]
    m = _exemplar_metrics(same, same, margin=0.7)
    assert m["loss"] == pytest.approx(0.7) and m["d_pos"] == m["d_neg"] == 0.0
    assert m["triplet_accuracy"] == 0.0
