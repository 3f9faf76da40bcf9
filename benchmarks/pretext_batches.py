"""Pretext batch generation: our jitted on-device functions against original-style NumPy.

What: for each pretext task, the time to turn a batch of volumes `[B, D, D, D, C]` float32 into
the task's inputs and targets, (a) by our pure batch function under `jax.jit` on the default JAX
device, and (b) by the NumPy per-volume implementation in the style of the original
(`benchmarks/numpy_reference.py`: Python loop over the batch, `np.random`, `scipy.ndimage` for
Exemplar's rotations and zoom). Both produce the same arrays (shapes, dtypes, label meaning;
checked on every run) from the same batch size and task parameters, read from
`configs/<task>.py:<size>`:

  task      ours                                   NumPy reference
  rpl       tasks.rpl.make_batch                   numpy_reference.rpl_batch
  rotation  tasks.rotation.make_batch              numpy_reference.rotation_batch
  jigsaw    tasks.jigsaw.make_batch                numpy_reference.jigsaw_batch
  cpc       tasks.cpc.make_batch                   numpy_reference.cpc_batch
  exemplar  tasks.exemplar.make_triplets           numpy_reference.exemplar_triplets

Why: issue 6 (1a). The original left the GPU waiting on single-threaded NumPy pretext sampling
(spec section 1.2, 8 #12); ours runs inside the jitted train step. This measures by how much.

What is timed: ours, one call of the jitted function on a batch already on the device, until its
outputs are ready (`block_until_ready`), with a fresh key per call; the host-to-device copy of the
volumes is not included (both pipelines need one: ours copies the raw volumes, the original
copied the generated arrays, which for RPL / jigsaw / CPC are smaller, for Exemplar 3x larger).
The reference: one call on the host NumPy batch. Each is warmed up first (ours: compile, then one
more call), then run `--repeats` times; rows give the median (and mean / min / max in the JSON).
The Exemplar reference's cost varies from call to call with its random branches (an arbitrary
rotation costs seconds at 128³, a 90° turn almost nothing), so its mean is the better estimate
of throughput; compare it with the median in the JSON.

Reading the CPU numbers: apart from Exemplar (scipy splines) every task is pure data movement,
bound by memory traffic on both sides. On the 2-core dev machine a jitted `a * 2` on 256 MiB took
~115 ms and 65,536 minor page faults per call (XLA:CPU hands out a freshly mapped output buffer
every call and faults in every 4 KiB page; transparent huge pages are `madvise`-only there),
against 24 ms for `np.copyto` into a warm buffer. NumPy's fresh `np.stack` outputs pay the same.

Run (writes benchmarks/results/pretext_batches.{json,md}):
    python benchmarks/pretext_batches.py                               # paper and default sizes
    python benchmarks/pretext_batches.py --tasks=rpl,cpc --sizes=paper --repeats=3
    python benchmarks/pretext_batches.py --sizes=smoke --batch=2 --repeats=1 --out=/tmp/pb
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import scipy

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from benchmarks import numpy_reference as ref  # noqa: E402
from benchmarks.common import cpu_name, write_results  # noqa: E402
from ssl3d_jax.tasks import cpc, exemplar, jigsaw, rotation, rpl  # noqa: E402

# The tasks with a NumPy reference of the original's sampling (benchmarks/numpy_reference.py);
# a task added later has none, so this list is the benchmark's own, not the registry's.
TASKS = ("rpl", "rotation", "jigsaw", "cpc", "exemplar")
SIZES = ("paper", "default", "smoke")
DEFAULT_OUT = os.path.join(_ROOT, "benchmarks", "results")
NAME = "pretext_batches"


def load_config(task: str, size: str):
    return importlib.import_module(f"configs.{task}").get_config(size)


@functools.cache
def build(task: str, size: str) -> tuple[Callable, Callable, int, int]:
    """`(ours, reference, batch_size, size)` for `task` with the parameters of its `size` config.

    `ours(volumes, key)` is jitted; `reference(volumes)` draws from `np.random`. Both return the
    same tuple of arrays (CPC: one array). Cached, so that every caller shares one jit cache.
    Grid tasks use the original's grid over the whole volume (`grid_fraction` 1, the default of
    the sampling functions), with the config's jitter: the NumPy reference knows no other grid,
    and the two must do the same work.
    """
    config = load_config(task, size)
    if int(config.data.spatial_dims) != 3:
        raise ValueError(f"{task}:{size}: the benchmark covers 3D volumes only")
    if task == "rpl":
        kw = dict(patches_per_side=int(config.rpl.patches_per_side), jitter=int(config.rpl.jitter))
        ours = functools.partial(rpl.make_batch, training=True, **kw)
        reference = functools.partial(ref.rpl_batch, training=True, **kw)
    elif task == "rotation":
        ours, reference = rotation.make_batch, ref.rotation_batch
    elif task == "jigsaw":
        c = config.jigsaw
        p = int(c.patches_per_side)
        perms = jigsaw.permutation_set(int(c.num_permutations), p**3, int(c.permutation_seed))
        kw = dict(patches_per_side=p, jitter=int(c.jitter), permutations=perms)
        ours = functools.partial(jigsaw.make_batch, training=True, **kw)
        reference = functools.partial(ref.jigsaw_batch, training=True, **kw)
    elif task == "cpc":
        c = config.cpc
        kw = dict(
            patches_per_side=int(c.patches_per_side),
            jitter=int(c.jitter),
            volume_crop=float(c.volume_crop),
            patch_crop=float(c.patch_crop),
            flip=bool(c.flip_patches),
        )
        ours = functools.partial(cpc.make_batch, training=True, **kw)
        reference = functools.partial(ref.cpc_batch, training=True, **kw)
    elif task == "exemplar":
        c = config.exemplar
        aug = {k: float(c[k]) for k in exemplar.AUGMENT_KEYS}
        positive = bool(c.augment_positive)
        ours = functools.partial(
            exemplar.make_triplets, augment_positive=positive, augment_kwargs=aug
        )
        # The original's arbitrary angles in [0, 360) (ours: small ones); same cost per rotation.
        ref_aug = {**aug, "max_degrees": None}
        reference = functools.partial(ref.exemplar_triplets, augment_positive=positive, **ref_aug)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return jax.jit(ours), reference, int(config.pretrain.batch_size), int(config.data.size)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def signature(out) -> list[list]:
    """`[[shape..., dtype], ...]` of a batch function's outputs (JSON-able)."""
    return [[*map(int, a.shape), str(np.dtype(a.dtype))] for a in _as_tuple(out)]


