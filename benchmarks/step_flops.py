"""FLOPs of one paper-size train step per pretext task and finetuning arm, and H100 time estimates.

Why: docs/reproduce.md promises an expected runtime per arm of the paper's experiments on one GPU,
but only two paper-size steps were ever timed on a GPU (jigsaw 44 ms and CPC 56 ms on one H100,
f32, Adam: see the docstrings of configs/jigsaw.py and configs/cpc.py). This script counts the
FLOPs of every other step with XLA's own cost model, without running anything: each step is built
exactly as `ssl3d_jax/train/{pretrain,finetune}.py` build it (`tasks.get_task`,
`finetune.build_model`, `step.make_train_step`, Adam), lowered on abstract inputs
(`jax.ShapeDtypeStruct`), compiled for the local backend (CPU is fine) and read through
`compiled.cost_analysis()["flops"]`. The achieved FLOP/s of the two measured H100 steps then
turns FLOPs into seconds; the lower of the two rates is used, so the estimates are conservative
for steps that are as conv-bound as those two.

Steps counted (`paper` size, 3D, f32):
  pretext/<task>     one pretraining step of each task at its paper batch (configs/<task>.py)
  finetune/full      SegmentationModel, encoder + decoder trained (scratch arm; pretrained arm
                     after its warm-up)
  finetune/frozen    the same model with the encoder frozen (pretrained arm's warm-up)
  finetune/probe     VoxelLinearProbe, only the linear head trained (probe arm)
for BraTS (4 MRI channels, 4 classes) and Decathlon Task07_Pancreas (1 CT channel, 3 classes).

Run (compiles ~16 programs; a few minutes on a 2-core CPU, nothing is executed):
    python benchmarks/step_flops.py                     # writes benchmarks/step_flops.json
    python benchmarks/step_flops.py --size=smoke --out=/tmp/s.json  # checks the script (minutes)
    python benchmarks/step_flops.py --show=benchmarks/step_flops.json  # reprint the table

Caveat: the estimate is device compute only. At 44 ms per step the host must deliver a batch of
8 × 128³ × 4 float32 voxels (256 MiB) about 23 times a second; whether the input pipeline keeps
up is not measured here (watch `data_wait_fraction` in metrics.jsonl).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssl3d_jax import tasks  # noqa: E402
from ssl3d_jax.train import arms, finetune  # noqa: E402
from ssl3d_jax.train import step as step_lib  # noqa: E402
from ssl3d_jax.train.state import TrainState  # noqa: E402

TASKS = tasks.names()  # every registered pretext task
# (name, input channels, classes incl. background): BraTS t1/t1ce/t2/flair → bg/NCR/ED/ET;
# MSD Task07_Pancreas CT → bg/pancreas/tumour.
DATASETS = {"brats": (4, 4), "pancreas": (1, 3)}
# The only paper-size steps ever timed on a GPU (one H100, f32, Adam; BraTS: 4 channels).
MEASURED_H100_S = {"jigsaw": 0.044, "cpc": 0.056}


def load_config(task: str, size: str):
    return tasks.task_config(task, size)


def cost_of(fn, *args) -> dict:
    """XLA's cost and memory analysis of `jax.jit(fn)` on (abstract) `args`.

    Returns {'flops', 'bytes', 'memory_gib'}. jax returns the cost analysis as a dict (recent
    versions) or a one-element list of dicts (older). 'bytes' ('bytes accessed') and 'memory_gib'
    (arguments + outputs + temporaries of the compiled program) depend on the backend's fusion
    and buffer assignment: indicative only when compiled for CPU.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return {
        "flops": float(cost["flops"]),
        "bytes": float(cost.get("bytes accessed", float("nan"))),
        "memory_gib": (total - mem.alias_size_in_bytes) / 2**30,
    }


