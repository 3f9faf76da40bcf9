"""Exact resume: a run killed with SIGKILL and started again with the same command logs the same
metrics, bit for bit, as one that was never interrupted; a non-finite loss stops the run naming
its step and cases and leaves the checkpoints as they were.

The end-to-end tests run `launch/main.py` in subprocesses (one CPU device, as a user would) and
share one uninterrupted reference run.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from launch_util import ROOT

from ssl3d_jax.train import common, loop
from ssl3d_jax.train.state import TrainState

# Long enough to be killed midway: checkpoints every 3 (pretraining) / 2 (finetuning) steps.
ARGS = [
    "--config=configs/rpl.py:smoke",
    "--config.pretrain.num_steps=12",
    "--config.pretrain.checkpoint_every=3",
    "--config.pretrain.log_every=1",
    "--config.pretrain.knn_every=6",
    "--config.finetune.num_steps=4",
    "--config.finetune.checkpoint_every=2",
    "--config.finetune.log_every=1",
    # The probe arm (restored encoder, linear read-out) compiles in a fraction of the U-Net's time.
    "--config.finetune.arms=('probe',)",
    "--config.finetune.save_predictions=False",
]


def _env(cache) -> dict:
    env = dict(os.environ, SSL3D_JAX_CACHE=str(cache))
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
    return env


def _popen(args, cache, log_path) -> subprocess.Popen:
    """launch/main.py in a session of its own, so that its grain workers can be killed too."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "main.py"), *args],
            cwd=ROOT,
            env=_env(cache),
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )


def _run(args, cache, log_path, timeout=300) -> tuple[int, str]:
    proc = _popen(args, cache, log_path)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, pathlib.Path(log_path).read_text()


def _records(workdir) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def _committed(ckpt_dir) -> list[int]:
    """Finished checkpoint steps: orbax renames a step's temporary folder to `<step>` last."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _kill_midway(proc, workdir, phase, ckpt_dir, log_path, timeout=240) -> tuple[int, int]:
    """SIGKILL `proc` (and its workers) once `phase` has a finished checkpoint and has logged
    records of later steps, i.e. while the metrics file holds records that the resumed run must
    drop. The process group is frozen (SIGSTOP) while the condition is checked, so what is on
    disk at the kill is known exactly.

    Returns:
      (latest finished checkpoint, last logged step of `phase`) at the kill.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"run ended (rc {proc.returncode}) before it could be killed during {phase}:\n"
                + pathlib.Path(log_path).read_text()[-3000:]
            )
        steps = _committed(ckpt_dir)
        logged = [r["step"] for r in _records(workdir) if r["phase"] == phase]
        if steps and logged and max(logged) > steps[-1]:
            os.killpg(proc.pid, signal.SIGSTOP)
            steps = _committed(ckpt_dir)
            logged = [r["step"] for r in _records(workdir) if r["phase"] == phase]
            if steps and max(logged) > steps[-1]:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return steps[-1], max(logged)
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting to kill the run during {phase}")


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in loop.WALL_CLOCK_FIELDS} for r in records]