def _stats(seconds: Sequence[float], batch: int) -> dict:
    median = statistics.median(seconds)
    # Kept to the ns: a smoke-size batch takes tens of µs, where µs rounding is a 1% error.
    return {
        "median_ms": round(1e3 * median, 6),
        "mean_ms": round(1e3 * statistics.fmean(seconds), 6),
        "min_ms": round(1e3 * min(seconds), 6),
        "max_ms": round(1e3 * max(seconds), 6),
        "volumes_per_s": round(batch / median, 2),
        "repeats": len(seconds),
    }


def _timed(call: Callable[[int], object], repeats: int, first: int = 0) -> list[float]:
    times = []
    for i in range(first, first + repeats):
        t0 = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t0)
    return times


def measure(
    task: str, size: str, *, repeats: int, channels: int, batch: int | None, seed: int
) -> dict:
    """One row: times ours and the reference on one random `[B, D, D, D, channels]` batch."""
    ours, reference, config_batch, edge = build(task, size)
    b = int(batch or config_batch)
    shape = (b, edge, edge, edge, channels)
    volumes = np.random.default_rng(seed).random(shape, dtype=np.float32)
    on_device = jax.device_put(volumes)
    # Sliced up front: indexing a key array is a dispatch of its own, inside the timed region.
    keys = list(jax.random.split(jax.random.key(seed), repeats + 2))

    def run_ours(i: int):
        return jax.block_until_ready(ours(on_device, keys[i]))

    t0 = time.perf_counter()
    out = run_ours(0)  # compiles
    first_call_s = time.perf_counter() - t0
    run_ours(1)
    ours_s = _timed(run_ours, repeats, first=2)

    np.random.seed(seed)  # the reference draws from the global state, as the original did
    ref_out = reference(volumes)
    if signature(ref_out) != signature(out):
        raise AssertionError(
            f"{task}:{size}: the NumPy reference returns {signature(ref_out)}, ours "
            f"{signature(out)}"
        )
    del ref_out
    ref_s = _timed(lambda i: reference(volumes), repeats)

    row = {
        "task": task,
        "size": size,
        "batch": b,
        "input": [*shape, "float32"],
        "outputs": signature(out),
        "ours": {**_stats(ours_s, b), "first_call_s": round(first_call_s, 3)},
        "numpy": _stats(ref_s, b),
    }
    row["speedup"] = round(row["numpy"]["median_ms"] / row["ours"]["median_ms"], 2)
    return row


