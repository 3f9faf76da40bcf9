"""Input-pipeline throughput against the train step's consumption, and the data-wait fraction.

What (issue 6, 1c), on the built-in phantom (BraTS layout, 4 channels, `phantom.DEFAULT_SHAPE`)
preprocessed as `configs/rpl.py:<size>` does it:

1. per-case cost, one process: decoding the NIfTI files (`datasets.VolumeSource[i]`), then
   preprocessing (`preprocess.Preprocess`), and reading a case back from the preprocessed disk
   cache (`cache.CachedArraysSource[i]`); also for a few BraTS-sized (240×240×155) cases, the
   size of the real data, where decoding gzip dominates;
2. grain throughput (cases/s) through `pipeline.make_train_dataset` with the config's batch size
   and threads, for 0 / 1 / 2 worker processes, from NIfTI (decode + preprocess every record,
   no cache) and from the disk cache (what training reads by default);
3. the train step's consumption (volumes/s) of the default RPL pretraining step and of the
   default segmentation finetuning step (the real jitted steps on random batches), so that each
   pipeline row can be read as "how many times faster than training eats";
4. `data_wait_fraction` from `<workdir>/metrics.jsonl` of the default pretraining run
   (`ssl3d_jax.run.run`, mode 'pretrain', the real `train_loop` with its device prefetch
   thread, `config.data.prefetch`), for each prefetch depth asked for (default 2, the config's,
   and 0, reading between steps): the share of wall time the device sat idle because the loop
   waited for its next batch (see `train_loop`). The RPL step is also run against the cached
   pipeline in this process (`overlap`): alone on a batch already on the device; reading each
   batch between dispatches (the loop before device prefetch), once asynchronously and once
   waiting for every step before the next read (the exposed wait); and with `DevicePrefetcher`;
5. memory flatness: the peak RSS (VmHWM) of a fresh process streaming the same number of
   batches from a cache of N cases and from one of 4N cases; the cache is memory-mapped and read
   one case at a time, so the peak should not grow with N (holding it all would add the
   dataset's bytes).

Why: issue 6 asks that the data wait stay below 5% of step time in the default configuration
and that memory stay flat as the dataset grows; the original's loaders left the GPU waiting.

Run (writes benchmarks/results/input_pipeline.{json,md}; everything lives in a temp folder):
    python benchmarks/input_pipeline.py                       # default size, ~10 min
    python benchmarks/input_pipeline.py --size=smoke --cases=6 --shape=32,36,28 --workers=0,1 \
        --steps=0 --brats-cases=0 --out=/tmp/ip                # seconds
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks.common import write_results  # noqa: E402

DEFAULT_OUT = os.path.join(_ROOT, "benchmarks", "results")
NAME = "input_pipeline"
BRATS_SHAPE = (240, 240, 155)
_STREAM_FLAG = "--stream-child"  # internal: the memory-flatness child process


def load_config(size: str, **overrides):
    config = importlib.import_module("configs.rpl").get_config(size)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        config[section][key] = value
    return config


def _rate(n: int, seconds: float) -> float:
    return round(n / max(seconds, 1e-9), 2)


def _ms(seconds: Sequence[float]) -> dict:
    return {
        "median_ms": round(1e3 * statistics.median(seconds), 2),
        "mean_ms": round(1e3 * statistics.fmean(seconds), 2),
        "min_ms": round(1e3 * min(seconds), 2),
        "max_ms": round(1e3 * max(seconds), 2),
        "n": len(seconds),
    }


def write_phantom(root: str, *, cases: int, shape: Sequence[int]):
    from ssl3d_jax.data import phantom

    t0 = time.perf_counter()
    phantom.write_brats_phantom(root, num_cases=cases, shape=tuple(shape))
    return time.perf_counter() - t0


def per_case_costs(config, root: str, cache_dir: str) -> tuple[dict, object, list]:
    """Decode / preprocess / cache-read time per case in this process (one core's work).

    Returns (row, dataset, names); builds the disk cache under `cache_dir` as training would.
    """
    from ssl3d_jax.data import cache, datasets
    from ssl3d_jax.train import common

    dataset = datasets.open_dataset(root)
    source = datasets.VolumeSource(dataset, with_label=True)
    prep = common.make_preprocess(config, dataset)
    decode, process = [], []
    raw_shape = out_shape = None
    for i in range(len(source)):
        t0 = time.perf_counter()
        record = source[i]
        t1 = time.perf_counter()
        out = prep.map(record)
        t2 = time.perf_counter()
        decode.append(t1 - t0)
        process.append(t2 - t1)
        raw_shape, out_shape = record["image"].shape, out["image"].shape
    t0 = time.perf_counter()
    folder_source = common.preprocessed_source(
        config, dataset, dataset.cases, with_label=True, progress=False
    )
    build_s = time.perf_counter() - t0
    assert isinstance(folder_source, cache.CachedArraysSource), type(folder_source)
    read = []
    for i in range(len(folder_source)):
        t0 = time.perf_counter()
        folder_source[i]
        read.append(time.perf_counter() - t0)
    total = [a + b for a, b in zip(decode, process)]
    row = {
        "cases": len(source),
        "raw_image": [*map(int, raw_shape), "float32"],
        "preprocessed_image": [*map(int, out_shape), "float32"],
        "decode": _ms(decode),
        "preprocess": _ms(process),
        "nifti_cases_per_s": _rate(len(total), sum(total)),
        "cache_build_s": round(build_s, 2),
        "cache_read": _ms(read),
        "cache_cases_per_s": _rate(len(read), sum(read)),
    }
    return row, dataset, folder_source


def brats_costs(config, root: str, *, cases: int) -> dict:
    """Decode and preprocess time of BraTS-sized cases (240×240×155, 4 channels + seg)."""
    from ssl3d_jax.data import datasets
    from ssl3d_jax.train import common

    write_s = write_phantom(root, cases=cases, shape=BRATS_SHAPE)
    dataset = datasets.open_dataset(root)
    source = datasets.VolumeSource(dataset, with_label=True)
    prep = common.make_preprocess(config, dataset)
    decode, process = [], []
    for i in range(len(source)):
        t0 = time.perf_counter()
        record = source[i]
        t1 = time.perf_counter()
        prep.map(record)
        process.append(time.perf_counter() - t1)
        decode.append(t1 - t0)
    nbytes = sum(os.path.getsize(p) for c in dataset.cases for p in (*c.images, c.label))
    total = [a + b for a, b in zip(decode, process)]
    return {
        "cases": cases,
        "shape": [*BRATS_SHAPE, 4],
        "gzip_mb_per_case": round(nbytes / cases / 2**20, 1),
        "write_s": round(write_s, 1),
        "decode": _ms(decode),
        "preprocess": _ms(process),
        "nifti_cases_per_s": _rate(len(total), sum(total)),
    }


def grain_throughput(
    source, transform, *, batch_size: int, workers: int, threads: int, batches: int, seed: int
) -> dict:
    """Cases/s of `make_train_dataset` after its first batch (start-up reported apart)."""
    from ssl3d_jax.data import pipeline

    ds = pipeline.make_train_dataset(
        source,
        transform,
        batch_size=batch_size,
        seed=seed,
        num_workers=workers,
        num_threads=threads,
    )
    it = iter(ds)
    try:
        t0 = time.perf_counter()
        first = next(it)
        t1 = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        t2 = time.perf_counter()
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    if batch["image"].shape != first["image"].shape or batch["image"].shape[0] != batch_size:
        raise AssertionError(f"unexpected batch shape {batch['image'].shape}")
    return {
        "workers": workers,
        "threads": threads,
        "batch": batch_size,
        "batches_timed": batches,
        "first_batch_s": round(t1 - t0, 3),
        "cases_per_s": _rate(batches * batch_size, t2 - t1),
    }


def overlap(fn, state, source, *, batch: int, threads: int, steps: int, mesh) -> dict:
    """Where the loop's time goes when the RPL step reads from `source` through grain.

    With JAX's asynchronous dispatch a `next(batches)` between steps runs while the previous
    step still computes, so the time in `next` + put is partly overlapped, not waited. Measured
    four ways, `steps` steps each, in this process:
      alone: the step on one batch already on the device (no pipeline at all);
      async: read each batch in the loop between dispatches (`train_loop(prefetch=0)`);
      blocking: wait for each step before fetching the next batch, so `next` + put is the
        exposed wait (what the step would be slowed by if nothing overlapped);
      prefetch: `pipeline.DevicePrefetcher` (depth 2) reads and puts in a thread, as
        `train_loop` does by default; `idle_fraction` is its measure of the device's wait.
    """
    import jax

    from ssl3d_jax.data import pipeline
    from ssl3d_jax.train import common

    put = common.batch_putter(mesh, ("image",))
    res = {"steps": steps}
    for mode in ("async", "blocking"):
        it = iter(
            pipeline.make_train_dataset(source, None, batch_size=batch, seed=0, num_threads=threads)
        )
        try:
            device_batch = put(next(it))
            state, m = fn(state, device_batch)
            jax.block_until_ready(m)
            t_next = t_put = 0.0
            t0 = time.perf_counter()
            for _ in range(steps):
                a = time.perf_counter()
                host = next(it)
                c = time.perf_counter()
                device_batch = put(host)
                t_next += c - a
                t_put += time.perf_counter() - c
                state, m = fn(state, device_batch)
                if mode == "blocking":
                    jax.block_until_ready(m)
            jax.block_until_ready(m)
            wall = time.perf_counter() - t0
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        res[mode] = {
            "ms_per_step": round(1e3 * wall / steps, 2),
            "next_ms": round(1e3 * t_next / steps, 2),
            "put_ms": round(1e3 * t_put / steps, 2),
            "loop_data_wait_fraction": round((t_next + t_put) / wall, 4),
        }
    it = iter(
        pipeline.make_train_dataset(source, None, batch_size=batch, seed=0, num_threads=threads)
    )
    feed = pipeline.DevicePrefetcher(it, put, depth=2)
    try:
        state, m = fn(state, next(feed).batch)
        jax.block_until_ready(m)
        t_idle = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            item, idle = feed.get(lambda: not all(x.is_ready() for x in jax.tree.leaves(m)))
            t_idle += idle
            state, m = fn(state, item.batch)
        jax.block_until_ready(m)
        wall = time.perf_counter() - t0
    finally:
        feed.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()
    res["prefetch"] = {
        "ms_per_step": round(1e3 * wall / steps, 2),
        "idle_fraction": round(t_idle / wall, 4),
    }
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = fn(state, device_batch)
    jax.block_until_ready(m)
    res["alone_ms_per_step"] = round(1e3 * (time.perf_counter() - t0) / steps, 2)
    res["slowdown_vs_alone"] = round(res["async"]["ms_per_step"] / res["alone_ms_per_step"], 3)
    return res


def step_rates(
    config,
    in_channels: int,
    num_classes: int,
    *,
    repeats: int,
    overlap_source=None,
    overlap_steps: int = 0,
) -> dict:
    """Volumes/s of the real jitted default steps: RPL pretraining and segmentation finetuning.

    With `overlap_source` (a cached source without labels), also `overlap(...)` for RPL.
    """

    import jax
    import optax

    from ssl3d_jax import parallel, tasks
    from ssl3d_jax.train import finetune
    from ssl3d_jax.train import step as step_lib

    mesh = parallel.make_mesh()
    s, rng = int(config.data.size), np.random.default_rng(0)
    out = {}

    def timed(name, graphdef, params, loss_fn, lr, batch):
        tx = optax.adam(lr)
        state = step_lib.create_train_state(tx, params, jax.random.key(1), mesh)
        fn = step_lib.jit_train_step(step_lib.make_train_step(graphdef, loss_fn, tx), mesh)
        put = {k: jax.device_put(v) for k, v in batch.items()}
        t0 = time.perf_counter()
        state, m = fn(state, put)
        jax.block_until_ready(m)
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, m = fn(state, put)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        b = int(batch["image"].shape[0])
        med = statistics.median(times)
        out[name] = {
            "batch": b,
            "input": [*map(int, batch["image"].shape), "float32"],
            "first_step_s": round(first, 2),
            **_ms(times),
            "volumes_per_s": _rate(b, med),
        }
        return fn, state

    task = tasks.get_task(config, in_channels=in_channels)
    graphdef, params = step_lib.init_params(task.build_model, jax.random.key(0), mesh)
    b = int(config.pretrain.batch_size)
    image = rng.standard_normal((b, s, s, s, in_channels), dtype=np.float32)
    fn, state = timed(
        "pretrain_rpl",
        graphdef,
        params,
        lambda model, batch, key: task.loss(model, batch["image"], key),
        config.pretrain.learning_rate,
        {"image": image},
    )
    if overlap_source is not None and overlap_steps > 0:
        out["pretrain_rpl"]["overlap"] = overlap(
            fn,
            state,
            overlap_source,
            batch=b,
            threads=int(config.data.num_threads),
            steps=overlap_steps,
            mesh=mesh,
        )
    build = finetune.build_model(config, in_channels=in_channels, num_classes=num_classes)
    graphdef, params = step_lib.init_params(build, jax.random.key(0), mesh)
    b = int(config.finetune.batch_size)
    cfg = config.finetune
    loss_fn = finetune.make_loss(config, num_classes)
    batch = {
        "image": rng.standard_normal((b, s, s, s, in_channels), dtype=np.float32),
        "label": rng.integers(0, num_classes, (b, s, s, s), dtype=np.int32),
    }
    timed("finetune_segmentation", graphdef, params, loss_fn, cfg.learning_rate, batch)
    return out


def data_wait(
    config_size: str, root: str, cache_dir: str, workdir: str, *, steps: int, prefetch: int
) -> dict:
    """Runs the default pretraining (`mode='pretrain'`) for `steps` steps with device prefetch
    depth `prefetch` and reads `data_wait_fraction` / `steps_per_sec` of every logged window
    from metrics.jsonl. Logged every `config.pretrain.log_every` steps (fewer for short runs);
    checkpoints as configured (they carry the data position); no kNN probe (it runs outside
    the timed windows but costs minutes of wall time; the input pipeline is the same)."""
    from ssl3d_jax import run as run_lib

    log_every = min(int(load_config(config_size).pretrain.log_every), max(1, steps // 6))
    config = load_config(
        config_size,
        **{
            "data.root": root,
            "data.cache_dir": cache_dir,
            "data.prefetch": prefetch,
            "pretrain.num_steps": steps,
            "pretrain.log_every": log_every,
            "pretrain.knn_every": 0,
        },
    )
    config.mode = "pretrain"
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    run_lib.run(config, workdir)
    wall = time.perf_counter() - t0
    records = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("phase") == "pretrain" and "data_wait_fraction" in r:
                records.append(
                    {
                        "step": int(r["step"]),
                        "data_wait_fraction": round(float(r["data_wait_fraction"]), 4),
                        "steps_per_sec": round(float(r["steps_per_sec"]), 3),
                    }
                )
    # The first window also holds the compilation of the step, which dilutes its fraction.
    steady = records[1:] or records
    return {
        "prefetch": prefetch,
        "steps": steps,
        "log_every": log_every,
        "checkpoint_every": int(config.pretrain.checkpoint_every),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "num_workers": int(config.data.num_workers),
        "num_threads": int(config.data.num_threads),
        "batch": int(config.pretrain.batch_size),
        "wall_s": round(wall, 1),
        "windows": records,
        "steady_data_wait_fraction": round(
            sum(r["data_wait_fraction"] for r in steady) / len(steady), 4
        ),
        "steady_steps_per_sec": round(statistics.fmean(r["steps_per_sec"] for r in steady), 3),
    }


def _copy_cache(src: str, dst: str, names: list[str], copies: int) -> list[str]:
    """A cache folder of `copies` × len(names) distinct files (copies of the real cases)."""
    os.makedirs(dst, exist_ok=True)
    out = []
    for k in range(copies):
        for n in names:
            new = f"{n}_x{k}"
            for suffix in (".json", ".image.npy", ".label.npy"):
                if os.path.exists(os.path.join(src, n + suffix)):
                    shutil.copyfile(os.path.join(src, n + suffix), os.path.join(dst, new + suffix))
            out.append(new)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MiB.

    Not `getrusage().ru_maxrss`: Linux carries the parent's high-water mark across fork + exec,
    so a fresh child would report at least the (much larger) benchmark process's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes there, KiB here


def _stream_child(folder: str, names_file: str, batch: int, threads: int, batches: int) -> None:
    """Child process: stream `batches` batches of the cache; prints JSON with its peak RSS."""
    from ssl3d_jax.data import cache, pipeline

    with open(names_file) as f:
        names = json.load(f)
    source = cache.CachedArraysSource(folder, names, with_label=True)
    base = peak_rss_mb()
    ds = pipeline.make_train_dataset(source, None, batch_size=batch, seed=0, num_threads=threads)
    it = iter(ds)
    n = batches
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    dt = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "cases": len(names),
                "batches": n,
                "maxrss_before_mb": round(base, 1),
                "maxrss_mb": round(peak, 1),
                "cases_per_s": _rate(n * batch, dt),
            }
        )
    )


def memory_flatness(source, tmp: str, *, batch: int, threads: int, factor: int = 4) -> dict:
    """Peak RSS of a fresh process streaming a cache of N cases vs one of `factor`·N cases.

    Both stream the same number of batches (one epoch of the larger cache, `factor` epochs of
    the smaller), as training runs a fixed number of steps: only the dataset size differs.
    """
    names = list(source.names)
    case_mb = (
        sum(
            os.path.getsize(os.path.join(source.directory, f"{n}{s}"))
            for n in names
            for s in (".image.npy", ".label.npy")
        )
        / len(names)
        / 2**20
    )
    rows = []
    batches = -(-factor * len(names) // batch)
    for copies in (1, factor):
        folder = os.path.join(tmp, f"cache_x{copies}")
        these = _copy_cache(str(source.directory), folder, names, copies)
        names_file = os.path.join(tmp, f"names_x{copies}.json")
        with open(names_file, "w") as f:
            json.dump(these, f)
        cmd = [sys.executable, os.path.abspath(__file__), _STREAM_FLAG, folder, names_file]
        cmd += [str(batch), str(threads), str(batches)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    small, big = rows
    return {
        "case_mb": round(case_mb, 2),
        "rows": rows,
        "growth_mb": round(big["maxrss_mb"] - small["maxrss_mb"], 1),
        "if_held_in_memory_mb": round((big["cases"] - small["cases"]) * case_mb, 1),
    }


def machine() -> dict:
    from benchmarks.pretext_batches import machine as base

    return base()


def render(result: dict) -> str:
    m = result["machine"]
    lines = [
        "### Input pipeline: throughput, consumption by the train step, data wait, memory",
        "",
        f"Command: `{result['command']}`; {result['date']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; device {m['device']}; "
        f"jax {m['jax']}, numpy {m['numpy']}; load average at start "
        f"{', '.join(map(str, m['load_average_at_start']))}. Config `configs/rpl.py:"
        f"{result['size']}`; phantom {result['cases']} cases of "
        f"{'×'.join(map(str, result['shape']))}×4 (NIfTI, gzip int16).",
        "",
    ]
    pc = result["per_case"]
    lines += [
        "Per case, one process (decode: NIfTI → float32 "
        f"{'×'.join(map(str, pc['raw_image'][:-1]))}; preprocess → "
        f"{'×'.join(map(str, pc['preprocessed_image'][:-1]))}):",
        "",
        "| data | decode ms | preprocess ms | NIfTI cases/s | cache read ms | cache cases/s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| phantom {'×'.join(map(str, result['shape']))} | {pc['decode']['median_ms']} | "
        f"{pc['preprocess']['median_ms']} | {pc['nifti_cases_per_s']} | "
        f"{pc['cache_read']['median_ms']} | {pc['cache_cases_per_s']} |",
    ]
    if result.get("brats"):
        b = result["brats"]
        lines.append(
            f"| BraTS-sized 240×240×155 ({b['cases']} cases, {b['gzip_mb_per_case']} MB gzip) | "
            f"{b['decode']['median_ms']} | {b['preprocess']['median_ms']} | "
            f"{b['nifti_cases_per_s']} | – | – |"
        )
    lines += ["", "Medians over the cases. The cache holds the preprocessed arrays.", ""]
    steps = result.get("steps_consumption") or {}
    lines += [
        f"grain (`make_train_dataset`, batch {result['batch']}, "
        f"{result['threads']} reader threads) against the train step's consumption:",
        "",
        "| source | workers | first batch s | cases/s | "
        + " | ".join(f"× {k} step ({v['volumes_per_s']} vol/s)" for k, v in steps.items())
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(steps),
    ]
    for r in result["grain"]:
        ratios = " | ".join(
            f"{r['cases_per_s'] / max(v['volumes_per_s'], 1e-9):.1f}" for v in steps.values()
        )
        lines.append(
            f"| {r['source']} | {r['workers']} | {r['first_batch_s']} | {r['cases_per_s']} | "
            f"{ratios} |"
        )
    lines.append("")
    if steps:
        lines += [
            "Train steps (the real jitted steps of the config, random inputs, median of "
            f"{next(iter(steps.values()))['n']} after compile):",
            "",
            "| step | input | ms/step | volumes/s | first step s |",
            "|---|---|---:|---:|---:|",
        ]
        for k, v in steps.items():
            lines.append(
                f"| {k} | {'×'.join(map(str, v['input'][:-1]))} | {v['median_ms']} | "
                f"{v['volumes_per_s']} | {v['first_step_s']} |"
            )
        lines.append("")
    ov = (steps.get("pretrain_rpl") or {}).get("overlap")
    if ov:
        a, b = ov["async"], ov["blocking"]
        lines += [
            f"Where the RPL step's time goes with the cached pipeline ({ov['steps']} steps "
            "each, this process): the step alone on a batch already on the device "
            f"{ov['alone_ms_per_step']} ms; reading each batch in the loop between "
            f"asynchronous dispatches (`prefetch=0`) {a['ms_per_step']} ms/step, of which "
            f"`next` {a['next_ms']} ms + put {a['put_ms']} ms (time in the read "
            f"{100 * a['loop_data_wait_fraction']:.1f}%, but it runs while the previous step "
            "computes); blocking on every step before fetching the next batch "
            f"{b['ms_per_step']} ms/step, exposed wait `next` {b['next_ms']} ms + put "
            f"{b['put_ms']} ms = {100 * b['loop_data_wait_fraction']:.1f}%. Slow-down of the "
            f"step by the pipeline (async / alone): {ov['slowdown_vs_alone']}×.",
            "",
        ]
        pf = ov.get("prefetch")
        if pf:
            lines += [
                f"With `DevicePrefetcher` (depth 2, as `train_loop`): {pf['ms_per_step']} "
                f"ms/step ({pf['ms_per_step'] / ov['alone_ms_per_step']:.3f}× alone), device "
                f"idle waiting for data {100 * pf['idle_fraction']:.2f}% of the time.",
                "",
            ]
    for dw in result.get("data_wait") or []:
        windows = ", ".join(f"{w['data_wait_fraction']:.3f}" for w in dw["windows"])
        default = " (the config's default)" if dw.get("default") else ""
        lines += [
            f"Data wait, `configs/rpl.py:{result['size']}` pretraining with "
            f"`config.data.prefetch={dw['prefetch']}`{default} "
            f"(`run(mode='pretrain')`, the real `train_loop`: {dw['steps']} steps, "
            f"batch {dw['batch']}, workers {dw['num_workers']}, threads {dw['num_threads']}, "
            f"logged every {dw['log_every']} steps, checkpoints every "
            f"{dw['checkpoint_every']}, no kNN probe; load average before "
            f"{', '.join(map(str, dw['load_average_before']))}, after "
            f"{', '.join(map(str, dw['load_average_after']))}): logged `data_wait_fraction` "
            f"**{100 * dw['steady_data_wait_fraction']:.2f}%** of wall time after the first "
            f"window (which includes compilation), at {dw['steady_steps_per_sec']} steps/s; "
            f"per window: {windows}. It counts the time the loop waited for a batch after the "
            "previously dispatched step had finished (the device idle), not the time blocked "
            "while dispatched steps still ran.",
            "",
        ]
    mem = result.get("memory")
    if mem:
        s, b = mem["rows"]
        lines += [
            f"Memory: peak RSS of a fresh process streaming {s['batches']} batches from the "
            "cache: "
            f"{s['cases']} cases {s['maxrss_mb']} MB, {b['cases']} cases {b['maxrss_mb']} MB "
            f"(growth {mem['growth_mb']} MB; holding the extra cases in memory would add "
            f"{mem['if_held_in_memory_mb']} MB, {mem['case_mb']} MB per case).",
            "",
        ]
    if result.get("note"):
        lines += [result["note"], ""]
    return "\n".join(lines)


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="default", choices=("default", "smoke", "paper"))
    p.add_argument("--cases", type=int, default=None, help="phantom cases (default: config's)")
    p.add_argument("--shape", default=None, help="phantom shape, e.g. 80,96,72 (default)")
    p.add_argument("--workers", default="0,1,2", help="grain worker processes to compare")
    p.add_argument("--batches", type=int, default=8, help="batches timed per grain row")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps (0: skip)")
    p.add_argument(
        "--prefetch", default="2,0", help="device prefetch depths of the pretraining runs"
    )
    p.add_argument("--step-repeats", type=int, default=3, help="timed train steps (0: skip)")
    p.add_argument("--overlap-steps", type=int, default=20, help="RPL steps per overlap mode")
    p.add_argument("--brats-cases", type=int, default=2, help="240×240×155 cases (0: skip)")
    p.add_argument("--memory-factor", type=int, default=4, help="N vs factor·N (0: skip)")
    p.add_argument("--note", default="", help="free text added to the markdown")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder for {NAME}.{{json,md}}")
    args = p.parse_args(argv)

    from absl import flags

    # grain's worker processes read absl flags; a plain script never parses them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    from ssl3d_jax.data import phantom

    config = load_config(args.size)
    cases = int(args.cases or config.data.phantom.num_cases)
    shape = tuple(_ints(args.shape)) if args.shape else tuple(phantom.DEFAULT_SHAPE)
    workers = _ints(args.workers)
    batch, threads = int(config.pretrain.batch_size), int(config.data.num_threads)
    result = {
        "command": shlex.join(["python", "benchmarks/input_pipeline.py", *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "size": args.size,
        "cases": cases,
        "shape": list(shape),
        "batch": batch,
        "threads": threads,
        "note": args.note,
    }
    tmp = tempfile.mkdtemp(prefix="ssl3d_input_pipeline-")
    try:
        root, cache_dir = os.path.join(tmp, "phantom"), os.path.join(tmp, "cache")
        result["phantom_write_s"] = round(write_phantom(root, cases=cases, shape=shape), 2)
        config.data.cache_dir = cache_dir
        result["per_case"], dataset, cached = per_case_costs(config, root, cache_dir)
        print(f"per case: {json.dumps(result['per_case'])}", flush=True)
        if args.brats_cases > 0:
            result["brats"] = brats_costs(
                config, os.path.join(tmp, "brats"), cases=args.brats_cases
            )
            print(f"BraTS-sized: {json.dumps(result['brats'])}", flush=True)

        from ssl3d_jax.data import cache, datasets
        from ssl3d_jax.train import common

        volumes = datasets.VolumeSource(dataset, with_label=True)
        pipelines = {
            "nifti": (volumes, common.make_preprocess(config, dataset)),
            "cache": (cached, None),
        }
        result["grain"] = []
        for name, (source, transform) in pipelines.items():
            for w in workers:
                row = grain_throughput(
                    source,
                    transform,
                    batch_size=batch,
                    workers=w,
                    threads=threads,
                    batches=args.batches,
                    seed=config.seed,
                )
                row = {"source": name, **row}
                result["grain"].append(row)
                print(f"grain: {json.dumps(row)}", flush=True)

        if args.step_repeats > 0:
            result["steps_consumption"] = step_rates(
                config,
                dataset.in_channels,
                dataset.num_classes,
                repeats=args.step_repeats,
                overlap_source=cache.CachedArraysSource(
                    cached.directory, cached.names, with_label=False
                ),
                overlap_steps=args.overlap_steps,
            )
            print(f"steps: {json.dumps(result['steps_consumption'])}", flush=True)
        if args.steps > 0:
            result["data_wait"] = []
            for depth in _ints(args.prefetch):
                row = data_wait(
                    args.size,
                    root,
                    cache_dir,
                    os.path.join(tmp, f"workdir_prefetch{depth}"),
                    steps=args.steps,
                    prefetch=depth,
                )
                row["default"] = depth == int(config.data.prefetch)
                result["data_wait"].append(row)
                print(f"data wait: {json.dumps(row)}", flush=True)
        if args.memory_factor > 1:
            result["memory"] = memory_flatness(
                cached, tmp, batch=batch, threads=threads, factor=args.memory_factor
            )
            print(f"memory: {json.dumps(result['memory'])}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    write_results(args.out, NAME, result, render(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _STREAM_FLAG:
        _stream_child(*sys.argv[2:4], *map(int, sys.argv[4:7]))
    else:
        main()
