"""Per-layer and whole-step timings of the U-Net's layers on CPU, for each convolution path.

Why (issues 6 and 13): to find where the default segmentation and RPL train steps spend their
time, per layer kind and shape, and to decide which formulation of a layer `conv_impl='auto'`
runs. For every 3x3x3 convolution shape the models really see (derived from `configs/rpl.py:<size>`
and the U-Net's structure: the finetuning segmentation model on `finetune.batch_size x
data.size³`, the RPL encoder on `2 x pretrain.batch_size` patches) it times, as jitted
functions, the forward pass, the input gradient (dX) and the kernel gradient (dW) of every
formulation in `ssl3d_jax/ops/conv.py` (`xla` = `lax.conv_general_dilated`, what `nnx.Conv`
runs; the pure-XLA rewrites `taps2d`, `stacked`, `wstacked`; `onednn`, oneDNN's primitives as
FFI custom calls, when the extension is built) and PyTorch's `nn.Conv3d` when torch is
installed; then GroupNorm + ReLU, `max_pool2`, `UpConv2` (einsum vs oneDNN) and the stride-2
downsampling conv; then the whole train step with `conv_impl='xla'`, the pure-XLA fallback
(`'auto'` with the extension hidden) and `'auto'` with oneDNN, beside the PyTorch twin's step;
then the threading check: the oneDNN step with executions serialised (the default) and not, in
fresh processes, with the process's threads and its involuntary context switches per step.

Variants are interleaved in the same process (round-robin, median of `--repeats` rounds); each
cell also gives the process CPU time (all threads). Ratios to PyTorch are only meaningful on an
idle machine: oneDNN's and PyTorch's OpenMP threads collapse when another process holds the
cores (the load average at start is recorded).

Run:
    python benchmarks/layers.py                       # default size -> benchmarks/results/layers
    python benchmarks/layers.py --repeats=3 --out=/tmp/layers --no-steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import step_flops  # noqa: E402

from ssl3d_jax.models.layers import UpConv2, max_pool2  # noqa: E402
from ssl3d_jax.ops import onednn  # noqa: E402
from ssl3d_jax.ops.conv import (  # noqa: E402
    auto_impl,
    conv3_s2d,
    conv3_s2_xla,
    conv3_stacked,
    conv3_taps2d,
    conv3_wstacked,
    conv3_xla,
)
from ssl3d_jax.ops.patches import patch_shape  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IN_CHANNELS = step_flops.DATASETS["brats"][0]
_THREADS_CHILD_ENV = "SSL3D_LAYERS_THREADS_CHILD"


def variants() -> dict:
    """The convolution formulations to time: every pure-XLA one, and oneDNN where it is built."""
    out = {
        "xla": conv3_xla,
        "taps2d": conv3_taps2d,
        "stacked": conv3_stacked,
        "wstacked": conv3_wstacked,
    }
    if onednn.available():
        out["onednn"] = onednn.conv
    return out


def fallback_impl(shape) -> str:
    """What `conv_impl='auto'` runs without the oneDNN extension."""
    with onednn.hidden("benchmarks/layers.py: the fallback path"):
        return auto_impl(shape, platform="cpu")


def _ceil_halves(s: int, n: int) -> list[int]:
    out = [s]
    for _ in range(n):
        out.append((out[-1] + 1) // 2)
    return out


def conv_shapes(size: str) -> list[dict]:
    """Every ConvBlock convolution (batch, side, cin, cout, model) of the default models."""
    config = step_flops.load_config("rpl", size)
    f, bottom = tuple(config.model.filters), int(config.model.bottom_filters)
    rows = []
    seg_b, seg_s = int(config.finetune.batch_size), int(config.data.size)
    rpl_b = 2 * int(config.pretrain.batch_size)
    s0 = int(config.data.size)
    rpl_s = patch_shape(
        (s0, s0, s0, IN_CHANNELS),
        patches_per_side=int(config.rpl.patches_per_side),
        jitter=int(config.rpl.jitter),
        grid_fraction=float(config.rpl.get("grid_fraction", 1.0)),
    )[0]
    for model, b, s in (("segmentation", seg_b, seg_s), ("rpl", rpl_b, rpl_s)):
        sides = _ceil_halves(s, len(f))
        cin = IN_CHANNELS
        for i, c in enumerate(f):  # encoder
            rows += [(model, "enc", b, sides[i], cin, c), (model, "enc", b, sides[i], c, c)]
            cin = c
        rows += [
            (model, "bottom", b, sides[-1], cin, bottom),
            (model, "bottom", b, sides[-1], bottom, bottom),
        ]
        if model == "segmentation":
            for i in reversed(range(len(f))):
                rows += [
                    (model, "dec", b, sides[i], 2 * f[i], f[i]),
                    (model, "dec", b, sides[i], f[i], f[i]),
                ]
    return [dict(model=m, part=p, batch=b, side=s, cin=ci, cout=co) for m, p, b, s, ci, co in rows]


def _once(fn, *args):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t, time.process_time() - c


def interleaved(fns: dict, args: tuple, repeats: int) -> dict:
    """{name: (median wall s, median cpu s)} over `repeats` round-robin rounds after a warm-up."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(_once(fn, *args))
    return {
        k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
        for k, v in samples.items()
    }


