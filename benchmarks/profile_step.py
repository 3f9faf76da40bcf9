"""Where a train step's time goes: convolutions vs everything else, ours and PyTorch's (issue 13).

Why: `benchmarks/train_step.py` gives the ratio of our step to the PyTorch twin's; this names the
parts. Ours: the JAX profiler's trace of `--steps` steps (built as train_step.py builds them,
`conv_impl='auto'`), each XLA thunk's time summed by kind: oneDNN convolutions (the
`ssl3d_onednn_conv_*` custom calls), XLA's fusions (normalisation, activations, pooling, loss,
optimizer...), matmuls. PyTorch's: `torch.profiler` over the same number of steps of the twin
(channels_last_3d), self CPU time summed by operator kind. Times are thread time per step: XLA
runs independent thunks concurrently, so the parts can add up to more than the wall time.

Run (each side in its own process, as in train_step.py):
    python benchmarks/profile_step.py                 # finetune/full and pretext/rpl, default size
    python benchmarks/profile_step.py --kinds=finetune/full --steps=5 --out=/tmp/profile
Writes `<out>.json` and `<out>.md` (default benchmarks/results/profile_step).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile_step")
_CHILD_ENV = "SSL3D_PROFILE_STEP_CHILD"


def _jax_kind(name: str) -> str | None:
    if name.startswith(("ThunkExecutor", "$", "Pjit", "Common", "Parse", "Slinky")):
        return None  # wrappers around the thunks, and host-side dispatch
    if name.startswith("ffi_call"):
        return "convolutions (oneDNN custom calls)"
    if name.startswith("dot"):
        return "matmuls"
    return "XLA fusions and copies (norm, ReLU, pooling, up-conv einsum, loss, Adam, ...)"


def profile_jax(kind: str, size: str, steps: int) -> dict:
    import jax

    import train_step
    from ssl3d_jax import parallel

    step, state, batch = train_step.build_step(
        train_step.step_spec(kind, size), parallel.make_mesh()
    )
    compiled = step.lower(state, batch).compile()
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t0) / steps
        (path,) = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    # ffi_call thunks are named after their HLO instruction; XLA's own ops after their fusion.
    parts = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            k = _jax_kind(e["name"])
            if k:
                parts[k] += e["dur"] / 1e3 / steps
    return {"wall_ms": wall * 1e3, "parts_ms": dict(parts)}


def _torch_kind(name: str) -> str:
    if "convolution" in name:
        return "convolutions (oneDNN inside PyTorch)"
    if "group_norm" in name:
        return "group norm"
    if name.startswith(("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")):
        return "matmuls"
    return "other operators (ReLU, pooling, concat, loss, Adam, copies, ...)"


def profile_torch(kind: str, size: str, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import train_step

    model, x, loss_fn, lr = train_step.torch_twin(kind, size)
    model = model.to(memory_format=torch.channels_last_3d)
    if x.ndim == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def one():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x).backward()
        opt.step()

    for _ in range(3):
        one()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            one()
    wall = (time.perf_counter() - t0) / steps
    parts = collections.Counter()
    for avg in prof.key_averages():
        if avg.key.startswith("aten::") or avg.key.startswith("Optimizer"):
            parts[_torch_kind(avg.key)] += avg.self_cpu_time_total / 1e3 / steps
    return {"wall_ms": wall * 1e3, "parts_ms": dict(parts)}


def _child(framework: str, kind: str, size: str, steps: int) -> None:
    fn = profile_jax if framework == "jax" else profile_torch
    print(json.dumps(fn(kind, size, steps)))


def run(framework: str, kind: str, size: str, steps: int) -> dict:
    import common

    return common.run_child(__file__, _CHILD_ENV, [framework, kind, size, steps])


def markdown(report: dict) -> str:
    lines = [
        "### Where the step's time goes: convolutions vs the rest, ours and PyTorch's",
        "",
        f"Command: `{report['command']}`; {report['date']}; {report['machine']}.",
        "",
        "| step | side | wall ms / step (profiled) | part | thread ms / step |",
        "|---|---|---:|---|---:|",
    ]
    for r in report["rows"]:
        for side in ("ours", "pytorch"):
            s = r[side]
            for i, (part, ms) in enumerate(sorted(s["parts_ms"].items(), key=lambda kv: -kv[1])):
                head = f"| {r['kind']} | {side} | {s['wall_ms']:.1f}" if i == 0 else "| | |"
                lines.append(f"{head} | {part} | {ms:.1f} |")
    lines += [
        "",
        f"{report['steps']} profiled steps per side after 3 warm-up steps, each side in its own "
        "fresh process. Ours: the JAX profiler's thunk times (conv_impl='auto': oneDNN custom "
        "calls on CPU); PyTorch's: torch.profiler's self CPU time of aten operators, twin "
        "model (benchmarks/torch_models.py) in channels_last_3d. Thread time: concurrent "
        "thunks add up to more than the wall time; profiling slows both sides.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import common

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default="finetune/full,pretext/rpl")
    p.add_argument("--size", default="default")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args(argv)
    report = {
        **common.report_header(__file__, argv),
        "steps": a.steps,
        "rows": [],
    }
    for kind in a.kinds.split(","):
        row = {"kind": kind, "ours": run("jax", kind, a.size, a.steps)}
        row["pytorch"] = run("torch", kind, a.size, a.steps)
        report["rows"].append(row)
        print(row, flush=True)
    common.write_results(os.path.dirname(a.out), os.path.basename(a.out), report, markdown(report))
    return report


if __name__ == "__main__":
    import common

    common.child_or_main(_CHILD_ENV, _child, main)
