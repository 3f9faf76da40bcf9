"""Train-step time, achieved GFLOP/s, peak memory and time to the first step (issue 6 b, d).

Why: the issue asks for measured step times of every pretext task and of segmentation finetuning,
the ratio to the same network in PyTorch on the same machine, and how long the default command
takes to reach its first step, cold and with a warm persistent compilation cache. Everything is
built exactly as `ssl3d_jax/train/{pretrain,finetune}.py` build it (`tasks.get_task` or
`finetune.build_model` + `finetune.segmentation_loss`, Adam, `step.init_params`,
`step.create_train_state`, `step.make_train_step`, `step.jit_train_step` on `parallel.make_mesh()`)
on random inputs of the config's shapes (BraTS layout: 4 channels, 4 classes). The FLOPs per step
are XLA's cost analysis of the compiled step (as `benchmarks/step_flops.py:cost_of` reads it) with
`config.model.conv_impl='xla'`: XLA counts a custom call (the oneDNN convolutions that
`conv_impl='auto'` runs on CPU) as 0 FLOPs, so the same step's XLA-convolution program, compiled
but not run, gives the count for every row (the same arithmetic).

(b) Per step kind (`pretext/<task>`, `finetune/full`) and size: compile time (lower + compile),
    median of `--steps` steps after one warm-up step, GFLOP/s = XLA FLOPs / median. With torch
    installed (optional; `--torch`), `benchmarks/torch_models.py` runs the same network (every
    pretext model and segmentation) for the same step (forward + backward + Adam) on the same
    threads, NCDHW and channels_last_3d; ratio = ours / PyTorch's faster one. The JAX pretext
    step also builds its inputs from whole volumes inside the step (patches, rotations, puzzles,
    CPC and exemplar augmentation); the PyTorch step gets ready-made inputs of the same shapes
    (cutting patches costs ~0.1 ms at the default size, benchmarks/results/pretext_batches.md;
    exemplar's augmentation of both views, `ops/augment.py`, is not in the PyTorch step either).
(d) Per phase (`pretrain` = configs/rpl.py, `finetune` = segmentation finetuning) at the size of
    `--phase-size`: a fresh Python process (`--child`) imports, initialises and compiles as the
    library does, with the persistent compilation cache configured as `launch/main.py` does
    (min compile time 0.5 s) in a temporary directory, runs `--phase-steps` steps and reports
    its peak resident memory (VmHWM; `ru_maxrss` is inherited from the parent through fork +
    exec on Linux, so it is kept in the JSON only) and the wall time from the parent's spawn to
    its first completed step; `cold` is the first run on an empty cache directory, `warm` a
    second run on the same one. No data pipeline: the phantom's generation and loading are not
    included (see issue 6 c).

Run:
    python benchmarks/train_step.py                      # default sizes, all rows, torch if found
    python benchmarks/train_step.py --sizes=default,paper --steps=3   # paper's 128³: slow on CPU
    python benchmarks/train_step.py --sizes=smoke --steps=2 --out=/tmp/ts   # checks the script
Writes `<out>.json` and `<out>.md` (default benchmarks/results/train_step).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

# Wall time of this process's start, as early as possible (the child mode's reference point is
# the parent's spawn time, passed in the environment).
_T_MODULE = time.time()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import step_flops  # noqa: E402

from ssl3d_jax import parallel, tasks  # noqa: E402
from ssl3d_jax.ops.patches import patch_shape  # noqa: E402
from ssl3d_jax.train import finetune  # noqa: E402
from ssl3d_jax.train import step as step_lib  # noqa: E402

IN_CHANNELS, NUM_CLASSES = step_flops.DATASETS["brats"]
KINDS = tuple(f"pretext/{t}" for t in step_flops.TASKS) + ("finetune/full",)
PHASES = {"pretrain": "pretext/rpl", "finetune": "finetune/full"}
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_step")
_SPAWN_ENV = "SSL3D_BENCH_SPAWN_TIME"


def kind_of(name: str) -> str:
    """'rpl' / 'pretext/rpl' -> 'pretext/rpl'; 'finetune' -> 'finetune/full'."""
    if name in KINDS:
        return name
    if name in step_flops.TASKS:
        return f"pretext/{name}"
    if name in ("finetune", "finetune/full"):
        return "finetune/full"
    raise SystemExit(f"unknown task {name!r}: expected one of {step_flops.TASKS + ('finetune',)}")


def step_spec(kind: str, size: str, conv_impl: str | None = None) -> dict:
    """Everything needed to build one step: config, model builder, loss, optimizer, shapes.
    `conv_impl`: overrides `config.model.conv_impl` (default: the config's, 'auto')."""
    config = step_flops.load_config("rpl" if kind == "finetune/full" else kind.split("/")[1], size)
    if conv_impl is not None:
        config.model.conv_impl = conv_impl
    if kind == "finetune/full":  # the finetuning sections of every config are shared
        cfg, section = config.finetune, "finetune"
        build = finetune.build_model(
            config, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, arm="scratch"
        )
        loss_fn = finetune.make_loss(config, NUM_CLASSES)
        s = config.data.size
        shapes = {
            "image": ((cfg.batch_size, s, s, s, IN_CHANNELS), np.float32),
            "label": ((cfg.batch_size, s, s, s), np.int32),
        }
    else:
        cfg, section = config.pretrain, "pretrain"
        task = tasks.get_task(config, in_channels=IN_CHANNELS)
        build = task.build_model

        def loss_fn(model, batch, key):  # as train/pretrain.py
            return task.loss(model, batch["image"], key)

        s = config.data.size
        shapes = {"image": ((cfg.batch_size, s, s, s, IN_CHANNELS), np.float32)}
    return {
        "config": config,
        "section": section,
        "build": build,
        "loss_fn": loss_fn,
        "tx": optax.adam(cfg.learning_rate),
        "shapes": shapes,
    }


def random_batch(shapes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in shapes.items():
        if dtype == np.int32:
            out[name] = rng.integers(0, NUM_CLASSES, shape, dtype=np.int32)
        else:
            out[name] = rng.standard_normal(shape, dtype=np.float32)
    return out


def build_step(spec: dict, mesh):
    """(jitted step, state, device batch) exactly as the library's training loops build them."""
    key_init, key_run = jax.random.split(jax.random.key(0))
    graphdef, params = step_lib.init_params(spec["build"], key_init, mesh)
    state = step_lib.create_train_state(spec["tx"], params, key_run, mesh)
    accum = step_lib.grad_accum_steps(
        spec["config"][spec["section"]], mesh, name=f"config.{spec['section']}"
    )
    step = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, spec["loss_fn"], spec["tx"], accum_steps=accum), mesh
    )
    batch = jax.device_put(random_batch(spec["shapes"]), parallel.data_sharded(mesh))
    return step, state, batch


