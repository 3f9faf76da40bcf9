"""Command line: pretrain a pretext task, finetune, evaluate.

    python launch/main.py --config=configs/rpl.py [--workdir=DIR] [--config.KEY=VALUE ...]

`--config=FILE[:ARG]` picks a config file and its size (`:smoke`, `:paper`); any key can be
overridden, e.g. `--config.data.root=/data/BraTS2021_Training --config.pretrain.num_steps=1000`.
This file only parses flags and dispatches to `ssl3d_jax.run.run`.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

# `python launch/main.py` puts launch/ first on sys.path, not the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import logging  # noqa: E402

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/rpl.py or configs/rpl.py:smoke.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output folder (checkpoints, metrics.jsonl, results.json). Default: ./workdir/<task>.",
)


def _setup_logging() -> None:
    # orbax and grain log every save and read through absl at INFO; keep their warnings only and
    # give the library's own progress lines a plain format.
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    lib = logging.getLogger("ssl3d_jax")
    lib.setLevel(logging.INFO)
    lib.addHandler(handler)
    lib.propagate = False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from ssl3d_jax import errors, run

    # A persistent compilation cache turns the ~10 s of XLA compiles of a rerun into a fraction.
    cache = os.environ.get("SSL3D_JAX_CACHE", os.path.expanduser("~/.cache/ssl3d_jax"))
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "jax_compile"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    _setup_logging()
    log = logging.getLogger("ssl3d_jax.main")
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("workdir", config.task or "run")
    log.info("Config:\n%s", config)
    try:
        run.run(config, workdir)
    except errors.Ssl3dError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _parse_flags(argv):
    """absl's flag parsing, but a config key that does not exist is one line naming the flag.

    ml_collections raises a bare AttributeError / KeyError for `--config.pretrain.num_stepz=3`,
    which absl prints as a traceback; absl itself only reports its own `flags.Error` cleanly.
    """
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        text = str(e)
        hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
        key = hint.group(2) if hint else (re.findall(r"\w+", text) or ["?"])[0]
        flag = next(
            (
                a.split("=", 1)[0]
                for a in argv[1:]
                if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")
            ),
            "--config",
        )
        advice = f"did you mean {hint.group(1)!r}?" if hint else "see configs/common.py."
        print(f"error: {flag}: the config has no key {key!r}; {advice}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=_parse_flags)