def _conv_fns(impl, dy):
    fwd = jax.jit(impl)
    dx = jax.jit(lambda x, w: jax.vjp(lambda x: impl(x, w), x)[1](dy)[0])
    dw = jax.jit(lambda x, w: jax.vjp(lambda w: impl(x, w), w)[1](dy)[0])
    return {"fwd": fwd, "dX": dx, "dW": dw}


def time_torch_conv(b: int, s: int, ci: int, co: int, repeats: int) -> dict:
    """PyTorch (optional) Conv3d, channels_last_3d, 2 threads: forward, forward + backward."""
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(os.cpu_count() or 1)
    fmt = torch.channels_last_3d
    x = torch.randn(b, ci, s, s, s).to(memory_format=fmt).requires_grad_(True)
    conv = torch.nn.Conv3d(ci, co, 3, padding=1, bias=False).to(memory_format=fmt)

    def fwd():
        with torch.no_grad():
            conv(x)

    def both():
        y = conv(x)
        y.backward(torch.ones_like(y))

    fns = {"torch/fwd": fwd, "torch/fwd+bwd": both}
    for fn in fns.values():
        fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            samples[k].append((time.perf_counter() - t, time.process_time() - c))
    return {
        k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
        for k, v in samples.items()
    }


def time_convs(size: str, repeats: int) -> list[dict]:
    out = []
    for row in conv_shapes(size):
        b, s, ci, co = row["batch"], row["side"], row["cin"], row["cout"]
        x = jax.random.normal(jax.random.key(0), (b, s, s, s, ci))
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, ci, co)) * 0.1
        dy = jnp.ones((b, s, s, s, co))
        fns = {}
        for name, impl in variants().items():
            for part, fn in _conv_fns(impl, dy).items():
                fns[f"{name}/{part}"] = fn
        t = interleaved(fns, (x, w), repeats)
        gflop = 2 * 27 * ci * co * b * s**3 / 1e9
        t.update(time_torch_conv(b, s, ci, co, repeats))
        out.append(
            {
                **row,
                "gflop": gflop,
                "auto": auto_impl(x.shape),
                "fallback": fallback_impl(x.shape),
                "times": t,
            }
        )
        print(_conv_line(out[-1]), flush=True)
    return out


def _names(t: dict) -> list[str]:
    return [v for v in ("xla", "taps2d", "stacked", "wstacked", "onednn") if f"{v}/fwd" in t]


def _sum(t: dict, v: str) -> float:
    return sum(t[f"{v}/{p}"][0] for p in ("fwd", "dX", "dW"))


