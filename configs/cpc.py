"""Contrastive predictive coding (CPC) pretraining, then U-Net segmentation finetuning.

Run:
    python launch/main.py --config=configs/cpc.py                 # default: phantom, 2-core CPU
    python launch/main.py --config=configs/cpc.py:smoke           # seconds, for tests
    python launch/main.py --config=configs/cpc.py:2d              # 2D variant on axial slices
    python launch/main.py --config=configs/cpc.py:paper --config.data.root=/data/BraTS2021_Training

Paper setting (Taleb et al. 2020, and the original `configs/train/cpc_3d.json`): 128³ volumes cut
into a 4×4×4 grid of non-overlapping 32³ patches (no jitter); each patch → U-Net encoder → global
max pool → Dense(1024); context = the 3×3 row-0 neighbourhood + patch (1, y, z) → GRU(256);
predictions of rows 2 and 3 (one Dense per term); Adam lr 1e-4; batch 32 examples (= one volume);
augmentation: whole-volume crop to 0.95·D + pad, per patch flip along axis 0 + crop 7/8 + pad.
The original 2D config (`cpc_2d.json`: 224² retina, 5×5 overlapping patches, code 1024, lr 1e-5,
per-patch crop 11/12) is approximated by `paper,2d`: 128² BraTS slices, a non-overlapping 5×5
grid of 24² patches (jitter 1), context 3 + 1 patches, rows 2–4 predicted (3 terms).

This port uses InfoNCE against every other patch latent of the global batch (see
`ssl3d_jax/tasks/cpc.py` for every deviation). `paper` batches 8 volumes (512 candidate latents
per prediction) instead of the original's one.

The `default` size (40³, 4×4×4 grid of 6³ cells with jitter 1 → 5³ patches, batch 2 volumes,
300 steps; 2D: 64², 5×5 grid of 7² cells, jitter 1 → 6² patches, batch 8) uses half-width
encoders, code 128 and GRU 64, and fits a 2-core CPU. CPC encodes all P³ = 64 patches of every
volume each step, so one 3D step costs ~5× an RPL step at the same batch. `smoke` (24³ / 24²,
4×4 grid of 3³ / 3² patches, code and GRU 16, batch 8) runs in seconds.

Grid position (`cpc.grid_fraction`, ssl3d_jax/ops/patches.py): `default` and `smoke` use a grid
of cells `floor(0.6 · size) // P` at a random origin per volume. With the original's grid at the
origin (40³: 10³ cells, jitter 2) a linear classifier told a single patch's cell (of 64) with
0.29 held-out accuracy on the phantom (chance 0.016), so InfoNCE's positive could be picked out
of the same volume's patches by position alone; with the random grid 0.031, 2.0× chance (f = 0.5,
4³ patches: 1.3×; docs/results/shortcut_audit.md). `paper` keeps the original's geometry (4³
cells of 32³ over the whole 128³ volume, no jitter; not audited at that size). Measured on one H100
(jax 0.11.2): the `paper` 3D step (8 × 128³ → 512 patches of 32³) takes 0.056 s, 12.4 GiB peak.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.base_config(arg)
    size, dims = config.size, config.data.spatial_dims
    config.task = "cpc"
    c = config.cpc = ml_collections.ConfigDict()
    # Grid: P per side; rows 0..P//2-1 are context, the rest are predicted. jitter: voxels cut
    # off each cell (random offset in [0, jitter]); 0 = the original's plain 3D grid. Default
    # uses 1 (3D: 5³ patches from 6³ cells; 2D: 6² from 7²).
    p3 = {"paper": (4, 0), "default": (4, 1), "smoke": (4, 0)}
    p2 = {"paper": (5, 1), "default": (5, 1), "smoke": (4, 0)}
    c.patches_per_side, c.jitter = (p3 if dims == 3 else p2)[size]
    # Share of each edge the grid covers; < 1 puts it at a random origin per volume (see above).
    c.grid_fraction = 1.0 if size == "paper" else 0.6
    c.code_size = {"paper": 1024, "default": 128, "smoke": 16}[size]
    c.gru_units = {"paper": 256, "default": 64, "smoke": 16}[size]
    # InfoNCE score = dot product / temperature (1: the paper's plain dot product).
    c.temperature = 1.0
    # Original augmentation (train and validation alike): whole-volume crop fraction + pad back
    # (3D: int(0.95 * D); 2D configs crop_size = D, a no-op), per-patch crop fraction + pad back
    # (3D 7/8, 2D 11/12), and a per-patch flip along axis 0 (3D only).
    c.volume_crop = 0.95 if dims == 3 else 1.0
    c.patch_crop = 7 / 8 if dims == 3 else 11 / 12
    c.flip_patches = dims == 3
    # Volumes (images) per batch; each contributes P**n candidate latents to every prediction.
    config.pretrain.batch_size = {"paper": 8, "default": 2 if dims == 3 else 8, "smoke": 8}[size]
    if size != "paper" and dims == 3:
        # Chosen on the validation split (3D; docs/results/pretext_lr_search.md, "CPC"): at lr 1e-3,
        # and at every lr for 300 steps, the held-out loss stays at chance; at 3e-4 it leaves
        # chance after ~1500 steps and reaches 0.81 x chance at 3000 (no lower at 4000).
        config.pretrain.learning_rate = 3e-4
    if size == "default" and dims == 3:
        # 2 volumes (128 patches of 5³) per step: ~26 steps/s on the idle 2-core CPU.
        config.pretrain.num_steps = 3000
    return config
