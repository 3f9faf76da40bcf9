"""Peak resident memory and step time of the paper-size segmentation step, oneDNN vs XLA convs.

Why (issue 13): the oneDNN convolutions allocate their scratch and layout buffers per call,
outside XLA's buffer assignment, so `benchmarks/remat_memory.py`'s compile-time figures do not
see them. This runs the real step (2 x 128³ x 4, `benchmarks/train_step.py:step_spec`) for
`--steps` steps in a fresh process per `conv_impl` and reports the process's peak resident
memory (VmHWM) beside XLA's temp buffer size and the step time.

Run:
    python benchmarks/peak_memory.py                    # 'auto' (oneDNN) and 'xla', ~4 min
    python benchmarks/peak_memory.py --size=default --impls=auto --out=/tmp/peak
Writes `<out>.json` and `<out>.md` (default benchmarks/results/peak_memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "peak_memory")
_CHILD_ENV = "SSL3D_PEAK_MEMORY_CHILD"


def _child(kind: str, size: str, impl: str, steps: int) -> None:

    import train_step
    from ssl3d_jax import parallel

    step, state, batch = train_step.build_step(
        train_step.step_spec(kind, size, impl), parallel.make_mesh()
    )
    compiled = step.lower(state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    times, _ = train_step.run_steps(compiled, state, batch, steps)
    with open("/proc/self/status") as f:
        hwm_kib = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    print(
        json.dumps(
            {
                "impl": impl,
                "step_s": times,
                "peak_rss_gib": hwm_kib / 2**20,
                "xla_temp_gib": temp / 2**30,
            }
        )
    )


def markdown(report: dict) -> str:
    lines = [
        f"### Peak memory of the {report['size']}-size {report['kind']} step: oneDNN vs XLA "
        "convolutions",
        "",
        f"Command: `{report['command']}`; {report['date']}; {report['machine']}.",
        "",
        "| conv_impl | step s (last of the run) | peak resident GiB (VmHWM) | XLA temp GiB |",
        "|---|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['impl']} | {r['step_s'][-1]:.2f} | {r['peak_rss_gib']:.2f} | "
            f"{r['xla_temp_gib']:.2f} |"
        )
    lines += [
        "",
        f"One fresh process per row, {report['steps']} steps each (the first includes "
        "oneDNN's kernel generation). 'auto' on CPU = oneDNN custom calls, whose per-call "
        "buffers are outside XLA's temp; the peak resident memory includes them.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import common

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="finetune/full")
    p.add_argument("--size", default="paper")
    p.add_argument("--impls", default="auto,xla")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args(argv)
    report = {
        **common.report_header(__file__, argv),
        "kind": a.kind,
        "size": a.size,
        "steps": a.steps,
        "rows": [],
    }
    for impl in a.impls.split(","):
        report["rows"].append(
            common.run_child(__file__, _CHILD_ENV, [a.kind, a.size, impl, a.steps])
        )
        print(report["rows"][-1], flush=True)
    common.write_results(os.path.dirname(a.out), os.path.basename(a.out), report, markdown(report))
    return report


if __name__ == "__main__":
    import common

    common.child_or_main(_CHILD_ENV, _child, main)
