"""Median step time of the default RPL and segmentation steps in this process (conv_impl 'auto').

Used by `benchmarks/device/h200_threads.sh` to compare thread settings in fresh processes:
    python benchmarks/device/step_times.py pretext/rpl,finetune/full 15
prints one JSON line {kind: median seconds}.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import layers  # noqa: E402
import train_step  # noqa: E402

from ssl3d_jax import parallel  # noqa: E402


def main(kinds: str, steps: int) -> None:
    mesh = parallel.make_mesh()
    out = {}
    for kind in kinds.split(","):
        compiled, state, batch = layers._build(kind, "default", "auto", mesh)
        times, _ = train_step.run_steps(compiled, state, batch, steps)
        out[kind] = statistics.median(times)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