def _scores(workdir) -> dict:
    arms = json.loads((workdir / "results.json").read_text())["arms"]
    return {arm: (r["metrics"], r["dice_per_case"]) for arm, r in arms.items()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "shared_cache"  # phantom data and compiled programs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """The uninterrupted run."""
    base = tmp_path_factory.mktemp("reference")
    workdir = base / "work"
    rc, err = _run([*ARGS, f"--workdir={workdir}"], cache, base / "log.txt")
    assert rc == 0, err[-4000:]
    return workdir


@pytest.mark.slow
def test_killed_twice_resumes_to_identical_metrics(reference, cache, tmp_path):
    """Killed during pretraining (grain with a worker process), then again during finetuning:
    the third start completes, and metrics.jsonl (every phase: pretraining, its kNN probe
    records, finetuning) and the test Dice equal the uninterrupted run's, bit for bit."""
    workdir = tmp_path / "work"
    args = [*ARGS, f"--workdir={workdir}", "--config.data.num_workers=1"]

    # 1. Killed during pretraining, after a checkpoint, with later steps already logged.
    proc = _popen(args, cache, tmp_path / "log1.txt")
    pre_ckpt, pre_logged = _kill_midway(
        proc, workdir, "pretrain", workdir / "checkpoints", tmp_path / "log1.txt"
    )
    assert 3 <= pre_ckpt < pre_logged <= 12
    to_drop = [
        r for r in _records(workdir) if r["phase"].startswith("pretrain") and r["step"] > pre_ckpt
    ]

    # 2. Resumes pretraining from that checkpoint; killed again during finetuning.
    arm = workdir / "finetune" / "probe"
    proc = _popen(args, cache, tmp_path / "log2.txt")
    ft_ckpt, ft_logged = _kill_midway(
        proc, workdir, "finetune/probe", arm / "checkpoints", tmp_path / "log2.txt"
    )
    assert 2 <= ft_ckpt < ft_logged <= 4
    log2 = (tmp_path / "log2.txt").read_text()
    assert f"Resuming pretraining from step {pre_ckpt} " in log2
    assert f"dropped {len(to_drop)} metric records logged after step {pre_ckpt}" in log2

    # 3. Pretraining is complete; finetuning resumes and the run completes.
    rc, log3 = _run(args, cache, tmp_path / "log3.txt")
    assert rc == 0, log3[-4000:]
    assert "Pretraining already complete (step 12)" in log3
    assert f"Resuming finetune/probe from step {ft_ckpt}" in log3

    got, want = _records(workdir), _records(reference)
    assert {r["phase"] for r in want} == {
        "pretrain",
        "pretrain/knn",
        "pretrain/val",
        "finetune/probe",
    }
    assert _comparable(got) == _comparable(want)
    assert _scores(workdir) == _scores(reference)  # the finetuned models' test Dice


@pytest.mark.slow
def test_keeps_the_newest_checkpoints_only(reference):
    """keep-N: pretraining keeps `keep_checkpoints` (3) steps, each finetuning arm 2; no
    temporary folder is left."""
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["12", "6", "9"]
    arm = reference / "finetune" / "probe" / "checkpoints"
    assert sorted(p.name for p in arm.iterdir()) == ["2", "4"]


@pytest.mark.slow
def test_unreadable_final_checkpoint_falls_back_to_identical_metrics(reference, cache, tmp_path):
    """The final pretraining checkpoint truncated: the rerun warns, sets it aside, retrains from
    the one before, and logs the same records again."""
    workdir = tmp_path / "work"
    shutil.copytree(reference / "checkpoints", workdir / "checkpoints")
    shutil.copy(reference / "metrics.jsonl", workdir / "metrics.jsonl")
    data = max(
        (workdir / "checkpoints" / "12" / "state").rglob("d/*"), key=lambda p: p.stat().st_size
    )
    os.truncate(data, 100)
    rc, err = _run(
        [*ARGS, f"--workdir={workdir}", "--config.mode=pretrain"], cache, tmp_path / "log"
    )
    assert rc == 0, err[-4000:]
    assert f"Checkpoint {workdir / 'checkpoints' / '12'} is unreadable (" in err
    assert "Resuming pretraining from step 9 " in err
    assert (workdir / "checkpoints" / "12.unreadable").is_dir()
    # The records of steps 10-12 were dropped and logged again (after the finetuning records
    # that the copied file also holds): per phase, the file is the uninterrupted run's.
    got, want = _comparable(_records(workdir)), _comparable(_records(reference))
    for phase in ("pretrain", "pretrain/knn", "finetune/probe"):
        assert [r for r in got if r["phase"] == phase] == [r for r in want if r["phase"] == phase]
    assert len(got) == len(want)


def _tree_digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_cases(reference, cache, tmp_path):
    """Continuing the finished pretraining with a NaN learning rate: step 13 turns the params to
    NaN, so the loss of step 14 is NaN. The run exits with an error naming step 14 and the cases
    of its batch, and the checkpoint folder is byte for byte what it was."""
    workdir = tmp_path / "work"
    shutil.copytree(reference / "checkpoints", workdir / "checkpoints")
    before = _tree_digest(workdir / "checkpoints")
    train = json.loads((reference / "splits.json").read_text())["train"]
    rc, err = _run(
        [
            *[a for a in ARGS if "knn_every" not in a],
            f"--workdir={workdir}",
            "--config.mode=pretrain",
            "--config.pretrain.num_steps=15",
            "--config.pretrain.learning_rate=nan",
            "--config.pretrain.knn_every=0",
        ],
        cache,
        tmp_path / "log.txt",
    )
    assert rc == 1, err[-4000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "non-finite metrics at step 14 (batch of cases " in line
    named = line.split("batch of cases ")[1].split(")")[0].split(", ")
    assert named and set(named) <= set(train)
    assert _tree_digest(workdir / "checkpoints") == before
    assert [r["step"] for r in _records(workdir)] == [13]


# --- in-process units ----------------------------------------------------------------------------


def test_metric_writer_drops_records_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"phase": "pretrain", "step": 1},
        {"phase": "pretrain", "step": 2},
        {"phase": "pretrain/knn", "step": 2},
        {"phase": "pretrain", "step": 3},
        {"phase": "pretrain/knn", "step": 4},
        {"phase": "pretraining_other", "step": 9},
        {"phase": "finetune/probe", "step": 5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"phase": "pretr')
    writer = loop.MetricWriter(path)
    assert writer.drop_after("pretrain", 2) == 3  # steps 3 and knn 4, and the torn last line
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert kept == [lines[i] for i in (0, 1, 2, 5, 6)]
    assert writer.drop_after("pretrain", 2) == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temp file left


def test_metric_writer_writes_on_process_zero_only(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = loop.MetricWriter(tmp_path / "sub" / "metrics.jsonl")
    writer.write({"phase": "pretrain", "step": 1})
    assert writer.drop_after("pretrain", 0) == 0
    assert not (tmp_path / "sub").exists()


class _Checkpointer:
    """Records at each save how many metric lines were already written."""

    def __init__(self, path):
        self.path, self.saved = path, []

    def save(self, step, *args, **kwargs):
        self.saved.append((step, len(self.path.read_text().splitlines())))

    def wait(self):
        pass


def _loop(tmp_path, losses, **kwargs):
    losses = iter(losses)
    names = ["BraTS_000", "BraTS_003", "BraTS_011", "BraTS_020"]
    batches = iter([{"case_index": np.array([i % 4, (3 * i + 1) % 4])} for i in range(8)])

    def step_fn(_):
        def step(state, batch):
            return state.replace(step=state.step + 1), {"loss": np.float32(next(losses))}

        return step

    ckpt = _Checkpointer(tmp_path / "metrics.jsonl")
    state = TrainState(step=np.int32(0), params={}, opt_state={}, rng=np.zeros(2))
    loop.train_loop(
        phase="pretrain",
        state=state,
        step_fn=step_fn,
        batches=batches,
        put_batch=lambda b: {},
        writer=loop.MetricWriter(tmp_path / "metrics.jsonl"),
        checkpointer=ckpt,
        describe_batch=common.describe_cases(names),
        **kwargs,
    )
    return ckpt


def test_non_finite_loss_names_step_and_cases(tmp_path):
    with pytest.raises(loop.NonFiniteLossError) as err:
        _loop(tmp_path, [1.0, 0.5, 0.3, float("inf")], num_steps=4, log_every=4)
    # Checked at the 4-step log: the error still names the 4th step's batch (case indices 3, 2).
    assert "non-finite metrics at step 4 (batch of cases BraTS_020, BraTS_011)" in str(err.value)


def test_checkpoint_is_saved_after_every_record_of_its_step(tmp_path):
    """Probe records of step S are written before checkpoint S: a run resumed from S never
    needs to log them again."""
    probe = ("knn", 2, lambda state: {"acc": 0.5})
    ckpt = _loop(tmp_path, [1.0] * 4, num_steps=4, log_every=1, checkpoint_every=2, probes=(probe,))
    # Lines at the save of step 2: pretrain 1, 2 and knn 2; at step 4: 3, 4 more.
    assert ckpt.saved == [(2, 3), (4, 6)]