def compiled_cost(compiled) -> dict:
    """XLA's FLOPs and buffer bytes of a compiled step, read as `step_flops.cost_of` reads them.

    Not `step_flops.cost_of` itself: it compiles its function again (without the donation and
    compiler options of `jit_train_step`), which doubles the compile time of every row.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: a one-element list
        cost = cost[0]
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return {"flops": float(cost["flops"]), "memory_gib": (total - mem.alias_size_in_bytes) / 2**30}


def _xla_flops(kind: str, size: str) -> float:
    """XLA:CPU's FLOP count of `kind`'s step with `conv_impl='xla'` (compiled, not run).

    Every row's FLOPs come from this program, whatever ran: XLA counts custom calls as 0 FLOPs,
    and the convolutions are custom calls both in the oneDNN program on CPU and in XLA:GPU's
    (cuDNN) program."""
    spec = step_spec(kind, size, conv_impl="xla")
    mesh = parallel.make_mesh(jax.devices("cpu")[:1])
    step, state, batch = build_step(spec, mesh)
    return compiled_cost(step.lower(state, batch).compile())["flops"]


def recount_flops(report: dict) -> dict:
    """`report` (a train_step JSON, e.g. from an accelerator) with every row's FLOPs and GFLOP/s
    recounted by `_xla_flops` on this machine's CPU."""
    for row in report["steps"]:
        row["flops"] = _xla_flops(row["kind"], row["size"])
        row["gflops_per_s"] = row["flops"] / row["median_s"] / 1e9
    return report


