"""Relative 3D patch location (RPL) pretraining, then 3D U-Net segmentation finetuning.

Run:
    python launch/main.py --config=configs/rpl.py           # default: phantom, 2-core CPU, minutes
    python launch/main.py --config=configs/rpl.py:smoke     # seconds, for tests
    python launch/main.py --config=configs/rpl.py:2d        # 2D: axial slices, 8 classes
    python launch/main.py --config=configs/rpl.py:paper --config.data.root=/data/BraTS2021_Training

Paper setting (Taleb et al. 2020, and the original `configs/train/rpl_3d.json`): 128³ volumes
split into a 3×3×3 grid of 42³ cells, patches of 39³ (jitter 3), the centre patch as reference
and one of the other 26 as query; batch 32, Adam lr 1e-4, 1000 epochs. The `paper` size
reproduces this on BraTS (4 modalities). The `default` size uses 40³ inputs and half-width
encoders so that the whole pretrain → finetune → evaluate run fits a 2-core CPU in minutes.

Grid position (`rpl.grid_fraction`, ssl3d_jax/ops/patches.py): `default` and `smoke` use a grid of
cells `floor(0.5 · size) // 3` (40³: 6³ cells, 5³ patches with jitter 1; 24³: 4³ cells, 3³
patches) at a random origin per volume, so that the query patch alone does not tell its class.
With the original's grid at the origin (13³ cells, jitter 3) a linear classifier on the query
patch alone placed it with 0.93 held-out accuracy on the phantom (chance 0.038); with the random
half-size grid 0.055, 1.4× chance (docs/results/shortcut_audit.md, `python -m ssl3d_jax.audit`).
`paper` keeps the original's geometry (the grid over the whole 128³ volume at its origin, 42³
cells, jitter 3), although the same shortcut is there: on the phantom preprocessed to 128³ the
query patch alone gives its class with 1.00 accuracy (2.0× chance with
`--config.rpl.grid_fraction=0.5 --config.rpl.jitter=2`: 19³ patches). Real BraTS scans are
cropped to the brain and resized the same way, so expect it there too.

Queries per volume (`rpl.queries_per_volume`): `default` and `smoke` classify all 26 (2D: 8)
queries of each volume against its reference per step (the original: one; `paper` keeps one).
With one query per volume and the grid at a random origin the loss stayed at chance for 11 000
steps; with all of them the held-out loss reaches 0.71 × chance in 1000 steps at lr 3e-4
(docs/results/pretext_lr_search.md, "RPL: all queries per volume"). 2D `default` keeps the
common lr 1e-3, not searched.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.base_config(arg)
    size = config.size
    config.task = "rpl"
    config.rpl = ml_collections.ConfigDict()
    config.rpl.patches_per_side = 3
    # Share of each edge the grid covers; < 1 puts it at a random origin per volume (see above).
    config.rpl.grid_fraction = 1.0 if size == "paper" else 0.5
    # Voxels cut off each cell (random offset in [0, jitter]): the original's 3 of 42 (7 %) at
    # paper size; 1 voxel of the 6³ / 4³ cells (the smallest non-zero jitter) otherwise.
    config.rpl.jitter = 3 if size == "paper" else 1
    # (reference, query) pairs per volume and step: the original's 1 at paper size; every
    # non-centre cell (26 in 3D, 8 in 2D) otherwise, which is what makes RPL learn with the grid at
    # a random origin (docs/results/pretext_lr_search.md, "RPL: all queries per volume").
    config.rpl.queries_per_volume = 1 if size == "paper" else 3**config.data.spatial_dims - 1
    # The original's `big_fully` head is 2048 → 1024; smaller at CPU scale.
    config.rpl.head_hidden = {"paper": (2048, 1024), "default": (256,), "smoke": (16,)}[size]
    config.rpl.head_dropout = 0.0
    # 3D: volumes per step (the original's rpl_3d.json: 32); 2D: slices (rpl_2d: 32 to 128).
    if config.data.spatial_dims == 3:
        config.pretrain.batch_size = {"paper": 32, "default": 8, "smoke": 8}[size]
        if size != "paper":
            # Chosen on the validation split (docs/results/pretext_lr_search.md, "RPL: all queries
            # per volume"): 1e-4 / 3e-4 / 1e-3 → val loss 0.81 / 0.71 / 0.89 × chance at 1000 steps.
            config.pretrain.learning_rate = 3e-4
    else:
        config.pretrain.batch_size = {"paper": 64, "default": 32, "smoke": 8}[size]
        # default 64² slices: 10² cells and 9² patches at a random origin (paper 128²: 42² cells,
        # 39² patches, J=3; the original's 2D: J=4 on 128², 8 on 224²).
    return config
