"""The benchmark suite in one command: run every benchmark, then write benchmarks/RESULTS.md.

    python benchmarks/run_all.py                 # all of them (about 15 min on a 2-core CPU)
    python benchmarks/run_all.py --only=train_step,input_pipeline
    python benchmarks/run_all.py --assemble      # rebuild RESULTS.md from the files on disk

Each benchmark is its own script (runnable alone, with its own flags) that writes
`benchmarks/results/<name>.{json,md}`; they run here one after the other, each in a fresh
process, so that one's threads, caches and peak memory do not colour the next one's figures.
RESULTS.md is the concatenation of their Markdown, each fragment carrying its own command, date
and machine, under a header saying how the file was made.

  name             what (issue 6)
  pretext_batches  (a) pretext batch generation: our jitted functions vs original-style NumPy
  train_step       (b) train-step time, GFLOP/s, PyTorch ratio; (d) time to first step, memory
  input_pipeline   (c) cases/s from NIfTI and from the cache through grain vs the step's needs,
                   data-wait fraction, memory as the dataset grows
  remat_memory     bf16 / remat memory of paper-size steps (compile only; issue 5)
  layers           per-layer fwd / dX / dW of every conv the default models run, for each exact
                   formulation (ssl3d_jax/ops/conv.py: XLA, the pure-XLA rewrites, oneDNN) and
                   PyTorch; whole steps 'xla' vs the pure-XLA fallback vs oneDNN; oneDNN's
                   threads serialised or not (issue 13)
  profile_step     where the segmentation and RPL steps' time goes (convolutions vs the rest),
                   ours and PyTorch's (issue 13)
  peak_memory      peak resident memory of the paper-size segmentation step, oneDNN vs XLA
                   convolutions (issue 13)
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# name -> (script, Markdown it writes)
BENCHMARKS = {
    "pretext_batches": ("pretext_batches.py", os.path.join(RESULTS, "pretext_batches.md")),
    "train_step": ("train_step.py", os.path.join(RESULTS, "train_step.md")),
    "input_pipeline": ("input_pipeline.py", os.path.join(RESULTS, "input_pipeline.md")),
    "remat_memory": ("remat_memory.py", os.path.join(HERE, "remat_memory.md")),
    "layers": ("layers.py", os.path.join(RESULTS, "layers.md")),
    "profile_step": ("profile_step.py", os.path.join(RESULTS, "profile_step.md")),
    "peak_memory": ("peak_memory.py", os.path.join(RESULTS, "peak_memory.md")),
}
# Fragments measured on the lent accelerator machine (benchmarks/device/*.sh): assembled into
# RESULTS.md when present, never run here (no accelerator on this project's machines or in CI).
DEVICE_FRAGMENTS = ("h200_device.md", "h200_gpu_train_step.md", "h200_cpu16_train_step.md")

HEADER = """# Benchmark results

Written by `python benchmarks/run_all.py` ({date}); each section below was produced by the
command it names, on the machine it names, and can be rerun alone. Ratios are reported as
measured, including where we are slower.

"""


def run(names: Sequence[str]) -> None:
    for name in names:
        script, _ = BENCHMARKS[name]
        cmd = [sys.executable, os.path.join(HERE, script)]
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)


def _nest(markdown: str) -> str:
    """Shift a fragment's headings so that its first one is level 2 (fragments start at level 1
    or 3), keeping their relative levels; code blocks are left alone."""
    lines, fenced, shift = markdown.splitlines(), False, None
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            shift = 2 - level if shift is None else shift
            lines[i] = "#" * max(level + shift, 2) + line[level:]
    return "\n".join(lines)


def assemble(path: str = os.path.join(HERE, "RESULTS.md")) -> str:
    """Concatenate the benchmarks' Markdown (those present) into `path`; returns the text."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    parts = [HEADER.format(date=date)]
    missing = []
    for name, (_, md) in BENCHMARKS.items():
        if not os.path.exists(md):
            missing.append(name)
            continue
        with open(md, encoding="utf-8") as f:
            text = f.read().strip()
        parts.append(_nest(text) + "\n\n")
    for name in DEVICE_FRAGMENTS:
        md = os.path.join(RESULTS, name)
        if os.path.exists(md):
            with open(md, encoding="utf-8") as f:
                parts.append(_nest(f.read().strip()) + "\n\n")
    if missing:
        parts.append("Not yet run: " + ", ".join(missing) + ".\n")
    text = "".join(parts)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks")
    p.add_argument("--assemble", action="store_true", help="only rebuild RESULTS.md")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; expected some of {list(BENCHMARKS)}")
    if not args.assemble:
        run(names)
    assemble()
    print(f"wrote {os.path.join(HERE, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