def time_jax_step(kind: str, size: str, steps: int) -> dict:
    """Compile time, step times and FLOPs of one step kind at one size."""
    spec = step_spec(kind, size)
    mesh = parallel.make_mesh()
    t0 = time.perf_counter()
    step, state, batch = build_step(spec, mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled_cost(compiled)
    custom_calls = compiled.as_text().count('custom_call_target="ssl3d_onednn_conv_')
    if custom_calls or jax.default_backend() != "cpu":
        cost["flops"] = _xla_flops(kind, size)
    accum = step_lib.grad_accum_steps(
        spec["config"][spec["section"]], mesh, name=f"config.{spec['section']}"
    )
    times = []
    for i in range(steps + 1):  # the first run (allocation, warm-up) is not counted
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(metrics["loss"])
        if i:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "kind": kind,
        "size": size,
        "batch": " , ".join(
            f"{'x'.join(map(str, shape))} {np.dtype(dt).name}"
            for shape, dt in spec["shapes"].values()
        ),
        "params": step_flops.param_count(state),
        "grad_accum_steps": accum,
        "init_s": init_s,
        "compile_s": compile_s,
        "step_s": times,
        "median_s": median,
        "flops": cost["flops"],
        "onednn_custom_calls": custom_calls,
        "gflops_per_s": cost["flops"] / median / 1e9,
        "xla_memory_gib": cost["memory_gib"],
        "final_loss": loss,
        "finite": bool(np.isfinite(loss)),
    }


