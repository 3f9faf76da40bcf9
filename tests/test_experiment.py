"""The experiment runner (config.mode='sweep') end to end at smoke size, as a user runs it, and
its bookkeeping (seeds, splits, what pretraining reads) with the training replaced by fakes."""

from __future__ import annotations

import csv
import json
import types

import numpy as np
import pytest
from launch_util import run_main as _run

from configs import rpl as rpl_config
from ssl3d_jax import experiment, report
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.train import data as data_lib

# One task, one fraction, two repetitions, every arm (pretrained, scratch, probe, random_warmup,
# random_probe). Several fractions: test_repetition_seeds_splits_and_pretraining_cases.
ARGS = [
    "--config=configs/sweep.py:smoke",
    "--config.experiment.tasks=('rpl',)",
    "--config.experiment.fractions=(1.0,)",
    "--config.experiment.repetitions=2",
]
METHODS = {"rpl", "rpl probe", "scratch", "random_warmup", "random probe"}


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


@pytest.mark.slow
def test_sweep_writes_csv_md_and_plot_with_all_arms(sweep):
    workdir, _ = sweep
    rows = _rows(workdir)
    methods = {r["method"] for r in rows}
    assert methods == METHODS
    fractions = sorted({float(r["fraction"]) for r in rows})
    assert fractions == [1.0]
    assert len(rows) == 2 * 5  # repetitions × methods
    for r in rows:
        for region in ("WT", "TC", "ET"):
            assert 0.0 <= float(r[region]) <= 1.0
    md = (workdir / "results.md").read_text()
    for m in methods:
        assert m in md
    assert "| method | 100% |" in md
    for name in ("results_WT.png", "results_paired_WT.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Paired differences of every method against both baselines, 2 test cases × 2 repetitions.
    assert "## Paired differences" in md and "### WT vs random_warmup" in md
    with open(workdir / "results_paired.csv") as f:
        paired = list(csv.DictReader(f))
    assert tuple(paired[0]) == report.PAIRED_COLUMNS
    assert {(p["method"], p["baseline"]) for p in paired} == {
        (m, b) for b in ("scratch", "random_warmup") for m in METHODS if m != b
    }
    assert {(p["n_cases"], p["n_repetitions"]) for p in paired} == {("2", "2")}
    # Each task's own report, and a prediction NIfTI per test case of every run; the
    # task-independent arms ran once, under baselines/.
    assert (workdir / "rpl" / "results.csv").exists()
    for arm in ("scratch", "random_warmup", "random_probe"):
        preds = list((workdir / "baselines").glob(f"runs/*/finetune/{arm}/predictions/*.nii.gz"))
        assert len(preds) == 2 * 2  # repetitions × test cases
        assert not list((workdir / "rpl").glob(f"runs/*/finetune/{arm}"))
    assert not (workdir / "baselines" / "rep0").exists()  # nothing pretrained for them


@pytest.mark.slow
def test_split_files_shared_by_all_methods(sweep):
    workdir, _ = sweep
    results = list(workdir.glob("*/runs/*/finetune/*/result.json"))
    assert len(results) == 2 * 5  # repetitions × methods
    by_run, held_out = {}, set()
    for p in results:
        r = json.loads(p.read_text())
        by_run.setdefault(p.parts[-4], set()).add((tuple(r["labeled"]), tuple(r["test"])))
        held_out.add((tuple(r["val"]), tuple(r["test"])))
        # Every run scores the validation cases too.
        assert set(r["val_metrics"]) == set(r["metrics"]) and r["num_val"] == 1
        assert sorted(r["val_per_case"]) == r["val"]
    assert len(held_out) == 1  # the same val / test cases in every repetition and method
    for run, used in by_run.items():
        assert len(used) == 1, f"{run}: methods finetuned on different cases: {used}"
    full = json.loads((workdir / "splits" / "split_100pct_rep0.json").read_text())
    assert set(full["labeled"]) == set(full["train"])
    assert not set(full["test"]) & set(full["train"])
    assert len(full["val"]) == 1
    assert not set(full["val"]) & (set(full["train"]) | set(full["test"]))
    other = json.loads((workdir / "splits" / "split_100pct_rep1.json").read_text())
    assert (other["val"], other["test"]) == (full["val"], full["test"])


def _encoder(ckpt_dir) -> dict:
    with Checkpointer(ckpt_dir, create=False) as ckpt:
        step = ckpt.latest_step()
        shapes = ckpt.param_shapes(step)
        return ckpt.restore_params(step, {"encoder": shapes["encoder"]})["encoder"]


@pytest.mark.slow
def test_repetitions_pretrain_and_finetune_with_their_own_seeds(sweep):
    workdir, _ = sweep
    # One pretrained encoder per repetition, shared by its fractions, from different seeds.
    enc = [_encoder(workdir / "rpl" / f"rep{r}" / "checkpoints") for r in (0, 1)]
    import jax

    leaves = [jax.tree.leaves(e) for e in enc]
    assert len(leaves[0]) == len(leaves[1]) > 0
    assert all(not np.array_equal(a, b) for a, b in zip(*leaves))
    seeds = {}
    for p in workdir.glob("*/runs/*pct_rep*/finetune/*/result.json"):
        r = json.loads(p.read_text())
        rep = r["repetition"]
        assert p.parts[-4].endswith(f"_rep{rep}")
        expected = experiment.repetition_seed(0, rep)
        assert r["seeds"]["finetune"] == r["seed"] == expected
        assert r["seeds"]["labeled_subset"] == [0, rep] and r["seeds"]["split"] == 0
        if r["arm"] in ("pretrained", "probe"):
            assert r["seeds"]["pretrain"] == expected
            assert r["restored_from"] == str(workdir / "rpl" / f"rep{rep}" / "checkpoints")
        else:
            assert r["seeds"]["pretrain"] is None and r["restored_from"] is None
        seeds.setdefault(rep, set()).add(r["seeds"]["finetune"])
    assert seeds == {0: {0}, 1: {1000}}


@pytest.mark.slow
def test_rerun_reuses_results_and_identical_split_files(sweep, tmp_path):
    workdir, base = sweep
    before = {p.name: p.read_bytes() for p in (workdir / "splits").iterdir()}
    # The same command again: nothing is recomputed, the split files are unchanged.
    proc = _run([*ARGS, f"--workdir={workdir}"], base / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done before" in proc.stderr
    assert "finetune/scratch] step" not in proc.stderr
    assert "Resuming pretraining" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (workdir / "splits").iterdir()} == before
    # A fresh workdir draws byte-identical split files from the same config.
    other = tmp_path / "other"
    proc = _run(
        [*ARGS, f"--workdir={other}", "--config.experiment.arms=('scratch',)"],
        base / "cache",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert {p.name: p.read_bytes() for p in (other / "splits").iterdir()} == before


# --- bookkeeping, with pretraining and finetuning replaced by fakes ------------------------------


def _fake_dataset(n=12):
    cases = [types.SimpleNamespace(name=f"case_{i:02d}") for i in range(n)]
    return types.SimpleNamespace(
        cases=cases,
        unlabelled_cases=[],
        kind="segmentation",
        name="fake",
        layout="brats",
        root="/fake",
    )


@pytest.fixture
def fake_training(monkeypatch):
    """Records every pretraining / finetuning call of the experiment runner, trains nothing."""
    calls = {"pretrain": [], "finetune": []}

    def pretrain_run(config, workdir, dataset, cases, *, mesh=None, val_cases=None):
        calls["pretrain"].append(
            {
                "seed": config.seed,
                "workdir": workdir,
                "cases": [c.name for c in cases],
                "val_cases": [c.name for c in val_cases or []],
            }
        )
        return f"{workdir}/checkpoints"

    def finetune_run(config, workdir, arm, splits, dataset, *, init_from, mesh=None):
        calls["finetune"].append(
            {"seed": config.seed, "arm": arm, "splits": splits, "init_from": init_from}
        )
        rng = np.random.default_rng([config.seed, len(arm)])
        per_case = {c: {"WT": float(rng.uniform())} for c in splits["test"]}
        return {
            "metrics": {"WT": float(np.mean([v["WT"] for v in per_case.values()]))},
            "dice_per_case": per_case,
            "val_metrics": {"WT": 0.5},
            "seed": config.seed,
        }

    monkeypatch.setattr(experiment.pretrain, "run", pretrain_run)
    monkeypatch.setattr(experiment.downstream, "run", finetune_run)
    return calls


def _experiment_config():
    config = rpl_config.get_config("smoke")
    config.mode = "experiment"
    config.seed = 7
    config.data.num_test = 3
    config.data.num_val = 2
    config.experiment.repetitions = 2
    config.experiment.fractions = (0.5, 1.0)
    return config


def test_repetition_seeds_splits_and_pretraining_cases(fake_training, tmp_path):
    config = _experiment_config()
    dataset = _fake_dataset()
    rows = experiment.run_experiment(config, str(tmp_path), dataset=dataset, mesh="fake")
    base = data_lib.base_split(config, dataset)
    test, val, train = set(base["test"]), set(base["val"]), set(base["train"])
    assert (len(test), len(val), len(train)) == (3, 2, 7)
    assert not (test & val or test & train or val & train)
    assert test | val | train == {c.name for c in dataset.cases}
    # One pretraining per repetition, with its seed, in rep<r>, on the training cases only.
    pre = fake_training["pretrain"]
    assert [(c["seed"], c["workdir"]) for c in pre] == [
        (7, str(tmp_path / "rep0")),
        (1007, str(tmp_path / "rep1")),
    ]
    for c in pre:
        assert sorted(c["cases"]) == sorted(train)  # never a validation or test case
        assert sorted(c["val_cases"]) == sorted(val)
    # Every finetuning run: the repetition's seed; the restored arms its encoder, the controls
    # none; the same val / test cases; labelled cases from train.
    ft = fake_training["finetune"]
    assert len(ft) == 2 * 2 * 5
    labeled = {}
    for c in ft:
        labeled[c["splits"]["repetition"], c["splits"]["fraction"]] = set(c["splits"]["labeled"])
    # The fractions of one repetition are nested; the repetitions draw other subsets.
    assert labeled[0, 0.5] < labeled[0, 1.0] == train and labeled[1, 0.5] < train
    assert labeled[0, 0.5] != labeled[1, 0.5]
    for c in ft:
        rep = c["splits"]["repetition"]
        assert c["seed"] == 7 + 1000 * rep
        restored = c["arm"] in ("pretrained", "probe")
        assert c["init_from"] == (str(tmp_path / f"rep{rep}" / "checkpoints") if restored else None)
        assert (c["splits"]["test"], c["splits"]["val"]) == (base["test"], base["val"])
        assert set(c["splits"]["labeled"]) <= train
    # Rows carry per-case scores and seeds; result.json records the seeds.
    assert {r["method"] for r in rows} == {
        "rpl",
        "rpl probe",
        "scratch",
        "random_warmup",
        "random probe",
    }
    for r in rows:
        assert sorted(r["per_case"]) == base["test"]
        assert r["seeds"]["finetune"] == 7 + 1000 * r["repetition"]
    saved = json.loads(
        (tmp_path / "runs" / "50pct_rep1" / "finetune" / "probe" / "result.json").read_text()
    )
    assert saved["seeds"] == {
        "split": 7,
        "labeled_subset": [7, 1],
        "pretrain": 1007,
        "finetune": 1007,
    }
    assert (saved["val"], saved["test"]) == (base["val"], base["test"])
    assert (tmp_path / "results_paired.csv").exists()


def test_rerun_checks_old_results_and_split_files(fake_training, tmp_path):
    config = _experiment_config()
    dataset = _fake_dataset()
    experiment.run_experiment(config, str(tmp_path), dataset=dataset, mesh="fake")
    n = len(fake_training["finetune"])
    experiment.run_experiment(config, str(tmp_path), dataset=dataset, mesh="fake")
    assert len(fake_training["finetune"]) == n  # every run reused
    # A result.json without (or with other) seeds is refused, not silently mixed in.
    path = tmp_path / "runs" / "100pct_rep0" / "finetune" / "scratch" / "result.json"
    old = json.loads(path.read_text())
    del old["seeds"]
    path.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="seeds"):
        experiment.run_experiment(config, str(tmp_path), dataset=dataset, mesh="fake")
    # A split file from before validation splits: a clear error.
    split = tmp_path / "splits" / "split_50pct_rep0.json"
    saved = json.loads(split.read_text())
    del saved["val"]
    split.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="older version without a validation split"):
        experiment.run_experiment(config, str(tmp_path), dataset=dataset, mesh="fake")


def test_val_split_is_checked_and_optional():
    names = [f"c{i}" for i in range(6)]
    s = data_lib.make_splits(names, num_test=2, num_val=0, num_labeled=-1, seed=0)
    assert s["val"] == [] and len(s["train"]) == 4
    with_val = data_lib.make_splits(names, num_test=2, num_val=1, num_labeled=-1, seed=0)
    assert with_val["test"] == s["test"]  # the test cases do not depend on num_val
    assert set(with_val["val"]) < set(s["train"]) and len(with_val["train"]) == 3
    with pytest.raises(ConfigError, match="num_val=4"):
        data_lib.make_splits(names, num_test=2, num_val=4, num_labeled=-1, seed=0)


def test_method_names_and_task_free_arms():
    assert experiment.method_name("rpl", "random_warmup") == "random_warmup"
    assert experiment.method_name("rpl", "random_probe") == "random probe"
    assert set(experiment.TASK_FREE_ARMS) == {"scratch", "random_warmup", "random_probe"}
    with pytest.raises(ConfigError, match="random_warmup"):
        experiment._check_arms(("pretrained", "frozen"))
