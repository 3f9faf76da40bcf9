"""Run `launch/main.py` as a user would: a fresh process on one CPU device."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(args, cache_dir, timeout=900, env=None) -> subprocess.CompletedProcess:
    """`launch/main.py ARGS` in the repository root; `env`: extra environment variables."""
    env = dict(os.environ, SSL3D_JAX_CACHE=str(cache_dir), **(env or {}))
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's machine
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "main.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