def torch_twin(kind: str, size: str):
    """(torch model, inputs, loss closure, learning rate) for the step kind, or None if the
    config uses something the twins do not implement (see benchmarks/torch_models.py).

    The inputs are random tensors of the shapes the JAX model receives after the task's
    on-device sampling (channels first), with the config's batch size: RPL pairs, rotated
    volumes, jigsaw puzzles, CPC grid patches, exemplar anchors || positives.
    """
    import torch
    import torch_models

    if kind == "finetune/full":
        spec_cfg = step_flops.load_config("rpl", size)  # finetuning sections are shared
    else:
        spec_cfg = step_flops.load_config(kind.split("/")[1], size)
    m = spec_cfg.model
    if spec_cfg.data.spatial_dims != 3 or m.get("downsample", "max_pool") != "max_pool":
        return None  # the twins are the 3D max-pool encoder only
    widths = dict(
        filters=tuple(m.filters), bottom_filters=int(m.bottom_filters), num_groups=m.num_groups
    )
    gen = torch.Generator().manual_seed(0)
    s = spec_cfg.data.size
    b, lr = spec_cfg.pretrain.batch_size, spec_cfg.pretrain.learning_rate
    ce = torch.nn.functional.cross_entropy

    def grid_patch(section) -> tuple:  # the patch shape of a grid task's section
        return patch_shape(
            (s, s, s, IN_CHANNELS),
            patches_per_side=section.patches_per_side,
            jitter=section.jitter,
            grid_fraction=section.get("grid_fraction", 1.0),
        )

    def classification(model, x, num_classes: int):  # cross-entropy against random labels
        y = torch.randint(0, num_classes, (b,), generator=gen)

        def loss(model, x):
            return ce(model(x), y)

        return model, x, loss, lr

    if kind == "finetune/full":
        model = torch_models.SegmentationModel(IN_CHANNELS, NUM_CLASSES, **widths)
        b, s = spec_cfg.finetune.batch_size, spec_cfg.data.size
        x = torch.randn(b, IN_CHANNELS, s, s, s, generator=gen)
        y = torch.randint(0, NUM_CLASSES, (b, s, s, s), generator=gen)
        dw, cw = spec_cfg.finetune.dice_weight, spec_cfg.finetune.ce_weight
        if (dw, cw) != (1.0, 1.0):
            return None  # torch_models.segmentation_loss weights both terms by 1

        def loss(model, x):
            return torch_models.segmentation_loss(model(x), y, NUM_CLASSES)

        return model, x, loss, spec_cfg.finetune.learning_rate
    if kind == "pretext/rpl":
        r = spec_cfg.rpl
        ncls = r.patches_per_side**3 - 1
        model = torch_models.RPLModel(IN_CHANNELS, ncls, head_hidden=tuple(r.head_hidden), **widths)
        x = torch.randn(b, 2, IN_CHANNELS, *grid_patch(r), generator=gen)
        return classification(model, x, ncls)
    if kind == "pretext/rotation":
        from ssl3d_jax.tasks import rotation

        ncls = rotation.num_classes(3)
        hidden = tuple(spec_cfg.rotation.head_hidden)
        model = torch_models.RotationModel(
            IN_CHANNELS, s, head_hidden=hidden, num_classes=ncls, **widths
        )
        x = torch.randn(b, IN_CHANNELS, s, s, s, generator=gen)  # already rotated
        return classification(model, x, ncls)
    if kind == "pretext/jigsaw":
        j = spec_cfg.jigsaw
        n, k = j.patches_per_side**3, int(j.num_permutations)
        model = torch_models.JigsawModel(
            IN_CHANNELS, n, k, head_hidden=tuple(j.head_hidden), **widths
        )
        x = torch.randn(b, n, IN_CHANNELS, *grid_patch(j), generator=gen)  # already shuffled
        return classification(model, x, k)
    if kind == "pretext/cpc":
        from ssl3d_jax.tasks import cpc

        c = spec_cfg.cpc
        pps = int(c.patches_per_side)
        targets = torch.as_tensor(cpc.target_indices(pps, 3), dtype=torch.long)  # [cols, K]
        model = torch_models.CPCModel(
            IN_CHANNELS,
            cpc.context_indices(pps, 3).tolist(),
            targets.shape[1],
            int(c.code_size),
            int(c.gru_units),
            **widths,
        )
        x = torch.randn(b, pps**3, IN_CHANNELS, *grid_patch(c), generator=gen)  # grid patches
        temperature = float(c.temperature)

        def loss(model, x):
            predictions, latents = model(x)
            return torch_models.info_nce(predictions, latents, targets, temperature)

        return model, x, loss, lr
    if kind == "pretext/exemplar":
        e = spec_cfg.exemplar
        if e.batch_hard:
            return None  # torch_models.triplet_loss uses the random negatives only
        model = torch_models.ExemplarModel(IN_CHANNELS, int(e.code_size), **widths)
        x = torch.randn(2 * b, IN_CHANNELS, s, s, s, generator=gen)  # anchors || positives
        # A random cyclic derangement (Sattolo), as `tasks.exemplar.random_derangement`.
        order = torch.randperm(b, generator=gen)
        negative_index = torch.empty(b, dtype=torch.long)
        negative_index[order] = torch.roll(order, -1)
        margin, squared = float(e.margin), bool(e.squared_distance)

        def loss(model, x):
            return torch_models.triplet_loss(model(x), negative_index, margin, squared)

        return model, x, loss, lr
    return None


def time_torch_step(kind: str, size: str, steps: int) -> dict | None:
    """Median PyTorch step (forward + backward + Adam) in NCDHW and channels_last_3d."""
    import torch
    import torch_models

    twin = torch_twin(kind, size)
    if twin is None:
        return None
    model, x, loss_fn, lr = twin
    out = {
        "torch_params": torch_models.param_count(model),
        "torch_threads": torch.get_num_threads(),
    }
    for layout in ("ncdhw", "channels_last_3d"):
        m = model
        xi = x
        if layout == "channels_last_3d":
            m = model.to(memory_format=torch.channels_last_3d)
            if xi.ndim == 5:
                xi = xi.contiguous(memory_format=torch.channels_last_3d)
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(m, xi)
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
        out[f"torch_{layout}_step_s"] = times
        out[f"torch_{layout}_median_s"] = statistics.median(times)
    out["torch_median_s"] = min(out["torch_ncdhw_median_s"], out["torch_channels_last_3d_median_s"])
    return out


# --- (b): our step and PyTorch's, each in fresh processes ----------------------------------------

_STEP_CHILD_ENV = "SSL3D_BENCH_STEP_CHILD"