def _conv_line(r: dict) -> str:
    t = r["times"]
    names = _names(t)
    cells = " | ".join(f"{t[f'{v}/{p}'][0] * 1e3:.2f}" for v in names for p in ("fwd", "dX", "dW"))
    sums = " | ".join(f"{_sum(t, v) * 1e3:.2f}" for v in names)
    torch_cells = " | ".join(
        f"{t[k][0] * 1e3:.2f}" if k in t else "–" for k in ("torch/fwd", "torch/fwd+bwd")
    )
    ratio = "–"
    if "onednn" in names and "torch/fwd+bwd" in t:
        ratio = f"{_sum(t, 'onednn') / t['torch/fwd+bwd'][0]:.2f}×"
    return (
        f"| {r['model']} | {r['part']} | {r['batch']}x{r['side']}³ | {r['cin']}→{r['cout']} | "
        f"{r['gflop']:.3f} | {cells} | {sums} | {torch_cells} | {ratio} | {r['auto']} | "
        f"{r.get('fallback', '–')} |"
    )


def time_other(size: str, repeats: int) -> list[dict]:
    """GroupNorm + ReLU, max_pool2, UpConv2 (einsum and oneDNN) and the stride-2 3x3x3 conv of
    `downsample='conv'` (XLA, space-to-depth, oneDNN) at the segmentation model's shapes."""
    config = step_flops.load_config("rpl", size)
    f, bottom = tuple(config.model.filters), int(config.model.bottom_filters)
    b, s = int(config.finetune.batch_size), int(config.data.size)
    sides = _ceil_halves(s, len(f))
    up_impls = ("xla", "onednn") if onednn.available() else ("xla",)
    rows = []
    for i, c in enumerate(f):
        x = jax.random.normal(jax.random.key(0), (b, sides[i], sides[i], sides[i], c))
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, c, c)) * 0.1
        gn = nnx.GroupNorm(c, num_groups=min(8, c), rngs=nnx.Rngs(0))
        up_in = f[i + 1] if i + 1 < len(f) else bottom
        xu = jax.random.normal(
            jax.random.key(0), (b, sides[i + 1], sides[i + 1], sides[i + 1], up_in)
        )
        cases = {
            f"groupnorm+relu {b}x{sides[i]}³x{c}": (lambda x, gn=gn: nnx.relu(gn(x)), x),
            f"max_pool2 {b}x{sides[i]}³x{c}": (max_pool2, x),
        }
        for impl in up_impls:
            up = UpConv2(up_in, c, conv_impl=impl, rngs=nnx.Rngs(0))
            label = "einsum" if impl == "xla" else impl
            cases[f"UpConv2 ({label}) {b}x{sides[i + 1]}³x{up_in}→{c}"] = (
                lambda x, up=up: up(x),
                xu,
            )
        s2 = {"xla": conv3_s2_xla, "s2d": conv3_s2d}
        if onednn.available():
            s2["onednn"] = lambda x, w: onednn.conv(x, w, strides=(2, 2, 2))
        for label, fn in s2.items():
            cases[f"stride-2 conv ({label}) {b}x{sides[i]}³x{c}→{c}"] = (
                lambda x, fn=fn, w=w: fn(x, w),
                x,
            )
        for name, (fn, arg) in cases.items():
            fwd = jax.jit(fn)
            both = jax.jit(lambda x, fn=fn: jax.grad(lambda x: jnp.sum(fn(x) ** 2))(x))
            t = interleaved({"fwd": fwd, "fwd+bwd": both}, (arg,), repeats)
            rows.append({"layer": name, "times": t})
            print(f"| {name} | {t['fwd'][0] * 1e3:.2f} | {t['fwd+bwd'][0] * 1e3:.2f} |", flush=True)
    return rows


STEP_KINDS = ("finetune/full", "pretext/rpl")


