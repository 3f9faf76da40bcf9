"""Test session set-up: 8 simulated CPU devices, parsed absl flags, a persistent compile cache.

All of this must happen before JAX initialises its backend, hence at import time of conftest.
"""

from __future__ import annotations

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parents[1] / ".cache" / "jax_test_cache"
# Preprocessed-array caches of in-process runs stay inside the checkout, not in ~/.cache.
os.environ.setdefault("SSL3D_JAX_CACHE", str(_CACHE.parent / "ssl3d_jax_test"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# grain's multiprocess prefetch reads an absl flag; outside app.run flags are unparsed.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def fast_compile():
    """XLA without most optimisations for one test module (`pytestmark =
    pytest.mark.usefixtures("fast_compile")`): much faster compiles of tiny programs on 2 cores
    (measured for the exemplar smoke model, 2D + 3D, init + loss-and-grad compile + 25 steps:
    30 s -> 12 s of CPU). Restored afterwards for other test modules."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