def run_steps(compiled, state, batch, steps: int, warmup: int = 0):
    """`warmup + steps` calls of a compiled step; returns (the last `steps` wall times in s, the
    final state)."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, state


def _step_child(framework: str, kind: str, size: str, steps: int, cache_dir: str) -> None:
    """Runs in a fresh process: `steps` steps of our step (`jax`) or the PyTorch twin's
    (`torch`), after a warm-up step; prints one JSON line."""
    if framework == "torch":
        print(json.dumps(time_torch_step(kind, size, steps) or {}))
        return
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    step, state, batch = build_step(step_spec(kind, size), parallel.make_mesh())
    compiled = step.lower(state, batch).compile()
    times, _ = run_steps(compiled, state, batch, steps, warmup=1)
    print(json.dumps({"step_s": times, "median_s": statistics.median(times)}))


def time_fresh_processes(kind: str, size: str, steps: int, rounds: int) -> dict:
    """Our step and the PyTorch twin's, each timed in its own fresh process, alternated over
    `rounds` rounds (ours, PyTorch, ours, ...): the median over rounds of each process's median.

    Why fresh processes: in one process the two runtimes' idle thread pools (XLA's, and the two
    OpenMP runtimes of oneDNN and PyTorch) spin after each step and slowed the other side's next
    step (the PyTorch segmentation step by ~1.5x when alternated with ours in one process).
    Alternation spreads the machine's drifts over both sides."""
    out = {"jax": [], "torch": []}
    with tempfile.TemporaryDirectory(prefix="ssl3d_bench_cache_") as cache_dir:
        for _ in range(rounds):
            for framework in out:
                out[framework].append(
                    common.run_child(
                        __file__, _STEP_CHILD_ENV, [framework, kind, size, steps, cache_dir]
                    )
                )
    if not out["torch"][0]:
        return {}
    return {
        "fresh_rounds": rounds,
        "fresh_median_s": statistics.median(r["median_s"] for r in out["jax"]),
        "fresh_round_medians_s": [r["median_s"] for r in out["jax"]],
        "torch_ncdhw_median_s": statistics.median(r["torch_ncdhw_median_s"] for r in out["torch"]),
        "torch_channels_last_3d_median_s": statistics.median(
            r["torch_channels_last_3d_median_s"] for r in out["torch"]
        ),
        "torch_median_s": statistics.median(r["torch_median_s"] for r in out["torch"]),
        "torch_round_medians_s": [r["torch_median_s"] for r in out["torch"]],
        "torch_params": out["torch"][0]["torch_params"],
        "torch_threads": out["torch"][0]["torch_threads"],
    }


# --- (d): fresh processes -----------------------------------------------------------------------


def child_main(phase: str, size: str, steps: int, cache_dir: str) -> None:
    """Runs in a fresh process: the phase's step as the library builds it; prints one JSON line."""
    spawn = float(os.environ.get(_SPAWN_ENV, _T_MODULE))
    t_imported = time.time()
    # As launch/main.py configures it (there under $SSL3D_JAX_CACHE/jax_compile).
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    spec = step_spec(PHASES[phase], size)
    mesh = parallel.make_mesh()
    step, state, batch = build_step(spec, mesh)
    jax.block_until_ready(state)
    t_init = time.time()
    firsts = []
    for i in range(steps):
        state, metrics = step(state, batch)
        float(metrics["loss"])
        firsts.append(time.time())
    # ru_maxrss survives fork + exec on Linux, so a child of a large parent reports the parent's
    # peak whenever it is larger; VmHWM (this address space's own peak) does not.
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm_kib = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm_kib = int(line.split()[1])
    except OSError:
        pass
    print(
        json.dumps(
            {
                "import_s": t_imported - spawn,
                "init_s": t_init - t_imported,
                "first_step_s": firsts[0] - t_init,
                "start_to_first_step_s": firsts[0] - spawn,
                "later_step_s": (firsts[-1] - firsts[0]) / max(1, steps - 1),
                "peak_rss_mib": (rss_kib if hwm_kib is None else hwm_kib) / 1024,
                "ru_maxrss_mib": rss_kib / 1024,
                "steps": steps,
            }
        )
    )