def _build(kind: str, size: str, impl: str, mesh):
    """[compiled step, state, batch] of `kind` with `config.model.conv_impl = impl`, run once."""
    import train_step

    step, state, batch = train_step.build_step(train_step.step_spec(kind, size, impl), mesh)
    compiled = step.lower(state, batch).compile()
    state, _ = compiled(state, batch)
    return [compiled, state, batch]


def time_steps(size: str, repeats: int, kinds=STEP_KINDS) -> list[dict]:
    """Whole train steps: conv_impl 'xla', the pure-XLA fallback ('auto' with the extension
    hidden) and 'auto' (oneDNN where built), interleaved. The PyTorch ratio is train_step.py's
    (fresh processes: in one process PyTorch's step slows down after ours)."""
    from ssl3d_jax import parallel

    mesh = parallel.make_mesh()
    rows = []
    for kind in kinds:
        steps = {"xla": _build(kind, size, "xla", mesh)}
        with onednn.hidden("benchmarks/layers.py: the fallback path"):
            steps["fallback"] = _build(kind, size, "auto", mesh)
        if onednn.available():
            steps["onednn"] = _build(kind, size, "auto", mesh)
        samples = {k: [] for k in steps}
        for _ in range(repeats):
            for impl, s in steps.items():
                t, c = time.perf_counter(), time.process_time()
                s[1], metrics = s[0](s[1], s[2])
                jax.block_until_ready(metrics)
                samples[impl].append((time.perf_counter() - t, time.process_time() - c))
        t = {
            k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
            for k, v in samples.items()
        }
        row = {"kind": kind, "times": t}
        rows.append(row)
        print(_step_line(row), flush=True)
    return rows


def _threads_child(kind: str, size: str, steps: int) -> None:
    """One fresh process: the oneDNN step of `kind`, timed with its threads and context switches
    (SSL3D_ONEDNN_SERIALIZE is read once, at the extension's first call)."""
    import resource

    from ssl3d_jax import parallel

    compiled, state, batch = _build(kind, size, "onednn", parallel.make_mesh())
    walls, cpus, switches = [], [], []
    for _ in range(steps):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t, c = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        switches.append(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - r0.ru_nivcsw)
    with open("/proc/self/status") as f:
        threads = int(next(line for line in f if line.startswith("Threads:")).split()[1])
    print(
        json.dumps(
            {
                "wall_s": statistics.median(walls),
                "cpu_s": statistics.median(cpus),
                "involuntary_switches": statistics.median(switches),
                "threads": threads,
            }
        )
    )


def time_threads(size: str, repeats: int) -> list[dict]:
    """The oneDNN steps with executions serialised (default) and concurrent, fresh processes,
    alternated over 3 rounds."""
    if not onednn.available():
        return []
    rows = []
    for kind in STEP_KINDS:
        samples = {"1": [], "0": []}
        for _ in range(3):
            for serialize in samples:
                env = dict(os.environ, SSL3D_ONEDNN_SERIALIZE=serialize)
                samples[serialize].append(
                    common.run_child(__file__, _THREADS_CHILD_ENV, [kind, size, repeats], env)
                )
        for serialize, runs in samples.items():
            row = {"kind": kind, "serialize": serialize == "1"}
            for key in runs[0]:
                row[key] = statistics.median(r[key] for r in runs)
            rows.append(row)
            print(row, flush=True)
    return rows


