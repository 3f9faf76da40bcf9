"""Command line: pretrain a pretext task, finetune, evaluate (the same as the `ssl3d` command).

    python launch/main.py --config=configs/rpl.py [--workdir=DIR] [--config.KEY=VALUE ...]
    python launch/main.py --list      # config files and pretext tasks
    python launch/main.py --help      # config syntax, sizes, modes, outputs

`--config=FILE[:ARG]` picks a config file and its size (`:smoke`, `:paper`); any key can be
overridden, e.g. `--config.data.root=/data/BraTS2021_Training --config.pretrain.num_steps=1000`.
This file only makes the repository importable without `pip install -e .` and calls
`ssl3d_jax.cli.main`, the entry point of the installed `ssl3d` command.
"""

from __future__ import annotations

import pathlib
import sys

# `python launch/main.py` puts launch/ first on sys.path, not the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ssl3d_jax import cli  # noqa: E402

if __name__ == "__main__":
    cli.main()
