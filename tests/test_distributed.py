"""Multi-process runs. `config.distributed` decides when `jax.distributed` is initialised (in
process, JAX's initialisation faked). Then two real processes on localhost (gloo CPU collectives),
each with one CPU device, pretrain through `launch/main.py` exactly as one process with two
devices does, resume from their checkpoint with each process's own data position, and leave one
writer's files.

The reference is one process with two devices: the same mesh size and per-device batch, so the
only difference is where the devices live (and that the all-reduce goes through gloo).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import common as config_common
from ssl3d_jax import parallel
from ssl3d_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Every launch of this module: a hang (a process waiting for a peer that died) fails the test.
TIMEOUT_S = 240
BASE = [
    "--config=configs/rpl.py:smoke",
    "--config.mode=pretrain",
    "--config.pretrain.checkpoint_every=2",
]
# Losses of the two runs: the same global batch, the same per-device programs; only the
# all-reduce of the gradients differs (gloo between processes vs in-process), and a sum of two
# float32 terms is the same in either order. Observed: bit-equal. The tolerance leaves room for a
# reduction order that differs on other machines (a few float32 ulps of the loss, ~1e-7).
RTOL = 1e-5


_CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
)


def _settings(**overrides):
    cfg = config_common.base_config("smoke").distributed
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture
def fake_initialize(monkeypatch):
    """No cluster in the environment; `jax.distributed.initialize` records its arguments."""
    for var in _CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    return calls


def test_auto_on_a_laptop_and_off_do_not_initialise(fake_initialize):
    assert parallel.initialize_distributed(_settings()) is False
    assert parallel.initialize_distributed(_settings(initialize="off")) is False
    assert fake_initialize == []


def test_auto_initialises_in_a_multi_process_slurm_job_only(fake_initialize, monkeypatch):
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "node[001-002]",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    # `srun -n 1`: nothing to coordinate.
    assert parallel.initialize_distributed(_settings()) is False
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert parallel.initialize_distributed(_settings()) is True
    # JAX reads the rest from SLURM's variables; only SLURM's detection is allowed.
    (call,) = fake_initialize
    assert call["cluster_detection_method"] == "slurm"
    assert call["coordinator_address"] is None and call["process_id"] is None


def test_auto_initialises_when_a_coordinator_is_named(fake_initialize, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert parallel.initialize_distributed(_settings()) is True
    settings = _settings(coordinator_address="h:1", num_processes=4, process_id=3)
    assert parallel.initialize_distributed(settings) is True
    first, second = fake_initialize
    assert first["cluster_detection_method"] is None  # JAX may still read a cluster's ids
    # Everything given: JAX must not probe clusters (e.g. Kubernetes' API) for anything.
    assert second == dict(
        coordinator_address="h:1",
        num_processes=4,
        process_id=3,
        cluster_detection_method="deactivate",
    )


def test_second_run_in_the_same_process_does_not_initialise_again(fake_initialize, monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert parallel.initialize_distributed(_settings(initialize="on")) is True
    assert fake_initialize == []


@pytest.mark.parametrize(
    "key,value", [("initialize", "yes"), ("initialize", "True"), ("cpu_collectives", "nccl")]
)
def test_bad_settings_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"config.distributed.{key}="):
        parallel.initialize_distributed(_settings(**{key: value}))


def test_initialising_after_the_devices_are_in_use_is_a_config_error(monkeypatch):
    for var in _CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert jax.device_count() == 8  # this test process has set up its (simulated) devices
    settings = _settings(
        initialize="on", coordinator_address="localhost:1", num_processes=2, process_id=0
    )
    with pytest.raises(ConfigError, match="before anything uses the devices"):
        parallel.initialize_distributed(settings)
    assert not jax.distributed.is_initialized()


def test_mesh_orders_devices_by_process_and_shares_split_the_batch(monkeypatch):
    mesh = parallel.make_mesh(list(reversed(jax.devices())))
    assert [d.id for d in mesh.devices] == sorted(d.id for d in jax.devices())
    assert parallel.process_share(8) == (8, 0, 1)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    assert parallel.process_share(8) == (2, 3, 4)  # rows 6 and 7 of every global batch
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        parallel.process_share(6)


def test_concurrent_cache_builders_split_the_work(tmp_path):
    """Builder 1 of 2 starts with cases 1, 3 (its share), then the others, and skips a case that
    another builder finished meanwhile: here case 0, completed while builder 1 worked on case 1
    (a builder on another disk would find it missing and build it too)."""
    from ssl3d_jax.data import cache

    names = [f"case{i}" for i in range(5)]
    folder = tmp_path / "key"
    order = []

    class Source:
        def __len__(self):
            return len(names)

        def __getitem__(self, i):
            order.append(i)
            if i == 1:  # meanwhile, builder 0 completes case 0
                (folder / "case0.json").write_text("{}")
            return {"image": np.zeros((2, 2, 2, 1), np.float32), "case_index": i}

    def prep(record):
        return dict(record, geometry={})

    cache.build_cache(Source(), prep, tmp_path, key="key", names=names, share=(1, 2))
    assert order == [1, 3, 2, 4]
    assert all((folder / f"{n}.json").exists() for n in names)


# --- two processes through launch/main.py ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: pathlib.Path, devices: int) -> dict:
    env = dict(os.environ, SSL3D_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # conftest's 8 simulated devices are for in-process tests
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _launch(runs: list[tuple[list[str], dict]], logdir: pathlib.Path, name: str) -> list[str]:
    """Start every `(args, env)` of `runs` at once, wait for all, return their outputs.

    Fails (and kills the others) when any exits non-zero or the launch outlives TIMEOUT_S.
    """
    procs, logs = [], []
    for i, (args, env) in enumerate(runs):
        log = open(logdir / f"{name}.{i}.log", "w+")
        logs.append(log)
        cmd = [sys.executable, str(ROOT / "launch" / "main.py"), *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for i, p in enumerate(procs):
        if p.returncode != 0:
            pytest.fail(
                f"{name}: process {i} exited with {p.returncode} (killed: timeout {TIMEOUT_S} s "
                f"or a failed peer)\n" + "\n".join(f"--- {i}:\n{o[-3000:]}" for o in outputs)
            )
    return outputs


def _two_processes(workdir, cache, logdir, name, extra):
    port = _free_port()
    common = [
        *BASE,
        f"--workdir={workdir}",
        "--config.distributed.initialize=on",
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.num_processes=2",
        *extra,
    ]
    runs = [
        ([*common, f"--config.distributed.process_id={i}"], _env(cache, devices=1))
        for i in range(2)
    ]
    return _launch(runs, logdir, name)


def _records(workdir: pathlib.Path, phase: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    cache = base / "cache"  # one phantom, preprocessed-array cache and compile cache for all
    multi, single = base / "two_processes", base / "one_process"
    t0 = time.perf_counter()
    # Both processes build the phantom and the preprocessed arrays concurrently (first run).
    first = _two_processes(multi, cache, base, "first", ["--config.pretrain.num_steps=2"])
    # The kNN probe ran at step 2 above; without it here, one compile less.
    resumed = _two_processes(
        multi,
        cache,
        base,
        "resumed",
        ["--config.pretrain.num_steps=4", "--config.pretrain.knn_every=0"],
    )
    t1 = time.perf_counter()
    reference = [
        *BASE,
        f"--workdir={single}",
        "--config.pretrain.num_steps=4",
        "--config.pretrain.knn_every=0",
    ]
    (single_out,) = _launch([(reference, _env(cache, devices=2))], base, "single")
    t2 = time.perf_counter()
    print(f"two processes: {t1 - t0:.1f} s (two launches); one process: {t2 - t1:.1f} s")
    return multi, single, first, resumed, single_out


@pytest.mark.slow
def test_processes_form_one_run_of_two_devices(runs):
    _, _, first, resumed, single_out = runs
    for outputs in (first, resumed):
        for i, out in enumerate(outputs):
            assert f"Process {i} of 2: 1 local device(s) of 2" in out
            assert "mesh {'data': 2}" in out
    assert "1 process(es), 2 device(s)" in single_out


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(runs):
    """Steps 1-2 (first launch) and 3-4 (resumed launch, each process restoring its own data
    position) give the losses of an uninterrupted single-process run on the same global batch:
    the processes' shares stack to the single-process batch, the gradients are all-reduced
    across processes, and neither process re-reads the other's batches after the restart."""
    multi, single, *_ = runs
    two = {r["step"]: r for r in _records(multi, "pretrain")}
    one = {r["step"]: r for r in _records(single, "pretrain")}
    assert sorted(one) == [1, 2, 3, 4] and sorted(two) == [1, 2, 3, 4]
    bit_equal = True
    for step in one:
        for key in ("loss", "accuracy", "grad_norm"):
            a, b = two[step][key], one[step][key]
            assert a == pytest.approx(b, rel=RTOL), (step, key, a, b)
            bit_equal &= a == b
    print(f"two processes vs one process, steps 1-4: bit-equal = {bit_equal}")
    # The comparison has teeth: the loss moves from step to step (new batches, new params).
    assert len({one[s]["loss"] for s in one}) == 4