def abstract_state(build_model, tx) -> tuple:
    """(graphdef, TrainState of ShapeDtypeStructs): nothing is initialised or allocated."""
    abstract = nnx.eval_shape(lambda: build_model(nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params)
    )
    opt_state = jax.eval_shape(functools.partial(step_lib.init_opt_state, tx), params)
    state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=opt_state,
        rng=jax.eval_shape(lambda: jax.random.key(0)),
    )
    return graphdef, state


def param_count(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state.params)))


def pretext_step(task_name: str, size: str, in_channels: int) -> dict:
    config = load_config(task_name, size)
    task = tasks.get_task(config, in_channels=in_channels)
    tx = optax.adam(config.pretrain.learning_rate)
    graphdef, state = abstract_state(task.build_model, tx)

    def loss_fn(model, batch, key):
        return task.loss(model, batch["image"], key)

    s = config.data.size
    batch = {
        "image": jax.ShapeDtypeStruct(
            (config.pretrain.batch_size, s, s, s, in_channels), jnp.float32
        )
    }
    step = step_lib.make_train_step(graphdef, loss_fn, tx)
    return {
        **cost_of(step, state, batch),
        "batch": f"{config.pretrain.batch_size} x {s}^3 x {in_channels}",
        "num_steps": int(config.pretrain.num_steps),
        "params": param_count(state),
    }


def finetune_steps(size: str, in_channels: int, num_classes: int) -> dict:
    """FLOPs of the three finetuning step kinds (full, frozen encoder, linear probe)."""
    config = load_config("rpl", size)  # finetuning sections are shared by every task config
    cfg = config.finetune
    s = config.data.size
    tx = optax.adam(cfg.learning_rate)
    loss_fn = finetune.make_loss(config, num_classes)
    batch = {
        "image": jax.ShapeDtypeStruct((cfg.batch_size, s, s, s, in_channels), jnp.float32),
        "label": jax.ShapeDtypeStruct((cfg.batch_size, s, s, s), jnp.int32),
    }
    desc = f"{cfg.batch_size} x {s}^3 x {in_channels}, {num_classes} classes"
    out = {}
    # Same trainable parts as downstream.run: None (all), the warm-up's, the probe's.
    kinds = (
        ("full", "scratch", None),
        ("frozen", "scratch", finetune.SEGMENTATION.warmup_parts),
        ("probe", "probe", arms.PROBE_PARTS),
    )
    for kind, arm, trainable in kinds:
        build = finetune.build_model(
            config, in_channels=in_channels, num_classes=num_classes, arm=arm
        )
        graphdef, state = abstract_state(build, tx)
        step = step_lib.make_train_step(graphdef, loss_fn, tx, trainable=trainable)
        out[kind] = {
            **cost_of(step, state, batch),
            "batch": desc,
            "num_steps": int(cfg.num_steps),
            "params": param_count(state),
        }
    out["_protocol"] = {
        "num_steps": int(cfg.num_steps),
        "warmup_frozen_steps": int(cfg.warmup_frozen_steps),
        "fractions": [float(f) for f in config.experiment.fractions],
        "repetitions": int(config.experiment.repetitions),
    }
    return out