def run_phase(phase: str, size: str, steps: int, cache_dir: str) -> dict:
    env = dict(os.environ)
    env[_SPAWN_ENV] = repr(time.time())
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child={phase}",
        f"--phase-size={size}",
        f"--phase-steps={steps}",
        f"--cache-dir={cache_dir}",
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_phases(phases, size: str, steps: int) -> list[dict]:
    rows = []
    for phase in phases:
        with tempfile.TemporaryDirectory(prefix="ssl3d_bench_cache_") as d:
            for cache in ("cold", "warm"):  # the second run finds the first one's entries
                r = run_phase(phase, size, steps, d)
                entries = len(os.listdir(d))
                rows.append(
                    {"phase": phase, "size": size, "cache": cache, **r, "cache_files": entries}
                )
                print(f"(d) {phase} {size} {cache}: {r}", file=sys.stderr, flush=True)
    return rows


# --- report -------------------------------------------------------------------------------------


def machine() -> dict:
    from benchmarks.common import cpu_name

    cpu = cpu_name()
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for mod in ("jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def _f(x, fmt="{:.3g}"):
    return "–" if x is None else fmt.format(x)


def markdown(report: dict) -> str:
    m = report["machine"]
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items() if val)
    lines = [
        "### Train step: time, GFLOP/s, PyTorch ratio; memory and time to the first step "
        f"({m['backend']}, {m['cores']} cores)",
        "",
        f"Command: `{report['command']}`; {report['date']}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}; backend {m['backend']} "
        f"({m['devices']} device); {v}; load average at start "
        f"{', '.join(map(str, m['load_average']))}.",
        "",
        "| step | size | batch | params | compile s | median step s | GFLOP/step | GFLOP/s "
        "| ours s, fresh processes | PyTorch s (NCDHW / CL3d), fresh processes | PyTorch GFLOP/s "
        "| ours / PyTorch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["steps"]:
        t = r.get("torch_median_s")
        torch_cell = (
            "–"
            if t is None
            else f"{r['torch_ncdhw_median_s']:.3g} / {r['torch_channels_last_3d_median_s']:.3g}"
        )
        lines.append(
            f"| {r['kind']} | {r['size']} | {r['batch']} | {r['params']:,} | "
            f"{r['compile_s']:.2f} | {r['median_s']:.3g} | {r['flops'] / 1e9:.3g} | "
            f"{r['gflops_per_s']:.3g} | {_f(r.get('fresh_median_s'))} | {torch_cell} | "
            f"{_f(None if t is None else r['flops'] / t / 1e9)} | "
            f"{_f(r.get('ratio'), '{:.2f}×')} |"
        )
    lines += [
        "",
        f"Median of {report['steps_timed']} steps after one warm-up step; compile = lower + "
        "compile of the jitted step (`config.model.conv_impl='auto'`: oneDNN convolutions on "
        "CPU where the extension is built). FLOPs: XLA's cost analysis (read as "
        "benchmarks/step_flops.py:cost_of reads it) of the same step compiled for XLA:CPU with "
        "`conv_impl='xla'`, because XLA counts custom calls (oneDNN's on CPU, cuDNN's on GPU) "
        "as 0 FLOPs; the PyTorch GFLOP/s uses the same FLOP count. "
        "PyTorch: the same network (benchmarks/torch_models.py), forward + backward + Adam, "
        f"{report.get('torch_note', '')} ratio = ours / PyTorch's faster layout, both timed in "
        f"fresh processes alternated over {report.get('rounds', 1)} rounds (ours, PyTorch, "
        "ours, ...; median of the rounds' medians), because in one process each runtime's idle "
        "threads slow the other's next step (> 1: we are slower). Rows without PyTorch use a "
        "setting the twins do not implement "
        "(2D, conv downsampling, batch-hard exemplar, other segmentation loss weights).",
    ]
    if report.get("flops_recounted"):
        lines += [
            "",
            f"FLOPs recounted afterwards on a CPU (same program, XLA:CPU): "
            f"`{report['flops_recounted']}`.",
        ]
    if report["phases"]:
        lines += [
            "",
            "| phase | size | compilation cache | start → first step s | import s | "
            "init s | first step s | later step s | peak RSS MiB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["phases"]:
            lines.append(
                f"| {r['phase']} | {r['size']} | {r['cache']} | "
                f"{r['start_to_first_step_s']:.2f} | {r['import_s']:.2f} | {r['init_s']:.2f} | "
                f"{r['first_step_s']:.2f} | {r['later_step_s']:.3g} | {r['peak_rss_mib']:.0f} |"
            )
        lines += [
            "",
            "Each row is a fresh process (`train_step.py --child=<phase>`) building the step as "
            "the library does, with the persistent compilation cache set as launch/main.py sets "
            "it, in a temporary directory: cold = empty, warm = the cold run's entries. "
            "start → first step = wall time from the parent's spawn to the first completed step "
            "(import + init + compile + first step); peak RSS = the process's VmHWM after "
            f"{report['phases'][0]['steps']} steps. No data pipeline (phantom generation and "
            "loading are not included).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="rpl,rotation,jigsaw,cpc,exemplar,finetune")
    p.add_argument("--sizes", default="default", help="comma list of smoke, default, paper")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (after warm-up)")
    p.add_argument("--out", default=DEFAULT_OUT, help="writes <out>.json and <out>.md")
    p.add_argument(
        "--torch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the PyTorch twins (default: when torch is importable)",
    )
    p.add_argument(
        "--rounds", type=int, default=4, help="fresh-process rounds (ours, PyTorch) per row"
    )
    p.add_argument("--phases", default="pretrain,finetune", help="(d) phases; '' to skip")
    p.add_argument("--phase-size", default="default")
    p.add_argument("--phase-steps", type=int, default=3)
    p.add_argument(
        "--recount-flops",
        default="",
        help="rewrite <out>.{json,md} from this JSON with FLOPs recounted here (XLA:CPU)",
    )
    p.add_argument("--render", default="", help="only rewrite <out>.md from this JSON")
    p.add_argument("--child", choices=tuple(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child, args.phase_size, args.phase_steps, args.cache_dir)
        return {}
    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(report))
        return report
    if args.recount_flops:
        with open(args.recount_flops) as f:
            report = recount_flops(json.load(f))
        report["flops_recounted"] = "python benchmarks/train_step.py " + shlex.join(
            sys.argv[1:] if argv is None else list(argv)
        )
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(report))
        return report

    use_torch, torch_note = args.torch, ""
    if use_torch is not False:
        try:
            import torch

            torch_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads;"
            use_torch = True
        except ImportError:
            if use_torch:
                raise SystemExit("--torch given but torch is not importable")
            torch_note = "torch not installed: PyTorch columns skipped;"
            print(f"note: {torch_note}", file=sys.stderr)
            use_torch = False
    else:
        torch_note = "PyTorch skipped (--no-torch);"

    command = "python benchmarks/train_step.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    report = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "steps_timed": args.steps,
        "rounds": args.rounds,
        "torch_note": torch_note,
        "steps": [],
        "phases": [],
    }
    for size in args.sizes.split(","):
        for name in args.tasks.split(","):
            kind = kind_of(name)
            row = time_jax_step(kind, size, args.steps)
            if use_torch:
                row.update(time_fresh_processes(kind, size, args.steps, args.rounds))
                if "torch_median_s" in row:
                    row["ratio"] = row["fresh_median_s"] / row["torch_median_s"]
            report["steps"].append(row)
            print(
                f"(b) {kind} {size}: compile {row['compile_s']:.2f} s, median "
                f"{row['median_s']:.4f} s, {row['gflops_per_s']:.3g} GFLOP/s"
                + (f", torch {row['torch_median_s']:.4f} s" if "torch_median_s" in row else ""),
                file=sys.stderr,
                flush=True,
            )
    phases = [ph for ph in args.phases.split(",") if ph]
    for ph in phases:
        if ph not in PHASES:
            raise SystemExit(f"unknown phase {ph!r}: expected one of {tuple(PHASES)}")
    report["phases"] = measure_phases(phases, args.phase_size, args.phase_steps)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return report


if __name__ == "__main__":
    import common

    common.child_or_main(_STEP_CHILD_ENV, _step_child, main)