@pytest.mark.slow
def test_each_process_checkpoints_its_own_data_position(runs):
    multi, *_ = runs
    data = multi / "checkpoints" / "2" / "data"
    # Positions in each process's own share of the batch stream (batches p, p + 2, ...): two
    # batches read by each. That they restore into the right process is what the resumed losses
    # of the test above show.
    states = [json.loads((data / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states == [{"next_index": 2}, {"next_index": 2}]
    for step in (2, 4):
        assert (multi / "checkpoints" / str(step) / "state").is_dir()


@pytest.mark.slow
def test_resumed_launch_restored_on_every_process(runs):
    _, _, _, resumed, _ = runs
    for out in resumed:
        assert "Resuming pretraining from step 2" in out


@pytest.mark.slow
def test_only_process_zero_writes_the_run_files(runs):
    """One metrics record per step and probe (process 1 computes the same values and writes
    none), one splits.json."""
    multi, *_ = runs
    steps = [r["step"] for r in _records(multi, "pretrain")]
    assert steps == [1, 2, 3, 4]
    knn = [r["step"] for r in _records(multi, "pretrain/knn")]
    assert knn == [2]  # the kNN probe runs on every process's own copy of the encoder
    splits = json.loads((multi / "splits.json").read_text())
    assert splits["train"] and not set(splits["train"]) & set(splits["test"])