NOTES = """
## What runs, what was tried and not adopted, what bounds us

Adopted (`config.model.conv_impl='auto'`, ssl3d_jax/ops/conv.py and ops/onednn.py; exact, same
parameters; tests: tests/test_onednn.py, tests/test_fast_layers.py):

* On CPU, where the extension is built: oneDNN's convolution primitives as XLA FFI custom calls
  for every 3x3x3 convolution of both models (and 3x3 in 2D, and the stride-2 conv of
  `downsample='conv'`), forward, input gradient and kernel gradient. Per layer (table above)
  they run 4-20x faster than XLA's convolution and about as fast as PyTorch's `nn.Conv3d`
  (whose kernels are oneDNN's too; the oneDNN sum is three separately dispatched calls).
  Activations are handed to oneDNN in JAX's channels-last layout: with format `any` oneDNN chose
  blocked layouts, and the reorders to and from them plus a gemm-based kernel gradient for the
  8-channel maps made the segmentation step 1.6x slower (oneDNN's verbose log). Kernels go
  through oneDNN's preferred layout: the plain [D]HWIO layout made it pick gemm kernels for the
  gradients (segmentation step 2.2x slower).
* The up-convolution keeps the einsum + depth-to-space formulation under 'auto': oneDNN's
  transposed convolution (`conv_impl='onednn'` forces it) was slower at every default shape
  (table below).
* Without the extension, the pure-XLA fallback: `taps2d` (the 3x3x3 conv as 3 batched 3x3 2D
  convolutions over the depth taps, custom VJP), which XLA:CPU runs 2-5x faster than its 3D
  convolution on the 5³-40³ maps; `stacked` on maps of <= 4³ voxels; XLA's own convolution
  above 64³ voxels per sample (memory) and in 2D (XLA's 2D convolution beat every rewrite).
* Threads: oneDNN runs each primitive on a GNU OpenMP team as wide as the cores; executions
  are serialised by a mutex (`SSL3D_ONEDNN_SERIALIZE=0` lifts it) so that a layer's dX and dW,
  which XLA dispatches concurrently, do not put two OpenMP teams on the same cores. On this
  2-core machine both ways measure within noise (threads table); the default is the one that
  cannot oversubscribe.

Tried, not adopted (interleaved A/B on this machine, 2026-12-04):

* a one-pass GroupNorm + ReLU with its own VJP (statistics and the two backward reductions in
  one pass each): no faster than XLA's fusion of the autodiff (2x40³x8 and 2x40³x16);
* a custom VJP for `max_pool2` that splits the cotangent among tied maxima as JAX does: the
  same time as XLA's;
* the kernels in the plain [D]HWIO layout wherever oneDNN's chosen kernel is not gemm-based (to
  save the per-call weight reorders): no net change of the RPL step, and a slower first layer;
* OMP_WAIT_POLICY=PASSIVE: no measurable change on 2 cores.

What bounds us (benchmarks/results/profile_step.md, this machine): in the default segmentation
step our oneDNN convolutions take about as long as PyTorch's (97 vs 91 ms of thread time per
step: oneDNN 3.2 here, 3.12 inside PyTorch 2.13, and a weight reorder per call), and XLA's
other work (GroupNorm, ReLU, pooling, the up-conv einsum and its transposes, concatenation, the
Dice + CE loss, Adam) takes 66 ms against PyTorch's 51 (GroupNorm 30 + the rest 21).
"""


def _step_line(r: dict) -> str:
    t = r["times"]
    cells = " | ".join(
        f"{t[k][0]:.4f} ({t[k][1]:.4f})" if k in t else "–" for k in ("xla", "fallback", "onednn")
    )
    onednn_speedup = f"{t['xla'][0] / t['onednn'][0]:.2f}×" if "onednn" in t else "–"
    return f"| {r['kind']} | {cells} | {t['xla'][0] / t['fallback'][0]:.2f}× | {onednn_speedup} |"