def machine() -> dict:
    import jaxlib

    device = jax.devices()[0]
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "device": device.device_kind
        if device.platform in device.device_kind.lower()
        else f"{device.platform}: {device.device_kind}",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _shape(sig: list) -> str:
    return "×".join(str(d) for d in sig[:-1]) or "scalar"


def _ms(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def render(result: dict) -> str:
    """The markdown fragment: heading, provenance, table, notes."""
    m = result["machine"]
    lines = [
        "### Pretext batch generation: ours (jit, on device) vs original-style NumPy",
        "",
        f"Command: `{result['command']}`; {result['date']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; device {m['device']}; "
        f"jax {m['jax']}, numpy {m['numpy']}, scipy {m['scipy']}; load average at start "
        f"{', '.join(map(str, m['load_average_at_start']))}.",
        "",
        "| task | size | batch (input) | outputs | ours ms/batch | ours volumes/s | "
        "ours first call s | NumPy ms/batch | NumPy min–max ms | NumPy volumes/s | speed-up |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        outputs = ", ".join(_shape(s) for s in r["outputs"])
        ours, numpy = r["ours"], r["numpy"]
        lines.append(
            f"| {r['task']} | {r['size']} | {r['batch']} × {_shape(r['input'][1:])} | "
            f"{outputs} | {_ms(ours['median_ms'])} | {ours['volumes_per_s']:.1f} | "
            f"{ours['first_call_s']:.1f} | {_ms(numpy['median_ms'])} | "
            f"{_ms(numpy['min_ms'])}–{_ms(numpy['max_ms'])} | "
            f"{numpy['volumes_per_s']:.1f} | {r['speedup']:.1f}× |"
        )
    lines += [
        "",
        f"Median of {result['repeats']} calls after warm-up; speed-up = NumPy / ours. Ours: the "
        "task's jitted batch function on a batch already on the device, until its outputs are "
        "ready (XLA uses every core it is given); 'first call' = compile + first run. NumPy: "
        "the original's style (`benchmarks/numpy_reference.py`), one Python loop over the "
        "volumes on the host, one thread, as the original's loader (`workers=1`). Same output "
        "shapes and label meaning; task parameters and batch sizes from "
        "`configs/<task>.py:<size>`. The Exemplar reference's time varies with its random "
        "branches (an arbitrary-angle scipy rotation or zoom costs far more than a flip): see "
        "its min–max, and the mean in the JSON.",
        "",
    ]
    return "\n".join(lines)


def _csv(value: str, allowed: Sequence[str], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: expected a comma-separated subset of {','.join(allowed)}")
    return items


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    p.add_argument("--sizes", default="paper,default", help="comma-separated config sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (after warm-up)")
    p.add_argument("--channels", type=int, default=4, help="input channels (BraTS: 4)")
    p.add_argument("--batch", type=int, default=None, help="override every config's batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder for {NAME}.{{json,md}}")
    args = p.parse_args(argv)
    tasks = _csv(args.tasks, TASKS, "--tasks")
    sizes = _csv(args.sizes, SIZES, "--sizes")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")

    result = {
        "command": shlex.join(["python", "benchmarks/pretext_batches.py", *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "repeats": args.repeats,
        "rows": [],
    }
    for size in sizes:
        for task in tasks:
            row = measure(
                task,
                size,
                repeats=args.repeats,
                channels=args.channels,
                batch=args.batch,
                seed=args.seed,
            )
            result["rows"].append(row)
            print(
                f"{task:9s} {size:8s} B={row['batch']:<3d} ours {row['ours']['median_ms']:9.1f} "
                f"ms  numpy {row['numpy']['median_ms']:9.1f} ms  speed-up {row['speedup']:.1f}x",
                flush=True,
            )
    write_results(args.out, NAME, result, render(result))
    return result


if __name__ == "__main__":
    main()
