"""Flip-axis prediction pretraining (an example task of one's own), then U-Net finetuning.

    SSL3D_JAX_TASKS=docs/examples/flip_axis/flip_axis.py \
        python launch/main.py --config=docs/examples/flip_axis/flip_axis_config.py:smoke
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.base_config(arg)
    config.task = "flip_axis"
    # The task's own section (`config.flip_axis`): this example has no settings beyond the
    # shared `data` and `model` ones; a task with some (a grid, a temperature) puts them here.
    config.flip_axis = ml_collections.ConfigDict()
    config.pretrain.learning_rate = 3e-4
    return config
