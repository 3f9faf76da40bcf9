"""3D Exemplar networks pretraining (or its 2D variant), then U-Net segmentation finetuning.

Run:
    python launch/main.py --config=configs/exemplar.py                # default: phantom, 2-core CPU
    python launch/main.py --config=configs/exemplar.py:smoke          # seconds, for tests
    python launch/main.py --config=configs/exemplar.py:2d             # the 2D baseline on slices
    python launch/main.py --config=configs/exemplar.py:paper --config.data.root=/data/BraTS2021

Paper setting (Taleb et al. 2020, and the original `configs/train/exemplar_3d.json`): whole 128³
volumes, batch 2, Adam lr 1e-4, 1000 epochs, code size 1024, margin 1.0, negatives from the
dataset; `exemplar_2d.json`: batch 16, lr 1e-5, code size 1024. The `paper` size uses these
numbers (negatives from the batch, see `ssl3d_jax/tasks/exemplar.py` for all deviations).

The `default` size trains on whole 40³ volumes (2D: 64² slices) with the half-width encoder and
code size 128, lr 1e-3. Every volume is encoded twice (anchor and positive views), so a 3D step
costs like rotation's at twice the batch: measured 0.8 s per step at batch 2 and 1.5 s at batch
4 (4 channels, 1 CPU device, 2 cores). The 3D default is therefore batch 2 (the paper's; the
negative of each volume is the other one) for 200 steps, a few minutes. The 2D default is batch
16 (the paper's 2D batch) for 1000 steps, 0.08 s per step (0.15 s at batch 32). `smoke` uses
24³ / 24², widths 4..8, code size 16 and batch 8.

The augmentation keys (`flip_prob` ... `max_scale`) are those of `ssl3d_jax.ops.augment.augment`;
their values are the original's except `max_degrees` (the original rotated by any angle).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.base_config(arg)
    size, dims = config.size, config.data.spatial_dims
    config.task = "exemplar"
    c = config.exemplar = ml_collections.ConfigDict()
    c.code_size = {"paper": 1024, "default": 128, "smoke": 16}[size]
    # Reachable on the unit sphere (squared distances in [0, 4]); unreachable in the original.
    c.margin = 1.0
    # False: plain Euclidean distances in the hinge (in [0, 2] on the unit sphere). With squared
    # distances the default 3D run stayed collapsed (all codes within 1e-3, loss 1.0 after 80
    # steps); with plain ones it left the collapse (loss 0.44 at step 80). See tasks/exemplar.py.
    c.squared_distance = False
    c.batch_hard = False  # True: hardest negative among the batch's other volumes
    c.augment_positive = True  # False: the original's pristine positive (and negative)
    # The original's augmentation (spec section 2.6), probabilities per step / per plane.
    c.flip_prob = 0.5
    c.rotate_prob = 0.5
    c.rot90_prob = 0.5  # share of the rotations that are k x 90°; the rest are small angles
    c.max_degrees = 15.0  # the original: uniform in [0, 360)
    c.intensity_prob = 0.5
    c.shift = 0.125
    c.contrast = 0.5
    c.zoom_prob = 0.15
    c.min_scale = 0.8
    c.max_scale = 1.2
    if size == "paper":
        config.pretrain.batch_size = 2 if dims == 3 else 16
        config.pretrain.learning_rate = 1e-4 if dims == 3 else 1e-5
    elif size == "default" and dims == 3:
        # Chosen on the validation split (docs/results/pretext_lr_search.md): 200 steps × 2
        # volumes ended at chance (the margin) at every learning rate from 1e-4 to 3e-3; 600 × 4
        # at 1e-3 reach a held-out loss of 0.85 × chance, triplet accuracy 0.75 (chance 0.5).
        config.pretrain.batch_size = 4
        config.pretrain.num_steps = 600
        config.pretrain.log_every = 50
        config.pretrain.checkpoint_every = 200
    elif size == "default":
        config.pretrain.batch_size = 16
    else:
        config.pretrain.batch_size = 8
    return config
