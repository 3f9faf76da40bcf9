"""Buffer sizes of paper-size train steps in float32 / bfloat16, with and without remat.

Why: `config.model.compute_dtype='bfloat16'` and `config.model.remat=True` exist so that the
paper's 128³ steps fit a device; this script says by how much each one shrinks the step's
memory, without running anything. Each step is built as `ssl3d_jax/train/{pretrain,finetune}.py`
build it (`EncoderConfig.from_config` reads both settings, `step.make_train_step`, Adam,
`step.jit_train_step` with its compiler options), lowered on abstract inputs
(`jax.ShapeDtypeStruct`), compiled ahead of time for the local backend and read through
`compiled.memory_analysis()`:

  temp      scratch buffers of the step: activations kept for the backward pass, gradients,
            intermediates (what remat and bf16 act on)
  argument  the inputs: train state (params + Adam moments, float32 in every variant) and batch
  output    the new state and the metrics
  alias     output bytes that reuse donated input buffers (the state is donated)
  total     argument + output + temp - alias: the step's footprint

Steps (`paper` size, 3D, BraTS: 4 MRI channels, 4 classes):
  finetune/full     SegmentationModel (widths 16..128, bottom 256), everything trained,
                    batch 2 x 128³ (config.finetune.batch_size)
  pretext/<task>    a pretext step at configs/<task>.py:paper (default: rotation, batch
                    4 x 128³, whole volumes through the encoder)

Variants: compute dtype float32 / bfloat16 x remat off / on, compiled as the library compiles
them; on CPU also remat on with XLA:CPU's default options (`--cpu-default`), which shows why
`step.jit_train_step` passes `step.CPU_COMPILER_OPTIONS`: XLA:CPU's `cse_barrier_expander` drops
remat's optimization barriers and CSE then merges the recomputation back into the forward pass.

Caveat: on CPU these are XLA:CPU buffer-assignment figures. XLA:CPU emulates bfloat16 convolutions
in float32 (it converts operands and results), so the CPU bf16 columns understate what bf16 saves
on a GPU or TPU; run the script on the accelerator for its own numbers.

Run (compiles 10 programs, nothing is executed; about a minute on a 2-core CPU):
    python benchmarks/remat_memory.py                 # writes benchmarks/remat_memory.md
    python benchmarks/remat_memory.py --size=smoke --out=/tmp/remat.md   # checks the script
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import cpu_name  # noqa: E402
from benchmarks.step_flops import abstract_state  # noqa: E402
from ssl3d_jax import parallel  # noqa: E402
from ssl3d_jax.train import finetune  # noqa: E402
from ssl3d_jax.train import step as step_lib  # noqa: E402

IN_CHANNELS, NUM_CLASSES = 4, 4  # BraTS: t1 t1ce t2 flair; bg / NCR / ED / ET
VARIANTS = (("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True))
FIELDS = ("temp", "argument", "output", "alias", "total")


def load_config(task: str, size: str, dtype: str, remat: bool):
    config = importlib.import_module(f"configs.{task}").get_config(size)
    config.model.compute_dtype = dtype
    config.model.remat = remat
    return config


def finetune_step(size: str, dtype: str, remat: bool):
    """(step fn, state, batch, description) of the full segmentation finetuning step."""
    config = load_config("rpl", size, dtype, remat)  # finetuning sections are shared by all
    cfg, s = config.finetune, config.data.size
    tx = optax.adam(cfg.learning_rate)
    build = finetune.build_model(config, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    graphdef, state = abstract_state(build, tx)
    loss_fn = finetune.make_loss(config, NUM_CLASSES)
    batch = {
        "image": jax.ShapeDtypeStruct((cfg.batch_size, s, s, s, IN_CHANNELS), jnp.float32),
        "label": jax.ShapeDtypeStruct((cfg.batch_size, s, s, s), jnp.int32),
    }
    desc = f"{cfg.batch_size} x {s}³ x {IN_CHANNELS}, widths {tuple(config.model.filters)}"
    return step_lib.make_train_step(graphdef, loss_fn, tx), state, batch, desc


def pretext_step(task_name: str, size: str, dtype: str, remat: bool):
    config = load_config(task_name, size, dtype, remat)
    # The task module's make_task: get_task's extra size check traces the loss again.
    module = importlib.import_module(f"ssl3d_jax.tasks.{task_name}")
    task = module.make_task(config, in_channels=IN_CHANNELS)
    tx = optax.adam(config.pretrain.learning_rate)
    graphdef, state = abstract_state(task.build_model, tx)

    def loss_fn(model, batch, key):
        return task.loss(model, batch["image"], key)

    b, s = config.pretrain.batch_size, config.data.size
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, s, IN_CHANNELS), jnp.float32)}
    desc = f"{b} x {s}³ x {IN_CHANNELS}, widths {tuple(config.model.filters)}"
    return step_lib.make_train_step(graphdef, loss_fn, tx), state, batch, desc


def memory_of(step, state, batch, *, cpu_default: bool = False) -> dict:
    """`memory_analysis()` of the step compiled as `step.jit_train_step` compiles it (or, with
    `cpu_default`, with XLA's default options), in bytes, plus the compile time."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    jitted = step_lib.jit_train_step(step, mesh)
    if cpu_default:
        repl = parallel.replicated(mesh)
        jitted = jax.jit(step, donate_argnums=(0,), out_shardings=(repl, repl))
    t0 = time.perf_counter()
    mem = jitted.lower(state, batch).compile().memory_analysis()
    row = {
        "temp": int(mem.temp_size_in_bytes),
        "argument": int(mem.argument_size_in_bytes),
        "output": int(mem.output_size_in_bytes),
        "alias": int(mem.alias_size_in_bytes),
        "compile_s": round(time.perf_counter() - t0, 1),
    }
    row["total"] = row["argument"] + row["output"] + row["temp"] - row["alias"]
    return row


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def render(results: dict, meta: dict) -> str:
    lines = [
        "# Train-step memory: float32 vs bfloat16 compute, remat off vs on",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['seconds']} s, compile only).",
        "",
        f"Machine: {meta['machine']}; backend {meta['backend']} ({meta['device']}); "
        f"jax {meta['jax']}, jaxlib {meta['jaxlib']}, flax {meta['flax']}.",
        "",
        "Figures from `jax.jit(step).lower(...).compile().memory_analysis()` of each train step "
        "(Adam, float32 params and optimizer state in every variant), compiled ahead of time "
        "and never run. GiB = 2³⁰ bytes; total = argument + output + temp - alias (the state "
        "is donated, so the new state reuses its buffers). See benchmarks/remat_memory.py for "
        "the definitions.",
        "",
    ]
    if meta["backend"] == "cpu":
        lines += [
            "**These are XLA:CPU buffer-assignment figures; GPU numbers would differ.** With "
            "`conv_impl='auto'` and the oneDNN extension built, the convolutions are oneDNN "
            "custom calls (bfloat16 ones native where the CPU supports them); each call's "
            "scratch and layout buffers are allocated outside XLA and freed when it returns, so "
            "they are not in these figures (the peak resident memory of the real "
            "step: benchmarks/results/peak_memory.md). "
            "Without the extension XLA:CPU emulates bfloat16 convolutions in float32, so there "
            "the bf16 rows understate what bf16 saves on a GPU / TPU. The remat rows "
            "are compiled with `step.CPU_COMPILER_OPTIONS` (as `jit_train_step` does on CPU); "
            "the 'XLA:CPU default options' row shows that without them XLA:CPU undoes the remat "
            "(its `cse_barrier_expander` removes jax.checkpoint's barriers and CSE merges the "
            "recomputation back into the forward pass).",
            "",
        ]
    for name, rows in results.items():
        lines += [
            f"## {name}: {rows['_desc']}",
            "",
            "| compute dtype | remat | temp GiB | argument GiB | output GiB | alias GiB | "
            "total GiB | temp vs f32 |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        base = rows["float32/remat=False"]["temp"]
        for key, row in rows.items():
            if key.startswith("_"):
                continue
            dtype, remat = key.split("/remat=")
            label = (
                "on (XLA:CPU default options)"
                if remat == "True-cpu-default"
                else ("on" if remat == "True" else "off")
            )
            lines.append(
                f"| {dtype} | {label} | {gib(row['temp'])} | {gib(row['argument'])} | "
                f"{gib(row['output'])} | {gib(row['alias'])} | {gib(row['total'])} | "
                f"{row['temp'] / base:.2f}x |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="paper", help="config size: paper (default) or smoke")
    p.add_argument("--task", default="rotation", help="pretext task of the pretext step")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "remat_memory.md")
    )
    p.add_argument(
        "--no-cpu-default",
        action="store_true",
        help="skip the remat rows with XLA:CPU's default compiler options",
    )
    args = p.parse_args(argv)
    device = jax.devices()[0]
    started = time.perf_counter()
    results = {}
    builders = {
        "finetune/full": lambda d, r: finetune_step(args.size, d, r),
        f"pretext/{args.task}": lambda d, r: pretext_step(args.task, args.size, d, r),
    }
    for name, build in builders.items():
        rows = {}
        for dtype, remat in VARIANTS:
            step, state, batch, desc = build(dtype, remat)
            rows["_desc"] = desc
            rows[f"{dtype}/remat={remat}"] = memory_of(step, state, batch)
            print(name, dtype, remat, json.dumps(rows[f"{dtype}/remat={remat}"]), flush=True)
            if (
                remat
                and dtype == "float32"
                and device.platform == "cpu"
                and not args.no_cpu_default
            ):
                row = memory_of(step, state, batch, cpu_default=True)
                rows[f"{dtype}/remat=True-cpu-default"] = row
                print(name, dtype, "remat, XLA:CPU default options", json.dumps(row), flush=True)
        results[name] = rows
    import flax
    import jaxlib

    size_arg = [] if args.size == "paper" else [f"--size={args.size}"]
    task_arg = [] if args.task == "rotation" else [f"--task={args.task}"]
    meta = {
        "command": " ".join(["python benchmarks/remat_memory.py", *size_arg, *task_arg]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
        "backend": device.platform,
        "device": device.device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "seconds": round(time.perf_counter() - started),
    }
    text = render(results, meta)
    text += "\nRaw numbers (bytes; compile_s: compile wall time on this machine):\n\n```json\n"
    text += json.dumps(results, indent=1) + "\n```\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
