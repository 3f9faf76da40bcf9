"""3D (or 2D) Jigsaw puzzle pretraining, then U-Net segmentation finetuning.

Run:
    python launch/main.py --config=configs/jigsaw.py                # default: phantom, 2-core CPU
    python launch/main.py --config=configs/jigsaw.py:smoke          # seconds, for tests
    python launch/main.py --config=configs/jigsaw.py:2d             # 2D tiles of axial slices
    python launch/main.py --config=configs/jigsaw.py:paper \
        --config.data.root=/data/BraTS2021_Training

Paper setting (Taleb et al. 2020, original `configs/train/jigsaw_3d.json`): 128³ volumes split
into a 3×3×3 grid of 42³ cells, patches of 39³ (jitter 3), shuffled by one of 100 permutations of
27; batch 8, Adam lr 1e-4, 1000 epochs; head `big_fully` (2048, 1024). 2D (`jigsaw_2d.json`,
224² retina): 3×3 tiles, jitter 8, 100 permutations of 9, batch 32, lr 1e-5. The `paper` size
reproduces these on BraTS (4 modalities); in 2D its 128² slices with jitter 8 give 34² tiles (the
original's 128² pancreas-slice config used jitter 4, 38² tiles, batch 64).

The permutation set is computed, not shipped: `ssl3d_jax.tasks.jigsaw.permutation_set` (greedy
max-min Hamming selection, seeded by `jigsaw.permutation_seed`).

Measured paper-size step (Adam, f32): 3D batch 8 (216 patches of 39³ × 4 channels) 44 ms and
5.7 GiB peak on one H100; 2D batch 32 (288 tiles of 34²) 3 ms.

`default` uses 40³ volumes (batch 8) or 64² slices (batch 16) and half-width encoders so that the
whole pretrain → finetune → evaluate run fits a 2-core CPU in minutes. `smoke`: 24³ / 24² inputs,
batch 8.

Grid position (`jigsaw.grid_fraction`, ssl3d_jax/ops/patches.py): `default` and `smoke` use a grid
of cells `floor(0.5 · size) // 3` at a random origin per volume, jitter 1 (40³: 6³ cells, 5³
patches; 64²: 10² cells, 9² tiles; 24³ / 24²: 4-voxel cells, 3³ / 3² patches). With the
original's grid at the origin (40³: 13³ cells, jitter 3) a linear classifier placed a single
patch in its cell with 0.93 held-out accuracy on the phantom (chance 0.037), so the puzzle could be
solved patch by patch; with the random half-size grid 0.055, 1.5× chance
(docs/results/shortcut_audit.md). `paper` keeps the original's geometry (42³ cells over the whole
128³ volume, jitter 3), although the shortcut is there too: 0.99 accuracy on the phantom at 128³
(2.0× chance with `--config.jigsaw.grid_fraction=0.5 --config.jigsaw.jitter=2`: 19³ patches).

Puzzles per volume (`jigsaw.puzzles_per_volume`): `default` and `smoke` apply 64 distinct
permutations to each volume's encoded patches per step (the original: one; `paper` keeps one).
With one puzzle per volume and the grid at a random origin the loss never left chance (3000 steps
at lr 3e-4); with 64 the held-out loss reaches 0.13 × chance in 1000 steps at lr 1e-4
(docs/results/pretext_lr_search.md, "Jigsaw: many puzzles per volume"). 2D `default` keeps the
common lr 1e-3, not searched.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.base_config(arg)
    size, dims = config.size, config.data.spatial_dims
    config.task = "jigsaw"
    config.jigsaw = ml_collections.ConfigDict()
    config.jigsaw.patches_per_side = 3
    # Share of each edge the grid covers; < 1 puts it at a random origin per volume (see above).
    config.jigsaw.grid_fraction = 1.0 if size == "paper" else 0.5
    # Jitter ≈ 7–10 % of the cell edge as in the original (3 of 42 in 3D, 8 of 74 in 2D), at least
    # 1 voxel. The paper 2D value follows jigsaw_2d.json (224² retina), kept at 128².
    if size != "paper":
        config.jigsaw.jitter = 1
    else:
        config.jigsaw.jitter = 3 if dims == 3 else 8
    config.jigsaw.num_permutations = 100
    config.jigsaw.permutation_seed = 0
    # Puzzles per volume and step, distinct permutations of the same encoded patches: the
    # original's 1 at paper size; 64 otherwise, which is what makes Jigsaw learn with the grid at a
    # random origin (docs/results/pretext_lr_search.md, "Jigsaw: many puzzles per volume").
    config.jigsaw.puzzles_per_volume = 1 if size == "paper" else 64
    # The original's `big_fully` head is 2048 → 1024 (on 27 × 256 = 6912 features in 3D);
    # smaller at CPU scale.
    config.jigsaw.head_hidden = {"paper": (2048, 1024), "default": (256,), "smoke": (16,)}[size]
    config.jigsaw.head_dropout = 0.0  # the original used 0.5; see ssl3d_jax/tasks/jigsaw.py
    if dims == 3:
        # Each example is 27 patches through the encoder; at default size (5³ patches) batch 8 =
        # 216 patches and 512 puzzles per step, about 0.1 s on the idle 2-core CPU.
        config.pretrain.batch_size = {"paper": 8, "default": 8, "smoke": 8}[size]
        if size == "default":
            config.pretrain.num_steps = 1000
            config.pretrain.checkpoint_every = 250
            config.pretrain.log_every = 50
    else:
        config.pretrain.batch_size = {"paper": 32, "default": 16, "smoke": 8}[size]
    if size == "paper":
        config.pretrain.learning_rate = 1e-4 if dims == 3 else 1e-5
    elif dims == 3:
        # The paper's value, chosen on the validation split (docs/results/pretext_lr_search.md,
        # "Jigsaw: many puzzles per volume"): 1e-4 / 3e-4 / 1e-3 → val loss 0.13 / 0.14 / 1.00 ×
        # chance after 1000 steps (1e-3 never leaves chance).
        config.pretrain.learning_rate = 1e-4
    return config