def estimate(results: dict) -> dict:
    """Seconds per step and per phase on one H100 from the measured jigsaw and CPC steps."""
    rates = {
        t: results["brats"][f"pretext/{t}"]["flops"] / sec for t, sec in MEASURED_H100_S.items()
    }
    rate = min(rates.values())  # conservative: the slower achieved FLOP/s
    for ds, rows in results.items():
        proto = rows.pop("_protocol")
        for name, row in rows.items():
            row["est_h100_s_per_step"] = row["flops"] / rate
        ft = {k: rows[f"finetune/{k}"]["est_h100_s_per_step"] for k in ("full", "frozen", "probe")}
        n, w = proto["num_steps"], proto["warmup_frozen_steps"]
        arms_h = {
            "scratch": n * ft["full"] / 3600,
            "pretrained": (w * ft["frozen"] + (n - w) * ft["full"]) / 3600,
            "probe": n * ft["probe"] / 3600,
        }
        runs = len(proto["fractions"]) * proto["repetitions"]
        pre_h = {
            t: rows[f"pretext/{t}"]["num_steps"]
            * rows[f"pretext/{t}"]["est_h100_s_per_step"]
            / 3600
            for t in TASKS
            if f"pretext/{t}" in rows
        }
        # config.mode='experiment' (one task): pretraining, then every arm in every run.
        experiment = {t: pre_h[t] + runs * sum(arms_h.values()) for t in pre_h}
        # configs/sweep.py: every task with its pretrained and probe arms, plus one scratch arm
        # per (fraction, repetition) shared by all tasks.
        in_sweep = {t: pre_h[t] + runs * (arms_h["pretrained"] + arms_h["probe"]) for t in pre_h}
        rows["_summary"] = {
            "protocol": proto,
            "runs": runs,
            "finetune_hours_per_arm_run": arms_h,
            "pretrain_hours": pre_h,
            "experiment_hours_per_task": experiment,
            "sweep_hours": sum(in_sweep.values()) + runs * arms_h["scratch"],
        }
    return {
        "measured_h100_s": MEASURED_H100_S,
        "implied_flops_per_s": rates,
        "rate_used": rate,
        "datasets": results,
    }


def print_report(report: dict) -> None:
    """The table of `report` (as written to step_flops.json) on stdout."""
    for t, r in report["implied_flops_per_s"].items():
        print(
            f"implied H100 rate from {t} ({report['measured_h100_s'][t] * 1e3:.0f} ms): "
            f"{r / 1e12:.1f} TFLOP/s"
        )
    print(f"rate used (the lower, conservative): {report['rate_used'] / 1e12:.1f} TFLOP/s")
    for ds, rows in report["datasets"].items():
        print(
            f"\n{ds}: step             batch                          TFLOP/step  CPU GiB  "
            "est. H100 ms   steps   est. h"
        )
        for name, row in rows.items():
            if name.startswith("_"):
                continue
            hours = row["num_steps"] * row["est_h100_s_per_step"] / 3600
            print(
                f"  {name:16s} {row['batch']:30s} {row['flops'] / 1e12:10.3f}  "
                f"{row['memory_gib']:7.1f}  {row['est_h100_s_per_step'] * 1e3:12.1f}  "
                f"{row['num_steps']:6d}  {hours:7.2f}"
            )
        s = rows["_summary"]
        print(
            "  finetune hours per arm and run: "
            + ", ".join(f"{a} {h:.2f}" for a, h in s["finetune_hours_per_arm_run"].items())
        )
        print(
            f"  config.mode=experiment hours per task (pretrain + {s['runs']} runs x all arms): "
            + ", ".join(f"{t} {h:.1f}" for t, h in s["experiment_hours_per_task"].items())
        )
        print(f"  whole sweep (configs/sweep.py): {s['sweep_hours']:.1f} h")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="paper", choices=("paper", "default", "smoke"))
    p.add_argument("--datasets", default="brats,pancreas")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "step_flops.json"))
    p.add_argument("--show", metavar="JSON", help="only print the table of a written JSON file")
    args = p.parse_args(argv)
    if args.show:
        with open(args.show) as f:
            print_report(json.load(f))
        return
    results = {}
    for ds in args.datasets.split(","):
        cin, ncls = DATASETS[ds]
        rows = {}
        for t in TASKS:
            t0 = time.time()
            rows[f"pretext/{t}"] = pretext_step(t, args.size, cin)
            print(
                f"{ds} pretext/{t}: {rows[f'pretext/{t}']['flops'] / 1e12:.3f} TFLOP "
                f"(compiled in {time.time() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        t0 = time.time()
        ft = finetune_steps(args.size, cin, ncls)
        print(f"{ds} finetune: compiled in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        rows.update({f"finetune/{k}" if k != "_protocol" else k: v for k, v in ft.items()})
        results[ds] = rows
    if "brats" not in results:
        sys.exit("calibration needs the brats pretext steps (--datasets must include brats)")
    report = estimate(results)
    report.update(size=args.size, jax_version=jax.__version__, backend=jax.default_backend())
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_report(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