def markdown(report: dict) -> str:
    lines = [
        "# Per-layer and whole-step timings (benchmarks/layers.py)",
        "",
        f"Command: `python benchmarks/layers.py --size={report['size']} "
        f"--repeats={report['repeats']}`; {report['date']}; machine: {report['machine']}; "
        "load average at start "
        f"{report['load']}. Wall ms, median of {report['repeats']} interleaved rounds.",
        "",
    ]
    if report.get("steps"):
        lines += [
            "## Whole train step, s (process CPU s in brackets)",
            "",
            report.get("steps_note", "Built as benchmarks/train_step.py builds it; interleaved."),
            "",
            "| step | conv_impl='xla' | pure-XLA fallback | oneDNN ('auto') | fallback speed-up "
            "| oneDNN speed-up |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [_step_line(r) for r in report["steps"]]
        lines += [
            "",
            "pure-XLA fallback = `conv_impl='auto'` with the oneDNN extension hidden (what runs "
            "where it is not built). The ratio to PyTorch's step is in the train-step section "
            "(benchmarks/train_step.py: each side in fresh processes).",
            "",
        ]
    if report.get("threads"):
        lines += [
            "## Threads: oneDNN executions serialised (default) or concurrent",
            "",
            "| step | serialised | step s | process CPU s | involuntary context switches / step "
            "| threads in the process |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in report["threads"]:
            lines.append(
                f"| {r['kind']} | {'yes' if r['serialize'] else 'no (SSL3D_ONEDNN_SERIALIZE=0)'} "
                f"| {r['wall_s']:.4f} | {r['cpu_s']:.4f} | {r['involuntary_switches']:.0f} | "
                f"{r['threads']:.0f} |"
            )
        lines += [
            "",
            "Each row: the median over 3 fresh processes (alternated) of the median of "
            f"{report['repeats']} steps. oneDNN runs each primitive on a GNU OpenMP team as wide "
            "as the cores; XLA calls custom calls from its own pool and runs independent ones "
            "(a layer's dX and dW) concurrently.",
            "",
        ]
    if report.get("convs"):
        names = _names(report["convs"][0]["times"])
        head = " | ".join(f"{v} {p}" for v in names for p in ("fwd", "dX", "dW"))
        sums = " | ".join(f"{v} sum" for v in names)
        ncols = 5 + 4 * len(names) + 5
        lines += [
            "## 3x3x3 SAME convolutions, ms",
            "",
            f"| model | part | input | channels | GFLOP fwd | {head} | {sums} | torch fwd | "
            "torch fwd+bwd | oneDNN sum / torch fwd+bwd | auto picks | without oneDNN |",
            "|" + "---|" * 4 + "---:|" * (ncols - 6) + "---|---|",
        ]
        lines += [_conv_line(r) for r in report["convs"]]
        lines += [
            "",
            "fwd / dX / dW: jitted forward, input-gradient and kernel-gradient (vjp) functions. "
            "'wstacked fwd' is XLA's convolution (its custom VJP only changes the gradients). "
            "sum = fwd + dX + dW. torch: `nn.Conv3d` (no bias, channels_last_3d, all cores), fwd "
            "under no_grad and fwd + backward (dX and dW). 'auto picks' = what "
            "`conv_impl='auto'` runs for that layer; 'without oneDNN' = what it runs where the "
            "extension is not built.",
        ]
    lines.append(NOTES)
    if report.get("other"):
        lines += [
            "",
            "## Other layers (segmentation shapes), ms",
            "",
            "| layer | fwd | fwd+bwd |",
            "|---|---:|---:|",
        ]
        for r in report["other"]:
            t = r["times"]
            lines.append(
                f"| {r['layer']} | {t['fwd'][0] * 1e3:.2f} | {t['fwd+bwd'][0] * 1e3:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="default")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for layers.{json,md}")
    p.add_argument("--steps", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--other", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--convs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--render", default="", help="only re-render <out>/layers.md from this JSON")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            report = json.load(f)
        common.write_results(a.out, "layers", report, markdown(report))
        return report
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{common.cpu_name()}, {os.cpu_count()} cores, {platform.platform()}, "
        f"jax {jax.__version__}",
        "load": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
        "repeats": a.repeats,
        "size": a.size,
    }
    report["steps"] = time_steps(a.size, a.repeats) if a.steps else []
    report["threads"] = time_threads(a.size, a.repeats) if a.threads else []
    report["convs"] = time_convs(a.size, a.repeats) if a.convs else []
    report["other"] = time_other(a.size, a.repeats) if a.other else []
    common.write_results(a.out, "layers", report, markdown(report))
    return report


if __name__ == "__main__":
    import common

    common.child_or_main(_THREADS_CHILD_ENV, _threads_child, main)
