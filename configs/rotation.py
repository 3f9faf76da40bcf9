"""Rotation prediction pretraining, then U-Net segmentation finetuning.

Run:
    python launch/main.py --config=configs/rotation.py              # default: phantom, 2-core CPU
    python launch/main.py --config=configs/rotation.py:smoke        # seconds, for tests
    python launch/main.py --config=configs/rotation.py:2d           # 2D: 4 in-plane rotations
    python launch/main.py --config=configs/rotation.py:paper --config.data.root=/data/BraTS2021

Paper setting (Taleb et al. 2020, original `configs/train/rotation_3d.json`): whole 128³ volumes
(no patches), each rotated by one of 10 classes (identity and 90/180/270° about each axis), batch
4, Adam lr 1e-4, 1000 epochs; head `big_fully` (2048, 1024) on the flattened 4³×256 bottom. 2D
(`rotation_2d.json`, Kaggle retina 224², DenseNet121): 4 classes (rot90 by k), batch 32, lr 1e-5
(`rotation_2d_pancreas.json`: 128², U-Net encoder, batch 64, lr 1e-5). The `paper` size uses these
batch sizes and learning rates on BraTS (4 modalities; 2D: 128² axial slices).

The `default` size trains on whole 40³ volumes (2D: 64² slices) with the half-width encoder and a
256-wide head. A whole 40³ volume is 64x the voxels of one of RPL's 10³ patches, so the 3D default
is batch 2 for 200 steps: measured 0.8 s of CPU time per step on 2 cores (1.5 s at batch 4), i.e.
a few minutes, not the ~1 minute of the patch tasks. The 2D default (batch 8, 1000 steps) measured
0.06 s per step. `smoke` uses 24³ / 24² with widths 4..8.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.base_config(arg)
    size, dims = config.size, config.data.spatial_dims
    config.task = "rotation"
    config.rotation = ml_collections.ConfigDict()
    # The original's `big_fully` head is 2048 → 1024; smaller at CPU scale.
    config.rotation.head_hidden = {"paper": (2048, 1024), "default": (256,), "smoke": (16,)}[size]
    # The original used dropout 0.5 in `big_fully`; 0 like the encoder (common.py) at all sizes.
    config.rotation.head_dropout = 0.0
    if size == "paper":
        config.pretrain.batch_size = 4 if dims == 3 else 32
        config.pretrain.learning_rate = 1e-4 if dims == 3 else 1e-5
    elif size == "default" and dims == 3:
        # Chosen on the validation split (docs/results/pretext_lr_search.md): 200 steps × 2
        # volumes ended at chance at every learning rate from 1e-4 to 3e-3; 600 × 4 at 1e-3 reach
        # a held-out loss of 0.83 × chance (≈2.5 min on 2 cores).
        config.pretrain.batch_size = 4
        config.pretrain.num_steps = 600
        config.pretrain.log_every = 50
        config.pretrain.checkpoint_every = 200
    else:
        config.pretrain.batch_size = 8
    return config
